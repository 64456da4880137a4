//! Forwarding an authorised request to its upstream: a pooled hyper client per worker thread
//! (connections stay on the runtime that uses them), bodies streamed both ways, hop-by-hop
//! headers dropped (RFC 9110 §7.6.1), the credential hidden, identity headers set after every
//! client-sent copy is dropped.

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Uri, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keyward_core::ErrorCode;
use keyward_core::ids::RequestId;
use serde_json::json;

use crate::auth::{Principal, is_bearer};
use crate::error::ApiError;
use crate::middleware::{Passthrough, REQUEST_ID_HEADER};
use crate::routes::{Route, Upstream};
use crate::state::AppState;

/// Idle upstream connections close before a typical upstream keep-alive (60 s+) would.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const ECHO_BODY_LIMIT: usize = 1024 * 1024;

pub const IDENTITY_PREFIX: &str = "x-keyward-";

thread_local! {
    static CLIENT: Client<HttpConnector, Body> = {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector)
    };
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// Drops every header a client could use to impersonate keyward's identity headers.
pub fn strip_identity(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(IDENTITY_PREFIX))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// The identity of a verified caller, as headers (for upstreams and forward-auth answers).
pub fn identity_headers(principal: &Principal) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(5);
    let mut push = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            out.push((HeaderName::from_static(name), v));
        }
    };
    push("x-keyward-org-id", principal.org_id.as_str());
    if let Some(project) = principal.project_id() {
        push("x-keyward-project-id", project);
    }
    if let Some(key) = principal.key() {
        push("x-keyward-key-id", key.id.as_str());
    }
    if let Some(user) = principal.user_id() {
        push("x-keyward-user-id", user);
    }
    push("x-keyward-scopes", &principal.scopes().join(" "));
    out
}

pub struct Forward<'a> {
    pub route: &'a Route,
    pub principal: &'a Principal,
    pub upstream_path: String,
    /// The socket peer: what this hop appends to `X-Forwarded-For`.
    pub peer: IpAddr,
    pub peer_trusted: bool,
    pub request_id: Option<RequestId>,
}

fn prepare_headers(state: &AppState, f: &Forward<'_>, headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    strip_identity(headers);
    if state.config.auth.hide_credentials {
        for name in &state.config.auth.key_headers {
            headers.remove(name.as_str());
        }
        if headers.get(header::AUTHORIZATION).is_some_and(is_bearer) {
            headers.remove(header::AUTHORIZATION);
        }
    }
    for (name, value) in identity_headers(f.principal) {
        headers.insert(name, value);
    }
    if let Some(tokens) = &state.tokens {
        match tokens.identity_for(f.principal, state.clock.now()) {
            Ok(value) => {
                headers.insert(HeaderName::from_static("x-keyward-identity"), value);
            }
            Err(e) => tracing::warn!(code = e.code.as_str(), "cannot sign the identity token"),
        }
    }
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let chain = match headers.get(&forwarded_for).and_then(|v| v.to_str().ok()) {
        Some(existing) if f.peer_trusted => format!("{existing}, {}", f.peer),
        // From an untrusted peer a client-sent chain is a claim nobody vouched for.
        _ => f.peer.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(forwarded_for, value);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if let Some(id) = &f.request_id
        && let Ok(value) = HeaderValue::from_str(id.as_str())
    {
        headers.insert(REQUEST_ID_HEADER, value);
    }
}

/// Sends the request upstream and streams the answer back.
pub async fn forward(state: &AppState, f: Forward<'_>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    prepare_headers(state, &f, &mut parts.headers);
    let query = parts.uri.query().map(str::to_owned);
    match &f.route.upstream {
        Upstream::Echo => echo(parts, body, &f.upstream_path, query.as_deref()).await,
        Upstream::Http {
            scheme,
            authority,
            base_path,
        } => {
            let mut path_and_query = format!("{base_path}{}", f.upstream_path);
            if let Some(q) = &query {
                path_and_query.push('?');
                path_and_query.push_str(q);
            }
            let uri = Uri::builder()
                .scheme(scheme.clone())
                .authority(authority.clone())
                .path_and_query(path_and_query)
                .build();
            let uri = match uri {
                Ok(uri) => uri,
                Err(e) => {
                    return ApiError::new(ErrorCode::InvalidRequest)
                        .with_cause(e)
                        .into_response();
                }
            };
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
            parts.uri = uri;
            parts.version = Version::HTTP_11;
            let request = Request::from_parts(parts, body);
            let client = CLIENT.with(Clone::clone);
            match tokio::time::timeout(f.route.timeout, client.request(request)).await {
                Err(_) => ApiError::new(ErrorCode::UpstreamTimeout).into_response(),
                Ok(Err(e)) => ApiError::new(ErrorCode::UpstreamUnavailable)
                    .with_cause(e)
                    .into_response(),
                Ok(Ok(response)) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    parts.extensions.insert(Passthrough);
                    Response::from_parts(parts, Body::new(body))
                }
            }
        }
    }
}

/// The built-in upstream: answers with the request as an upstream would have received it.
async fn echo(
    parts: axum::http::request::Parts,
    body: Body,
    path: &str,
    query: Option<&str>,
) -> Response {
    let body = match axum::body::to_bytes(body, ECHO_BODY_LIMIT).await {
        Ok(bytes) => bytes,
        Err(_) => return ApiError::new(ErrorCode::PayloadTooLarge).into_response(),
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                json!(String::from_utf8_lossy(value.as_bytes())),
            )
        })
        .collect();
    axum::Json(json!({
        "method": parts.method.as_str(),
        "path": path,
        "query": query,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}
