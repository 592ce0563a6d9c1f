//! What every request on the main listener goes through, gRPC and HTTP alike, in this order:
//! request id → authentication (the failed-auth limiter first) → per-principal rate limit → the
//! gRPC routes or the HTTP router; the audit record is written when the response ends. The
//! principal goes into the request extensions, where handlers read it; they never re-parse headers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::audit::{AuditRecord, AuditResult};
use super::error::ERROR_CODE_HEADER;
use super::forwarded::ClientAddr;
use super::http::HttpApi;
use super::tls::PeerCertificates;
use super::{AppState, Prepared};
use crate::auth::{Principal, Verification};
use crate::telemetry::GrpcMetricsLayer;
use crate::telemetry::grpc_layer::{GRPC_STATUS, code_of};

/// The gRPC side as one boxed service.
pub type GrpcService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The header that carries the request id, in and out. Header names used per call are constants:
/// looking one up by `&str` parses the name again each time.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// gRPC's status message header (or trailer).
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The client's `x-request-id` when it is 1 to 128 printable ASCII characters, else a fresh one.
fn request_id_of(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&REQUEST_ID)
        .filter(|v| {
            let v = v.as_bytes();
            !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(fresh_request_id)
}

/// A request id from [`request_id_of`] as a `String` (it is ASCII, so the UTF-8 check passes).
pub(crate) fn request_id_string(id: &HeaderValue) -> String {
    match std::str::from_utf8(id.as_bytes()) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(id.as_bytes()).into_owned(),
    }
}

/// A fresh request id: a UUID v4, hyphenated.
fn fresh_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Facts about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Our address.
    pub local: Option<SocketAddr>,
    /// The peer.
    pub remote: SocketAddr,
    /// The source address of the connection's PROXY protocol header (`server.proxy_protocol`),
    /// when it carried one. It names the client only if `remote` is a trusted proxy.
    pub proxied: Option<SocketAddr>,
    /// The verified client chain (mTLS), leaf first.
    pub peer_certs: Option<PeerCertificates>,
    /// The identity of the verified client certificate.
    pub client_identity: Option<String>,
    /// The rate-limit key of unauthenticated calls from the peer, made on first use.
    pub anonymous_key: std::sync::OnceLock<String>,
}

impl ConnInfo {
    /// The rate-limit key of `principal` calling from `client` over this connection
    /// ([`Principal::limit_key`]). The peer's own key is made once per connection; a client named
    /// by a trusted proxy can differ from call to call on one connection, so its key is made each
    /// time.
    pub fn limit_key(&self, principal: &Principal, client: &ClientAddr) -> String {
        match principal.method {
            crate::auth::AuthMethod::None if !client.forwarded => self
                .anonymous_key
                .get_or_init(|| principal.limit_key(Some(client.ip)))
                .clone(),
            _ => principal.limit_key(Some(client.ip)),
        }
    }
}

/// What handlers add to the audit record of their call (resource, provider, model).
#[derive(Debug, Default)]
pub struct AuditNotes {
    inner: Mutex<Notes>,
    /// An audit record will be written: without one, notes are not taken (each costs a lock and
    /// copies of its strings).
    kept: bool,
}

#[derive(Debug, Default, Clone)]
struct Notes {
    principal: Option<Principal>,
    auth_failed: bool,
    denied: bool,
    resource: String,
    provider: Option<String>,
    model: Option<String>,
    /// Why the pipeline refused the call (for the audit record; the caller sees a generic text).
    refusal: Option<String>,
    /// Why a call whose success status had already gone out failed after all (an HTTP stream
    /// that broke off with an SSE `error` event).
    failure: Option<String>,
    /// The MCP tool calls the call's prompt made: each gets a record of its own.
    tools: Vec<crate::llm::tools::ToolReply>,
}

