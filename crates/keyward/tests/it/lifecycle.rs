//! The key lifecycle through the management API: create → use → list → rotate → revoke.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::TestServer;

#[tokio::test]
async fn create_show_list_patch() {
    let s = TestServer::start().await;
    let r = s
        .admin(
            Method::POST,
            "/v1/keys",
            Some(json!({
                "name": "CI pipeline", "scopes": ["inference", "research"],
                "allowed_ips": ["10.0.0.0/8", "2001:db8::1"], "meta": {"team": "ml"},
                "quota_requests": 100, "quota_window": 30, "environment": "test",
            })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let secret = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("kw_test_"));
    assert_eq!(r.body["object"], "key");
    assert_eq!(r.body["state"], "active");
    assert_eq!(r.body["environment"], "test");
    assert_eq!(r.body["scopes"], json!(["inference", "research"]));
    assert_eq!(r.body["allowed_ips"], json!(["10.0.0.0/8", "2001:db8::1"]));
    assert_eq!(
        r.body["hint"],
        format!("kw_test_…{}", &secret[secret.len() - 4..])
    );
    assert_eq!(r.body["quota_requests"], 100);
    let bootstrap_id = s.admin(Method::GET, "/v1/keys", None).await.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "Bootstrap management key")
        .unwrap()["id"]
        .clone();
    assert_eq!(r.body["created_by"], bootstrap_id);

    let shown = s.admin(Method::GET, &format!("/v1/keys/{id}"), None).await;
    assert_eq!(shown.status, 200);
    assert!(shown.body.get("key").is_none());
    assert_eq!(shown.body["name"], "CI pipeline");

    let patched = s
        .admin(
            Method::PATCH,
            &format!("/v1/keys/{id}"),
            Some(json!({"name": "renamed", "blocked_ips": ["10.1.0.0/16"], "expires_at": "2099-01-01T00:00:00Z", "endpoint": "echo"})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(patched.body["name"], "renamed");
    assert_eq!(patched.body["blocked_ips"], json!(["10.1.0.0/16"]));
    assert_eq!(patched.body["expires_at"], "2099-01-01T00:00:00.000Z");
    assert_eq!(patched.body["endpoint"], "echo");
    // null clears; absence keeps.
    let cleared = s
        .admin(
            Method::PATCH,
            &format!("/v1/keys/{id}"),
            Some(json!({"expires_at": null})),
        )
        .await;
    assert_eq!(cleared.body["expires_at"], serde_json::Value::Null);
    assert_eq!(cleared.body["endpoint"], "echo");

    let audit = s.admin(Method::GET, "/v1/audit-log", None).await;
    let actions: Vec<&str> = audit.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions[..3], ["key.updated", "key.updated", "key.created"]);
    assert_eq!(audit.body["data"][0]["ip"], "127.0.0.1");
    assert_eq!(
        audit.body["data"][0]["details"]["fields"],
        json!(["expires_at"])
    );
}

#[tokio::test]
async fn rotation_grace_then_only_the_new_secret() {
    let s = TestServer::start().await;
    let (id, old) = s.create_key(json!({"scopes": ["management"]})).await;
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(&old), None)
            .await
            .status,
        200
    );

    let r = s
        .admin(
            Method::POST,
            &format!("/v1/keys/{id}/rotate"),
            Some(json!({"grace_seconds": 2})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let new = r.body["key"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(r.body["id"], id.as_str());
    assert!(r.body["previous_valid_until"].is_string());
    assert_eq!(
        r.body["hint"],
        format!("kw_live_…{}", &new[new.len() - 4..])
    );

    // Inside the grace both secrets work.
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(&old), None)
            .await
            .status,
        200
    );
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(&new), None)
            .await
            .status,
        200
    );

    tokio::time::sleep(Duration::from_millis(2_200)).await;
    s.call(Method::GET, "/v1/org", Some(&old), None)
        .await
        .assert_error(401, "key_expired");
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(&new), None)
            .await
            .status,
        200
    );
    let shown = s.admin(Method::GET, &format!("/v1/keys/{id}"), None).await;
    assert_eq!(shown.body["previous_valid_until"], serde_json::Value::Null);
    assert_eq!(shown.body["state"], "active");
}

#[tokio::test]
async fn rotation_can_carry_new_scopes_and_zero_grace() {
    let s = TestServer::start().await;
    let (id, old) = s.create_key(json!({"scopes": ["inference"]})).await;
    s.call(Method::GET, "/v1/org", Some(&old), None)
        .await
        .assert_error(403, "insufficient_scope");
    let r = s
        .admin(
            Method::POST,
            &format!("/v1/keys/{id}/rotate"),
            Some(json!({"grace_seconds": 0, "scopes": ["management", "inference"]})),
        )
        .await;
    assert_eq!(r.body["scopes"], json!(["management", "inference"]));
    let new = r.body["key"].as_str().unwrap();
    s.call(Method::GET, "/v1/org", Some(&old), None)
        .await
        .assert_error(401, "key_expired");
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(new), None).await.status,
        200
    );
}

