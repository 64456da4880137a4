//! The key cache: verifying a known key never touches storage.
//!
//! - Positive entries map a secret's SHA-256 to its key in compact form ([`CompactKey`]: what
//!   many keys share is held once). The hashes come from CSPRNG secrets, so the table uses
//!   their first bytes as the hash directly (no hashing on the hot path).
//! - Unknown hashes go to a bounded negative cache with a TTL. Those hashes are chosen by
//!   clients, so that map uses a per-process seeded hasher: nobody can aim at one bucket.
//! - Writes invalidate: the writer on this node calls [`KeyCache::invalidate`] before it
//!   answers, and every node polls the store's change feed (`key_changes`) once a second.
//!   An epoch counter keeps a lookup that raced with an invalidation from caching stale data.
//! - Concurrent misses on one hash share one store query (a cold cache after a start would
//!   otherwise query a popular key once per request in flight).
//! - Each client address may make a bounded number of store queries that find nothing per
//!   minute: the checksum is public, so anyone can make keys that pass it, and without a bound
//!   each distinct one costs a query (`bench/flood.sh`). A client over it is answered 429
//!   for keys the cache does not know, without a query; cached keys still work.
//! - A flood from many clients is bounded per node: once the node's store queries that find
//!   nothing pass their own bound in a minute, the node builds a set of every stored secret's
//!   hash prefix (8 bytes each, kept current from the change feed), and from then on, past the
//!   bound, a key whose prefix is not in the set is unknown without a query.

mod table;

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use dashmap::DashMap;
use hashbrown::HashTable;
use keyward_core::ids::KeyId;
use keyward_core::key::{CompactKey, KeyProfile};
use keyward_core::key_format::KeyHash;
use keyward_core::{ErrorCode, Timestamp};
use keyward_store::{KeyChanges, KeyLookup, Store};

use crate::error::{ApiError, ApiResult};

use table::{SecretTable, prefix};

/// Uses the first 8 bytes of a SHA-256 as the hash (for maps keyed by digests of secrets).
#[derive(Clone, Copy, Default)]
pub struct PassThrough;

#[derive(Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(first);
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;

    fn build_hasher(&self) -> Self::Hasher {
        PassThroughHasher(0)
    }
}

pub struct CacheSettings {
    pub negative_capacity: usize,
    pub negative_ttl_ms: i64,
    /// Unknown credentials (store queries that found nothing, forged token signatures) per
    /// client (IPv4 address or IPv6 /64) and minute; 0: no bound.
    pub unknown_per_client: u32,
    /// Store queries that found nothing on this node per minute, past which only keys in the
    /// set of stored hash prefixes are queried; 0: no bound.
    pub unknown_per_node: u32,
}

/// The first 8 bytes of every stored secret's hash. Built only once a node has met a flood
/// (its memory, ~19 bytes per stored key, and the scan are for nodes that need them), then
/// kept: new secrets reach it through the change feed and this node's own writes. Deleted
/// secrets may linger; a stale prefix only costs a query.
#[derive(Default)]
struct StoredHashes {
    state: AtomicU8,
    prefixes: RwLock<HashSet<u64, PassThrough>>,
}

const STORED_OFF: u8 = 0;
/// Wanted and kept current, not yet complete: the change feed's follower scans the store.
const STORED_WANTED: u8 = 1;
const STORED_READY: u8 = 2;

impl StoredHashes {
    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    fn add(&self, hashes: &[KeyHash]) {
        let mut prefixes = self
            .prefixes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        prefixes.extend(hashes.iter().map(prefix));
    }

    /// Whether a hash may be stored: `None` while the set is not complete.
    fn may_hold(&self, hash: &KeyHash) -> Option<bool> {
        (self.state() == STORED_READY).then(|| {
            self.prefixes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&prefix(hash))
        })
    }
}

