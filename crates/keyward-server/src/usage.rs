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
    minutes: Mutex<Minutes>,
}

/// Counts by minute start. The newest minute is held inline, so a request adds to it in the
/// map's own entry (no second cache line, no allocation after each flush); older minutes,
/// there only when a flush comes late or a clock steps back, go to a list.
#[derive(Default)]
struct Minutes {
    newest: Option<(i64, UsageCounts)>,
    older: Vec<(i64, UsageCounts)>,
}

impl Minutes {
    fn add(&mut self, minute: i64, counts: &UsageCounts) {
        match &mut self.newest {
            Some((m, existing)) if *m == minute => existing.add(counts),
            Some((m, _)) if *m > minute => {
                match self.older.iter_mut().find(|(m, _)| *m == minute) {
                    Some((_, existing)) => existing.add(counts),
                    None => self.older.push((minute, *counts)),
                }
            }
            newest => {
                if let Some(previous) = newest.replace((minute, *counts)) {
                    self.older.push(previous);
                }
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(i64, UsageCounts)> {
        self.older.iter().chain(&self.newest)
    }

    fn take(&mut self) -> impl Iterator<Item = (i64, UsageCounts)> + use<> {
        std::mem::take(&mut self.older)
            .into_iter()
            .chain(self.newest.take())
    }
}

impl KeyUsage {
    fn add(&self, minute: i64, counts: &UsageCounts) {
        self.minutes.lock().add(minute, counts);
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
            let mut idle = true;
            for (minute, counts) in usage.minutes.lock().take() {
                idle = false;
                if !counts.is_zero() {
                    rows.push(UsageRow {
                        key_id: *key,
                        minute: Timestamp::from_millis(minute),
                        counts,
                    });
                }
            }
            let at = usage.last_used.swap(0, Ordering::AcqRel);
            if at > 0 {
                last_used.push((*key, Timestamp::from_millis(at)));
            }
            !(idle && at == 0)
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
    fn minutes_out_of_order_are_each_counted() {
        let r = UsageRecorder::default();
        let k = KeyId::generate();
        let minute = |n: i64| Timestamp::from_millis(n * 60_000);
        // A late flush (three minutes held), then a clock that stepped back a minute.
        for (n, outcome) in [
            (1, Outcome::Allowed),
            (2, Outcome::Allowed),
            (3, Outcome::Forbidden),
            (2, Outcome::RateLimited),
            (3, Outcome::Forbidden),
            (1, Outcome::Allowed),
        ] {
            r.record(&k, outcome, minute(n));
        }
        let mut pending = r.pending(&k);
        pending.sort_by_key(|(m, _)| *m);
        let (rows, _) = r.drain();
        assert_eq!(rows.len(), 3);
        let counts = |n: i64| {
            rows.iter()
                .find(|r| r.minute == minute(n))
                .map(|r| r.counts)
        };
        let expect = |allowed, forbidden, rate_limited| {
            Some(UsageCounts {
                allowed,
                forbidden,
                rate_limited,
                ..UsageCounts::default()
            })
        };
        assert_eq!(counts(1), expect(2, 0, 0));
        assert_eq!(counts(2), expect(1, 0, 1));
        assert_eq!(counts(3), expect(0, 2, 0));
        let pending_counts: Vec<_> = pending.iter().map(|(m, c)| (*m, Some(*c))).collect();
        assert_eq!(
            pending_counts,
            vec![
                (minute(1), counts(1)),
                (minute(2), counts(2)),
                (minute(3), counts(3))
            ]
        );
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
