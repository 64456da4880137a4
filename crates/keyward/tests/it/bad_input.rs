//! Bad input gets a precise 4xx envelope and changes nothing.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Reply, TestServer};

/// Keys and audit log, to prove a refused request changed nothing.
async fn snapshot(s: &TestServer) -> (Value, Value) {
    let keys = s.admin(Method::GET, "/v1/keys?limit=100", None).await.body;
    let audit = s
        .admin(Method::GET, "/v1/audit-log?limit=100", None)
        .await
        .body;
    (keys, audit)
}

async fn raw(
    s: &TestServer,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    let mut req = s
        .client
        .request(method, format!("{}{path}", s.base))
        .bearer_auth(&s.mgmt_key)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    TestServer::read(req.send().await.unwrap()).await
}

/// Sends a large body over raw TCP: the server may answer 413 before the body is written,
/// and an HTTP client would report the broken pipe instead of the answer.
async fn oversized(
    s: &TestServer,
    method: &str,
    path: &str,
    body: &[u8],
    chunked: bool,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.base.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", body.len())
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n{framing}\r\nConnection: close\r\n\r\n",
        s.mgmt_key
    );
    let mut payload = head.into_bytes();
    if chunked {
        for chunk in body.chunks(64 * 1024) {
            payload.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
            payload.extend(chunk);
            payload.extend(b"\r\n");
        }
        payload.extend(b"0\r\n\r\n");
    } else {
        payload.extend(body);
    }
    let writer = tokio::spawn(async move {
        // The server may stop reading once it has answered.
        let _ = write.write_all(&payload).await;
        write
    });
    let mut out = Vec::new();
    let _ = read.read_to_end(&mut out).await;
    drop(writer.await);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn bad_bodies_are_refused_precisely_and_change_nothing() {
    let s = TestServer::start().await;
    let (id, _) = s.create_key(json!({"name": "victim"})).await;
    let key_path = format!("/v1/keys/{id}");
    let before = snapshot(&s).await;
    let json_ct = Some("application/json");

    raw(
        &s,
        Method::POST,
        "/v1/keys",
        json_ct,
        b"{\"name\": ".to_vec(),
    )
    .await
    .assert_error(400, "invalid_json");
    raw(
        &s,
        Method::POST,
        "/v1/keys",
        json_ct,
        b"{} trailing".to_vec(),
    )
    .await
    .assert_error(400, "invalid_json");
    raw(&s, Method::POST, "/v1/keys", json_ct, b"[1,2]".to_vec())
        .await
        .assert_error(400, "invalid_request");
    raw(
        &s,
        Method::POST,
        "/v1/keys",
        Some("text/plain"),
        b"{}".to_vec(),
    )
    .await
    .assert_error(415, "unsupported_media_type");

    let unknown = s
        .admin(Method::POST, "/v1/keys", Some(json!({"nmae": "typo"})))
        .await;
    unknown.assert_error(400, "unknown_field");
    assert_eq!(unknown.body["error"]["param"], "nmae");
    let wrong_type = s
        .admin(
            Method::POST,
            "/v1/keys",
            Some(json!({"quota_requests": "many"})),
        )
        .await;
    wrong_type.assert_error(400, "invalid_request");
    assert_eq!(wrong_type.body["error"]["param"], "quota_requests");
    assert!(
        !wrong_type.text.contains("many"),
        "input values are not echoed"
    );

    let bad_ip = s
        .admin(
            Method::POST,
            "/v1/keys",
            Some(json!({"allowed_ips": ["10.0.0.0/8", "10.0.0.300"]})),
        )
        .await;
    bad_ip.assert_error(422, "validation_failed");
    assert_eq!(bad_ip.body["error"]["param"], "allowed_ips[1]");
    let bad_cidr = s
        .admin(
            Method::POST,
            "/v1/keys",
            Some(json!({"blocked_ips": ["10.0.0.1/8"]})),
        )
        .await;
    assert_eq!(bad_cidr.body["error"]["param"], "blocked_ips[0]");
    for (body, param) in [
        (json!({"scopes": ["root"]}), "scopes[0]"),
        (json!({"scopes": []}), "scopes"),
        (json!({"environment": "prod"}), "environment"),
        (json!({"expires_at": "2001-01-01T00:00:00Z"}), "expires_at"),
        (json!({"expires_at": "tomorrow"}), "expires_at"),
        (json!({"quota_requests": 0}), "quota_requests"),
        (json!({"quota_window": 0}), "quota_window"),
        (json!({"endpoint": "no-such-route"}), "endpoint"),
        (json!({"project": "no-such-project"}), "project"),
        (json!({"remaining": -1}), "remaining"),
        (json!({"remaining": 1_000_000_000_000_001_i64}), "remaining"),
        (
            json!({"remaining": 5, "refill": {"interval": "daily", "amount": 1_000_000_000_000_001_i64}}),
            "refill.amount",
        ),
        (
            json!({"refill": {"interval": "daily", "amount": 10}}),
            "refill",
        ),
        (json!({"name": "x".repeat(201)}), "name"),
        (json!({"meta": {"blob": "y".repeat(17_000)}}), "meta"),
    ] {
        let r = s.admin(Method::POST, "/v1/keys", Some(body.clone())).await;
        r.assert_error(422, "validation_failed");
        assert_eq!(r.body["error"]["param"], param, "{body}");
    }

    // PATCH: scopes are immutable, validation as on create, unknown fields refused.
    let scopes = s
        .admin(
            Method::PATCH,
            &key_path,
            Some(json!({"scopes": ["management"]})),
        )
        .await;
    scopes.assert_error(422, "scopes_immutable");
    assert!(
        scopes.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rotate")
    );
    s.admin(Method::PATCH, &key_path, Some(json!({"scopes": null})))
        .await
        .assert_error(422, "scopes_immutable");
    s.admin(
        Method::PATCH,
        &key_path,
        Some(json!({"name": "ok", "allowed_ips": ["nope"]})),
    )
    .await
    .assert_error(422, "validation_failed");
    s.admin(
        Method::PATCH,
        &key_path,
        Some(json!({"environment": "test"})),
    )
    .await
    .assert_error(400, "unknown_field");

    // Rotation parameters.
    for grace in [-1, 604_801] {
        let r = s
            .admin(
                Method::POST,
                &format!("{key_path}/rotate"),
                Some(json!({"grace_seconds": grace})),
            )
            .await;
        r.assert_error(422, "validation_failed");
        assert_eq!(r.body["error"]["param"], "grace_seconds");
    }

    // Over 1 MiB, announced by Content-Length and streamed without one (chunked).
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(1024 * 1024 + 10));
    let (status, text) = oversized(&s, "POST", "/v1/keys", big.as_bytes(), false).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    let (status, text) =
        oversized(&s, "PATCH", &key_path, &vec![b' '; 2 * 1024 * 1024], true).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("payload_too_large"), "{text}");

    assert_eq!(
        snapshot(&s).await,
        before,
        "a refused request changed something"
    );
    let shown = s.admin(Method::GET, &key_path, None).await;
    assert_eq!(shown.body["name"], "victim");
}

