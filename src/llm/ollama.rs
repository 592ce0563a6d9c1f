//! Ollama's native chat API: `POST {base_url}/api/chat` streamed as newline-delimited JSON, and
//! `GET {base_url}/api/tags` for the pulled models (at start-up, to check that the configured model
//! is there). A key (Ollama behind an authenticating proxy) is sent as `Authorization: Bearer`. A
//! caller may point a request at its own Ollama (`provider_config.base_url`, `chatcli connect
//! --ollama-url`) with its own key, under the client-credential rule of [`super::wire`].

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, InvalidHeaderValue};
use serde_json::{Map, Value, json};

use super::error::{ErrorClass, LlmError};
use super::http::{self, ModelListing};
use super::wire::{self, HttpProvider, Parts, Pending, WireFormat};
use super::{ChatRequest, ClientKey, Delta, Provider, ProviderContext, ProviderKind, Usage};
use crate::config::ProviderConfig;

/// Where Ollama listens when the config names no `base_url`.
pub const DEFAULT_BASE_URL: &str = "http://localhost:11434";
/// The model used when the config names none (as in the existing ChatCLI).
pub const DEFAULT_MODEL: &str = "gpt-oss:20b";

/// Ollama's native format.
#[derive(Debug, Clone)]
pub struct Ollama;

/// Builds the provider from its config (operator-trusted: its URL is not SSRF-checked).
pub fn build(cfg: &ProviderConfig, ctx: &ProviderContext) -> Result<Arc<dyn Provider>, LlmError> {
    let bad =
        |why: String| LlmError::InvalidRequest(format!("ollama provider `{}`: {why}", cfg.name));
    let raw = non_empty(cfg.base_url.as_deref()).unwrap_or(DEFAULT_BASE_URL);
    let url = reqwest::Url::parse(raw)
        .map_err(|e| bad(format!("base_url `{raw}` is not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!("base_url `{raw}` must be http or https")));
    }
    let parts = Parts {
        name: cfg.name.clone(),
        model: non_empty(cfg.model.as_deref())
            .unwrap_or(DEFAULT_MODEL)
            .to_string(),
        format: Ollama,
        base_url: normalized_base(url),
        key: cfg.api_key.clone(),
        headers: http::header_map(&cfg.headers).map_err(bad)?,
        timeouts: http::Timeouts::of(cfg),
    };
    wire::provider(parts, ctx)
}

impl WireFormat for Ollama {
    const KIND: ProviderKind = ProviderKind::Ollama;

    /// `GET {base_url}/api/tags`: the pulled models, with their tags.
    const MODELS: ModelListing = ModelListing {
        path: "/api/tags",
        query: None,
        cursor_key: "",
        take: |provider, body, models| {
            models.extend(http::names_in(provider, body, "models", "name")?);
            Ok(None)
        },
        parse_error,
    };

    fn chat_url(&self, base: &str, _model: &str) -> Result<String, String> {
        Ok(format!("{base}/api/chat"))
    }

    fn format_headers(&self, _stream: bool) -> HeaderMap {
        HeaderMap::new()
    }

    fn authenticate(
        &self,
        key: &ClientKey,
        headers: &mut HeaderMap,
    ) -> Result<(), InvalidHeaderValue> {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", key.secret.expose()))?;
        v.set_sensitive(true);
        headers.insert(AUTHORIZATION, v);
        Ok(())
    }

    fn body(&self, req: &ChatRequest, model: &str) -> Vec<u8> {
        serde_json::to_vec(&chat_body(model.trim(), req)).unwrap_or_default()
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
            // The response lives inside this stream: dropping the stream drops the connection,
            // which is how Ollama learns to stop generating.
            let mut lines = Box::pin(http::ndjson_lines(&name, answer.into_reqwest()));
            while let Some(line) = lines.next().await {
                let (deltas, done) = match line.and_then(|v| read_line(&name, &v)) {
                    Ok(x) => x,
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                for d in deltas {
                    yield Ok(d);
                }
                if done {
                    http::read_rest_in_background(lines);
                    return;
                }
            }
            yield Err(LlmError::upstream(
                &name,
                ErrorClass::Transport,
                "the answer stream ended before Ollama said it was done",
            ));
        }
    }

    fn check_ready(p: &HttpProvider<Self>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let base = p.base_url();
            let names = match p.discover_models().await {
                Ok(names) => names,
                Err(LlmError::Upstream(u)) if u.class == ErrorClass::Malformed => {
                    return Err(format!(
                        "ollama at {base} answered /api/tags with no model list"
                    ));
                }
                Err(LlmError::Upstream(u)) if u.status.is_none() => {
                    return Err(format!("ollama at {base} is unreachable: {}", u.message));
                }
                Err(e) => return Err(format!("ollama at {base} did not list its models: {e}")),
            };
            let model = p.default_model();
            if names.iter().any(|n| model_matches(model, n)) {
                return Ok(());
            }
            let has = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            Err(format!(
                "ollama at {base} does not have model `{model}` (it has: {has}); run `ollama pull {model}`"
            ))
        })
    }
}

