//! Whole requests in process, no socket: a gateway request through the front (routing, key
//! verification, limits, identity headers, the built-in echo upstream, the error/metrics
//! bookkeeping), forward-auth answers over 10,000 keys (what per-key state costs once it no
//! longer fits the core's cache), and verification of an access token.
//! `cargo bench -p keyward-server --bench request`

use std::hint::black_box;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, header};
use criterion::{Criterion, criterion_group, criterion_main};
use keyward_core::SystemClock;
use keyward_server::front::Front;
use keyward_server::lifecycle::{self, Actor, CreateKeyInput};
use keyward_server::master_key::MasterKey;
use keyward_server::proxy::ClientConn;
use keyward_server::state::AppState;
use keyward_server::tokens::TokenService;
use secrecy::ExposeSecret;

// The allocator `keyward serve` runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keys of the forward-auth benchmark: the load test's count.
const MANY_KEYS: usize = 10_000;

struct Setup {
    state: AppState,
    front: Front,
    secret: String,
    /// `Bearer <secret>` of `MANY_KEYS` more keys.
    bearers: Vec<String>,
    token: String,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let root = dir.path().display();
    let config = keyward_server::config::from_toml_str(&format!(
        r#"
[server]
data_dir = "{root}/data"
[store]
url = "sqlite://{root}/keyward.db"
[log]
level = "warn"
[ratelimit.tiers.free]
per_minute = 1000000000
per_hour = 1000000000
[[routes]]
name = "echo"
path = "/echo/"
upstream = "builtin:echo"
scopes = ["inference"]
strip_prefix = true
"#
    ))
    .unwrap_or_else(|e| unreachable!("{e:?}"));
    let store = keyward_store::open(&config.store_url)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let state = AppState::new(config, store, Arc::new(SystemClock));
    let master =
        MasterKey::load(&state.config.server.data_dir).unwrap_or_else(|e| unreachable!("{e}"));
    let tokens = TokenService::load(
        &state.config.tokens,
        None,
        &*state.store,
        Some(&master),
        state.clock.now(),
    )
    .await
    .unwrap_or_else(|e| unreachable!("{e}"));
    let state = state.with_tokens(Arc::new(tokens));
    let (admin, _) = keyward_server::bootstrap::ensure_bootstrapped(&state)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"))
        .unwrap_or_else(|| unreachable!("a fresh store bootstraps"));
    let actor = Actor {
        id: "cli".into(),
        org_id: admin.org_id.clone(),
        ip: None,
    };
    let input = || CreateKeyInput {
        scopes: Some(vec!["inference".into()]),
        // High enough never to refuse: the benchmark measures admitted requests.
        quota_requests: Some(1_000_000_000),
        quota_window: Some(60),
        ..CreateKeyInput::default()
    };
    let (key, secret) = lifecycle::create_key(&state, &actor, input())
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let mut bearers = Vec::with_capacity(MANY_KEYS);
    for _ in 0..MANY_KEYS {
        let (_, secret) = lifecycle::create_key(&state, &actor, input())
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        bearers.push(format!("Bearer {}", secret.expose_secret()));
    }
    let key = keyward_core::key::CompactKey::new(
        key,
        Arc::from("free"),
        keyward_core::key::SecretValidity { valid_until: None },
        Arc::new,
    );
    let token = state
        .tokens
        .as_ref()
        .map(|t| t.issue_access(&key, state.clock.now()))
        .and_then(Result::ok)
        .unwrap_or_else(|| unreachable!("tokens are configured"));
    Setup {
        front: Front::new(state.clone()),
        state,
        secret: secret.expose_secret().to_owned(),
        bearers,
        token,
        _dir: dir,
    }
}

fn requests(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| unreachable!("{e}"));
    let s = rt.block_on(setup());
    let client = ClientConn::new(
        "127.0.0.1:40000".parse().unwrap_or_else(|_| unreachable!()),
        &s.state,
    );
    let bearer = format!("Bearer {}", s.secret);
    let request = || {
        Request::get("/echo/hello?x=1")
            .header(header::AUTHORIZATION, &bearer)
            .body(Body::empty())
            .unwrap_or_else(|e| unreachable!("{e}"))
    };
    let first = rt.block_on(s.front.handle(&client, request()));
    assert_eq!(first.status(), 200);
    c.bench_function(
        "in-process request: front, key, limits, echo upstream",
        |b| b.iter(|| black_box(rt.block_on(s.front.handle(&client, request())))),
    );
    let last = rt.block_on(s.front.handle(&client, request()));
    assert_eq!(last.status(), 200, "every measured request was admitted");

    // Forward-auth for a route, each request with another of 10,000 keys: key lookup,
    // limiter logs, usage entries and identity headers of keys no longer in the core's cache.
    let check = |bearer: &str| {
        Request::get("/v1/auth")
            .header(header::AUTHORIZATION, bearer)
            .header("x-forwarded-uri", "/echo/hello")
            .body(Body::empty())
            .unwrap_or_else(|e| unreachable!("{e}"))
    };
    for bearer in &s.bearers {
        // Every key cached and its identity signed before the timing starts (identities stay
        // fresh for 30 s, longer than this benchmark's two measurements take).
        let answer = rt.block_on(s.front.handle(&client, check(bearer)));
        assert_eq!(answer.status(), 200);
    }
    c.bench_function("in-process forward-auth, one key", |b| {
        b.iter(|| black_box(rt.block_on(s.front.handle(&client, check(&s.bearers[0])))))
    });
    let mut i = 0usize;
    c.bench_function("in-process forward-auth, 10k keys", |b| {
        b.iter(|| {
            // A stride that visits every key, in an order no prefetcher follows.
            i = (i + 7_919) % s.bearers.len();
            black_box(rt.block_on(s.front.handle(&client, check(&s.bearers[i]))))
        })
    });
    let answer = rt.block_on(s.front.handle(&client, check(&s.bearers[i])));
    assert_eq!(answer.status(), 200, "every measured check was admitted");

    let tokens = s.state.tokens.clone().unwrap_or_else(|| unreachable!());
    let now = s.state.clock.now();
    assert!(tokens.verify_access(&s.token, now).is_ok());
    c.bench_function(
        "access token (EdDSA) verification, signature checked",
        |b| b.iter(|| black_box(tokens.verify_access_signature(black_box(&s.token), now))),
    );
    c.bench_function("access token verification, token seen before", |b| {
        b.iter(|| black_box(tokens.verify_access(black_box(&s.token), now)))
    });
}

criterion_group!(benches, requests);
criterion_main!(benches);
