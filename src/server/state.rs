//! What the handlers share: the prepared state (config, providers, auth, resolved limits) behind
//! one `ArcSwap`, so a request takes one snapshot when it starts and finishes on it (a reload swaps
//! it); the live state that outlives snapshots (rate-limit buckets, the failed-authentication
//! limiter, stream caps, fallback cooldowns), to which a reload hands only its new limits; plus the
//! session store, the metrics, the TLS rotation and the lifecycle flags.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::ServerError;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::config::TrustedProxies;
use crate::llm::ProviderRegistry;
use crate::llm::fallback::Cooldowns;
use crate::server::audit::AuditLog;
use crate::server::ratelimit::{AuthFailureLimiter, RateLimits, RatePlan, StreamCaps};
use crate::server::tls::{RotatingAcceptor, TlsMaterial, TlsRotation};
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
    /// Its per-principal rate limits (the buckets are [`AppState::rate_limits`]).
    pub rate_plan: RatePlan,
    /// The proxies trusted to name the client (`server.trusted_proxies`).
    pub trusted_proxies: TrustedProxies,
    /// The MCP servers of its servers file (the connections are [`AppState::mcp`]).
    pub mcp_servers: Arc<[crate::mcp::ServerConfig]>,
}

/// One part of a config that cannot be prepared: the setting it is about, when the message names
/// one, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareError {
    /// The setting (`auth.jwt.public_key_file`, `server.trusted_proxies.0`), `llm.providers` for a
    /// provider that cannot be built, or empty when the problem is about no one setting.
    pub setting: String,
    /// What is wrong, without the setting's name.
    pub reason: String,
}

impl PrepareError {
    /// The problems of one message of the builders (providers, authenticator, rate limits,
    /// proxies, TLS), one per line: each line starts with the setting it is about
    /// (`auth.jwt.public_key_file: …`) or names its provider (`provider `x`: …`).
    fn from_message(text: &str) -> Vec<Self> {
        text.lines()
            .map(|line| match line.split_once(": ") {
                Some((key, why)) if !key.is_empty() && !key.contains(' ') => Self {
                    setting: key.to_string(),
                    reason: why.to_string(),
                },
                _ if line.starts_with("provider `") => Self {
                    setting: "llm.providers".into(),
                    reason: line.to_string(),
                },
                _ => Self {
                    setting: String::new(),
                    reason: line.to_string(),
                },
            })
            .collect()
    }

    fn from_messages(texts: impl IntoIterator<Item = String>) -> Vec<Self> {
        texts
            .into_iter()
            .flat_map(|t| Self::from_message(&t))
            .collect()
    }
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A provider's problem names its provider in the reason already.
        if self.setting.is_empty() || self.reason.starts_with("provider `") {
            return f.write_str(&self.reason);
        }
        write!(f, "{}: {}", self.setting, self.reason)
    }
}

impl Prepared {
    /// Prepares the state of a validated config; the errors name each part that cannot be built.
    pub fn new(config: Config) -> Result<Self, Vec<PrepareError>> {
        Self::build(config, None)
    }

    /// Prepares a new config, keeping the providers of `previous` whose settings did not change;
    /// the problems as text, one each (what a refused reload reports).
    pub fn new_reusing(config: Config, previous: Option<&Prepared>) -> Result<Self, Vec<String>> {
        Self::build(config, previous)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect())
    }

    /// Prepares a config, keeping the providers of `previous` whose settings did not change.
    pub fn build(config: Config, previous: Option<&Prepared>) -> Result<Self, Vec<PrepareError>> {
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
                let mut errors = PrepareError::from_messages(r.err().unwrap_or_default());
                errors.extend(PrepareError::from_messages(a.err().unwrap_or_default()));
                return Err(errors);
            }
        };
        let rate_plan = RatePlan::from_config(&config.limits, &auth.token_overrides())
            .map_err(|e| PrepareError::from_message(&e))?;
        let trusted_proxies = TrustedProxies::parse(&config.server.trusted_proxies)
            .map_err(PrepareError::from_messages)?;
        let (mcp_path, required) = crate::mcp::config::path_of(&config);
        let mcp_servers = crate::mcp::config::load(&mcp_path, required)
            .map_err(|problems| {
                problems
                    .into_iter()
                    .map(|reason| PrepareError {
                        setting: "catalog.mcp_config".into(),
                        reason,
                    })
                    .collect::<Vec<_>>()
            })?
            .into();
        Ok(Self {
            config,
            registry,
            auth,
            rate_plan,
            trusted_proxies,
            mcp_servers,
        })
    }
}

