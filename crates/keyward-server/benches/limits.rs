//! One in-memory rate-limit decision: key quota + organisation minute and hour windows,
//! all checked and charged together (`cargo bench -p keyward-server --bench limits`).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keyward_core::Timestamp;
use keyward_core::ids::{KeyId, OrgId};
use keyward_core::ratelimit::{Limit, SlidingLog};
use keyward_server::limits::{LimitPlan, MemoryBackend, Policy};

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

fn decisions(c: &mut Criterion) {
    let backend = MemoryBackend::default();
    let (hot_key, hot_org) = (KeyId::generate(), OrgId::generate());
    let hot = plan(&hot_key, &hot_org);
    // Time advances 1 ms per decision: every decision appends to each window.
    let mut t = 1_800_000_000_000i64;
    c.bench_function("memory decision, 3 limits, 1 key", |b| {
        b.iter(|| {
            t += 1;
            black_box(backend.decide_now(black_box(&hot), Timestamp::from_millis(t)))
        })
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
    let mut i = 0;
    c.bench_function("memory decision, 3 limits, 10k keys", |b| {
        b.iter(|| {
            t += 1;
            i = (i + 1) % many.len();
            black_box(backend.decide_now(black_box(&many[i]), Timestamp::from_millis(t)))
        })
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
