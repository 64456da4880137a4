//! The API key record, its state, and the authorisation policy of DESIGN.md section 2
//! (steps 2 to 5). Rate limits and credits (steps 6 and 7) are decided elsewhere.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

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

/// Steps 2 to 5 of the decision order, first failure wins.
pub fn authorize(
    key: &ApiKey,
    secret: SecretValidity,
    access: Access<'_>,
    now: Timestamp,
) -> Result<(), ErrorCode> {
    match key.state(now) {
        KeyState::Revoked => return Err(ErrorCode::KeyRevoked),
        KeyState::Expired => return Err(ErrorCode::KeyExpired),
        KeyState::Active => {}
    }
    if secret.valid_until.is_some_and(|until| until <= now) {
        return Err(ErrorCode::KeyExpired);
    }
    if !ip::is_allowed(access.client_ip, &key.allowed_ips, &key.blocked_ips) {
        return Err(ErrorCode::IpNotAllowed);
    }
    if let Some(endpoint) = &key.endpoint
        && access.route != Some(endpoint.as_str())
    {
        return Err(ErrorCode::EndpointNotAllowed);
    }
    if !access
        .required_scopes
        .iter()
        .all(|needed| key.scopes.iter().any(|s| s == needed))
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
            authorize(&k, CURRENT, access(&inference, None, [1, 1, 1, 1]), NOW),
            Ok(())
        );
        assert_eq!(
            authorize(&k, CURRENT, access(&management, None, [1, 1, 1, 1]), NOW),
            Err(ErrorCode::InsufficientScope)
        );

        let mut restricted = key();
        restricted.endpoint = Some("chat".into());
        assert_eq!(
            authorize(
                &restricted,
                CURRENT,
                access(&management, Some("embed"), [1, 1, 1, 1]),
                NOW
            ),
            Err(ErrorCode::EndpointNotAllowed)
        );
        assert_eq!(
            authorize(
                &restricted,
                CURRENT,
                access(&inference, Some("chat"), [1, 1, 1, 1]),
                NOW
            ),
            Ok(())
        );

        let mut ip_locked = restricted.clone();
        ip_locked.allowed_ips = vec![ip::parse_rule("10.0.0.0/8").unwrap_or_default()];
        assert_eq!(
            authorize(
                &ip_locked,
                CURRENT,
                access(&management, Some("embed"), [1, 1, 1, 1]),
                NOW
            ),
            Err(ErrorCode::IpNotAllowed)
        );

        let mut expired = ip_locked.clone();
        expired.expires_at = Some(NOW);
        assert_eq!(
            authorize(
                &expired,
                CURRENT,
                access(&inference, None, [1, 1, 1, 1]),
                NOW
            ),
            Err(ErrorCode::KeyExpired)
        );
        assert_eq!(expired.state(NOW), KeyState::Expired);

        let mut revoked = expired.clone();
        revoked.revoked_at = Some(NOW);
        assert_eq!(
            authorize(
                &revoked,
                CURRENT,
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
            authorize(&k, grace, access(&scopes, None, [1, 1, 1, 1]), NOW),
            Ok(())
        );
        assert_eq!(
            authorize(
                &k,
                grace,
                access(&scopes, None, [1, 1, 1, 1]),
                NOW.plus_secs(10)
            ),
            Err(ErrorCode::KeyExpired)
        );
    }
}
