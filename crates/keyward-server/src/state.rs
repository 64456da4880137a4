use std::sync::Arc;

use keyward_core::Clock;
use keyward_store::Store;

use crate::config::Config;
use crate::error::ErrorRenderer;

/// What every handler can reach. Cheap to clone: everything is behind an `Arc`.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub errors: Arc<ErrorRenderer>,
}

impl AppState {
    pub fn new(config: Config, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let errors = Arc::new(ErrorRenderer::new(&config.errors));
        Self {
            config: Arc::new(config),
            store,
            clock,
            errors,
        }
    }
}
