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

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, ApiError, Caller, UsageOut};
use crate::gateway::{Error, PromptAnswer, PromptCall};
use crate::llm::Delta;
use crate::llm::fallback::Answer;
use crate::server::events::{Received, Scope, Update, owner_key};

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
            publisher.send("error", &e.event_data());
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
    let session = req.session.filter(|s| !s.is_empty());
    if let Some(name) = &session {
        caller.notes.resource(name);
    }
    let call = PromptCall {
        provider: req.provider.unwrap_or_default(),
        model: req.model.unwrap_or_default(),
        prompt: req.prompt,
        max_tokens: req.max_tokens.filter(|n| *n > 0),
        unary: !stream,
        tool_role: Some(caller.principal.role),
        tool_audit: caller.notes.tool_audit(),
        ..Default::default()
    };
    let core = api.core(&prepared);
    let slot = match stream {
        true => api.stream_slot(&prepared, &caller.limit_key)?,
        false => None,
    };
    let busy = api.busy();
    // Failures of the providers are published as events; refusals before them are not.
    let PromptAnswer { answer, session } = core
        .session_prompt(&caller.principal, call, session)
        .await
        .map_err(|e| match e {
            Error::Provider(_) => Failure::Failed(ApiError::from(e)),
            e => Failure::Refused(super::refusal(&caller.notes, e)),
        })?;
    caller.notes.answered_by(&answer.provider, &answer.model);
    let notes = caller.notes.clone();
    let Answer {
        provider,
        model,
        stream: mut upstream,
        ..
    } = answer;

    if !stream {
        let mut text = String::new();
        let mut usage = None;
        let mut tools: Vec<Value> = Vec::new();
        while let Some(item) = upstream.next().await {
            match item {
                Ok(Delta::Text(t)) if t.is_empty() => {}
                Ok(Delta::Text(t)) => {
                    publisher.send("delta", &json!({ "delta": t }));
                    text.push_str(&t);
                }
                Ok(Delta::Usage(u)) => usage = Some(u),
                Ok(Delta::Tool(t)) => {
                    let (kind, data) = tool_event(&t);
                    publisher.send(kind, &data);
                    tools.push(json!({"type": kind, "data": data}));
                }
                Ok(Delta::Finish(_) | Delta::ToolCall(_)) => {}
                Err(e) => return Err(Failure::Failed(Error::from(e).into())),
            }
        }
        if let Some(turn) = session {
            turn.save(&core, &api.session_locks, text.clone())
                .await
                .map_err(|e| Failure::Failed(e.into()))?;
        }
        let complete =
            json!({"provider": provider, "model": model, "usage": usage.map(UsageOut::from)});
        publisher.send("response_complete", &complete);
        drop(busy);
        let mut body = json!({
            "success": true,
            "response": text,
            "provider": provider,
            "model": model,
            "usage": usage.map(UsageOut::from),
        });
        if !tools.is_empty() {
            body["tool_events"] = Value::Array(tools);
        }
        return Ok(Json(body).into_response());
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
                Ok(Delta::Tool(t)) => {
                    let (kind, data) = tool_event(&t);
                    publisher.send(kind, &data);
                    yield Ok(event(kind, data));
                }
                Ok(Delta::Finish(_) | Delta::ToolCall(_)) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "stream failed after its first delta");
                    notes.failed(&e.to_string());
                    failure = Some(Error::from(e).into());
                    break;
                }
            }
        }
        if failure.is_none() && let Some(turn) = session {
            let core = api.core(&prepared);
            failure = turn.save(&core, &api.session_locks, text).await.err().map(ApiError::from);
        }
        match failure {
            Some(e) => {
                let data = e.event_data();
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

/// A tool event as `/request` sends it: `tool_call` `{"id", "name", "server", "arguments"}` when a
/// call starts, `tool_result` `{"id", "name", "server", "outcome", "is_error", "duration_ms",
/// "result"}` when it ends.
fn tool_event(e: &crate::gateway::ToolEvent) -> (&'static str, Value) {
    use crate::gateway::ToolEvent;
    match e {
        ToolEvent::Call { call, server } => (
            "tool_call",
            json!({"id": call.id, "name": call.name, "server": server, "arguments": call.arguments}),
        ),
        ToolEvent::Result { id, name, reply } => (
            "tool_result",
            json!({
                "id": id, "name": name, "server": reply.server,
                "outcome": reply.outcome.as_str(), "is_error": reply.output.is_error,
                "duration_ms": reply.duration.as_secs_f64() * 1000.0,
                "result": reply.output.content,
            }),
        ),
    }
}

fn event(kind: &str, data: Value) -> Event {
    Event::default().data(json!({"type": kind, "data": data}).to_string())
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
