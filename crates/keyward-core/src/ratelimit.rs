//! Exact rolling-window limits: at most `limit` units in **any** span of `window` ms.
//!
//! A [`SlidingLog`] remembers when each admitted unit was spent (runs of units spent in the
//! same millisecond share one entry), so the decision is exact: nothing is admitted that
//! would put more than `limit` units into any window, and nothing is refused while the window
//! has room. A unit spent at `t` counts for every `now` with `t > now - window`, i.e. it frees
//! up exactly at `t + window`, which is what `retry_after` reports.
//!
//! That holds while a window has seen at most [`EXACT_ENTRIES`] distinct milliseconds with
//! spending. Beyond, so that a huge limit cannot make a log grow with traffic (an hour at
//! 10⁹ would keep up to 3.6 million entries), units spent within `window / EXACT_ENTRIES` of
//! the newest entry join it and count as spent at the later time: the log stays under twice
//! that many entries, still never admits more than `limit` in any window, and may refuse (or
//! report a wait) at most `window / EXACT_ENTRIES` longer than the exact rule.
//!
//! Several limits are decided together by [`decide`]: all are charged or none.

use std::collections::VecDeque;

/// Entries a log keeps exactly; see the module documentation.
pub const EXACT_ENTRIES: usize = 1024;

/// One limit: `limit` units per rolling `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub limit: u64,
    pub window_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingLog {
    /// (ms after `base`, units), oldest first. Eight bytes an entry, half of `(i64, u64)`: a
    /// busy key's window holds hundreds of entries, and a node holds one log per key in use.
    entries: VecDeque<(u32, u32)>,
    /// The time entries count from: moved up to the oldest entry when a new one would not fit.
    base: i64,
    used: u64,
}

/// The longest span a log holds exactly (~49 days; keys allow 30 at most). In a longer window,
/// units older than this count as spent this long ago: never fewer units, only later.
pub const MAX_WINDOW_MS: i64 = u32::MAX as i64;

/// What one limit says about a request of `cost` units at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u64,
    /// Units left after this request (if allowed) or now (if refused).
    pub remaining: u64,
    /// Milliseconds until more capacity frees up (0 when the window is empty).
    pub reset_ms: i64,
    /// When refused: milliseconds until a request of this cost fits.
    pub retry_after_ms: Option<i64>,
    pub window_ms: i64,
}

impl SlidingLog {
    fn time(&self, offset: u32) -> i64 {
        self.base + i64::from(offset)
    }

    fn evict(&mut self, now: i64, window_ms: i64) {
        while let Some(&(offset, units)) = self.entries.front() {
            if self.time(offset) > now - window_ms {
                break;
            }
            self.entries.pop_front();
            self.used -= u64::from(units);
        }
    }

    /// Milliseconds until at least `needed` units have left the window.
    fn time_until_freed(&self, needed: u64, now: i64, window_ms: i64) -> i64 {
        let mut freed = 0;
        for &(offset, units) in &self.entries {
            freed += u64::from(units);
            if freed >= needed {
                return (self.time(offset) + window_ms - now).max(0);
            }
        }
        0
    }

    /// `now` (never before the newest entry) as an offset from `base`, moving `base` up when
    /// `now` is too far from it: to the oldest entry (a log in constant use for weeks), and
    /// for windows longer than [`MAX_WINDOW_MS`] further, entries older than that counting
    /// as spent at the new base — later, so their units free up no sooner.
    fn offset_of(&mut self, now: i64) -> u32 {
        let Some(&(front, _)) = self.entries.front() else {
            self.base = now;
            return 0;
        };
        if let Ok(offset) = u32::try_from(now - self.base) {
            return offset;
        }
        let base = (self.base + i64::from(front)).max(now - MAX_WINDOW_MS);
        for (offset, _) in &mut self.entries {
            let time = self.base + i64::from(*offset);
            *offset = u32::try_from(time.max(base) - base).unwrap_or(u32::MAX);
        }
        self.base = base;
        u32::try_from(now - base).unwrap_or(u32::MAX)
    }

    /// Evaluates without charging.
    pub fn check(&mut self, limit: Limit, cost: u64, now: i64) -> Verdict {
        self.evict(now, limit.window_ms);
        let fits = self.used + cost <= limit.limit;
        let (remaining, retry_after_ms) = if fits {
            (limit.limit - self.used - cost, None)
        } else if cost > limit.limit {
            // Can never fit: report the full window, the honest lower bound.
            (limit.limit.saturating_sub(self.used), Some(limit.window_ms))
        } else {
            let needed = self.used + cost - limit.limit;
            (
                limit.limit.saturating_sub(self.used),
                Some(self.time_until_freed(needed, now, limit.window_ms)),
            )
        };
        let reset_ms = match self.entries.front() {
            Some(&(offset, _)) => (self.time(offset) + limit.window_ms - now).max(0),
            None if fits && cost > 0 => limit.window_ms,
            None => 0,
        };
        Verdict {
            allowed: fits,
            limit: limit.limit,
            remaining,
            reset_ms: retry_after_ms.unwrap_or(reset_ms),
            retry_after_ms,
            window_ms: limit.window_ms,
        }
    }

