//! A small MCP server for tests, written here by hand (JSON-RPC 2.0, as the specification
//! describes it) so that chatcli's client is checked against an implementation other than its own
//! library's. It serves over stdio ([`serve_stdio`], run by the `mcp_fake` example as a child
//! process) and over streamable HTTP ([`FakeMcpHttp`], on 127.0.0.1 port 0).
//!
//! Its tools:
//! - `echo {text}`: answers `echo: <text>`;
//! - `fail`: answers an error result (`isError: true`);
//! - `hang`: never answers;
//! - `die`: the stdio server exits without answering (over HTTP, the connection is dropped);
//! - `garbage`: the stdio server writes a line that is not JSON-RPC and then stops answering.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The tool list.
pub fn tools() -> Value {
    let text_arg =
        json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]});
    let none = json!({"type": "object", "properties": {}});
    json!([
        {"name": "echo", "description": "Repeats its text.", "inputSchema": text_arg},
        {"name": "fail", "description": "Always fails.", "inputSchema": none},
        {"name": "hang", "description": "Never answers.", "inputSchema": none},
        {"name": "die", "description": "Exits mid-call.", "inputSchema": none},
        {"name": "garbage", "description": "Answers something that is not MCP.", "inputSchema": none},
    ])
}

/// What the server does with one message.
pub enum Action {
    /// Answer this.
    Reply(Value),
    /// Nothing to answer (a notification).
    Nothing,
    /// Never answer.
    Hang,
    /// Stop (exit, or drop the connection).
    Die,
    /// Write this line, which is not JSON-RPC, then never answer.
    Garbage(String),
}

fn result(id: &Value, result: Value) -> Action {
    Action::Reply(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// The answer to one JSON-RPC message.
pub fn handle(msg: &Value) -> Action {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    if msg.get("id").is_none() {
        return Action::Nothing;
    }
    match method {
        "initialize" => {
            let version = msg
                .pointer("/params/protocolVersion")
                .cloned()
                .unwrap_or(json!("2025-06-18"));
            result(
                &id,
                json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "chatcli-test-mcp", "version": "1.0.0"}
                }),
            )
        }
        "ping" => result(&id, json!({})),
        "tools/list" => result(&id, json!({"tools": tools()})),
        "tools/call" => {
            let name = msg.pointer("/params/name").and_then(Value::as_str);
            match name {
                Some("echo") => {
                    let text = msg
                        .pointer("/params/arguments/text")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    result(
                        &id,
                        json!({"content": [{"type": "text", "text": format!("echo: {text}")}], "isError": false}),
                    )
                }
                Some("fail") => result(
                    &id,
                    json!({"content": [{"type": "text", "text": "it failed"}], "isError": true}),
                ),
                Some("hang") => Action::Hang,
                Some("die") => Action::Die,
                Some("garbage") => Action::Garbage("this is not JSON-RPC {{{".into()),
                _ => Action::Reply(json!({
                    "jsonrpc": "2.0", "id": id,
                    "error": {"code": -32602, "message": "unknown tool"}
                })),
            }
        }
        _ => Action::Reply(json!({
            "jsonrpc": "2.0", "id": id,
            "error": {"code": -32601, "message": "method not found"}
        })),
    }
}

/// Serves MCP on stdin/stdout (one JSON message per line) until stdin closes or a `die` call.
pub async fn serve_stdio() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let text = match handle(&msg) {
            Action::Reply(v) => v.to_string(),
            Action::Nothing | Action::Hang => continue,
            Action::Die => std::process::exit(3),
            Action::Garbage(g) => g,
        };
        if out.write_all(format!("{text}\n").as_bytes()).await.is_err() {
            return;
        }
        let _ = out.flush().await;
    }
}

/// A streamable-HTTP MCP server on 127.0.0.1 port 0 (JSON answers, no server-sent events).
pub struct FakeMcpHttp {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeMcpHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeMcpHttp {
    /// Starts it.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests: Arc<Mutex<Vec<(HeaderMap, Value)>>> = Arc::default();
        let seen = requests.clone();
        let app = axum::Router::new().route(
            "/mcp",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let seen = seen.clone();
                async move { post(seen, headers, body).await }
            })
            .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
            .delete(|| async { StatusCode::OK }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            requests,
            task,
        })
    }

    /// Its endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    /// The messages received, with their headers.
    pub fn requests(&self) -> Vec<(HeaderMap, Value)> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

async fn post(
    seen: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((headers, msg.clone()));
    let session = [("mcp-session-id", "test-session")];
    match handle(&msg) {
        Action::Reply(v) => (
            StatusCode::OK,
            session,
            [("content-type", "application/json")],
            v.to_string(),
        )
            .into_response(),
        Action::Nothing => (StatusCode::ACCEPTED, session).into_response(),
        Action::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Action::Die => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Action::Garbage(g) => (
            StatusCode::OK,
            session,
            [("content-type", "application/json")],
            g,
        )
            .into_response(),
    }
}
