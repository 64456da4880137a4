//! Wire shapes of the management API (DESIGN.md section 5).

use keyward_core::Timestamp;
use keyward_core::ids::KeyId;
use keyward_core::ip::render_rule;
use keyward_core::key::{ApiKey, Refill};
use keyward_store::{AuditEntry, Org, Page, Project};
use serde::Serialize;
use serde_json::{Map, Value};

fn time(t: Option<Timestamp>) -> Option<String> {
    t.map(Timestamp::to_rfc3339)
}

#[derive(Debug, Serialize)]
pub struct KeyView<'a> {
    pub id: KeyId,
    pub object: &'static str,
    pub project: &'a str,
    pub name: &'a str,
    pub environment: &'static str,
    pub hint: &'a str,
    pub scopes: &'a [String],
    pub state: &'static str,
    pub expires_at: Option<String>,
    pub allowed_ips: Vec<String>,
    pub blocked_ips: Vec<String>,
    pub endpoint: Option<&'a str>,
    pub quota_requests: u32,
    pub quota_window: u32,
    pub remaining: Option<i64>,
    pub refill: Option<&'a Refill>,
    pub meta: &'a Map<String, Value>,
    pub created_at: String,
    pub created_by: &'a str,
    pub last_used_at: Option<String>,
    pub previous_valid_until: Option<String>,
    /// The secret: only in the answer to create and rotate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
}

impl<'a> KeyView<'a> {
    pub fn new(key: &'a ApiKey, now: Timestamp) -> Self {
        Self {
            id: key.id,
            object: "key",
            project: key.project_id.as_str(),
            name: &key.name,
            environment: key.environment.as_str(),
            hint: &key.hint,
            scopes: &key.scopes,
            state: key.state(now).as_str(),
            expires_at: time(key.expires_at),
            allowed_ips: key.allowed_ips.iter().map(render_rule).collect(),
            blocked_ips: key.blocked_ips.iter().map(render_rule).collect(),
            endpoint: key.endpoint.as_deref(),
            quota_requests: key.quota_requests,
            quota_window: key.quota_window,
            remaining: key.remaining,
            refill: key.refill.as_ref(),
            meta: &key.meta,
            created_at: key.created_at.to_rfc3339(),
            created_by: &key.created_by,
            last_used_at: time(key.last_used_at),
            previous_valid_until: time(key.pending_grace(now)),
            key: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ProjectView<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub slug: &'a str,
    pub name: &'a str,
    pub key_prefix: &'a str,
    pub created_at: String,
}

impl<'a> ProjectView<'a> {
    pub fn new(p: &'a Project) -> Self {
        Self {
            id: p.id.as_str(),
            object: "project",
            slug: &p.slug,
            name: &p.name,
            key_prefix: &p.key_prefix,
            created_at: p.created_at.to_rfc3339(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AuditView<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub details: &'a Value,
    pub created_at: String,
}

impl<'a> AuditView<'a> {
    pub fn new(a: &'a AuditEntry) -> Self {
        Self {
            id: a.id.as_str(),
            object: "audit_event",
            actor: &a.actor,
            action: &a.action,
            target: a.target.as_deref(),
            ip: a.ip.as_deref(),
            details: &a.details,
            created_at: a.created_at.to_rfc3339(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct OrgView<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub name: &'a str,
    pub tier: &'a str,
    pub default_project: Option<&'a str>,
    pub created_at: String,
}

impl<'a> OrgView<'a> {
    pub fn new(o: &'a Org) -> Self {
        Self {
            id: o.id.as_str(),
            object: "organization",
            name: &o.name,
            tier: &o.tier,
            default_project: o.default_project_id.as_ref().map(|p| p.as_str()),
            created_at: o.created_at.to_rfc3339(),
        }
    }
}

/// `{"data": [...], "next_cursor": …}`
#[derive(Debug, Serialize)]
pub struct ListView<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<'a, T> ListView<T> {
    pub fn from_page<U>(page: &'a Page<U>, view: impl Fn(&'a U) -> T) -> Self {
        Self {
            object: "list",
            data: page.items.iter().map(view).collect(),
            next_cursor: page.next_cursor.clone(),
        }
    }
}
