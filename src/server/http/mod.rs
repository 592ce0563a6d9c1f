//! The HTTP router on the main listener (everything that is not `application/grpc`), behind the
//! same pipeline as gRPC (request id, auth, rate limit, audit):
//!
//! - `POST /v1/chat/completions`, `GET /v1/models`: the OpenAI-compatible API ([`openai`]);
//! - `POST /request`, `GET /updates`: the prompt/SSE API ([`prompt`]);
//! - `GET /status`, `GET /health` ([`status`]);
//! - `POST /plugins/{name}/exec`: a catalog plugin's output as server-sent events ([`catalog`]).
//!
//! Handlers are codecs over the core ([`crate::gateway`]): they decode the request, call a use
//! case and encode its answer. This module holds what they share: the caller, JSON body and
//! `Accept` checks, SSE framing and the HTTP metrics.
//!
//! # Errors
//!
//! A core error answers the status, `type` and `code` of `server/error.rs` (the table is
//! `docs/errors.md`), with its stable code in the `x-chatcli-error-code` header and as
//! `chatcli_code` in the body. The codec's own refusals, before the core is called:
//!
//! | failure | status | `type` / `code` |
//! |---|---|---|
//! | malformed JSON, a wrong field | 400 | `invalid_request_error` / `invalid_json`, `invalid_request` |
//! | `Accept` refusing `text/event-stream` for a stream | 406 | `invalid_request_error` / `not_acceptable` |
//! | body over [`MAX_BODY_BYTES`] | 413 | `invalid_request_error` / `request_too_large` |
//! | `Content-Type` not JSON | 415 | `invalid_request_error` / `unsupported_media_type` |
//! | no such route, or another method | 404, 405 | `not_found_error` / `not_found`, `invalid_request_error` / `method_not_allowed` |
//!
//! The OpenAI routes answer `{"error":{"message","type","param","code"}}`; `/request` answers
//! `{"success":false,"error":"<message>","code":"<code>"}` with the same status.

mod catalog;
mod metrics;
mod openai;
mod prompt;
mod status;
mod watcher;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::{AppState, InFlightGuard, Prepared, Transport};
use crate::auth::Principal;
use crate::gateway::{Code, Gateway};
use crate::server::pipeline::AuditNotes;

/// An error answer (see `server/error.rs`).
type ApiError = crate::server::error::HttpError;

/// Largest request body accepted (JSON of a prompt with its history).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The OpenAI chat route, which [`HttpApi::serve`] also calls without the router.
const CHAT_COMPLETIONS: &str = "/v1/chat/completions";

/// The routes and their handlers.
fn routes() -> Vec<(&'static str, axum::routing::MethodRouter<Arc<Api>>)> {
    vec![
        ("/health", get(status::health)),
        ("/status", get(status::status)),
        ("/v1/models", get(openai::models)),
        (CHAT_COMPLETIONS, post(openai::chat_completions)),
        ("/request", post(prompt::request)),
        ("/updates", get(prompt::updates)),
        ("/admin/reload", post(status::admin_reload)),
        ("/plugins/{name}/exec", post(catalog::exec)),
        ("/watcher/status", get(watcher::status)),
        ("/watcher/alerts", get(watcher::alerts)),
    ]
}

/// The HTTP side of the listener: the routes, with authentication, the rate limit and the HTTP
/// metrics around them (not inside, as per-route middleware: that cost a boxed future and a
/// service clone per layer and call).
#[derive(Clone)]
pub struct HttpApi {
    router: Router,
    /// What the handlers share, for the routes [`HttpApi::serve`] calls without the router.
    api: Arc<Api>,
    /// The route templates of [`routes`], as the HTTP metrics label calls.
    labels: Arc<[&'static str]>,
    metrics: Option<metrics::HttpMetrics>,
}

impl HttpApi {
    /// Serves one request: `admit` (authentication and the rate limit) first, then the routes;
    /// every call, refused or not, counted under its route template and status.
    pub async fn serve(
        &self,
        mut req: axum::extract::Request,
        admit: impl FnOnce(&mut axum::extract::Request) -> Option<Response>,
    ) -> Response {
        use tower::ServiceExt;
        let route = route_label(&self.labels, req.uri().path());
        let started = std::time::Instant::now();
        let resp = match admit(&mut req) {
            Some(refused) => refused,
            // The hot route straight to its handler: the router's matching, its boxed handler
            // service and futures cost about 5k instructions per call (bench/HISTORY.md, step 20).
            // Every other method and path (405s included) takes the router.
            None if route == CHAT_COMPLETIONS && req.method() == http::Method::POST => {
                let (mut parts, body) = req.into_parts();
                match Caller::take(&mut parts) {
                    Ok(caller) => {
                        let req = axum::extract::Request::from_parts(parts, body);
                        openai::chat_completions(State(self.api.clone()), caller, req).await
                    }
                    Err(e) => e.into_response(),
                }
            }
            None => match self.router.clone().oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            },
        };
        match &self.metrics {
            Some(m) => m.track(route, started, resp),
            None => resp,
        }
    }
}

