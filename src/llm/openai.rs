//! The `openai` wire format: OpenAI Chat Completions (`POST {base_url}/chat/completions`, Bearer
//! auth, SSE with `stream_options.include_usage`), and the OpenAI-compatible presets that speak it
//! with their own base URL, default model and headers (`openai-compatible`, `xai`, `openrouter`,
//! `moonshot`, `zai`, `github-models`, `copilot`). This module owns the request body, the parsing
//! of `chat.completion.chunk` events (or a whole `chat.completion`) into [`Delta`]s, the
//! classification of OpenAI error objects, and the URL keys a caller may use (`base_url`,
//! `api_base`, `endpoint`); the HTTP plumbing and the client-credential rule are
//! [`super::wire`]'s.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::{ErrorClass, LlmError, UpstreamError};
use super::http::{self, ModelListing};
use super::json::{json_str, json_value};
use super::wire::{self, Pending, WireFormat};
use super::{ChatRequest, ClientKey, Delta, Provider, ProviderContext, ProviderKind, Usage};
use crate::config::ProviderConfig;

/// What differs between the OpenAI-compatible services; the wire format is the same.
#[derive(Debug)]
struct Preset {
    kind: &'static str,
    base_url: Option<&'static str>,
    model: Option<&'static str>,
    /// Local OpenAI-compatible servers often take no key, so only `openai-compatible` may omit it.
    needs_key: bool,
    /// OpenAI's own API rejects `max_tokens` for its reasoning and GPT-5 models and wants
    /// `max_completion_tokens`; the compatible services still take `max_tokens`.
    max_tokens_field: &'static str,
}

const PRESETS: &[Preset] = &[
    Preset {
        kind: "openai",
        base_url: Some("https://api.openai.com/v1"),
        model: Some("gpt-5.4"),
        needs_key: true,
        max_tokens_field: "max_completion_tokens",
    },
    Preset {
        kind: "openai-compatible",
        base_url: None,
        model: None,
        needs_key: false,
        max_tokens_field: "max_tokens",
    },
    Preset {
        kind: "xai",
        base_url: Some("https://api.x.ai/v1"),
        model: Some("grok-4-1"),
        needs_key: true,
        max_tokens_field: "max_tokens",
    },
    Preset {
        kind: "openrouter",
        base_url: Some("https://openrouter.ai/api/v1"),
        model: Some("openai/gpt-5.2"),
        needs_key: true,
        max_tokens_field: "max_tokens",
    },
    Preset {
        kind: "moonshot",
        base_url: Some("https://api.moonshot.ai/v1"),
        model: Some("kimi-k2.6"),
        needs_key: true,
        max_tokens_field: "max_tokens",
    },
    Preset {
        kind: "zai",
        base_url: Some("https://api.z.ai/api/paas/v4"),
        model: Some("glm-5"),
        needs_key: true,
        max_tokens_field: "max_tokens",
    },
    Preset {
        kind: "github-models",
        base_url: Some("https://models.github.ai/inference"),
        model: Some("gpt-4o"),
        needs_key: true,
        max_tokens_field: "max_tokens",
    },
    Preset {
        kind: "copilot",
        base_url: Some("https://api.githubcopilot.com"),
        model: Some("gpt-4o"),
        needs_key: true,
        max_tokens_field: "max_tokens",
    },
];

/// The headers a preset sends by default (`cfg.headers` override them by name).
fn preset_headers(kind: &str) -> Vec<(&'static str, String)> {
    let version = format!("chatcli/{}", env!("CARGO_PKG_VERSION"));
    match kind {
        // OpenRouter attributes traffic to an app by these two headers.
        "openrouter" => vec![
            ("HTTP-Referer", "https://github.com/chatcli".to_string()),
            ("X-Title", "chatcli".to_string()),
        ],
        // Copilot's API refuses callers that do not present themselves as an editor integration.
        "copilot" => vec![
            ("Openai-Intent", "conversation-edits".to_string()),
            ("X-Initiator", "user".to_string()),
            ("Editor-Version", version.clone()),
            ("Editor-Plugin-Version", version),
        ],
        _ => Vec::new(),
    }
}

/// The OpenAI Chat Completions format of one preset, with the preset's headers built once.
#[derive(Debug, Clone)]
pub struct OpenAi {
    preset: &'static Preset,
    /// The preset's own headers (what a caller's URL gets too).
    headers: HeaderMap,
}

/// A provider speaking OpenAI Chat Completions.
pub type OpenAiProvider = wire::HttpProvider<OpenAi>;

/// Builds an OpenAI-format provider from its config; `cfg.kind` picks the preset.
pub fn build(cfg: &ProviderConfig, ctx: &ProviderContext) -> Result<Arc<dyn Provider>, LlmError> {
    new_provider(cfg, ctx).map(|p| Arc::new(p) as Arc<dyn Provider>)
}

fn header_map<'a>(
    name: &str,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<HeaderMap, LlmError> {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        let hn = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
            LlmError::InvalidRequest(format!(
                "provider `{name}`: `{k}` is not a valid header name"
            ))
        })?;
        let hv = HeaderValue::from_str(v).map_err(|_| {
            LlmError::InvalidRequest(format!(
                "provider `{name}`: the value of header `{k}` is not a valid header value"
            ))
        })?;
        // `insert` replaces, so later pairs override earlier ones.
        map.insert(hn, hv);
    }
    Ok(map)
}

/// Builds the provider; config errors name the provider.
pub fn new_provider(
    cfg: &ProviderConfig,
    ctx: &ProviderContext,
) -> Result<OpenAiProvider, LlmError> {
    let name = cfg.name.as_str();
    let kind = cfg.kind.to_ascii_lowercase();
    let preset = PRESETS.iter().find(|p| p.kind == kind).ok_or_else(|| {
        LlmError::InvalidRequest(format!(
            "provider `{name}`: kind `{}` is not an OpenAI-format kind",
            cfg.kind
        ))
    })?;
    let base_url = cfg
        .base_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .or(preset.base_url)
        .ok_or_else(|| {
            LlmError::InvalidRequest(format!(
                "provider `{name}` ({kind}) needs base_url (e.g. http://localhost:8000/v1)"
            ))
        })?;
    match reqwest::Url::parse(base_url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
        _ => {
            return Err(LlmError::InvalidRequest(format!(
                "provider `{name}` ({kind}): base_url `{base_url}` is not an http(s) URL"
            )));
        }
    }
    let model = cfg
        .model
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .or(preset.model)
        .ok_or_else(|| {
            LlmError::InvalidRequest(format!("provider `{name}` ({kind}) needs model"))
        })?;
    let api_key = cfg
        .api_key
        .clone()
        .filter(|k| !k.expose().trim().is_empty());
    if preset.needs_key && api_key.is_none() {
        return Err(LlmError::InvalidRequest(format!(
            "provider `{name}` ({kind}) needs api_key (or api_key_file)"
        )));
    }
    let defaults = preset_headers(preset.kind);
    let format = OpenAi {
        preset,
        headers: header_map(name, defaults.iter().map(|(k, v)| (*k, v.as_str())))?,
    };
    let headers = header_map(
        name,
        cfg.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )?;
    let parts = wire::Parts {
        name: name.to_string(),
        model: model.to_string(),
        format,
        base_url: base_url.to_string(),
        key: api_key,
        headers,
        timeouts: http::Timeouts::of(cfg),
    };
    wire::HttpProvider::new(parts, ctx)
}

