//! The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! `model` is `provider/model` (split at the first `/`, so `openrouter/meta-llama/llama-3` works),
//! a provider name alone (its default model), a model of the default provider (which may have a
//! `/` of its own, as OpenRouter's `anthropic/claude-…`), or empty (the server's default):
//! [`crate::llm::ProviderRegistry::resolve_model_id`] has the rules. Answers name the model as
//! `provider/model` of whoever answered (the fallback chain may have moved on). `GET /v1/models`
//! lists every provider's default, configured and discovered models as `provider/model`.
//!
//! `messages`: `system` (and `developer`), `user`, `assistant`; content as a string or text parts.
//! The last message must be the user's: it is the prompt, the earlier ones the history. Sampling
//! fields are passed through; other OpenAI fields (`user`, `seed`, `tools`, …) are accepted and
//! ignored, and `n` above 1 is refused.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Api, ApiError, Caller, UsageOut};
use crate::gateway::{Error, PromptCall};
use crate::llm::fallback::Answer;
use crate::llm::json::{json_str, json_value};
use crate::llm::{Delta, Message};

/// Most stop sequences accepted.
const MAX_STOP: usize = 16;

/// A chat completion request; fields not listed are accepted and ignored, as OpenAI clients send
/// many (`user`, `seed`, `logprobs`, …).
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// `stop`: one sequence or a list (read by [`string_or_list`]).
#[derive(Debug)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_or_list(d, "a string or an array of strings", Stop::One, Stop::Many)
    }
}

/// A value that is a string or an array of `E`, read by a visitor rather than as an untagged
/// enum, which would first copy the value into serde's buffer and then try each form on it.
fn string_or_list<'de, D, E, T>(
    d: D,
    expecting: &'static str,
    one: fn(String) -> T,
    many: fn(Vec<E>) -> T,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    E: Deserialize<'de>,
{
    struct V<E, T> {
        expecting: &'static str,
        one: fn(String) -> T,
        many: fn(Vec<E>) -> T,
    }
    impl<'de, E: Deserialize<'de>, T> serde::de::Visitor<'de> for V<E, T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<Er: serde::de::Error>(self, v: &str) -> Result<T, Er> {
            Ok((self.one)(v.to_string()))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
            Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(self.many)
        }
    }
    d.deserialize_any(V {
        expecting,
        one,
        many,
    })
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's `content`: text, or a list of content parts (read by [`string_or_list`]).
#[derive(Debug)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_or_list(
            d,
            "a string or an array of content parts",
            Content::Text,
            Content::Parts,
        )
    }
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn into_text(self, index: usize) -> Result<String, Error> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => out.push_str(&t),
                        (kind, _) => {
                            return Err(Error::InvalidArgument(format!(
                                "messages[{index}]: content part type `{}` is not supported (text only)",
                                kind.chars().take(40).collect::<String>()
                            )));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The OpenAI `finish_reason` of a provider's own reason.
fn finish_reason(raw: Option<&str>) -> &'static str {
    const NAMES: [(&[&str], &str); 3] = [
        (&["length", "max_tokens", "max_output_tokens"], "length"),
        (
            &[
                "content_filter",
                "safety",
                "recitation",
                "blocklist",
                "prohibited_content",
            ],
            "content_filter",
        ),
        (&["tool_calls", "tool_use", "function_call"], "tool_calls"),
    ];
    let Some(raw) = raw.filter(|r| *r != "stop") else {
        return "stop";
    };
    NAMES
        .iter()
        .find(|(names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(raw)))
        .map_or("stop", |(_, name)| name)
}

