//! The prompt/SSE API: `POST /request` and `GET /updates`.
//!
//! `POST /request` takes `{prompt, stream?, max_tokens?, provider?, model?, session?}` (other fields
//! are refused). Without `stream` it answers `{"success":true,"response","provider","model","usage"}`;
//! with it, SSE events `{"type":"delta","data":{"delta"}}` per delta, then
//! `{"type":"response_complete","data":{"provider","model","usage"}}` and `{"done":true}`; a failure
//! after the first delta sends `{"type":"error","data":{"message","code"}}` then `{"done":true}`.
//! Failures before the first delta answer a status with `{"success":false,"error","code"}`.
//!
//! `session` names a session of the caller (created on first use): its chat history is the
//! history, and the new user and assistant turns are appended and saved (an atomic file write) once
//! the answer is complete. Readonly principals get 403 for any call naming a session.
//!
//! Every event of a `/request` call is also published on the [`EventBus`](crate::server::events)
//! that `GET /updates` streams, tagged with the call's request id and principal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, ApiError, Caller, UsageOut};
use crate::llm::fallback::Answer;
use crate::llm::gateway::PromptCall;
use crate::llm::{Delta, LlmError, Message};
use crate::server::events::{Received, Scope, Update, owner_key};
use crate::server::grpc::{MAX_TOKENS_LIMIT, validate_history, validate_prompt};
use crate::sessions::{SessionData, SessionError, StoredMessage};
use crate::telemetry::SessionOperation;

