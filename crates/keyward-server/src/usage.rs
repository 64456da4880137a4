//! Usage counting: per key and minute, requests by outcome, plus `last_used_at`. Counted in
//! memory with atomics on the request path, written to storage in batches (every
//! `usage.flush_seconds` and once more at shutdown, after the last connection closed).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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

#[derive(Default)]
struct Counters {
    allowed: AtomicU64,
    unauthorized: AtomicU64,
    forbidden: AtomicU64,
    rate_limited: AtomicU64,
}

impl Counters {
    fn take(&self) -> UsageCounts {
        UsageCounts {
            allowed: self.allowed.swap(0, Ordering::AcqRel),
            unauthorized: self.unauthorized.swap(0, Ordering::AcqRel),
            forbidden: self.forbidden.swap(0, Ordering::AcqRel),
            rate_limited: self.rate_limited.swap(0, Ordering::AcqRel),
        }
    }

    fn peek(&self) -> UsageCounts {
        UsageCounts {
            allowed: self.allowed.load(Ordering::Acquire),
            unauthorized: self.unauthorized.load(Ordering::Acquire),
            forbidden: self.forbidden.load(Ordering::Acquire),
            rate_limited: self.rate_limited.load(Ordering::Acquire),
        }
    }
}

#[derive(Default)]
pub struct UsageRecorder {
    counts: DashMap<(KeyId, i64), Counters>,
    last_used: DashMap<KeyId, AtomicI64>,
}

impl UsageRecorder {
    pub fn record(&self, key: &KeyId, outcome: Outcome, now: Timestamp) {
        let slot = (key.clone(), now.minute_start().as_millis());
        let add = |c: &Counters| {
            let counter = match outcome {
                Outcome::Allowed => &c.allowed,
                Outcome::Unauthorized => &c.unauthorized,
                Outcome::Forbidden => &c.forbidden,
                Outcome::RateLimited => &c.rate_limited,
            };
            counter.fetch_add(1, Ordering::AcqRel);
        };
        // A shared (read) lock in the common case: the minute's counters exist already.
        match self.counts.get(&slot) {
            Some(counters) => add(&counters),
            None => add(&self.counts.entry(slot).or_default()),
        }
        if outcome == Outcome::Allowed {
            match self.last_used.get(key) {
                Some(at) => {
                    at.fetch_max(now.as_millis(), Ordering::AcqRel);
                }
                None => {
                    self.last_used
                        .entry(key.clone())
                        .or_insert_with(|| AtomicI64::new(0))
                        .fetch_max(now.as_millis(), Ordering::AcqRel);
                }
            }
        }
    }

    /// Counts not yet written, for one key (merged into usage answers).
    pub fn pending(&self, key: &KeyId) -> Vec<(Timestamp, UsageCounts)> {
        self.counts
            .iter()
            .filter(|e| &e.key().0 == key)
            .map(|e| (Timestamp::from_millis(e.key().1), e.value().peek()))
            .filter(|(_, c)| !c.is_zero())
            .collect()
    }

    /// Takes every count so far. Counters are zeroed in place, never removed while a request
    /// could still add to them; entries two minutes old are removed.
    fn drain(&self, now: Timestamp) -> (Vec<UsageRow>, Vec<(KeyId, Timestamp)>) {
        let mut rows = Vec::new();
        for entry in self.counts.iter() {
            let counts = entry.value().take();
            if !counts.is_zero() {
                rows.push(UsageRow {
                    key_id: entry.key().0.clone(),
                    minute: Timestamp::from_millis(entry.key().1),
                    counts,
                });
            }
        }
        let stale = now.minute_start().plus_secs(-120).as_millis();
        self.counts
            .retain(|(_, minute), c| *minute > stale || !c.peek().is_zero());
        let mut last_used = Vec::new();
        self.last_used.retain(|key, at| {
            let at = at.swap(0, Ordering::AcqRel);
            if at > 0 {
                last_used.push((key.clone(), Timestamp::from_millis(at)));
            }
            false
        });
        (rows, last_used)
    }

    /// Writes everything counted so far. On failure the counts are put back.
    pub async fn flush(&self, store: &dyn Store, now: Timestamp) -> StoreResult<usize> {
        let (rows, last_used) = self.drain(now);
        if rows.is_empty() && last_used.is_empty() {
            return Ok(0);
        }
        match store.record_usage(&rows, &last_used).await {
            Ok(()) => Ok(rows.len()),
            Err(e) => {
                for row in &rows {
                    let entry = self
                        .counts
                        .entry((row.key_id.clone(), row.minute.as_millis()))
                        .or_default();
                    entry
                        .allowed
                        .fetch_add(row.counts.allowed, Ordering::AcqRel);
                    entry
                        .unauthorized
                        .fetch_add(row.counts.unauthorized, Ordering::AcqRel);
                    entry
                        .forbidden
                        .fetch_add(row.counts.forbidden, Ordering::AcqRel);
                    entry
                        .rate_limited
                        .fetch_add(row.counts.rate_limited, Ordering::AcqRel);
                }
                for (key, at) in last_used {
                    self.last_used
                        .entry(key)
                        .or_insert_with(|| AtomicI64::new(0))
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
        let (rows, last) = r.drain(t.plus_secs(61));
        assert_eq!(rows.len(), 2);
        let first = rows.iter().find(|r| r.minute == t).map(|r| r.counts);
        assert_eq!(
            first,
            Some(UsageCounts {
                allowed: 2,
                ..UsageCounts::default()
            })
        );
        assert_eq!(last, vec![(k.clone(), t.plus_secs(30))]);
        let (again, _) = r.drain(t.plus_secs(61));
        assert!(again.is_empty());
        assert!(r.pending(&k).is_empty());
    }
}
