//! InteractiveSession end to end: a multi-turn conversation against a fake OpenAI upstream (history
//! per stream, no orphan turn after a failure, metadata naming who really answered), the remote
//! slash commands, and the client closing its side.

use std::collections::HashMap;
use std::time::Duration;

use chatcli::config::Config;
use chatcli::proto::SessionMessage;
use chatcli::proto::session_message::Type;
use chatcli::testing::openai::error_body;
use chatcli::testing::{FakeUpstream, Recorded, Reply};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::{TestServer, openai_fake, openai_provider, within};

/// Bound of each wait for a reply.
const REPLY: Duration = Duration::from_secs(30);

/// One open InteractiveSession: our sending half and the server's replies.
struct Session {
    tx: Option<mpsc::Sender<SessionMessage>>,
    replies: tonic::Streaming<SessionMessage>,
}

impl Session {
    async fn open(s: &TestServer) -> Self {
        let (tx, rx) = mpsc::channel(8);
        let mut client = s.client.clone();
        let call = client.interactive_session(ReceiverStream::new(rx));
        let replies = within(REPLY, "InteractiveSession response headers", call)
            .await
            .unwrap()
            .into_inner();
        Self {
            tx: Some(tx),
            replies,
        }
    }

    /// Sends one message and waits for the one reply.
    async fn ask(&mut self, kind: Type, content: &str, meta: &[(&str, &str)]) -> SessionMessage {
        let msg = SessionMessage {
            r#type: kind as i32,
            content: content.into(),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        };
        let tx = self.tx.as_ref().expect("the sending half is closed");
        within(REPLY, "sending a session message", tx.send(msg))
            .await
            .unwrap();
        tokio::time::timeout(REPLY, self.replies.message())
            .await
            .unwrap_or_else(|_| panic!("no reply to {content:?} within {REPLY:?}"))
            .unwrap_or_else(|e| panic!("the session failed after {content:?}: {e:?}"))
            .unwrap_or_else(|| panic!("the session ended instead of answering {content:?}"))
    }

    async fn say(&mut self, content: &str) -> SessionMessage {
        self.ask(Type::UserInput, content, &[]).await
    }

    async fn command(&mut self, content: &str) -> String {
        let r = self.ask(Type::Command, content, &[]).await;
        assert_eq!(r.r#type(), Type::CommandResult, "{content:?}: {r:?}");
        r.content
    }
}

/// `primary` (gpt-test) at `fake`, no retries.
fn config(fake: &FakeUpstream) -> Config {
    let mut config = Config::default();
    config.llm.providers = vec![openai_provider("primary", fake, "gpt-test")];
    config.llm.fallback_max_retries = 0;
    config
}

/// The `messages` of an upstream chat request as (role, content), system turns left out.
fn turns(r: &Recorded) -> Vec<(String, String)> {
    let body = r.json();
    body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {body}"))
        .iter()
        .filter(|m| m["role"] != "system")
        .map(|m| {
            let text = |v: &Value| v.as_str().map(String::from);
            (
                text(&m["role"]).unwrap_or_default(),
                text(&m["content"]).unwrap_or_else(|| m["content"].to_string()),
            )
        })
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn meta<'a>(m: &'a SessionMessage, key: &str) -> &'a str {
    m.metadata.get(key).map(String::as_str).unwrap_or("")
}

#[tokio::test]
async fn a_conversation_keeps_its_history_per_stream() {
    let fake = openai_fake().await;
    fake.push(Reply::text("answer one"));
    fake.push(Reply::text("answer two"));
    let s = TestServer::start_with(config(&fake)).await;
    let mut session = Session::open(&s).await;

    let r = session.say("one").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(r.content, "answer one");
    assert_eq!(
        (meta(&r, "provider"), meta(&r, "model")),
        ("primary", "gpt-test")
    );

    let r = session.say("two").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(r.content, "answer two");
    let seen = fake.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(turns(&seen[0]), pairs(&[("user", "one")]));
    assert_eq!(
        turns(&seen[1]),
        pairs(&[
            ("user", "one"),
            ("assistant", "answer one"),
            ("user", "two")
        ])
    );

    // Another stream starts with its own, empty history.
    let mut other = Session::open(&s).await;
    let r = other.say("fresh").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(turns(&fake.requests()[2]), pairs(&[("user", "fresh")]));
    drop(other);
    drop(session);
    s.shutdown().await;
}

