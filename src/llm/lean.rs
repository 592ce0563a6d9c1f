//! The lean upstream client: hyper's HTTP/1.1 and HTTP/2 client connections over rustls, pooled
//! per origin by us.
//!
//! hyper-util's pooled client (which reqwest wraps too) keys its pool by scheme and authority and
//! hashes that key, byte by byte with SipHash, on every checkout and every return, formats the
//! `Host` header on every call, and spawns a task per HTTP/1 call to wait until the connection can
//! take the next request. Here a provider holds its origin's pool directly ([`Lean`]), the `Host`
//! header is built once, and an HTTP/1 connection goes back to its pool when the answer's body ends
//! ([`PooledBody`]); the next call waits for it to be ready, if it is not yet. Providers calling
//! the same origin share one pool ([`for_origin`]).
//!
//! What the pooled client did that still holds: HTTP/2 when the TLS handshake negotiates it (one
//! connection, multiplexed), HTTP/1.1 otherwise (one call per connection at a time, idle ones
//! reused newest first and dropped after [`IDLE_TIMEOUT`]); TCP_NODELAY; a 10 s connect timeout;
//! the same rustls platform verifier as reqwest; and a request that a reused connection refused
//! before sending any of it (the upstream closed it meanwhile) is sent again on another.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::error::LlmError;
use super::http::{CONNECT_TIMEOUT, IDLE_TIMEOUT};

/// The body of a lean request: a JSON document in memory.
pub type LeanBody = http_body_util::Full<Bytes>;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The lean client of one origin (scheme, host and port). Cloning shares the pool.
#[derive(Clone)]
pub struct Lean {
    origin: Arc<Origin>,
}

impl std::fmt::Debug for Lean {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lean({})", self.origin.target)
    }
}

struct Origin {
    connector: Connector,
    /// `scheme://authority/`: what the connector connects to.
    target: Uri,
    /// The `Host` header of HTTP/1 requests.
    host: HeaderValue,
    /// Idle HTTP/1 connections, oldest first.
    idle: Mutex<VecDeque<Idle>>,
    /// How long an idle connection is kept ([`IDLE_TIMEOUT`]).
    idle_timeout: Duration,
    /// Whether a task is dropping the idle connections that outlived `idle_timeout`.
    reaping: std::sync::atomic::AtomicBool,
    /// The HTTP/2 connection, when the origin negotiated HTTP/2.
    h2: Mutex<Option<http2::SendRequest<LeanBody>>>,
}

struct Idle {
    tx: http1::SendRequest<LeanBody>,
    since: Instant,
}

/// A connection ready for one request.
enum Conn {
    /// HTTP/1, and whether it served a call before.
    H1(http1::SendRequest<LeanBody>, bool),
    H2(http2::SendRequest<LeanBody>),
}

/// Why a lean call failed before its answer's head arrived.
#[derive(Debug)]
pub enum Failure {
    /// No connection: DNS, TCP, or the TLS handshake.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The request could not be sent or its answer's head not read.
    Request(hyper::Error),
}

impl Failure {
    /// The error itself, for walking its causes.
    pub fn error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Failure::Connect(e) => e.as_ref(),
            Failure::Request(e) => e,
        }
    }
}

/// The lean client for `uri`'s origin, or `None` when the environment sets a proxy (then reqwest,
/// which honours it, must carry the calls). Providers calling the same origin get the same pool,
/// also across reloads while an old provider still holds it.
pub fn for_origin(uri: &Uri) -> Result<Option<Lean>, LlmError> {
    static CONNECTOR: OnceLock<Result<Option<Connector>, LlmError>> = OnceLock::new();
    static ORIGINS: OnceLock<Mutex<HashMap<String, Weak<Origin>>>> = OnceLock::new();
    let connector =
        CONNECTOR.get_or_init(
            || match super::http::env_proxy_set(|k| std::env::var(k).ok()) {
                true => Ok(None),
                false => connector().map(Some),
            },
        );
    let Some(connector) = connector.clone()? else {
        return Ok(None);
    };
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Lean::unshared(connector, uri).map(Some); // refuses it
    };
    let key = format!("{scheme}://{}", authority.as_str().to_ascii_lowercase());
    let mut origins = ORIGINS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(origin) = origins.get(&key).and_then(Weak::upgrade) {
        return Ok(Some(Lean { origin }));
    }
    origins.retain(|_, o| o.strong_count() > 0);
    let lean = Lean::unshared(connector, uri)?;
    origins.insert(key, Arc::downgrade(&lean.origin));
    Ok(Some(lean))
}

