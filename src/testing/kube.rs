//! A fake Kubernetes API server on 127.0.0.1 port 0, driven by the tests: objects are added,
//! changed and deleted as JSON; list and watch behave as the real API does (a list carries the
//! collection's `resourceVersion`; a watch from a version streams the later changes as JSON lines
//! `{"type":"ADDED","object":{…}}`, `BOOKMARK` events when `allowWatchBookmarks=true`, and a watch
//! from a version older than the last compaction gets an `ERROR` event with a `410` status, which
//! forces the client to list again); label and field selectors of the `key=value` form; a
//! namespace can be made forbidden (every request under it answers `403` with a `Status`); pod
//! logs honour `container`, `sinceSeconds`, `tailLines` and `timestamps`. [`FakeKube::stop`]
//! closes every connection and refuses new ones until [`FakeKube::resume`], so a client sees the
//! server go away and come back on the same address.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct KubeRequest {
    /// The path.
    pub path: String,
    /// The raw query.
    pub query: String,
}

impl KubeRequest {
    /// Whether this was a watch (`watch=true`).
    pub fn is_watch(&self) -> bool {
        param(&self.query, "watch").is_some_and(|w| w == "true" || w == "1")
    }
    /// Whether this was a pod log request.
    pub fn is_log(&self) -> bool {
        self.path.ends_with("/log")
    }
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version below this get `410 Gone`.
    compacted: u64,
    forbidden: HashSet<String>,
    /// (namespace, pod, container) → (time, line).
    logs: BTreeMap<(String, String, String), Vec<(SystemTime, String)>>,
    requests: Vec<KubeRequest>,
}

struct Inner {
    state: Mutex<State>,
    /// The latest resource version, for watches waiting for changes.
    version: watch::Sender<u64>,
    /// Bumped to close every open connection.
    kill: watch::Sender<u64>,
    down: std::sync::atomic::AtomicBool,
    bookmark_every: Duration,
}

