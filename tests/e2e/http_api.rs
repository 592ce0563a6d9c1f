//! The HTTP APIs on the main port against fake upstreams: the OpenAI-compatible API (also through
//! the real `openai` Python SDK against the binary), the prompt/SSE API (`/request`, `/updates`),
//! `/status`, streaming that is real (first delta before the upstream finishes) and cancels the
//! upstream when the client goes away, error statuses and bodies, bad input, and HTTP metrics.

use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use chatcli::auth::Role;
use chatcli::config::{Config, NamedToken, Secret};
use chatcli::testing::openai::error_body;
use chatcli::testing::{FakeUpstream, Reply, Step};
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::{
    BinaryServer, HANG_GUARD, TestServer, echo_config, http_client, metrics_with_lines,
    openai_fake, openai_provider, python_interpreter,
};

/// How long a test waits for an event that must already be on its way.
const FIRST_EVENT: Duration = Duration::from_secs(10);

/// One `openai` provider `primary` (model `gpt-test`) at `fake`, no retries.
fn primary_config(fake: &FakeUpstream) -> Config {
    let mut config = Config::default();
    config.llm.providers = vec![openai_provider("primary", fake, "gpt-test")];
    config.llm.fallback_max_retries = 0;
    config
}

fn steps(parts: &[Step]) -> Reply {
    Reply::steps(parts.to_vec())
}

fn text(s: &str) -> Step {
    Step::Text(s.into())
}

/// Reads server-sent events from a response, one event (its `data` lines) at a time.
struct SseReader {
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: String,
}

impl SseReader {
    fn new(resp: reqwest::Response) -> Self {
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream"),
            "{resp:?}"
        );
        assert_eq!(
            resp.headers()
                .get("cache-control")
                .and_then(|v| v.to_str().ok()),
            Some("no-cache")
        );
        assert!(
            resp.headers().get("content-encoding").is_none(),
            "SSE must not be compressed"
        );
        Self {
            stream: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    /// The data of the next event (comment-only blocks skipped); `None` at the end of the stream.
    async fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            let chunk = tokio::time::timeout(FIRST_EVENT, self.stream.next())
                .await
                .expect("no event within the bound");
            match chunk {
                Some(Ok(b)) => self.buf.push_str(std::str::from_utf8(&b).unwrap()),
                Some(Err(e)) => panic!("stream failed: {e}"),
                None => {
                    assert!(self.buf.trim().is_empty(), "trailing bytes: {:?}", self.buf);
                    return None;
                }
            }
        }
    }

    async fn next_json(&mut self) -> Value {
        let data = self.next_data().await.expect("the stream ended early");
        serde_json::from_str(&data).unwrap_or_else(|e| panic!("not JSON ({e}): {data}"))
    }

    /// Every remaining event, until the stream ends.
    async fn rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data().await {
            out.push(d);
        }
        out
    }
}

/// The chat requests the fake received, as JSON.
fn upstream_bodies(fake: &FakeUpstream) -> Vec<Value> {
    fake.requests().iter().map(|r| r.json()).collect()
}

