//! One in-memory rate-limit decision: key quota + organisation minute and hour windows,
//! all checked and charged together, and the outcome counted in the key's usage
//! (`cargo bench -p keyward-server --bench limits`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keyward_core::Timestamp;
use keyward_core::ids::{KeyId, OrgId};
use keyward_core::ratelimit::{Limit, SlidingLog};
use keyward_server::limits::{LimitPlan, MemoryBackend, Policy};
use keyward_server::usage::UsageRecorder;

// The allocator `keyward serve` runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn plan<'a>(key_id: &'a KeyId, org_id: &'a OrgId) -> LimitPlan<'a> {
    LimitPlan {
        key_id: Some(key_id),
        org_id,
        limits: smallvec::smallvec![
            (
                Policy::Key,
                Limit {
                    limit: u64::MAX / 2,
                    window_ms: 60_000,
                },
            ),
            (
                Policy::OrgMinute,
                Limit {
                    limit: u64::MAX / 2,
                    window_ms: 60_000,
                },
            ),
            (
                Policy::OrgHour,
                Limit {
                    limit: u64::MAX / 2,
                    window_ms: 3_600_000,
                },
            ),
        ],
        cost: 1,
        credits: None,
    }
}

/// Decisions of `plans` in turn, 1 ms apart from `t`, timed; the usage counts they make are
/// taken every 10 s of that time, untimed, as the server's flush takes them (without it, each
/// key would keep a list of past minutes that grows without end).
fn timed_decisions(
    backend: &MemoryBackend,
    usage: &UsageRecorder,
    plans: &[LimitPlan<'_>],
    t: &mut i64,
    iters: u64,
) -> Duration {
    const FLUSH_EVERY: u64 = 10_000;
    let mut timed = Duration::ZERO;
    let mut done = 0;
    let mut next = 0;
    while done < iters {
        let chunk = (iters - done).min(FLUSH_EVERY);
        let started = Instant::now();
        for _ in 0..chunk {
            *t += 1;
            let plan = &plans[next];
            next = (next + 1) % plans.len();
            black_box(
                backend
                    .decide_now(black_box(plan), Timestamp::from_millis(*t))
                    .ok(),
            );
        }
        timed += started.elapsed();
        black_box(usage.drain(Timestamp::from_millis(*t)));
        done += chunk;
    }
    timed
}

fn decisions(c: &mut Criterion) {
    let usage = UsageRecorder::default();
    let backend = MemoryBackend::new(Arc::clone(usage.activity()));
    let (hot_key, hot_org) = (KeyId::generate(), OrgId::generate());
    let hot = [plan(&hot_key, &hot_org)];
    // Time advances 1 ms per decision: every decision appends to each window.
    let mut t = 1_800_000_000_000i64;
    c.bench_function("memory decision, 3 limits, 1 key", |b| {
        b.iter_custom(|iters| timed_decisions(&backend, &usage, &hot, &mut t, iters))
    });

    let ids: Vec<(KeyId, OrgId)> = (0..10_000)
        .map(|i| {
            let org = if i % 10 == 0 {
                OrgId::generate()
            } else {
                hot_org.clone()
            };
            (KeyId::generate(), org)
        })
        .collect();
    let many: Vec<LimitPlan> = ids.iter().map(|(key, org)| plan(key, org)).collect();
    c.bench_function("memory decision, 3 limits, 10k keys", |b| {
        b.iter_custom(|iters| timed_decisions(&backend, &usage, &many, &mut t, iters))
    });

    let mut log = SlidingLog::default();
    let limit = Limit {
        limit: 1_000_000,
        window_ms: 60_000,
    };
    c.bench_function("sliding log check + charge", |b| {
        b.iter(|| {
            t += 1;
            let v = log.check(limit, 1, t);
            if v.allowed {
                log.charge(1, t, limit.window_ms);
            }
            black_box(v)
        })
    });
}

criterion_group!(benches, decisions);
criterion_main!(benches);
