//! The data plane against a real upstream: decision order, header hygiene, path tricks,
//! streaming, upstream failures, forward-auth, verify, usage, CORS, metrics.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestServer, metric, raw_http, well_inside_a_minute};
use crate::upstream;

fn config(port: u16, extra: &str) -> String {
    let up = format!("http://127.0.0.1:{port}/api");
    format!(
        r#"
{extra}
[[routes]]
name = "chat"
path = "/v1/chat/"
upstream = "{up}"
scopes = ["inference"]

[[routes]]
name = "public"
path = "/public/"
upstream = "{up}"
scopes = ["inference"]
strip_prefix = true

[[routes]]
name = "admin"
path = "/admin/"
upstream = "{up}"
scopes = ["research"]

[[routes]]
name = "stream"
path = "/stream/"
upstream = "{up}"
scopes = ["inference"]
strip_prefix = true

[[routes]]
name = "slow"
path = "/slow/"
upstream = "{up}"
scopes = ["inference"]
strip_prefix = true
timeout = 1

[[routes]]
name = "down"
path = "/down/"
upstream = "http://127.0.0.1:1"
scopes = ["inference"]

[[routes]]
name = "echo"
path = "/echo/"
upstream = "builtin:echo"
scopes = ["inference"]
strip_prefix = true
"#
    )
}

async fn gateway(extra: &str) -> (TestServer, upstream::Upstream) {
    let (addr, up) = upstream::start().await;
    let s = TestServer::start_with_config(&config(addr.port(), extra), &[]).await;
    (s, up)
}

#[tokio::test]
async fn every_decision_of_the_proxy_path() {
    let (s, up) = gateway("").await;
    let get = |path: &'static str, key: Option<String>| {
        let s = &s;
        async move { s.call(Method::GET, path, key.as_deref(), None).await }
    };

    get("/v1/chat/x", None)
        .await
        .assert_error(401, "missing_credentials");
    get("/v1/chat/x", Some("garbage".into()))
        .await
        .assert_error(401, "invalid_api_key");
    get("/nowhere", None)
        .await
        .assert_error(404, "route_not_found");

    let (_, inference) = s.create_key(json!({"scopes": ["inference"]})).await;
    let (_, research) = s.create_key(json!({"scopes": ["research"]})).await;
    let (_, chat_only) = s
        .create_key(json!({"scopes": ["inference"], "endpoint": "chat"}))
        .await;
    let (_, elsewhere) = s
        .create_key(json!({"scopes": ["inference"], "allowed_ips": ["10.0.0.0/8"]}))
        .await;
    let (revoked_id, revoked) = s.create_key(json!({"scopes": ["inference"]})).await;
    s.admin(Method::DELETE, &format!("/v1/keys/{revoked_id}"), None)
        .await;
    let (rotated_id, old) = s.create_key(json!({"scopes": ["inference"]})).await;
    s.admin(
        Method::POST,
        &format!("/v1/keys/{rotated_id}/rotate"),
        Some(json!({"grace_seconds": 0})),
    )
    .await;
    let (unknown_elsewhere, _) = {
        let other = TestServer::start().await;
        other.create_key(json!({"scopes": ["inference"]})).await
    };
    let _ = unknown_elsewhere;

    get("/v1/chat/x", Some(revoked))
        .await
        .assert_error(401, "key_revoked");
    get("/v1/chat/x", Some(old))
        .await
        .assert_error(401, "key_expired");
    get("/v1/chat/x", Some(elsewhere))
        .await
        .assert_error(403, "ip_not_allowed");
    get("/public/x", Some(chat_only.clone()))
        .await
        .assert_error(403, "endpoint_not_allowed");
    let scope = get("/admin/x", Some(inference.clone())).await;
    scope.assert_error(403, "insufficient_scope");
    assert_eq!(scope.body["error"]["type"], "authentication_error");
    assert_eq!(get("/v1/chat/x", Some(chat_only)).await.status, 200);
    assert_eq!(get("/admin/x", Some(research)).await.status, 200);

    // Allowed: the upstream sees the normalised path, no credential, keyward's identity.
    let url = format!("{}/v1/chat/completions?stream=true&a=%2F", s.base);
    let r = s
        .client
        .post(&url)
        .bearer_auth(&inference)
        .header("x-api-key", &inference)
        .header("X-Keyward-Org-Id", "org_spoofed")
        .header("X-Keyward-Scopes", "management research")
        .header("x-keyward-anything", "1")
        .header("Connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("X-Forwarded-For", "10.9.9.9")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["path"], "/api/v1/chat/completions");
    assert_eq!(seen["query"], "stream=true&a=%2F");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body_len"], 5);
    let h = &seen["headers"];
    assert!(
        h.get("authorization").is_none(),
        "credential reached upstream: {h}"
    );
    assert!(
        h.get("x-api-key").is_none(),
        "credential reached upstream: {h}"
    );
    assert!(h.get("x-keyward-anything").is_none());
    assert!(h.get("x-drop-me").is_none(), "hop-by-hop header forwarded");
    let org = s.admin(Method::GET, "/v1/org", None).await.body["id"].clone();
    assert_eq!(h["x-keyward-org-id"], org);
    assert_eq!(h["x-keyward-scopes"], "inference");
    assert!(h["x-keyward-key-id"].as_str().unwrap().starts_with("key_"));
    // From an untrusted peer, a client-sent chain is replaced by the peer's address.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    // The upstream and the client see the same request id.
    assert!(request_id.starts_with("req_"));
    assert_eq!(h["x-request-id"], request_id.as_str());

    for seen in up.seen.lock().unwrap().iter() {
        let text = seen.to_string();
        assert!(
            !text.contains(&inference[8..]),
            "the upstream saw a credential"
        );
    }
    let logs = s.stdout() + &s.stderr();
    assert!(logs.contains("request"));
    assert!(!logs.contains(&inference[8..]), "a secret was logged");
}

