//! Upstream faults seen from outside: what one caller's failures do to everyone else (the shared
//! cooldowns count only failures that say something about the provider as the server uses it), and
//! upstreams that send their headers and then stall, before the first delta or between deltas
//! (`first_byte_timeout`, `idle_timeout`, `unary_timeout`), on every prompt surface: SendPrompt,
//! StreamPrompt, `/v1/chat/completions` (whole and streamed) and `/request`.

use std::time::Duration;

use chatcli::config::Config;
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{SendPromptRequest, StreamPromptRequest};
use chatcli::testing::openai::error_body;
use chatcli::testing::{FakeUpstream, Reply, Step};
use serde_json::{Value, json};
use tonic::Code;

use crate::support::{
    HANG_GUARD, TestServer, collect_stream, http_client, openai_fake, openai_provider, within,
};

/// A gRPC client over a plain HTTP/2 connection: unlike tonic's `Channel`, which gives up on its
/// own when a call's `grpc-timeout` passes, it waits for whatever the server answers, as a client
/// that only sets the header does.
type RawClient = ChatCliServiceClient<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic::body::Body,
    >,
>;

fn raw_client(addr: std::net::SocketAddr) -> RawClient {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    ChatCliServiceClient::with_origin(http, format!("http://{addr}").parse().unwrap())
}

/// The answer every fake gives when no rule or script says otherwise.
const FAKE_ANSWER: &str = "hello from the fake";

fn send_to(provider: &str, model: &str) -> SendPromptRequest {
    SendPromptRequest {
        prompt: "hello".into(),
        provider: provider.into(),
        model: model.into(),
        ..SendPromptRequest::default()
    }
}

fn stream_to(provider: &str, model: &str) -> StreamPromptRequest {
    StreamPromptRequest {
        prompt: "hello".into(),
        provider: provider.into(),
        model: model.into(),
        ..StreamPromptRequest::default()
    }
}

/// `req` with a `grpc-timeout` of `limit`.
fn with_deadline<T>(req: T, limit: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    r.set_timeout(limit);
    r
}

/// The fakes' rules for the tricks a hostile caller plays: a model no upstream knows, one the
/// server's key may not use, one whose answer never comes, and the hostile caller's own key.
fn arm_for_tricks(fake: &FakeUpstream) {
    fake.on_model(
        "no-such-model",
        Reply::error(
            404,
            &error_body(
                "model_not_found",
                "The model `no-such-model` does not exist",
            ),
        ),
    );
    fake.on_model(
        "forbidden-model",
        Reply::error(
            403,
            &error_body(
                "permission_error",
                "You are not allowed to sample from this model",
            ),
        ),
    );
    fake.on_model(
        "stalled-model",
        Reply::steps(vec![Step::AwaitRelease, Step::Text("too late".into())]),
    );
    fake.when(
        |r| r.header("authorization").as_deref() == Some("Bearer sk-hostile"),
        Reply::error(401, &error_body("invalid_api_key", "Incorrect API key")),
    );
}

