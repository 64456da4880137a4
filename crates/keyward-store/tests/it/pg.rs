//! A fresh PostgreSQL database per test, on the server named by `KEYWARD_TEST_PG_URL` (the
//! role needs CREATEDB; `scripts/test` starts the server and creates the role). An unreachable
//! server fails the test: these tests are never skipped.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};

pub const DEFAULT_URL: &str = "postgres://keyward:keyward@127.0.0.1:5432/postgres";

pub struct PgDatabase {
    server: String,
    name: String,
    /// The database's own URL, for `keyward_store::open`.
    pub url: String,
}

fn server_url() -> String {
    std::env::var("KEYWARD_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// `url` with its database replaced by `name` (and its query kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{root}/{name}{query}")
}

/// The URL without its password, for messages.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split_once(':').map_or(user, |(name, _)| name);
            format!("{}{user}:…{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

async fn admin(server: &str) -> PgConnection {
    PgConnection::connect(server).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach the test PostgreSQL server at {} ({e}). Run scripts/test, which \
             starts it and creates the keyward role, or point KEYWARD_TEST_PG_URL at a server \
             where the role may CREATE DATABASE.",
            shown(server)
        )
    })
}

impl PgDatabase {
    pub async fn create() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "kw_test_{}_{nanos}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let server = server_url();
        let mut conn = admin(&server).await;
        // The name is ours: letters, digits and underscores.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {}: {e}", shown(&server)));
        let _ = conn.close().await;
        let url = with_database(&server, &name);
        Self { server, name, url }
    }

    /// Drops the database (connections still open to it are ended).
    pub async fn drop(self) {
        let mut conn = admin(&self.server).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("DROP DATABASE {}: {e}", self.name));
        let _ = conn.close().await;
    }
}

#[test]
fn urls_are_rewritten_and_shown_without_password() {
    assert_eq!(
        with_database(DEFAULT_URL, "kw_x"),
        "postgres://keyward:keyward@127.0.0.1:5432/kw_x"
    );
    assert_eq!(
        with_database("postgresql://u@h?sslmode=disable", "kw_x"),
        "postgresql://u@h/kw_x?sslmode=disable"
    );
    assert_eq!(
        shown(DEFAULT_URL),
        "postgres://keyward:…@127.0.0.1:5432/postgres"
    );
}