/// What the pipeline knows about a call, for the handlers behind it. One entry in the request's
/// extensions rather than one per fact: each entry is a boxed value and a slot in a hash map that
/// grows (and rehashes) as entries come, on every call.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The configuration snapshot the call runs under.
    pub prepared: Arc<Prepared>,
    /// The connection the call came on.
    pub conn: Arc<ConnInfo>,
    /// Who is calling from where: the TCP peer, or the client a trusted proxy names
    /// (`server.trusted_proxies`).
    pub client: ClientAddr,
    /// What the audit record will say about the call.
    pub notes: Arc<AuditNotes>,
    /// The call's id (the client's sane `x-request-id`, else a fresh one), as the response carries it.
    pub request_id: HeaderValue,
    /// Who calls, once the call is admitted.
    pub principal: Option<Principal>,
    /// The caller's rate-limit bucket and stream-cap name, once the call is admitted.
    pub limit_key: Option<String>,
}

impl AuditNotes {
    /// Notes for a call that gets an audit record when `kept`.
    fn new(kept: bool) -> Self {
        Self {
            inner: Mutex::default(),
            kept,
        }
    }
    fn with<R>(&self, f: impl FnOnce(&mut Notes) -> R) -> R {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
    /// Takes a note, when the call will have an audit record.
    fn note(&self, f: impl FnOnce(&mut Notes)) {
        if self.kept {
            self.with(f);
        }
    }
    /// The session, plugin or agent the call is about.
    pub fn resource(&self, r: &str) {
        self.note(|n| n.resource = r.to_string());
    }
    /// The provider and model that answered.
    pub fn answered_by(&self, provider: &str, model: &str) {
        self.note(|n| {
            n.provider = Some(provider.to_string());
            n.model = Some(model.to_string());
        });
    }
    /// The call was refused by RBAC.
    pub fn denied(&self) {
        self.note(|n| n.denied = true);
    }
    /// The call failed after its success status went out (an HTTP stream that ended with an SSE
    /// `error` event): the audit record says it failed, and why.
    pub fn failed(&self, why: &str) {
        self.note(|n| n.failure = Some(why.to_string()));
    }
    /// An MCP tool call the call's prompt made (server, tool, outcome and duration are recorded;
    /// never its arguments or result).
    pub fn tool_used(&self, reply: &crate::llm::tools::ToolReply) {
        self.note(|n| {
            let mut r = reply.clone();
            r.output.content.clear();
            n.tools.push(r);
        });
    }
    /// The hook that notes the tool calls of a prompt.
    pub fn tool_audit(self: &Arc<Self>) -> Option<crate::llm::tools::ToolAudit> {
        if !self.kept {
            return None;
        }
        let notes = self.clone();
        Some(crate::llm::tools::ToolAudit(Arc::new(move |r| {
            notes.tool_used(r)
        })))
    }
}

/// The notes of calls without an audit record: they take none, so all such calls share them.
static UNKEPT_NOTES: std::sync::LazyLock<Arc<AuditNotes>> =
    std::sync::LazyLock::new(|| Arc::new(AuditNotes::new(false)));

/// The per-request pipeline (cloned per connection and call: one reference count).
#[derive(Clone)]
pub struct Pipeline(Arc<Sides>);

struct Sides {
    state: Arc<AppState>,
    grpc: GrpcService,
    http: HttpApi,
}

impl Pipeline {
    /// Builds the pipeline over the gRPC routes and the HTTP router. Metrics wrap the gRPC side
    /// outside auth, so refused calls are counted too.
    pub fn new(state: Arc<AppState>, grpc: super::grpc::GrpcRoutes, http: HttpApi) -> Self {
        let router = grpc.routes.into_axum_router();
        let chat = grpc.chat;
        let guarded = {
            let state = state.clone();
            tower::service_fn(move |req: Request<Body>| {
                let state = state.clone();
                let router = router.clone();
                let chat = chat.clone();
                async move { Ok::<_, Infallible>(guard(&state, req, router, chat).await) }
            })
        };
        let grpc = match &state.metrics {
            Some(m) => {
                let layered = tower::ServiceBuilder::new()
                    .layer(GrpcMetricsLayer::new(m.clone()).with_known_methods(known_methods()))
                    .service(guarded);
                BoxCloneSyncService::new(ServiceExt::<Request<Body>>::map_response(layered, |r| {
                    r.map(Body::new)
                }))
            }
            None => BoxCloneSyncService::new(guarded),
        };
        Self(Arc::new(Sides { state, grpc, http }))
    }

