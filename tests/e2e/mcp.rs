//! MCP tools in prompts against the real server: the test MCP server of the support code
//! (`chatcli-test-mcp` over stdio, [`FakeMcpHttp`] over streamable HTTP), a fake upstream that asks
//! for a tool call in the OpenAI or Anthropic format, and the events, metadata and audit that
//! follow; a tool that hangs, a server that dies mid-call, and a readonly caller who gets no tools.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chatcli::auth::Role;
use chatcli::config::{Config, NamedToken, ProviderConfig};
use chatcli::proto::SendPromptRequest;
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::testing::FakeUpstream;
use chatcli::testing::mcp::FakeMcpHttp;
use chatcli::testing::{Reply, openai};
use serde_json::{Value, json};

use crate::support::{
    BearerToken, TestServer, eventually, http_client, metrics_with_lines, openai_fake,
    openai_provider, sha256_hex, upstream_provider,
};

fn token(name: &str, role: Role) -> NamedToken {
    NamedToken {
        name: name.into(),
        role,
        sha256: Some(sha256_hex(&format!("tok-{name}"))),
        ..NamedToken::default()
    }
}

/// The stdio test server's program.
fn stdio_server() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chatcli-test-mcp"))
}

/// A config with `provider` and the servers file `servers` (written into `dir`).
fn config(dir: &Path, provider: ProviderConfig, servers: Value) -> Config {
    let file = dir.join("mcp_servers.json");
    std::fs::write(&file, json!({ "mcpServers": servers }).to_string()).unwrap();
    let mut c = Config::default();
    c.llm.default = Some(provider.name.clone());
    c.llm.providers = vec![provider];
    c.auth.tokens = vec![
        token("admin", Role::Admin),
        token("user", Role::User),
        token("reader", Role::ReadOnly),
    ];
    c.catalog.mcp_config = Some(file);
    c.audit.path = Some(dir.join("audit.log"));
    c
}

fn stdio_entry(name: &str, timeout_secs: u64) -> Value {
    json!({"name": name, "command": stdio_server(), "timeout": timeout_secs})
}

/// Waits until the server `name` is connected.
async fn ready(server: &TestServer, name: &str) {
    metrics_with_lines(
        server,
        &[&format!("chatcli_mcp_server_up{{server=\"{name}\"}} 1")],
    )
    .await;
}

