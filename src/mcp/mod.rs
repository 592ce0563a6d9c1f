//! MCP servers whose tools prompts use: the servers file ([`config`]), the live connections
//! ([`McpHub`]) and the tools of one prompt ([`ToolBox`], the [`ToolHost`] the prompt loop of
//! [`crate::llm::tools`] calls).
//!
//! The protocol is the official Rust SDK's (`rmcp`): a stdio server is a child process (its own
//! process group, killed when its connection is dropped), a streamable-HTTP server is reached with
//! reqwest on the server's rustls setup. The HTTP+SSE transport of MCP 2024-11-05 is not in rmcp
//! 3: an `sse` server is marked unavailable with that reason (streamable HTTP replaced it; most
//! servers serve both).
//!
//! The hub is live state: a reload hands it the servers of the new snapshot ([`McpHub::apply`]);
//! a server whose entry did not change keeps its connection, a changed one is restarted, a removed
//! or disabled one is stopped, and one that is unavailable is tried again. Servers start in the
//! background; a prompt offers the tools of the servers that are ready at that moment.
//!
//! A server that fails to start (or to list its tools within `initTimeout`), whose connection
//! closes (it crashed), that does not answer a call within `timeout`, or that answers something
//! that is not MCP is marked unavailable with the reason: its tools are no longer offered, the
//! `chatcli_mcp_server_up{server}` gauge drops to 0, and `/status` shows it. A tool's own error
//! result is not a server failure.

pub mod config;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rmcp::RoleClient;
use rmcp::ServiceExt;
use rmcp::service::{RunningService, ServiceError};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ServerConfig, Transport};

use crate::llm::tools::{ToolCall, ToolHost, ToolOutcome, ToolOutput, ToolReply, ToolSpec};

type Client = RunningService<RoleClient, ()>;

/// Bytes of a tool's result text sent back to the provider; the rest is cut with a note.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// Variables of the daemon's environment a stdio server sees, beside its `env`.
const ENV_PASSED: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];

/// Where a server is.
#[derive(Clone)]
enum State {
    Starting,
    Ready {
        client: Arc<Client>,
        tools: Arc<[rmcp::model::Tool]>,
    },
    Unavailable(String),
}

struct Server {
    config: ServerConfig,
    state: Mutex<State>,
}

impl Server {
    fn state(&self) -> State {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, s: State) {
        *self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = s;
    }

    /// Marks the server unavailable, when `client` is still its connection (a restart may have
    /// replaced it since the call began); `true` when it did.
    fn fail(&self, client: &Arc<Client>, reason: String) -> bool {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*s {
            State::Ready { client: c, .. } if Arc::ptr_eq(c, client) => {
                *s = State::Unavailable(reason);
                true
            }
            _ => false,
        }
    }
}

/// One server as `/status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    /// Its name.
    pub name: String,
    /// `stdio`, `sse` or `http`.
    pub transport: &'static str,
    /// `starting`, `ready` or `unavailable`.
    pub state: &'static str,
    /// Tools offered (when ready).
    pub tools: usize,
    /// Why it is unavailable.
    pub reason: String,
}

#[derive(Clone)]
struct McpMetrics {
    up: IntGaugeVec,
    calls: IntCounterVec,
}

/// The MCP servers of the serving config, connected (see the module docs).
pub struct McpHub {
    servers: Mutex<BTreeMap<String, Arc<Server>>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    metrics: Mutex<Option<McpMetrics>>,
    /// The client of the streamable-HTTP servers, built when the first one connects.
    http: std::sync::OnceLock<Result<reqwest::Client, String>>,
}

impl std::fmt::Debug for McpHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpHub")
            .field("servers", &self.status())
            .finish_non_exhaustive()
    }
}

impl Default for McpHub {
    fn default() -> Self {
        Self::new()
    }
}

impl McpHub {
    /// A hub with no servers.
    pub fn new() -> Self {
        Self {
            servers: Mutex::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            metrics: Mutex::default(),
            http: std::sync::OnceLock::new(),
        }
    }

