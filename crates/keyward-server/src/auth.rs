//! Verifying a credential: the code path shared by the management API and the data plane.
//!
//! Order (DESIGN.md section 2): credential present and well-formed, known, state, IP,
//! endpoint, scope. Nothing here logs or returns a secret.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use keyward_core::ErrorCode;
use keyward_core::key::{Access, ApiKey, authorize};
use keyward_core::key_format::{KeyHash, is_well_formed};
use std::net::IpAddr;
use std::sync::Arc;

use crate::cache;
use crate::config::AuthConfig;
use crate::error::{ApiError, ApiResult};
use crate::extract::ClientIp;
use crate::state::AppState;
use crate::usage::Outcome;

/// The scope the management API requires.
pub const MANAGEMENT_SCOPE: &str = "management";

/// Finds the one credential of a request: `Authorization: Bearer …` (when enabled) or one of
/// the configured key headers (`X-API-Key` by default). The same value twice is fine; two
/// different values are refused.
pub fn extract_credential<'h>(headers: &'h HeaderMap, auth: &AuthConfig) -> ApiResult<&'h [u8]> {
    let mut found = None;
    if auth.bearer {
        for value in headers.get_all(header::AUTHORIZATION) {
            let bytes = value.as_bytes();
            // `Bearer` with nothing after it is a malformed credential, not a missing one.
            let scheme_end = bytes.iter().position(|&b| b == b' ').unwrap_or(bytes.len());
            if bytes[..scheme_end].eq_ignore_ascii_case(b"bearer") {
                merge(&mut found, trim_spaces(&bytes[scheme_end..]))?;
            }
        }
    }
    for name in &auth.key_headers {
        for value in headers.get_all(name.as_str()) {
            merge(&mut found, trim_spaces(value.as_bytes()))?;
        }
    }
    found.ok_or_else(|| ApiError::new(ErrorCode::MissingCredentials))
}

/// True when the `Authorization` header carried a bearer credential (to hide it upstream).
pub fn is_bearer(value: &axum::http::HeaderValue) -> bool {
    let bytes = value.as_bytes();
    bytes.len() >= 6 && bytes[..6].eq_ignore_ascii_case(b"bearer")
}

// Both values come from the same request, so comparing them needs no constant time.
fn merge<'a>(found: &mut Option<&'a [u8]>, value: &'a [u8]) -> ApiResult<()> {
    match *found {
        Some(existing) if existing != value => Err(ApiError::new(ErrorCode::AmbiguousCredentials)),
        _ => {
            *found = Some(value);
            Ok(())
        }
    }
}

fn trim_spaces(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != b' ').unwrap_or(bytes.len());
    &bytes[start..]
}

/// A caller whose key passed every check.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: Arc<ApiKey>,
    pub client_ip: IpAddr,
    pub org_tier: Arc<str>,
}

impl Principal {
    /// How the audit log names this caller.
    pub fn actor_id(&self) -> String {
        self.key.id.to_string()
    }
}

/// Steps 1 to 5 of the decision order for one request. Failures of a known key are counted
/// in its usage; the caller counts the success once the whole decision is made.
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    client_ip: IpAddr,
    route: Option<&str>,
    required_scopes: &[String],
) -> ApiResult<Principal> {
    let token = extract_credential(headers, &state.config.auth)?;
    verify_token(state, token, client_ip, route, required_scopes).await
}

/// Steps 1 (well-formed) to 5 for a credential already taken from the request.
pub async fn verify_token(
    state: &AppState,
    token: &[u8],
    client_ip: IpAddr,
    route: Option<&str>,
    required_scopes: &[String],
) -> ApiResult<Principal> {
    if crate::tokens::looks_like_jwt(token) {
        return verify_jwt(state, token, client_ip, route, required_scopes).await;
    }
    if !is_well_formed(token, state.config.keys.format) {
        return Err(ApiError::new(ErrorCode::InvalidApiKey));
    }
    let hash = KeyHash::of(token);
    let now = state.clock.now();
    let Some(secret) = cache::resolve(&state.keys, &*state.store, &hash, now).await? else {
        return Err(ApiError::new(ErrorCode::InvalidApiKey));
    };
    let access = Access {
        client_ip,
        route,
        required_scopes,
    };
    match authorize(&secret.key, secret.validity, access, now) {
        Ok(()) => Ok(Principal {
            key: secret.key,
            client_ip,
            org_tier: secret.org_tier,
        }),
        Err(code) => {
            if let Some(outcome) = Outcome::of(code) {
                state.usage.record(&secret.key.id, outcome, now);
            }
            Err(ApiError::new(code))
        }
    }
}