/// The route template among `labels` that `path` is, or `unmatched`. A `{param}` segment of a
/// template matches any one non-empty segment.
fn route_label(labels: &[&'static str], path: &str) -> &'static str {
    let matches = |template: &str| {
        template == path
            || (template.contains('{') && {
                let (mut t, mut p) = (template.split('/'), path.split('/'));
                loop {
                    match (t.next(), p.next()) {
                        (None, None) => break true,
                        (Some(ts), Some(ps)) if ts.starts_with('{') && !ps.is_empty() => {}
                        (Some(ts), Some(ps)) if ts == ps => {}
                        _ => break false,
                    }
                }
            })
    };
    labels
        .iter()
        .find(|r| matches(r))
        .copied()
        .unwrap_or("unmatched")
}

/// The HTTP side, its metrics registered beside the gRPC series.
pub fn api(state: Arc<AppState>) -> HttpApi {
    let http_metrics =
        state
            .metrics
            .as_ref()
            .and_then(|m| match metrics::HttpMetrics::register(m.registry()) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP metrics could not be registered");
                    None
                }
            });
    let api = Arc::new(Api {
        state: state.clone(),
        session_locks: Default::default(),
    });
    let routes = routes();
    let labels = routes.iter().map(|(path, _)| *path).collect();
    let router = routes
        .into_iter()
        .fold(Router::new(), |r, (path, handler)| r.route(path, handler))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api.clone());
    HttpApi {
        router,
        api,
        labels,
        metrics: http_metrics,
    }
}

/// What the handlers share.
#[derive(Debug)]
struct Api {
    state: Arc<AppState>,
    session_locks: crate::gateway::SessionLocks,
}

impl Api {
    /// Counts a prompt call (`/v1/chat/completions`, `/request`) in flight until the guard is
    /// dropped; streams hold it until they end.
    fn busy(&self) -> InFlightGuard {
        self.state.in_flight.enter(Transport::Http)
    }

    /// The core for a call on `prepared`.
    fn core<'a>(&'a self, prepared: &'a Prepared) -> Gateway<'a> {
        self.state.gateway(prepared)
    }

    /// One of the caller's concurrent-stream slots, held until the stream ends.
    fn stream_slot(
        &self,
        prepared: &Prepared,
        key: &str,
    ) -> Result<Option<crate::server::ratelimit::StreamGuard>, ApiError> {
        Ok(self.state.stream_slot(prepared, key)?)
    }
}

/// Who is calling and the config snapshot of the call, as the pipeline put them in the request.
struct Caller {
    principal: Principal,
    prepared: Arc<Prepared>,
    notes: Arc<AuditNotes>,
    /// The client's `x-request-id`, else a fresh id; names the call in `/updates` events.
    request_id: String,
    /// The caller's rate-limit bucket and stream-cap name.
    limit_key: String,
}

impl FromRequestParts<Arc<Api>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<Api>) -> Result<Self, ApiError> {
        Self::take(parts)
    }
}

impl Caller {
    /// The caller of the request `parts` belong to (see [`Caller`]'s extractor).
    fn take(parts: &mut Parts) -> Result<Self, ApiError> {
        // The pipeline always sets the principal; without it the request did not pass auth.
        // Taken, not cloned: nothing after this extractor reads the call's context.
        let ctx = parts.extensions.remove::<super::pipeline::CallContext>();
        let (principal, limit_key, prepared, notes, request_id) = match ctx {
            Some(super::pipeline::CallContext {
                principal: Some(principal),
                limit_key,
                prepared,
                notes,
                request_id,
                ..
            }) => (principal, limit_key, prepared, notes, request_id),
            _ => return Err(ApiError::from(crate::gateway::Error::Unauthenticated)),
        };
        let request_id = super::pipeline::request_id_string(&request_id);
        let limit_key = limit_key.unwrap_or_else(|| principal.limit_key(None));
        Ok(Self {
            principal,
            prepared,
            notes,
            request_id,
            limit_key,
        })
    }
}

