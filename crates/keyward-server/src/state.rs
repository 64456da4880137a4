use std::sync::Arc;

use keyward_core::Clock;
use keyward_store::Store;

use crate::cache::{CacheSettings, KeyCache};
use crate::config::Config;
use crate::error::ErrorRenderer;
use crate::forgery::ForgeryGuard;
use crate::limits::Limiter;
use crate::routes::RouteTable;
use crate::usage::UsageRecorder;

/// What every handler can reach. Cloned per request, so it is one `Arc`: one reference count
/// to touch, not one per field (those cache lines bounced between the worker threads).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppStateInner>,
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.inner
    }
}

#[derive(Clone)]
pub struct AppStateInner {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub errors: Arc<ErrorRenderer>,
    pub keys: Arc<KeyCache>,
    pub usage: Arc<UsageRecorder>,
    pub routes: Arc<RouteTable>,
    pub limiter: Arc<Limiter>,
    /// JWT issuing and verification; absent in local CLI commands.
    pub tokens: Option<Arc<crate::tokens::TokenService>>,
    pub forgeries: Arc<ForgeryGuard>,
}

impl AppState {
    pub fn new(config: Config, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let errors = Arc::new(ErrorRenderer::new(&config.errors));
        let keys = Arc::new(KeyCache::new(CacheSettings {
            negative_capacity: config.cache.negative_capacity,
            negative_ttl_ms: i64::try_from(config.cache.negative_ttl_seconds.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            unknown_per_client: config.cache.unknown_keys_per_client,
            unknown_per_node: config.cache.unknown_keys_per_node,
        }));
        let forgeries = Arc::new(ForgeryGuard::new(config.cache.forged_tokens_per_node));
        let routes = Arc::new(RouteTable::new(&config.routes));
        // The keys' rate-limit logs and usage counts share one map entry per key.
        let usage = Arc::new(UsageRecorder::default());
        let limiter = Arc::new(Limiter::new(
            None,
            config.ratelimit.clone(),
            usage.activity().clone(),
        ));
        let inner = AppStateInner {
            config: Arc::new(config),
            store,
            clock,
            errors,
            keys,
            usage,
            routes,
            limiter,
            tokens: None,
            forgeries,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn with_tokens(mut self, tokens: Arc<crate::tokens::TokenService>) -> Self {
        Arc::make_mut(&mut self.inner).tokens = Some(tokens);
        self
    }

    /// Uses a shared rate-limit backend (Redis) instead of this node's memory.
    pub fn with_limit_backend(mut self, backend: Arc<dyn crate::limits::LimitBackend>) -> Self {
        let limiter = Arc::new(Limiter::new(
            Some(backend),
            self.config.ratelimit.clone(),
            self.usage.activity().clone(),
        ));
        Arc::make_mut(&mut self.inner).limiter = limiter;
        self
    }
}
