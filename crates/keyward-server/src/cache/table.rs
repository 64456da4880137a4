//! Cached secrets by hash, in shards of hashbrown tables so that two workers rarely wait on
//! one lock. Unlike a `DashMap`, an entry can also be found from the first 8 bytes of its
//! hash alone: that is all the cache's reverse index keeps (16 bytes per secret, where a key
//! id string and a `Vec` of hashes took ~160 per key).

use std::sync::{Arc, PoisonError, RwLock};

use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use keyward_core::ids::KeyId;
use keyward_core::key::CompactKey;
use keyward_core::key_format::KeyHash;

/// The first 8 bytes of a hash, used as the tables' hash as is: the hashes of positive
/// entries are SHA-256 digests of CSPRNG secrets, uniform already (and not client-chosen).
pub fn prefix(hash: &KeyHash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Padded to a cache line of its own: every lookup writes its shard's lock word, and two
/// workers reading neighbouring shards would otherwise bounce one line between cores.
type Shard = CachePadded<RwLock<HashTable<(KeyHash, Arc<CompactKey>)>>>;

pub struct SecretTable {
    shards: Box<[Shard]>,
}

impl SecretTable {
    pub fn new() -> Self {
        let shards = std::thread::available_parallelism()
            .map_or(4, |n| n.get() * 4)
            .next_power_of_two();
        Self {
            shards: (0..shards)
                .map(|_| CachePadded::new(RwLock::new(HashTable::new())))
                .collect(),
        }
    }

    fn shard(&self, prefix: u64) -> &Shard {
        // Bits the tables do not use themselves (they take the low bits and the top seven).
        &self.shards[(prefix >> 40) as usize & (self.shards.len() - 1)]
    }

    pub fn get(&self, hash: &KeyHash) -> Option<Arc<CompactKey>> {
        let p = prefix(hash);
        let shard = self.shard(p).read().unwrap_or_else(PoisonError::into_inner);
        shard
            .find(p, |(h, _)| h == hash)
            .map(|(_, key)| key.clone())
    }

    pub fn insert(&self, hash: KeyHash, key: Arc<CompactKey>) {
        let p = prefix(&hash);
        let mut shard = self
            .shard(p)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match shard.entry(p, |(h, _)| *h == hash, |(h, _)| prefix(h)) {
            Entry::Occupied(mut slot) => slot.get_mut().1 = key,
            Entry::Vacant(slot) => {
                slot.insert((hash, key));
            }
        }
    }

    /// Removes the secrets of `key_id` whose hash starts with `prefix`. Returns whether
    /// a secret of another key with that prefix remains (two keys sharing 64 bits of hash).
    pub fn remove_secrets_of(&self, prefix_of_hash: u64, key_id: &KeyId) -> bool {
        let p = prefix_of_hash;
        let mut shard = self
            .shard(p)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        while let Ok(found) = shard.find_entry(p, |(h, key)| prefix(h) == p && key.id == *key_id) {
            found.remove();
        }
        shard.find(p, |(h, _)| prefix(h) == p).is_some()
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}
