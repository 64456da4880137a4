//! In-process verification of a cached key: the credential found in the request's headers
//! (`extract_credential`, as the gateway does), its format parsed and checksum checked,
//! SHA-256, cache lookup, policy — at 1k, 100k and 1M cached keys
//! (`cargo bench -p keyward-server --bench verify`). JWT verification is in `request.rs`.

use std::hint::black_box;
use std::net::IpAddr;

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use keyward_core::Timestamp;
use keyward_core::ids::{KeyId, OrgId, ProjectId};
use keyward_core::key::{Access, ApiKey, SecretValidity, authorize};
use keyward_core::key_format::{self, KeyFormat, KeyHash};
use keyward_server::auth::extract_credential;
use keyward_server::cache::{CacheSettings, KeyCache, Lookup};
use keyward_server::config::AuthConfig;
use keyward_store::KeyLookup;
use secrecy::ExposeSecret;

// The allocator `keyward serve` runs with: where the cache's entries land decides its misses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn api_key() -> ApiKey {
    ApiKey {
        id: KeyId::generate(),
        org_id: OrgId::generate(),
        project_id: ProjectId::generate(),
        name: "bench".into(),
        environment: key_format::Environment::Live,
        hint: "kw_live_…abcd".into(),
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
        created_at: Timestamp::from_millis(0),
        created_by: "system".into(),
        last_used_at: None,
        revoked_at: None,
        previous_valid_until: None,
    }
}

fn verification(c: &mut Criterion) {
    let now = Timestamp::from_millis(1_800_000_000_000);
    let scopes = vec!["inference".to_owned()];
    let ip: IpAddr = [127, 0, 0, 1].into();
    let auth = AuthConfig {
        bearer: true,
        key_headers: vec![HeaderName::from_static("x-api-key")],
        hide_credentials: true,
        proxy_jwt_secret: None,
    };
    let mut group = c.benchmark_group("verify cached key");
    for &n in &[1_000usize, 10_000, 100_000, 1_000_000] {
        let cache = KeyCache::new(CacheSettings {
            negative_capacity: 1000,
            negative_ttl_ms: 60_000,
            unknown_per_client: 0,
            unknown_per_node: 0,
        });
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            let secret = key_format::generate("kw_live_", KeyFormat::default())
                .unwrap_or_else(|_| unreachable!());
            let hash = KeyHash::of_secret(&secret);
            let Lookup::Miss(epoch) = cache.lookup(&hash, now) else {
                unreachable!()
            };
            let cached = cache.compact(KeyLookup {
                key: api_key(),
                validity: SecretValidity { valid_until: None },
                org_tier: "free".into(),
            });
            cache.fill(hash, Some(cached), epoch, now);
            headers.push(format!("Bearer {}", secret.expose_secret()).into_bytes());
        }
        let mut i = 0usize;
        let mut request = HeaderMap::new();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                // Random-ish access: a stride that visits every key.
                i = (i + 7_919) % headers.len();
                // What hyper's parsing leaves: the request's header, checked, in a header map.
                let value = HeaderValue::from_bytes(&headers[i]).unwrap_or_else(|_| unreachable!());
                request.insert(AUTHORIZATION, value);
                let token = extract_credential(&request, &auth).unwrap_or_else(|_| unreachable!());
                assert!(key_format::is_well_formed(token, KeyFormat::default()));
                let hash = KeyHash::of(token);
                let Lookup::Hit(key) = cache.lookup(&hash, now) else {
                    unreachable!()
                };
                let access = Access {
                    client_ip: ip,
                    route: None,
                    required_scopes: &scopes,
                };
                black_box(authorize(&key, access, now))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, verification);
criterion_main!(benches);