    /// Handles one request.
    pub async fn handle<B>(
        self,
        conn: Arc<ConnInfo>,
        req: Request<B>,
    ) -> Result<Response<Body>, Infallible>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let sides = &*self.0;
        let started = Instant::now();
        let is_grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        // The client's id when it is a sane one, else a fresh one; built once as a header value
        // for the response and the call's context (handlers name the call by it).
        let request_id = request_id_of(req.headers());
        // Only the audit record names the method.
        let method = match (&sides.state.audit, is_grpc) {
            (None, _) => String::new(),
            (Some(_), true) => req.uri().path().to_string(),
            (Some(_), false) => format!("{} {}", req.method(), req.uri().path()),
        };
        // Without an audit record, nothing is counted or noted: every call shares one set of
        // notes that takes none.
        let (bytes_in, notes) = match sides.state.audit {
            Some(_) => (
                Some(Arc::new(AtomicU64::new(0))),
                Arc::new(AuditNotes::new(true)),
            ),
            None => (None, UNKEPT_NOTES.clone()),
        };
        let (mut parts, body) = req.into_parts();
        let prepared = sides.state.prepared();
        // An HTTP API body must arrive within the read timeout; gRPC streams have deadlines.
        let read_limit = Some(prepared.config.server.body_read_timeout)
            .filter(|d| !is_grpc && !d.is_zero() && !http_body::Body::is_end_stream(&body));
        let client = super::forwarded::client_of(
            &prepared.trusted_proxies,
            conn.remote,
            conn.proxied,
            &parts.headers,
        );
        parts.extensions.insert(CallContext {
            prepared,
            conn: conn.clone(),
            client,
            notes: notes.clone(),
            request_id: request_id.clone(),
            principal: None,
            limit_key: None,
        });
        // Only the audit record reports the bytes read.
        let body = match (&bytes_in, read_limit) {
            (Some(count), None) => Body::new(Counting {
                inner: Box::pin(body),
                count: count.clone(),
            }),
            (None, None) => Body::new(body),
            (count, Some(limit)) => {
                let timed = ReadDeadline::new(body, limit);
                match count {
                    Some(count) => Body::new(Counting {
                        inner: Box::pin(timed),
                        count: count.clone(),
                    }),
                    None => Body::new(timed),
                }
            }
        };
        let req = Request::from_parts(parts, body);
        // The record is made before the call runs, so that a call dropped before it has a
        // response (its client went away while it waited for the first delta) is audited too.
        let mut early = EarlyAudit(sides.state.audit.clone().map(|audit| PendingAudit {
            audit,
            started,
            request_id: request_id_string(&request_id),
            client_addr: client.to_string(),
            peer_addr: client.forwarded.then(|| conn.remote.to_string()),
            method,
            is_grpc,
            http_status: CLIENT_CLOSED_REQUEST,
            header_status: None,
            header_message: None,
            header_error_code: None,
            bytes_in: bytes_in.unwrap_or_default(),
            bytes_out: 0,
            notes,
            done: false,
        }));
        let mut resp = if is_grpc {
            sides.grpc.clone().oneshot(req).await?
        } else {
            // Authentication and the rate limit run inside the HTTP side, so its metrics count
            // refused calls by their route too.
            sides
                .http
                .serve(req, async |req| admit(&sides.state, req, false).await)
                .await
        };
        // Never indexed by HTTP/2's header compression: each call's id is new, so adding it to the
        // connection's table would only push out entries that repeat (and cost the insertion).
        let mut id_out = request_id.clone();
        id_out.set_sensitive(true);
        resp.headers_mut().insert(REQUEST_ID, id_out);
        // An error answered before the first message carries its stable code in the headers (an
        // HTTP answer that succeeded is not looked at).
        if let Some(m) = &sides.state.metrics
            && (is_grpc || !resp.status().is_success())
            && let Some(code) = resp.headers().get(&ERROR_CODE_HEADER)
            && let Ok(code) = code.to_str()
        {
            m.error_answered(code);
        }
        let Some(mut pending) = early.0.take() else {
            return Ok(resp);
        };
        let (parts, body) = resp.into_parts();
        pending.http_status = parts.status;
        pending.header_status = status_of(&parts.headers);
        pending.header_message = parts.headers.get(&GRPC_MESSAGE).cloned();
        pending.header_error_code = parts.headers.get(&ERROR_CODE_HEADER).cloned();
        Ok(Response::from_parts(
            parts,
            Body::new(Audited {
                inner: body,
                pending,
            }),
        ))
    }
}

