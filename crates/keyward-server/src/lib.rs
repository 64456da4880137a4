//! keyward's HTTP server: configuration, the management API, the key lifecycle shared with
//! the CLI, and the serving runtime.

pub mod activity;
pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod cache;
pub mod config;
pub mod data_plane;
pub mod error;
pub mod extract;
pub mod forgery;
pub mod forward_auth;
pub mod front;
pub mod lifecycle;
pub mod limits;
pub mod master_key;
pub mod metrics;
pub mod middleware;
pub mod proxy;
pub mod redis_limits;
pub mod routes;
pub mod serve;
pub mod state;
pub mod token_routes;
pub mod tokens;
pub mod usage;
pub mod users;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::{MethodRouter, get, post};
use keyward_core::ErrorCode;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::error::ApiError;
use crate::state::AppState;

/// CORS from `[cors]`: the listed origins, or any origin (never with credentials).
fn cors(state: &AppState) -> CorsLayer {
    let origins = &state.config.cors.origins;
    let allow_origin = if origins.is_empty() {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    let mut allow_headers = vec![header::AUTHORIZATION, header::CONTENT_TYPE];
    allow_headers.extend(state.config.auth.key_headers.iter().cloned());
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(allow_headers)
        .expose_headers([HeaderName::from_static(middleware::REQUEST_ID_HEADER)])
        .max_age(std::time::Duration::from_secs(600))
}

/// keyward's own endpoints besides the management API, with their handlers.
fn own_routes(state: &AppState) -> Vec<(String, MethodRouter<AppState>)> {
    vec![
        (
            forward_auth::FORWARD_AUTH_PATH.to_owned(),
            get(forward_auth::forward_auth),
        ),
        ("/v1/verify".to_owned(), post(forward_auth::verify)),
        ("/.well-known/jwks.json".to_owned(), get(token_routes::jwks)),
        (
            state.config.tokens.exchange_path.clone(),
            post(token_routes::exchange),
        ),
    ]
}

/// The path patterns keyward answers itself on the public listener; every other path is the
/// gateway's.
pub fn own_paths(state: &AppState) -> Vec<String> {
    api::routes()
        .into_iter()
        .map(|(path, _)| path.to_owned())
        .chain(own_routes(state).into_iter().map(|(path, _)| path))
        .collect()
}

/// The public listener's application: keyward's own API, and the gateway for everything else.
pub fn app(state: AppState) -> Router {
    own_routes(&state)
        .into_iter()
        .fold(
            Router::new().merge(api::router()),
            |router, (path, handler)| router.route(&path, handler),
        )
        .fallback(data_plane::handle)
        .method_not_allowed_fallback(|| async { ApiError::new(ErrorCode::MethodNotAllowed) })
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::internal("handler panicked"))
        }))
        .layer(cors(&state))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::request_context,
        ))
        .with_state(state)
}

/// The internal listener: health, readiness, Prometheus metrics, and the whole public
/// application, where a trusted frontend's proxy-auth JWT (`X-Keyward-Proxy-Auth`) also counts.
pub fn internal_app(state: AppState, metrics: Option<PrometheusHandle>) -> Router {
    let render = move || {
        let text = metrics
            .as_ref()
            .map(PrometheusHandle::render)
            .unwrap_or_default();
        async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
    };
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::request_context,
        ))
        .with_state(state.clone())
        .fallback_service(app(state))
        .layer(axum::middleware::map_request(
            |mut req: axum::extract::Request| async move {
                req.extensions_mut().insert(auth::InternalListener);
                req
            },
        ))
}

async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    state.store.first_org().await?;
    Ok(axum::Json(serde_json::json!({"status": "ready"})))
}
