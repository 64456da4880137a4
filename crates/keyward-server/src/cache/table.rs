//! Cached secrets by hash, in shards so that two workers rarely wait on one lock. Unlike a
//! `DashMap`, an entry can also be found from the first 8 bytes of its hash alone: that is
//! all the cache's reverse index keeps (16 bytes per secret, where a key id string and a
//! `Vec` of hashes took ~160 per key).
//!
//! Each shard is an open-addressing table with linear probing whose slot is found from the
//! hash directly. A swiss table (hashbrown) reads a group of control bytes first and only
//! then the slot: at a million cached keys those are two dependent cache misses where this
//! table has one (the `perf annotate` of the 1M-key verification benchmark put the control
//! bytes at a quarter of the lookup's time). The hashes are uniform, so a lookup that finds
//! its key reads about 1.5 slots on average at half full and 2.5 at the most (three quarters
//! full); one that finds nothing reads until the first empty slot (about 2.5 and 8.5 slots).
//! A client can grind its secrets' hashes to aim at the longest run of a shard (a few hundred
//! slots at three quarters full), which costs a few µs per request at worst: Robin Hood
//! insertion would bound that, should it ever matter.
//!
//! A slot also holds the key's profile pointer, so that a lookup can load the key and its
//! profile at once (see [`SecretTable::get`]) where the key's pointer alone makes the profile
//! wait for the key.

use std::hint::black_box;
use std::sync::{Arc, PoisonError, RwLock};

use crossbeam_utils::CachePadded;
use keyward_core::ids::KeyId;
use keyward_core::key::{CompactKey, KeyProfile};
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
type Shard = CachePadded<RwLock<Slots>>;

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
                .map(|_| CachePadded::new(RwLock::new(Slots::new())))
                .collect(),
        }
    }

    fn shard(&self, prefix: u64) -> &Shard {
        // High bits: a shard's slots are chosen by the low ones (fewer than 40 of them).
        &self.shards[(prefix >> 40) as usize & (self.shards.len() - 1)]
    }

    pub fn get(&self, hash: &KeyHash) -> Option<Arc<CompactKey>> {
        let shard = self
            .shard(prefix(hash))
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = shard.get(hash)?;
        // What authorisation reads next, loaded before the reference count's locked increment
        // (on x86 it waits for every load before it): the key's line and the profile's line
        // holding its scopes then miss together instead of one after the other. At a million
        // cached keys each is a cache miss of ~200 ns here.
        black_box((
            Arc::strong_count(&entry.key),
            entry.key.expires_at,
            entry.profile.scopes.len(),
        ));
        Some(entry.key.clone())
    }

    pub fn insert(&self, hash: KeyHash, key: Arc<CompactKey>) {
        self.shard(prefix(&hash))
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(hash, key);
    }

    /// Removes the secrets of `key_id` whose hash starts with `prefix`. Returns whether
    /// a secret of another key with that prefix remains (two keys sharing 64 bits of hash).
    pub fn remove_secrets_of(&self, prefix_of_hash: u64, key_id: &KeyId) -> bool {
        self.shard(prefix_of_hash)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove_secrets_of(prefix_of_hash, key_id)
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len)
            .sum()
    }
}

struct Entry {
    hash: KeyHash,
    key: Arc<CompactKey>,
    /// `key.profile` again: a second pointer that does not have to wait for the key's line.
    profile: Arc<KeyProfile>,
}

type Slot = Option<Entry>;

const MIN_SLOTS: usize = 16;

/// One shard's table. Invariants: the slot count is a power of two; at least a quarter of
/// the slots are empty (so every probe ends); every entry sits in the unbroken run of
/// occupied slots that starts at its home slot (`prefix & mask`), which is what lets a
/// lookup stop at the first empty slot.
struct Slots {
    slots: Box<[Slot]>,
    len: usize,
}

fn empty(n: usize) -> Box<[Slot]> {
    std::iter::repeat_with(|| None).take(n).collect()
}