/// See the module docs.
#[derive(Clone)]
pub struct FakeKube {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FakeKube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKube")
            .field("addr", &self.addr)
            .finish()
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The plural resource name of a kind, as it appears in API paths.
fn plural(kind: &str) -> String {
    match kind {
        "HorizontalPodAutoscaler" => "horizontalpodautoscalers".into(),
        k => format!("{}s", k.to_ascii_lowercase()),
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| decode(v))
}

/// Whether `object` matches a selector of `key=value` terms (labels, or dotted field paths).
fn matches(object: &Value, labels: Option<&str>, fields: Option<&str>) -> bool {
    let terms = |s: Option<&str>| -> Vec<(String, String)> {
        s.unwrap_or("")
            .split(',')
            .filter_map(|t| {
                let (k, v) = t.split_once("==").or_else(|| t.split_once('='))?;
                Some((k.trim().to_string(), v.trim().to_string()))
            })
            .collect()
    };
    let label_ok = terms(labels)
        .iter()
        .all(|(k, v)| object["metadata"]["labels"][k.as_str()].as_str() == Some(v.as_str()));
    let field_ok = terms(fields).iter().all(|(k, v)| {
        let mut node = object;
        for part in k.split('.') {
            node = &node[part];
        }
        node.as_str() == Some(v.as_str())
    });
    label_ok && field_ok
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(code: StatusCode, content_type: &str, body: impl Into<Body>) -> Response<Body> {
    let mut r = Response::new(body.into());
    *r.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn json_reply(code: StatusCode, v: &Value) -> Response<Body> {
    respond(code, "application/json", v.to_string())
}

fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What a request path names.
struct Target {
    resource: String,
    namespace: Option<String>,
    /// `Some(pod)` for `/pods/<pod>/log`.
    log_of: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return None,
    };
    match rest {
        ["namespaces", ns, "pods", pod, "log"] => Some(Target {
            resource: "pods".into(),
            namespace: Some(ns.to_string()),
            log_of: Some(pod.to_string()),
        }),
        ["namespaces", ns, resource] => Some(Target {
            resource: resource.to_string(),
            namespace: Some(ns.to_string()),
            log_of: None,
        }),
        [resource] => Some(Target {
            resource: resource.to_string(),
            namespace: None,
            log_of: None,
        }),
        _ => None,
    }
}

impl FakeKube {
    /// Starts the fake on 127.0.0.1 port 0; watches get a bookmark every second.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Duration::from_secs(1)).await
    }

    /// Starts the fake with a bookmark every `bookmark_every`.
    pub async fn start_with(bookmark_every: Duration) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            version: watch::Sender::new(1),
            kill: watch::Sender::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
            bookmark_every,
        });
        let fake = Self { addr, inner };
        let server = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                if server.inner.down.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(socket);
                    continue;
                }
                let server = server.clone();
                tokio::spawn(async move {
                    let mut kill = server.inner.kill.subscribe();
                    let svc = {
                        let server = server.clone();
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let server = server.clone();
                            async move { Ok::<_, Infallible>(server.handle(req)) }
                        })
                    };
                    let io = hyper_util::rt::TokioIo::new(socket);
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let conn = builder.serve_connection(io, svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = kill.changed() => {}
                    }
                });
            }
        });
        Ok(fake)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at the fake, as YAML.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url()
        )
    }

    /// Adds or replaces an object (by kind, namespace and name); `metadata.resourceVersion`,
    /// `uid` and `creationTimestamp` are filled in.
    pub fn apply(&self, mut object: Value) {
        let kind = object["kind"].as_str().unwrap_or("").to_string();
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let resource = plural(&kind);
        let mut st = lock(&self.inner.state);
        st.rv += 1;
        let rv = st.rv;
        let key = (resource.clone(), ns.clone(), name.clone());
        let existed = st.objects.get(&key).cloned();
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta["uid"].is_null() {
            meta["uid"] = match &existed {
                Some(old) => old["metadata"]["uid"].clone(),
                None => json!(format!("uid-{resource}-{ns}-{name}")),
            };
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
        }
        st.objects.insert(key, object.clone());
        st.history.push(Change {
            rv,
            resource,
            namespace: ns,
            kind: if existed.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            object,
        });
        drop(st);
        self.inner.version.send_replace(rv);
    }

    /// Deletes an object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let resource = plural(kind);
        let mut st = lock(&self.inner.state);
        let Some(mut object) =
            st.objects
                .remove(&(resource.clone(), namespace.into(), name.into()))
        else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(Change {
            rv,
            resource,
            namespace: namespace.into(),
            kind: "DELETED",
            object,
        });
        drop(st);
        self.inner.version.send_replace(rv);
    }

    /// Answers `403 Forbidden` to every request under `namespace`.
    pub fn forbid_namespace(&self, namespace: &str) {
        lock(&self.inner.state).forbidden.insert(namespace.into());
    }

    /// Adds a log line of `pod`'s `container`, stamped now.
    pub fn log(&self, namespace: &str, pod: &str, container: &str, line: &str) {
        lock(&self.inner.state)
            .logs
            .entry((namespace.into(), pod.into(), container.into()))
            .or_default()
            .push((SystemTime::now(), line.into()));
    }

    /// Forgets the history: a watch resuming from a version before now gets `410 Gone`; open
    /// watches are closed so that their clients resume (and relist).
    pub fn expire_watches(&self) {
        let mut st = lock(&self.inner.state);
        st.compacted = st.rv + 1;
        st.history.clear();
        drop(st);
        self.inner.kill.send_modify(|k| *k += 1);
    }

    /// Closes every connection and refuses new ones until [`FakeKube::resume`].
    pub fn stop(&self) {
        self.inner
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.kill.send_modify(|k| *k += 1);
    }

    /// Serves again after [`FakeKube::stop`].
    pub fn resume(&self) {
        self.inner
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<KubeRequest> {
        lock(&self.inner.state).requests.clone()
    }

    /// The requests received since the last call (or the start), forgetting them: a long
    /// measurement reads them as it goes, so the request log does not grow.
    pub fn take_requests(&self) -> Vec<KubeRequest> {
        std::mem::take(&mut lock(&self.inner.state).requests)
    }

    fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let mut st = lock(&self.inner.state);
        st.requests.push(KubeRequest {
            path: path.clone(),
            query: query.clone(),
        });
        let Some(target) = parse_path(&path) else {
            return json_reply(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        };
        if let Some(ns) = &target.namespace
            && st.forbidden.contains(ns)
        {
            let message = format!(
                "{} is forbidden: User \"system:serviceaccount:chatcli:chatcli\" cannot list resource \"{}\" in the namespace \"{ns}\"",
                target.resource, target.resource
            );
            return json_reply(StatusCode::FORBIDDEN, &status(403, "Forbidden", &message));
        }
        if let Some(pod) = &target.log_of {
            let ns = target.namespace.clone().unwrap_or_default();
            return self.logs(&st, &ns, pod, &query);
        }
        let labels = param(&query, "labelSelector");
        let fields = param(&query, "fieldSelector");
        let selected = |resource: &str, ns: &str, object: &Value| {
            resource == target.resource
                && target.namespace.as_deref().is_none_or(|n| n == ns)
                && matches(object, labels.as_deref(), fields.as_deref())
        };
        let watching = param(&query, "watch").is_some_and(|w| w == "true" || w == "1");
        if !watching {
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((r, ns, _), o)| selected(r, ns, o))
                .map(|(_, o)| o.clone())
                .collect();
            let body = json!({"kind": "List", "apiVersion": "v1",
                              "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
            return json_reply(StatusCode::OK, &body);
        }
        let from: u64 = param(&query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(st.rv);
        if from < st.compacted {
            let line = json!({"type": "ERROR", "object": status(410, "Expired",
                &format!("too old resource version: {from} ({})", st.compacted))});
            return respond(StatusCode::OK, "application/json", format!("{line}\n"));
        }
        drop(st);
        let bookmarks = param(&query, "allowWatchBookmarks").is_some_and(|b| b == "true");
        let timeout = param(&query, "timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(290));
        let me = self.clone();
        let resource = target.resource.clone();
        let namespace = target.namespace.clone();
        let stream = async_stream::stream! {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut version = me.inner.version.subscribe();
            let mut last = from;
            loop {
                let (lines, now) = {
                    let st = lock(&me.inner.state);
                    let lines: Vec<String> = st
                        .history
                        .iter()
                        .filter(|c| c.rv > last && c.resource == resource
                            && namespace.as_deref().is_none_or(|n| n == c.namespace)
                            && matches(&c.object, labels.as_deref(), fields.as_deref()))
                        .map(|c| json!({"type": c.kind, "object": c.object}).to_string())
                        .collect();
                    (lines, st.rv)
                };
                last = now;
                for l in lines {
                    yield Ok::<_, Infallible>(Bytes::from(format!("{l}\n")));
                }
                let wait = tokio::time::timeout(me.inner.bookmark_every, version.changed());
                match tokio::time::timeout_at(deadline, wait).await {
                    Err(_) => break,
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(_))) => break,
                    Ok(Err(_)) if bookmarks => {
                        let mark = json!({"type": "BOOKMARK", "object": {"kind": "Bookmark",
                            "apiVersion": "v1", "metadata": {"resourceVersion": last.to_string()}}});
                        yield Ok(Bytes::from(format!("{mark}\n")));
                    }
                    Ok(Err(_)) => {}
                }
            }
        };
        respond(
            StatusCode::OK,
            "application/json",
            Body::from_stream(stream),
        )
    }

    fn logs(&self, st: &State, ns: &str, pod: &str, query: &str) -> Response<Body> {
        if !st
            .objects
            .contains_key(&("pods".into(), ns.into(), pod.into()))
        {
            return json_reply(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("pods \"{pod}\" not found")),
            );
        }
        let container = param(query, "container").unwrap_or_default();
        let since = param(query, "sinceSeconds")
            .and_then(|s| s.parse::<u64>().ok())
            .map(|s| SystemTime::now() - Duration::from_secs(s));
        let tail = param(query, "tailLines").and_then(|s| s.parse::<usize>().ok());
        let timestamps = param(query, "timestamps").is_some_and(|t| t == "true");
        let lines: Vec<&(SystemTime, String)> = st
            .logs
            .iter()
            .filter(|((n, p, c), _)| {
                n == ns && p == pod && (container.is_empty() || *c == container)
            })
            .flat_map(|(_, l)| l.iter())
            .filter(|(t, _)| since.is_none_or(|s| *t >= s))
            .collect();
        let skip = tail.map_or(0, |n| lines.len().saturating_sub(n));
        let mut body = String::new();
        for (t, line) in &lines[skip..] {
            if timestamps {
                body.push_str(&rfc3339(*t));
                body.push(' ');
            }
            body.push_str(line);
            body.push('\n');
        }
        respond(StatusCode::OK, "text/plain", body)
    }
}

