//! Steps 6 and 7 of the decision order: per-key quota, organisation tier limits (per minute,
//! per hour) and credits, decided together — all charged or none — by a backend: `memory`
//! (this node) or `redis` (every node, one round trip). Headers report the binding limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use dashmap::DashMap;
use keyward_core::ids::{KeyId, OrgId};
use keyward_core::key::{CompactKey, Refill};
use keyward_core::ratelimit::{self, Limit, SlidingLog, Verdict, ceil_secs};
use keyward_core::{ErrorCode, Timestamp};
use parking_lot::Mutex;
use smallvec::{SmallVec, smallvec};
use std::sync::atomic::{AtomicI64, Ordering};

use crate::activity::{Activity, ActivityMap};
use crate::config::{OnBackendError, RateLimitConfig, Tier};
use crate::error::ApiError;
use crate::usage::Outcome;

/// At most three limits apply to a request (key quota, organisation minute and hour): held
/// inline, where a `Vec` cost an allocation per request for the plan and one for the answer.
pub type PlanLimits = SmallVec<[(Policy, Limit); 3]>;
pub type Verdicts = SmallVec<[(Policy, Verdict); 3]>;

/// The limits that apply to one request, in reporting order.
#[derive(Debug, Clone)]
pub struct LimitPlan<'a> {
    /// The key whose quota and credits apply (none for a proxy-authenticated user).
    pub key_id: Option<&'a KeyId>,
    pub org_id: &'a OrgId,
    pub limits: PlanLimits,
    pub cost: u64,
    pub credits: Option<CreditPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Key,
    OrgMinute,
    OrgHour,
}

impl Policy {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::OrgMinute => "org-minute",
            Self::OrgHour => "org-hour",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CreditPlan {
    /// What storage says, used when the backend holds no state of this version yet.
    pub stored_remaining: i64,
    pub version: i64,
    pub refill: Option<Refill>,
}

/// A backend's answer.
#[derive(Debug, Clone)]
pub struct LimitReport {
    /// `None`: allowed. Otherwise `rate_limit_exceeded` or `usage_exhausted`.
    pub refused: Option<ErrorCode>,
    pub verdicts: Verdicts,
    /// Credits left after this request (if it has credits).
    pub credits_remaining: Option<i64>,
    /// The backend counted the outcome in the key's usage already (the memory backend, in
    /// the entry that holds the key's log).
    pub usage_counted: bool,
}

impl LimitReport {
    pub fn binding(&self) -> Option<&(Policy, Verdict)> {
        ratelimit::binding(self.verdicts.iter().map(|(_, v)| v)).and_then(|i| self.verdicts.get(i))
    }

    pub fn retry_after_secs(&self) -> Option<u64> {
        match self.refused {
            Some(ErrorCode::RateLimitExceeded) => self
                .binding()
                .and_then(|(_, v)| v.retry_after_ms)
                .map(ceil_secs),
            _ => None,
        }
    }

    /// `X-RateLimit-*` for the binding limit, and the IETF draft fields when enabled
    /// (draft-ietf-httpapi-ratelimit-headers: `RateLimit-Policy` lists every policy,
    /// `RateLimit` reports the binding one).
    pub fn headers(&self, draft: bool) -> HeaderMap {
        let mut h = HeaderMap::new();
        self.write_headers(draft, &mut h);
        h
    }