async fn post(url: &str, body: Value) -> reqwest::Response {
    http_client().post(url).json(&body).send().await.unwrap()
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn named_token(name: &str, role: Role) -> NamedToken {
    NamedToken {
        name: name.into(),
        role,
        sha256: Some(sha256_hex(&format!("{name}-token"))),
        ..NamedToken::default()
    }
}

fn bearer(name: &str) -> String {
    format!("Bearer {name}-token")
}

#[tokio::test]
async fn openai_python_sdk_talks_to_the_binary() {
    let python = python_interpreter();
    let fake = openai_fake().await;
    fake.push(Reply::text("Hello from the fake"));
    fake.push(steps(&[
        text("Hel"),
        Step::AwaitRelease,
        text("lo"),
        text(" there"),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[auth]
token = "peer-token"

[llm]
default = "fake"
fallback_max_retries = 0

[[llm.providers]]
name = "fake"
kind = "openai"
base_url = "{}/v1"
api_key = "sk-test"
model = "gpt-fake"
"#,
            fake.base_url()
        ),
    )
    .unwrap();
    let server = BinaryServer::start(&config, &[]);
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_peer.py");
    let home = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(&python)
        .arg(&peer)
        .arg(format!("http://{}/v1", server.addr))
        .arg("peer-token")
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let first = tokio::time::timeout(Duration::from_secs(120), stdout.next_line())
        .await
        .expect("the peer printed nothing within 120s")
        .unwrap();
    let Some(first) = first else {
        let mut err = String::new();
        stderr.read_to_string(&mut err).await.unwrap();
        panic!(
            "the peer ended before FIRST:\n{err}\n--- server\n{}",
            server.stderr()
        );
    };
    // The upstream still holds the rest of the answer: the chunk came through before it finished.
    assert_eq!(first, "FIRST Hel");
    fake.release();
    stdin.write_all(b"go\n").await.unwrap();
    drop(stdin);
    let mut rest = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(120), stdout.next_line())
        .await
        .expect("the peer stalled")
        .unwrap()
    {
        rest.push(line);
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the peer did not exit")
        .unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).await.unwrap();
    assert!(
        status.success() && rest.iter().any(|l| l == "peer: OK"),
        "python peer failed ({status}):\n--- stdout\n{}\n--- stderr\n{err}\n--- server stderr\n{}",
        rest.join("\n"),
        server.stderr()
    );
    let bodies = upstream_bodies(&fake);
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(
        bodies[0]["messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello"}])
    );
}

#[tokio::test]
async fn chat_completions_pass_history_and_sampling_and_answer_in_openai_shape() {
    let fake = openai_fake().await;
    fake.push(Reply::text("one two three"));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let resp = post(
        &s.url("/v1/chat/completions"),
        json!({
            "model": "primary/gpt-x",
            "messages": [
                {"role": "system", "content": "be terse"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "reply"},
                {"role": "user", "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond"}]},
            ],
            "max_tokens": 50,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": ["END"],
            "user": "someone",
            "seed": 1,
        }),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["model"], "primary/gpt-x");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "one two three");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );
    let up = &upstream_bodies(&fake)[0];
    assert_eq!(up["model"], "gpt-x");
    // A non-streamed call asks the upstream for the whole answer too.
    assert_eq!(up["stream"], false);
    assert_eq!(
        up["messages"],
        json!([
            {"role": "system", "content": "be terse"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "second"},
        ])
    );
    assert_eq!(up["max_completion_tokens"], 50);
    assert_eq!(up["temperature"], 0.5);
    assert_eq!(up["top_p"], 0.9);
    assert_eq!(up["stop"], json!(["END"]));

    // A provider name alone, and a bare model of the default provider.
    for (model, want_model, want_upstream) in [
        ("primary", "primary/gpt-test", "gpt-test"),
        ("gpt-bare", "primary/gpt-bare", "gpt-bare"),
    ] {
        let v: Value = post(
            &s.url("/v1/chat/completions"),
            json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(v["model"], want_model, "{v}");
        assert_eq!(
            upstream_bodies(&fake).last().unwrap()["model"],
            want_upstream
        );
    }
    s.shutdown().await;
}

