use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyward_core::ids::ProjectId;

use super::PageQuery;
use super::views::{ListView, OrgView, ProjectView};
use crate::auth::Management;
use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiQuery};
use crate::lifecycle::{self, Actor, CreateProjectInput};
use crate::state::AppState;

pub async fn list(
    State(state): State<AppState>,
    Management(principal): Management,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<Response> {
    let page = query.to_request(|c| ProjectId::parse(c).is_some())?;
    let projects = state.store.list_projects(principal.org_id(), &page).await?;
    Ok(Json(ListView::from_page(&projects, ProjectView::new)).into_response())
}

pub async fn create(
    State(state): State<AppState>,
    Management(principal): Management,
    ApiJson(input): ApiJson<CreateProjectInput>,
) -> ApiResult<Response> {
    let actor = Actor {
        id: principal.actor_id(),
        org_id: principal.org_id().clone(),
        ip: Some(principal.client_ip),
    };
    let project = lifecycle::create_project(&state, &actor, input).await?;
    Ok((StatusCode::CREATED, Json(ProjectView::new(&project))).into_response())
}

pub async fn org(
    State(state): State<AppState>,
    Management(principal): Management,
) -> ApiResult<Response> {
    let org = state.store.get_org(principal.org_id()).await?;
    Ok(Json(OrgView::new(&org)).into_response())
}