    /// The HTTP client (rustls on the process's crypto provider, installed by `main` first).
    fn http(&self) -> Result<reqwest::Client, String> {
        self.http
            .get_or_init(|| {
                reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .build()
                    .map_err(|e| format!("the MCP HTTP client cannot be built: {e}"))
            })
            .clone()
    }

    fn servers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Server>>> {
        self.servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn metrics(&self) -> Option<McpMetrics> {
        self.metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Registers `chatcli_mcp_server_up{server}` and
    /// `chatcli_mcp_tool_calls_total{server,tool,outcome}` in `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), String> {
        let up = IntGaugeVec::new(
            Opts::new(
                "chatcli_mcp_server_up",
                "1 while an MCP server is connected and its tools offered, 0 while it is starting or unavailable",
            ),
            &["server"],
        )
        .map_err(|e| e.to_string())?;
        let calls = IntCounterVec::new(
            Opts::new(
                "chatcli_mcp_tool_calls_total",
                "MCP tool calls made for prompts, by outcome (ok, tool_error, unknown_tool, unavailable, timeout)",
            ),
            &["server", "tool", "outcome"],
        )
        .map_err(|e| e.to_string())?;
        registry
            .register(Box::new(up.clone()))
            .and_then(|()| registry.register(Box::new(calls.clone())))
            .map_err(|e| e.to_string())?;
        *self
            .metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(McpMetrics { up, calls });
        for (name, s) in self.servers().iter() {
            self.gauge(name, &s.state());
        }
        Ok(())
    }

    fn gauge(&self, name: &str, state: &State) {
        if let Some(m) = self.metrics() {
            m.up.with_label_values(&[name])
                .set(i64::from(matches!(state, State::Ready { .. })));
        }
    }

    /// Whether any server is configured and enabled (else prompts run without tools, at no cost).
    pub fn is_configured(&self) -> bool {
        !self.servers().is_empty()
    }

    /// Makes the servers those of `configs` (see the module docs); returns at once, servers start
    /// in the background.
    pub fn apply(self: &Arc<Self>, configs: &[ServerConfig]) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let wanted: BTreeMap<&str, &ServerConfig> = configs
            .iter()
            .filter(|c| c.enabled)
            .map(|c| (c.name.as_str(), c))
            .collect();
        let mut servers = self.servers();
        let gone: Vec<String> = servers
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            servers.remove(&name);
            if let Some(m) = self.metrics() {
                let _ = m.up.remove_label_values(&[&name]);
            }
            tracing::info!(server = %name, "MCP server stopped (removed or disabled)");
        }
        for (name, cfg) in wanted {
            if let Some(s) = servers.get(name)
                && s.config == *cfg
                && !matches!(s.state(), State::Unavailable(_))
            {
                continue;
            }
            let server = Arc::new(Server {
                config: cfg.clone(),
                state: Mutex::new(State::Starting),
            });
            servers.insert(name.to_string(), server.clone());
            self.gauge(name, &State::Starting);
            let hub = Arc::downgrade(self);
            let shutdown = self.shutdown.clone();
            let http = match cfg.transport() {
                Transport::Http => Some(self.http()),
                Transport::Stdio | Transport::Sse => None,
            };
            let tasks = self.tasks.clone();
            self.tasks.spawn(async move {
                let cfg = &server.config;
                let started = tokio::select! {
                    r = tokio::time::timeout(cfg.init_timeout(), connect(cfg, http, &tasks)) => r,
                    () = shutdown.cancelled() => return,
                };
                let state = match started {
                    Ok(Ok((client, tools))) => {
                        tracing::info!(server = %cfg.name, transport = cfg.transport().as_str(), tools = tools.len(), "MCP server ready");
                        State::Ready {
                            client: Arc::new(client),
                            tools: tools.into(),
                        }
                    }
                    Ok(Err(reason)) => {
                        tracing::warn!(server = %cfg.name, %reason, "MCP server unavailable");
                        State::Unavailable(reason)
                    }
                    Err(_) => {
                        let reason = format!(
                            "did not start and list its tools within {:?} (initTimeout)",
                            cfg.init_timeout()
                        );
                        tracing::warn!(server = %cfg.name, %reason, "MCP server unavailable");
                        State::Unavailable(reason)
                    }
                };
                if let Some(hub) = hub.upgrade() {
                    hub.gauge(&cfg.name, &state);
                }
                server.set(state);
            });
        }
    }

    /// Stops every server and waits (up to `grace`) for their start-up tasks to end.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.servers().clear();
        self.tasks.close();
        let _ = tokio::time::timeout(grace, self.tasks.wait()).await;
    }

    /// Every server, for `/status`.
    pub fn status(&self) -> Vec<ServerStatus> {
        self.servers()
            .iter()
            .map(|(name, s)| {
                let (state, tools, reason) = match s.state() {
                    State::Starting => ("starting", 0, String::new()),
                    State::Ready { tools, .. } => (
                        "ready",
                        tools.iter().filter(|t| s.config.offers(&t.name)).count(),
                        String::new(),
                    ),
                    State::Unavailable(r) => ("unavailable", 0, r),
                };
                ServerStatus {
                    name: name.clone(),
                    transport: s.config.transport().as_str(),
                    state,
                    tools,
                    reason,
                }
            })
            .collect()
    }

    /// The tools of the servers ready now, for one prompt; `None` when there are none.
    pub fn toolbox(self: &Arc<Self>) -> Option<Arc<ToolBox>> {
        let mut entries: Vec<Entry> = Vec::new();
        for s in self.servers().values() {
            let State::Ready { client, tools } = s.state() else {
                continue;
            };
            for t in tools.iter().filter(|t| s.config.offers(&t.name)) {
                entries.push(Entry {
                    name: String::new(),
                    tool: t.name.to_string(),
                    description: t.description.as_deref().unwrap_or("").to_string(),
                    schema: Value::Object((*t.input_schema).clone()),
                    server: s.clone(),
                    client: client.clone(),
                });
            }
        }
        if entries.is_empty() {
            return None;
        }
        // A tool keeps its own name unless another server offers the same one; then both are
        // called `<server>__<tool>`. Names are cut to what every format accepts.
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for e in &entries {
            *seen.entry(e.tool.clone()).or_default() += 1;
        }
        for e in &mut entries {
            let raw = match seen.get(&e.tool) {
                Some(1) => e.tool.clone(),
                _ => format!("{}__{}", e.server.config.name, e.tool),
            };
            e.name = function_name(&raw);
        }
        let specs = entries
            .iter()
            .map(|e| ToolSpec {
                name: e.name.clone(),
                description: e.description.clone(),
                parameters: e.schema.clone(),
            })
            .collect();
        Some(Arc::new(ToolBox {
            entries,
            specs,
            hub: Arc::downgrade(self),
        }))
    }
}

