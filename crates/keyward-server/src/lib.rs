//! keyward's HTTP server: configuration, the management API, the key lifecycle shared with
//! the CLI, and the serving runtime.

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod error;
pub mod extract;
pub mod lifecycle;
pub mod middleware;
pub mod serve;
pub mod state;
pub mod users;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use keyward_core::ErrorCode;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::state::AppState;

/// The public listener's application.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(api::router())
        .fallback(|| async { ApiError::new(ErrorCode::RouteNotFound) })
        .method_not_allowed_fallback(|| async { ApiError::new(ErrorCode::MethodNotAllowed) })
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::internal("handler panicked"))
        }))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::request_context,
        ))
        .with_state(state)
}

/// The internal listener: health and readiness (metrics come with the data plane).
pub fn internal_app(state: AppState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::request_context,
        ))
        .with_state(state)
}

async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    state.store.first_org().await?;
    Ok(axum::Json(serde_json::json!({"status": "ready"})))
}
