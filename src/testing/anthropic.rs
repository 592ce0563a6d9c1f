//! Fake Anthropic Messages upstream: streams when the body has `"stream": true` (SSE with
//! `message_start`, `content_block_*`, `message_delta`, `message_stop`), else answers one Message
//! JSON; plus helpers for Anthropic's error body and mid-stream `error` event.

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Response};
use serde_json::json;

use super::{Recorded, WireFormat};
use crate::llm::Usage;

/// The model name the fake reports.
pub const FAKE_MODEL: &str = "claude-fake";

/// Anthropic's wire format for [`super::FakeUpstream`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AnthropicFormat;

fn event(name: &str, data: &serde_json::Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// An Anthropic error body: `{"type":"error","error":{"type":…,"message":…}}`.
pub fn error_body(error_type: &str, message: &str) -> String {
    json!({"type": "error", "error": {"type": error_type, "message": message}}).to_string()
}

/// The same error as a mid-stream SSE `error` event (for [`super::Step::Raw`]).
pub fn error_event(error_type: &str, message: &str) -> String {
    format!(
        "event: error\ndata: {}\n\n",
        error_body(error_type, message)
    )
}

impl WireFormat for AnthropicFormat {
    fn wants_stream(&self, req: &Recorded) -> bool {
        req.json()
            .get("stream")
            .and_then(serde_json::Value::as_bool)
            == Some(true)
    }

    fn stream_content_type(&self) -> &'static str {
        "text/event-stream; charset=utf-8"
    }

    fn stream_piece(&self, text: &str, index: usize) -> Bytes {
        let mut out = String::new();
        if index == 0 {
            // The fake learns the usage only at the end, so the start reports none yet and
            // `message_delta` carries the totals (Anthropic's counts there are cumulative).
            out.push_str(&event(
                "message_start",
                &json!({"type": "message_start", "message": {
                    "id": "msg_fake", "type": "message", "role": "assistant", "model": FAKE_MODEL,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ));
            out.push_str(&event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
            ));
            out.push_str(&event("ping", &json!({"type": "ping"})));
        }
        out.push_str(&event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
        ));
        Bytes::from(out)
    }

    fn stream_end(&self, usage: Option<Usage>) -> Bytes {
        let mut delta = json!({"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": null}});
        if let Some(u) = usage {
            delta["usage"] =
                json!({"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens});
        }
        let mut out = event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        );
        out.push_str(&event("message_delta", &delta));
        out.push_str(&event("message_stop", &json!({"type": "message_stop"})));
        Bytes::from(out)
    }

    fn unary(&self, text: &str, usage: Option<Usage>) -> (&'static str, Bytes) {
        let u = usage.unwrap_or_default();
        let body = json!({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": FAKE_MODEL,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens},
        });
        ("application/json", Bytes::from(body.to_string()))
    }

    /// `GET /v1/models`: Anthropic's model list, [`super::MODEL_PAGE`] models per page
    /// (`has_more`, `last_id`; the next page from `after_id`).
    fn model_list(&self, req: &Recorded, models: &[String]) -> Option<Response<Body>> {
        if req.method != Method::GET || req.path != "/v1/models" {
            return None;
        }
        let start = req
            .query_param("after_id")
            .and_then(|after| models.iter().position(|m| *m == after))
            .map_or(0, |i| i + 1);
        let page: Vec<&String> = models.iter().skip(start).take(super::MODEL_PAGE).collect();
        let data: Vec<serde_json::Value> = page
            .iter()
            .map(|m| {
                json!({"type": "model", "id": m, "display_name": m,
                       "created_at": "2025-01-01T00:00:00Z"})
            })
            .collect();
        Some(super::json_response(&json!({
            "data": data,
            "has_more": start + page.len() < models.len(),
            "first_id": page.first(),
            "last_id": page.last(),
        })))
    }
}

/// A streamed Message that asks for one tool call (`tool_use` with id `id`), its input sent in two
/// `input_json_delta` pieces, stop reason `tool_use`.
pub fn tool_use_reply(id: &str, name: &str, input: &serde_json::Value) -> super::Reply {
    let text = input.to_string();
    let (a, b) = text.split_at(text.len() / 2);
    let body = [
        event(
            "message_start",
            &json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
                "role": "assistant", "content": [], "model": FAKE_MODEL,
                "usage": {"input_tokens": 5, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
        ),
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": a}}),
        ),
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": b}}),
        ),
        event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        event(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 7}}),
        ),
        event("message_stop", &json!({"type": "message_stop"})),
    ]
    .concat();
    super::Reply::Raw {
        content_type: "text/event-stream".into(),
        body,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::testing::{FakeUpstream, Reply};

    #[tokio::test]
    async fn streams_sse_when_asked_and_json_otherwise() {
        let fake = FakeUpstream::start(AnthropicFormat).await.unwrap();
        let client = crate::llm::http::client(&Default::default()).unwrap();
        let url = format!("{}/v1/messages", fake.base_url());

        fake.push(Reply::text("hi there"));
        let resp = client
            .post(&url)
            .json(&json!({"stream": true}))
            .send()
            .await
            .unwrap();
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let body = resp.text().await.unwrap();
        let names: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(body.contains(r#""text":" there""#));
        assert!(body.contains(r#""usage":{"input_tokens":3,"output_tokens":2}"#));

        fake.push(Reply::text("hi there"));
        let v: serde_json::Value = client
            .post(&url)
            .json(&json!({"stream": false}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["content"][0]["text"], "hi there");
        assert_eq!(v["usage"]["output_tokens"], 2);
    }

    #[test]
    fn error_shapes() {
        let v: serde_json::Value =
            serde_json::from_str(&error_body("rate_limit_error", "slow")).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["message"], "slow");
        let e = error_event("api_error", "boom");
        assert!(e.starts_with("event: error\ndata: {"));
        assert!(e.ends_with("}\n\n"));
    }
}