impl Lean {
    /// A lean client of `uri`'s origin with a pool of its own.
    fn unshared(connector: Connector, uri: &Uri) -> Result<Lean, LlmError> {
        let bad = |e: &dyn std::fmt::Display| LlmError::InvalidRequest(format!("`{uri}`: {e}"));
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(bad(&"not an absolute URL"));
        };
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| bad(&e))?;
        // The port is left out where it is the scheme's default, as hyper-util did.
        let default_port = match scheme.as_str() {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        let host = match authority.port_u16() {
            Some(p) if Some(p) != default_port => format!("{}:{p}", authority.host()),
            _ => authority.host().to_string(),
        };
        let origin = Arc::new(Origin {
            connector,
            target,
            host: HeaderValue::from_str(&host).map_err(|e| bad(&e))?,
            idle: Mutex::default(),
            idle_timeout: IDLE_TIMEOUT,
            reaping: Default::default(),
            h2: Mutex::default(),
        });
        Ok(Lean { origin })
    }

    /// A lean client of `uri`'s origin whatever the environment's proxy variables say, with a
    /// pool of its own.
    #[cfg(test)]
    pub fn direct(uri: &Uri) -> Result<Lean, LlmError> {
        Lean::unshared(connector()?, uri)
    }
}

fn connector() -> Result<Connector, LlmError> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let fail = |e: &dyn std::fmt::Display| {
        LlmError::InvalidRequest(format!("cannot build an HTTP client: {e}"))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(&e))?
        .with_platform_verifier()
        .map_err(|e| fail(&e))?
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    tcp.enforce_http(false);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(tcp))
}

