//! `chatcli.v1.ChatCLIService` as a codec over the core ([`crate::gateway`]): each handler decodes
//! the request, calls a use case and encodes its answer, or its error through `server/error.rs`.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::{AppState, Prepared, Transport, error};
use crate::auth::Principal;
use crate::gateway::{Code, Error, Gateway, PromptCall, admin, whole_seconds};
use crate::llm::fallback::Answer;
use crate::llm::{ClientCredentials, Delta, Message};
use crate::proto::chat_cli_service_server::{ChatCliService, ChatCliServiceServer};
use crate::proto::*;
use crate::server::pipeline::{AuditNotes, CallContext};
use crate::sessions::SessionData;

/// About how many bytes of already-waiting text StreamPrompt merges into one message.
const STREAM_CHUNK_TARGET: usize = 200;

/// The service implementation.
#[derive(Debug, Clone)]
pub struct ChatCliGrpc {
    state: Arc<AppState>,
}

/// The gRPC services: all of them behind tonic's router, and the ChatCLI service once more on its
/// own, which the pipeline calls without the router (see [`GrpcRoutes::direct`]).
pub struct GrpcRoutes {
    /// The ChatCLI service, `grpc.health.v1`, and reflection when both of its switches are on.
    pub routes: tonic::service::Routes,
    /// The ChatCLI service itself, for calls whose path starts with [`CHAT_PATH_PREFIX`].
    pub chat: super::pipeline::GrpcService,
}

/// The path prefix of every ChatCLI method (`/chatcli.v1.ChatCLIService/`).
pub const CHAT_PATH_PREFIX: &str = "/chatcli.v1.ChatCLIService/";

impl GrpcRoutes {
    /// Whether a call to `path` goes to [`GrpcRoutes::chat`] without the router: the ChatCLI
    /// service's methods (the router picks the same service by the same prefix; unknown methods
    /// under it answer `UNIMPLEMENTED` from the service either way).
    pub fn direct(path: &str) -> bool {
        path.starts_with(CHAT_PATH_PREFIX)
    }
}

/// Builds the gRPC routes: the ChatCLI service, `grpc.health.v1`, and reflection when both of its
/// switches are on.
pub fn routes(
    state: &Arc<AppState>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> GrpcRoutes {
    let prepared = state.prepared();
    let server = &prepared.config.server;
    let svc = ChatCliServiceServer::new(ChatCliGrpc {
        state: state.clone(),
    })
    .max_decoding_message_size(server.max_recv_msg_size)
    .max_encoding_message_size(server.max_send_msg_size);
    let chat = {
        use tower::ServiceExt;
        tower::util::BoxCloneSyncService::new(
            ServiceExt::<http::Request<axum::body::Body>>::map_response(
                svc.clone(),
                |r: http::Response<tonic::body::Body>| r.map(axum::body::Body::new),
            ),
        )
    };
    let mut routes = tonic::service::Routes::new(svc).add_service(health);
    match (server.reflection, server.reflection_env) {
        (true, true) => {
            let builder = || {
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            };
            match (builder().build_v1(), builder().build_v1alpha()) {
                (Ok(v1), Ok(v1alpha)) => {
                    routes = routes.add_service(v1).add_service(v1alpha);
                    tracing::info!("gRPC reflection is on");
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "gRPC reflection could not be built")
                }
            }
        }
        (true, false) => tracing::warn!(
            "gRPC reflection stays off: --enable-reflection is set but CHATCLI_GRPC_REFLECTION=true is missing"
        ),
        (false, true) => tracing::warn!(
            "gRPC reflection stays off: CHATCLI_GRPC_REFLECTION=true is set but --enable-reflection (server.reflection) is missing"
        ),
        (false, false) => {}
    }
    GrpcRoutes { routes, chat }
}

fn context<T>(req: &Request<T>) -> Option<&CallContext> {
    req.extensions().get::<CallContext>()
}

fn snapshot<T>(state: &AppState, req: &Request<T>) -> Arc<Prepared> {
    context(req).map_or_else(|| state.prepared(), |c| c.prepared.clone())
}