pub struct KeyCache {
    positive: SecretTable,
    /// `(fingerprint of the key id, prefix of the hash)` of every positive entry: how an
    /// invalidation finds a key's secrets.
    owners: Mutex<HashTable<(u64, u64)>>,
    fingerprints: foldhash::fast::RandomState,
    /// Keys by id, for JWTs (which name their key rather than carry its secret).
    by_id: DashMap<KeyId, Arc<CompactKey>>,
    profiles: Mutex<Profiles>,
    negative: DashMap<KeyHash, Timestamp, foldhash::fast::RandomState>,
    /// Store queries in flight, by hash. Client-chosen hashes too, hence the seeded hasher.
    loading: DashMap<KeyHash, Arc<Load>, foldhash::fast::RandomState>,
    /// Store queries that found nothing, by client (an IPv4 address or an IPv6 /64):
    /// `(minute, count)`. Client-chosen, hence the seeded hasher; bounded like the negative
    /// cache.
    unknown_by_client: DashMap<IpAddr, (i64, u32), foldhash::fast::RandomState>,
    /// Store queries that found nothing on this node: `(minute, count)`.
    unknown_on_node: Mutex<(i64, u32)>,
    stored: StoredHashes,
    epoch: AtomicU64,
    settings: CacheSettings,
}

/// The profiles cached keys share, and the scope strings the profiles share; both pruned of
/// unused entries whenever the profiles have doubled.
#[derive(Default)]
struct Profiles {
    shared: HashSet<Arc<KeyProfile>>,
    scopes: HashSet<Arc<str>>,
    prune_at: usize,
}

impl Profiles {
    fn intern(&mut self, mut profile: KeyProfile) -> Arc<KeyProfile> {
        if let Some(shared) = self.shared.get(&profile) {
            return shared.clone();
        }
        if self.shared.len() >= self.prune_at {
            self.shared.retain(|p| Arc::strong_count(p) > 1);
            self.scopes.retain(|s| Arc::strong_count(s) > 1);
            self.prune_at = (self.shared.len() * 2).max(1024);
        }
        for scope in &mut profile.scopes {
            match self.scopes.get(scope) {
                Some(shared) => *scope = shared.clone(),
                None => {
                    self.scopes.insert(scope.clone());
                }
            }
        }
        let shared = Arc::new(profile);
        self.shared.insert(shared.clone());
        shared
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One store query for a hash, shared by the requests that missed it meanwhile.
struct Load {
    /// The cache epoch when the query's first request missed: a request that missed later,
    /// after an invalidation, must not take an answer read before it.
    epoch: u64,
    found: tokio::sync::OnceCell<Option<Arc<CompactKey>>>,
}

/// What the cache knows about a hash.
pub enum Lookup {
    Hit(Arc<CompactKey>),
    KnownUnknown,
    /// Not cached: load it, then [`KeyCache::fill`] with the epoch given here.
    Miss(u64),
}

impl KeyCache {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            positive: SecretTable::new(),
            owners: Mutex::new(HashTable::new()),
            fingerprints: foldhash::fast::RandomState::default(),
            by_id: DashMap::new(),
            profiles: Mutex::default(),
            negative: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            loading: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            unknown_by_client: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            unknown_on_node: Mutex::default(),
            stored: StoredHashes::default(),
            epoch: AtomicU64::new(0),
            settings,
        }
    }

    /// The compact form of what the store found, sharing its profile with other keys.
    pub fn compact(&self, found: KeyLookup) -> Arc<CompactKey> {
        Arc::new(CompactKey::new(
            found.key,
            Arc::from(found.org_tier),
            found.validity,
            |profile| lock(&self.profiles).intern(profile),
        ))
    }

