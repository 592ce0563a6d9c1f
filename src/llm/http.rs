//! HTTP plumbing shared by the wire formats: client construction (rustls, TCP_NODELAY, timeouts, the
//! SSRF guard's resolver for client-supplied URLs), sending with error classification, and the SSE
//! and NDJSON framings of streamed answers.
//!
//! Two clients send: reqwest for everything, and [`Lean`] (hyper's client connections in a pool of
//! our own, `llm::lean`) for the hottest path (the chat calls of every [`super::wire`] provider to
//! the operator's own upstream). reqwest wraps hyper-util's pooled client in layers a gateway call does not use
//! (redirects, which we turn off anyway, retries, and a URL re-parse of every response): skipping
//! them saved a sixth of the instructions of a proxied call (bench/HISTORY.md, step 9), and skipping
//! hyper-util's pool too saved more (step 13). The lean client is not used
//! when an environment proxy is set (reqwest honours `HTTP(S)_PROXY`/`ALL_PROXY`), nor for
//! client-chosen URLs (the SSRF guard pins them in a reqwest client). A 2xx answer from either is an
//! [`Answer`]; any other status goes through the same error reading as reqwest's.
//!
//! Every answer's body, from either client, is read under a provider's [`Timeouts`]: once the
//! headers are in, the first body byte and then each next one must come within their bounds, or
//! the read fails with class `Timeout` and the body (so the connection) is dropped. Only the time
//! spent waiting for the upstream counts: a caller reading slowly does not run the clock.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::header::HeaderMap;

use super::error::{ErrorClass, LlmError, UpstreamError};

/// How long connecting may take unless [`HttpOptions::connect_timeout`] says otherwise (both clients).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an idle upstream connection is kept for reuse (both clients).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a call waits for each part of an upstream's answer; zero means no bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// From sending the request to the response headers.
    pub headers: Duration,
    /// From the response headers to the first byte of the body.
    pub first_byte: Duration,
    /// Between one body byte and the next.
    pub idle: Duration,
    /// Not a time: the most body bytes an answer may have (0 = no bound). Read with the time
    /// bounds, by the same body wrapper.
    pub max_bytes: u64,
}

impl Timeouts {
    /// The bounds a provider's config sets (`timeout`, `first_byte_timeout`, `idle_timeout`).
    pub fn of(cfg: &crate::config::ProviderConfig) -> Self {
        Self {
            headers: cfg.timeout,
            first_byte: cfg.first_byte_timeout,
            idle: cfg.idle_timeout,
            max_bytes: cfg.max_response_bytes,
        }
    }
}

/// An upstream that went silent in the middle of its answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct BodyStalled {
    /// Whether no byte of the body had come yet.
    pub before_first_byte: bool,
    /// The bound that passed.
    pub after: Duration,
}

impl BodyStalled {
    fn describe(&self) -> String {
        match self.before_first_byte {
            true => format!(
                "no body byte within {}s of the response headers (first_byte_timeout)",
                self.after.as_secs_f64()
            ),
            false => format!(
                "the body stalled: no byte for {}s (idle_timeout)",
                self.after.as_secs_f64()
            ),
        }
    }
}

/// An upstream whose answer's body went over `max_response_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the answer is larger than {limit} bytes (max_response_bytes)")]
pub struct BodyTooLarge {
    /// The bound that was passed.
    pub limit: u64,
}

/// The error of a [`TimedBody`]: the inner body's, the stall, or the size bound.
#[derive(Debug)]
pub enum BodyError<E> {
    /// The inner body failed.
    Read(E),
    /// The upstream sent nothing within the bound.
    Stalled(BodyStalled),
    /// The upstream sent more than the size bound.
    TooLarge(BodyTooLarge),
}

impl<E: std::fmt::Display> std::fmt::Display for BodyError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Read(e) => e.fmt(f),
            BodyError::Stalled(s) => s.fmt(f),
            BodyError::TooLarge(t) => t.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for BodyError<E> {
    /// Transparent: the inner error's causes, so that messages do not name it twice.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Read(e) => e.source(),
            BodyError::Stalled(_) | BodyError::TooLarge(_) => None,
        }
    }
}