#[cfg(test)]
impl OpenAiProvider {
    /// The preset (config kind) this provider was built from.
    pub fn preset(&self) -> &'static str {
        self.format().preset.kind
    }
}

impl OpenAi {
    fn request_body<'a>(&self, request: &'a ChatRequest, model: &'a str) -> RequestBody<'a> {
        let (max_tokens, max_completion_tokens) = match self.preset.max_tokens_field {
            "max_completion_tokens" => (None, request.max_tokens),
            _ => (request.max_tokens, None),
        };
        RequestBody {
            model,
            messages: &request.messages,
            stream: request.stream,
            // Without this OpenAI reports no usage on streamed answers.
            stream_options: request.stream.then_some(StreamOptions {
                include_usage: true,
            }),
            max_tokens,
            max_completion_tokens,
            temperature: request.temperature.and_then(float),
            top_p: request.top_p.and_then(float),
            stop: &request.stop,
            response_format: request.schema.as_deref().map(|s| ResponseFormat {
                kind: "json_schema",
                json_schema: JsonSchemaFormat {
                    name: s.name,
                    schema: &s.schema,
                    strict: false,
                },
            }),
        }
    }
}

/// The request body, serialized straight from the [`ChatRequest`] (no intermediate JSON tree).
#[derive(Serialize)]
struct RequestBody<'a> {
    model: &'a str,
    messages: &'a [super::Message],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat<'a>>,
}

/// `response_format` asking for an answer that follows a JSON schema.
#[derive(Serialize)]
struct ResponseFormat<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    json_schema: JsonSchemaFormat<'a>,
}

#[derive(Serialize)]
struct JsonSchemaFormat<'a> {
    name: &'static str,
    schema: &'a serde_json::Value,
    // Strict mode wants every property required and no free-form maps (`params`); the answer is
    // validated by the caller anyway.
    strict: bool,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl RequestBody<'_> {
    /// The JSON that serializing it writes (a unit test holds them equal), with only the values
    /// escaped: the keys and the fixed values are written as they are.
    fn to_json(&self) -> Vec<u8> {
        let text: usize = self.messages.iter().map(|m| m.content.len() + 32).sum();
        let mut buf = Vec::with_capacity(text + text / 8 + 192);
        buf.extend_from_slice(b"{\"model\":");
        json_str(&mut buf, self.model);
        buf.extend_from_slice(b",\"messages\":[");
        for (i, m) in self.messages.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(b"{\"role\":");
            json_str(&mut buf, &m.role);
            buf.extend_from_slice(b",\"content\":");
            json_str(&mut buf, &m.content);
            buf.push(b'}');
        }
        buf.extend_from_slice(match self.stream {
            true => b"],\"stream\":true",
            false => b"],\"stream\":false",
        });
        if let Some(o) = &self.stream_options {
            buf.extend_from_slice(b",\"stream_options\":");
            json_value(&mut buf, o);
        }
        let counts = [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", self.max_completion_tokens),
        ];
        for (key, n) in counts {
            if let Some(n) = n {
                buf.extend_from_slice(b",\"");
                buf.extend_from_slice(key.as_bytes());
                buf.extend_from_slice(b"\":");
                json_value(&mut buf, &n);
            }
        }
        for (key, x) in [("temperature", self.temperature), ("top_p", self.top_p)] {
            if let Some(x) = x {
                buf.extend_from_slice(b",\"");
                buf.extend_from_slice(key.as_bytes());
                buf.extend_from_slice(b"\":");
                json_value(&mut buf, &x);
            }
        }
        if !self.stop.is_empty() {
            buf.extend_from_slice(b",\"stop\":");
            json_value(&mut buf, self.stop);
        }
        if let Some(f) = &self.response_format {
            buf.extend_from_slice(b",\"response_format\":");
            json_value(&mut buf, f);
        }
        buf.push(b'}');
        buf
    }
}

/// The body with the offered tools (`tools`, `tool_choice`) and the tool rounds so far (an
/// assistant message with its `tool_calls`, then one `tool` message per result).
fn with_tools(body: Vec<u8>, req: &ChatRequest) -> Vec<u8> {
    let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    if let Some(Value::Array(messages)) = v.get_mut("messages") {
        for turn in &req.tool_turns {
            let calls: Vec<Value> = turn
                .calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments.to_string()}})
                })
                .collect();
            let text = match turn.text.is_empty() {
                true => Value::Null,
                false => Value::String(turn.text.clone()),
            };
            messages.push(json!({"role": "assistant", "content": text, "tool_calls": calls}));
            for (c, out) in turn.calls.iter().zip(&turn.outputs) {
                messages
                    .push(json!({"role": "tool", "tool_call_id": c.id, "content": out.content}));
            }
        }
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters}})
            })
            .collect();
        v.insert("tools".into(), Value::Array(tools));
        if req.tool_choice_none {
            v.insert("tool_choice".into(), json!("none"));
        }
    }
    serde_json::to_vec(&v).unwrap_or(body)
}

/// The tool calls of a message (`message.tool_calls` of a whole answer).
fn tool_calls(message: Option<&Value>) -> Vec<Delta> {
    let Some(calls) = message
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    calls
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let f = c.get("function")?;
            let name = f.get("name")?.as_str()?.to_string();
            let arguments = match f.get("arguments") {
                Some(Value::String(text)) if text.trim().is_empty() => json!({}),
                Some(Value::String(text)) => {
                    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                }
                Some(other) => other.clone(),
                None => json!({}),
            };
            let id = c
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(|| format!("call_{i}"), str::to_string);
            Some(Delta::ToolCall(crate::llm::tools::ToolCall {
                id,
                name,
                arguments,
            }))
        })
        .collect()
}

/// An f32 as the JSON number it was written as (0.7, not 0.699999988079071).
fn float(x: f32) -> Option<f64> {
    x.to_string().parse::<f64>().ok().filter(|f| f.is_finite())
}