/// Every gRPC method path this server knows, so metrics label anything else `unknown` instead of
/// letting unauthenticated callers mint new series.
fn known_methods() -> Vec<String> {
    use prost::Message as _;
    let mut out = Vec::new();
    for set in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(fds) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in fds.file {
            for svc in &file.service {
                for m in &svc.method {
                    out.push(format!("/{}.{}/{}", file.package(), svc.name(), m.name()));
                }
            }
        }
    }
    for v in ["v1", "v1alpha"] {
        out.push(format!(
            "/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo"
        ));
    }
    out
}

/// gRPC: authentication and the rate limit, then the routes: the ChatCLI service's methods
/// straight to it (the router's matching and boxed futures cost more than the protobuf work of a
/// call), everything else through tonic's router.
async fn guard(
    state: &AppState,
    mut req: Request<Body>,
    router: Router,
    chat: GrpcService,
) -> Response<Body> {
    if let Some(refused) = admit(state, &mut req, true).await {
        return refused;
    }
    let routed = match super::grpc::GrpcRoutes::direct(req.uri().path()) {
        true => chat.oneshot(req).await,
        false => router.oneshot(req).await,
    };
    match routed {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// Authenticates the call and applies the rate limit: `None` when admitted (the principal and the
/// limit key are then in the request's [`CallContext`]), else the refusal to send.
async fn admit(state: &AppState, req: &mut Request<Body>, is_grpc: bool) -> Option<Response<Body>> {
    match check(state, req) {
        Ok((principal, key, shared_limit)) => {
            // The shared (Redis) bucket is charged here, where a round trip can be awaited; the
            // local one was charged in `check`.
            if shared_limit && let Err(wait) = state.check_rate(&principal, &key).await {
                let secs = wait.as_secs().max(1);
                tracing::debug!(principal = %principal.id, retry_after = secs, "rate limited (shared)");
                if let Some(ctx) = req.extensions().get::<CallContext>() {
                    ctx.notes.note(|n| {
                        n.principal = Some(principal.clone());
                        n.denied = true;
                        n.refusal =
                            Some(format!("rate limit exceeded, retry after {secs} seconds"));
                    });
                }
                return Some(refuse(is_grpc, Refusal::RateLimited(secs)));
            }
            if let Some(ctx) = req.extensions_mut().get_mut::<CallContext>() {
                ctx.principal = Some(principal);
                ctx.limit_key = Some(key);
            }
            None
        }
        Err(refusal) => Some(refuse(is_grpc, refusal)),
    }
}

/// [`admit`]'s checks: the caller and their rate-limit key, or the refusal.
///
/// The failed-auth limiter never refuses a valid credential: a client address with too many
/// failures (often one shared by many callers, behind a NAT) only has its credentials checked the
/// cheap way ([`Verification::Cheap`]: tokens, certificates, HS256 JWTs, public-key JWTs that
/// verified before), and whatever does not pass that is refused with the wait, before any
/// expensive check, without charging the address again.
///
/// Returns whether the shared (Redis) rate limit still has to be charged: with the Redis backend
/// the local buckets are left alone here.
fn check(state: &AppState, req: &Request<Body>) -> Result<(Principal, String, bool), Refusal> {
    let Some(ctx) = req.extensions().get::<CallContext>() else {
        return Err(Refusal::Unauthenticated);
    };
    let (prepared, notes, conn) = (&ctx.prepared, &ctx.notes, &ctx.conn);
    let ip = ctx.client.ip;
    let exempt = crate::auth::is_exempt(req.uri().path());
    // Draining: a call that reaches a connection before its GOAWAY (or on a kept-alive HTTP/1
    // connection) is refused cleanly; the calls in flight finish. Health checks still answer.
    if !exempt && state.is_draining() {
        notes.note(|n| n.refusal = Some("the server is shutting down".into()));
        return Err(Refusal::ShuttingDown);
    }
    let throttled = state.auth_failures.is_blocked(ip);
    let verification = match throttled {
        Some(_) => Verification::Cheap,
        None => Verification::Full,
    };
    let result = prepared.auth.authenticate_as(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        conn.client_identity.as_deref(),
        verification,
    );
    let principal = match result {
        Ok(p) => p,
        Err(_) if exempt => Principal {
            id: "anonymous".into(),
            role: crate::auth::Role::ReadOnly,
            method: crate::auth::AuthMethod::None,
            email: None,
            tenant_id: None,
        },
        Err(e) => {
            let refusal = match throttled {
                Some(wait) => {
                    let secs = wait.as_secs().max(1);
                    state.auth_failures.refused();
                    // Not a warning each: an address that keeps trying would flood the log. The
                    // start of its block was logged, and each refusal is audited and counted.
                    tracing::debug!(client = %ip, path = req.uri().path(), reason = %e, retry_after = secs, "authentication refused: the address is throttled");
                    notes.note(|n| {
                        n.refusal = Some(format!(
                            "authentication failed: {e}; {}",
                            throttled_message(secs)
                        ));
                    });
                    Refusal::AuthThrottled(secs)
                }
                None => {
                    tracing::warn!(client = %ip, path = req.uri().path(), reason = %e, "authentication failed");
                    if let Some(block) = state.auth_failures.record_failure(ip) {
                        tracing::warn!(
                            client = %ip,
                            retry_after = block.as_secs(),
                            "too many failed authentication attempts from this address; further \
                             bad attempts from it are refused for {} seconds, valid credentials are still admitted",
                            block.as_secs()
                        );
                    }
                    notes.note(|n| n.refusal = Some(format!("authentication failed: {e}")));
                    Refusal::Unauthenticated
                }
            };
            notes.note(|n| n.auth_failed = true);
            // The limiter's refusal is told as what it is, with the wait, so that a caller is not
            // sent looking for another cause.
            return Err(refusal);
        }
    };
    notes.note(|n| n.principal = Some(principal.clone()));
    let key = conn.limit_key(&principal, &ctx.client);
    if !exempt && state.shared.is_some() {
        return Ok((principal, key, true));
    }
    if !exempt && let Err(wait) = state.rate_limits.check_as(&principal, &key) {
        let secs = wait.as_secs().max(1);
        tracing::debug!(principal = %principal.id, retry_after = secs, "rate limited");
        notes.note(|n| {
            n.denied = true;
            n.refusal = Some(format!("rate limit exceeded, retry after {secs} seconds"));
        });
        return Err(Refusal::RateLimited(secs));
    }
    Ok((principal, key, false))
}

enum Refusal {
    Unauthenticated,
    RateLimited(u64),
    /// The failed-auth limiter refuses the caller's address for this many seconds.
    AuthThrottled(u64),
    /// The server is draining.
    ShuttingDown,
}

impl Refusal {
    /// The stable error code of the refusal (`docs/errors.md`).
    fn code(&self) -> crate::gateway::Code {
        use crate::gateway::Code;
        match self {
            Refusal::Unauthenticated => Code::Unauthenticated,
            Refusal::RateLimited(_) => Code::RateLimited,
            Refusal::AuthThrottled(_) => Code::TooManyAuthFailures,
            Refusal::ShuttingDown => Code::ShuttingDown,
        }
    }

    /// The `Retry-After` (`retry-after` in gRPC metadata) of the refusal, in seconds.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::Unauthenticated | Refusal::ShuttingDown => None,
            Refusal::RateLimited(s) | Refusal::AuthThrottled(s) => Some(*s),
        }
    }
}