impl Lean {
    /// Sends `req` (an absolute URI of this origin) and returns the answer once its head arrived.
    pub async fn request(
        &self,
        mut req: Request<LeanBody>,
    ) -> Result<Response<PooledBody>, Failure> {
        let uri = req.uri().clone();
        // A request goes out again only when a connection gave it back unsent; a few times at
        // most, so an origin that takes connections and drops them at once cannot loop us.
        let mut retries = 3;
        loop {
            retries -= 1;
            match self.origin.checkout().await? {
                Conn::H2(mut tx) => {
                    return match tx.try_send_request(req).await {
                        Ok(resp) => Ok(resp.map(|body| PooledBody { body, back: None })),
                        Err(mut e) => match e.take_message() {
                            // The connection went away before taking the request (it is closed
                            // now, so the next checkout passes it over).
                            Some(back) if retries > 0 => {
                                req = back;
                                continue;
                            }
                            _ => Err(Failure::Request(e.into_error())),
                        },
                    };
                }
                Conn::H1(mut tx, reused) => {
                    *req.uri_mut() = origin_form(&uri);
                    req.headers_mut()
                        .entry(http::header::HOST)
                        .or_insert_with(|| self.origin.host.clone());
                    match tx.try_send_request(req).await {
                        Ok(resp) => {
                            let back = Some((tx, self.origin.clone()));
                            return Ok(resp.map(|body| PooledBody { body, back }));
                        }
                        Err(mut e) => match (e.take_message(), reused) {
                            // A reused connection the upstream closed meanwhile: nothing was
                            // sent, so another connection may carry the request.
                            (Some(back), true) if retries > 0 => {
                                req = back;
                                *req.uri_mut() = uri.clone();
                                continue;
                            }
                            _ => return Err(Failure::Request(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    /// How many idle HTTP/1 connections the pool holds.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.origin.idle.lock().map_or(0, |i| i.len())
    }
}

/// `/path?query` of an absolute URI: the request target an HTTP/1 request without a proxy sends.
fn origin_form(uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

impl Origin {
    async fn checkout(&self) -> Result<Conn, Failure> {
        if let Some(tx) = self.live_h2() {
            return Ok(Conn::H2(tx));
        }
        loop {
            let taken = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                // The newest of the last few that can take a request now; else the newest,
                // whose connection task has not yet seen its last answer end. Waiting for that
                // costs a round through the scheduler, a connection that is ready does not.
                let end = idle.len();
                match (end.saturating_sub(8)..end)
                    .rev()
                    .find(|&i| idle[i].tx.is_ready())
                {
                    Some(at) => idle.remove(at),
                    None => idle.pop_back(),
                }
            };
            let Some(Idle { mut tx, since }) = taken else {
                // Boxed: rare, and its future (TLS, both handshakes) would otherwise make every
                // call's future as large as itself.
                return Box::pin(self.connect()).await;
            };
            if tx.is_closed() || since.elapsed() > self.idle_timeout {
                continue;
            }
            if tx.ready().await.is_ok() {
                return Ok(Conn::H1(tx, true));
            }
        }
    }

    fn live_h2(&self) -> Option<http2::SendRequest<LeanBody>> {
        let h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        h2.as_ref().filter(|tx| !tx.is_closed()).cloned()
    }

    async fn connect(&self) -> Result<Conn, Failure> {
        use tower::ServiceExt;
        let io = self
            .connector
            .clone()
            .oneshot(self.target.clone())
            .await
            .map_err(Failure::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(Failure::Request)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
            return Ok(Conn::H2(tx));
        }
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(Failure::Request)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(Conn::H1(tx, false))
    }

    fn put(self: &Arc<Self>, tx: http1::SendRequest<LeanBody>) {
        if tx.is_closed() {
            return;
        }
        let now = Instant::now();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            self.drop_stale(&mut idle, now);
            idle.push_back(Idle { tx, since: now });
        }
        self.reap_later();
    }

    /// Drops the idle connections that outlived the idle timeout (the oldest come first).
    fn drop_stale(&self, idle: &mut VecDeque<Idle>, now: Instant) {
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) > self.idle_timeout)
        {
            idle.pop_front();
        }
    }

    /// Makes sure a task drops idle connections once they outlive the idle timeout, also when
    /// no call comes to notice them: it runs while the pool holds any, and ends with the pool.
    fn reap_later(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Release);
            return;
        };
        let origin = Arc::downgrade(self);
        let every = self.idle_timeout / 2;
        rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(origin) = origin.upgrade() else {
                    return;
                };
                let mut idle = origin.idle.lock().unwrap_or_else(|p| p.into_inner());
                origin.drop_stale(&mut idle, Instant::now());
                if idle.is_empty() {
                    // Under the lock: a `put` after this sees `false` and starts a new task.
                    origin.reaping.store(false, Ordering::Release);
                    return;
                }
            }
        });
    }
}

/// An answer's body; over HTTP/1 it returns its connection to the pool when it ends. Dropped
/// before its end, it closes the connection (the rest of the answer cannot be skipped cheaply).
pub struct PooledBody {
    body: Incoming,
    back: Option<(http1::SendRequest<LeanBody>, Arc<Origin>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((tx, origin)) = self.back.take() {
            origin.put(tx);
        }
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("body", &self.body)
            .finish()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        let uri: Uri = "http://u:1/v1/chat/completions?x=1".parse().unwrap();
        assert_eq!(origin_form(&uri), "/v1/chat/completions?x=1");
        let bare: Uri = "http://u:1".parse().unwrap();
        assert_eq!(origin_form(&bare), "/");
    }

    #[test]
    fn one_origin_one_pool_and_the_host_header_leaves_out_default_ports() {
        let a = for_origin(&"http://Example.test:8080/v1/a".parse().unwrap());
        let b = for_origin(&"http://example.test:8080/v2/b".parse().unwrap());
        let (Ok(Some(a)), Ok(Some(b))) = (a, b) else {
            return; // an environment proxy is set: no lean client to test
        };
        assert!(Arc::ptr_eq(&a.origin, &b.origin));
        assert_eq!(a.origin.host, "Example.test:8080");
        let c = for_origin(&"https://example.test:443/v1".parse().unwrap());
        let Ok(Some(c)) = c else {
            panic!("https origin")
        };
        assert!(!Arc::ptr_eq(&a.origin, &c.origin));
        assert_eq!(c.origin.host, "example.test");
        assert_eq!(c.origin.target, "https://example.test:443/");
    }

