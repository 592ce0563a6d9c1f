//! Hot reload: load → validate → prepare (may fail) → swap (cannot fail), and what triggers it.
//!
//! Triggers: the file watcher ([`watch`]: one debounced watcher over the directories of the config
//! file, its `conf.d/` drop-ins, every file the config points to (secrets, tokens, keys) and the
//! TLS material), SIGHUP ([`on_sighup`], which also re-reads the TLS material), and the
//! admin commands (`/reload`, `POST /admin/reload`).
//!
//! A reload reads and validates everything into a new [`Prepared`] off the request path and
//! publishes it with one store ([`AppState::publish`]); requests keep the snapshot they started
//! with. Unchanged providers keep their connection pools; the live state beside the snapshot
//! (rate-limit buckets, the failed-authentication limiter, stream caps, cooldowns) takes the new
//! limits and keeps what callers have spent where their limit did not change. A config that fails
//! keeps the old one serving, logs every problem at once and counts the failure; the files the
//! failed config names are watched beside the serving config's, so creating the one that was
//! missing (a token file, a key) applies it. A config that would leave the listener on a
//! non-loopback address without any authentication is refused ([`crate::server::check_exposure`]).
//!
//! Every key of the config file is either applied by a reload ([`RELOADABLE`]) or needs a restart
//! ([`RESTART_ONLY`]). A restart-only key that changed keeps its running value, is named in the
//! reload's log lines and is flagged by `chatcli_config_reload_restart_needed{key="…"}` (1) until
//! the files agree with the running value again.

mod watch;

pub use watch::{WatchGuard, on_sighup, watch};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
use sha2::{Digest, Sha256};

use crate::config::{self, Config, Sources};
use crate::server::{AppState, Prepared};

/// Sets the log filter of the running process (from the logging guard held by `main`).
pub type LevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Name of the gauge that flags restart-only settings changed in the files, labelled `key`.
pub const RESTART_NEEDED_METRIC: &str = "chatcli_config_reload_restart_needed";

/// What `/status` shows about reloads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Incremented by every successful reload that changed something (1 at start).
    pub generation: u64,
    /// SHA-256 of the config files and every file they point to, as last loaded.
    pub config_hash: String,
    /// The problems of the last failed reload, when the last attempt failed.
    pub last_error: Option<String>,
    /// When the last reload succeeded (or the server started).
    pub last_success: Option<SystemTime>,
    /// Restart-only keys whose value in the files differs from the running one, as of the last
    /// successful reload.
    pub restart_needed: Vec<String>,
}

struct ReloadMetrics {
    reloads: IntCounterVec,
    last_success: IntGauge,
    generation: IntGauge,
    restart_needed: IntGaugeVec,
}

impl ReloadMetrics {
    fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let reloads = IntCounterVec::new(
            Opts::new(
                "chatcli_config_reloads_total",
                "Configuration reloads, by result (ok, error).",
            ),
            &["result"],
        )?;
        let last_success = IntGauge::new(
            "chatcli_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
        )?;
        let generation = IntGauge::new(
            "chatcli_config_generation",
            "Generation of the configuration being served.",
        )?;
        let restart_needed = IntGaugeVec::new(
            Opts::new(
                RESTART_NEEDED_METRIC,
                "1 while the files set this restart-only key to a value other than the running one.",
            ),
            &["key"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(generation.clone()))?;
        registry.register(Box::new(restart_needed.clone()))?;
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        for key in RESTART_ONLY {
            restart_needed.with_label_values(&[key]).set(0);
        }
        Ok(Self {
            reloads,
            last_success,
            generation,
            restart_needed,
        })
    }
}