    /// [`Self::headers`] written straight into a response's map (replacing any upstream's).
    pub fn write_headers(&self, draft: bool, h: &mut HeaderMap) {
        let Some((policy, v)) = self.binding() else {
            return;
        };
        const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
        const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
        const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
        h.insert(LIMIT, number_value(v.limit));
        h.insert(REMAINING, number_value(v.remaining));
        h.insert(RESET, number_value(ceil_secs(v.reset_ms)));
        if draft {
            let policies = self
                .verdicts
                .iter()
                .map(|(p, v)| {
                    format!(
                        "\"{}\";q={};w={}",
                        p.name(),
                        v.limit,
                        ceil_secs(v.window_ms)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let current = format!(
                "\"{}\";r={};t={}",
                policy.name(),
                v.remaining,
                ceil_secs(v.reset_ms)
            );
            if let Ok(value) = HeaderValue::from_str(&policies) {
                h.insert(HeaderName::from_static("ratelimit-policy"), value);
            }
            if let Ok(value) = HeaderValue::from_str(&current) {
                h.insert(HeaderName::from_static("ratelimit"), value);
            }
        }
        if let Some(secs) = self.retry_after_secs() {
            h.insert(axum::http::header::RETRY_AFTER, number_value(secs));
        }
    }

    /// The 429 for a refused request, with `retry_after` in the body when retrying helps.
    pub fn error(&self) -> Option<ApiError> {
        let code = self.refused?;
        let mut error = ApiError::new(code);
        if let Some(secs) = self.retry_after_secs() {
            error.retry_after = Some(secs);
            error = error.with_message(format!("Too many requests. Retry after {secs} seconds."));
        }
        Some(error)
    }
}

/// Numbers below this are cut from one static string of digits.
const SMALL_NUMBERS: u64 = 10_000;

/// The header value of a number. Rate-limit headers mostly carry small numbers (limits, what
/// is left, seconds to a reset), and `HeaderValue::from(u64)` allocates and frees twice per
/// value (callgrind: ~190 instructions each); a value cut from a static string allocates
/// nothing, and its clones and drops touch no reference count.
pub fn number_value(n: u64) -> HeaderValue {
    static DIGITS: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| (0..SMALL_NUMBERS).map(|i| i.to_string()).collect());
    if n >= SMALL_NUMBERS {
        return HeaderValue::from(n);
    }
    // Where `n` starts in "0123…99100101…": the shorter numbers come first.
    let (mut begin, mut low, mut high, mut width) = (0, 0, 10, 1);
    while n >= high {
        begin += (high - low) * width;
        (low, high, width) = (high, high * 10, width + 1);
    }
    let begin = (begin + (n - low) * width) as usize;
    let digits: &'static str = &DIGITS[begin..begin + width as usize];
    HeaderValue::from_static(digits)
}

/// A refused request consumes nothing: report what is left without it.
pub fn uncharged(verdicts: Verdicts, cost: u64) -> Verdicts {
    verdicts
        .into_iter()
        .map(|(p, mut v)| {
            if v.allowed {
                v.remaining = (v.remaining + cost).min(v.limit);
            }
            (p, v)
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error("rate-limit backend: {0}")]
pub struct BackendError(pub String);

#[async_trait]
pub trait LimitBackend: Send + Sync + 'static {
    async fn decide(
        &self,
        plan: &LimitPlan<'_>,
        now: Timestamp,
    ) -> Result<LimitReport, BackendError>;
    /// Live credit counts that changed since the last call: `(key, version, remaining)`.
    fn dirty_credits(&self) -> Vec<(KeyId, i64, i64)>;
    /// Drops state nobody needs any more.
    fn evict_idle(&self, now: Timestamp);
}

/// Credits as a backend holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditState {
    pub version: i64,
    pub remaining: i64,
    pub period: Option<i64>,
    pub dirty: bool,
}

impl CreditState {
    fn load(plan: &CreditPlan, now: Timestamp) -> Self {
        Self {
            version: plan.version,
            remaining: plan.stored_remaining,
            period: plan
                .refill
                .as_ref()
                .map(|r| ratelimit::refill_period(&r.interval, now.as_millis())),
            dirty: false,
        }
    }

    /// Starts over when a person set new credits, refills when a new period began.
    pub fn refresh(&mut self, plan: &CreditPlan, now: Timestamp) {
        if self.version != plan.version {
            *self = Self::load(plan, now);
        }
        if let Some(refill) = &plan.refill {
            let period = ratelimit::refill_period(&refill.interval, now.as_millis());
            if self.period != Some(period) {
                self.period = Some(period);
                self.remaining = refill.amount;
                self.dirty = true;
            }
        }
    }
}

#[derive(Default)]
struct OrgLogs {
    minute: SlidingLog,
    hour: SlidingLog,
}

/// Ids are keyward's own, not chosen by clients: a fast hasher is safe here.
type IdMap<K, V> = DashMap<K, V, foldhash::fast::RandomState>;

/// Limits held by this node: exact, per key and per organisation, behind one small lock each.
/// A key's log is in its [`Activity`] entry, shared with the usage recorder: the decision
/// counts its outcome there too.
#[derive(Default)]
pub struct MemoryBackend {
    keys: Arc<ActivityMap>,
    orgs: IdMap<OrgId, Mutex<OrgLogs>>,
    credits: IdMap<KeyId, Mutex<CreditState>>,
}

/// One probe when the state exists (the common case), the entry API only to create it.
fn get_or_create<'a, K, V>(
    map: &'a IdMap<K, V>,
    id: &K,
) -> Result<dashmap::mapref::one::Ref<'a, K, V>, BackendError>
where
    K: std::hash::Hash + Eq + Clone,
    V: Default,
{
    if let Some(entry) = map.get(id) {
        return Ok(entry);
    }
    map.entry(id.clone()).or_default();
    map.get(id).ok_or_else(vanished)
}

fn vanished() -> BackendError {
    BackendError("limiter state vanished while in use".into())
}

impl MemoryBackend {
    /// Holds the keys' logs in `activity` (the usage recorder's map).
    pub fn new(activity: Arc<ActivityMap>) -> Self {
        Self {
            keys: activity,
            orgs: IdMap::default(),
            credits: IdMap::default(),
        }
    }