/// Every way of failing a call that is the caller's doing, aimed at `provider`.
async fn play_every_trick(
    hostile: &mut RawClient,
    http: &reqwest::Client,
    server: &TestServer,
    provider: &str,
    callers_url: &str,
    closed_url: &str,
) {
    // A made-up model (the upstream answers 404) and one the server's key may not use (403).
    for model in ["no-such-model", "forbidden-model"] {
        let _ = within(
            HANG_GUARD,
            "made-up model",
            hostile.send_prompt(send_to(provider, model)),
        )
        .await;
        let body = json!({"model": format!("{provider}/{model}"),
                          "messages": [{"role": "user", "content": "hi"}]});
        let r = http
            .post(server.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().as_u16() < 500 || r.status().as_u16() == 503,
            "{r:?}"
        );
    }
    // A deadline far shorter than the answer takes, unary and streamed.
    let tiny = Duration::from_millis(200);
    let err = within(
        HANG_GUARD,
        "tiny deadline",
        hostile.send_prompt(with_deadline(send_to(provider, "stalled-model"), tiny)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let streamed = within(
        HANG_GUARD,
        "tiny deadline, streamed",
        hostile.stream_prompt(with_deadline(stream_to(provider, "stalled-model"), tiny)),
    )
    .await;
    if let Ok(s) = streamed {
        let mut s = s.into_inner();
        let end = within(HANG_GUARD, "the streamed trick's end", s.message()).await;
        assert!(end.is_err(), "{end:?}");
    }
    // The caller's own key, refused; and allowed but not for this model.
    for (key, model) in [("sk-hostile", ""), ("sk-mine", "forbidden-model")] {
        let mut req = send_to(provider, model);
        req.client_api_key = key.into();
        let err = within(HANG_GUARD, "own key", hostile.send_prompt(req))
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Ok);
    }
    // The caller's own URL, answering 500 or not listening at all.
    for url in [callers_url, closed_url] {
        let mut req = send_to(provider, "");
        req.client_api_key = "sk-mine".into();
        req.provider_config = [("base_url".to_string(), url.to_string())]
            .into_iter()
            .collect();
        let err = within(HANG_GUARD, "own URL", hostile.send_prompt(req))
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Ok, "{url}");
    }
}

#[tokio::test]
async fn a_hostile_caller_cannot_make_providers_unavailable_for_everyone() {
    let alpha = openai_fake().await;
    let beta = openai_fake().await;
    arm_for_tricks(&alpha);
    arm_for_tricks(&beta);
    // The hostile caller's own upstream: always failing.
    let callers = openai_fake().await;
    callers.set_default(Reply::error(500, &error_body("server_error", "down")));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let mut config = Config::default();
    config.llm.providers = vec![
        openai_provider("alpha", &alpha, "gpt-alpha"),
        openai_provider("beta", &beta, "gpt-beta"),
    ];
    config.llm.fallback = vec!["alpha".into(), "beta".into()];
    config.llm.fallback_max_retries = 0;
    config.llm.allow_http_providers = true;
    config.llm.ssrf_allow = vec!["127.0.0.1".into()];
    // Both callers come from one address here: the server's own rate limit must not be what
    // stops them.
    config.limits.rate_limit_rps = 1000.0;
    config.limits.rate_limit_burst = 1000;
    let mut server = TestServer::start_with(config).await;
    let mut hostile = raw_client(server.addr);
    let http = http_client();
    let callers_url = format!("{}/v1", callers.base_url());
    for round in 0..3 {
        for provider in ["alpha", "beta"] {
            play_every_trick(
                &mut hostile,
                &http,
                &server,
                provider,
                &callers_url,
                &closed,
            )
            .await;
            // Everyone else is still answered by the provider they name, not by a fallback.
            for named in ["alpha", "beta"] {
                let r = within(
                    HANG_GUARD,
                    "the other caller's SendPrompt",
                    server.client.send_prompt(send_to(named, "")),
                )
                .await
                .unwrap_or_else(|e| panic!("round {round}, after {provider}: {named}: {e:?}"))
                .into_inner();
                assert_eq!(
                    (r.provider.as_str(), r.response.as_str()),
                    (named, FAKE_ANSWER),
                    "round {round}, after the tricks on {provider}"
                );
            }
            let mut s = server
                .client
                .stream_prompt(stream_to("", ""))
                .await
                .unwrap()
                .into_inner();
            let msgs = collect_stream(&mut s).await;
            let last = msgs.last().unwrap();
            assert_eq!(last.provider, "alpha", "round {round}: {msgs:?}");
        }
    }
    let status: Value = crate::support::get_json(&http, server.url("/status")).await;
    let cooling: Vec<&Value> = status["providers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["state"] != "ok")
        .collect();
    assert!(cooling.is_empty(), "{cooling:?}");
    // The hostile caller's calls did reach the upstreams (the tricks were played).
    assert!(
        alpha
            .requests()
            .iter()
            .any(|r| r.model().as_deref() == Some("no-such-model"))
    );
    assert!(!callers.requests().is_empty());
    alpha.release();
    beta.release();
    server.shutdown().await;
}

/// Bounds short enough for a test; the fakes stall for much longer (until released).
const SHORT: Duration = Duration::from_millis(300);

/// A whole OpenAI `chat.completion` saying `text`.
fn completion_json(text: &str) -> String {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    })
    .to_string()
}

