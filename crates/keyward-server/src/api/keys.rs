use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keyward_core::ErrorCode;
use keyward_core::Timestamp;
use keyward_core::ids::KeyId;
use keyward_core::key::{ApiKey, KeyState};
use keyward_store::{KeyFilter, UsageCounts};
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
        org_id: principal.org_id().clone(),
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
    let org = principal.org_id();
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
    let key = lifecycle::get_key(&state, principal.org_id(), &id).await?;
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
}

fn bad_query(param: &str, message: &'static str) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest)
        .with_param(param)
        .with_message(message)
}

/// `GET /v1/keys/{id}/usage?from&to&granularity=minute|hour|day`: stored counts plus what
/// this node has not written yet. Buckets are UTC; only non-empty ones are listed.
pub async fn usage(
    State(state): State<AppState>,
    Management(principal): Management,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> ApiResult<Response> {
    let org = principal.org_id();
    let key = lifecycle::get_key(&state, org, &id).await?;
    let now = state.clock.now();
    let parse = |raw: &Option<String>, param: &str| -> ApiResult<Option<Timestamp>> {
        raw.as_deref()
            .map(|r| {
                Timestamp::parse_rfc3339(r).ok_or_else(|| {
                    bad_query(param, "Times are RFC 3339, e.g. 2026-11-22T00:00:00Z.")
                })
            })
            .transpose()
    };
    let to = parse(&query.to, "to")?.unwrap_or(now.plus_secs(60));
    let from = parse(&query.from, "from")?.unwrap_or(to.plus_secs(-24 * 3600));
    let bucket_ms: i64 = match query.granularity.as_deref().unwrap_or("hour") {
        "minute" => 60_000,
        "hour" => 3_600_000,
        "day" => 86_400_000,
        _ => {
            return Err(bad_query(
                "granularity",
                "`granularity` is minute, hour or day.",
            ));
        }
    };
    let span = to.as_millis() - from.as_millis();
    if span <= 0 {
        return Err(bad_query("from", "`from` must be before `to`."));
    }
    if span / bucket_ms > 10_000 {
        return Err(bad_query(
            "granularity",
            "Too many buckets: use a coarser granularity or a shorter range.",
        ));
    }
    let from = from.minute_start();
    let mut buckets: std::collections::BTreeMap<i64, UsageCounts> = Default::default();
    let (stored, pending) = state
        .usage
        .with_pending(&key.id, state.store.usage(org, &key.id, from, to))
        .await?;
    let minutes = stored
        .iter()
        .map(|r| (r.minute, r.counts))
        .chain(pending.into_iter().filter(|(m, _)| *m >= from && *m < to));
    for (minute, counts) in minutes {
        let start = minute.as_millis().div_euclid(bucket_ms) * bucket_ms;
        buckets.entry(start).or_default().add(&counts);
    }
    let mut totals = UsageCounts::default();
    let data: Vec<serde_json::Value> = buckets
        .iter()
        .map(|(start, c)| {
            totals.add(c);
            json!({
                "start": Timestamp::from_millis(*start).to_rfc3339(),
                "allowed": c.allowed,
                "unauthorized": c.unauthorized,
                "forbidden": c.forbidden,
                "rate_limited": c.rate_limited,
            })
        })
        .collect();
    Ok(Json(json!({
        "object": "usage",
        "key_id": key.id,
        "granularity": query.granularity.as_deref().unwrap_or("hour"),
        "from": from.to_rfc3339(),
        "to": to.to_rfc3339(),
        "data": data,
        "totals": {
            "allowed": totals.allowed,
            "unauthorized": totals.unauthorized,
            "forbidden": totals.forbidden,
            "rate_limited": totals.rate_limited,
        },
        "last_used_at": key.last_used_at.map(Timestamp::to_rfc3339),
    }))
    .into_response())
}
