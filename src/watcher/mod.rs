//! The Kubernetes watcher: collects each configured target (workload, pods, events, HPA, nodes,
//! logs, optional Prometheus samples) through kube reflectors (the `collect` module), raises
//! alerts ([`alerts`]) and writes the context that prompts get ([`summary`]). One task per
//! target: a target that cannot be read (`forbidden`, `not found`, `unreachable since …`) says so
//! in its status and never stops the others.
//! [`Watcher::apply`] takes a new target list (at start and at every reload): an added target
//! starts, a removed one stops and its state is dropped, a changed one restarts alone; the others
//! keep their history and alerts.

pub mod alerts;
mod collect;
pub mod scrape;
pub mod snapshot;
pub mod summary;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use alerts::AlertBook;
pub use alerts::{Alert, Severity};
use snapshot::Snapshot;
use summary::TargetView;

use crate::config::WatcherConfig;
use crate::telemetry::WatcherMetrics;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the watcher knows of one target.
#[derive(Debug)]
pub(crate) struct TargetState {
    status: String,
    snapshot: Option<Snapshot>,
    alerts: AlertBook,
    /// Collection times within the window.
    collections: VecDeque<SystemTime>,
}

impl Default for TargetState {
    fn default() -> Self {
        Self {
            status: "starting".into(),
            snapshot: None,
            alerts: AlertBook::default(),
            collections: VecDeque::new(),
        }
    }
}

struct Running {
    params: collect::Params,
    state: Arc<Mutex<TargetState>>,
    cancel: CancellationToken,
}

/// Settings read at every collection, changed in place by a reload.
#[derive(Debug, Clone)]
struct Live {
    window: Duration,
    max_context_chars: usize,
}

pub(crate) struct Shared {
    live: Mutex<Live>,
    targets: Mutex<BTreeMap<String, Running>>,
    client: Mutex<Option<(Option<PathBuf>, kube::Client)>>,
    nodes: Mutex<Option<(Store<Node>, CancellationToken)>>,
    /// The events and HPAs of each namespace with targets, shared by its targets.
    namespaces: Mutex<BTreeMap<String, collect::NamespaceStreams>>,
    metrics: Option<WatcherMetrics>,
    /// For the Prometheus scrapes, made at the first one.
    http: std::sync::OnceLock<Option<reqwest::Client>>,
}

impl Shared {
    /// The client for `kubeconfig` (a file, else in-cluster or the default kubeconfig), made once.
    async fn client(&self, kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
        if let Some((path, c)) = lock(&self.client).as_ref()
            && path.as_deref() == kubeconfig
        {
            return Ok(c.clone());
        }
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("no in-cluster config and no kubeconfig: {e}"))?,
        };
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        *lock(&self.client) = Some((kubeconfig.map(Path::to_path_buf), client.clone()));
        Ok(client)
    }

    /// The HTTP client of the scrapes (`None` when it cannot be built; logged once).
    fn http(&self) -> Option<reqwest::Client> {
        self.http
            .get_or_init(|| {
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .build()
                    .inspect_err(|e| tracing::warn!("no HTTP client for the metrics scrapes: {e}"))
                    .ok()
            })
            .clone()
    }

    /// The cluster's nodes, one reflector shared by every target.
    fn nodes(&self, client: &kube::Client) -> Store<Node> {
        let mut nodes = lock(&self.nodes);
        if let Some((store, _)) = nodes.as_ref() {
            return store.clone();
        }
        let cancel = CancellationToken::new();
        let health = Arc::new(collect::Health::default());
        let store = collect::reflect_nodes(client, health, cancel.clone());
        *nodes = Some((store.clone(), cancel));
        store
    }

    fn record(
        &self,
        key: &str,
        state: &Mutex<TargetState>,
        snap: Snapshot,
        status: String,
        now: SystemTime,
        took: Duration,
    ) {
        let window = lock(&self.live).window;
        let (ns, name) = (
            snap.target.namespace.clone(),
            snap.target.deployment.clone(),
        );
        let (ready, desired) = (
            snap.pods_ready(),
            snap.workload.as_ref().map_or(0, |w| w.desired),
        );
        let ok = status == "ok";
        let raised = {
            let mut st = lock(state);
            st.status = status;
            collect::observe(&mut st, snap, now, window)
        };
        for a in &raised {
            tracing::info!(target = key, alert = a.kind, object = %a.object, "{}", a.message);
        }
        if let Some(m) = &self.metrics {
            m.collection_duration
                .with_label_values(&[key])
                .observe(took.as_secs_f64());
            if !ok {
                m.collection_errors.with_label_values(&[key]).inc();
            }
            for a in &raised {
                m.alerts
                    .with_label_values(&[key, a.severity.as_str(), a.kind])
                    .inc();
            }
            if ok {
                m.pods_ready
                    .with_label_values(&[&ns, &name])
                    .set(i64::try_from(ready).unwrap_or(i64::MAX));
                m.pods_desired
                    .with_label_values(&[&ns, &name])
                    .set(i64::from(desired));
            }
        }
    }
}

