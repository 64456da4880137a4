//! The `redis` rate-limit backend: every node shares one limit, never exceeded in any rolling
//! window (see [`SCRIPT`] for how it is counted). One round trip per decision: a Lua script
//! evicts, checks every limit and the credits, and charges all or nothing, with Redis' own
//! clock so node clocks cannot skew the windows. All keys of one
//! decision carry the organisation as hash tag: one Redis Cluster slot per decision, ready for a
//! cluster client (keyward connects to a single endpoint for now).

use std::cell::RefCell;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use keyward_core::ids::KeyId;
use keyward_core::ratelimit::{self, Verdict};
use keyward_core::{ErrorCode, Timestamp};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::limits::{BackendError, LimitBackend, LimitPlan, LimitReport, Policy};

/// Each window is a hash of at most ~21 counters, one per slot of `window / 20` ms, named by
/// the slot's last millisecond, beside two fields: `n`, the units in those slots, and `lo`, the
/// oldest slot's name. Memory stays bounded whatever the traffic or the limit (a log of every
/// request, as the memory backend keeps, would hold up to `limit` entries per window in Redis).
/// A slot counts until its *last* millisecond leaves the window, so the count never misses a
/// request that the exact rule would count: never more than `limit` in any rolling window, and
/// a refused caller waits at most `window / 20` longer than the exact rule would make it wait.
///
/// An allowed decision reads `n` and `lo` only, so its cost does not grow with the slots; the
/// slots are read when the oldest has left (about once per slot length per window: evict,
/// count again) and on a refusal, which sorts them to say when the request would fit.
///
/// The answer is one string of integers (see [`parse_answer`]): `status, credits left`, then per
/// limit `remaining, reset ms, retry ms` (retry is -1 unless that limit refused).
const SCRIPT: &str = r#"
local tonumber, floor, max = tonumber, math.floor, math.max
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
local cost = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local out = {0, -1}
local all_ok = true
local oldest = {}
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  local h = redis.call('HMGET', key, 'n', 'lo')
  local used = tonumber(h[1]) or 0
  local lo = tonumber(h[2]) or -1
  local slots = nil
  if lo >= 0 and lo + window <= now then
    -- The oldest slot has left: evict every slot that has, and count the rest again. This
    -- happens about once per slot length per window, and copes with a changed window length.
    slots = redis.call('HGETALL', key)
    used, lo = 0, -1
    local gone = {}
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
    else
      if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
      redis.call('HSET', key, 'n', used, 'lo', lo)
    end
  end
  oldest[i] = lo
  local remaining = 0
  local retry = -1
  if used + cost <= limit then
    remaining = limit - used - cost
  else
    all_ok = false
    remaining = max(limit - used, 0)
    if cost > limit then
      retry = window
    else
      -- When enough of the oldest slots have left for the request to fit.
      slots = slots or redis.call('HGETALL', key)
      local live = {}
      for f = 1, #slots, 2 do
        local e = tonumber(slots[f])
        if e and e + window > now then live[#live + 1] = {e + window, tonumber(slots[f + 1])} end
      end
      table.sort(live, function(a, b) return a[1] < b[1] end)
      local need = used + cost - limit
      for _, slot in ipairs(live) do
        need = need - slot[2]
        if need <= 0 then
          retry = max(slot[1] - now, 0)
          break
        end
      end
      -- Only if the total and the slots disagreed, which a script never leaves behind.
      if retry < 0 then retry = window end
    end
  end
  local reset = 0
  if retry >= 0 then reset = retry end
  local o = #out
  out[o + 1] = remaining
  out[o + 2] = reset
  out[o + 3] = retry
end
local status = 0
if not all_ok then status = 1 end
local c = 3 + 2 * n
if tonumber(ARGV[c]) == 1 then
  local ck = KEYS[n + 1]
  local stored = tonumber(ARGV[c + 1])
  local version = tonumber(ARGV[c + 2])
  local refill = tonumber(ARGV[c + 3])
  local period = tonumber(ARGV[c + 4])
  local h = redis.call('HMGET', ck, 'v', 'r', 'p')
  local r, p = tonumber(h[2]), tonumber(h[3])
  if tonumber(h[1]) ~= version or not r then
    r, p = stored, period
    redis.call('HSET', ck, 'v', version, 'r', r, 'p', p)
  end
  if refill >= 0 and p ~= period then
    r, p = refill, period
    redis.call('HSET', ck, 'r', r, 'p', p)
  end
  if status == 0 then
    if r < cost then
      status = 2
    else
      r = redis.call('HINCRBY', ck, 'r', -cost)
    end
  end
  out[2] = r
end
-- The slot this request falls in, per limit: its last millisecond names it.
local function slot_end(window)
  local size = max(floor(window / 20), 1)
  return (floor(now / size) + 1) * size - 1
end
if all_ok and n > 0 then
  -- The binding limit, as keyward_core::ratelimit::binding picks it when nothing is refused:
  -- fewest units left, then the smallest limit, the first on ties.
  local b = 1
  for i = 2, n do
    local rem, lim = out[3 * i], tonumber(ARGV[1 + 2 * i])
    local brem, blim = out[3 * b], tonumber(ARGV[1 + 2 * b])
    if rem < brem or (rem == brem and lim < blim) then b = i end
  end
  local window = tonumber(ARGV[2 + 2 * b])
  if oldest[b] >= 0 then
    out[3 * b + 1] = max(oldest[b] + window - now, 0)
  elseif cost > 0 then
    out[3 * b + 1] = slot_end(window) + window - now
  end
end
if status == 0 and cost > 0 then
  for i = 1, n do
    local key = KEYS[i]
    local window = tonumber(ARGV[2 + 2 * i])
    local e = slot_end(window)
    redis.call('HINCRBY', key, 'n', cost)
    if redis.call('HINCRBY', key, string.format('%d', e), cost) == cost then
      if oldest[i] < 0 or e < oldest[i] then redis.call('HSET', key, 'lo', e) end
      -- The hash lives as long as its newest slot counts. A new slot is the newest unless the
      -- window's length (so its slot length) changed, or Redis' clock stepped back.
      local ttl = e + window - now + 1
      if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
    end
  end
end
out[1] = status
for j = 1, #out do out[j] = string.format('%d', out[j]) end
return table.concat(out, ' ')
"#;

/// The script's answer: `len` integers separated by single spaces. One bulk string, because
/// the client's reply parser costs about as much per array element as this whole parse.
fn parse_answer(answer: &str, len: usize) -> Option<Vec<i64>> {
    let mut out = Vec::with_capacity(len);
    for field in answer.split(' ') {
        out.push(field.parse().ok()?);
    }
    (out.len() == len).then_some(out)
}

thread_local! {
    // One multiplexed connection per worker thread, driven by that thread's runtime.
    static CONNECTION: RefCell<Option<ConnectionManager>> = const { RefCell::new(None) };
}

pub struct RedisBackend {
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
            client,
            script: redis::Script::new(SCRIPT),
            config,
            credits_seen: DashMap::new(),
        })
    }

    fn connection(&self) -> Result<ConnectionManager, BackendError> {
        CONNECTION.with(|cell| {
            let mut slot = cell.borrow_mut();
            if let Some(conn) = slot.as_ref() {
                return Ok(conn.clone());
            }
            let conn =
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
                    .map_err(|e| BackendError(e.to_string()))?;
            *slot = Some(conn.clone());
            Ok(conn)
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
        let id = key_id.map(KeyId::as_str).unwrap_or_default();
        let mut name = String::with_capacity(6 + org.len() + kind.len() + id.len());
        for part in ["kw:{", org, "}:", kind, id] {
            name.push_str(part);
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
        let mut conn = self.connection()?;
        let mut invocation = self.script.prepare_invoke();
        for (policy, _) in &plan.limits {
            invocation.key(Self::redis_key(plan, *policy));
        }
        invocation.arg(plan.cost).arg(plan.limits.len());
        for (_, limit) in &plan.limits {
            invocation.arg(limit.limit).arg(limit.window_ms);
        }
        match &plan.credits {
            Some(credits) => {
                invocation.key(Self::org_key(plan, "c:", plan.key_id));
                let (refill, period) = match &credits.refill {
                    Some(r) => (
                        r.amount,
                        ratelimit::refill_period(&r.interval, now.as_millis()),
                    ),
                    None => (-1, -1),
                };
                invocation
                    .arg(1)
                    .arg(credits.stored_remaining)
                    .arg(credits.version)
                    .arg(refill)
                    .arg(period);
            }
            None => {
                invocation.arg(0);
            }
        }
        let answer: String = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| BackendError(e.to_string()))?;
        let out = parse_answer(&answer, 2 + 3 * plan.limits.len())
            .ok_or_else(|| BackendError("unexpected answer from the rate-limit script".into()))?;
        let verdicts: Vec<(Policy, Verdict)> = plan
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
                .insert(key_id.clone(), (credits.version, remaining));
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
        })
    }

    fn dirty_credits(&self) -> Vec<(KeyId, i64, i64)> {
        let mut out = Vec::new();
        self.credits_seen.retain(|key, (version, remaining)| {
            out.push((key.clone(), *version, *remaining));
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
