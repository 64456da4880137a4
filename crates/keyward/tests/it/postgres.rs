//! `keyward serve` on PostgreSQL, with the CLI in local mode on the same database: what a
//! deployment of several nodes on one database relies on. Each test has its own database.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestServer, cli};
use crate::pg::PgDatabase;

fn json_out(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test]
async fn serve_on_postgres_creates_uses_and_revokes_keys() {
    let db = PgDatabase::create().await;
    let server = TestServer::start_with(&[("KEYWARD_STORE__URL", &db.url)]).await;
    assert!(
        server.mgmt_key.starts_with("kw_"),
        "the empty database was bootstrapped: {}",
        server.stderr()
    );

    let (id, secret) = server.create_key(json!({"name": "on postgres"})).await;
    let r = server
        .call(Method::GET, "/echo/hello", Some(&secret), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["path"], "/hello");

    let r = server
        .admin(Method::DELETE, &format!("/v1/keys/{id}"), None)
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    server
        .call(Method::GET, "/echo/hello", Some(&secret), None)
        .await
        .assert_error(401, "key_revoked");
    let shown = server
        .admin(Method::GET, &format!("/v1/keys/{id}"), None)
        .await;
    assert_eq!(shown.body["state"], "revoked", "{}", shown.text);

    drop(server);
    db.drop().await;
}

#[tokio::test]
async fn cli_changes_reach_a_server_on_the_same_postgres_within_a_second() {
    let db = PgDatabase::create().await;
    let env = [("KEYWARD_STORE__URL", db.url.as_str())];
    let server = TestServer::start_with(&env).await;
    let dir = server.dir.path();

    let (st, out, err) = cli(
        dir,
        &["keys", "create", "--name", "from the cli", "--json"],
        None,
        &env,
    );
    assert!(st.success(), "{err}");
    assert!(
        !err.contains("kw_live_"),
        "the CLI found the server's organisation, it did not bootstrap another: {err}"
    );
    let created = json_out(&out);
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["key"].as_str().unwrap().to_owned();
    let r = server
        .eventually(200, Method::GET, "/echo/hello", &secret)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The server now holds the key in its cache; a revocation by another process reaches it
    // through the change feed.
    let (st, _, err) = cli(dir, &["keys", "revoke", &id, "--json"], None, &env);
    assert!(st.success(), "{err}");
    let revoked_at = Instant::now();
    server
        .eventually(401, Method::GET, "/echo/hello", &secret)
        .await
        .assert_error(401, "key_revoked");
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_millis(1_500), "took {took:?}");

    drop(server);
    db.drop().await;
}
