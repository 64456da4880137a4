//! Request context: a request id for every request, the error envelope for every error, and
//! one access-log line per request (method, path without query, status, code, latency; never
//! headers, query strings or bodies, which may carry credentials).

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use keyward_core::ids::RequestId;

use crate::data_plane::RouteLabel;
use crate::error::{ApiError, code_for_status};
use crate::state::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Marks a response whose error status is someone else's (an upstream's) and must pass as is.
#[derive(Debug, Clone, Copy)]
pub struct Passthrough;

pub async fn request_context(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = RequestId::generate();
    req.extensions_mut().insert(request_id.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    let mut response = next.run(req).await;
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map(|r| r.0.to_string())
        .unwrap_or_else(|| String::from("keyward"));

    let error = response.extensions_mut().remove::<ApiError>().or_else(|| {
        let status = response.status();
        let foreign =
            status.as_u16() >= 400 && response.extensions().get::<Passthrough>().is_none();
        foreign.then(|| ApiError::new(code_for_status(status)))
    });
    let code = error.as_ref().map(|e| e.code.as_str());
    if let Some(error) = &error {
        if let Some(cause) = &error.cause {
            tracing::error!(request_id = %request_id, code = error.code.as_str(), cause = %cause, "request failed");
        }
        let original_headers = std::mem::take(response.headers_mut());
        response = state.errors.render(error, &request_id);
        for (name, value) in original_headers.iter() {
            if !response.headers().contains_key(name) && name != axum::http::header::CONTENT_LENGTH
            {
                response.headers_mut().insert(name.clone(), value.clone());
            }
        }
    }
    if let Ok(value) = HeaderValue::from_str(request_id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let status = response.status().as_u16();
    metrics::counter!(
        "keyward_requests_total",
        "route" => route.clone(),
        "status" => status.to_string(),
        "code" => code.unwrap_or("ok"),
    )
    .increment(1);
    metrics::histogram!(crate::metrics::REQUEST_DURATION, "route" => route)
        .record(started.elapsed().as_secs_f64());
    tracing::info!(
        request_id = %request_id,
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        code = code.unwrap_or("-"),
        latency_us = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}