/// A response body read under the first-byte and idle bounds of [`Timeouts`], and its size bound.
/// The clock runs only while a read is waiting for the upstream (from the first poll that finds
/// nothing, to the next frame), so a slow reader downstream never counts against the upstream. One
/// timer per body, moved only when it fires early (at most once per bound), not on every frame.
pub struct TimedBody<B> {
    inner: B,
    first_byte: Duration,
    idle: Duration,
    /// Body bytes allowed (0 = no bound), and read so far.
    max_bytes: u64,
    read: u64,
    got_first: bool,
    /// When the current wait for a frame began; `None` while no read is waiting.
    waiting_since: Option<tokio::time::Instant>,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<B> TimedBody<B> {
    /// `inner` read under `t.first_byte` and `t.idle`.
    pub fn new(inner: B, t: &Timeouts) -> Self {
        Self {
            inner,
            first_byte: t.first_byte,
            idle: t.idle,
            max_bytes: t.max_bytes,
            read: 0,
            got_first: false,
            waiting_since: None,
            timer: None,
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for TimedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedBody")
            .field("inner", &self.inner)
            .field("first_byte", &self.first_byte)
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError<B::Error>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.got_first = true;
                this.waiting_since = None;
                if this.max_bytes > 0
                    && let Some(d) = frame.data_ref()
                {
                    this.read += d.len() as u64;
                    if this.read > this.max_bytes {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(BodyTooLarge {
                            limit: this.max_bytes,
                        }))));
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(BodyError::Read(e)))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        let bound = match this.got_first {
            false => this.first_byte,
            true => this.idle,
        };
        if bound.is_zero() {
            return Poll::Pending;
        }
        let since = *this
            .waiting_since
            .get_or_insert_with(tokio::time::Instant::now);
        let due = since + bound;
        loop {
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() > due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The timer was set for an earlier wait: this one is not over yet.
            if tokio::time::Instant::now() < due {
                timer.as_mut().reset(due);
                continue;
            }
            this.waiting_since = None;
            return Poll::Ready(Some(Err(BodyError::Stalled(BodyStalled {
                before_first_byte: !this.got_first,
                after: bound,
            }))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The error of a body bound behind `e`, if the body it read went silent or over its size bound
/// (`e` itself or any of its causes).
fn bound_error(provider: &str, e: &(dyn std::error::Error + 'static)) -> Option<LlmError> {
    std::iter::once(e).chain(causes(e)).find_map(|s| {
        if let Some(st) = s.downcast_ref::<BodyStalled>() {
            return Some(stalled_error(provider, *st));
        }
        if let Some(t) = s.downcast_ref::<BodyTooLarge>() {
            return Some(too_large_error(provider, *t));
        }
        match (
            s.downcast_ref::<BodyError<reqwest::Error>>(),
            s.downcast_ref::<BodyError<hyper::Error>>(),
        ) {
            (Some(BodyError::Stalled(st)), _) | (_, Some(BodyError::Stalled(st))) => {
                Some(stalled_error(provider, *st))
            }
            (Some(BodyError::TooLarge(t)), _) | (_, Some(BodyError::TooLarge(t))) => {
                Some(too_large_error(provider, *t))
            }
            _ => None,
        }
    })
}

/// The error of an answer over its size bound, class `Malformed`: no answer that size is one
/// the gateway can pass on.
fn too_large_error(provider: &str, t: BodyTooLarge) -> LlmError {
    LlmError::upstream(provider, ErrorClass::Malformed, t.to_string())
}

/// The error of a stalled body, class `Timeout`.
fn stalled_error(provider: &str, stall: BodyStalled) -> LlmError {
    LlmError::upstream(provider, ErrorClass::Timeout, stall.to_string())
}

/// `resp` with its body read under `t`'s first-byte and idle bounds.
pub fn timed_response(resp: reqwest::Response, t: &Timeouts) -> reqwest::Response {
    if t.first_byte.is_zero() && t.idle.is_zero() && t.max_bytes == 0 {
        return resp;
    }
    let resp: http::Response<reqwest::Body> = resp.into();
    let t = *t;
    resp.map(|body| reqwest::Body::wrap(TimedBody::new(body, &t)))
        .into()
}

/// How a provider's HTTP client is built.
#[derive(Clone, Default)]
pub struct HttpOptions {
    /// Longest time to establish a connection (default 10 s).
    pub connect_timeout: Option<Duration>,
    /// For URLs a client supplied: the host and the addresses the SSRF guard checked; the client
    /// connects only to these (no second DNS lookup, so no rebinding between check and connect).
    pub pin: Option<(String, Vec<std::net::SocketAddr>)>,
}

impl std::fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("pin", &self.pin)
            .finish()
    }
}

/// Builds a client: rustls (ring), TCP_NODELAY, HTTP/1.1 or HTTP/2 by ALPN, no overall timeout (a
/// stream may legitimately run for minutes; callers bound the time to the first byte).
pub fn client(opts: &HttpOptions) -> Result<reqwest::Client, LlmError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(opts.connect_timeout.unwrap_or(CONNECT_TIMEOUT))
        .pool_idle_timeout(IDLE_TIMEOUT)
        // A redirect could lead a guarded request to an address that was never checked.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT);
    if let Some((host, addrs)) = &opts.pin {
        // An environment proxy would look the name up itself and defeat the pin.
        b = b.resolve_to_addrs(host, addrs).no_proxy();
    }
    b.build()
        .map_err(|e| LlmError::InvalidRequest(format!("cannot build an HTTP client: {e}")))
}

/// The proxy variables reqwest reads from the environment (upper and lower case).
const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// Whether the environment (read through `var`) configures a proxy.
pub(super) fn env_proxy_set(var: impl Fn(&str) -> Option<String>) -> bool {
    PROXY_VARS
        .iter()
        .any(|k| var(k).is_some_and(|v| !v.trim().is_empty()))
}

use super::lean::{Failure, Lean, LeanBody, PooledBody};

/// The `User-Agent` both clients send.
pub const USER_AGENT: &str = concat!("chatcli/", env!("CARGO_PKG_VERSION"));

/// `headers` plus the `Content-Type` of a JSON body and our `User-Agent` (unless set): what a
/// JSON POST sends. Providers build this once, not per call.
pub fn json_headers(mut headers: HeaderMap) -> HeaderMap {
    use reqwest::header::{CONTENT_TYPE, HeaderValue};
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers
        .entry(reqwest::header::USER_AGENT)
        .or_insert(HeaderValue::from_static(USER_AGENT));
    headers
}

/// A request for the lean client: a POST of a JSON body with `headers` (from [`json_headers`]).
pub fn lean_json_post(
    uri: &http::Uri,
    headers: HeaderMap,
    body: Vec<u8>,
) -> http::Request<LeanBody> {
    let mut req = http::Request::new(http_body_util::Full::new(Bytes::from(body)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers;
    req
}

/// A 2xx answer from either client, its body read under the provider's [`Timeouts`].
#[derive(Debug)]
pub enum Answer {
    /// From reqwest.
    Reqwest(reqwest::Response),
    /// From the lean client.
    Lean(http::Response<TimedBody<PooledBody>>),
}

impl Answer {
    /// The response headers.
    pub fn headers(&self) -> &HeaderMap {
        match self {
            Answer::Reqwest(r) => r.headers(),
            Answer::Lean(r) => r.headers(),
        }
    }

    /// The response's content type, trimmed and lower case.
    pub fn content_type(&self) -> Option<String> {
        self.headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_ascii_lowercase())
    }

    /// The answer as a reqwest response (for framings read only from one: NDJSON).
    pub fn into_reqwest(self) -> reqwest::Response {
        match self {
            Answer::Reqwest(r) => r,
            Answer::Lean(r) => r.map(reqwest::Body::wrap).into(),
        }
    }

    /// The whole body.
    pub async fn bytes(self, provider: &str) -> Result<Bytes, LlmError> {
        use http_body_util::BodyExt;
        match self {
            Answer::Reqwest(r) => r.bytes().await.map_err(|e| transport_error(provider, &e)),
            Answer::Lean(r) => r
                .into_body()
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .map_err(|e| lean_body_error(provider, &e)),
        }
    }

    /// The body's SSE events, as they arrive (see [`sse_events`]).
    pub fn sse_events(
        self,
        provider: &str,
    ) -> futures::stream::BoxStream<'static, Result<SseEvent, LlmError>> {
        match self {
            Answer::Reqwest(r) => sse_events(provider, r).boxed(),
            Answer::Lean(r) => {
                events_of(provider, sse_stream::SseStream::new(r.into_body())).boxed()
            }
        }
    }
}

/// [`send`] through the lean client.
pub async fn send_lean(
    provider: &str,
    timeouts: &Timeouts,
    lean: &Lean,
    request: http::Request<LeanBody>,
    parse_error: ErrorParser,
) -> Result<Answer, LlmError> {
    let sent = async {
        lean.request(request)
            .await
            .map_err(|e| lean_error(provider, &e))
    };
    let resp = within_headers(provider, timeouts.headers, sent).await?;
    let resp = resp.map(|body| TimedBody::new(body, timeouts));
    if resp.status().is_success() {
        return Ok(Answer::Lean(resp));
    }
    check_status(provider, resp.map(reqwest::Body::wrap).into(), parse_error)
        .await
        .map(Answer::Reqwest)
}

/// `sent` (a request on its way to its response headers), bounded by `limit` (zero = no bound):
/// an upstream that answers nothing within it fails with class `Timeout`.
async fn within_headers<T>(
    provider: &str,
    limit: Duration,
    sent: impl std::future::Future<Output = Result<T, LlmError>>,
) -> Result<T, LlmError> {
    if limit.is_zero() {
        return sent.await;
    }
    tokio::time::timeout(limit, sent).await.unwrap_or_else(|_| {
        Err(LlmError::upstream(
            provider,
            ErrorClass::Timeout,
            format!(
                "no response headers within {}s (timeout)",
                limit.as_secs_f64()
            ),
        ))
    })
}

/// The causes of `e` (its sources), outermost first.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(e.source(), |s| s.source())
}

/// `headline` followed by every cause of `e`: `connection failed: tcp connect error: …`.
fn with_causes(headline: String, e: &(dyn std::error::Error + 'static)) -> String {
    causes(e).fold(headline, |text, s| format!("{text}: {s}"))
}

/// A lean client's body that failed: it stalled, or it broke off.
fn lean_body_error(provider: &str, e: &BodyError<hyper::Error>) -> LlmError {
    match e {
        BodyError::Read(h) => body_error(provider, h),
        BodyError::Stalled(st) => stalled_error(provider, *st),
        BodyError::TooLarge(t) => too_large_error(provider, *t),
    }
}

/// A body that broke off on the lean client, worded as [`transport_error`] words it.
fn body_error(provider: &str, e: &hyper::Error) -> LlmError {
    let text = with_causes(
        format!("the response body broke off or could not be read: {e}"),
        e,
    );
    LlmError::upstream(provider, ErrorClass::Transport, text)
}

/// Classifies an error of the lean client before any answer (connecting, writing the request, or
/// reading the answer's head), with the same classes and wording as [`transport_error`].
fn lean_error(provider: &str, failure: &Failure) -> LlmError {
    let headline = match failure {
        Failure::Connect(_) => "connection failed",
        Failure::Request(_) => "request failed",
    };
    let e = failure.error();
    let timed_out = std::iter::once(e).chain(causes(e)).any(|s| {
        s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    });
    let text = with_causes(format!("{headline}: {e}"), e);
    let class = match timed_out {
        true => ErrorClass::Timeout,
        false => ErrorClass::Transport,
    };
    LlmError::upstream(provider, class, text)
}

/// Parses a provider's error body into a class and message; `None` falls back to the HTTP status.
pub type ErrorParser = fn(status: u16, body: &str) -> Option<(ErrorClass, String)>;

/// Sends a request under `timeouts` (the wait for the headers, then the body's first byte and
/// each next one); a non-2xx answer becomes a classified [`LlmError::Upstream`].
pub async fn send(
    provider: &str,
    timeouts: &Timeouts,
    request: reqwest::RequestBuilder,
    parse_error: ErrorParser,
) -> Result<reqwest::Response, LlmError> {
    let sent = async {
        request
            .send()
            .await
            .map_err(|e| transport_error(provider, &e))
    };
    let resp = within_headers(provider, timeouts.headers, sent).await?;
    check_status(provider, timed_response(resp, timeouts), parse_error).await
}

/// A 2xx answer as it is; any other becomes a classified [`LlmError::Upstream`].
async fn check_status(
    provider: &str,
    resp: reqwest::Response,
    parse_error: ErrorParser,
) -> Result<reqwest::Response, LlmError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = retry_after(resp.headers());
    let body = read_bounded(resp, 64 * 1024).await;
    let code = status.as_u16();
    let (class, message) = parse_error(code, &body).unwrap_or_else(|| {
        let text = body.trim();
        let text = if text.len() > 300 {
            &text[..floor_char_boundary(text, 300)]
        } else {
            text
        };
        (ErrorClass::from_status(code), text.to_string())
    });
    Err(LlmError::Upstream(UpstreamError {
        provider: provider.to_string(),
        class,
        status: Some(code),
        message,
        retry_after,
    }))
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

async fn read_bounded(resp: reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Classifies a reqwest transport error (never an HTTP status: those are handled in [`send`]).
pub fn transport_error(provider: &str, e: &reqwest::Error) -> LlmError {
    if let Some(bound) = bound_error(provider, e) {
        return bound;
    }
    // reqwest marks every failed body read as a decode error; only a decode error that did not come
    // from the connection (hyper or I/O underneath) is the upstream speaking garbage.
    let from_connection = causes(e).any(|s| s.is::<hyper::Error>() || s.is::<std::io::Error>());
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else if e.is_decode() && !from_connection {
        ErrorClass::Malformed
    } else {
        ErrorClass::Transport
    };
    // reqwest's Display includes the URL, which never carries keys in our requests (keys go in
    // headers); strip it anyway to keep messages short and stable.
    let message = e.without_url_ref_text();
    LlmError::upstream(provider, class, message)
}

trait WithoutUrl {
    fn without_url_ref_text(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref_text(&self) -> String {
        let headline = if self.is_connect() {
            "connection failed"
        } else if self.is_timeout() {
            "timed out"
        } else if self.is_body() || self.is_decode() {
            "the response body broke off or could not be read"
        } else {
            "request failed"
        };
        with_causes(headline.to_string(), self)
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when =
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    Some(Duration::try_from(delta).unwrap_or(Duration::ZERO))
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field ("message" when absent, without allocating it).
    pub event: std::borrow::Cow<'static, str>,
    /// The `data:` lines joined by newlines.
    pub data: String,
}

/// The SSE events of a streamed response, as they arrive. Blocks without a `data` field dispatch
/// nothing (as in a browser's EventSource); an absent or empty `event` is "message". The parser
/// (sse-stream) works in linear time over however the bytes arrive: a burst of many events in
/// one read costs no more per event than one event per read.
pub fn sse_events(
    provider: &str,
    resp: reqwest::Response,
) -> impl Stream<Item = Result<SseEvent, LlmError>> + Send + use<> {
    events_of(
        provider,
        sse_stream::SseByteStream::new(resp.bytes_stream()),
    )
}

/// The dispatched events of decoded SSE blocks; body errors classified by their source (reqwest
/// or the lean client's hyper).
fn events_of<S>(
    provider: &str,
    blocks: S,
) -> impl Stream<Item = Result<SseEvent, LlmError>> + use<S>
where
    S: Stream<Item = Result<sse_stream::Sse, sse_stream::Error>> + Send + 'static,
{
    let provider = provider.to_string();
    blocks
        .try_filter_map(|block| {
            futures::future::ready(Ok(block.data.map(|data| SseEvent {
                event: block.event.filter(|e| !e.is_empty()).map_or(
                    std::borrow::Cow::Borrowed("message"),
                    std::borrow::Cow::Owned,
                ),
                data,
            })))
        })
        .map_err(move |e| match e {
            sse_stream::Error::Body(b) => {
                if let Some(t) = b.downcast_ref::<reqwest::Error>() {
                    transport_error(&provider, t)
                } else if let Some(l) = b.downcast_ref::<BodyError<hyper::Error>>() {
                    lean_body_error(&provider, l)
                } else if let Some(h) = b.downcast_ref::<hyper::Error>() {
                    body_error(&provider, h)
                } else if let Some(bound) = bound_error(&provider, b.as_ref()) {
                    bound
                } else {
                    LlmError::upstream(&provider, ErrorClass::Transport, b.to_string())
                }
            }
            other => LlmError::upstream(&provider, ErrorClass::Malformed, other.to_string()),
        })
}

/// How long, and how many more items, [`read_rest_in_background`] reads after an answer's end.
const REST_TIME: Duration = Duration::from_secs(1);
const REST_ITEMS: usize = 64;

/// Reads what is left of an answer after its final event (`data: [DONE]`, `message_stop`, Ollama's
/// `done: true`), so that its connection goes back to the client's pool for the next call instead
/// of being closed: an HTTP/1.1 connection can serve another request only once the body's end
/// (the chunked terminator, which a conforming upstream sends right after the final event) has
/// been read. What is already buffered (up to 64 items) is read at once; what is not is read by a
/// background task, for at most a second and 64 more items, which then drops the rest (closing the
/// connection). Only for answers
/// that are complete: a stream abandoned mid-way is dropped instead, and the closed connection is
/// what tells the upstream to stop generating.
pub fn read_rest_in_background<S>(rest: S)
where
    S: Stream + Unpin + Send + 'static,
{
    use futures::FutureExt;
    let mut rest = rest;
    for _ in 0..REST_ITEMS {
        match rest.next().now_or_never() {
            Some(Some(_)) => continue,
            Some(None) => return,
            None => break,
        }
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let rest = rest
                .take(REST_ITEMS)
                .for_each(|_| futures::future::ready(()));
            let _ = tokio::time::timeout(REST_TIME, rest).await;
        });
    }
}

/// The JSON lines of a newline-delimited JSON response (Ollama), as they arrive.
pub fn ndjson_lines(
    provider: &str,
    resp: reqwest::Response,
) -> impl Stream<Item = Result<serde_json::Value, LlmError>> + Send + use<> {
    let provider = provider.to_string();
    let bytes = resp.bytes_stream();
    async_stream::stream! {
        let mut buf: Vec<u8> = Vec::new();
        futures::pin_mut!(bytes);
        loop {
            match bytes.next().await {
                Some(Ok(chunk)) => {
                    buf.extend_from_slice(&chunk);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        if let Some(v) = parse_line(&provider, &line) {
                            yield v;
                        }
                    }
                }
                Some(Err(e)) => {
                    yield Err(transport_error(&provider, &e));
                    return;
                }
                None => {
                    if let Some(v) = parse_line(&provider, &buf) {
                        yield v;
                    }
                    return;
                }
            }
        }
    }
}

fn parse_line(provider: &str, line: &[u8]) -> Option<Result<serde_json::Value, LlmError>> {
    let text = std::str::from_utf8(line)
        .map(str::trim)
        .unwrap_or("\u{fffd}");
    if text.is_empty() {
        return None;
    }
    Some(serde_json::from_str(text).map_err(|e| {
        LlmError::upstream(
            provider,
            ErrorClass::Malformed,
            format!("invalid JSON line: {e}"),
        )
    }))
}

/// The operator's extra headers, marked sensitive; an error names a bad header, never its value
/// (values may be secrets).
pub fn header_map(
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("`{k}` is not a valid header name"))?;
        let mut value = reqwest::header::HeaderValue::from_str(v)
            .map_err(|_| format!("header `{k}` has an invalid value"))?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    Ok(map)
}

/// The body of a 2xx answer as JSON; one that is not JSON is `Malformed`.
pub async fn json_body(
    provider: &str,
    resp: reqwest::Response,
) -> Result<serde_json::Value, LlmError> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| transport_error(provider, &e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        LlmError::upstream(
            provider,
            ErrorClass::Malformed,
            format!("the answer is not JSON: {e}"),
        )
    })
}

