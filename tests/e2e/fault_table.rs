//! Every kind of upstream fault, played by a fake upstream before the first delta and after it:
//! before it, the fallback chain moves on to the next provider and the caller gets that answer;
//! after it, the caller gets the delta and then a clear error. No call waits past its bounds, each
//! fault is counted in `chatcli_llm_fallback_total` with its class, and every call is in the audit
//! log.

use std::time::Duration;

use chatcli::config::Config;
use chatcli::proto::StreamPromptRequest;
use chatcli::testing::openai::{OpenAiFormat, error_body};
use chatcli::testing::{FakeUpstream, Reply, Step, WireFormat};
use serde_json::Value;
use tonic::Code;

use crate::support::{HANG_GUARD, TestServer, http_client, openai_fake, openai_provider, within};

/// The body bounds of the faulty provider: short, so the stalls end quickly.
const SHORT: Duration = Duration::from_millis(300);
/// The faulty provider's `max_response_bytes`.
const CAP: u64 = 4096;

const SSE: &str = "text/event-stream";

/// The first streamed chunk saying `first`, as the fake OpenAI upstream writes it.
fn first_piece() -> String {
    String::from_utf8(OpenAiFormat.stream_piece("first", 0).to_vec()).unwrap()
}

/// A streamed chunk whose text is larger than [`CAP`].
fn big_piece() -> String {
    String::from_utf8(
        OpenAiFormat
            .stream_piece(&"x".repeat(CAP as usize + 100), 1)
            .to_vec(),
    )
    .unwrap()
}

/// One fault: its name, the class it is counted as, and the reply that plays it before the first
/// delta and after it (`None`: the fault can only come before).
struct Fault {
    name: &'static str,
    class: &'static str,
    before: Reply,
    after: Option<Reply>,
    /// The status the caller gets after the first delta.
    after_code: Code,
}

fn faults() -> Vec<Fault> {
    vec![
        Fault {
            // The fake holds the rest until released, which the test never does: only the
            // provider's body bounds can end these calls.
            name: "latency spike over the body bounds",
            class: "timeout",
            before: Reply::steps(vec![Step::AwaitRelease, Step::Text("late".into())]),
            after: Some(Reply::steps(vec![
                Step::Text("first".into()),
                Step::AwaitRelease,
                Step::Text(" late".into()),
            ])),
            after_code: Code::DeadlineExceeded,
        },
        Fault {
            name: "connection reset mid-stream",
            class: "transport_error",
            before: Reply::steps(vec![Step::Drop]),
            after: Some(Reply::steps(vec![Step::Text("first".into()), Step::Drop])),
            after_code: Code::Unavailable,
        },
        Fault {
            name: "half-written event, then a clean close",
            class: "transport_error",
            before: Reply::body(SSE, vec![Step::Raw("data: {\"id\":\"x\",\"cho".into())]),
            after: Some(Reply::body(
                SSE,
                vec![
                    Step::Raw(first_piece()),
                    Step::Raw("data: {\"id\":\"x\",\"cho".into()),
                ],
            )),
            after_code: Code::Unavailable,
        },
        Fault {
            name: "invalid JSON in an event",
            class: "malformed_response",
            before: Reply::body(SSE, vec![Step::Raw("data: {not json}\n\n".into())]),
            after: Some(Reply::body(
                SSE,
                vec![
                    Step::Raw(first_piece()),
                    Step::Raw("data: {not json}\n\n".into()),
                ],
            )),
            after_code: Code::Unavailable,
        },
        Fault {
            name: "429 with Retry-After",
            class: "rate_limit",
            before: Reply::rate_limited(&error_body("rate_limit_exceeded", "slow down"), 30),
            after: None,
            after_code: Code::Ok,
        },
        Fault {
            name: "200 with an HTML body",
            class: "malformed_response",
            before: Reply::Raw {
                content_type: "text/html".into(),
                body: "<html><body>Gateway login</body></html>".into(),
            },
            after: None,
            after_code: Code::Ok,
        },
        Fault {
            name: "an answer over max_response_bytes",
            class: "malformed_response",
            before: Reply::body(SSE, vec![Step::Raw(big_piece())]),
            after: Some(Reply::body(
                SSE,
                vec![Step::Raw(first_piece()), Step::Raw(big_piece())],
            )),
            after_code: Code::Unavailable,
        },
    ]
}

