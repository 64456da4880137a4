//! Rate limits, tier limits and credits over HTTP (memory backend).

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{TestServer, into_the_next_period, well_inside_a_period};

const ROUTES: &str = r#"
[[routes]]
name = "echo"
path = "/echo/"
upstream = "builtin:echo"
scopes = ["inference"]

[[routes]]
name = "pricey"
path = "/pricey/"
upstream = "builtin:echo"
scopes = ["inference"]
cost = 5
"#;

async fn server(extra: &str) -> TestServer {
    TestServer::start_with_config(&format!("{extra}\n{ROUTES}"), &[]).await
}

/// Fires `n` requests from `concurrency` clients at once; returns the statuses.
async fn burst(s: &TestServer, key: &str, path: &str, n: usize, concurrency: usize) -> Vec<u16> {
    let url = format!("{}{path}", s.base);
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let client = reqwest::Client::new();
        let url = url.clone();
        let key = key.to_owned();
        let share = n / concurrency + usize::from(worker < n % concurrency);
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::with_capacity(share);
            for _ in 0..share {
                let r = client.get(&url).bearer_auth(&key).send().await.unwrap();
                statuses.push(r.status().as_u16());
            }
            statuses
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_on_one_key_get_exactly_the_quota() {
    let s = server("[ratelimit.tiers.free]\nper_minute = 100000\nper_hour = 100000\n").await;
    let (_, key) = s
        .create_key(json!({"quota_requests": 50, "quota_window": 60}))
        .await;
    let statuses = burst(&s, &key, "/echo/x", 200, 32).await;
    assert_eq!(count(&statuses, 200), 50, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 150);
}

#[tokio::test]
async fn headers_and_a_truthful_retry_after() {
    let s = server("[ratelimit]\ndraft_headers = true\n").await;
    let (_, key) = s
        .create_key(json!({"quota_requests": 2, "quota_window": 2}))
        .await;
    let first = s.call(Method::GET, "/echo/a", Some(&key), None).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining"), Some("1"));
    assert_eq!(first.header("x-ratelimit-reset"), Some("2"));
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"key\";q=2;w=2, \"org-minute\";q=60;w=60, \"org-hour\";q=1000;w=3600")
    );
    assert_eq!(first.header("ratelimit"), Some("\"key\";r=1;t=2"));
    assert_eq!(
        s.call(Method::GET, "/echo/a", Some(&key), None)
            .await
            .status,
        200
    );

    let refused = s.call(Method::GET, "/echo/a", Some(&key), None).await;
    refused.assert_error(429, "rate_limit_exceeded");
    assert_eq!(refused.body["error"]["type"], "rate_limit_error");
    assert_eq!(refused.body["error"]["retryable"], true);
    let retry = refused.retry_after();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(refused.body["retry_after"], retry);
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        refused.header("x-ratelimit-reset"),
        Some(retry.to_string().as_str())
    );

    // Waiting exactly Retry-After is enough.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(
        s.call(Method::GET, "/echo/a", Some(&key), None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn the_tightest_limit_decides_and_a_refusal_charges_nothing() {
    // Tier: 3 per minute for the whole organisation.
    let s = server("[ratelimit.tiers.free]\nper_minute = 3\nper_hour = 1000\n").await;
    let (_, a) = s.create_key(json!({"quota_requests": 2})).await;
    let (_, b) = s.create_key(json!({"quota_requests": 100})).await;
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&a), None).await.status,
        200
    );
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&a), None).await.status,
        200
    );
    // Refused by a's own quota: the organisation's count must not move.
    let refused = s.call(Method::GET, "/echo/x", Some(&a), None).await;
    refused.assert_error(429, "rate_limit_exceeded");
    assert_eq!(refused.header("x-ratelimit-limit"), Some("2"));
    let ok = s.call(Method::GET, "/echo/x", Some(&b), None).await;
    assert_eq!(ok.status, 200);
    // b's own quota is loose; the organisation's minute limit is what binds.
    assert_eq!(ok.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(ok.header("x-ratelimit-remaining"), Some("0"));
    let org_refused = s.call(Method::GET, "/echo/x", Some(&b), None).await;
    org_refused.assert_error(429, "rate_limit_exceeded");
    assert_eq!(org_refused.header("x-ratelimit-limit"), Some("3"));
    let retry = org_refused.retry_after();
    assert!((55..=60).contains(&retry), "{retry}");
}

#[tokio::test]
async fn route_cost_is_what_a_request_consumes() {
    let s = server("").await;
    let (_, key) = s.create_key(json!({"quota_requests": 12})).await;
    assert_eq!(
        s.call(Method::GET, "/pricey/x", Some(&key), None)
            .await
            .status,
        200
    );
    let second = s.call(Method::GET, "/pricey/x", Some(&key), None).await;
    assert_eq!(second.header("x-ratelimit-remaining"), Some("2"));
    s.call(Method::GET, "/pricey/x", Some(&key), None)
        .await
        .assert_error(429, "rate_limit_exceeded");
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&key), None)
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_are_never_negative_nor_double_spent() {
    let mut s = server("[usage]\nflush_seconds = 3600\n[ratelimit.tiers.free]\nper_minute = 100000\nper_hour = 100000\n").await;
    let (id, key) = s
        .create_key(json!({"remaining": 20, "quota_requests": 1000}))
        .await;
    let statuses = burst(&s, &key, "/echo/x", 60, 16).await;
    assert_eq!(count(&statuses, 200), 20, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 40);

    let exhausted = s.call(Method::GET, "/echo/x", Some(&key), None).await;
    exhausted.assert_error(429, "usage_exhausted");
    assert_eq!(exhausted.body["error"]["retryable"], false);
    assert!(exhausted.header("retry-after").is_none());
    // The refused requests consumed no quota.
    assert_eq!(exhausted.header("x-ratelimit-remaining"), Some("980"));

    // Set new credits: the live count starts over from them.
    let patched = s
        .admin(
            Method::PATCH,
            &format!("/v1/keys/{id}"),
            Some(json!({"remaining": 2})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&key), None)
            .await
            .status,
        200
    );
    let verify = s
        .call(Method::POST, "/v1/verify", None, Some(json!({"key": key})))
        .await;
    assert_eq!(verify.body["valid"], true);
    assert_eq!(verify.body["remaining"], 0);
    s.call(Method::GET, "/echo/x", Some(&key), None)
        .await
        .assert_error(429, "usage_exhausted");

    // The live count is written back at shutdown.
    assert!(s.stop().await.success());
    let dir = s.dir.clone();
    drop(s);
    let (st, out, err) =
        crate::harness::cli(dir.path(), &["keys", "show", &id, "--json"], None, &[]);
    assert!(st.success(), "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["remaining"], 0);
}