/// Most pages of a paged model list read before discovery stops (an upstream that always says
/// there is more).
pub const MAX_MODEL_PAGES: usize = 20;

/// Adds a page of a model list to `models` and returns the next page's cursor (see
/// [`ModelListing::take`]).
pub type PageReader = fn(
    provider: &str,
    page: &serde_json::Value,
    models: &mut Vec<String>,
) -> Result<Option<String>, LlmError>;

/// How a wire format lists its upstream's models: `GET {base_url}{path}`, page by page.
#[derive(Debug, Clone, Copy)]
pub struct ModelListing {
    /// Below the base URL (`/v1/models`, `/api/tags`, …).
    pub path: &'static str,
    /// A parameter sent with every page (`limit=1000`), if any.
    pub query: Option<(&'static str, &'static str)>,
    /// The parameter that carries the cursor of the next page (after the first).
    pub cursor_key: &'static str,
    /// Adds a page's models to the list and returns the next page's cursor, `None` on the last
    /// page, or the error that ends the listing (a page that is not a model list).
    pub take: PageReader,
    /// Reads the format's error bodies.
    pub parse_error: ErrorParser,
}

/// Reads `listing`'s model list from `base_url` (no trailing slash) with `headers`, at most
/// [`MAX_MODEL_PAGES`] pages.
pub async fn model_pages(
    provider: &str,
    client: &reqwest::Client,
    timeouts: &Timeouts,
    headers: &HeaderMap,
    base_url: &str,
    listing: &ModelListing,
) -> Result<Vec<String>, LlmError> {
    let first = reqwest::Url::parse(&format!("{base_url}{}", listing.path)).map_err(|e| {
        LlmError::InvalidRequest(format!("provider `{provider}`: base_url is not a URL: {e}"))
    })?;
    let mut models = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_MODEL_PAGES {
        let mut url = first.clone();
        if let Some((k, v)) = listing.query {
            url.query_pairs_mut().append_pair(k, v);
        }
        if let Some(c) = &cursor {
            url.query_pairs_mut().append_pair(listing.cursor_key, c);
        }
        let rb = client.get(url).headers(headers.clone());
        let resp = send(provider, timeouts, rb, listing.parse_error).await?;
        let body = json_body(provider, resp).await?;
        cursor = (listing.take)(provider, &body, &mut models)?;
        if cursor.is_none() {
            break;
        }
    }
    Ok(models)
}

