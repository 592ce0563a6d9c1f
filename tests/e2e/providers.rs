//! LLM providers end to end: gRPC prompts against fake upstreams speaking each wire format. True
//! streaming (tonic and Python grpcio clients see the first delta while the upstream stalls),
//! cancellation reaching the upstream, the fallback chain (rate limit, auth cooldown, all failing,
//! no fallback after the first delta), error mapping without keys, client credentials, the SSRF
//! guard, usage metrics, and providers registered from the existing ChatCLI's environment.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use chatcli::config::{Config, Secret};
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{
    GetServerInfoRequest, SendPromptRequest, SendPromptResponse, StreamPromptRequest,
    StreamPromptResponse,
};
use chatcli::testing::anthropic::AnthropicFormat;
use chatcli::testing::gemini::GeminiFormat;
use chatcli::testing::ollama::OllamaFormat;
use chatcli::testing::openai::error_body;
use chatcli::testing::{FakeUpstream, Recorded, Reply, Step};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{
    BinaryServer, HANG_GUARD, TestServer, chatcli_command, collect_stream, connect,
    metrics_with_lines, openai_fake, openai_provider, python_interpreter, upstream_provider,
    within, write_atomically,
};

/// How long a test waits for a message that must already be on its way.
const FIRST_MESSAGE: Duration = Duration::from_secs(10);

fn send(prompt: &str) -> SendPromptRequest {
    SendPromptRequest {
        prompt: prompt.into(),
        ..SendPromptRequest::default()
    }
}

fn stream_to(provider: &str, prompt: &str) -> StreamPromptRequest {
    StreamPromptRequest {
        prompt: prompt.into(),
        provider: provider.into(),
        ..StreamPromptRequest::default()
    }
}

fn text(steps: &[&str]) -> Vec<Step> {
    steps.iter().map(|s| Step::Text((*s).into())).collect()
}

/// One `openai` provider `primary` (model `gpt-test`) at `fake`.
fn primary_config(fake: &FakeUpstream) -> Config {
    let mut config = Config::default();
    config.llm.providers = vec![openai_provider("primary", fake, "gpt-test")];
    config
}

/// `primary` (gpt-test) then `secondary` (gpt-secondary) with the chain primary → secondary.
fn chain_config(primary: &FakeUpstream, secondary: &FakeUpstream) -> Config {
    let mut config = Config::default();
    config.llm.providers = vec![
        openai_provider("primary", primary, "gpt-test"),
        openai_provider("secondary", secondary, "gpt-secondary"),
    ];
    config.llm.fallback = vec!["primary".into(), "secondary".into()];
    config
}

/// The chat requests a fake received (side routes such as Ollama's `/api/tags` left out).
fn chat_requests(fake: &FakeUpstream) -> Vec<Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path != "/api/tags")
        .collect()
}

/// SendPrompt, bounded.
async fn ask(
    client: &mut ChatCliServiceClient<Channel>,
    req: SendPromptRequest,
) -> Result<SendPromptResponse, tonic::Status> {
    within(HANG_GUARD, "SendPrompt", client.send_prompt(req))
        .await
        .map(tonic::Response::into_inner)
}

/// StreamPrompt up to its response headers, which a streaming server sends before the upstream
/// has finished.
async fn open_stream(
    client: &mut ChatCliServiceClient<Channel>,
    req: StreamPromptRequest,
) -> tonic::Streaming<StreamPromptResponse> {
    within(
        FIRST_MESSAGE,
        "StreamPrompt response headers",
        client.stream_prompt(req),
    )
    .await
    .unwrap()
    .into_inner()
}

async fn next_message(
    stream: &mut tonic::Streaming<StreamPromptResponse>,
) -> Result<Option<StreamPromptResponse>, tonic::Status> {
    tokio::time::timeout(FIRST_MESSAGE, stream.message())
        .await
        .expect("no stream message within 10s")
}

#[tokio::test]
async fn stream_prompt_forwards_the_first_delta_while_the_upstream_stalls() {
    let fake = openai_fake().await;
    fake.push(Reply::steps(vec![
        Step::Text("first".into()),
        Step::AwaitRelease,
        Step::Text(" second".into()),
        Step::Text(" third".into()),
    ]));
    let mut s = TestServer::start_with(primary_config(&fake)).await;
    let mut stream = open_stream(&mut s.client, stream_to("", "count to three")).await;
    // The upstream holds " second" until release(): this message can only be here if the server
    // forwarded the first delta on its own.
    let first = next_message(&mut stream)
        .await
        .unwrap()
        .expect("the stream ended before its first message");
    assert_eq!(first.chunk, "first");
    assert!(!first.done, "the first message must not be done: {first:?}");
    fake.release();
    let rest = collect_stream(&mut stream).await;
    let all: String = std::iter::once(&first)
        .chain(&rest)
        .map(|m| m.chunk.as_str())
        .collect();
    assert_eq!(all, "first second third");
    let last = rest.last().expect("nothing after the first message");
    assert!(last.done, "the last message must be done: {last:?}");
    assert_eq!(
        (last.provider.as_str(), last.model.as_str()),
        ("primary", "gpt-test")
    );
    assert!(rest[..rest.len() - 1].iter().all(|m| !m.done));
    s.shutdown().await;
}

