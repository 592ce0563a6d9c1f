//! The Google Gemini wire format: `POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`
//! with the key in `x-goog-api-key` (never in the URL; an `oauth:` key as `Authorization: Bearer`),
//! read as SSE whose every `data:` is a `GenerateContentResponse`; text parts are passed on as they
//! arrive. Owns the request body (`contents`, `systemInstruction`, `generationConfig`), the
//! classification of Google's `{"error":{code,status}}` errors, and the paged model list; the HTTP
//! plumbing and the client-credential rule are [`super::wire`]'s.

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

/// Where the Gemini API lives when the config names no `base_url`.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";
/// The model used when the config names none.
pub const DEFAULT_MODEL: &str = "gemini-2.5-flash";
const API_KEY_HEADER: &str = "x-goog-api-key";

/// The Gemini `generateContent` format.
#[derive(Debug, Clone)]
pub struct Gemini;

/// Builds the provider from its config; config errors name the provider.
pub fn build(cfg: &ProviderConfig, ctx: &ProviderContext) -> Result<Arc<dyn Provider>, LlmError> {
    let name = cfg.name.clone();
    let bad =
        |what: String| LlmError::InvalidRequest(format!("provider `{name}` (gemini): {what}"));
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
    let model = cfg
        .model
        .clone()
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_MODEL.into());
    model_path(&model).map_err(bad)?;
    let headers = http::header_map(&cfg.headers).map_err(bad)?;
    let parts = Parts {
        name: name.clone(),
        model,
        format: Gemini,
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

/// Whether a listed model can answer `generateContent` (an absent method list is taken as yes).
fn generates(model: &Value) -> bool {
    model
        .get("supportedGenerationMethods")
        .and_then(Value::as_array)
        .is_none_or(|methods| {
            methods
                .iter()
                .any(|m| m.as_str() == Some("generateContent"))
        })
}

/// The model as a path segment. Models come from callers, so only plain names pass: a `/`, `?` or
/// `:` could point the server's key at another endpoint.
fn model_path(model: &str) -> Result<&str, String> {
    let model = model.trim();
    let model = model.strip_prefix("models/").unwrap_or(model);
    let plain = !model.is_empty()
        && model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && model != "."
        && model != "..";
    if plain {
        Ok(model)
    } else {
        Err(format!(
            "model `{model}` is not a Gemini model name (letters, digits, `-`, `.`, `_`)"
        ))
    }
}

impl WireFormat for Gemini {
    const KIND: ProviderKind = ProviderKind::Gemini;

    /// `GET {base}/v1beta/models`, page by page (`nextPageToken`): the names of the models that
    /// can generate content, without their `models/` prefix.
    const MODELS: ModelListing = ModelListing {
        path: "/v1beta/models",
        query: Some(("pageSize", "1000")),
        cursor_key: "pageToken",
        take: |_, body, models| {
            let listed = body
                .get("models")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            models.extend(listed.iter().filter(|m| generates(m)).filter_map(|m| {
                let name = m.get("name").and_then(Value::as_str)?;
                Some(name.strip_prefix("models/").unwrap_or(name).to_string())
            }));
            Ok(body
                .get("nextPageToken")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(String::from))
        },
        parse_error,
    };

    fn chat_url(&self, base: &str, model: &str) -> Result<String, String> {
        let model = model_path(model)?;
        Ok(format!(
            "{base}/v1beta/models/{model}:streamGenerateContent?alt=sse"
        ))
    }

    fn fixed_chat_url(&self) -> bool {
        false
    }

    fn format_headers(&self, _stream: bool) -> HeaderMap {
        HeaderMap::new()
    }

    fn authenticate(
        &self,
        key: &ClientKey,
        headers: &mut HeaderMap,
    ) -> Result<(), InvalidHeaderValue> {
        let secret = key.secret.expose();
        match key.scheme {
            KeyScheme::OAuth => {
                headers.remove(API_KEY_HEADER);
                headers.insert(AUTHORIZATION, secret_header(&format!("Bearer {secret}"))?);
            }
            KeyScheme::ApiKey | KeyScheme::Token => {
                headers.remove(AUTHORIZATION);
                headers.insert(
                    HeaderName::from_static(API_KEY_HEADER),
                    secret_header(secret)?,
                );
            }
        }
        Ok(())
    }

    fn body(&self, req: &ChatRequest, _model: &str) -> Vec<u8> {
        let body = serde_json::to_vec(&GenerateBody::new(req)).unwrap_or_default();
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
                    Ok(deltas) => {
                        for delta in deltas {
                            yield Ok(delta);
                        }
                    }
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
            }
            // Gemini has no terminator event: a finish reason before EOF is what marks a whole answer.
            if !state.finished {
                yield Err(LlmError::upstream(
                    &name,
                    ErrorClass::Transport,
                    "the stream ended without a finishReason",
                ));
                return;
            }
            if let Some(usage) = state.usage {
                yield Ok(Delta::Usage(usage));
            }
        }
    }
}