    pub fn activity(&self) -> &Arc<ActivityMap> {
        &self.keys
    }

    /// Decides on this node's memory (synchronous: no I/O), and counts the outcome in the
    /// key's usage.
    pub fn decide_now(
        &self,
        plan: &LimitPlan<'_>,
        now: Timestamp,
    ) -> Result<LimitReport, BackendError> {
        let Some(key_id) = plan.key_id else {
            return self.decide_with(&mut Activity::default(), plan, now);
        };
        // Lock order: key, then organisation, then credits — the same everywhere.
        self.keys.with(key_id, |key| {
            let mut report = self.decide_with(key, plan, now)?;
            let outcome = match report.refused {
                None => Outcome::Allowed,
                Some(_) => Outcome::RateLimited,
            };
            key.usage.count(outcome, now);
            report.usage_counted = true;
            Ok(report)
        })
    }

    fn decide_with(
        &self,
        key: &mut Activity,
        plan: &LimitPlan<'_>,
        now: Timestamp,
    ) -> Result<LimitReport, BackendError> {
        let t = now.as_millis();
        let org_entry = get_or_create(&self.orgs, plan.org_id)?;
        let mut org = org_entry.lock();
        let org = &mut *org;
        if let Some((_, limit)) = plan.limits.iter().find(|(p, _)| *p == Policy::Key) {
            key.window_ms = limit.window_ms;
        }
        let mut verdicts = Verdicts::new();
        for (policy, limit) in &plan.limits {
            let log = match policy {
                Policy::Key => &mut key.log,
                Policy::OrgMinute => &mut org.minute,
                Policy::OrgHour => &mut org.hour,
            };
            verdicts.push((*policy, log.check(*limit, plan.cost, t)));
        }
        if verdicts.iter().any(|(_, v)| !v.allowed) {
            return Ok(LimitReport {
                refused: Some(ErrorCode::RateLimitExceeded),
                verdicts: uncharged(verdicts, plan.cost),
                credits_remaining: self.peek_credits(plan, now)?,
                usage_counted: false,
            });
        }
        let cost = i64::try_from(plan.cost).unwrap_or(i64::MAX);
        let mut credits_remaining = None;
        if let (Some(credit_plan), Some(key_id)) = (&plan.credits, plan.key_id) {
            let entry = match self.credits.get(key_id) {
                Some(entry) => entry,
                None => {
                    self.credits
                        .entry(*key_id)
                        .or_insert_with(|| Mutex::new(CreditState::load(credit_plan, now)));
                    self.credits.get(key_id).ok_or_else(vanished)?
                }
            };
            let mut credits = entry.lock();
            credits.refresh(credit_plan, now);
            if credits.remaining < cost {
                return Ok(LimitReport {
                    refused: Some(ErrorCode::UsageExhausted),
                    verdicts: uncharged(verdicts, plan.cost),
                    credits_remaining: Some(credits.remaining),
                    usage_counted: false,
                });
            }
            credits.remaining -= cost;
            credits.dirty = true;
            credits_remaining = Some(credits.remaining);
        }
        for (policy, limit) in &plan.limits {
            let window = limit.window_ms;
            match policy {
                Policy::Key => key.log.charge(plan.cost, t, window),
                Policy::OrgMinute => org.minute.charge(plan.cost, t, window),
                Policy::OrgHour => org.hour.charge(plan.cost, t, window),
            }
        }
        Ok(LimitReport {
            refused: None,
            verdicts,
            credits_remaining,
            usage_counted: false,
        })
    }

    fn peek_credits(
        &self,
        plan: &LimitPlan<'_>,
        now: Timestamp,
    ) -> Result<Option<i64>, BackendError> {
        let Some(credit_plan) = &plan.credits else {
            return Ok(None);
        };
        let Some(key_id) = plan.key_id else {
            return Ok(None);
        };
        match self.credits.get(key_id) {
            Some(entry) => {
                let mut credits = entry.lock();
                credits.refresh(credit_plan, now);
                Ok(Some(credits.remaining))
            }
            None => Ok(Some(credit_plan.stored_remaining)),
        }
    }
}

#[async_trait]
impl LimitBackend for MemoryBackend {
    async fn decide(
        &self,
        plan: &LimitPlan<'_>,
        now: Timestamp,
    ) -> Result<LimitReport, BackendError> {
        self.decide_now(plan, now)
    }

