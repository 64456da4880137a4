//! What both backends share: error mapping, JSON columns, and turning rows into domain values.
//! The two schemas have the same tables and columns, so one decoder per type serves both; only
//! the SQL text and the placeholders differ between `sqlite.rs` and `postgres.rs`.

use std::collections::BTreeMap;

use ipnet::IpNet;
use keyward_core::Timestamp;
use keyward_core::ids::{AuditId, KeyId, OrgId, ProjectId, UserId};
use keyward_core::key::ApiKey;
use keyward_core::key_format::{Environment, KeyHash};
use sqlx::Row;

use crate::{
    AuditEntry, KeyChanges, Org, Page, Project, SigningKeyRecord, StoreError, StoreResult,
    UsageCounts, UsageRow, User,
};

pub(crate) fn map_err(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(db.message().to_owned())
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(error.to_string())
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

/// A key id read back from storage; keyward writes only the canonical form.
pub(crate) fn key_id(text: &str) -> StoreResult<KeyId> {
    KeyId::parse(text).ok_or_else(|| corrupt("key id"))
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(column: &str, text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

pub(crate) fn ts(millis: Option<i64>) -> Option<Timestamp> {
    millis.map(Timestamp::from_millis)
}

pub(crate) fn ips_to_json(ips: &[IpNet]) -> StoreResult<String> {
    to_json(&ips.iter().map(ToString::to_string).collect::<Vec<_>>())
}

fn ips_from_json(column: &str, text: &str) -> StoreResult<Vec<IpNet>> {
    let raw: Vec<String> = from_json(column, text)?;
    raw.iter()
        .map(|s| s.parse().map_err(|_| corrupt(column)))
        .collect()
}

/// A counter read back from storage (never negative there).
fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A counter as storage holds it (signed 64-bit).
pub(crate) fn sql_count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Fetches `limit + 1` rows to learn whether another page follows.
pub(crate) fn paginate<T>(mut items: Vec<T>, limit: u32, id_of: impl Fn(&T) -> String) -> Page<T> {
    let limit = limit as usize;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(id_of)
    } else {
        None
    };
    Page { items, next_cursor }
}

/// The column types the schemas use, read from a row of either backend.
pub(crate) trait Columns {
    fn text(&self, column: &str) -> StoreResult<String>;
    fn opt_text(&self, column: &str) -> StoreResult<Option<String>>;
    fn int(&self, column: &str) -> StoreResult<i64>;
    fn opt_int(&self, column: &str) -> StoreResult<Option<i64>>;
    fn bytes(&self, column: &str) -> StoreResult<Vec<u8>>;
    fn flag(&self, column: &str) -> StoreResult<bool>;
}

macro_rules! impl_columns {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, column: &str) -> StoreResult<String> {
                self.try_get(column).map_err(map_err)
            }
            fn opt_text(&self, column: &str) -> StoreResult<Option<String>> {
                self.try_get(column).map_err(map_err)
            }
            fn int(&self, column: &str) -> StoreResult<i64> {
                self.try_get(column).map_err(map_err)
            }
            fn opt_int(&self, column: &str) -> StoreResult<Option<i64>> {
                self.try_get(column).map_err(map_err)
            }
            fn bytes(&self, column: &str) -> StoreResult<Vec<u8>> {
                self.try_get(column).map_err(map_err)
            }
            fn flag(&self, column: &str) -> StoreResult<bool> {
                self.try_get(column).map_err(map_err)
            }
        }
    };
}

impl_columns!(sqlx::sqlite::SqliteRow);
impl_columns!(sqlx::postgres::PgRow);

/// Migrations as every node runs them. A node one release behind may start on a schema a
/// newer node has migrated (a rolling upgrade, a rollback): migrations only ever add, so the
/// applied ones it does not know are ignored rather than refused.
pub(crate) fn tolerating_newer(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// What a row of `key_changes` records.
#[derive(Clone, Copy)]
pub(crate) enum ChangeKind {
    /// A key whose cached state is stale.
    Changed,
    /// A new key: nothing cached to drop, but nodes learn its secret from the feed.
    Created,
}

impl ChangeKind {
    pub(crate) fn is_creation(self) -> bool {
        matches!(self, Self::Created)
    }
}

/// Rows of `key_changes` (`seq`, `key_id`, `created`) read after `after`, in order.
pub(crate) fn key_changes_from_rows(rows: &[impl Columns], after: i64) -> StoreResult<KeyChanges> {
    let mut changes = KeyChanges {
        next: after,
        ..KeyChanges::default()
    };
    for row in rows {
        changes.next = row.int("seq")?;
        // No cached key has a non-canonical id, so such a row invalidates nothing; an error
        // here would stop the feed (and every invalidation) at this row.
        let Some(id) = KeyId::parse(&row.text("key_id")?) else {
            tracing::warn!(
                seq = changes.next,
                "skipping a key change with a malformed key id"
            );
            continue;
        };
        if row.flag("created")? {
            changes.created.push(id);
        } else {
            changes.changed.push(id);
        }
    }
    Ok(changes)
}

/// Secret hashes as stored (32-byte blobs); a row of any other length is skipped, not fatal.
pub(crate) fn hashes_from_rows(rows: &[impl Columns]) -> StoreResult<Vec<KeyHash>> {
    let mut hashes = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(hash) = KeyHash::from_slice(&row.bytes("hash")?) {
            hashes.push(hash);
        }
    }
    Ok(hashes)
}

