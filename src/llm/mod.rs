//! The provider seam: a [`Provider`] streams deltas for a [`ChatRequest`] (a unary answer is the
//! collected stream), and a [`ProviderRegistry`] built from config resolves names
//! case-insensitively. The HTTP kinds are one generic provider ([`wire::HttpProvider`]) over a
//! [`wire::WireFormat`] per file (`openai` with its compatible presets, `anthropic`, `gemini`,
//! `ollama`); `stackspot` (an OAuth account and its own token flow) and the built-in `echo` are
//! providers of their own. Beside them: the client-credential rule every kind applies
//! ([`ClientCredentials::caller_url`]), the fallback chain, the SSRF guard, and the HTTP plumbing they share.

pub mod anthropic;
pub mod chunker;
pub mod compose;
mod credentials;
mod echo;
pub mod error;
pub mod fallback;
pub mod gateway;
pub mod gemini;
pub mod http;
pub mod json;
pub mod lean;
pub mod models;
pub mod ollama;
pub mod openai;
mod registry;
pub mod ssrf;
pub mod stackspot;
pub mod tools;
pub mod wire;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::future::BoxFuture;

pub use credentials::{ClientCredentials, ClientKey, KeyScheme};
pub use echo::EchoProvider;
pub use error::{ErrorClass, LlmError, UpstreamError};
pub use registry::{ProviderRegistry, Resolved};

/// What every provider gets at construction: the SSRF guard for client-supplied URLs.
#[derive(Debug, Clone, Default)]
pub struct ProviderContext {
    /// The guard.
    pub ssrf: Arc<ssrf::SsrfPolicy>,
}

/// One turn of a conversation sent upstream (serialized as the `{"role", "content"}` object most
/// wire formats share).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    /// "system", "user" or "assistant" (others pass through).
    pub role: String,
    /// The text.
    pub content: String,
}

/// What a provider is asked for: the whole conversation, newest turn last.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// History then the prompt.
    pub messages: Vec<Message>,
    /// The model to use (already resolved to the provider's default when the caller named none).
    pub model: String,
    /// Upper bound on generated tokens; `None` = provider default.
    pub max_tokens: Option<u32>,
    /// Sampling temperature, passed through where the provider supports it.
    pub temperature: Option<f32>,
    /// Nucleus sampling, passed through where the provider supports it.
    pub top_p: Option<f32>,
    /// Stop sequences, passed through where the provider supports them.
    pub stop: Vec<String>,
    /// Whether the caller reads the answer as it comes (`StreamPrompt`, `stream: true`). When it
    /// does not, a provider may ask its upstream for the whole answer in one response (less
    /// framing to parse, and what any other gateway sends); its stream then yields it at once.
    pub stream: bool,
    /// Tools offered to the model (empty: none; wire formats then send what they always did).
    pub tools: Arc<[tools::ToolSpec]>,
    /// The rounds of tool use so far, after `messages`.
    pub tool_turns: Vec<tools::ToolTurn>,
    /// Ask the model to answer without calling a tool (the last round).
    pub tool_choice_none: bool,
    /// The JSON schema the answer must follow, for providers whose API takes one (OpenAI
    /// `response_format`, Gemini `responseSchema`, Anthropic a forced tool, Ollama `format`);
    /// the others get only the prompt's own instructions.
    pub schema: Option<Arc<ResponseSchema>>,
}

impl ChatRequest {
    /// Whether the request carries tools or tool turns (the wire formats' slower path).
    pub fn uses_tools(&self) -> bool {
        !self.tools.is_empty() || !self.tool_turns.is_empty()
    }
}

/// A JSON schema an answer is asked to follow (structured output).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseSchema {
    /// Its name (OpenAI's `json_schema.name`, Anthropic's tool name): `[a-zA-Z0-9_-]`, ≤ 64.
    pub name: &'static str,
    /// What the answer is, for the tool's description.
    pub description: &'static str,
    /// The JSON schema of the whole answer (an object).
    pub schema: serde_json::Value,
}

impl ChatRequest {
    /// A request for `messages` with the provider defaults for everything else.
    pub fn new(messages: Vec<Message>, model: impl Into<String>) -> Self {
        Self {
            messages,
            model: model.into(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            stream: true,
            tools: Arc::from(Vec::new()),
            tool_turns: Vec::new(),
            tool_choice_none: false,
            schema: None,
        }
    }
}

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

/// One item of a provider's answer stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// More answer text, in order.
    Text(String),
    /// Token usage, usually once near the end.
    Usage(Usage),
    /// Why the answer ended ("stop", "length", …), when the upstream says.
    Finish(String),
    /// The model asks for a tool call (only when tools were offered).
    ToolCall(tools::ToolCall),
    /// A tool call the prompt made, for the caller to show (tool-use prompts only).
    Tool(tools::ToolEvent),
}