/// Reloads the server's configuration from its sources.
pub struct Reloader {
    state: Weak<AppState>,
    sources: Sources,
    set_level: Option<LevelSetter>,
    /// The address the main listener is bound to: what the authentication guard checks.
    listen: SocketAddr,
    status: Mutex<ReloadStatus>,
    /// Hash of the files at the last attempt, so an unchanged broken file is not re-reported on
    /// every unrelated event.
    last_seen: Mutex<String>,
    /// Files the last config that failed to apply names, watched (with the serving config's) until
    /// a reload succeeds: creating the missing one retries it.
    pending: Mutex<Vec<PathBuf>>,
    /// Tells the file watcher to re-arm its directories, after a reload from any trigger.
    pub(super) rearm: tokio::sync::Notify,
    running: tokio::sync::Mutex<()>,
    metrics: Option<ReloadMetrics>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// Why a reload did not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new generation is serving.
    Applied(u64),
    /// Nothing changed on disk.
    Unchanged(u64),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Reloader {
    /// A reloader for `state`, loading from `sources` (the process environment and flags are those
    /// of the start; only files change). `listen` is the address the main listener is bound to.
    pub fn new(
        state: &Arc<AppState>,
        sources: Sources,
        set_level: Option<LevelSetter>,
        listen: SocketAddr,
    ) -> Arc<Self> {
        let metrics =
            state
                .metrics
                .as_ref()
                .and_then(|m| match ReloadMetrics::register(m.registry()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "reload metrics unavailable");
                        None
                    }
                });
        let prepared = state.prepared();
        let hash = content_hash(&watched_files(&prepared.config, &sources));
        if let Some(m) = &metrics {
            m.generation.set(1);
            m.last_success.set(unix_now());
        }
        Arc::new(Self {
            state: Arc::downgrade(state),
            sources,
            set_level,
            listen,
            last_seen: Mutex::new(hash.clone()),
            status: Mutex::new(ReloadStatus {
                generation: 1,
                config_hash: hash,
                last_error: None,
                last_success: Some(SystemTime::now()),
                restart_needed: Vec::new(),
            }),
            pending: Mutex::new(Vec::new()),
            rearm: tokio::sync::Notify::new(),
            running: tokio::sync::Mutex::new(()),
            metrics,
        })
    }

    /// The current status.
    pub fn status(&self) -> ReloadStatus {
        lock(&self.status).clone()
    }

    /// Loads, validates and prepares the config; publishes it if all of it is valid. `force` reloads
    /// even when no file changed (SIGHUP, admin command).
    pub async fn reload(&self, trigger: &str, force: bool) -> Result<ReloadOutcome, Vec<String>> {
        let _one_at_a_time = self.running.lock().await;
        let Some(state) = self.state.upgrade() else {
            return Err(vec!["the server is gone".into()]);
        };
        let outcome = self.attempt(&state, trigger, force).await;
        // The serving config or the pending files may have changed: the watcher follows them.
        self.rearm.notify_one();
        outcome
    }

    async fn attempt(
        &self,
        state: &AppState,
        trigger: &str,
        force: bool,
    ) -> Result<ReloadOutcome, Vec<String>> {
        let old = state.prepared();
        // The files the config files name now, read before the load: a file created after this
        // point changes the hash the next event computes, so its creation is never missed.
        let named = named_in_files(&self.sources);
        let seen = content_hash(&union(self.tracked(&old.config), named.clone()));
        let previous = std::mem::replace(&mut *lock(&self.last_seen), seen.clone());
        if !force && previous == seen {
            return Ok(ReloadOutcome::Unchanged(lock(&self.status).generation));
        }
        let sources = self.sources.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&sources))
            .await
            .map_err(|e| vec![format!("reload task failed: {e}")])?;
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                *lock(&self.pending) = named;
                return Err(self.failed(
                    trigger,
                    e.problems.iter().map(ToString::to_string).collect(),
                ));
            }
        };
        let hash = content_hash(&watched_files(&loaded.config, &self.sources));
        let sources_line = loaded.sources_line();
        if !force && hash == lock(&self.status).config_hash {
            lock(&self.status).last_error = None;
            lock(&self.pending).clear();
            return Ok(ReloadOutcome::Unchanged(lock(&self.status).generation));
        }
        crate::systemd::reloading();
        let mut config = loaded.config;
        let new_files = union(watched_files(&config, &self.sources), named);
        let refuse = |problems: Vec<String>| {
            *lock(&self.pending) = new_files.clone();
            crate::systemd::ready("serving (reload failed)");
            self.failed(trigger, problems)
        };
        let restart = keep_restart_settings(&old.config, &mut config);
        if config.llm.providers.is_empty() && !old.config.llm.providers.is_empty() {
            return Err(refuse(vec!["llm.providers: the new configuration has no provider left; refusing to serve nothing (remove the last provider with a restart if that is really meant)".into()]));
        }
        if let Err(problems) = self.check_tls(state, &old.config, &config) {
            return Err(refuse(problems));
        }
        let level_changed = config.log.level != old.config.log.level;
        let new_level = config.log.level.clone();
        let prepared = match Prepared::new_reusing(config, Some(&old)) {
            Ok(p) => p,
            Err(problems) => return Err(refuse(problems)),
        };
        if let Err(problem) = crate::server::check_exposure(self.listen, &prepared) {
            return Err(refuse(vec![problem]));
        }
        let new_tls = &prepared.config.server.tls;
        let old_tls = &old.config.server.tls;
        let tls_changed = new_tls.cert_file != old_tls.cert_file
            || new_tls.key_file != old_tls.key_file
            || new_tls.client_ca_file != old_tls.client_ca_file
            || new_tls.min_version != old_tls.min_version;
        let tls_cfg = new_tls.clone();
        let watcher_config = prepared.config.watcher.clone();
        state.publish(prepared);
        state.watcher.apply(&watcher_config);
        lock(&self.pending).clear();
        if tls_changed && let Some(rotation) = &state.tls_rotation {
            // The rotation switches to the new paths (the watcher follows them after this reload)
            // and logs and counts the reload itself; the files were checked above, and a file
            // changed in between leaves the old certificate serving.
            let _ = rotation.follow(tls_cfg);
        }
        if level_changed
            && let Some(set) = &self.set_level
            && let Err(e) = set(&new_level)
        {
            tracing::warn!("log level not changed: {e}");
        }
        let restart_keys: Vec<String> = restart.iter().map(|c| c.key.to_string()).collect();
        let generation = {
            let mut st = lock(&self.status);
            st.generation += 1;
            st.config_hash = hash;
            st.last_error = None;
            st.last_success = Some(SystemTime::now());
            st.restart_needed = restart_keys.clone();
            st.generation
        };
        if let Some(m) = &self.metrics {
            m.reloads.with_label_values(&["ok"]).inc();
            m.generation
                .set(i64::try_from(generation).unwrap_or(i64::MAX));
            m.last_success.set(unix_now());
            for key in RESTART_ONLY {
                m.restart_needed
                    .with_label_values(&[key])
                    .set(i64::from(restart_keys.iter().any(|k| k == key)));
            }
        }
        if restart.is_empty() {
            tracing::info!(
                trigger,
                generation,
                "configuration reloaded; config loaded from {sources_line}"
            );
        } else {
            tracing::warn!(
                "these settings changed but need a restart; the running values stay: {}",
                restart
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            tracing::info!(
                trigger,
                generation,
                restart_needed = %restart_keys.join(", "),
                "configuration reloaded (restart-only settings keep their running values: {}); config loaded from {sources_line}",
                restart_keys.join(", ")
            );
        }
        crate::systemd::ready(&format!("serving (config generation {generation})"));
        Ok(ReloadOutcome::Applied(generation))
    }

    fn failed(&self, trigger: &str, problems: Vec<String>) -> Vec<String> {
        tracing::error!(
            trigger,
            "configuration reload failed; the previous configuration keeps serving:\n  - {}",
            problems.join("\n  - ")
        );
        lock(&self.status).last_error = Some(problems.join("; "));
        if let Some(m) = &self.metrics {
            m.reloads.with_label_values(&["error"]).inc();
        }
        problems
    }

    fn check_tls(&self, state: &AppState, old: &Config, new: &Config) -> Result<(), Vec<String>> {
        let (was, is) = (
            old.server.tls.cert_file.is_some(),
            new.server.tls.cert_file.is_some(),
        );
        if was != is {
            return Err(vec![format!(
                "server.tls: turning TLS {} needs a restart",
                if is { "on" } else { "off" }
            )]);
        }
        if is && state.tls.is_some() {
            crate::server::tls::TlsMaterial::load(&new.server.tls).map_err(|e| vec![e])?;
        }
        Ok(())
    }

    /// The files a change of which may matter: those of `serving` and those of the last config
    /// that failed to apply.
    fn tracked(&self, serving: &Config) -> Vec<PathBuf> {
        union(
            watched_files(serving, &self.sources),
            lock(&self.pending).clone(),
        )
    }

    /// Whether a changed path can affect the config: one of its files, a drop-in, a file the last
    /// failed config names, or a Kubernetes `..data` style symlink swap. Other files in the same
    /// directories (a log file, say) are not.
    pub fn is_relevant(&self, changed: &std::path::Path) -> bool {
        if changed
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".."))
        {
            return true;
        }
        let Some(state) = self.state.upgrade() else {
            return false;
        };
        let abs = |p: &std::path::Path| {
            std::fs::canonicalize(p).unwrap_or_else(|_| {
                std::env::current_dir()
                    .map(|d| d.join(p))
                    .unwrap_or_else(|_| p.to_path_buf())
            })
        };
        let changed_abs = abs(changed);
        // The drop-in folder may not exist yet: its creation, and anything inside it, counts.
        let in_drop_ins = config::config_file(&self.sources)
            .and_then(|f| f.parent().map(|p| p.join("conf.d")))
            .is_some_and(|d| {
                let d = abs(&d);
                changed_abs == d || changed_abs.parent() == Some(d.as_path())
            });
        in_drop_ins
            || self.tracked(&state.prepared().config).iter().any(|f| {
                abs(f) == changed_abs
                    || f.file_name() == changed.file_name()
                        && abs(f).parent() == changed_abs.parent()
            })
    }

    /// The directories to watch: those of the serving config's files and of the last failed
    /// config's, the config file's and its drop-in folder. Directories that do not exist are left
    /// out.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let Some(state) = self.state.upgrade() else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = self
            .tracked(&state.prepared().config)
            .iter()
            .filter_map(|f| {
                f.parent().map(|p| {
                    if p.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        p.to_path_buf()
                    }
                })
            })
            .collect();
        if let Some(file) = config::config_file(&self.sources) {
            if let Some(d) = config::drop_in_dir(Some(&file), &self.sources.default_config_path) {
                dirs.push(d);
            }
            if let Some(parent) = file.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
        dirs.sort();
        dirs.dedup();
        dirs.retain(|d| d.is_dir());
        dirs
    }
}

