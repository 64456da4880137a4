//! A secret is returned exactly once and exists nowhere else: not in later answers, not in
//! the database files, not in anything the process printed (logs at trace level).

use reqwest::Method;
use serde_json::json;

use crate::harness::TestServer;

fn files_contain(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut hits = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test]
async fn secrets_are_shown_once_and_never_stored_or_logged() {
    let mut s = TestServer::start().await;
    let mut secrets = vec![];
    let (id, created) = s
        .create_key(json!({"name": "payments", "scopes": ["inference", "management"]}))
        .await;
    secrets.push(created.clone());
    // Use it, fail with it, rotate it, report it leaked: every path that touches a secret.
    assert_eq!(
        s.call(Method::GET, "/v1/keys", Some(&created), None)
            .await
            .status,
        200
    );
    let mut typo = created.clone();
    typo.push('x');
    assert_eq!(
        s.call(Method::GET, "/v1/keys", Some(&typo), None)
            .await
            .status,
        401
    );
    let rotated = s
        .admin(
            Method::POST,
            &format!("/v1/keys/{id}/rotate"),
            Some(json!({"grace_seconds": 60})),
        )
        .await;
    let new = rotated.body["key"].as_str().unwrap().to_owned();
    secrets.push(new.clone());
    let (_, leaked) = s.create_key(json!({"name": "leaky"})).await;
    secrets.push(leaked.clone());
    s.admin(
        Method::POST,
        "/v1/keys/leaked",
        Some(json!({"secrets": [leaked]})),
    )
    .await;

    // Never in a later answer.
    for path in [
        "/v1/keys?limit=100",
        &format!("/v1/keys/{id}"),
        "/v1/audit-log?limit=100",
        "/v1/projects",
        "/v1/org",
    ] {
        let r = s.admin(Method::GET, path, None).await;
        assert_eq!(r.status, 200, "{path}");
        for secret in &secrets {
            assert!(
                !r.text.contains(secret.as_str()),
                "{path} returned a secret"
            );
            // Not even the random part without its prefix.
            assert!(
                !r.text.contains(&secret[8..]),
                "{path} returned a secret's body"
            );
        }
        assert!(!r.text.contains(&s.mgmt_key));
    }

    let status = s.stop().await;
    assert!(status.success(), "graceful stop: {status}");

    // Never in the database (main file, WAL, shared memory).
    let mut all = secrets.clone();
    all.push(s.mgmt_key.clone());
    for secret in &all {
        let hits = files_contain(s.dir.path(), secret);
        assert!(hits.is_empty(), "secret found in {hits:?}");
        let hits = files_contain(s.dir.path(), &secret[8..]);
        assert!(hits.is_empty(), "secret body found in {hits:?}");
    }

    // Never logged. stdout carries the logs; stderr only the one-time bootstrap secret.
    let stdout = s.stdout();
    assert!(stdout.contains("request"), "logging was on");
    assert!(stdout.lines().count() > 20, "trace logging was on");
    for secret in &all {
        assert!(!stdout.contains(&secret[8..]), "a secret was logged");
    }
    let stderr = s.stderr();
    for secret in &secrets {
        assert!(!stderr.contains(&secret[8..]), "a secret reached stderr");
    }
    assert_eq!(
        stderr.matches(&s.mgmt_key).count(),
        1,
        "the bootstrap key is printed exactly once"
    );
}
