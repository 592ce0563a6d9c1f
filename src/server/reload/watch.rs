//! The one file watcher of the server and the SIGHUP handler, both driving the same two reloads:
//! the configuration ([`Reloader`]) and the TLS material ([`TlsRotation`]); the same watcher also
//! has the catalog rebuilt when one of its folders changes (plugins, trusted keys, agents,
//! skills), and the MCP servers file is one of the configuration's files.
//!
//! The watcher is notify-debouncer-full over directories, not files (atomic renames and the
//! Kubernetes `..data` symlink swap are seen): those of the config file and its drop-ins and of
//! every file the serving config (or the last one that failed) names, and those of the TLS
//! material. The debouncer merges the raw events of one write (a temp file renamed over the
//! target is one change of the target) within [`MERGE`]; the changes then form a burst that ends
//! after [`DEBOUNCE`] of quiet or [`MAX_DELAY`] after its first change, whichever comes first, so
//! an editor's truncate-then-write is read once, whole, and files rewritten faster than the quiet
//! time still apply. (The debouncer alone cannot bound the delay: a file replaced again before its
//! timeout restarts it.) After a burst, a change in a TLS directory re-reads the TLS material and a
//! change of a file of the configuration reloads it. After every reload, whatever triggered it,
//! the set of directories is recomputed (a config that now points to a new key file or new TLS
//! paths gets their directories watched).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use notify_debouncer_full::notify::event::{AccessKind, AccessMode, ModifyKind};
use notify_debouncer_full::notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use super::Reloader;
use crate::server::AppState;
use crate::server::tls::TlsRotation;

/// The debouncer's timeout: the raw events of one write are merged into one change.
const MERGE: Duration = Duration::from_millis(50);
/// Quiet time that ends a burst of changes: editors and `kubectl` write several files in a burst,
/// read once the burst is written.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// Longest a burst may postpone its reload: files rewritten faster than [`DEBOUNCE`] still apply.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Stops watching when dropped.
pub struct WatchGuard {
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for WatchGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchGuard").finish_non_exhaustive()
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What is watched: the config's reloader (when the config came from files), the TLS rotation
/// (when TLS is on) and the catalog's folders (plugins, trusted keys, agents, skills).
struct Targets {
    reloader: Option<Arc<Reloader>>,
    tls: Option<Arc<TlsRotation>>,
    state: Weak<AppState>,
}

impl Targets {
    fn tls_dirs(&self) -> Vec<PathBuf> {
        self.tls.as_ref().map(|t| t.dirs()).unwrap_or_default()
    }