/// `a` and `b` together, sorted, each path once.
fn union(mut a: Vec<PathBuf>, b: Vec<PathBuf>) -> Vec<PathBuf> {
    a.extend(b);
    a.sort();
    a.dedup();
    a
}

/// Declares the restart-only keys once: [`RESTART_ONLY`] lists them (dotted, as in the file) and
/// [`keep_restart_settings`] compares and restores each, so the list and the behaviour cannot
/// drift apart.
macro_rules! restart_only {
    ($($($field:ident).+),+ $(,)?) => {
        /// Keys that need a restart: the listeners and what is built with them, the log and audit
        /// writers opened at start, and the data dir. A reload that changes one keeps the running
        /// value and reports the key.
        pub const RESTART_ONLY: &[&str] = &[$(stringify!($($field).+)),+];

        /// Puts the running value back into `new` for every restart-only key the files changed,
        /// and returns those changes.
        fn keep_restart_settings(old: &Config, new: &mut Config) -> Vec<RestartChange> {
            let mut changes = Vec::new();
            $(
                if new.$($field).+ != old.$($field).+ {
                    changes.push(RestartChange {
                        key: stringify!($($field).+),
                        running: format!("{:?}", old.$($field).+),
                        file: format!("{:?}", new.$($field).+),
                    });
                    new.$($field).+ = old.$($field).+.clone();
                }
            )+
            changes
        }
    };
}

