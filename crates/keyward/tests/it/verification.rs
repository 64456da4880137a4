//! Every answer of the shared verification path, seen through the management API.

use reqwest::Method;
use serde_json::json;

use crate::harness::TestServer;

#[tokio::test]
async fn each_failure_has_its_status_and_code() {
    let s = TestServer::start().await;
    let org = |key: Option<String>| {
        let s = &s;
        async move { s.call(Method::GET, "/v1/org", key.as_deref(), None).await }
    };

    let missing = org(None).await;
    missing.assert_error(401, "missing_credentials");
    assert_eq!(missing.body["error"]["type"], "authentication_error");
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"keyward\"")
    );

    org(Some("not a key".into()))
        .await
        .assert_error(401, "invalid_api_key");
    org(Some(String::new()))
        .await
        .assert_error(401, "invalid_api_key");

    // A typo fails the checksum.
    let mut typo = s.mgmt_key.clone().into_bytes();
    let i = typo.len() - 10;
    typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
    org(Some(String::from_utf8(typo).unwrap()))
        .await
        .assert_error(401, "invalid_api_key");

    // Well-formed (valid checksum) but unknown.
    let (_, other) = {
        let other = TestServer::start().await;
        other.create_key(json!({"scopes": ["management"]})).await
    };
    org(Some(other)).await.assert_error(401, "invalid_api_key");

    let (_, inference) = s.create_key(json!({"scopes": ["inference"]})).await;
    let scope = org(Some(inference)).await;
    scope.assert_error(403, "insufficient_scope");
    assert_eq!(scope.body["error"]["type"], "authentication_error");

    let (_, ip_locked) = s
        .create_key(json!({"scopes": ["management"], "allowed_ips": ["10.0.0.0/8"]}))
        .await;
    org(Some(ip_locked))
        .await
        .assert_error(403, "ip_not_allowed");
    let (_, blocked) = s
        .create_key(json!({"scopes": ["management"], "allowed_ips": ["127.0.0.0/8"], "blocked_ips": ["127.0.0.1"]}))
        .await;
    org(Some(blocked)).await.assert_error(403, "ip_not_allowed");
    let (_, allowed) = s
        .create_key(json!({"scopes": ["management"], "allowed_ips": ["127.0.0.0/8", "::1"]}))
        .await;
    assert_eq!(org(Some(allowed)).await.status, 200);

    let (_, route_locked) = s
        .create_key(json!({"scopes": ["management"], "endpoint": "echo"}))
        .await;
    org(Some(route_locked))
        .await
        .assert_error(403, "endpoint_not_allowed");
}

#[tokio::test]
async fn both_headers_and_ambiguity() {
    let s = TestServer::start().await;
    let url = format!("{}/v1/org", s.base);
    let via_header = s
        .client
        .get(&url)
        .header("X-API-Key", &s.mgmt_key)
        .send()
        .await
        .unwrap();
    assert_eq!(via_header.status(), 200);
    let lower = s
        .client
        .get(&url)
        .header("authorization", format!("bearer {}", s.mgmt_key))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
    let same_twice = s
        .client
        .get(&url)
        .bearer_auth(&s.mgmt_key)
        .header("x-api-key", &s.mgmt_key)
        .send()
        .await
        .unwrap();
    assert_eq!(same_twice.status(), 200);
    let (_, other) = s.create_key(json!({"scopes": ["management"]})).await;
    let two = s
        .client
        .get(&url)
        .bearer_auth(&s.mgmt_key)
        .header("x-api-key", other)
        .send()
        .await
        .unwrap();
    TestServer::read(two)
        .await
        .assert_error(401, "ambiguous_credentials");
}

#[tokio::test]
async fn a_flood_of_random_keys_is_answered_401_and_never_500() {
    let s = TestServer::start().await;
    let mut seen_statuses = std::collections::BTreeSet::new();
    for i in 0..300u32 {
        let junk = match i % 5 {
            0 => format!("kw_live_{}", "x".repeat((i % 60) as usize)),
            1 => "%00%ff".repeat((i % 7) as usize + 1),
            2 => "a".repeat(300 + i as usize),
            3 => format!("kw_live_{i:0>49}"),
            _ => format!("{}{}", s.mgmt_key, i),
        };
        let r = s.call(Method::GET, "/v1/keys", Some(&junk), None).await;
        seen_statuses.insert(r.status.as_u16());
        assert_eq!(r.code(), "invalid_api_key", "{junk}: {}", r.text);
    }
    assert_eq!(seen_statuses.into_iter().collect::<Vec<_>>(), [401]);
}