/// A Deployment named `name` in `ns` with `replicas` desired, `ready` ready, pods labelled
/// `app=<name>`.
pub fn deployment(ns: &str, name: &str, replicas: i32, ready: i32) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": "app:1"}]}}},
        "status": {"replicas": replicas, "readyReplicas": ready, "availableReplicas": ready,
                   "updatedReplicas": replicas}})
}

/// A running pod of `app` with one container `app`, ready or not, with `restarts` restarts.
pub fn pod(ns: &str, name: &str, app: &str, ready: bool, restarts: i32) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{"name": "app", "image": "app:1", "imageID": "", "ready": ready,
                "restartCount": restarts, "started": true, "state": {"running": {}}}]}})
}

/// A Warning event about `object` (a pod or workload name) in `ns`.
pub fn event(
    ns: &str,
    name: &str,
    object_kind: &str,
    object: &str,
    reason: &str,
    message: &str,
) -> Value {
    json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": ns},
        "involvedObject": {"kind": object_kind, "name": object, "namespace": ns},
        "reason": reason, "message": message, "type": "Warning", "count": 1,
        "lastTimestamp": rfc3339(SystemTime::now())})
}

/// A pod's Prometheus endpoint on 127.0.0.1 port 0 answering `text` at every path; returns its
/// port and a counter of the scrapes it answered.
pub async fn serve_metrics(
    text: &'static str,
) -> std::io::Result<(u16, Arc<std::sync::atomic::AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move { text }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((port, hits))
}

