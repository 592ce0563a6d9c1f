//! The Anthropic Messages wire format: `POST {base}/v1/messages` with `stream: true`, read as SSE
//! events (`message_start`, `content_block_delta`, `message_delta`, `message_stop`, `error`), each
//! text delta passed on as it arrives. Owns the request body, the auth headers (an API key as
//! `x-api-key`; an `oauth:`/`token:` key as `Authorization: Bearer`, OAuth with its beta flag), the
//! classification of Anthropic's typed errors, and the paged model list; the HTTP plumbing and the
//! client-credential rule are [`super::wire`]'s.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue};
use serde::Serialize;
use serde_json::{Value, json};

use super::error::{ErrorClass, LlmError};
use super::http::{self, ModelListing, SseEvent};
use super::wire::{self, Parts, Pending, WireFormat};
use super::{
    ChatRequest, ClientKey, Delta, KeyScheme, Provider, ProviderContext, ProviderKind, Usage,
};
use crate::config::ProviderConfig;

/// Where Anthropic's API lives when the config names no `base_url`.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The model used when the config names none.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-6";
/// The `anthropic-version` header when the config names none.
pub const DEFAULT_API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; this is sent when the request has none.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;
/// The beta flag Anthropic requires for OAuth access tokens.
const OAUTH_BETA: &str = "oauth-2025-04-20";

/// The Anthropic Messages format, with its `anthropic-version`.
#[derive(Debug, Clone)]
pub struct Anthropic {
    version: HeaderValue,
}

/// Builds the provider from its config; config errors name the provider.
pub fn build(cfg: &ProviderConfig, ctx: &ProviderContext) -> Result<Arc<dyn Provider>, LlmError> {
    let name = cfg.name.clone();
    let bad =
        |what: String| LlmError::InvalidRequest(format!("provider `{name}` (anthropic): {what}"));
    let key = cfg
        .api_key
        .as_ref()
        .filter(|k| !k.expose().trim().is_empty())
        .ok_or_else(|| bad("an api_key (or api_key_file) is required".into()))?;
    let base_url = cfg
        .base_url
        .as_deref()
        .unwrap_or(DEFAULT_BASE_URL)
        .trim_end_matches('/')
        .to_string();
    reqwest::Url::parse(&base_url).map_err(|e| bad(format!("base_url is not a URL: {e}")))?;
    let version = HeaderValue::from_str(cfg.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION))
        .map_err(|_| bad("api_version is not a valid header value".into()))?;
    let headers = http::header_map(&cfg.headers).map_err(bad)?;
    let parts = Parts {
        name: name.clone(),
        model: cfg
            .model
            .clone()
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_MODEL.into()),
        format: Anthropic { version },
        base_url,
        key: Some(key.clone()),
        headers,
        timeouts: http::Timeouts::of(cfg),
    };
    wire::provider(parts, ctx)
}

fn secret_header(value: &str) -> Result<HeaderValue, InvalidHeaderValue> {
    let mut v = HeaderValue::from_str(value)?;
    v.set_sensitive(true);
    Ok(v)
}

impl WireFormat for Anthropic {
    const KIND: ProviderKind = ProviderKind::Anthropic;

    /// `GET {base}/v1/models`, page by page (`has_more`, `after_id`): the ids of `data`.
    const MODELS: ModelListing = ModelListing {
        path: "/v1/models",
        query: Some(("limit", "1000")),
        cursor_key: "after_id",
        take: |provider, body, models| {
            models.extend(http::names_in(provider, body, "data", "id")?);
            Ok(body
                .get("last_id")
                .and_then(Value::as_str)
                .filter(|_| body.get("has_more").and_then(Value::as_bool) == Some(true))
                .map(String::from))
        },
        parse_error,
    };

    fn chat_url(&self, base: &str, _model: &str) -> Result<String, String> {
        Ok(format!("{base}/v1/messages"))
    }

