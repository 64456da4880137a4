//! The CLI in local mode, on the same store a server uses.

use reqwest::Method;
use serde_json::Value;

use crate::harness::{TestServer, cli};

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test]
async fn keys_projects_and_users_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let (st, out, _) = cli(d, &["migrate"], None, &[]);
    assert!(st.success(), "{out}");

    let (st, out, err) = cli(
        d,
        &[
            "projects",
            "create",
            "--slug",
            "billing",
            "--key-prefix",
            "sk-",
            "--json",
        ],
        None,
        &[],
    );
    assert!(st.success(), "{err}");
    assert_eq!(json(&out)["key_prefix"], "sk-");
    assert!(
        err.contains("kw_live_"),
        "the empty store was bootstrapped and its key printed once"
    );

    let (st, out, err) = cli(
        d,
        &[
            "keys",
            "create",
            "--name",
            "cli key",
            "--project",
            "billing",
            "--scopes",
            "management,inference",
            "--json",
        ],
        None,
        &[],
    );
    assert!(st.success(), "{err}");
    let created = json(&out);
    let secret = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk-"));
    assert!(!err.contains(&secret));

    let (st, out, _) = cli(d, &["keys", "list", "--json"], None, &[]);
    assert!(st.success());
    let list = json(&out);
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert!(!out.contains(&secret));
    let (_, out, _) = cli(
        d,
        &["keys", "list", "--project", "billing", "--json"],
        None,
        &[],
    );
    assert_eq!(json(&out)["data"].as_array().unwrap().len(), 1);
    let (st, out, _) = cli(d, &["keys", "list"], None, &[]);
    assert!(st.success() && out.contains(&id), "{out}");

    let (st, out, _) = cli(d, &["keys", "show", &id, "--json"], None, &[]);
    assert!(st.success());
    assert_eq!(json(&out)["name"], "cli key");

    // The key works against a server on the same store.
    let server = TestServer::start_in(std::sync::Arc::new(dir), &[]).await;
    let d = server.dir.path();
    assert_eq!(
        server
            .call(Method::GET, "/v1/org", Some(&secret), None)
            .await
            .status,
        200
    );

    let (st, out, _) = cli(
        d,
        &["keys", "rotate", &id, "--grace-seconds", "0", "--json"],
        None,
        &[],
    );
    assert!(st.success());
    let rotated = json(&out)["key"].as_str().unwrap().to_owned();
    server
        .eventually(401, Method::GET, "/v1/org", &secret)
        .await
        .assert_error(401, "key_expired");
    assert_eq!(
        server
            .call(Method::GET, "/v1/org", Some(&rotated), None)
            .await
            .status,
        200
    );

    let (st, out, _) = cli(d, &["keys", "revoke", &id, "--json"], None, &[]);
    assert!(st.success());
    assert_eq!(json(&out)["state"], "revoked");
    server
        .eventually(401, Method::GET, "/v1/org", &rotated)
        .await
        .assert_error(401, "key_revoked");
    let (st, out, _) = cli(d, &["keys", "revoke", &id], None, &[]);
    assert!(st.success() && out.contains("already revoked"), "{out}");

    let (st, out, _) = cli(d, &["projects", "list", "--json"], None, &[]);
    assert!(st.success());
    assert_eq!(json(&out)["data"].as_array().unwrap().len(), 2);

    let (st, out, err) = cli(
        d,
        &[
            "users",
            "create",
            "--email",
            "ada@example.com",
            "--role",
            "owner",
            "--password-stdin",
            "--json",
        ],
        Some("correct horse battery staple\n"),
        &[],
    );
    assert!(st.success(), "{err}");
    assert_eq!(json(&out)["email"], "ada@example.com");
    let (st, _, err) = cli(
        d,
        &[
            "users",
            "create",
            "--email",
            "ada@example.com",
            "--password-stdin",
        ],
        Some("another long password\n"),
        &[],
    );
    assert!(!st.success());
    assert!(err.contains("already exists"), "{err}");
    let (st, _, err) = cli(
        d,
        &[
            "users",
            "create",
            "--email",
            "bob@example.com",
            "--password-stdin",
        ],
        Some("short\n"),
        &[],
    );
    assert!(!st.success());
    assert!(err.contains("at least 12"), "{err}");

    // The password is stored only as an argon2id hash.
    let db = std::fs::read(server.db_path()).unwrap();
    let wal = std::fs::read(d.join("keyward.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes
                .windows(28)
                .any(|w| w == b"correct horse battery staple")
        );
    }

    // Errors are reported with a non-zero exit.
    let (st, _, err) = cli(
        d,
        &["keys", "show", "key_01JZZZZZZZZZZZZZZZZZZZZZZZ"],
        None,
        &[],
    );
    assert!(!st.success());
    assert!(err.contains("not_found"), "{err}");
    let (st, _, err) = cli(d, &["keys", "create", "--scopes", "root"], None, &[]);
    assert!(!st.success());
    assert!(err.contains("validation_failed"), "{err}");
}

#[test]
fn config_check_reports_every_invalid_key() {
    let dir = tempfile::tempdir().unwrap();
    let (st, out, _) = cli(dir.path(), &["config", "check"], None, &[]);
    assert!(st.success(), "defaults are valid: {out}");

    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
[server]
listen = "localhost"
trusted_proxies = ["10.0.0.0/33"]
[keys]
random_length = 2
checksum = "yes"
[ratelimit]
on_backend_error = "panic"
[[routes]]
name = "chat"
path = "v1/chat"
upstream = "ftp://x"
[unknown]
thing = 1
"#,
    )
    .unwrap();
    let (st, _, err) = cli(
        dir.path(),
        &["config", "check", "--config", file.to_str().unwrap()],
        None,
        &[("KEYWARD_SERVER__INTERNAL_LISTEN", "nowhere")],
    );
    assert!(!st.success());
    for path in [
        "server.listen",
        "server.internal_listen",
        "server.trusted_proxies[0]",
        "keys.random_length",
        "keys.checksum",
        "ratelimit.on_backend_error",
        "routes[0].path",
        "routes[0].upstream",
        "unknown.thing",
    ] {
        assert!(
            err.contains(&format!("- {path}:")),
            "{path} not reported:\n{err}"
        );
    }

    let (st, _, err) = cli(
        dir.path(),
        &["config", "check", "--config", "/nonexistent.toml"],
        None,
        &[],
    );
    assert!(!st.success());
    assert!(err.contains("does not exist"));
}
