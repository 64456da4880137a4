//! A node-wide bound on forged access tokens.
//!
//! Each forged signature costs a whole signature check, dearer than a proxied request, and the
//! per-client bound does not hold against a flood from many addresses. No cheap check tells a
//! forged signature from a new valid one, but a forger must name a key: copying a real token's
//! claims names that token's key, and a made-up key id names no key this node knows. So past
//! `cache.forged_tokens_per_node` failed checks in a minute, a token not checked before is
//! checked only if the key it names is cached here and has failed fewer than
//! [`FORGED_PER_KEY`] checks this minute; any other is answered 429 unchecked. Tokens checked
//! before, and API keys, are answered as before.

use std::sync::{Mutex, PoisonError};

use dashmap::DashMap;
use keyward_core::ids::KeyId;
use keyward_core::{ErrorCode, Timestamp};

use crate::error::{ApiError, ApiResult};

/// Failed checks of tokens naming one key, per minute, past the node's bound.
pub const FORGED_PER_KEY: u32 = 10;

/// Keys with failed checks remembered at most; past it the counts start over.
const KEYS_CAPACITY: usize = 100_000;

pub struct ForgeryGuard {
    per_node: u32,
    /// Failed signature checks on this node: `(minute, count)`.
    on_node: Mutex<(i64, u32)>,
    /// Failed signature checks by the key the token named: `(minute, count)`. Client-chosen
    /// ids, hence the seeded hasher.
    by_key: DashMap<KeyId, (i64, u32), foldhash::fast::RandomState>,
}

impl ForgeryGuard {
    /// `per_node` failed checks a minute before the bound applies; 0: no bound.
    pub fn new(per_node: u32) -> Self {
        Self {
            per_node,
            on_node: Mutex::new((0, 0)),
            by_key: DashMap::default(),
        }
    }

    /// Refuses (429) to check a token naming `claimed` once this minute's failed checks have
    /// passed the bound, unless the key is one `is_cached` knows and has failed few checks.
    pub fn may_check(
        &self,
        claimed: Option<&KeyId>,
        is_cached: impl FnOnce(&KeyId) -> bool,
        now: Timestamp,
    ) -> ApiResult<()> {
        let minute = minute_of(now);
        if self.per_node == 0 || !self.past_bound(minute) {
            return Ok(());
        }
        let worth_a_check = claimed.is_some_and(|key| {
            is_cached(key)
                && self
                    .by_key
                    .get(key)
                    .is_none_or(|entry| entry.0 != minute || entry.1 < FORGED_PER_KEY)
        });
        if worth_a_check {
            return Ok(());
        }
        let secs = u64::try_from((minute + 1) * 60_000 - now.as_millis())
            .map_or(60, |ms| ms.div_ceil(1000));
        let mut refused = ApiError::new(ErrorCode::RateLimitExceeded).with_message(format!(
            "Too many forged tokens on this node; new tokens for this key are checked again \
             in {secs} seconds. Tokens already in use and API keys are not affected."
        ));
        refused.retry_after = Some(secs);
        Err(refused)
    }

    /// Counts a signature that did not check out, against the node and the key it named.
    pub fn charge(&self, claimed: Option<&KeyId>, now: Timestamp) {
        if self.per_node == 0 {
            return;
        }
        let minute = minute_of(now);
        {
            let mut node = self.on_node.lock().unwrap_or_else(PoisonError::into_inner);
            *node = match *node {
                (m, count) if m == minute => (m, count.saturating_add(1)),
                _ => (minute, 1),
            };
        }
        let Some(key) = claimed else {
            return;
        };
        if self.by_key.len() >= KEYS_CAPACITY {
            self.by_key.clear();
        }
        let mut entry = self.by_key.entry(*key).or_insert((minute, 0));
        *entry = match *entry {
            (m, count) if m == minute => (m, count.saturating_add(1)),
            _ => (minute, 1),
        };
    }

    fn past_bound(&self, minute: i64) -> bool {
        let (m, count) = *self.on_node.lock().unwrap_or_else(PoisonError::into_inner);
        m == minute && count >= self.per_node
    }
}

fn minute_of(now: Timestamp) -> i64 {
    now.as_millis().div_euclid(60_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(10_000);

    #[test]
    fn past_the_node_bound_only_cached_keys_with_few_failures_are_checked() {
        let guard = ForgeryGuard::new(2);
        let [copied, other, made_up] = [(); 3].map(|()| KeyId::generate());
        let cached = |key: &KeyId| *key != made_up;
        for _ in 0..2 {
            assert!(guard.may_check(Some(&made_up), cached, NOW).is_ok());
            guard.charge(Some(&copied), NOW);
        }
        // Past the bound: a made-up key or none at all is not worth a check.
        let refused = guard.may_check(Some(&made_up), cached, NOW).unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimitExceeded);
        assert_eq!(refused.retry_after, Some(50));
        assert!(guard.may_check(None, cached, NOW).is_err());
        // A cached key is checked until its own failures reach the bound per key.
        assert!(guard.may_check(Some(&copied), cached, NOW).is_ok());
        for _ in 2..FORGED_PER_KEY {
            guard.charge(Some(&copied), NOW);
        }
        assert!(guard.may_check(Some(&copied), cached, NOW).is_err());
        assert!(guard.may_check(Some(&other), cached, NOW).is_ok());
        // The next minute starts over.
        let next = Timestamp::from_millis(60_000);
        assert!(guard.may_check(Some(&made_up), cached, next).is_ok());
    }

    #[test]
    fn no_bound_when_off() {
        let guard = ForgeryGuard::new(0);
        let key = KeyId::generate();
        for _ in 0..100 {
            guard.charge(Some(&key), NOW);
        }
        assert!(guard.may_check(None, |_| false, NOW).is_ok());
    }
}
