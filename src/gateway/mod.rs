//! The core both transports call: the use cases of chatcli, written once with core types
//! ([`Message`], [`PromptCall`], the caller's [`Principal`]) and one error type ([`Error`]), and
//! no gRPC or HTTP types. The gRPC service (`server/grpc.rs`) and the HTTP API (`server/http/`)
//! decode a request, call a use case here and encode its answer or its error (the one mapping of
//! [`Error`] to both is `server/error.rs`).
//!
//! The use cases:
//! - a prompt ([`Gateway::prompt`]): validated once against the limits of the call's config
//!   snapshot and answered through the fallback chain ([`crate::llm::gateway::start`]); or one
//!   continuing a saved session ([`Gateway::session_prompt`]) whose turn is appended when the
//!   answer is complete ([`SessionTurn::save`]);
//! - an interactive turn ([`Gateway::interactive_turn`]): a prompt over the session's running
//!   history, trimmed to the history limits;
//! - sessions ([`Gateway::list_sessions`], [`Gateway::load_session`], [`Gateway::save_session`],
//!   [`Gateway::delete_session`]), each caller in its own namespace;
//! - reload admin ([`admin::reload`]) and the status report ([`admin::StatusReport`]);
//! - the Kubernetes watcher's status and alerts ([`Gateway::watcher_status`],
//!   [`Gateway::alerts`]) and its context in prompts ([`Gateway::prompt_context`], the one place
//!   that decides which prompts get it);
//! - AIOps ([`Gateway::analyze_issue`], [`Gateway::agentic_step`]): one structured LLM call each,
//!   validated against its JSON contract.
//!
//! # Where new services plug in
//!
//! A [`Gateway`] is a view of the server for one call: the call's config snapshot (providers,
//! limits) and the live state that outlives snapshots (cooldowns, sessions, metrics, the
//! watcher). The coming plugin/agent/skill catalog and conversation hub are services of the same
//! kind as the watcher: each becomes a module here (`gateway/catalog.rs`, `gateway/hub.rs`) with
//! its use cases as methods of [`Gateway`], and a field of [`Gateway`] borrowing its live state,
//! filled in by the server next to the ones below. Until then, their calls answer
//! [`Error::NotImplemented`] ([`waits_for`]).
//!
//! The view borrows: building one per call costs nothing, and a use case never reaches back into
//! the server, so `gateway` depends on `llm`, `mcp`, `catalog`, `sessions`, `auth`, `config`,
//! `telemetry` and `watcher` only. A prompt's MCP tools come from [`Gateway::tools_for`]: the
//! caller's role ([`PromptCall::tool_role`]) against `catalog.mcp_roles`, and the servers ready now.

pub mod admin;
pub mod aiops;
mod error;
mod sessions;
mod watcher;

use std::sync::Arc;

pub use error::{Code, Error, whole_seconds};
pub use sessions::{SessionLocks, SessionTurn};
pub use watcher::PromptRoute;

use crate::auth::Principal;
use crate::config::{CatalogConfig, LimitsConfig, WatcherConfig};
use crate::llm::fallback::{Answer, Cooldowns};
pub use crate::llm::gateway::PromptCall;
pub use crate::llm::tools::ToolEvent;
use crate::llm::{Message, ProviderRegistry};
use crate::mcp::McpHub;
use crate::sessions::SessionStore;
use crate::telemetry::Metrics;

/// Largest `max_tokens` a request may ask for.
pub const MAX_TOKENS_LIMIT: u32 = 200_000;

/// Keys a client may put in `provider_config` (those the existing ChatCLI defines).
pub const PROVIDER_CONFIG_KEYS: &[&str] = &[
    "client_id",
    "client_key",
    "realm",
    "agent_id",
    "base_url",
    "api_base",
    "endpoint",
    "url",
    "host",
    "server_url",
    "realm_url",
    "token_url",
];

/// Longest `provider_config` value accepted, in bytes.
pub const MAX_PROVIDER_CONFIG_VALUE: usize = 4096;

/// The core's view of the server for one call (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Gateway<'a> {
    /// The providers of the call's config snapshot.
    pub registry: &'a ProviderRegistry,
    /// The limits of the call's config snapshot.
    pub limits: &'a LimitsConfig,
    /// The fallback chain's cooldowns (kept across reloads).
    pub cooldowns: &'a Cooldowns,
    /// The metrics, when they are on.
    pub metrics: Option<&'a Arc<Metrics>>,
    /// The saved sessions.
    pub sessions: &'a SessionStore,
    /// The MCP servers whose tools prompts may use.
    pub mcp: Option<&'a Arc<McpHub>>,
    /// The catalog settings of the call's config snapshot (`mcp_roles`, `mcp_max_rounds`).
    pub catalog: &'a CatalogConfig,
    /// The Kubernetes watcher (it runs nothing without targets).
    pub watcher: &'a crate::watcher::Watcher,
    /// The watcher's section of the call's config snapshot.
    pub watcher_config: &'a WatcherConfig,
}