/// The body with the offered tools (`tools[0].functionDeclarations`, `toolConfig`) and the tool
/// rounds so far (a `model` turn with its `functionCall` parts, then a `user` turn with one
/// `functionResponse` part per result).
fn with_tools(body: Vec<u8>, req: &ChatRequest) -> Vec<u8> {
    let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    if let Some(Value::Array(contents)) = v.get_mut("contents") {
        for turn in &req.tool_turns {
            let mut parts = Vec::new();
            if !turn.text.is_empty() {
                parts.push(json!({"text": turn.text}));
            }
            for c in &turn.calls {
                parts.push(json!({"functionCall": {"name": c.name, "args": c.arguments}}));
            }
            contents.push(json!({"role": "model", "parts": parts}));
            let results: Vec<Value> = turn
                .calls
                .iter()
                .zip(&turn.outputs)
                .map(|(c, out)| {
                    let key = if out.is_error { "error" } else { "result" };
                    json!({"functionResponse": {"name": c.name, "response": {key: out.content}}})
                })
                .collect();
            contents.push(json!({"role": "user", "parts": results}));
        }
    }
    if !req.tools.is_empty() {
        let decls: Vec<Value> = req
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect();
        v.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        if req.tool_choice_none {
            v.insert(
                "toolConfig".into(),
                json!({"functionCallingConfig": {"mode": "NONE"}}),
            );
        }
    }
    serde_json::to_vec(&v).unwrap_or(body)
}

/// The `streamGenerateContent` request body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateBody<'a> {
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<SystemInstruction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig<'a>>,
}

#[derive(Debug, Serialize)]
struct Content<'a> {
    role: &'static str,
    parts: Vec<Part<'a>>,
}

#[derive(Debug, Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Debug, Serialize)]
struct SystemInstruction {
    parts: [OwnedPart; 1],
}

#[derive(Debug, Serialize)]
struct OwnedPart {
    text: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    // f32 fields so serde_json writes the shortest form (0.7, not 0.699999988079071).
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_schema: Option<serde_json::Value>,
}

/// A JSON schema as Gemini's `responseSchema` (an OpenAPI subset) takes it: types named as its
/// `Type` enum (`OBJECT`, `STRING`, …), without `additionalProperties`, and without free-form
/// objects (an object with no `properties`, which Gemini refuses), so such a field is left to the
/// prompt.
fn gemini_schema(schema: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                match k.as_str() {
                    "additionalProperties" => {}
                    "type" => {
                        let t = v.as_str().map(str::to_ascii_uppercase);
                        out.insert(k.clone(), t.map_or_else(|| v.clone(), Value::String));
                    }
                    "properties" => {
                        let props: serde_json::Map<String, Value> = v
                            .as_object()
                            .into_iter()
                            .flatten()
                            .filter(|(_, p)| {
                                p.get("type").and_then(Value::as_str) != Some("object")
                                    || p.get("properties").is_some()
                            })
                            .map(|(name, p)| (name.clone(), gemini_schema(p)))
                            .collect();
                        out.insert(k.clone(), Value::Object(props));
                    }
                    _ => {
                        out.insert(k.clone(), gemini_schema(v));
                    }
                }
            }
            // `required` may not name a property that was left out.
            if let (Some(Value::Array(req)), Some(Value::Object(props))) =
                (out.get("required").cloned(), out.get("properties"))
            {
                let kept: Vec<Value> = req
                    .into_iter()
                    .filter(|r| r.as_str().is_some_and(|r| props.contains_key(r)))
                    .collect();
                out.insert("required".into(), Value::Array(kept));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(gemini_schema).collect()),
        other => other.clone(),
    }
}