    /// Charges `cost` units at `now` (after a positive [`check`](Self::check)). keyward's costs
    /// and limits fit in a u32, so this is one entry; a larger cost takes one per 2³² − 1 units.
    pub fn charge(&mut self, cost: u64, now: i64, window_ms: i64) {
        if cost == 0 {
            return;
        }
        let join_within = if self.entries.len() >= EXACT_ENTRIES {
            (window_ms / EXACT_ENTRIES as i64).max(1)
        } else {
            1
        };
        self.used += cost;
        let mut cost = cost;
        // Entries never go back in time: a clock that stepped back charges at the newest one.
        let newest = self.entries.back().map(|&(offset, _)| self.time(offset));
        let at = newest.map_or(now, |newest| newest.max(now));
        let offset = self.offset_of(at);
        if let Some((last, units)) = self.entries.back_mut()
            && newest.is_some_and(|newest| now - newest < join_within)
        {
            // Joining moves the entry later, never earlier: its units free up no sooner.
            let room = u64::from(u32::MAX - *units);
            let joined = cost.min(room);
            *last = offset;
            *units += u32::try_from(joined).unwrap_or(0);
            cost -= joined;
        }
        // What does not fit in one entry's count goes into more entries of the same time.
        while cost > 0 {
            let part = cost.min(u64::from(u32::MAX));
            self.entries
                .push_back((offset, u32::try_from(part).unwrap_or(u32::MAX)));
            cost -= part;
        }
    }

    /// Entries kept (for tests and memory accounting).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    /// True when nothing is in the window any more: the state can be dropped.
    pub fn is_idle(&mut self, now: i64, window_ms: i64) -> bool {
        self.evict(now, window_ms);
        self.entries.is_empty()
    }
}

/// Decides several limits at once; charges all of them or none.
pub fn decide(logs: &mut [(&mut SlidingLog, Limit)], cost: u64, now: i64) -> (bool, Vec<Verdict>) {
    let verdicts: Vec<Verdict> = logs
        .iter_mut()
        .map(|(log, limit)| log.check(*limit, cost, now))
        .collect();
    let allowed = verdicts.iter().all(|v| v.allowed);
    if allowed {
        for (log, limit) in logs.iter_mut() {
            log.charge(cost, now, limit.window_ms);
        }
    }
    (allowed, verdicts)
}

/// Which verdict the headers report: when refused, the refusal that lasts longest (waiting
/// for it is waiting for all); when allowed, the one with the fewest units left.
pub fn binding<'a, I>(verdicts: I) -> Option<usize>
where
    I: IntoIterator<Item = &'a Verdict>,
    I::IntoIter: Clone,
{
    let verdicts = verdicts.into_iter();
    let refused = verdicts
        .clone()
        .enumerate()
        .filter(|(_, v)| !v.allowed)
        .max_by_key(|(_, v)| v.retry_after_ms.unwrap_or(0));
    if let Some((i, _)) = refused {
        return Some(i);
    }
    verdicts
        .enumerate()
        .min_by_key(|(_, v)| (v.remaining, v.limit))
        .map(|(i, _)| i)
}

/// Credits refill: which refill period `now` falls in. When it differs from the period the
/// credit state was last refilled in, the credits are reset to the refill amount.
pub fn refill_period(interval: &crate::key::RefillInterval, now_ms: i64) -> i64 {
    use crate::key::{NamedInterval, RefillInterval};
    match interval {
        RefillInterval::Named(NamedInterval::Daily) => now_ms.div_euclid(86_400_000),
        RefillInterval::Named(NamedInterval::Monthly) => {
            let nanos = i128::from(now_ms) * 1_000_000;
            match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
                Ok(t) => i64::from(t.year()) * 12 + i64::from(u8::from(t.month())) - 1,
                Err(_) => 0,
            }
        }
        RefillInterval::Seconds(secs) => now_ms.div_euclid(i64::from((*secs).max(1)) * 1000),
    }
}