/// A function name every wire format accepts: `[A-Za-z0-9_-]`, at most 64 characters.
fn function_name(raw: &str) -> String {
    raw.chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                true => c,
                false => '_',
            },
        )
        .take(64)
        .collect()
}

/// Connects to a server and lists its tools.
async fn connect(
    cfg: &ServerConfig,
    http: Option<Result<reqwest::Client, String>>,
    tasks: &TaskTracker,
) -> Result<(Client, Vec<rmcp::model::Tool>), String> {
    let client = match cfg.transport() {
        Transport::Stdio => {
            let mut cmd = tokio::process::Command::new(&cfg.command);
            cmd.args(&cfg.args).env_clear();
            for k in ENV_PASSED {
                if let Some(v) = std::env::var_os(k) {
                    cmd.env(k, v);
                }
            }
            cmd.envs(&cfg.env);
            if let Some(dir) = &cfg.cwd {
                cmd.current_dir(dir);
            }
            let (transport, stderr) = rmcp::transport::TokioChildProcess::builder(cmd)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start `{}`: {e}", cfg.command))?;
            if let Some(stderr) = stderr {
                let name = cfg.name.clone();
                tasks.spawn(log_stderr(name, stderr));
            }
            ().serve(transport)
                .await
                .map_err(|e| format!("initialize failed: {e}"))?
        }
        Transport::Http => {
            use rmcp::transport::StreamableHttpClientTransport;
            use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
            let mut headers = std::collections::HashMap::new();
            let mut bearer = None;
            let header =
                |k: &str, v: &str| -> Result<(http::HeaderName, http::HeaderValue), String> {
                    let name = http::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("header `{k}` is not a valid header name"))?;
                    let mut value = http::HeaderValue::from_str(v)
                        .map_err(|_| format!("the value of header `{k}` cannot be sent"))?;
                    value.set_sensitive(true);
                    Ok((name, value))
                };
            for (k, v) in &cfg.headers {
                let (k, v) = header(k, v)?;
                headers.insert(k, v);
            }
            if let Some(a) = &cfg.auth {
                match a.kind.to_ascii_lowercase().as_str() {
                    "header" => {
                        let name = match a.header.is_empty() {
                            true => "Authorization",
                            false => a.header.as_str(),
                        };
                        let (k, v) = header(name, &a.token)?;
                        headers.insert(k, v);
                    }
                    "basic" => {
                        use base64::Engine as _;
                        let creds = base64::engine::general_purpose::STANDARD
                            .encode(format!("{}:{}", a.username, a.password));
                        let (k, v) = header("Authorization", &format!("Basic {creds}"))?;
                        headers.insert(k, v);
                    }
                    _ => bearer = Some(a.token.clone()),
                }
            }
            let mut config = StreamableHttpClientTransportConfig::with_uri(cfg.url.clone())
                .custom_headers(headers);
            if let Some(token) = bearer {
                config = config.auth_header(token);
            }
            let http = http.unwrap_or_else(|| Err("no HTTP client".into()))?;
            let transport = StreamableHttpClientTransport::with_client(http, config);
            ().serve(transport)
                .await
                .map_err(|e| format!("initialize failed: {e}"))?
        }
        Transport::Sse => {
            return Err(
                "the HTTP+SSE transport (MCP 2024-11-05) is not supported; use transport \"http\" (streamable HTTP)"
                    .into(),
            );
        }
    };
    let tools = client
        .list_all_tools()
        .await
        .map_err(|e| format!("tools/list failed: {e}"))?;
    Ok((client, tools))
}

