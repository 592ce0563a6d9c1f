//! What the handlers share: the prepared state (config, providers, auth) behind one `ArcSwap`, so a
//! request takes one snapshot when it starts and finishes on it (reload swaps it, issue #9), plus
//! the session store, the metrics and the lifecycle flags.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::ServerError;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::llm::ProviderRegistry;
use crate::sessions::SessionStore;
use crate::telemetry::Metrics;

/// Everything derived from one config, prepared before it serves.
#[derive(Debug)]
pub struct Prepared {
    /// The config.
    pub config: Config,
    /// Its providers.
    pub registry: ProviderRegistry,
    /// Its credentials.
    pub auth: Authenticator,
}

impl Prepared {
    /// Prepares the state of a validated config.
    pub fn new(config: Config) -> Self {
        let registry = ProviderRegistry::from_config(&config.llm);
        let auth = Authenticator::new(config.auth.token.as_ref().map(|t| t.expose()));
        Self {
            config,
            registry,
            auth,
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct AppState {
    prepared: ArcSwap<Prepared>,
    /// Sessions, per principal.
    pub sessions: SessionStore,
    /// Metrics, when the metrics listener is on.
    pub metrics: Option<Arc<Metrics>>,
    listening: AtomicBool,
    draining: AtomicBool,
    /// When the server started.
    pub started: Instant,
}

impl AppState {
    /// Prepares the state; metrics objects exist only when `with_metrics`.
    pub fn new(config: Config, with_metrics: bool) -> Result<Self, ServerError> {
        let sessions = SessionStore::new(config.sessions_dir());
        let prepared = Prepared::new(config);
        let metrics = match with_metrics {
            true => {
                let m = Metrics::new()?;
                m.set_server_info(
                    crate::VERSION,
                    prepared
                        .registry
                        .default_provider()
                        .map(|p| p.name())
                        .unwrap_or(""),
                    &prepared.registry.default_model(),
                );
                Some(Arc::new(m))
            }
            false => None,
        };
        Ok(Self {
            prepared: ArcSwap::from_pointee(prepared),
            sessions,
            metrics,
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    /// The current prepared state; hold it for the whole request.
    pub fn prepared(&self) -> Arc<Prepared> {
        self.prepared.load_full()
    }

    /// Marks the listener up (or down).
    pub fn set_listening(&self, up: bool) {
        self.listening.store(up, Ordering::SeqCst);
    }

    /// Marks the start of the drain.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Why the server is not ready, or `None` when it is: config loaded, listener up, not draining,
    /// and at least one provider usable.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.listening.load(Ordering::SeqCst) {
            return Some("listener not up");
        }
        if self.is_draining() {
            return Some("draining");
        }
        if self.prepared().registry.is_empty() {
            return Some("no LLM provider configured");
        }
        None
    }
}