restart_only!(
    server.bind_address,
    server.port,
    server.max_recv_msg_size,
    server.max_send_msg_size,
    server.max_concurrent_streams,
    server.header_read_timeout,
    server.max_header_bytes,
    server.max_connections_per_client,
    server.tls_handshake_timeout,
    server.max_pending_reset_streams,
    server.reflection,
    server.proxy_protocol,
    metrics.port,
    metrics.bind_address,
    log.format,
    log.file,
    log.max_size_mb,
    log.max_backups,
    log.max_age_days,
    log.compress,
    limits.max_streams_per_principal,
    audit.path,
    audit.max_size_mb,
    audit.max_backups,
    audit.queue,
    state.data_dir,
    state.backend,
    state.on_unavailable,
    state.required,
    state.redis.url,
    state.redis.username,
    state.redis.password_file,
    state.redis.ca_file,
    state.redis.key_prefix,
    state.redis.connect_timeout,
    state.redis.response_timeout,
    state.redis.sentinels,
    state.redis.master_name,
    hub.enabled,
    hub.db,
    hub.tail_buffer,
);

/// Keys a reload applies: they are read from the snapshot of each request (providers, auth,
/// limits, catalog folders), or the reload hands them to the live part that uses them (TLS
/// material, log level, the failed-authentication limiter; the shutdown grace is read when the
/// drain starts). Items of a list of tables are named without their index (`llm.providers.name`).
/// The watcher's targets are handed to the running watcher, which restarts only the changed ones.
pub const RELOADABLE: &[&str] = &[
    // Read by the hub's housekeeping on each sweep and by each hub call.
    "hub.retention_days",
    "limits.hub_max_content_bytes",
    "limits.hub_max_field_bytes",
    "server.shutdown_grace",
    "server.body_read_timeout",
    "server.allow_no_auth",
    "server.trusted_proxies",
    "server.tls.cert_file",
    "server.tls.key_file",
    "server.tls.client_ca_file",
    "server.tls.min_version",
    "log.level",
    "auth.token",
    "auth.token_file",
    "auth.jwt.secret",
    "auth.jwt.secret_file",
    "auth.jwt.public_key_file",
    "auth.jwt.jwks_file",
    "auth.jwt.issuer",
    "auth.jwt.audience",
    "auth.jwt.leeway",
    "auth.tokens.name",
    "auth.tokens.role",
    "auth.tokens.sha256",
    "auth.tokens.file",
    "auth.tokens.rate_limit_rps",
    "auth.tokens.rate_limit_burst",
    "auth.mtls.roles",
    "auth.mtls.default_role",
    "limits.rate_limit_rps",
    "limits.rate_limit_burst",
    "limits.max_prompt_bytes",
    "limits.max_history_messages",
    "limits.max_history_bytes",
    "limits.roles",
    "limits.auth_failures_per_minute",
    // Read when an interactive session opens: sessions opened after the reload use the new value.
    "limits.interactive_idle_timeout",
    "llm.default",
    "llm.model",
    "llm.fallback",
    "llm.fallback_max_retries",
    "llm.fallback_cooldown_base",
    "llm.fallback_cooldown_max",
    "llm.fallback_models",
    "llm.allow_http_providers",
    "llm.ssrf_allow",
    "llm.providers.name",
    "llm.providers.kind",
    "llm.providers.base_url",
    "llm.providers.api_key",
    "llm.providers.api_key_file",
    "llm.providers.model",
    "llm.providers.delay",
    "llm.providers.headers",
    "llm.providers.timeout",
    "llm.providers.first_byte_timeout",
    "llm.providers.idle_timeout",
    "llm.providers.unary_timeout",
    "llm.providers.max_response_bytes",
    "llm.providers.models",
    "llm.providers.discover_models",
    "llm.providers.models_refresh",
    "llm.providers.api_version",
    "llm.providers.client_id",
    "llm.providers.client_key",
    "llm.providers.client_key_file",
    "llm.providers.realm",
    "llm.providers.agent_id",
    "llm.providers.token_url",
    "watcher.config_file",
    "watcher.deployment",
    "watcher.namespace",
    "watcher.interval",
    "watcher.window",
    "watcher.max_log_lines",
    "watcher.kubeconfig",
    "watcher.max_context_chars",
    "watcher.inject_openai",
    "watcher.targets.deployment",
    "watcher.targets.kind",
    "watcher.targets.namespace",
    "watcher.targets.metrics_port",
    "watcher.targets.metrics_path",
    "watcher.targets.metrics_filter",
    "catalog.plugins_dir",
    "catalog.agents_dir",
    "catalog.skills_dir",
    "catalog.allow_unsigned",
    "catalog.trusted_keys_dir",
    "catalog.exec_timeout",
    "catalog.max_output_bytes",
    "catalog.env_allow",
    "catalog.mcp_config",
    "catalog.mcp_roles",
    "catalog.mcp_max_rounds",
];