impl WireFormat for OpenAi {
    const KIND: ProviderKind = ProviderKind::OpenAi;
    const URL_KEYS: &'static [&'static str] = &["base_url", "api_base", "endpoint"];

    /// `GET {base_url}/models` (OpenAI and the compatible services): the ids of `data`.
    const MODELS: ModelListing = ModelListing {
        path: "/models",
        query: None,
        cursor_key: "",
        take: |provider, body, models| {
            models.extend(http::names_in(provider, body, "data", "id")?);
            Ok(None)
        },
        parse_error,
    };

    fn chat_url(&self, base: &str, _model: &str) -> Result<String, String> {
        Ok(format!("{base}/chat/completions"))
    }

    /// The preset's headers and `Accept` by the kind of call.
    fn format_headers(&self, stream: bool) -> HeaderMap {
        let mut headers = self.headers.clone();
        let accept = match stream {
            true => "text/event-stream",
            false => "application/json",
        };
        headers.insert(ACCEPT, HeaderValue::from_static(accept));
        headers
    }

    /// Every scheme (API key, OAuth token, GitHub token for Copilot) is a Bearer token.
    fn authenticate(
        &self,
        key: &ClientKey,
        headers: &mut HeaderMap,
    ) -> Result<(), InvalidHeaderValue> {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", key.secret.expose().trim()))?;
        v.set_sensitive(true);
        headers.insert(AUTHORIZATION, v);
        Ok(())
    }

    fn body(&self, req: &ChatRequest, model: &str) -> Vec<u8> {
        let body = self.request_body(req, model).to_json();
        match req.uses_tools() {
            false => body,
            true => with_tools(body, req),
        }
    }

    fn parse_error(status: u16, body: &str) -> Option<(ErrorClass, String)> {
        parse_error(status, body)
    }

    /// Events mapped to deltas as they arrive; a JSON answer (asked for, or from a compatible
    /// server that ignores `stream`) read whole.
    fn deltas(
        name: String,
        pending: Pending,
    ) -> impl Stream<Item = Result<Delta, LlmError>> + Send + 'static {
        async_stream::try_stream! {
            let resp = pending.answer(&name).await?;
            let ct = resp.content_type();
            // A page (a proxy's login or error page answered with 200) is not an answer; other
            // content types are read as events, since compatible servers label SSE loosely.
            if let Some(ct) = ct.as_deref().filter(|ct| {
                ["text/html", "application/xhtml", "text/xml", "application/xml"]
                    .iter()
                    .any(|page| ct.starts_with(page))
            }) {
                Err(malformed(
                    &name,
                    format!("expected an event stream, got content type `{ct}`"),
                ))?;
            }
            let is_json = ct
                .as_deref()
                .is_some_and(|ct| ct.starts_with("application/json"));
            if is_json {
                let body = resp.bytes(&name).await?;
                for d in whole_answer(&name, &body)? {
                    yield d;
                }
                return;
            }
            let mut events = resp.sse_events(&name);
            while let Some(event) = events.next().await {
                let event = event?;
                match parse_chunk(&name, &event.data)? {
                    Chunk::Done => {
                        http::read_rest_in_background(events);
                        return;
                    }
                    Chunk::Deltas(ds) => {
                        for d in ds {
                            yield d;
                        }
                    }
                }
            }
            Err(LlmError::upstream(
                &name,
                ErrorClass::Transport,
                "the stream ended before `data: [DONE]`",
            ))?;
        }
    }
}

enum Chunk {
    Deltas(Vec<Delta>),
    Done,
}

fn malformed(name: &str, what: impl Into<String>) -> LlmError {
    LlmError::upstream(name, ErrorClass::Malformed, what)
}

/// One SSE `data:` payload: a `chat.completion.chunk`, an error object, or `[DONE]`.
fn parse_chunk(name: &str, data: &str) -> Result<Chunk, LlmError> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Chunk::Done);
    }
    if data.is_empty() {
        return Ok(Chunk::Deltas(Vec::new()));
    }
    match typed_deltas(data, Shape::Chunk) {
        Some(deltas) => Ok(Chunk::Deltas(deltas)),
        None => tolerant_chunk(name, data).map(Chunk::Deltas),
    }
}

/// A chunk read over a [`Value`]: error objects, unusual shapes and malformed payloads.
fn tolerant_chunk(name: &str, data: &str) -> Result<Vec<Delta>, LlmError> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| malformed(name, format!("a stream event is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(malformed(name, "a stream event is not a JSON object"));
    }
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(stream_error(name, err));
    }
    let mut out = Vec::new();
    let choice = first_choice(&v);
    if let Some(text) = choice
        .and_then(|c| c.pointer("/delta/content"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        out.push(Delta::Text(text.to_string()));
    }
    if let Some(reason) = choice
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str)
    {
        out.push(Delta::Finish(reason.to_string()));
    }
    // OpenAI puts usage at the top level; Moonshot puts it into the final choice.
    if let Some(u) = usage(v.get("usage")).or_else(|| usage(choice.and_then(|c| c.get("usage")))) {
        out.push(Delta::Usage(u));
    }
    Ok(out)
}

/// Which object a payload is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A streamed `chat.completion.chunk`: text in `delta`, usage at the top or in the choice.
    Chunk,
    /// A whole `chat.completion`: text in `message`, usage at the top.
    Whole,
}

/// The fields chatcli reads from a `chat.completion(.chunk)`, borrowed from the payload where the
/// text has no escapes. Every other field is skipped unread.
#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<PayloadChoice<'a>>>,
    #[serde(default)]
    usage: Option<PayloadUsage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct PayloadChoice<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    delta: Option<PayloadText<'a>>,
    #[serde(default, borrow)]
    message: Option<PayloadText<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    usage: Option<PayloadUsage>,
}

#[derive(Deserialize)]
struct PayloadText<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    /// Tool calls are read by the tolerant path.
    #[serde(default)]
    tool_calls: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct PayloadUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl From<&PayloadUsage> for Usage {
    fn from(u: &PayloadUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens.unwrap_or(0),
            completion_tokens: u.completion_tokens.unwrap_or(0),
        }
    }
}

/// The deltas of a well-formed payload, read in one typed pass (the hot path: no JSON tree).
/// `None` sends the payload to the tolerant reading over a [`Value`], which also turns error
/// objects and malformed payloads into errors: anything unusual (an `error`, a field of an
/// unexpected type, no choice in a whole answer) takes that path, so both agree on every input.
/// It reads from `str`, not bytes: serde_json then skips checking each string for UTF-8 again (a
/// sixth of a chunk's parsing).
fn typed_deltas(data: &str, shape: Shape) -> Option<Vec<Delta>> {
    // A struct also deserializes from a JSON array; only objects are payloads.
    if data.trim_start().as_bytes().first() != Some(&b'{') {
        return None;
    }
    let p: Payload<'_> = serde_json::from_str(data).ok()?;
    if p.error.is_some() {
        return None;
    }
    let choices = p.choices.as_deref().unwrap_or_default();
    let choice = choices
        .iter()
        .find(|c| c.index == Some(0))
        .or_else(|| choices.first());
    if shape == Shape::Whole && choice.is_none() {
        return None;
    }
    let mut out = Vec::with_capacity(3);
    let text = choice.and_then(|c| match shape {
        Shape::Chunk => c.delta.as_ref(),
        Shape::Whole => c.message.as_ref(),
    });
    if text.is_some_and(|t| t.tool_calls.is_some()) {
        return None;
    }
    if let Some(t) = text
        .and_then(|t| t.content.as_deref())
        .filter(|t| !t.is_empty())
    {
        out.push(Delta::Text(t.to_string()));
    }
    if let Some(reason) = choice.and_then(|c| c.finish_reason.as_deref()) {
        out.push(Delta::Finish(reason.to_string()));
    }
    // OpenAI puts usage at the top level; Moonshot puts it into the final choice of a stream.
    let usage = match shape {
        Shape::Chunk => p
            .usage
            .as_ref()
            .or_else(|| choice.and_then(|c| c.usage.as_ref())),
        Shape::Whole => p.usage.as_ref(),
    };
    if let Some(u) = usage {
        out.push(Delta::Usage(u.into()));
    }
    Some(out)
}