    fn format_headers(&self, _stream: bool) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            self.version.clone(),
        );
        headers
    }

    fn authenticate(
        &self,
        key: &ClientKey,
        headers: &mut HeaderMap,
    ) -> Result<(), InvalidHeaderValue> {
        let secret = key.secret.expose();
        match key.scheme {
            KeyScheme::ApiKey => {
                headers.remove(AUTHORIZATION);
                headers.insert(HeaderName::from_static("x-api-key"), secret_header(secret)?);
            }
            KeyScheme::OAuth | KeyScheme::Token => {
                headers.remove("x-api-key");
                headers.insert(AUTHORIZATION, secret_header(&format!("Bearer {secret}"))?);
                if key.scheme == KeyScheme::OAuth {
                    // Keep any beta flags the operator configured; add the one OAuth needs.
                    let beta = match headers.get("anthropic-beta").and_then(|v| v.to_str().ok()) {
                        Some(existing) if !existing.trim().is_empty() => {
                            format!("{existing},{OAUTH_BETA}")
                        }
                        _ => OAUTH_BETA.to_string(),
                    };
                    let value = HeaderValue::from_str(&beta)?;
                    headers.insert(HeaderName::from_static("anthropic-beta"), value);
                }
            }
        }
        Ok(())
    }

    fn body(&self, req: &ChatRequest, model: &str) -> Vec<u8> {
        let body = serde_json::to_vec(&MessagesBody::new(req, model)).unwrap_or_default();
        match req.uses_tools() {
            false => body,
            true => with_tools(body, req),
        }
    }

    fn parse_error(status: u16, body: &str) -> Option<(ErrorClass, String)> {
        parse_error(status, body)
    }

    fn deltas(
        name: String,
        pending: Pending,
    ) -> impl Stream<Item = Result<Delta, LlmError>> + Send + 'static {
        async_stream::stream! {
            let answer = match pending.answer(&name).await {
                Ok(a) => a,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            if let Some(ct) = answer.content_type().filter(|ct| !ct.starts_with("text/event-stream")) {
                yield Err(LlmError::upstream(
                    &name,
                    ErrorClass::Malformed,
                    format!("expected an event stream, got content type `{ct}`"),
                ));
                return;
            }
            let mut events = answer.sse_events(&name);
            let mut state = StreamState::default();
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                match state.on_event(&name, &event) {
                    Ok(Some(delta)) => yield Ok(delta),
                    Ok(None) => {}
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
                if state.done {
                    http::read_rest_in_background(events);
                    if let Some(usage) = state.usage() {
                        yield Ok(Delta::Usage(usage));
                    }
                    return;
                }
            }
            yield Err(LlmError::upstream(
                &name,
                ErrorClass::Transport,
                "the stream ended before `message_stop`",
            ));
        }
    }
}

/// The body with the offered tools (`tools`, `tool_choice`) and the tool rounds so far (an
/// assistant message with its `tool_use` blocks, then a user message with one `tool_result` block
/// per call).
fn with_tools(body: Vec<u8>, req: &ChatRequest) -> Vec<u8> {
    let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    if let Some(Value::Array(messages)) = v.get_mut("messages") {
        for turn in &req.tool_turns {
            let mut blocks = Vec::new();
            if !turn.text.is_empty() {
                blocks.push(json!({"type": "text", "text": turn.text}));
            }
            for c in &turn.calls {
                let input = match &c.arguments {
                    Value::Object(_) => c.arguments.clone(),
                    _ => json!({}),
                };
                blocks
                    .push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}));
            }
            messages.push(json!({"role": "assistant", "content": blocks}));
            let results: Vec<Value> = turn
                .calls
                .iter()
                .zip(&turn.outputs)
                .map(|(c, out)| {
                    json!({"type": "tool_result", "tool_use_id": c.id,
                           "content": out.content, "is_error": out.is_error})
                })
                .collect();
            messages.push(json!({"role": "user", "content": results}));
        }
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
            .collect();
        v.insert("tools".into(), Value::Array(tools));
        if req.tool_choice_none {
            v.insert("tool_choice".into(), json!({"type": "none"}));
        }
    }
    serde_json::to_vec(&v).unwrap_or(body)
}

/// The Messages request body.
#[derive(Debug, Serialize)]
struct MessagesBody<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    // f32 fields so serde_json writes the shortest form (0.7, not 0.699999988079071).
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    /// The one tool whose input is the structured answer, when one is asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<[Tool<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice>,
}

/// A tool with an input schema: Anthropic's way to an answer that follows a JSON schema (the
/// forced tool call's input is the answer; its `input_json_delta`s are read as the text).
#[derive(Debug, Serialize)]
struct Tool<'a> {
    name: &'static str,
    description: &'static str,
    input_schema: &'a serde_json::Value,
}