#[tokio::test]
async fn credits_refill_each_period() {
    let s = server("").await;
    // Refill periods are 2 s of the wall clock: creation and the first requests share one.
    let period = Duration::from_secs(2);
    well_inside_a_period(period, Duration::from_millis(1_200)).await;
    let (_, key) = s
        .create_key(json!({"remaining": 1, "refill": {"interval": 2, "amount": 2}}))
        .await;
    let mut allowed = 0;
    for _ in 0..3 {
        if s.call(Method::GET, "/echo/x", Some(&key), None)
            .await
            .status
            == 200
        {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 1, "the credit it was created with");
    into_the_next_period(period).await;
    let mut after = 0;
    for _ in 0..3 {
        if s.call(Method::GET, "/echo/x", Some(&key), None)
            .await
            .status
            == 200
        {
            after += 1;
        }
    }
    assert_eq!(after, 2, "a refill sets the credits to its amount");
}

#[tokio::test]
async fn forward_auth_and_verify_report_limits() {
    let s = server("").await;
    let (_, key) = s.create_key(json!({"quota_requests": 1})).await;
    let r = s
        .client
        .get(format!("{}/v1/auth", s.base))
        .header("X-Forwarded-Uri", "/echo/x")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let r = s
        .call(Method::POST, "/v1/verify", None, Some(json!({"key": key})))
        .await;
    assert_eq!(r.body["valid"], false);
    assert_eq!(r.body["code"], "rate_limit_exceeded");
    assert_eq!(r.body["ratelimit"]["limit"], 1);
    assert_eq!(r.body["ratelimit"]["remaining"], 0);
    assert!(r.body["retry_after"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn credits_and_tier_set_from_the_cli_reach_a_running_server() {
    let s = server("[ratelimit.tiers.free]\nper_minute = 2\nper_hour = 1000\n[ratelimit.tiers.pro]\nper_minute = 5\nper_hour = 1000\n").await;
    let d = s.dir.path();
    let (id, key) = s.create_key(json!({"quota_requests": 100})).await;
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&key), None)
            .await
            .status,
        200
    );
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&key), None)
            .await
            .status,
        200
    );
    s.call(Method::GET, "/echo/x", Some(&key), None)
        .await
        .assert_error(429, "rate_limit_exceeded");

    let (st, out, err) = crate::harness::cli(d, &["orgs", "set-tier", "pro", "--json"], None, &[]);
    assert!(st.success(), "{err}");
    assert!(out.contains("\"tier\": \"pro\""), "{out}");
    let r = s.eventually(200, Method::GET, "/echo/x", &key).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    let (st, _, err) = crate::harness::cli(d, &["orgs", "set-tier", "platinum"], None, &[]);
    assert!(!st.success());
    assert!(err.contains("configured tier"), "{err}");

    // Credits from the CLI: set, then exhausted, then lifted.
    let (st, out, err) = crate::harness::cli(
        d,
        &["keys", "update", &id, "--remaining", "1", "--json"],
        None,
        &[],
    );
    assert!(st.success(), "{err}");
    assert!(out.contains("\"remaining\": 1"), "{out}");
    // The change feed (read every 0.5 s) drops the cached key; a loaded machine may be slow.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let mut statuses = vec![];
    for _ in 0..2 {
        statuses.push(
            s.call(Method::GET, "/echo/x", Some(&key), None)
                .await
                .code()
                .to_owned(),
        );
    }
    assert_eq!(statuses, ["", "usage_exhausted"]);
    let (st, _, err) = crate::harness::cli(
        d,
        &["keys", "update", &id, "--remaining", "none"],
        None,
        &[],
    );
    assert!(st.success(), "{err}");
    assert_eq!(
        s.eventually(200, Method::GET, "/echo/x", &key).await.status,
        200
    );
    let (st, out, err) = crate::harness::cli(
        d,
        &[
            "keys",
            "update",
            &id,
            "--remaining",
            "10",
            "--refill-interval",
            "daily",
            "--refill-amount",
            "10",
            "--json",
        ],
        None,
        &[],
    );
    assert!(st.success(), "{err}");
    assert!(out.contains("\"interval\": \"daily\""), "{out}");
    let (st, _, err) = crate::harness::cli(
        d,
        &["keys", "update", &id, "--refill-amount", "3"],
        None,
        &[],
    );
    assert!(!st.success() && err.contains("--refill-interval"), "{err}");
}
