//! The MCP servers file (PROTOCOL §7): `{"mcpServers": [ {…}, … ]}`, an array of servers, read
//! from `catalog.mcp_config` (`--mcp-config`, `CHATCLI_MCP_CONFIG`) or
//! `<data_dir>/mcp_servers.json`.
//!
//! Fields of the existing ChatCLI that chatcli has no use for (`autoApprove`, `trust`, …) are
//! accepted and ignored, so the same file serves both. Timeouts are seconds (a number) or a
//! duration string (`"30s"`, `"2m"`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default time a server has to start and answer `initialize` and `tools/list`.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time one tool call may take.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct McpFile {
    #[serde(default)]
    mcp_servers: Vec<ServerConfig>,
}

/// How chatcli talks to a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A child process speaking JSON-RPC lines on stdin/stdout.
    Stdio,
    /// The HTTP+SSE transport of MCP 2024-11-05 (GET an event stream, POST to its endpoint).
    Sse,
    /// Streamable HTTP (MCP 2025-03-26 and later).
    Http,
}

impl Transport {
    /// As the file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Stdio => "stdio",
            Transport::Sse => "sse",
            Transport::Http => "http",
        }
    }
}

/// Credentials an HTTP server is called with.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthConfig {
    /// `bearer` (the default), `header` (the token in `header`), or `basic`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// The token (`bearer`, `header`).
    #[serde(default)]
    pub token: String,
    /// The header name (`header`); default `Authorization`.
    #[serde(default)]
    pub header: String,
    /// The user (`basic`).
    #[serde(default)]
    pub username: String,
    /// The password (`basic`).
    #[serde(default)]
    pub password: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written: the token and password never reach a log line.
        f.debug_struct("AuthConfig")
            .field("kind", &self.kind)
            .field("header", &self.header)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A timeout in the file: seconds, or a duration string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum Timeout {
    Seconds(f64),
    Text(String),
}

/// One server of the file.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerConfig {
    /// Its name (unique in the file).
    pub name: String,
    /// The program (stdio).
    #[serde(default)]
    pub command: String,
    /// Its arguments (stdio).
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables set for it (stdio), beside `PATH`, `HOME`, `LANG` of the server's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `stdio`, `sse` or `http`; unset: `stdio` with a command, else `http`.
    #[serde(default)]
    transport: Option<String>,
    /// The endpoint (sse, http).
    #[serde(default)]
    pub url: String,
    /// Whether it is used (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The working directory (stdio).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Headers sent with every request (sse, http).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Credentials (sse, http).
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    timeout: Option<Timeout>,
    #[serde(default)]
    init_timeout: Option<Timeout>,
    /// Only these tools are offered (empty: all).
    #[serde(default)]
    pub enabled_tools: Vec<String>,
    /// These tools are never offered.
    #[serde(default)]
    pub disabled_tools: Vec<String>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written: header values and env values may be credentials.
        f.debug_struct("ServerConfig")
            .field("name", &self.name)
            .field("transport", &self.transport())
            .field("command", &self.command)
            .field("url", &self.url)
            .field("enabled", &self.enabled)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

fn yes() -> bool {
    true
}

fn duration_of(t: &Option<Timeout>, default: Duration) -> Result<Duration, String> {
    match t {
        None => Ok(default),
        Some(Timeout::Seconds(s)) if s.is_finite() && *s > 0.0 => Ok(Duration::from_secs_f64(*s)),
        Some(Timeout::Seconds(s)) => Err(format!("{s} is not a positive number of seconds")),
        Some(Timeout::Text(text)) => crate::config::values::parse_duration(text)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("`{text}` is not a duration such as 30s or 2m")),
    }
}

impl ServerConfig {
    /// The transport, by `transport` or by what is set.
    pub fn transport(&self) -> Transport {
        match self
            .transport
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("stdio") => Transport::Stdio,
            Some("sse") => Transport::Sse,
            Some(_) => Transport::Http,
            None if !self.command.is_empty() => Transport::Stdio,
            None => Transport::Http,
        }
    }

    /// The time one tool call may take.
    pub fn call_timeout(&self) -> Duration {
        duration_of(&self.timeout, DEFAULT_CALL_TIMEOUT).unwrap_or(DEFAULT_CALL_TIMEOUT)
    }

    /// The time to start and list the tools.
    pub fn init_timeout(&self) -> Duration {
        duration_of(&self.init_timeout, DEFAULT_INIT_TIMEOUT).unwrap_or(DEFAULT_INIT_TIMEOUT)
    }

    /// Whether `tool` may be offered (`enabledTools`, then `disabledTools`).
    pub fn offers(&self, tool: &str) -> bool {
        (self.enabled_tools.is_empty() || self.enabled_tools.iter().any(|t| t == tool))
            && !self.disabled_tools.iter().any(|t| t == tool)
    }

    /// Every problem of this entry, each naming the field.
    fn problems(&self, i: usize) -> Vec<String> {
        let at = |field: &str| format!("mcpServers[{i}] ({}).{field}", self.name);
        let mut out = Vec::new();
        if self.name.trim().is_empty() {
            out.push(format!("mcpServers[{i}].name: must not be empty"));
        }
        if let Some(t) = &self.transport
            && !matches!(
                t.to_ascii_lowercase().as_str(),
                "stdio" | "sse" | "http" | "streamable-http" | "streamable_http"
            )
        {
            out.push(format!(
                "{}: `{t}` is not stdio, sse or http",
                at("transport")
            ));
        }
        match self.transport() {
            Transport::Stdio if self.command.trim().is_empty() => {
                out.push(format!("{}: a stdio server needs a command", at("command")));
            }
            Transport::Sse | Transport::Http => match reqwest::Url::parse(&self.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => out.push(format!(
                    "{}: `{}` is not an http(s) URL",
                    at("url"),
                    self.url
                )),
            },
            Transport::Stdio => {}
        }
        for (field, t) in [
            ("timeout", &self.timeout),
            ("initTimeout", &self.init_timeout),
        ] {
            if let Err(e) = duration_of(t, DEFAULT_CALL_TIMEOUT) {
                out.push(format!("{}: {e}", at(field)));
            }
        }
        if let Some(a) = &self.auth
            && !matches!(
                a.kind.to_ascii_lowercase().as_str(),
                "" | "bearer" | "header" | "basic"
            )
        {
            out.push(format!(
                "{}: `{}` is not bearer, header or basic",
                at("auth.type"),
                a.kind
            ));
        }
        out
    }
}

