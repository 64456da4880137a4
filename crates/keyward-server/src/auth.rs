//! Verifying a credential: the code path shared by the management API and the data plane.
//!
//! Order (DESIGN.md section 2): credential present and well-formed, known, state, IP,
//! endpoint, scope. Nothing here logs or returns a secret.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use keyward_core::ids::{KeyId, OrgId};
use keyward_core::key::{Access, CompactKey, authorize};
use keyward_core::key_format::{KeyHash, is_well_formed};
use keyward_core::{ErrorCode, Timestamp};
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use crate::cache;
use crate::config::AuthConfig;
use crate::error::{ApiError, ApiResult};
use crate::extract::ClientIp;
use crate::limits::LimitReport;
use crate::state::AppState;
use crate::tokens::Remembered;
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
        for value in headers.get_all(name) {
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

/// Who a verified caller is.
#[derive(Debug, Clone)]
pub enum Subject {
    /// An API key (or an access token exchanged for one).
    Key(Arc<CompactKey>),
    /// A person, vouched for by a trusted frontend's proxy-auth JWT (internal listener only).
    User {
        user_id: String,
        project_id: Option<String>,
        scopes: Vec<Arc<str>>,
        org_id: OrgId,
        org_tier: Arc<str>,
    },
}

/// A caller who passed every check.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: Subject,
    pub client_ip: IpAddr,
    /// When the credential was checked: the request's time for its limits, usage and identity
    /// token too (one clock read per request where there were three, ~20 ns each).
    pub at: Timestamp,
}

/// Marks requests that came in on `server.internal_listen`, where proxy-auth JWTs count.
#[derive(Debug, Clone, Copy)]
pub struct InternalListener;

pub const PROXY_AUTH_HEADER: &str = "x-keyward-proxy-auth";

impl Principal {
    fn of_key(key: Arc<CompactKey>, client_ip: IpAddr, at: Timestamp) -> Self {
        Self {
            subject: Subject::Key(key),
            client_ip,
            at,
        }
    }

    /// Read through the key's shared profile: nothing is copied per request.
    pub fn org_id(&self) -> &OrgId {
        match &self.subject {
            Subject::Key(key) => &key.profile.org_id,
            Subject::User { org_id, .. } => org_id,
        }
    }

    pub fn org_tier(&self) -> &str {
        match &self.subject {
            Subject::Key(key) => &key.profile.org_tier,
            Subject::User { org_tier, .. } => org_tier,
        }
    }

    pub fn key(&self) -> Option<&Arc<CompactKey>> {
        match &self.subject {
            Subject::Key(key) => Some(key),
            Subject::User { .. } => None,
        }
    }

    /// How the audit log names this caller.
    pub fn actor_id(&self) -> String {
        self.actor_str().into_owned()
    }

    pub fn actor_str(&self) -> Cow<'_, str> {
        match &self.subject {
            Subject::Key(key) => Cow::Owned(key.id.to_string()),
            Subject::User { user_id, .. } => Cow::Borrowed(user_id),
        }
    }

    pub fn scopes(&self) -> &[Arc<str>] {
        match &self.subject {
            Subject::Key(key) => key.scopes(),
            Subject::User { scopes, .. } => scopes,
        }
    }

    pub fn project_id(&self) -> Option<&str> {
        match &self.subject {
            Subject::Key(key) => Some(key.profile.project_id.as_str()),
            Subject::User { project_id, .. } => project_id.as_deref(),
        }
    }

    pub fn user_id(&self) -> Option<&str> {
        match &self.subject {
            Subject::Key(key) => {
                let creator = key.profile.created_by.as_str();
                creator.starts_with("usr_").then_some(creator)
            }
            Subject::User { user_id, .. } => Some(user_id),
        }
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
    verify_token(state, token, client_ip, client_ip, route, required_scopes).await
}

