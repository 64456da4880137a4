//! The key lifecycle and project management: validation, secret generation, audit entries.
//! Shared by the management API and the local CLI, so both behave the same.

use std::net::IpAddr;

use ipnet::IpNet;
use keyward_core::ErrorCode;
use keyward_core::Timestamp;
use keyward_core::ids::{AuditId, KeyId, OrgId, ProjectId};
use keyward_core::ip;
use keyward_core::key::{
    self, ApiKey, DEFAULT_GRACE_SECONDS, KeyState, MAX_GRACE_SECONDS, Refill, RefillInterval,
};
use keyward_core::key_format::{self, Environment, KeyHash, PrefixTemplate};
use keyward_store::{AuditEntry, Project, RevokeOutcome, Rotation, StoreError};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_IP_RULES: usize = 100;
pub const MAX_SCOPES: usize = 32;
pub const MAX_META_BYTES: usize = 16 * 1024;
pub const MAX_QUOTA_REQUESTS: u32 = 1_000_000_000;
/// Credits and refill amounts: a quadrillion, below 2^53, so Redis' Lua (whose numbers are
/// doubles) holds them exactly.
pub const MAX_CREDITS: i64 = 1_000_000_000_000_000;
pub const MAX_QUOTA_WINDOW: u32 = 30 * 24 * 60 * 60;
pub const MAX_LEAK_REPORT: usize = 1_000;

/// Who performs an operation, as the audit log records it.
#[derive(Debug, Clone)]
pub struct Actor {
    /// `key_…` for an API key, `usr_…` for a person, `cli` for local commands.
    pub id: String,
    pub org_id: OrgId,
    pub ip: Option<IpAddr>,
}

impl Actor {
    fn audit(
        &self,
        action: &str,
        target: Option<String>,
        details: Value,
        now: Timestamp,
    ) -> AuditEntry {
        AuditEntry {
            id: AuditId::generate(),
            org_id: self.org_id.clone(),
            actor: self.id.clone(),
            action: action.to_owned(),
            target,
            ip: self.ip.map(|ip| ip.to_string()),
            details,
            created_at: now,
        }
    }
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn nullable<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyInput {
    /// Project id or slug; the organisation's default project when absent.
    pub project: Option<String>,
    pub name: Option<String>,
    pub environment: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub expires_at: Option<String>,
    pub allowed_ips: Option<Vec<String>>,
    pub blocked_ips: Option<Vec<String>>,
    pub endpoint: Option<String>,
    pub quota_requests: Option<u32>,
    pub quota_window: Option<u32>,
    pub remaining: Option<i64>,
    pub refill: Option<Refill>,
    pub meta: Option<Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyInput {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at: Option<Option<String>>,
    pub allowed_ips: Option<Vec<String>>,
    pub blocked_ips: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub endpoint: Option<Option<String>>,
    pub quota_requests: Option<u32>,
    pub quota_window: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub remaining: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    pub refill: Option<Option<Refill>>,
    pub meta: Option<Map<String, Value>>,
    /// Accepted only to answer 422 `scopes_immutable`.
    #[serde(default, deserialize_with = "nullable")]
    pub scopes: Option<Option<Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKeyInput {
    pub grace_seconds: Option<i64>,
    pub scopes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectInput {
    pub slug: String,
    pub name: Option<String>,
    /// Prefix template for the project's keys, e.g. `xero_{project}_`.
    pub key_prefix: Option<String>,
}

fn validate_name(name: &str) -> ApiResult<String> {
    if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ApiError::validation(
            "name",
            format!("`name` is at most {MAX_NAME_CHARS} characters, without control characters."),
        ));
    }
    Ok(name.to_owned())
}

fn validate_ips(field: &str, rules: &[String]) -> ApiResult<Vec<IpNet>> {
    if rules.len() > MAX_IP_RULES {
        return Err(ApiError::validation(
            field,
            format!("`{field}` holds at most {MAX_IP_RULES} entries."),
        ));
    }
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            ip::parse_rule(rule).map_err(|_| {
                ApiError::validation(
                    format!("{field}[{i}]"),
                    format!("`{field}[{i}]` is not a valid IP address or CIDR network."),
                )
            })
        })
        .collect()
}