/// The admitted caller. The pipeline admits every call before it reaches a handler; a call that
/// somehow was not admitted gets a read-only anonymous principal, never more.
fn principal<T>(req: &Request<T>) -> Principal {
    context(req)
        .and_then(|c| c.principal.clone())
        .unwrap_or_else(|| Principal {
            id: "anonymous".into(),
            role: crate::auth::Role::ReadOnly,
            method: crate::auth::AuthMethod::None,
            email: None,
            tenant_id: None,
        })
}

fn notes<T>(req: &Request<T>) -> Arc<AuditNotes> {
    context(req).map(|c| c.notes.clone()).unwrap_or_default()
}

/// The status of a core error; a refused permission is also noted for the audit record.
fn fail(notes: &AuditNotes, e: &Error) -> Status {
    if e.code() == Code::PermissionDenied {
        notes.denied();
    }
    error::to_status(e)
}

/// SendPromptRequest and StreamPromptRequest are two message types with the same fields.
macro_rules! prompt_fields {
    ($r:expr) => {{
        let r = $r;
        PromptFields {
            prompt: r.prompt,
            history: r.history,
            max_tokens: r.max_tokens,
            provider: r.provider,
            model: r.model,
            client_api_key: r.client_api_key,
            provider_config: r.provider_config,
        }
    }};
}

/// The fields SendPrompt and StreamPrompt share.
struct PromptFields {
    prompt: String,
    history: Vec<ChatMessage>,
    max_tokens: i32,
    provider: String,
    model: String,
    client_api_key: String,
    provider_config: std::collections::HashMap<String, String>,
}