/// Whether a name from `/api/tags` is the configured model; Ollama lists untagged models with
/// their implicit `:latest` tag.
fn model_matches(model: &str, listed: &str) -> bool {
    listed == model
        || (!model.contains(':')
            && listed
                .strip_suffix(":latest")
                .is_some_and(|base| base == model))
}

/// The `/api/chat` body; `options` only carries what the caller set.
fn chat_body(model: &str, r: &ChatRequest) -> Value {
    let messages: Vec<Value> = r
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut options = Map::new();
    if let Some(n) = r.max_tokens.filter(|n| *n > 0) {
        options.insert("num_predict".into(), n.into());
    }
    if let Some(t) = r.temperature {
        options.insert("temperature".into(), decimal(t));
    }
    if let Some(p) = r.top_p {
        options.insert("top_p".into(), decimal(p));
    }
    if !r.stop.is_empty() {
        options.insert("stop".into(), r.stop.clone().into());
    }
    let mut body = json!({"model": model, "messages": messages, "stream": true});
    if !options.is_empty() {
        body["options"] = Value::Object(options);
    }
    if r.uses_tools() {
        add_tools(&mut body, r);
    }
    if let Some(schema) = &r.schema {
        // Ollama's structured output: `format` takes the JSON schema itself.
        body["format"] = schema.schema.clone();
    }
    body
}

/// The offered tools (`tools`; none on the last round, as Ollama has no `tool_choice`) and the tool
/// rounds so far (an assistant message with its `tool_calls`, then one `tool` message per result).
fn add_tools(body: &mut Value, r: &ChatRequest) {
    if let Some(Value::Array(messages)) = body.get_mut("messages") {
        for turn in &r.tool_turns {
            let calls: Vec<Value> = turn
                .calls
                .iter()
                .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            messages.push(json!({"role": "assistant", "content": turn.text, "tool_calls": calls}));
            for (c, out) in turn.calls.iter().zip(&turn.outputs) {
                messages.push(json!({"role": "tool", "tool_name": c.name, "content": out.content}));
            }
        }
    }
    if !r.tools.is_empty() && !r.tool_choice_none {
        let tools: Vec<Value> = r
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters}})
            })
            .collect();
        body["tools"] = Value::Array(tools);
    }
}

/// An f32 as the decimal a person wrote (0.7, not 0.699999988079071).
fn decimal(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// One NDJSON line: its deltas, and whether it is the last one (`done: true`).
fn read_line(provider: &str, v: &Value) -> Result<(Vec<Delta>, bool), LlmError> {
    let Some(obj) = v.as_object() else {
        return Err(LlmError::upstream(
            provider,
            ErrorClass::Malformed,
            "a line of the answer stream is not a JSON object",
        ));
    };
    if let Some(err) = obj.get("error").filter(|e| !e.is_null()) {
        // A mid-stream error has no HTTP status of its own (the stream began with 200).
        return Err(LlmError::upstream(
            provider,
            ErrorClass::Server,
            error_text(err),
        ));
    }
    let mut deltas = Vec::new();
    if let Some(text) = obj
        .get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        deltas.push(Delta::Text(text.to_string()));
    }
    if let Some(calls) = obj
        .get("message")
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
    {
        for (i, c) in calls.iter().enumerate() {
            let Some(name) = c.pointer("/function/name").and_then(Value::as_str) else {
                continue;
            };
            let arguments = match c.pointer("/function/arguments") {
                Some(Value::String(t)) => {
                    serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.clone()))
                }
                Some(v) => v.clone(),
                None => json!({}),
            };
            deltas.push(Delta::ToolCall(super::tools::ToolCall {
                id: format!("call_{i}"),
                name: name.to_string(),
                arguments,
            }));
        }
    }
    let done = obj.get("done").and_then(Value::as_bool).unwrap_or(false);
    if done {
        let prompt = obj.get("prompt_eval_count").and_then(Value::as_u64);
        let completion = obj.get("eval_count").and_then(Value::as_u64);
        if prompt.is_some() || completion.is_some() {
            deltas.push(Delta::Usage(Usage {
                prompt_tokens: prompt.unwrap_or(0),
                completion_tokens: completion.unwrap_or(0),
            }));
        }
        let reason = obj
            .get("done_reason")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .unwrap_or("stop");
        deltas.push(Delta::Finish(reason.to_string()));
    }
    Ok((deltas, done))
}