/// A stream of deltas, ending when the answer is complete.
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<Delta, LlmError>> + Send>>;

pub use crate::config::ProviderKind;

/// An LLM backend.
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// The name clients use.
    fn name(&self) -> &str;
    /// The wire format.
    fn kind(&self) -> ProviderKind;
    /// The model used when the request names none.
    fn default_model(&self) -> &str;
    /// Asks the upstream which models it offers (`discover_models`), with the server's
    /// credentials. Wire formats without a model list answer an [`LlmError::InvalidRequest`].
    fn discover_models(&self) -> BoxFuture<'_, Result<Vec<String>, LlmError>> {
        let name = self.name().to_string();
        let kind = self.kind().as_str();
        Box::pin(async move {
            Err(LlmError::InvalidRequest(format!(
                "provider `{name}` ({kind}) cannot list its upstream's models"
            )))
        })
    }
    /// Starts the call; deltas arrive as the upstream produces them. Dropping the stream cancels it.
    fn stream(&self, request: &ChatRequest) -> DeltaStream;
    /// A request-scoped provider that uses the caller's credentials instead of the server's. URLs in
    /// `creds.config` must pass the SSRF guard of the [`ProviderContext`] the provider was built with.
    fn with_client_credentials<'a>(
        &'a self,
        _creds: &'a ClientCredentials,
    ) -> BoxFuture<'a, Result<Arc<dyn Provider>, LlmError>> {
        let name = self.name().to_string();
        Box::pin(async move {
            Err(LlmError::InvalidRequest(format!(
                "provider `{name}` does not take client credentials"
            )))
        })
    }
    /// Checks, at start-up, that the provider can serve (e.g. Ollama has the model); the error says
    /// what is missing.
    fn check_ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Collects a stream into the full answer text and the last usage seen.
pub async fn collect(mut stream: DeltaStream) -> Result<(String, Option<Usage>), LlmError> {
    use futures::StreamExt;
    let mut text = String::new();
    let mut usage = None;
    while let Some(item) = stream.next().await {
        match item? {
            // Usually one delta: its text is taken as it is.
            Delta::Text(t) if text.is_empty() => text = t,
            Delta::Text(t) => text.push_str(&t),
            Delta::Usage(u) => usage = Some(u),
            // A call that offered no tools gets a tool call only as a structured answer
            // (Anthropic answers a request's `schema` with the forced tool): its input is the text.
            Delta::ToolCall(c) => match c.arguments {
                serde_json::Value::String(s) => text.push_str(&s),
                v => text.push_str(&v.to_string()),
            },
            Delta::Finish(_) | Delta::Tool(_) => {}
        }
    }
    Ok((text, usage))
}

impl ProviderContext {
    /// The context of an `[llm]` config: its SSRF policy.
    pub fn from_config(llm: &crate::config::LlmConfig) -> Result<Self, String> {
        let policy = ssrf::SsrfPolicy::new(llm.allow_http_providers, &llm.ssrf_allow)
            .map_err(|e| format!("llm.ssrf_allow: {e}"))?;
        Ok(Self {
            ssrf: Arc::new(policy),
        })
    }
}

/// Builds one configured provider.
pub fn build_provider(
    cfg: &crate::config::ProviderConfig,
    ctx: &ProviderContext,
) -> Result<Arc<dyn Provider>, LlmError> {
    let kind = ProviderKind::parse(&cfg.kind)
        .ok_or_else(|| LlmError::InvalidRequest(format!("unknown provider kind `{}`", cfg.kind)))?;
    match kind {
        ProviderKind::Echo => Ok(Arc::new(EchoProvider::new(
            &cfg.name,
            cfg.model.clone(),
            cfg.delay,
        ))),
        ProviderKind::OpenAi => openai::build(cfg, ctx),
        ProviderKind::Anthropic => anthropic::build(cfg, ctx),
        ProviderKind::Gemini => gemini::build(cfg, ctx),
        ProviderKind::Ollama => ollama::build(cfg, ctx),
        ProviderKind::StackSpot => stackspot::build(cfg, ctx),
    }
}