#[tokio::test]
async fn unknown_ids_methods_and_queries() {
    let s = TestServer::start().await;
    let before = snapshot(&s).await;
    let ghost = "key_01JZZZZZZZZZZZZZZZZZZZZZZZ";
    for (method, path) in [
        (Method::GET, format!("/v1/keys/{ghost}")),
        (Method::PATCH, format!("/v1/keys/{ghost}")),
        (Method::DELETE, format!("/v1/keys/{ghost}")),
        (Method::POST, format!("/v1/keys/{ghost}/rotate")),
        (Method::GET, "/v1/keys/not-an-id".to_owned()),
        (Method::DELETE, "/v1/keys/..%2F..%2Fetc".to_owned()),
    ] {
        let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
        s.admin(method, &path, body)
            .await
            .assert_error(404, "not_found");
    }
    s.admin(Method::GET, "/v1/keys?project=nope", None)
        .await
        .assert_error(404, "not_found");
    s.admin(Method::GET, "/nowhere", None)
        .await
        .assert_error(404, "route_not_found");

    for (method, path) in [
        (Method::PUT, "/v1/keys"),
        (Method::DELETE, "/v1/projects"),
        (Method::GET, "/v1/keys/leaked"),
    ] {
        s.admin(method, path, None)
            .await
            .assert_error(405, "method_not_allowed");
    }
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=garbage", "cursor"),
        ("state=zombie", "state"),
    ] {
        let r = s
            .admin(Method::GET, &format!("/v1/keys?{query}"), None)
            .await;
        r.assert_error(400, "invalid_request");
        assert_eq!(r.body["error"]["param"], param);
    }
    s.admin(Method::GET, "/v1/keys?limit=abc", None)
        .await
        .assert_error(400, "invalid_request");
    s.admin(Method::GET, "/v1/keys?bogus=1", None)
        .await
        .assert_error(400, "invalid_request");
    s.admin(
        Method::GET,
        "/v1/audit-log?cursor=key_01JZZZZZZZZZZZZZZZZZZZZZZZ",
        None,
    )
    .await
    .assert_error(400, "invalid_request");
    assert_eq!(snapshot(&s).await, before);
}

#[tokio::test]
async fn garbage_never_gets_a_500() {
    let s = TestServer::start().await;
    let bodies: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0x00],
        b"null".to_vec(),
        b"\"string\"".to_vec(),
        b"{\"meta\": [1]}".to_vec(),
        b"{\"refill\": {\"interval\": \"weekly\", \"amount\": 1}, \"remaining\": 5}".to_vec(),
        b"{\"quota_requests\": 99999999999999999999}".to_vec(),
        b"{\"name\": \"\\ud800\"}".to_vec(),
        "{\"name\": \"\u{0}\"}".as_bytes().to_vec(),
        b"{\"allowed_ips\": [\"::ffff:1.2.3.4/200\"]}".to_vec(),
        br#"{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{}}}}}}}}}}}"#.to_vec(),
        "[".repeat(10_000).into_bytes(),
    ];
    for body in bodies {
        for path in ["/v1/keys", "/v1/projects", "/v1/keys/leaked"] {
            let r = raw(
                &s,
                Method::POST,
                path,
                Some("application/json"),
                body.clone(),
            )
            .await;
            assert!(
                r.status.is_client_error(),
                "{path} {:?}: {} {}",
                String::from_utf8_lossy(&body),
                r.status,
                r.text
            );
            assert!(r.body["error"]["code"].is_string(), "{}", r.text);
        }
    }
    // Still healthy.
    assert_eq!(s.admin(Method::GET, "/v1/org", None).await.status, 200);
}

#[tokio::test]
async fn flat_style_and_code_overrides() {
    let s = TestServer::start_with(&[
        ("KEYWARD_ERRORS__STYLE", "flat"),
        (
            "KEYWARD_ERRORS__CODES__MISSING_CREDENTIALS__CODE",
            "UNAUTHORIZED",
        ),
        (
            "KEYWARD_ERRORS__CODES__MISSING_CREDENTIALS__MESSAGE",
            "Authentication required.",
        ),
    ])
    .await;
    let r = s.call(Method::GET, "/v1/keys", None, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"], "UNAUTHORIZED");
    assert_eq!(r.body["message"], "Authentication required.");
    assert_eq!(r.body["request_id"].as_str(), r.header("x-request-id"));
}