impl Slots {
    fn new() -> Self {
        Self {
            slots: empty(MIN_SLOTS),
            len: 0,
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, prefix: u64) -> usize {
        // Truncating is the point: the low bits pick the slot.
        prefix as usize & self.mask()
    }

    /// The slot holding `hash`, or the empty slot where it would go.
    fn position(&self, hash: &KeyHash) -> Result<usize, usize> {
        let mut i = self.home(prefix(hash));
        loop {
            match &self.slots[i] {
                None => return Err(i),
                Some(entry) if entry.hash == *hash => return Ok(i),
                Some(_) => i = (i + 1) & self.mask(),
            }
        }
    }

    fn get(&self, hash: &KeyHash) -> Option<&Entry> {
        let i = self.position(hash).ok()?;
        self.slots[i].as_ref()
    }

    fn insert(&mut self, hash: KeyHash, key: Arc<CompactKey>) {
        let entry = Entry {
            hash,
            profile: key.profile.clone(),
            key,
        };
        match self.position(&hash) {
            Ok(i) => self.slots[i] = Some(entry),
            Err(i) => {
                self.slots[i] = Some(entry);
                self.len += 1;
                if self.len * 4 > self.slots.len() * 3 {
                    self.grow();
                }
            }
        }
    }

    fn grow(&mut self) {
        let bigger = empty(self.slots.len() * 2);
        let old = std::mem::replace(&mut self.slots, bigger);
        for entry in old.into_vec().into_iter().flatten() {
            // Every hash is distinct, so each lands on an empty slot.
            let (Ok(i) | Err(i)) = self.position(&entry.hash);
            self.slots[i] = Some(entry);
        }
    }

    fn remove_secrets_of(&mut self, prefix_of_hash: u64, key_id: &KeyId) -> bool {
        let mut i = self.home(prefix_of_hash);
        let mut others = false;
        loop {
            let Some(entry) = &self.slots[i] else {
                return others;
            };
            if prefix(&entry.hash) != prefix_of_hash {
                i = (i + 1) & self.mask();
            } else if entry.key.id == *key_id {
                // The slot may now hold an entry moved back into it: look again.
                self.remove_at(i);
            } else {
                others = true;
                i = (i + 1) & self.mask();
            }
        }
    }

    /// Empties slot `hole` and moves later entries of its run back (backward-shift deletion:
    /// no tombstones, so lookups stay as short as after a fresh insert).
    fn remove_at(&mut self, mut hole: usize) {
        self.slots[hole] = None;
        self.len -= 1;
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let Some(entry) = &self.slots[j] else {
                return;
            };
            // An entry may fill the hole unless its home lies after the hole (cyclically):
            // it must stay reachable from its home without crossing an empty slot.
            let from_home = j.wrapping_sub(self.home(prefix(&entry.hash))) & mask;
            let from_hole = j.wrapping_sub(hole) & mask;
            if from_home >= from_hole {
                self.slots[hole] = self.slots[j].take();
                hole = j;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use keyward_core::key::SecretValidity;
    use proptest::prelude::*;

    use super::*;

    fn key(id: KeyId) -> Arc<CompactKey> {
        crate::cache::tests::record(id, SecretValidity { valid_until: None })
    }

    /// A hash whose home slot, prefix and tail are chosen, to force long runs, wrap-around
    /// and prefixes shared by two keys.
    fn hash(low: u8, high: u8, tail: u8) -> KeyHash {
        let mut bytes = [0u8; 32];
        bytes[0] = low;
        bytes[7] = high;
        bytes[31] = tail;
        KeyHash(bytes)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert {
            low: u8,
            high: u8,
            tail: u8,
            key: usize,
        },
        Remove {
            low: u8,
            high: u8,
            key: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct bytes: many hashes share a home slot or a whole prefix.
        // 252..=255 sit at the end of the slots (wrap-around) at every size up to 256.
        let low = prop_oneof![0u8..4, 12u8..16, 252u8..=255, any::<u8>()];
        prop_oneof![
            3 => (low.clone(), 0u8..3, 0u8..3, 0usize..6)
                .prop_map(|(low, high, tail, key)| Op::Insert { low, high, tail, key }),
            1 => (low, 0u8..3, 0usize..6).prop_map(|(low, high, key)| Op::Remove { low, high, key }),
        ]
    }

    proptest! {
        /// The table against a `HashMap` model: same answers after any mix of inserts,
        /// replacements and removals (which shift entries back, across the wrap too).
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec(op(), 1..200)) {
            let ids: Vec<KeyId> = (0..6).map(|_| KeyId::generate()).collect();
            let keys: Vec<Arc<CompactKey>> = ids.iter().map(|id| key(*id)).collect();
            let mut table = Slots::new();
            let mut model: HashMap<KeyHash, usize> = HashMap::new();
            let mut seen: Vec<KeyHash> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert { low, high, tail, key } => {
                        let h = hash(low, high, tail);
                        table.insert(h, keys[key].clone());
                        model.insert(h, key);
                        seen.push(h);
                    }
                    Op::Remove { low, high, key } => {
                        let p = prefix(&hash(low, high, 0));
                        let others = table.remove_secrets_of(p, &ids[key]);
                        model.retain(|h, k| prefix(h) != p || *k != key);
                        prop_assert_eq!(others, model.keys().any(|h| prefix(h) == p));
                    }
                }
                prop_assert_eq!(table.len, model.len());
                prop_assert_eq!(table.slots.iter().flatten().count(), table.len);
                prop_assert!(table.len * 4 <= table.slots.len() * 3);
                for h in &seen {
                    let found = table.get(h);
                    prop_assert_eq!(found.map(|e| e.key.id), model.get(h).map(|&k| ids[k]));
                    prop_assert!(found.is_none_or(|e| Arc::ptr_eq(&e.profile, &e.key.profile)));
                    // A hash never inserted, with the same home slot and prefix.
                    let mut never = *h;
                    never.0[31] = 255;
                    prop_assert!(table.get(&never).is_none());
                }
            }
        }
    }

    #[test]
    fn grows_shrinks_and_grows_again_keeping_every_entry() {
        let table = SecretTable::new();
        let (a, b) = (KeyId::generate(), KeyId::generate());
        let (key_a, key_b) = (key(a), key(b));
        let hashes: Vec<KeyHash> = (0..10_000u32)
            .map(|i| KeyHash::of(&i.to_le_bytes()))
            .collect();
        // b's secrets share their 64-bit prefix with a's first 100.
        let twins: Vec<KeyHash> = hashes[..100]
            .iter()
            .map(|h| {
                let mut twin = *h;
                twin.0[31] ^= 1;
                twin
            })
            .collect();
        for h in &hashes {
            table.insert(*h, key_a.clone());
        }
        for h in &twins {
            table.insert(*h, key_b.clone());
        }
        assert_eq!(table.len(), 10_100);
        assert!(
            hashes
                .iter()
                .all(|h| table.get(h).is_some_and(|k| k.id == a))
        );
        assert!(
            twins
                .iter()
                .all(|h| table.get(h).is_some_and(|k| k.id == b))
        );
        assert!(table.get(&KeyHash::of(b"not there")).is_none());
        for (i, h) in hashes[..5_000].iter().enumerate() {
            // b's secret with this prefix stays, and says so.
            assert_eq!(table.remove_secrets_of(prefix(h), &a), i < 100);
        }
        assert_eq!(table.len(), 5_100);
        assert!(hashes[..5_000].iter().all(|h| table.get(h).is_none()));
        assert!(hashes[5_000..].iter().all(|h| table.get(h).is_some()));
        assert!(
            twins
                .iter()
                .all(|h| table.get(h).is_some_and(|k| k.id == b))
        );
        // Refilled past the size it had: everything is found again.
        let more: Vec<KeyHash> = (10_000..30_000u32)
            .map(|i| KeyHash::of(&i.to_le_bytes()))
            .collect();
        for h in hashes[..5_000].iter().chain(&more) {
            table.insert(*h, key_a.clone());
        }
        assert_eq!(table.len(), 30_100);
        assert!(
            hashes
                .iter()
                .chain(&more)
                .all(|h| table.get(h).is_some_and(|k| k.id == a))
        );
        assert!(
            twins
                .iter()
                .all(|h| table.get(h).is_some_and(|k| k.id == b))
        );
    }
}