#[tokio::test]
async fn a_failed_turn_answers_error_keeps_the_stream_and_leaves_no_orphan() {
    let fake = openai_fake().await;
    fake.push(Reply::text("answer one"));
    fake.push(Reply::error(500, &error_body("server_error", "boom")));
    fake.push(Reply::text("answer three"));
    let s = TestServer::start_with(config(&fake)).await;
    let mut session = Session::open(&s).await;

    let r = session.say("one").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    let r = session.say("two").await;
    assert_eq!(r.r#type(), Type::Error, "{r:?}");
    assert!(r.content.contains("primary"), "{r:?}");
    assert!(!r.content.contains("sk-test"), "{r:?}");
    // The stream is still open.
    let r = session.say("three").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(r.content, "answer three");

    let seen = fake.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        turns(&seen[2]),
        pairs(&[
            ("user", "one"),
            ("assistant", "answer one"),
            ("user", "three")
        ]),
        "the failed turn must not stay in the history"
    );
    drop(session);
    s.shutdown().await;
}

#[tokio::test]
async fn response_metadata_names_the_provider_that_answered() {
    let primary = openai_fake().await;
    let secondary = openai_fake().await;
    let mut config = config(&primary);
    config
        .llm
        .providers
        .push(openai_provider("secondary", &secondary, "gpt-secondary"));
    config.llm.fallback = vec!["primary".into(), "secondary".into()];
    let s = TestServer::start_with(config).await;
    let mut session = Session::open(&s).await;

    secondary.push(Reply::text("picked"));
    let r = session
        .ask(Type::UserInput, "hi", &[("provider", "secondary")])
        .await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(r.content, "picked");
    assert_eq!(
        (meta(&r, "provider"), meta(&r, "model")),
        ("secondary", "gpt-secondary")
    );
    assert!(primary.requests().is_empty());

    // The default provider fails: the chain answers, and the metadata says who did.
    primary.push(Reply::error(500, &error_body("server_error", "down")));
    secondary.push(Reply::text("rescued"));
    let r = session.say("again").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(r.content, "rescued");
    assert_eq!(
        (meta(&r, "provider"), meta(&r, "model")),
        ("secondary", "gpt-secondary")
    );
    assert_eq!(primary.requests().len(), 1);
    drop(session);
    s.shutdown().await;
}

#[tokio::test]
async fn remote_commands_answer() {
    let fake = openai_fake().await;
    let s = TestServer::start_with(config(&fake)).await;
    let mut session = Session::open(&s).await;

    let status = session.command("/status").await;
    assert!(status.contains("=== Server Status ==="), "{status}");
    assert!(status.contains(env!("CARGO_PKG_VERSION")), "{status}");
    assert!(status.contains("primary"), "{status}");
    for cmd in [
        "/watcher status",
        "/watcher alerts",
        "/plugins list",
        "/agents list",
        "/skills list",
    ] {
        let out = session.command(cmd).await;
        assert!(!out.trim().is_empty(), "{cmd} answered nothing");
        assert!(!out.starts_with("Unknown command"), "{cmd}: {out}");
    }
    assert_eq!(session.command("").await, "Error: empty command");
    let unknown = session.command("/nope").await;
    assert!(unknown.starts_with("Unknown command: '/nope'"), "{unknown}");
    for known in [
        "/status",
        "/watcher status",
        "/watcher alerts",
        "/plugins list",
        "/agents list",
        "/skills list",
    ] {
        assert!(unknown.contains(known), "{known} not listed:\n{unknown}");
    }
    assert!(fake.requests().is_empty(), "a command reached the upstream");
    drop(session);
    s.shutdown().await;
}