/// See the module docs.
pub struct Watcher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field(
                "targets",
                &lock(&self.shared.targets).keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The status of one target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetStatus {
    /// `Kind/namespace/name`.
    pub key: String,
    /// The workload's kind.
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `ok`, `starting`, `forbidden`, `not found` or `unreachable since <time>`.
    pub status: String,
    /// Pods seen.
    pub pods: usize,
    /// Pods ready.
    pub pods_ready: usize,
    /// Alerts now.
    pub alerts: usize,
    /// Collections within the window.
    pub snapshots: usize,
    /// 0 healthy, 1 warning, 2 critical.
    pub score: u8,
}

/// The status of the whole watcher.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WatcherStatus {
    /// Whether any target is configured.
    pub active: bool,
    /// `Watching N targets: h healthy, w warning, c critical`.
    pub status_line: String,
    /// Every target.
    pub targets: Vec<TargetStatus>,
}

/// Which alerts to list; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// The target's namespace.
    pub namespace: String,
    /// The target's workload name.
    pub deployment: String,
}

impl Watcher {
    /// A watcher with no target; `registry` receives its metrics.
    pub fn new(registry: Option<&prometheus::Registry>) -> Arc<Self> {
        let metrics = registry.and_then(|r| match WatcherMetrics::register(r) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("watcher metrics unavailable: {e}");
                None
            }
        });
        Arc::new(Self {
            shared: Arc::new(Shared {
                live: Mutex::new(Live {
                    window: Duration::from_secs(7200),
                    max_context_chars: 32_000,
                }),
                targets: Mutex::new(BTreeMap::new()),
                client: Mutex::new(None),
                nodes: Mutex::new(None),
                namespaces: Mutex::new(BTreeMap::new()),
                metrics,
                http: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Collects the targets of `config` (already resolved by the config loader): starts the new
    /// ones, stops the removed ones, restarts the changed ones and leaves the others running.
    /// Needs a Tokio runtime.
    pub fn apply(&self, config: &WatcherConfig) {
        *lock(&self.shared.live) = Live {
            window: config.window,
            max_context_chars: config.max_context_chars,
        };
        let wanted: BTreeMap<String, collect::Params> = config
            .targets
            .iter()
            .map(|t| {
                (
                    t.key(),
                    collect::Params {
                        target: t.clone(),
                        interval: config.interval,
                        max_log_lines: config.max_log_lines,
                        kubeconfig: config.kubeconfig.clone(),
                    },
                )
            })
            .collect();
        let mut targets = lock(&self.shared.targets);
        let kubeconfig_changed = targets
            .values()
            .next()
            .is_some_and(|r| r.params.kubeconfig != config.kubeconfig);
        if kubeconfig_changed {
            // The streams of the old cluster go; the restarted targets start new ones.
            if let Some((_, cancel)) = lock(&self.shared.nodes).take() {
                cancel.cancel();
            }
            for (_, n) in std::mem::take(&mut *lock(&self.shared.namespaces)) {
                n.stop();
            }
        }
        targets.retain(|key, running| {
            let keep = wanted.get(key).is_some_and(|p| *p == running.params);
            if !keep {
                running.cancel.cancel();
                if let Some(m) = &self.shared.metrics {
                    let t = &running.params.target;
                    let _ = m
                        .pods_ready
                        .remove_label_values(&[&t.namespace, &t.deployment]);
                    let _ = m
                        .pods_desired
                        .remove_label_values(&[&t.namespace, &t.deployment]);
                }
                tracing::info!(target = %key, "watcher target stopped");
            }
            keep
        });
        for (key, params) in wanted {
            if targets.contains_key(&key) {
                continue;
            }
            let state = Arc::new(Mutex::new(TargetState::default()));
            let cancel = CancellationToken::new();
            tracing::info!(target = %key, "watcher target started");
            tokio::spawn(collect::run(
                self.shared.clone(),
                params.clone(),
                state.clone(),
                cancel.clone(),
            ));
            targets.insert(
                key,
                Running {
                    params,
                    state,
                    cancel,
                },
            );
        }
        if let Some(m) = &self.shared.metrics {
            m.targets
                .set(i64::try_from(targets.len()).unwrap_or(i64::MAX));
        }
        if targets.is_empty()
            && let Some((_, cancel)) = lock(&self.shared.nodes).take()
        {
            cancel.cancel();
        }
    }

    /// Stops every target.
    pub fn stop(&self) {
        for (_, r) in std::mem::take(&mut *lock(&self.shared.targets)) {
            r.cancel.cancel();
        }
        if let Some((_, cancel)) = lock(&self.shared.nodes).take() {
            cancel.cancel();
        }
    }

    /// Whether any target is configured.
    pub fn is_active(&self) -> bool {
        !lock(&self.shared.targets).is_empty()
    }

    fn views(&self) -> Vec<TargetView> {
        let window = lock(&self.shared.live).window;
        let now = SystemTime::now();
        lock(&self.shared.targets)
            .iter()
            .map(|(key, r)| {
                let mut st = lock(&r.state);
                st.alerts.expire(now, window);
                TargetView {
                    key: key.clone(),
                    status: st.status.clone(),
                    snapshot: st.snapshot.clone(),
                    alerts: st.alerts.alerts(),
                }
            })
            .collect()
    }

    /// The status of every target and the status line.
    pub fn status(&self) -> WatcherStatus {
        let views = self.views();
        let counts: BTreeMap<String, usize> = lock(&self.shared.targets)
            .iter()
            .map(|(k, r)| (k.clone(), lock(&r.state).collections.len()))
            .collect();
        let targets = views
            .iter()
            .map(|v| {
                let (kind, rest) = v.key.split_once('/').unwrap_or(("", &v.key));
                let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
                TargetStatus {
                    key: v.key.clone(),
                    kind: kind.into(),
                    namespace: namespace.into(),
                    name: name.into(),
                    status: v.status.clone(),
                    pods: v.snapshot.as_ref().map_or(0, |s| s.pods.len()),
                    pods_ready: v.snapshot.as_ref().map_or(0, Snapshot::pods_ready),
                    alerts: v.alerts.len(),
                    snapshots: counts.get(&v.key).copied().unwrap_or(0),
                    score: v.score(),
                }
            })
            .collect();
        WatcherStatus {
            active: !views.is_empty(),
            status_line: summary::status_line(&views),
            targets,
        }
    }

    /// The alerts of the targets `filter` matches, most severe first.
    pub fn alerts(&self, filter: &AlertFilter) -> Vec<Alert> {
        let mut out: Vec<Alert> = self
            .views()
            .into_iter()
            .flat_map(|v| v.alerts)
            .filter(|a| filter.namespace.is_empty() || a.namespace == filter.namespace)
            .filter(|a| filter.deployment.is_empty() || a.deployment == filter.deployment)
            .collect();
        out.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then(b.last_seen.cmp(&a.last_seen))
                .then(a.object.cmp(&b.object))
        });
        out
    }

    /// The context for prompts, within `max_context_chars`; `None` without targets.
    pub fn prompt_context(&self) -> Option<String> {
        let budget = lock(&self.shared.live).max_context_chars;
        summary::context(&self.views(), budget)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::WatchTarget;
    use crate::testing::kube::{FakeKube, deployment, pod};

    async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
        for _ in 0..300 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn config(kubeconfig: &Path, targets: &[(&str, &str)]) -> WatcherConfig {
        WatcherConfig {
            interval: Duration::from_millis(300),
            window: Duration::from_secs(2),
            kubeconfig: Some(kubeconfig.to_path_buf()),
            targets: targets
                .iter()
                .map(|(ns, name)| WatchTarget {
                    deployment: name.to_string(),
                    namespace: ns.to_string(),
                    ..WatchTarget::default()
                })
                .collect(),
            ..WatcherConfig::default()
        }
    }

    fn status_of(w: &Watcher, key: &str) -> String {
        w.status()
            .targets
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.status.clone())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn targets_are_collected_alerted_and_applied() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let k = FakeKube::start_with(Duration::from_millis(200))
            .await
            .unwrap();
        k.apply(deployment("prod", "api", 2, 1));
        k.apply(pod("prod", "api-1", "api", true, 6));
        k.apply(pod("prod", "api-2", "api", false, 0));
        k.log("prod", "api-1", "app", "ERROR database unreachable");
        k.forbid_namespace("secret");
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(&kc, k.kubeconfig()).unwrap();

        let w = Watcher::new(None);
        w.apply(&config(
            &kc,
            &[("prod", "api"), ("secret", "vault"), ("prod", "gone")],
        ));
        wait_for("statuses", || {
            status_of(&w, "Deployment/prod/api") == "ok"
                && status_of(&w, "Deployment/secret/vault") == "forbidden"
                && status_of(&w, "Deployment/prod/gone") == "not found"
        })
        .await;
        wait_for("alerts", || w.alerts(&AlertFilter::default()).len() >= 3).await;
        let kinds: Vec<&str> = w
            .alerts(&AlertFilter::default())
            .iter()
            .map(|a| a.kind)
            .collect();
        assert!(
            kinds.contains(&"HighRestartCount")
                && kinds.contains(&"PodNotReady")
                && kinds.contains(&"DeploymentFailing"),
            "{kinds:?}"
        );
        // The same lines are served again at every interval (sinceSeconds overlaps): kept once.
        let log_reads = || {
            k.requests()
                .iter()
                .filter(|r| r.is_log() && r.path.contains("api-1"))
                .count()
        };
        wait_for("three reads of the log", || log_reads() >= 3).await;
        assert!(k.requests().iter().any(|r| r.is_log()
            && r.query.contains("tailLines=100")
            && r.query.contains("sinceSeconds=")));
        let ctx = w.prompt_context().unwrap();
        assert!(
            ctx.starts_with("[K8s Multi-Watcher: 3 targets monitored]\n"),
            "{ctx}"
        );
        assert!(ctx.contains("ERROR database unreachable"), "{ctx}");
        assert_eq!(
            ctx.matches("ERROR database unreachable").count(),
            1,
            "{ctx}"
        );

        // The pods recover: the alerts outlive them by the window, then go.
        k.apply(deployment("prod", "api", 2, 2));
        k.apply(pod("prod", "api-1", "api", true, 0));
        k.apply(pod("prod", "api-2", "api", true, 0));
        wait_for("expiry", || w.alerts(&AlertFilter::default()).is_empty()).await;

        // Removing a target drops it; the others keep running.
        w.apply(&config(&kc, &[("prod", "api")]));
        assert_eq!(w.status().targets.len(), 1);
        assert_eq!(status_of(&w, "Deployment/prod/api"), "ok");

        // The API goes away and comes back.
        k.stop();
        wait_for("unreachable", || {
            status_of(&w, "Deployment/prod/api").starts_with("unreachable since ")
        })
        .await;
        k.resume();
        wait_for("back", || status_of(&w, "Deployment/prod/api") == "ok").await;
        k.apply(pod("prod", "api-3", "api", true, 0));
        let pods = |w: &Watcher| w.status().targets[0].pods;
        wait_for("the change made while away", || pods(&w) == 3).await;

        // The history is compacted: the watches get 410 Gone, list again and go on.
        k.expire_watches();
        k.delete("Pod", "prod", "api-3");
        wait_for("the relist", || pods(&w) == 2).await;
        k.apply(pod("prod", "api-4", "api", true, 0));
        wait_for("the watch after the relist", || pods(&w) == 3).await;
        assert!(
            k.requests()
                .iter()
                .any(|r| r.is_watch() && r.query.contains("allowWatchBookmarks=true"))
        );
        w.stop();
    }

    #[tokio::test]
    async fn a_changed_target_restarts_alone() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let k = FakeKube::start_with(Duration::from_millis(200))
            .await
            .unwrap();
        k.apply(deployment("prod", "api", 1, 1));
        k.apply(deployment("prod", "web", 1, 1));
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(&kc, k.kubeconfig()).unwrap();
        let w = Watcher::new(None);
        let mut c = config(&kc, &[("prod", "api"), ("prod", "web")]);
        w.apply(&c);
        let state_of = |key: &str| {
            lock(&w.shared.targets)
                .get(key)
                .map(|r| r.state.clone())
                .unwrap()
        };
        let (api, web) = (
            state_of("Deployment/prod/api"),
            state_of("Deployment/prod/web"),
        );
        c.targets[1].metrics_port = Some(9090);
        w.apply(&c);
        assert!(
            Arc::ptr_eq(&api, &state_of("Deployment/prod/api")),
            "the unchanged target was restarted"
        );
        assert!(
            !Arc::ptr_eq(&web, &state_of("Deployment/prod/web")),
            "the changed target was not restarted"
        );
        // The same list again changes nothing; a new one starts beside the others.
        let web = state_of("Deployment/prod/web");
        c.targets.push(WatchTarget {
            deployment: "db".into(),
            namespace: "prod".into(),
            ..WatchTarget::default()
        });
        w.apply(&c);
        assert!(Arc::ptr_eq(&web, &state_of("Deployment/prod/web")));
        assert_eq!(w.status().targets.len(), 3);
        wait_for("db not found", || {
            status_of(&w, "Deployment/prod/db") == "not found"
        })
        .await;
        assert_eq!(lock(&w.shared.namespaces).len(), 1);
        w.stop();
        assert!(!w.is_active());
        wait_for("the namespace's streams released", || {
            lock(&w.shared.namespaces).is_empty()
        })
        .await;
    }

    #[tokio::test]
    async fn every_running_pod_is_scraped_with_its_labels_and_the_filter() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (port, hits) = crate::testing::kube::serve_metrics(
            "# TYPE http_requests_total counter\nhttp_requests_total{code=\"500\"} 12\ngo_goroutines 9\n",
        )
        .await
        .unwrap();
        let k = FakeKube::start_with(Duration::from_millis(200))
            .await
            .unwrap();
        k.apply(deployment("prod", "api", 2, 2));
        for name in ["api-1", "api-2"] {
            let mut p = pod("prod", name, "api", true, 0);
            p["status"]["podIP"] = serde_json::json!("127.0.0.1");
            k.apply(p);
        }
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(&kc, k.kubeconfig()).unwrap();
        let mut c = config(&kc, &[("prod", "api")]);
        c.targets[0].metrics_port = Some(port);
        c.targets[0].metrics_filter = vec!["http_*".into()];
        let w = Watcher::new(None);
        w.apply(&c);
        wait_for("both pods scraped", || {
            let snap = lock(&w.shared.targets)
                .values()
                .next()
                .and_then(|r| lock(&r.state).snapshot.clone());
            snap.is_some_and(|s| s.metrics.len() == 2)
        })
        .await;
        assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        let snap = lock(&w.shared.targets)
            .values()
            .next()
            .and_then(|r| lock(&r.state).snapshot.clone())
            .unwrap();
        let pods: Vec<&str> = snap.metrics.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(pods, ["api-1", "api-2"]);
        assert!(
            snap.metrics
                .iter()
                .all(|(_, l)| l == "http_requests_total{code=\"500\"} 12"),
            "{:?}",
            snap.metrics
        );
        w.stop();
    }

    #[tokio::test]
    async fn at_steady_state_there_is_no_list_and_one_log_read_per_container_per_collection() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let k = FakeKube::start_with(Duration::from_millis(200))
            .await
            .unwrap();
        let names = ["a", "b", "c"];
        for name in names {
            k.apply(deployment("prod", name, 4, 4));
            for i in 0..4 {
                k.apply(pod("prod", &format!("{name}-{i}"), name, true, 0));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(&kc, k.kubeconfig()).unwrap();
        let w = Watcher::new(None);
        let mut c = config(&kc, &names.map(|n| ("prod", n)));
        // Collections are counted within the window: keep them all.
        c.window = Duration::from_secs(3600);
        w.apply(&c);
        let steady = |w: &Watcher| {
            w.status()
                .targets
                .iter()
                .all(|t| t.status == "ok" && t.pods == 4)
        };
        wait_for("every target collected", || steady(&w)).await;
        let collections =
            |w: &Watcher| -> usize { w.status().targets.iter().map(|t| t.snapshots).sum() };
        // One more collection of each, so every reflector has listed and is watching.
        let c0 = collections(&w);
        wait_for("a full round", || collections(&w) >= c0 + 3).await;
        let (r0, c0) = (k.requests().len(), collections(&w));
        wait_for("five more rounds", || collections(&w) >= c0 + 15).await;
        let (new, c1) = (k.requests()[r0..].to_vec(), collections(&w));
        let lists: Vec<&crate::testing::kube::KubeRequest> = new
            .iter()
            .filter(|r| !r.is_watch() && !r.is_log())
            .collect();
        assert!(lists.is_empty(), "list calls at steady state: {lists:?}");
        // The three targets of the namespace share its events and HPAs: listed once each.
        for resource in ["/events", "/horizontalpodautoscalers"] {
            let listed = k
                .requests()
                .iter()
                .filter(|r| !r.is_watch() && r.path.ends_with(resource))
                .count();
            assert_eq!(listed, 1, "{resource}");
        }
        let logs = new.iter().filter(|r| r.is_log()).count();
        // Each collection of a target reads each of its 4 pods' one container once (the request
        // log may hold the reads of one collection in progress at either end).
        assert!(
            logs <= (c1 - c0 + 3) * 4,
            "{logs} log reads for {} collections",
            c1 - c0
        );
        assert!(
            logs >= (c1 - c0) * 4 - 4,
            "{logs} log reads for {} collections",
            c1 - c0
        );
        w.stop();
    }
}