/// As [`authenticate`], and on the internal listener a proxy-auth JWT stands in for a key.
pub async fn authenticate_on(
    state: &AppState,
    extensions: &axum::http::Extensions,
    headers: &HeaderMap,
    client_ip: IpAddr,
    route: Option<&str>,
    required_scopes: &[String],
) -> ApiResult<Principal> {
    if extensions.get::<InternalListener>().is_some()
        && let Some(value) = headers.get(PROXY_AUTH_HEADER)
    {
        return verify_proxy_auth(state, value.as_bytes(), client_ip, required_scopes).await;
    }
    authenticate(state, headers, client_ip, route, required_scopes).await
}

async fn verify_proxy_auth(
    state: &AppState,
    token: &[u8],
    client_ip: IpAddr,
    required_scopes: &[String],
) -> ApiResult<Principal> {
    let invalid = || ApiError::new(ErrorCode::InvalidToken);
    let tokens = state.tokens.as_ref().ok_or_else(invalid)?;
    if token.len() > crate::tokens::MAX_TOKEN_LEN {
        return Err(invalid());
    }
    let token = std::str::from_utf8(token).map_err(|_| invalid())?;
    let now = state.clock.now();
    let claims = tokens.verify_proxy_auth(token, now)?;
    if !required_scopes.iter().all(|s| claims.scopes.contains(s)) {
        return Err(ApiError::new(ErrorCode::InsufficientScope));
    }
    let org_id = OrgId::parse(&claims.org_id).ok_or_else(invalid)?;
    let org_tier = match state.store.get_org(&org_id).await {
        Ok(org) => Arc::from(org.tier),
        Err(keyward_store::StoreError::NotFound) => return Err(invalid()),
        Err(e) => return Err(e.into()),
    };
    Ok(Principal {
        subject: Subject::User {
            user_id: claims.sub,
            project_id: claims.project_id,
            scopes: claims.scopes.into_iter().map(Arc::from).collect(),
            org_id,
            org_tier,
        },
        client_ip,
        at: now,
    })
}