#[tokio::test]
async fn credential_header_names_are_configurable() {
    let (s, _up) = gateway("[auth]\nbearer = false\nkey_headers = [\"X-Custom-Key\"]\n").await;
    // The settings apply to keyward's own API too.
    let created = s
        .client
        .post(format!("{}/v1/keys", s.base))
        .header("x-custom-key", &s.mgmt_key)
        .json(&json!({"scopes": ["inference"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let key = created.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("{}/v1/chat/x", s.base);
    let bearer = s.client.get(&url).bearer_auth(&key).send().await.unwrap();
    TestServer::read(bearer)
        .await
        .assert_error(401, "missing_credentials");
    let custom = s
        .client
        .get(&url)
        .header("x-custom-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(custom.status(), 200);
    let seen: Value = custom.json().await.unwrap();
    assert!(
        seen["headers"].get("x-custom-key").is_none(),
        "the credential reached the upstream"
    );
}

#[tokio::test]
async fn path_tricks_never_reach_a_route_the_scopes_do_not_allow() {
    let (s, up) = gateway("").await;
    let (_, inference) = s.create_key(json!({"scopes": ["inference"]})).await;
    let auth = format!("Bearer {inference}");
    for target in [
        "/public/../admin/secret",
        "/public/%2e%2e/admin/secret",
        "/public/%2E%2E/admin/secret",
        "/public/.%2e/admin/secret",
        "//admin/secret",
        "///admin//secret",
        "/ADMIN/secret",
        "/Admin./secret",
        "/admin./secret",
        "/admin../secret",
        "/%61dmin/secret",
        "/public/./../admin/secret",
        "/public/x/../../admin/secret",
    ] {
        let (status, text) = raw_http(&s.base, target, &[("Authorization", &auth)]).await;
        assert_eq!(status, 403, "{target}: {text}");
        assert!(text.contains("insufficient_scope"), "{target}: {text}");
    }
    for target in [
        "/public/..%2Fadmin/secret",
        "/public/a%2F..%2F..%2Fadmin",
        "/public/a%5c..%5cadmin",
        "/public/%00",
    ] {
        let (status, text) = raw_http(&s.base, target, &[("Authorization", &auth)]).await;
        assert_eq!(status, 400, "{target}: {text}");
    }
    // An encoded slash stays inside its segment.
    let (status, _) = raw_http(&s.base, "/public/a%2Fb", &[("Authorization", &auth)]).await;
    assert_eq!(status, 200);
    let paths: Vec<String> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|v| v["path"].as_str().unwrap().to_owned())
        .collect();
    assert!(paths.iter().all(|p| !p.contains("admin")), "{paths:?}");
}

#[tokio::test]
async fn server_sent_events_stream_through_incrementally() {
    let (s, up) = gateway("").await;
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    let mut resp = s
        .client
        .get(format!("{}/stream/sse", s.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    // The upstream holds its second event until we have the first: a buffering proxy would
    // never deliver it and this would time out.
    let first = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("first event in time")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    up.release.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&second[..], b"data: second\n\n");
    assert!(resp.chunk().await.unwrap().is_none());
}

#[tokio::test]
async fn upstream_failures_are_enveloped_and_upstream_answers_pass_through() {
    let (s, _) = gateway("").await;
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    s.call(Method::GET, "/down/x", Some(&key), None)
        .await
        .assert_error(502, "upstream_unavailable");
    let started = std::time::Instant::now();
    s.call(Method::GET, "/slow/slow", Some(&key), None)
        .await
        .assert_error(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
    // The upstream's own errors are its own: not rewritten into keyward's envelope.
    let r = s
        .call(Method::GET, "/public/status/404", Some(&key), None)
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.text, "upstream says so");
    assert_eq!(r.header("x-upstream"), Some("yes"));
    let r = s
        .call(Method::GET, "/public/status/503", Some(&key), None)
        .await;
    assert_eq!(
        (r.status.as_u16(), r.text.as_str()),
        (503, "upstream says so")
    );
    // Likewise through keyward's own stack, which CORS requests (any `Origin`) take.
    let through_app = |path: &str| {
        s.client
            .get(format!("{}{path}", s.base))
            .bearer_auth(&key)
            .header("origin", "https://app.example.com")
            .send()
    };
    let r = through_app("/public/status/503").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), "upstream says so");
    let r = through_app("/down/x").await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("upstream_unavailable"));
}

/// One client connection gets one upstream connection, and keeps working when that upstream
/// connection closes, times out or fails.
#[tokio::test]
async fn a_client_connection_keeps_its_upstream_connection_and_survives_its_loss() {
    let (s, up) = gateway("").await;
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    // reqwest reuses one keep-alive connection for sequential requests.
    let ok = |path: &'static str| {
        let (s, key) = (&s, &key);
        async move {
            let r = s.call(Method::GET, path, Some(key), None).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text);
            r
        }
    };
    let port_of = |r: &crate::harness::Reply| r.body["peer_port"].as_u64().unwrap();
    let first = port_of(&ok("/public/a").await);
    assert_eq!(port_of(&ok("/public/b").await), first);
    assert_eq!(port_of(&ok("/v1/chat/c").await), first);

    // The upstream closes its side: the next request opens a new upstream connection.
    assert_eq!(ok("/public/close").await.text, "closing");
    let second = port_of(&ok("/public/d").await);
    assert_ne!(second, first);
    assert_eq!(port_of(&ok("/public/e").await), second);

    // A timeout abandons the upstream connection mid-request; the client's next request works.
    s.call(Method::GET, "/slow/slow", Some(&key), None)
        .await
        .assert_error(504, "upstream_timeout");
    let third = port_of(&ok("/public/f").await);
    assert_ne!(third, second);
    // Another upstream (unreachable), then the built-in one, then back: all on one connection.
    s.call(Method::GET, "/down/x", Some(&key), None)
        .await
        .assert_error(502, "upstream_unavailable");
    ok("/echo/g").await;
    ok("/public/h").await;
    let paths: Vec<String> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "/api/a",
            "/api/b",
            "/api/v1/chat/c",
            "/api/d",
            "/api/e",
            "/api/f",
            "/api/h"
        ]
    );
}