impl<'a> GenerateBody<'a> {
    fn new(req: &'a ChatRequest) -> Self {
        let system: Vec<&str> = req
            .messages
            .iter()
            .filter(|m| m.role == "system" && !m.content.is_empty())
            .map(|m| m.content.as_str())
            .collect();
        let mut contents: Vec<Content<'a>> = Vec::new();
        // Gemini refuses empty parts; turns of the same role are merged so the conversation
        // alternates as Gemini expects.
        for m in req
            .messages
            .iter()
            .filter(|m| m.role != "system" && !m.content.is_empty())
        {
            let role = if m.role == "assistant" {
                "model"
            } else {
                "user"
            };
            let part = Part { text: &m.content };
            match contents.last_mut() {
                Some(last) if last.role == role => last.parts.push(part),
                _ => contents.push(Content {
                    role,
                    parts: vec![part],
                }),
            }
        }
        let config = GenerationConfig {
            max_output_tokens: req.max_tokens.filter(|n| *n > 0),
            temperature: req.temperature,
            top_p: req.top_p,
            stop_sequences: &req.stop,
            response_mime_type: req.schema.as_ref().map(|_| "application/json"),
            response_schema: req.schema.as_ref().map(|s| gemini_schema(&s.schema)),
        };
        let any_config = config.max_output_tokens.is_some()
            || config.temperature.is_some()
            || config.top_p.is_some()
            || !config.stop_sequences.is_empty()
            || config.response_schema.is_some();
        Self {
            contents,
            system_instruction: (!system.is_empty()).then(|| SystemInstruction {
                parts: [OwnedPart {
                    text: system.join("\n\n"),
                }],
            }),
            generation_config: any_config.then_some(config),
        }
    }
}

/// What the event stream has said so far.
#[derive(Debug, Default)]
struct StreamState {
    /// The last usage reported (Gemini repeats running totals).
    usage: Option<Usage>,
    /// A `finishReason` was seen.
    finished: bool,
    /// Function calls seen (their ids when Gemini gives none).
    calls: usize,
}

impl StreamState {
    /// Handles one `GenerateContentResponse`; returns its text and finish reason, if any.
    fn on_event(&mut self, provider: &str, event: &SseEvent) -> Result<Vec<Delta>, LlmError> {
        if event.data.trim().is_empty() {
            return Ok(Vec::new());
        }
        let malformed = |what: String| LlmError::upstream(provider, ErrorClass::Malformed, what);
        let data: Value = serde_json::from_str(&event.data)
            .map_err(|e| malformed(format!("invalid JSON in a stream chunk: {e}")))?;
        if !data.is_object() {
            return Err(malformed("a stream chunk is not a JSON object".into()));
        }
        if data.get("error").is_some() {
            let (class, message) = classify_body(&data)
                .unwrap_or((ErrorClass::Server, "error chunk without details".into()));
            return Err(LlmError::upstream(provider, class, message));
        }
        if let Some(reason) = data
            .pointer("/promptFeedback/blockReason")
            .and_then(Value::as_str)
        {
            return Err(LlmError::upstream(
                provider,
                ErrorClass::BadRequest,
                format!("Gemini blocked the prompt ({reason})"),
            ));
        }
        if let Some(usage) = data.get("usageMetadata") {
            let count = |field: &str| usage.get(field).and_then(Value::as_u64).unwrap_or(0);
            self.usage = Some(Usage {
                prompt_tokens: count("promptTokenCount"),
                completion_tokens: count("candidatesTokenCount"),
            });
        }
        let mut deltas = Vec::new();
        let Some(candidate) = data.pointer("/candidates/0") else {
            return Ok(deltas);
        };
        if let Some(parts) = candidate.pointer("/content/parts") {
            let parts = parts
                .as_array()
                .ok_or_else(|| malformed("`content.parts` is not an array".into()))?;
            let mut text = String::new();
            for part in parts {
                // Thought summaries are not answer text.
                if part.get("thought").and_then(Value::as_bool) == Some(true) {
                    continue;
                }
                if let Some(call) = part.get("functionCall") {
                    let name = call.get("name").and_then(Value::as_str).unwrap_or("");
                    self.calls += 1;
                    let id = call
                        .get("id")
                        .and_then(Value::as_str)
                        .map_or_else(|| format!("call_{}", self.calls), str::to_string);
                    deltas.push(Delta::ToolCall(super::tools::ToolCall {
                        id,
                        name: name.to_string(),
                        arguments: call.get("args").cloned().unwrap_or_else(|| json!({})),
                    }));
                    continue;
                }
                match part.get("text") {
                    Some(Value::String(t)) => text.push_str(t),
                    Some(_) => return Err(malformed("a part's `text` is not a string".into())),
                    None => {}
                }
            }
            if !text.is_empty() {
                deltas.push(Delta::Text(text));
            }
        }
        if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
            self.finished = true;
            deltas.push(Delta::Finish(reason.to_string()));
        }
        Ok(deltas)
    }
}