/// Decodes the request into the core call to `provider` and `model` (what its `model` resolved
/// to): the OpenAI fields are checked here, the prompt, history and `max_tokens` by the core.
fn into_call(
    r: CompletionRequest,
    (provider, model): (String, String),
) -> Result<PromptCall, Error> {
    let invalid = |m: String| Err(Error::InvalidArgument(m));
    if r.n.is_some_and(|n| n != 1) {
        return invalid("n: only one choice per request is supported".into());
    }
    if r.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return invalid("temperature must be between 0 and 2".into());
    }
    if r.top_p.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
        return invalid("top_p must be between 0 and 1".into());
    }
    let stop = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return invalid(format!("stop: at most {MAX_STOP} sequences"));
    }
    let mut turns = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return invalid(format!(
                    "messages[{i}]: role `{}` is not supported (system, developer, user, assistant)",
                    other.chars().take(40).collect::<String>()
                ));
            }
        };
        let content = match m.content {
            Some(c) => c.into_text(i)?,
            None => String::new(),
        };
        turns.push(Message {
            role: role.to_string(),
            content,
        });
    }
    let prompt = match turns.pop() {
        Some(last) if last.role == "user" => last.content,
        Some(_) => {
            return invalid(
                "messages: the last message must be the user's (it is the prompt)".into(),
            );
        }
        None => return invalid("messages: at least one user message is required".into()),
    };
    Ok(PromptCall {
        provider,
        model,
        history: turns,
        prompt,
        max_tokens: r.max_completion_tokens.or(r.max_tokens).filter(|n| *n > 0),
        temperature: r.temperature,
        top_p: r.top_p,
        stop,
        ..Default::default()
    })
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat_completions(
    State(api): State<Arc<Api>>,
    caller: Caller,
    req: Request,
) -> Response {
    match completions(api, caller, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions(api: Arc<Api>, caller: Caller, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let req: CompletionRequest = super::json_body(&headers, body).await?;
    let stream = req.stream.unwrap_or(false);
    if stream && !super::accepts_event_stream(&headers, true) {
        return Err(super::not_acceptable());
    }
    let include_usage = req
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let prepared = caller.prepared.clone();
    let target = prepared
        .registry
        .resolve_model_id(req.model.as_deref().unwrap_or(""))
        .await;
    let mut call = into_call(req, target)?;
    call.unary = !stream;
    let slot = match stream {
        true => api.stream_slot(&prepared, &caller.limit_key)?,
        false => None,
    };
    let busy = api.busy();
    let answer = api
        .core(&prepared)
        .prompt_via(crate::gateway::PromptRoute::OpenAi, call)
        .await?;
    caller.notes.answered_by(&answer.provider, &answer.model);
    let id = completion_id();
    let created = super::unix_now();
    if !stream {
        return whole(answer, id, created).await;
    }
    let Answer {
        provider,
        model,
        stream: mut upstream,
        ..
    } = answer;
    let model_id = model_id(&provider, &model);
    let frames = ChunkFrames::new(&id, created, &model_id, include_usage);
    let notes = caller.notes.clone();
    // One event per delta as the provider yields it; dropping this stream (the client went away)
    // drops the provider's, which aborts the upstream request.
    let out = async_stream::stream! {
        let _slot = slot;
        let _busy = busy;
        let mut first = true;
        let mut finish = None;
        let mut usage = None;
        while let Some(item) = upstream.next().await {
            match item {
                Ok(Delta::Text(t)) if t.is_empty() => {}
                Ok(Delta::Text(t)) => {
                    let delta = DeltaOut { role: first.then_some("assistant"), content: Some(&t) };
                    first = false;
                    yield frames.chunk(delta, None);
                }
                Ok(Delta::Usage(u)) => usage = Some(u),
                Ok(Delta::Finish(r)) => finish = Some(r),
                // The OpenAI routes offer no server tools.
                Ok(Delta::ToolCall(_) | Delta::Tool(_)) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "stream failed after its first delta");
                    notes.failed(&e.to_string());
                    let body = ApiError::from(Error::from(e)).openai_body();
                    yield super::sse_json(&body);
                    return;
                }
            }
        }
        if first {
            yield frames.chunk(DeltaOut { role: Some("assistant"), content: Some("") }, None);
        }
        yield frames.chunk(DeltaOut::default(), Some(finish_reason(finish.as_deref())));
        if include_usage {
            yield frames.usage(usage.map(UsageOut::from));
        }
        yield bytes::Bytes::from_static(b"data: [DONE]\n\n");
    };
    Ok(super::sse_frames(out))
}

/// The `model` an answer names: `provider/model`.
fn model_id(provider: &str, model: &str) -> String {
    [provider, "/", model].concat()
}

/// `chatcmpl-` and a fresh UUID's 32 hex digits.
fn completion_id() -> String {
    let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
    [
        "chatcmpl-",
        uuid::Uuid::new_v4().simple().encode_lower(&mut buf),
    ]
    .concat()
}

