//! Collection of one target. The workload (by name), its pods (by the workload's selector), the
//! events and HPAs of its namespace and the cluster's nodes come from kube reflectors: a list at
//! start, then watches that resume from the last resource version (a `410 Gone` makes kube list
//! again), with a backoff while the API fails. Every interval the stores are read into a
//! [`Snapshot`], the pods' new log lines are fetched (`sinceSeconds` covering the interval,
//! `tailLines` = `max_log_lines`, with timestamps so that a line seen before is skipped), the
//! alert rules run and the target's status is set from the streams' health.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, LogParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::alerts::conditions;
use super::snapshot::{self, LogLine, Snapshot, Workload};
use super::{Shared, TargetState};
use crate::config::{WatchTarget, WorkloadKind};

/// What went wrong with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    Forbidden,
    Unreachable,
}

#[derive(Debug, Default)]
struct HealthState {
    synced: bool,
    problem: Option<(Problem, SystemTime, String)>,
}

/// The health of one watch stream.
#[derive(Debug, Default)]
pub(super) struct Health(Mutex<HealthState>);

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ok(&self, synced: bool) {
        let mut h = self.lock();
        h.problem = None;
        h.synced |= synced;
    }

    /// Forgets an `Unreachable` problem: the API answered again. A watch that resumes yields no
    /// event until something changes, so the stream alone cannot tell.
    fn reachable(&self) {
        let mut h = self.lock();
        if matches!(h.problem, Some((Problem::Unreachable, _, _))) {
            h.problem = None;
        }
    }

    fn error(&self, e: &watcher::Error) {
        let api = match e {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => e,
            // 410 Gone: kube lists again, which is not a failure of the API.
            watcher::Error::WatchError(s) if s.code == 410 => return,
            watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion => {
                tracing::debug!("watch error: {e}");
                return;
            }
        };
        let problem = match api {
            kube::Error::Api(s) if s.code == 403 => Problem::Forbidden,
            _ => Problem::Unreachable,
        };
        let mut h = self.lock();
        match &h.problem {
            Some((p, _, _)) if *p == problem => {}
            _ => {
                tracing::warn!("Kubernetes API: {e}");
                h.problem = Some((problem, SystemTime::now(), e.to_string()));
            }
        }
    }
}

fn backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .into()
}

/// Starts a reflector for `api`, its events consumed until `cancel`; returns its store.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Store<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, config)).backoff(backoff());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                item = stream.next() => match item {
                    None => break,
                    Some(Ok(ev)) => health.ok(matches!(ev, watcher::Event::InitDone)),
                    Some(Err(e)) => health.error(&e),
                },
            }
        }
    });
    reader
}