/// `POST /request` with `stream: true` as `who`: the SSE events' `{type, data}` objects.
async fn request_events(server: &TestServer, who: &str, prompt: &str) -> Vec<Value> {
    let resp = http_client()
        .post(server.url("/request"))
        .bearer_auth(format!("tok-{who}"))
        .header("accept", "text/event-stream")
        .json(&json!({"prompt": prompt, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v.get("type").is_some())
        .collect()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

fn answer_text(events: &[Value]) -> String {
    of_type(events, "delta")
        .iter()
        .map(|e| e["data"]["delta"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The audit records of `dir`'s audit log once one with `method` is written.
async fn audit_records(dir: &Path, method: &str) -> Vec<Value> {
    let file = dir.join("audit.log");
    eventually(&format!("an audit record of {method}"), || async {
        let text = std::fs::read_to_string(&file).ok()?;
        let records: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        records
            .iter()
            .any(|r| r["method"] == method)
            .then_some(records)
    })
    .await
}

async fn openai_setup(servers: Value) -> (tempfile::TempDir, FakeUpstream, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let fake = openai_fake().await;
    let c = config(
        dir.path(),
        openai_provider("oa", &fake, "gpt-test"),
        servers,
    );
    let server = TestServer::start_with_metrics(c).await;
    (dir, fake, server)
}

#[tokio::test]
async fn an_openai_tool_call_runs_on_the_stdio_server_and_the_answer_follows() {
    let (_dir, fake, server) = openai_setup(json!([stdio_entry("fake", 30)])).await;
    ready(&server, "fake").await;
    fake.push(openai::tool_calls_reply(&[(
        "call_1",
        "echo",
        json!({"text": "hi"}),
    )]));
    fake.push(Reply::text("The tool said echo: hi"));

    let events = request_events(&server, "user", "use the tool").await;
    let calls = of_type(&events, "tool_call");
    assert_eq!(calls.len(), 1, "{events:?}");
    assert_eq!(calls[0]["data"]["name"], "echo");
    assert_eq!(calls[0]["data"]["server"], "fake");
    assert_eq!(calls[0]["data"]["arguments"], json!({"text": "hi"}));
    let results = of_type(&events, "tool_result");
    assert_eq!(results.len(), 1, "{events:?}");
    assert_eq!(results[0]["data"]["outcome"], "ok");
    assert_eq!(results[0]["data"]["result"], "echo: hi");
    assert_eq!(answer_text(&events), "The tool said echo: hi");
    assert_eq!(of_type(&events, "response_complete").len(), 1);

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let first = reqs[0].json();
    let offered: Vec<&str> = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(offered, ["echo", "fail", "hang", "die", "garbage"]);
    assert_eq!(
        first["tools"][0]["function"]["parameters"]["required"],
        json!(["text"])
    );
    let second = reqs[1].json();
    let msgs = second["messages"].as_array().unwrap();
    let n = msgs.len();
    assert_eq!(msgs[n - 2]["role"], "assistant");
    assert_eq!(msgs[n - 2]["tool_calls"][0]["id"], "call_1");
    assert_eq!(msgs[n - 2]["tool_calls"][0]["function"]["name"], "echo");
    assert_eq!(
        msgs[n - 1],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "echo: hi"})
    );

    metrics_with_lines(
        &server,
        &[r#"chatcli_mcp_tool_calls_total{outcome="ok",server="fake",tool="echo"} 1"#],
    )
    .await;

    // The tool call has an audit record of its own, with the caller and without the arguments.
    let records = audit_records(_dir.path(), "MCP tools/call").await;
    let prompt = records
        .iter()
        .find(|r| r["method"] == "POST /request")
        .unwrap();
    let tool = records
        .iter()
        .find(|r| r["method"] == "MCP tools/call")
        .unwrap();
    assert_eq!(tool["resource"], "fake/echo");
    assert_eq!(tool["code"], "ok");
    assert_eq!(tool["result"], "ok");
    assert_eq!(tool["principal"], "user");
    assert_eq!(tool["request_id"], prompt["request_id"]);
    assert!(!tool.to_string().contains("hi\""), "{tool}");
    server.shutdown().await;
}

#[tokio::test]
async fn an_interactive_reply_carries_the_tool_calls_in_its_metadata() {
    use chatcli::proto::SessionMessage;
    use chatcli::proto::session_message::Type;
    let (_dir, fake, server) = openai_setup(json!([stdio_entry("fake", 30)])).await;
    ready(&server, "fake").await;
    fake.push(openai::tool_calls_reply(&[(
        "call_i",
        "echo",
        json!({"text": "interactive"}),
    )]));
    fake.push(Reply::text("said it"));
    let mut client = ChatCliServiceClient::with_interceptor(
        server.channel.clone(),
        BearerToken(Some("tok-user".into())),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .interactive_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(SessionMessage {
        r#type: Type::UserInput as i32,
        content: "go".into(),
        metadata: Default::default(),
    })
    .await
    .unwrap();
    let reply = replies.message().await.unwrap().unwrap();
    assert_eq!(reply.r#type, Type::AssistantResponse as i32, "{reply:?}");
    assert_eq!(reply.content, "said it");
    let calls: Value = serde_json::from_str(&reply.metadata["tool_calls"]).unwrap();
    assert_eq!(calls[0]["name"], "echo");
    assert_eq!(calls[0]["server"], "fake");
    assert_eq!(calls[0]["arguments"], json!({"text": "interactive"}));
    assert_eq!(calls[0]["outcome"], "ok");
    assert_eq!(calls[0]["result"], "echo: interactive");
    drop(tx);
    server.shutdown().await;
}

#[tokio::test]
async fn an_anthropic_tool_use_runs_on_the_streamable_http_server() {
    let dir = tempfile::tempdir().unwrap();
    let mcp = FakeMcpHttp::start().await.unwrap();
    let fake = FakeUpstream::start(chatcli::testing::anthropic::AnthropicFormat)
        .await
        .unwrap();
    let provider = upstream_provider("an", "anthropic", fake.base_url(), "claude-test");
    let servers = json!([{
        "name": "web", "transport": "http", "url": mcp.url(),
        "headers": {"X-Team": "ops"}, "auth": {"type": "bearer", "token": "mcp-secret"}
    }]);
    let server = TestServer::start_with_metrics(config(dir.path(), provider, servers)).await;
    ready(&server, "web").await;
    fake.push(chatcli::testing::anthropic::tool_use_reply(
        "toolu_1",
        "echo",
        &json!({"text": "from anthropic"}),
    ));
    fake.push(Reply::text("Done: echo: from anthropic"));

    // SendPrompt: the final text only.
    let mut client = ChatCliServiceClient::with_interceptor(
        server.channel.clone(),
        BearerToken(Some("tok-admin".into())),
    );
    let resp = client
        .send_prompt(SendPromptRequest {
            prompt: "call it".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.response, "Done: echo: from anthropic");

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let first = reqs[0].json();
    assert_eq!(first["tools"][0]["name"], "echo");
    assert!(first["tools"][0]["input_schema"].is_object());
    let msgs = reqs[1].json()["messages"].as_array().unwrap().clone();
    let n = msgs.len();
    assert_eq!(
        msgs[n - 2],
        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
            "name": "echo", "input": {"text": "from anthropic"}}]})
    );
    assert_eq!(
        msgs[n - 1],
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
            "content": "echo: from anthropic", "is_error": false}]})
    );
    // The MCP server got the configured headers and the bearer token.
    let (headers, _) = mcp
        .requests()
        .into_iter()
        .find(|(_, m)| m["method"] == "tools/call")
        .unwrap();
    assert_eq!(headers["x-team"], "ops");
    assert_eq!(headers["authorization"], "Bearer mcp-secret");
    server.shutdown().await;
}