#[derive(Debug, Serialize)]
struct ToolChoice {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'static str,
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

impl<'a> MessagesBody<'a> {
    fn new(req: &'a ChatRequest, model: &'a str) -> Self {
        // Anthropic takes system text as a top-level field, not as a message.
        let system: Vec<&str> = req
            .messages
            .iter()
            .filter(|m| m.role == "system" && !m.content.is_empty())
            .map(|m| m.content.as_str())
            .collect();
        let messages = req
            .messages
            .iter()
            // Anthropic refuses empty text turns.
            .filter(|m| m.role != "system" && !m.content.is_empty())
            .map(|m| WireMessage {
                // Anthropic knows only these two roles; anything else is input to the model.
                role: if m.role == "assistant" {
                    "assistant"
                } else {
                    "user"
                },
                content: &m.content,
            })
            .collect();
        Self {
            model,
            max_tokens: req
                .max_tokens
                .filter(|n| *n > 0)
                .unwrap_or(DEFAULT_MAX_TOKENS),
            system: (!system.is_empty()).then(|| system.join("\n\n")),
            messages,
            stream: true,
            temperature: req.temperature,
            top_p: req.top_p,
            stop_sequences: &req.stop,
            tools: req.schema.as_deref().map(|s| {
                [Tool {
                    name: s.name,
                    description: s.description,
                    input_schema: &s.schema,
                }]
            }),
            tool_choice: req.schema.as_deref().map(|s| ToolChoice {
                kind: "tool",
                name: s.name,
            }),
        }
    }
}

/// What the event stream has said so far.
#[derive(Debug, Default)]
struct StreamState {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    /// `message_stop` was seen.
    done: bool,
    /// The `tool_use` block being read: id, name, and its input's JSON so far.
    tool: Option<(String, String, String)>,
}

impl StreamState {
    /// Handles one event; returns the delta it carries, if any.
    fn on_event(&mut self, provider: &str, event: &SseEvent) -> Result<Option<Delta>, LlmError> {
        if event.data.trim().is_empty() {
            return Ok(None);
        }
        let data: Value = serde_json::from_str(&event.data).map_err(|e| {
            LlmError::upstream(
                provider,
                ErrorClass::Malformed,
                format!("invalid JSON in a `{}` event: {e}", event.event),
            )
        })?;
        // The `event:` field names the type; the data's own `type` stands in when it is missing.
        let kind = if event.event == "message" {
            data.get("type")
                .and_then(Value::as_str)
                .unwrap_or("message")
        } else {
            &*event.event
        };
        let malformed = |what: &str| {
            LlmError::upstream(
                provider,
                ErrorClass::Malformed,
                format!("`{kind}` event without {what}"),
            )
        };
        match kind {
            "message_start" => {
                let usage = data.pointer("/message/usage");
                self.take_usage(usage);
                Ok(None)
            }
            "content_block_start" => {
                let block = data.get("content_block");
                if block.and_then(|b| b.get("type")).and_then(Value::as_str) == Some("tool_use") {
                    let field = |k: &str| {
                        block
                            .and_then(|b| b.get(k))
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string()
                    };
                    // The input comes in `input_json_delta`s; a start with the whole input keeps it.
                    let input = block
                        .and_then(|b| b.get("input"))
                        .filter(|i| i.as_object().is_some_and(|o| !o.is_empty()))
                        .map(Value::to_string)
                        .unwrap_or_default();
                    self.tool = Some((field("id"), field("name"), input));
                    return Ok(None);
                }
                let text = data
                    .pointer("/content_block/text")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty());
                Ok(text.map(|t| Delta::Text(t.to_string())))
            }
            "content_block_delta" => {
                let delta = data.get("delta").ok_or_else(|| malformed("`delta`"))?;
                if delta.get("type").and_then(Value::as_str) == Some("input_json_delta") {
                    // A tool's input, kept until its block ends. A structured answer (a request's
                    // `schema`) is a forced tool call too: `llm::collect` reads its input as the
                    // answer's text.
                    if let Some((_, _, input)) = &mut self.tool {
                        input.push_str(
                            delta
                                .get("partial_json")
                                .and_then(Value::as_str)
                                .unwrap_or(""),
                        );
                    }
                    return Ok(None);
                }
                if delta.get("type").and_then(Value::as_str) != Some("text_delta") {
                    // Thinking and signature deltas are not answer text.
                    return Ok(None);
                }
                let text = delta
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| malformed("`delta.text`"))?;
                Ok((!text.is_empty()).then(|| Delta::Text(text.to_string())))
            }
            "message_delta" => {
                self.take_usage(data.get("usage"));
                let reason = data
                    .pointer("/delta/stop_reason")
                    .and_then(Value::as_str)
                    .map(|r| Delta::Finish(r.to_string()));
                Ok(reason)
            }
            "message_stop" => {
                self.done = true;
                Ok(None)
            }
            "content_block_stop" => {
                let Some((id, name, input)) = self.tool.take() else {
                    return Ok(None);
                };
                let arguments = match input.trim().is_empty() {
                    true => json!({}),
                    false => serde_json::from_str(&input).unwrap_or(Value::String(input)),
                };
                Ok(Some(Delta::ToolCall(crate::llm::tools::ToolCall {
                    id,
                    name,
                    arguments,
                })))
            }
            "error" => {
                let (class, message) = classify_body(&data)
                    .unwrap_or((ErrorClass::Server, "error event without details".into()));
                Err(LlmError::upstream(provider, class, message))
            }
            // `ping` and event types added later carry no answer text.
            _ => Ok(None),
        }
    }

    fn take_usage(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage else { return };
        if let Some(n) = usage.get("input_tokens").and_then(Value::as_u64) {
            self.input_tokens = Some(n);
        }
        if let Some(n) = usage.get("output_tokens").and_then(Value::as_u64) {
            self.output_tokens = Some(n);
        }
    }

    fn usage(&self) -> Option<Usage> {
        if self.input_tokens.is_none() && self.output_tokens.is_none() {
            return None;
        }
        Some(Usage {
            prompt_tokens: self.input_tokens.unwrap_or(0),
            completion_tokens: self.output_tokens.unwrap_or(0),
        })
    }
}