#[tokio::test]
async fn chat_completions_stream_chunks_as_they_arrive() {
    let fake = openai_fake().await;
    fake.push(steps(&[text("Hel"), Step::AwaitRelease, text("lo")]));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let resp = post(
        &s.url("/v1/chat/completions"),
        json!({
            "model": "primary",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut sse = SseReader::new(resp);
    let first = sse.next_json().await;
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["model"], "primary/gpt-test");
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": "Hel"})
    );
    assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
    // The upstream is still waiting: the chunk was not buffered until the end.
    fake.release();
    let rest = sse.rest().await;
    assert_eq!(rest.len(), 4, "{rest:?}");
    let second: Value = serde_json::from_str(&rest[0]).unwrap();
    assert_eq!(second["choices"][0]["delta"], json!({"content": "lo"}));
    assert_eq!(second["id"], first["id"]);
    let last: Value = serde_json::from_str(&rest[1]).unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    let usage: Value = serde_json::from_str(&rest[2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 3);
    assert_eq!(rest[3], "[DONE]");
    s.shutdown().await;
}

#[tokio::test]
async fn request_streams_deltas_as_they_arrive_then_complete_and_done() {
    let fake = openai_fake().await;
    fake.push(steps(&[
        text("Hel"),
        Step::AwaitRelease,
        text("lo"),
        text(" you"),
    ]));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let resp = http_client()
        .post(s.url("/request"))
        .header("accept", "text/event-stream")
        .json(&json!({"prompt": "greet me", "stream": true, "max_tokens": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut sse = SseReader::new(resp);
    assert_eq!(
        sse.next_json().await,
        json!({"type": "delta", "data": {"delta": "Hel"}})
    );
    // Read before the upstream was let go: the delta was not held back.
    fake.release();
    let rest: Vec<Value> = sse
        .rest()
        .await
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(
        rest,
        vec![
            json!({"type": "delta", "data": {"delta": "lo"}}),
            json!({"type": "delta", "data": {"delta": " you"}}),
            json!({"type": "response_complete", "data": {
                "provider": "primary",
                "model": "gpt-test",
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }}),
            json!({"done": true}),
        ]
    );
    let up = &upstream_bodies(&fake)[0];
    assert_eq!(up["stream"], true);
    assert_eq!(up["max_completion_tokens"], 20);
    assert_eq!(
        up["messages"],
        json!([{"role": "user", "content": "greet me"}])
    );
    s.shutdown().await;
}

#[tokio::test]
async fn request_without_stream_answers_one_json_object() {
    let fake = openai_fake().await;
    fake.push(Reply::text("plain answer"));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let resp = post(
        &s.url("/request"),
        json!({"prompt": "hi", "provider": "primary", "model": "gpt-other"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({
            "success": true,
            "response": "plain answer",
            "provider": "primary",
            "model": "gpt-other",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })
    );
    assert_eq!(upstream_bodies(&fake)[0]["model"], "gpt-other");
    assert_eq!(upstream_bodies(&fake)[0]["stream"], false);
    s.shutdown().await;
}

#[tokio::test]
async fn a_session_continues_across_two_requests() {
    let fake = openai_fake().await;
    fake.push(Reply::text("first answer"));
    fake.push(steps(&[text("second"), text(" answer")]));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let v: Value = post(
        &s.url("/request"),
        json!({"prompt": "first question", "session": "chat1"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["response"], "first answer", "{v}");
    let resp = post(
        &s.url("/request"),
        json!({"prompt": "second question", "session": "chat1", "stream": true}),
    )
    .await;
    let events = SseReader::new(resp).rest().await;
    assert_eq!(events.last().map(String::as_str), Some(r#"{"done":true}"#));
    assert!(
        events
            .iter()
            .any(|e| e.contains(r#""type":"response_complete""#)),
        "{events:?}"
    );
    let bodies = upstream_bodies(&fake);
    assert_eq!(
        bodies[1]["messages"],
        json!([
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
        ])
    );
    // No auth: the caller is the default principal, whose sessions sit in the sessions root.
    let file = s.data_dir.join("sessions/chat1.json");
    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let turns: Vec<(String, String)> = saved["chat_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("user", "first question"),
        ("assistant", "first answer"),
        ("user", "second question"),
        ("assistant", "second answer"),
    ]
    .iter()
    .map(|(r, c)| (r.to_string(), c.to_string()))
    .collect();
    assert_eq!(turns, want);
    s.shutdown().await;
}

/// Opens `/updates` as `who` and returns the reader after its `subscribed` event.
async fn subscribe(s: &TestServer, who: &str) -> SseReader {
    let resp = http_client()
        .get(s.url("/updates"))
        .header("authorization", bearer(who))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{who}");
    let mut sse = SseReader::new(resp);
    let hello = sse.next_json().await;
    assert_eq!(hello["type"], "subscribed", "{hello}");
    sse
}

#[tokio::test]
async fn updates_carry_a_callers_events_to_it_and_admins_only() {
    let mut config = echo_config();
    config.auth.tokens = vec![
        named_token("alice", Role::User),
        named_token("bob", Role::User),
        named_token("root", Role::Admin),
        named_token("viewer", Role::ReadOnly),
    ];
    let s = TestServer::start_with(config).await;
    let mut alice_updates = subscribe(&s, "alice").await;
    let mut bob_updates = subscribe(&s, "bob").await;
    let mut admin_updates = subscribe(&s, "root").await;

    let resp = http_client()
        .post(s.url("/request"))
        .header("authorization", bearer("alice"))
        .header("x-request-id", "alice-1")
        .json(&json!({"prompt": "alpha beta", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let own = SseReader::new(resp).rest().await;
    assert_eq!(own.len(), 4, "{own:?}");

    for updates in [&mut alice_updates, &mut admin_updates] {
        let got = [
            updates.next_json().await,
            updates.next_json().await,
            updates.next_json().await,
        ];
        for e in &got {
            assert_eq!(
                (&e["request_id"], &e["principal"]),
                (&json!("alice-1"), &json!("alice")),
                "{e}"
            );
        }
        assert_eq!(got[0]["type"], "delta");
        assert_eq!(got[0]["data"]["delta"], "alpha");
        assert_eq!(got[1]["data"]["delta"], " beta");
        assert_eq!(got[2]["type"], "response_complete");
        assert_eq!(got[2]["data"]["provider"], "echo");
    }

    // Bob's own call comes after Alice's: if her events had reached him, they would come first.
    let v: Value = http_client()
        .post(s.url("/request"))
        .header("authorization", bearer("bob"))
        .header("x-request-id", "bob-1")
        .json(&json!({"prompt": "bob only"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["response"], "bob only");
    let first = bob_updates.next_json().await;
    assert_eq!(
        (&first["request_id"], &first["type"]),
        (&json!("bob-1"), &json!("delta")),
        "{first}"
    );
    let next = admin_updates.next_json().await;
    assert_eq!(next["request_id"], "bob-1", "admins see everyone: {next}");

    // A readonly principal may prompt, but not write a session; nothing is called for it.
    let resp = http_client()
        .post(s.url("/request"))
        .header("authorization", bearer("viewer"))
        .json(&json!({"prompt": "remember this", "session": "notes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["success"], false);
    assert_eq!(v["code"], "permission_denied");
    let v: Value = http_client()
        .post(s.url("/request"))
        .header("authorization", bearer("viewer"))
        .json(&json!({"prompt": "just asking"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["response"], "just asking");

    let status: Value = http_client()
        .get(s.url("/status"))
        .header("authorization", bearer("bob"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["caller"],
        json!({"id": "bob", "role": "user", "method": "token"})
    );
    assert_eq!(status["update_subscribers"], 3);
    drop((alice_updates, bob_updates, admin_updates));
    s.shutdown().await;
}

#[tokio::test]
async fn disconnecting_mid_stream_cancels_the_upstream_call() {
    let fake = openai_fake().await;
    for _ in 0..2 {
        fake.push(steps(&[text("first"), Step::AwaitRelease, text("never")]));
    }
    let s = TestServer::start_with(primary_config(&fake)).await;
    let calls = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
        ),
        ("/request", json!({"prompt": "hi", "stream": true})),
    ];
    for (n, (path, body)) in calls.into_iter().enumerate() {
        let mut sse = SseReader::new(post(&s.url(path), body).await);
        let first = sse.next_data().await.unwrap();
        assert!(first.contains("first"), "{path}: {first}");
        drop(sse);
        assert!(
            fake.wait_cancelled(n + 1, Duration::from_secs(10)).await,
            "{path}: the upstream call was not aborted when the client went away"
        );
    }
    s.shutdown().await;
}

#[tokio::test]
async fn status_shows_a_cooling_provider_and_models_lists_every_provider() {
    let primary = openai_fake().await;
    let secondary = openai_fake().await;
    primary.push(Reply::error(
        401,
        &error_body("invalid_api_key", "Incorrect API key provided"),
    ));
    secondary.push(Reply::text("from the secondary"));
    secondary.push(steps(&[text("held"), Step::AwaitRelease, text(" open")]));
    let mut config = Config::default();
    config.llm.providers = vec![
        openai_provider("primary", &primary, "gpt-test"),
        openai_provider("secondary", &secondary, "gpt-secondary"),
    ];
    config.llm.fallback = vec!["primary".into(), "secondary".into()];
    config.llm.fallback_max_retries = 0;
    let s = TestServer::start_with(config).await;
    let v: Value = post(
        &s.url("/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["model"], "secondary/gpt-secondary", "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "from the secondary");

    // A stream held open by the upstream is a request in flight.
    let mut held = SseReader::new(
        post(
            &s.url("/request"),
            json!({"prompt": "hold", "stream": true}),
        )
        .await,
    );
    assert_eq!(held.next_json().await["data"]["delta"], "held");

    let resp = http_client().get(s.url("/status")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let st: Value = resp.json().await.unwrap();
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert!(st["uptime_seconds"].is_u64(), "{st}");
    assert_eq!(
        st["default"],
        json!({"provider": "primary", "model": "gpt-test"})
    );
    assert_eq!(st["requests_in_flight"], 1, "{st}");
    assert_eq!(
        st["caller"],
        json!({"id": "anonymous", "role": "admin", "method": "none"})
    );
    let providers = st["providers"].as_array().unwrap();
    assert_eq!(providers.len(), 2, "{st}");
    let p = &providers[0];
    assert_eq!(
        (&p["name"], &p["state"]),
        (&json!("primary"), &json!("cooling_down")),
        "{p}"
    );
    assert_eq!(p["cooldown"]["last_error"], "auth_error", "{p}");
    let until = p["cooldown"]["until"].as_str().unwrap();
    time::OffsetDateTime::parse(until, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("`until` is not RFC 3339 ({e}): {until}"));
    assert_eq!(
        (&providers[1]["name"], &providers[1]["state"]),
        (&json!("secondary"), &json!("ok"))
    );
    assert_eq!(providers[1]["cooldown"], Value::Null);

    secondary.release();
    let rest = held.rest().await;
    assert_eq!(rest.last().map(String::as_str), Some(r#"{"done":true}"#));

    let models: Value = http_client()
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["primary/gpt-test", "secondary/gpt-secondary"]);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "primary");
    s.shutdown().await;
}

/// Sends `req` on `conn` and reads one response (with a Content-Length body): status and body.
async fn round_trip(conn: &mut BufReader<tokio::net::TcpStream>, req: &str) -> (u16, String) {
    conn.get_mut().write_all(req.as_bytes()).await.unwrap();
    let read = async {
        let mut status = String::new();
        conn.read_line(&mut status).await.unwrap();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        conn.read_exact(&mut body).await.unwrap();
        let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, String::from_utf8(body).unwrap())
    };
    tokio::time::timeout(HANG_GUARD, read)
        .await
        .expect("no response")
}

#[tokio::test]
async fn bad_input_is_refused_with_a_named_problem_and_nothing_goes_upstream() {
    let fake = openai_fake().await;
    let s = TestServer::start_with(primary_config(&fake)).await;
    let http = http_client();
    let completions = s.url("/v1/chat/completions");
    let request = s.url("/request");
    let user_hi = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});

    struct Case {
        what: &'static str,
        req: reqwest::RequestBuilder,
        status: StatusCode,
        code: &'static str,
        mentions: &'static str,
    }
    let json_ct = "application/json";
    let cases = vec![
        Case {
            what: "malformed JSON (OpenAI)",
            req: http
                .post(&completions)
                .header("content-type", json_ct)
                .body("{\"messages\": ["),
            status: StatusCode::BAD_REQUEST,
            code: "invalid_json",
            mentions: "malformed JSON",
        },
        Case {
            what: "malformed JSON (/request)",
            req: http
                .post(&request)
                .header("content-type", json_ct)
                .body("{prompt"),
            status: StatusCode::BAD_REQUEST,
            code: "invalid_json",
            mentions: "malformed JSON",
        },
        Case {
            what: "wrong content type",
            req: http
                .post(&completions)
                .header("content-type", "text/plain")
                .body(user_hi.to_string()),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            mentions: "text/plain",
        },
        Case {
            what: "missing content type (/request)",
            req: http.post(&request).body(r#"{"prompt":"hi"}"#),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            mentions: "application/json",
        },
        Case {
            what: "unknown field (/request)",
            req: http
                .post(&request)
                .json(&json!({"prompt": "hi", "temprature": 1})),
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            mentions: "unknown field `temprature`",
        },
        Case {
            what: "Accept refusing SSE (OpenAI)",
            req: http
                .post(&completions)
                .header("accept", "text/html")
                .json(&user_hi),
            status: StatusCode::NOT_ACCEPTABLE,
            code: "not_acceptable",
            mentions: "text/event-stream",
        },
        Case {
            what: "Accept refusing SSE (/request)",
            req: http
                .post(&request)
                .header("accept", "application/json")
                .json(&json!({"prompt": "hi", "stream": true})),
            status: StatusCode::NOT_ACCEPTABLE,
            code: "not_acceptable",
            mentions: "text/event-stream",
        },
        Case {
            what: "no user message last",
            req: http.post(&completions).json(
                &json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            ),
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            mentions: "last message",
        },
        Case {
            what: "unknown provider (/request)",
            req: http
                .post(&request)
                .json(&json!({"prompt": "hi", "provider": "nosuch"})),
            status: StatusCode::NOT_FOUND,
            code: "model_not_found",
            mentions: "nosuch",
        },
        Case {
            what: "empty prompt",
            req: http.post(&request).json(&json!({"prompt": ""})),
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            mentions: "prompt",
        },
        Case {
            what: "bad session name",
            req: http
                .post(&request)
                .json(&json!({"prompt": "hi", "session": "../etc"})),
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            mentions: "session name",
        },
    ];
    for c in cases {
        let is_request_api =
            c.what.contains("/request") || matches!(c.what, "empty prompt" | "bad session name");
        let resp = c.req.send().await.unwrap();
        assert_eq!(resp.status(), c.status, "{}", c.what);
        let v: Value = resp.json().await.unwrap();
        let (code, message) = match is_request_api {
            true => {
                assert_eq!(v["success"], false, "{}: {v}", c.what);
                (&v["code"], &v["error"])
            }
            false => (&v["error"]["code"], &v["error"]["message"]),
        };
        assert_eq!(code, c.code, "{}: {v}", c.what);
        assert!(
            message.as_str().unwrap().contains(c.mentions),
            "{}: the message does not name the problem: {v}",
            c.what
        );
    }
    assert!(fake.requests().is_empty(), "bad input reached the upstream");

    // The connection stays usable after a refused request.
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut conn = BufReader::new(tcp);
    let bad = "{\"prompt\":";
    let (code, body) = round_trip(
        &mut conn,
        &format!(
            "POST /request HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{bad}",
            bad.len()
        ),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = round_trip(
        &mut conn,
        "POST /request HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nhi",
    )
    .await;
    assert_eq!(code, 415, "{body}");
    let (code, body) = round_trip(&mut conn, "GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("primary/gpt-test"), "{body}");

    // A body declared larger than the cap is refused before it is sent.
    let oversized = |path: &'static str| async move {
        let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let mut conn = BufReader::new(tcp);
        round_trip(
            &mut conn,
            &format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                9 * 1024 * 1024
            ),
        )
        .await
    };
    let (code, body) = oversized("/request").await;
    assert_eq!(code, 413, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "request_too_large", "{v}");
    assert!(v["error"].as_str().unwrap().contains("8388608"), "{v}");

    // The chat route, which the server calls without its router, keeps the router's answers: the
    // body cap, and 405 for another method.
    let (code, body) = oversized("/v1/chat/completions").await;
    assert_eq!(code, 413, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    let resp = http.get(&completions).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
    assert!(fake.requests().is_empty(), "bad input reached the upstream");
    s.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_map_to_documented_statuses() {
    let fake = openai_fake().await;
    let s = TestServer::start_with(primary_config(&fake)).await;
    let ask = json!({"messages": [{"role": "user", "content": "hi"}]});
    let cases = [
        (
            Reply::error(503, &error_body("server_error", "overloaded")),
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "server_error",
        ),
        (
            Reply::error(404, &error_body("model_not_found", "no such model")),
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
        ),
        (
            Reply::error(401, &error_body("invalid_api_key", "bad key")),
            StatusCode::BAD_GATEWAY,
            "upstream_auth_error",
            "upstream_auth_error",
        ),
        (
            Reply::rate_limited(&error_body("rate_limit_exceeded", "slow down"), 7),
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "upstream_rate_limited",
        ),
    ];
    for (reply, status, kind, code) in cases {
        fake.push(reply.clone());
        let resp = post(&s.url("/v1/chat/completions"), ask.clone()).await;
        assert_eq!(resp.status(), status, "{kind}/{code}");
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            (&v["error"]["type"], &v["error"]["code"]),
            (&json!(kind), &json!(code)),
            "{v}"
        );
        assert!(v["error"]["message"].as_str().unwrap().contains("primary"));
        assert!(
            !v.to_string().contains("sk-test"),
            "the key leaked into the error: {v}"
        );
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(retry_after.as_deref(), Some("7"));
        }

        fake.push(reply);
        let resp = post(&s.url("/request"), json!({"prompt": "hi"})).await;
        assert_eq!(resp.status(), status, "/request {code}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!((&v["success"], &v["code"]), (&json!(false), &json!(code)));
    }
    s.shutdown().await;

    // Every provider of a chain failing: 503.
    let a = openai_fake().await;
    let b = openai_fake().await;
    for f in [&a, &b] {
        f.set_default(Reply::error(503, &error_body("server_error", "down")));
    }
    let mut config = Config::default();
    config.llm.providers = vec![openai_provider("a", &a, "m"), openai_provider("b", &b, "m")];
    config.llm.fallback = vec!["a".into(), "b".into()];
    config.llm.fallback_max_retries = 0;
    let s = TestServer::start_with(config).await;
    let resp = post(&s.url("/v1/chat/completions"), ask).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "all_providers_failed", "{v}");
    s.shutdown().await;
}

#[tokio::test]
async fn missing_auth_is_401_and_over_the_rate_limit_is_429() {
    let mut config = echo_config();
    config.auth.token = Some(Secret::new("s3cret"));
    config.limits.rate_limit_rps = 0.01;
    config.limits.rate_limit_burst = 1;
    let s = TestServer::start_with(config).await;
    let http = http_client();
    let ask = json!({"messages": [{"role": "user", "content": "hi"}]});

    let resp = http
        .post(s.url("/v1/chat/completions"))
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");

    let authed = |path: &str| {
        http.post(s.url(path))
            .header("authorization", "Bearer s3cret")
            .json(&ask)
    };
    let resp = authed("/v1/chat/completions").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = authed("/v1/chat/completions").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    s.shutdown().await;
}

#[tokio::test]
async fn http_metrics_are_labelled_by_route_template() {
    let s = TestServer::start_with_metrics(echo_config()).await;
    let http = http_client();
    http.get(s.url("/v1/models")).send().await.unwrap();
    http.get(s.url("/v1/models")).send().await.unwrap();
    let resp = post(
        &s.url("/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "count me"}]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.bytes().await.unwrap();
    let resp = http.get(s.url("/no/such/route")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let text = metrics_with_lines(
        &s,
        &[
            r#"chatcli_http_requests_total{route="/v1/models",status="200"} 2"#,
            r#"chatcli_http_requests_total{route="/v1/chat/completions",status="200"} 1"#,
            r#"chatcli_http_requests_total{route="unmatched",status="404"} 1"#,
            r#"chatcli_http_request_duration_seconds_count{route="/v1/models"} 2"#,
        ],
    )
    .await;
    assert!(
        !text.contains("/no/such/route"),
        "a raw path became a label"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn h2c_serves_the_http_apis_and_streams() {
    let fake = openai_fake().await;
    fake.push(steps(&[text("over"), Step::AwaitRelease, text(" h2")]));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let h2 = {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .timeout(HANG_GUARD)
            .build()
            .unwrap()
    };
    let resp = h2.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = h2
        .post(s.url("/request"))
        .json(&json!({"prompt": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let mut sse = SseReader::new(resp);
    assert_eq!(sse.next_json().await["data"]["delta"], "over");
    fake.release();
    let rest = sse.rest().await;
    assert_eq!(rest.len(), 3, "{rest:?}");
    s.shutdown().await;
}

#[tokio::test]
async fn updates_end_when_the_server_drains() {
    let s = TestServer::start().await;
    let resp = http_client().get(s.url("/updates")).send().await.unwrap();
    let mut sse = SseReader::new(resp);
    assert_eq!(sse.next_json().await["type"], "subscribed");
    // A long-lived subscription must not hold the drain for the whole grace period.
    s.begin_shutdown();
    assert_eq!(sse.next_json().await, json!({"type": "shutdown"}));
    assert_eq!(sse.next_data().await, None);
    s.shutdown().await;
}
