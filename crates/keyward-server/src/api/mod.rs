//! The management API (control plane), under `/v1`.

mod audit;
mod keys;
mod projects;
pub mod views;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use keyward_core::ErrorCode;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub const DEFAULT_PAGE_SIZE: u32 = 20;
pub const MAX_PAGE_SIZE: u32 = 100;

/// Every management route: the one list both the router and the gateway's front (which must
/// know keyward's own paths to pass everything else straight to the data plane) are built from.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/v1/keys", get(keys::list).post(keys::create)),
        ("/v1/keys/leaked", post(keys::leaked)),
        (
            "/v1/keys/{id}",
            get(keys::show).patch(keys::update).delete(keys::revoke),
        ),
        ("/v1/keys/{id}/rotate", post(keys::rotate)),
        ("/v1/keys/{id}/usage", get(keys::usage)),
        ("/v1/projects", get(projects::list).post(projects::create)),
        ("/v1/org", get(projects::org)),
        ("/v1/audit-log", get(audit::list)),
    ]
}

pub fn router() -> Router<AppState> {
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router.route(path, handler)
        })
        .layer(axum::middleware::map_response(no_store))
}

/// Management answers describe credentials: no cache may keep them.
async fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// `limit` and `cursor`, shared by every list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl PageQuery {
    /// Validates the cursor with the id parser of the listed resource.
    pub fn to_request(
        &self,
        cursor_is_valid: impl Fn(&str) -> bool,
    ) -> ApiResult<keyward_store::PageRequest> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(ApiError::new(ErrorCode::InvalidRequest)
                .with_param("limit")
                .with_message(format!("`limit` must be between 1 and {MAX_PAGE_SIZE}.")));
        }
        if let Some(c) = &self.cursor
            && !cursor_is_valid(c)
        {
            return Err(ApiError::new(ErrorCode::InvalidRequest)
                .with_param("cursor")
                .with_message("`cursor` is not a cursor this list returned."));
        }
        Ok(keyward_store::PageRequest {
            limit,
            before: self.cursor.clone(),
        })
    }
}