#[tokio::test]
async fn builtin_echo_route_shows_what_an_upstream_receives() {
    let s = TestServer::start().await;
    let (_, key) = s.create_key(json!({})).await;
    let r = s
        .call(
            Method::POST,
            "/echo/hello/world?x=1",
            Some(&key),
            Some(json!({"a": 1})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["path"], "/hello/world");
    assert_eq!(r.body["query"], "x=1");
    assert_eq!(r.body["body"], "{\"a\":1}");
    assert!(r.body["headers"].get("authorization").is_none());
    assert_eq!(r.body["headers"]["x-keyward-scopes"], "inference");
}

#[tokio::test]
async fn forward_auth_and_verify() {
    let (s, _) = gateway("").await;
    let (id, inference) = s
        .create_key(json!({"scopes": ["inference"], "meta": {"plan": "pro"}}))
        .await;
    let auth = |uri: &'static str, key: Option<String>| {
        let s = &s;
        async move {
            let mut req = s
                .client
                .get(format!("{}/v1/auth", s.base))
                .header("X-Forwarded-Method", "POST")
                .header("X-Forwarded-Uri", uri);
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            TestServer::read(req.send().await.unwrap()).await
        }
    };
    let ok = auth("/v1/chat/completions?x=1", Some(inference.clone())).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.header("x-keyward-key-id"), Some(id.as_str()));
    assert_eq!(ok.header("x-keyward-scopes"), Some("inference"));
    // The signed identity too, for a proxy to pass on (auth_request_set and the like).
    let identity = ok.header("x-keyward-identity").unwrap();
    assert_eq!(identity.split('.').count(), 3);
    // Through the full stack (a browser's Origin) the answer is the same.
    let cors = s
        .client
        .get(format!("{}/v1/auth", s.base))
        .header("Origin", "https://app.example")
        .header("X-Forwarded-Uri", "/v1/chat/x")
        .bearer_auth(&inference)
        .send()
        .await
        .unwrap();
    assert_eq!(cors.status(), 200);
    assert_eq!(
        cors.headers()["x-keyward-key-id"].to_str().unwrap(),
        id.as_str()
    );
    assert!(cors.headers().contains_key("access-control-allow-origin"));
    auth("/admin/x", Some(inference.clone()))
        .await
        .assert_error(403, "insufficient_scope");
    auth("/v1/chat/x", None)
        .await
        .assert_error(401, "missing_credentials");
    let original = s
        .client
        .get(format!("{}/v1/auth", s.base))
        .header("X-Original-URI", "/admin/../admin/x")
        .bearer_auth(&inference)
        .send()
        .await
        .unwrap();
    assert_eq!(original.status(), 403);

    let verify = |body: Value| {
        let s = &s;
        async move { s.call(Method::POST, "/v1/verify", None, Some(body)).await }
    };
    let v = verify(json!({"key": inference, "route": "chat"})).await;
    assert_eq!(v.status, 200);
    assert_eq!(v.body["valid"], true);
    assert_eq!(v.body["code"], "VALID");
    assert_eq!(v.body["key_id"], id.as_str());
    assert_eq!(v.body["meta"]["plan"], "pro");
    let v = verify(json!({"key": inference, "route": "admin"})).await;
    assert_eq!(
        v.body,
        json!({"valid": false, "code": "insufficient_scope"})
    );
    let v = verify(json!({"key": inference, "scopes": ["research"]})).await;
    assert_eq!(v.body["code"], "insufficient_scope");
    let v = verify(json!({"key": "kw_live_nope"})).await;
    assert_eq!(v.body, json!({"valid": false, "code": "invalid_api_key"}));
    let (_, locked) = s
        .create_key(json!({"allowed_ips": ["203.0.113.0/24"]}))
        .await;
    assert_eq!(
        verify(json!({"key": locked, "ip": "203.0.113.9"}))
            .await
            .body["valid"],
        true
    );
    assert_eq!(
        verify(json!({"key": locked, "ip": "198.51.100.1"}))
            .await
            .body["code"],
        "ip_not_allowed"
    );
    verify(json!({"key": inference, "route": "nope"}))
        .await
        .assert_error(422, "validation_failed");
    verify(json!({"kee": inference}))
        .await
        .assert_error(400, "unknown_field");
}