/// The cluster's nodes (their stream's failures are logged, not a target's status: a server
/// may be allowed to read its namespaces and not the nodes).
pub(super) fn reflect_nodes(
    client: &kube::Client,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Store<Node> {
    reflect(
        Api::all(client.clone()),
        watcher::Config::default(),
        health,
        cancel,
    )
}

/// The workload's store, of its kind.
enum WorkloadStore {
    Deployment(Store<Deployment>),
    StatefulSet(Store<StatefulSet>),
    DaemonSet(Store<DaemonSet>),
    Job(Store<Job>),
    CronJob(Store<CronJob>),
}

impl WorkloadStore {
    fn info(&self) -> Option<snapshot::WorkloadInfo> {
        fn first<K: Workload + kube::Resource + Clone>(
            s: &Store<K>,
        ) -> Option<snapshot::WorkloadInfo>
        where
            K::DynamicType: Eq + Hash + Clone,
        {
            s.state().first().map(|w| w.info())
        }
        match self {
            Self::Deployment(s) => first(s),
            Self::StatefulSet(s) => first(s),
            Self::DaemonSet(s) => first(s),
            Self::Job(s) => first(s),
            Self::CronJob(s) => first(s),
        }
    }
}

struct PodWatch {
    selector: String,
    store: Store<Pod>,
    health: Arc<Health>,
    cancel: CancellationToken,
}

/// The reflectors of one target.
struct Streams {
    workload: WorkloadStore,
    workload_health: Arc<Health>,
    events: Store<Event>,
    hpas: Store<HorizontalPodAutoscaler>,
    others: Vec<Arc<Health>>,
    pods: Option<PodWatch>,
    nodes: Store<Node>,
    cancel: CancellationToken,
    /// Keeps the namespace's events and HPAs watched while this target runs.
    _namespace: NamespaceLease,
}

/// The events and HPAs of one namespace, watched once for all the targets in it.
pub(super) struct NamespaceStreams {
    events: Store<Event>,
    hpas: Store<HorizontalPodAutoscaler>,
    healths: Vec<Arc<Health>>,
    cancel: CancellationToken,
    users: usize,
    /// Tells these streams from later ones of the same namespace.
    id: u64,
}

impl NamespaceStreams {
    /// Starts the reflectors of `ns`.
    pub(super) fn start(client: &kube::Client, ns: &str) -> Self {
        let cancel = CancellationToken::new();
        let events_health = Arc::new(Health::default());
        let hpa_health = Arc::new(Health::default());
        let events = reflect(
            Api::namespaced(client.clone(), ns),
            watcher::Config::default(),
            events_health.clone(),
            cancel.clone(),
        );
        let hpas = reflect(
            Api::namespaced(client.clone(), ns),
            watcher::Config::default(),
            hpa_health.clone(),
            cancel.clone(),
        );
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self {
            events,
            hpas,
            healths: vec![events_health, hpa_health],
            cancel,
            users: 0,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Stops its reflectors.
    pub(super) fn stop(&self) {
        self.cancel.cancel();
    }
}

/// One target's use of its namespace's streams; the last one dropped stops them.
pub(super) struct NamespaceLease {
    events: Store<Event>,
    hpas: Store<HorizontalPodAutoscaler>,
    healths: Vec<Arc<Health>>,
    namespace: String,
    id: u64,
    shared: Arc<Shared>,
}

impl NamespaceLease {
    /// Takes the streams of `ns` in `shared`, starting them for the first user.
    pub(super) fn take(shared: &Arc<Shared>, client: &kube::Client, ns: &str) -> Self {
        let mut map = super::lock(&shared.namespaces);
        let n = map
            .entry(ns.to_string())
            .or_insert_with(|| NamespaceStreams::start(client, ns));
        n.users += 1;
        Self {
            events: n.events.clone(),
            hpas: n.hpas.clone(),
            healths: n.healths.clone(),
            namespace: ns.to_string(),
            id: n.id,
            shared: shared.clone(),
        }
    }
}

impl Drop for NamespaceLease {
    fn drop(&mut self) {
        let mut map = super::lock(&self.shared.namespaces);
        if let Some(n) = map.get_mut(&self.namespace).filter(|n| n.id == self.id) {
            n.users = n.users.saturating_sub(1);
            // Only the streams this lease took: a reset map may hold newer ones.
            if n.users == 0 {
                n.stop();
                map.remove(&self.namespace);
            }
        }
    }
}

impl Streams {
    fn start(
        client: &kube::Client,
        t: &WatchTarget,
        nodes: Store<Node>,
        lease: NamespaceLease,
        cancel: CancellationToken,
    ) -> Self {
        let by_name = watcher::Config::default().fields(&format!("metadata.name={}", t.deployment));
        let health = Arc::new(Health::default());
        let ns = t.namespace.as_str();
        macro_rules! workload {
            ($variant:ident) => {
                WorkloadStore::$variant(reflect(
                    Api::namespaced(client.clone(), ns),
                    by_name.clone(),
                    health.clone(),
                    cancel.clone(),
                ))
            };
        }
        let workload = match t.kind {
            WorkloadKind::Deployment => workload!(Deployment),
            WorkloadKind::StatefulSet => workload!(StatefulSet),
            WorkloadKind::DaemonSet => workload!(DaemonSet),
            WorkloadKind::Job => workload!(Job),
            WorkloadKind::CronJob => workload!(CronJob),
        };
        let NamespaceLease {
            events,
            hpas,
            healths,
            ..
        } = &lease;
        let (events, hpas, others) = (events.clone(), hpas.clone(), healths.clone());
        Self {
            workload,
            workload_health: health,
            events,
            hpas,
            others,
            pods: None,
            nodes,
            cancel,
            _namespace: lease,
        }
    }

    /// Starts (or, when the selector changed, restarts) the pods' reflector.
    fn follow_pods(
        &mut self,
        client: &kube::Client,
        t: &WatchTarget,
        selector: &BTreeMap<String, String>,
    ) {
        let selector: String = selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        if selector.is_empty() || self.pods.as_ref().is_some_and(|p| p.selector == selector) {
            return;
        }
        if let Some(old) = self.pods.take() {
            old.cancel.cancel();
        }
        let health = Arc::new(Health::default());
        let cancel = self.cancel.child_token();
        let store = reflect(
            Api::namespaced(client.clone(), &t.namespace),
            watcher::Config::default().labels(&selector),
            health.clone(),
            cancel.clone(),
        );
        self.pods = Some(PodWatch {
            selector,
            store,
            health,
            cancel,
        });
    }

    fn healths(&self) -> impl Iterator<Item = &Arc<Health>> {
        std::iter::once(&self.workload_health)
            .chain(self.others.iter())
            .chain(self.pods.iter().map(|p| &p.health))
    }

    /// `ok`, `forbidden`, `unreachable since …`, `starting` or `not found`.
    fn status(&self) -> String {
        type Seen = (bool, Option<(Problem, SystemTime, String)>);
        let states: Vec<Seen> = self
            .healths()
            .map(|h| {
                let s = h.lock();
                (s.synced, s.problem.clone())
            })
            .collect();
        if states
            .iter()
            .any(|(_, p)| matches!(p, Some((Problem::Forbidden, _, _))))
        {
            return "forbidden".into();
        }
        if let Some(since) = states
            .iter()
            .filter_map(|(_, p)| p.as_ref().map(|p| p.1))
            .min()
        {
            return format!("unreachable since {}", rfc3339(since));
        }
        if !states[0].0 {
            return "starting".into();
        }
        if self.workload.info().is_none() {
            return "not found".into();
        }
        "ok".into()
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::from(t))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Where the log of one container was read up to: the last line's timestamp and the lines that
/// carry exactly that timestamp (a later read may return them again).
#[derive(Debug, Default)]
struct LogCursor {
    last: Option<time::OffsetDateTime>,
    at_last: HashSet<String>,
}

/// The log lines of a target's pods: new lines only, at most `max` kept per pod.
#[derive(Debug, Default)]
struct Logs {
    cursors: HashMap<(String, String), LogCursor>,
    kept: BTreeMap<String, VecDeque<LogLine>>,
}

impl Logs {
    /// Takes the lines of `text` (`<timestamp> <line>` each) not taken before.
    fn take(&mut self, pod: &str, container: &str, text: &str, max: usize) {
        let cursor = self
            .cursors
            .entry((pod.into(), container.into()))
            .or_default();
        let kept = self.kept.entry(pod.into()).or_default();
        for line in text.lines() {
            let (stamp, body) = line.split_once(' ').unwrap_or((line, ""));
            let Ok(t) =
                time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
            else {
                continue;
            };
            match cursor.last {
                Some(last) if t < last => continue,
                Some(last) if t == last => {
                    if !cursor.at_last.insert(body.to_string()) {
                        continue;
                    }
                }
                _ => {
                    cursor.last = Some(t);
                    cursor.at_last.clear();
                    cursor.at_last.insert(body.to_string());
                }
            }
            kept.push_back(LogLine {
                pod: pod.into(),
                container: container.into(),
                time: stamp.into(),
                text: body.into(),
            });
            while kept.len() > max {
                kept.pop_front();
            }
        }
    }

    /// Forgets the pods not in `pods`.
    fn retain(&mut self, pods: &HashSet<&str>) {
        self.cursors.retain(|(p, _), _| pods.contains(p.as_str()));
        self.kept.retain(|p, _| pods.contains(p.as_str()));
    }

    fn lines(&self) -> Vec<LogLine> {
        self.kept.values().flat_map(|v| v.iter().cloned()).collect()
    }
}

/// The settings a target's collection runs with; a change restarts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Params {
    pub target: WatchTarget,
    pub interval: Duration,
    pub max_log_lines: u32,
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// Collects `params.target` every interval until `cancel`.
pub(super) async fn run(
    shared: Arc<Shared>,
    params: Params,
    state: Arc<Mutex<TargetState>>,
    cancel: CancellationToken,
) {
    let t = &params.target;
    let key = t.key();
    let mut tick = tokio::time::interval(params.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streams: Option<Streams> = None;
    let mut logs = Logs::default();
    let mut first = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let client = match shared.client(params.kubeconfig.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                let mut st = super::lock(&state);
                if !st.status.starts_with("unreachable") {
                    tracing::warn!(target = %key, "no Kubernetes client: {e}");
                    st.status = format!("unreachable since {}: {e}", rfc3339(SystemTime::now()));
                }
                continue;
            }
        };
        if streams.is_none() {
            let lease = NamespaceLease::take(&shared, &client, &t.namespace);
            streams = Some(Streams::start(
                &client,
                t,
                shared.nodes(&client),
                lease,
                cancel.child_token(),
            ));
        }
        let Some(s) = streams.as_mut() else { continue };
        if first {
            // Give the first lists a moment, so the first snapshot is not empty.
            first = false;
            let wait = params.interval.min(Duration::from_secs(5));
            let until = Instant::now() + wait;
            while Instant::now() < until && s.status() == "starting" {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let workload = s.workload.info();
        if let Some(w) = &workload {
            s.follow_pods(&client, t, &w.selector);
        }
        let mut status = s.status();
        if status.starts_with("unreachable") {
            // Any answer, even an error status, shows the API is back.
            match client.apiserver_version().await {
                Ok(_) | Err(kube::Error::Api(_)) => {
                    s.healths().for_each(|h| h.reachable());
                    status = s.status();
                }
                Err(_) => {}
            }
        }
        let mut pods: Vec<snapshot::PodInfo> = s
            .pods
            .as_ref()
            .map(|p| {
                p.store
                    .state()
                    .iter()
                    .map(|p| snapshot::pod_info(p))
                    .collect()
            })
            .unwrap_or_default();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        let pod_names: HashSet<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        let prefix = format!("{}-", t.deployment);
        let mut events: Vec<snapshot::EventInfo> = s
            .events
            .state()
            .iter()
            .filter(|e| {
                let name = e.involved_object.name.as_deref().unwrap_or("");
                name == t.deployment || pod_names.contains(name) || name.starts_with(&prefix)
            })
            .map(|e| snapshot::event_info(e))
            .collect();
        events.sort_by_key(|e| e.last);
        let skip = events.len().saturating_sub(10);
        events.drain(..skip);
        let hpa = s.hpas.state().iter().find_map(|h| snapshot::hpa_info(h, t));
        let node_names: HashSet<&str> = pods.iter().filter_map(|p| p.node.as_deref()).collect();
        let nodes = s
            .nodes
            .state()
            .iter()
            .filter(|n| {
                n.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| node_names.contains(n))
            })
            .map(|n| snapshot::node_info(n))
            .collect();
        if status == "ok" {
            let api: Api<Pod> = Api::namespaced(client.clone(), &t.namespace);
            let since = i64::try_from(params.interval.as_secs().max(1) * 2 + 5).unwrap_or(i64::MAX);
            for p in pods.iter().filter(|p| p.phase == "Running") {
                for c in &p.containers {
                    let lp = LogParams {
                        container: Some(c.name.clone()),
                        since_seconds: Some(since),
                        tail_lines: Some(i64::from(params.max_log_lines)),
                        timestamps: true,
                        ..LogParams::default()
                    };
                    match api.logs(&p.name, &lp).await {
                        Ok(text) => {
                            logs.take(&p.name, &c.name, &text, params.max_log_lines as usize)
                        }
                        Err(e) => {
                            tracing::debug!(target = %key, pod = %p.name, "logs not read: {e}")
                        }
                    }
                }
            }
        }
        let metrics = match (status == "ok", t.metrics_port, shared.http()) {
            (true, Some(_), Some(http)) => {
                let running: Vec<(String, String)> = pods
                    .iter()
                    .filter(|p| p.phase == "Running")
                    .filter_map(|p| Some((p.name.clone(), p.ip.clone()?)))
                    .collect();
                super::scrape::scrape(&http, t, &running).await
            }
            _ => Vec::new(),
        };
        logs.retain(&pod_names);
        let now = SystemTime::now();
        let snap = Snapshot {
            target: t.clone(),
            taken: Some(now),
            workload,
            pods,
            events,
            hpa,
            nodes,
            logs: logs.lines(),
            metrics,
        };
        shared.record(&key, &state, snap, status, now, started.elapsed());
    }
}

/// Runs the alert rules on a new snapshot and stores it.
pub(super) fn observe(
    state: &mut TargetState,
    snap: Snapshot,
    now: SystemTime,
    window: Duration,
) -> Vec<super::Alert> {
    let raised = match state.snapshot.as_ref() {
        // A target that cannot be read keeps its alerts until they expire.
        _ if state.status != "ok" => {
            state.alerts.expire(now, window);
            Vec::new()
        }
        before => {
            let found = conditions(&snap, before);
            let t = &snap.target;
            state
                .alerts
                .observe(found, now, window, &t.namespace, &t.deployment)
        }
    };
    if state.status == "ok" || state.snapshot.is_none() {
        state.snapshot = Some(snap);
    }
    state.collections.push_back(now);
    while state
        .collections
        .front()
        .is_some_and(|t| now.duration_since(*t).unwrap_or_default() > window)
    {
        state.collections.pop_front();
    }
    raised
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_is_taken_once_across_reads() {
        let mut logs = Logs::default();
        logs.take(
            "p",
            "c",
            "2026-01-01T00:00:01Z one\n2026-01-01T00:00:02Z two\n",
            100,
        );
        // The next read overlaps: the same two lines, a twin of the last second, and a new one.
        logs.take(
            "p",
            "c",
            "2026-01-01T00:00:01Z one\n2026-01-01T00:00:02Z two\n2026-01-01T00:00:02Z two-b\n2026-01-01T00:00:03.5Z three\n",
            100,
        );
        let texts: Vec<String> = logs.lines().into_iter().map(|l| l.text).collect();
        assert_eq!(texts, ["one", "two", "two-b", "three"]);
        logs.take(
            "p",
            "c",
            "2026-01-01T00:00:04Z four\n2026-01-01T00:00:05Z five\n",
            3,
        );
        let texts: Vec<String> = logs.lines().into_iter().map(|l| l.text).collect();
        assert_eq!(texts, ["three", "four", "five"]);
        logs.retain(&HashSet::new());
        assert!(logs.lines().is_empty());
    }
}