/// How often `/updates` sends a `: ping` comment so proxies keep it open.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// How often `/updates` checks whether the server is draining (then it ends).
const DRAIN_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptRequest {
    prompt: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

/// A session's lock, held while its turn is appended.
type SessionLock = Arc<tokio::sync::Mutex<()>>;

/// One lock per (namespace, session) so concurrent calls on a session append both turns.
#[derive(Debug, Default)]
pub(super) struct SessionLocks {
    inner: Mutex<HashMap<(String, String), SessionLock>>,
}

impl SessionLocks {
    fn get(&self, ns: &str, name: &str) -> SessionLock {
        let mut map = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget locks nobody holds, so the map stays as small as the calls in flight.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry((ns.to_string(), name.to_string()))
            .or_default()
            .clone()
    }
}

/// The session a call continues.
struct SessionTurn {
    namespace: String,
    name: String,
}

fn session_error(e: &SessionError) -> ApiError {
    let mut err = ApiError::from_status(&e.to_status());
    if matches!(e, SessionError::NotFound { .. }) {
        err.code = "session_not_found".into();
    }
    err
}

/// Publishes the events of one call on the bus.
#[derive(Clone)]
struct Publisher {
    api: Arc<Api>,
    request_id: String,
    principal: String,
    owner: String,
}

impl Publisher {
    fn send(&self, kind: &'static str, data: &Value) {
        self.api.state.events.publish(Update {
            kind,
            data: data.clone(),
            request_id: self.request_id.clone(),
            principal: self.principal.clone(),
            owner: self.owner.clone(),
        });
    }
}

/// `POST /request`.
pub(super) async fn request(State(api): State<Arc<Api>>, caller: Caller, req: Request) -> Response {
    let publisher = Publisher {
        api: api.clone(),
        request_id: caller.request_id.clone(),
        principal: caller.principal.id.clone(),
        owner: owner_key(&caller.principal),
    };
    match run(api, caller, req, publisher.clone()).await {
        Ok(r) => r,
        Err(Failure::Refused(e)) => e.into_request_response(),
        Err(Failure::Failed(e)) => {
            publisher.send(
                "error",
                &json!({"message": e.message, "code": e.code.as_ref()}),
            );
            e.into_request_response()
        }
    }
}

/// Why a call got no answer: refused before reaching a provider (not an event), or failed there.
enum Failure {
    Refused(ApiError),
    Failed(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Refused(e)
    }
}

async fn run(
    api: Arc<Api>,
    caller: Caller,
    req: Request,
    publisher: Publisher,
) -> Result<Response, Failure> {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let req: PromptRequest = super::json_body(&headers, body).await?;
    let stream = req.stream.unwrap_or(false);
    if stream && !super::accepts_event_stream(&headers, false) {
        return Err(super::not_acceptable().into());
    }
    let prepared = caller.prepared.clone();
    validate_prompt(&req.prompt, &prepared).map_err(|s| ApiError::from_status(&s))?;
    if req
        .max_tokens
        .is_some_and(|n| n > MAX_TOKENS_LIMIT.unsigned_abs())
    {
        return Err(ApiError::invalid(
            "invalid_request",
            format!("max_tokens must be at most {MAX_TOKENS_LIMIT}"),
        )
        .into());
    }
    let session = match req.session.filter(|s| !s.is_empty()) {
        None => None,
        Some(name) => {
            caller.notes.resource(&name);
            crate::sessions::validate_name(&name).map_err(|e| session_error(&e))?;
            if !caller.principal.can_write() {
                caller.notes.denied();
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    "permission_denied",
                    "readonly principals cannot write sessions",
                )
                .into());
            }
            Some(SessionTurn {
                namespace: caller.principal.session_namespace(),
                name,
            })
        }
    };
    let history = match &session {
        None => Vec::new(),
        Some(s) => load(&api, s).await?.chat_history,
    };
    let history_proto: Vec<crate::proto::ChatMessage> = history
        .iter()
        .map(|m| crate::proto::ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
            meta: None,
        })
        .collect();
    validate_history(&history_proto, &prepared).map_err(|s| ApiError::from_status(&s))?;
    let call = PromptCall {
        provider: req.provider.unwrap_or_default(),
        model: req.model.unwrap_or_default(),
        history: history
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect(),
        prompt: req.prompt.clone(),
        max_tokens: req.max_tokens.filter(|n| *n > 0),
        unary: !stream,
        ..Default::default()
    };
    let slot = match stream {
        true => api.stream_slot(&prepared, &caller.limit_key)?,
        false => None,
    };
    let busy = api.busy();
    let answer = api.start(&prepared, call).await.map_err(Failure::Failed)?;
    caller.notes.answered_by(&answer.provider, &answer.model);
    let notes = caller.notes.clone();
    let Answer {
        provider,
        model,
        stream: mut upstream,
        ..
    } = answer;
    let prompt = req.prompt;

    if !stream {
        let mut text = String::new();
        let mut usage = None;
        while let Some(item) = upstream.next().await {
            match item {
                Ok(Delta::Text(t)) if t.is_empty() => {}
                Ok(Delta::Text(t)) => {
                    publisher.send("delta", &json!({ "delta": t }));
                    text.push_str(&t);
                }
                Ok(Delta::Usage(u)) => usage = Some(u),
                Ok(Delta::Finish(_)) => {}
                Err(e) => return Err(Failure::Failed(ApiError::from_llm(&e))),
            }
        }
        if let Some(s) = &session {
            save_turn(&api, s, prompt, text.clone())
                .await
                .map_err(Failure::Failed)?;
        }
        let complete =
            json!({"provider": provider, "model": model, "usage": usage.map(UsageOut::from)});
        publisher.send("response_complete", &complete);
        drop(busy);
        return Ok(Json(json!({
            "success": true,
            "response": text,
            "provider": provider,
            "model": model,
            "usage": usage.map(UsageOut::from),
        }))
        .into_response());
    }

    // One event per delta as the provider yields it; dropping this stream (the client went away)
    // drops the provider's, which aborts the upstream request, and saves nothing.
    let out = async_stream::stream! {
        let _slot = slot;
        let _busy = busy;
        let mut text = String::new();
        let mut usage = None;
        let mut failure: Option<ApiError> = None;
        while let Some(item) = upstream.next().await {
            match item {
                Ok(Delta::Text(t)) if t.is_empty() => {}
                Ok(Delta::Text(t)) => {
                    let data = json!({ "delta": t });
                    publisher.send("delta", &data);
                    text.push_str(&t);
                    yield Ok::<_, std::convert::Infallible>(event("delta", data));
                }
                Ok(Delta::Usage(u)) => usage = Some(u),
                Ok(Delta::Finish(_)) => {}
                Err(e) => {
                    notes.failed(&e.to_string());
                    failure = Some(failed_midway(&e));
                    break;
                }
            }
        }
        if failure.is_none() && let Some(s) = &session {
            failure = save_turn(&api, s, prompt, text).await.err();
        }
        match failure {
            Some(e) => {
                let data = json!({"message": e.message, "code": e.code.as_ref()});
                publisher.send("error", &data);
                yield Ok(event("error", data));
            }
            None => {
                let data = json!({"provider": provider, "model": model, "usage": usage.map(UsageOut::from)});
                publisher.send("response_complete", &data);
                yield Ok(event("response_complete", data));
            }
        }
        yield Ok(Event::default().data(json!({"done": true}).to_string()));
    };
    Ok(super::sse_headers(Sse::new(out).into_response()))
}