#[tokio::test]
async fn a_hanging_tool_times_out_and_its_server_is_marked_unavailable() {
    let (_dir, fake, server) = openai_setup(json!([stdio_entry("slow", 1)])).await;
    ready(&server, "slow").await;
    fake.push(openai::tool_calls_reply(&[("call_h", "hang", json!({}))]));
    fake.push(Reply::text("The tool did not answer."));

    let events = request_events(&server, "user", "hang please").await;
    let results = of_type(&events, "tool_result");
    assert_eq!(results.len(), 1, "{events:?}");
    assert_eq!(results[0]["data"]["outcome"], "timeout");
    assert_eq!(results[0]["data"]["is_error"], true);
    assert_eq!(answer_text(&events), "The tool did not answer.");
    // The model saw the failure as the tool's result.
    let second = fake.requests()[1].json();
    let last = second["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        last["content"].as_str().unwrap().contains("did not answer"),
        "{last}"
    );
    metrics_with_lines(&server, &[r#"chatcli_mcp_server_up{server="slow"} 0"#]).await;

    // The next prompt is sent without the unavailable server's tools.
    fake.push(Reply::text("plain"));
    let events = request_events(&server, "user", "again").await;
    assert_eq!(answer_text(&events), "plain");
    assert!(fake.requests()[2].json().get("tools").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn a_server_that_dies_mid_call_is_unavailable_and_the_prompt_still_answers() {
    let (_dir, fake, server) = openai_setup(json!([stdio_entry("mortal", 30)])).await;
    ready(&server, "mortal").await;
    fake.push(openai::tool_calls_reply(&[("call_d", "die", json!({}))]));
    fake.push(Reply::text("The server is gone."));

    let events = request_events(&server, "admin", "die please").await;
    let results = of_type(&events, "tool_result");
    assert_eq!(results.len(), 1, "{events:?}");
    assert_eq!(results[0]["data"]["outcome"], "unavailable");
    assert_eq!(answer_text(&events), "The server is gone.");
    metrics_with_lines(
        &server,
        &[
            r#"chatcli_mcp_server_up{server="mortal"} 0"#,
            r#"chatcli_mcp_tool_calls_total{outcome="unavailable",server="mortal",tool="die"} 1"#,
        ],
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_readonly_caller_gets_no_tools() {
    let (_dir, fake, server) = openai_setup(json!([stdio_entry("fake", 30)])).await;
    ready(&server, "fake").await;
    fake.push(Reply::text("no tools for you"));
    let events = request_events(&server, "reader", "use the tool").await;
    assert_eq!(answer_text(&events), "no tools for you");
    assert!(of_type(&events, "tool_call").is_empty());
    let first = fake.requests()[0].json();
    assert!(first.get("tools").is_none(), "{first}");

    // A user's prompt on the same server is offered the tools.
    fake.push(Reply::text("ok"));
    request_events(&server, "user", "hello").await;
    assert!(fake.requests()[1].json()["tools"].is_array());
    server.shutdown().await;
}

#[tokio::test]
async fn without_mcp_servers_the_request_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let fake = openai_fake().await;
    let mut c = config(
        dir.path(),
        openai_provider("oa", &fake, "gpt-test"),
        json!([]),
    );
    c.catalog.mcp_config = None;
    let server = TestServer::start_with(c).await;
    fake.push(Reply::text("plain"));
    let events = request_events(&server, "user", "hello").await;
    assert_eq!(answer_text(&events), "plain");
    let first = fake.requests()[0].json();
    assert!(first.get("tools").is_none(), "{first}");
    // Streamed as before (tools make each round a whole answer).
    assert_eq!(first["stream"], true);
    let _ = Duration::ZERO;
    server.shutdown().await;
}

/// The MCP servers file is reloaded through the config's reload path: a server added to it is
/// started, one removed is stopped, and a file that does not parse is refused (the running
/// servers keep serving).
#[tokio::test]
async fn the_servers_file_is_hot_reloaded() {
    use chatcli::config::Sources;
    use chatcli::server::{Listeners, RunOptions};
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let servers = etc.join("mcp_servers.json");
    let write_servers = |list: Value| {
        crate::support::write_atomically(&servers, &json!({ "mcpServers": list }).to_string());
    };
    write_servers(json!([stdio_entry("a", 30)]));
    let path = etc.join("chatcli.toml");
    std::fs::write(
        &path,
        format!(
            "[state]\ndata_dir = {:?}\n\n[catalog]\nmcp_config = {:?}\n\n[llm]\ndefault = \"echo\"\n\n[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n",
            root.path().join("data").display().to_string(),
            servers.display().to_string()
        ),
    )
    .unwrap();
    let sources = Sources {
        env: Default::default(),
        config_flag: Some(path.clone()),
        default_config_path: "/nonexistent/chatcli.toml".into(),
        flags: vec![],
    };
    let loaded = chatcli::config::load(&sources).unwrap_or_else(|e| panic!("{:?}", e.problems));
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", metrics.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(chatcli::server::run_with(
        Listeners {
            main,
            metrics: Some(metrics),
        },
        loaded.config,
        shutdown.clone(),
        RunOptions {
            reload: Some(sources),
            set_log_level: None,
            audit: None,
        },
    ));
    let http = http_client();
    let metrics_has = |wanted: Vec<String>, gone: Vec<String>| {
        let (http, url) = (http.clone(), metrics_url.clone());
        async move {
            eventually(
                &format!("{wanted:?} and not {gone:?} in /metrics"),
                || async {
                    let text = http.get(&url).send().await.ok()?.text().await.ok()?;
                    let has = |w: &String| text.lines().any(|l| l.starts_with(w.as_str()));
                    (wanted.iter().all(has) && !gone.iter().any(has)).then_some(())
                },
            )
            .await
        }
    };
    metrics_has(
        vec![r#"chatcli_mcp_server_up{server="a"} 1"#.into()],
        vec![],
    )
    .await;

    write_servers(json!([stdio_entry("b", 30)]));
    metrics_has(
        vec![r#"chatcli_mcp_server_up{server="b"} 1"#.into()],
        vec![r#"chatcli_mcp_server_up{server="a"}"#.into()],
    )
    .await;

    crate::support::write_atomically(&servers, "{\"mcpServers\": {\"not\": \"an array\"}}");
    metrics_has(
        vec![
            r#"chatcli_config_reloads_total{result="error"} 1"#.into(),
            r#"chatcli_mcp_server_up{server="b"} 1"#.into(),
        ],
        vec![],
    )
    .await;
    shutdown.cancel();
    let _ = task.await;
}
