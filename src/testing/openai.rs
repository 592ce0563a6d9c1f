//! Fake OpenAI Chat Completions upstream: answers `POST …/chat/completions` as OpenAI does, streamed
//! (`"stream": true`: SSE `chat.completion.chunk` events, a final chunk with the finish reason, a
//! usage-only chunk as `stream_options.include_usage` asks for, then `data: [DONE]`) or whole (one
//! `chat.completion` object). [`error_body`] writes OpenAI's error shape for scripted failures.

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Response};
use serde_json::{Value, json};

use super::{Recorded, WireFormat};
use crate::llm::Usage;

/// The OpenAI wire format for [`super::FakeUpstream`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAiFormat;

const ID: &str = "chatcmpl-fake";
const MODEL: &str = "fake-model";

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// One streamed chunk; `usage: null` on every chunk but the last, as OpenAI sends with
/// `include_usage` (so clients must accept a null usage).
fn chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": ID,
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        "usage": null,
    })
}

impl WireFormat for OpenAiFormat {
    fn wants_stream(&self, req: &Recorded) -> bool {
        req.json().get("stream").and_then(Value::as_bool) == Some(true)
    }

    fn stream_content_type(&self) -> &'static str {
        "text/event-stream"
    }

    fn stream_piece(&self, text: &str, index: usize) -> Bytes {
        // OpenAI announces the role on the first chunk only.
        let delta = if index == 0 {
            json!({"role": "assistant", "content": text})
        } else {
            json!({"content": text})
        };
        event(&chunk(delta, None))
    }

    fn stream_end(&self, usage: Option<Usage>) -> Bytes {
        let mut out = event(&chunk(json!({}), Some("stop"))).to_vec();
        if let Some(u) = usage {
            let last = json!({
                "id": ID,
                "object": "chat.completion.chunk",
                "created": 0,
                "model": MODEL,
                "choices": [],
                "usage": usage_json(u),
            });
            out.extend_from_slice(&event(&last));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        Bytes::from(out)
    }

    fn unary(&self, text: &str, usage: Option<Usage>) -> (&'static str, Bytes) {
        let body = json!({
            "id": ID,
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage.map(usage_json),
        });
        ("application/json", Bytes::from(body.to_string()))
    }

    /// `GET …/models`: OpenAI's model list, `{"object":"list","data":[{"id",…}]}`.
    fn model_list(&self, req: &Recorded, models: &[String]) -> Option<Response<Body>> {
        if req.method != Method::GET || !req.path.ends_with("/models") {
            return None;
        }
        let data: Vec<Value> = models
            .iter()
            .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "fake"}))
            .collect();
        Some(super::json_response(
            &json!({"object": "list", "data": data}),
        ))
    }
}

/// An OpenAI error body `{"error":{"message","type","param","code"}}`. `type_` is either an error
/// type or one of OpenAI's error codes; known codes get the `type` OpenAI pairs them with (e.g.
/// `invalid_api_key` → type `invalid_request_error`, code `invalid_api_key`), so tests exercise
/// classification by code as real answers need.
pub fn error_body(type_: &str, message: &str) -> String {
    let (ty, code) = match type_ {
        "invalid_api_key" | "model_not_found" | "context_length_exceeded" => {
            ("invalid_request_error", Some(type_))
        }
        "rate_limit_exceeded" => ("requests", Some(type_)),
        "insufficient_quota" => ("insufficient_quota", Some(type_)),
        other => (other, None),
    };
    json!({"error": {"message": message, "type": ty, "param": null, "code": code}}).to_string()
}

/// A whole `chat.completion` whose message asks for tool calls (`(id, name, arguments)` each),
/// finish reason `tool_calls`.
pub fn tool_calls_reply(calls: &[(&str, &str, Value)]) -> super::Reply {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(id, name, args)| {
            json!({"id": id, "type": "function",
                   "function": {"name": name, "arguments": args.to_string()}})
        })
        .collect();
    let body = json!({
        "id": ID, "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "tool_calls",
                     "message": {"role": "assistant", "content": null, "tool_calls": calls}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    });
    super::Reply::Raw {
        content_type: "application/json".into(),
        body: body.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::testing::{FakeUpstream, Reply, Step};

    fn data_events(body: &str) -> Vec<String> {
        body.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn streams_chunks_then_finish_usage_and_done() {
        let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
        fake.push(Reply::steps(vec![
            Step::Text("Hel".into()),
            Step::Text("lo".into()),
        ]));
        let body = crate::llm::http::client(&Default::default())
            .unwrap()
            .post(format!("{}/v1/chat/completions", fake.base_url()))
            .json(&json!({"model": "m", "messages": [], "stream": true}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events = data_events(&body);
        assert_eq!(events.len(), 5, "{body}");
        let parsed: Vec<Value> = events[..4]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(parsed[0]["object"], "chat.completion.chunk");
        assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(parsed[0]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(parsed[1]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(parsed[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(parsed[3]["choices"], json!([]));
        assert_eq!(parsed[3]["usage"]["prompt_tokens"], 3);
        assert_eq!(parsed[3]["usage"]["completion_tokens"], 2);
        assert_eq!(events[4], "[DONE]");
    }

    #[tokio::test]
    async fn answers_whole_when_not_streaming() {
        let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
        fake.push(Reply::text("one two"));
        let v: Value = crate::llm::http::client(&Default::default())
            .unwrap()
            .post(format!("{}/v1/chat/completions", fake.base_url()))
            .json(&json!({"model": "m", "messages": []}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "one two");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["completion_tokens"], 2);
    }

    #[test]
    fn error_bodies_have_openai_shape() {
        let v: Value = serde_json::from_str(&error_body("invalid_api_key", "bad")).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["message"], "bad");
        let v: Value = serde_json::from_str(&error_body("server_error", "oops")).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["code"], Value::Null);
    }
}