/// The servers file of a config: `catalog.mcp_config` when set, else `<data_dir>/mcp_servers.json`.
/// The second is optional (missing = no servers); the first must exist.
pub fn path_of(config: &crate::config::Config) -> (PathBuf, bool) {
    match &config.catalog.mcp_config {
        Some(p) => (p.clone(), true),
        None => (config.state.data_dir.join("mcp_servers.json"), false),
    }
}

/// Reads and checks the servers of `path`; every problem is listed.
pub fn load(path: &Path, required: bool) -> Result<Vec<ServerConfig>, Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Vec::new()),
        Err(e) => return Err(vec![format!("cannot read {}: {e}", path.display())]),
    };
    parse(&text).map_err(|problems| {
        problems
            .into_iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect()
    })
}

/// Parses and checks a servers file's text.
pub fn parse(text: &str) -> Result<Vec<ServerConfig>, Vec<String>> {
    let file: McpFile = serde_json::from_str(text).map_err(|e| {
        vec![format!(
            "not an MCP servers file ({{\"mcpServers\": [...]}}): {e}"
        )]
    })?;
    let mut problems = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, s) in file.mcp_servers.iter().enumerate() {
        problems.extend(s.problems(i));
        if !names.insert(s.name.as_str()) {
            problems.push(format!("mcpServers[{i}].name: `{}` is used twice", s.name));
        }
    }
    match problems.is_empty() {
        true => Ok(file.mcp_servers),
        false => Err(problems),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_existing_chatcli_file() {
        let servers = parse(
            r#"{"mcpServers": [
              {"name": "fs", "command": "mcp-fs", "args": ["/tmp"], "env": {"A": "1"},
               "disabledTools": ["rm"], "timeout": 5, "autoApprove": ["ls"], "trust": true},
              {"name": "web", "transport": "http", "url": "https://mcp.example/mcp",
               "headers": {"X-Team": "a"}, "auth": {"type": "bearer", "token": "t0k"},
               "initTimeout": "10s", "enabled": false},
              {"name": "old", "transport": "sse", "url": "http://127.0.0.1:9/sse",
               "enabledTools": ["a"]}
            ]}"#,
        )
        .unwrap();
        assert_eq!(servers.len(), 3);
        assert_eq!(servers[0].transport(), Transport::Stdio);
        assert_eq!(servers[0].call_timeout(), Duration::from_secs(5));
        assert!(servers[0].offers("ls") && !servers[0].offers("rm"));
        assert_eq!(servers[1].transport(), Transport::Http);
        assert_eq!(servers[1].init_timeout(), Duration::from_secs(10));
        assert!(!servers[1].enabled);
        assert!(!format!("{:?}", servers[1]).contains("t0k"));
        assert_eq!(servers[2].transport(), Transport::Sse);
        assert!(servers[2].offers("a") && !servers[2].offers("b"));
    }

    #[test]
    fn every_problem_is_listed() {
        let problems = parse(
            r#"{"mcpServers": [
              {"name": "a"},
              {"name": "a", "transport": "ftp", "url": "ftp://x", "timeout": -1}
            ]}"#,
        )
        .unwrap_err();
        let all = problems.join("\n");
        assert!(all.contains("mcpServers[0] (a).url"), "{all}");
        assert!(all.contains("transport: `ftp`"), "{all}");
        assert!(all.contains("timeout: -1"), "{all}");
        assert!(all.contains("used twice"), "{all}");
        // An array, not a map (the existing ChatCLI's own mistake to avoid).
        assert!(parse(r#"{"mcpServers": {"a": {"command": "x"}}}"#).is_err());
        assert!(parse("not json").is_err());
    }

    #[test]
    fn a_missing_default_file_is_no_servers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mcp_servers.json");
        assert!(load(&path, false).unwrap().is_empty());
        assert!(load(&path, true).is_err());
    }
}