/// The class of a Google RPC `status`.
fn class_of(status: &str) -> Option<ErrorClass> {
    Some(match status {
        "RESOURCE_EXHAUSTED" => ErrorClass::RateLimit,
        "UNAUTHENTICATED" | "PERMISSION_DENIED" => ErrorClass::Auth,
        "NOT_FOUND" => ErrorClass::ModelNotFound,
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => ErrorClass::BadRequest,
        "UNAVAILABLE" | "INTERNAL" | "UNKNOWN" => ErrorClass::Server,
        "DEADLINE_EXCEEDED" => ErrorClass::Timeout,
        _ => return None,
    })
}

/// `{"error":{"code","message","status","details"}}` (or a one-element array of it) → class and
/// message; `None` when the shape is not Google's.
fn classify_body(body: &Value) -> Option<(ErrorClass, String)> {
    let body = match body {
        Value::Array(items) => items.first()?,
        other => other,
    };
    let error = body.get("error")?;
    let message = short(
        error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    );
    // A wrong key is a 400 INVALID_ARGUMENT whose ErrorInfo reason says so.
    let bad_key = error
        .get("details")
        .and_then(Value::as_array)
        .is_some_and(|details| {
            details
                .iter()
                .any(|d| d.get("reason").and_then(Value::as_str) == Some("API_KEY_INVALID"))
        });
    let class = if bad_key {
        ErrorClass::Auth
    } else if let Some(c) = error
        .get("status")
        .and_then(Value::as_str)
        .and_then(class_of)
    {
        c
    } else {
        let code = error.get("code").and_then(Value::as_u64)?;
        ErrorClass::from_status(u16::try_from(code).ok()?)
    };
    Some((class, message))
}

fn short(message: &str) -> String {
    let message = message.trim();
    match message.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &message[..i]),
        None => message.to_string(),
    }
}

