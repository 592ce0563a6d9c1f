//! Hot reload: debounce → load → validate → prepare (may fail) → swap (cannot fail).
//!
//! Triggers: changes in the directories of the config file, its `conf.d/` drop-ins and every file
//! the config points to (directories, not files, so atomic renames and the Kubernetes `..data`
//! symlink swap are seen; events are debounced ~250 ms, at most 1 s, so an editor's
//! truncate-then-write is read once, whole), SIGHUP, and the admin commands (`/reload`, `POST /admin/reload`).
//!
//! A reload reads and validates everything into a new [`Prepared`] off the request path and
//! publishes it with one store; requests keep the snapshot they started with. Unchanged providers
//! keep their connection pools, cooldowns live beside the snapshot. A config that fails keeps the
//! old one serving, logs every problem at once and counts the failure. Settings that need a restart
//! (listen addresses, ports, data dir) are reported and keep their running values.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, IntGauge, Opts};
use sha2::{Digest, Sha256};

use crate::config::{self, Config, Sources};
use crate::server::{AppState, Prepared};

/// Sets the log filter of the running process (from the logging guard held by `main`).
pub type LevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

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
}

struct ReloadMetrics {
    reloads: IntCounterVec,
    last_success: IntGauge,
    generation: IntGauge,
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
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(generation.clone()))?;
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        Ok(Self {
            reloads,
            last_success,
            generation,
        })
    }
}

