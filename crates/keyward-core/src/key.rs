//! The API key record, its state, and the authorisation policy of DESIGN.md section 2
//! (steps 2 to 5). Rate limits and credits (steps 6 and 7) are decided elsewhere.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::clock::Timestamp;
use crate::errors::ErrorCode;
use crate::ids::{KeyId, OrgId, ProjectId};
use crate::ip;
use crate::key_format::Environment;

pub const DEFAULT_GRACE_SECONDS: i64 = 24 * 60 * 60;
pub const MAX_GRACE_SECONDS: i64 = 7 * 24 * 60 * 60;
pub const DEFAULT_QUOTA_REQUESTS: u32 = 60;
pub const DEFAULT_QUOTA_WINDOW: u32 = 60;

/// Computed from the record and the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
}

impl KeyState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    pub fn parse(input: &str) -> Option<Self> {
        match input {
            "active" => Some(Self::Active),
            "revoked" => Some(Self::Revoked),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// Credit refill: how often and how much (DESIGN.md section 4; enforced by the limits issue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refill {
    /// `"daily"`, `"monthly"`, or a number of seconds.
    pub interval: RefillInterval,
    pub amount: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RefillInterval {
    Named(NamedInterval),
    Seconds(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamedInterval {
    Daily,
    Monthly,
}

/// An API key as storage holds it. The secret is never part of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: KeyId,
    pub org_id: OrgId,
    pub project_id: ProjectId,
    pub name: String,
    pub environment: Environment,
    pub hint: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<Timestamp>,
    pub allowed_ips: Vec<IpNet>,
    pub blocked_ips: Vec<IpNet>,
    pub endpoint: Option<String>,
    pub quota_requests: u32,
    pub quota_window: u32,
    pub remaining: Option<i64>,
    pub refill: Option<Refill>,
    /// Bumped each time `remaining`/`refill` is set by a person, not by spending.
    pub credits_version: i64,
    pub meta: serde_json::Map<String, serde_json::Value>,
    pub created_at: Timestamp,
    pub created_by: String,
    pub last_used_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    /// End of the rotation grace of the previous secret, if one is still pending.
    pub previous_valid_until: Option<Timestamp>,
}

impl ApiKey {
    pub fn state(&self, now: Timestamp) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.expires_at.is_some_and(|at| at <= now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    /// The grace end to show: only while it lies in the future.
    pub fn pending_grace(&self, now: Timestamp) -> Option<Timestamp> {
        self.previous_valid_until.filter(|&until| until > now)
    }
}

/// One stored secret of a key: the current one (`valid_until = None`) or a previous one
/// still inside its rotation grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretValidity {
    pub valid_until: Option<Timestamp>,
}

/// What the request asks for, as far as the key policy is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub client_ip: IpAddr,
    /// Name of the matched route; `None` for keyward's own API.
    pub route: Option<&'a str>,
    pub required_scopes: &'a [String],
}

/// What many keys have in common (one project's keys made by one person usually share it),
/// held once for all of them by [`CompactKey`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct KeyProfile {
    pub org_id: OrgId,
    pub org_tier: Arc<str>,
    pub project_id: ProjectId,
    pub environment: Environment,
    pub scopes: Scopes,
    pub created_by: String,
}

/// A key's scopes, held inline in its profile (keys rarely have more than two): checking a
/// scope reads the profile's own cache line, and the strings, shared by every profile with the
/// same scope (see the key cache's interning), stay hot. At a million cached keys a `Vec` of
/// `String`s cost two more cache misses per request.
pub type Scopes = SmallVec<[Arc<str>; 2]>;

/// The parts of a key that few keys set, boxed so that a key without them does not pay for
/// them.
#[derive(Debug, Default)]
struct KeyExtras {
    revoked_at: Option<Timestamp>,
    secret_valid_until: Option<Timestamp>,
    allowed_ips: Vec<IpNet>,
    blocked_ips: Vec<IpNet>,
    endpoint: Option<String>,
    remaining: Option<i64>,
    refill: Option<Refill>,
    credits_version: i64,
    meta: serde_json::Map<String, serde_json::Value>,
}

static NO_META: LazyLock<serde_json::Map<String, serde_json::Value>> =
    LazyLock::new(serde_json::Map::new);

/// One secret's key as the request path holds it: what authorisation, limits and identity
/// need, in about a fifth of an [`ApiKey`]'s memory (a node may cache millions). Immutable: a
/// changed key is cached anew.
#[derive(Debug)]
pub struct CompactKey {
    pub id: KeyId,
    pub profile: Arc<KeyProfile>,
    pub expires_at: Option<Timestamp>,
    pub quota_requests: u32,
    pub quota_window: u32,
    extras: Option<Box<KeyExtras>>,
}

impl CompactKey {
    /// `intern` returns the shared copy of an equal profile (or keeps this one).
    pub fn new(
        key: ApiKey,
        org_tier: Arc<str>,
        secret: SecretValidity,
        intern: impl FnOnce(KeyProfile) -> Arc<KeyProfile>,
    ) -> Self {
        let extras = KeyExtras {
            revoked_at: key.revoked_at,
            secret_valid_until: secret.valid_until,
            allowed_ips: key.allowed_ips,
            blocked_ips: key.blocked_ips,
            endpoint: key.endpoint,
            remaining: key.remaining,
            refill: key.refill,
            credits_version: key.credits_version,
            meta: key.meta,
        };
        let plain = extras.revoked_at.is_none()
            && extras.secret_valid_until.is_none()
            && extras.allowed_ips.is_empty()
            && extras.blocked_ips.is_empty()
            && extras.endpoint.is_none()
            && extras.remaining.is_none()
            && extras.refill.is_none()
            && extras.credits_version == 0
            && extras.meta.is_empty();
        Self {
            id: key.id,
            profile: intern(KeyProfile {
                org_id: key.org_id,
                org_tier,
                project_id: key.project_id,
                environment: key.environment,
                scopes: key.scopes.into_iter().map(Arc::from).collect(),
                created_by: key.created_by,
            }),
            expires_at: key.expires_at,
            quota_requests: key.quota_requests,
            quota_window: key.quota_window,
            extras: (!plain).then(|| Box::new(extras)),
        }
    }