/// A core error as the caller's answer; a refused permission is also noted for the audit record.
fn refusal(notes: &AuditNotes, e: crate::gateway::Error) -> ApiError {
    if e.code() == Code::PermissionDenied {
        notes.denied();
    }
    ApiError::from(e)
}

/// Reads a JSON body: the content type must be JSON, the body within [`MAX_BODY_BYTES`] (a larger
/// `Content-Length` is refused before reading) and well-formed, and `T` must accept it. Otherwise
/// the body is read before the checks, so a refused request leaves the connection usable.
async fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return too_large();
                }
                if s.is::<crate::server::pipeline::BodyReadTimeout>() {
                    return ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "invalid_request_error",
                        "request_timeout",
                        "the request body was not sent in time",
                    );
                }
                source = s.source();
            }
            ApiError::invalid(
                "invalid_body",
                format!("the request body could not be read: {e}"),
            )
        })?;
    check_json(headers, &body)
}

/// The content-type and JSON checks of [`json_body`].
fn check_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    let given = headers.get(header::CONTENT_TYPE);
    // What nearly every client sends, checked without copying it.
    let plain = given.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"application/json"));
    let ct = given
        .filter(|_| !plain)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let is_json = plain
        || ct.as_deref().is_some_and(|ct| {
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            essence == "application/json"
                || (essence.starts_with("application/") && essence.ends_with("+json"))
        });
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            match ct {
                Some(ct) => format!(
                    "Content-Type must be application/json, not `{}`",
                    ct.chars().take(100).collect::<String>()
                ),
                None => "Content-Type must be application/json (the header is missing)".into(),
            },
        ));
    }
    // From `str` when the body is UTF-8 (serde_json then skips checking each string again);
    // from bytes otherwise, for serde_json's own error about the bad byte.
    let parsed = match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    };
    parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::invalid("invalid_request", format!("invalid request: {e}"))
        }
        _ => ApiError::invalid("invalid_json", format!("malformed JSON: {e}")),
    })
}

/// Whether the `Accept` header admits an SSE answer (also `application/json` when `json_too`:
/// OpenAI clients send `Accept: application/json` for streams). No header admits anything.
fn accepts_event_stream(headers: &HeaderMap, json_too: bool) -> bool {
    let values: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if values.is_empty() {
        return true;
    }
    let ranges: Vec<(String, f32)> = values
        .iter()
        .flat_map(|v| v.split(','))
        .filter_map(|r| {
            let mut parts = r.split(';');
            let range = parts.next()?.trim().to_ascii_lowercase();
            if range.is_empty() {
                return None;
            }
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            Some((range, q))
        })
        .collect();
    let admits = |(ty, sub): (&str, &str)| {
        // The most specific range decides (RFC 9110 §12.5.1).
        let exact = format!("{ty}/{sub}");
        let wild = format!("{ty}/*");
        [exact.as_str(), wild.as_str(), "*/*"]
            .iter()
            .find_map(|want| ranges.iter().find(|(r, _)| r == want).map(|(_, q)| *q))
            .is_some_and(|q| q > 0.0)
    };
    admits(("text", "event-stream")) || (json_too && admits(("application", "json")))
}

fn not_acceptable() -> ApiError {
    ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "invalid_request_error",
        "not_acceptable",
        "a streamed answer is text/event-stream, which the Accept header refuses",
    )
}