/// A node with the given conditions set to `True` besides `Ready` (`ready` says which).
pub fn node(name: &str, ready: bool, pressures: &[&str]) -> Value {
    let mut conditions =
        vec![json!({"type": "Ready", "status": if ready { "True" } else { "False" }})];
    conditions.extend(
        pressures
            .iter()
            .map(|p| json!({"type": p, "status": "True"})),
    );
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {}, "status": {"conditions": conditions, "capacity": {"pods": "110"}}})
}

/// A Job with `failed` failed pods.
pub fn job(ns: &str, name: &str, failed: i32) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": ns},
        "spec": {"template": {"spec": {"containers": [{"name": "job", "image": "job:1"}], "restartPolicy": "Never"}}},
        "status": {"failed": failed}})
}

/// A CronJob last scheduled `ago` before now.
pub fn cronjob(ns: &str, name: &str, ago: Duration) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name, "namespace": ns},
        "spec": {"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": {"spec":
            {"containers": [{"name": "job", "image": "job:1"}], "restartPolicy": "Never"}}}}},
        "status": {"lastScheduleTime": rfc3339(SystemTime::now() - ago)}})
}

/// An `autoscaling/v2` HPA of the Deployment `target` wanting `desired` replicas.
pub fn hpa(ns: &str, target: &str, current: i32, desired: i32) -> Value {
    json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": target, "namespace": ns},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                 "minReplicas": 1, "maxReplicas": 10},
        "status": {"currentReplicas": current, "desiredReplicas": desired}})
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    async fn get(url: &str) -> (u16, String) {
        let client = reqwest::Client::builder().build().unwrap();
        let r = client.get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn lists_watches_expires_forbids_and_serves_logs() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let k = FakeKube::start_with(Duration::from_millis(100))
            .await
            .unwrap();
        k.apply(pod("prod", "api-1", "api", true, 0));
        k.apply(pod("prod", "web-1", "web", true, 0));
        let (code, body) = get(&format!(
            "{}/api/v1/namespaces/prod/pods?labelSelector=app%3Dapi",
            k.url()
        ))
        .await;
        assert_eq!(code, 200);
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();

        // A watch from the list's version sees the later change and bookmarks.
        let k2 = k.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            k2.apply(pod("prod", "api-1", "api", false, 1));
        });
        let (_, body) = get(&format!(
            "{}/api/v1/namespaces/prod/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1&labelSelector=app%3Dapi",
            k.url()
        ))
        .await;
        let events: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events[0]["type"], "MODIFIED");
        assert_eq!(
            events[0]["object"]["status"]["containerStatuses"][0]["restartCount"],
            1
        );
        assert!(events.iter().any(|e| e["type"] == "BOOKMARK"), "{body}");

        k.expire_watches();
        let (_, body) = get(&format!(
            "{}/api/v1/namespaces/prod/pods?watch=true&resourceVersion={rv}",
            k.url()
        ))
        .await;
        assert!(body.contains("\"code\":410"), "{body}");

        k.forbid_namespace("secret");
        let (code, body) = get(&format!(
            "{}/apis/apps/v1/namespaces/secret/deployments",
            k.url()
        ))
        .await;
        assert_eq!(code, 403);
        assert!(body.contains("Forbidden"));

        k.log("prod", "api-1", "app", "one");
        k.log("prod", "api-1", "app", "two");
        k.log("prod", "api-1", "app", "three");
        let (_, body) = get(&format!(
            "{}/api/v1/namespaces/prod/pods/api-1/log?container=app&tailLines=2&sinceSeconds=60",
            k.url()
        ))
        .await;
        assert_eq!(body, "two\nthree\n");

        k.stop();
        let client = reqwest::Client::new();
        assert!(client.get(k.url() + "/api/v1/nodes").send().await.is_err());
        k.resume();
        assert_eq!(get(&(k.url() + "/api/v1/nodes")).await.0, 200);
    }
}