    pub fn state(&self, now: Timestamp) -> KeyState {
        if self.revoked_at().is_some() {
            KeyState::Revoked
        } else if self.expires_at.is_some_and(|at| at <= now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    pub fn scopes(&self) -> &[Arc<str>] {
        &self.profile.scopes
    }

    pub fn revoked_at(&self) -> Option<Timestamp> {
        self.extras.as_ref().and_then(|e| e.revoked_at)
    }

    /// The end of this secret's rotation grace, if it is a previous secret.
    pub fn secret_valid_until(&self) -> Option<Timestamp> {
        self.extras.as_ref().and_then(|e| e.secret_valid_until)
    }

    pub fn allowed_ips(&self) -> &[IpNet] {
        self.extras.as_ref().map_or(&[], |e| &e.allowed_ips)
    }

    pub fn blocked_ips(&self) -> &[IpNet] {
        self.extras.as_ref().map_or(&[], |e| &e.blocked_ips)
    }

    pub fn endpoint(&self) -> Option<&str> {
        self.extras.as_ref().and_then(|e| e.endpoint.as_deref())
    }

    pub fn remaining(&self) -> Option<i64> {
        self.extras.as_ref().and_then(|e| e.remaining)
    }

    pub fn refill(&self) -> Option<&Refill> {
        self.extras.as_ref().and_then(|e| e.refill.as_ref())
    }

    pub fn credits_version(&self) -> i64 {
        self.extras.as_ref().map_or(0, |e| e.credits_version)
    }

    pub fn meta(&self) -> &serde_json::Map<String, serde_json::Value> {
        self.extras.as_ref().map_or(&NO_META, |e| &e.meta)
    }
}

/// Steps 2 to 5 of the decision order, first failure wins.
pub fn authorize(key: &CompactKey, access: Access<'_>, now: Timestamp) -> Result<(), ErrorCode> {
    match key.state(now) {
        KeyState::Revoked => return Err(ErrorCode::KeyRevoked),
        KeyState::Expired => return Err(ErrorCode::KeyExpired),
        KeyState::Active => {}
    }
    if key.secret_valid_until().is_some_and(|until| until <= now) {
        return Err(ErrorCode::KeyExpired);
    }
    if !ip::is_allowed(access.client_ip, key.allowed_ips(), key.blocked_ips()) {
        return Err(ErrorCode::IpNotAllowed);
    }
    if let Some(endpoint) = key.endpoint()
        && access.route != Some(endpoint)
    {
        return Err(ErrorCode::EndpointNotAllowed);
    }
    if !access
        .required_scopes
        .iter()
        .all(|needed| key.scopes().iter().any(|s| **s == **needed))
    {
        return Err(ErrorCode::InsufficientScope);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ApiKey {
        ApiKey {
            id: KeyId::generate(),
            org_id: OrgId::generate(),
            project_id: ProjectId::generate(),
            name: "test".into(),
            environment: Environment::Live,
            hint: "kw_live_…abcd".into(),
            scopes: vec!["inference".into()],
            expires_at: None,
            allowed_ips: vec![],
            blocked_ips: vec![],
            endpoint: None,
            quota_requests: DEFAULT_QUOTA_REQUESTS,
            quota_window: DEFAULT_QUOTA_WINDOW,
            remaining: None,
            refill: None,
            credits_version: 0,
            meta: serde_json::Map::new(),
            created_at: Timestamp::from_millis(0),
            created_by: "usr_x".into(),
            last_used_at: None,
            revoked_at: None,
            previous_valid_until: None,
        }
    }

    fn compact(key: &ApiKey, secret: SecretValidity) -> CompactKey {
        CompactKey::new(key.clone(), Arc::from("free"), secret, Arc::new)
    }

    const CURRENT: SecretValidity = SecretValidity { valid_until: None };
    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    fn access<'a>(scopes: &'a [String], route: Option<&'a str>, ip: [u8; 4]) -> Access<'a> {
        Access {
            client_ip: IpAddr::from(ip),
            route,
            required_scopes: scopes,
        }
    }

    #[test]
    fn decision_order_first_failure_wins() {
        let inference = vec!["inference".to_owned()];
        let management = vec!["management".to_owned()];
        let k = key();
        assert_eq!(
            authorize(
                &compact(&k, CURRENT),
                access(&inference, None, [1, 1, 1, 1]),
                NOW
            ),
            Ok(())
        );
        assert_eq!(
            authorize(
                &compact(&k, CURRENT),
                access(&management, None, [1, 1, 1, 1]),
                NOW
            ),
            Err(ErrorCode::InsufficientScope)
        );

        let mut restricted = key();
        restricted.endpoint = Some("chat".into());
        assert_eq!(
            authorize(
                &compact(&restricted, CURRENT),
                access(&management, Some("embed"), [1, 1, 1, 1]),
                NOW
            ),
            Err(ErrorCode::EndpointNotAllowed)
        );
        assert_eq!(
            authorize(
                &compact(&restricted, CURRENT),
                access(&inference, Some("chat"), [1, 1, 1, 1]),
                NOW
            ),
            Ok(())
        );

        let mut ip_locked = restricted.clone();
        ip_locked.allowed_ips = vec![ip::parse_rule("10.0.0.0/8").unwrap_or_default()];
        assert_eq!(
            authorize(
                &compact(&ip_locked, CURRENT),
                access(&management, Some("embed"), [1, 1, 1, 1]),
                NOW
            ),
            Err(ErrorCode::IpNotAllowed)
        );

        let mut expired = ip_locked.clone();
        expired.expires_at = Some(NOW);
        assert_eq!(
            authorize(
                &compact(&expired, CURRENT),
                access(&inference, None, [1, 1, 1, 1]),
                NOW
            ),
            Err(ErrorCode::KeyExpired)
        );
        assert_eq!(expired.state(NOW), KeyState::Expired);
        assert_eq!(compact(&expired, CURRENT).state(NOW), KeyState::Expired);

        let mut revoked = expired.clone();
        revoked.revoked_at = Some(NOW);
        assert_eq!(
            authorize(
                &compact(&revoked, CURRENT),
                access(&inference, None, [1, 1, 1, 1]),
                NOW
            ),
            Err(ErrorCode::KeyRevoked)
        );
    }

    #[test]
    fn previous_secret_works_only_inside_its_grace() {
        let scopes = vec!["inference".to_owned()];
        let k = key();
        let grace = SecretValidity {
            valid_until: Some(NOW.plus_secs(10)),
        };
        assert_eq!(
            authorize(
                &compact(&k, grace),
                access(&scopes, None, [1, 1, 1, 1]),
                NOW
            ),
            Ok(())
        );
        assert_eq!(
            authorize(
                &compact(&k, grace),
                access(&scopes, None, [1, 1, 1, 1]),
                NOW.plus_secs(10)
            ),
            Err(ErrorCode::KeyExpired)
        );
    }

    #[test]
    fn a_compact_key_keeps_what_the_request_path_reads() {
        let mut k = key();
        k.environment = Environment::Test;
        k.scopes = vec!["a".into(), "b".into()];
        k.expires_at = Some(Timestamp::from_millis(5));
        k.quota_requests = 7;
        k.quota_window = 9;
        k.allowed_ips = vec![ip::parse_rule("10.0.0.0/8").unwrap_or_default()];
        k.blocked_ips = vec![ip::parse_rule("10.1.0.0/16").unwrap_or_default()];
        k.endpoint = Some("chat".into());
        k.remaining = Some(3);
        k.refill = Some(Refill {
            interval: RefillInterval::Seconds(60),
            amount: 10,
        });
        k.credits_version = 4;
        k.meta.insert("plan".into(), "gold".into());
        k.revoked_at = Some(Timestamp::from_millis(2));
        let until = SecretValidity {
            valid_until: Some(Timestamp::from_millis(3)),
        };
        let c = CompactKey::new(k.clone(), Arc::from("pro"), until, Arc::new);
        assert_eq!(c.id, k.id);
        assert_eq!(c.profile.org_id, k.org_id);
        assert_eq!(&*c.profile.org_tier, "pro");
        assert_eq!(c.profile.project_id, k.project_id);
        assert_eq!(c.profile.environment, Environment::Test);
        assert!(
            c.scopes()
                .iter()
                .map(|s| &**s)
                .eq(k.scopes.iter().map(String::as_str))
        );
        assert_eq!(c.profile.created_by, "usr_x");
        assert_eq!(c.expires_at, k.expires_at);
        assert_eq!((c.quota_requests, c.quota_window), (7, 9));
        assert_eq!(c.allowed_ips(), k.allowed_ips.as_slice());
        assert_eq!(c.blocked_ips(), k.blocked_ips.as_slice());
        assert_eq!(c.endpoint(), Some("chat"));
        assert_eq!(c.remaining(), Some(3));
        assert_eq!(c.refill(), k.refill.as_ref());
        assert_eq!(c.credits_version(), 4);
        assert_eq!(c.meta(), &k.meta);
        assert_eq!(c.revoked_at(), k.revoked_at);
        assert_eq!(c.secret_valid_until(), until.valid_until);
    }

    #[test]
    fn a_plain_key_carries_no_extras_and_shares_its_profile() {
        let shared = Arc::new(KeyProfile {
            org_id: OrgId::generate(),
            org_tier: Arc::from("free"),
            project_id: ProjectId::generate(),
            environment: Environment::Live,
            scopes: Scopes::new(),
            created_by: String::new(),
        });
        let c = CompactKey::new(
            key(),
            Arc::from("free"),
            SecretValidity { valid_until: None },
            |_| shared.clone(),
        );
        assert!(c.extras.is_none());
        assert!(Arc::ptr_eq(&c.profile, &shared));
        assert!(c.meta().is_empty() && c.allowed_ips().is_empty());
        assert_eq!((c.remaining(), c.credits_version()), (None, 0));
    }
}