/// The string `field` of every object in the array `list` of a model list answer (`data[].id`,
/// `models[].name`, …); `Malformed` when there is no such array.
pub fn names_in(
    provider: &str,
    body: &serde_json::Value,
    list: &str,
    field: &str,
) -> Result<Vec<String>, LlmError> {
    let items = body
        .get(list)
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| {
            LlmError::upstream(
                provider,
                ErrorClass::Malformed,
                format!("the model list has no `{list}` array"),
            )
        })?;
    Ok(items
        .iter()
        .filter_map(|m| m.get(field).and_then(serde_json::Value::as_str))
        .map(String::from)
        .collect())
}

/// Refuses `provider_config` keys a provider does not take, naming them (never their values).
pub fn check_config_keys(
    provider: &str,
    config: &std::collections::BTreeMap<String, String>,
    accepted: &[&str],
) -> Result<(), LlmError> {
    let unknown: Vec<String> = config
        .keys()
        .filter(|k| !accepted.contains(&k.as_str()))
        .map(|k| format!("`{k}`"))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(LlmError::InvalidRequest(format!(
        "provider `{provider}` does not accept provider_config key(s) {}; accepted: {}",
        unknown.join(", "),
        accepted.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_variable_in_either_case_sends_calls_through_reqwest() {
        let env = |set: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                set.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(!env_proxy_set(env(&[])));
        assert!(!env_proxy_set(env(&[
            ("NO_PROXY", "*"),
            ("HTTPS_PROXY", " ")
        ])));
        assert!(env_proxy_set(env(&[("HTTPS_PROXY", "http://proxy:3128")])));
        assert!(env_proxy_set(env(&[("http_proxy", "http://proxy:3128")])));
        assert!(env_proxy_set(env(&[("ALL_PROXY", "socks5://proxy:1080")])));
    }

    #[tokio::test]
    async fn the_lean_client_classifies_a_refused_connection_as_transport() {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|_| unreachable!());
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        drop(listener);
        let uri: http::Uri = format!("http://127.0.0.1:{port}/v1/chat/completions")
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let lean = Lean::direct(&uri).unwrap_or_else(|_| unreachable!());
        let req = lean_json_post(&uri, HeaderMap::new(), b"{}".to_vec());
        let err = send_lean("p", &Timeouts::default(), &lean, req, |_, _| None)
            .await
            .err()
            .and_then(|e| e.as_upstream().cloned())
            .unwrap_or_else(|| unreachable!());
        assert_eq!(err.class, ErrorClass::Transport);
        assert!(
            err.message.starts_with("connection failed"),
            "{}",
            err.message
        );
    }

    /// A response whose body arrives in exactly these pieces.
    fn response_in_pieces(pieces: &[&'static [u8]]) -> reqwest::Response {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            pieces.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
        reqwest::Response::from(http::Response::new(body))
    }

    async fn events_of(pieces: &[&'static str]) -> Vec<Result<(String, String), String>> {
        let pieces: Vec<&'static [u8]> = pieces.iter().map(|p| p.as_bytes()).collect();
        sse_events("p", response_in_pieces(&pieces))
            .map(|r| {
                r.map(|e| (e.event.into_owned(), e.data))
                    .map_err(|e| e.to_string())
            })
            .collect()
            .await
    }

    fn ok(event: &str, data: &str) -> Result<(String, String), String> {
        Ok((event.to_string(), data.to_string()))
    }

    #[tokio::test]
    async fn sse_events_follow_the_event_stream_rules_however_the_bytes_are_cut() {
        let whole = "data: one\n\n: a comment\n\nevent: ping\n\nevent:\ndata: two\ndata: lines\n\n\
                     event: done\r\ndata:\r\n\r\ndata: tail without an ending";
        let expected = vec![
            ok("message", "one"),
            // `event: ping` alone has no data: nothing is dispatched.
            ok("message", "two\nlines"),
            ok("done", ""),
        ];
        assert_eq!(events_of(&[whole]).await, expected, "in one piece");
        // Every cut point, including inside `data:` and between CR and LF.
        for cut in 1..whole.len() {
            let (a, b) = whole.split_at(cut);
            let a: &'static str = Box::leak(a.to_string().into_boxed_str());
            let b: &'static str = Box::leak(b.to_string().into_boxed_str());
            assert_eq!(events_of(&[a, b]).await, expected, "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn a_burst_of_events_in_one_read_all_come_out_in_order() {
        let burst: String = (0..500).map(|i| format!("data: {i}\n\n")).collect();
        let burst: &'static str = Box::leak(burst.into_boxed_str());
        let got = events_of(&[burst]).await;
        assert_eq!(got.len(), 500);
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e, &ok("message", &i.to_string()));
        }
    }

    #[tokio::test]
    async fn invalid_utf8_in_an_sse_field_is_malformed() {
        let resp = response_in_pieces(&[b"data: \xff\xfe\n\n"]);
        let got: Vec<_> = sse_events("p", resp).collect().await;
        assert_eq!(got.len(), 1);
        let err = got
            .into_iter()
            .next()
            .and_then(|r| r.err())
            .and_then(|e| e.as_upstream().cloned())
            .unwrap_or_else(|| unreachable!());
        assert_eq!(err.class, ErrorClass::Malformed);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            "3".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(
            "retry-after",
            "soon".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(retry_after(&h), None);
    }

    type TestBody = http_body_util::StreamBody<
        futures::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, std::io::Error>>,
    >;

    /// A body of `frames`, all there at once; then silent forever when `stall` is set.
    fn body_of(frames: &[&'static str], stall: bool) -> TestBody {
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = frames
            .iter()
            .map(|t| Ok(http_body::Frame::data(Bytes::from_static(t.as_bytes()))))
            .collect();
        let tail = match stall {
            true => futures::stream::pending().boxed(),
            false => futures::stream::empty().boxed(),
        };
        http_body_util::StreamBody::new(futures::stream::iter(frames).chain(tail).boxed())
    }

    fn bounds(first_byte_ms: u64, idle_ms: u64) -> Timeouts {
        Timeouts {
            headers: Duration::ZERO,
            first_byte: Duration::from_millis(first_byte_ms),
            idle: Duration::from_millis(idle_ms),
            max_bytes: 0,
        }
    }

    /// Reads `body` to its end: each frame's text, or the stall that ended it.
    async fn read_all<B>(mut body: TimedBody<B>) -> Vec<Result<String, BodyStalled>>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        use http_body_util::BodyExt;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => out.push(Ok(String::from_utf8_lossy(
                    &f.into_data().unwrap_or_default(),
                )
                .into_owned())),
                Err(BodyError::Stalled(s)) => {
                    out.push(Err(s));
                    break;
                }
                Err(BodyError::Read(e)) => unreachable!("{e:?}"),
                Err(BodyError::TooLarge(t)) => unreachable!("{t:?}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn a_body_over_its_size_bound_fails_and_one_at_it_is_read_whole() {
        use http_body_util::BodyExt;
        let bound = Timeouts {
            max_bytes: 8,
            ..bounds(0, 0)
        };
        let at = TimedBody::new(body_of(&["1234", "5678"], false), &bound);
        let Ok(whole) = at.collect().await else {
            panic!("a body at its bound failed")
        };
        assert_eq!(&whole.to_bytes()[..], b"12345678");
        let mut over = TimedBody::new(body_of(&["1234", "5678", "9"], false), &bound);
        let mut frames = 0;
        let err = loop {
            match over.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break e,
                None => panic!("the body ended without its error"),
            }
        };
        assert_eq!(frames, 2, "the frame over the bound was passed on");
        assert!(
            matches!(err, BodyError::TooLarge(BodyTooLarge { limit: 8 })),
            "{err:?}"
        );
        let e = too_large_error("p", BodyTooLarge { limit: 8 });
        let LlmError::Upstream(u) = e else {
            panic!("{e:?}")
        };
        assert_eq!(u.class, ErrorClass::Malformed);
        assert!(u.message.contains("max_response_bytes"), "{u}");
    }

    #[tokio::test]
    async fn a_silent_body_fails_after_its_first_byte_bound_then_its_idle_bound() {
        let silent = TimedBody::new(body_of(&[], true), &bounds(100, 50));
        assert_eq!(
            read_all(silent).await,
            [Err(BodyStalled {
                before_first_byte: true,
                after: Duration::from_millis(100)
            })]
        );
        let stalls_later = TimedBody::new(body_of(&["a", "b"], true), &bounds(100, 50));
        assert_eq!(
            read_all(stalls_later).await,
            [
                Ok("a".into()),
                Ok("b".into()),
                Err(BodyStalled {
                    before_first_byte: false,
                    after: Duration::from_millis(50)
                })
            ]
        );
        let complete = TimedBody::new(body_of(&["a", "b"], false), &bounds(100, 50));
        assert_eq!(read_all(complete).await, [Ok("a".into()), Ok("b".into())]);
        let unbounded = TimedBody::new(body_of(&["a"], true), &bounds(0, 0));
        let waited = tokio::time::timeout(Duration::from_millis(300), read_all(unbounded)).await;
        assert!(waited.is_err(), "zero means no bound: {waited:?}");
    }

    #[tokio::test]
    async fn a_slow_reader_does_not_run_the_upstreams_clock() {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<&'static str>(4);
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|t| {
                Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(t.as_bytes())))
            })
            .boxed();
        let mut body = TimedBody::new(http_body_util::StreamBody::new(frames), &bounds(1000, 1000));
        tx.send("a").await.unwrap_or_else(|_| unreachable!());
        assert!(matches!(body.frame().await, Some(Ok(_))));
        // Away for longer than the idle bound, with nothing from the upstream meanwhile: the clock
        // starts when the reader is back, so its next read waits rather than failing at once.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let waited = tokio::time::timeout(Duration::from_millis(100), body.frame()).await;
        assert!(waited.is_err(), "the reader's absence counted: {waited:?}");
        tx.send("b").await.unwrap_or_else(|_| unreachable!());
        let second = body
            .frame()
            .await
            .map(|f| f.map(|f| f.into_data().unwrap_or_default()));
        assert!(matches!(second, Some(Ok(ref b)) if b == "b"), "{second:?}");
    }

    #[tokio::test]
    async fn a_stalled_body_is_a_timeout_on_either_client() {
        use crate::testing::{FakeUpstream, Reply, Step};
        let fake = FakeUpstream::start(crate::testing::openai::OpenAiFormat)
            .await
            .unwrap_or_else(|_| unreachable!());
        let stalled = || {
            Reply::body(
                "application/json",
                vec![
                    Step::Raw("{\"id\":".into()),
                    Step::AwaitRelease,
                    Step::Raw("1}".into()),
                ],
            )
        };
        let t = bounds(5_000, 200);
        // reqwest.
        fake.push(stalled());
        let url = format!("{}/v1/chat/completions", fake.base_url());
        let rb = client(&HttpOptions::default())
            .unwrap_or_else(|_| unreachable!())
            .post(&url)
            .body("{}");
        let resp = send("p", &t, rb, |_, _| None)
            .await
            .unwrap_or_else(|_| unreachable!());
        let err = match resp.bytes().await {
            Ok(b) => unreachable!("{b:?}"),
            Err(e) => transport_error("p", &e),
        };
        let u = err.as_upstream().cloned().unwrap_or_else(|| unreachable!());
        assert_eq!(u.class, ErrorClass::Timeout, "{u}");
        assert!(u.message.contains("idle_timeout"), "{u}");
        // The lean client.
        fake.push(stalled());
        let uri: http::Uri = url.parse().unwrap_or_else(|_| unreachable!());
        let lean = Lean::direct(&uri).unwrap_or_else(|_| unreachable!());
        let req = lean_json_post(&uri, HeaderMap::new(), b"{}".to_vec());
        let answer = send_lean("p", &t, &lean, req, |_, _| None)
            .await
            .unwrap_or_else(|_| unreachable!());
        let u = answer
            .bytes("p")
            .await
            .err()
            .and_then(|e| e.as_upstream().cloned())
            .unwrap_or_else(|| unreachable!());
        assert_eq!(u.class, ErrorClass::Timeout, "{u}");
        assert!(u.message.contains("idle_timeout"), "{u}");
        // Both connections were closed, not kept for another call.
        assert!(fake.wait_cancelled(2, Duration::from_secs(10)).await);
        fake.release();
    }
}
