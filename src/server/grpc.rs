//! `chatcli.v1.ChatCLIService` over the core: each handler converts the request, calls the core
//! (provider registry, session store, catalog) and converts the answer. RPCs whose capability is not
//! in this build answer `UNIMPLEMENTED` naming what they wait for.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::{AppState, Prepared};
use crate::auth::Principal;
use crate::llm::{ChatRequest, Delta, LlmError, Message, Resolved};
use crate::proto::chat_cli_service_server::{ChatCliService, ChatCliServiceServer};
use crate::proto::*;
use crate::sessions::SessionData;
use crate::telemetry::{LlmErrorType, LlmStatus, SessionOperation};

/// Largest `max_tokens` a request may ask for.
const MAX_TOKENS_LIMIT: i32 = 200_000;

/// The service implementation.
#[derive(Debug, Clone)]
pub struct ChatCliGrpc {
    state: Arc<AppState>,
}

/// Builds the gRPC routes: the ChatCLI service, `grpc.health.v1`, and reflection when both of its
/// switches are on.
pub fn routes(
    state: &Arc<AppState>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> tonic::service::Routes {
    let prepared = state.prepared();
    let server = &prepared.config.server;
    let svc = ChatCliServiceServer::new(ChatCliGrpc {
        state: state.clone(),
    })
    .max_decoding_message_size(server.max_recv_msg_size)
    .max_encoding_message_size(server.max_send_msg_size);
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
    routes
}

fn snapshot<T>(state: &AppState, req: &Request<T>) -> Arc<Prepared> {
    req.extensions()
        .get::<Arc<Prepared>>()
        .cloned()
        .unwrap_or_else(|| state.prepared())
}

fn namespace<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<Principal>()
        .map(|p| p.session_namespace().to_string())
        .unwrap_or_else(|| "default".into())
}

fn waits_for(rpc: &str, capability: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not in this build yet: it waits for {capability}"
    ))
}

/// The fields SendPrompt and StreamPrompt share.
struct PromptCall {
    prompt: String,
    history: Vec<ChatMessage>,
    max_tokens: i32,
    provider: String,
    model: String,
}

impl PromptCall {
    /// Validates the request and resolves its provider.
    fn prepare(self, prepared: &Prepared) -> Result<(Resolved, ChatRequest), Status> {
        if self.prompt.is_empty() {
            return Err(Status::invalid_argument("prompt cannot be empty"));
        }
        let limit = prepared.config.limits.max_prompt_bytes;
        if self.prompt.len() > limit {
            return Err(Status::invalid_argument(format!(
                "validation: prompt is {} bytes; the limit is {limit}",
                self.prompt.len()
            )));
        }
        if !(0..=MAX_TOKENS_LIMIT).contains(&self.max_tokens) {
            return Err(Status::invalid_argument(format!(
                "validation: max_tokens must be between 0 and {MAX_TOKENS_LIMIT}"
            )));
        }
        let resolved = prepared
            .registry
            .resolve(&self.provider, &self.model)
            .map_err(|e| e.to_status())?;
        let mut messages: Vec<Message> = self
            .history
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect();
        messages.push(Message {
            role: "user".into(),
            content: self.prompt,
        });
        let mut request = ChatRequest::new(messages, resolved.model.clone());
        request.max_tokens = u32::try_from(self.max_tokens).ok().filter(|n| *n > 0);
        Ok((resolved, request))
    }
}

impl ChatCliGrpc {
    fn record_llm(
        &self,
        r: &Resolved,
        started: Instant,
        result: Result<Option<crate::llm::Usage>, &LlmError>,
    ) {
        let Some(m) = &self.state.metrics else { return };
        let name = r.provider.name();
        match result {
            Ok(usage) => {
                m.record_llm_request(name, &r.model, LlmStatus::Success, started.elapsed());
                if let Some(u) = usage {
                    m.add_llm_tokens(name, &r.model, "prompt", u.prompt_tokens);
                    m.add_llm_tokens(name, &r.model, "completion", u.completion_tokens);
                }
            }
            Err(_) => {
                m.record_llm_request(name, &r.model, LlmStatus::Error, started.elapsed());
                m.record_llm_error(name, &r.model, LlmErrorType::Unknown);
            }
        }
    }

    fn session_op(&self, op: SessionOperation) {
        if let Some(m) = &self.state.metrics {
            m.session_operation(op);
        }
    }
}

type BoxStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ChatCliService for ChatCliGrpc {
    async fn send_prompt(
        &self,
        request: Request<SendPromptRequest>,
    ) -> Result<Response<SendPromptResponse>, Status> {
        let prepared = snapshot(&self.state, &request);
        let r = request.into_inner();
        let call = PromptCall {
            prompt: r.prompt,
            history: r.history,
            max_tokens: r.max_tokens,
            provider: r.provider,
            model: r.model,
        };
        let (resolved, chat) = call.prepare(&prepared)?;
        let started = Instant::now();
        let result = crate::llm::collect(resolved.provider.stream(chat)).await;
        self.record_llm(&resolved, started, result.as_ref().map(|(_, u)| *u));
        let (text, _) = result.map_err(|e| e.to_status())?;
        Ok(Response::new(SendPromptResponse {
            response: text,
            model: resolved.model,
            provider: resolved.provider.name().to_string(),
        }))
    }

    type StreamPromptStream = BoxStream<StreamPromptResponse>;

    async fn stream_prompt(
        &self,
        request: Request<StreamPromptRequest>,
    ) -> Result<Response<Self::StreamPromptStream>, Status> {
        let prepared = snapshot(&self.state, &request);
        let r = request.into_inner();
        let call = PromptCall {
            prompt: r.prompt,
            history: r.history,
            max_tokens: r.max_tokens,
            provider: r.provider,
            model: r.model,
        };
        let (resolved, chat) = call.prepare(&prepared)?;
        let this = self.clone();
        let method = "/chatcli.v1.ChatCLIService/StreamPrompt";
        // Deltas are forwarded as the provider yields them; dropping this stream (the client went
        // away) drops the provider stream, which cancels the upstream call.
        let out = async_stream::stream! {
            let started = Instant::now();
            let provider = resolved.provider.name().to_string();
            let model = resolved.model.clone();
            let mut upstream = resolved.provider.stream(chat);
            let mut usage = None;
            while let Some(item) = upstream.next().await {
                match item {
                    Ok(Delta::Text(chunk)) if chunk.is_empty() => {}
                    Ok(Delta::Text(chunk)) => {
                        if let Some(m) = &this.state.metrics {
                            m.stream_message_sent(method);
                        }
                        yield Ok(StreamPromptResponse { chunk, done: false, model: model.clone(), provider: provider.clone() });
                    }
                    Ok(Delta::Usage(u)) => usage = Some(u),
                    Ok(Delta::Finish(_)) => {}
                    Err(e) => {
                        this.record_llm(&resolved, started, Err(&e));
                        yield Err(e.to_status());
                        return;
                    }
                }
            }
            this.record_llm(&resolved, started, Ok(usage));
            if let Some(m) = &this.state.metrics {
                m.stream_message_sent(method);
            }
            yield Ok(StreamPromptResponse { chunk: String::new(), done: true, model, provider });
        };
        Ok(Response::new(Box::pin(out)))
    }

    type InteractiveSessionStream = BoxStream<SessionMessage>;

    async fn interactive_session(
        &self,
        _request: Request<tonic::Streaming<SessionMessage>>,
    ) -> Result<Response<Self::InteractiveSessionStream>, Status> {
        Err(waits_for(
            "InteractiveSession",
            "issue #5 (LLM providers and InteractiveSession)",
        ))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        self.session_op(SessionOperation::List);
        let ns = namespace(&request);
        let sessions = self
            .state
            .sessions
            .list(&ns)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn load_session(
        &self,
        request: Request<LoadSessionRequest>,
    ) -> Result<Response<LoadSessionResponse>, Status> {
        self.session_op(SessionOperation::Load);
        let ns = namespace(&request);
        let name = request.into_inner().name;
        let data = self
            .state
            .sessions
            .load(&ns, &name)
            .await
            .map_err(|e| e.to_status())?;
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
        self.session_op(SessionOperation::Save);
        let ns = namespace(&request);
        let r = request.into_inner();
        let data = match r.session_data {
            Some(v2) => SessionData::from_proto_v2(v2),
            None => SessionData::from_messages(r.messages),
        };
        self.state
            .sessions
            .save(&ns, &r.name, data)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(SaveSessionResponse { success: true }))
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        self.session_op(SessionOperation::Delete);
        let ns = namespace(&request);
        let name = request.into_inner().name;
        self.state
            .sessions
            .delete(&ns, &name)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(DeleteSessionResponse { success: true }))
    }

    async fn get_server_info(
        &self,
        request: Request<GetServerInfoRequest>,
    ) -> Result<Response<GetServerInfoResponse>, Status> {
        let prepared = snapshot(&self.state, &request);
        let c = &prepared.config;
        let (plugins, agents, skills) = (c.plugins_dir(), c.agents_dir(), c.skills_dir());
        let counts =
            tokio::task::spawn_blocking(move || crate::catalog::count(&plugins, &agents, &skills))
                .await
                .map_err(|e| Status::internal(format!("counting the catalog failed: {e}")))?;
        let reg = &prepared.registry;
        Ok(Response::new(GetServerInfoResponse {
            version: crate::VERSION.to_string(),
            provider: reg
                .default_provider()
                .map(|p| p.name().to_string())
                .unwrap_or_default(),
            model: reg.default_model(),
            available_providers: reg.names(),
            watcher_active: false,
            watcher_target: String::new(),
            plugin_count: counts.plugins,
            agent_count: counts.agents,
            skill_count: counts.skills,
        }))
    }

    async fn get_watcher_status(
        &self,
        _request: Request<GetWatcherStatusRequest>,
    ) -> Result<Response<GetWatcherStatusResponse>, Status> {
        Err(waits_for(
            "GetWatcherStatus",
            "the Kubernetes watcher capability (not scheduled yet)",
        ))
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
        _request: Request<GetAlertsRequest>,
    ) -> Result<Response<GetAlertsResponse>, Status> {
        Err(waits_for(
            "GetAlerts",
            "the Kubernetes watcher capability (not scheduled yet)",
        ))
    }

    async fn analyze_issue(
        &self,
        _request: Request<AnalyzeIssueRequest>,
    ) -> Result<Response<AnalyzeIssueResponse>, Status> {
        Err(waits_for(
            "AnalyzeIssue",
            "the AIOps capability (not scheduled yet)",
        ))
    }

    async fn agentic_step(
        &self,
        _request: Request<AgenticStepRequest>,
    ) -> Result<Response<AgenticStepResponse>, Status> {
        Err(waits_for(
            "AgenticStep",
            "the AIOps capability (not scheduled yet)",
        ))
    }

    async fn list_remote_plugins(
        &self,
        _request: Request<ListRemotePluginsRequest>,
    ) -> Result<Response<ListRemotePluginsResponse>, Status> {
        Err(waits_for(
            "ListRemotePlugins",
            "the catalog capability (not scheduled yet)",
        ))
    }

    async fn list_remote_agents(
        &self,
        _request: Request<ListRemoteAgentsRequest>,
    ) -> Result<Response<ListRemoteAgentsResponse>, Status> {
        Err(waits_for(
            "ListRemoteAgents",
            "the catalog capability (not scheduled yet)",
        ))
    }

    async fn list_remote_skills(
        &self,
        _request: Request<ListRemoteSkillsRequest>,
    ) -> Result<Response<ListRemoteSkillsResponse>, Status> {
        Err(waits_for(
            "ListRemoteSkills",
            "the catalog capability (not scheduled yet)",
        ))
    }

    async fn get_agent_definition(
        &self,
        _request: Request<GetAgentDefinitionRequest>,
    ) -> Result<Response<GetAgentDefinitionResponse>, Status> {
        Err(waits_for(
            "GetAgentDefinition",
            "the catalog capability (not scheduled yet)",
        ))
    }

    async fn get_skill_content(
        &self,
        _request: Request<GetSkillContentRequest>,
    ) -> Result<Response<GetSkillContentResponse>, Status> {
        Err(waits_for(
            "GetSkillContent",
            "the catalog capability (not scheduled yet)",
        ))
    }

    async fn execute_remote_plugin(
        &self,
        _request: Request<ExecuteRemotePluginRequest>,
    ) -> Result<Response<ExecuteRemotePluginResponse>, Status> {
        Err(waits_for(
            "ExecuteRemotePlugin",
            "the catalog capability (not scheduled yet)",
        ))
    }

    type DownloadPluginStream = BoxStream<DownloadPluginResponse>;

    async fn download_plugin(
        &self,
        _request: Request<DownloadPluginRequest>,
    ) -> Result<Response<Self::DownloadPluginStream>, Status> {
        Err(waits_for(
            "DownloadPlugin",
            "the catalog capability (not scheduled yet)",
        ))
    }

    async fn resolve_active_conversation(
        &self,
        _request: Request<ResolveActiveConversationRequest>,
    ) -> Result<Response<ResolveActiveConversationResponse>, Status> {
        Err(waits_for(
            "ResolveActiveConversation",
            "the conversation hub capability (not scheduled yet)",
        ))
    }

    async fn new_conversation(
        &self,
        _request: Request<NewConversationRequest>,
    ) -> Result<Response<NewConversationResponse>, Status> {
        Err(waits_for(
            "NewConversation",
            "the conversation hub capability (not scheduled yet)",
        ))
    }

    async fn append_event(
        &self,
        _request: Request<AppendEventRequest>,
    ) -> Result<Response<AppendEventResponse>, Status> {
        Err(waits_for(
            "AppendEvent",
            "the conversation hub capability (not scheduled yet)",
        ))
    }

    async fn read_conversation(
        &self,
        _request: Request<ReadConversationRequest>,
    ) -> Result<Response<ReadConversationResponse>, Status> {
        Err(waits_for(
            "ReadConversation",
            "the conversation hub capability (not scheduled yet)",
        ))
    }

    type SubscribeConversationStream = BoxStream<ConversationEvent>;

    async fn subscribe_conversation(
        &self,
        _request: Request<SubscribeConversationRequest>,
    ) -> Result<Response<Self::SubscribeConversationStream>, Status> {
        Err(waits_for(
            "SubscribeConversation",
            "the conversation hub capability (not scheduled yet)",
        ))
    }

    async fn set_binding(
        &self,
        _request: Request<SetBindingRequest>,
    ) -> Result<Response<SetBindingResponse>, Status> {
        Err(waits_for(
            "SetBinding",
            "the conversation hub capability (not scheduled yet)",
        ))
    }

    async fn list_bindings(
        &self,
        _request: Request<ListBindingsRequest>,
    ) -> Result<Response<ListBindingsResponse>, Status> {
        Err(waits_for(
            "ListBindings",
            "the conversation hub capability (not scheduled yet)",
        ))
    }
}
