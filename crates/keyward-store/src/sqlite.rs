//! The embedded default store: one SQLite file in WAL mode.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::Timestamp;
use keyward_core::ids::{AuditId, KeyId, OrgId, UserId};
use keyward_core::key::{ApiKey, KeyState, SecretValidity};
use keyward_core::key_format::KeyHash;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::codec::{
    ChangeKind, HASH_PAGE, audit_from_row, hashes_from_rows, hashes_in_pages, ips_to_json,
    key_changes_from_rows, key_from_row, map_err, merge_usage, org_from_row, paginate,
    project_from_row, signing_key_from_row, sql_count, to_json, tolerating_newer, ts,
    usage_from_row, user_from_row,
};
use crate::{
    AuditEntry, Bootstrap, KeyChanges, KeyFilter, KeyLookup, Org, Page, PageRequest, Project,
    RevokeOutcome, Role, Rotation, SigningKeyRecord, Store, StoreError, StoreResult, UsageRow,
    User,
};

/// Rows per multi-row statement: 6 parameters each, well under SQLite's 32,766.
const ROWS_PER_STATEMENT: usize = 1_000;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at a `sqlite:` URL, creating its directory.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unsupported(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
            && !Path::new(dir).exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(map_err)?;
        Ok(Self { pool })
    }
}

const INSERT_AUDIT: &str = "INSERT INTO audit_log (id, org_id, actor, action, target, ip, details, created_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

async fn insert_audit<'c, E>(executor: E, entry: &AuditEntry) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
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
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

async fn insert_key<'c, E>(executor: E, key: &ApiKey) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
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
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query(
        "INSERT INTO key_secrets (hash, key_id, valid_until, created_at) VALUES (?, ?, NULL, ?)",
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
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query(
        "INSERT INTO projects (id, org_id, slug, name, key_prefix, created_at) VALUES (?, ?, ?, ?, ?, ?)",
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

/// `key_id` as text: the leaked-secret sweep passes what the row holds.
async fn note_change<'c, E>(
    executor: E,
    key_id: &str,
    at: Timestamp,
    kind: ChangeKind,
) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query("INSERT INTO key_changes (key_id, at, created) VALUES (?, ?, ?)")
        .bind(key_id)
        .bind(at.as_millis())
        .bind(kind.is_creation())
        .execute(executor)
        .await
        .map_err(map_err)?;
    Ok(())
}

