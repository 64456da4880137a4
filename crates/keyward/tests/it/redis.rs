//! The redis rate-limit backend: one exact limit across nodes, and every
//! `on_backend_error` mode while Redis is down, with recovery once it is back.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use keyward_core::Timestamp;
use keyward_core::ids::{KeyId, OrgId};
use keyward_core::key::{Refill, RefillInterval};
use keyward_core::ratelimit::Limit;
use keyward_server::limits::{CreditPlan, LimitBackend, LimitPlan, Policy};
use keyward_server::redis_limits::RedisBackend;
use reqwest::Method;
use serde_json::json;

use crate::harness::{TestServer, metric};

/// A real redis-server on a free loopback port, without persistence.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub async fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

const ROUTES: &str = r#"
[[routes]]
name = "echo"
path = "/echo/"
upstream = "builtin:echo"
scopes = ["inference"]
"#;

fn config(redis: &RedisServer, mode: &str) -> String {
    format!(
        "[ratelimit]\nbackend = \"redis\"\nurl = \"{}\"\non_backend_error = \"{mode}\"\n[ratelimit.tiers.free]\nper_minute = 100000\nper_hour = 100000\n{ROUTES}",
        redis.url()
    )
}

/// A redis-server and a keyward node on it that answers 503 while Redis is unreachable.
async fn node_denying_on_outage() -> (RedisServer, TestServer) {
    let redis = RedisServer::start().await;
    let node = TestServer::start_with_config(&config(&redis, "deny"), &[]).await;
    (redis, node)
}

async fn hammer(base: String, key: String, n: usize) -> Vec<u16> {
    let client = reqwest::Client::new();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            client
                .get(format!("{base}/echo/x"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_exact_limit() {
    let (_redis, a) = node_denying_on_outage().await;
    // The second node: same store file, same Redis, its own process.
    let b = TestServer::start_in(a.dir.clone(), &[]).await;
    let (_, key) = a
        .create_key(json!({"quota_requests": 40, "quota_window": 60}))
        .await;

    let mut tasks = vec![];
    for i in 0..16 {
        let base = if i % 2 == 0 {
            a.base.clone()
        } else {
            b.base.clone()
        };
        tasks.push(tokio::spawn(hammer(base, key.clone(), 10)));
    }
    let mut statuses = vec![];
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        40,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 120);
    // Both nodes see the same, exhausted window.
    for node in [&a, &b] {
        let r = node.call(Method::GET, "/echo/x", Some(&key), None).await;
        r.assert_error(429, "rate_limit_exceeded");
        assert_eq!(r.header("x-ratelimit-limit"), Some("40"));
    }
    // Concurrent requests shared script runs.
    let (mut runs, mut decisions) = (0.0, 0.0);
    for node in [&a, &b] {
        let metrics = node.metrics().await;
        runs += metric(&metrics, "keyward_ratelimit_redis_runs_total");
        decisions += metric(&metrics, "keyward_ratelimit_redis_decisions_total");
    }
    assert_eq!(decisions, 162.0);
    assert!(runs < decisions, "{runs} runs for {decisions} decisions");
}

/// A key's quota of 4 a minute and its organisation's 9 a minute.
fn plan<'a>(org_id: &'a OrgId, key_id: &'a KeyId, cost: u64) -> LimitPlan<'a> {
    LimitPlan {
        key_id: Some(key_id),
        org_id,
        limits: vec![
            (
                Policy::Key,
                Limit {
                    limit: 4,
                    window_ms: 60_000,
                },
            ),
            (
                Policy::OrgMinute,
                Limit {
                    limit: 9,
                    window_ms: 60_000,
                },
            ),
        ]
        .into(),
        cost,
        credits: None,
    }
}

/// Decisions that queue while a script run is on its way go together in the next run, and
/// are decided one after the other: exactly what separate runs would have answered.
#[tokio::test(flavor = "current_thread")]
async fn queued_decisions_go_in_one_run_in_order() {
    let redis = RedisServer::start().await;
    let backend = RedisBackend::new(&redis.url()).unwrap();
    let (org, key, other) = (OrgId::generate(), KeyId::generate(), KeyId::generate());
    let now = Timestamp::from_millis(0);
    // Connects and loads the script, so that the batch below is one EVALSHA.
    let first = backend.decide(&plan(&org, &key, 1), now).await.unwrap();
    assert_eq!(first.refused, None);
    redis.cli(&["config", "resetstat"]);

    // Seven for the key (three left), then three for another key of the same organisation
    // (the organisation has 8 left).
    let plans: Vec<_> = (0..7)
        .map(|_| plan(&org, &key, 1))
        .chain((0..3).map(|_| plan(&org, &other, 3)))
        .collect();
    let reports = join_all(plans.iter().map(|p| backend.decide(p, now))).await;
    let stats = redis.cli(&["info", "commandstats"]);
    assert!(stats.contains("cmdstat_evalsha:calls=1,"), "{stats}");

    let outcome: Vec<_> = reports
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            if r.refused.is_some() {
                // Until the first units leave the minute (3 s slots).
                let retry = r
                    .verdicts
                    .iter()
                    .filter_map(|(_, v)| v.retry_after_ms)
                    .max();
                assert!(matches!(retry, Some(57_000..=63_000)), "{retry:?}");
            }
            (
                r.refused.is_none(),
                r.verdicts[0].1.remaining,
                r.verdicts[1].1.remaining,
            )
        })
        .collect();
    assert_eq!(
        outcome,
        [
            (true, 2, 7),
            (true, 1, 6),
            (true, 0, 5),
            (false, 0, 5),
            (false, 0, 5),
            (false, 0, 5),
            (false, 0, 5),
            // The other key: 3 units each, while the organisation has 5 left, then 2.
            (true, 1, 2),
            (false, 1, 2),
            (false, 1, 2),
        ]
    );
}