    fn dirty_credits(&self) -> Vec<(KeyId, i64, i64)> {
        let mut out = Vec::new();
        for entry in self.credits.iter() {
            let mut c = entry.value().lock();
            if c.dirty {
                c.dirty = false;
                out.push((*entry.key(), c.version, c.remaining));
            }
        }
        out
    }

    fn evict_idle(&self, now: Timestamp) {
        let t = now.as_millis();
        // An empty log carries nothing forward: dropping it changes no decision. Counts not
        // yet written keep the entry.
        self.keys
            .retain(|_, key| !(key.log_is_idle(now) && key.usage.is_empty()));
        self.orgs.retain(|_, logs| {
            let l = logs.get_mut();
            !(l.minute.is_idle(t, 60_000) && l.hour.is_idle(t, 3_600_000))
        });
    }
}

/// The limiter the request path calls: the configured backend, its fallback, the tiers.
pub struct Limiter {
    backend: Arc<dyn LimitBackend>,
    /// Per-node limits used while a shared backend is unreachable (`on_backend_error = "local"`).
    local: Arc<MemoryBackend>,
    /// The backend is `local` itself: decided synchronously, without the trait's boxed
    /// future (an allocation per request).
    memory_only: bool,
    config: RateLimitConfig,
    /// After a backend error, the backend is skipped until then (ms since `started`).
    backoff_until_ms: AtomicI64,
    started: Instant,
}

pub const BACKEND_BACKOFF: Duration = Duration::from_secs(1);

impl Limiter {
    /// `activity`: the usage recorder's map, where this node's key logs go.
    pub fn new(
        backend: Option<Arc<dyn LimitBackend>>,
        config: RateLimitConfig,
        activity: Arc<ActivityMap>,
    ) -> Self {
        let local = Arc::new(MemoryBackend::new(activity));
        Self {
            memory_only: backend.is_none(),
            backend: backend.unwrap_or_else(|| local.clone()),
            local,
            config,
            backoff_until_ms: AtomicI64::new(0),
            started: Instant::now(),
        }
    }

    pub fn backend(&self) -> &Arc<dyn LimitBackend> {
        &self.backend
    }

    pub fn local(&self) -> &Arc<MemoryBackend> {
        &self.local
    }

    fn tier(&self, name: &str) -> Option<&Tier> {
        self.config
            .tiers
            .get(name)
            .or_else(|| self.config.tiers.get("free"))
    }

    pub fn plan<'a>(&self, key: &'a CompactKey, cost: u32) -> LimitPlan<'a> {
        let mut limits: PlanLimits = smallvec![(
            Policy::Key,
            Limit {
                limit: u64::from(key.quota_requests),
                window_ms: i64::from(key.quota_window) * 1000,
            },
        )];
        if let Some(tier) = self.tier(&key.profile.org_tier) {
            limits.push((
                Policy::OrgMinute,
                Limit {
                    limit: u64::from(tier.per_minute),
                    window_ms: 60_000,
                },
            ));
            limits.push((
                Policy::OrgHour,
                Limit {
                    limit: u64::from(tier.per_hour),
                    window_ms: 3_600_000,
                },
            ));
        }
        LimitPlan {
            key_id: Some(&key.id),
            org_id: &key.profile.org_id,
            limits,
            cost: u64::from(cost),
            credits: key.remaining().map(|stored_remaining| CreditPlan {
                stored_remaining,
                version: key.credits_version(),
                refill: key.refill().cloned(),
            }),
        }
    }