/// Steps 1 (well-formed) to 5 for a credential already taken from the request. The key's
/// IP rules see `client_ip`; unknown credentials are charged to `caller`, the address the
/// request came from (trusted proxies considered), never one a request body names.
pub async fn verify_token(
    state: &AppState,
    token: &[u8],
    client_ip: IpAddr,
    caller: IpAddr,
    route: Option<&str>,
    required_scopes: &[String],
) -> ApiResult<Principal> {
    if crate::tokens::looks_like_jwt(token) {
        return verify_jwt(state, token, client_ip, caller, route, required_scopes).await;
    }
    if !is_well_formed(token, state.config.keys.format) {
        return Err(ApiError::new(ErrorCode::InvalidApiKey));
    }
    let hash = KeyHash::of(token);
    let now = state.clock.now();
    let Some(key) = cache::resolve(&state.keys, &*state.store, &hash, caller, now).await? else {
        return Err(ApiError::new(ErrorCode::InvalidApiKey));
    };
    let access = Access {
        client_ip,
        route,
        required_scopes,
    };
    match authorize(&key, access, now) {
        Ok(()) => Ok(Principal::of_key(key, client_ip, now)),
        Err(code) => {
            if let Some(outcome) = Outcome::of(code) {
                state.usage.record(&key.id, outcome, now);
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
    caller: IpAddr,
    route: Option<&str>,
    required_scopes: &[String],
) -> ApiResult<Principal> {
    let invalid = || ApiError::new(ErrorCode::InvalidToken);
    let tokens = state.tokens.as_ref().ok_or_else(invalid)?;
    // Before the token is hashed (to look it up) or read: far longer than any we sign.
    if token.len() > crate::tokens::MAX_TOKEN_LEN {
        return Err(invalid());
    }
    let token = std::str::from_utf8(token).map_err(|_| invalid())?;
    let now = state.clock.now();
    let verified = match tokens.remembered(token, now) {
        Remembered::Valid(access) => access,
        Remembered::Expired => return Err(ApiError::new(ErrorCode::ExpiredToken)),
        Remembered::Unknown(digest) => {
            // A signature check that does not end valid counts against its caller's unknown
            // credentials, like an unknown key, and against the node's bound on forgeries
            // (`forgery.rs`): each costs ~40 µs, more than a proxied request.
            let caller = keyward_core::ip::client_network(caller);
            let is_cached = |key: &KeyId| state.keys.has_key_id(key);
            state
                .keys
                .refuse_if_spent(caller, now)
                .and_then(|()| state.forgeries.may_check(token, is_cached, now))
                .inspect_err(|_| crate::metrics::invalid_tokens_refused())?;
            tokens.check_access(digest, token, now).map_err(|refused| {
                if refused.checked {
                    state.keys.charge_invalid_token(caller, now);
                    state.forgeries.charge(token, is_cached, now);
                }
                refused.error
            })?
        }
    };
    let claims = &verified.claims;
    let Some(key) = cache::resolve_id(&state.keys, &*state.store, &verified.key_id).await? else {
        return Err(invalid());
    };
    let access = Access {
        client_ip,
        route,
        required_scopes,
    };
    let verdict = authorize(&key, access, now).and_then(|()| {
        if required_scopes.iter().all(|s| claims.scopes.contains(s)) {
            Ok(())
        } else {
            Err(ErrorCode::InsufficientScope)
        }
    });
    match verdict {
        Ok(()) => Ok(Principal::of_key(key, client_ip, now)),
        Err(code) => {
            if let Some(outcome) = Outcome::of(code) {
                state.usage.record(&key.id, outcome, now);
            }
            Err(ApiError::new(code))
        }
    }
}

/// What an admitted request carries forward.
#[derive(Debug)]
pub struct Admission {
    report: LimitReport,
    draft_headers: bool,
    /// Live credits left, for keys with credits.
    pub credits_remaining: Option<i64>,
}

impl Admission {
    /// Sets the rate-limit headers every authenticated answer gets.
    pub fn write_headers(&self, headers: &mut axum::http::HeaderMap) {
        self.report.write_headers(self.draft_headers, headers);
    }

    pub fn headers(&self) -> axum::http::HeaderMap {
        self.report.headers(self.draft_headers)
    }
}

/// Steps 6 and 7: limits and credits for an authenticated request of `cost` units. Counts the
/// outcome in the key's usage.
pub async fn admit(state: &AppState, principal: &Principal, cost: u32) -> ApiResult<Admission> {
    let now = principal.at;
    let plan = match principal.key() {
        Some(key) => state.limiter.plan(key, cost),
        None => state
            .limiter
            .plan_for_org(principal.org_id(), principal.org_tier(), cost),
    };
    let report = state.limiter.decide(&plan, now).await?;
    let draft_headers = state.config.ratelimit.draft_headers;
    // The memory backend counted it with the decision, in the entry that holds the key's log.
    let counted = report.usage_counted;
    let record = |outcome| {
        if let Some(key) = principal.key()
            && !counted
        {
            state.usage.record(&key.id, outcome, now);
        }
    };
    match report.error() {
        None => {
            record(Outcome::Allowed);
            Ok(Admission {
                credits_remaining: report.credits_remaining,
                report,
                draft_headers,
            })
        }
        Some(mut error) => {
            record(Outcome::RateLimited);
            error.headers = Some(Box::new(report.headers(draft_headers)));
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
        let principal = authenticate_on(
            state,
            &parts.extensions,
            &parts.headers,
            ip,
            None,
            &required,
        )
        .await?;
        if let Some(key) = principal.key() {
            state.usage.record(&key.id, Outcome::Allowed, principal.at);
        }
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
            key_headers: vec![axum::http::HeaderName::from_static("x-api-key")],
            hide_credentials: true,
            proxy_jwt_secret: None,
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
