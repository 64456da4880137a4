//! First start on an empty store: the default organisation, project and a management key.

use keyward_core::ids::{AuditId, KeyId, OrgId, ProjectId};
use keyward_core::key::{self, ApiKey};
use keyward_core::key_format::{self, Environment, KeyHash};
use keyward_store::{AuditEntry, Bootstrap, Org, Project};
use secrecy::SecretString;
use serde_json::json;

use crate::auth::MANAGEMENT_SCOPE;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub const DEFAULT_PROJECT_SLUG: &str = "default";

/// Creates the default organisation, project and a management key when the store is empty.
/// Returns the key's secret only when it was created now.
pub async fn ensure_bootstrapped(state: &AppState) -> ApiResult<Option<(ApiKey, SecretString)>> {
    if state.store.first_org().await?.is_some() {
        return Ok(None);
    }
    let now = state.clock.now();
    let org_id = OrgId::generate();
    let project = Project {
        id: ProjectId::generate(),
        org_id: org_id.clone(),
        slug: DEFAULT_PROJECT_SLUG.into(),
        name: "Default".into(),
        key_prefix: state.config.keys.prefix.as_str().to_owned(),
        created_at: now,
    };
    let prefix = state
        .config
        .keys
        .prefix
        .render(Environment::Live, &project.slug);
    let secret =
        key_format::generate(&prefix, state.config.keys.format).map_err(ApiError::internal)?;
    let key = ApiKey {
        id: KeyId::generate(),
        org_id: org_id.clone(),
        project_id: project.id.clone(),
        name: "Bootstrap management key".into(),
        environment: Environment::Live,
        hint: key_format::hint(&prefix, &secret),
        scopes: vec![MANAGEMENT_SCOPE.to_owned()],
        expires_at: None,
        allowed_ips: vec![],
        blocked_ips: vec![],
        endpoint: None,
        quota_requests: key::DEFAULT_QUOTA_REQUESTS,
        quota_window: key::DEFAULT_QUOTA_WINDOW,
        remaining: None,
        refill: None,
        credits_version: 0,
        meta: serde_json::Map::new(),
        created_at: now,
        created_by: "system".into(),
        last_used_at: None,
        revoked_at: None,
        previous_valid_until: None,
    };
    let bootstrap = Bootstrap {
        org: Org {
            id: org_id.clone(),
            name: "Default".into(),
            tier: "free".into(),
            default_project_id: Some(project.id.clone()),
            created_at: now,
        },
        audit: AuditEntry {
            id: AuditId::generate(),
            org_id,
            actor: "system".into(),
            action: "key.created".into(),
            target: Some(key.id.to_string()),
            ip: None,
            details: json!({"project": project.id, "scopes": key.scopes, "bootstrap": true}),
            created_at: now,
        },
        project,
        key_hash: KeyHash::of_secret(&secret),
        key: key.clone(),
    };
    if state.store.bootstrap(&bootstrap).await? {
        Ok(Some((key, secret)))
    } else {
        Ok(None)
    }
}
