//! Fake Gemini upstream: streams (`data:` lines of `GenerateContentResponse`, CRLF-framed like
//! Google's) when the path holds `streamGenerateContent`, else answers one `generateContent`
//! JSON; plus a helper for Google's `{"error":{code,message,status}}` body.

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Response};
use serde_json::json;

use super::{Recorded, WireFormat};
use crate::llm::Usage;

/// The model version the fake reports.
pub const FAKE_MODEL: &str = "gemini-fake";

/// Gemini's wire format for [`super::FakeUpstream`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GeminiFormat;

/// A Google API error body: `{"error":{"code":…,"message":…,"status":…}}`.
pub fn error_body(code: u16, status: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message, "status": status}}).to_string()
}

fn chunk(value: &serde_json::Value) -> Bytes {
    // Google frames its SSE with CRLF; clients must accept that.
    Bytes::from(format!("data: {value}\r\n\r\n"))
}

fn usage_metadata(u: Usage) -> serde_json::Value {
    json!({
        "promptTokenCount": u.prompt_tokens,
        "candidatesTokenCount": u.completion_tokens,
        "totalTokenCount": u.prompt_tokens + u.completion_tokens,
    })
}

impl WireFormat for GeminiFormat {
    fn wants_stream(&self, req: &Recorded) -> bool {
        req.path.contains("streamGenerateContent")
    }

    fn stream_content_type(&self) -> &'static str {
        "text/event-stream"
    }

    fn stream_piece(&self, text: &str, _index: usize) -> Bytes {
        chunk(&json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}],
            "modelVersion": FAKE_MODEL,
        }))
    }

    fn stream_end(&self, usage: Option<Usage>) -> Bytes {
        // Like Google's last chunk: an empty text part, the finish reason and the totals.
        let mut last = json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
                            "finishReason": "STOP", "index": 0}],
            "modelVersion": FAKE_MODEL,
        });
        if let Some(u) = usage {
            last["usageMetadata"] = usage_metadata(u);
        }
        chunk(&last)
    }

    fn unary(&self, text: &str, usage: Option<Usage>) -> (&'static str, Bytes) {
        let mut body = json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                            "finishReason": "STOP", "index": 0}],
            "modelVersion": FAKE_MODEL,
        });
        if let Some(u) = usage {
            body["usageMetadata"] = usage_metadata(u);
        }
        ("application/json", Bytes::from(body.to_string()))
    }

    /// `GET /v1beta/models`: Google's model list, [`super::MODEL_PAGE`] models per page
    /// (`nextPageToken`, the next page from `pageToken`); names holding `embedding` support only
    /// `embedContent`, the others `generateContent`.
    fn model_list(&self, req: &Recorded, models: &[String]) -> Option<Response<Body>> {
        if req.method != Method::GET || req.path != "/v1beta/models" {
            return None;
        }
        let start: usize = req
            .query_param("pageToken")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let end = (start + super::MODEL_PAGE).min(models.len());
        let listed: Vec<serde_json::Value> = models
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let methods = match m.contains("embedding") {
                    true => json!(["embedContent"]),
                    false => json!(["generateContent", "countTokens"]),
                };
                json!({"name": format!("models/{m}"), "displayName": m,
                       "supportedGenerationMethods": methods})
            })
            .collect();
        let mut body = json!({ "models": listed });
        if end < models.len() {
            body["nextPageToken"] = json!(end.to_string());
        }
        Some(super::json_response(&body))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::testing::{FakeUpstream, Reply};

    #[tokio::test]
    async fn streams_on_the_streaming_path_and_json_otherwise() {
        let fake = FakeUpstream::start(GeminiFormat).await.unwrap();
        let client = crate::llm::http::client(&Default::default()).unwrap();
        let base = fake.base_url();

        fake.push(Reply::text("hi there"));
        let resp = client
            .post(format!(
                "{base}/v1beta/models/m:streamGenerateContent?alt=sse"
            ))
            .json(&json!({}))
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
        let chunks: Vec<serde_json::Value> = body
            .split("\r\n\r\n")
            .filter_map(|c| c.strip_prefix("data: "))
            .map(|c| serde_json::from_str(c).unwrap())
            .collect();
        assert_eq!(chunks.len(), 3);
        assert_eq!(
            chunks[1]["candidates"][0]["content"]["parts"][0]["text"],
            " there"
        );
        assert_eq!(chunks[2]["candidates"][0]["finishReason"], "STOP");
        assert_eq!(chunks[2]["usageMetadata"]["candidatesTokenCount"], 2);

        fake.push(Reply::text("hi there"));
        let v: serde_json::Value = client
            .post(format!("{base}/v1beta/models/m:generateContent"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["text"],
            "hi there"
        );
        assert_eq!(v["usageMetadata"]["promptTokenCount"], 3);
    }

    #[test]
    fn error_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&error_body(429, "RESOURCE_EXHAUSTED", "quota")).unwrap();
        assert_eq!(v["error"]["code"], 429);
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(v["error"]["message"], "quota");
    }
}