/// A whole answer whose headers come at once and whose body never does.
fn whole_stalled_before_first_byte() -> Reply {
    Reply::body(
        "application/json",
        vec![Step::AwaitRelease, Step::Raw(completion_json("late"))],
    )
}

/// A whole answer that stops halfway through its body.
fn whole_stalled_midway() -> Reply {
    let body = completion_json("never finished");
    let (head, tail) = body.split_at(body.len() / 2);
    Reply::body(
        "application/json",
        vec![
            Step::Raw(head.to_string()),
            Step::AwaitRelease,
            Step::Raw(tail.to_string()),
        ],
    )
}

/// A streamed answer whose headers come at once and whose first event never does.
fn stream_stalled_before_first_delta() -> Reply {
    Reply::steps(vec![Step::AwaitRelease, Step::Text("late".into())])
}

/// A streamed answer that stalls after its first delta.
fn stream_stalled_after_first_delta() -> Reply {
    Reply::steps(vec![
        Step::Text("first".into()),
        Step::AwaitRelease,
        Step::Text(" second".into()),
    ])
}

/// One `openai` provider `slow` at `fake` whose body bounds are [`SHORT`], not retried (a
/// timeout is, by default), and the audit log at `audit`.
fn slow_config(fake: &FakeUpstream, audit: &std::path::Path) -> Config {
    let mut p = openai_provider("slow", fake, "gpt-slow");
    p.first_byte_timeout = SHORT;
    p.idle_timeout = SHORT;
    let mut config = Config::default();
    config.llm.providers = vec![p];
    config.llm.fallback_max_retries = 0;
    config.audit.path = Some(audit.to_path_buf());
    config
}