/// One gRPC message in its length-prefixed frame.
fn grpc_frame(msg: &impl prost::Message) -> bytes::Bytes {
    let mut buf = vec![0u8];
    buf.extend_from_slice(&u32::try_from(msg.encoded_len()).unwrap().to_be_bytes());
    msg.encode_raw(&mut buf);
    buf.into()
}

/// The next whole gRPC message of `body`, read into `buf` as needed; `None` at the body's end.
async fn next_frame(
    body: &mut h2::RecvStream,
    buf: &mut bytes::BytesMut,
) -> Option<StreamPromptResponse> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() >= 5 + len {
                let frame = buf.split_to(5 + len);
                return Some(prost::Message::decode(&frame[5..]).unwrap());
            }
        }
        let data = within(FIRST_MESSAGE, "the next gRPC message", body.data()).await?;
        let data = data.unwrap();
        body.flow_control().release_capacity(data.len()).unwrap();
        buf.extend_from_slice(&data);
    }
}

/// gRPC's own clients (and the benchmark's load client) send a request's HEADERS and its one
/// DATA frame in one write, where tonic's client sends them in two: over such a client too the
/// first delta comes out while the upstream holds the rest.
#[tokio::test]
async fn stream_prompt_sent_in_one_write_gets_the_first_delta_while_the_upstream_stalls() {
    let fake = openai_fake().await;
    fake.push(Reply::steps(vec![
        Step::Text("first".into()),
        Step::AwaitRelease,
        Step::Text(" second".into()),
    ]));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = within(FIRST_MESSAGE, "HTTP/2 ready", h2.ready())
        .await
        .unwrap();
    let req = http::Request::post(format!(
        "http://{}/chatcli.v1.ChatCLIService/StreamPrompt",
        s.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (answer, mut send) = h2.send_request(req, false).unwrap();
    // Queued before the connection's task writes the HEADERS, so both leave together.
    send.send_data(grpc_frame(&stream_to("", "count to two")), true)
        .unwrap();
    let answer = within(FIRST_MESSAGE, "StreamPrompt headers", answer)
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let mut buf = bytes::BytesMut::new();
    // The upstream holds " second" until release(): the first message is here only if the
    // server forwarded the first delta on its own.
    let first = next_frame(&mut body, &mut buf)
        .await
        .expect("the stream ended before its first message");
    assert_eq!((first.chunk.as_str(), first.done), ("first", false));
    fake.release();
    let mut rest = Vec::new();
    while let Some(m) = next_frame(&mut body, &mut buf).await {
        rest.push(m);
    }
    let text: String = rest.iter().map(|m| m.chunk.as_str()).collect();
    assert_eq!(text, " second");
    assert!(rest.last().is_some_and(|m| m.done), "{rest:?}");
    s.shutdown().await;
}

#[tokio::test]
async fn python_grpcio_client_sees_the_first_chunk_before_the_upstream_continues() {
    let python = python_interpreter();
    let fake = openai_fake().await;
    fake.push(Reply::steps(vec![
        Step::Text("first".into()),
        Step::AwaitRelease,
        Step::Text(" second".into()),
        Step::Text(" third".into()),
    ]));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/stream_peer.py");
    let home = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(&python)
        .arg(&peer)
        .arg(s.addr.to_string())
        .arg("primary")
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
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut buf = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr_pipe, &mut buf).await;
        buf
    });
    // Generating the stubs takes a few seconds; the bound only keeps a stuck peer from hanging.
    let limit = Duration::from_secs(120);
    let first = tokio::time::timeout(limit, stdout.next_line())
        .await
        .expect("the python peer printed nothing within 120s")
        .unwrap();
    let Some(first) = first else {
        let status = within(limit, "the python peer's exit", child.wait()).await;
        let stderr = within(limit, "the python peer's stderr", stderr).await;
        panic!(
            "the python peer exited ({status:?}) before its FIRST line:\n{}",
            stderr.unwrap()
        );
    };
    // The fake still holds the rest of the answer here.
    assert_eq!(first, "FIRST first");
    assert!(chat_requests(&fake).len() == 1 && fake.cancelled() == 0);
    fake.release();
    within(limit, "writing go", async {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await
    })
    .await
    .unwrap();
    let mut lines = Vec::new();
    while let Some(line) = tokio::time::timeout(limit, stdout.next_line())
        .await
        .expect("the python peer stalled after go")
        .unwrap()
    {
        lines.push(line);
    }
    let status = within(limit, "the python peer's exit", child.wait())
        .await
        .unwrap();
    let stderr = within(limit, "the python peer's stderr", stderr)
        .await
        .unwrap();
    assert!(
        status.success(),
        "python stream peer failed ({status}):\n--- stdout\n{lines:?}\n--- stderr\n{stderr}"
    );
    assert_eq!(
        lines,
        vec!["REST  second third", "DONE primary gpt-test"],
        "stderr:\n{stderr}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn dropping_the_stream_aborts_the_upstream_request() {
    let fake = openai_fake().await;
    fake.push(Reply::steps(vec![
        Step::Text("a".into()),
        Step::AwaitRelease,
        Step::Text("b".into()),
    ]));
    let s = TestServer::start_with(primary_config(&fake)).await;
    let mut client = ChatCliServiceClient::new(connect(s.addr).await);
    let mut stream = open_stream(&mut client, stream_to("", "go slowly")).await;
    let first = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.chunk, "a");
    assert_eq!(fake.cancelled(), 0);
    drop(stream);
    drop(client);
    assert!(
        fake.wait_cancelled(1, Duration::from_secs(10)).await,
        "the upstream request was not aborted after the client went away"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn rate_limited_primary_falls_back_to_the_secondary() {
    let primary = openai_fake().await;
    let secondary = openai_fake().await;
    // Longer than the server is willing to wait: it moves on at once.
    primary.push(Reply::rate_limited(
        &error_body("rate_limit_exceeded", "slow down"),
        60,
    ));
    secondary.push(Reply::text("from secondary"));
    let mut config = chain_config(&primary, &secondary);
    config.llm.fallback_max_retries = 0;
    let mut s = TestServer::start_with_metrics(config).await;
    let r = ask(&mut s.client, send("hello")).await.unwrap();
    assert_eq!(r.response, "from secondary");
    assert_eq!(
        (r.provider.as_str(), r.model.as_str()),
        ("secondary", "gpt-secondary")
    );
    assert_eq!(chat_requests(&primary).len(), 1);
    assert_eq!(chat_requests(&secondary).len(), 1);
    metrics_with_lines(
        &s,
        &[r#"chatcli_llm_fallback_total{from="primary",reason="rate_limit",to="secondary"} 1"#],
    )
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn auth_failure_cools_the_provider_down_and_the_next_call_skips_it() {
    let primary = openai_fake().await;
    let secondary = openai_fake().await;
    primary.push(Reply::error(
        401,
        &error_body("invalid_api_key", "Incorrect API key provided"),
    ));
    secondary.push(Reply::text("first answer"));
    secondary.push(Reply::text("second answer"));
    let mut config = chain_config(&primary, &secondary);
    config.llm.fallback_max_retries = 0;
    let mut s = TestServer::start_with(config).await;
    for want in ["first answer", "second answer"] {
        let r = ask(&mut s.client, send("hello")).await.unwrap();
        assert_eq!(
            (r.response.as_str(), r.provider.as_str()),
            (want, "secondary")
        );
    }
    // Unscripted, the primary would have answered the second call: it was skipped.
    assert_eq!(
        chat_requests(&primary).len(),
        1,
        "the cooled-down primary was called again"
    );
    assert_eq!(chat_requests(&secondary).len(), 2);
    s.shutdown().await;
}

#[tokio::test]
async fn every_provider_failing_is_unavailable_with_each_reason() {
    let primary = openai_fake().await;
    let secondary = openai_fake().await;
    primary.set_default(Reply::error(
        500,
        &error_body("server_error", "primary broke"),
    ));
    secondary.set_default(Reply::error(
        500,
        &error_body("server_error", "secondary broke"),
    ));
    let mut config = chain_config(&primary, &secondary);
    config.llm.fallback_max_retries = 0;
    let mut s = TestServer::start_with(config).await;
    let err = ask(&mut s.client, send("hello")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    for name in ["primary", "secondary"] {
        assert!(err.message().contains(name), "{name} missing: {err:?}");
    }
    assert_eq!(chat_requests(&primary).len(), 1);
    assert_eq!(chat_requests(&secondary).len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn a_failure_after_the_first_delta_is_reported_not_retried() {
    let primary = openai_fake().await;
    let secondary = openai_fake().await;
    primary.push(Reply::steps(vec![
        Step::Text("partial".into()),
        Step::AwaitRelease,
        Step::Drop,
    ]));
    // Default retries: neither a retry of the primary nor the secondary may happen.
    let mut s = TestServer::start_with(chain_config(&primary, &secondary)).await;
    let mut stream = open_stream(&mut s.client, stream_to("", "tell me")).await;
    let first = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.chunk, "partial");
    assert!(!first.done);
    primary.release();
    let status = loop {
        match tokio::time::timeout(HANG_GUARD, stream.message())
            .await
            .expect("the stream hung after the upstream dropped")
        {
            Ok(Some(m)) => assert!(!m.done, "a broken answer ended with done=true: {m:?}"),
            Ok(None) => panic!("the stream ended cleanly after the upstream dropped"),
            Err(status) => break status,
        }
    };
    assert_ne!(status.code(), Code::Ok);
    assert!(status.message().contains("primary"), "{status:?}");
    assert!(
        chat_requests(&secondary).is_empty(),
        "a stream fell back after its first delta"
    );
    assert_eq!(chat_requests(&primary).len(), 1, "the primary was retried");
    s.shutdown().await;
}

#[tokio::test]
async fn upstream_auth_error_is_a_clear_status_without_the_key() {
    let fake = openai_fake().await;
    // OpenAI quotes the wrong key back; the caller must not see it.
    fake.push(Reply::error(
        401,
        &error_body(
            "invalid_api_key",
            "Incorrect API key provided: sk-test. You can find your API key in your account.",
        ),
    ));
    let mut s = TestServer::start_with(primary_config(&fake)).await;
    let err = ask(&mut s.client, send("hello")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("auth"), "{err:?}");
    assert!(err.message().contains("primary"), "{err:?}");
    assert!(
        !err.message().contains("sk-test"),
        "the key leaked: {err:?}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn client_api_key_is_used_for_that_request_only() {
    let fake = openai_fake().await;
    let mut s = TestServer::start_with(primary_config(&fake)).await;
    let mut req = send("with my key");
    req.client_api_key = "apikey:sk-client".into();
    let r = ask(&mut s.client, req).await.unwrap();
    assert_eq!(r.response, "hello from the fake");
    let r = ask(&mut s.client, send("with the server's key"))
        .await
        .unwrap();
    assert_eq!(r.response, "hello from the fake");
    let auth: Vec<Option<String>> = chat_requests(&fake)
        .iter()
        .map(|r| r.header("authorization"))
        .collect();
    assert_eq!(
        auth,
        vec![
            Some("Bearer sk-client".to_string()),
            Some("Bearer sk-test".to_string())
        ]
    );
    // SendPrompt takes the whole answer, so the upstream is asked for it in one response.
    assert!(
        chat_requests(&fake)
            .iter()
            .all(|r| r.json()["stream"] == false)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn provider_config_url_to_cloud_metadata_is_refused() {
    let ollama = FakeUpstream::start(OllamaFormat::with_models(&["llama3:latest"]))
        .await
        .unwrap();
    let mut config = Config::default();
    config.llm.providers = vec![upstream_provider(
        "local",
        "ollama",
        ollama.base_url(),
        "llama3",
    )];
    // http is allowed, so the refusal is about the address, not the scheme.
    config.llm.allow_http_providers = true;
    let mut s = TestServer::start_with(config).await;
    let mut req = send("hello");
    req.provider = "local".into();
    // The caller's own key, so that the URL itself is what is judged.
    req.client_api_key = "caller-key".into();
    req.provider_config = [(
        "base_url".to_string(),
        "http://169.254.169.254/".to_string(),
    )]
    .into_iter()
    .collect();
    let err = ask(&mut s.client, req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("169.254.169.254"), "{err:?}");
    assert!(err.message().contains("metadata"), "says why: {err:?}");
    assert!(
        chat_requests(&ollama).is_empty(),
        "a refused call still reached the operator's Ollama"
    );
    // The provider itself works: the refusal was about the URL.
    ollama.push(Reply::text("from ollama"));
    let mut req = send("hello");
    req.provider = "local".into();
    let r = ask(&mut s.client, req).await.unwrap();
    assert_eq!(r.response, "from ollama");
    s.shutdown().await;
}

#[tokio::test]
async fn token_usage_and_success_are_counted() {
    let fake = openai_fake().await;
    fake.push(Reply::text("three little words"));
    let mut s = TestServer::start_with_metrics(primary_config(&fake)).await;
    let r = ask(&mut s.client, send("count me")).await.unwrap();
    assert_eq!(r.response, "three little words");
    let text = metrics_with_lines(
        &s,
        &[r#"chatcli_llm_requests_total{model="gpt-test",provider="primary",status="success"} 1"#],
    )
    .await;
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    let completion = value(
        r#"chatcli_llm_tokens_used_total{model="gpt-test",provider="primary",type="completion"}"#,
    );
    assert!(completion > 0.0, "completion tokens = {completion}");
    let prompt = value(
        r#"chatcli_llm_tokens_used_total{model="gpt-test",provider="primary",type="prompt"}"#,
    );
    assert!(prompt > 0.0, "prompt tokens = {prompt}");
    s.shutdown().await;
}

/// `[state] data_dir` only: every provider comes from the environment.
fn minimal_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("chatcli.toml");
    let data = dir.join("data");
    std::fs::write(
        &path,
        format!("[state]\ndata_dir = {:?}\n", data.display().to_string()),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn providers_register_from_the_chatcli_environment() {
    let openai = openai_fake().await;
    let anthropic = FakeUpstream::start(AnthropicFormat).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path());
    let openai_url = format!("{}/v1", openai.base_url());
    let anthropic_url = anthropic.base_url();
    let env = [
        ("OPENAI_API_KEY", "sk-env"),
        ("OPENAI_API_URL", openai_url.as_str()),
        ("OPENAI_MODEL", "gpt-env"),
        ("ANTHROPIC_API_KEY", "x"),
        ("ANTHROPIC_BASE_URL", anthropic_url.as_str()),
    ];

    let server = BinaryServer::start_with_env(&config, &[], &env);
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    let info = within(
        HANG_GUARD,
        "GetServerInfo",
        client.get_server_info(GetServerInfoRequest {}),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(info.available_providers, vec!["CLAUDEAI", "OPENAI"]);
    assert_eq!(
        info.provider, "CLAUDEAI",
        "the first registered is the default"
    );

    openai.push(Reply::text("from the env provider"));
    let mut req = send("hello");
    req.provider = "openai".into();
    let r = ask(&mut client, req).await.unwrap();
    assert_eq!(r.response, "from the env provider");
    assert_eq!(
        (r.provider.as_str(), r.model.as_str()),
        ("OPENAI", "gpt-env")
    );
    let seen = chat_requests(&openai);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(
        seen[0].header("authorization").as_deref(),
        Some("Bearer sk-env")
    );
    assert_eq!(seen[0].json()["model"], "gpt-env");
    assert!(chat_requests(&anthropic).is_empty());

    // A failure that quotes the key: neither the caller nor the log may show it.
    openai.push(Reply::error(
        401,
        &error_body("invalid_api_key", "Incorrect API key provided: sk-env"),
    ));
    let mut req = send("hello again");
    req.provider = "OpenAI".into();
    let err = ask(&mut client, req).await.unwrap_err();
    assert!(!err.message().contains("sk-env"), "{err:?}");
    drop(client);
    let log = server.stderr();
    assert!(!log.contains("sk-env"), "the key is in the log:\n{log}");
    drop(server);

    let mut env = env.to_vec();
    env.push(("LLM_PROVIDER", "OPENAI"));
    let server = BinaryServer::start_with_env(&config, &[], &env);
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    let info = within(
        HANG_GUARD,
        "GetServerInfo",
        client.get_server_info(GetServerInfoRequest {}),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(info.available_providers, vec!["CLAUDEAI", "OPENAI"]);
    assert_eq!(
        (info.provider.as_str(), info.model.as_str()),
        ("OPENAI", "gpt-env")
    );
    let log = server.stderr();
    assert!(!log.contains("sk-env"), "the key is in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_keys_come_from_files_named_by_file_variables() {
    let openai = openai_fake().await;
    let anthropic = FakeUpstream::start(AnthropicFormat).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path());
    // systemd's LoadCredential= directory holds the OpenAI key under a relative name; the
    // Anthropic key is a file given by its absolute path.
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("openai"), "sk-from-credentials\n").unwrap();
    let anthropic_key = dir.path().join("anthropic.key");
    std::fs::write(&anthropic_key, "sk-ant-from-file\n").unwrap();
    let openai_url = format!("{}/v1", openai.base_url());
    let anthropic_url = anthropic.base_url();
    let env = [
        ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
        ("OPENAI_API_KEY_FILE", "openai"),
        ("OPENAI_API_URL", openai_url.as_str()),
        ("ANTHROPIC_API_KEY_FILE", anthropic_key.to_str().unwrap()),
        ("ANTHROPIC_BASE_URL", anthropic_url.as_str()),
    ];
    let server = BinaryServer::start_with_env(&config, &[], &env);
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    let info = within(
        HANG_GUARD,
        "GetServerInfo",
        client.get_server_info(GetServerInfoRequest {}),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(info.available_providers, vec!["CLAUDEAI", "OPENAI"]);
    openai.push(Reply::text("keyed from a file"));
    let mut req = send("hello");
    req.provider = "OPENAI".into();
    assert_eq!(
        ask(&mut client, req).await.unwrap().response,
        "keyed from a file"
    );
    assert_eq!(
        chat_requests(&openai)[0].header("authorization").as_deref(),
        Some("Bearer sk-from-credentials")
    );
    // The file is watched like any key file: a rotated key is used without a restart.
    write_atomically(&creds.join("openai"), "sk-rotated\n");
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        openai.push(Reply::text("after rotation"));
        let mut req = send("hello");
        req.provider = "OPENAI".into();
        ask(&mut client, req).await.unwrap();
        let last = chat_requests(&openai).pop().unwrap();
        if last.header("authorization").as_deref() == Some("Bearer sk-rotated") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated key was never used; stderr:\n{}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anthropic.push(Reply::text("also keyed from a file"));
    let mut req = send("hello");
    req.provider = "CLAUDEAI".into();
    ask(&mut client, req).await.unwrap();
    assert_eq!(
        chat_requests(&anthropic)[0].header("x-api-key").as_deref(),
        Some("sk-ant-from-file")
    );
    drop(client);
    let log = server.stderr();
    for key in ["sk-from-credentials", "sk-rotated", "sk-ant-from-file"] {
        assert!(!log.contains(key), "{key} is in the log:\n{log}");
    }
    drop(server);

    // The variable and its file twin together are a config error naming both.
    let out = chatcli_command(dir.path())
        .args(["config", "check", "--config"])
        .arg(&config)
        .envs(env)
        .env("OPENAI_API_KEY", "sk-env")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("both OPENAI_API_KEY and OPENAI_API_KEY_FILE are set"),
        "{stderr}"
    );
    assert!(!stderr.contains("sk-env"), "{stderr}");
}

#[tokio::test]
async fn each_wire_format_streams_through_grpc() {
    let anthropic = FakeUpstream::start(AnthropicFormat).await.unwrap();
    let gemini = FakeUpstream::start(GeminiFormat).await.unwrap();
    let ollama = FakeUpstream::start(OllamaFormat::with_models(&["llama3:latest"]))
        .await
        .unwrap();
    let mut config = Config::default();
    config.llm.providers = vec![
        upstream_provider("claude", "anthropic", anthropic.base_url(), "claude-test"),
        upstream_provider("google", "gemini", gemini.base_url(), "gemini-test"),
        upstream_provider("local", "ollama", ollama.base_url(), "llama3"),
    ];
    config.llm.providers[2].api_key = None::<Secret>;
    let mut s = TestServer::start_with(config).await;
    let cases = [
        ("claude", "claude-test", &anthropic, "/v1/messages"),
        (
            "google",
            "gemini-test",
            &gemini,
            "/v1beta/models/gemini-test:streamGenerateContent",
        ),
        ("local", "llama3", &ollama, "/api/chat"),
    ];
    for (provider, model, fake, path) in cases {
        let answer = format!("hello from {provider}");
        fake.push(Reply::Answer {
            steps: text(&["hello", " from", &format!(" {provider}")]),
            usage: None,
        });
        let mut stream = open_stream(&mut s.client, stream_to(provider, "hi")).await;
        let msgs = collect_stream(&mut stream).await;
        let all: String = msgs.iter().map(|m| m.chunk.as_str()).collect();
        assert_eq!(all, answer, "{provider}");
        let last = msgs.last().unwrap();
        assert!(last.done, "{provider}: {last:?}");
        assert_eq!(
            (last.provider.as_str(), last.model.as_str()),
            (provider, model)
        );
        let seen = chat_requests(fake);
        assert_eq!(seen.len(), 1, "{provider}: {seen:?}");
        assert_eq!(seen[0].path, path, "{provider}");
    }
    s.shutdown().await;
}

/// The OpenAI-format provider's fast path (hyper-util's client driven directly) speaks TLS to an
/// `https` upstream, verifies it against the platform's roots (here only the test CA, through
/// `SSL_CERT_FILE`), takes HTTP/2 when the upstream offers it, and carries unary and streamed
/// calls; without the CA the same upstream is refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_https_upstream_is_verified_and_spoken_to_over_http2() {
    let ca = crate::support::TestCa::new("upstream test CA");
    let cert = ca.server_cert(&[7]);
    let fake = FakeUpstream::start_tls(
        chatcli::testing::openai::OpenAiFormat,
        &cert.cert_pem,
        &cert.key_pem,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path());
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let url = format!("{}/v1", fake.base_url());
    assert!(url.starts_with("https://localhost:"), "{url}");
    let env = [
        ("OPENAI_API_KEY", "sk-tls"),
        ("OPENAI_API_URL", url.as_str()),
        ("OPENAI_MODEL", "gpt-tls"),
        ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
    ];
    let server = BinaryServer::start_with_env(&config, &[], &env);
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);

    fake.push(Reply::text("over TLS, whole"));
    let r = ask(&mut client, send("unary")).await.unwrap();
    assert_eq!(r.response, "over TLS, whole");

    fake.push(Reply::steps(text(&["over ", "TLS, ", "streamed"])));
    let mut stream = open_stream(&mut client, stream_to("openai", "streamed")).await;
    let text: String = collect_stream(&mut stream)
        .await
        .iter()
        .map(|m| m.chunk.as_str())
        .collect();
    assert_eq!(text, "over TLS, streamed");

    let seen = chat_requests(&fake);
    assert_eq!(seen.len(), 2, "{seen:?}");
    for r in &seen {
        assert_eq!(r.version, http::Version::HTTP_2, "ALPN picks HTTP/2");
        assert_eq!(r.header("authorization").as_deref(), Some("Bearer sk-tls"));
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        let agent = r.header("user-agent").unwrap_or_default();
        assert!(agent.starts_with("chatcli/"), "{agent}");
    }
    assert_eq!(seen[0].json()["stream"], false);
    assert_eq!(seen[1].json()["stream"], true);
    drop(client);

    // The same upstream with another CA as the only root: its certificate is refused.
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, crate::support::TestCa::new("another CA").ca_pem).unwrap();
    let untrusting = [
        env[0],
        env[1],
        env[2],
        ("SSL_CERT_FILE", other_ca.to_str().unwrap()),
    ];
    let server2 = BinaryServer::start_with_env(&config, &[], &untrusting);
    let mut client = ChatCliServiceClient::new(connect(server2.addr).await);
    let err = ask(&mut client, send("refused")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().to_lowercase().contains("certificate"),
        "the error names the certificate: {err:?}"
    );
    assert_eq!(
        chat_requests(&fake).len(),
        2,
        "nothing reached the upstream"
    );
}

/// With `HTTP_PROXY` set, upstream calls go through the proxy (the fast path, which does not
/// speak to proxies, stands aside): the proxy receives the absolute URL of an upstream host that
/// does not even resolve.
#[tokio::test(flavor = "multi_thread")]
async fn an_environment_proxy_carries_the_upstream_calls() {
    let proxy = openai_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path());
    let proxy_url = proxy.base_url();
    let env = [
        ("OPENAI_API_KEY", "sk-proxied"),
        ("OPENAI_API_URL", "http://upstream.invalid/v1"),
        ("OPENAI_MODEL", "gpt-proxied"),
        ("HTTP_PROXY", proxy_url.as_str()),
    ];
    let server = BinaryServer::start_with_env(&config, &[], &env);
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    proxy.push(Reply::text("via the proxy"));
    let r = ask(&mut client, send("hello")).await.unwrap();
    assert_eq!(r.response, "via the proxy");
    let seen = chat_requests(&proxy);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].target,
        "http://upstream.invalid/v1/chat/completions"
    );
    assert_eq!(
        seen[0].header("authorization").as_deref(),
        Some("Bearer sk-proxied")
    );
}

/// The ids `GET /v1/models` lists, in order.
async fn model_ids(http: &reqwest::Client, url: &str) -> Vec<String> {
    let v: serde_json::Value = crate::support::get_json(http, url).await;
    v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no model list: {v}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn models_lists_listed_and_discovered_models_and_slashed_ids_reach_the_default() {
    // An OpenRouter-like default whose model ids have a `/` of their own, beside providers whose
    // names are such prefixes.
    let router = openai_fake().await;
    router.set_models(&["openai/gpt-5.2", "anthropic/claude-x", "meta-llama/llama-3"]);
    let anthropic = FakeUpstream::start(AnthropicFormat).await.unwrap();
    anthropic.set_models(&["claude-a", "claude-b", "claude-c"]);
    let google = FakeUpstream::start(GeminiFormat).await.unwrap();
    google.set_models(&["gemini-2.5-flash", "text-embedding-004", "gemini-2.5-pro"]);
    let ollama = FakeUpstream::start(OllamaFormat::with_models(&["llama3:latest", "qwen2:7b"]))
        .await
        .unwrap();
    let mut config = Config::default();
    let mut r = upstream_provider(
        "router",
        "openrouter",
        format!("{}/v1", router.base_url()),
        "openai/gpt-5.2",
    );
    r.models = vec!["mistral/large".into()];
    r.discover_models = true;
    let mut a = upstream_provider("anthropic", "anthropic", anthropic.base_url(), "claude-own");
    a.discover_models = true;
    let mut g = upstream_provider("google", "gemini", google.base_url(), "gemini-2.5-flash");
    g.discover_models = true;
    let mut o = upstream_provider("local", "ollama", ollama.base_url(), "llama3");
    o.discover_models = true;
    // Listed, not discovered.
    let mut listed = openai_provider("plain", &router, "gpt-plain");
    listed.models = vec!["gpt-other".into()];
    config.llm.providers = vec![r, a, g, o, listed];
    let s = TestServer::start_with(config).await;
    let http = crate::support::http_client();

    // A slashed id resolves before anyone listed models: the lists it depends on are fetched.
    let ask = |model: &str| serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let answered = |body: serde_json::Value| body["model"].as_str().unwrap().to_string();
    let completions = s.url("/v1/chat/completions");
    let post = |model: &str| http.post(&completions).json(&ask(model)).send();
    let cases = [
        // The default provider discovered it, and `anthropic` does not offer `claude-x`.
        ("anthropic/claude-x", "router/anthropic/claude-x"),
        // `anthropic` offers its own (discovered) model: the prefix wins.
        ("anthropic/claude-b", "anthropic/claude-b"),
        // No provider is named `meta-llama` (or `vendor`): the default provider gets the id.
        ("meta-llama/llama-3", "router/meta-llama/llama-3"),
        ("vendor/unlisted", "router/vendor/unlisted"),
        ("mistral/large", "router/mistral/large"),
        ("google/gemini-2.5-pro", "google/gemini-2.5-pro"),
    ];
    for (id, want) in cases {
        let resp = within(HANG_GUARD, id, post(id)).await.unwrap();
        assert_eq!(resp.status(), 200, "{id}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(answered(body), want, "{id}");
    }
    let asked: Vec<String> = router
        .requests()
        .iter()
        .filter(|r| r.method == reqwest::Method::POST)
        .filter_map(|r| r.model())
        .collect();
    assert_eq!(
        asked,
        [
            "anthropic/claude-x",
            "meta-llama/llama-3",
            "vendor/unlisted",
            "mistral/large"
        ]
    );
    let to_anthropic: Vec<String> = anthropic
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/messages")
        .filter_map(|r| r.model())
        .collect();
    assert_eq!(to_anthropic, ["claude-b"]);

    let ids = model_ids(&http, &s.url("/v1/models")).await;
    assert_eq!(
        ids,
        [
            "router/openai/gpt-5.2",
            "router/mistral/large",
            "router/anthropic/claude-x",
            "router/meta-llama/llama-3",
            "anthropic/claude-own",
            "anthropic/claude-a",
            "anthropic/claude-b",
            "anthropic/claude-c",
            "google/gemini-2.5-flash",
            "google/gemini-2.5-pro",
            "local/llama3",
            "local/llama3:latest",
            "local/qwen2:7b",
            "plain/gpt-plain",
            "plain/gpt-other",
        ]
    );
    // Cached: a second listing asks no upstream again.
    let lists_asked = |f: &FakeUpstream| {
        f.requests()
            .iter()
            .filter(|r| r.method == reqwest::Method::GET)
            .count()
    };
    let before = [&router, &anthropic, &google].map(lists_asked);
    assert_eq!(model_ids(&http, &s.url("/v1/models")).await, ids);
    assert_eq!([&router, &anthropic, &google].map(lists_asked), before);
    s.shutdown().await;
}

/// The real binary's config: an `openai` provider `router` at `fake` discovering its models.
fn discovering_toml(fake: &FakeUpstream, refresh: &str) -> String {
    format!(
        r#"[[llm.providers]]
name = "router"
kind = "openai"
base_url = "{}/v1"
api_key = "sk-test"
model = "gpt-1"
discover_models = true
models_refresh = "{refresh}"
"#,
        fake.base_url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_models_are_refreshed_on_reload_and_once_stale() {
    let fake = openai_fake().await;
    fake.set_models(&["gpt-1", "gpt-2"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chatcli.toml");
    std::fs::write(&path, discovering_toml(&fake, "1h")).unwrap();
    let server = BinaryServer::start(&path, &[]);
    let http = crate::support::http_client();
    let url = format!("http://{}/v1/models", server.addr);
    assert_eq!(
        model_ids(&http, &url).await,
        ["router/gpt-1", "router/gpt-2"]
    );
    // The upstream gains a model: an hour-long refresh period keeps the list, a reload does not.
    fake.set_models(&["gpt-1", "gpt-2", "gpt-3"]);
    assert_eq!(
        model_ids(&http, &url).await,
        ["router/gpt-1", "router/gpt-2"]
    );
    std::fs::write(&path, discovering_toml(&fake, "300ms")).unwrap();
    server.signal("HUP");
    server.wait_for_log("configuration reloaded").await;
    assert_eq!(
        model_ids(&http, &url).await,
        ["router/gpt-1", "router/gpt-2", "router/gpt-3"]
    );
    // With a short period, a later listing refreshes it again, in the background.
    fake.set_models(&["gpt-1", "gpt-4"]);
    crate::support::eventually("the refreshed list", || async {
        (model_ids(&http, &url).await == ["router/gpt-1", "router/gpt-4"]).then_some(())
    })
    .await;
}