/// Steps 2 to 5 for an access token: the token itself is checked without storage; its key's
/// state (revocation, expiry), IP rules and endpoint come from the key cache, so revoking the
/// key ends its tokens as fast as the key. Scopes must be in the token and still on the key.
async fn verify_jwt(
    state: &AppState,
    token: &[u8],
    client_ip: IpAddr,
    route: Option<&str>,
    required_scopes: &[String],
) -> ApiResult<Principal> {
    let invalid = || ApiError::new(ErrorCode::InvalidToken);
    let tokens = state.tokens.as_ref().ok_or_else(invalid)?;
    let token = std::str::from_utf8(token).map_err(|_| invalid())?;
    let now = state.clock.now();
    let (key_id, claims) = tokens.verify_access(token, now)?;
    let Some(secret) = cache::resolve_id(&state.keys, &*state.store, &key_id).await? else {
        return Err(invalid());
    };
    let access = Access {
        client_ip,
        route,
        required_scopes,
    };
    let verdict = authorize(&secret.key, secret.validity, access, now).and_then(|()| {
        if required_scopes.iter().all(|s| claims.scopes.contains(s)) {
            Ok(())
        } else {
            Err(ErrorCode::InsufficientScope)
        }
    });
    match verdict {
        Ok(()) => Ok(Principal {
            key: secret.key,
            client_ip,
            org_tier: secret.org_tier,
        }),
        Err(code) => {
            if let Some(outcome) = Outcome::of(code) {
                state.usage.record(&secret.key.id, outcome, now);
            }
            Err(ApiError::new(code))
        }
    }
}

/// What an admitted request carries forward.
#[derive(Debug, Default)]
pub struct Admission {
    /// Rate-limit headers every authenticated answer gets.
    pub headers: axum::http::HeaderMap,
    /// Live credits left, for keys with credits.
    pub credits_remaining: Option<i64>,
}

/// Steps 6 and 7: limits and credits for an authenticated request of `cost` units. Counts the
/// outcome in the key's usage.
pub async fn admit(state: &AppState, principal: &Principal, cost: u32) -> ApiResult<Admission> {
    let now = state.clock.now();
    let plan = state
        .limiter
        .plan(&principal.key, &principal.org_tier, cost);
    let report = state.limiter.decide(&plan, now).await?;
    let headers = report.headers(state.config.ratelimit.draft_headers);
    match report.error() {
        None => {
            state.usage.record(&principal.key.id, Outcome::Allowed, now);
            Ok(Admission {
                headers,
                credits_remaining: report.credits_remaining,
            })
        }
        Some(mut error) => {
            state
                .usage
                .record(&principal.key.id, Outcome::RateLimited, now);
            error.headers = Some(Box::new(headers));
            Err(error)
        }
    }
}

/// A caller allowed to use the management API: its handlers take this as an argument, so a
/// handler's signature says what it requires.
#[derive(Debug, Clone)]
pub struct Management(pub Principal);

impl FromRequestParts<AppState> for Management {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ClientIp(ip) = ClientIp::from_request_parts(parts, state).await?;
        let required = [MANAGEMENT_SCOPE.to_owned()];
        let principal = authenticate(state, &parts.headers, ip, None, &required).await?;
        state
            .usage
            .record(&principal.key.id, Outcome::Allowed, state.clock.now());
        Ok(Management(principal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn auth() -> AuthConfig {
        AuthConfig {
            bearer: true,
            key_headers: vec!["x-api-key".into()],
            hide_credentials: true,
        }
    }

    fn extract(h: &HeaderMap) -> ApiResult<&[u8]> {
        extract_credential(h, &auth())
    }

    fn code(h: &HeaderMap) -> Option<ErrorCode> {
        extract(h).err().map(|e| e.code)
    }

    #[test]
    fn credentials_from_either_header() {
        let h = headers(&[("authorization", "Bearer abc")]);
        assert_eq!(extract(&h).ok(), Some(&b"abc"[..]));
        let h = headers(&[("authorization", "bEaReR   abc")]);
        assert_eq!(extract(&h).ok(), Some(&b"abc"[..]));
        let h = headers(&[("X-Api-Key", "abc")]);
        assert_eq!(extract(&h).ok(), Some(&b"abc"[..]));
        let h = headers(&[("authorization", "Bearer abc"), ("x-api-key", "abc")]);
        assert_eq!(extract(&h).ok(), Some(&b"abc"[..]));
        // Other schemes are someone else's business.
        let h = headers(&[
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("x-api-key", "abc"),
        ]);
        assert_eq!(extract(&h).ok(), Some(&b"abc"[..]));
    }

    #[test]
    fn missing_and_ambiguous() {
        assert_eq!(code(&HeaderMap::new()), Some(ErrorCode::MissingCredentials));
        assert_eq!(
            code(&headers(&[("authorization", "Basic x")])),
            Some(ErrorCode::MissingCredentials)
        );
        assert_eq!(
            code(&headers(&[
                ("authorization", "Bearer a"),
                ("x-api-key", "b")
            ])),
            Some(ErrorCode::AmbiguousCredentials)
        );
        assert_eq!(
            code(&headers(&[("x-api-key", "a"), ("x-api-key", "b")])),
            Some(ErrorCode::AmbiguousCredentials)
        );
    }
}