/// The class of an Anthropic error `type`.
fn class_of(error_type: &str) -> Option<ErrorClass> {
    Some(match error_type {
        "rate_limit_error" | "overloaded_error" => ErrorClass::RateLimit,
        "authentication_error" | "permission_error" => ErrorClass::Auth,
        "not_found_error" => ErrorClass::ModelNotFound,
        "api_error" => ErrorClass::Server,
        "timeout_error" => ErrorClass::Timeout,
        "request_too_large" => ErrorClass::ContextTooLong,
        "invalid_request_error" => ErrorClass::BadRequest,
        _ => return None,
    })
}

/// `{"type":"error","error":{"type":…,"message":…}}` → class and message; `None` when the shape or
/// the type is unknown.
fn classify_body(body: &Value) -> Option<(ErrorClass, String)> {
    let error = body.get("error")?;
    let class = class_of(error.get("type")?.as_str()?)?;
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Some((class, short(message)))
}

fn short(message: &str) -> String {
    let message = message.trim();
    match message.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &message[..i]),
        None => message.to_string(),
    }
}

/// Error parser for [`http::send`]: the typed error wins over the HTTP status.
fn parse_error(status: u16, body: &str) -> Option<(ErrorClass, String)> {
    let value: Value = serde_json::from_str(body).ok()?;
    if let Some(found) = classify_body(&value) {
        return Some(found);
    }
    // A known shape with a type this code does not know: keep the message, classify by status.
    let message = value.pointer("/error/message").and_then(Value::as_str)?;
    Some((ErrorClass::from_status(status), short(message)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::config::Secret;
    use crate::llm::ClientCredentials;
    use crate::llm::ssrf::SsrfPolicy;
    use crate::llm::{Message, UpstreamError, collect};
    use crate::testing::anthropic::{AnthropicFormat, error_body, error_event};
    use crate::testing::{FakeUpstream, Reply, Step};

    const KEY: &str = "sk-ant-test-key-123";

    fn ctx() -> ProviderContext {
        ProviderContext {
            ssrf: Arc::new(SsrfPolicy::default()),
        }
    }

    fn config(base_url: &str) -> ProviderConfig {
        ProviderConfig {
            name: "claude".into(),
            kind: "anthropic".into(),
            base_url: Some(base_url.into()),
            api_key: Some(Secret::new(KEY)),
            ..Default::default()
        }
    }

    async fn setup() -> (FakeUpstream, Arc<dyn Provider>) {
        let fake = FakeUpstream::start(AnthropicFormat).await.unwrap();
        let provider = build(&config(&fake.base_url()), &ctx()).unwrap();
        (fake, provider)
    }

    fn schema() -> std::sync::Arc<crate::llm::ResponseSchema> {
        std::sync::Arc::new(crate::llm::ResponseSchema {
            name: "answer",
            description: "the answer",
            schema: serde_json::json!({
                "type": "object",
                "properties": {
                    "a": {"type": "string"},
                    "params": {"type": "object", "additionalProperties": {"type": "string"}}
                },
                "required": ["a", "params"]
            }),
        })
    }

    #[test]
    fn a_schema_is_asked_for_as_a_forced_tool_whose_input_is_the_text() {
        let mut r = user("hi");
        r.schema = Some(schema());
        let body = serde_json::to_value(MessagesBody::new(&r, "m")).unwrap();
        assert_eq!(body["tools"][0]["name"], "answer");
        assert_eq!(body["tools"][0]["input_schema"], schema().schema);
        assert_eq!(
            body["tool_choice"],
            serde_json::json!({"type": "tool", "name": "answer"})
        );
        let plain = serde_json::to_value(MessagesBody::new(&user("hi"), "m")).unwrap();
        assert!(plain.get("tools").is_none() && plain.get("tool_choice").is_none());
        // The forced tool's input arrives in pieces and comes out whole, as a tool call that
        // `llm::collect` reads as the answer's text.
        let mut state = StreamState::default();
        let events = [
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t1","name":"answer","input":{}}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"a\": "}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"\"x\", \"params\": {}}"}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
        ];
        let mut out = Vec::new();
        for data in events {
            let kind = serde_json::from_str::<serde_json::Value>(data).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string();
            let event = crate::llm::http::SseEvent {
                event: kind.into(),
                data: data.into(),
            };
            out.extend(state.on_event("p", &event).unwrap());
        }
        let call = match out.as_slice() {
            [Delta::ToolCall(c)] => c.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(call.name, "answer");
        assert_eq!(call.arguments, serde_json::json!({"a": "x", "params": {}}));
        let stream: crate::llm::DeltaStream =
            Box::pin(futures::stream::iter([Ok(Delta::ToolCall(call))]));
        let (text, _) = futures::executor::block_on(crate::llm::collect(stream)).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, serde_json::json!({"a": "x", "params": {}}));
    }

    fn user(text: &str) -> ChatRequest {
        ChatRequest::new(
            vec![Message {
                role: "user".into(),
                content: text.into(),
            }],
            "",
        )
    }

    async fn items(provider: &Arc<dyn Provider>, req: ChatRequest) -> Vec<Result<Delta, LlmError>> {
        provider.stream(&req).collect().await
    }

    #[tokio::test]
    async fn a_stream_read_to_message_stop_leaves_its_connection_for_the_next_call() {
        let (fake, p) = setup().await;
        fake.assert_two_answers_share_a_connection("/messages", || p.stream(&user("hi")))
            .await;
    }

    fn upstream(e: &LlmError) -> &UpstreamError {
        e.as_upstream()
            .unwrap_or_else(|| panic!("not an upstream error: {e:?}"))
    }

    async fn failure(provider: &Arc<dyn Provider>) -> UpstreamError {
        let err = collect(provider.stream(&user("hi"))).await.unwrap_err();
        upstream(&err).clone()
    }

    #[tokio::test]
    async fn unary_answer_and_usage() {
        let (fake, provider) = setup().await;
        fake.push(Reply::text("Hello there, friend"));
        let (text, usage) = collect(provider.stream(&user("hi"))).await.unwrap();
        assert_eq!(text, "Hello there, friend");
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 3
            })
        );
    }

    #[tokio::test]
    async fn stream_yields_each_delta_then_finish_and_usage() {
        let (fake, provider) = setup().await;
        fake.push(Reply::text("one two three"));
        let got: Vec<Delta> = items(&provider, user("hi"))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            got,
            vec![
                Delta::Text("one".into()),
                Delta::Text(" two".into()),
                Delta::Text(" three".into()),
                Delta::Finish("end_turn".into()),
                Delta::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 3
                }),
            ]
        );
    }

    #[tokio::test]
    async fn request_shape() {
        let (fake, provider) = setup().await;
        let mut req = ChatRequest::new(
            vec![
                Message {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                Message {
                    role: "system".into(),
                    content: "Speak English.".into(),
                },
                Message {
                    role: "user".into(),
                    content: "Hi".into(),
                },
                Message {
                    role: "assistant".into(),
                    content: "Hello!".into(),
                },
                Message {
                    role: "user".into(),
                    content: "How are you?".into(),
                },
            ],
            "claude-opus-4-1",
        );
        req.temperature = Some(0.7);
        req.top_p = Some(0.9);
        req.stop = vec!["END".into()];
        collect(provider.stream(&req)).await.unwrap();
        let recorded = fake.requests();
        assert_eq!(recorded.len(), 1);
        let r = &recorded[0];
        assert_eq!(r.method, ::http::Method::POST);
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.header("x-api-key").as_deref(), Some(KEY));
        assert_eq!(r.header("anthropic-version").as_deref(), Some("2023-06-01"));
        assert!(r.header("authorization").is_none());
        assert!(r.header("anthropic-beta").is_none());
        assert_eq!(
            r.json(),
            serde_json::json!({
                "model": "claude-opus-4-1",
                "max_tokens": 4096,
                "system": "Be brief.\n\nSpeak English.",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "How are you?"},
                ],
                "stream": true,
                "temperature": 0.7,
                "top_p": 0.9,
                "stop_sequences": ["END"],
            })
        );
    }

    #[tokio::test]
    async fn defaults_model_omits_system_and_honours_max_tokens_and_version() {
        let fake = FakeUpstream::start(AnthropicFormat).await.unwrap();
        let mut cfg = config(&fake.base_url());
        cfg.api_version = Some("2024-01-01".into());
        cfg.headers = BTreeMap::from([("x-team".to_string(), "blue".to_string())]);
        let provider = build(&cfg, &ctx()).unwrap();
        assert_eq!(provider.default_model(), DEFAULT_MODEL);
        let mut req = user("hi");
        req.max_tokens = Some(100);
        collect(provider.stream(&req)).await.unwrap();
        let r = &fake.requests()[0];
        let body = r.json();
        assert_eq!(body["model"], DEFAULT_MODEL);
        assert_eq!(body["max_tokens"], 100);
        assert!(body.get("system").is_none());
        assert!(body.get("temperature").is_none());
        assert!(body.get("stop_sequences").is_none());
        assert_eq!(r.header("anthropic-version").as_deref(), Some("2024-01-01"));
        assert_eq!(r.header("x-team").as_deref(), Some("blue"));
    }

    #[tokio::test]
    async fn first_delta_arrives_before_the_upstream_continues() {
        let (fake, provider) = setup().await;
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Text(" rest".into()),
        ]));
        let mut stream = provider.stream(&user("hi"));
        let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the first delta must not wait for the rest of the answer");
        assert_eq!(first.unwrap().unwrap(), Delta::Text("first".into()));
        fake.release();
        let (rest, usage) = collect(stream).await.unwrap();
        assert_eq!(rest, " rest");
        assert!(usage.is_some());
    }

    #[tokio::test]
    async fn dropping_the_stream_cancels_the_upstream_request() {
        let (fake, provider) = setup().await;
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Text(" rest".into()),
        ]));
        let mut stream = provider.stream(&user("hi"));
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Delta::Text("first".into())
        );
        drop(stream);
        assert!(fake.wait_cancelled(1, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn rate_limit_carries_retry_after() {
        let (fake, provider) = setup().await;
        fake.push(Reply::rate_limited(
            &error_body("rate_limit_error", "slow down"),
            7,
        ));
        let e = failure(&provider).await;
        assert_eq!(e.class, ErrorClass::RateLimit);
        assert_eq!(e.status, Some(429));
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.message, "slow down");
        assert_eq!(e.provider, "claude");
    }

    #[tokio::test]
    async fn http_errors_are_classified() {
        let (fake, provider) = setup().await;
        let cases = [
            (401, "authentication_error", ErrorClass::Auth),
            (403, "permission_error", ErrorClass::Auth),
            (404, "not_found_error", ErrorClass::ModelNotFound),
            (500, "api_error", ErrorClass::Server),
            (529, "overloaded_error", ErrorClass::RateLimit),
            (400, "invalid_request_error", ErrorClass::BadRequest),
        ];
        for (status, kind, class) in cases {
            fake.push(Reply::error(status, &error_body(kind, "nope")));
            let e = failure(&provider).await;
            assert_eq!((e.class, e.status), (class, Some(status)), "{kind}");
        }
        // Without a typed body the status decides.
        fake.push(Reply::error(503, "upstream unavailable"));
        assert_eq!(failure(&provider).await.class, ErrorClass::Server);
        fake.push(Reply::error(401, ""));
        assert_eq!(failure(&provider).await.class, ErrorClass::Auth);
        fake.push(Reply::error(
            404,
            &error_body("some_future_error", "no such model"),
        ));
        let e = failure(&provider).await;
        assert_eq!(
            (e.class, e.message.as_str()),
            (ErrorClass::ModelNotFound, "no such model")
        );
    }

    #[tokio::test]
    async fn error_event_mid_stream_is_classified() {
        let (fake, provider) = setup().await;
        fake.push(Reply::steps(vec![
            Step::Text("partial".into()),
            Step::Raw(error_event("overloaded_error", "Overloaded")),
        ]));
        let got = items(&provider, user("hi")).await;
        assert_eq!(got[0].as_ref().unwrap(), &Delta::Text("partial".into()));
        let e = upstream(got[1].as_ref().unwrap_err());
        assert_eq!(e.class, ErrorClass::RateLimit);
        assert_eq!(e.message, "Overloaded");
        assert_eq!(got.len(), 2, "nothing after the error");
    }

    #[tokio::test]
    async fn connection_drop_mid_stream_is_a_transport_error_after_the_first_delta() {
        let (fake, provider) = setup().await;
        // The fake holds the drop until the first delta was read, so hyper has flushed it.
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Drop,
        ]));
        let mut stream = provider.stream(&user("hi"));
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Delta::Text("first".into())
        );
        fake.release();
        let rest: Vec<_> = stream.collect().await;
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert_eq!(
            upstream(rest[0].as_ref().unwrap_err()).class,
            ErrorClass::Transport
        );
    }

    #[tokio::test]
    async fn stream_without_message_stop_is_an_error() {
        let (fake, provider) = setup().await;
        // A well-formed start and delta, then a clean end of the body with no `message_stop`.
        fake.push(Reply::Raw {
            content_type: "text/event-stream".into(),
            body: "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":1}}}\n\n\
                   event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"cut\"}}\n\n"
                .into(),
        });
        let got = items(&provider, user("hi")).await;
        assert_eq!(got[0].as_ref().unwrap(), &Delta::Text("cut".into()));
        assert_eq!(
            upstream(got[1].as_ref().unwrap_err()).class,
            ErrorClass::Transport
        );
    }

    #[tokio::test]
    async fn malformed_event_is_malformed() {
        let (fake, provider) = setup().await;
        fake.push(Reply::steps(vec![Step::Raw(
            "event: content_block_delta\ndata: {not json\n\n".into(),
        )]));
        assert_eq!(failure(&provider).await.class, ErrorClass::Malformed);
        fake.push(Reply::steps(vec![Step::Raw(
            "event: content_block_delta\ndata: {\"delta\":{\"type\":\"text_delta\"}}\n\n".into(),
        )]));
        assert_eq!(failure(&provider).await.class, ErrorClass::Malformed);
        fake.push(Reply::Raw {
            content_type: "text/html".into(),
            body: "<html>proxy error</html>".into(),
        });
        assert_eq!(failure(&provider).await.class, ErrorClass::Malformed);
    }

    #[tokio::test]
    async fn usage_comes_from_message_start_and_message_delta() {
        let (fake, provider) = setup().await;
        fake.push(Reply::Raw {
            content_type: "text/event-stream".into(),
            body: "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n\
                   event: ping\ndata: {\"type\":\"ping\"}\n\n\
                   event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
                   event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ok\"}}\n\n\
                   event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
                   event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":5}}\n\n\
                   event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
                .into(),
        });
        let got: Vec<Delta> = items(&provider, user("hi"))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            got,
            vec![
                Delta::Text("ok".into()),
                Delta::Finish("max_tokens".into()),
                Delta::Usage(Usage {
                    prompt_tokens: 11,
                    completion_tokens: 5
                }),
            ]
        );
    }

    #[tokio::test]
    async fn oauth_key_uses_bearer_and_the_oauth_beta() {
        let (fake, provider) = setup().await;
        let creds = ClientCredentials {
            key: ClientKey::parse("oauth:at-secret-1"),
            config: BTreeMap::new(),
        };
        let scoped = provider.with_client_credentials(&creds).await.unwrap();
        collect(scoped.stream(&user("hi"))).await.unwrap();
        let r = &fake.requests()[0];
        assert_eq!(
            r.header("authorization").as_deref(),
            Some("Bearer at-secret-1")
        );
        assert!(r.header("x-api-key").is_none());
        assert_eq!(r.header("anthropic-beta").as_deref(), Some(OAUTH_BETA));
        assert_eq!(r.header("anthropic-version").as_deref(), Some("2023-06-01"));
        assert!(!format!("{scoped:?}").contains("at-secret-1"));
        // The server's provider is untouched.
        collect(provider.stream(&user("hi"))).await.unwrap();
        assert_eq!(fake.requests()[1].header("x-api-key").as_deref(), Some(KEY));
    }

    #[tokio::test]
    async fn token_and_api_key_schemes() {
        let (fake, provider) = setup().await;
        for (raw, auth, api_key) in [
            ("token:tk-1", Some("Bearer tk-1"), None),
            ("apikey:sk-2", None, Some("sk-2")),
            ("sk-3", None, Some("sk-3")),
        ] {
            let creds = ClientCredentials {
                key: ClientKey::parse(raw),
                config: BTreeMap::new(),
            };
            let scoped = provider.with_client_credentials(&creds).await.unwrap();
            collect(scoped.stream(&user("hi"))).await.unwrap();
            let r = fake.requests().pop().unwrap();
            assert_eq!(r.header("authorization").as_deref(), auth, "{raw}");
            assert_eq!(r.header("x-api-key").as_deref(), api_key, "{raw}");
            assert!(r.header("anthropic-beta").is_none(), "{raw}");
        }
    }

    #[tokio::test]
    async fn client_config_is_checked() {
        let (fake, provider) = setup().await;
        let with = |pairs: &[(&str, &str)]| ClientCredentials {
            key: ClientKey::parse("sk-client"),
            config: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let err = provider
            .with_client_credentials(&with(&[("realm", "zup")]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LlmError::InvalidRequest(m) if m.contains("`realm`")),
            "{err}"
        );
        let err = provider
            .with_client_credentials(&with(&[("base_url", "https://10.0.0.1")]))
            .await
            .unwrap_err();
        assert!(matches!(err, LlmError::InvalidRequest(_)), "{err}");
        let no_key = ClientCredentials {
            key: None,
            config: BTreeMap::from([("base_url".into(), "https://api.example.com".into())]),
        };
        let err = provider.with_client_credentials(&no_key).await.unwrap_err();
        assert!(matches!(err, LlmError::InvalidRequest(_)), "{err}");
        assert!(fake.requests().is_empty(), "nothing may be sent");
    }

    #[tokio::test]
    async fn client_base_url_goes_through_the_guard_without_server_secrets() {
        let operator = FakeUpstream::start(AnthropicFormat).await.unwrap();
        let client_host = FakeUpstream::start(AnthropicFormat).await.unwrap();
        // Loopback is refused by default; the operator allowlists it (and http) for this test.
        let ctx = ProviderContext {
            ssrf: Arc::new(SsrfPolicy::new(true, &["127.0.0.1".to_string()]).unwrap()),
        };
        let mut cfg = config(&operator.base_url());
        cfg.headers = BTreeMap::from([("x-team".to_string(), "team-secret".to_string())]);
        let provider = build(&cfg, &ctx).unwrap();
        let creds = ClientCredentials {
            key: ClientKey::parse("sk-client"),
            config: BTreeMap::from([("base_url".into(), client_host.base_url())]),
        };
        let scoped = provider.with_client_credentials(&creds).await.unwrap();
        let (text, _) = collect(scoped.stream(&user("hi"))).await.unwrap();
        assert_eq!(text, "hello from the fake");
        assert!(operator.requests().is_empty());
        let r = &client_host.requests()[0];
        assert_eq!(r.header("x-api-key").as_deref(), Some("sk-client"));
        assert!(
            r.header("x-team").is_none(),
            "operator headers stay with the operator"
        );
    }

    #[tokio::test]
    async fn build_needs_a_key_and_never_shows_it() {
        let mut cfg = config("https://api.anthropic.com");
        cfg.api_key = None;
        let err = build(&cfg, &ctx()).unwrap_err();
        assert!(err.to_string().contains("`claude`"), "{err}");
        assert!(err.to_string().contains("api_key"), "{err}");
        let provider = build(&config("https://api.anthropic.com"), &ctx()).unwrap();
        assert!(!format!("{provider:?}").contains(KEY));
        assert_eq!(provider.kind(), ProviderKind::Anthropic);
    }

    #[tokio::test]
    async fn waiting_longer_than_the_timeout_is_a_timeout() {
        // A server that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let mut cfg = config(&format!("http://{addr}"));
        cfg.timeout = Duration::from_millis(200);
        let provider = build(&cfg, &ctx()).unwrap();
        assert_eq!(failure(&provider).await.class, ErrorClass::Timeout);
        hold.abort();
    }

    #[test]
    fn error_bodies_classify_by_type() {
        assert_eq!(
            parse_error(400, &error_body("overloaded_error", "busy")),
            Some((ErrorClass::RateLimit, "busy".into()))
        );
        assert_eq!(parse_error(502, "<html>"), None);
        assert_eq!(
            class_of("request_too_large"),
            Some(ErrorClass::ContextTooLong)
        );
        assert_eq!(class_of("whatever"), None);
    }

    #[tokio::test]
    async fn discovered_models_follow_every_page_with_the_servers_key() {
        let (fake, p) = setup().await;
        let all = ["claude-a", "claude-b", "claude-c", "claude-d", "claude-e"];
        fake.set_models(&all);
        let got = p.discover_models().await.unwrap();
        assert_eq!(got, all);
        let reqs: Vec<_> = fake.requests();
        assert_eq!(reqs.len(), all.len().div_ceil(crate::testing::MODEL_PAGE));
        assert!(reqs.iter().all(|r| r.path == "/v1/models"
            && r.header("x-api-key").as_deref() == Some(KEY)
            && r.header("anthropic-version").is_some()));
        assert_eq!(reqs[1].query_param("after_id").as_deref(), Some("claude-b"));
    }
}