#[tokio::test]
async fn revocation_is_immediate_permanent_and_idempotent() {
    let s = TestServer::start().await;
    let (id, secret) = s.create_key(json!({"scopes": ["management"]})).await;
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(&secret), None)
            .await
            .status,
        200
    );

    let r = s
        .admin(Method::DELETE, &format!("/v1/keys/{id}"), None)
        .await;
    assert_eq!(r.status, 204);
    s.call(Method::GET, "/v1/org", Some(&secret), None)
        .await
        .assert_error(401, "key_revoked");
    assert_eq!(
        s.admin(Method::DELETE, &format!("/v1/keys/{id}"), None)
            .await
            .status,
        204
    );

    let shown = s.admin(Method::GET, &format!("/v1/keys/{id}"), None).await;
    assert_eq!(shown.body["state"], "revoked");
    // Neither rotation nor a patch brings it back.
    s.admin(
        Method::POST,
        &format!("/v1/keys/{id}/rotate"),
        Some(json!({})),
    )
    .await
    .assert_error(409, "invalid_state");
    s.admin(
        Method::PATCH,
        &format!("/v1/keys/{id}"),
        Some(json!({"name": "x"})),
    )
    .await
    .assert_error(409, "invalid_state");
    s.call(Method::GET, "/v1/org", Some(&secret), None)
        .await
        .assert_error(401, "key_revoked");

    let audit = s.admin(Method::GET, "/v1/audit-log", None).await;
    let revocations = audit.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "key.revoked")
        .count();
    assert_eq!(revocations, 1, "a second revoke changes nothing");
}

#[tokio::test]
async fn expiry_is_enforced() {
    let s = TestServer::start().await;
    // Far enough ahead for creation and a first use on a loaded machine.
    let soon = std::time::SystemTime::now() + Duration::from_millis(4_000);
    let soon = humantime(soon);
    let (id, secret) = s
        .create_key(json!({"scopes": ["management"], "expires_at": soon}))
        .await;
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(&secret), None)
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(4_300)).await;
    s.call(Method::GET, "/v1/org", Some(&secret), None)
        .await
        .assert_error(401, "key_expired");
    let listed = s.admin(Method::GET, "/v1/keys?state=expired", None).await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(listed.body["data"][0]["id"], id.as_str());
}

/// RFC 3339 UTC with milliseconds, without pulling a date crate into the tests.
pub fn humantime(t: std::time::SystemTime) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d"])
        .arg(format!(
            "@{:.3}",
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        ))
        .arg("+%Y-%m-%dT%H:%M:%S.%3NZ")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn list_filters_and_cursor_pagination() {
    let s = TestServer::start().await;
    let p = s
        .admin(
            Method::POST,
            "/v1/projects",
            Some(json!({"slug": "my-project", "key_prefix": "xero_{project}_"})),
        )
        .await;
    assert_eq!(p.status, 201, "{}", p.text);
    assert_eq!(p.body["key_prefix"], "xero_{project}_");
    let (_, xero) = s.create_key(json!({"project": "my-project"})).await;
    assert!(xero.starts_with("xero_my-project_"), "{xero}");

    let mut created = vec![];
    for i in 0..5 {
        created.push(s.create_key(json!({"name": format!("k{i}")})).await.0);
    }
    let (revoked, _) = s.create_key(json!({"name": "gone"})).await;
    s.admin(Method::DELETE, &format!("/v1/keys/{revoked}"), None)
        .await;

    // Walk every page of 2.
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/keys?limit=2&cursor={c}"),
            None => "/v1/keys?limit=2".to_owned(),
        };
        let page = s.admin(Method::GET, &path, None).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let data = page.body["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        seen.extend(data.iter().map(|k| k["id"].as_str().unwrap().to_owned()));
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    // bootstrap + xero + 5 + revoked, newest first, no repeats.
    assert_eq!(seen.len(), 8);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted);

    let by_project = s
        .admin(Method::GET, "/v1/keys?project=my-project", None)
        .await;
    assert_eq!(by_project.body["data"].as_array().unwrap().len(), 1);
    let revoked_list = s.admin(Method::GET, "/v1/keys?state=revoked", None).await;
    assert_eq!(revoked_list.body["data"][0]["id"], revoked.as_str());
    let active = s
        .admin(Method::GET, "/v1/keys?state=active&limit=100", None)
        .await;
    assert_eq!(active.body["data"].as_array().unwrap().len(), 7);

    let projects = s.admin(Method::GET, "/v1/projects", None).await;
    let slugs: Vec<&str> = projects.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["slug"].as_str().unwrap())
        .collect();
    assert_eq!(slugs, ["my-project", "default"]);
    s.admin(
        Method::POST,
        "/v1/projects",
        Some(json!({"slug": "my-project"})),
    )
    .await
    .assert_error(409, "already_exists");
}

#[tokio::test]
async fn leaked_secrets_are_revoked_and_only_counted() {
    let s = TestServer::start().await;
    let (a, secret_a) = s.create_key(json!({"name": "a"})).await;
    let (b, _) = s.create_key(json!({"name": "b"})).await;
    let r = s
        .admin(
            Method::POST,
            "/v1/keys/leaked",
            Some(json!({"secrets": [secret_a, "kw_live_notakey", "random text"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"object": "leak_report", "received": 3, "matched": 1})
    );
    assert!(!r.text.contains(&a), "the answer never says which key");
    let state = |id: String| {
        let s = &s;
        async move {
            s.admin(Method::GET, &format!("/v1/keys/{id}"), None)
                .await
                .body["state"]
                .clone()
        }
    };
    assert_eq!(state(a.clone()).await, "revoked");
    assert_eq!(state(b).await, "active");
    let audit = s.admin(Method::GET, "/v1/audit-log", None).await;
    let entry = audit.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "key.revoked")
        .unwrap();
    assert_eq!(entry["target"], a.as_str());
    assert_eq!(entry["details"]["reason"], "leaked");
}