#[tokio::test]
async fn forwarded_headers_count_only_from_trusted_proxies() {
    let (s, _) = gateway("").await;
    let (_, key) = s.create_key(json!({"allowed_ips": ["10.0.0.0/8"]})).await;
    let r = s
        .client
        .get(format!("{}/v1/chat/x", s.base))
        .bearer_auth(&key)
        .header("X-Forwarded-For", "10.1.2.3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a spoofed X-Forwarded-For must not count");

    let (s2, _) = gateway("[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n").await;
    let (_, key) = s2.create_key(json!({"allowed_ips": ["10.0.0.0/8"]})).await;
    let r = s2
        .client
        .get(format!("{}/v1/chat/x", s2.base))
        .bearer_auth(&key)
        .header("X-Forwarded-For", "10.1.2.3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
}

#[tokio::test]
async fn usage_counts_survive_a_graceful_stop_exactly() {
    // Only the shutdown flush writes: proves no count is lost at a graceful stop.
    let (mut s, _) = gateway("[usage]\nflush_seconds = 3600\n").await;
    let (id, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    for _ in 0..7 {
        assert_eq!(
            s.call(Method::GET, "/v1/chat/x", Some(&key), None)
                .await
                .status,
            200
        );
    }
    for _ in 0..4 {
        assert_eq!(
            s.call(Method::GET, "/admin/x", Some(&key), None)
                .await
                .status,
            403
        );
    }
    let (id2, key2) = s.create_key(json!({"scopes": ["inference"]})).await;
    assert_eq!(
        s.call(Method::GET, "/v1/chat/x", Some(&key2), None)
            .await
            .status,
        200
    );
    s.admin(Method::DELETE, &format!("/v1/keys/{id2}"), None)
        .await;
    for _ in 0..3 {
        assert_eq!(
            s.call(Method::GET, "/v1/chat/x", Some(&key2), None)
                .await
                .status,
            401
        );
    }
    // Before the stop the answer merges what is not written yet.
    let live = s
        .admin(
            Method::GET,
            &format!("/v1/keys/{id}/usage?granularity=day"),
            None,
        )
        .await;
    assert_eq!(live.body["totals"]["allowed"], 7, "{}", live.text);
    assert!(s.stop().await.success());

    let dir = s.dir.clone();
    drop(s);
    let s = TestServer::start_in(dir, &[]).await;
    let admin_key = {
        // The bootstrap key was printed by the first start only: make a new management key.
        let (st, out, err) = crate::harness::cli(
            s.dir.path(),
            &["keys", "create", "--scopes", "management", "--json"],
            None,
            &[],
        );
        assert!(st.success(), "{err}");
        serde_json::from_str::<Value>(&out).unwrap()["key"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let usage = |id: String| {
        let s = &s;
        let admin_key = admin_key.clone();
        async move {
            s.call(
                Method::GET,
                &format!("/v1/keys/{id}/usage?granularity=day"),
                Some(&admin_key),
                None,
            )
            .await
        }
    };
    let u = usage(id.clone()).await;
    assert_eq!(u.status, 200, "{}", u.text);
    assert_eq!(
        u.body["totals"],
        json!({"allowed": 7, "unauthorized": 0, "forbidden": 4, "rate_limited": 0})
    );
    assert!(u.body["last_used_at"].is_string());
    let u2 = usage(id2).await;
    assert_eq!(
        u2.body["totals"],
        json!({"allowed": 1, "unauthorized": 3, "forbidden": 0, "rate_limited": 0})
    );
    let shown = s
        .call(
            Method::GET,
            &format!("/v1/keys/{id}"),
            Some(&admin_key),
            None,
        )
        .await;
    assert!(shown.body["last_used_at"].is_string());
    s.call(
        Method::GET,
        &format!("/v1/keys/{id}/usage?granularity=week"),
        Some(&admin_key),
        None,
    )
    .await
    .assert_error(400, "invalid_request");
}

#[tokio::test]
async fn cors_preflight_needs_no_credentials() {
    let (s, _) = gateway("").await;
    let r = s
        .client
        .request(Method::OPTIONS, format!("{}/v1/chat/completions", s.base))
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type, x-api-key",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(
        r.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for h in ["authorization", "content-type", "x-api-key"] {
        assert!(allowed.contains(h), "{allowed}");
    }

    let (s2, _) = gateway("[cors]\norigins = [\"https://app.example.com\"]\n").await;
    let preflight = |origin: &'static str| {
        let s2 = &s2;
        async move {
            s2.client
                .request(Method::OPTIONS, format!("{}/v1/chat/x", s2.base))
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "GET")
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        preflight("https://app.example.com").await.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(
        preflight("https://evil.example.com")
            .await
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn metrics_and_a_flood_of_random_keys() {
    let (mut s, _) = gateway("").await;
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    for _ in 0..3 {
        assert_eq!(
            s.call(Method::GET, "/v1/chat/x", Some(&key), None)
                .await
                .status,
            200
        );
    }
    let before = s.metrics().await;
    assert!(
        before.contains("keyward_requests_total{route=\"chat\",status=\"200\",code=\"ok\"} 3"),
        "{before}"
    );
    assert!(
        before.contains("keyward_request_duration_seconds_bucket{route=\"chat\""),
        "{before}"
    );
    assert!(metric(&before, "keyward_key_cache_hits_total") >= 2.0);

    // Strings that fail the checksum never reach the cache, let alone storage.
    for i in 0..200 {
        let junk = format!("kw_live_{i:0>43}abcdef");
        assert_eq!(
            s.call(Method::GET, "/v1/chat/x", Some(&junk), None)
                .await
                .status,
            401
        );
    }
    let after_junk = s.metrics().await;
    assert_eq!(
        metric(&after_junk, "keyward_key_cache_misses_total"),
        metric(&before, "keyward_key_cache_misses_total")
    );

    // A well-formed unknown key costs one storage lookup, then the negative cache answers.
    let other = TestServer::start().await;
    let (_, foreign) = other.create_key(json!({})).await;
    for _ in 0..50 {
        s.call(Method::GET, "/v1/chat/x", Some(&foreign), None)
            .await
            .assert_error(401, "invalid_api_key");
    }
    let after = s.metrics().await;
    assert_eq!(
        metric(&after, "keyward_key_cache_misses_total")
            - metric(&after_junk, "keyward_key_cache_misses_total"),
        1.0
    );
    assert!(metric(&after, "keyward_key_cache_negative_hits_total") >= 49.0);
    // Refusals are counted under their route and code, beside the successes.
    for series in [
        "keyward_requests_total{route=\"chat\",status=\"401\",code=\"invalid_api_key\"} 250",
        "keyward_requests_total{route=\"chat\",status=\"200\",code=\"ok\"} 3",
    ] {
        assert!(after.contains(series), "{series} in {after}");
    }
    for secret in [&key, &foreign] {
        assert!(!after.contains(&secret[8..]));
    }
    // Stopped first, so that every line it wrote has been read.
    s.stop().await;
    assert!(!s.stdout().contains(&key[8..]), "a secret was logged");
}

#[tokio::test]
async fn a_client_sending_unknown_keys_is_cut_off_from_store_queries() {
    let (s, _up) = gateway("\n[cache]\nunknown_keys_per_client = 3\n").await;
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    let get = |key: &str| {
        let key = key.to_owned();
        let s = &s;
        async move { s.call(Method::GET, "/v1/chat/x", Some(&key), None).await }
    };
    assert_eq!(get(&key).await.status, 200);
    // The change feed's follower reads the key's creation (within 0.5 s) and keeps the key
    // cached: the last request below is answered from the cache, without a query.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Well-formed keys this server does not know: another server's.
    let other = TestServer::start().await;
    let mut unknown = Vec::new();
    for _ in 0..4 {
        unknown.push(other.create_key(json!({})).await.1);
    }
    well_inside_a_minute(Duration::from_secs(15)).await;
    let before = s.metrics().await;
    for k in &unknown[..3] {
        get(k).await.assert_error(401, "invalid_api_key");
    }
    // The fourth distinct unknown key in the minute: refused without a store query.
    let refused = get(&unknown[3]).await;
    refused.assert_error(429, "rate_limit_exceeded");
    let retry = refused.retry_after();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let after = s.metrics().await;
    let queries = |m: &str| metric(m, "keyward_key_cache_misses_total");
    assert_eq!(queries(&after) - queries(&before), 3.0);
    assert_eq!(metric(&after, "keyward_unknown_keys_refused_total"), 1.0);
    // What the cache knows is still answered: the unknown key from the negative cache, the
    // valid key from the positive one.
    get(&unknown[0]).await.assert_error(401, "invalid_api_key");
    assert_eq!(get(&key).await.status, 200);
    assert_eq!(queries(&s.metrics().await), queries(&after));
}

#[tokio::test]
async fn an_ipv6_client_is_bounded_by_its_slash_64_not_by_each_address() {
    let (s, _up) = gateway(
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[cache]\nunknown_keys_per_client = 2\n",
    )
    .await;
    let other = TestServer::start().await;
    let mut unknown = Vec::new();
    for _ in 0..4 {
        unknown.push(other.create_key(json!({})).await.1);
    }
    let from = async |client: &str, key: &str| s.get_from("/v1/chat/x", key, client).await;
    // A new address of the same /64 for every key is still one client (the third is over
    // its bound); another /64 is another client.
    let cases = [
        ("2001:db8:0:1::1", 401, "invalid_api_key"),
        ("2001:db8:0:1::2", 401, "invalid_api_key"),
        ("2001:db8:0:1:ffff::3", 429, "rate_limit_exceeded"),
        ("2001:db8:0:2::1", 401, "invalid_api_key"),
    ];
    well_inside_a_minute(Duration::from_secs(15)).await;
    for ((client, status, code), key) in cases.into_iter().zip(&unknown) {
        from(client, key).await.assert_error(status, code);
    }
}

#[tokio::test]
async fn a_flood_from_many_clients_queries_only_stored_hashes() {
    let (s, _up) = gateway(
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [cache]\nunknown_keys_per_client = 0\nunknown_keys_per_node = 3\n",
    )
    .await;
    // Stored, never used here: not cached.
    let (_, stored) = s.create_key(json!({"scopes": ["inference"]})).await;
    let other = TestServer::start().await;
    let mut unknown = Vec::new();
    for _ in 0..30 {
        unknown.push(other.create_key(json!({})).await.1);
    }
    let mut unknown = unknown.into_iter();
    let mut client = 0u8;
    let server = &s;
    let mut from_a_new_client = |key: String| {
        client += 1;
        let address = format!("198.51.100.{client}");
        async move { server.get_from("/v1/chat/x", &key, &address).await }
    };
    let queries = |m: &str| metric(m, "keyward_key_cache_misses_total");
    let filtered = |m: &str| metric(m, "keyward_unknown_keys_filtered_total");
    // The flood and the filtered request below take up to 6 s on a loaded machine.
    well_inside_a_minute(Duration::from_secs(15)).await;
    // Three clients' unknown keys reach the node's bound, each with a query.
    for key in unknown.by_ref().take(3) {
        from_a_new_client(key)
            .await
            .assert_error(401, "invalid_api_key");
    }
    // The change feed's follower reads the stored hashes within a round (0.5 s; up to 5 s
    // allowed on a loaded machine); until then unknown keys are still queried.
    let mut rounds = 0;
    while filtered(&s.metrics().await) == 0.0 && rounds < 25 {
        let key = unknown.next().unwrap();
        from_a_new_client(key)
            .await
            .assert_error(401, "invalid_api_key");
        tokio::time::sleep(Duration::from_millis(200)).await;
        rounds += 1;
    }
    let before = s.metrics().await;
    assert!(filtered(&before) >= 1.0, "{before}");
    from_a_new_client(unknown.next().unwrap())
        .await
        .assert_error(401, "invalid_api_key");
    let after = s.metrics().await;
    assert_eq!(
        queries(&after),
        queries(&before),
        "no query for an unknown key"
    );
    assert_eq!(filtered(&after), filtered(&before) + 1.0);
    // Stored keys are still queried: one this node has not cached, one it has just made, and
    // one another process made (the CLI, as another node would), once the feed has it.
    assert_eq!(from_a_new_client(stored).await.status, 200);
    let (_, fresh) = s.create_key(json!({"scopes": ["inference"]})).await;
    assert_eq!(from_a_new_client(fresh).await.status, 200);
    let (st, out, err) = crate::harness::cli(
        s.dir.path(),
        &[
            "keys",
            "create",
            "--name",
            "elsewhere",
            "--scopes",
            "inference",
            "--json",
        ],
        None,
        &[],
    );
    assert!(st.success(), "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let elsewhere = created["key"].as_str().unwrap();
    let r = s
        .eventually(200, Method::GET, "/v1/chat/x", elsewhere)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(queries(&s.metrics().await), queries(&after) + 3.0);
}

#[tokio::test]
async fn concurrent_misses_on_one_key_share_one_store_query() {
    let (mut s, _up) = gateway("").await;
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    assert!(s.stop().await.success());
    let dir = s.dir.clone();
    drop(s);
    // A restart empties the cache; the key's creation lies behind the change feed's head.
    let s = TestServer::start_in(dir, &[]).await;
    let mut burst = tokio::task::JoinSet::new();
    // Fewer than the default limits (60 a minute), so that every answer is a 200.
    for _ in 0..40 {
        let request = s
            .client
            .get(format!("{}/v1/chat/x", s.base))
            .bearer_auth(&key);
        burst.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    }
    while let Some(status) = burst.join_next().await {
        assert_eq!(status.unwrap().unwrap(), 200);
    }
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "keyward_key_cache_misses_total"),
        1.0,
        "{text}"
    );
}
