//! The shared store for several nodes: one PostgreSQL database.
//!
//! Same tables, migrations (numbered alike) and behaviour as `sqlite.rs`, with the differences
//! that concurrency forces. SQLite runs one writer at a time; PostgreSQL runs transactions side
//! by side, so where SQLite's answer depended on that, a table lock restores it:
//! - `bootstrap` locks `orgs`, so two nodes starting on an empty database create one
//!   organisation, not two;
//! - every transaction that notes a key change locks `key_changes` first, so sequence numbers
//!   become visible in the order they were drawn and a poller never skips one (a sequence
//!   number is drawn at insert time but seen only at commit);
//! - `add_signing_key` locks `signing_keys`, so at most one key is ever active.
//!
//! The locks block writers of that table only; readers go on. Usage batches are merged and
//! sorted before they are written, so two nodes flushing at once lock rows in the same order.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::Timestamp;
use keyward_core::ids::{AuditId, KeyId, OrgId, UserId};
use keyward_core::key::{ApiKey, KeyState, SecretValidity};
use keyward_core::key_format::KeyHash;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Row};

use crate::codec::{
    ChangeKind, HASH_PAGE, MergedUsage, audit_from_row, hashes_from_rows, hashes_in_pages,
    ips_to_json, key_changes_from_rows, key_from_row, map_err, merge_usage, org_from_row, paginate,
    project_from_row, signing_key_from_row, sql_count, to_json, tolerating_newer, ts,
    usage_from_row, user_from_row,
};
use crate::{
    AuditEntry, Bootstrap, KeyChanges, KeyFilter, KeyLookup, Org, Page, PageRequest, Project,
    RevokeOutcome, Role, Rotation, SigningKeyRecord, Store, StoreError, StoreResult, UsageRow,
    User,
};

/// Connections per node. Storage is off the hot path (keys are cached, usage is batched), so a
/// few suffice, and many nodes can share one server's `max_connections`.
const MAX_CONNECTIONS: u32 = 8;

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// Written by hand: the pool's options hold the database password.
impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at a `postgres://` or `postgresql://` URL (which must exist).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unsupported(format!("store.url: {e}")))?
            .application_name("keyward")
            // Notices ("relation … already exists, skipping" at each start) are not news.
            .options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(map_err)?;
        Ok(Self { pool })
    }
}

/// Taken first by every transaction that notes a key change; see the module comment.
async fn lock_key_changes(conn: &mut PgConnection) -> StoreResult<()> {
    sqlx::query("LOCK TABLE key_changes IN SHARE ROW EXCLUSIVE MODE")
        .execute(conn)
        .await
        .map_err(map_err)?;
    Ok(())
}

const INSERT_AUDIT: &str = "INSERT INTO audit_log (id, org_id, actor, action, target, ip, details, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

async fn insert_audit<'c, E>(executor: E, entry: &AuditEntry) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query(INSERT_AUDIT)
        .bind(entry.id.as_str().to_owned())
        .bind(entry.org_id.as_str().to_owned())
        .bind(entry.actor.clone())
        .bind(entry.action.clone())
        .bind(entry.target.clone())
        .bind(entry.ip.clone())
        .bind(to_json(&entry.details)?)
        .bind(entry.created_at.as_millis())
        .execute(executor)
        .await
        .map_err(map_err)?;
    Ok(())
}

const INSERT_KEY: &str = "INSERT INTO api_keys (id, org_id, project_id, name, environment, hint, scopes, \
     expires_at, allowed_ips, blocked_ips, endpoint, quota_requests, quota_window, remaining, refill, \
     meta, created_at, created_by, last_used_at, revoked_at, previous_valid_until, credits_version) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, \
     $20, $21, $22)";