/// What a caller refused by the failed-auth limiter is told.
fn throttled_message(secs: u64) -> String {
    crate::auth::AuthError::Throttled {
        retry_after_secs: secs,
    }
    .to_string()
}

fn refuse(is_grpc: bool, why: Refusal) -> Response<Body> {
    let mut resp = if is_grpc {
        let (code, message) = match why {
            Refusal::Unauthenticated => ("16", "authentication failed".to_string()),
            Refusal::RateLimited(s) => {
                ("8", format!("rate limit exceeded, retry after {s} seconds"))
            }
            Refusal::AuthThrottled(s) => ("8", throttled_message(s)),
            Refusal::ShuttingDown => ("14", "the server is shutting down".to_string()),
        };
        let mut r = Response::new(Body::empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(GRPC_STATUS, HeaderValue::from_static(code));
        if let Ok(v) = HeaderValue::from_str(&message) {
            h.insert(GRPC_MESSAGE, v);
        }
        r
    } else {
        let (status, body) = match why {
            Refusal::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                r#"{"error":{"message":"authentication failed","type":"authentication_error","code":"unauthenticated","chatcli_code":"unauthenticated"}}"#.to_string(),
            ),
            Refusal::RateLimited(s) => (
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    r#"{{"error":{{"message":"rate limit exceeded, retry after {s} seconds","type":"rate_limit_error","code":"rate_limited","chatcli_code":"rate_limited"}}}}"#
                ),
            ),
            Refusal::AuthThrottled(s) => (
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": {
                    "message": throttled_message(s),
                    "type": "rate_limit_error",
                    "code": "too_many_auth_failures",
                    "chatcli_code": "too_many_auth_failures",
                }})
                .to_string(),
            ),
            Refusal::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":{"message":"the server is shutting down","type":"server_error","code":"shutting_down","chatcli_code":"shutting_down"}}"#.to_string(),
            ),
        };
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    };
    if let Some(s) = why.retry_after()
        && let Ok(v) = HeaderValue::from_str(&s.to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(
        ERROR_CODE_HEADER,
        HeaderValue::from_static(why.code().as_str()),
    );
    resp
}