/// Reloads the server's configuration from its sources.
pub struct Reloader {
    state: Weak<AppState>,
    sources: Sources,
    set_level: Option<LevelSetter>,
    status: Mutex<ReloadStatus>,
    /// Hash of the files at the last attempt, so an unchanged broken file is not re-reported on
    /// every unrelated event.
    last_seen: Mutex<String>,
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
    /// of the start; only files change).
    pub fn new(
        state: &Arc<AppState>,
        sources: Sources,
        set_level: Option<LevelSetter>,
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
            last_seen: Mutex::new(hash.clone()),
            status: Mutex::new(ReloadStatus {
                generation: 1,
                config_hash: hash,
                last_error: None,
                last_success: Some(SystemTime::now()),
            }),
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
        let old = state.prepared();
        let seen = content_hash(&watched_files(&old.config, &self.sources));
        if !force && std::mem::replace(&mut *lock(&self.last_seen), seen.clone()) == seen {
            return Ok(ReloadOutcome::Unchanged(lock(&self.status).generation));
        }
        let sources = self.sources.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&sources))
            .await
            .map_err(|e| vec![format!("reload task failed: {e}")])?;
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
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
            return Ok(ReloadOutcome::Unchanged(lock(&self.status).generation));
        }
        crate::systemd::reloading();
        let mut config = loaded.config;
        if config.llm.providers.is_empty() && !old.config.llm.providers.is_empty() {
            crate::systemd::ready("serving (reload failed)");
            return Err(self.failed(
                trigger,
                vec!["llm.providers: the new configuration has no provider left; refusing to serve nothing (remove the last provider with a restart if that is really meant)".into()],
            ));
        }
        keep_restart_settings(&old.config, &mut config);
        if let Err(problems) = self.check_tls(&state, &old.config, &config) {
            crate::systemd::ready("serving (reload failed)");
            return Err(self.failed(trigger, problems));
        }
        let level_changed = config.log.level != old.config.log.level;
        let new_level = config.log.level.clone();
        let prepared = match Prepared::new_reusing(config, Some(&old)) {
            Ok(p) => p,
            Err(problems) => {
                crate::systemd::ready("serving (reload failed)");
                return Err(self.failed(trigger, problems));
            }
        };
        let tls_changed = prepared.config.server.tls.cert_file != old.config.server.tls.cert_file
            || prepared.config.server.tls.key_file != old.config.server.tls.key_file
            || prepared.config.server.tls.client_ca_file != old.config.server.tls.client_ca_file
            || prepared.config.server.tls.min_version != old.config.server.tls.min_version;
        let tls_cfg = prepared.config.server.tls.clone();
        state.publish(prepared);
        if tls_changed
            && let Some(acceptor) = &state.tls
            && let Err(e) = acceptor.reload(&tls_cfg)
        {
            // Checked above; a file changed in between: the old certificate keeps serving.
            tracing::error!("TLS reload failed, still serving the previous certificate: {e}");
        }
        if level_changed
            && let Some(set) = &self.set_level
            && let Err(e) = set(&new_level)
        {
            tracing::warn!("log level not changed: {e}");
        }
        let generation = {
            let mut st = lock(&self.status);
            st.generation += 1;
            st.config_hash = hash;
            st.last_error = None;
            st.last_success = Some(SystemTime::now());
            st.generation
        };
        if let Some(m) = &self.metrics {
            m.reloads.with_label_values(&["ok"]).inc();
            m.generation
                .set(i64::try_from(generation).unwrap_or(i64::MAX));
            m.last_success.set(unix_now());
        }
        tracing::info!(
            trigger,
            generation,
            "configuration reloaded; config loaded from {sources_line}"
        );
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

    /// Whether a changed path can affect the config: one of its files, a drop-in, or a Kubernetes
    /// `..data` style symlink swap. Other files in the same directories (a log file, say) are not.
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
        let in_drop_ins = config_file(&self.sources)
            .and_then(|f| f.parent().map(|p| p.join("conf.d")))
            .is_some_and(|d| {
                let d = abs(&d);
                changed_abs == d || changed_abs.parent() == Some(d.as_path())
            });
        in_drop_ins
            || watched_files(&state.prepared().config, &self.sources)
                .iter()
                .any(|f| {
                    abs(f) == changed_abs
                        || f.file_name() == changed.file_name()
                            && abs(f).parent() == changed_abs.parent()
                })
    }

    /// The directories to watch for `config`.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let Some(state) = self.state.upgrade() else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = watched_files(&state.prepared().config, &self.sources)
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
        if let Some(file) = config_file(&self.sources) {
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

/// Settings that cannot change while running keep their running values; the log says so.
fn keep_restart_settings(old: &Config, new: &mut Config) {
    let mut restart = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:literal) => {
            if new.$($field).+ != old.$($field).+ {
                restart.push(format!("{} ({} → {})", $name, fmt(&old.$($field).+), fmt(&new.$($field).+)));
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    fn fmt<T: std::fmt::Debug>(v: &T) -> String {
        format!("{v:?}")
    }
    keep!(server.bind_address, "server.bind_address");
    keep!(server.port, "server.port");
    keep!(
        server.max_concurrent_streams,
        "server.max_concurrent_streams"
    );
    keep!(server.header_read_timeout, "server.header_read_timeout");
    keep!(server.proxy_protocol, "server.proxy_protocol");
    keep!(server.reflection, "server.reflection");
    keep!(metrics.port, "metrics.port");
    keep!(metrics.bind_address, "metrics.bind_address");
    keep!(state.data_dir, "state.data_dir");
    keep!(log.format, "log.format");
    keep!(log.file, "log.file");
    keep!(audit.path, "audit.path");
    keep!(
        limits.max_streams_per_principal,
        "limits.max_streams_per_principal"
    );
    if !restart.is_empty() {
        tracing::warn!(
            "these settings changed but need a restart; the running values stay: {}",
            restart.join(", ")
        );
    }
}

fn config_file(sources: &Sources) -> Option<PathBuf> {
    sources
        .config_flag
        .clone()
        .or_else(|| {
            sources
                .env
                .get("CHATCLI_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            sources
                .default_config_path
                .exists()
                .then(|| sources.default_config_path.clone())
        })
}

/// Every file whose content makes up the configuration: the config file, its drop-ins, and the
/// files it points to (keys, tokens, certificates).
fn watched_files(c: &Config, sources: &Sources) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(f) = config_file(sources) {
        if let Some(dir) = config::drop_in_dir(Some(&f), &sources.default_config_path)
            && let Ok(entries) = std::fs::read_dir(&dir)
        {
            let mut d: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            d.sort();
            files.extend(d);
        }
        files.insert(0, f);
    }
    let a = &c.auth;
    files.extend(a.token_file.iter().cloned());
    files.extend(a.jwt.secret_file.iter().cloned());
    files.extend(a.jwt.public_key_file.iter().cloned());
    files.extend(a.jwt.jwks_file.iter().cloned());
    files.extend(a.tokens.iter().filter_map(|t| t.file.clone()));
    for p in &c.llm.providers {
        files.extend(p.api_key_file.iter().cloned());
        files.extend(p.client_key_file.iter().cloned());
    }
    let t = &c.server.tls;
    files.extend(
        [&t.cert_file, &t.key_file, &t.client_ca_file]
            .into_iter()
            .flatten()
            .cloned(),
    );
    files.extend(c.watcher.config_file.iter().cloned());
    let creds = sources.credentials_dir();
    files
        .iter()
        .map(|f| crate::auth::tokens::credential_path(f, creds.as_deref()))
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

/// Quiet time that ends a burst of file events (an editor's truncate-then-write is read once).
const DEBOUNCE: Duration = Duration::from_millis(250);
/// Longest a burst may postpone its reload: files rewritten faster than [`DEBOUNCE`] still apply.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Watches the config's directories and reloads on changes: a burst of events ends after
/// `DEBOUNCE` of quiet, or `MAX_DELAY` after its first event, whichever comes first. The
/// returned guard stops watching when dropped. After each reload the set of directories is
/// recomputed (a config that now points to a new key file gets that file's directory watched).
pub fn watch(reloader: Arc<Reloader>) -> Result<WatchGuard, String> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(e) = res else { return };
        use notify::EventKind::*;
        let relevant = matches!(e.kind, Create(_) | Remove(_))
            || matches!(e.kind, Modify(k) if !matches!(k, notify::event::ModifyKind::Metadata(_)));
        if relevant && !e.paths.is_empty() {
            let _ = tx.send(e.paths);
        }
    })
    .map_err(|e| format!("cannot watch the configuration: {e}"))?;
    let mut watched = reloader.watched_dirs();
    for d in &watched {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory");
        }
    }
    let watcher = Arc::new(Mutex::new(watcher));
    let task = {
        let watcher = watcher.clone();
        tokio::spawn(async move {
            while let Some(mut paths) = rx.recv().await {
                let deadline = tokio::time::Instant::now() + MAX_DELAY;
                loop {
                    let quiet = tokio::time::Instant::now() + DEBOUNCE;
                    match tokio::time::timeout_at(quiet.min(deadline), rx.recv()).await {
                        Ok(Some(more)) => paths.extend(more),
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                if !paths.iter().any(|p| reloader.is_relevant(p)) {
                    continue;
                }
                let _ = reloader.reload("file change", false).await;
                let now = reloader.watched_dirs();
                if now != watched {
                    let mut w = lock(&watcher);
                    for old in watched.iter().filter(|o| !now.contains(o)) {
                        let _ = w.unwatch(old);
                    }
                    for new in now.iter().filter(|n| !watched.contains(n)) {
                        if let Err(e) = w.watch(new, RecursiveMode::NonRecursive) {
                            tracing::warn!(dir = %new.display(), error = %e, "cannot watch directory");
                        }
                    }
                    watched = now;
                }
            }
        })
    };
    Ok(WatchGuard {
        _watcher: Box::new(watcher),
        task,
    })
}

/// Stops watching when dropped.
pub struct WatchGuard {
    _watcher: Box<dyn std::any::Any + Send>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}
