//! A node-wide bound on forged access tokens.
//!
//! Each forged signature costs a whole signature check, dearer than a proxied request, and the
//! per-client bound does not hold against a flood from many addresses. No cheap check tells a
//! forged signature from a new valid one, but a forger must name a key: copying a real token's
//! claims names that token's key, and a made-up key id names no key this node knows. So past
//! `cache.forged_tokens_per_node` failed checks in a minute, a token not checked before is
//! checked only if the key it names is cached here and has failed fewer than
//! [`FORGED_PER_KEY`] checks this minute, and past twice the bound none is; any other is
//! answered 429 unchecked. Tokens checked before, and API keys, are answered as before.

use std::sync::{Mutex, PoisonError};

use dashmap::DashMap;
use keyward_core::ids::KeyId;
use keyward_core::{ErrorCode, Timestamp};

use crate::error::{ApiError, ApiResult};
use crate::tokens::claimed_key_id;

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

    /// Refuses (429) to check `token` once this minute's failed checks have passed the bound,
    /// unless the key it names is one `is_cached` knows and has failed few checks; past
    /// twice the bound, no token is checked until the next minute. The token is read only
    /// past the bound.
    pub fn may_check(
        &self,
        token: &str,
        is_cached: impl Fn(&KeyId) -> bool,
        now: Timestamp,
    ) -> ApiResult<()> {
        if self.per_node == 0 {
            return Ok(());
        }
        let minute = minute_of(now);
        let failed = self.failed_on_node(minute);
        if failed < self.per_node {
            return Ok(());
        }
        let worth_a_check = failed < self.per_node.saturating_mul(2)
            && claimed_key_id(token).is_some_and(|key| {
                is_cached(&key)
                    && self
                        .by_key
                        .get(&key)
                        .is_none_or(|entry| entry.0 != minute || entry.1 < FORGED_PER_KEY)
            });
        if worth_a_check {
            return Ok(());
        }
        let secs = u64::try_from((minute + 1) * 60_000 - now.as_millis())
            .map_or(60, |ms| ms.div_ceil(1000));
        let mut refused = ApiError::new(ErrorCode::RateLimitExceeded).with_message(format!(
            "Too many forged tokens on this node: new tokens are checked again in {secs} \
             seconds. Tokens already in use and API keys are not affected."
        ));
        refused.retry_after = Some(secs);
        Err(refused)
    }

    /// Counts a whole signature check spent on a token that did not verify, against the node
    /// and, if `is_cached` knows it, the key the token names.
    pub fn charge(&self, token: &str, is_cached: impl Fn(&KeyId) -> bool, now: Timestamp) {
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
        // Made-up ids are never checked past the bound: there is nothing to count for them.
        let Some(key) = claimed_key_id(token).filter(|key| is_cached(key)) else {
            return;
        };
        if self.by_key.len() >= KEYS_CAPACITY {
            self.by_key.retain(|_, entry| entry.0 == minute);
            if self.by_key.len() >= KEYS_CAPACITY {
                self.by_key.clear();
            }
        }
        let mut entry = self.by_key.entry(key).or_insert((minute, 0));
        *entry = match *entry {
            (m, count) if m == minute => (m, count.saturating_add(1)),
            _ => (minute, 1),
        };
    }

    fn failed_on_node(&self, minute: i64) -> u32 {
        let (m, count) = *self.on_node.lock().unwrap_or_else(PoisonError::into_inner);
        if m == minute { count } else { 0 }
    }
}

fn minute_of(now: Timestamp) -> i64 {
    now.as_millis().div_euclid(60_000)
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(10_000);

    /// A token naming `key`, its signature not worth the name.
    fn naming(key: &KeyId) -> String {
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"key_id":"{key}"}}"#));
        format!("eyJhbGciOiJIUzI1NiJ9.{claims}.c2ln")
    }

    #[test]
    fn past_the_node_bound_only_cached_keys_with_few_failures_are_checked() {
        let guard = ForgeryGuard::new(6);
        let [copied, other, made_up] = [(); 3].map(|()| KeyId::generate());
        let cached = |key: &KeyId| *key != made_up;
        for _ in 0..6 {
            assert!(guard.may_check(&naming(&made_up), cached, NOW).is_ok());
            guard.charge(&naming(&copied), cached, NOW);
        }
        // Past the bound: a made-up key or none at all is not worth a check.
        let refused = guard.may_check(&naming(&made_up), cached, NOW).unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimitExceeded);
        assert_eq!(refused.retry_after, Some(50));
        assert!(guard.may_check("eyJ.e30.x", cached, NOW).is_err());
        // A cached key is checked until its own failures reach the bound per key.
        assert!(guard.may_check(&naming(&copied), cached, NOW).is_ok());
        for _ in 6..FORGED_PER_KEY {
            guard.charge(&naming(&copied), cached, NOW);
        }
        assert!(guard.may_check(&naming(&copied), cached, NOW).is_err());
        assert!(guard.may_check(&naming(&other), cached, NOW).is_ok());
        // Made-up keys are counted on the node only.
        guard.charge(&naming(&made_up), cached, NOW);
        assert!(!guard.by_key.contains_key(&made_up));
        // The next minute starts over.
        let next = Timestamp::from_millis(60_000);
        assert!(guard.may_check(&naming(&made_up), cached, next).is_ok());
    }

    #[test]
    fn past_twice_the_node_bound_nothing_is_checked() {
        let guard = ForgeryGuard::new(2);
        let keys = [(); 4].map(|()| KeyId::generate());
        for key in &keys {
            guard.charge(&naming(key), |_| true, NOW);
        }
        let fresh = KeyId::generate();
        assert!(guard.may_check(&naming(&fresh), |_| true, NOW).is_err());
    }

    #[test]
    fn no_bound_when_off() {
        let guard = ForgeryGuard::new(0);
        let key = KeyId::generate();
        for _ in 0..100 {
            guard.charge(&naming(&key), |_| true, NOW);
        }
        assert!(guard.may_check("eyJ.e30.x", |_| false, NOW).is_ok());
    }
}
