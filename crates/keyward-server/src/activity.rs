//! What this node keeps of each key in use between its requests: the key's rate-limit log (the
//! memory backend's) and its usage counts not yet written. One map entry under one lock holds
//! both, so a request reaches them with one probe: as two maps, each probe took its shard's
//! lock with a locked instruction, and the two ran one after the other (docs/profiling.md,
//! twelfth and fifteenth sessions).

use dashmap::DashMap;
use keyward_core::Timestamp;
use keyward_core::ids::KeyId;
use keyward_core::ratelimit::SlidingLog;
use parking_lot::Mutex;

use crate::usage::KeyUsage;

/// One key's state on this node.
#[derive(Default)]
pub struct Activity {
    /// The key's quota log, used by the memory backend (and the local fallback of a shared
    /// one).
    pub log: SlidingLog,
    /// The key's window when the log was last charged: how long its entries count.
    pub window_ms: i64,
    pub usage: KeyUsage,
}

impl Activity {
    /// True when the log holds nothing any more.
    pub fn log_is_idle(&mut self, now: Timestamp) -> bool {
        let window = self.window_ms;
        self.log.is_idle(now.as_millis(), window)
    }
}

/// Key ids are keyward's own, not chosen by clients: a fast hasher is safe here.
#[derive(Default)]
pub struct ActivityMap {
    keys: DashMap<KeyId, Mutex<Activity>, foldhash::fast::RandomState>,
}

impl ActivityMap {
    /// Runs `f` on the key's state, made on first use: one probe and a shared lock on the map
    /// when it exists (the common case), the entry API only to create it.
    pub fn with<R>(&self, key: &KeyId, f: impl FnOnce(&mut Activity) -> R) -> R {
        if let Some(entry) = self.keys.get(key) {
            return f(&mut entry.lock());
        }
        let entry = self.keys.entry(*key).or_default();
        f(&mut entry.lock())
    }

    /// Runs `f` on the key's state if there is any.
    pub fn peek<R>(&self, key: &KeyId, f: impl FnOnce(&mut Activity) -> R) -> Option<R> {
        self.keys.get(key).map(|entry| f(&mut entry.lock()))
    }

    /// Keeps the keys for which `keep` says so.
    pub fn retain(&self, mut keep: impl FnMut(&KeyId, &mut Activity) -> bool) {
        self.keys
            .retain(|key, activity| keep(key, activity.get_mut()));
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, key: &KeyId) -> bool {
        self.keys.contains_key(key)
    }
}
