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
use crate::llm::fallback::Cooldowns;
use crate::server::audit::AuditLog;
use crate::server::forwarded::TrustedProxies;
use crate::server::ratelimit::{AuthFailureLimiter, RateLimits, StreamCaps};
use crate::server::tls::{RotatingAcceptor, TlsMaterial};
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
    /// Its per-principal rate limits.
    pub rate_limits: RateLimits,
    /// The proxies trusted to name the client (`server.trusted_proxies`).
    pub trusted_proxies: TrustedProxies,
}

impl Prepared {
    /// Prepares the state of a validated config; the errors name each part that cannot be built.
    pub fn new(config: Config) -> Result<Self, Vec<String>> {
        Self::new_reusing(config, None)
    }

    /// Prepares a new config, keeping the providers of `previous` whose settings did not change.
    pub fn new_reusing(config: Config, previous: Option<&Prepared>) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let registry = crate::llm::ProviderContext::from_config(&config.llm)
            .map_err(|e| vec![e])
            .and_then(|ctx| {
                ProviderRegistry::build_reusing(&config.llm, &ctx, previous.map(|p| &p.registry))
            });
        let auth =
            Authenticator::from_config(&config.auth, config.server.tls.client_ca_file.is_some());
        let (registry, auth) = match (registry, auth) {
            (Ok(r), Ok(a)) => (r, a),
            (r, a) => {
                errors.extend(r.err().unwrap_or_default());
                errors.extend(a.err().unwrap_or_default());
                return Err(errors);
            }
        };
        let rate_limits = RateLimits::from_config(&config.limits, &auth.token_overrides())
            .map_err(|e| vec![e])?;
        let trusted_proxies = TrustedProxies::parse(&config.server.trusted_proxies)?;
        Ok(Self {
            config,
            registry,
            auth,
            rate_limits,
            trusted_proxies,
        })
    }
}

/// Checks that `config` can be prepared (every provider builds), without serving it.
pub fn preflight(config: &Config) -> Result<(), Vec<String>> {
    let mut errors = Prepared::new(config.clone()).err().unwrap_or_default();
    if config.server.tls.cert_file.is_some()
        && let Err(e) = TlsMaterial::load(&config.server.tls)
    {
        errors.push(e);
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(errors),
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
    /// Cooldowns of the fallback chain (kept across reloads).
    pub cooldowns: Cooldowns,
    /// Slows down client IPs that keep failing to authenticate.
    pub auth_failures: AuthFailureLimiter,
    /// Concurrent streams per principal.
    pub stream_caps: StreamCaps,
    /// The audit log, when configured.
    pub audit: Option<AuditLog>,
    /// The TLS acceptor, when TLS is configured.
    pub tls: Option<RotatingAcceptor>,
    /// Reloads the config from its files, when the server was started from files.
    pub reloader: std::sync::OnceLock<Arc<crate::reload::Reloader>>,
    listening: AtomicBool,
    draining: AtomicBool,
    /// Providers whose start-up check failed, with the reason (e.g. Ollama lacks the model).
    unready: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// When the server started.
    pub started: Instant,
    /// The events of `/request` calls, for `GET /updates`.
    pub events: super::events::EventBus,
}

impl AppState {
    /// Prepares the state; metrics objects exist only when `with_metrics`.
    pub fn new(config: Config, with_metrics: bool) -> Result<Self, ServerError> {
        let sessions = SessionStore::new(config.sessions_dir());
        let prepared = Prepared::new(config).map_err(ServerError::Config)?;
        let tls = match prepared.config.server.tls.cert_file {
            Some(_) => Some(RotatingAcceptor::new(
                TlsMaterial::load(&prepared.config.server.tls)
                    .map_err(|e| ServerError::Config(vec![e]))?,
            )),
            None => None,
        };
        let limits = &prepared.config.limits;
        let auth_failures = AuthFailureLimiter::new(limits.auth_failures_per_minute);
        let stream_caps = StreamCaps::new(limits.max_streams_per_principal);
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
        if let Some(m) = &metrics {
            auth_failures.register(m.registry())?;
        }
        let audit = AuditLog::open(
            &prepared.config.audit,
            metrics.as_ref().map(|m| m.registry()),
        )
        .map_err(|e| ServerError::Config(vec![e]))?;
        Ok(Self {
            prepared: ArcSwap::from_pointee(prepared),
            sessions,
            metrics,
            cooldowns: Cooldowns::default(),
            auth_failures,
            stream_caps,
            audit,
            tls,
            reloader: std::sync::OnceLock::new(),
            listening: AtomicBool::new(false),
            unready: Default::default(),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            events: super::events::EventBus::default(),
        })
    }

    /// The current prepared state; hold it for the whole request.
    pub fn prepared(&self) -> Arc<Prepared> {
        self.prepared.load_full()
    }

    /// Publishes a new prepared state (a reload); requests already running keep theirs.
    pub fn publish(&self, prepared: Prepared) {
        self.prepared.store(Arc::new(prepared));
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
    /// and at least one provider usable (configured and past its start-up check).
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.listening.load(Ordering::SeqCst) {
            return Some("listener not up");
        }
        if self.is_draining() {
            return Some("draining");
        }
        let prepared = self.prepared();
        if prepared.registry.is_empty() {
            return Some("no LLM provider configured");
        }
        let unready = self
            .unready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if prepared
            .registry
            .names()
            .iter()
            .all(|n| unready.contains_key(n))
        {
            return Some("no LLM provider passed its start-up check");
        }
        None
    }

    /// Runs every provider's start-up check and remembers the failures (logged with their reason).
    pub async fn check_providers(&self) {
        let prepared = self.prepared();
        for p in prepared.registry.providers() {
            if let Err(why) = p.check_ready().await {
                tracing::warn!(provider = p.name(), "provider is not ready: {why}");
                self.unready
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(p.name().to_string(), why);
            }
        }
    }

    /// Providers whose start-up check failed, with the reason.
    pub fn unready_providers(&self) -> std::collections::BTreeMap<String, String> {
        self.unready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