/// A prompt's answer: the provider's stream, and the session turn to save once it is complete.
pub struct PromptAnswer {
    /// The answer, from its first delta on.
    pub answer: Answer,
    /// The session the call continues; [`SessionTurn::save`] appends the turn.
    pub session: Option<SessionTurn>,
}

impl std::fmt::Debug for PromptAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptAnswer")
            .field("provider", &self.answer.provider)
            .field("model", &self.answer.model)
            .field("session", &self.session)
            .finish()
    }
}

/// The answer of one interactive turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnAnswer {
    /// The whole answer.
    pub text: String,
    /// Who answered.
    pub provider: String,
    /// With which model.
    pub model: String,
    /// How many of the oldest history messages were dropped to keep within the limits.
    pub trimmed: usize,
    /// The tool calls the turn made, in order.
    pub tools: Vec<ToolEvent>,
}

/// Who asks an interactive turn: the role that decides whether its prompt may use the MCP tools,
/// and where its tool calls are noted for the audit log.
#[derive(Debug, Clone)]
pub struct TurnCaller {
    /// The caller's role.
    pub role: crate::auth::Role,
    /// Told of each tool call.
    pub tool_audit: Option<crate::llm::tools::ToolAudit>,
}

/// Reads an answer whole: its text and its tool events.
pub async fn collect_with_tools(
    mut stream: crate::llm::DeltaStream,
) -> Result<(String, Vec<ToolEvent>), Error> {
    use futures::StreamExt;
    let mut text = String::new();
    let mut tools = Vec::new();
    while let Some(item) = stream.next().await {
        match item? {
            crate::llm::Delta::Text(t) => text.push_str(&t),
            crate::llm::Delta::Tool(e) => tools.push(e),
            _ => {}
        }
    }
    Ok((text, tools))
}

/// The answer of a call whose capability is not in this build.
pub fn waits_for(rpc: &'static str, capability: &'static str) -> Error {
    Error::NotImplemented { rpc, capability }
}

/// What one history message counts against `limits.max_history_bytes`.
fn history_bytes(m: &Message) -> usize {
    m.role.len() + m.content.len()
}

