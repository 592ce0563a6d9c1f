//! Tool use in prompts: the tools a prompt offers its provider ([`ToolSpec`]), the calls the
//! provider asks for ([`ToolCall`]), and the loop that runs them ([`start`]).
//!
//! The loop asks the provider for a whole answer each round (a tool round's answer is read to its
//! end anyway before its calls can run). When the answer asks for tools, each call is run on the
//! [`ToolHost`] (the MCP servers), the call and its result go to the caller as
//! [`Delta::Tool`] events, and the conversation with the calls and results goes back to the same
//! provider; when it answers with text, that text is the answer. After `max_rounds` rounds of calls
//! the provider is asked once more with tool use turned off, and that answer (streamed when the
//! caller streams) is the final one. Only the first round may fall back to another provider; later
//! rounds stay with the provider that asked for the tools (the conversation is in its format).
//!
//! Wire formats read [`ChatRequest::tools`], [`ChatRequest::tool_turns`] and
//! [`ChatRequest::tool_choice_none`] only when tools are offered, so a prompt without tools sends
//! the same bytes it always did.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::Value;

use super::fallback::{self, Answer, Candidate, Cooldowns, FallbackSettings};
use super::{ChatRequest, Delta, LlmError, Usage};
use crate::telemetry::Metrics;

/// A tool offered to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    /// The name the provider calls it by (unique among the offered tools).
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// The JSON schema of its arguments (an object schema).
    pub parameters: Value,
}

/// One call the provider asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The provider's id of the call (made up when the format has none, as Gemini's).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments (a JSON object).
    pub arguments: Value,
}

/// A tool's answer to one call, as sent back to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    /// The text of the result (or of the failure).
    pub content: String,
    /// The call failed (the tool said so, or it could not run).
    pub is_error: bool,
}

/// One round of tool use: what the assistant said and asked for, and what the tools answered (in
/// the order of the calls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolTurn {
    /// Text the assistant wrote beside its calls (often empty).
    pub text: String,
    /// The calls.
    pub calls: Vec<ToolCall>,
    /// One output per call, in the same order.
    pub outputs: Vec<ToolOutput>,
}

/// How a tool call ended, for the caller, the audit log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolOutcome {
    /// The tool answered.
    Ok,
    /// The tool answered with an error result.
    ToolError,
    /// No offered tool has that name.
    Unknown,
    /// Its server is not available (failed to start, crashed, answered garbage).
    Unavailable,
    /// Its server did not answer within its timeout.
    Timeout,
}

impl ToolOutcome {
    /// The outcome as a label: `ok`, `tool_error`, `unknown_tool`, `unavailable`, `timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolOutcome::Ok => "ok",
            ToolOutcome::ToolError => "tool_error",
            ToolOutcome::Unknown => "unknown_tool",
            ToolOutcome::Unavailable => "unavailable",
            ToolOutcome::Timeout => "timeout",
        }
    }
}

/// What running one call gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolReply {
    /// The server the tool belongs to (empty for an unknown tool).
    pub server: String,
    /// The tool's name on its server.
    pub tool: String,
    /// What goes back to the provider.
    pub output: ToolOutput,
    /// How it ended.
    pub outcome: ToolOutcome,
    /// How long it took.
    pub duration: Duration,
}

/// What the caller is told about tool use, in the answer's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// The provider asked for a call; it runs now.
    Call {
        /// The call.
        call: ToolCall,
        /// The server it goes to (empty for an unknown tool).
        server: String,
    },
    /// A call ended.
    Result {
        /// The call's id.
        id: String,
        /// The name the provider called.
        name: String,
        /// What it gave.
        reply: ToolReply,
    },
}

/// Where tool calls run: the tools of the caller's MCP servers.
pub trait ToolHost: Send + Sync + std::fmt::Debug {
    /// The tools offered (empty: none, and the prompt runs without tools).
    fn specs(&self) -> Arc<[ToolSpec]>;
    /// The server of the offered tool `name`.
    fn server_of(&self, name: &str) -> Option<String>;
    /// Runs `call`; never fails: a failure is an error output with its outcome.
    fn call<'a>(&'a self, call: &'a ToolCall) -> BoxFuture<'a, ToolReply>;
}

/// Told of each tool call a prompt makes (the transports note them for the audit log).
#[derive(Clone)]
pub struct ToolAudit(pub Arc<dyn Fn(&ToolReply) + Send + Sync>);

impl std::fmt::Debug for ToolAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ToolAudit")
    }
}

/// The tools of one prompt: where they run, and how many rounds of calls it may make.
#[derive(Debug, Clone)]
pub struct PromptTools {
    /// The host.
    pub host: Arc<dyn ToolHost>,
    /// Rounds of tool calls before the provider must answer without tools (at least 1).
    pub max_rounds: u32,
    /// Told of each call.
    pub audit: Option<ToolAudit>,
}