/// A non-streamed answer: the whole text as one `chat.completion`.
async fn whole(answer: Answer, id: String, created: u64) -> Result<Response, ApiError> {
    let Answer {
        provider,
        model,
        stream: mut upstream,
        ..
    } = answer;
    let mut text = String::new();
    let mut usage = None;
    let mut finish = None;
    while let Some(item) = upstream.next().await {
        match item {
            // A whole answer is usually one delta: its text is taken as it is.
            Ok(Delta::Text(t)) if text.is_empty() => text = t,
            Ok(Delta::Text(t)) => text.push_str(&t),
            Ok(Delta::Usage(u)) => usage = Some(u),
            Ok(Delta::Finish(r)) => finish = Some(r),
            Ok(Delta::ToolCall(_) | Delta::Tool(_)) => {}
            Err(e) => return Err(Error::from(e).into()),
        }
    }
    let completion = Completion {
        id: &id,
        object: "chat.completion",
        created,
        model: &model_id(&provider, &model),
        system_fingerprint: None,
        choices: [WholeChoice {
            index: 0,
            message: AnswerMessage {
                role: "assistant",
                content: &text,
                refusal: None,
            },
            logprobs: None,
            finish_reason: finish_reason(finish.as_deref()),
        }],
        usage: usage.map(UsageOut::from),
    };
    Ok(super::json_bytes_response(completion.to_json()))
}

/// A `chat.completion`, serialized straight from the collected answer (no JSON tree).
#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<&'static str>,
    choices: [WholeChoice<'a>; 1],
    usage: Option<UsageOut>,
}

impl Completion<'_> {
    /// The JSON that serializing it writes (a unit test holds them equal), with only the values
    /// escaped: the keys and the fixed values are written as they are.
    fn to_json(&self) -> Vec<u8> {
        let [choice] = &self.choices;
        let text = choice.message.content.len();
        let mut buf = Vec::with_capacity(text + text / 8 + 384);
        buf.extend_from_slice(b"{\"id\":");
        json_str(&mut buf, self.id);
        buf.extend_from_slice(b",\"object\":");
        json_str(&mut buf, self.object);
        buf.extend_from_slice(b",\"created\":");
        json_value(&mut buf, &self.created);
        buf.extend_from_slice(b",\"model\":");
        json_str(&mut buf, self.model);
        buf.extend_from_slice(b",\"system_fingerprint\":");
        json_value(&mut buf, &self.system_fingerprint);
        buf.extend_from_slice(b",\"choices\":[{\"index\":");
        json_value(&mut buf, &choice.index);
        buf.extend_from_slice(b",\"message\":{\"role\":");
        json_str(&mut buf, choice.message.role);
        buf.extend_from_slice(b",\"content\":");
        json_str(&mut buf, choice.message.content);
        buf.extend_from_slice(b",\"refusal\":");
        json_value(&mut buf, &choice.message.refusal);
        buf.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":");
        json_str(&mut buf, choice.finish_reason);
        buf.extend_from_slice(b"}],\"usage\":");
        json_value(&mut buf, &self.usage);
        buf.push(b'}');
        buf
    }
}

#[derive(Serialize)]
struct WholeChoice<'a> {
    index: u32,
    message: AnswerMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AnswerMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<&'static str>,
}

/// The `chat.completion.chunk` events of one streamed answer. All chunks share everything but the
/// delta and the finish reason, so that part is rendered once and each chunk copies it and writes
/// only what differs (the text escaped as serde_json escapes it): the same bytes as serializing a
/// [`ChunkOut`] (a unit test holds them equal), at a fraction of the cost per delta.
struct ChunkFrames {
    /// `data: {"id":…,"object":…,"created":…,"model":…,"system_fingerprint":null,"choices":[{"index":0,"delta":`
    head: Vec<u8>,
    /// What closes a chunk after its finish reason: `}]` and `,"usage":null` when the caller asked
    /// for usage, then `}` and the blank line.
    tail: &'static [u8],
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChunkFrames {
    fn new(id: &str, created: u64, model: &str, include_usage: bool) -> Self {
        // Written by hand, not through serde: the head is built after the first delta arrived
        // and before it goes out, so its cost is on every stream's time to first token.
        let mut head = Vec::with_capacity(160 + id.len() + model.len());
        head.extend_from_slice(b"data: {\"id\":");
        json_str(&mut head, id);
        head.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        head.extend_from_slice(created.to_string().as_bytes());
        head.extend_from_slice(b",\"model\":");
        json_str(&mut head, model);
        head.extend_from_slice(
            b",\"system_fingerprint\":null,\"choices\":[{\"index\":0,\"delta\":",
        );
        Self {
            head,
            tail: match include_usage {
                true => b"}],\"usage\":null}\n\n",
                false => b"}]}\n\n",
            },
            id: id.to_string(),
            created,
            model: model.to_string(),
            include_usage,
        }
    }

    /// A chunk with `delta` and, on the last one, the finish reason.
    fn chunk(&self, delta: DeltaOut<'_>, finish: Option<&str>) -> bytes::Bytes {
        let text = delta.content.map_or(0, str::len);
        let mut buf = Vec::with_capacity(self.head.len() + text + text / 8 + 96);
        buf.extend_from_slice(&self.head);
        buf.push(b'{');
        if let Some(role) = delta.role {
            buf.extend_from_slice(b"\"role\":");
            json_str(&mut buf, role);
            if delta.content.is_some() {
                buf.push(b',');
            }
        }
        if let Some(content) = delta.content {
            buf.extend_from_slice(b"\"content\":");
            json_str(&mut buf, content);
        }
        buf.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":");
        match finish {
            Some(f) => json_str(&mut buf, f),
            None => buf.extend_from_slice(b"null"),
        }
        buf.extend_from_slice(self.tail);
        bytes::Bytes::from(buf)
    }