#[tokio::test]
async fn status_command_shows_the_fallback_chain_and_cooldowns() {
    let primary = openai_fake().await;
    let secondary = openai_fake().await;
    primary.push(Reply::error(
        401,
        &error_body("invalid_api_key", "Incorrect API key provided"),
    ));
    let mut config = config(&primary);
    config
        .llm
        .providers
        .push(openai_provider("secondary", &secondary, "gpt-secondary"));
    config.llm.fallback = vec!["primary".into(), "secondary".into()];
    let s = TestServer::start_with(config).await;
    let mut session = Session::open(&s).await;

    let status = session.command("/status").await;
    assert!(status.contains("primary -> secondary"), "{status}");
    assert!(!status.contains("Cooldown"), "{status}");
    let r = session.say("hi").await;
    assert_eq!(meta(&r, "provider"), "secondary", "{r:?}");
    let status = session.command("/status").await;
    let line = status
        .lines()
        .find(|l| l.starts_with("Cooldown:"))
        .unwrap_or_else(|| panic!("no cooldown after an auth failure:\n{status}"));
    assert!(line.contains("primary") && line.contains("auth"), "{line}");
    drop(session);
    s.shutdown().await;
}

#[tokio::test]
async fn closing_the_client_side_ends_the_call_ok() {
    let fake = openai_fake().await;
    let s = TestServer::start_with(config(&fake)).await;
    let mut session = Session::open(&s).await;
    let r = session.say("hello").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    drop(session.tx.take());
    let end = tokio::time::timeout(REPLY, session.replies.message())
        .await
        .expect("the call did not end after the client closed its side");
    match end {
        Ok(None) => {}
        other => panic!("expected the stream to end with OK, got {other:?}"),
    }
    // The server is fine afterwards.
    let r = Session::open(&s).await.say("again").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(turns(&fake.requests()[1]), pairs(&[("user", "again")]));
    drop(session);
    s.shutdown().await;
}

/// The `In flight:` line of a `/status` command's answer.
fn in_flight_line(status: &str) -> String {
    status
        .lines()
        .find(|l| l.starts_with("In flight:"))
        .unwrap_or_else(|| panic!("no in-flight line:\n{status}"))
        .to_string()
}

