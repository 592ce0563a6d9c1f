//! Test support: fake LLM upstreams on 127.0.0.1 port 0 that answer in a provider's wire format and,
//! on command, stream with pauses, stall until released (before the headers, or after them and
//! before or between body bytes), drop the connection mid-stream, answer with an error status (429
//! with `Retry-After`, 5xx, 401, 403, 404) or with garbage, answer requests that match a rule (a
//! model, a key) always the same way, and list models. Unit tests, the integration tests and the
//! benchmark mock use them; nothing here runs in the daemon.
//!
//! One engine ([`FakeUpstream`]) serves every format; a [`WireFormat`] turns text into that format's
//! bytes and may answer side routes itself (token endpoints, model lists).

pub mod anthropic;
pub mod gemini;
pub mod kube;
pub mod mcp;
pub mod ollama;
pub mod openai;
pub mod redis;
pub mod stackspot;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::sync::Notify;

use crate::llm::Usage;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// The request target as received: absolute (`http://host/path`) when a proxy client sent it.
    pub target: String,
    /// HTTP version.
    pub version: http::Version,
    /// The raw query string ("" when none).
    pub query: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The client's address: requests on one connection share it.
    pub peer: Option<SocketAddr>,
}

impl Recorded {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
    /// The model the request asks for: the body's `model` (OpenAI, Anthropic, Ollama), else the
    /// `models/<model>:<method>` part of the path (Gemini).
    pub fn model(&self) -> Option<String> {
        if let Some(m) = self.json().get("model").and_then(serde_json::Value::as_str) {
            return Some(m.to_string());
        }
        let rest = &self.path[self.path.find("/models/")? + "/models/".len()..];
        Some(rest.split(':').next().unwrap_or(rest).to_string())
    }
}

impl Recorded {
    /// The first value of the query parameter `key` (percent-decoding left out: the fakes use
    /// plain values).
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

/// A 200 with a JSON body.
pub fn json_response(v: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(v.to_string()))
        .unwrap_or_default()
}

/// How many models a paginated fake model list returns per page, whatever the client asks: small,
/// so that clients have to follow the pages.
pub const MODEL_PAGE: usize = 2;

/// Which requests a [`FakeUpstream::when`] rule answers.
pub type Matcher = Box<dyn Fn(&Recorded) -> bool + Send + Sync>;

/// How one wire format writes answers.
pub trait WireFormat: Send + Sync + 'static {
    /// Whether the request asks for a streamed answer.
    fn wants_stream(&self, req: &Recorded) -> bool;
    /// Content type of a streamed answer.
    fn stream_content_type(&self) -> &'static str;
    /// The bytes of one streamed delta (`index` counts from 0).
    fn stream_piece(&self, text: &str, index: usize) -> Bytes;
    /// The bytes that end a complete stream (finish reason, usage, terminator).
    fn stream_end(&self, usage: Option<Usage>) -> Bytes;
    /// A whole answer: content type and body.
    fn unary(&self, text: &str, usage: Option<Usage>) -> (&'static str, Bytes);
    /// Requests the format answers itself (token endpoints, model lists); `None` = use the script.
    fn extra(&self, _req: &Recorded) -> Option<Response<Body>> {
        None
    }
    /// When `req` asks for the format's model list: the answer listing `models` (set with
    /// [`FakeUpstream::set_models`]). `None` for other requests, and for formats without one.
    fn model_list(&self, _req: &Recorded, _models: &[String]) -> Option<Response<Body>> {
        None
    }
}

/// One step of a scripted answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// A delta of text.
    Text(String),
    /// Wait this long.
    Pause(Duration),
    /// Wait until [`FakeUpstream::release`] is called.
    AwaitRelease,
    /// Abort the connection here (no clean end of the stream).
    Drop,
    /// Raw bytes written into the stream as they are (for malformed events).
    Raw(String),
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// An answer, streamed or whole depending on the request; `usage` is reported at the end.
    Answer {
        /// The steps.
        steps: Vec<Step>,
        /// Token usage to report.
        usage: Option<Usage>,
    },
    /// An error status with a body (in the format's error shape, written by the test).
    Error {
        /// HTTP status.
        status: u16,
        /// Body (JSON text usually).
        body: String,
        /// `Retry-After` header value.
        retry_after: Option<String>,
    },
    /// A 200 with any content type and body (garbage, wrong protocol).
    Raw {
        /// Content type.
        content_type: String,
        /// Body.
        body: String,
    },
    /// A 200 with this content type whose headers go out at once, then a body written step by
    /// step ([`Step::Text`] and [`Step::Raw`] as they are), so a test can stall an answer after its
    /// headers, before or between body bytes, whether the client asked for a stream or not.
    Body {
        /// Content type.
        content_type: String,
        /// The body's bytes and pauses.
        steps: Vec<Step>,
    },
}

