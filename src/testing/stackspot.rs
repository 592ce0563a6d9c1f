//! Fake StackSpot upstream: the realm token endpoint (`POST …/oidc/oauth/token`, answered by the
//! format itself with numbered tokens `tok-1`, `tok-2`, … so tests can see caching and renewal),
//! and the agent chat call, streamed as SSE `data: {"message": …}` events when the request says
//! `"streaming": true`, else one JSON object.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde_json::{Value, json};

use super::{Recorded, WireFormat};
use crate::llm::Usage;

/// What the token endpoint's path ends with.
pub const TOKEN_PATH_SUFFIX: &str = "/oidc/oauth/token";
/// A token's lifetime unless a test sets another (StackSpot's: 20 minutes).
pub const DEFAULT_EXPIRES_IN: u64 = 1200;

struct TokenState {
    issued: AtomicUsize,
    expires_in: AtomicU64,
    /// 0 = issue tokens; else refuse with this status.
    refuse_with: AtomicU16,
}

/// The StackSpot wire format. Clones share the token state: keep one clone in the test to read
/// [`StackSpotFormat::issued`] after handing the other to [`super::FakeUpstream::start`].
#[derive(Clone)]
pub struct StackSpotFormat {
    state: Arc<TokenState>,
}

impl std::fmt::Debug for StackSpotFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackSpotFormat")
            .field("issued", &self.issued())
            .finish()
    }
}

impl Default for StackSpotFormat {
    fn default() -> Self {
        Self::new()
    }
}

impl StackSpotFormat {
    /// A fake issuing tokens valid for [`DEFAULT_EXPIRES_IN`] seconds.
    pub fn new() -> Self {
        Self {
            state: Arc::new(TokenState {
                issued: AtomicUsize::new(0),
                expires_in: AtomicU64::new(DEFAULT_EXPIRES_IN),
                refuse_with: AtomicU16::new(0),
            }),
        }
    }

    /// How many tokens the token endpoint has issued.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// The `expires_in` of tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::SeqCst);
    }

    /// From now on the token endpoint refuses the client credentials with this status
    /// (`invalid_client`).
    pub fn refuse_tokens(&self, status: u16) {
        self.state.refuse_with.store(status, Ordering::SeqCst);
    }

    fn token_response(&self, req: &Recorded) -> Response<Body> {
        let body = String::from_utf8_lossy(&req.body);
        let grant_ok = body
            .split('&')
            .any(|pair| pair == "grant_type=client_credentials");
        let refuse = self.state.refuse_with.load(Ordering::SeqCst);
        let (status, v) = if !grant_ok {
            (400, json!({"error": "unsupported_grant_type"}))
        } else if refuse != 0 {
            (
                refuse,
                json!({"error": "invalid_client", "error_description": "Invalid client credentials"}),
            )
        } else {
            let n = self.state.issued.fetch_add(1, Ordering::SeqCst) + 1;
            (
                200,
                json!({
                    "access_token": format!("tok-{n}"),
                    "expires_in": self.state.expires_in.load(Ordering::SeqCst),
                    "token_type": "Bearer",
                }),
            )
        };
        Response::builder()
            .status(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string()))
            .unwrap_or_default()
    }
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl WireFormat for StackSpotFormat {
    fn wants_stream(&self, req: &Recorded) -> bool {
        req.json().get("streaming").and_then(Value::as_bool) == Some(true)
    }

    fn stream_content_type(&self) -> &'static str {
        "text/event-stream"
    }

    fn stream_piece(&self, text: &str, _index: usize) -> Bytes {
        event(&json!({ "message": text }))
    }

    /// The last event carries the stop reason and the counts as `{input, output}`; the stream
    /// then ends by closing (StackSpot sends no terminator).
    fn stream_end(&self, usage: Option<Usage>) -> Bytes {
        let mut v = json!({"stop_reason": "stop", "message_id": "01FAKEMESSAGE"});
        if let Some(u) = usage {
            v["tokens"] = json!({"input": u.prompt_tokens, "output": u.completion_tokens});
        }
        event(&v)
    }

    /// A whole answer, with the counts as `{user, enrichment, output}`.
    fn unary(&self, text: &str, usage: Option<Usage>) -> (&'static str, Bytes) {
        let mut v = json!({"message": text, "stop_reason": "stop", "message_id": "01FAKEMESSAGE"});
        if let Some(u) = usage {
            v["tokens"] =
                json!({"user": u.prompt_tokens, "enrichment": 0, "output": u.completion_tokens});
        }
        ("application/json", Bytes::from(v.to_string()))
    }

    fn extra(&self, req: &Recorded) -> Option<Response<Body>> {
        (req.method == Method::POST && req.path.ends_with(TOKEN_PATH_SUFFIX))
            .then(|| self.token_response(req))
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

    async fn token(fake: &FakeUpstream) -> (u16, Value) {
        let resp = client()
            .post(format!("{}/zup{TOKEN_PATH_SUFFIX}", fake.base_url()))
            .body("grant_type=client_credentials&client_id=a&client_secret=b")
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    #[tokio::test]
    async fn tokens_are_numbered_and_counted() {
        let format = StackSpotFormat::new();
        let fake = FakeUpstream::start(format.clone()).await.unwrap();
        assert_eq!(token(&fake).await.1["access_token"], "tok-1");
        format.set_expires_in(30);
        let (_, second) = token(&fake).await;
        assert_eq!(second["access_token"], "tok-2");
        assert_eq!(second["expires_in"], 30);
        assert_eq!(format.issued(), 2);
        format.refuse_tokens(401);
        let (status, refused) = token(&fake).await;
        assert_eq!(status, 401);
        assert_eq!(refused["error"], "invalid_client");
        assert_eq!(format.issued(), 2);
    }

    #[tokio::test]
    async fn chat_streams_sse_or_answers_json() {
        let fake = FakeUpstream::start(StackSpotFormat::new()).await.unwrap();
        let url = format!("{}/v1/agent/A/chat", fake.base_url());
        fake.push(Reply::text("a b"));
        let resp = client()
            .post(&url)
            .json(&json!({"user_prompt": "hi", "streaming": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "text/event-stream"
        );
        let text = resp.text().await.unwrap();
        let events: Vec<Value> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(events[0]["message"], "a");
        assert_eq!(events[1]["message"], " b");
        assert_eq!(events[2]["stop_reason"], "stop");
        assert_eq!(events[2]["tokens"]["output"], 2);

        fake.push(Reply::text("whole"));
        let v: Value = client()
            .post(&url)
            .json(&json!({"user_prompt": "hi", "streaming": false}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["message"], "whole");
    }
}