impl Gateway<'_> {
    /// The prompt is not empty and within `limits.max_prompt_bytes`.
    pub fn validate_prompt(&self, prompt: &str) -> Result<(), Error> {
        if prompt.is_empty() {
            return Err(Error::PromptEmpty);
        }
        let limit = self.limits.max_prompt_bytes;
        if prompt.len() > limit {
            return Err(Error::PromptTooLarge {
                bytes: prompt.len(),
                limit,
            });
        }
        Ok(())
    }

    /// The history is within `limits.max_history_messages` and `limits.max_history_bytes`.
    pub fn validate_history(&self, history: &[Message]) -> Result<(), Error> {
        let limits = self.limits;
        if history.len() > limits.max_history_messages {
            return Err(Error::HistoryTooLong {
                messages: history.len(),
                limit: limits.max_history_messages,
            });
        }
        let bytes: usize = history.iter().map(history_bytes).sum();
        if bytes > limits.max_history_bytes {
            return Err(Error::HistoryTooLarge {
                bytes,
                limit: limits.max_history_bytes,
            });
        }
        Ok(())
    }

    /// `max_tokens` (0 or absent: the provider's default) is at most [`MAX_TOKENS_LIMIT`].
    pub fn validate_max_tokens(&self, max_tokens: Option<u32>) -> Result<(), Error> {
        match max_tokens {
            Some(n) if n > MAX_TOKENS_LIMIT => Err(Error::MaxTokensOutOfRange {
                limit: MAX_TOKENS_LIMIT,
            }),
            _ => Ok(()),
        }
    }

    /// Every `provider_config` key is one of [`PROVIDER_CONFIG_KEYS`] and every value within
    /// [`MAX_PROVIDER_CONFIG_VALUE`].
    pub fn validate_provider_config<'k>(
        &self,
        config: impl IntoIterator<Item = (&'k String, &'k String)>,
    ) -> Result<(), Error> {
        for (k, v) in config {
            if !PROVIDER_CONFIG_KEYS.contains(&k.as_str()) {
                return Err(Error::ProviderConfigInvalid(format!(
                    "provider_config key `{}` is not one of: {}",
                    k.chars().take(64).collect::<String>(),
                    PROVIDER_CONFIG_KEYS.join(", ")
                )));
            }
            if v.len() > MAX_PROVIDER_CONFIG_VALUE {
                return Err(Error::ProviderConfigInvalid(format!(
                    "provider_config.{k} is longer than {MAX_PROVIDER_CONFIG_VALUE} bytes"
                )));
            }
        }
        Ok(())
    }

    /// A prompt of chatcli's own API (SendPrompt, StreamPrompt, `POST /request`): validated
    /// (prompt, `max_tokens`, history), then answered through the fallback chain with the
    /// watcher's context; returns once a provider produced its first delta.
    pub async fn prompt(&self, call: PromptCall) -> Result<Answer, Error> {
        self.prompt_via(PromptRoute::Chatcli, call).await
    }

    /// A prompt arriving by `route`: as [`Gateway::prompt`], with the context that route gets
    /// ([`Gateway::prompt_context`]).
    pub async fn prompt_via(&self, route: PromptRoute, call: PromptCall) -> Result<Answer, Error> {
        self.validate_prompt(&call.prompt)?;
        self.validate_max_tokens(call.max_tokens)?;
        self.validate_history(&call.history)?;
        self.start(route, call).await
    }

    /// A prompt that may continue a saved session: with `session` (a session name of `who`,
    /// created on first use), the session's chat history is the history, and the returned
    /// [`PromptAnswer::session`] appends the new turn when the caller saves it; readonly
    /// principals may not name a session. Without one, it is [`Gateway::prompt`].
    pub async fn session_prompt(
        &self,
        who: &Principal,
        mut call: PromptCall,
        session: Option<String>,
    ) -> Result<PromptAnswer, Error> {
        let Some(name) = session else {
            let answer = self.prompt(call).await?;
            return Ok(PromptAnswer {
                answer,
                session: None,
            });
        };
        // The request is checked before the session is read: a bad one costs no file access.
        self.validate_prompt(&call.prompt)?;
        self.validate_max_tokens(call.max_tokens)?;
        crate::sessions::validate_name(&name)?;
        require_write(who, "write sessions")?;
        let turn = SessionTurn::new(who.session_namespace(), name, call.prompt.clone());
        call.history = turn.history(self).await?;
        self.validate_history(&call.history)?;
        let answer = self.start(PromptRoute::Chatcli, call).await?;
        Ok(PromptAnswer {
            answer,
            session: Some(turn),
        })
    }

    /// The tools a call of `role` may offer: those of the MCP servers ready now, when the role is
    /// one of `catalog.mcp_roles`; `None` (a plain prompt) otherwise or when no server is
    /// configured.
    pub fn tools_for(&self, role: crate::auth::Role) -> Option<crate::llm::tools::PromptTools> {
        let hub = self.mcp.filter(|h| h.is_configured())?;
        if !self.catalog.mcp_roles.contains(&role) {
            tracing::debug!(
                ?role,
                "MCP tools not offered: the role is not in catalog.mcp_roles"
            );
            return None;
        }
        let host = hub.toolbox()?;
        Some(crate::llm::tools::PromptTools {
            host,
            max_rounds: self.catalog.mcp_max_rounds,
            audit: None,
        })
    }

    /// Starts a validated call on the providers.
    pub async fn start(&self, route: PromptRoute, mut call: PromptCall) -> Result<Answer, Error> {
        if call.tools.is_none()
            && let Some(role) = call.tool_role
        {
            call.tools = self.tools_for(role);
        }
        let context = self.prompt_context(route);
        crate::llm::gateway::start(
            self.registry,
            self.cooldowns,
            self.metrics.cloned(),
            context.as_deref(),
            call,
        )
        .await
        .map_err(|e| {
            tracing::debug!(error = %e, "prompt call failed");
            Error::Provider(e)
        })
    }

    /// One interactive turn: `prompt` after `history`, answered whole. The history gains the user
    /// turn and the answer only when the call succeeds, so a failed turn leaves no orphan message;
    /// it is then trimmed to the bounds of a prompt's history, oldest turns first.
    pub async fn interactive_turn(
        &self,
        history: &mut Vec<Message>,
        prompt: String,
        provider: String,
        model: String,
        client_api_key: &str,
        caller: TurnCaller,
    ) -> Result<TurnAnswer, Error> {
        self.validate_prompt(&prompt)?;
        let call = PromptCall {
            provider,
            model,
            history: history.clone(),
            prompt,
            credentials: crate::llm::ClientCredentials::from_request(client_api_key, Vec::new()),
            // The session answers with the whole text.
            unary: true,
            tool_role: Some(caller.role),
            tool_audit: caller.tool_audit,
            ..Default::default()
        };
        let prompt = call.prompt.clone();
        let answer = self.start(PromptRoute::Chatcli, call).await?;
        let (text, tools) = collect_with_tools(answer.stream).await?;
        history.push(Message {
            role: "user".into(),
            content: prompt,
        });
        history.push(Message {
            role: "assistant".into(),
            content: text.clone(),
        });
        let trimmed = trim_history(history, self.limits);
        if trimmed > 0 {
            tracing::debug!(
                trimmed,
                kept = history.len(),
                "interactive session history trimmed"
            );
        }
        Ok(TurnAnswer {
            text,
            provider: answer.provider,
            model: answer.model,
            trimmed,
            tools,
        })
    }
}