    /// An upstream on 127.0.0.1 that answers every request on a connection with `body`, counts
    /// the connections it accepted, and closes a connection after `per_conn` answers.
    async fn upstream(per_conn: usize) -> (Uri, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        // Read one request: head up to the blank line, then its 2-byte body.
                        let mut chunk = [0u8; 1024];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let head = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        while buf.len() < head + 2 {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head + 2);
                        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                        if sock.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    // Closed without `Connection: close`, as an upstream's idle timeout does.
                });
            }
        });
        let uri = format!("http://127.0.0.1:{port}/v1/chat/completions")
            .parse()
            .unwrap();
        (uri, accepted)
    }

    async fn call(lean: &Lean, uri: &Uri) -> Response<PooledBody> {
        let req = super::super::http::lean_json_post(uri, http::HeaderMap::new(), b"{}".to_vec());
        lean.request(req).await.unwrap()
    }

    async fn text(resp: Response<PooledBody>) -> Bytes {
        use http_body_util::BodyExt;
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_goes_back_to_the_pool_when_its_answer_ends_and_is_reused() {
        let (uri, accepted) = upstream(100).await;
        let lean = Lean::direct(&uri).unwrap();
        for _ in 0..5 {
            let resp = call(&lean, &uri).await;
            assert_eq!(lean.idle(), 0, "in use until its body is read");
            assert_eq!(text(resp).await, "hello");
            assert_eq!(lean.idle(), 1);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_calls_open_connections_and_all_of_them_are_kept() {
        let (uri, accepted) = upstream(100).await;
        let lean = Lean::direct(&uri).unwrap();
        let held = futures::future::join_all((0..3).map(|_| call(&lean, &uri))).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
        for resp in held {
            assert_eq!(text(resp).await, "hello");
        }
        assert_eq!(lean.idle(), 3);
        let again = futures::future::join_all((0..3).map(|_| call(&lean, &uri))).await;
        for resp in again {
            assert_eq!(text(resp).await, "hello");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout_without_further_calls() {
        let (uri, accepted) = upstream(100).await;
        let mut lean = Lean::direct(&uri).unwrap();
        Arc::get_mut(&mut lean.origin).unwrap().idle_timeout = Duration::from_millis(200);
        assert_eq!(text(call(&lean, &uri).await).await, "hello");
        assert_eq!(lean.idle(), 1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            lean.idle(),
            0,
            "the idle connection was kept past its timeout"
        );
        // The pool still works, on a new connection.
        assert_eq!(text(call(&lean, &uri).await).await, "hello");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_answer_dropped_before_its_end_does_not_return_its_connection() {
        let (uri, accepted) = upstream(100).await;
        let lean = Lean::direct(&uri).unwrap();
        drop(call(&lean, &uri).await);
        assert_eq!(lean.idle(), 0);
        assert_eq!(text(call(&lean, &uri).await).await, "hello");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_upstream_closed_is_replaced_without_failing_the_call() {
        let (uri, accepted) = upstream(1).await;
        let lean = Lean::direct(&uri).unwrap();
        for _ in 0..4 {
            assert_eq!(text(call(&lean, &uri).await).await, "hello");
            // Let the connection task see the close before the next checkout, or not: both
            // must work.
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn the_request_carries_the_origin_form_target_and_the_host_header() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            let answer = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            sock.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let uri: Uri = format!("http://127.0.0.1:{port}/v1/chat/completions?a=b")
            .parse()
            .unwrap();
        let lean = Lean::direct(&uri).unwrap();
        text(call(&lean, &uri).await).await;
        let head = seen.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("post /v1/chat/completions?a=b http/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")),
            "{head}"
        );
    }
}
