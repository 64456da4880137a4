//! The `redis` rate-limit backend: every node shares one limit, never exceeded in any rolling
//! window (see [`SCRIPT`] for how it is counted). A Lua script evicts, checks every limit and
//! the credits, and charges all or nothing, with Redis' own clock so node clocks cannot skew
//! the windows. Each worker thread sends its decisions in batches: while one script run is on
//! its way, the decisions that arrive meanwhile queue and go together in the next, decided one
//! after the other, exactly as separate runs would decide them. A batch waits for nothing but
//! the run before it, so an idle node sends batches of one.
//!
//! All keys of one decision carry the organisation as hash tag (one Redis Cluster slot per
//! decision); keyward connects to a single endpoint for now, and a cluster client would have to
//! split batches by slot.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use keyward_core::ids::KeyId;
use keyward_core::ratelimit::{self, Verdict};
use keyward_core::{ErrorCode, Timestamp};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};

use crate::limits::{BackendError, LimitBackend, LimitPlan, LimitReport, Policy, Verdicts};

/// Each window is a hash of at most ~21 counters, one per slot of `window / 20` ms, named by
/// the slot's last millisecond, beside two fields: `n`, the units in those slots, and `lo`, the
/// oldest slot's name. Memory stays bounded whatever the traffic or the limit (a log of every
/// request, as the memory backend keeps, would hold up to `limit` entries per window in Redis).
/// A slot counts until its *last* millisecond leaves the window, so the count never misses a
/// request that the exact rule would count: never more than `limit` in any rolling window, and
/// a refused caller waits at most `window / 20` longer than the exact rule would make it wait.
///
/// A decision reads a window's `n` and `lo` only, so its cost does not grow with the slots;
/// the slots are read when the oldest has left (about once per slot length per window: evict,
/// count again) and on a refusal, which sorts them to say when the request would fit. In a
/// batch, each window is read once and charged once, after the last decision: an
/// organisation's windows cost the same for a batch as for one request.
///
/// `ARGV[1]` is the number of decisions; then per decision `cost, n`, per limit
/// `limit, window ms`, and `1, stored credits, version, refill, period` or `0`. `KEYS` holds
/// per decision its `n` windows, then its credits if any. The answer is one string of integers
/// (see [`parse_answer`]), per decision `status, credits left`, then per limit
/// `remaining, reset ms, retry ms` (retry is -1 unless that limit refused).
const SCRIPT: &str = r#"
local tonumber, floor, max, fmt = tonumber, math.floor, math.max, string.format
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)

