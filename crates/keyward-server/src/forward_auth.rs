//! Verification for others: `GET /v1/auth` (nginx `auth_request`, Caddy `forward_auth`,
//! Traefik `forwardAuth`) and `POST /v1/verify` (services that call keyward themselves).

use std::net::{IpAddr, SocketAddr};

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{admit, authenticate_on, verify_token};
use crate::data_plane::{RouteLabel, normalized_path};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, client_ip};
use crate::proxy::insert_identity;
use crate::routes::Route;
use crate::state::AppState;

pub const FORWARD_AUTH_PATH: &str = "/v1/auth";
/// Identity (six), rate-limit (up to six with the draft fields) and `X-Request-Id`.
const ANSWER_HEADERS: usize = 13;

/// `GET /v1/auth`: 200 with identity headers, or the proxy path's 401/403.
pub async fn forward_auth(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    parts: axum::http::request::Parts,
) -> ApiResult<Response> {
    let (mut response, route) = check(&state, peer.ip(), &parts.headers, &parts.extensions).await?;
    if let Some(route) = route {
        response
            .extensions_mut()
            .insert(RouteLabel(route.name.clone()));
    }
    Ok(response)
}

/// The forward-auth decision for a request's headers (the gateway's front calls it directly),
/// with the route the original URI belongs to (for metrics).
pub async fn check<'s>(
    state: &'s AppState,
    peer: IpAddr,
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
) -> ApiResult<(Response, Option<&'s Route>)> {
    let ip = client_ip(peer, headers, &state.config.server.trusted_proxies);
    let original_uri = headers
        .get("x-forwarded-uri")
        .or_else(|| headers.get("x-original-uri"))
        .and_then(|v| v.to_str().ok());
    let route = match original_uri {
        Some(uri) => {
            let path = uri.split(['?', '#']).next().unwrap_or(uri);
            state.routes.find(&normalized_path(path)?)
        }
        None => None,
    };
    let scopes: &[String] = route.map(|r| r.scopes.as_slice()).unwrap_or_default();
    let principal = authenticate_on(
        state,
        extensions,
        headers,
        ip,
        route.map(|r| &*r.name),
        scopes,
    )
    .await?;
    let cost = route.map(|r| r.cost).unwrap_or(1);
    let admission = admit(state, &principal, cost).await?;
    let mut response = StatusCode::OK.into_response();
    // Room for what is added at once: the map would otherwise grow (and rehash) twice.
    response.headers_mut().reserve(ANSWER_HEADERS);
    admission.write_headers(response.headers_mut());
    insert_identity(state, &principal, response.headers_mut());
    Ok((response, route))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyInput {
    key: String,
    /// Name of a configured route: its scopes and the key's endpoint restriction apply.
    route: Option<String>,
    /// Further scopes the caller requires.
    #[serde(default)]
    scopes: Vec<String>,
    /// The end client's address, for the key's IP rules (default: the caller's address).
    ip: Option<IpAddr>,
}

/// `POST /v1/verify`: always 200 for a well-formed body; `valid` says the verdict.
pub async fn verify(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ApiJson(input): ApiJson<VerifyInput>,
) -> ApiResult<Response> {
    let route = match input.route.as_deref() {
        Some(name) => Some(state.config.route(name).ok_or_else(|| {
            ApiError::validation("route", "`route` must name a configured route.")
        })?),
        None => None,
    };
    let mut scopes = route.map(|r| r.scopes.clone()).unwrap_or_default();
    scopes.extend(input.scopes.iter().cloned());
    let caller = client_ip(peer.ip(), &headers, &state.config.server.trusted_proxies);
    // `ip` is the end user's address for the key's IP rules; what unknown credentials cost
    // is charged to the caller, which a body cannot choose.
    let ip = input.ip.unwrap_or(caller);
    let verdict = verify_token(
        &state,
        input.key.as_bytes(),
        ip,
        caller,
        route.map(|r| r.name.as_str()),
        &scopes,
    )
    .await;
    let cost = route.map(|r| r.cost).unwrap_or(1);
    let (verdict, limit_headers) = match verdict {
        Ok(principal) => match admit(&state, &principal, cost).await {
            Ok(admission) => (
                Ok((principal, admission.credits_remaining)),
                admission.headers(),
            ),
            Err(mut e) => {
                let headers = e.headers.take().map(|h| *h).unwrap_or_default();
                (Err(e), headers)
            }
        },
        Err(e) => (Err(e), HeaderMap::new()),
    };
    let ratelimit = ratelimit_object(&limit_headers);
    let body = match verdict {
        Ok((principal, credits_remaining)) => {
            let key = principal
                .key()
                .ok_or_else(|| ApiError::internal("verify resolved no key"))?;
            json!({
                "valid": true,
                "code": "VALID",
                "key_id": key.id,
                "org_id": key.profile.org_id,
                "project_id": key.profile.project_id,
                "scopes": key.scopes(),
                "expires_at": key.expires_at.map(|t| t.to_rfc3339()),
                "ratelimit": ratelimit,
                "remaining": credits_remaining,
                "meta": key.meta(),
            })
        }
        Err(e) if matches!(e.code.status(), 401 | 403 | 429) => {
            let mut body = json!({"valid": false, "code": e.code.as_str()});
            if e.code.status() == 429 {
                body["ratelimit"] = ratelimit;
                if let Some(secs) = e.retry_after {
                    body["retry_after"] = json!(secs);
                }
            }
            body
        }
        // Not a verdict on the key (storage down): answered as the error it is.
        Err(e) => return Err(e),
    };
    let mut response = Json(body).into_response();
    response.headers_mut().extend(limit_headers);
    Ok(response)
}

/// `{"limit", "remaining", "reset"}` from the rate-limit headers, or null.
fn ratelimit_object(headers: &HeaderMap) -> serde_json::Value {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (
        number("x-ratelimit-limit"),
        number("x-ratelimit-remaining"),
        number("x-ratelimit-reset"),
    ) {
        (Some(limit), Some(remaining), Some(reset)) => {
            json!({"limit": limit, "remaining": remaining, "reset": reset})
        }
        _ => serde_json::Value::Null,
    }
}
