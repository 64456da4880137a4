//! Request context: a request id for every request, the error envelope for every error, and
//! one access-log line per request (method, path without query, status, code, latency; never
//! headers, query strings or bodies, which may carry credentials).
//!
//! Two callers share it: the axum middleware around keyward's own API, and the gateway's fast
//! path ([`crate::data_plane`]), which calls [`RequestContext::begin`] and
//! [`RequestContext::finish`] directly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use axum::body::Bytes;
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

/// A request's id as the `X-Request-Id` value, for requests that keyward's own stack serves
/// (an extension the gateway's fallback reads).
#[derive(Debug, Clone)]
pub struct RequestIdHeader(pub HeaderValue);

/// What a request's answer needs to know about its start.
pub struct RequestContext {
    started: Instant,
    /// The request id as the header value that the upstream and the answer both carry: made
    /// once, in the id's own allocation. Its text is read back only for errors and log lines.
    request_id: HeaderValue,
    /// Kept for the access log only when it is written.
    logged: Option<(Method, Uri)>,
}

impl RequestContext {
    pub fn begin(method: &Method, uri: &Uri) -> Self {
        let logged = tracing::enabled!(tracing::Level::INFO).then(|| (method.clone(), uri.clone()));
        let id = Bytes::from(RequestId::generate().into_string());
        Self {
            started: Instant::now(),
            // A ULID's characters are all valid in a header value.
            request_id: HeaderValue::from_maybe_shared(id)
                .unwrap_or_else(|_| HeaderValue::from_static("req_")),
            logged,
        }
    }

    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    fn request_id_text(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }

    /// Renders a parked error as the envelope, sets `X-Request-Id`, counts and logs. For
    /// responses of keyward's own stack, which carry their route and origin as extensions.
    pub fn finish(self, state: &AppState, mut response: Response) -> Response {
        let route = response.extensions_mut().remove::<RouteLabel>();
        let passthrough = response.extensions().get::<Passthrough>().is_some();
        self.complete(state, response, route.as_ref().map(|r| &*r.0), passthrough)
    }

    /// [`Self::finish`] for the front's gateway and forward-auth lanes, which say their route
    /// directly (an extension map costs allocations per request). Every error of keyward's
    /// own there is a parked [`ApiError`]: any other error status is the upstream's.
    pub fn finish_routed(
        self,
        state: &AppState,
        response: Response,
        route: Option<&str>,
    ) -> Response {
        self.complete(state, response, route, true)
    }

    fn complete(
        self,
        state: &AppState,
        mut response: Response,
        route: Option<&str>,
        passthrough: bool,
    ) -> Response {
        let error = response.extensions_mut().remove::<ApiError>().or_else(|| {
            let status = response.status();
            let foreign = status.as_u16() >= 400 && !passthrough;
            foreign.then(|| ApiError::new(code_for_status(status)))
        });
        let code = error.as_ref().map_or("ok", |e| e.code.as_str());
        if let Some(error) = &error {
            if let Some(cause) = &error.cause {
                tracing::error!(request_id = self.request_id_text(), code, cause = %cause, "request failed");
            }
            let original_headers = std::mem::take(response.headers_mut());
            response = state.errors.render(error, self.request_id_text());
            for (name, value) in original_headers.iter() {
                if !response.headers().contains_key(name)
                    && name != axum::http::header::CONTENT_LENGTH
                {
                    response.headers_mut().insert(name.clone(), value.clone());
                }
            }
        }
        let status = response.status().as_u16();
        let elapsed = self.started.elapsed();
        record_metrics(route.unwrap_or(OWN_ROUTE), status, code, elapsed);
        if let Some((method, uri)) = &self.logged {
            tracing::info!(
                request_id = self.request_id_text(),
                method = %method,
                path = %uri.path(),
                status,
                code = if error.is_some() { code } else { "-" },
                latency_us = elapsed.as_micros() as u64,
                "request"
            );
        }
        response.headers_mut().insert(REQUEST_ID, self.request_id);
        response
    }
}

/// One route's metric handles on one worker thread.
struct RouteMetrics {
    route: Box<str>,
    duration: metrics::Histogram,
    /// By status and code: a handful per route.
    requests: Vec<(u16, &'static str, metrics::Counter)>,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        Self {
            route: route.into(),
            duration: metrics::histogram!(
                crate::metrics::REQUEST_DURATION,
                "route" => route.to_owned()
            ),
            requests: Vec::new(),
        }
    }

    fn record(&mut self, status: u16, code: &'static str, took: std::time::Duration) {
        self.duration.record(took.as_secs_f64());
        match self
            .requests
            .iter()
            .find(|(s, c, _)| *s == status && *c == code)
        {
            Some((_, _, counter)) => counter.increment(1),
            None => {
                let counter = metrics::counter!(
                    "keyward_requests_total",
                    "route" => self.route.to_string(),
                    "status" => status.to_string(),
                    "code" => code,
                );
                counter.increment(1);
                self.requests.push((status, code, counter));
            }
        }
    }
}

thread_local! {
    // Metric handles per worker thread: looking one up in the recorder builds and hashes its
    // labels, which cost more than the rest of the bookkeeping together. Found by the route's
    // name, borrowed: nothing is copied or reference-counted per request.
    static METRICS: RefCell<HashMap<Box<str>, RouteMetrics, foldhash::fast::RandomState>> =
        RefCell::default();
}

fn record_metrics(route: &str, status: u16, code: &'static str, took: std::time::Duration) {
    METRICS.with_borrow_mut(|routes| {
        // One lookup for a route seen before; the entry is made on its first request.
        if let Some(metrics) = routes.get_mut(route) {
            metrics.record(status, code, took);
            return;
        }
        routes
            .entry(route.into())
            .or_insert_with(|| RouteMetrics::new(route))
            .record(status, code, took);
    });
}

/// The axum middleware around keyward's own API (and, on the internal listener, everything).
pub async fn request_context(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let context = RequestContext::begin(req.method(), req.uri());
    req.extensions_mut()
        .insert(RequestIdHeader(context.request_id.clone()));
    let response = next.run(req).await;
    context.finish(&state, response)
}