-- Each window is read once per batch; its charges are written once, after every decision.
local windows, order = {}, {}
local function load(key, window)
  local w = windows[key]
  if w then return w end
  local h = redis.call('HMGET', key, 'n', 'lo', 'w')
  -- `pending`: units charged in this batch, by slot; `window`: the longest length seen, and
  -- `stored_window` the one the hash's expiry was last set for (`w`).
  w = {used = tonumber(h[1]) or 0, lo = tonumber(h[2]) or -1, add = 0, pending = {}, window = 0,
       stored_window = tonumber(h[3]) or -1}
  if w.lo >= 0 and w.lo + window <= now then
    -- The oldest slot has left: evict every slot that has, and count the rest again. This
    -- happens about once per slot length per window, and copes with a changed window length.
    local slots = redis.call('HGETALL', key)
    local used, lo, gone = 0, -1, {}
    for f = 1, #slots, 2 do
      local e = tonumber(slots[f])
      if e then
        if e + window <= now then
          gone[#gone + 1] = slots[f]
        else
          used = used + tonumber(slots[f + 1])
          if lo < 0 or e < lo then lo = e end
        end
      end
    end
    if lo < 0 then
      redis.call('DEL', key)
      w.stored_window = -1
    else
      if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
      redis.call('HSET', key, 'n', fmt('%d', used), 'lo', fmt('%d', lo))
    end
    w.used, w.lo = used, lo
  end
  w.stored_lo = w.lo
  windows[key] = w
  order[#order + 1] = key
  return w
end

-- When enough of the oldest units have left for `need` more to fit: the stored slots plus
-- this batch's charges, oldest first.
local function wait_for(key, w, window, need)
  local by_end = {}
  local slots = redis.call('HGETALL', key)
  for f = 1, #slots, 2 do
    local e = tonumber(slots[f])
    if e and e + window > now then by_end[e] = (by_end[e] or 0) + tonumber(slots[f + 1]) end
  end
  for e, units in pairs(w.pending) do by_end[e] = (by_end[e] or 0) + units end
  local live = {}
  for e, units in pairs(by_end) do live[#live + 1] = {e + window, units} end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  for _, slot in ipairs(live) do
    need = need - slot[2]
    if need <= 0 then return max(slot[1] - now, 0) end
  end
  -- Only if the total and the slots disagreed, which a script never leaves behind.
  return window
end

local res = {}
local k, a = 1, 2
-- Per limit of the decision at hand (reused: a decision has at most three).
local ws, limits, windows_ms, slot_ends, oldest = {}, {}, {}, {}, {}
for _ = 1, tonumber(ARGV[1]) do
  local cost, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local base = #res
  res[base + 1] = 0
  res[base + 2] = -1
  local all_ok = true
  for i = 1, n do
    local key = KEYS[k]
    local limit, window = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    k, a = k + 1, a + 2
    local w = load(key, window)
    w.window = max(w.window, window)
    local size = max(floor(window / 20), 1)
    ws[i], limits[i], windows_ms[i], oldest[i] = w, limit, window, w.lo
    -- The slot this request falls in: its last millisecond names it.
    slot_ends[i] = (floor(now / size) + 1) * size - 1
    local remaining, retry = 0, -1
    if w.used + cost <= limit then
      remaining = limit - w.used - cost
    else
      all_ok = false
      remaining = max(limit - w.used, 0)
      if cost > limit then
        retry = window
      else
        retry = wait_for(key, w, window, w.used + cost - limit)
      end
    end
    local o = base + 3 * i
    res[o] = remaining
    -- A refused limit resets when the request fits; an allowed one's reset is only reported
    -- for the binding limit, below.
    res[o + 1] = max(retry, 0)
    res[o + 2] = retry
  end
  local status = 0
  if not all_ok then status = 1 end
  if tonumber(ARGV[a]) == 1 then
    local ck = KEYS[k]
    -- Stored as the argument strings: a Lua number becomes text with 14 digits at most.
    local stored_s, version_s, refill_s, period_s = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    local stored, version = tonumber(stored_s), tonumber(version_s)
    local refill, period = tonumber(refill_s), tonumber(period_s)
    k, a = k + 1, a + 5
    local h = redis.call('HMGET', ck, 'v', 'r', 'p')
    local v, r, p = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
    -- Only forward: a node whose cached key is older, or whose clock is a period behind,
    -- must not reset or refill credits again.
    if not v or not r or v < version then
      r, p = stored, period
      redis.call('HSET', ck, 'v', version_s, 'r', stored_s, 'p', period_s)
    end
    if refill >= 0 and (not p or p < period) then
      r, p = refill, period
      redis.call('HSET', ck, 'r', refill_s, 'p', period_s)
    end
    if status == 0 then
      if r < cost then
        status = 2
      else
        r = redis.call('HINCRBY', ck, 'r', -cost)
      end
    end
    res[base + 2] = r
  else
    a = a + 1
  end
  if all_ok and n > 0 then
    -- The binding limit, as keyward_core::ratelimit::binding picks it when nothing is
    -- refused: fewest units left, then the smallest limit, the first on ties.
    local b = 1
    for i = 2, n do
      local rem, brem = res[base + 3 * i], res[base + 3 * b]
      if rem < brem or (rem == brem and limits[i] < limits[b]) then b = i end
    end
    if oldest[b] >= 0 then
      res[base + 3 * b + 1] = max(oldest[b] + windows_ms[b] - now, 0)
    elseif cost > 0 then
      res[base + 3 * b + 1] = slot_ends[b] + windows_ms[b] - now
    end
  end
  if status == 0 and cost > 0 then
    for i = 1, n do
      local w, e = ws[i], slot_ends[i]
      w.used, w.add = w.used + cost, w.add + cost
      w.pending[e] = (w.pending[e] or 0) + cost
      if w.lo < 0 or e < w.lo then w.lo = e end
    end
  end
  res[base + 1] = status
end

for _, key in ipairs(order) do
  local w = windows[key]
  if w.add > 0 then
    redis.call('HINCRBY', key, 'n', w.add)
    local ttl = 0
    for e, units in pairs(w.pending) do
      if redis.call('HINCRBY', key, fmt('%d', e), units) == units then
        -- A new slot. The hash lives as long as its newest slot counts; a new slot is the
        -- newest unless the window's length (so its slot length) changed, or Redis' clock
        -- stepped back.
        ttl = max(ttl, e + w.window - now + 1)
      end
    end
    -- A longer window than the expiry was set for: the newest slot (this batch's) must
    -- count for the longer one.
    if w.window ~= w.stored_window then
      for e in pairs(w.pending) do ttl = max(ttl, e + w.window - now + 1) end
      if w.lo ~= w.stored_lo then
        redis.call('HSET', key, 'lo', fmt('%d', w.lo), 'w', w.window)
      else
        redis.call('HSET', key, 'w', w.window)
      end
    elseif w.lo ~= w.stored_lo then
      redis.call('HSET', key, 'lo', fmt('%d', w.lo))
    end
    if ttl > 0 and redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
end
for j = 1, #res do res[j] = fmt('%d', res[j]) end
return table.concat(res, ' ')
"#;

/// The most decisions sent in one script run.
const MAX_BATCH: usize = 64;

thread_local! {
    // One queue per worker thread and backend, drained by a task on that thread's runtime
    // with a multiplexed connection of its own.
    static QUEUES: RefCell<Vec<(u64, mpsc::UnboundedSender<Decision>)>> =
        const { RefCell::new(Vec::new()) };
}

/// Tells backends apart in [`QUEUES`] (a process may hold more than one, each with its URL).
static NEXT_BACKEND: AtomicU64 = AtomicU64::new(0);

/// One decision's part of a batch, and where its answer goes.
struct Decision {
    keys: Vec<String>,
    args: Vec<i64>,
    /// How many integers of the batch's answer are this decision's.
    answer_len: usize,
    reply: oneshot::Sender<Result<Vec<i64>, String>>,
}

/// Sends what queued while the previous run was on its way as the next run, until every
/// queue handle is gone. A failed run fails each of its decisions, which then follow
/// `on_backend_error`.
async fn send_batches(
    mut conn: ConnectionManager,
    script: redis::Script,
    mut decisions: mpsc::UnboundedReceiver<Decision>,
) {
    let runs = metrics::counter!("keyward_ratelimit_redis_runs_total");
    let decided = metrics::counter!("keyward_ratelimit_redis_decisions_total");
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while decisions.recv_many(&mut batch, MAX_BATCH).await > 0 {
        runs.increment(1);
        decided.increment(batch.len() as u64);
        let mut invocation = script.prepare_invoke();
        invocation.arg(batch.len());
        for decision in &batch {
            for key in &decision.keys {
                invocation.key(key);
            }
            invocation.arg(&decision.args);
        }
        let answer_len = batch.iter().map(|d| d.answer_len).sum();
        let answer = match invocation.invoke_async::<String>(&mut conn).await {
            Ok(answer) => parse_answer(&answer, answer_len)
                .ok_or_else(|| "unexpected answer from the rate-limit script".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        match answer {
            Ok(answer) => {
                let mut rest = answer.as_slice();
                for decision in batch.drain(..) {
                    let (own, tail) = rest.split_at(decision.answer_len);
                    rest = tail;
                    // The caller may have given up (its request ended); nothing to do then.
                    let _ = decision.reply.send(Ok(own.to_vec()));
                }
            }
            Err(e) => {
                for decision in batch.drain(..) {
                    let _ = decision.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The script's answer: `len` integers separated by single spaces. One bulk string, because
/// the client's reply parser costs about as much per array element as this whole parse.
fn parse_answer(answer: &str, len: usize) -> Option<Vec<i64>> {
    let mut out = Vec::with_capacity(len);
    for field in answer.split(' ') {
        out.push(field.parse().ok()?);
    }
    (out.len() == len).then_some(out)
}

fn saturating(units: u64) -> i64 {
    i64::try_from(units).unwrap_or(i64::MAX)
}

pub struct RedisBackend {
    id: u64,
    client: redis::Client,
    script: redis::Script,
    config: ConnectionManagerConfig,
    /// Live credit counts seen in answers, to write back to storage.
    credits_seen: DashMap<KeyId, (i64, i64)>,
}

impl RedisBackend {
    pub fn new(url: &str) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(|e| BackendError(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(250)))
            .set_response_timeout(Some(Duration::from_millis(250)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Self {
            id: NEXT_BACKEND.fetch_add(1, Ordering::Relaxed),
            client,
            script: redis::Script::new(SCRIPT),
            config,
            credits_seen: DashMap::new(),
        })
    }

    /// This worker thread's queue, with its batch sender started on first use (and again if
    /// the runtime that ran the last one is gone).
    fn queue(&self) -> Result<mpsc::UnboundedSender<Decision>, BackendError> {
        QUEUES.with(|cell| {
            let mut queues = cell.borrow_mut();
            if let Some((_, queue)) = queues.iter().find(|(id, _)| *id == self.id)
                && !queue.is_closed()
            {
                return Ok(queue.clone());
            }
            // Its sender is gone (a runtime that ended) or never started: drop the dead ones.
            queues.retain(|(id, queue)| *id != self.id && !queue.is_closed());
            let conn =
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
                    .map_err(|e| BackendError(e.to_string()))?;
            let (queue, decisions) = mpsc::unbounded_channel();
            tokio::spawn(send_batches(conn, self.script.clone(), decisions));
            queues.push((self.id, queue.clone()));
            Ok(queue)
        })
    }

    /// Names of the windows. Earlier builds kept other layouts under other names (sorted sets
    /// as `:k:`, `:om`, `:oh`; slots without a total as `:key:`, `:minute`, `:hour`), so a
    /// rolling upgrade meets no key it would misread.
    fn redis_key(plan: &LimitPlan<'_>, policy: Policy) -> String {
        match policy {
            Policy::Key => Self::org_key(plan, "window:key:", plan.key_id),
            Policy::OrgMinute => Self::org_key(plan, "window:minute", None),
            Policy::OrgHour => Self::org_key(plan, "window:hour", None),
        }
    }

    /// `kw:{org}:<kind><key id>`: the organisation is the hash tag (one Cluster slot per
    /// decision). Built by hand: this runs up to four times per request.
    fn org_key(plan: &LimitPlan<'_>, kind: &str, key_id: Option<&KeyId>) -> String {
        let org = plan.org_id.as_str();
        let mut name = String::with_capacity(6 + org.len() + kind.len() + KeyId::LEN);
        for part in ["kw:{", org, "}:", kind] {
            name.push_str(part);
        }
        if let Some(id) = key_id {
            id.push_to(&mut name);
        }
        name
    }
}

#[async_trait]
impl LimitBackend for RedisBackend {
    async fn decide(
        &self,
        plan: &LimitPlan<'_>,
        now: Timestamp,
    ) -> Result<LimitReport, BackendError> {
        let mut keys = Vec::with_capacity(plan.limits.len() + 1);
        let mut args = Vec::with_capacity(3 + 2 * plan.limits.len() + 5);
        for (policy, _) in &plan.limits {
            keys.push(Self::redis_key(plan, *policy));
        }
        args.extend([saturating(plan.cost), plan.limits.len() as i64]);
        for (_, limit) in &plan.limits {
            args.extend([saturating(limit.limit), limit.window_ms]);
        }
        match &plan.credits {
            Some(credits) => {
                keys.push(Self::org_key(plan, "c:", plan.key_id));
                let (refill, period) = match &credits.refill {
                    Some(r) => (
                        r.amount,
                        ratelimit::refill_period(&r.interval, now.as_millis()),
                    ),
                    None => (-1, -1),
                };
                args.extend([1, credits.stored_remaining, credits.version, refill, period]);
            }
            None => args.push(0),
        }
        let (reply, answer) = oneshot::channel();
        let decision = Decision {
            keys,
            args,
            answer_len: 2 + 3 * plan.limits.len(),
            reply,
        };
        let stopped = || BackendError("the rate-limit batch sender stopped".into());
        self.queue()?.send(decision).map_err(|_| stopped())?;
        let out = answer.await.map_err(|_| stopped())?.map_err(BackendError)?;
        let verdicts: Verdicts = plan
            .limits
            .iter()
            .zip(out[2..].chunks_exact(3))
            .map(|((policy, limit), answer)| {
                let [remaining, reset_ms, retry] = [answer[0], answer[1], answer[2]];
                (
                    *policy,
                    Verdict {
                        // A refused limit always says when the request would fit.
                        allowed: retry < 0,
                        limit: limit.limit,
                        remaining: u64::try_from(remaining).unwrap_or(0),
                        reset_ms,
                        retry_after_ms: (retry >= 0).then_some(retry),
                        window_ms: limit.window_ms,
                    },
                )
            })
            .collect();
        let credits_remaining = plan.credits.as_ref().map(|_| out[1]);
        if let (Some(credits), Some(remaining), Some(key_id)) =
            (&plan.credits, credits_remaining, plan.key_id)
        {
            self.credits_seen
                .insert(*key_id, (credits.version, remaining));
        }
        let refused = match out[0] {
            0 => None,
            1 => Some(ErrorCode::RateLimitExceeded),
            _ => Some(ErrorCode::UsageExhausted),
        };
        let verdicts = if refused.is_some() {
            crate::limits::uncharged(verdicts, plan.cost)
        } else {
            verdicts
        };
        Ok(LimitReport {
            refused,
            verdicts,
            credits_remaining,
            usage_counted: false,
        })
    }

    fn dirty_credits(&self) -> Vec<(KeyId, i64, i64)> {
        let mut out = Vec::new();
        self.credits_seen.retain(|key, (version, remaining)| {
            out.push((*key, *version, *remaining));
            false
        });
        out
    }

    /// Redis expires idle windows itself (`PEXPIRE` to the window length).
    fn evict_idle(&self, _now: Timestamp) {}
}

#[cfg(test)]
mod tests {
    use super::parse_answer;

    #[test]
    fn answers_parse_only_when_whole() {
        assert_eq!(
            parse_answer("0 -1 2 2061 -1", 5),
            Some(vec![0, -1, 2, 2061, -1])
        );
        assert_eq!(
            parse_answer("1 9007199254740993 0 3000 3000", 5),
            Some(vec![1, 9_007_199_254_740_993, 0, 3000, 3000])
        );
        for bad in [
            "0 -1 2 2061",
            "0 -1 2 2061 -1 7",
            "0 -1 2 2061 x",
            "0  -1 2 2061",
            "",
            "1e+14 0 0 0 0",
        ] {
            assert_eq!(parse_answer(bad, 5), None, "{bad:?}");
        }
    }
}