/// The audit records written so far whose `method` is `method`, once there are `n` of them.
async fn audit_lines(path: &std::path::Path, method: &str, n: usize) -> Vec<Value> {
    crate::support::eventually(&format!("{n} audit lines of {method}"), || async {
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["method"] == method)
            .collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}

/// Waits until `fake` saw `n` answers abandoned: the server closed those upstream connections.
async fn closed_upstream(fake: &FakeUpstream, n: usize) {
    assert!(
        fake.wait_cancelled(n, HANG_GUARD).await,
        "{} of {n} stalled upstream answers were closed",
        fake.cancelled()
    );
}

#[tokio::test]
async fn send_prompt_ends_a_stall_before_and_after_the_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let fake = openai_fake().await;
    fake.push(whole_stalled_before_first_byte());
    fake.push(whole_stalled_midway());
    let mut s = TestServer::start_with_metrics(slow_config(&fake, &audit)).await;
    for (what, bound) in [
        ("before the first byte", "first_byte_timeout"),
        ("midway", "idle_timeout"),
    ] {
        let err = within(HANG_GUARD, what, s.client.send_prompt(send_to("", "")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{what}: {err:?}");
        assert!(err.message().contains(bound), "{what}: {err:?}");
        assert!(err.message().contains("slow"), "{what}: {err:?}");
    }
    closed_upstream(&fake, 2).await;
    // Both stalls asked for a whole answer (SendPrompt): the body bounds apply to it too.
    assert!(fake.requests().iter().all(|r| r.json()["stream"] == false));
    crate::support::metrics_with_lines(
        &s,
        &[r#"chatcli_llm_errors_total{error_type="timeout",model="gpt-slow",provider="slow"} 2"#],
    )
    .await;
    let lines = audit_lines(&audit, "/chatcli.v1.ChatCLIService/SendPrompt", 2).await;
    for l in &lines {
        assert_eq!(
            (&l["result"], &l["code"]),
            (&json!("error"), &json!("DeadlineExceeded"))
        );
        assert!(l["error"].as_str().unwrap().contains("timeout"), "{l}");
    }
    // The provider still answers.
    let r = s
        .client
        .send_prompt(send_to("", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, FAKE_ANSWER);
    fake.release();
    s.shutdown().await;
}

#[tokio::test]
async fn stream_prompt_ends_a_stall_before_and_after_the_first_delta() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let fake = openai_fake().await;
    fake.push(stream_stalled_before_first_delta());
    fake.push(stream_stalled_after_first_delta());
    let mut s = TestServer::start_with_metrics(slow_config(&fake, &audit)).await;
    // Before the first delta: the call fails as a whole.
    let err = within(
        HANG_GUARD,
        "a stream that never starts",
        s.client.stream_prompt(stream_to("", "")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("first_byte_timeout"), "{err:?}");
    // After it: the first delta, then the status.
    let mut stream = within(
        HANG_GUARD,
        "a stream that stalls",
        s.client.stream_prompt(stream_to("", "")),
    )
    .await
    .unwrap()
    .into_inner();
    let first = within(HANG_GUARD, "the first message", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.chunk.as_str(), first.done), ("first", false));
    let err = within(HANG_GUARD, "the stream's end", stream.message())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("idle_timeout"), "{err:?}");
    closed_upstream(&fake, 2).await;
    crate::support::metrics_with_lines(
        &s,
        &[r#"chatcli_llm_errors_total{error_type="timeout",model="gpt-slow",provider="slow"} 2"#],
    )
    .await;
    let lines = audit_lines(&audit, "/chatcli.v1.ChatCLIService/StreamPrompt", 2).await;
    assert!(
        lines.iter().all(|l| l["code"] == "DeadlineExceeded"),
        "{lines:?}"
    );
    fake.release();
    s.shutdown().await;
}

/// POSTs `body` to `path` and returns the status and the whole response text.
async fn post(http: &reqwest::Client, s: &TestServer, path: &str, body: Value) -> (u16, String) {
    let r = within(
        HANG_GUARD,
        path,
        http.post(s.url(path))
            .header("accept", "text/event-stream, application/json")
            .json(&body)
            .send(),
    )
    .await
    .unwrap();
    let status = r.status().as_u16();
    (
        status,
        within(HANG_GUARD, "the body", r.text()).await.unwrap(),
    )
}

#[tokio::test]
async fn chat_completions_answer_504_or_an_error_event_after_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let fake = openai_fake().await;
    let s = TestServer::start_with_metrics(slow_config(&fake, &audit)).await;
    let http = http_client();
    let ask = |stream: bool| {
        json!({"model": "slow/gpt-slow", "stream": stream,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    // Whole answers, stalled before and after the first byte: 504.
    for (reply, bound) in [
        (whole_stalled_before_first_byte(), "first_byte_timeout"),
        (whole_stalled_midway(), "idle_timeout"),
    ] {
        fake.push(reply);
        let (status, text) = post(&http, &s, "/v1/chat/completions", ask(false)).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (status, &v["error"]["code"]),
            (504, &json!("timeout")),
            "{text}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains(bound),
            "{text}"
        );
    }
    // A stream stalled before its first delta: still a 504, nothing was sent.
    fake.push(stream_stalled_before_first_delta());
    let (status, text) = post(&http, &s, "/v1/chat/completions", ask(true)).await;
    assert_eq!(status, 504, "{text}");
    // After its first delta: the chunk went out, then an `error` event ends the stream.
    fake.push(stream_stalled_after_first_delta());
    let (status, text) = post(&http, &s, "/v1/chat/completions", ask(true)).await;
    assert_eq!(status, 200, "{text}");
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    assert_eq!(
        events[0]["choices"][0]["delta"]["content"], "first",
        "{text}"
    );
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "timeout", "{text}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("idle_timeout"),
        "{text}"
    );
    assert!(
        !text.contains("[DONE]"),
        "a broken stream ended as if complete: {text}"
    );
    closed_upstream(&fake, 4).await;
    crate::support::metrics_with_lines(
        &s,
        &[r#"chatcli_llm_errors_total{error_type="timeout",model="gpt-slow",provider="slow"} 4"#],
    )
    .await;
    let lines = audit_lines(&audit, "POST /v1/chat/completions", 4).await;
    let codes: Vec<&str> = lines.iter().map(|l| l["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["504", "504", "504", "200"]);
    assert!(lines.iter().all(|l| l["result"] == "error"), "{lines:?}");
    assert!(
        lines[3]["error"].as_str().unwrap().contains("idle_timeout"),
        "the stream's failure is not in its audit record: {}",
        lines[3]
    );
    fake.release();
    s.shutdown().await;
}

#[tokio::test]
async fn request_route_answers_504_or_an_error_event_after_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let fake = openai_fake().await;
    let s = TestServer::start_with_metrics(slow_config(&fake, &audit)).await;
    let http = http_client();
    for reply in [whole_stalled_before_first_byte(), whole_stalled_midway()] {
        fake.push(reply);
        let (status, text) = post(&http, &s, "/request", json!({"prompt": "hi"})).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (status, &v["success"], &v["code"]),
            (504, &json!(false), &json!("timeout")),
            "{text}"
        );
    }
    fake.push(stream_stalled_before_first_delta());
    let (status, text) = post(
        &http,
        &s,
        "/request",
        json!({"prompt": "hi", "stream": true}),
    )
    .await;
    assert_eq!(status, 504, "{text}");
    fake.push(stream_stalled_after_first_delta());
    let (status, text) = post(
        &http,
        &s,
        "/request",
        json!({"prompt": "hi", "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    assert_eq!(
        events[0],
        json!({"type": "delta", "data": {"delta": "first"}}),
        "{text}"
    );
    let error = events
        .iter()
        .find(|e| e["type"] == "error")
        .unwrap_or_else(|| panic!("no error event: {text}"));
    assert_eq!(error["data"]["code"], "timeout", "{text}");
    assert!(
        !events.iter().any(|e| e["type"] == "response_complete"),
        "{text}"
    );
    closed_upstream(&fake, 4).await;
    let lines = audit_lines(&audit, "POST /request", 4).await;
    assert!(lines.iter().all(|l| l["result"] == "error"), "{lines:?}");
    fake.release();
    s.shutdown().await;
}

#[tokio::test]
async fn a_stall_before_anything_was_sent_moves_on_to_the_next_provider() {
    let slow = openai_fake().await;
    let good = openai_fake().await;
    let mut stalled = openai_provider("slow", &slow, "gpt-slow");
    stalled.first_byte_timeout = SHORT;
    stalled.idle_timeout = SHORT;
    let mut config = Config::default();
    config.llm.providers = vec![stalled, openai_provider("good", &good, "gpt-good")];
    config.llm.fallback = vec!["slow".into(), "good".into()];
    config.llm.fallback_max_retries = 0;
    let mut s = TestServer::start_with(config).await;
    // A whole answer stalled midway was never sent to the caller: the next provider answers it.
    slow.push(whole_stalled_midway());
    let r = within(
        HANG_GUARD,
        "SendPrompt",
        s.client.send_prompt(send_to("", "")),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        (r.provider.as_str(), r.response.as_str()),
        ("good", FAKE_ANSWER)
    );
    // The silent model of `slow` cooled down meanwhile; another of its models has not.
    slow.push(stream_stalled_before_first_delta());
    let mut stream = within(
        HANG_GUARD,
        "StreamPrompt",
        s.client.stream_prompt(stream_to("slow", "gpt-other")),
    )
    .await
    .unwrap()
    .into_inner();
    let msgs = collect_stream(&mut stream).await;
    assert_eq!(msgs.last().unwrap().provider, "good", "{msgs:?}");
    // A stream that stalls after its first delta cannot move on: its caller has that delta.
    slow.push(stream_stalled_after_first_delta());
    let mut stream = within(
        HANG_GUARD,
        "StreamPrompt",
        s.client.stream_prompt(stream_to("slow", "gpt-third")),
    )
    .await
    .unwrap()
    .into_inner();
    let first = within(HANG_GUARD, "the first message", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.chunk.as_str(), first.provider.as_str()),
        ("first", "slow")
    );
    let err = within(HANG_GUARD, "the stream's end", stream.message())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let asked: Vec<Option<String>> = slow.requests().iter().map(|r| r.model()).collect();
    assert_eq!(
        asked,
        [
            Some("gpt-slow".into()),
            Some("gpt-other".into()),
            Some("gpt-third".into())
        ]
    );
    assert_eq!(good.requests().len(), 2);
    slow.release();
    s.shutdown().await;
}

#[tokio::test]
async fn unary_timeout_caps_an_upstream_that_keeps_trickling() {
    let fake = openai_fake().await;
    let mut p = openai_provider("slow", &fake, "gpt-slow");
    // Bytes keep coming, well within the idle bound, and the answer never ends.
    p.idle_timeout = Duration::from_secs(5);
    p.unary_timeout = Duration::from_secs(1);
    let mut config = Config::default();
    config.llm.providers = vec![p];
    let mut s = TestServer::start_with(config).await;
    let mut steps = Vec::new();
    for _ in 0..600 {
        steps.push(Step::Raw(" ".into()));
        steps.push(Step::Pause(Duration::from_millis(50)));
    }
    steps.push(Step::Raw(completion_json("too late")));
    fake.push(Reply::body("application/json", steps));
    let err = within(
        HANG_GUARD,
        "SendPrompt",
        s.client.send_prompt(send_to("", "")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("unary_timeout"), "{err:?}");
    closed_upstream(&fake, 1).await;
    s.shutdown().await;
}

/// The real binary's config: one `openai` provider `slow` at `fake` with these body bounds.
fn slow_toml(fake: &FakeUpstream, first_byte: &str, idle: &str) -> String {
    format!(
        r#"[llm]
fallback_max_retries = 0

[[llm.providers]]
name = "slow"
kind = "openai"
base_url = "{}/v1"
api_key = "sk-test"
model = "gpt-slow"
first_byte_timeout = "{first_byte}"
idle_timeout = "{idle}"
"#,
        fake.base_url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_bounds_are_reloaded_by_the_real_binary() {
    let fake = openai_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chatcli.toml");
    std::fs::write(&path, slow_toml(&fake, "1h", "1h")).unwrap();
    let server = crate::support::BinaryServer::start(&path, &[]);
    crate::support::write_atomically(&path, &slow_toml(&fake, "300ms", "300ms"));
    server.signal("HUP");
    server.wait_for_log("configuration reloaded").await;
    // Under the old bounds (an hour) these calls would hang past the test's guard.
    let mut client = ChatCliServiceClient::new(crate::support::connect(server.addr).await);
    fake.push(stream_stalled_after_first_delta());
    let mut stream = within(
        HANG_GUARD,
        "StreamPrompt",
        client.stream_prompt(stream_to("", "")),
    )
    .await
    .unwrap()
    .into_inner();
    let first = within(HANG_GUARD, "the first message", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.chunk, "first");
    let err = within(HANG_GUARD, "the stream's end", stream.message())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("idle_timeout"), "{err:?}");
    fake.push(whole_stalled_before_first_byte());
    let err = within(
        HANG_GUARD,
        "SendPrompt",
        client.send_prompt(send_to("", "")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("first_byte_timeout"), "{err:?}");
    fake.release();
}
