//! keyward's storage: the [`Store`] trait every backend implements, the embedded SQLite
//! backend and the PostgreSQL one (several nodes on one database).
//!
//! Mutations that users can see take the [`AuditEntry`] that describes them and write both in
//! one transaction, so the audit log never misses a change nor records one that failed.

use std::sync::Arc;

use async_trait::async_trait;
use keyward_core::Timestamp;
use keyward_core::ids::{AuditId, KeyId, OrgId, ProjectId, UserId};
use keyward_core::key::{ApiKey, KeyState, SecretValidity};
use keyward_core::key_format::KeyHash;

mod codec;
mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported store url: {0}")]
    Unsupported(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq)]
pub struct Org {
    pub id: OrgId,
    pub name: String,
    pub tier: String,
    pub default_project_id: Option<ProjectId>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub id: ProjectId,
    pub org_id: OrgId,
    pub slug: String,
    pub name: String,
    /// The validated prefix template, e.g. `kw_{env}_`.
    pub key_prefix: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
        }
    }

    pub fn parse(input: &str) -> Option<Self> {
        match input {
            "owner" => Some(Self::Owner),
            "admin" => Some(Self::Admin),
            "member" => Some(Self::Member),
            _ => None,
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct User {
    pub id: UserId,
    pub email: String,
    /// PHC string (argon2id); never the password.
    pub password_hash: Option<String>,
    pub created_at: Timestamp,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("password_hash", &self.password_hash.as_ref().map(|_| "…"))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub id: AuditId,
    pub org_id: OrgId,
    /// Who acted: `usr_…`, `key_…`, `cli` or `system`.
    pub actor: String,
    /// What happened, e.g. `key.created`.
    pub action: String,
    /// What it happened to, e.g. `key_…`.
    pub target: Option<String>,
    pub ip: Option<String>,
    pub details: serde_json::Value,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub limit: u32,
    /// Return items whose id sorts before this one (lists are newest first).
    pub before: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub project_id: Option<ProjectId>,
    pub state: Option<KeyState>,
}

/// A rotation: the new secret's hash and hint, and when the previous secret stops working.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub new_hash: KeyHash,
    pub new_hint: String,
    pub new_scopes: Option<Vec<String>>,
    pub previous_valid_until: Timestamp,
    pub now: Timestamp,
}

/// Requests of one key in one minute, by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageCounts {
    pub allowed: u64,
    pub unauthorized: u64,
    pub forbidden: u64,
    pub rate_limited: u64,
}

impl UsageCounts {
    pub fn add(&mut self, other: &UsageCounts) {
        self.allowed += other.allowed;
        self.unauthorized += other.unauthorized;
        self.forbidden += other.forbidden;
        self.rate_limited += other.rate_limited;
    }

    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub key_id: KeyId,
    /// Start of the minute.
    pub minute: Timestamp,
    pub counts: UsageCounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    Revoked,
    AlreadyRevoked,
}

/// A stretch of the key change feed, in order; a key may appear more than once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyChanges {
    /// Keys whose cached state is stale: dropped from every cache.
    pub changed: Vec<KeyId>,
    /// Keys created: nothing cached to drop, but new secrets to learn.
    pub created: Vec<KeyId>,
    /// The sequence number to pass next time.
    pub next: i64,
}

/// What the data plane needs to know about a secret.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLookup {
    pub key: ApiKey,
    pub validity: SecretValidity,
    pub org_tier: String,
}

/// A key that signs keyward's JWTs; `private_key` is encrypted with the master key.
#[derive(Clone, PartialEq)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub algorithm: String,
    pub public_key: Vec<u8>,
    pub private_key: Vec<u8>,
    pub created_at: Timestamp,
    pub retired_at: Option<Timestamp>,
}

impl std::fmt::Debug for SigningKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