impl Reply {
    /// An answer whose deltas are the words of `text` (each keeps its leading space).
    pub fn text(text: &str) -> Self {
        Self::Answer {
            steps: crate::llm::EchoProvider::words_of(text)
                .into_iter()
                .map(Step::Text)
                .collect(),
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: crate::llm::EchoProvider::words_of(text).len() as u64,
            }),
        }
    }

    /// An answer made of these steps, with usage.
    pub fn steps(steps: Vec<Step>) -> Self {
        Self::Answer {
            steps,
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            }),
        }
    }

    /// An error status with a JSON body.
    pub fn error(status: u16, body: &str) -> Self {
        Self::Error {
            status,
            body: body.to_string(),
            retry_after: None,
        }
    }

    /// [`Reply::Body`] with this content type.
    pub fn body(content_type: &str, steps: Vec<Step>) -> Self {
        Self::Body {
            content_type: content_type.to_string(),
            steps,
        }
    }

    /// A 429 with `Retry-After: <secs>`.
    pub fn rate_limited(body: &str, retry_after_secs: u64) -> Self {
        Self::Error {
            status: 429,
            body: body.to_string(),
            retry_after: Some(retry_after_secs.to_string()),
        }
    }
}

struct Shared {
    format: Box<dyn WireFormat>,
    script: Mutex<VecDeque<Reply>>,
    /// Replies for requests matching a rule, before the script; the first match wins.
    rules: Mutex<Vec<(Matcher, Reply)>>,
    /// What the format's model list route lists.
    models: Mutex<Vec<String>>,
    fallback: Mutex<Reply>,
    requests: Mutex<Vec<Recorded>>,
    release: Notify,
    released: AtomicUsize,
    cancelled: AtomicUsize,
    cancelled_notify: Notify,
    /// How long a streamed body stays open after its last event (see [`FakeUpstream::set_end_delay`]).
    end_delay: Mutex<Duration>,
}

/// A fake upstream server. Dropping it stops the server.
pub struct FakeUpstream {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeUpstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeUpstream {
    /// Starts a fake speaking `format`; unscripted requests get `Reply::text("hello from the fake")`.
    pub async fn start(format: impl WireFormat) -> std::io::Result<Self> {
        Self::start_with(format, None).await
    }