/// A restart-only key whose value in the files differs from the running one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RestartChange {
    key: &'static str,
    running: String,
    file: String,
}

impl std::fmt::Display for RestartChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} → {})", self.key, self.running, self.file)
    }
}

/// The keys whose values name a file the configuration is made of (a key, a token, a certificate,
/// the watcher's targets), and those of the lists' items (`[[auth.tokens]]`, `[[llm.providers]]`).
const FILE_KEYS: [&[&str]; 8] = [
    &["auth", "token_file"],
    &["auth", "jwt", "secret_file"],
    &["auth", "jwt", "public_key_file"],
    &["auth", "jwt", "jwks_file"],
    &["server", "tls", "cert_file"],
    &["server", "tls", "key_file"],
    &["server", "tls", "client_ca_file"],
    &["watcher", "config_file"],
];
const ITEM_FILE_KEYS: [(&[&str], &[&str]); 2] = [
    (&["auth", "tokens"], &["file"]),
    (&["llm", "providers"], &["api_key_file", "client_key_file"]),
];

/// The files [`FILE_KEYS`] name in `table` (a typed config serialized, or one file's TOML text),
/// relative names resolved in `$CREDENTIALS_DIRECTORY`.
fn named_files(table: &toml::Table, creds: Option<&std::path::Path>) -> Vec<PathBuf> {
    fn at<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
        let (last, parents) = path.split_last()?;
        let mut table = t;
        for p in parents {
            table = table.get(*p)?.as_table()?;
        }
        table.get(*last)
    }
    let mut names: Vec<&toml::Value> = FILE_KEYS.iter().filter_map(|p| at(table, p)).collect();
    for (list, keys) in ITEM_FILE_KEYS {
        let items = at(table, list)
            .and_then(toml::Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for item in items.iter().filter_map(toml::Value::as_table) {
            names.extend(keys.iter().filter_map(|k| item.get(*k)));
        }
    }
    names
        .into_iter()
        .filter_map(toml::Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| crate::config::credential_path(s.as_ref(), creds))
        .collect()
}