async fn insert_key<'c, E>(executor: E, key: &ApiKey) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query(INSERT_KEY)
        .bind(key.id.to_string())
        .bind(key.org_id.as_str().to_owned())
        .bind(key.project_id.as_str().to_owned())
        .bind(key.name.clone())
        .bind(key.environment.as_str())
        .bind(key.hint.clone())
        .bind(to_json(&key.scopes)?)
        .bind(key.expires_at.map(Timestamp::as_millis))
        .bind(ips_to_json(&key.allowed_ips)?)
        .bind(ips_to_json(&key.blocked_ips)?)
        .bind(key.endpoint.clone())
        .bind(i64::from(key.quota_requests))
        .bind(i64::from(key.quota_window))
        .bind(key.remaining)
        .bind(key.refill.as_ref().map(to_json).transpose()?)
        .bind(to_json(&key.meta)?)
        .bind(key.created_at.as_millis())
        .bind(key.created_by.clone())
        .bind(key.last_used_at.map(Timestamp::as_millis))
        .bind(key.revoked_at.map(Timestamp::as_millis))
        .bind(key.previous_valid_until.map(Timestamp::as_millis))
        .bind(key.credits_version)
        .execute(executor)
        .await
        .map_err(map_err)?;
    Ok(())
}

async fn insert_secret<'c, E>(
    executor: E,
    hash: &KeyHash,
    key_id: &KeyId,
    now: Timestamp,
) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query(
        "INSERT INTO key_secrets (hash, key_id, valid_until, created_at) VALUES ($1, $2, NULL, $3)",
    )
    .bind(hash.as_bytes().to_vec())
    .bind(key_id.to_string())
    .bind(now.as_millis())
    .execute(executor)
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn insert_project<'c, E>(executor: E, project: &Project) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query(
        "INSERT INTO projects (id, org_id, slug, name, key_prefix, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(project.id.as_str().to_owned())
    .bind(project.org_id.as_str().to_owned())
    .bind(project.slug.clone())
    .bind(project.name.clone())
    .bind(project.key_prefix.clone())
    .bind(project.created_at.as_millis())
    .execute(executor)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Notes a change; the transaction must hold the `key_changes` lock.
/// `key_id` as text: the leaked-secret sweep passes what the row holds.
async fn note_change<'c, E>(
    executor: E,
    key_id: &str,
    at: Timestamp,
    kind: ChangeKind,
) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query("INSERT INTO key_changes (key_id, at, created) VALUES ($1, $2, $3)")
        .bind(key_id)
        .bind(at.as_millis())
        .bind(kind.is_creation())
        .execute(executor)
        .await
        .map_err(map_err)?;
    Ok(())
}