fn error_text(err: &Value) -> String {
    match err {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    }
}

/// Ollama's error body is `{"error": "..."}`; the class comes from the HTTP status (a missing
/// model is a 404 on `/api/chat`).
fn parse_error(status: u16, body: &str) -> Option<(ErrorClass, String)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let err = v.get("error").filter(|e| !e.is_null())?;
    Some((ErrorClass::from_status(status), error_text(err)))
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// The URL without query, fragment or trailing slash, ready for `{base}/api/...`.
fn normalized_base(mut url: reqwest::Url) -> String {
    url.set_query(None);
    url.set_fragment(None);
    url.as_str().trim_end_matches('/').to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Secret;
    use crate::llm::ClientCredentials;
    use crate::llm::ssrf::SsrfPolicy;

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
        let body = chat_body("m", &r);
        assert_eq!(body["tools"][0]["function"]["name"], "echo");
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(
            msgs[1]["tool_calls"][0]["function"]["arguments"],
            json!({"text": "hi"})
        );
        assert_eq!(
            msgs[2],
            json!({"role": "tool", "tool_name": "echo", "content": "echo: hi"})
        );
        r.tool_choice_none = true;
        assert!(chat_body("m", &r).get("tools").is_none());
        assert!(
            chat_body("m", &ChatRequest::new(vec![], "m"))
                .get("tools")
                .is_none()
        );

        let line = json!({"message": {"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": "echo", "arguments": {"text": "x"}}}]},
            "done": true, "done_reason": "stop"});
        let (deltas, done) = read_line("o", &line).unwrap();
        assert!(done);
        assert_eq!(
            deltas[0],
            Delta::ToolCall(crate::llm::tools::ToolCall {
                id: "call_0".into(),
                name: "echo".into(),
                arguments: json!({"text": "x"}),
            })
        );
    }
    use crate::llm::{ClientKey, Message, collect};
    use crate::testing::ollama::OllamaFormat;
    use crate::testing::{FakeUpstream, Reply, Step};

    fn ctx() -> ProviderContext {
        ProviderContext {
            ssrf: Arc::new(SsrfPolicy::default()),
        }
    }

    fn cfg(base_url: &str, model: Option<&str>) -> ProviderConfig {
        ProviderConfig {
            name: "local".into(),
            kind: "ollama".into(),
            base_url: Some(base_url.into()),
            model: model.map(String::from),
            ..Default::default()
        }
    }

    async fn fake(models: &[&str]) -> FakeUpstream {
        FakeUpstream::start(OllamaFormat {
            models: models.iter().map(|m| m.to_string()).collect(),
        })
        .await
        .unwrap()
    }

    fn provider(fake: &FakeUpstream) -> Arc<dyn Provider> {
        build(&cfg(&fake.base_url(), Some("llama3")), &ctx()).unwrap()
    }

    fn hi() -> ChatRequest {
        ChatRequest::new(
            vec![Message {
                role: "user".into(),
                content: "hi".into(),
            }],
            "",
        )
    }

    #[tokio::test]
    async fn a_stream_read_to_done_leaves_its_connection_for_the_next_call() {
        let fake = fake(&["llama3"]).await;
        let p = provider(&fake);
        fake.assert_two_answers_share_a_connection("/api/chat", || p.stream(&hi()))
            .await;
    }

    fn class_of(e: &LlmError) -> ErrorClass {
        e.as_upstream().map(|u| u.class).expect("an upstream error")
    }

    async fn deltas(p: &Arc<dyn Provider>, r: ChatRequest) -> Vec<Result<Delta, LlmError>> {
        p.stream(&r).collect().await
    }

    #[tokio::test]
    async fn streams_text_usage_and_finish() {
        let fake = fake(&[]).await;
        fake.push(Reply::text("hello there world"));
        let items = deltas(&provider(&fake), hi()).await;
        let items: Vec<Delta> = items.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            items,
            vec![
                Delta::Text("hello".into()),
                Delta::Text(" there".into()),
                Delta::Text(" world".into()),
                Delta::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 3
                }),
                Delta::Finish("stop".into()),
            ]
        );
    }

    #[tokio::test]
    async fn request_has_the_native_shape() {
        let fake = fake(&[]).await;
        let mut c = cfg(&format!("{}/", fake.base_url()), Some("llama3"));
        c.api_key = Some(Secret::new("proxy-key"));
        c.headers.insert("x-team".into(), "blue".into());
        let p = build(&c, &ctx()).unwrap();
        let mut r = ChatRequest::new(
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
            "mistral:7b",
        );
        r.max_tokens = Some(64);
        r.temperature = Some(0.5);
        r.top_p = Some(0.25);
        r.stop = vec!["END".into()];
        collect(p.stream(&r)).await.unwrap();
        let req = &fake.requests()[0];
        assert_eq!(req.method, ::http::Method::POST);
        assert_eq!(req.path, "/api/chat");
        assert_eq!(
            req.header("authorization").as_deref(),
            Some("Bearer proxy-key")
        );
        assert_eq!(req.header("x-team").as_deref(), Some("blue"));
        assert_eq!(
            req.json(),
            json!({
                "model": "mistral:7b",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"}
                ],
                "stream": true,
                "options": {"num_predict": 64, "temperature": 0.5, "top_p": 0.25, "stop": ["END"]}
            })
        );
        // No request model → the configured one; no options when the caller set none.
        collect(p.stream(&hi())).await.unwrap();
        let body = fake.requests()[1].json();
        assert_eq!(body["model"], "llama3");
        assert!(body.get("options").is_none());
    }

    #[tokio::test]
    async fn a_whole_json_answer_also_works() {
        // A proxy that ignores `stream: true` answers one object with `done: true`.
        let fake = fake(&[]).await;
        fake.push(Reply::Raw {
            content_type: "application/json".into(),
            body: r#"{"message":{"role":"assistant","content":"all at once"},"done":true,"done_reason":"length","prompt_eval_count":5,"eval_count":7}"#.into(),
        });
        let (text, usage) = collect(provider(&fake).stream(&hi())).await.unwrap();
        assert_eq!(text, "all at once");
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7
            })
        );
    }

    #[tokio::test]
    async fn ready_when_the_model_is_listed() {
        let fake = fake(&["llama3:latest", "qwen2:7b"]).await;
        assert_eq!(provider(&fake).check_ready().await, Ok(()));
        let exact = build(&cfg(&fake.base_url(), Some("qwen2:7b")), &ctx()).unwrap();
        assert_eq!(exact.check_ready().await, Ok(()));
        let req = &fake.requests()[0];
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("GET", "/api/tags")
        );
    }

    #[tokio::test]
    async fn not_ready_names_the_missing_model_and_the_available_ones() {
        let fake = fake(&["llama3:latest", "qwen2:7b"]).await;
        let p = build(&cfg(&fake.base_url(), None), &ctx()).unwrap();
        let err = p.check_ready().await.unwrap_err();
        assert!(err.contains("`gpt-oss:20b`"), "{err}");
        assert!(err.contains("llama3:latest, qwen2:7b"), "{err}");
        assert!(err.contains("ollama pull gpt-oss:20b"), "{err}");
        assert!(err.contains(&fake.base_url()), "{err}");
        // A tagged model does not match another tag of the same name.
        let tagged = build(&cfg(&fake.base_url(), Some("qwen2:1.5b")), &ctx()).unwrap();
        assert!(tagged.check_ready().await.is_err());
    }

    #[tokio::test]
    async fn not_ready_when_unreachable() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let p = build(&cfg(&url, None), &ctx()).unwrap();
        let err = p.check_ready().await.unwrap_err();
        assert!(err.contains("unreachable"), "{err}");
        assert!(err.contains(&url), "{err}");
    }

    #[tokio::test]
    async fn first_delta_arrives_before_the_upstream_continues() {
        let fake = fake(&[]).await;
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Text(" second".into()),
        ]));
        let mut s = provider(&fake).stream(&hi());
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            Delta::Text("first".into())
        );
        fake.release();
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            Delta::Text(" second".into())
        );
        let rest: Vec<_> = s.collect().await;
        assert!(matches!(rest.last(), Some(Ok(Delta::Finish(_)))));
    }

    #[tokio::test]
    async fn dropping_the_stream_cancels_the_upstream_request() {
        let fake = fake(&[]).await;
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Text(" never".into()),
        ]));
        let mut s = provider(&fake).stream(&hi());
        assert!(s.next().await.unwrap().is_ok());
        drop(s);
        assert!(fake.wait_cancelled(1, Duration::from_secs(10)).await);
    }

    #[tokio::test]
    async fn missing_model_is_model_not_found() {
        let fake = fake(&[]).await;
        fake.push(Reply::error(
            404,
            r#"{"error":"model \"nope\" not found, try pulling it first"}"#,
        ));
        let err = collect(provider(&fake).stream(&hi())).await.unwrap_err();
        let u = err.as_upstream().unwrap();
        assert_eq!(u.class, ErrorClass::ModelNotFound);
        assert_eq!(u.status, Some(404));
        assert!(u.message.contains("not found"), "{}", u.message);
    }

    #[tokio::test]
    async fn server_error_is_server() {
        let fake = fake(&[]).await;
        fake.push(Reply::error(500, r#"{"error":"llama runner crashed"}"#));
        let err = collect(provider(&fake).stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Server);
        assert_eq!(err.as_upstream().unwrap().message, "llama runner crashed");
    }

    #[tokio::test]
    async fn an_error_line_mid_stream_is_an_error() {
        let fake = fake(&[]).await;
        fake.push(Reply::steps(vec![
            Step::Text("partial".into()),
            Step::Raw("{\"error\":\"out of memory\"}\n".into()),
        ]));
        let items = deltas(&provider(&fake), hi()).await;
        assert_eq!(items[0].as_ref().unwrap(), &Delta::Text("partial".into()));
        let err = items[1].as_ref().unwrap_err();
        assert_eq!(class_of(err), ErrorClass::Server);
        assert_eq!(items.len(), 2);
    }

    #[tokio::test]
    async fn a_dropped_connection_is_transport() {
        let fake = fake(&[]).await;
        fake.push(Reply::steps(vec![Step::Text("partial".into()), Step::Drop]));
        let items = deltas(&provider(&fake), hi()).await;
        assert_eq!(items[0].as_ref().unwrap(), &Delta::Text("partial".into()));
        assert_eq!(
            class_of(items.last().unwrap().as_ref().unwrap_err()),
            ErrorClass::Transport
        );
    }

    #[tokio::test]
    async fn a_clean_end_without_done_is_transport() {
        let fake = fake(&[]).await;
        fake.push(Reply::Raw {
            content_type: "application/x-ndjson".into(),
            body: "{\"message\":{\"content\":\"cut\"},\"done\":false}\n".into(),
        });
        let items = deltas(&provider(&fake), hi()).await;
        assert_eq!(items[0].as_ref().unwrap(), &Delta::Text("cut".into()));
        assert_eq!(
            class_of(items[1].as_ref().unwrap_err()),
            ErrorClass::Transport
        );
    }

    #[tokio::test]
    async fn a_garbage_line_is_malformed() {
        let fake = fake(&[]).await;
        fake.push(Reply::steps(vec![
            Step::Text("ok".into()),
            Step::Raw("this is not json\n".into()),
        ]));
        let items = deltas(&provider(&fake), hi()).await;
        assert_eq!(
            class_of(items.last().unwrap().as_ref().unwrap_err()),
            ErrorClass::Malformed
        );
        fake.push(Reply::Raw {
            content_type: "application/x-ndjson".into(),
            body: "[1,2]\n".into(),
        });
        let err = collect(provider(&fake).stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Malformed);
    }

    #[tokio::test]
    async fn timeout_bounds_the_wait_for_headers() {
        // A server that accepts connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = silent.accept().await {
                held.push(sock);
            }
        });
        let mut c = cfg(&url, None);
        c.timeout = Duration::from_millis(200);
        let err = collect(build(&c, &ctx()).unwrap().stream(&hi()))
            .await
            .unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Timeout);
        holder.abort();
    }

    #[tokio::test]
    async fn forwarded_key_goes_to_the_operators_ollama() {
        let fake = fake(&[]).await;
        let mut c = cfg(&fake.base_url(), None);
        c.api_key = Some(Secret::new("operator-key"));
        let p = build(&c, &ctx()).unwrap();
        let creds = ClientCredentials {
            key: ClientKey::parse("token:caller-key"),
            config: Default::default(),
        };
        let scoped = p.with_client_credentials(&creds).await.unwrap();
        collect(scoped.stream(&hi())).await.unwrap();
        assert_eq!(
            fake.requests()[0].header("authorization").as_deref(),
            Some("Bearer caller-key")
        );
    }

    #[tokio::test]
    async fn caller_base_url_is_guarded_and_gets_no_operator_secrets() {
        let operator = fake(&[]).await;
        let callers = fake(&[]).await;
        let mut c = cfg(&operator.base_url(), None);
        c.api_key = Some(Secret::new("operator-key"));
        c.headers.insert("x-operator".into(), "secret-ish".into());
        let allow_loopback = ProviderContext {
            ssrf: Arc::new(SsrfPolicy::new(true, &["127.0.0.1".to_string()]).unwrap()),
        };
        let p = build(&c, &allow_loopback).unwrap();
        let url = vec![("base_url".to_string(), format!("{}/", callers.base_url()))];
        // Without the caller's own key the URL is refused: the operator's key never goes there.
        let keyless = ClientCredentials::from_request("", url.clone()).unwrap();
        let err = p.with_client_credentials(&keyless).await.unwrap_err();
        assert!(matches!(err, LlmError::InvalidRequest(_)), "{err:?}");
        let creds = ClientCredentials::from_request("caller-key", url).unwrap();
        let scoped = p.with_client_credentials(&creds).await.unwrap();
        let (text, _) = collect(scoped.stream(&hi())).await.unwrap();
        assert_eq!(text, "hello from the fake");
        assert!(operator.requests().is_empty());
        let req = &callers.requests()[0];
        assert_eq!(req.path, "/api/chat");
        assert_eq!(
            req.header("authorization").as_deref(),
            Some("Bearer caller-key")
        );
        assert!(req.header("x-operator").is_none());
    }

    #[tokio::test]
    async fn caller_private_http_url_is_refused_by_default() {
        let fake = fake(&[]).await;
        let p = provider(&fake);
        for url in ["http://10.0.0.1:11434", "https://127.0.0.1:11434"] {
            let creds = ClientCredentials::from_request(
                "caller-key",
                vec![("base_url".to_string(), url.into())],
            )
            .unwrap();
            let err = p.with_client_credentials(&creds).await.unwrap_err();
            assert!(matches!(err, LlmError::InvalidRequest(_)), "{url}: {err:?}");
            assert!(
                !err.to_string().contains("client_api_key"),
                "the guard refused it: {err}"
            );
        }
        assert!(fake.requests().is_empty());
    }

    #[test]
    fn bad_config_is_refused_with_the_provider_name() {
        let err = build(&cfg("ftp://x", None), &ctx()).unwrap_err();
        assert!(
            matches!(&err, LlmError::InvalidRequest(m) if m.contains("`local`")),
            "{err}"
        );
        let mut c = cfg(DEFAULT_BASE_URL, None);
        c.headers.insert("bad header".into(), "v".into());
        assert!(build(&c, &ctx()).is_err());
        let p = build(&ProviderConfig::default(), &ctx()).unwrap();
        assert_eq!(p.default_model(), DEFAULT_MODEL);
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
    fn a_schema_is_asked_for_as_the_format() {
        let mut r = hi();
        assert!(chat_body("m", &r).get("format").is_none());
        r.schema = Some(schema());
        assert_eq!(chat_body("m", &r)["format"], schema().schema);
    }

    #[test]
    fn untagged_models_match_latest() {
        assert!(model_matches("llama3", "llama3:latest"));
        assert!(model_matches("llama3:latest", "llama3:latest"));
        assert!(!model_matches("llama3", "llama3:8b"));
        assert!(!model_matches("llama", "llama3:latest"));
    }

    #[tokio::test]
    async fn discovered_models_are_the_pulled_ones() {
        let fake = fake(&["llama3:latest"]).await;
        let p = provider(&fake);
        assert_eq!(p.discover_models().await.unwrap(), ["llama3:latest"]);
        fake.set_models(&["llama3:latest", "qwen2:7b"]);
        assert_eq!(
            p.discover_models().await.unwrap(),
            ["llama3:latest", "qwen2:7b"]
        );
    }
}