/// Error parser for [`http::send`]: the RPC status wins over the HTTP status.
fn parse_error(status: u16, body: &str) -> Option<(ErrorClass, String)> {
    let value: Value = serde_json::from_str(body).ok()?;
    if let Some(found) = classify_body(&value) {
        return Some(found);
    }
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

    fn tool_request() -> ChatRequest {
        use crate::llm::tools::{ToolCall, ToolOutput, ToolSpec, ToolTurn};
        let mut r = ChatRequest::new(
            vec![crate::llm::Message {
                role: "user".into(),
                content: "q".into(),
            }],
            "m",
        );
        r.tools = std::sync::Arc::from(vec![ToolSpec {
            name: "echo".into(),
            description: "Repeats".into(),
            parameters: json!({"type": "object"}),
        }]);
        r.tool_turns = vec![ToolTurn {
            text: String::new(),
            calls: vec![ToolCall {
                id: "c1".into(),
                name: "echo".into(),
                arguments: json!({"text": "hi"}),
            }],
            outputs: vec![ToolOutput {
                content: "echo: hi".into(),
                is_error: false,
            }],
        }];
        r
    }

    #[test]
    fn tools_and_tool_rounds_in_the_body_and_calls_in_the_answer() {
        let mut r = tool_request();
        r.tool_choice_none = true;
        let body: Value = serde_json::from_slice(&Gemini.body(&r, "m")).unwrap();
        assert_eq!(body["tools"][0]["functionDeclarations"][0]["name"], "echo");
        assert_eq!(body["toolConfig"]["functionCallingConfig"]["mode"], "NONE");
        let contents = body["contents"].as_array().unwrap();
        assert_eq!(
            contents[1],
            json!({"role": "model", "parts": [{"functionCall": {"name": "echo", "args": {"text": "hi"}}}]})
        );
        assert_eq!(
            contents[2],
            json!({"role": "user", "parts": [{"functionResponse": {"name": "echo", "response": {"result": "echo: hi"}}}]})
        );
        let plain: Value =
            serde_json::from_slice(&Gemini.body(&ChatRequest::new(vec![], "m"), "m")).unwrap();
        assert!(plain.get("tools").is_none());

        let mut state = StreamState::default();
        let event = SseEvent {
            event: "message".into(),
            data: json!({"candidates": [{"content": {"parts": [
                {"functionCall": {"name": "echo", "args": {"text": "x"}}}]},
                "finishReason": "STOP"}]})
            .to_string(),
        };
        let deltas = state.on_event("g", &event).unwrap();
        assert_eq!(
            deltas[0],
            Delta::ToolCall(crate::llm::tools::ToolCall {
                id: "call_1".into(),
                name: "echo".into(),
                arguments: json!({"text": "x"}),
            })
        );
    }
    use crate::testing::gemini::{GeminiFormat, error_body};
    use crate::testing::{FakeUpstream, Reply, Step};

    const KEY: &str = "AIza-test-key-123";

    fn ctx() -> ProviderContext {
        ProviderContext {
            ssrf: Arc::new(SsrfPolicy::default()),
        }
    }

    fn config(base_url: &str) -> ProviderConfig {
        ProviderConfig {
            name: "googleai".into(),
            kind: "gemini".into(),
            base_url: Some(base_url.into()),
            api_key: Some(Secret::new(KEY)),
            ..Default::default()
        }
    }

    async fn setup() -> (FakeUpstream, Arc<dyn Provider>) {
        let fake = FakeUpstream::start(GeminiFormat).await.unwrap();
        let provider = build(&config(&fake.base_url()), &ctx()).unwrap();
        (fake, provider)
    }

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[tokio::test]
    async fn a_stream_read_to_its_end_leaves_its_connection_for_the_next_call() {
        let (fake, p) = setup().await;
        fake.assert_two_answers_share_a_connection(":streamGenerateContent", || {
            p.stream(&user("hi"))
        })
        .await;
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
    fn a_schema_is_asked_for_as_a_response_schema_gemini_accepts() {
        let mut r = user("hi");
        r.schema = Some(schema());
        let body = serde_json::to_value(GenerateBody::new(&r)).unwrap();
        let config = &body["generationConfig"];
        assert_eq!(config["responseMimeType"], "application/json");
        let s = &config["responseSchema"];
        assert_eq!(s["type"], "OBJECT");
        assert_eq!(s["properties"]["a"]["type"], "STRING");
        assert!(s["properties"].get("params").is_none(), "{s}");
        assert_eq!(s["required"], serde_json::json!(["a"]));
        let plain = serde_json::to_value(GenerateBody::new(&user("hi"))).unwrap();
        assert!(plain.get("generationConfig").is_none(), "{plain}");
    }

    fn user(text: &str) -> ChatRequest {
        ChatRequest::new(vec![msg("user", text)], "")
    }

    async fn items(provider: &Arc<dyn Provider>, req: ChatRequest) -> Vec<Result<Delta, LlmError>> {
        provider.stream(&req).collect().await
    }

    fn upstream(e: &LlmError) -> &UpstreamError {
        e.as_upstream()
            .unwrap_or_else(|| panic!("not an upstream error: {e:?}"))
    }

    async fn failure(provider: &Arc<dyn Provider>) -> UpstreamError {
        let err = collect(provider.stream(&user("hi"))).await.unwrap_err();
        upstream(&err).clone()
    }

    fn sse(chunks: &[serde_json::Value]) -> Reply {
        Reply::Raw {
            content_type: "text/event-stream".into(),
            body: chunks
                .iter()
                .map(|c| format!("data: {c}\r\n\r\n"))
                .collect(),
        }
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
                Delta::Finish("STOP".into()),
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
                msg("system", "Be brief."),
                msg("system", "Speak English."),
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("user", "How are you?"),
                msg("user", "Really?"),
            ],
            "gemini-2.5-pro",
        );
        req.max_tokens = Some(256);
        req.temperature = Some(0.7);
        req.top_p = Some(0.9);
        req.stop = vec!["END".into()];
        collect(provider.stream(&req)).await.unwrap();
        let recorded = fake.requests();
        assert_eq!(recorded.len(), 1);
        let r = &recorded[0];
        assert_eq!(r.method, ::http::Method::POST);
        assert_eq!(
            r.path,
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
        );
        assert_eq!(r.query, "alt=sse");
        assert_eq!(r.header("x-goog-api-key").as_deref(), Some(KEY));
        assert!(r.header("authorization").is_none());
        assert!(!r.query.contains(KEY));
        assert_eq!(
            r.json(),
            serde_json::json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "Hi"}]},
                    {"role": "model", "parts": [{"text": "Hello!"}]},
                    {"role": "user", "parts": [{"text": "How are you?"}, {"text": "Really?"}]},
                ],
                "systemInstruction": {"parts": [{"text": "Be brief.\n\nSpeak English."}]},
                "generationConfig": {
                    "maxOutputTokens": 256,
                    "temperature": 0.7,
                    "topP": 0.9,
                    "stopSequences": ["END"],
                },
            })
        );
    }

    #[tokio::test]
    async fn defaults_omit_optional_fields() {
        let (fake, provider) = setup().await;
        assert_eq!(provider.default_model(), DEFAULT_MODEL);
        collect(provider.stream(&user("hi"))).await.unwrap();
        let r = &fake.requests()[0];
        assert_eq!(
            r.path,
            format!("/v1beta/models/{DEFAULT_MODEL}:streamGenerateContent")
        );
        assert_eq!(
            r.json(),
            serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        );
    }

    #[tokio::test]
    async fn model_names_cannot_leave_the_models_path() {
        let (fake, provider) = setup().await;
        for bad in [
            "../../v1/files",
            "a/b",
            "x:generateContent",
            "m?key=1",
            "..",
        ] {
            let err = collect(provider.stream(&ChatRequest::new(vec![msg("user", "hi")], bad)))
                .await
                .unwrap_err();
            assert!(matches!(err, LlmError::InvalidRequest(_)), "{bad}: {err}");
        }
        assert!(fake.requests().is_empty());
        collect(provider.stream(&ChatRequest::new(
            vec![msg("user", "hi")],
            "models/gemini-2.0-flash",
        )))
        .await
        .unwrap();
        assert_eq!(
            fake.requests()[0].path,
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
        );
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
            &error_body(429, "RESOURCE_EXHAUSTED", "quota exceeded"),
            9,
        ));
        let e = failure(&provider).await;
        assert_eq!(e.class, ErrorClass::RateLimit);
        assert_eq!(e.status, Some(429));
        assert_eq!(e.retry_after, Some(Duration::from_secs(9)));
        assert_eq!(e.message, "quota exceeded");
        assert_eq!(e.provider, "googleai");
    }

    #[tokio::test]
    async fn http_errors_are_classified() {
        let (fake, provider) = setup().await;
        let cases = [
            (401, "UNAUTHENTICATED", ErrorClass::Auth),
            (403, "PERMISSION_DENIED", ErrorClass::Auth),
            (404, "NOT_FOUND", ErrorClass::ModelNotFound),
            (400, "INVALID_ARGUMENT", ErrorClass::BadRequest),
            (500, "INTERNAL", ErrorClass::Server),
            (503, "UNAVAILABLE", ErrorClass::Server),
            // The RPC status wins over the HTTP status.
            (400, "RESOURCE_EXHAUSTED", ErrorClass::RateLimit),
        ];
        for (status, rpc, class) in cases {
            fake.push(Reply::error(status, &error_body(status, rpc, "nope")));
            let e = failure(&provider).await;
            assert_eq!((e.class, e.status), (class, Some(status)), "{rpc}");
        }
        // A bad key is a 400 INVALID_ARGUMENT whose ErrorInfo says API_KEY_INVALID.
        fake.push(Reply::error(
            400,
            &serde_json::json!({"error": {"code": 400, "message": "API key not valid.",
                "status": "INVALID_ARGUMENT", "details": [{"@type":
                "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}})
            .to_string(),
        ));
        assert_eq!(failure(&provider).await.class, ErrorClass::Auth);
        // Without a typed body the status decides.
        fake.push(Reply::error(502, "<html>bad gateway</html>"));
        assert_eq!(failure(&provider).await.class, ErrorClass::Server);
        fake.push(Reply::error(401, ""));
        assert_eq!(failure(&provider).await.class, ErrorClass::Auth);
        fake.push(Reply::error(
            404,
            &error_body(404, "SOMETHING_NEW", "no such model"),
        ));
        assert_eq!(failure(&provider).await.class, ErrorClass::ModelNotFound);
    }

    #[tokio::test]
    async fn error_chunk_mid_stream_is_classified() {
        let (fake, provider) = setup().await;
        fake.push(Reply::steps(vec![
            Step::Text("partial".into()),
            Step::Raw(format!(
                "data: {}\r\n\r\n",
                error_body(503, "UNAVAILABLE", "The model is overloaded.")
            )),
        ]));
        let got = items(&provider, user("hi")).await;
        assert_eq!(got[0].as_ref().unwrap(), &Delta::Text("partial".into()));
        let e = upstream(got[1].as_ref().unwrap_err());
        assert_eq!(e.class, ErrorClass::Server);
        assert_eq!(e.message, "The model is overloaded.");
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
    async fn clean_eof_without_finish_reason_is_an_error() {
        let (fake, provider) = setup().await;
        fake.push(sse(&[
            serde_json::json!({"candidates": [{"content": {"role": "model",
            "parts": [{"text": "cut"}]}}]}),
        ]));
        let got = items(&provider, user("hi")).await;
        assert_eq!(got[0].as_ref().unwrap(), &Delta::Text("cut".into()));
        assert_eq!(
            upstream(got[1].as_ref().unwrap_err()).class,
            ErrorClass::Transport
        );
    }

    #[tokio::test]
    async fn usage_is_the_last_reported_and_thoughts_are_skipped() {
        let (fake, provider) = setup().await;
        fake.push(sse(&[
            serde_json::json!({"candidates": [{"content": {"role": "model", "parts": [
                {"text": "thinking…", "thought": true}, {"text": "Hel"}]}}],
                "usageMetadata": {"promptTokenCount": 12}}),
            serde_json::json!({"candidates": [{"content": {"role": "model", "parts": [
                {"text": "lo"}, {"text": "!"}]}, "finishReason": "MAX_TOKENS"}],
                "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 4}}),
        ]));
        let got: Vec<Delta> = items(&provider, user("hi"))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            got,
            vec![
                Delta::Text("Hel".into()),
                Delta::Text("lo!".into()),
                Delta::Finish("MAX_TOKENS".into()),
                Delta::Usage(Usage {
                    prompt_tokens: 12,
                    completion_tokens: 4
                }),
            ]
        );
    }

    #[tokio::test]
    async fn blocked_prompt_is_a_bad_request() {
        let (fake, provider) = setup().await;
        fake.push(sse(&[
            serde_json::json!({"promptFeedback": {"blockReason": "SAFETY"}}),
        ]));
        assert_eq!(failure(&provider).await.class, ErrorClass::BadRequest);
    }

    #[tokio::test]
    async fn malformed_chunks_are_malformed() {
        let (fake, provider) = setup().await;
        fake.push(Reply::steps(vec![Step::Raw(
            "data: {not json\r\n\r\n".into(),
        )]));
        assert_eq!(failure(&provider).await.class, ErrorClass::Malformed);
        fake.push(Reply::steps(vec![Step::Raw("data: [1, 2]\n\n".into())]));
        assert_eq!(failure(&provider).await.class, ErrorClass::Malformed);
        fake.push(sse(&[
            serde_json::json!({"candidates": [{"content": {"parts": [{"text": 5}]}}]}),
        ]));
        assert_eq!(failure(&provider).await.class, ErrorClass::Malformed);
        fake.push(Reply::Raw {
            content_type: "text/html".into(),
            body: "<html>proxy error</html>".into(),
        });
        assert_eq!(failure(&provider).await.class, ErrorClass::Malformed);
    }

    #[tokio::test]
    async fn forwarded_keys_replace_the_server_key() {
        let (fake, provider) = setup().await;
        for (raw, api_key, auth) in [
            ("AIza-client", Some("AIza-client"), None),
            ("apikey:AIza-2", Some("AIza-2"), None),
            ("token:tk-3", Some("tk-3"), None),
            ("oauth:ya29.at-4", None, Some("Bearer ya29.at-4")),
        ] {
            let creds = ClientCredentials {
                key: ClientKey::parse(raw),
                config: BTreeMap::new(),
            };
            let scoped = provider.with_client_credentials(&creds).await.unwrap();
            collect(scoped.stream(&user("hi"))).await.unwrap();
            let r = fake.requests().pop().unwrap();
            assert_eq!(r.header("x-goog-api-key").as_deref(), api_key, "{raw}");
            assert_eq!(r.header("authorization").as_deref(), auth, "{raw}");
            assert!(!format!("{scoped:?}").contains(raw.rsplit(':').next().unwrap()));
        }
        collect(provider.stream(&user("hi"))).await.unwrap();
        assert_eq!(
            fake.requests()
                .pop()
                .unwrap()
                .header("x-goog-api-key")
                .as_deref(),
            Some(KEY)
        );
    }

    #[tokio::test]
    async fn client_config_is_checked() {
        let (fake, provider) = setup().await;
        let with = |pairs: &[(&str, &str)]| ClientCredentials {
            key: ClientKey::parse("AIza-client"),
            config: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let err = provider
            .with_client_credentials(&with(&[("agent_id", "x")]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LlmError::InvalidRequest(m) if m.contains("`agent_id`")),
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
        let operator = FakeUpstream::start(GeminiFormat).await.unwrap();
        let client_host = FakeUpstream::start(GeminiFormat).await.unwrap();
        // Loopback is refused by default; the operator allowlists it (and http) for this test.
        let ctx = ProviderContext {
            ssrf: Arc::new(SsrfPolicy::new(true, &["127.0.0.1".to_string()]).unwrap()),
        };
        let mut cfg = config(&operator.base_url());
        cfg.headers = BTreeMap::from([("x-team".to_string(), "team-secret".to_string())]);
        let provider = build(&cfg, &ctx).unwrap();
        let creds = ClientCredentials {
            key: ClientKey::parse("AIza-client"),
            config: BTreeMap::from([("base_url".into(), client_host.base_url())]),
        };
        let scoped = provider.with_client_credentials(&creds).await.unwrap();
        let (text, _) = collect(scoped.stream(&user("hi"))).await.unwrap();
        assert_eq!(text, "hello from the fake");
        assert!(operator.requests().is_empty());
        let r = &client_host.requests()[0];
        assert_eq!(r.header("x-goog-api-key").as_deref(), Some("AIza-client"));
        assert!(
            r.header("x-team").is_none(),
            "operator headers stay with the operator"
        );
    }

    #[tokio::test]
    async fn build_needs_a_key_and_never_shows_it() {
        let mut cfg = config(DEFAULT_BASE_URL);
        cfg.api_key = None;
        let err = build(&cfg, &ctx()).unwrap_err();
        assert!(err.to_string().contains("`googleai`"), "{err}");
        assert!(err.to_string().contains("api_key"), "{err}");
        let provider = build(&config(DEFAULT_BASE_URL), &ctx()).unwrap();
        assert!(!format!("{provider:?}").contains(KEY));
        assert_eq!(provider.kind(), ProviderKind::Gemini);
    }

    #[tokio::test]
    async fn waiting_longer_than_the_timeout_is_a_timeout() {
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
    fn error_bodies_classify_by_status() {
        assert_eq!(
            parse_error(500, &error_body(500, "UNAVAILABLE", "busy")),
            Some((ErrorClass::Server, "busy".into()))
        );
        // The streaming endpoint without alt=sse wraps errors in an array.
        let wrapped = format!("[{}]", error_body(429, "RESOURCE_EXHAUSTED", "q"));
        assert_eq!(
            parse_error(429, &wrapped).map(|(c, _)| c),
            Some(ErrorClass::RateLimit)
        );
        assert_eq!(parse_error(502, "<html>"), None);
        assert_eq!(class_of("DEADLINE_EXCEEDED"), Some(ErrorClass::Timeout));
    }

    #[tokio::test]
    async fn discovered_models_are_the_generating_ones_of_every_page() {
        let (fake, p) = setup().await;
        fake.set_models(&["gemini-a", "text-embedding-1", "gemini-b"]);
        let got = p.discover_models().await.unwrap();
        assert_eq!(got, ["gemini-a", "gemini-b"]);
        let reqs = fake.requests();
        assert_eq!(reqs.len(), 2, "two pages");
        assert!(
            reqs.iter()
                .all(|r| r.header("x-goog-api-key").as_deref() == Some(KEY))
        );
        assert!(
            reqs.iter().all(|r| r.model().is_none()),
            "no model in the list's path"
        );
    }
}