/// `bad` (the faulty fake, short body bounds, a size cap) then `good`, no retries, no cooldowns,
/// metrics and the audit log on.
fn chain(bad: &FakeUpstream, good: &FakeUpstream, audit: &std::path::Path) -> Config {
    let mut faulty = openai_provider("bad", bad, "m");
    faulty.first_byte_timeout = SHORT;
    faulty.idle_timeout = SHORT;
    faulty.max_response_bytes = CAP;
    let mut config = Config::default();
    config.llm.providers = vec![faulty, openai_provider("good", good, "g")];
    config.llm.fallback = vec!["bad".into(), "good".into()];
    config.llm.fallback_max_retries = 0;
    // No cooldowns: each case must reach `bad`, however the earlier ones failed.
    config.llm.fallback_cooldown_base = Duration::ZERO;
    config.llm.fallback_cooldown_max = Duration::ZERO;
    config.audit.path = Some(audit.to_path_buf());
    config
}

fn stream_to(model: &str) -> StreamPromptRequest {
    StreamPromptRequest {
        prompt: "hello".into(),
        provider: "bad".into(),
        model: model.into(),
        ..StreamPromptRequest::default()
    }
}

/// The value of `chatcli_llm_fallback_total` from `bad` for `reason` (every reason for "").
fn fallbacks(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("chatcli_llm_fallback_total{"))
        .filter(|l| l.contains("from=\"bad\""))
        .filter(|l| reason.is_empty() || l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn every_upstream_fault_moves_on_before_the_first_delta_and_errors_cleanly_after_it() {
    let bad = openai_fake().await;
    let good = openai_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let mut s = TestServer::start_with_metrics(chain(&bad, &good, &audit)).await;
    let http = http_client();
    let mut calls = 0;
    for (i, fault) in faults().into_iter().enumerate() {
        let metrics_before = http.get(s.metrics_url("/metrics")).send().await.unwrap();
        let metrics_before = metrics_before.text().await.unwrap();
        let before_count = fallbacks(&metrics_before, fault.class);
        let before_all = fallbacks(&metrics_before, "");
        // Each case asks for its own model, so that no cooldown of an earlier case applies.
        let model = format!("m-before-{i}");
        bad.on_model(&model, fault.before);
        let mut stream = within(
            HANG_GUARD,
            fault.name,
            s.client.stream_prompt(stream_to(&model)),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e:?}", fault.name))
        .into_inner();
        let mut msgs = Vec::new();
        while let Some(m) = within(HANG_GUARD, fault.name, stream.message())
            .await
            .unwrap_or_else(|e| panic!("{}: the fallback did not move on: {e:?}", fault.name))
        {
            msgs.push(m);
        }
        calls += 1;
        let text: String = msgs.iter().map(|m| m.chunk.as_str()).collect();
        assert_eq!(text, "hello from the fake", "{}: {msgs:?}", fault.name);
        assert_eq!(msgs.last().unwrap().provider, "good", "{}", fault.name);
        let text = crate::support::eventually(fault.name, || async {
            let t = http
                .get(s.metrics_url("/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (fallbacks(&t, "") > before_all).then_some(t)
        })
        .await;
        assert_eq!(
            fallbacks(&text, fault.class),
            before_count + 1.0,
            "{}: not counted once as {}: {:#?}",
            fault.name,
            fault.class,
            text.lines()
                .filter(|l| l.starts_with("chatcli_llm_fallback_total{"))
                .collect::<Vec<_>>()
        );

        let Some(after) = fault.after else { continue };
        let model = format!("m-after-{i}");
        bad.on_model(&model, after);
        let mut stream = within(
            HANG_GUARD,
            fault.name,
            s.client.stream_prompt(stream_to(&model)),
        )
        .await
        .unwrap()
        .into_inner();
        let first = within(HANG_GUARD, fault.name, stream.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (first.chunk.as_str(), first.provider.as_str()),
            ("first", "bad"),
            "{}",
            fault.name
        );
        let end = loop {
            match within(HANG_GUARD, fault.name, stream.message()).await {
                Ok(Some(m)) => assert!(!m.done, "{}: ended as if whole: {m:?}", fault.name),
                Ok(None) => panic!("{}: the stream ended without an error", fault.name),
                Err(e) => break e,
            }
        };
        calls += 1;
        assert_eq!(end.code(), fault.after_code, "{}: {end:?}", fault.name);
        assert!(
            end.message().contains("bad"),
            "{}: the error does not name the provider: {end:?}",
            fault.name
        );
    }
    // Every call is in the audit log: those that moved on as answered by `good`, the others as
    // errors with their code.
    let lines = crate::support::eventually("the audit records", || async {
        let text = std::fs::read_to_string(&audit).ok()?;
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| {
                l["method"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("/StreamPrompt"))
            })
            .collect();
        (lines.len() >= calls).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), calls, "{lines:#?}");
    let ok = lines.iter().filter(|l| l["result"] == "ok").count();
    assert_eq!(ok, faults().len(), "{lines:#?}");
    for l in lines.iter().filter(|l| l["result"] != "ok") {
        assert_eq!(l["provider"], "bad", "{l}");
        assert!(l["error_code"].is_string(), "{l}");
    }
    s.shutdown().await;
}