    pub fn lookup(&self, hash: &KeyHash, now: Timestamp) -> Lookup {
        if let Some(key) = self.positive.get(hash) {
            return Lookup::Hit(key);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some(until) = self.negative.get(hash).map(|e| *e.value()) {
            if until > now {
                return Lookup::KnownUnknown;
            }
            self.negative.remove(hash);
        }
        Lookup::Miss(epoch)
    }

    fn fingerprint(&self, key_id: &KeyId) -> u64 {
        self.fingerprints.hash_one(key_id)
    }

    /// Stores what the store said about `hash`, unless an invalidation happened meanwhile.
    pub fn fill(&self, hash: KeyHash, found: Option<Arc<CompactKey>>, epoch: u64, now: Timestamp) {
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        match found {
            Some(key) => {
                let fingerprint = self.fingerprint(&key.id);
                let owner = (fingerprint, prefix(&hash));
                self.positive.insert(hash, key.clone());
                {
                    let mut owners = lock(&self.owners);
                    if owners.find(fingerprint, |o| *o == owner).is_none() {
                        owners.insert_unique(fingerprint, owner, |&(f, _)| f);
                    }
                }
                // Lost a race with an invalidation: drop what may be stale.
                if self.epoch.load(Ordering::Acquire) != epoch {
                    self.invalidate(&key.id);
                }
            }
            None => {
                if self.negative.len() >= self.settings.negative_capacity {
                    // Bounded: a flood of random keys costs memory up to here, then starts over.
                    self.negative.clear();
                }
                self.negative
                    .insert(hash, now.plus_millis(self.settings.negative_ttl_ms));
            }
        }
    }

    /// The query in flight for `hash` that a miss at `epoch` may share, or a new one.
    fn load_for(&self, hash: &KeyHash, epoch: u64) -> Arc<Load> {
        let new = || {
            Arc::new(Load {
                epoch,
                found: tokio::sync::OnceCell::new(),
            })
        };
        let mut slot = self.loading.entry(*hash).or_insert_with(new);
        if slot.epoch < epoch {
            // Started before an invalidation this miss saw: its answer may be stale.
            *slot = new();
        }
        slot.clone()
    }

    /// Whether the key is cached by id (as tokens naming it find it).
    pub fn has_key_id(&self, key_id: &KeyId) -> bool {
        self.by_id.contains_key(key_id)
    }

    /// Forgets everything cached about a key (all its secrets).
    pub fn invalidate(&self, key_id: &KeyId) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.by_id.remove(key_id);
        let fingerprint = self.fingerprint(key_id);
        let mut owners = lock(&self.owners);
        // Another key with the same fingerprint keeps its entries: a collision only costs
        // this loop a look at its secrets.
        let mut others = Vec::new();
        while let Ok(found) = owners.find_entry(fingerprint, |&(f, _)| f == fingerprint) {
            let ((_, hash_prefix), _) = found.remove();
            if self.positive.remove_secrets_of(hash_prefix, key_id) {
                others.push(hash_prefix);
            }
        }
        for hash_prefix in others {
            owners.insert_unique(fingerprint, (fingerprint, hash_prefix), |&(f, _)| f);
        }
    }

    /// Forgets the key that owns `hash`, if it is cached.
    pub fn invalidate_by_hash(&self, hash: &KeyHash) {
        if let Some(key) = self.positive.get(hash) {
            self.invalidate(&key.id);
        }
    }

    /// Seconds until `client` may have unknown credentials looked into again, when this
    /// minute's have reached the bound.
    fn unknown_budget_spent(&self, client: IpAddr, now: Timestamp) -> Option<u64> {
        let bound = self.settings.unknown_per_client;
        if bound == 0 {
            return None;
        }
        let minute = now.as_millis().div_euclid(60_000);
        let spent = self.unknown_by_client.get(&client).is_some_and(|entry| {
            let (entry_minute, count) = *entry;
            entry_minute == minute && count >= bound
        });
        spent.then(|| {
            let until_next_minute = u64::try_from((minute + 1) * 60_000 - now.as_millis());
            until_next_minute.map_or(60, |ms| ms.div_ceil(1000))
        })
    }

    /// Answers 429 when `client` has used up its unknown credentials this minute: the work
    /// an unknown credential costs (a store query, a signature check) is then not done.
    pub fn refuse_if_spent(&self, client: IpAddr, now: Timestamp) -> ApiResult<()> {
        let Some(secs) = self.unknown_budget_spent(client, now) else {
            return Ok(());
        };
        let mut refused = ApiError::new(ErrorCode::RateLimitExceeded).with_message(format!(
            "Too many unknown or invalid credentials from this address. Retry after {secs} seconds."
        ));
        refused.retry_after = Some(secs);
        Err(refused)
    }

