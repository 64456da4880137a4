//! Request context: a request id for every request, the error envelope for every error, and
//! one access-log line per request (method, path without query, status, code, latency; never
//! headers, query strings or bodies, which may carry credentials).
//!
//! Two callers share it: the axum middleware around keyward's own API, and the gateway's fast
//! path ([`crate::data_plane`]), which calls [`RequestContext::begin`] and
//! [`RequestContext::finish`] directly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::Response;
use keyward_core::ids::RequestId;

use crate::data_plane::RouteLabel;
use crate::error::{ApiError, code_for_status};
use crate::state::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const OWN_ROUTE: &str = "keyward";

/// Marks a response whose error status is someone else's (an upstream's) and must pass as is.
#[derive(Debug, Clone, Copy)]
pub struct Passthrough;

/// What a request's answer needs to know about its start.
pub struct RequestContext {
    started: Instant,
    pub request_id: RequestId,
    /// Kept for the access log only when it is written.
    logged: Option<(Method, Uri)>,
}

impl RequestContext {
    pub fn begin(method: &Method, uri: &Uri) -> Self {
        let logged = tracing::enabled!(tracing::Level::INFO).then(|| (method.clone(), uri.clone()));
        Self {
            started: Instant::now(),
            request_id: RequestId::generate(),
            logged,
        }
    }

    /// Renders a parked error as the envelope, sets `X-Request-Id`, counts and logs.
    pub fn finish(self, state: &AppState, mut response: Response) -> Response {
        let route = response.extensions_mut().remove::<RouteLabel>();
        let error = response.extensions_mut().remove::<ApiError>().or_else(|| {
            let status = response.status();
            let foreign =
                status.as_u16() >= 400 && response.extensions().get::<Passthrough>().is_none();
            foreign.then(|| ApiError::new(code_for_status(status)))
        });
        let code = error.as_ref().map_or("ok", |e| e.code.as_str());
        if let Some(error) = &error {
            if let Some(cause) = &error.cause {
                tracing::error!(request_id = %self.request_id, code, cause = %cause, "request failed");
            }
            let original_headers = std::mem::take(response.headers_mut());
            response = state.errors.render(error, &self.request_id);
            for (name, value) in original_headers.iter() {
                if !response.headers().contains_key(name)
                    && name != axum::http::header::CONTENT_LENGTH
                {
                    response.headers_mut().insert(name.clone(), value.clone());
                }
            }
        }
        if let Ok(value) = HeaderValue::from_str(self.request_id.as_str()) {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        let status = response.status().as_u16();
        let elapsed = self.started.elapsed();
        record_metrics(route.as_ref().map(|r| &r.0), status, code, elapsed);
        if let Some((method, uri)) = &self.logged {
            tracing::info!(
                request_id = %self.request_id,
                method = %method,
                path = %uri.path(),
                status,
                code = if error.is_some() { code } else { "-" },
                latency_us = elapsed.as_micros() as u64,
                "request"
            );
        }
        response
    }
}

type CounterKey = (Option<Arc<str>>, u16, &'static str);

thread_local! {
    // Metric handles per worker thread: looking one up in the recorder builds and hashes its
    // labels, which cost more than the rest of the bookkeeping together.
    static COUNTERS: RefCell<HashMap<CounterKey, metrics::Counter, foldhash::fast::RandomState>> =
        RefCell::default();
    static HISTOGRAMS: RefCell<HashMap<Option<Arc<str>>, metrics::Histogram, foldhash::fast::RandomState>> =
        RefCell::default();
}

fn record_metrics(
    route: Option<&Arc<str>>,
    status: u16,
    code: &'static str,
    took: std::time::Duration,
) {
    let label = || route.map_or_else(|| String::from(OWN_ROUTE), |r| r.to_string());
    COUNTERS.with_borrow_mut(|counters| {
        let key = (route.cloned(), status, code);
        counters
            .entry(key)
            .or_insert_with(|| {
                metrics::counter!(
                    "keyward_requests_total",
                    "route" => label(),
                    "status" => status.to_string(),
                    "code" => code,
                )
            })
            .increment(1);
    });
    HISTOGRAMS.with_borrow_mut(|histograms| {
        histograms
            .entry(route.cloned())
            .or_insert_with(
                || metrics::histogram!(crate::metrics::REQUEST_DURATION, "route" => label()),
            )
            .record(took.as_secs_f64());
    });
}

/// The axum middleware around keyward's own API (and, on the internal listener, everything).
pub async fn request_context(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let context = RequestContext::begin(req.method(), req.uri());
    req.extensions_mut().insert(context.request_id.clone());
    let response = next.run(req).await;
    context.finish(&state, response)
}