/// Token usage as the OpenAI-shaped answers and `/request` report it.
#[derive(serde::Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl From<crate::llm::Usage> for UsageOut {
    fn from(u: crate::llm::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// A 200 answer of JSON already written.
fn json_bytes_response(body: Vec<u8>) -> Response {
    let mut resp = Response::new(axum::body::Body::from(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// One SSE `data:` event carrying `value` as JSON, serialized straight into the frame (JSON text
/// never holds a raw line break, so it is one `data:` line).
fn sse_json(value: &impl serde::Serialize) -> bytes::Bytes {
    let mut buf = Vec::with_capacity(320);
    buf.extend_from_slice(b"data: ");
    // Serializing our plain response structs cannot fail.
    let _ = serde_json::to_writer(&mut buf, value);
    buf.extend_from_slice(b"\n\n");
    bytes::Bytes::from(buf)
}

/// Asks proxies in front (nginx) not to buffer an event stream.
const X_ACCEL_BUFFERING: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-accel-buffering");

/// An SSE response over ready-made frames (see [`sse_json`]): the headers of axum's `Sse` and
/// [`sse_headers`], without re-scanning and copying each event.
fn sse_frames(frames: impl futures::Stream<Item = bytes::Bytes> + Send + 'static) -> Response {
    use futures::StreamExt;
    let body = axum::body::Body::from_stream(frames.map(Ok::<_, std::convert::Infallible>));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    sse_headers(resp)
}

/// SSE responses also tell proxies not to buffer them.
fn sse_headers(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    resp
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn every_route_is_labelled_by_its_template_and_nothing_else_is() {
        let labels: Vec<&'static str> = routes().iter().map(|(p, _)| *p).collect();
        assert_eq!(
            labels,
            [
                "/health",
                "/status",
                "/v1/models",
                "/v1/chat/completions",
                "/request",
                "/updates",
                "/admin/reload",
                "/plugins/{name}/exec",
                "/watcher/status",
                "/watcher/alerts",
            ]
        );
        for path in &labels {
            assert_eq!(route_label(&labels, path), *path);
        }
        assert_eq!(
            route_label(&labels, "/plugins/tool/exec"),
            "/plugins/{name}/exec"
        );
        for path in [
            "/plugins//exec",
            "/plugins/a/b/exec",
            "/plugins/tool/exec/",
            "/",
            "/v1/chat/completions/",
            "/v1/chat",
            "/healthz",
            "/health?x=1",
        ] {
            assert_eq!(route_label(&labels, path), "unmatched", "{path}");
        }
    }

    #[test]
    fn accept_negotiation_picks_the_most_specific_range() {
        assert!(accepts_event_stream(&HeaderMap::new(), false));
        assert!(accepts_event_stream(&accept("text/event-stream"), false));
        assert!(accepts_event_stream(&accept("*/*"), false));
        assert!(accepts_event_stream(&accept("text/*;q=0.5"), false));
        assert!(accepts_event_stream(
            &accept("application/json, text/event-stream;q=0.1"),
            false
        ));
        assert!(!accepts_event_stream(&accept("application/json"), false));
        assert!(accepts_event_stream(&accept("application/json"), true));
        assert!(!accepts_event_stream(&accept("text/html"), true));
        assert!(!accepts_event_stream(
            &accept("*/*, text/event-stream;q=0"),
            false
        ));
    }

    #[test]
    fn json_bodies_are_checked_in_order() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)] // reason: only deserialised
        struct T {
            a: u32,
        }
        let json = {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            h
        };
        let ok: Result<T, _> = check_json(&json, br#"{"a":1}"#);
        assert!(ok.is_ok());
        let e = check_json::<T>(&HeaderMap::new(), b"{}").unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let e = check_json::<T>(&json, b"{\"a\":").unwrap_err();
        assert_eq!(
            (e.status, e.code.as_ref()),
            (StatusCode::BAD_REQUEST, "invalid_json")
        );
        let e = check_json::<T>(&json, br#"{"a":1,"b":2}"#).unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.message.contains("unknown field `b`"), "{}", e.message);
        // Bytes that are not UTF-8 inside a string: malformed, as serde_json words it.
        let e = check_json::<T>(&json, b"{\"a\xff\":1}").unwrap_err();
        assert_eq!(e.code, "invalid_json", "{}", e.message);
        assert!(e.message.contains("invalid unicode"), "{}", e.message);
        // The plain content type in any case, and `+json` types.
        for ct in [
            "application/json",
            "Application/JSON",
            "application/vnd.x+json",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert!(check_json::<T>(&h, br#"{"a":1}"#).is_ok(), "{ct}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/jsonx"),
        );
        assert!(check_json::<T>(&h, br#"{"a":1}"#).is_err());
    }
}
