//! Prometheus metrics, served on the internal listener.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUEST_DURATION: &str = "keyward_request_duration_seconds";

/// Installs the process-wide recorder; `None` when one is installed already.
pub fn install() -> Option<PrometheusHandle> {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.to_owned()), &buckets)
        .ok()?
        .install_recorder()
        .ok()
}

/// A label-less counter looked up once: finding it in the recorder per request hashes its
/// name under a lock. Resolved on first use, which comes after [`install`] in `serve`.
macro_rules! cached_counter {
    ($fn_name:ident, $metric:literal) => {
        pub fn $fn_name() {
            static COUNTER: std::sync::LazyLock<metrics::Counter> =
                std::sync::LazyLock::new(|| metrics::counter!($metric));
            COUNTER.increment(1);
        }
    };
}

cached_counter!(key_cache_hit, "keyward_key_cache_hits_total");
cached_counter!(key_cache_miss, "keyward_key_cache_misses_total");
cached_counter!(
    key_cache_negative_hit,
    "keyward_key_cache_negative_hits_total"
);
cached_counter!(unknown_keys_refused, "keyward_unknown_keys_refused_total");
cached_counter!(unknown_keys_filtered, "keyward_unknown_keys_filtered_total");
cached_counter!(
    invalid_tokens_refused,
    "keyward_invalid_tokens_refused_total"
);