/// Checks that `config` can be prepared (every provider builds), without serving it.
pub fn preflight(config: &Config) -> Result<(), Vec<PrepareError>> {
    let mut errors = Prepared::new(config.clone()).err().unwrap_or_default();
    if config.server.tls.cert_file.is_some()
        && let Err(e) = TlsMaterial::load(&config.server.tls)
    {
        errors.extend(PrepareError::from_message(&e));
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(errors),
    }
}

/// Refuses to serve `addr` without authentication: a listener on an address that is not loopback
/// needs at least one way to authenticate in `prepared` (shared token, named tokens, JWT or a
/// client CA for mTLS), unless `server.allow_no_auth` says everyone may call. `addr` is the address
/// actually listened on — the one bound at start or the socket systemd passed — because that, not
/// `server.bind_address` in the file (a restart-only setting), is what callers reach. Checked at
/// start and before every reload is applied.
pub fn check_exposure(addr: SocketAddr, prepared: &Prepared) -> Result<(), String> {
    let server = &prepared.config.server;
    if addr.ip().to_canonical().is_loopback() || prepared.auth.enabled() || server.allow_no_auth {
        return Ok(());
    }
    let configured = match server.bind_address == addr.ip() {
        true => String::new(),
        false => format!(
            " (server.bind_address is {}, but the listening socket was bound at start or passed by systemd, and a new address needs a restart)",
            server.bind_address
        ),
    };
    Err(format!(
        "server.bind_address: the server listens on {addr}, which is not a loopback address{configured}, and no authentication is configured; set a token (auth.token, auth.token_file), named tokens (auth.tokens), JWT keys (auth.jwt) or a client CA (server.tls.client_ca_file), or set server.allow_no_auth (--allow-no-auth, CHATCLI_ALLOW_NO_AUTH=true) to serve everyone"
    ))
}

/// See the module docs.
#[derive(Debug)]
pub struct AppState {
    prepared: ArcSwap<Prepared>,
    /// Per-principal rate-limit buckets, under the limits of the last published snapshot (kept
    /// across reloads where a caller's limit did not change).
    pub rate_limits: RateLimits,
    /// Sessions, per principal.
    pub sessions: SessionStore,
    /// The Redis state backend, when `[state] backend = "redis"`: sessions and rate-limit buckets
    /// shared with the other replicas. `None` (the default `local` backend) keeps every check on
    /// this process' own state, with no Redis code on the path.
    pub shared: Option<Arc<crate::state::redis::RedisState>>,
    /// Metrics, when the metrics listener is on.
    pub metrics: Option<Arc<Metrics>>,
    /// Cooldowns of the fallback chain (kept across reloads).
    pub cooldowns: Cooldowns,
    /// Slows down client IPs that keep failing to authenticate (kept across reloads; a reload
    /// applies a new `limits.auth_failures_per_minute`).
    pub auth_failures: AuthFailureLimiter,
    /// Concurrent streams per principal (kept across reloads: open streams stay counted).
    pub stream_caps: StreamCaps,
    /// The audit log, when configured.
    pub audit: Option<AuditLog>,
    /// The TLS acceptor, when TLS is configured.
    pub tls: Option<RotatingAcceptor>,
    /// Re-reads the acceptor's material, when TLS is configured; a reload that changes the paths
    /// points it at the new ones.
    pub tls_rotation: Option<Arc<TlsRotation>>,
    /// Reloads the config from its files, when the server was started from files.
    pub reloader: std::sync::OnceLock<Arc<super::reload::Reloader>>,
    listening: AtomicBool,
    draining: AtomicBool,
    /// Providers whose start-up check failed, with the reason (e.g. Ollama lacks the model).
    unready: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// When the server started.
    pub started: Instant,
    /// The events of `/request` calls, for `GET /updates`.
    pub events: super::events::EventBus,
    /// Prompt calls being answered on each transport, for `/status`.
    pub in_flight: InFlight,
    /// The conversation hub.
    pub hub: Arc<crate::hub::Hub>,
    /// Plugins, agents and skills (rescanned as their folders and settings change).
    pub catalog: Arc<crate::catalog::Catalog>,
    /// The MCP servers' connections (live state: a reload hands it the new servers file).
    pub mcp: Arc<crate::mcp::McpHub>,
    /// The Kubernetes watcher; it has no target (and runs nothing) unless the config names some.
    pub watcher: Arc<crate::watcher::Watcher>,
}