    /// The last chunk of `include_usage`: no choices, and the usage (`null` when the upstream sent
    /// none).
    fn usage(&self, usage: Option<UsageOut>) -> bytes::Bytes {
        super::sse_json(&ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            system_fingerprint: None,
            choices: &[],
            usage: Some(usage).filter(|_| self.include_usage),
        })
    }
}

/// A `chat.completion.chunk`.
#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<&'static str>,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageOut>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: DeltaOut<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

/// A chunk's `delta`: the role on the first, the text on each (both absent on the last).
#[derive(Serialize, Default)]
struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// `GET /v1/models`: every provider's models as `provider/model`: its default model, its
/// configured `models` and, with `discover_models`, what its upstream lists (fetched for the
/// first listing after a start or reload, refreshed once stale).
pub(super) async fn models(State(api): State<Arc<Api>>, caller: Caller) -> Response {
    let reg = &caller.prepared.registry;
    reg.refresh_models().await;
    let created = super::unix_now().saturating_sub(api.state.started.elapsed().as_secs());
    let data: Vec<serde_json::Value> = reg
        .offered_models()
        .into_iter()
        .map(|(provider, m)| {
            json!({
                "id": model_id(&provider, &m),
                "object": "model",
                "created": created,
                "owned_by": provider,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::{LlmConfig, ProviderConfig};
    use crate::llm::ProviderRegistry;

    fn registry() -> ProviderRegistry {
        let llm = LlmConfig {
            providers: ["echo", "other"]
                .iter()
                .map(|n| ProviderConfig {
                    name: n.to_string(),
                    kind: "echo".into(),
                    model: Some(format!("{n}-model")),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        ProviderRegistry::build(&llm, &Default::default()).unwrap()
    }

    #[tokio::test]
    async fn model_names_resolve_to_provider_and_model() {
        let r = registry();
        let cases = [
            ("", ("", "")),
            ("other", ("other", "")),
            ("OTHER/m1", ("other", "m1")),
            ("echo/a/b", ("echo", "a/b")),
            ("gpt-x", ("", "gpt-x")),
            ("echo-model", ("", "echo-model")),
            // No provider is named `vendor`: the whole id is a model of the default provider.
            ("vendor/m", ("", "vendor/m")),
        ];
        for (id, (p, m)) in cases {
            assert_eq!(
                r.resolve_model_id(id).await,
                (p.to_string(), m.to_string()),
                "{id}"
            );
        }
    }

    /// The chunk as serializing a whole [`ChunkOut`] writes it: the reference for [`ChunkFrames`].
    fn serialized(
        frames: &ChunkFrames,
        delta: DeltaOut<'_>,
        finish: Option<&str>,
        usage_chunk: Option<Option<UsageOut>>,
    ) -> bytes::Bytes {
        let choice = [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        }];
        super::super::sse_json(&ChunkOut {
            id: &frames.id,
            object: "chat.completion.chunk",
            created: frames.created,
            model: &frames.model,
            system_fingerprint: None,
            choices: if usage_chunk.is_some() { &[] } else { &choice },
            usage: usage_chunk.or(frames.include_usage.then_some(None)),
        })
    }

    #[test]
    fn pre_rendered_chunks_are_the_bytes_a_serialized_chunk_would_be() {
        let texts = [
            "",
            "plain",
            "quote \" backslash \\ newline \n tab \t",
            "control \u{1} \u{1f} del \u{7f}",
            "unicode é ✓ 𝄞 \u{2028}",
            "</script>",
        ];
        for include_usage in [false, true] {
            let frames =
                ChunkFrames::new("chatcmpl-\"odd\"", 1_795_000_000, "p/m\\x", include_usage);
            for t in texts {
                for role in [None, Some("assistant")] {
                    let delta = || DeltaOut {
                        role,
                        content: Some(t),
                    };
                    assert_eq!(
                        frames.chunk(delta(), None),
                        serialized(&frames, delta(), None, None),
                        "{t:?} {role:?} {include_usage}"
                    );
                }
            }
            for finish in ["stop", "length", "a\"b"] {
                assert_eq!(
                    frames.chunk(DeltaOut::default(), Some(finish)),
                    serialized(&frames, DeltaOut::default(), Some(finish), None)
                );
            }
            let role_only = || DeltaOut {
                role: Some("assistant"),
                content: None,
            };
            assert_eq!(
                frames.chunk(role_only(), None),
                serialized(&frames, role_only(), None, None)
            );
            if include_usage {
                for usage in [
                    None,
                    Some(crate::llm::Usage {
                        prompt_tokens: 3,
                        completion_tokens: 4,
                    }),
                ] {
                    assert_eq!(
                        frames.usage(usage.map(UsageOut::from)),
                        serialized(
                            &frames,
                            DeltaOut::default(),
                            None,
                            Some(usage.map(UsageOut::from))
                        )
                    );
                }
            }
        }
    }

    #[test]
    fn a_written_completion_is_the_bytes_serializing_it_would_be() {
        let texts = [
            "",
            "plain",
            "quote \" backslash \\ newline \n",
            "\u{1} é 𝄞 \u{2028}",
        ];
        let usages = [
            None,
            Some(crate::llm::Usage {
                prompt_tokens: 8,
                completion_tokens: 4,
            }),
        ];
        for text in texts {
            for usage in usages {
                for finish in ["stop", "length"] {
                    let c = Completion {
                        id: "chatcmpl-\"x\"",
                        object: "chat.completion",
                        created: 1_795_000_000,
                        model: "p/m\\1",
                        system_fingerprint: None,
                        choices: [WholeChoice {
                            index: 0,
                            message: AnswerMessage {
                                role: "assistant",
                                content: text,
                                refusal: None,
                            },
                            logprobs: None,
                            finish_reason: finish,
                        }],
                        usage: usage.map(UsageOut::from),
                    };
                    assert_eq!(
                        String::from_utf8(c.to_json()).unwrap(),
                        serde_json::to_string(&c).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn content_and_stop_read_in_either_form_and_refuse_others() {
        let read = |v: serde_json::Value| serde_json::from_value::<CompletionRequest>(v);
        let r = read(json!({
            "messages": [
                {"role": "user", "content": "plain"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null},
                {"role": "assistant"}
            ],
            "stop": "END"
        }))
        .unwrap();
        let texts: Vec<Option<String>> = r
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.content.map(|c| c.into_text(i).unwrap()))
            .collect();
        assert_eq!(texts, [Some("plain".into()), Some("ab".into()), None, None]);
        assert!(matches!(r.stop, Some(Stop::One(s)) if s == "END"));
        let r = read(json!({"messages": [], "stop": ["a", "b"]})).unwrap();
        assert!(matches!(r.stop, Some(Stop::Many(v)) if v == ["a", "b"]));

        let e = read(json!({"messages": [{"role": "user", "content": 7}]})).unwrap_err();
        assert!(
            e.to_string()
                .contains("a string or an array of content parts"),
            "{e}"
        );
        let e =
            read(json!({"messages": [{"role": "user", "content": {"text": "x"}}]})).unwrap_err();
        assert!(
            e.to_string()
                .contains("a string or an array of content parts"),
            "{e}"
        );
        let e = read(json!({"messages": [{"role": "user", "content": [7]}]})).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = read(json!({"messages": [], "stop": 1})).unwrap_err();
        assert!(
            e.to_string().contains("a string or an array of strings"),
            "{e}"
        );
        let e = read(json!({"messages": [], "stop": [1]})).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
    }

    #[test]
    fn finish_reasons_use_openai_names() {
        assert_eq!(finish_reason(Some("end_turn")), "stop");
        assert_eq!(finish_reason(Some("MAX_TOKENS")), "length");
        assert_eq!(finish_reason(Some("SAFETY")), "content_filter");
        assert_eq!(finish_reason(Some("tool_use")), "tool_calls");
        assert_eq!(finish_reason(None), "stop");
        assert_eq!(finish_reason(Some("stop")), "stop");
        assert_eq!(finish_reason(Some("Length")), "length");
        assert_eq!(finish_reason(Some("recitation")), "content_filter");
        assert_eq!(finish_reason(Some("Function_Call")), "tool_calls");
        assert_eq!(finish_reason(Some("length_")), "stop");
    }
}