    /// The organisation's tier limits alone (a proxy-authenticated user has no key quota).
    pub fn plan_for_org<'a>(&self, org_id: &'a OrgId, org_tier: &str, cost: u32) -> LimitPlan<'a> {
        let limits = self
            .tier(org_tier)
            .map(|tier| {
                smallvec![
                    (
                        Policy::OrgMinute,
                        Limit {
                            limit: u64::from(tier.per_minute),
                            window_ms: 60_000,
                        },
                    ),
                    (
                        Policy::OrgHour,
                        Limit {
                            limit: u64::from(tier.per_hour),
                            window_ms: 3_600_000,
                        },
                    ),
                ]
            })
            .unwrap_or_default();
        LimitPlan {
            key_id: None,
            org_id,
            limits,
            cost: u64::from(cost),
            credits: None,
        }
    }

    fn elapsed_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    // An atomic, not a lock: every request asks.
    fn backing_off(&self) -> bool {
        self.backoff_until_ms.load(Ordering::Relaxed) > self.elapsed_ms()
    }

    fn back_off(&self) {
        let until = self.elapsed_ms() + i64::try_from(BACKEND_BACKOFF.as_millis()).unwrap_or(1000);
        self.backoff_until_ms.store(until, Ordering::Relaxed);
    }

    /// Decides; on a backend failure follows `ratelimit.on_backend_error`.
    pub async fn decide(
        &self,
        plan: &LimitPlan<'_>,
        now: Timestamp,
    ) -> Result<LimitReport, ApiError> {
        if !self.backing_off() {
            let decided = if self.memory_only {
                self.local.decide_now(plan, now)
            } else {
                self.backend.decide(plan, now).await
            };
            match decided {
                Ok(report) => return Ok(report),
                Err(e) => {
                    self.back_off();
                    tracing::warn!(error = %e, mode = ?self.config.on_backend_error, "rate-limit backend failed");
                }
            }
        }
        let mode = match self.config.on_backend_error {
            OnBackendError::Local => "local",
            OnBackendError::Allow => "allow",
            OnBackendError::Deny => "deny",
        };
        metrics::counter!("keyward_ratelimit_backend_errors_total", "mode" => mode).increment(1);
        match self.config.on_backend_error {
            OnBackendError::Local => self.local.decide_now(plan, now).map_err(ApiError::internal),
            OnBackendError::Allow => Ok(LimitReport {
                refused: None,
                verdicts: Verdicts::new(),
                credits_remaining: None,
                usage_counted: false,
            }),
            OnBackendError::Deny => Err(ApiError::new(ErrorCode::LimiterUnavailable)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::UsageRecorder;

    #[test]
    fn number_values_are_the_numbers_in_decimal() {
        let edges = [9_999, 10_000, 10_001, 1_000_000_000, u64::MAX];
        for n in (0..SMALL_NUMBERS + 100).chain(edges) {
            assert_eq!(number_value(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn idle_state_is_evicted_and_live_state_kept() {
        let usage = UsageRecorder::default();
        let backend = MemoryBackend::new(usage.activity().clone());
        fn plan<'a>(key: &'a KeyId, org: &'a OrgId) -> LimitPlan<'a> {
            LimitPlan {
                key_id: Some(key),
                org_id: org,
                limits: smallvec![
                    (
                        Policy::Key,
                        Limit {
                            limit: 10,
                            window_ms: 1_000,
                        },
                    ),
                    (
                        Policy::OrgMinute,
                        Limit {
                            limit: 100,
                            window_ms: 60_000,
                        },
                    ),
                    (
                        Policy::OrgHour,
                        Limit {
                            limit: 1000,
                            window_ms: 3_600_000,
                        },
                    ),
                ],
                cost: 1,
                credits: None,
            }
        }
        let (k1, k2, org) = (KeyId::generate(), KeyId::generate(), OrgId::generate());
        let t0 = Timestamp::from_millis(1_000_000);
        assert!(
            backend
                .decide_now(&plan(&k1, &org), t0)
                .unwrap()
                .refused
                .is_none()
        );
        assert!(
            backend
                .decide_now(&plan(&k2, &org), t0.plus_secs(30))
                .unwrap()
                .refused
                .is_none()
        );
        // k1's one-second window is empty again; k2 used it just now. Both counted a use.
        let now = t0.plus_millis(30_500);
        backend.evict_idle(now);
        assert!(
            backend.keys.contains(&k1),
            "its usage count is not written yet"
        );
        let (rows, _) = usage.drain(now);
        assert_eq!(rows.len(), 2, "the decisions counted the keys' usage");
        assert!(
            backend.keys.contains(&k1),
            "just used: a flush keeps the entry"
        );
        backend.evict_idle(now);
        assert!(!backend.keys.contains(&k1));
        assert!(backend.keys.contains(&k2));
        let (rows, _) = usage.drain(now);
        assert!(rows.is_empty());
        assert!(
            backend.keys.contains(&k2),
            "a flush keeps the entry of a key whose window is in use"
        );
        assert!(
            backend.orgs.contains_key(&org),
            "the org's hour window is still in use"
        );
        backend.evict_idle(t0.plus_secs(2 * 3600));
        assert!(backend.keys.is_empty() && backend.orgs.is_empty());
    }
}
