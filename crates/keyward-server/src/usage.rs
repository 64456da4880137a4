//! Usage counting: per key and minute, requests by outcome, plus `last_used_at`. Counted in
//! memory on the request path, in the key's [`Activity`] entry (with its rate-limit log),
//! written to storage in batches (every `usage.flush_seconds` and once more at shutdown, after
//! the last connection closed).

use std::sync::Arc;

use keyward_core::ids::KeyId;
use keyward_core::{ErrorCode, Timestamp};
use keyward_store::{Store, StoreResult, UsageCounts, UsageRow};

use crate::activity::{Activity, ActivityMap};

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
pub struct KeyUsage {
    minutes: Minutes,
    /// The latest allowed request (ms), 0 when none since the last flush.
    last_used: i64,
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
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.minutes.newest.is_none() && self.minutes.older.is_empty() && self.last_used == 0
    }

    /// Counts one request.
    pub fn count(&mut self, outcome: Outcome, now: Timestamp) {
        self.minutes
            .add(now.minute_start().as_millis(), &one(outcome));
        if outcome == Outcome::Allowed {
            self.last_used = self.last_used.max(now.as_millis());
        }
    }
}

/// Counts in the keys' activity entries, which the memory limiter shares: where it decided, it
/// counted the outcome in the same probe.
#[derive(Default)]
pub struct UsageRecorder {
    activity: Arc<ActivityMap>,
    /// Held for writing while a flush has taken counts the store does not hold yet, for
    /// reading while a usage answer reads the store and adds the counts not written.
    flushing: tokio::sync::RwLock<()>,
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
    /// The map the memory limiter must share.
    pub fn activity(&self) -> &Arc<ActivityMap> {
        &self.activity
    }

    pub fn record(&self, key: &KeyId, outcome: Outcome, now: Timestamp) {
        self.activity
            .with(key, |activity| activity.usage.count(outcome, now));
    }

    /// Counts not yet written, for one key (merged into usage answers).
    pub fn pending(&self, key: &KeyId) -> Vec<(Timestamp, UsageCounts)> {
        self.activity
            .peek(key, |activity| {
                activity
                    .usage
                    .minutes
                    .iter()
                    .filter(|(_, c)| !c.is_zero())
                    .map(|(m, c)| (Timestamp::from_millis(*m), *c))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Takes every count so far (what a flush writes; public for the benchmarks). A key keeps
    /// its entry while it is in use (re-creating it after every flush would copy its id and
    /// take a shard's write lock per busy key), and while its rate-limit log holds anything;
    /// one with neither is dropped.
    pub fn drain(&self, now: Timestamp) -> (Vec<UsageRow>, Vec<(KeyId, Timestamp)>) {
        let mut rows = Vec::new();
        let mut last_used = Vec::new();
        self.activity.retain(|key, activity| {
            let usage = &mut activity.usage;
            let mut idle = true;
            for (minute, counts) in usage.minutes.take() {
                idle = false;
                if !counts.is_zero() {
                    rows.push(UsageRow {
                        key_id: *key,
                        minute: Timestamp::from_millis(minute),
                        counts,
                    });
                }
            }
            let at = std::mem::take(&mut usage.last_used);
            if at > 0 {
                last_used.push((*key, Timestamp::from_millis(at)));
            }
            !(idle && at == 0 && activity.log_is_idle(now))
        });
        (rows, last_used)
    }

    /// What the store holds (read by `stored`) and the counts of `key` not written yet. A
    /// flush in progress is waited for: its counts are in neither place until it is done.
    pub async fn with_pending<T>(
        &self,
        key: &KeyId,
        stored: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<(T, Vec<(Timestamp, UsageCounts)>)> {
        let _no_flush = self.flushing.read().await;
        let stored = stored.await?;
        Ok((stored, self.pending(key)))
    }

    /// Writes everything counted so far. On failure the counts are put back.
    pub async fn flush(&self, store: &dyn Store, now: Timestamp) -> StoreResult<usize> {
        let _flushing = self.flushing.write().await;
        let (rows, last_used) = self.drain(now);
        if rows.is_empty() && last_used.is_empty() {
            return Ok(0);
        }
        match store.record_usage(&rows, &last_used).await {
            Ok(()) => Ok(rows.len()),
            Err(e) => {
                for row in &rows {
                    self.activity.with(&row.key_id, |activity: &mut Activity| {
                        activity
                            .usage
                            .minutes
                            .add(row.minute.as_millis(), &row.counts);
                    });
                }
                for (key, at) in last_used {
                    self.activity.with(&key, |activity| {
                        let usage = &mut activity.usage;
                        usage.last_used = usage.last_used.max(at.as_millis());
                    });
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush that has taken the counts and not yet written them holds them in neither
    /// place: a usage answer in between must wait, not come out low.
    #[tokio::test]
    async fn a_usage_read_waits_for_a_flush_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/keyward.db", dir.path().display());
        let store = keyward_store::SqliteStore::open(&url).await.unwrap();
        store.migrate().await.unwrap();
        let config = crate::config::from_toml_str("").unwrap();
        let state = crate::state::AppState::new(
            config,
            Arc::new(store),
            Arc::new(keyward_core::SystemClock),
        );
        let (key, _) = crate::bootstrap::ensure_bootstrapped(&state)
            .await
            .unwrap()
            .unwrap();
        let (usage, now) = (&state.usage, state.clock.now());
        for _ in 0..3 {
            usage.record(&key.id, Outcome::Allowed, now);
        }
        let (from, to) = (now.minute_start(), now.plus_secs(60));
        let flushing = usage.flushing.write().await;
        let (rows, last_used) = usage.drain(now);
        let mut reading = std::pin::pin!(
            usage.with_pending(&key.id, state.store.usage(&key.org_id, &key.id, from, to))
        );
        let early = tokio::time::timeout(std::time::Duration::from_millis(100), &mut reading).await;
        assert!(early.is_err(), "the read waited for the flush");
        state.store.record_usage(&rows, &last_used).await.unwrap();
        drop(flushing);
        let (stored, pending) = reading.await.unwrap();
        let allowed: u64 = stored.iter().map(|row| row.counts.allowed).sum::<u64>()
            + pending
                .iter()
                .map(|(_, counts)| counts.allowed)
                .sum::<u64>();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn counts_by_minute_and_outcome() {
        let r = UsageRecorder::default();
        let k = KeyId::generate();
        let t = Timestamp::from_millis(120_000);
        r.record(&k, Outcome::Allowed, t);
        r.record(&k, Outcome::Allowed, t.plus_secs(30));
        r.record(&k, Outcome::Forbidden, t.plus_secs(61));
        let (rows, last) = r.drain(t);
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
        let (again, _) = r.drain(t);
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
        let (rows, _) = r.drain(minute(4));
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
        assert_eq!(r.drain(t).0.len(), 2);
        assert_eq!(
            r.activity.len(),
            2,
            "a flush keeps the entries of keys just used"
        );
        r.record(&busy, Outcome::RateLimited, t.plus_secs(1));
        let (rows, last) = r.drain(t);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key_id, busy);
        assert_eq!(rows[0].counts.rate_limited, 1);
        assert!(last.is_empty(), "a refused request is no use");
        assert!(r.activity.contains(&busy));
        assert!(
            !r.activity.contains(&idle),
            "idle for a whole period: dropped"
        );
    }
}
