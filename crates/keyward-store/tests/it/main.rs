//! The storage contract: every backend must pass these same tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod contract;

use std::sync::Arc;

use keyward_store::{SqliteStore, Store};

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

macro_rules! sqlite_contract {
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
    };
}

sqlite_contract!(
    bootstrap_happens_once,
    key_lifecycle,
    rotation_keeps_at_most_two_live_secrets,
    listing_filters_and_paginates,
    leaked_secrets_revoke_live_keys_only,
    audit_log_is_append_only_and_ordered,
    unique_slugs_conflict,
    key_changes_are_fed_in_order,
    usage_batches_add_up,
);
