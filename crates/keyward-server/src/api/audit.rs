use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use keyward_core::ids::AuditId;

use super::PageQuery;
use super::views::{AuditView, ListView};
use crate::auth::Management;
use crate::error::ApiResult;
use crate::extract::ApiQuery;
use crate::state::AppState;

pub async fn list(
    State(state): State<AppState>,
    Management(principal): Management,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<Response> {
    let page = query.to_request(|c| AuditId::parse(c).is_some())?;
    let entries = state.store.list_audit(principal.org_id(), &page).await?;
    Ok(Json(ListView::from_page(&entries, AuditView::new)).into_response())
}