/// Every file whose content makes up the configuration: the config file, its drop-ins, and the
/// files it points to (keys, tokens, certificates).
fn watched_files(c: &Config, sources: &Sources) -> Vec<PathBuf> {
    let mut files = config::config_files(sources);
    // The MCP servers file is part of the snapshot: its changes reload like the config's.
    files.push(crate::mcp::config::path_of(c).0);
    if let Ok(table) = toml::Table::try_from(c) {
        files.extend(named_files(&table, sources.credentials_dir().as_deref()));
    }
    files
}

/// The files the config file and its drop-ins point to, read from their TOML text alone (no
/// merging, no validation), so that the files of a config that fails to load are known too.
/// Files that cannot be read or parsed name nothing.
fn named_in_files(sources: &Sources) -> Vec<PathBuf> {
    let creds = sources.credentials_dir();
    config::config_files(sources)
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .filter_map(|text| text.parse::<toml::Table>().ok())
        .flat_map(|table| named_files(&table, creds.as_deref()))
        .collect()
}

fn content_hash(files: &[PathBuf]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.to_string_lossy().as_bytes());
        h.update(b"\0");
        match std::fs::read(f) {
            Ok(bytes) => h.update(&bytes),
            Err(_) => h.update(b"\0missing"),
        }
        h.update(b"\0");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The dotted keys of the example config, commented-out ones included (keys without a default
    /// and the items of lists of tables, named without an index). Empty tables and arrays are
    /// leaves: they are the user-keyed maps and the lists of values.
    fn example_keys() -> Vec<String> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/chatcli.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut uncommented = String::new();
        for line in text.lines() {
            let line = match line.strip_prefix("# ") {
                Some(rest) if rest.starts_with("[[") => rest.to_string(),
                Some(rest) => match rest.split_once(" = ") {
                    Some((key, value))
                        if !key.is_empty()
                            && key.chars().all(|c| {
                                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
                            }) =>
                    {
                        let value = match value.trim() {
                            "" => "\"\"",
                            v => v,
                        };
                        format!("{key} = {value}")
                    }
                    _ => continue,
                },
                None => line.to_string(),
            };
            uncommented.push_str(&line);
            uncommented.push('\n');
        }
        let table: toml::Table = uncommented.parse().unwrap();
        fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in t {
                let key = match prefix {
                    "" => k.clone(),
                    p => format!("{p}.{k}"),
                };
                match v {
                    toml::Value::Table(inner) if !inner.is_empty() => walk(&key, inner, out),
                    toml::Value::Array(items)
                        if items.first().is_some_and(toml::Value::is_table) =>
                    {
                        for item in items.iter().filter_map(toml::Value::as_table) {
                            walk(&key, item, out);
                        }
                    }
                    _ => out.push(key),
                }
            }
        }
        let mut keys = Vec::new();
        walk("", &table, &mut keys);
        keys.sort();
        keys.dedup();
        keys
    }

    #[test]
    fn every_example_key_is_reloadable_or_restart_only() {
        let keys = example_keys();
        // The walk found the keys shown commented out and the items of lists of tables too.
        for sample in [
            "server.port",
            "server.tls.key_file",
            "auth.tokens.file",
            "llm.providers.api_key_file",
            "limits.roles",
        ] {
            assert!(
                keys.iter().any(|k| k == sample),
                "{sample} not found in {keys:?}"
            );
        }
        let undecided: Vec<&String> = keys
            .iter()
            .filter(|k| !RELOADABLE.contains(&k.as_str()) && !RESTART_ONLY.contains(&k.as_str()))
            .collect();
        assert!(
            undecided.is_empty(),
            "decide for each of these keys whether a reload applies it (RELOADABLE) or it needs a restart (RESTART_ONLY): {undecided:?}"
        );
        let both: Vec<&&str> = RELOADABLE
            .iter()
            .filter(|k| RESTART_ONLY.contains(k))
            .collect();
        assert!(both.is_empty(), "in both lists: {both:?}");
        let stale: Vec<&&str> = RELOADABLE
            .iter()
            .chain(RESTART_ONLY)
            .filter(|k| !keys.iter().any(|e| e == **k))
            .collect();
        assert!(
            stale.is_empty(),
            "not a key of the example config: {stale:?}"
        );
    }

    #[test]
    fn restart_only_keys_keep_their_running_value_and_are_named() {
        let old = Config::default();
        let mut new = Config::default();
        new.server.port = 1;
        new.audit.queue = 7;
        new.log.max_backups = 9;
        new.limits.auth_failures_per_minute = 1;
        new.server.shutdown_grace = Duration::from_secs(1);
        let changes = keep_restart_settings(&old, &mut new);
        let keys: Vec<&str> = changes.iter().map(|c| c.key).collect();
        assert_eq!(keys, ["server.port", "log.max_backups", "audit.queue"]);
        assert_eq!(changes[0].to_string(), "server.port (50051 → 1)");
        assert_eq!(new.server.port, old.server.port);
        assert_eq!(new.audit.queue, old.audit.queue);
        assert_eq!(new.log.max_backups, old.log.max_backups);
        // Reloadable keys pass through.
        assert_eq!(new.limits.auth_failures_per_minute, 1);
        assert_eq!(new.server.shutdown_grace, Duration::from_secs(1));
    }

    #[test]
    fn a_config_that_does_not_load_still_names_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        let config = dir.path().join("chatcli.toml");
        std::fs::write(
            &config,
            "bogus = 1\n[auth]\ntoken_file = \"/secrets/token\"\n[server.tls]\nkey_file = \"tls_key\"\n\
             [[auth.tokens]]\nname = \"a\"\nfile = \"/secrets/a\"\n\
             [[llm.providers]]\nname = \"o\"\nkind = \"openai\"\napi_key_file = \"openai\"\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            dir.path().join("conf.d/10-jwt.toml"),
            "[auth.jwt]\njwks_file = \"/secrets/jwks.json\"\n",
        )
        .unwrap();
        let sources = Sources {
            env: [(
                "CREDENTIALS_DIRECTORY".to_string(),
                creds.display().to_string(),
            )]
            .into_iter()
            .collect(),
            config_flag: Some(config),
            default_config_path: "/nonexistent/chatcli.toml".into(),
            flags: vec![],
        };
        let mut named = named_in_files(&sources);
        named.sort();
        let mut expected = vec![
            creds.join("openai"),
            creds.join("tls_key"),
            PathBuf::from("/secrets/a"),
            PathBuf::from("/secrets/jwks.json"),
            PathBuf::from("/secrets/token"),
        ];
        expected.sort();
        assert_eq!(named, expected);
    }
}