fn failed_midway(e: &LlmError) -> ApiError {
    tracing::debug!(error = %e, "stream failed after its first delta");
    ApiError::from_llm(e)
}

fn event(kind: &str, data: Value) -> Event {
    Event::default().data(json!({"type": kind, "data": data}).to_string())
}

/// The session, or a new empty one.
async fn load(api: &Api, s: &SessionTurn) -> Result<SessionData, ApiError> {
    if let Some(m) = &api.state.metrics {
        m.session_operation(SessionOperation::Load);
    }
    match api.state.sessions.load(&s.namespace, &s.name).await {
        Ok(d) => Ok(d),
        Err(SessionError::NotFound { .. }) => Ok(SessionData::default()),
        Err(e) => Err(session_error(&e)),
    }
}

/// Appends the turn to the session as it is now (another call may have added one meanwhile).
async fn save_turn(
    api: &Api,
    s: &SessionTurn,
    prompt: String,
    answer: String,
) -> Result<(), ApiError> {
    let lock = api.session_locks.get(&s.namespace, &s.name);
    let _held = lock.lock().await;
    let mut data = load(api, s).await?;
    data.chat_history.push(StoredMessage {
        role: "user".into(),
        content: prompt,
        meta: None,
    });
    data.chat_history.push(StoredMessage {
        role: "assistant".into(),
        content: answer,
        meta: None,
    });
    if let Some(m) = &api.state.metrics {
        m.session_operation(SessionOperation::Save);
    }
    api.state
        .sessions
        .save(&s.namespace, &s.name, data)
        .await
        .map_err(|e| {
            tracing::warn!(session = %s.name, error = %e, "saving the session turn failed");
            session_error(&e)
        })
}

/// `GET /updates`: the caller's `/request` events (everyone's for admins) as SSE.
pub(super) async fn updates(
    State(api): State<Arc<Api>>,
    caller: Caller,
    headers: HeaderMap,
) -> Response {
    if !super::accepts_event_stream(&headers, false) {
        return super::not_acceptable().into_response();
    }
    let slot = match api.stream_slot(&caller.prepared, &caller.limit_key) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let scope = Scope::of(&caller.principal);
    let mut sub = api.state.events.subscribe(scope.clone());
    let hello = json!({
        "type": "subscribed",
        "data": {"principal": caller.principal.id, "all": scope == Scope::All},
    });
    let out = async_stream::stream! {
        let _slot = slot;
        yield Ok::<_, std::convert::Infallible>(Event::default().data(hello.to_string()));
        let mut drain = tokio::time::interval(DRAIN_CHECK);
        loop {
            tokio::select! {
                got = sub.next() => match got {
                    Some(Received::Update(u)) => {
                        let text = serde_json::to_string(&*u).unwrap_or_default();
                        yield Ok(Event::default().data(text));
                    }
                    Some(Received::Dropped { missed }) => {
                        tracing::debug!(missed, "an /updates reader fell behind; dropped");
                        let data = json!({"type": "dropped", "data": {"missed": missed, "reason": "the reader fell behind"}});
                        yield Ok(Event::default().data(data.to_string()));
                        return;
                    }
                    None => return,
                },
                _ = drain.tick() => {
                    if api.state.is_draining() {
                        yield Ok(Event::default().data(json!({"type": "shutdown"}).to_string()));
                        return;
                    }
                }
            }
        }
    };
    super::sse_headers(
        Sse::new(out)
            .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("ping"))
            .into_response(),
    )
}