    fn charge_unknown(&self, client: IpAddr, now: Timestamp) {
        let minute = now.as_millis().div_euclid(60_000);
        self.charge_unknown_on_node(minute);
        self.charge_client(client, minute);
    }

    /// Counts a forged token signature against its client's unknown credentials
    /// (not against the node's bound, which guards the store and its set of stored hashes).
    pub fn charge_invalid_token(&self, client: IpAddr, now: Timestamp) {
        self.charge_client(client, now.as_millis().div_euclid(60_000));
    }

    fn charge_client(&self, client: IpAddr, minute: i64) {
        if self.settings.unknown_per_client == 0 {
            return;
        }
        if self.unknown_by_client.len() >= self.settings.negative_capacity {
            // Bounded: many addresses cost memory up to here, then the counts start over.
            self.unknown_by_client.clear();
        }
        let mut entry = self.unknown_by_client.entry(client).or_insert((minute, 0));
        if entry.0 == minute {
            entry.1 = entry.1.saturating_add(1);
        } else {
            *entry = (minute, 1);
        }
    }

    fn charge_unknown_on_node(&self, minute: i64) {
        let bound = self.settings.unknown_per_node;
        if bound == 0 {
            return;
        }
        let mut node = lock(&self.unknown_on_node);
        *node = match *node {
            (m, count) if m == minute => (m, count.saturating_add(1)),
            _ => (minute, 1),
        };
        if node.1 >= bound {
            // The first flood: the change feed's follower builds the set.
            let _ = self.stored.state.compare_exchange(
                STORED_OFF,
                STORED_WANTED,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Past this node's bound, whether a hash is worth a store query: `false` when the set of
    /// stored hashes is complete and lacks it.
    fn worth_a_query(&self, hash: &KeyHash, now: Timestamp) -> bool {
        let bound = self.settings.unknown_per_node;
        if bound == 0 {
            return true;
        }
        let minute = now.as_millis().div_euclid(60_000);
        let (m, count) = *lock(&self.unknown_on_node);
        if m != minute || count < bound {
            return true;
        }
        self.stored.may_hold(hash) != Some(false)
    }

    /// True when the change feed's follower should scan the store for the set of stored
    /// hashes (a flood asked for it).
    pub fn wants_stored_hashes(&self) -> bool {
        self.stored.state() == STORED_WANTED
    }

    /// Completes the set with the prefixes of a scan of the store begun after it was wanted.
    pub fn complete_stored_hashes(&self, scanned: Vec<u64>) {
        {
            let mut prefixes = self
                .stored
                .prefixes
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            prefixes.reserve(scanned.len());
            prefixes.extend(scanned);
        }
        self.stored.state.store(STORED_READY, Ordering::Release);
    }

    /// True once the set is kept: new secrets must then be added to it.
    pub fn keeps_stored_hashes(&self) -> bool {
        self.stored.state() != STORED_OFF
    }

    /// Adds new secrets (from the change feed, or written on this node) to the set, if kept.
    pub fn add_stored_hashes(&self, hashes: &[KeyHash]) {
        if self.keeps_stored_hashes() {
            self.stored.add(hashes);
        }
    }

    /// A hash that now belongs to a key must not linger as unknown, and joins the set of
    /// stored hashes if the node keeps one.
    pub fn forget_unknown(&self, hash: &KeyHash) {
        self.negative.remove(hash);
        self.add_stored_hashes(std::slice::from_ref(hash));
    }

    pub fn len(&self) -> (usize, usize) {
        (self.positive.len(), self.negative.len())
    }
}

/// Takes a finished (or abandoned) query off the map, also when the request that waited for
/// it is cancelled: a client that hangs up mid-query must not leave its hash behind.
struct Loading<'a> {
    cache: &'a KeyCache,
    hash: &'a KeyHash,
    load: Arc<Load>,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        self.cache
            .loading
            .remove_if(self.hash, |_, l| Arc::ptr_eq(l, &self.load));
    }
}

/// Resolves a key by id through the cache (for JWTs).
pub async fn resolve_id(
    cache: &KeyCache,
    store: &dyn Store,
    id: &KeyId,
) -> Result<Option<Arc<CompactKey>>, keyward_store::StoreError> {
    if let Some(hit) = cache.by_id.get(id) {
        crate::metrics::key_cache_hit();
        return Ok(Some(hit.value().clone()));
    }
    crate::metrics::key_cache_miss();
    let epoch = cache.epoch.load(Ordering::Acquire);
    let found = store
        .find_key_by_id(id)
        .await?
        .map(|found| cache.compact(found));
    if let Some(secret) = &found
        && cache.epoch.load(Ordering::Acquire) == epoch
    {
        cache.by_id.insert(*id, secret.clone());
        if cache.epoch.load(Ordering::Acquire) != epoch {
            cache.by_id.remove(id);
        }
    }
    Ok(found)
}

/// Resolves a hash through the cache; reports hits and misses to the metrics. A miss queries
/// the store unless `client` has used up its queries that find nothing (429).
pub async fn resolve(
    cache: &KeyCache,
    store: &dyn Store,
    hash: &KeyHash,
    client: IpAddr,
    now: Timestamp,
) -> ApiResult<Option<Arc<CompactKey>>> {
    match cache.lookup(hash, now) {
        Lookup::Hit(secret) => {
            crate::metrics::key_cache_hit();
            Ok(Some(secret))
        }
        Lookup::KnownUnknown => {
            crate::metrics::key_cache_negative_hit();
            Ok(None)
        }
        Lookup::Miss(epoch) => {
            let client = keyward_core::ip::client_network(client);
            cache
                .refuse_if_spent(client, now)
                .inspect_err(|_| crate::metrics::unknown_keys_refused())?;
            if !cache.worth_a_query(hash, now) {
                // A flood from many clients, and no stored secret has this hash.
                crate::metrics::unknown_keys_filtered();
                return Ok(None);
            }
            let loading = Loading {
                cache,
                hash,
                load: cache.load_for(hash, epoch),
            };
            let load = &loading.load;
            // The first request queries; the others wait for its answer (or, if it fails or
            // is cancelled, the next one queries).
            let found = load
                .found
                .get_or_try_init(|| async {
                    // This miss may have raced with an earlier query for the hash that has
                    // filled the cache and left the map since: then there is nothing to load.
                    match cache.lookup(hash, now) {
                        Lookup::Hit(secret) => return Ok(Some(secret)),
                        Lookup::KnownUnknown => return Ok(None),
                        Lookup::Miss(_) => {}
                    }
                    crate::metrics::key_cache_miss();
                    let found = store
                        .find_by_hash(hash)
                        .await?
                        .map(|found| cache.compact(found));
                    if found.is_none() {
                        cache.charge_unknown(client, now);
                    }
                    cache.fill(*hash, found.clone(), load.epoch, now);
                    Ok::<_, keyward_store::StoreError>(found)
                })
                .await?;
            Ok(found.clone())
        }
    }
}

/// Follows the store's change feed from `seq` (its head when the node started, before it
/// cached anything), invalidating changed keys; runs until `stop`.
pub async fn follow_changes(
    cache: Arc<KeyCache>,
    store: Arc<dyn Store>,
    clock: Arc<dyn keyward_core::Clock>,
    mut seq: i64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks: u64 = 0;
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if cache.wants_stored_hashes() {
            // Before this round's changes: what they add then lands in the complete set. The
            // prefixes are gathered first so that the set is sized once, not grown table by
            // table (a failed scan leaves it wanted, and the next round starts over).
            let mut prefixes = Vec::new();
            let scanned = store
                .secret_hashes(&mut |page| prefixes.extend(page.iter().map(prefix)))
                .await;
            match scanned {
                Ok(()) => {
                    let stored = prefixes.len();
                    cache.complete_stored_hashes(prefixes);
                    tracing::warn!(
                        stored,
                        "unknown keys past the node's bound: only stored hashes are queried now"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the stored hashes; retrying"),
            }
        }
        match store.key_changes_since(seq).await {
            Ok(KeyChanges {
                changed,
                created,
                next,
            }) => {
                // A new key has nothing cached anywhere: dropping it would only cost the node
                // that made it, and has it cached already, a store query.
                for key in &changed {
                    cache.invalidate(key);
                }
                if cache.keeps_stored_hashes() && !(changed.is_empty() && created.is_empty()) {
                    let keys: Vec<KeyId> = changed.into_iter().chain(created).collect();
                    match store.secret_hashes_of(&keys).await {
                        Ok(hashes) => cache.add_stored_hashes(&hashes),
                        Err(e) => {
                            // Read again next round: a secret missing from the set would be
                            // refused under a flood.
                            tracing::warn!(error = %e, "cannot read new secrets' hashes; retrying");
                            continue;
                        }
                    }
                }
                seq = next;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the key change feed; cache kept"),
        }
        ticks += 1;
        if ticks.is_multiple_of(1200) {
            let hour_ago = clock.now().plus_secs(-3600);
            if let Err(e) = store.prune_key_changes(hour_ago).await {
                tracing::warn!(error = %e, "cannot prune the key change feed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_core::ids::{OrgId, ProjectId};
    use keyward_core::key::{ApiKey, SecretValidity};
    use keyward_core::key_format::Environment;

    fn key() -> Arc<CompactKey> {
        record(KeyId::generate(), SecretValidity { valid_until: None })
    }

    /// A cached key with that id (the table's tests use it too).
    pub(super) fn record(id: KeyId, validity: SecretValidity) -> Arc<CompactKey> {
        Arc::new(CompactKey::new(
            api_key(id),
            Arc::from("free"),
            validity,
            Arc::new,
        ))
    }

    fn api_key(id: KeyId) -> ApiKey {
        ApiKey {
            id,
            org_id: OrgId::generate(),
            project_id: ProjectId::generate(),
            name: String::new(),
            environment: Environment::Live,
            hint: String::new(),
            scopes: vec![],
            expires_at: None,
            allowed_ips: vec![],
            blocked_ips: vec![],
            endpoint: None,
            quota_requests: 60,
            quota_window: 60,
            remaining: None,
            refill: None,
            credits_version: 0,
            meta: serde_json::Map::new(),
            created_at: Timestamp::from_millis(0),
            created_by: String::new(),
            last_used_at: None,
            revoked_at: None,
            previous_valid_until: None,
        }
    }

    fn cache(cap: usize) -> KeyCache {
        KeyCache::new(CacheSettings {
            negative_capacity: cap,
            negative_ttl_ms: 1_000,
            unknown_per_client: 3,
            unknown_per_node: 0,
        })
    }

    const NOW: Timestamp = Timestamp::from_millis(10_000);

    #[test]
    fn fill_hit_invalidate() {
        let c = cache(10);
        let h = KeyHash::of(b"a");
        let Lookup::Miss(epoch) = c.lookup(&h, NOW) else {
            panic!("expected a miss")
        };
        let k = key();
        c.fill(h, Some(k.clone()), epoch, NOW);
        assert!(matches!(c.lookup(&h, NOW), Lookup::Hit(_)));
        c.invalidate(&k.id);
        assert!(matches!(c.lookup(&h, NOW), Lookup::Miss(_)));
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_dropped() {
        let c = cache(10);
        let h = KeyHash::of(b"a");
        let Lookup::Miss(epoch) = c.lookup(&h, NOW) else {
            panic!("expected a miss")
        };
        let k = key();
        c.invalidate(&k.id);
        c.fill(h, Some(k), epoch, NOW);
        assert!(matches!(c.lookup(&h, NOW), Lookup::Miss(_)));
    }

    #[test]
    fn misses_share_a_load_until_an_invalidation_and_leave_nothing_behind() {
        let c = cache(10);
        let h = KeyHash::of(b"a");
        let first = Loading {
            cache: &c,
            hash: &h,
            load: c.load_for(&h, 0),
        };
        let same_epoch = c.load_for(&h, 0);
        assert!(Arc::ptr_eq(&first.load, &same_epoch));
        // A miss after an invalidation must not take an answer read before it.
        let newer = c.load_for(&h, 1);
        assert!(!Arc::ptr_eq(&first.load, &newer));
        // The replaced load, finished or abandoned, does not take the newer one with it.
        drop(first);
        assert_eq!(c.loading.len(), 1);
        drop(Loading {
            cache: &c,
            hash: &h,
            load: newer,
        });
        assert!(c.loading.is_empty());
    }

    #[test]
    fn a_client_over_its_unknown_budget_waits_for_the_next_minute() {
        let c = cache(10);
        let (client, other): (IpAddr, IpAddr) = ([192, 0, 2, 1].into(), [192, 0, 2, 2].into());
        for _ in 0..3 {
            assert_eq!(c.unknown_budget_spent(client, NOW), None);
            c.charge_unknown(client, NOW);
        }
        // NOW is 10 s into its minute.
        assert_eq!(c.unknown_budget_spent(client, NOW), Some(50));
        assert_eq!(c.unknown_budget_spent(other, NOW), None);
        let next_minute = Timestamp::from_millis(60_000);
        assert_eq!(c.unknown_budget_spent(client, next_minute), None);
        c.charge_unknown(client, next_minute);
        assert_eq!(c.unknown_budget_spent(client, next_minute), None);
    }

    #[test]
    fn negative_entries_expire_and_stay_bounded() {
        let c = cache(100);
        for i in 0..1_000u32 {
            let h = KeyHash::of(&i.to_le_bytes());
            let Lookup::Miss(epoch) = c.lookup(&h, NOW) else {
                panic!("expected a miss")
            };
            c.fill(h, None, epoch, NOW);
            assert!(matches!(c.lookup(&h, NOW), Lookup::KnownUnknown));
        }
        assert!(c.len().1 <= 100);
        let h = KeyHash::of(&999u32.to_le_bytes());
        assert!(matches!(c.lookup(&h, NOW.plus_secs(2)), Lookup::Miss(_)));
    }

    fn fill(c: &KeyCache, hash: KeyHash, key: &Arc<CompactKey>) {
        let Lookup::Miss(epoch) = c.lookup(&hash, NOW) else {
            panic!("expected a miss")
        };
        c.fill(hash, Some(key.clone()), epoch, NOW);
    }

    #[test]
    fn invalidating_a_key_forgets_all_its_secrets_and_nothing_else() {
        let c = cache(10);
        let id = KeyId::generate();
        let grace = SecretValidity {
            valid_until: Some(NOW.plus_secs(60)),
        };
        let (current, previous, other) = (KeyHash::of(b"a"), KeyHash::of(b"b"), KeyHash::of(b"c"));
        fill(
            &c,
            current,
            &record(id, SecretValidity { valid_until: None }),
        );
        fill(&c, previous, &record(id, grace));
        let other_key = key();
        fill(&c, other, &other_key);
        assert!(
            matches!(c.lookup(&previous, NOW), Lookup::Hit(k) if k.secret_valid_until() == grace.valid_until)
        );
        // Filling a hash twice (two loads racing) keeps one reverse entry.
        let epoch = c.epoch.load(Ordering::Acquire);
        c.fill(other, Some(other_key.clone()), epoch, NOW);
        assert_eq!(lock(&c.owners).len(), 3);

        c.invalidate(&id);
        assert!(matches!(c.lookup(&current, NOW), Lookup::Miss(_)));
        assert!(matches!(c.lookup(&previous, NOW), Lookup::Miss(_)));
        assert!(matches!(c.lookup(&other, NOW), Lookup::Hit(_)));
        assert_eq!(c.len().0, 1);
        assert_eq!(lock(&c.owners).len(), 1);
        c.invalidate_by_hash(&other);
        assert_eq!(c.len().0, 0);
        assert!(lock(&c.owners).is_empty());
    }

    #[test]
    fn two_keys_whose_hashes_share_a_prefix_are_told_apart() {
        let table = table::SecretTable::new();
        let (a, b) = (key(), key());
        let mut second = [7u8; 32];
        second[31] = 8;
        let (ha, hb) = (KeyHash([7u8; 32]), KeyHash(second));
        table.insert(ha, a.clone());
        table.insert(hb, b.clone());
        assert!(table.get(&ha).is_some_and(|k| Arc::ptr_eq(&k, &a)));
        assert!(table.get(&hb).is_some_and(|k| Arc::ptr_eq(&k, &b)));
        assert!(
            table.remove_secrets_of(prefix(&ha), &a.id),
            "b's secret remains"
        );
        assert!(table.get(&ha).is_none());
        assert!(table.get(&hb).is_some());
        assert!(!table.remove_secrets_of(prefix(&hb), &b.id));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn keys_with_equal_profiles_share_one_and_unused_profiles_are_pruned() {
        let c = cache(10);
        let org = OrgId::generate();
        let project = ProjectId::generate();
        let lookup = |scopes: Vec<String>| KeyLookup {
            key: ApiKey {
                org_id: org.clone(),
                project_id: project.clone(),
                scopes,
                ..api_key(KeyId::generate())
            },
            validity: SecretValidity { valid_until: None },
            org_tier: "free".into(),
        };
        let a = c.compact(lookup(vec!["x".into()]));
        let b = c.compact(lookup(vec!["x".into()]));
        let d = c.compact(lookup(vec!["y".into()]));
        assert!(Arc::ptr_eq(&a.profile, &b.profile));
        assert!(!Arc::ptr_eq(&a.profile, &d.profile));
        drop((a, b, d));
        lock(&c.profiles).prune_at = 0;
        let _kept = c.compact(lookup(vec!["z".into()]));
        assert_eq!(lock(&c.profiles).shared.len(), 1);
    }

    #[test]
    fn profiles_of_different_orgs_share_their_scope_strings() {
        let c = cache(10);
        let lookup = |scopes: &[&str]| KeyLookup {
            key: ApiKey {
                org_id: OrgId::generate(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ..api_key(KeyId::generate())
            },
            validity: SecretValidity { valid_until: None },
            org_tier: "free".into(),
        };
        let a = c.compact(lookup(&["read", "write"]));
        let b = c.compact(lookup(&["write"]));
        assert!(!Arc::ptr_eq(&a.profile, &b.profile));
        assert_eq!(&*a.scopes()[1], "write");
        assert!(Arc::ptr_eq(&a.scopes()[1], &b.scopes()[0]));
        drop(a);
        lock(&c.profiles).prune_at = 0;
        let _z = c.compact(lookup(&["z"]));
        let mut left: Vec<String> = lock(&c.profiles)
            .scopes
            .iter()
            .map(|s| s.to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["write", "z"],
            "b still uses `write`; `read` went with a"
        );
        drop(b);
    }

    #[test]
    fn past_the_node_bound_only_stored_hashes_are_worth_a_query() {
        let c = KeyCache::new(CacheSettings {
            negative_capacity: 10,
            negative_ttl_ms: 1_000,
            unknown_per_client: 0,
            unknown_per_node: 2,
        });
        let [stored, created, stranger] = [1u8, 2, 3].map(|n| KeyHash::of(&[n; 40]));
        let client = |n: u8| IpAddr::from([10, 0, 0, n]);
        assert!(c.worth_a_query(&stranger, NOW));
        c.charge_unknown(client(1), NOW);
        assert!(!c.wants_stored_hashes(), "under the bound: no set");
        c.add_stored_hashes(&[created]);
        c.charge_unknown(client(2), NOW);
        assert!(
            c.wants_stored_hashes(),
            "the bound reached: the set is wanted"
        );
        assert!(
            c.worth_a_query(&stranger, NOW),
            "until the set is complete, misses are queried"
        );
        c.complete_stored_hashes(vec![prefix(&stored)]);
        assert!(!c.wants_stored_hashes());
        assert!(c.worth_a_query(&stored, NOW));
        assert!(!c.worth_a_query(&stranger, NOW));
        // Secrets made once the set is kept join it (this node's writes, the change feed).
        c.forget_unknown(&created);
        assert!(c.worth_a_query(&created, NOW));
        // The bound is per minute.
        assert!(c.worth_a_query(&stranger, NOW.plus_secs(60)));
    }
}
