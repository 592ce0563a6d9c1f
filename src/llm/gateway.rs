//! The provider side of a prompt, which the core's prompt use cases (`gateway::Gateway::prompt`
//! and the interactive turn) run once the request is validated: resolve the provider, apply the
//! caller's credentials or the fallback chain, compose the upstream conversation, and count the
//! call in the LLM metrics when its stream ends.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;

use super::compose::compose;
use super::fallback::{self, Answer, Candidate, Cooldowns};
use super::{ChatRequest, ClientCredentials, Delta, LlmError, Message, ProviderRegistry};
use crate::telemetry::{LlmErrorType, LlmSeries, LlmStatus, Metrics};

/// One prompt, as any surface receives it.
#[derive(Debug, Clone, Default)]
pub struct PromptCall {
    /// Provider name; empty = the default.
    pub provider: String,
    /// Model; empty = the provider's default (or the server default for the default provider).
    pub model: String,
    /// Earlier turns, oldest first.
    pub history: Vec<Message>,
    /// The new user turn.
    pub prompt: String,
    /// Generation bounds and sampling, passed through.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// What the caller forwarded (`client_api_key`, `provider_config`).
    pub credentials: Option<ClientCredentials>,
    /// The caller's deadline.
    pub deadline: Option<Instant>,
    /// The caller takes the whole answer at once (SendPrompt, `stream: false`): providers may ask
    /// their upstream for a whole answer too ([`ChatRequest::stream`]).
    pub unary: bool,
    /// The caller's role, on the surfaces whose prompts may use the server's MCP tools
    /// (`SendPrompt`, `StreamPrompt`, `InteractiveSession`, `POST /request`); `None` elsewhere.
    /// The core turns it into [`PromptCall::tools`] when the role may use them.
    pub tool_role: Option<crate::config::Role>,
    /// The tools the call offers; `None`: a plain prompt.
    pub tools: Option<super::tools::PromptTools>,
    /// Told of each tool call the prompt makes (the audit log).
    pub tool_audit: Option<super::tools::ToolAudit>,
    /// The JSON schema the answer must follow ([`ChatRequest::schema`]).
    pub schema: Option<Arc<super::ResponseSchema>>,
}

/// Starts a prompt: returns once a provider has produced its first delta (or every candidate
/// failed). Server context (e.g. the watcher's summary) is added by [`compose`].
pub async fn start(
    registry: &ProviderRegistry,
    cooldowns: &Cooldowns,
    metrics: Option<Arc<Metrics>>,
    context: Option<&str>,
    call: PromptCall,
) -> Result<Answer, LlmError> {
    let resolved = registry.resolve(&call.provider, &call.model)?;
    let candidates = match &call.credentials {
        // Forwarded credentials belong to the provider the caller named: no fallback.
        // Built from the caller's key or URL, so it stays out of the shared cooldowns.
        Some(creds) => vec![Candidate {
            provider: resolved.provider.with_client_credentials(creds).await?,
            model: resolved.model.clone(),
            shared: false,
            unary_timeout: resolved.unary_timeout,
        }],
        None => registry.candidates(&resolved),
    };
    let mut request = ChatRequest::new(
        compose(context, call.history, &call.prompt),
        resolved.model.clone(),
    );
    request.max_tokens = call.max_tokens;
    request.temperature = call.temperature;
    request.top_p = call.top_p;
    request.stop = call.stop;
    request.stream = !call.unary;
    request.schema = call.schema;
    let started = Instant::now();
    let result = match call.tools {
        Some(mut tools) if offers_tools(resolved.provider.kind()) => {
            tools.audit = call.tool_audit;
            super::tools::start(
                candidates,
                request,
                registry.fallback(),
                cooldowns,
                metrics.as_deref(),
                call.deadline,
                tools,
            )
            .await
        }
        _ => {
            fallback::start(
                candidates,
                request,
                registry.fallback(),
                cooldowns,
                metrics.as_deref(),
                call.deadline,
            )
            .await
        }
    };
    match (result, metrics) {
        (Ok(answer), Some(m)) => Ok(instrument(answer, m, started)),
        (Ok(answer), None) => Ok(answer),
        (Err(e), Some(m)) => {
            let series = m.llm(resolved.provider.name(), &resolved.model);
            series.request(LlmStatus::Error, started.elapsed());
            series.error(error_type(&e));
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

/// Whether prompts to a provider of `kind` may offer tools (the wire formats that carry them).
pub fn offers_tools(kind: super::ProviderKind) -> bool {
    use super::ProviderKind as K;
    matches!(kind, K::OpenAi | K::Anthropic | K::Gemini | K::Ollama)
}

/// The existing ChatCLI's `error_type` label for an error.
pub fn error_type(e: &LlmError) -> LlmErrorType {
    use super::ErrorClass::*;
    let class = match e {
        LlmError::Upstream(u) => Some(u.class),
        // Every provider failed the same way (all timed out, say): counted as that.
        LlmError::AllFailed(all) => all
            .first()
            .map(|u| u.class)
            .filter(|c| all.iter().all(|u| u.class == *c)),
        _ => None,
    };
    match class {
        Some(RateLimit) => LlmErrorType::RateLimit,
        Some(Timeout) => LlmErrorType::Timeout,
        Some(Auth) => LlmErrorType::AuthError,
        Some(Server) => LlmErrorType::ServerError,
        _ => LlmErrorType::Unknown,
    }
}

/// Counts the call when its stream ends: success with tokens, error by type, or cancelled when the
/// caller drops it first.
fn instrument(answer: Answer, metrics: Arc<Metrics>, started: Instant) -> Answer {
    struct Record {
        series: Arc<LlmSeries>,
        started: Instant,
        done: bool,
    }
    impl Drop for Record {
        fn drop(&mut self) {
            if !self.done {
                self.series
                    .request(LlmStatus::Error, self.started.elapsed());
                self.series.error(LlmErrorType::Canceled);
            }
        }
    }
    let Answer {
        provider,
        model,
        stream,
        series,
    } = answer;
    let mut rec = Record {
        series: series.unwrap_or_else(|| metrics.llm(&provider, &model)),
        started,
        done: false,
    };
    let mut inner = stream;
    let out = async_stream::stream! {
        while let Some(item) = inner.next().await {
            match &item {
                Ok(Delta::Usage(u)) => {
                    rec.series.tokens("prompt", u.prompt_tokens);
                    rec.series.tokens("completion", u.completion_tokens);
                }
                Err(e) => {
                    rec.done = true;
                    rec.series.request(LlmStatus::Error, rec.started.elapsed());
                    rec.series.error(error_type(e));
                }
                _ => {}
            }
            let failed = item.is_err();
            yield item;
            if failed {
                return;
            }
        }
        rec.done = true;
        rec.series.request(LlmStatus::Success, rec.started.elapsed());
    };
    Answer {
        provider,
        model,
        stream: Box::pin(out),
        // Counted from here on by `rec`.
        series: None,
    }
}