    /// Starts a fake served over TLS with `cert_pem`/`key_pem` (PKCS#8), offering HTTP/2 and
    /// HTTP/1.1 by ALPN; [`FakeUpstream::base_url`] then says `https://localhost:<port>`.
    pub async fn start_tls(
        format: impl WireFormat,
        cert_pem: &str,
        key_pem: &str,
    ) -> std::io::Result<Self> {
        use rustls_pki_types::pem::PemObject;
        let bad = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| bad(&e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(&e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::start_with(
            format,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn start_with(
        format: impl WireFormat,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            format: Box::new(format),
            script: Mutex::new(VecDeque::new()),
            rules: Mutex::new(Vec::new()),
            models: Mutex::new(Vec::new()),
            fallback: Mutex::new(Reply::text("hello from the fake")),
            requests: Mutex::new(Vec::new()),
            release: Notify::new(),
            released: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            cancelled_notify: Notify::new(),
            end_delay: Mutex::new(Duration::ZERO),
        });
        let s = shared.clone();
        let app =
            axum::Router::new().fallback(move |req: http::Request<Body>| handle(s.clone(), req));
        let tls_on = tls.is_some();
        let task = match tls {
            None => tokio::spawn(async move {
                let app = app.into_make_service_with_connect_info::<SocketAddr>();
                let _ = axum::serve(listener, app).await;
            }),
            Some(acceptor) => tokio::spawn(serve_tls(listener, acceptor, app)),
        };
        Ok(Self {
            addr,
            tls: tls_on,
            shared,
            task,
        })
    }

    /// `http://127.0.0.1:<port>`, or `https://localhost:<port>` for a TLS fake.
    pub fn base_url(&self) -> String {
        match self.tls {
            false => format!("http://{}", self.addr),
            true => format!("https://localhost:{}", self.addr.port()),
        }
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues the reply for the next scripted request.
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.script).push_back(reply);
    }

    /// The reply used when the queue is empty.
    pub fn set_default(&self, reply: Reply) {
        *lock(&self.shared.fallback) = reply;
    }

    /// Answers every request that `matches` with `reply` (before the script, which it leaves
    /// alone, and before the format's own routes: token endpoints, model lists). Rules are tried
    /// in the order they were added.
    pub fn when(&self, matches: impl Fn(&Recorded) -> bool + Send + Sync + 'static, reply: Reply) {
        lock(&self.shared.rules).push((Box::new(matches), reply));
    }

    /// Answers every request for `model` ([`Recorded::model`]) with `reply`.
    pub fn on_model(&self, model: &str, reply: Reply) {
        let model = model.to_string();
        self.when(move |r| r.model().as_deref() == Some(model.as_str()), reply);
    }

    /// The models the format's model list route lists (`GET /v1/models`, `/api/tags`, …).
    pub fn set_models(&self, models: &[&str]) {
        *lock(&self.shared.models) = models.iter().map(|m| m.to_string()).collect();
    }

    /// Every request received so far (side routes included).
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Keeps each streamed body open this long after its last event, so the body's end (the
    /// chunked terminator) reaches the client in a later read, as it may from a real upstream.
    pub fn set_end_delay(&self, delay: Duration) {
        *lock(&self.shared.end_delay) = delay;
    }

    /// Lets every stream waiting at [`Step::AwaitRelease`] (now or later) go on.
    pub fn release(&self) {
        self.shared.released.fetch_add(1, Ordering::SeqCst);
        self.shared.release.notify_waiters();
    }

    /// Asserts that a client keeps its connection for the next call after an answer read to its
    /// last event, even when the body's end comes later (see [`FakeUpstream::set_end_delay`]):
    /// runs `call` twice (each answer to its end, without errors; a moment between them for the
    /// client to finish reading the first body) and compares the client addresses of the two
    /// requests whose path ends with `path_suffix`.
    pub async fn assert_two_answers_share_a_connection<S>(
        &self,
        path_suffix: &str,
        call: impl Fn() -> S,
    ) where
        S: futures::Stream<Item = Result<crate::llm::Delta, crate::llm::LlmError>>,
    {
        use futures::StreamExt;
        self.set_end_delay(Duration::from_millis(30));
        for round in 0..2 {
            let items: Vec<_> = call().collect().await;
            assert!(
                !items.is_empty() && items.iter().all(Result::is_ok),
                "answer {round}: {items:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let peers: Vec<_> = self
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with(path_suffix))
            .map(|r| r.peer)
            .collect();
        assert_eq!(peers.len(), 2, "{peers:?}");
        assert!(
            peers[0].is_some(),
            "the fake did not record the client address"
        );
        assert_eq!(
            peers[0], peers[1],
            "the second call came on a new connection: the first was not kept"
        );
    }

    /// How many answers were abandoned by the client before their end.
    pub fn cancelled(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` answers were abandoned by the client, up to `timeout`.
    pub async fn wait_cancelled(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.cancelled_notify.notified();
            if self.cancelled() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.cancelled() >= n;
            }
        }
    }
}

/// The accept loop of a TLS fake: a handshake per connection, then HTTP/1.1 or HTTP/2.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
) {
    while let Ok((tcp, peer)) = listener.accept().await {
        let acceptor = acceptor.clone();
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

async fn handle(shared: Arc<Shared>, req: http::Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let rec = Recorded {
        method: parts.method,
        path: parts.uri.path().to_string(),
        target: parts.uri.to_string(),
        version: parts.version,
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        body,
        peer,
    };
    lock(&shared.requests).push(rec.clone());
    let ruled = lock(&shared.rules)
        .iter()
        .find(|(matches, _)| matches(&rec))
        .map(|(_, reply)| reply.clone());
    if ruled.is_none() {
        if let Some(resp) = shared.format.extra(&rec) {
            return resp;
        }
        let listed = lock(&shared.models).clone();
        if let Some(resp) = shared.format.model_list(&rec, &listed) {
            return resp;
        }
    }
    let reply = ruled.unwrap_or_else(|| {
        lock(&shared.script)
            .pop_front()
            .unwrap_or_else(|| lock(&shared.fallback).clone())
    });
    match reply {
        Reply::Error {
            status,
            body,
            retry_after,
        } => {
            let mut b = Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(r) = retry_after {
                b = b.header(http::header::RETRY_AFTER, r);
            }
            b.body(Body::from(body)).unwrap_or_default()
        }
        Reply::Raw { content_type, body } => Response::builder()
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap_or_default(),
        Reply::Body {
            content_type,
            steps,
        } => raw_body(shared, content_type, steps),
        Reply::Answer { steps, usage } if shared.format.wants_stream(&rec) => {
            stream_answer(shared, steps, usage)
        }
        Reply::Answer { steps, usage } => {
            let mut text = String::new();
            let mut guard = CancelGuard::new(shared.clone());
            for step in steps {
                match step {
                    Step::Text(t) | Step::Raw(t) => text.push_str(&t),
                    Step::Pause(d) => tokio::time::sleep(d).await,
                    Step::AwaitRelease => await_release(&shared).await,
                    Step::Drop => {
                        guard.finished = true;
                        return drop_connection();
                    }
                }
            }
            guard.finished = true;
            let (ct, body) = shared.format.unary(&text, usage);
            Response::builder()
                .header(http::header::CONTENT_TYPE, ct)
                .body(Body::from(body))
                .unwrap_or_default()
        }
    }
}

async fn await_release(shared: &Shared) {
    let seen = shared.released.load(Ordering::SeqCst);
    loop {
        let notified = shared.release.notified();
        if shared.released.load(Ordering::SeqCst) > seen {
            return;
        }
        notified.await;
    }
}

/// Counts an answer abandoned by the client: dropped before it was marked finished.
struct CancelGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl CancelGuard {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            finished: false,
        }
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
            self.shared.cancelled_notify.notify_waiters();
        }
    }
}

fn drop_connection() -> Response<Body> {
    let s = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("fake drops the connection"))
    });
    Response::builder()
        .body(Body::from_stream(s))
        .unwrap_or_default()
}

/// A 200 whose headers go out now and whose body is `steps`, byte for byte.
fn raw_body(shared: Arc<Shared>, content_type: String, steps: Vec<Step>) -> Response<Body> {
    Response::builder()
        .header(http::header::CONTENT_TYPE, content_type)
        .body(play(shared, steps, false, None))
        .unwrap_or_default()
}

fn stream_answer(shared: Arc<Shared>, steps: Vec<Step>, usage: Option<Usage>) -> Response<Body> {
    let ct = shared.format.stream_content_type();
    let end = shared.format.stream_end(usage);
    let body = play(shared, steps, true, Some(end));
    Response::builder()
        .header(http::header::CONTENT_TYPE, ct)
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_default()
}

/// Plays `steps` as a response body: text as the wire format's stream pieces (`formatted`) or as
/// it is, raw bytes, pauses, releases and drops; then `end` and the fake's end delay, if `end` is
/// given. A body dropped before it finished counts as a cancel.
fn play(shared: Arc<Shared>, steps: Vec<Step>, formatted: bool, end: Option<Bytes>) -> Body {
    Body::from_stream(async_stream::stream! {
        let mut guard = CancelGuard::new(shared.clone());
        let mut index = 0;
        for step in steps {
            match step {
                Step::Text(t) if formatted => {
                    yield Ok::<Bytes, std::io::Error>(shared.format.stream_piece(&t, index));
                    index += 1;
                }
                Step::Text(t) | Step::Raw(t) => yield Ok(Bytes::from(t)),
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::AwaitRelease => await_release(&shared).await,
                Step::Drop => {
                    guard.finished = true;
                    // Let what was written reach the client first: hyper may still hold the
                    // headers and the last piece in its buffer, and an error discards them.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    yield Err(std::io::Error::other("fake drops the connection"));
                    return;
                }
            }
        }
        let Some(end) = end else {
            guard.finished = true;
            return;
        };
        yield Ok(end);
        guard.finished = true;
        let end_delay = *lock(&shared.end_delay);
        if !end_delay.is_zero() {
            tokio::time::sleep(end_delay).await;
        }
    })
}