/// The first organisation, project and management key of an empty store.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub org: Org,
    pub project: Project,
    pub key: ApiKey,
    pub key_hash: KeyHash,
    pub audit: AuditEntry,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations; applied ones it does not know (a newer release's) are
    /// ignored. So a migration may only add: an older node must keep working after it.
    async fn migrate(&self) -> StoreResult<()>;

    /// Writes `bootstrap` only if the store holds no organisation yet; says whether it did.
    async fn bootstrap(&self, bootstrap: &Bootstrap) -> StoreResult<bool>;

    async fn get_org(&self, id: &OrgId) -> StoreResult<Org>;
    /// The oldest organisation: what local CLI commands act on by default.
    async fn first_org(&self) -> StoreResult<Option<Org>>;

    async fn create_user(
        &self,
        user: &User,
        membership: Option<(&OrgId, Role)>,
        audit: &AuditEntry,
    ) -> StoreResult<()>;
    async fn get_user(&self, id: &UserId) -> StoreResult<User>;

    async fn create_project(&self, project: &Project, audit: &AuditEntry) -> StoreResult<()>;
    /// By id (`proj_…`) or slug, within one organisation.
    async fn get_project(&self, org: &OrgId, id_or_slug: &str) -> StoreResult<Project>;
    async fn list_projects(&self, org: &OrgId, page: &PageRequest) -> StoreResult<Page<Project>>;

    async fn create_key(&self, key: &ApiKey, hash: &KeyHash, audit: &AuditEntry)
    -> StoreResult<()>;
    async fn get_key(&self, org: &OrgId, id: &KeyId) -> StoreResult<ApiKey>;
    async fn list_keys(
        &self,
        org: &OrgId,
        filter: &KeyFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> StoreResult<Page<ApiKey>>;
    /// Writes the mutable fields of a key that is not revoked.
    async fn update_key(&self, key: &ApiKey, audit: &AuditEntry) -> StoreResult<()>;
    async fn rotate_key(
        &self,
        org: &OrgId,
        id: &KeyId,
        rotation: &Rotation,
        audit: &AuditEntry,
    ) -> StoreResult<ApiKey>;
    /// Idempotent: revoking twice is not an error, and is audited once.
    async fn revoke_key(
        &self,
        org: &OrgId,
        id: &KeyId,
        now: Timestamp,
        audit: &AuditEntry,
    ) -> StoreResult<RevokeOutcome>;
    /// Resolves a secret's hash to its key, whatever the key's state.
    async fn find_by_hash(&self, hash: &KeyHash) -> StoreResult<Option<KeyLookup>>;
    /// Writes back live credit counts `(key, credits_version, remaining)`; a count whose
    /// version is no longer the key's (a person set new credits meanwhile) is dropped.
    async fn store_credits(&self, credits: &[(KeyId, i64, i64)]) -> StoreResult<()>;
    /// Revokes every live key among `hashes`, auditing each in its own organisation with
    /// `actor`; returns how many were revoked.
    async fn revoke_leaked(
        &self,
        hashes: &[KeyHash],
        now: Timestamp,
        actor: &str,
        ip: Option<&str>,
    ) -> StoreResult<u64>;

    /// The newest change's sequence number (0 when there is none). A node follows the feed
    /// from here, read before it caches anything: older changes concern nothing it holds.
    async fn key_changes_head(&self) -> StoreResult<i64>;
    /// Keys changed or created after `after` (a sequence number from
    /// [`Store::key_changes_head`] or an earlier call), and the sequence number to pass next
    /// time.
    async fn key_changes_since(&self, after: i64) -> StoreResult<KeyChanges>;
    /// Drops change records older than `before`.
    async fn prune_key_changes(&self, before: Timestamp) -> StoreResult<()>;

    /// Adds a batch of usage counts and advances `last_used_at`, in one transaction.
    async fn record_usage(
        &self,
        rows: &[UsageRow],
        last_used: &[(KeyId, Timestamp)],
    ) -> StoreResult<()>;
    /// Minute rows of one key in `[from, to)`, oldest first.
    async fn usage(
        &self,
        org: &OrgId,
        key: &KeyId,
        from: Timestamp,
        to: Timestamp,
    ) -> StoreResult<Vec<UsageRow>>;

    /// Sets an organisation's tier; every key of the organisation is noted as changed so that
    /// caches pick up the new limits.
    async fn set_org_tier(&self, org: &OrgId, tier: &str, audit: &AuditEntry) -> StoreResult<()>;

    /// Resolves a key by id (for JWTs, which name their key), with its organisation's tier.
    async fn find_key_by_id(&self, id: &KeyId) -> StoreResult<Option<KeyLookup>>;
    /// Hands every stored secret's hash to `page`, a page at a time, whatever its validity (a
    /// superset is all a node's filter of stored hashes needs), for a node under a flood of
    /// unknown keys. Pages, so that a million hashes never sit in memory at once.
    async fn secret_hashes(&self, page: &mut (dyn FnMut(Vec<KeyHash>) + Send)) -> StoreResult<()>;
    /// The hashes of these keys' secrets: the change feed names keys, not secrets.
    async fn secret_hashes_of(&self, keys: &[KeyId]) -> StoreResult<Vec<KeyHash>>;

    /// Every signing key, newest first.
    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>>;
    /// Adds a signing key and retires every active one at `record.created_at`.
    async fn add_signing_key(&self, record: &SigningKeyRecord) -> StoreResult<()>;

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()>;
    async fn list_audit(&self, org: &OrgId, page: &PageRequest) -> StoreResult<Page<AuditEntry>>;
}

/// Opens the store named by a `store.url`.
pub async fn open(url: &str) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::open(url).await?))
    } else {
        Err(StoreError::Unsupported(
            "store.url must start with sqlite: or postgres://".into(),
        ))
    }
}