/// The choice with index 0 (chatcli asks for one completion; `n` is never sent).
fn first_choice(v: &Value) -> Option<&Value> {
    let choices = v.get("choices")?.as_array()?;
    choices
        .iter()
        .find(|c| c.get("index").and_then(Value::as_u64) == Some(0))
        .or_else(|| choices.first())
}

fn usage(v: Option<&Value>) -> Option<Usage> {
    let u = v?.as_object()?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        prompt_tokens: n("prompt_tokens"),
        completion_tokens: n("completion_tokens"),
    })
}

/// A whole `chat.completion` (asked for with `stream: false`, or the upstream ignored
/// `stream: true`).
fn whole_answer(name: &str, body: &[u8]) -> Result<Vec<Delta>, LlmError> {
    match std::str::from_utf8(body)
        .ok()
        .and_then(|text| typed_deltas(text, Shape::Whole))
    {
        Some(deltas) => Ok(deltas),
        None => tolerant_whole(name, body),
    }
}

/// A whole answer read over a [`Value`]: error objects, unusual shapes and malformed payloads.
fn tolerant_whole(name: &str, body: &[u8]) -> Result<Vec<Delta>, LlmError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| malformed(name, format!("the answer is not JSON: {e}")))?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(stream_error(name, err));
    }
    let choice = first_choice(&v)
        .ok_or_else(|| malformed(name, "the answer has no choices and no error"))?;
    let mut out = Vec::new();
    if let Some(text) = choice
        .pointer("/message/content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        out.push(Delta::Text(text.to_string()));
    }
    out.extend(tool_calls(choice.get("message")));
    if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
        out.push(Delta::Finish(reason.to_string()));
    }
    if let Some(u) = usage(v.get("usage")) {
        out.push(Delta::Usage(u));
    }
    Ok(out)
}

/// The class of an OpenAI error `type` or `code` value, when it names one.
fn class_of_name(name: &str) -> Option<ErrorClass> {
    Some(match name {
        // OpenAI's 429s have type `requests`/`tokens` and code `rate_limit_exceeded`; an exhausted
        // quota is `insufficient_quota`. Both clear with time (or on another provider).
        "insufficient_quota"
        | "rate_limit_exceeded"
        | "rate_limit_error"
        | "requests"
        | "tokens" => ErrorClass::RateLimit,
        "invalid_api_key" | "authentication_error" | "permission_error" => ErrorClass::Auth,
        "model_not_found" => ErrorClass::ModelNotFound,
        "context_length_exceeded" => ErrorClass::ContextTooLong,
        "server_error" | "internal_error" | "service_unavailable" => ErrorClass::Server,
        _ => return None,
    })
}

/// Classifies an OpenAI error object: its `code` first (the more specific, e.g.
/// `context_length_exceeded` under type `invalid_request_error`), then its `type`, then a numeric
/// `code` some compatible services use for the HTTP status, then the HTTP status itself.
fn classify(err: &Value, status: Option<u16>) -> Option<ErrorClass> {
    let code = err.get("code");
    code.and_then(Value::as_str)
        .and_then(class_of_name)
        .or_else(|| {
            err.get("type")
                .and_then(Value::as_str)
                .and_then(class_of_name)
        })
        .or_else(|| {
            code.and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..=599).contains(c))
                .map(ErrorClass::from_status)
        })
        .or_else(|| status.map(ErrorClass::from_status))
}

