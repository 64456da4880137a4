use std::sync::Arc;

use keyward_core::Clock;
use keyward_store::Store;

use crate::cache::{CacheSettings, KeyCache};
use crate::config::Config;
use crate::error::ErrorRenderer;
use crate::limits::Limiter;
use crate::routes::RouteTable;
use crate::usage::UsageRecorder;

/// What every handler can reach. Cheap to clone: everything is behind an `Arc`.
#[derive(Clone)]
pub struct AppState {
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
}

impl AppState {
    pub fn new(config: Config, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let errors = Arc::new(ErrorRenderer::new(&config.errors));
        let keys = Arc::new(KeyCache::new(CacheSettings {
            negative_capacity: config.cache.negative_capacity,
            negative_ttl_ms: i64::try_from(config.cache.negative_ttl_seconds.saturating_mul(1000))
                .unwrap_or(i64::MAX),
        }));
        let routes = Arc::new(RouteTable::new(&config.routes));
        let limiter = Arc::new(Limiter::new(None, config.ratelimit.clone()));
        Self {
            config: Arc::new(config),
            store,
            clock,
            errors,
            keys,
            usage: Arc::new(UsageRecorder::default()),
            routes,
            limiter,
            tokens: None,
        }
    }

    pub fn with_tokens(mut self, tokens: Arc<crate::tokens::TokenService>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Uses a shared rate-limit backend (Redis) instead of this node's memory.
    pub fn with_limit_backend(mut self, backend: Arc<dyn crate::limits::LimitBackend>) -> Self {
        self.limiter = Arc::new(Limiter::new(Some(backend), self.config.ratelimit.clone()));
        self
    }
}
