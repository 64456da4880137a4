//! The storage contract: every backend must pass these same tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod contract;
mod pg;
mod postgres;

use std::sync::Arc;

use keyward_store::{PgStore, SqliteStore, Store};

async fn sqlite() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let url = format!("sqlite://{}/nested/keyward.db", dir.path().display());
    let store = SqliteStore::open(&url)
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
    (dir, Arc::new(store))
}

/// A migrated store on a fresh database; the database is dropped by the caller.
async fn postgres() -> (pg::PgDatabase, Arc<dyn Store>) {
    let db = pg::PgDatabase::create().await;
    let store = PgStore::open(&db.url)
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
    (db, Arc::new(store))
}

macro_rules! store_contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let (_dir, store) = super::sqlite().await;
                    super::contract::$name(store).await;
                }
            )*
        }

        mod postgres_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let (db, store) = super::postgres().await;
                    super::contract::$name(store).await;
                    db.drop().await;
                }
            )*
        }
    };
}

store_contract!(
    bootstrap_happens_once,
    key_lifecycle,
    rotation_keeps_at_most_two_live_secrets,
    listing_filters_and_paginates,
    leaked_secrets_revoke_live_keys_only,
    audit_log_is_append_only_and_ordered,
    unique_slugs_conflict,
    key_changes_are_fed_in_order,
    usage_batches_add_up,
    large_usage_batches_are_written_whole,
    secret_hashes_are_listed_and_creations_fed,
);

/// A key change naming an id keyward would never write (a hand-made row, a restore) names no
/// cached key, and failing on it would stop the feed, and every invalidation behind it.
async fn feed_skips_a_malformed_id(store: Arc<dyn Store>, insert: impl AsyncFn(&str)) {
    let start = store.key_changes_head().await.unwrap();
    let good = keyward_core::ids::KeyId::generate();
    insert("key_not-a-ulid").await;
    insert(&good.to_string().to_lowercase()).await;
    insert(&good.to_string()).await;
    let changes = store.key_changes_since(start).await.unwrap();
    assert_eq!(changes.changed, vec![good]);
    let later = store.key_changes_since(changes.next).await.unwrap();
    assert!(later.changed.is_empty() && later.created.is_empty());
}

#[tokio::test]
async fn sqlite_key_feed_skips_a_malformed_id() {
    let (dir, store) = sqlite().await;
    let url = format!("sqlite://{}/nested/keyward.db", dir.path().display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let insert = async |id: &str| {
        sqlx::query("INSERT INTO key_changes (key_id, at) VALUES (?, 0)")
            .bind(id.to_owned())
            .execute(&pool)
            .await
            .unwrap();
    };
    feed_skips_a_malformed_id(store, insert).await;
}

#[tokio::test]
async fn postgres_key_feed_skips_a_malformed_id() {
    let (db, store) = postgres().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let insert = async |id: &str| {
        sqlx::query("INSERT INTO key_changes (key_id, at) VALUES ($1, 0)")
            .bind(id.to_owned())
            .execute(&pool)
            .await
            .unwrap();
    };
    feed_skips_a_malformed_id(store, insert).await;
    pool.close().await;
    db.drop().await;
}

/// A node one release behind starts on a schema a newer release has migrated further (a
/// rolling upgrade, a rollback).
async fn an_older_node_starts_on_a_newer_schema(store: impl Store) {
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("an older node's migrate: {e}"));
    assert_eq!(store.key_changes_head().await.unwrap(), 0);
}

#[tokio::test]
async fn sqlite_an_older_node_starts_on_a_newer_schema() {
    let (dir, _) = sqlite().await;
    let url = format!("sqlite://{}/nested/keyward.db", dir.path().display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'a newer release', TRUE, x'00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    an_older_node_starts_on_a_newer_schema(SqliteStore::open(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_an_older_node_starts_on_a_newer_schema() {
    let (db, _) = postgres().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'a newer release', TRUE, '\\x00'::bytea, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    an_older_node_starts_on_a_newer_schema(PgStore::open(&db.url).await.unwrap()).await;
    pool.close().await;
    db.drop().await;
}