/// Rows per page when every secret's hash is read.
pub(crate) const HASH_PAGE: usize = 10_000;

/// Reads every stored secret's hash in pages of `size` along the primary key (`fetch` gets
/// the last hash read, empty at first, and returns up to `size` rows after it) and hands each
/// page to `sink`: a million rows read at once would all sit in memory together.
pub(crate) async fn hashes_in_pages<R, F, Fut>(
    size: usize,
    mut fetch: F,
    sink: &mut (dyn FnMut(Vec<KeyHash>) + Send),
) -> StoreResult<()>
where
    R: Columns,
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = StoreResult<Vec<R>>>,
{
    let mut after = Vec::new();
    loop {
        let rows = fetch(after).await?;
        sink(hashes_from_rows(&rows)?);
        match rows.last() {
            Some(last) if rows.len() >= size => after = last.bytes("hash")?,
            _ => return Ok(()),
        }
    }
}

pub(crate) fn key_from_row(row: &impl Columns) -> StoreResult<ApiKey> {
    Ok(ApiKey {
        id: key_id(&row.text("id")?)?,
        org_id: OrgId::from_trusted(row.text("org_id")?),
        project_id: ProjectId::from_trusted(row.text("project_id")?),
        name: row.text("name")?,
        environment: Environment::parse(&row.text("environment")?)
            .ok_or_else(|| corrupt("environment"))?,
        hint: row.text("hint")?,
        scopes: from_json("scopes", &row.text("scopes")?)?,
        expires_at: ts(row.opt_int("expires_at")?),
        allowed_ips: ips_from_json("allowed_ips", &row.text("allowed_ips")?)?,
        blocked_ips: ips_from_json("blocked_ips", &row.text("blocked_ips")?)?,
        endpoint: row.opt_text("endpoint")?,
        quota_requests: u32::try_from(row.int("quota_requests")?)
            .map_err(|_| corrupt("quota_requests"))?,
        quota_window: u32::try_from(row.int("quota_window")?)
            .map_err(|_| corrupt("quota_window"))?,
        remaining: row.opt_int("remaining")?,
        refill: row
            .opt_text("refill")?
            .map(|r| from_json("refill", &r))
            .transpose()?,
        credits_version: row.int("credits_version")?,
        meta: from_json("meta", &row.text("meta")?)?,
        created_at: Timestamp::from_millis(row.int("created_at")?),
        created_by: row.text("created_by")?,
        last_used_at: ts(row.opt_int("last_used_at")?),
        revoked_at: ts(row.opt_int("revoked_at")?),
        previous_valid_until: ts(row.opt_int("previous_valid_until")?),
    })
}

pub(crate) fn project_from_row(row: &impl Columns) -> StoreResult<Project> {
    Ok(Project {
        id: ProjectId::from_trusted(row.text("id")?),
        org_id: OrgId::from_trusted(row.text("org_id")?),
        slug: row.text("slug")?,
        name: row.text("name")?,
        key_prefix: row.text("key_prefix")?,
        created_at: Timestamp::from_millis(row.int("created_at")?),
    })
}

pub(crate) fn org_from_row(row: &impl Columns) -> StoreResult<Org> {
    Ok(Org {
        id: OrgId::from_trusted(row.text("id")?),
        name: row.text("name")?,
        tier: row.text("tier")?,
        default_project_id: row
            .opt_text("default_project_id")?
            .map(ProjectId::from_trusted),
        created_at: Timestamp::from_millis(row.int("created_at")?),
    })
}

pub(crate) fn user_from_row(row: &impl Columns) -> StoreResult<User> {
    Ok(User {
        id: UserId::from_trusted(row.text("id")?),
        email: row.text("email")?,
        password_hash: row.opt_text("password_hash")?,
        created_at: Timestamp::from_millis(row.int("created_at")?),
    })
}