/// Logs a stdio server's standard error, line by line, until it closes.
async fn log_stderr(server: String, stderr: tokio::process::ChildStderr) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line: String = line.chars().take(1000).collect();
        tracing::debug!(server = %server, "MCP server stderr: {line}");
    }
}

struct Entry {
    /// The name offered to the provider.
    name: String,
    /// The name on its server.
    tool: String,
    description: String,
    schema: Value,
    server: Arc<Server>,
    client: Arc<Client>,
}

/// The tools of one prompt: those of the servers that were ready when it started.
pub struct ToolBox {
    entries: Vec<Entry>,
    specs: Arc<[ToolSpec]>,
    hub: std::sync::Weak<McpHub>,
}

impl std::fmt::Debug for ToolBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolBox")
            .field(
                "tools",
                &self.entries.iter().map(|e| &e.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The text of a tool's result: its text blocks, other blocks as JSON, cut to
/// [`MAX_RESULT_BYTES`].
fn result_text(result: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(blocks) = result.get("content").and_then(Value::as_array) {
        for b in blocks {
            match b.get("text").and_then(Value::as_str) {
                Some(t) => parts.push(t.to_string()),
                None => parts.push(b.to_string()),
            }
        }
    }
    if parts.is_empty()
        && let Some(s) = result.get("structuredContent")
    {
        parts.push(s.to_string());
    }
    let mut text = parts.join("\n");
    if text.len() > MAX_RESULT_BYTES {
        let mut cut = MAX_RESULT_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[result truncated]");
    }
    text
}

impl ToolBox {
    fn record(&self, reply: &ToolReply) {
        if let Some(m) = self.hub.upgrade().and_then(|h| h.metrics()) {
            m.calls
                .with_label_values(&[&reply.server, &reply.tool, reply.outcome.as_str()])
                .inc();
        }
        tracing::info!(
            target: "chatcli::audit::mcp",
            server = %reply.server,
            tool = %reply.tool,
            outcome = reply.outcome.as_str(),
            duration_ms = reply.duration.as_secs_f64() * 1000.0,
            "MCP tool call"
        );
    }

    /// Marks `e`'s server unavailable (when the failing connection is still its own).
    fn fail(&self, e: &Entry, reason: String) {
        if e.server.fail(&e.client, reason.clone()) {
            tracing::warn!(server = %e.server.config.name, %reason, "MCP server unavailable");
            if let Some(hub) = self.hub.upgrade() {
                hub.gauge(&e.server.config.name, &State::Unavailable(reason));
            }
        }
    }

    async fn run(&self, call: &ToolCall) -> ToolReply {
        let started = Instant::now();
        let Some(e) = self.entries.iter().find(|e| e.name == call.name) else {
            return ToolReply {
                server: String::new(),
                tool: call.name.clone(),
                output: ToolOutput {
                    content: format!("no tool named `{}` is offered", call.name),
                    is_error: true,
                },
                outcome: ToolOutcome::Unknown,
                duration: started.elapsed(),
            };
        };
        let reply = |outcome: ToolOutcome, content: String| ToolReply {
            server: e.server.config.name.clone(),
            tool: e.tool.clone(),
            output: ToolOutput {
                content,
                is_error: outcome != ToolOutcome::Ok,
            },
            outcome,
            duration: started.elapsed(),
        };
        // The server may have failed since the prompt started.
        if let State::Unavailable(r) = e.server.state() {
            return reply(
                ToolOutcome::Unavailable,
                format!("the tool's server is unavailable: {r}"),
            );
        }
        let arguments = match &call.arguments {
            Value::Object(m) => Some(m.clone()),
            Value::Null => None,
            _ => {
                return reply(
                    ToolOutcome::ToolError,
                    "the arguments must be a JSON object".into(),
                );
            }
        };
        let mut params = rmcp::model::CallToolRequestParams::new(e.tool.clone());
        params.arguments = arguments;
        let timeout = e.server.config.call_timeout();
        match tokio::time::timeout(timeout, e.client.call_tool(params)).await {
            Ok(Ok(result)) => {
                let v = serde_json::to_value(&result).unwrap_or(Value::Null);
                let text = result_text(&v);
                match result.is_error.unwrap_or(false) {
                    true => reply(ToolOutcome::ToolError, text),
                    false => reply(ToolOutcome::Ok, text),
                }
            }
            Ok(Err(ServiceError::McpError(err))) => reply(
                ToolOutcome::ToolError,
                format!("the tool failed: {}", err.message),
            ),
            Ok(Err(err)) => {
                let reason = format!("the connection failed during a call: {err}");
                self.fail(e, reason.clone());
                reply(ToolOutcome::Unavailable, reason)
            }
            Err(_) => {
                let reason = format!("`{}` did not answer within {timeout:?}", e.tool);
                self.fail(e, reason.clone());
                reply(ToolOutcome::Timeout, reason)
            }
        }
    }
}

impl ToolHost for ToolBox {
    fn specs(&self) -> Arc<[ToolSpec]> {
        self.specs.clone()
    }

    fn server_of(&self, name: &str) -> Option<String> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.server.config.name.clone())
    }

    fn call<'a>(&'a self, call: &'a ToolCall) -> BoxFuture<'a, ToolReply> {
        Box::pin(async move {
            let reply = self.run(call).await;
            self.record(&reply);
            reply
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_what_every_format_accepts() {
        assert_eq!(function_name("fs__read.file"), "fs__read_file");
        assert_eq!(function_name(&"x".repeat(80)).len(), 64);
    }

    #[test]
    fn result_text_takes_text_blocks_and_cuts_long_ones() {
        let v = serde_json::json!({"content": [
            {"type": "text", "text": "a"},
            {"type": "image", "data": "AA==", "mimeType": "image/png"}
        ]});
        let t = result_text(&v);
        assert!(t.starts_with("a\n{"), "{t}");
        let long = serde_json::json!({"content": [{"type": "text", "text": "é".repeat(MAX_RESULT_BYTES)}]});
        let t = result_text(&long);
        assert!(t.ends_with("[result truncated]"));
        assert!(t.len() <= MAX_RESULT_BYTES + 20);
    }
}