/// The transport a call came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// gRPC (`SendPrompt`, `StreamPrompt`, `InteractiveSession`).
    Grpc,
    /// HTTP (`/v1/chat/completions`, `/request`).
    Http,
}

/// Prompt calls being answered, per transport: a unary call until it returns, a stream (an
/// interactive session included) until it ends. Both transports count here, so `/status` over
/// either one shows the load of both.
#[derive(Debug, Default)]
pub struct InFlight(Arc<[AtomicUsize; 2]>);

/// One call counted in [`InFlight`] until this is dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    counts: Arc<[AtomicUsize; 2]>,
    slot: usize,
}

impl InFlight {
    /// Counts a call on `transport` until the guard is dropped.
    pub fn enter(&self, transport: Transport) -> InFlightGuard {
        let slot = transport as usize;
        self.0[slot].fetch_add(1, Ordering::SeqCst);
        InFlightGuard {
            counts: self.0.clone(),
            slot,
        }
    }

    /// The calls in flight on gRPC and on HTTP.
    pub fn counts(&self) -> (usize, usize) {
        let count = |t: Transport| self.0[t as usize].load(Ordering::SeqCst);
        (count(Transport::Grpc), count(Transport::Http))
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.counts[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    /// Prepares the state; metrics objects exist only when `with_metrics`. `audit` is the audit
    /// log when the caller opened it already (the daemon does, before binding its ports);
    /// otherwise the one `config` names is opened here.
    pub fn new(
        config: Config,
        with_metrics: bool,
        audit: Option<AuditLog>,
    ) -> Result<Self, ServerError> {
        let prepared = Prepared::new(config)
            .map_err(|e| ServerError::Config(e.iter().map(ToString::to_string).collect()))?;
        let tls = match prepared.config.server.tls.cert_file {
            Some(_) => Some(RotatingAcceptor::new(
                TlsMaterial::load(&prepared.config.server.tls)
                    .map_err(|e| ServerError::Config(vec![e]))?,
            )),
            None => None,
        };
        let limits = &prepared.config.limits;
        let rate_limits = RateLimits::new(&prepared.rate_plan);
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
        let shared = match prepared.config.state.backend {
            crate::config::StateBackend::Local => None,
            crate::config::StateBackend::Redis => Some(
                crate::state::redis::RedisState::new(
                    &prepared.config.state,
                    metrics.as_ref().map(|m| m.registry()),
                )
                .map_err(|e| ServerError::Config(vec![e]))?,
            ),
        };
        let sessions = match &shared {
            Some(r) => SessionStore::shared(
                prepared.config.sessions_dir(),
                crate::sessions::RedisSessions::new(r.clone()),
            ),
            None => SessionStore::new(prepared.config.sessions_dir()),
        };
        let tls_rotation = match &tls {
            Some(acceptor) => Some(Arc::new(TlsRotation::new(
                acceptor.clone(),
                prepared.config.server.tls.clone(),
                metrics.as_ref().map(|m| m.registry()),
            )?)),
            None => None,
        };
        let audit = match audit {
            Some(log) => {
                if let Some(m) = &metrics {
                    log.register(m.registry())
                        .map_err(|e| ServerError::Config(vec![e]))?;
                }
                Some(log)
            }
            None => AuditLog::open(
                &prepared.config.audit,
                metrics.as_ref().map(|m| m.registry()),
            )
            .map_err(ServerError::CannotCreate)?,
        };
        let hub = Arc::new(crate::hub::Hub::new(
            &prepared.config.hub,
            prepared.config.hub_db(),
            metrics
                .as_ref()
                .map(|m| crate::telemetry::HubMetrics::register(m.registry()))
                .transpose()?,
        ));
        let catalog =
            crate::catalog::Catalog::new(&crate::catalog::Settings::from_config(&prepared.config))
                .map_err(|e| {
                    ServerError::CannotCreate(format!("creating the plugin cache: {e}"))
                })?;
        let mcp = crate::mcp::McpHub::new();
        if let Some(m) = &metrics {
            mcp.register(m.registry())
                .map_err(|e| ServerError::Config(vec![e]))?;
        }
        let watcher = crate::watcher::Watcher::new(metrics.as_ref().map(|m| m.registry()));
        Ok(Self {
            prepared: ArcSwap::from_pointee(prepared),
            rate_limits,
            sessions,
            shared,
            metrics,
            cooldowns: Cooldowns::default(),
            auth_failures,
            stream_caps,
            audit,
            tls,
            tls_rotation,
            reloader: std::sync::OnceLock::new(),
            listening: AtomicBool::new(false),
            unready: Default::default(),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            events: super::events::EventBus::default(),
            in_flight: InFlight::default(),
            hub,
            catalog: Arc::new(catalog),
            mcp: Arc::new(mcp),
            watcher,
        })
    }

    /// The current prepared state; hold it for the whole request.
    pub fn prepared(&self) -> Arc<Prepared> {
        self.prepared.load_full()
    }

    /// Publishes a new prepared state (a reload); requests already running keep theirs. The live
    /// state takes the new limits first: rate-limit buckets are rebuilt only for the roles and
    /// tokens whose limit changed, and the failed-authentication limiter keeps its blocks.
    pub fn publish(&self, prepared: Prepared) {
        let rebuilt = self.rate_limits.apply(&prepared.rate_plan);
        if rebuilt > 0 {
            tracing::debug!(
                rebuilt,
                "rate limits changed: new buckets for the roles and tokens whose limit changed"
            );
        }
        self.auth_failures
            .set_per_minute(prepared.config.limits.auth_failures_per_minute);
        self.mcp.apply(&prepared.mcp_servers);
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
        if let Some(r) = &self.shared
            && r.required()
            && !r.is_up()
        {
            return Some("the Redis state backend is unreachable (state.required)");
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

    /// Charges one call of `principal` to its rate-limit bucket `key`: Ok, or the wait (whole
    /// seconds, at least 1). With the Redis backend the bucket is shared by every replica (one
    /// round trip); while Redis is unreachable `[state] on_unavailable` decides: this replica's
    /// own buckets (`local`) or a refusal (`deny`).
    pub async fn check_rate(
        &self,
        principal: &crate::auth::Principal,
        key: &str,
    ) -> Result<(), std::time::Duration> {
        use crate::state::redis::RateCheck;
        let Some(shared) = &self.shared else {
            return self.rate_limits.check_as(principal, key);
        };
        let (period, burst) = self.rate_limits.limit_of(principal);
        match shared.rate_check(key, period, burst).await {
            Ok(RateCheck::Allowed) => Ok(()),
            Ok(RateCheck::Wait(wait)) => Err(crate::server::ratelimit::whole_seconds(wait)),
            Err(e) => match shared.on_unavailable() {
                crate::config::OnUnavailable::Local => {
                    tracing::debug!(error = %e, "shared rate limit unavailable; using this replica's buckets");
                    self.rate_limits.check_as(principal, key)
                }
                crate::config::OnUnavailable::Deny => {
                    tracing::debug!(error = %e, "shared rate limit unavailable; refusing (state.on_unavailable = deny)");
                    Err(std::time::Duration::from_secs(1))
                }
            },
        }
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

/// The core's view of what a call runs against (see [`crate::gateway`]).
impl AppState {
    /// The core for a call on the config snapshot `prepared`.
    pub fn gateway<'a>(&'a self, prepared: &'a Prepared) -> crate::gateway::Gateway<'a> {
        crate::gateway::Gateway {
            registry: &prepared.registry,
            limits: &prepared.config.limits,
            cooldowns: &self.cooldowns,
            metrics: self.metrics.as_ref(),
            sessions: &self.sessions,
            mcp: Some(&self.mcp),
            catalog: &prepared.config.catalog,
            watcher: &self.watcher,
            watcher_config: &prepared.config.watcher,
        }
    }

    /// One of the caller's concurrent-stream slots (`key` is its limit key), held until the stream
    /// ends; `None` when `limits.max_streams_per_principal` of `prepared` is 0 (no cap).
    pub fn stream_slot(
        &self,
        prepared: &Prepared,
        key: &str,
    ) -> Result<Option<crate::server::ratelimit::StreamGuard>, crate::gateway::Error> {
        let limit = prepared.config.limits.max_streams_per_principal;
        if limit == 0 {
            return Ok(None);
        }
        match self.stream_caps.try_acquire(key) {
            Some(g) => Ok(Some(g)),
            None => Err(crate::gateway::Error::TooManyStreams { limit }),
        }
    }

    /// The configuration reloader, as the core's reload use case takes it.
    pub fn reloader(&self) -> Option<&dyn crate::gateway::admin::Reload> {
        self.reloader
            .get()
            .map(|r| &**r as &dyn crate::gateway::admin::Reload)
    }
}

impl crate::gateway::admin::Reload for crate::server::reload::Reloader {
    fn status(&self) -> crate::gateway::admin::ConfigStatus {
        let st = crate::server::reload::Reloader::status(self);
        crate::gateway::admin::ConfigStatus {
            generation: st.generation,
            config_hash: st.config_hash,
            last_error: st.last_error,
            restart_needed: st.restart_needed,
        }
    }

    fn reload<'a>(&'a self, trigger: &'a str) -> crate::gateway::admin::ReloadFuture<'a> {
        use crate::gateway::admin::Reloaded;
        Box::pin(async move {
            match crate::server::reload::Reloader::reload(self, trigger, true).await? {
                crate::server::reload::ReloadOutcome::Applied(g) => Ok(Reloaded::Applied(g)),
                crate::server::reload::ReloadOutcome::Unchanged(g) => Ok(Reloaded::Unchanged(g)),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::{NamedToken, Secret};

    /// A change to the default config.
    type Edit = fn(&mut Config);

    fn prepared(edit: Edit) -> Prepared {
        let mut config = Config::default();
        edit(&mut config);
        Prepared::new(config).unwrap()
    }

    #[test]
    fn prepare_errors_name_their_setting() {
        let errors = PrepareError::from_messages([
            "auth.jwt.public_key_file: cannot read it".to_string(),
            "provider `x`: no key\nsecond line without a setting".to_string(),
        ]);
        let got: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.setting.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("auth.jwt.public_key_file", "cannot read it"),
                ("llm.providers", "provider `x`: no key"),
                ("", "second line without a setting"),
            ]
        );
        let texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "auth.jwt.public_key_file: cannot read it",
                "provider `x`: no key",
                "second line without a setting",
            ]
        );
        let mut config = Config::default();
        config.server.trusted_proxies = vec!["not-a-net".into()];
        let errors = Prepared::new(config).unwrap_err();
        assert_eq!(errors[0].setting, "server.trusted_proxies.0", "{errors:?}");
    }

    #[test]
    fn a_non_loopback_listener_needs_some_way_to_authenticate() {
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let open = prepared(|_| {});
        for loopback in [
            "127.0.0.1:1",
            "127.0.0.2:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(check_exposure(loopback.parse().unwrap(), &open), Ok(()));
        }
        let err = check_exposure(public, &open).unwrap_err();
        assert!(err.starts_with("server.bind_address: "), "{err}");
        assert!(err.contains("listens on 0.0.0.0:50051"), "{err}");
        // The file's address (127.0.0.1 by default) is not what is checked, and the message says so.
        assert!(err.contains("server.bind_address is 127.0.0.1"), "{err}");

        let methods: [(&str, Edit); 5] = [
            ("shared token", |c| {
                c.auth.token = Some(Secret::new("t0ken"))
            }),
            ("named tokens", |c| {
                c.auth.tokens = vec![NamedToken {
                    name: "team".into(),
                    sha256: Some("ab".repeat(32)),
                    ..NamedToken::default()
                }]
            }),
            ("JWT", |c| {
                c.auth.jwt.secret = Some(Secret::new("a-jwt-secret-of-32-bytes-or-more!"))
            }),
            ("mTLS", |c| {
                c.server.tls.client_ca_file = Some("/ca.pem".into());
            }),
            ("allow_no_auth", |c| c.server.allow_no_auth = true),
        ];
        for (method, edit) in methods {
            assert_eq!(check_exposure(public, &prepared(edit)), Ok(()), "{method}");
        }
    }
}
