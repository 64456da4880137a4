//! `POST /v1/tokens/exchange` (path configurable) and `GET /.well-known/jwks.json`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use keyward_core::ErrorCode;
use serde_json::json;

use crate::auth::{admit, authenticate, extract_credential};
use crate::error::{ApiError, ApiResult};
use crate::extract::client_ip;
use crate::state::AppState;

/// Exchanges an API key (never a token: that would extend a token's life) for an access token.
/// Every data-plane check applies: key state, IP rules, limits. The key's endpoint
/// restriction and scopes travel with the token and are enforced where it is used.
pub async fn exchange(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tokens = state
        .tokens
        .clone()
        .ok_or_else(|| ApiError::internal("token service not loaded"))?;
    if crate::tokens::looks_like_jwt(extract_credential(&headers, &state.config.auth)?) {
        return Err(ApiError::new(ErrorCode::InvalidToken)
            .with_message("Exchange an API key, not a token."));
    }
    let ip = client_ip(peer.ip(), &headers, &state.config.server.trusted_proxies);
    let principal = authenticate(&state, &headers, ip, None, &[]).await;
    // A key restricted to one route may still exchange; the token keeps the restriction.
    let principal = match principal {
        Err(e) if e.code == ErrorCode::EndpointNotAllowed => {
            let token = extract_credential(&headers, &state.config.auth)?;
            let hash = keyward_core::key_format::KeyHash::of(token);
            let key =
                crate::cache::resolve(&state.keys, &*state.store, &hash, ip, state.clock.now())
                    .await?
                    .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey))?;
            let route = key.endpoint().map(str::to_owned);
            authenticate(&state, &headers, ip, route.as_deref(), &[]).await?
        }
        other => other?,
    };
    let key = principal
        .key()
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey))?;
    let admission = admit(&state, &principal, 1).await?;
    let token = tokens.issue_access(&key, state.clock.now())?;
    let mut response = Json(json!({
        "token": token,
        "token_type": "Bearer",
        "expires_in": tokens.ttl_seconds(),
    }))
    .into_response();
    admission.write_headers(response.headers_mut());
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

pub async fn jwks(State(state): State<AppState>) -> Response {
    let body = state
        .tokens
        .as_ref()
        .map(|t| t.jwks())
        .unwrap_or_else(|| json!({"keys": []}));
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}