const SELECT_KEY: &str = "SELECT * FROM api_keys WHERE org_id = ? AND id = ?";

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        tolerating_newer(sqlx::migrate!("./migrations/sqlite"))
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))
    }

    async fn bootstrap(&self, b: &Bootstrap) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let inserted = sqlx::query(
            "INSERT INTO orgs (id, name, tier, default_project_id, created_at) \
             SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM orgs)",
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
        let row = sqlx::query("SELECT * FROM orgs WHERE id = ?")
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
        sqlx::query("INSERT INTO users (id, email, password_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(user.id.as_str().to_owned())
            .bind(user.email.clone())
            .bind(user.password_hash.clone())
            .bind(user.created_at.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if let Some((org, role)) = membership {
            sqlx::query(
                "INSERT INTO memberships (org_id, user_id, role, created_at) VALUES (?, ?, ?, ?)",
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
        let row = sqlx::query("SELECT * FROM users WHERE id = ?")
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
        let row = sqlx::query("SELECT * FROM projects WHERE org_id = ? AND (id = ? OR slug = ?)")
            .bind(org.as_str().to_owned())
            .bind(id_or_slug.to_owned())
            .bind(id_or_slug.to_owned())
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        project_from_row(&row)
    }

    async fn list_projects(&self, org: &OrgId, page: &PageRequest) -> StoreResult<Page<Project>> {
        let rows = sqlx::query(
            "SELECT * FROM projects WHERE org_id = ? AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
        )
        .bind(org.as_str().to_owned())
        .bind(page.before.clone())
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
            "SELECT * FROM api_keys WHERE org_id = ?1 \
             AND (?2 IS NULL OR project_id = ?2) \
             AND (?3 IS NULL OR id < ?3) \
             AND (CASE ?4 \
                    WHEN 'active' THEN revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?5) \
                    WHEN 'revoked' THEN revoked_at IS NOT NULL \
                    WHEN 'expired' THEN revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at <= ?5 \
                    ELSE 1 END) \
             ORDER BY id DESC LIMIT ?6",
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
        let updated = sqlx::query(
            "UPDATE api_keys SET name = ?, expires_at = ?, allowed_ips = ?, blocked_ips = ?, \
             endpoint = ?, quota_requests = ?, quota_window = ?, remaining = ?, refill = ?, meta = ?, \
             credits_version = ? WHERE org_id = ? AND id = ? AND revoked_at IS NULL",
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
        let now = rotation.now.as_millis();
        let until = rotation.previous_valid_until.as_millis();
        let scopes = rotation.new_scopes.as_ref().map(to_json).transpose()?;
        let updated = sqlx::query(
            "UPDATE api_keys SET hint = ?, scopes = COALESCE(?, scopes), previous_valid_until = ? \
             WHERE org_id = ? AND id = ? AND revoked_at IS NULL",
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
            "UPDATE key_secrets SET valid_until = ? \
             WHERE key_id = ? AND valid_until IS NOT NULL AND valid_until > ?",
        )
        .bind(now)
        .bind(id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        sqlx::query(
            "UPDATE key_secrets SET valid_until = ? WHERE key_id = ? AND valid_until IS NULL",
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
        let updated = sqlx::query(
            "UPDATE api_keys SET revoked_at = ? WHERE org_id = ? AND id = ? AND revoked_at IS NULL",
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
             JOIN api_keys k ON k.id = s.key_id JOIN orgs o ON o.id = k.org_id WHERE s.hash = ?",
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
                "UPDATE api_keys SET remaining = ? WHERE id = ? AND credits_version = ? AND remaining IS NOT NULL",
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
        let mut revoked = 0;
        for hash in hashes {
            let row = sqlx::query(
                "SELECT k.id, k.org_id FROM key_secrets s JOIN api_keys k ON k.id = s.key_id \
                 WHERE s.hash = ?1 AND k.revoked_at IS NULL \
                 AND (k.expires_at IS NULL OR k.expires_at > ?2) \
                 AND (s.valid_until IS NULL OR s.valid_until > ?2)",
            )
            .bind(hash.as_bytes().to_vec())
            .bind(now.as_millis())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            let Some(row) = row else { continue };
            let key_id: String = row.try_get("id").map_err(map_err)?;
            let org_id: String = row.try_get("org_id").map_err(map_err)?;
            let updated = sqlx::query(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
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
            "SELECT seq, key_id, created FROM key_changes WHERE seq > ? ORDER BY seq LIMIT 10000",
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
        sqlx::query("DELETE FROM key_changes WHERE at < ?")
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
        // Multi-row statements: one statement per row cost ~50 µs of CPU each, so flushing
        // 10,000 busy keys took half a second every `usage.flush_seconds`.
        let merged = merge_usage(rows, last_used);
        let counts: Vec<_> = merged.counts.into_iter().collect();
        let latest: Vec<_> = merged.last_used.into_iter().collect();
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        for chunk in counts.chunks(ROWS_PER_STATEMENT) {
            let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO key_usage (key_id, minute, allowed, unauthorized, forbidden, rate_limited) ",
            );
            insert.push_values(chunk, |mut row, ((key_id, minute), counts)| {
                row.push_bind(key_id.to_string())
                    .push_bind(*minute)
                    .push_bind(sql_count(counts.allowed))
                    .push_bind(sql_count(counts.unauthorized))
                    .push_bind(sql_count(counts.forbidden))
                    .push_bind(sql_count(counts.rate_limited));
            });
            insert.push(
                " ON CONFLICT (minute, key_id) DO UPDATE SET \
                 allowed = allowed + excluded.allowed, \
                 unauthorized = unauthorized + excluded.unauthorized, \
                 forbidden = forbidden + excluded.forbidden, \
                 rate_limited = rate_limited + excluded.rate_limited",
            );
            insert.build().execute(&mut *tx).await.map_err(map_err)?;
        }
        for chunk in latest.chunks(ROWS_PER_STATEMENT) {
            let mut update = sqlx::QueryBuilder::<sqlx::Sqlite>::new("WITH used (id, at) AS (");
            update.push_values(chunk, |mut row, (key_id, at)| {
                row.push_bind(key_id.to_string()).push_bind(*at);
            });
            update.push(
                ") UPDATE api_keys SET last_used_at = used.at FROM used \
                 WHERE api_keys.id = used.id \
                 AND (api_keys.last_used_at IS NULL OR api_keys.last_used_at < used.at)",
            );
            update.build().execute(&mut *tx).await.map_err(map_err)?;
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
             WHERE k.org_id = ? AND u.key_id = ? AND u.minute >= ? AND u.minute < ? ORDER BY u.minute",
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
        let updated = sqlx::query("UPDATE orgs SET tier = ? WHERE id = ?")
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
            "INSERT INTO key_changes (key_id, at) SELECT id, ? FROM api_keys WHERE org_id = ?",
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
            sqlx::query("SELECT hash FROM key_secrets WHERE hash > ? ORDER BY hash LIMIT ?")
                .bind(after)
                .bind(sql_count(HASH_PAGE as u64))
                .fetch_all(&self.pool)
                .await
                .map_err(map_err)
        };
        hashes_in_pages(HASH_PAGE, fetch, page).await
    }

    async fn secret_hashes_of(&self, keys: &[KeyId]) -> StoreResult<Vec<KeyHash>> {
        // The ids as one JSON array: one statement and one bound parameter, however many.
        let ids: Vec<String> = keys.iter().map(ToString::to_string).collect();
        let ids = serde_json::Value::from(ids).to_string();
        let rows = sqlx::query(
            "SELECT hash FROM key_secrets WHERE key_id IN (SELECT value FROM json_each(?))",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        hashes_from_rows(&rows)
    }

    async fn find_key_by_id(&self, id: &KeyId) -> StoreResult<Option<KeyLookup>> {
        let row = sqlx::query(
            "SELECT k.*, o.tier AS org_tier FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.id = ?",
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
        sqlx::query("UPDATE signing_keys SET retired_at = ? WHERE retired_at IS NULL")
            .bind(record.created_at.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(
            "INSERT INTO signing_keys (kid, algorithm, public_key, private_key, created_at, retired_at) \
             VALUES (?, ?, ?, ?, ?, NULL)",
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
            "SELECT * FROM audit_log WHERE org_id = ? AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
        )
        .bind(org.as_str().to_owned())
        .bind(page.before.clone())
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