fn validate_scopes(state: &AppState, field: &str, scopes: &[String]) -> ApiResult<Vec<String>> {
    if scopes.is_empty() || scopes.len() > MAX_SCOPES {
        return Err(ApiError::validation(
            field,
            format!("`{field}` needs 1 to {MAX_SCOPES} scopes."),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for (i, scope) in scopes.iter().enumerate() {
        if !state.config.keys.scopes.contains(scope) {
            return Err(ApiError::validation(
                format!("{field}[{i}]"),
                format!(
                    "`{field}[{i}]` is not a known scope; known scopes: {}.",
                    state.config.keys.scopes.join(", ")
                ),
            ));
        }
        if !out.contains(scope) {
            out.push(scope.clone());
        }
    }
    Ok(out)
}

fn validate_expiry(raw: &str, now: Timestamp) -> ApiResult<Timestamp> {
    let at = Timestamp::parse_rfc3339(raw).ok_or_else(|| {
        ApiError::validation(
            "expires_at",
            "`expires_at` must be an RFC 3339 date-time, e.g. 2027-01-31T00:00:00Z.",
        )
    })?;
    if at <= now {
        return Err(ApiError::validation(
            "expires_at",
            "`expires_at` must lie in the future.",
        ));
    }
    Ok(at)
}

fn validate_endpoint(state: &AppState, endpoint: &str) -> ApiResult<String> {
    if state.config.route(endpoint).is_none() {
        return Err(ApiError::validation(
            "endpoint",
            "`endpoint` must name a configured route.",
        ));
    }
    Ok(endpoint.to_owned())
}

fn validate_quota(requests: u32, window: u32) -> ApiResult<()> {
    if !(1..=MAX_QUOTA_REQUESTS).contains(&requests) {
        return Err(ApiError::validation(
            "quota_requests",
            format!("`quota_requests` must be between 1 and {MAX_QUOTA_REQUESTS}."),
        ));
    }
    if !(1..=MAX_QUOTA_WINDOW).contains(&window) {
        return Err(ApiError::validation(
            "quota_window",
            format!("`quota_window` must be between 1 and {MAX_QUOTA_WINDOW} seconds."),
        ));
    }
    Ok(())
}

fn validate_credits(remaining: Option<i64>, refill: Option<&Refill>) -> ApiResult<()> {
    if remaining.is_some_and(|r| !(0..=MAX_CREDITS).contains(&r)) {
        return Err(ApiError::validation(
            "remaining",
            format!("`remaining` must be between 0 and {MAX_CREDITS}."),
        ));
    }
    if let Some(refill) = refill {
        if remaining.is_none() {
            return Err(ApiError::validation(
                "refill",
                "`refill` needs `remaining` credits to refill.",
            ));
        }
        if !(1..=MAX_CREDITS).contains(&refill.amount) {
            return Err(ApiError::validation(
                "refill.amount",
                format!("`refill.amount` must be between 1 and {MAX_CREDITS}."),
            ));
        }
        if matches!(refill.interval, RefillInterval::Seconds(0)) {
            return Err(ApiError::validation(
                "refill.interval",
                "`refill.interval` is `daily`, `monthly` or a positive number of seconds.",
            ));
        }
    }
    Ok(())
}

fn validate_meta(meta: Map<String, Value>) -> ApiResult<Map<String, Value>> {
    let size = serde_json::to_vec(&meta)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_META_BYTES {
        return Err(ApiError::validation(
            "meta",
            format!("`meta` is at most {MAX_META_BYTES} bytes of JSON."),
        ));
    }
    Ok(meta)
}

fn new_secret(
    state: &AppState,
    project: &Project,
    env: Environment,
) -> ApiResult<(SecretString, String)> {
    let template = PrefixTemplate::parse(&project.key_prefix).map_err(ApiError::internal)?;
    let prefix = template.render(env, &project.slug);
    let secret =
        key_format::generate(&prefix, state.config.keys.format).map_err(ApiError::internal)?;
    let hint = key_format::hint(&prefix, &secret);
    Ok((secret, hint))
}

async fn resolve_project(
    state: &AppState,
    org: &OrgId,
    reference: Option<&str>,
) -> ApiResult<Project> {
    let reference = match reference {
        Some(r) => r.to_owned(),
        None => {
            let org = state.store.get_org(org).await?;
            org.default_project_id
                .map(ProjectId::into_string)
                .ok_or_else(|| {
                    ApiError::validation(
                        "project",
                        "Name a `project`: this organisation has no default project.",
                    )
                })?
        }
    };
    match state.store.get_project(org, &reference).await {
        Err(StoreError::NotFound) => Err(ApiError::validation(
            "project",
            "`project` names no project of this organisation.",
        )),
        other => Ok(other?),
    }
}

/// Creates a key; the secret is in the answer and nowhere else.
pub async fn create_key(
    state: &AppState,
    actor: &Actor,
    input: CreateKeyInput,
) -> ApiResult<(ApiKey, SecretString)> {
    let now = state.clock.now();
    let name = validate_name(input.name.as_deref().unwrap_or(""))?;
    let environment = match input.environment.as_deref() {
        None => Environment::Live,
        Some(raw) => Environment::parse(raw).ok_or_else(|| {
            ApiError::validation("environment", "`environment` is `live` or `test`.")
        })?,
    };
    let scopes = validate_scopes(
        state,
        "scopes",
        input
            .scopes
            .as_deref()
            .unwrap_or(&state.config.keys.default_scopes),
    )?;
    let expires_at = input
        .expires_at
        .as_deref()
        .map(|raw| validate_expiry(raw, now))
        .transpose()?;
    let allowed_ips = validate_ips(
        "allowed_ips",
        input.allowed_ips.as_deref().unwrap_or_default(),
    )?;
    let blocked_ips = validate_ips(
        "blocked_ips",
        input.blocked_ips.as_deref().unwrap_or_default(),
    )?;
    let endpoint = input
        .endpoint
        .as_deref()
        .map(|e| validate_endpoint(state, e))
        .transpose()?;
    let quota_requests = input.quota_requests.unwrap_or(key::DEFAULT_QUOTA_REQUESTS);
    let quota_window = input.quota_window.unwrap_or(key::DEFAULT_QUOTA_WINDOW);
    validate_quota(quota_requests, quota_window)?;
    validate_credits(input.remaining, input.refill.as_ref())?;
    let meta = validate_meta(input.meta.unwrap_or_default())?;
    let project = resolve_project(state, &actor.org_id, input.project.as_deref()).await?;

    let (secret, hint) = new_secret(state, &project, environment)?;
    let key = ApiKey {
        id: KeyId::generate(),
        org_id: actor.org_id.clone(),
        project_id: project.id.clone(),
        name,
        environment,
        hint,
        scopes,
        expires_at,
        allowed_ips,
        blocked_ips,
        endpoint,
        quota_requests,
        quota_window,
        remaining: input.remaining,
        refill: input.refill,
        credits_version: 0,
        meta,
        created_at: now,
        created_by: actor.id.clone(),
        last_used_at: None,
        revoked_at: None,
        previous_valid_until: None,
    };
    let audit = actor.audit(
        "key.created",
        Some(key.id.to_string()),
        json!({"project": project.id, "name": key.name, "scopes": key.scopes, "environment": environment.as_str()}),
        now,
    );
    let hash = KeyHash::of_secret(&secret);
    state.store.create_key(&key, &hash, &audit).await?;
    state.keys.forget_unknown(&hash);
    Ok((key, secret))
}

fn parse_key_id(raw: &str) -> ApiResult<KeyId> {
    KeyId::parse(raw).ok_or_else(|| ApiError::not_found("key"))
}

pub async fn get_key(state: &AppState, org: &OrgId, raw_id: &str) -> ApiResult<ApiKey> {
    let id = parse_key_id(raw_id)?;
    match state.store.get_key(org, &id).await {
        Err(StoreError::NotFound) => Err(ApiError::not_found("key")),
        other => Ok(other?),
    }
}

fn revoked_conflict() -> ApiError {
    ApiError::new(ErrorCode::InvalidState)
        .with_message("The key is revoked; a revoked key cannot be changed.")
}

pub async fn update_key(
    state: &AppState,
    actor: &Actor,
    raw_id: &str,
    input: UpdateKeyInput,
) -> ApiResult<ApiKey> {
    if input.scopes.is_some() {
        return Err(ApiError::new(ErrorCode::ScopesImmutable).with_param("scopes"));
    }
    let now = state.clock.now();
    let mut key = get_key(state, &actor.org_id, raw_id).await?;
    if key.state(now) == KeyState::Revoked {
        return Err(revoked_conflict());
    }
    let mut changed: Vec<&str> = Vec::new();
    if let Some(name) = input.name {
        key.name = validate_name(&name)?;
        changed.push("name");
    }
    if let Some(expires_at) = input.expires_at {
        key.expires_at = expires_at
            .as_deref()
            .map(|raw| validate_expiry(raw, now))
            .transpose()?;
        changed.push("expires_at");
    }
    if let Some(rules) = input.allowed_ips {
        key.allowed_ips = validate_ips("allowed_ips", &rules)?;
        changed.push("allowed_ips");
    }
    if let Some(rules) = input.blocked_ips {
        key.blocked_ips = validate_ips("blocked_ips", &rules)?;
        changed.push("blocked_ips");
    }
    if let Some(endpoint) = input.endpoint {
        key.endpoint = endpoint
            .as_deref()
            .map(|e| validate_endpoint(state, e))
            .transpose()?;
        changed.push("endpoint");
    }
    if let Some(requests) = input.quota_requests {
        key.quota_requests = requests;
        changed.push("quota_requests");
    }
    if let Some(window) = input.quota_window {
        key.quota_window = window;
        changed.push("quota_window");
    }
    validate_quota(key.quota_requests, key.quota_window)?;
    if let Some(remaining) = input.remaining {
        key.remaining = remaining;
        changed.push("remaining");
    }
    if let Some(refill) = input.refill {
        key.refill = refill;
        changed.push("refill");
    }
    validate_credits(key.remaining, key.refill.as_ref())?;
    if changed.contains(&"remaining") || changed.contains(&"refill") {
        // Rate-limit backends holding the live count start over from the new value.
        key.credits_version += 1;
    }
    if let Some(meta) = input.meta {
        key.meta = validate_meta(meta)?;
        changed.push("meta");
    }
    if changed.is_empty() {
        return Ok(key);
    }
    let audit = actor.audit(
        "key.updated",
        Some(key.id.to_string()),
        json!({"fields": changed}),
        now,
    );
    let written = state.store.update_key(&key, &audit).await;
    state.keys.invalidate(&key.id);
    match written {
        Err(StoreError::Conflict(_)) => Err(revoked_conflict()),
        other => other.map_err(ApiError::from),
    }?;
    Ok(key)
}

pub async fn rotate_key(
    state: &AppState,
    actor: &Actor,
    raw_id: &str,
    input: RotateKeyInput,
) -> ApiResult<(ApiKey, SecretString)> {
    let now = state.clock.now();
    let grace = input.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    if !(0..=MAX_GRACE_SECONDS).contains(&grace) {
        return Err(ApiError::validation(
            "grace_seconds",
            format!("`grace_seconds` must be between 0 and {MAX_GRACE_SECONDS}."),
        ));
    }
    let new_scopes = input
        .scopes
        .as_deref()
        .map(|s| validate_scopes(state, "scopes", s))
        .transpose()?;
    let key = get_key(state, &actor.org_id, raw_id).await?;
    match key.state(now) {
        KeyState::Revoked => return Err(revoked_conflict()),
        KeyState::Expired => {
            return Err(ApiError::new(ErrorCode::InvalidState)
                .with_message("The key has expired; extend `expires_at` before rotating it."));
        }
        KeyState::Active => {}
    }
    let project = state
        .store
        .get_project(&actor.org_id, key.project_id.as_str())
        .await?;
    let (secret, hint) = new_secret(state, &project, key.environment)?;
    let rotation = Rotation {
        new_hash: KeyHash::of_secret(&secret),
        new_hint: hint,
        new_scopes: new_scopes.clone(),
        previous_valid_until: now.plus_secs(grace),
        now,
    };
    let audit = actor.audit(
        "key.rotated",
        Some(key.id.to_string()),
        json!({"grace_seconds": grace, "scopes": new_scopes}),
        now,
    );
    let written = state
        .store
        .rotate_key(&actor.org_id, &key.id, &rotation, &audit)
        .await;
    state.keys.invalidate(&key.id);
    state.keys.forget_unknown(&rotation.new_hash);
    let rotated = match written {
        Err(StoreError::Conflict(_)) => Err(revoked_conflict()),
        other => other.map_err(ApiError::from),
    }?;
    Ok((rotated, secret))
}

/// Idempotent: revoking a revoked key succeeds and changes nothing.
pub async fn revoke_key(state: &AppState, actor: &Actor, raw_id: &str) -> ApiResult<RevokeOutcome> {
    let now = state.clock.now();
    let id = parse_key_id(raw_id)?;
    let audit = actor.audit("key.revoked", Some(id.to_string()), json!({}), now);
    let written = state
        .store
        .revoke_key(&actor.org_id, &id, now, &audit)
        .await;
    state.keys.invalidate(&id);
    match written {
        Err(StoreError::NotFound) => Err(ApiError::not_found("key")),
        other => Ok(other?),
    }
}

/// Revokes every live key among reported secrets; says how many, never which.
pub async fn report_leaked(state: &AppState, actor: &Actor, secrets: &[String]) -> ApiResult<u64> {
    if secrets.len() > MAX_LEAK_REPORT {
        return Err(ApiError::validation(
            "secrets",
            format!("`secrets` holds at most {MAX_LEAK_REPORT} entries per report."),
        ));
    }
    let now = state.clock.now();
    let hashes: Vec<KeyHash> = secrets
        .iter()
        .map(|s| s.trim().as_bytes())
        .filter(|s| key_format::is_well_formed(s, state.config.keys.format))
        .map(KeyHash::of)
        .collect();
    let ip = actor.ip.map(|ip| ip.to_string());
    let matched = state
        .store
        .revoke_leaked(&hashes, now, &actor.id, ip.as_deref())
        .await;
    for hash in &hashes {
        state.keys.invalidate_by_hash(hash);
    }
    let matched = matched?;
    let audit = actor.audit(
        "leak_report.received",
        None,
        json!({"received": secrets.len(), "matched": matched}),
        now,
    );
    state.store.append_audit(&audit).await?;
    Ok(matched)
}

/// Sets the organisation's tier (an operator's act: the CLI, not the management API).
pub async fn set_org_tier(state: &AppState, actor: &Actor, tier: &str) -> ApiResult<()> {
    if !state.config.ratelimit.tiers.contains_key(tier) {
        let known: Vec<&str> = state
            .config
            .ratelimit
            .tiers
            .keys()
            .map(String::as_str)
            .collect();
        return Err(ApiError::validation(
            "tier",
            format!("`tier` must be a configured tier: {}.", known.join(", ")),
        ));
    }
    let now = state.clock.now();
    let audit = actor.audit(
        "org.tier_changed",
        Some(actor.org_id.to_string()),
        json!({"tier": tier}),
        now,
    );
    state
        .store
        .set_org_tier(&actor.org_id, tier, &audit)
        .await?;
    Ok(())
}

pub async fn create_project(
    state: &AppState,
    actor: &Actor,
    input: CreateProjectInput,
) -> ApiResult<Project> {
    let now = state.clock.now();
    key_format::validate_slug(&input.slug)
        .map_err(|m| ApiError::validation("slug", format!("`slug`: {m}.")))?;
    let name = validate_name(input.name.as_deref().unwrap_or(&input.slug))?;
    let key_prefix = match input.key_prefix {
        Some(raw) => PrefixTemplate::parse(&raw)
            .map_err(|m| ApiError::validation("key_prefix", format!("`key_prefix`: {m}.")))?,
        None => state.config.keys.prefix.clone(),
    };
    let project = Project {
        id: ProjectId::generate(),
        org_id: actor.org_id.clone(),
        slug: input.slug,
        name,
        key_prefix: key_prefix.as_str().to_owned(),
        created_at: now,
    };
    let audit = actor.audit(
        "project.created",
        Some(project.id.to_string()),
        json!({"slug": project.slug, "key_prefix": project.key_prefix}),
        now,
    );
    match state.store.create_project(&project, &audit).await {
        Err(StoreError::Conflict(_)) => Err(ApiError::new(ErrorCode::AlreadyExists)
            .with_param("slug")
            .with_message("A project with this slug already exists.")),
        other => other.map_err(ApiError::from),
    }?;
    Ok(project)
}