/// The error's message, trimmed and bounded; its type or code when it has none.
fn error_message(err: &Value) -> String {
    let text = match err {
        Value::String(s) => s.as_str(),
        _ => err
            .get("message")
            .and_then(Value::as_str)
            .filter(|m| !m.trim().is_empty())
            .or_else(|| err.get("code").and_then(Value::as_str))
            .or_else(|| err.get("type").and_then(Value::as_str))
            .unwrap_or(""),
    };
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// An error object inside a 200 answer (mid-stream). Without a type, code or status to go on,
/// it counts as a server failure: the upstream accepted the request and then broke.
fn stream_error(name: &str, err: &Value) -> LlmError {
    LlmError::Upstream(UpstreamError {
        provider: name.to_string(),
        class: classify(err, None).unwrap_or(ErrorClass::Server),
        status: None,
        message: error_message(err),
        retry_after: None,
    })
}

/// [`http::ErrorParser`] for OpenAI error bodies `{"error":{"message","type","code"}}` (also
/// `{"error":"text"}`, which some compatible servers send).
fn parse_error(status: u16, body: &str) -> Option<(ErrorClass, String)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let err = v.get("error").filter(|e| !e.is_null())?;
    let class = classify(err, Some(status)).unwrap_or_else(|| ErrorClass::from_status(status));
    Some((class, error_message(err)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Secret;
    use crate::llm::ClientCredentials;
    use crate::llm::ssrf::SsrfPolicy;
    use crate::llm::{KeyScheme, Message, collect};
    use crate::testing::openai::{OpenAiFormat, error_body};
    use crate::testing::{FakeUpstream, Reply, Step};
    use serde_json::json;

    const SERVER_KEY: &str = "sk-server-0123456789";

    fn ctx() -> ProviderContext {
        ProviderContext {
            ssrf: Arc::new(SsrfPolicy::default()),
        }
    }

    fn cfg(kind: &str, base_url: Option<String>) -> ProviderConfig {
        ProviderConfig {
            name: "p".into(),
            kind: kind.into(),
            base_url,
            api_key: Some(Secret::new(SERVER_KEY)),
            model: Some("m-1".into()),
            ..Default::default()
        }
    }

    async fn fake() -> FakeUpstream {
        FakeUpstream::start(OpenAiFormat).await.unwrap()
    }

    fn provider(fake: &FakeUpstream, kind: &str) -> Arc<dyn Provider> {
        build(&cfg(kind, Some(fake.base_url())), &ctx()).unwrap()
    }

    fn ask(text: &str) -> ChatRequest {
        ChatRequest::new(
            vec![Message {
                role: "user".into(),
                content: text.into(),
            }],
            "",
        )
    }

    fn upstream(e: LlmError) -> UpstreamError {
        e.as_upstream().cloned().unwrap_or_else(|| panic!("{e:?}"))
    }

    async fn fails_with(reply: Reply) -> UpstreamError {
        let fake = fake().await;
        fake.push(reply);
        upstream(
            collect(provider(&fake, "openai").stream(&ask("hi")))
                .await
                .unwrap_err(),
        )
    }

    #[tokio::test]
    async fn unary_collects_the_scripted_text_and_usage() {
        let fake = fake().await;
        fake.push(Reply::text("Hello there, world"));
        let (text, usage) = collect(provider(&fake, "openai").stream(&ask("hi")))
            .await
            .unwrap();
        assert_eq!(text, "Hello there, world");
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 3
            })
        );
    }

    #[tokio::test]
    async fn a_streamed_call_answered_with_an_html_page_is_malformed() {
        let u = fails_with(Reply::Raw {
            content_type: "text/html; charset=utf-8".into(),
            body: "<html><body>Sign in</body></html>".into(),
        })
        .await;
        assert_eq!(u.class, ErrorClass::Malformed, "{u}");
        assert!(u.message.contains("text/html"), "{u}");
    }

    #[tokio::test]
    async fn streams_each_delta_then_finish_and_usage() {
        let fake = fake().await;
        fake.push(Reply::steps(vec![
            Step::Text("Hel".into()),
            Step::Text("lo 世界".into()),
        ]));
        let items: Vec<Delta> = provider(&fake, "openai")
            .stream(&ask("hi"))
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(
            items,
            vec![
                Delta::Text("Hel".into()),
                Delta::Text("lo 世界".into()),
                Delta::Finish("stop".into()),
                Delta::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2
                }),
            ]
        );
    }

    #[tokio::test]
    async fn a_stream_read_to_data_done_leaves_its_connection_for_the_next_call() {
        let fake = fake().await;
        let p = provider(&fake, "openai");
        fake.assert_two_answers_share_a_connection("/chat/completions", || p.stream(&ask("hi")))
            .await;
    }

    #[tokio::test]
    async fn request_has_the_chat_completions_shape() {
        let fake = fake().await;
        let p = provider(&fake, "openai-compatible");
        let mut req = ChatRequest::new(
            vec![
                Message {
                    role: "system".into(),
                    content: "be brief".into(),
                },
                Message {
                    role: "user".into(),
                    content: "hi".into(),
                },
            ],
            "",
        );
        req.max_tokens = Some(64);
        req.temperature = Some(0.7);
        req.top_p = Some(0.9);
        req.stop = vec!["END".into()];
        collect(p.stream(&req)).await.unwrap();
        req.model = "other-model".into();
        req.max_tokens = None;
        req.temperature = None;
        req.top_p = None;
        req.stop.clear();
        collect(p.stream(&req)).await.unwrap();

        let reqs = fake.requests();
        assert_eq!(reqs.len(), 2);
        let r = &reqs[0];
        assert_eq!(r.method, reqwest::Method::POST);
        assert_eq!(r.path, "/chat/completions");
        assert_eq!(
            r.header("authorization").as_deref(),
            Some(format!("Bearer {SERVER_KEY}").as_str())
        );
        let b = r.json();
        assert_eq!(b["model"], "m-1");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(
            b["messages"],
            json!([
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"}
            ])
        );
        assert_eq!(b["max_tokens"], 64);
        assert_eq!(b["temperature"], 0.7);
        assert_eq!(b["top_p"], 0.9);
        assert_eq!(b["stop"], json!(["END"]));
        let b = reqs[1].json();
        assert_eq!(b["model"], "other-model");
        for absent in ["max_tokens", "temperature", "top_p", "stop"] {
            assert!(b.get(absent).is_none(), "{absent} sent: {b}");
        }
    }

    #[tokio::test]
    async fn openai_itself_gets_max_completion_tokens() {
        let fake = fake().await;
        let mut req = ask("hi");
        req.max_tokens = Some(32);
        collect(provider(&fake, "openai").stream(&req))
            .await
            .unwrap();
        let b = fake.requests()[0].json();
        assert_eq!(b["max_completion_tokens"], 32);
        assert!(b.get("max_tokens").is_none());
    }

    #[tokio::test]
    async fn every_call_sends_the_key_the_json_headers_and_accept_by_its_kind() {
        let fake = fake().await;
        let p = provider(&fake, "openai");
        collect(p.stream(&ask("hi"))).await.unwrap();
        let mut unary = ask("hi");
        unary.stream = false;
        collect(p.stream(&unary)).await.unwrap();
        let reqs = fake.requests();
        for (r, accept) in reqs.iter().zip(["text/event-stream", "application/json"]) {
            assert_eq!(r.header("accept").as_deref(), Some(accept));
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/json")
            );
            assert_eq!(r.header("user-agent").as_deref(), Some(http::USER_AGENT));
            assert!(
                r.header("authorization")
                    .is_some_and(|a| a.starts_with("Bearer "))
            );
        }
    }

    #[tokio::test]
    async fn keyless_compatible_server_gets_no_authorization() {
        let fake = fake().await;
        let mut c = cfg(
            "openai-compatible",
            Some(format!("{}/v1/", fake.base_url())),
        );
        c.api_key = None;
        let p = build(&c, &ctx()).unwrap();
        collect(p.stream(&ask("hi"))).await.unwrap();
        let r = &fake.requests()[0];
        assert_eq!(r.path, "/v1/chat/completions");
        assert!(r.header("authorization").is_none());
    }

    #[tokio::test]
    async fn first_delta_arrives_before_the_rest_is_released() {
        let fake = fake().await;
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Text(" rest".into()),
        ]));
        let mut s = provider(&fake, "openai").stream(&ask("hi"));
        let first = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert!(first.is_ok(), "the first delta was held back");
        assert_eq!(
            first.unwrap().unwrap().unwrap(),
            Delta::Text("first".into())
        );
        fake.release();
        let (rest, usage) = collect(s).await.unwrap();
        assert_eq!(rest, " rest");
        assert!(usage.is_some());
    }

    #[tokio::test]
    async fn dropping_the_stream_cancels_the_upstream_call() {
        let fake = fake().await;
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Text(" rest".into()),
        ]));
        let mut s = provider(&fake, "openai").stream(&ask("hi"));
        let first = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert_eq!(
            first.unwrap().unwrap().unwrap(),
            Delta::Text("first".into())
        );
        drop(s);
        assert!(fake.wait_cancelled(1, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn rate_limit_keeps_retry_after() {
        let e = fails_with(Reply::rate_limited(
            &error_body("rate_limit_exceeded", "Rate limit reached"),
            7,
        ))
        .await;
        assert_eq!(e.class, ErrorClass::RateLimit);
        assert_eq!(e.status, Some(429));
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.message, "Rate limit reached");
    }

    #[tokio::test]
    async fn unauthorized_is_auth_and_the_key_is_scrubbed() {
        let e = fails_with(Reply::error(
            401,
            &error_body(
                "invalid_api_key",
                &format!("Incorrect API key provided: {SERVER_KEY}."),
            ),
        ))
        .await;
        assert_eq!(e.class, ErrorClass::Auth);
        assert_eq!(e.status, Some(401));
        assert!(!e.message.contains(SERVER_KEY), "{}", e.message);
        assert!(e.message.starts_with("Incorrect API key provided"));
    }

    #[tokio::test]
    async fn unknown_model_is_model_not_found() {
        let e = fails_with(Reply::error(
            404,
            &error_body("model_not_found", "The model `m-1` does not exist"),
        ))
        .await;
        assert_eq!(e.class, ErrorClass::ModelNotFound);
    }

    #[tokio::test]
    async fn server_errors_are_server() {
        let e = fails_with(Reply::error(500, &error_body("server_error", "boom"))).await;
        assert_eq!(e.class, ErrorClass::Server);
        assert_eq!(e.message, "boom");
        // Not JSON at all: the status decides.
        let e = fails_with(Reply::error(502, "<html>bad gateway</html>")).await;
        assert_eq!(e.class, ErrorClass::Server);
        assert_eq!(e.status, Some(502));
    }

    #[test]
    fn error_bodies_classify_by_code_then_type_then_status() {
        let c = |status, body: &str| parse_error(status, body).map(|(c, _)| c);
        assert_eq!(
            c(400, &error_body("context_length_exceeded", "too long")),
            Some(ErrorClass::ContextTooLong)
        );
        assert_eq!(
            c(429, &error_body("insufficient_quota", "quota")),
            Some(ErrorClass::RateLimit)
        );
        // A 200-style type under an odd status still wins over the status.
        assert_eq!(
            c(400, &error_body("rate_limit_exceeded", "slow")),
            Some(ErrorClass::RateLimit)
        );
        assert_eq!(
            c(400, &error_body("invalid_request_error", "bad field")),
            Some(ErrorClass::BadRequest)
        );
        assert_eq!(
            c(
                403,
                r#"{"error":{"message":"no","type":"invalid_request_error","code":null}}"#
            ),
            Some(ErrorClass::Auth)
        );
        assert_eq!(
            c(400, r#"{"error":{"message":"upstream busy","code":503}}"#),
            Some(ErrorClass::Server)
        );
        assert_eq!(
            parse_error(500, r#"{"error":"plain text error"}"#),
            Some((ErrorClass::Server, "plain text error".to_string()))
        );
        assert_eq!(parse_error(500, "not json"), None);
    }

    #[tokio::test]
    async fn a_dropped_connection_after_the_first_delta_is_transport() {
        let fake = fake().await;
        // The release makes sure the first delta left the fake before the connection drops.
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Drop,
        ]));
        let mut s = provider(&fake, "openai").stream(&ask("hi"));
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            Delta::Text("first".into())
        );
        fake.release();
        let e = upstream(s.next().await.unwrap().unwrap_err());
        assert_eq!(e.class, ErrorClass::Transport, "{e}");
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_without_done_is_transport() {
        let fake = fake().await;
        let piece = crate::testing::WireFormat::stream_piece(&OpenAiFormat, "partial", 0);
        fake.push(Reply::Raw {
            content_type: "text/event-stream".into(),
            body: String::from_utf8(piece.to_vec()).unwrap(),
        });
        let mut s = provider(&fake, "openai").stream(&ask("hi"));
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            Delta::Text("partial".into())
        );
        let e = upstream(s.next().await.unwrap().unwrap_err());
        assert_eq!(e.class, ErrorClass::Transport);
    }

    #[tokio::test]
    async fn a_malformed_data_line_is_malformed() {
        let fake = fake().await;
        fake.push(Reply::steps(vec![
            Step::Text("ok".into()),
            Step::Raw("data: {not json\n\n".into()),
        ]));
        let mut s = provider(&fake, "openai").stream(&ask("hi"));
        assert_eq!(s.next().await.unwrap().unwrap(), Delta::Text("ok".into()));
        let e = upstream(s.next().await.unwrap().unwrap_err());
        assert_eq!(e.class, ErrorClass::Malformed);
    }

    #[tokio::test]
    async fn an_error_event_mid_stream_is_classified() {
        let fake = fake().await;
        fake.push(Reply::steps(vec![
            Step::Text("ok".into()),
            Step::Raw(format!(
                "data: {}\n\n",
                error_body("rate_limit_exceeded", "slow down")
            )),
        ]));
        let mut s = provider(&fake, "openai").stream(&ask("hi"));
        assert_eq!(s.next().await.unwrap().unwrap(), Delta::Text("ok".into()));
        let e = upstream(s.next().await.unwrap().unwrap_err());
        assert_eq!(e.class, ErrorClass::RateLimit);
        assert_eq!(e.message, "slow down");
    }

    #[tokio::test]
    async fn a_unary_call_asks_the_upstream_for_a_whole_answer() {
        let fake = fake().await;
        fake.push(Reply::text("in one piece"));
        let mut req = ask("hi");
        req.stream = false;
        let p = provider(&fake, "openai");
        let (text, usage) = collect(p.stream(&req)).await.unwrap();
        assert_eq!(text, "in one piece");
        assert_eq!(usage.map(|u| u.completion_tokens), Some(3));
        let reqs = fake.requests();
        let b = reqs[0].json();
        assert_eq!(b["stream"], false);
        assert!(b.get("stream_options").is_none(), "{b}");
        assert_eq!(
            reqs[0].header("accept").as_deref(),
            Some("application/json")
        );
    }

    /// The typed fast path and the tolerant reading over a `Value` give the same deltas for every
    /// payload the typed path takes, and the typed path declines what only the tolerant one can
    /// judge (errors, odd shapes), so no payload is read differently than before.
    #[test]
    fn a_written_request_body_is_the_bytes_serializing_it_would_be() {
        let turn = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        let conversations = [
            vec![turn("user", "hi")],
            vec![
                turn("system", "be \"brief\"\n"),
                turn("assistant", "é ✓ \u{1}"),
                turn("user", "tab\there"),
            ],
            vec![],
        ];
        let stops = [vec![], vec!["END".to_string(), "a\"b".to_string()]];
        let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "string"}}});
        for messages in &conversations {
            for stream in [false, true] {
                for (max_tokens, max_completion_tokens) in
                    [(None, None), (Some(64), None), (None, Some(7))]
                {
                    for (temperature, top_p) in
                        [(None, None), (Some(0.7), Some(1.0)), (Some(0.0), None)]
                    {
                        for stop in &stops {
                            let body = RequestBody {
                                model: "m/\"x\"",
                                messages,
                                stream,
                                stream_options: stream.then_some(StreamOptions {
                                    include_usage: true,
                                }),
                                max_tokens,
                                max_completion_tokens,
                                temperature,
                                top_p,
                                stop,
                                response_format: (!stop.is_empty()).then_some(ResponseFormat {
                                    kind: "json_schema",
                                    json_schema: JsonSchemaFormat {
                                        name: "n",
                                        schema: &schema,
                                        strict: false,
                                    },
                                }),
                            };
                            let want = serde_json::to_vec(&body).unwrap();
                            assert_eq!(
                                String::from_utf8(body.to_json()).unwrap(),
                                String::from_utf8(want).unwrap()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_typed_reading_agrees_with_the_tolerant_one() {
        let chunks = [
            r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"caf\u00e9 \"q\"\n"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop","usage":{"prompt_tokens":1,"completion_tokens":4}}]}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"other"}},{"index":0,"delta":{"content":"zero"}}]}"#,
            r#"{"choices":[{"delta":{"content":"no index"}}],"usage":{}}"#,
            r#"{"choices":null}"#,
        ];
        for c in chunks {
            let typed = typed_deltas(c, Shape::Chunk).unwrap_or_else(|| panic!("{c}"));
            assert_eq!(typed, tolerant_chunk("p", c).unwrap(), "{c}");
        }
        let wholes = [
            r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"all","refusal":null},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#,
            r#"{"choices":[{"index":0,"message":{"content":null},"finish_reason":"content_filter"}]}"#,
        ];
        for w in wholes {
            let typed = typed_deltas(w, Shape::Whole).unwrap_or_else(|| panic!("{w}"));
            assert_eq!(typed, tolerant_whole("p", w.as_bytes()).unwrap(), "{w}");
        }
        // Left to the tolerant reading: error objects, arrays, odd types, a whole answer without
        // choices, broken JSON.
        for c in [
            r#"{"error":{"message":"boom","type":"server_error"}}"#,
            r#"[{"choices":[]}]"#,
            r#"{"choices":[{"index":0,"delta":{"content":["a"]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":1.5}}"#,
            r#"{"choices":"#,
        ] {
            assert!(typed_deltas(c, Shape::Chunk).is_none(), "{c}");
        }
        assert!(typed_deltas(r#"{"choices":[]}"#, Shape::Whole).is_none());
        // …which still reads them as before.
        assert_eq!(
            tolerant_chunk(
                "p",
                r#"{"choices":[{"index":0,"delta":{"content":["a"]}}]}"#
            )
            .unwrap(),
            Vec::<Delta>::new()
        );
        assert!(tolerant_chunk("p", r#"{"error":{"message":"boom"}}"#).is_err());
    }

    #[tokio::test]
    async fn a_whole_json_answer_is_accepted() {
        let fake = fake().await;
        let (_, body) = crate::testing::WireFormat::unary(
            &OpenAiFormat,
            "all at once",
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
            }),
        );
        fake.push(Reply::Raw {
            content_type: "application/json".into(),
            body: String::from_utf8(body.to_vec()).unwrap(),
        });
        let (text, usage) = collect(provider(&fake, "openai").stream(&ask("hi")))
            .await
            .unwrap();
        assert_eq!(text, "all at once");
        assert_eq!(usage.map(|u| u.completion_tokens), Some(3));
    }

    #[tokio::test]
    async fn garbage_json_answer_is_malformed() {
        let e = fails_with(Reply::Raw {
            content_type: "application/json".into(),
            body: "{\"hello\": 1}".into(),
        })
        .await;
        assert_eq!(e.class, ErrorClass::Malformed);
    }

    #[tokio::test]
    async fn no_response_headers_within_the_timeout_is_timeout() {
        // A server that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let (_sock, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let mut c = cfg("openai", Some(format!("http://{addr}")));
        c.timeout = Duration::from_millis(200);
        let p = build(&c, &ctx()).unwrap();
        let e = upstream(collect(p.stream(&ask("hi"))).await.unwrap_err());
        assert_eq!(e.class, ErrorClass::Timeout);
        hold.abort();
    }

    #[tokio::test]
    async fn openrouter_sends_referer_and_title_overridable() {
        let fake = fake().await;
        collect(provider(&fake, "openrouter").stream(&ask("hi")))
            .await
            .unwrap();
        let mut c = cfg("openrouter", Some(fake.base_url()));
        c.headers.insert("x-title".into(), "my app".into());
        collect(build(&c, &ctx()).unwrap().stream(&ask("hi")))
            .await
            .unwrap();
        let reqs = fake.requests();
        assert_eq!(
            reqs[0].header("http-referer").as_deref(),
            Some("https://github.com/chatcli")
        );
        assert_eq!(reqs[0].header("x-title").as_deref(), Some("chatcli"));
        assert_eq!(
            reqs[1].header("http-referer").as_deref(),
            Some("https://github.com/chatcli")
        );
        assert_eq!(reqs[1].header("x-title").as_deref(), Some("my app"));
        assert_eq!(reqs[1].headers.get_all("x-title").iter().count(), 1);
    }

    #[tokio::test]
    async fn copilot_presents_itself_as_an_editor() {
        let fake = fake().await;
        collect(provider(&fake, "copilot").stream(&ask("hi")))
            .await
            .unwrap();
        let r = &fake.requests()[0];
        let version = format!("chatcli/{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(
            r.header("openai-intent").as_deref(),
            Some("conversation-edits")
        );
        assert_eq!(r.header("x-initiator").as_deref(), Some("user"));
        assert_eq!(r.header("editor-version"), Some(version.clone()));
        assert_eq!(r.header("editor-plugin-version"), Some(version));
        assert!(r.header("x-title").is_none());
    }

    #[test]
    fn presets_have_their_defaults() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let table = [
            ("openai", "https://api.openai.com/v1", "gpt-5.4"),
            ("xai", "https://api.x.ai/v1", "grok-4-1"),
            (
                "openrouter",
                "https://openrouter.ai/api/v1",
                "openai/gpt-5.2",
            ),
            ("moonshot", "https://api.moonshot.ai/v1", "kimi-k2.6"),
            ("zai", "https://api.z.ai/api/paas/v4", "glm-5"),
            (
                "github-models",
                "https://models.github.ai/inference",
                "gpt-4o",
            ),
            ("copilot", "https://api.githubcopilot.com", "gpt-4o"),
        ];
        for (kind, url, model) in table {
            let mut c = cfg(kind, None);
            c.model = None;
            let p = new_provider(&c, &ctx()).unwrap();
            assert_eq!(p.base_url(), url, "{kind}");
            assert_eq!(p.default_model(), model, "{kind}");
            assert_eq!(p.kind(), ProviderKind::OpenAi);
            assert_eq!(p.preset(), kind);
            // Upper-case kinds from config work too.
            let mut c = cfg(&kind.to_uppercase(), None);
            c.model = Some("mine".into());
            c.base_url = Some("https://proxy.example/v1/".into());
            let p = new_provider(&c, &ctx()).unwrap();
            assert_eq!(p.base_url(), "https://proxy.example/v1");
            assert_eq!(p.default_model(), "mine");
        }
    }

    #[test]
    fn config_errors_name_the_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let err = |c: ProviderConfig| match new_provider(&c, &ctx()) {
            Err(LlmError::InvalidRequest(m)) => m,
            other => panic!("{other:?}"),
        };
        let m = err(cfg("openai-compatible", None));
        assert!(m.contains("`p`") && m.contains("base_url"), "{m}");
        let mut c = cfg("openai-compatible", Some("http://localhost:8000/v1".into()));
        c.model = None;
        assert!(err(c).contains("model"));
        let mut c = cfg("xai", None);
        c.api_key = None;
        let m = err(c);
        assert!(m.contains("`p`") && m.contains("api_key"), "{m}");
        assert!(err(cfg("openai", Some("ftp://x".into()))).contains("http(s)"));
        let mut c = cfg("openai", None);
        c.headers.insert("bad header".into(), "v".into());
        assert!(err(c).contains("header"));
        assert!(err(cfg("anthropic", None)).contains("not an OpenAI-format kind"));
        // A key-less local server is fine.
        let mut c = cfg("openai-compatible", Some("http://localhost:8000/v1".into()));
        c.api_key = None;
        assert!(new_provider(&c, &ctx()).is_ok());
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let p = new_provider(&cfg("openai", None), &ctx()).unwrap();
        let text = format!("{p:?}");
        assert!(!text.contains(SERVER_KEY), "{text}");
        assert!(text.contains("has_key: true"));
    }

    fn creds(key: Option<&str>, config: &[(&str, &str)]) -> ClientCredentials {
        ClientCredentials {
            key: key.map(|k| crate::llm::ClientKey {
                scheme: KeyScheme::ApiKey,
                secret: Secret::new(k),
            }),
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_forwarded_key_is_used_for_that_request_only() {
        let fake = fake().await;
        let server = provider(&fake, "copilot");
        for scheme in [KeyScheme::ApiKey, KeyScheme::OAuth, KeyScheme::Token] {
            let mut c = creds(Some("caller-key"), &[]);
            if let Some(k) = c.key.as_mut() {
                k.scheme = scheme;
            }
            let scoped = server.with_client_credentials(&c).await.unwrap();
            collect(scoped.stream(&ask("hi"))).await.unwrap();
        }
        collect(server.stream(&ask("hi"))).await.unwrap();
        let reqs = fake.requests();
        assert_eq!(reqs.len(), 4);
        for r in &reqs[..3] {
            assert_eq!(
                r.header("authorization").as_deref(),
                Some("Bearer caller-key")
            );
            // The preset's headers stay.
            assert_eq!(r.header("x-initiator").as_deref(), Some("user"));
        }
        assert_eq!(
            reqs[3].header("authorization").as_deref(),
            Some(format!("Bearer {SERVER_KEY}").as_str())
        );
    }

    #[tokio::test]
    async fn a_refused_client_base_url_is_invalid_request() {
        let fake = fake().await;
        let server = provider(&fake, "openai");
        for key in OpenAi::URL_KEYS {
            let e = server
                .with_client_credentials(&creds(Some("k"), &[(key, "https://10.0.0.1")]))
                .await
                .unwrap_err();
            assert!(matches!(e, LlmError::InvalidRequest(_)), "{key}: {e:?}");
        }
        assert!(fake.requests().is_empty());
    }

    #[tokio::test]
    async fn a_client_base_url_never_gets_the_server_key_or_operator_headers() {
        let fake = fake().await;
        // The operator's own upstream is elsewhere; the caller points the request at the fake.
        let mut c = cfg(
            "openrouter",
            Some("https://openrouter.invalid/api/v1".into()),
        );
        c.headers
            .insert("X-Operator-Secret".into(), "operator-only".into());
        let guarded = ProviderContext {
            ssrf: Arc::new(SsrfPolicy::new(true, &["127.0.0.1".to_string()]).unwrap()),
        };
        let server = build(&c, &guarded).unwrap();
        let url = format!("{}/v1/?ignored=1", fake.base_url());
        // Without the caller's own key the URL is refused (the server's key never goes there).
        let keyless = server
            .with_client_credentials(&creds(None, &[("api_base", url.as_str())]))
            .await
            .unwrap_err();
        assert!(
            matches!(keyless, LlmError::InvalidRequest(_)),
            "{keyless:?}"
        );
        for key in ["api_base", "base_url"] {
            let keyed = server
                .with_client_credentials(&creds(Some("caller-key"), &[(key, url.as_str())]))
                .await
                .unwrap();
            collect(keyed.stream(&ask("hi"))).await.unwrap();
        }
        let reqs = fake.requests();
        assert_eq!(reqs.len(), 2);
        for r in &reqs {
            assert_eq!(r.path, "/v1/chat/completions");
            assert_eq!(r.query, "");
            assert!(r.header("x-operator-secret").is_none());
            assert_eq!(r.header("x-title").as_deref(), Some("chatcli"));
            assert_eq!(
                r.header("authorization").as_deref(),
                Some("Bearer caller-key")
            );
        }
    }

    #[tokio::test]
    async fn unknown_provider_config_keys_are_refused_with_the_accepted_list() {
        let fake = fake().await;
        let server = provider(&fake, "openai");
        match server
            .with_client_credentials(&creds(None, &[("realm", "secret-realm")]))
            .await
        {
            Err(LlmError::InvalidRequest(m)) => {
                assert!(m.contains("`realm`"), "{m}");
                assert!(m.contains("base_url, api_base, endpoint"), "{m}");
                assert!(!m.contains("secret-realm"), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn discovered_models_are_the_ids_of_get_models() {
        let fake = fake().await;
        fake.set_models(&["m-1", "anthropic/claude-x"]);
        let p = provider(&fake, "openrouter");
        assert_eq!(
            p.discover_models().await.unwrap(),
            ["m-1", "anthropic/claude-x"]
        );
        let r = &fake.requests()[0];
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/models"));
        assert_eq!(
            r.header("authorization").as_deref(),
            Some(format!("Bearer {SERVER_KEY}").as_str())
        );
        // A refused key is an error that does not quote it.
        fake.when(
            |r| r.path.ends_with("/models"),
            Reply::error(
                401,
                &error_body("invalid_api_key", &format!("bad key {SERVER_KEY}")),
            ),
        );
        let err = p.discover_models().await.unwrap_err();
        assert!(!err.to_string().contains(SERVER_KEY), "{err}");
    }
}