/// Credits in Redis only move forward: a node whose cached key is older (a smaller version),
/// or whose clock is still in the previous refill period, neither resets nor refills them.
/// Large counts are stored exactly (Lua would write a number over 14 digits as `1e+15`).
#[tokio::test(flavor = "current_thread")]
async fn credits_move_only_forward_and_stay_exact() {
    let redis = RedisServer::start().await;
    let backend = RedisBackend::new(&redis.url()).unwrap();
    let (org, key) = (OrgId::generate(), KeyId::generate());
    let spend = |stored_remaining, version, at_secs: i64| {
        let backend = &backend;
        let (org, key) = (&org, &key);
        async move {
            let plan = LimitPlan {
                key_id: Some(key),
                org_id: org,
                limits: Default::default(),
                cost: 1,
                credits: Some(CreditPlan {
                    stored_remaining,
                    version,
                    refill: Some(Refill {
                        interval: RefillInterval::Seconds(10),
                        amount: 5,
                    }),
                }),
            };
            let report = backend
                .decide(&plan, Timestamp::from_millis(at_secs * 1000))
                .await
                .unwrap();
            report.credits_remaining.unwrap()
        }
    };
    // Version 1 at period 10, then period 11 refills, then a clock back in period 10 does not.
    assert_eq!(spend(5, 1, 100).await, 4);
    assert_eq!(spend(5, 1, 110).await, 4);
    assert_eq!(spend(5, 1, 105).await, 3);
    // A node that still caches version 0 does not reset them; version 2 does.
    assert_eq!(spend(100, 0, 110).await, 2);
    assert_eq!(spend(50, 2, 110).await, 49);
    // The largest count the API accepts, exactly.
    assert_eq!(
        spend(1_000_000_000_000_000, 3, 110).await,
        999_999_999_999_999
    );
    assert_eq!(
        spend(1_000_000_000_000_000, 3, 110).await,
        999_999_999_999_998
    );
}