/// Readonly principals may not change state; `what` completes "readonly principals cannot …".
pub fn require_write(who: &Principal, what: &str) -> Result<(), Error> {
    match who.can_write() {
        true => Ok(()),
        false => Err(Error::PermissionDenied(format!(
            "readonly principals cannot {what}"
        ))),
    }
}

/// Drops the oldest turns (a user message and its answer) of an interactive session's history
/// until it fits the bounds a prompt's history has (`limits.max_history_messages` and
/// `limits.max_history_bytes`, counted as [`Gateway::validate_history`] counts); returns how many
/// messages were dropped.
fn trim_history(history: &mut Vec<Message>, limits: &LimitsConfig) -> usize {
    let mut bytes: usize = history.iter().map(history_bytes).sum();
    let mut dropped = 0;
    while dropped < history.len()
        && (history.len() - dropped > limits.max_history_messages
            || bytes > limits.max_history_bytes)
    {
        let turn = (history.len() - dropped).min(2);
        bytes -= history[dropped..dropped + turn]
            .iter()
            .map(history_bytes)
            .sum::<usize>();
        dropped += turn;
    }
    history.drain(..dropped);
    dropped
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn msg(role: &str, n: usize) -> Message {
        Message {
            role: role.into(),
            content: "x".repeat(n),
        }
    }

    #[test]
    fn history_is_trimmed_by_whole_turns_oldest_first() {
        let limits = LimitsConfig {
            max_history_messages: 4,
            max_history_bytes: 1_000,
            ..Default::default()
        };
        let mut h: Vec<Message> = (0..6)
            .map(|i| msg(if i % 2 == 0 { "user" } else { "assistant" }, 1))
            .collect();
        assert_eq!(trim_history(&mut h, &limits), 2);
        assert_eq!(h.len(), 4);
        assert_eq!(h[0].role, "user");
    }

    #[test]
    fn validation_answers_the_code_of_each_limit() {
        let limits = LimitsConfig {
            max_prompt_bytes: 4,
            max_history_messages: 1,
            max_history_bytes: 10,
            ..Default::default()
        };
        let registry = ProviderRegistry::default();
        let cooldowns = Cooldowns::default();
        let sessions = SessionStore::new(std::path::PathBuf::from("/nonexistent"));
        let watcher = crate::watcher::Watcher::new(None);
        let watcher_config = WatcherConfig::default();
        let g = Gateway {
            registry: &registry,
            limits: &limits,
            cooldowns: &cooldowns,
            metrics: None,
            sessions: &sessions,
            mcp: None,
            catalog: &Default::default(),
            watcher: &watcher,
            watcher_config: &watcher_config,
        };
        let code = |r: Result<(), Error>| r.unwrap_err().code();
        assert_eq!(code(g.validate_prompt("")), Code::PromptEmpty);
        assert_eq!(code(g.validate_prompt("12345")), Code::PromptTooLarge);
        assert!(g.validate_prompt("1234").is_ok());
        assert_eq!(
            code(g.validate_history(&[msg("user", 1), msg("user", 1)])),
            Code::HistoryTooLong
        );
        assert_eq!(
            code(g.validate_history(&[msg("user", 7)])),
            Code::HistoryTooLarge
        );
        assert_eq!(
            code(g.validate_max_tokens(Some(MAX_TOKENS_LIMIT + 1))),
            Code::MaxTokensOutOfRange
        );
        assert!(g.validate_max_tokens(Some(MAX_TOKENS_LIMIT)).is_ok());
        let bad = [("password".to_string(), "x".to_string())];
        assert_eq!(
            code(g.validate_provider_config(bad.iter().map(|(k, v)| (k, v)))),
            Code::ProviderConfigInvalid
        );
    }
}
