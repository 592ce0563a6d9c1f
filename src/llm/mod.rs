//! The provider seam: a [`Provider`] streams deltas for a [`ChatRequest`] (a unary answer is the
//! collected stream), a [`ProviderRegistry`] built from config resolves names case-insensitively, and
//! one file per wire format implements the trait. This build has the built-in `echo` kind; the real
//! wire formats arrive with issue #5 and answer `UNIMPLEMENTED` until then.

mod echo;
mod registry;

use std::pin::Pin;

use futures::Stream;

pub use echo::EchoProvider;
pub use registry::{ProviderRegistry, Resolved};

/// One turn of a conversation sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// Why a provider call failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The named provider is not configured.
    #[error("unknown provider `{name}`; available: {available}")]
    UnknownProvider {
        /// What the caller asked for.
        name: String,
        /// The configured names.
        available: String,
    },
    /// No provider is configured at all.
    #[error("no LLM provider is configured on this server")]
    NoProviders,
    /// The provider kind is not in this build yet.
    #[error("provider kind `{kind}` is not in this build yet: it waits for {waits_for}")]
    NotImplemented {
        /// The kind.
        kind: String,
        /// The issue it waits for.
        waits_for: &'static str,
    },
    /// The upstream failed.
    #[error("LLM error: {0}")]
    Upstream(String),
}

impl LlmError {
    /// The gRPC status for this error.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            LlmError::UnknownProvider { .. } => tonic::Status::invalid_argument(self.to_string()),
            LlmError::NoProviders => tonic::Status::unavailable(self.to_string()),
            LlmError::NotImplemented { .. } => tonic::Status::unimplemented(self.to_string()),
            LlmError::Upstream(_) => tonic::Status::internal(self.to_string()),
        }
    }
}

/// A stream of deltas, ending when the answer is complete.
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<Delta, LlmError>> + Send>>;

/// The known provider kinds (wire formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// Built-in: streams the prompt back word by word. For demos and tests.
    Echo,
    /// OpenAI Chat Completions.
    OpenAi,
    /// OpenAI-compatible APIs (xAI, OpenRouter, …).
    OpenAiCompatible,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini.
    Gemini,
    /// Ollama's native API.
    Ollama,
    /// StackSpot agents.
    StackSpot,
}

impl ProviderKind {
    /// Every kind's config name.
    pub const NAMES: &[&str] = &[
        "echo",
        "openai",
        "openai-compatible",
        "anthropic",
        "gemini",
        "ollama",
        "stackspot",
    ];

    /// Parses a config name (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "echo" => Self::Echo,
            "openai" => Self::OpenAi,
            "openai-compatible" => Self::OpenAiCompatible,
            "anthropic" => Self::Anthropic,
            "gemini" => Self::Gemini,
            "ollama" => Self::Ollama,
            "stackspot" => Self::StackSpot,
            _ => return None,
        })
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::OpenAi => "openai",
            Self::OpenAiCompatible => "openai-compatible",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::Ollama => "ollama",
            Self::StackSpot => "stackspot",
        }
    }
}

/// An LLM backend.
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// The name clients use.
    fn name(&self) -> &str;
    /// The wire format.
    fn kind(&self) -> ProviderKind;
    /// The model used when the request names none.
    fn default_model(&self) -> &str;
    /// Starts the call; deltas arrive as the upstream produces them. Dropping the stream cancels it.
    fn stream(&self, request: ChatRequest) -> DeltaStream;
}

/// Collects a stream into the full answer text and the last usage seen.
pub async fn collect(mut stream: DeltaStream) -> Result<(String, Option<Usage>), LlmError> {
    use futures::StreamExt;
    let mut text = String::new();
    let mut usage = None;
    while let Some(item) = stream.next().await {
        match item? {
            Delta::Text(t) => text.push_str(&t),
            Delta::Usage(u) => usage = Some(u),
        }
    }
    Ok((text, usage))
}

/// A configured provider whose kind is not in this build yet: every call answers `UNIMPLEMENTED`.
#[derive(Debug)]
pub struct PendingProvider {
    name: String,
    kind: ProviderKind,
    model: String,
}

impl Provider for PendingProvider {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> ProviderKind {
        self.kind
    }
    fn default_model(&self) -> &str {
        &self.model
    }
    fn stream(&self, _request: ChatRequest) -> DeltaStream {
        let err = LlmError::NotImplemented {
            kind: self.kind.as_str().to_string(),
            waits_for: "issue #5 (LLM providers)",
        };
        Box::pin(futures::stream::once(async move { Err(err) }))
    }
}
