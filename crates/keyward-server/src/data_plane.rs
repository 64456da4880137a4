//! The gateway: every request that is not keyward's own API goes through the decision order
//! of DESIGN.md section 2 and, when allowed, to its route's upstream.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use keyward_core::ErrorCode;
use keyward_core::path;

use crate::auth::{admit, authenticate_on};
use crate::error::{ApiError, ApiResult};
use crate::extract::client_ip;
use crate::middleware::{Passthrough, RequestIdHeader};
use crate::proxy::{self, ClientConn, Forward};
use crate::routes::Route;
use crate::state::AppState;

/// The route a response belongs to, for metrics.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub Arc<str>);

/// Whether a (canonical) peer address is one of `server.trusted_proxies`.
pub fn is_trusted(state: &AppState, peer: std::net::IpAddr) -> bool {
    state
        .config
        .server
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer))
}

pub fn normalized_path(raw: &str) -> ApiResult<Cow<'_, str>> {
    path::normalize(raw).map_err(|_| {
        ApiError::new(ErrorCode::InvalidRequest)
            .with_param("path")
            .with_message("The request path is malformed or ambiguous.")
    })
}

/// The axum fallback: gateway requests that came through keyward's own stack (the internal
/// listener, and CORS requests on the public one). The route and the upstream's authorship
/// of the answer travel as extensions, for the request-context middleware.
pub async fn handle(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let request_id = req
        .extensions()
        .get::<RequestIdHeader>()
        .map(|id| id.0.clone());
    let client = ClientConn::pooled(peer, &state);
    let (mut response, route) = route_and_forward(&state, &client, req, request_id.as_ref()).await;
    let extensions = response.extensions_mut();
    if extensions.get::<ApiError>().is_none() {
        extensions.insert(Passthrough);
    }
    if let Some(route) = route {
        extensions.insert(RouteLabel(route.name.clone()));
    }
    response
}

/// Finds the request's route and runs the decision order. Returns the answer with its route
/// (for metrics); any error status on it that is not a parked [`ApiError`] is the upstream's.
pub async fn route_and_forward<'s>(
    state: &'s AppState,
    client: &ClientConn,
    req: Request,
    request_id: Option<&HeaderValue>,
) -> (Response, Option<&'s Route>) {
    // The request moves on to the upstream; its path (a shared buffer) stays readable here.
    let uri = req.uri().clone();
    let path = match normalized_path(uri.path()) {
        Ok(p) => p,
        Err(e) => return (e.into_response(), None),
    };
    let Some(route) = state.routes.find(&path) else {
        return (
            ApiError::new(ErrorCode::RouteNotFound).into_response(),
            None,
        );
    };
    let response = match decide_and_forward(state, client, req, route, &path, request_id).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    (response, Some(route))
}

async fn decide_and_forward(
    state: &AppState,
    client: &ClientConn,
    req: Request,
    route: &Route,
    path: &str,
    request_id: Option<&HeaderValue>,
) -> ApiResult<Response> {
    let ip = client_ip(
        client.peer.ip(),
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
        path::strip(route.segments, path)
    } else {
        path
    };
    let forward = Forward {
        route,
        principal: &principal,
        upstream_path,
        client,
        request_id,
    };
    let mut response = proxy::forward(state, forward, req).await;
    admission.write_headers(response.headers_mut());
    Ok(response)
}