#[tokio::test]
async fn status_counts_the_calls_in_flight_on_both_transports() {
    use futures::StreamExt;
    // Ten words a second: the HTTP stream below stays open until the test drops it.
    let config = crate::support::echo_config_with_delay(Some(Duration::from_millis(100)));
    let s = TestServer::start_with(config).await;
    let http = crate::support::http_client();
    let http_status = || async {
        http.get(s.url("/status"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };

    // An interactive session held open is a gRPC call in flight, and HTTP /status says so.
    let mut session = Session::open(&s).await;
    assert_eq!(
        in_flight_line(&session.command("/status").await),
        "In flight: 1 (gRPC 1, HTTP 0)"
    );
    let st = http_status().await;
    assert_eq!(
        st["in_flight"],
        serde_json::json!({"grpc": 1, "http": 0}),
        "{st}"
    );
    assert_eq!(st["requests_in_flight"], 1, "{st}");

    // An HTTP stream held open shows in the gRPC session's /status.
    let words = vec!["word"; 600].join(" ");
    let resp = http
        .post(s.url("/v1/chat/completions"))
        .json(&serde_json::json!({
            "stream": true,
            "messages": [{"role": "user", "content": words}],
        }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{resp:?}");
    let mut body = resp.bytes_stream();
    within(REPLY, "the first SSE chunk", body.next())
        .await
        .expect("the HTTP stream ended at once")
        .unwrap();
    assert_eq!(
        in_flight_line(&session.command("/status").await),
        "In flight: 2 (gRPC 1, HTTP 1)"
    );
    let st = http_status().await;
    assert_eq!(
        st["in_flight"],
        serde_json::json!({"grpc": 1, "http": 1}),
        "{st}"
    );

    // Each call leaves the count when it ends.
    drop(body);
    let deadline = std::time::Instant::now() + crate::support::HANG_GUARD;
    while in_flight_line(&session.command("/status").await) != "In flight: 1 (gRPC 1, HTTP 0)" {
        assert!(
            std::time::Instant::now() < deadline,
            "the HTTP stream never left the count"
        );
        // Each /status is a call against the rate limit: poll well under its default rate.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(session);
    crate::support::eventually("the session to leave the count", || async {
        let st = http_status().await;
        (st["in_flight"] == serde_json::json!({"grpc": 0, "http": 0})).then_some(())
    })
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn every_turn_counts_against_the_rate_limit_and_a_refusal_keeps_the_stream() {
    let fake = openai_fake().await;
    fake.push(Reply::text("answer one"));
    fake.push(Reply::text("answer two"));
    let mut config = config(&fake);
    // Three calls, then none for a long while: opening the stream is one, each turn another.
    config.limits.rate_limit_rps = 0.001;
    config.limits.rate_limit_burst = 3;
    let s = TestServer::start_with(config).await;
    let mut session = Session::open(&s).await;
    assert_eq!(session.say("one").await.r#type(), Type::AssistantResponse);
    assert_eq!(session.say("two").await.r#type(), Type::AssistantResponse);

    let refused = session.say("three").await;
    assert_eq!(refused.r#type(), Type::Error, "{refused:?}");
    assert!(
        refused
            .content
            .starts_with("rate limit exceeded, retry after"),
        "{refused:?}"
    );
    assert_eq!(meta(&refused, "code"), "rate_limited");
    assert!(
        meta(&refused, "retry_after").parse::<u64>().unwrap() >= 1,
        "{refused:?}"
    );
    // The stream stays open and keeps answering, commands included, each one refused too.
    let again = session.ask(Type::Command, "/status", &[]).await;
    assert_eq!(again.r#type(), Type::Error, "{again:?}");
    assert_eq!(meta(&again, "code"), "rate_limited");
    let again = session.say("four").await;
    assert_eq!(again.r#type(), Type::Error, "{again:?}");
    assert_eq!(
        fake.requests().len(),
        2,
        "a refused turn reached the upstream"
    );
    drop(session);
    s.shutdown().await;
}

#[tokio::test]
async fn the_session_history_is_bounded_like_a_prompts_history() {
    // By message count: four messages are two turns.
    let fake = openai_fake().await;
    for n in ["one", "two", "three", "four"] {
        fake.push(Reply::text(&format!("answer {n}")));
    }
    let mut bounded = config(&fake);
    bounded.limits.max_history_messages = 4;
    let s = TestServer::start_with(bounded).await;
    let mut session = Session::open(&s).await;
    for n in ["one", "two"] {
        let r = session.say(n).await;
        assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
        assert!(!r.metadata.contains_key("history_trimmed"), "{r:?}");
    }
    let r = session.say("three").await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(meta(&r, "history_trimmed"), "2", "{r:?}");
    session.say("four").await;
    assert_eq!(
        turns(&fake.requests()[3]),
        pairs(&[
            ("user", "two"),
            ("assistant", "answer two"),
            ("user", "three"),
            ("assistant", "answer three"),
            ("user", "four")
        ]),
        "the oldest turn goes first"
    );
    drop(session);
    s.shutdown().await;

    // By bytes: a turn here is 26 bytes (roles and contents), so 40 bytes keep one.
    let fake = openai_fake().await;
    for n in ["one", "two", "six"] {
        fake.push(Reply::text(&format!("answer {n}")));
    }
    let mut bounded = config(&fake);
    bounded.limits.max_history_bytes = 40;
    let s = TestServer::start_with(bounded).await;
    let mut session = Session::open(&s).await;
    assert!(
        !session
            .say("one")
            .await
            .metadata
            .contains_key("history_trimmed")
    );
    assert_eq!(meta(&session.say("two").await, "history_trimmed"), "2");
    session.say("six").await;
    assert_eq!(
        turns(&fake.requests()[2]),
        pairs(&[
            ("user", "two"),
            ("assistant", "answer two"),
            ("user", "six")
        ])
    );
    drop(session);
    s.shutdown().await;
}

#[tokio::test]
async fn an_idle_session_is_closed_but_a_slow_answer_is_not_idleness() {
    let mut config = crate::support::echo_config_with_delay(Some(Duration::from_millis(100)));
    config.limits.interactive_idle_timeout = Duration::from_secs(1);
    let s = TestServer::start_with(config).await;
    let mut session = Session::open(&s).await;
    // The answer takes longer than the idle timeout (a word every 100 ms); the server's own time
    // does not count.
    let words = vec!["word"; 15].join(" ");
    let r = session.say(&words).await;
    assert_eq!(r.r#type(), Type::AssistantResponse, "{r:?}");
    assert_eq!(r.content, words);

    let end = tokio::time::timeout(REPLY, session.replies.message())
        .await
        .expect("an idle session was never closed");
    let status = end.expect_err("the idle session must end with a status");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("limits.interactive_idle_timeout"),
        "{status:?}"
    );
    drop(session);
    s.shutdown().await;
}
