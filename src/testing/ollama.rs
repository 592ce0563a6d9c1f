//! Fake Ollama upstream: `/api/chat` answers in Ollama's newline-delimited JSON (streamed unless the
//! request says `"stream": false`, as Ollama defaults to streaming), and `GET /api/tags` lists the
//! models the test configured, so readiness checks can be tested.

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Response};
use serde_json::{Value, json};

use super::{Recorded, WireFormat};
use crate::llm::Usage;

/// The model name the fake puts in its answers.
const MODEL: &str = "fake-model";
/// A fixed timestamp: answers are byte-for-byte reproducible.
const CREATED_AT: &str = "2024-01-01T00:00:00Z";

/// The Ollama wire format; `models` is what `GET /api/tags` lists.
#[derive(Debug, Clone, Default)]
pub struct OllamaFormat {
    /// Model names with their tags, e.g. `llama3:latest`.
    pub models: Vec<String>,
}

impl OllamaFormat {
    /// A fake that has these models pulled.
    pub fn with_models(models: &[&str]) -> Self {
        Self {
            models: models.iter().map(|m| m.to_string()).collect(),
        }
    }
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// The object that ends an answer: `done: true` with Ollama's token counts.
fn final_object(text: &str, usage: Option<Usage>) -> Value {
    let mut v = json!({
        "model": MODEL,
        "created_at": CREATED_AT,
        "message": {"role": "assistant", "content": text},
        "done": true,
        "done_reason": "stop",
        "total_duration": 1000,
    });
    if let Some(u) = usage {
        v["prompt_eval_count"] = u.prompt_tokens.into();
        v["eval_count"] = u.completion_tokens.into();
    }
    v
}

impl WireFormat for OllamaFormat {
    fn wants_stream(&self, req: &Recorded) -> bool {
        req.json().get("stream").and_then(Value::as_bool) != Some(false)
    }

    fn stream_content_type(&self) -> &'static str {
        "application/x-ndjson"
    }

    fn stream_piece(&self, text: &str, _index: usize) -> Bytes {
        line(&json!({
            "model": MODEL,
            "created_at": CREATED_AT,
            "message": {"role": "assistant", "content": text},
            "done": false,
        }))
    }

    fn stream_end(&self, usage: Option<Usage>) -> Bytes {
        line(&final_object("", usage))
    }

    fn unary(&self, text: &str, usage: Option<Usage>) -> (&'static str, Bytes) {
        (
            "application/json",
            Bytes::from(final_object(text, usage).to_string()),
        )
    }

    /// `GET /api/tags`: the models set on the fake, else the ones it was built with.
    fn model_list(&self, req: &Recorded, set: &[String]) -> Option<Response<Body>> {
        if req.method != Method::GET || req.path != "/api/tags" {
            return None;
        }
        let listed = match set.is_empty() {
            true => &self.models,
            false => set,
        };
        let models: Vec<Value> = listed
            .iter()
            .map(|m| {
                json!({
                    "name": m,
                    "model": m,
                    "modified_at": CREATED_AT,
                    "size": 0,
                    "digest": "",
                    "details": {"format": "gguf"},
                })
            })
            .collect();
        Some(super::json_response(&json!({ "models": models })))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::testing::{FakeUpstream, Reply};

    fn client() -> reqwest::Client {
        crate::llm::http::client(&Default::default()).unwrap()
    }

    #[tokio::test]
    async fn tags_list_the_configured_models() {
        let fake = FakeUpstream::start(OllamaFormat::with_models(&["llama3:latest", "qwen2:7b"]))
            .await
            .unwrap();
        let v: Value = client()
            .get(format!("{}/api/tags", fake.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let names: Vec<&str> = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["llama3:latest", "qwen2:7b"]);
    }

    #[tokio::test]
    async fn streams_ndjson_unless_told_not_to() {
        let fake = FakeUpstream::start(OllamaFormat::default()).await.unwrap();
        fake.push(Reply::text("a b"));
        let resp = client()
            .post(format!("{}/api/chat", fake.base_url()))
            .json(&json!({"model": "m", "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "application/x-ndjson"
        );
        let text = resp.text().await.unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["message"]["content"], "a");
        assert_eq!(lines[1]["message"]["content"], " b");
        assert_eq!(lines[2]["done"], true);
        assert_eq!(lines[2]["eval_count"], 2);

        fake.push(Reply::text("whole"));
        let v: Value = client()
            .post(format!("{}/api/chat", fake.base_url()))
            .json(&json!({"model": "m", "messages": [], "stream": false}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["message"]["content"], "whole");
        assert_eq!(v["done"], true);
    }
}