/// The caller's deadline from the `grpc-timeout` header.
fn deadline<T>(req: &Request<T>) -> Option<Instant> {
    const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
    let v = req.metadata().as_ref().get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

impl PromptFields {
    /// Decodes the request into the core call; `provider_config` is checked before it becomes
    /// credentials (the core validates the rest when the call starts).
    fn into_call(self, core: &Gateway<'_>, deadline: Option<Instant>) -> Result<PromptCall, Error> {
        core.validate_provider_config(&self.provider_config)?;
        let max_tokens =
            u32::try_from(self.max_tokens).map_err(|_| Error::MaxTokensOutOfRange {
                limit: crate::gateway::MAX_TOKENS_LIMIT,
            })?;
        Ok(PromptCall {
            provider: self.provider,
            model: self.model,
            history: self
                .history
                .into_iter()
                .map(|m| Message {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
            prompt: self.prompt,
            max_tokens: Some(max_tokens).filter(|n| *n > 0),
            credentials: ClientCredentials::from_request(
                &self.client_api_key,
                self.provider_config,
            ),
            deadline,
            ..Default::default()
        })
    }
}

fn session_reply(
    kind: session_message::Type,
    content: String,
    metadata: std::collections::HashMap<String, String>,
) -> SessionMessage {
    SessionMessage {
        r#type: kind as i32,
        content,
        metadata,
    }
}

/// An interactive ERROR reply: the error's text, its stable code in the `code` metadata and, when
/// a wait is known, `retry_after` (seconds); the stream stays open.
fn error_reply(e: &Error) -> SessionMessage {
    let mut metadata: std::collections::HashMap<String, String> =
        [("code".to_string(), e.code().as_str().to_string())]
            .into_iter()
            .collect();
    if let Some(wait) = e.retry_after() {
        metadata.insert("retry_after".into(), whole_seconds(wait).to_string());
    }
    session_reply(session_message::Type::Error, e.to_string(), metadata)
}

/// `/status`'s MCP lines: `MCP:      active (ready/configured servers ready)` when servers are
/// configured, then for admins one line per server with its state (and why it is unavailable).
fn mcp_lines(servers: &[crate::mcp::ServerStatus], role: crate::auth::Role) -> String {
    if servers.is_empty() {
        return String::new();
    }
    let ready = servers.iter().filter(|s| s.state == "ready").count();
    let mut out = format!(
        "\nMCP:      active ({ready}/{} servers ready)",
        servers.len()
    );
    if role == crate::auth::Role::Admin {
        for s in servers {
            out.push_str(&format!(
                "\nMCP server {} ({}): {}",
                s.name, s.transport, s.state
            ));
            match s.state {
                "ready" => out.push_str(&format!(", {} tools", s.tools)),
                "unavailable" => out.push_str(&format!(": {}", s.reason)),
                _ => {}
            }
        }
    }
    out
}

/// The `tool_calls` metadata of an interactive reply: a JSON array with one object per tool call
/// the turn made, in order: `{"id", "name", "server", "arguments", "outcome", "is_error",
/// "duration_ms", "result"}`.
fn tool_calls_metadata(events: &[crate::gateway::ToolEvent]) -> String {
    use crate::gateway::ToolEvent;
    let mut calls: Vec<serde_json::Value> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Call { call, server } => calls.push(serde_json::json!({
                "id": call.id, "name": call.name, "server": server, "arguments": call.arguments,
            })),
            ToolEvent::Result { id, reply, .. } => {
                if let Some(c) = calls.iter_mut().rev().find(|c| c["id"] == *id) {
                    c["outcome"] = reply.outcome.as_str().into();
                    c["is_error"] = reply.output.is_error.into();
                    c["duration_ms"] = (reply.duration.as_secs_f64() * 1000.0).into();
                    c["result"] = reply.output.content.clone().into();
                }
            }
        }
    }
    serde_json::Value::Array(calls).to_string()
}

impl ChatCliGrpc {
    /// One USER_INPUT turn over the session's running history (see
    /// [`Gateway::interactive_turn`]); the reply's `history_trimmed` metadata says how many of the
    /// oldest messages went to keep within the limits.
    async fn session_turn(
        &self,
        prepared: &Prepared,
        history: &mut Vec<Message>,
        msg: SessionMessage,
        who: &Principal,
        notes: &Arc<AuditNotes>,
    ) -> SessionMessage {
        use session_message::Type;
        let meta = |k: &str| msg.metadata.get(k).cloned().unwrap_or_default();
        let (provider, model, key) = (meta("provider"), meta("model"), meta("client_api_key"));
        let turn = self
            .state
            .gateway(prepared)
            .interactive_turn(
                history,
                msg.content,
                provider,
                model,
                &key,
                crate::gateway::TurnCaller {
                    role: who.role,
                    tool_audit: notes.tool_audit(),
                },
            )
            .await;
        match turn {
            Ok(answer) => {
                let mut metadata: std::collections::HashMap<String, String> = [
                    ("model".to_string(), answer.model),
                    ("provider".to_string(), answer.provider),
                ]
                .into_iter()
                .collect();
                if answer.trimmed > 0 {
                    metadata.insert("history_trimmed".into(), answer.trimmed.to_string());
                }
                if !answer.tools.is_empty() {
                    metadata.insert("tool_calls".into(), tool_calls_metadata(&answer.tools));
                }
                session_reply(Type::AssistantResponse, answer.text, metadata)
            }
            Err(e) => error_reply(&e),
        }
    }

    /// A remote slash command.
    async fn command(&self, prepared: &Prepared, who: &Principal, raw: &str) -> String {
        let text = raw.trim();
        let cmd = text.strip_prefix('/').unwrap_or(text);
        match cmd {
            "" => "Error: empty command".to_string(),
            "status" => {
                let report = self
                    .state
                    .gateway(prepared)
                    .status(&Default::default(), self.state.reloader());
                let n = super::grpc_catalog::counts(&self.state, prepared).await;
                let watcher = match self.state.gateway(prepared).watcher_target() {
                    Some(t) => format!("active ({t})"),
                    None => "inactive".to_string(),
                };
                let mut out = format!(
                    "=== Server Status ===\nVersion:  {}\nProvider: {}\nModel:    {}\nWatcher:  {watcher}\nPlugins:  {} loaded\nAgents:   {} available\nSkills:   {} available\nProviders: {}",
                    crate::VERSION,
                    report.default_provider.as_deref().unwrap_or("none"),
                    report.default_model,
                    n.plugins,
                    n.agents,
                    n.skills,
                    report
                        .providers
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                );
                out.push_str(
                    &super::grpc_catalog::refused_lines(&self.state, prepared, who.role).await,
                );
                out.push_str(&mcp_lines(&self.state.mcp.status(), who.role));
                if !report.fallback.is_empty() {
                    out.push_str(&format!(
                        "\nFallback: configured ({})",
                        report.fallback.join(" -> ")
                    ));
                }
                if let Some(st) = report.config {
                    out.push_str(&format!(
                        "\nConfig:   generation {}, hash {}",
                        st.generation,
                        st.config_hash.get(..12).unwrap_or(&st.config_hash)
                    ));
                    if let Some(e) = st.last_error {
                        out.push_str(&format!("\nLast reload error: {e}"));
                    }
                    if !st.restart_needed.is_empty() {
                        out.push_str(&format!(
                            "\nRestart needed for: {}",
                            st.restart_needed.join(", ")
                        ));
                    }
                }
                let (grpc, http) = self.state.in_flight.counts();
                out.push_str(&format!(
                    "\nIn flight: {} (gRPC {grpc}, HTTP {http})",
                    grpc + http
                ));
                for cd in report.cooldowns {
                    out.push_str(&format!(
                        "\nCooldown: {} for {}s after {} failure(s) ({})",
                        cd.provider,
                        cd.remaining.as_secs().max(1),
                        cd.failures,
                        cd.reason
                    ));
                }
                out
            }
            "reload" => match admin::reload(who, self.state.reloader(), "admin command").await {
                Ok(outcome) => format!("Configuration reloaded: {outcome:?}"),
                Err(Error::PermissionDenied(_)) => "Error: /reload is for admins".to_string(),
                Err(Error::ReloadUnavailable) => {
                    "Reload is not available: this server was not started from config files."
                        .to_string()
                }
                Err(Error::ReloadFailed { problems }) => format!(
                    "Reload failed; the previous configuration keeps serving:\n  - {}",
                    problems.join("\n  - ")
                ),
                Err(e) => format!("Error: {e}"),
            },
            "watcher" | "watcher status" => self.state.gateway(prepared).watcher_status_text(),
            "watcher alerts" => self.state.gateway(prepared).alerts_text(),
            "plugins list" | "agents list" | "skills list" => {
                let what = cmd.split(' ').next().unwrap_or(cmd);
                super::grpc_catalog::command_list(&self.state, prepared, what, who.role).await
            }
            _ => format!(
                "Unknown command: '{raw}'\n\nAvailable remote commands:\n  /status          server version, provider, model, fallback and config state\n  /reload          re-read the configuration (admins)\n  /watcher status  Kubernetes watcher state\n  /watcher alerts  Kubernetes watcher alerts\n  /plugins list    plugins on the server\n  /agents list     agents on the server\n  /skills list     skills on the server"
            ),
        }
    }

    /// One of the caller's concurrent-stream slots, held until the stream ends.
    fn stream_slot<T>(
        &self,
        prepared: &Prepared,
        req: &Request<T>,
    ) -> Result<Option<crate::server::ratelimit::StreamGuard>, Status> {
        if prepared.config.limits.max_streams_per_principal == 0 {
            return Ok(None);
        }
        let key = context(req)
            .and_then(|c| c.limit_key.clone())
            .unwrap_or_else(|| principal(req).limit_key(None));
        self.state
            .stream_slot(prepared, &key)
            .map_err(|e| error::to_status(&e))
    }
}

type BoxStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ChatCliService for ChatCliGrpc {
    async fn send_prompt(
        &self,
        request: Request<SendPromptRequest>,
    ) -> Result<Response<SendPromptResponse>, Status> {
        let _busy = self.state.in_flight.enter(Transport::Grpc);
        let prepared = snapshot(&self.state, &request);
        let deadline = deadline(&request);
        let notes = notes(&request);
        let core = self.state.gateway(&prepared);
        let role = principal(&request).role;
        let mut call = prompt_fields!(request.into_inner())
            .into_call(&core, deadline)
            .map_err(|e| fail(&notes, &e))?;
        call.unary = true;
        call.tool_role = Some(role);
        call.tool_audit = notes.tool_audit();
        let answer = core.prompt(call).await.map_err(|e| fail(&notes, &e))?;
        notes.answered_by(&answer.provider, &answer.model);
        let (text, _) = crate::llm::collect(answer.stream)
            .await
            .map_err(|e| error::to_status(&Error::from(e)))?;
        Ok(Response::new(SendPromptResponse {
            response: text,
            model: answer.model,
            provider: answer.provider,
        }))
    }

    type StreamPromptStream = BoxStream<StreamPromptResponse>;

    async fn stream_prompt(
        &self,
        request: Request<StreamPromptRequest>,
    ) -> Result<Response<Self::StreamPromptStream>, Status> {
        let busy = self.state.in_flight.enter(Transport::Grpc);
        let prepared = snapshot(&self.state, &request);
        let deadline = deadline(&request);
        let notes = notes(&request);
        let slot = self.stream_slot(&prepared, &request)?;
        let core = self.state.gateway(&prepared);
        let role = principal(&request).role;
        let mut call = prompt_fields!(request.into_inner())
            .into_call(&core, deadline)
            .map_err(|e| fail(&notes, &e))?;
        // The final text only: the proto has no tool events.
        call.tool_role = Some(role);
        call.tool_audit = notes.tool_audit();
        let answer = core.prompt(call).await.map_err(|e| fail(&notes, &e))?;
        notes.answered_by(&answer.provider, &answer.model);
        let metrics = self.state.metrics.clone();
        let method = "/chatcli.v1.ChatCLIService/StreamPrompt";
        // Deltas go out as the provider yields them (small ones merged only while more text is
        // already waiting); dropping this stream (the client went away) drops the provider's,
        // which aborts the upstream request.
        let Answer {
            provider,
            model,
            stream,
            ..
        } = answer;
        let mut upstream = crate::llm::chunker::coalesce(stream, STREAM_CHUNK_TARGET);
        // Looked up when the first message goes out, then kept for the stream.
        let mut sent: Option<prometheus::IntCounter> = None;
        let mut count_sent = move || {
            if let Some(m) = &metrics {
                sent.get_or_insert_with(|| m.stream_messages_sent(method))
                    .inc();
            }
        };
        let out = async_stream::stream! {
            let _slot = slot;
            let _busy = busy;
            while let Some(item) = upstream.next().await {
                match item {
                    Ok(Delta::Text(chunk)) if chunk.is_empty() => {}
                    Ok(Delta::Text(chunk)) => {
                        count_sent();
                        yield Ok(StreamPromptResponse { chunk, done: false, model: model.clone(), provider: provider.clone() });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        yield Err(error::to_status(&Error::from(e)));
                        return;
                    }
                }
            }
            count_sent();
            yield Ok(StreamPromptResponse { chunk: String::new(), done: true, model, provider });
        };
        Ok(Response::new(Box::pin(out)))
    }

    type InteractiveSessionStream = BoxStream<SessionMessage>;

    async fn interactive_session(
        &self,
        request: Request<tonic::Streaming<SessionMessage>>,
    ) -> Result<Response<Self::InteractiveSessionStream>, Status> {
        use session_message::Type;
        let busy = self.state.in_flight.enter(Transport::Grpc);
        let prepared = snapshot(&self.state, &request);
        let slot = self.stream_slot(&prepared, &request)?;
        let who = principal(&request);
        let call_notes = notes(&request);
        let limit_key = context(&request)
            .and_then(|c| c.limit_key.clone())
            .unwrap_or_else(|| who.limit_key(None));
        let idle = prepared.config.limits.interactive_idle_timeout;
        let mut inbound = request.into_inner();
        let this = self.clone();
        let method = "/chatcli.v1.ChatCLIService/InteractiveSession";
        let out = async_stream::stream! {
            let _slot = slot;
            let _busy = busy;
            let _active = this.state.metrics.as_ref().map(|m| m.session_started());
            let mut history: Vec<Message> = Vec::new();
            loop {
                // Only the wait for the client's next message counts as idle, never a turn
                // being answered.
                let next = match idle.is_zero() {
                    true => Ok(inbound.message().await),
                    false => tokio::time::timeout(idle, inbound.message()).await,
                };
                let msg = match next {
                    Ok(Ok(Some(m))) => m,
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => {
                        tracing::debug!(%status, "interactive session ended by the client");
                        break;
                    }
                    Err(_) => {
                        let idle = crate::config::values::format_duration(idle);
                        tracing::info!(principal = %who.id, %idle, "closing an idle interactive session");
                        yield Err(error::to_status(&Error::IdleTimeout { idle }));
                        break;
                    }
                };
                if let Some(m) = &this.state.metrics {
                    m.stream_message_received(method);
                }
                let kind = Type::try_from(msg.r#type);
                // Every message the server answers is a call against the caller's rate limit, in
                // the bucket its other calls use (under the limits of the last reload), not only
                // the call that opened the stream.
                let refused = match kind {
                    Ok(Type::UserInput | Type::Command) => {
                        this.state.check_rate(&who, &limit_key).await.err()
                    }
                    _ => None,
                };
                let reply = match (kind, refused) {
                    (_, Some(wait)) => {
                        let secs = wait.as_secs().max(1);
                        tracing::debug!(principal = %who.id, retry_after = secs, "interactive message rate limited");
                        error_reply(&Error::RateLimited { secs })
                    }
                    (Ok(Type::UserInput), None) => this.session_turn(&prepared, &mut history, msg, &who, &call_notes).await,
                    (Ok(Type::Command), None) => session_reply(
                        Type::CommandResult,
                        this.command(&prepared, &who, &msg.content).await,
                        Default::default(),
                    ),
                    (other, None) => {
                        tracing::debug!(kind = ?other, "ignored interactive message type");
                        continue;
                    }
                };
                if let Some(m) = &this.state.metrics {
                    m.stream_message_sent(method);
                }
                yield Ok(reply);
            }
        };
        Ok(Response::new(Box::pin(out)))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let prepared = snapshot(&self.state, &request);
        let sessions = self
            .state
            .gateway(&prepared)
            .list_sessions(&principal(&request))
            .await
            .map_err(|e| fail(&notes(&request), &e))?;
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn load_session(
        &self,
        request: Request<LoadSessionRequest>,
    ) -> Result<Response<LoadSessionResponse>, Status> {
        let notes = notes(&request);
        notes.resource(&request.get_ref().name);
        let prepared = snapshot(&self.state, &request);
        let data = self
            .state
            .gateway(&prepared)
            .load_session(&principal(&request), &request.get_ref().name)
            .await
            .map_err(|e| fail(&notes, &e))?;
        let v2 = data.to_proto();
        Ok(Response::new(LoadSessionResponse {
            messages: v2.chat_history.clone(),
            session_data: Some(v2),
        }))
    }

    async fn save_session(
        &self,
        request: Request<SaveSessionRequest>,
    ) -> Result<Response<SaveSessionResponse>, Status> {
        let notes = notes(&request);
        notes.resource(&request.get_ref().name);
        let prepared = snapshot(&self.state, &request);
        let who = principal(&request);
        let r = request.into_inner();
        let data = match r.session_data {
            Some(v2) => SessionData::from_proto_v2(v2),
            None => SessionData::from_messages(r.messages),
        };
        self.state
            .gateway(&prepared)
            .save_session(&who, &r.name, data)
            .await
            .map_err(|e| fail(&notes, &e))?;
        Ok(Response::new(SaveSessionResponse { success: true }))
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let notes = notes(&request);
        notes.resource(&request.get_ref().name);
        let prepared = snapshot(&self.state, &request);
        self.state
            .gateway(&prepared)
            .delete_session(&principal(&request), &request.get_ref().name)
            .await
            .map_err(|e| fail(&notes, &e))?;
        Ok(Response::new(DeleteSessionResponse { success: true }))
    }

    async fn get_server_info(
        &self,
        request: Request<GetServerInfoRequest>,
    ) -> Result<Response<GetServerInfoResponse>, Status> {
        let prepared = snapshot(&self.state, &request);
        let counts = super::grpc_catalog::counts(&self.state, &prepared).await;
        let watcher_target = self.state.gateway(&prepared).watcher_target();
        let reg = &prepared.registry;
        Ok(Response::new(GetServerInfoResponse {
            version: crate::VERSION.to_string(),
            provider: reg
                .default_provider()
                .map(|p| p.name().to_string())
                .unwrap_or_default(),
            model: reg.default_model(),
            available_providers: reg.names(),
            watcher_active: watcher_target.is_some(),
            watcher_target: watcher_target.unwrap_or_default(),
            plugin_count: counts.plugins,
            agent_count: counts.agents,
            skill_count: counts.skills,
        }))
    }

    async fn get_watcher_status(
        &self,
        _request: Request<GetWatcherStatusRequest>,
    ) -> Result<Response<GetWatcherStatusResponse>, Status> {
        Ok(Response::new(super::grpc_watcher::status(
            &self.state.watcher,
        )))
    }

    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let status = match self.state.is_draining() {
            true => health_response::Status::NotServing,
            false => health_response::Status::Serving,
        };
        Ok(Response::new(HealthResponse {
            status: status as i32,
            version: crate::VERSION.to_string(),
        }))
    }

    async fn get_alerts(
        &self,
        request: Request<GetAlertsRequest>,
    ) -> Result<Response<GetAlertsResponse>, Status> {
        Ok(Response::new(super::grpc_watcher::alerts(
            &self.state.watcher,
            request.get_ref(),
        )))
    }

    async fn analyze_issue(
        &self,
        request: Request<AnalyzeIssueRequest>,
    ) -> Result<Response<AnalyzeIssueResponse>, Status> {
        let _busy = self.state.in_flight.enter(Transport::Grpc);
        let prepared = snapshot(&self.state, &request);
        let notes = notes(&request);
        let (target, issue) = super::grpc_aiops::analyze_in(request.into_inner());
        notes.resource(&issue.issue_name);
        let analysis = self
            .state
            .gateway(&prepared)
            .analyze_issue(target, issue)
            .await
            .map_err(|e| fail(&notes, &e))?;
        notes.answered_by(&analysis.provider, &analysis.model);
        Ok(Response::new(super::grpc_aiops::analyze_out(analysis)))
    }

    async fn agentic_step(
        &self,
        request: Request<AgenticStepRequest>,
    ) -> Result<Response<AgenticStepResponse>, Status> {
        let _busy = self.state.in_flight.enter(Transport::Grpc);
        let prepared = snapshot(&self.state, &request);
        let notes = notes(&request);
        let (target, step) = super::grpc_aiops::step_in(request.into_inner());
        notes.resource(&step.issue.issue_name);
        let step = self
            .state
            .gateway(&prepared)
            .agentic_step(target, step)
            .await
            .map_err(|e| fail(&notes, &e))?;
        Ok(Response::new(super::grpc_aiops::step_out(step)))
    }

    async fn list_remote_plugins(
        &self,
        request: Request<ListRemotePluginsRequest>,
    ) -> Result<Response<ListRemotePluginsResponse>, Status> {
        super::grpc_catalog::list_remote_plugins(&self.state, request).await
    }

    async fn list_remote_agents(
        &self,
        request: Request<ListRemoteAgentsRequest>,
    ) -> Result<Response<ListRemoteAgentsResponse>, Status> {
        super::grpc_catalog::list_remote_agents(&self.state, request).await
    }

    async fn list_remote_skills(
        &self,
        request: Request<ListRemoteSkillsRequest>,
    ) -> Result<Response<ListRemoteSkillsResponse>, Status> {
        super::grpc_catalog::list_remote_skills(&self.state, request).await
    }

    async fn get_agent_definition(
        &self,
        request: Request<GetAgentDefinitionRequest>,
    ) -> Result<Response<GetAgentDefinitionResponse>, Status> {
        super::grpc_catalog::get_agent_definition(&self.state, request).await
    }

    async fn get_skill_content(
        &self,
        request: Request<GetSkillContentRequest>,
    ) -> Result<Response<GetSkillContentResponse>, Status> {
        super::grpc_catalog::get_skill_content(&self.state, request).await
    }

    async fn execute_remote_plugin(
        &self,
        request: Request<ExecuteRemotePluginRequest>,
    ) -> Result<Response<ExecuteRemotePluginResponse>, Status> {
        super::grpc_catalog::execute_remote_plugin(&self.state, request).await
    }

    type DownloadPluginStream = BoxStream<DownloadPluginResponse>;

    async fn download_plugin(
        &self,
        request: Request<DownloadPluginRequest>,
    ) -> Result<Response<Self::DownloadPluginStream>, Status> {
        super::grpc_catalog::download_plugin(&self.state, request).await
    }

    async fn resolve_active_conversation(
        &self,
        request: Request<ResolveActiveConversationRequest>,
    ) -> Result<Response<ResolveActiveConversationResponse>, Status> {
        super::grpc_hub::resolve_active_conversation(&self.state, request).await
    }

    async fn new_conversation(
        &self,
        request: Request<NewConversationRequest>,
    ) -> Result<Response<NewConversationResponse>, Status> {
        super::grpc_hub::new_conversation(&self.state, request).await
    }

    async fn append_event(
        &self,
        request: Request<AppendEventRequest>,
    ) -> Result<Response<AppendEventResponse>, Status> {
        super::grpc_hub::append_event(&self.state, request).await
    }

    async fn read_conversation(
        &self,
        request: Request<ReadConversationRequest>,
    ) -> Result<Response<ReadConversationResponse>, Status> {
        super::grpc_hub::read_conversation(&self.state, request).await
    }

    type SubscribeConversationStream = BoxStream<ConversationEvent>;

    async fn subscribe_conversation(
        &self,
        request: Request<SubscribeConversationRequest>,
    ) -> Result<Response<Self::SubscribeConversationStream>, Status> {
        super::grpc_hub::subscribe_conversation(&self.state, request).await
    }

    async fn set_binding(
        &self,
        request: Request<SetBindingRequest>,
    ) -> Result<Response<SetBindingResponse>, Status> {
        super::grpc_hub::set_binding(&self.state, request).await
    }

    async fn list_bindings(
        &self,
        request: Request<ListBindingsRequest>,
    ) -> Result<Response<ListBindingsResponse>, Status> {
        super::grpc_hub::list_bindings(&self.state, request).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    #[test]
    fn a_call_without_the_pipelines_context_may_not_write() {
        let req = tonic::Request::new(());
        assert!(!super::principal(&req).can_write());
        let refused =
            crate::gateway::require_write(&super::principal(&req), "write sessions").unwrap_err();
        let status = super::fail(&super::notes(&req), &refused);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn the_direct_route_is_the_chatcli_service_and_nothing_else() {
        use crate::proto::chat_cli_service_server::SERVICE_NAME;
        assert_eq!(super::CHAT_PATH_PREFIX, format!("/{SERVICE_NAME}/"));
        assert!(super::GrpcRoutes::direct(
            "/chatcli.v1.ChatCLIService/SendPrompt"
        ));
        for other in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/chatcli.v1.ChatCLIServiceX/SendPrompt",
            "/chatcli.v1.ChatCLIService",
        ] {
            assert!(!super::GrpcRoutes::direct(other), "{other}");
        }
    }
}