/// Whole seconds for headers: never less than the exact wait.
pub fn ceil_secs(ms: i64) -> u64 {
    u64::try_from(ms.max(0)).unwrap_or(0).div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    const L: Limit = Limit {
        limit: 3,
        window_ms: 1_000,
    };

    #[test]
    fn exact_at_the_edges() {
        let mut log = SlidingLog::default();
        for t in [0, 10, 20] {
            assert!(log.check(L, 1, t).allowed);
            log.charge(1, t, L.window_ms);
        }
        let refused = log.check(L, 1, 999);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, Some(1));
        assert_eq!(refused.remaining, 0);
        // The unit spent at 0 frees up at exactly 1000.
        assert!(log.check(L, 1, 1_000).allowed);
        // A cost of 2 must wait for two units.
        let two = log.check(L, 2, 1_000);
        assert_eq!(two.retry_after_ms, Some(10));
        // More than the limit never fits.
        assert!(!log.check(L, 4, 5_000).allowed);
    }

    #[test]
    fn combined_limits_charge_all_or_none() {
        let mut key = SlidingLog::default();
        let mut org = SlidingLog::default();
        let key_limit = Limit {
            limit: 5,
            window_ms: 1_000,
        };
        let org_limit = Limit {
            limit: 2,
            window_ms: 10_000,
        };
        for t in 0..2 {
            let (ok, _) = decide(&mut [(&mut key, key_limit), (&mut org, org_limit)], 1, t);
            assert!(ok);
        }
        let (ok, verdicts) = decide(&mut [(&mut key, key_limit), (&mut org, org_limit)], 1, 2);
        assert!(!ok);
        assert_eq!(
            key.used(),
            2,
            "the key limit was not charged for a refused request"
        );
        assert_eq!(binding(&verdicts), Some(1));
        assert_eq!(verdicts[1].retry_after_ms, Some(9_998));
    }

    #[test]
    fn refill_periods() {
        use crate::key::{NamedInterval, RefillInterval};
        let day = RefillInterval::Named(NamedInterval::Daily);
        assert_eq!(refill_period(&day, 86_399_999), 0);
        assert_eq!(refill_period(&day, 86_400_000), 1);
        let month = RefillInterval::Named(NamedInterval::Monthly);
        // 2026-01-31T23:59:59.999Z and 2026-02-01T00:00:00Z
        assert_eq!(
            refill_period(&month, 1_769_903_999_999) + 1,
            refill_period(&month, 1_769_904_000_000)
        );
        assert_eq!(refill_period(&RefillInterval::Seconds(10), 19_999), 1);
    }

    /// The reference: count every admitted unit in (now - window, now] by brute force.
    fn units_in_window(admitted: &[(i64, u64)], now: i64, window: i64) -> u64 {
        admitted
            .iter()
            .filter(|(t, _)| *t > now - window && *t <= now)
            .map(|(_, c)| c)
            .sum()
    }

    /// One request of a simulated run, for the property tests to judge.
    struct Step<'a> {
        verdict: Verdict,
        cost: u64,
        now: i64,
        /// The brute-force count just before this request.
        before: u64,
        /// Every admitted request so far, this one included if it was.
        admitted: &'a [(i64, u64)],
        log: &'a SlidingLog,
    }

    /// Sends `gaps` (ms since the previous request, cost) through one log; checks after every
    /// request that no window holds more than the limit, and lets `judge` check the rest.
    fn simulate(
        lim: Limit,
        gaps: Vec<(i64, u64)>,
        mut judge: impl FnMut(Step<'_>) -> Result<(), TestCaseError>,
    ) -> Result<(), TestCaseError> {
        let mut log = SlidingLog::default();
        let mut admitted: Vec<(i64, u64)> = vec![];
        let mut now = 0;
        for (gap, cost) in gaps {
            now += gap;
            let before = units_in_window(&admitted, now, lim.window_ms);
            let verdict = log.check(lim, cost, now);
            if verdict.allowed {
                log.charge(cost, now, lim.window_ms);
                admitted.push((now, cost));
            }
            // The fullest windows end at an admission; each is checked when it happens.
            prop_assert!(units_in_window(&admitted, now, lim.window_ms) <= lim.limit);
            judge(Step {
                verdict,
                cost,
                now,
                before,
                admitted: &admitted,
                log: &log,
            })?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn never_over_the_limit_and_never_refused_with_room(
            limit in 1u64..20,
            window in 1i64..5_000,
            gaps in prop::collection::vec((0i64..700, 1u64..4), 1..300),
        ) {
            simulate(Limit { limit, window_ms: window }, gaps, |s| {
                // Allowed exactly when the brute-force count has room.
                prop_assert_eq!(s.verdict.allowed, s.before + s.cost <= limit);
                if s.verdict.allowed {
                    prop_assert_eq!(s.verdict.remaining, limit - s.before - s.cost);
                } else if s.cost <= limit {
                    // Waiting exactly retry_after is enough, and a millisecond less is not.
                    let wait = s.verdict.retry_after_ms.unwrap_or(0);
                    let after = |t| units_in_window(s.admitted, t, window) + s.cost;
                    prop_assert!(after(s.now + wait) <= limit);
                    if wait > 0 {
                        prop_assert!(after(s.now + wait - 1) > limit);
                    }
                }
                Ok(())
            })?;
        }
    }

    proptest! {
        // Each case runs thousands of steps against the brute-force count.
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// With limits too large to ever fill, a log still stays bounded, never admits more
        /// than the limit, counts at least what the exact rule counts, and its waits are enough.
        #[test]
        fn large_limits_keep_the_log_bounded_and_never_over_admit(
            limit in 500u64..4_000,
            window in 1_000i64..30_000,
            gaps in prop::collection::vec((0i64..12, 1u64..3), 1_500..4_000),
        ) {
            simulate(Limit { limit, window_ms: window }, gaps, |s| {
                if !s.verdict.allowed {
                    let wait = s.verdict.retry_after_ms.unwrap_or(0);
                    prop_assert!(units_in_window(s.admitted, s.now + wait, window) + s.cost <= limit);
                }
                prop_assert!(s.log.used() >= units_in_window(s.admitted, s.now, window));
                prop_assert!(s.log.len() <= 2 * EXACT_ENTRIES + 1, "{} entries", s.log.len());
                Ok(())
            })?;
        }
    }

    #[test]
    fn a_log_in_use_for_months_keeps_exact_times() {
        // Entries count from a base that must move: 100 days exceed a u32 of milliseconds.
        let day = 86_400_000;
        let month = Limit {
            limit: 1_000,
            window_ms: 30 * day,
        };
        let mut log = SlidingLog::default();
        for n in 0..100 {
            let now = n * day + 7;
            let verdict = log.check(month, 1, now);
            assert!(verdict.allowed);
            log.charge(1, now, month.window_ms);
            assert_eq!(log.used(), (n + 1).min(30) as u64, "day {n}");
            // The oldest unit in the window frees up exactly a window after it was spent.
            let oldest = (n - 29).max(0) * day + 7;
            assert_eq!(
                log.check(month, 0, now).reset_ms,
                oldest + month.window_ms - now
            );
        }
        let full = Limit { limit: 30, ..month };
        let refused = log.check(full, 1, 99 * day + 8);
        assert_eq!(refused.retry_after_ms, Some(30 * day - 1 - day * 29));
    }

    #[test]
    fn a_window_longer_than_a_log_spans_frees_nothing_early() {
        let day = 86_400_000;
        // 60 days: more than a u32 of milliseconds between the two units.
        let long = Limit {
            limit: 2,
            window_ms: 60 * day,
        };
        let mut log = SlidingLog::default();
        log.charge(1, 0, long.window_ms);
        log.charge(1, 50 * day, long.window_ms);
        assert_eq!(log.used(), 2);
        // Both units are still in the window 58 days on: nothing more fits.
        assert!(!log.check(long, 1, 58 * day).allowed);
        // The first unit counts as spent at most MAX_WINDOW_MS before the second: it frees
        // up no sooner than 60 days after it was spent, and no later than that bound.
        assert!(!log.check(long, 1, 60 * day).allowed);
        let freed_at = 50 * day - MAX_WINDOW_MS + long.window_ms;
        assert!(!log.check(long, 1, freed_at - 1).allowed);
        assert!(log.check(long, 1, freed_at).allowed);
    }

    #[test]
    fn costs_beyond_an_entry_are_counted_whole() {
        let big = Limit {
            limit: 20_000_000_000,
            window_ms: 1_000,
        };
        let mut log = SlidingLog::default();
        log.charge(9_000_000_000, 0, big.window_ms);
        log.charge(9_000_000_000, 0, big.window_ms);
        assert_eq!(log.used(), 18_000_000_000);
        let refused = log.check(big, 2_000_000_001, 10);
        assert_eq!(refused.retry_after_ms, Some(990));
        // Every part leaves the window together.
        assert!(log.check(big, 20_000_000_000, 1_000).allowed);
        assert_eq!(log.used(), 0);
    }

    #[test]
    fn a_huge_limit_does_not_grow_the_log_with_traffic() {
        let hour = Limit {
            limit: 1_000_000_000,
            window_ms: 3_600_000,
        };
        let mut log = SlidingLog::default();
        // A unit every millisecond for ten minutes.
        for now in 0..600_000 {
            assert!(log.check(hour, 1, now).allowed);
            log.charge(1, now, hour.window_ms);
        }
        assert_eq!(log.used(), 600_000);
        // 1,024 exact entries, then one per 3.5 s (window / 1,024).
        assert!(
            log.len() <= EXACT_ENTRIES + 600_000 / 3_515 + 1,
            "{}",
            log.len()
        );
    }
}