    /// The catalog's folders under the serving config, those that exist.
    fn catalog_dirs(&self) -> Vec<PathBuf> {
        let Some(state) = self.state.upgrade() else {
            return Vec::new();
        };
        let mut dirs = crate::catalog::Settings::from_config(&state.prepared().config).watch_dirs();
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// Every directory to watch, sorted, each once.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.tls_dirs();
        if let Some(r) = &self.reloader {
            dirs.extend(r.watched_dirs());
        }
        dirs.extend(self.catalog_dirs());
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// Starts the watcher of `state`'s config files (when it has a [`Reloader`]) and TLS material
/// (when TLS is on); `None` when there is nothing to watch or the watcher cannot start (logged:
/// SIGHUP still reloads). A directory that cannot be watched is logged and skipped.
pub fn watch(state: &Arc<AppState>) -> Option<WatchGuard> {
    let targets = Targets {
        reloader: state.reloader.get().cloned(),
        tls: state.tls_rotation.clone(),
        state: Arc::downgrade(state),
    };
    if targets.reloader.is_none() && targets.tls.is_none() && targets.catalog_dirs().is_empty() {
        return None;
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let handler = move |result: DebounceEventResult| match result {
        Ok(events) => {
            let paths: Vec<PathBuf> = events
                .into_iter()
                .filter(|e| is_change(&e.event.kind))
                .flat_map(|e| e.event.paths.clone())
                .collect();
            if !paths.is_empty() {
                let _ = tx.send(paths);
            }
        }
        Err(errors) => {
            for e in errors {
                tracing::warn!("watching the configuration files: {e}");
            }
        }
    };
    let mut debouncer = match new_debouncer(MERGE, None, handler) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(
                "the configuration and TLS files are not watched (SIGHUP still reloads them): {e}"
            );
            return None;
        }
    };
    // Armed before returning, so that a change made once the server reports ready is seen.
    let mut watched = Vec::new();
    rearm(&mut debouncer, &mut watched, targets.dirs());
    let task = tokio::spawn(run(Arc::downgrade(state), targets, debouncer, watched, rx));
    Some(WatchGuard { task })
}

/// Reading a file is not a change (and a reload reads the files), nor is a change of its
/// permissions or times; a write that closes is.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    }
}

/// Whether `changed` is in (or is) one of `dirs`.
fn in_dirs(changed: &Path, dirs: &[PathBuf]) -> bool {
    dirs.iter()
        .any(|d| changed.parent() == Some(d.as_path()) || changed == d)
}

async fn run(
    state: Weak<AppState>,
    targets: Targets,
    mut debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    mut watched: Vec<PathBuf>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<PathBuf>>,
) {
    loop {
        // A reload from any trigger leaves a permit here, so none is missed between two waits.
        let rearmed = async {
            match &targets.reloader {
                Some(r) => r.rearm.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = rx.recv() => {
                let Some(mut paths) = received else { return };
                let deadline = tokio::time::Instant::now() + MAX_DELAY;
                loop {
                    let quiet = tokio::time::Instant::now() + DEBOUNCE;
                    match tokio::time::timeout_at(quiet.min(deadline), rx.recv()).await {
                        Ok(Some(more)) => paths.extend(more),
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                if state.strong_count() == 0 {
                    return;
                }
                changed(&targets, &paths).await;
            }
            () = rearmed => {}
        }
        rearm(&mut debouncer, &mut watched, targets.dirs());
    }
}

/// Hands the changed `paths` to the TLS rotation (an event in its directories) and the config
/// reloader (an event on one of its files).
async fn changed(targets: &Targets, paths: &[PathBuf]) {
    if let Some(tls) = &targets.tls {
        let dirs = targets.tls_dirs();
        let canonical = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if paths
            .iter()
            .any(|p| in_dirs(p, &dirs) || in_dirs(&canonical(p), &dirs))
        {
            let tls = tls.clone();
            // Reads and parses files: off the async workers.
            let _ = tokio::task::spawn_blocking(move || tls.changed()).await;
        }
    }
    if let Some(r) = &targets.reloader
        && paths.iter().any(|p| r.is_relevant(p))
    {
        let _ = r.reload("file change", false).await;
    }
    // A plugin, key, agent or skill added, replaced or removed: the catalog is rebuilt now, so a
    // new plugin is checked and probed before the first call asks for it.
    let catalog = targets.catalog_dirs();
    if !catalog.is_empty()
        && paths.iter().any(|p| in_dirs(p, &catalog))
        && let Some(state) = targets.state.upgrade()
    {
        let settings = crate::catalog::Settings::from_config(&state.prepared().config);
        let snap = state.catalog.rescan(&settings).await;
        tracing::debug!(
            plugins = snap.plugins.len(),
            "catalog rescanned after a folder change"
        );
    }
}

/// Watches the directories of `now` that are not `watched` yet and stops watching those no longer
/// in it.
fn rearm(
    debouncer: &mut Debouncer<RecommendedWatcher, RecommendedCache>,
    watched: &mut Vec<PathBuf>,
    now: Vec<PathBuf>,
) {
    if now == *watched {
        return;
    }
    for old in watched.iter().filter(|o| !now.contains(o)) {
        let _ = debouncer.unwatch(old);
    }
    for new in now.iter().filter(|n| !watched.contains(n)) {
        if let Err(e) = debouncer.watch(new, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %new.display(), error = %e, "cannot watch directory");
        }
    }
    tracing::debug!(dirs = ?now, "watching the configuration and TLS directories");
    *watched = now;
}

/// Reloads on every SIGHUP until the task is aborted: the config (forced, when it came from files),
/// then the TLS material from the paths now configured (a certificate renewed in place changes no
/// config file). Both log and count their outcome.
pub fn on_sighup(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("SIGHUP cannot be handled; reload with the admin command instead");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            if let Some(r) = state.reloader.get() {
                let _ = r.reload("SIGHUP", true).await;
            }
            if let Some(tls) = state.tls_rotation.clone() {
                let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use notify_debouncer_full::notify::event::{CreateKind, DataChange, MetadataKind};

    #[test]
    fn reads_and_metadata_are_not_changes() {
        assert!(!is_change(&EventKind::Access(AccessKind::Read)));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!is_change(&EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::Permissions
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Content
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }

    #[test]
    fn a_path_is_in_a_directory_or_is_one() {
        let dirs = vec![PathBuf::from("/etc/tls")];
        assert!(in_dirs(Path::new("/etc/tls/cert.pem"), &dirs));
        assert!(in_dirs(Path::new("/etc/tls/..data"), &dirs));
        assert!(in_dirs(Path::new("/etc/tls"), &dirs));
        assert!(!in_dirs(Path::new("/etc/tls/sub/cert.pem"), &dirs));
        assert!(!in_dirs(Path::new("/etc/other/cert.pem"), &dirs));
    }
}