/// A key's window made longer while its current slot holds units: the hash must live as long
/// as that slot counts under the longer window, also when the slot keeps its name (2 s
/// windows' 100 ms slots and 4 s windows' 200 ms slots share every other name).
#[tokio::test(flavor = "current_thread")]
async fn a_longer_window_extends_the_life_of_its_slots() {
    let redis = RedisServer::start().await;
    let backend = RedisBackend::new(&redis.url()).unwrap();
    let org = OrgId::generate();
    for _ in 0..40 {
        let key = KeyId::generate();
        for window_ms in [2_000, 4_000] {
            let plan = LimitPlan {
                key_id: Some(&key),
                org_id: &org,
                limits: vec![(
                    Policy::Key,
                    Limit {
                        limit: 10,
                        window_ms,
                    },
                )]
                .into(),
                cost: 1,
                credits: None,
            };
            let report = backend.decide(&plan, Timestamp::from_millis(0)).await;
            assert_eq!(report.unwrap().refused, None);
        }
        let (_, window) = redis.key_window(&key.to_string());
        window.assert_consistent(4_000);
        if window.slots.len() == 1 {
            // Both units in one slot: the case that matters has been checked.
            return;
        }
        // Into another 100 ms slot, which may share its name with a 200 ms one.
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    panic!("a 100 ms slot and a 200 ms slot never shared a name in 40 tries");
}

/// The headers on the Redis backend say what they say on the memory backend: the binding
/// limit's size, what is left, when it frees up, and Retry-After once refused. Redis counts
/// in slots of window / 20 (3 s here), so the waits may be up to one slot longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_headers_report_the_binding_limit() {
    let (_redis, s) = node_denying_on_outage().await;
    let (_, key) = s
        .create_key(json!({"quota_requests": 3, "quota_window": 60}))
        .await;
    let secs =
        |r: &crate::harness::Reply, name: &str| -> u64 { r.header(name).unwrap().parse().unwrap() };
    for left in [2, 1, 0] {
        let r = s.call(Method::GET, "/echo/x", Some(&key), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        // The key's quota binds (the tier allows 100,000).
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(secs(&r, "x-ratelimit-remaining"), left);
        let reset = secs(&r, "x-ratelimit-reset");
        assert!((58..=63).contains(&reset), "reset {reset}");
    }
    let r = s.call(Method::GET, "/echo/x", Some(&key), None).await;
    r.assert_error(429, "rate_limit_exceeded");
    assert_eq!(secs(&r, "x-ratelimit-remaining"), 0);
    let retry = secs(&r, "retry-after");
    assert!((58..=63).contains(&retry), "retry-after {retry}");
    assert_eq!(secs(&r, "x-ratelimit-reset"), retry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_are_shared_across_nodes() {
    let (_redis, a) = node_denying_on_outage().await;
    let b = TestServer::start_in(a.dir.clone(), &[]).await;
    let (_, key) = a
        .create_key(json!({"remaining": 15, "quota_requests": 1000}))
        .await;
    let mut tasks = vec![];
    for i in 0..8 {
        let base = if i % 2 == 0 {
            a.base.clone()
        } else {
            b.base.clone()
        };
        tasks.push(tokio::spawn(hammer(base, key.clone(), 5)));
    }
    let mut statuses = vec![];
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        15,
        "{statuses:?}"
    );
    b.call(Method::GET, "/echo/x", Some(&key), None)
        .await
        .assert_error(429, "usage_exhausted");
}

impl RedisServer {
    /// `redis-cli` against this server (Debian's redis-server package brings it).
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli must be installed with redis-server");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    }
}

/// One window as Redis holds it: its slots (named by their last millisecond, with their
/// units), the running total `n`, the oldest slot `lo`, the length `w` its expiry was set
/// for, and how long the hash still lives.
struct Window {
    slots: Vec<(u64, u64)>,
    total: Option<u64>,
    oldest: Option<u64>,
    ttl_ms: i64,
    now_ms: u64,
    /// The window length the hash's expiry was last set for.
    length_ms: Option<u64>,
}

impl RedisServer {
    /// The window of the key `key_id` (whatever its organisation).
    fn key_window(&self, key_id: &str) -> (String, Window) {
        let name = self.cli(&["--scan", "--pattern", &format!("kw:*:window:key:{key_id}")]);
        let name = name.trim().to_owned();
        assert!(!name.is_empty(), "no window for {key_id}");
        let window = self.window(&name);
        (name, window)
    }

    fn window(&self, name: &str) -> Window {
        let fields: Vec<String> = self
            .cli(&["hgetall", name])
            .lines()
            .map(str::to_owned)
            .collect();
        let mut window = Window {
            slots: vec![],
            total: None,
            oldest: None,
            ttl_ms: self.cli(&["pttl", name]).trim().parse().unwrap(),
            now_ms: 0,
            length_ms: None,
        };
        for pair in fields.chunks_exact(2) {
            let value: u64 = pair[1].parse().unwrap();
            match pair[0].as_str() {
                "n" => window.total = Some(value),
                "lo" => window.oldest = Some(value),
                "w" => window.length_ms = Some(value),
                slot => window.slots.push((slot.parse().unwrap(), value)),
            }
        }
        let time: Vec<u64> = self
            .cli(&["time"])
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        window.now_ms = time[0] * 1000 + time[1] / 1000;
        window
    }
}

impl Window {
    /// What the script relies on: the total is the sum of the slots, `lo` the oldest of them,
    /// `w` the window's length, and the hash lives at least as long as its newest slot counts.
    fn assert_consistent(&self, window_ms: u64) {
        let sum: u64 = self.slots.iter().map(|(_, units)| units).sum();
        assert_eq!(self.total, Some(sum), "total of {:?}", self.slots);
        let oldest = self.slots.iter().map(|(end, _)| *end).min();
        assert_eq!(self.oldest, oldest, "oldest of {:?}", self.slots);
        assert_eq!(self.length_ms, Some(window_ms));
        let newest = self.slots.iter().map(|(end, _)| *end).max().unwrap();
        let counts_for = (newest + window_ms) as i64 - self.now_ms as i64;
        // The TTL is read a moment before Redis' clock.
        assert!(
            self.ttl_ms + 50 >= counts_for,
            "the hash expires in {} ms, its newest slot counts for {counts_for} ms",
            self.ttl_ms
        );
    }
}

/// Redis keeps at most ~21 counters per window whatever the traffic (a slot per window / 20),
/// and a window frees up again as its slots leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_windows_stay_bounded_and_slide() {
    let (redis, s) = node_denying_on_outage().await;
    // A 2 s window: 100 ms slots.
    let (busy_id, busy) = s
        .create_key(json!({"quota_requests": 1000, "quota_window": 2}))
        .await;
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_millis(3_000) {
        let r = s.call(Method::GET, "/echo/x", Some(&busy), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, window) = redis.key_window(&busy_id);
    assert!(
        (15..=21).contains(&window.slots.len()),
        "{} slots after {sent} requests in 3 s",
        window.slots.len()
    );
    window.assert_consistent(2_000);
    let counted = window.total.unwrap();
    assert!(
        counted < sent,
        "only the last 2 s stay counted: {counted} of {sent}"
    );
    // What the headers say is what the window holds.
    let r = s.call(Method::GET, "/echo/x", Some(&busy), None).await;
    let remaining: u64 = r.header("x-ratelimit-remaining").unwrap().parse().unwrap();
    let (_, window) = redis.key_window(&busy_id);
    assert_eq!(remaining, 1000 - window.total.unwrap());

    let (_, key) = s
        .create_key(json!({"quota_requests": 3, "quota_window": 2}))
        .await;
    for _ in 0..3 {
        admitted(&s, &key).await;
    }
    let retry = refused(&s, &key).await;
    assert!((1..=3).contains(&retry), "retry-after {retry}");
    tokio::time::sleep(Duration::from_secs(retry)).await;
    admitted(&s, &key).await;

    // Units spent in different slots: a refusal waits for the *oldest* to leave (~2 s here),
    // not for the newest (~4 s).
    let (_, spread) = s
        .create_key(json!({"quota_requests": 2, "quota_window": 4}))
        .await;
    admitted(&s, &spread).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    admitted(&s, &spread).await;
    let retry = refused(&s, &spread).await;
    assert!((2..=3).contains(&retry), "retry-after {retry}");
}

/// A key's window may change length (so its slot length) while it holds units: they stay
/// counted under the new length, the window stays consistent, and it does not expire early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_quota_window_keeps_its_units() {
    let (redis, s) = node_denying_on_outage().await;
    // An hour: slots of 3 min, whose last millisecond lies minutes ahead.
    let (id, key) = s
        .create_key(json!({"quota_requests": 3, "quota_window": 3600}))
        .await;
    admitted(&s, &key).await;
    admitted(&s, &key).await;
    redis.key_window(&id).1.assert_consistent(3_600_000);

    // Ten seconds: slots of 500 ms. The new slot is older than the hour's slot.
    let r = s
        .admin(
            Method::PATCH,
            &format!("/v1/keys/{id}"),
            Some(json!({"quota_window": 10})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, before) = redis.key_window(&id);
    admitted(&s, &key).await;
    let (_, after) = redis.key_window(&id);
    assert_eq!(after.slots.len(), before.slots.len() + 1);
    after.assert_consistent(10_000);

    // The three units count until the hour's slot end + 10 s, minutes from now.
    let retry = refused(&s, &key).await;
    assert!(retry >= 10, "retry-after {retry}");
}

async fn admitted(s: &TestServer, key: &str) {
    let r = s.call(Method::GET, "/echo/x", Some(key), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// Asserts a 429 for `key` and returns its `Retry-After`.
async fn refused(s: &TestServer, key: &str) -> u64 {
    let r = s.call(Method::GET, "/echo/x", Some(key), None).await;
    r.assert_error(429, "rate_limit_exceeded");
    r.retry_after()
}

async fn backend_errors(s: &TestServer) -> f64 {
    metric(&s.metrics().await, "keyward_ratelimit_backend_errors_total")
}

/// Polls until a request is answered with `status` (the backend's back-off is 1 s).
async fn until_status(s: &TestServer, key: &str, status: u16) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = s
            .call(Method::GET, "/echo/x", Some(key), None)
            .await
            .status
            .as_u16();
        if got == status || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn redis_outage_in_each_mode_and_recovery() {
    for mode in ["local", "allow", "deny"] {
        let mut redis = RedisServer::start().await;
        let s = TestServer::start_with_config(&config(&redis, mode), &[]).await;
        let (_, key) = s
            .create_key(json!({"quota_requests": 3, "quota_window": 60}))
            .await;
        assert_eq!(
            s.call(Method::GET, "/echo/x", Some(&key), None)
                .await
                .status,
            200,
            "{mode}"
        );

        redis.stop();
        let statuses: Vec<u16> = {
            let mut v = vec![];
            for _ in 0..6 {
                v.push(
                    s.call(Method::GET, "/echo/x", Some(&key), None)
                        .await
                        .status
                        .as_u16(),
                );
            }
            v
        };
        match mode {
            // Per-node limits take over: this node's own count starts from zero.
            "local" => assert_eq!(statuses, [200, 200, 200, 429, 429, 429], "{mode}"),
            "allow" => assert_eq!(statuses, [200; 6], "{mode}"),
            _ => {
                assert_eq!(statuses, [503; 6], "{mode}");
                s.call(Method::GET, "/echo/x", Some(&key), None)
                    .await
                    .assert_error(503, "limiter_unavailable");
            }
        }
        assert!(
            backend_errors(&s).await >= 6.0,
            "{mode}: errors are counted in /metrics"
        );
        assert!(
            s.wait_for_stdout("rate-limit backend failed").await,
            "{mode}: errors are logged"
        );

        // Back up: the node returns to Redis by itself (a fresh Redis: a fresh window).
        redis.restart().await;
        assert_eq!(
            until_status(&s, &key, 200).await,
            200,
            "{mode}: no recovery"
        );
        let shared = s.call(Method::GET, "/echo/x", Some(&key), None).await;
        assert!(
            shared.status == 200 || shared.status == 429,
            "{mode}: {}",
            shared.text
        );
    }
}
