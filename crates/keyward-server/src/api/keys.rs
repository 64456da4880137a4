use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keyward_core::ErrorCode;
use keyward_core::ids::KeyId;
use keyward_core::key::{ApiKey, KeyState};
use keyward_store::KeyFilter;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;

use super::PageQuery;
use super::views::{KeyView, ListView};
use crate::auth::Management;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery};
use crate::lifecycle::{self, Actor, CreateKeyInput, RotateKeyInput, UpdateKeyInput};
use crate::state::AppState;

fn actor(Management(principal): &Management) -> Actor {
    Actor {
        id: principal.actor_id(),
        org_id: principal.key.org_id.clone(),
        ip: Some(principal.client_ip),
    }
}

/// The one answer that carries a secret.
fn with_secret(
    state: &AppState,
    key: &ApiKey,
    secret: &SecretString,
    status: StatusCode,
) -> Response {
    let mut view = KeyView::new(key, state.clock.now());
    view.key = Some(secret.expose_secret());
    let mut response = (status, Json(view)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub async fn create(
    State(state): State<AppState>,
    auth: Management,
    ApiJson(input): ApiJson<CreateKeyInput>,
) -> ApiResult<Response> {
    let (key, secret) = lifecycle::create_key(&state, &actor(&auth), input).await?;
    Ok(with_secret(&state, &key, &secret, StatusCode::CREATED))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    project: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Management(principal): Management,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    let org = &principal.key.org_id;
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .to_request(|c| KeyId::parse(c).is_some())?;
    let key_state = query
        .state
        .as_deref()
        .map(|s| {
            KeyState::parse(s).ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidRequest)
                    .with_param("state")
                    .with_message("`state` is `active`, `revoked` or `expired`.")
            })
        })
        .transpose()?;
    let project_id = match query.project.as_deref() {
        None => None,
        Some(reference) => match state.store.get_project(org, reference).await {
            Ok(p) => Some(p.id),
            Err(keyward_store::StoreError::NotFound) => return Err(ApiError::not_found("project")),
            Err(e) => return Err(e.into()),
        },
    };
    let filter = KeyFilter {
        project_id,
        state: key_state,
    };
    let now = state.clock.now();
    let keys = state.store.list_keys(org, &filter, &page, now).await?;
    Ok(Json(ListView::from_page(&keys, |k| KeyView::new(k, now))).into_response())
}

pub async fn show(
    State(state): State<AppState>,
    Management(principal): Management,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let key = lifecycle::get_key(&state, &principal.key.org_id, &id).await?;
    Ok(Json(KeyView::new(&key, state.clock.now())).into_response())
}

pub async fn update(
    State(state): State<AppState>,
    auth: Management,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<UpdateKeyInput>,
) -> ApiResult<Response> {
    let key = lifecycle::update_key(&state, &actor(&auth), &id, input).await?;
    Ok(Json(KeyView::new(&key, state.clock.now())).into_response())
}

pub async fn rotate(
    State(state): State<AppState>,
    auth: Management,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<RotateKeyInput>,
) -> ApiResult<Response> {
    let (key, secret) = lifecycle::rotate_key(&state, &actor(&auth), &id, input).await?;
    Ok(with_secret(&state, &key, &secret, StatusCode::OK))
}

pub async fn revoke(
    State(state): State<AppState>,
    auth: Management,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    lifecycle::revoke_key(&state, &actor(&auth), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeakReport {
    secrets: Vec<String>,
}

pub async fn leaked(
    State(state): State<AppState>,
    auth: Management,
    ApiJson(report): ApiJson<LeakReport>,
) -> ApiResult<Response> {
    let matched = lifecycle::report_leaked(&state, &actor(&auth), &report.secrets).await?;
    Ok(Json(json!({
        "object": "leak_report",
        "received": report.secrets.len(),
        "matched": matched,
    }))
    .into_response())
}