/// One round's answer read whole.
#[derive(Debug, Default)]
struct Round {
    text: String,
    calls: Vec<ToolCall>,
    usage: Option<Usage>,
    finish: Option<String>,
}

async fn read_round(mut stream: super::DeltaStream) -> Result<Round, LlmError> {
    let mut r = Round::default();
    while let Some(item) = stream.next().await {
        match item? {
            Delta::Text(t) => r.text.push_str(&t),
            Delta::Usage(u) => r.usage = Some(u),
            Delta::Finish(f) => r.finish = Some(f),
            Delta::ToolCall(c) => r.calls.push(c),
            Delta::Tool(_) => {}
        }
    }
    Ok(r)
}

/// The deltas that hand a round's text (and usage and finish) to the caller.
fn answer_deltas(round: Round) -> Vec<Delta> {
    let mut out = Vec::with_capacity(3);
    if !round.text.is_empty() {
        out.push(Delta::Text(round.text));
    }
    if let Some(u) = round.usage {
        out.push(Delta::Usage(u));
    }
    out.push(Delta::Finish(round.finish.unwrap_or_else(|| "stop".into())));
    out
}

/// Starts a prompt with tools (see the module docs): returns once the first round is answered.
pub async fn start(
    candidates: Vec<Candidate>,
    mut request: ChatRequest,
    settings: &FallbackSettings,
    cooldowns: &Cooldowns,
    metrics: Option<&Metrics>,
    deadline: Option<Instant>,
    tools: PromptTools,
) -> Result<Answer, LlmError> {
    let caller_streams = request.stream;
    request.tools = tools.host.specs();
    request.stream = false;
    let first = fallback::start(
        candidates.clone(),
        request.clone(),
        settings,
        cooldowns,
        metrics,
        deadline,
    )
    .await?;
    let Answer {
        provider,
        model,
        stream,
        series,
    } = first;
    let round = read_round(stream).await?;
    if round.calls.is_empty() {
        return Ok(Answer {
            provider,
            model,
            stream: Box::pin(futures::stream::iter(
                answer_deltas(round).into_iter().map(Ok),
            )),
            series,
        });
    }
    // Later rounds go to the provider that asked for the tools, with its model.
    let Some(mut chosen) = candidates
        .into_iter()
        .find(|c| c.provider.name() == provider)
    else {
        return Err(LlmError::InvalidRequest(format!(
            "provider `{provider}` asked for tools but is not among the candidates"
        )));
    };
    chosen.model = model.clone();
    // The later rounds run after this call returned, without the shared cooldowns: they neither
    // read nor change them (as calls with a caller's own credentials do).
    chosen.shared = false;
    request.model = model.clone();
    let settings = FallbackSettings {
        chain: Vec::new(),
        ..settings.clone()
    };
    let host = tools.host;
    let audit = tools.audit;
    let max_rounds = tools.max_rounds.max(1);
    let stream = async_stream::try_stream! {
        let mut round = round;
        let mut rounds = 0u32;
        loop {
            if let Some(u) = round.usage.take() {
                yield Delta::Usage(u);
            }
            if round.calls.is_empty() || rounds >= max_rounds {
                // The final answer; calls asked for after the last round are not run.
                for d in answer_deltas(round) {
                    yield d;
                }
                return;
            }
            rounds += 1;
            let mut outputs = Vec::with_capacity(round.calls.len());
            for call in &round.calls {
                yield Delta::Tool(ToolEvent::Call {
                    call: call.clone(),
                    server: host.server_of(&call.name).unwrap_or_default(),
                });
                let reply = host.call(call).await;
                if let Some(a) = &audit {
                    (a.0)(&reply);
                }
                outputs.push(reply.output.clone());
                yield Delta::Tool(ToolEvent::Result {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    reply,
                });
            }
            request.tool_turns.push(ToolTurn {
                text: std::mem::take(&mut round.text),
                calls: std::mem::take(&mut round.calls),
                outputs,
            });
            let last = rounds >= max_rounds;
            if last {
                // Out of rounds: the provider answers without tools, streamed when the caller
                // streams.
                request.tool_choice_none = true;
                request.stream = caller_streams;
            }
            let next = fallback::start(
                vec![chosen.clone()],
                request.clone(),
                &settings,
                &Cooldowns::default(),
                None,
                deadline,
            )
            .await?;
            if last {
                let mut s = next.stream;
                while let Some(d) = s.next().await {
                    match d? {
                        Delta::ToolCall(_) | Delta::Tool(_) => {}
                        d => yield d,
                    }
                }
                return;
            }
            round = read_round(next.stream).await?;
        }
    };
    Ok(Answer {
        provider,
        model,
        stream: Box::pin(stream),
        series,
    })
}