const SELECT_KEY: &str = "SELECT * FROM api_keys WHERE org_id = $1 AND id = $2";

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> StoreResult<()> {
        // sqlx holds an advisory lock while it migrates, so nodes starting together take turns.
        tolerating_newer(sqlx::migrate!("./migrations/postgres"))
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))
    }

    async fn bootstrap(&self, b: &Bootstrap) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query("LOCK TABLE orgs IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let inserted = sqlx::query(
            "INSERT INTO orgs (id, name, tier, default_project_id, created_at) \
             SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM orgs)",
        )
        .bind(b.org.id.as_str().to_owned())
        .bind(b.org.name.clone())
        .bind(b.org.tier.clone())
        .bind(b.project.id.as_str().to_owned())
        .bind(b.org.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await.map_err(map_err)?;
            return Ok(false);
        }
        insert_project(&mut *tx, &b.project).await?;
        insert_key(&mut *tx, &b.key).await?;
        insert_secret(&mut *tx, &b.key_hash, &b.key.id, b.key.created_at).await?;
        insert_audit(&mut *tx, &b.audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn get_org(&self, id: &OrgId) -> StoreResult<Org> {
        let row = sqlx::query("SELECT * FROM orgs WHERE id = $1")
            .bind(id.as_str().to_owned())
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        org_from_row(&row)
    }

    async fn first_org(&self) -> StoreResult<Option<Org>> {
        let row = sqlx::query("SELECT * FROM orgs ORDER BY created_at, id LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(org_from_row).transpose()
    }

    async fn create_user(
        &self,
        user: &User,
        membership: Option<(&OrgId, Role)>,
        audit: &AuditEntry,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(user.id.as_str().to_owned())
        .bind(user.email.clone())
        .bind(user.password_hash.clone())
        .bind(user.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if let Some((org, role)) = membership {
            sqlx::query(
                "INSERT INTO memberships (org_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(org.as_str().to_owned())
            .bind(user.id.as_str().to_owned())
            .bind(role.as_str())
            .bind(user.created_at.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        insert_audit(&mut *tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_user(&self, id: &UserId) -> StoreResult<User> {
        let row = sqlx::query("SELECT * FROM users WHERE id = $1")
            .bind(id.as_str().to_owned())
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        user_from_row(&row)
    }

    async fn create_project(&self, project: &Project, audit: &AuditEntry) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_project(&mut *tx, project).await?;
        insert_audit(&mut *tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_project(&self, org: &OrgId, id_or_slug: &str) -> StoreResult<Project> {
        let row =
            sqlx::query("SELECT * FROM projects WHERE org_id = $1 AND (id = $2 OR slug = $2)")
                .bind(org.as_str().to_owned())
                .bind(id_or_slug.to_owned())
                .fetch_one(&self.pool)
                .await
                .map_err(map_err)?;
        project_from_row(&row)
    }

    async fn list_projects(&self, org: &OrgId, page: &PageRequest) -> StoreResult<Page<Project>> {
        let rows = sqlx::query(
            "SELECT * FROM projects WHERE org_id = $1 AND ($2::text IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(org.as_str().to_owned())
        .bind(page.before.clone())
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let items = rows
            .iter()
            .map(project_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page.limit, |p| p.id.to_string()))
    }

    async fn create_key(
        &self,
        key: &ApiKey,
        hash: &KeyHash,
        audit: &AuditEntry,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        lock_key_changes(&mut tx).await?;
        insert_key(&mut *tx, key).await?;
        insert_secret(&mut *tx, hash, &key.id, key.created_at).await?;
        note_change(
            &mut *tx,
            &key.id.to_string(),
            key.created_at,
            ChangeKind::Created,
        )
        .await?;
        insert_audit(&mut *tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_key(&self, org: &OrgId, id: &KeyId) -> StoreResult<ApiKey> {
        let row = sqlx::query(SELECT_KEY)
            .bind(org.as_str().to_owned())
            .bind(id.to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        key_from_row(&row)
    }

    async fn list_keys(
        &self,
        org: &OrgId,
        filter: &KeyFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> StoreResult<Page<ApiKey>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE org_id = $1 \
             AND ($2::text IS NULL OR project_id = $2) \
             AND ($3::text IS NULL OR id < $3) \
             AND (CASE $4::text \
                    WHEN 'active' THEN revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $5) \
                    WHEN 'revoked' THEN revoked_at IS NOT NULL \
                    WHEN 'expired' THEN revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at <= $5 \
                    ELSE TRUE END) \
             ORDER BY id DESC LIMIT $6",
        )
        .bind(org.as_str().to_owned())
        .bind(filter.project_id.as_ref().map(|p| p.as_str().to_owned()))
        .bind(page.before.clone())
        .bind(filter.state.map(KeyState::as_str))
        .bind(now.as_millis())
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let items = rows
            .iter()
            .map(key_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page.limit, |k| k.id.to_string()))
    }

    async fn update_key(&self, key: &ApiKey, audit: &AuditEntry) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        lock_key_changes(&mut tx).await?;
        let updated = sqlx::query(
            "UPDATE api_keys SET name = $1, expires_at = $2, allowed_ips = $3, blocked_ips = $4, \
             endpoint = $5, quota_requests = $6, quota_window = $7, remaining = $8, refill = $9, \
             meta = $10, credits_version = $11 \
             WHERE org_id = $12 AND id = $13 AND revoked_at IS NULL",
        )
        .bind(key.name.clone())
        .bind(key.expires_at.map(Timestamp::as_millis))
        .bind(ips_to_json(&key.allowed_ips)?)
        .bind(ips_to_json(&key.blocked_ips)?)
        .bind(key.endpoint.clone())
        .bind(i64::from(key.quota_requests))
        .bind(i64::from(key.quota_window))
        .bind(key.remaining)
        .bind(key.refill.as_ref().map(to_json).transpose()?)
        .bind(to_json(&key.meta)?)
        .bind(key.credits_version)
        .bind(key.org_id.as_str().to_owned())
        .bind(key.id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if updated == 0 {
            tx.rollback().await.map_err(map_err)?;
            self.get_key(&key.org_id, &key.id).await?;
            return Err(StoreError::Conflict("the key is revoked".into()));
        }
        note_change(
            &mut *tx,
            &key.id.to_string(),
            audit.created_at,
            ChangeKind::Changed,
        )
        .await?;
        insert_audit(&mut *tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn rotate_key(
        &self,
        org: &OrgId,
        id: &KeyId,
        rotation: &Rotation,
        audit: &AuditEntry,
    ) -> StoreResult<ApiKey> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        lock_key_changes(&mut tx).await?;
        let now = rotation.now.as_millis();
        let until = rotation.previous_valid_until.as_millis();
        let scopes = rotation.new_scopes.as_ref().map(to_json).transpose()?;
        let updated = sqlx::query(
            "UPDATE api_keys SET hint = $1, scopes = COALESCE($2, scopes), previous_valid_until = $3 \
             WHERE org_id = $4 AND id = $5 AND revoked_at IS NULL",
        )
        .bind(rotation.new_hint.clone())
        .bind(scopes)
        .bind(until)
        .bind(org.as_str().to_owned())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if updated == 0 {
            tx.rollback().await.map_err(map_err)?;
            self.get_key(org, id).await?;
            return Err(StoreError::Conflict("the key is revoked".into()));
        }
        // At most two live secrets: an older one still in grace ends now.
        sqlx::query(
            "UPDATE key_secrets SET valid_until = $1 \
             WHERE key_id = $2 AND valid_until IS NOT NULL AND valid_until > $1",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        sqlx::query(
            "UPDATE key_secrets SET valid_until = $1 WHERE key_id = $2 AND valid_until IS NULL",
        )
        .bind(until)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_secret(&mut *tx, &rotation.new_hash, id, rotation.now).await?;
        note_change(&mut *tx, &id.to_string(), rotation.now, ChangeKind::Changed).await?;
        insert_audit(&mut *tx, audit).await?;
        let row = sqlx::query(SELECT_KEY)
            .bind(org.as_str().to_owned())
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let key = key_from_row(&row)?;
        tx.commit().await.map_err(map_err)?;
        Ok(key)
    }

    async fn revoke_key(
        &self,
        org: &OrgId,
        id: &KeyId,
        now: Timestamp,
        audit: &AuditEntry,
    ) -> StoreResult<RevokeOutcome> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        lock_key_changes(&mut tx).await?;
        let updated = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 \
             WHERE org_id = $2 AND id = $3 AND revoked_at IS NULL",
        )
        .bind(now.as_millis())
        .bind(org.as_str().to_owned())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if updated == 0 {
            tx.rollback().await.map_err(map_err)?;
            self.get_key(org, id).await?;
            return Ok(RevokeOutcome::AlreadyRevoked);
        }
        note_change(&mut *tx, &id.to_string(), now, ChangeKind::Changed).await?;
        insert_audit(&mut *tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(RevokeOutcome::Revoked)
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> StoreResult<Option<KeyLookup>> {
        let row = sqlx::query(
            "SELECT k.*, s.valid_until AS secret_valid_until, o.tier AS org_tier FROM key_secrets s \
             JOIN api_keys k ON k.id = s.key_id JOIN orgs o ON o.id = k.org_id WHERE s.hash = $1",
        )
        .bind(hash.as_bytes().to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let valid_until: Option<i64> = row.try_get("secret_valid_until").map_err(map_err)?;
        Ok(Some(KeyLookup {
            key: key_from_row(&row)?,
            validity: SecretValidity {
                valid_until: ts(valid_until),
            },
            org_tier: row.try_get("org_tier").map_err(map_err)?,
        }))
    }

    async fn store_credits(&self, credits: &[(KeyId, i64, i64)]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        for (key_id, version, remaining) in credits {
            sqlx::query(
                "UPDATE api_keys SET remaining = $1 \
                 WHERE id = $2 AND credits_version = $3 AND remaining IS NOT NULL",
            )
            .bind(*remaining)
            .bind(key_id.to_string())
            .bind(*version)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn revoke_leaked(
        &self,
        hashes: &[KeyHash],
        now: Timestamp,
        actor: &str,
        ip: Option<&str>,
    ) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        lock_key_changes(&mut tx).await?;
        // The live keys the secrets belong to, each once, in id order (the order rows are
        // locked in everywhere a transaction changes several keys).
        let mut live = BTreeMap::new();
        for hash in hashes {
            let row = sqlx::query(
                "SELECT k.id, k.org_id FROM key_secrets s JOIN api_keys k ON k.id = s.key_id \
                 WHERE s.hash = $1 AND k.revoked_at IS NULL \
                 AND (k.expires_at IS NULL OR k.expires_at > $2) \
                 AND (s.valid_until IS NULL OR s.valid_until > $2)",
            )
            .bind(hash.as_bytes().to_vec())
            .bind(now.as_millis())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if let Some(row) = row {
                let key_id: String = row.try_get("id").map_err(map_err)?;
                let org_id: String = row.try_get("org_id").map_err(map_err)?;
                live.insert(key_id, org_id);
            }
        }
        let mut revoked = 0;
        for (key_id, org_id) in live {
            let updated = sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(now.as_millis())
            .bind(key_id.clone())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
            if updated == 0 {
                continue;
            }
            revoked += 1;
            note_change(&mut *tx, &key_id, now, ChangeKind::Changed).await?;
            let entry = AuditEntry {
                id: AuditId::generate(),
                org_id: OrgId::from_trusted(org_id),
                actor: actor.to_owned(),
                action: "key.revoked".into(),
                target: Some(key_id),
                ip: ip.map(str::to_owned),
                details: serde_json::json!({"reason": "leaked"}),
                created_at: now,
            };
            insert_audit(&mut *tx, &entry).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(revoked)
    }

    async fn key_changes_since(&self, after: i64) -> StoreResult<KeyChanges> {
        let rows = sqlx::query(
            "SELECT seq, key_id, created FROM key_changes WHERE seq > $1 ORDER BY seq LIMIT 10000",
        )
        .bind(after)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        key_changes_from_rows(&rows, after)
    }

    async fn key_changes_head(&self) -> StoreResult<i64> {
        sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM key_changes")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?
            .try_get("seq")
            .map_err(map_err)
    }

    async fn prune_key_changes(&self, before: Timestamp) -> StoreResult<()> {
        sqlx::query("DELETE FROM key_changes WHERE at < $1")
            .bind(before.as_millis())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn record_usage(
        &self,
        rows: &[UsageRow],
        last_used: &[(KeyId, Timestamp)],
    ) -> StoreResult<()> {
        // One statement per table whatever the batch size.
        let MergedUsage {
            counts: merged,
            last_used: latest,
        } = merge_usage(rows, last_used);
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        if !merged.is_empty() {
            let (mut keys, mut minutes) = (Vec::new(), Vec::new());
            let (mut allowed, mut unauthorized, mut forbidden, mut rate_limited) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((key_id, minute), counts) in &merged {
                keys.push(key_id.to_string());
                minutes.push(*minute);
                allowed.push(sql_count(counts.allowed));
                unauthorized.push(sql_count(counts.unauthorized));
                forbidden.push(sql_count(counts.forbidden));
                rate_limited.push(sql_count(counts.rate_limited));
            }
            sqlx::query(
                "INSERT INTO key_usage (key_id, minute, allowed, unauthorized, forbidden, rate_limited) \
                 SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], \
                 $5::bigint[], $6::bigint[]) \
                 ON CONFLICT (key_id, minute) DO UPDATE SET \
                 allowed = key_usage.allowed + EXCLUDED.allowed, \
                 unauthorized = key_usage.unauthorized + EXCLUDED.unauthorized, \
                 forbidden = key_usage.forbidden + EXCLUDED.forbidden, \
                 rate_limited = key_usage.rate_limited + EXCLUDED.rate_limited",
            )
            .bind(keys)
            .bind(minutes)
            .bind(allowed)
            .bind(unauthorized)
            .bind(forbidden)
            .bind(rate_limited)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        if !latest.is_empty() {
            let (keys, ats): (Vec<String>, Vec<i64>) =
                latest.iter().map(|(k, at)| (k.to_string(), *at)).unzip();
            sqlx::query(
                "UPDATE api_keys k SET last_used_at = u.at \
                 FROM UNNEST($1::text[], $2::bigint[]) AS u (id, at) \
                 WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
            )
            .bind(keys)
            .bind(ats)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn usage(
        &self,
        org: &OrgId,
        key: &KeyId,
        from: Timestamp,
        to: Timestamp,
    ) -> StoreResult<Vec<UsageRow>> {
        let rows = sqlx::query(
            "SELECT u.* FROM key_usage u JOIN api_keys k ON k.id = u.key_id \
             WHERE k.org_id = $1 AND u.key_id = $2 AND u.minute >= $3 AND u.minute < $4 \
             ORDER BY u.minute",
        )
        .bind(org.as_str().to_owned())
        .bind(key.to_string())
        .bind(from.as_millis())
        .bind(to.as_millis())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(|row| usage_from_row(row, key)).collect()
    }

    async fn set_org_tier(&self, org: &OrgId, tier: &str, audit: &AuditEntry) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        lock_key_changes(&mut tx).await?;
        let updated = sqlx::query("UPDATE orgs SET tier = $1 WHERE id = $2")
            .bind(tier.to_owned())
            .bind(org.as_str().to_owned())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if updated == 0 {
            tx.rollback().await.map_err(map_err)?;
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "INSERT INTO key_changes (key_id, at) SELECT id, $1 FROM api_keys WHERE org_id = $2",
        )
        .bind(audit.created_at.as_millis())
        .bind(org.as_str().to_owned())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_audit(&mut *tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn secret_hashes(&self, page: &mut (dyn FnMut(Vec<KeyHash>) + Send)) -> StoreResult<()> {
        let fetch = |after: Vec<u8>| async move {
            sqlx::query("SELECT hash FROM key_secrets WHERE hash > $1 ORDER BY hash LIMIT $2")
                .bind(after)
                .bind(sql_count(HASH_PAGE as u64))
                .fetch_all(&self.pool)
                .await
                .map_err(map_err)
        };
        hashes_in_pages(HASH_PAGE, fetch, page).await
    }

    async fn secret_hashes_of(&self, keys: &[KeyId]) -> StoreResult<Vec<KeyHash>> {
        let ids: Vec<String> = keys.iter().map(ToString::to_string).collect();
        let rows = sqlx::query("SELECT hash FROM key_secrets WHERE key_id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        hashes_from_rows(&rows)
    }

    async fn find_key_by_id(&self, id: &KeyId) -> StoreResult<Option<KeyLookup>> {
        let row = sqlx::query(
            "SELECT k.*, o.tier AS org_tier FROM api_keys k JOIN orgs o ON o.id = k.org_id \
             WHERE k.id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(KeyLookup {
            key: key_from_row(&row)?,
            validity: SecretValidity { valid_until: None },
            org_tier: row.try_get("org_tier").map_err(map_err)?,
        }))
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>> {
        let rows = sqlx::query("SELECT * FROM signing_keys ORDER BY created_at DESC, kid DESC")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(signing_key_from_row).collect()
    }

    async fn add_signing_key(&self, record: &SigningKeyRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(record.created_at.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(
            "INSERT INTO signing_keys (kid, algorithm, public_key, private_key, created_at, retired_at) \
             VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(record.kid.clone())
        .bind(record.algorithm.clone())
        .bind(record.public_key.clone())
        .bind(record.private_key.clone())
        .bind(record.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)
    }

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()> {
        insert_audit(&self.pool, entry).await
    }

    async fn list_audit(&self, org: &OrgId, page: &PageRequest) -> StoreResult<Page<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_log WHERE org_id = $1 AND ($2::text IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(org.as_str().to_owned())
        .bind(page.before.clone())
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let items = rows
            .iter()
            .map(audit_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page.limit, |a| a.id.to_string()))
    }
}