/// The `grpc-status` in `headers`, when present and a number.
fn status_of(headers: &HeaderMap) -> Option<tonic::Code> {
    headers.get(&GRPC_STATUS).and_then(code_of)
}

/// The error of a request body that did not arrive within `server.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not sent within {0:?}")]
pub struct BodyReadTimeout(std::time::Duration);

/// A request body that fails with [`BodyReadTimeout`] once its deadline passes. The timer is made
/// only when a read has to wait, so a body that is already there costs no timer.
struct ReadDeadline<B> {
    inner: Pin<Box<B>>,
    limit: std::time::Duration,
    deadline: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> ReadDeadline<B> {
    fn new(inner: B, limit: std::time::Duration) -> Self {
        Self {
            inner: Box::pin(inner),
            limit,
            deadline: tokio::time::Instant::now() + limit,
            timer: None,
        }
    }
}

impl<B> http_body::Body for ReadDeadline<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(BodyReadTimeout(this.limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the bytes of a request body.
struct Counting<B> {
    inner: Pin<Box<B>>,
    count: Arc<AtomicU64>,
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Counting<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(Ok(f)) = &polled
            && let Some(d) = f.data_ref()
        {
            this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The audit record of one call, written exactly once when its response ends or is dropped.
struct PendingAudit {
    audit: super::audit::AuditLog,
    started: Instant,
    request_id: String,
    client_addr: String,
    peer_addr: Option<String>,
    method: String,
    is_grpc: bool,
    http_status: StatusCode,
    header_status: Option<tonic::Code>,
    header_message: Option<HeaderValue>,
    /// The stable error code the response's headers carry (`x-chatcli-error-code`).
    header_error_code: Option<HeaderValue>,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    notes: Arc<AuditNotes>,
    done: bool,
}

impl PendingAudit {
    fn finish(&mut self, trailers: Option<&HeaderMap>, ended: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let notes = self.notes.with(|n| n.clone());
        let (code, ok, error) = if self.is_grpc {
            let code = self
                .header_status
                .or_else(|| trailers.and_then(status_of))
                .unwrap_or(if ended {
                    tonic::Code::Unknown
                } else {
                    tonic::Code::Cancelled
                });
            let message = trailers
                .and_then(|t| t.get(&GRPC_MESSAGE))
                .or(self.header_message.as_ref())
                .and_then(|v| v.to_str().ok())
                .map(percent_decode);
            (
                crate::telemetry::code_name(code).to_string(),
                code == tonic::Code::Ok,
                if code == tonic::Code::Ok {
                    None
                } else {
                    message.or_else(|| Some(crate::telemetry::code_name(code).to_string()))
                },
            )
        } else {
            let ok = self.http_status.is_success() && notes.failure.is_none();
            (
                self.http_status.as_u16().to_string(),
                ok,
                notes.failure.clone().or_else(|| {
                    (!ok).then(|| {
                        self.http_status
                            .canonical_reason()
                            .unwrap_or("error")
                            .to_string()
                    })
                }),
            )
        };
        // A gRPC error after the first message carries its code in the trailers.
        let error_code = trailers
            .and_then(|t| t.get(&ERROR_CODE_HEADER))
            .or(self.header_error_code.as_ref())
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let result = if notes.auth_failed || notes.denied {
            AuditResult::Denied
        } else if ok {
            AuditResult::Ok
        } else {
            AuditResult::Error
        };
        let (principal, tenant, auth_method) = match (notes.principal, notes.auth_failed) {
            (_, true) => ("anonymous".to_string(), None, "failed".to_string()),
            (Some(p), false) => (p.id, p.tenant_id, p.method.as_str().to_string()),
            (None, false) => ("anonymous".to_string(), None, "none".to_string()),
        };
        let record = AuditRecord {
            timestamp: super::audit::now_rfc3339(),
            request_id: std::mem::take(&mut self.request_id),
            principal,
            tenant,
            auth_method,
            client_addr: std::mem::take(&mut self.client_addr),
            peer_addr: self.peer_addr.take(),
            method: std::mem::take(&mut self.method),
            resource: notes.resource,
            result,
            code,
            error_code,
            duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out,
            provider: notes.provider,
            model: notes.model,
            error: notes.refusal.or(error),
        };
        // One record per MCP tool call, after the call's own, with its request id and caller.
        let tools: Vec<AuditRecord> = notes
            .tools
            .iter()
            .map(|t| {
                let ok = t.outcome == crate::llm::tools::ToolOutcome::Ok;
                AuditRecord {
                    method: "MCP tools/call".into(),
                    resource: format!("{}/{}", t.server, t.tool),
                    result: if ok {
                        AuditResult::Ok
                    } else {
                        AuditResult::Error
                    },
                    code: t.outcome.as_str().to_string(),
                    error_code: None,
                    duration_ms: t.duration.as_secs_f64() * 1000.0,
                    bytes_in: 0,
                    bytes_out: 0,
                    provider: None,
                    model: None,
                    error: (!ok).then(|| t.outcome.as_str().to_string()),
                    ..record.clone()
                }
            })
            .collect();
        self.audit.log(record);
        for r in tools {
            self.audit.log(r);
        }
    }
}

/// gRPC percent-encodes `grpc-message`.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..(i + 3).min(s.len())], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body that writes its call's audit record when it ends or is dropped.
struct Audited {
    inner: Body,
    pending: PendingAudit,
}

impl http_body::Body for Audited {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &polled {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.pending.bytes_out += d.len() as u64;
                }
                if let Some(t) = f.trailers_ref() {
                    this.pending.finish(Some(t), true);
                }
            }
            Some(Err(_)) | None => this.pending.finish(None, true),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The status an HTTP call is audited with when its client went away before it had a response
/// (nginx's 499; never sent, as nobody is left to read it).
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// A call's audit record until the call has a response; written as cancelled if the call is
/// dropped first.
struct EarlyAudit(Option<PendingAudit>);

impl Drop for EarlyAudit {
    fn drop(&mut self) {
        if let Some(mut pending) = self.0.take() {
            pending
                .notes
                .note(|n| n.failure = Some("the client went away before the answer began".into()));
            pending.finish(None, false);
        }
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        let ended = http_body::Body::is_end_stream(&self.inner);
        self.pending.finish(None, ended);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn id_for(given: Option<&'static str>) -> String {
        let mut headers = HeaderMap::new();
        if let Some(v) = given {
            headers.insert(REQUEST_ID, HeaderValue::from_static(v));
        }
        request_id_string(&request_id_of(&headers))
    }

    #[test]
    fn a_sane_client_request_id_is_kept_and_any_other_is_replaced_by_a_uuid() {
        assert_eq!(id_for(Some("alice-1")), "alice-1");
        let long: &'static str = Box::leak("x".repeat(129).into_boxed_str());
        for bad in [None, Some(""), Some("has space"), Some(long)] {
            let id = id_for(bad);
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "{bad:?} gave {id}");
            assert_eq!(id.len(), 36, "hyphenated: {id}");
        }
        assert_ne!(id_for(None), id_for(None));
    }
}
