//! Memory per cached key: RSS of a key cache holding N keys against an empty one, with the
//! allocator `keyward serve` uses (mimalloc).
//! `cargo run --release -p keyward-server --example cache_memory -- 1000000 [distinct]`
//! (`distinct`: every key in a project of its own, so no two keys share a profile).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use keyward_core::Timestamp;
use keyward_core::ids::{KeyId, OrgId, ProjectId};
use keyward_core::key::{ApiKey, SecretValidity};
use keyward_core::key_format::{Environment, KeyHash};
use keyward_server::cache::{CacheSettings, KeyCache, Lookup};
use keyward_store::KeyLookup;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let distinct = std::env::args().nth(2).is_some_and(|a| a == "distinct");
    let now = Timestamp::from_millis(1_800_000_000_000);
    let org = OrgId::generate();
    let project = ProjectId::generate();
    let cache = KeyCache::new(CacheSettings {
        negative_capacity: 1,
        negative_ttl_ms: 1,
        unknown_per_client: 0,
        unknown_per_node: 0,
    });
    let before = rss_bytes();
    for i in 0..n {
        let hash = KeyHash::of(&(i as u64).to_le_bytes());
        let Lookup::Miss(epoch) = cache.lookup(&hash, now) else {
            continue;
        };
        let key = ApiKey {
            id: KeyId::generate(),
            org_id: org.clone(),
            project_id: if distinct {
                ProjectId::generate()
            } else {
                project.clone()
            },
            name: "CI pipeline".into(),
            environment: Environment::Live,
            hint: "kw_live_…a1b2".into(),
            scopes: vec!["inference".into()],
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
            created_at: now,
            created_by: "system".into(),
            last_used_at: None,
            revoked_at: None,
            previous_valid_until: None,
        };
        // As `keyward serve` fills it: a fresh record per key, the profile shared.
        let secret = cache.compact(KeyLookup {
            key,
            validity: SecretValidity { valid_until: None },
            org_tier: "free".into(),
        });
        cache.fill(hash, Some(secret), epoch, now);
    }
    let after = rss_bytes();
    // What the cache holds, not what was asked for: per key means per cached key.
    let (cached, _) = cache.len();
    println!(
        "{cached} cached keys: {} MiB more RSS, {} bytes per key",
        (after - before) / (1024 * 1024),
        (after - before) / cached.max(1) as u64
    );
}
