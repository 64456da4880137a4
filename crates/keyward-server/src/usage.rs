//! Usage counting: per key and minute, requests by outcome, plus `last_used_at`. Counted in
//! memory with atomics on the request path, written to storage in batches (every
//! `usage.flush_seconds` and once more at shutdown, after the last connection closed).

use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;

use dashmap::DashMap;
use keyward_core::ids::KeyId;
use keyward_core::{ErrorCode, Timestamp};
use keyward_store::{Store, StoreResult, UsageCounts, UsageRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Unauthorized,
    Forbidden,
    RateLimited,
}

impl Outcome {
    /// The outcome an error stands for, if it is one that usage counts.
    pub fn of(code: ErrorCode) -> Option<Self> {
        match code.status() {
            401 => Some(Self::Unauthorized),
            403 => Some(Self::Forbidden),
            429 => Some(Self::RateLimited),
            _ => None,
        }
    }
}

/// One key's counts not yet written.
#[derive(Default)]
struct KeyUsage {
    last_used: AtomicI64,
    /// Counts by minute start, oldest first: rarely more than two minutes between flushes.
    minutes: Mutex<Vec<(i64, UsageCounts)>>,
}

impl KeyUsage {
    fn add(&self, minute: i64, counts: &UsageCounts) {
        let mut minutes = self.minutes.lock();
        match minutes.iter_mut().rev().find(|(m, _)| *m == minute) {
            Some((_, existing)) => existing.add(counts),
            None => {
                minutes.push((minute, *counts));
                minutes.sort_unstable_by_key(|(m, _)| *m);
            }
        }
    }
}

/// Keyed by the key's id, looked up without copying it: one map probe and one uncontended
/// lock per request.
#[derive(Default)]
pub struct UsageRecorder {
    keys: DashMap<KeyId, KeyUsage, foldhash::fast::RandomState>,
}

fn one(outcome: Outcome) -> UsageCounts {
    let mut counts = UsageCounts::default();
    match outcome {
        Outcome::Allowed => counts.allowed = 1,
        Outcome::Unauthorized => counts.unauthorized = 1,
        Outcome::Forbidden => counts.forbidden = 1,
        Outcome::RateLimited => counts.rate_limited = 1,
    }
    counts
}

impl UsageRecorder {
    pub fn record(&self, key: &KeyId, outcome: Outcome, now: Timestamp) {
        let record = |usage: &KeyUsage| {
            usage.add(now.minute_start().as_millis(), &one(outcome));
            if outcome == Outcome::Allowed {
                usage.last_used.fetch_max(now.as_millis(), Ordering::AcqRel);
            }
        };
        // A shared (read) lock in the common case: the key has an entry already.
        match self.keys.get(key) {
            Some(usage) => record(&usage),
            None => record(&self.keys.entry(*key).or_default()),
        }
    }

    /// Counts not yet written, for one key (merged into usage answers).
    pub fn pending(&self, key: &KeyId) -> Vec<(Timestamp, UsageCounts)> {
        let Some(usage) = self.keys.get(key) else {
            return Vec::new();
        };
        let minutes = usage.minutes.lock();
        minutes
            .iter()
            .filter(|(_, c)| !c.is_zero())
            .map(|(m, c)| (Timestamp::from_millis(*m), *c))
            .collect()
    }

    /// Takes every count so far. A key keeps its entry while it is in use (re-creating it
    /// after every flush would copy its id and take a shard's write lock per busy key); one
    /// with nothing since the last flush is dropped.
    fn drain(&self) -> (Vec<UsageRow>, Vec<(KeyId, Timestamp)>) {
        let mut rows = Vec::new();
        let mut last_used = Vec::new();
        self.keys.retain(|key, usage| {
            let minutes = std::mem::take(&mut *usage.minutes.lock());
            let at = usage.last_used.swap(0, Ordering::AcqRel);
            let idle = minutes.is_empty() && at == 0;
            for (minute, counts) in minutes {
                if !counts.is_zero() {
                    rows.push(UsageRow {
                        key_id: *key,
                        minute: Timestamp::from_millis(minute),
                        counts,
                    });
                }
            }
            if at > 0 {
                last_used.push((*key, Timestamp::from_millis(at)));
            }
            !idle
        });
        (rows, last_used)
    }

    /// Writes everything counted so far. On failure the counts are put back.
    pub async fn flush(&self, store: &dyn Store) -> StoreResult<usize> {
        let (rows, last_used) = self.drain();
        if rows.is_empty() && last_used.is_empty() {
            return Ok(0);
        }
        match store.record_usage(&rows, &last_used).await {
            Ok(()) => Ok(rows.len()),
            Err(e) => {
                for row in &rows {
                    self.keys
                        .entry(row.key_id)
                        .or_default()
                        .add(row.minute.as_millis(), &row.counts);
                }
                for (key, at) in last_used {
                    self.keys
                        .entry(key)
                        .or_default()
                        .last_used
                        .fetch_max(at.as_millis(), Ordering::AcqRel);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_minute_and_outcome() {
        let r = UsageRecorder::default();
        let k = KeyId::generate();
        let t = Timestamp::from_millis(120_000);
        r.record(&k, Outcome::Allowed, t);
        r.record(&k, Outcome::Allowed, t.plus_secs(30));
        r.record(&k, Outcome::Forbidden, t.plus_secs(61));
        let (rows, last) = r.drain();
        assert_eq!(rows.len(), 2);
        let first = rows.iter().find(|r| r.minute == t).map(|r| r.counts);
        assert_eq!(
            first,
            Some(UsageCounts {
                allowed: 2,
                ..UsageCounts::default()
            })
        );
        assert_eq!(last, vec![(k, t.plus_secs(30))]);
        let (again, _) = r.drain();
        assert!(again.is_empty());
        assert!(r.pending(&k).is_empty());
    }

    #[test]
    fn entries_of_keys_in_use_outlive_a_flush_and_idle_ones_go() {
        let r = UsageRecorder::default();
        let (busy, idle) = (KeyId::generate(), KeyId::generate());
        let t = Timestamp::from_millis(120_000);
        r.record(&busy, Outcome::Allowed, t);
        r.record(&idle, Outcome::Allowed, t);
        assert_eq!(r.drain().0.len(), 2);
        assert_eq!(
            r.keys.len(),
            2,
            "a flush keeps the entries of keys just used"
        );
        r.record(&busy, Outcome::RateLimited, t.plus_secs(1));
        let (rows, last) = r.drain();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key_id, busy);
        assert_eq!(rows[0].counts.rate_limited, 1);
        assert!(last.is_empty(), "a refused request is no use");
        assert!(r.keys.contains_key(&busy));
        assert!(
            !r.keys.contains_key(&idle),
            "idle for a whole period: dropped"
        );
    }
}
