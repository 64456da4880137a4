//! The gateway: every request that is not keyward's own API goes through the decision order
//! of DESIGN.md section 2 and, when allowed, to its route's upstream.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use keyward_core::ErrorCode;
use keyward_core::ids::RequestId;
use keyward_core::path;

use crate::auth::{admit, authenticate_on};
use crate::error::{ApiError, ApiResult};
use crate::extract::client_ip;
use crate::proxy::{self, Forward};
use crate::state::AppState;

/// The route a response belongs to, for metrics.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub Arc<str>);

pub fn is_trusted(state: &AppState, peer: std::net::IpAddr) -> bool {
    let peer = keyward_core::ip::canonical(peer);
    state
        .config
        .server
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer))
}

pub fn normalized_path(raw: &str) -> ApiResult<String> {
    path::normalize(raw).map_err(|_| {
        ApiError::new(ErrorCode::InvalidRequest)
            .with_param("path")
            .with_message("The request path is malformed or ambiguous.")
    })
}

pub async fn handle(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let path = match normalized_path(req.uri().path()) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let Some(route) = state.routes.find(&path) else {
        return ApiError::new(ErrorCode::RouteNotFound).into_response();
    };
    let label = RouteLabel(route.name.clone());
    let mut response = match decide_and_forward(&state, peer, req, route, path).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    response.extensions_mut().insert(label);
    response
}

async fn decide_and_forward(
    state: &AppState,
    peer: SocketAddr,
    req: Request,
    route: &crate::routes::Route,
    path: String,
) -> ApiResult<Response> {
    let trusted = is_trusted(state, peer.ip());
    let ip = client_ip(
        peer.ip(),
        req.headers(),
        &state.config.server.trusted_proxies,
    );
    let principal = authenticate_on(
        state,
        req.extensions(),
        req.headers(),
        ip,
        Some(&route.name),
        &route.scopes,
    )
    .await?;
    let admission = admit(state, &principal, route.cost).await?;
    let upstream_path = if route.strip_prefix {
        path::strip(&route.prefix, &path)
    } else {
        path
    };
    let request_id = req.extensions().get::<RequestId>().cloned();
    let forward = Forward {
        route,
        principal: &principal,
        upstream_path,
        peer: keyward_core::ip::canonical(peer.ip()),
        peer_trusted: trusted,
        request_id,
    };
    let mut response = proxy::forward(state, forward, req).await;
    response.headers_mut().extend(admission.headers);
    Ok(response)
}