pub(crate) fn audit_from_row(row: &impl Columns) -> StoreResult<AuditEntry> {
    Ok(AuditEntry {
        id: AuditId::from_trusted(row.text("id")?),
        org_id: OrgId::from_trusted(row.text("org_id")?),
        actor: row.text("actor")?,
        action: row.text("action")?,
        target: row.opt_text("target")?,
        ip: row.opt_text("ip")?,
        details: from_json("details", &row.text("details")?)?,
        created_at: Timestamp::from_millis(row.int("created_at")?),
    })
}

pub(crate) fn signing_key_from_row(row: &impl Columns) -> StoreResult<SigningKeyRecord> {
    Ok(SigningKeyRecord {
        kid: row.text("kid")?,
        algorithm: row.text("algorithm")?,
        public_key: row.bytes("public_key")?,
        private_key: row.bytes("private_key")?,
        created_at: Timestamp::from_millis(row.int("created_at")?),
        retired_at: ts(row.opt_int("retired_at")?),
    })
}

pub(crate) fn usage_from_row(row: &impl Columns, key: &KeyId) -> StoreResult<UsageRow> {
    Ok(UsageRow {
        key_id: *key,
        minute: Timestamp::from_millis(row.int("minute")?),
        counts: UsageCounts {
            allowed: count(row.int("allowed")?),
            unauthorized: count(row.int("unauthorized")?),
            forbidden: count(row.int("forbidden")?),
            rate_limited: count(row.int("rate_limited")?),
        },
    })
}

/// A usage flush, merged: counts per (key, minute) and the latest use per key. Sorted, so
/// concurrent flushes touch rows in the same order, and without duplicates, which a multi-row
/// upsert may not contain in PostgreSQL (and one upsert after another would add them up).
pub(crate) struct MergedUsage {
    pub counts: BTreeMap<(KeyId, i64), UsageCounts>,
    pub last_used: BTreeMap<KeyId, i64>,
}

pub(crate) fn merge_usage(rows: &[UsageRow], last_used: &[(KeyId, Timestamp)]) -> MergedUsage {
    let mut counts: BTreeMap<(KeyId, i64), UsageCounts> = BTreeMap::new();
    for row in rows {
        counts
            .entry((row.key_id, row.minute.as_millis()))
            .or_default()
            .add(&row.counts);
    }
    let mut latest: BTreeMap<KeyId, i64> = BTreeMap::new();
    for (key_id, at) in last_used {
        let entry = latest.entry(*key_id).or_insert(i64::MIN);
        *entry = (*entry).max(at.as_millis());
    }
    MergedUsage {
        counts,
        last_used: latest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of the store below: a secret's hash and nothing else.
    struct HashRow(Vec<u8>);

    impl Columns for HashRow {
        fn text(&self, column: &str) -> StoreResult<String> {
            Err(corrupt(column))
        }
        fn opt_text(&self, column: &str) -> StoreResult<Option<String>> {
            Err(corrupt(column))
        }
        fn int(&self, column: &str) -> StoreResult<i64> {
            Err(corrupt(column))
        }
        fn opt_int(&self, column: &str) -> StoreResult<Option<i64>> {
            Err(corrupt(column))
        }
        fn bytes(&self, _: &str) -> StoreResult<Vec<u8>> {
            Ok(self.0.clone())
        }
        fn flag(&self, column: &str) -> StoreResult<bool> {
            Err(corrupt(column))
        }
    }

    #[tokio::test]
    async fn hashes_are_read_page_by_page_along_the_key() {
        let mut stored: Vec<Vec<u8>> = (0..5u8)
            .map(|n| KeyHash::of(&[n; 40]).as_bytes().to_vec())
            .collect();
        stored.sort();
        let mut asked = Vec::new();
        let fetch = |after: Vec<u8>| {
            let page: Vec<HashRow> = stored
                .iter()
                .filter(|hash| **hash > after)
                .take(2)
                .cloned()
                .map(HashRow)
                .collect();
            asked.push(after);
            async move { Ok(page) }
        };
        let mut pages: Vec<Vec<KeyHash>> = Vec::new();
        hashes_in_pages(2, fetch, &mut |page| pages.push(page))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        let read: Vec<Vec<u8>> = pages
            .iter()
            .flatten()
            .map(|h| h.as_bytes().to_vec())
            .collect();
        assert_eq!(read, stored);
        // Two full pages, then a short one ends it.
        assert_eq!(asked, [vec![], stored[1].clone(), stored[3].clone()]);
    }
}
