//! The command line: `chatcli server|serve`, `chatcli config check|show`, `chatcli connect`. Every
//! server flag is an `Option` so that a flag that was not given never overrides the config file or
//! the environment; [`ServerArgs::flag_values`] turns the given ones into the top config layer.
//! Flags keep the existing ChatCLI's names; Go-style single-dash long flags (`-port 8080`) are
//! accepted too ([`normalize_args`]).

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use figment::value::Value;
use serde::Serialize;

use crate::config::FlagValue;

/// Help heading of the Kubernetes watcher's flags.
const WATCHER: &str = "Kubernetes watcher";

/// chatcli: one authenticated endpoint for many LLM providers, speaking the ChatCLI gRPC protocol.
#[derive(Debug, Parser)]
#[command(
    name = "chatcli",
    version,
    about,
    propagate_version = true,
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The exit codes, at the end of `chatcli --help`: sysexits(3) for every subcommand.
const EXIT_CODES: &str = "\
Exit codes (the same for every subcommand):
  0   success
  1   healthcheck: the server is not SERVING (or cannot be reached)
  64  usage: an unknown flag, a missing or malformed argument or value (EX_USAGE)
  69  server: a needed resource is unavailable, e.g. the port is in use (EX_UNAVAILABLE)
  70  internal error (EX_SOFTWARE)
  78  server, config check: the configuration is invalid; every problem is listed (EX_CONFIG)
  connect also: 3 cannot connect or TLS failure, 4 credentials refused or role denied,
  5 rate limited (the server's limit, its failed-auth limiter or the provider's; the wait is
  shown), 6 the provider or the server failed to answer. With --json, a failure is also printed
  on stdout as {\"error\": {\"code\": \"<gRPC code or class>\", \"message\": \"...\"}}.";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway daemon.
    #[command(alias = "serve")]
    Server(ServerArgs),
    /// Validate or print the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Connect to a chatcli server (the client).
    Connect(ConnectArgs),
    /// Probe the local server's gRPC health (exit 0 when SERVING, 1 otherwise): the image's
    /// HEALTHCHECK. Reads the server's configuration to find its address and TLS settings.
    Healthcheck(HealthcheckArgs),
}

/// `chatcli healthcheck`: where the server listens and whether it speaks TLS come from the same
/// configuration and variables the server reads; the flags override them.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The server's config file (env CHATCLI_CONFIG; default /etc/chatcli/chatcli.toml when present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Server address (`host:port`); default: `server.bind_address` (loopback when it is 0.0.0.0
    /// or ::) and `server.port` of the configuration.
    #[arg(long, env = "CHATCLI_HEALTHCHECK_ADDR")]
    pub addr: Option<String>,
    /// Connect with TLS even when the configuration sets no `server.tls.cert_file`.
    #[arg(long)]
    pub tls: bool,
    /// A CA to trust besides the system roots (the server's own certificate from
    /// `server.tls.cert_file` is always trusted).
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate presented when the server requires one (`server.tls.client_ca_file`).
    #[arg(long, value_name = "FILE", env = "CHATCLI_HEALTHCHECK_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// The private key of `--client-cert`.
    #[arg(long, value_name = "FILE", env = "CHATCLI_HEALTHCHECK_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

/// `chatcli config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the configuration; exit 0, or 78 listing every problem.
    Check(ServerArgs),
    /// Print the merged configuration as TOML with the origin of each value (secrets redacted).
    Show(ServerArgs),
    /// Print a commented example config with every key and its default.
    Example,
}

/// `chatcli connect [flags] [address]`: the client. Flags, variables and defaults follow the
/// existing ChatCLI client; `chatcli::client` resolves and validates them.
#[derive(Debug, Clone, Default, Args)]
#[command(after_help = CONNECT_EXAMPLES)]
pub struct ConnectArgs {
    /// Server address: `host:port`, `dns:///host:port` (every address, round robin),
    /// `http://host:port` or `https://host:port` (env CHATCLI_REMOTE_ADDR).
    #[arg(value_name = "ADDRESS")]
    pub address: Option<String>,
    /// Server address, as the positional ADDRESS.
    #[arg(long, env = "CHATCLI_REMOTE_ADDR", value_name = "ADDRESS")]
    pub addr: Option<String>,
    /// Bearer token sent with every call.
    #[arg(long, env = "CHATCLI_REMOTE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Use TLS (1.2+). Without it, plaintext is used for loopback addresses (or anywhere when
    /// CHATCLI_ALLOW_INSECURE=true) and TLS with the system roots otherwise.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub tls: Option<bool>,
    /// CA certificate (PEM) that the server's certificate must chain to; default: the system roots.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS.
    #[arg(
        long,
        alias = "client-cert",
        env = "CHATCLI_TLS_CLIENT_CERT",
        value_name = "FILE"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "CHATCLI_TLS_CLIENT_KEY", value_name = "FILE")]
    pub tls_client_key: Option<PathBuf>,
    /// Name the server's certificate must carry (default: the host of the address).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Allow plaintext to non-loopback addresses when --tls is not given.
    #[arg(long, env = "CHATCLI_ALLOW_INSECURE", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub allow_insecure: Option<bool>,
    /// Your own provider API key or token, forwarded as `client_api_key`.
    #[arg(long, env = "CHATCLI_CLIENT_API_KEY", hide_env_values = true)]
    pub llm_key: Option<String>,
    /// Forward credentials from the local store (`auth-profiles.json` in ~/.chatcli or
    /// $CHATCLI_AUTH_DIR) or the environment: Anthropic, then OpenAI, then Copilot (or only
    /// --provider's). Profiles of one provider are tried `<provider>:default` first, then by id.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub use_local_auth: Option<bool>,
    /// Provider for every prompt (default: the server's). Checked at connect against the
    /// providers the server offers: one it does not offer is a usage error (exit 64) naming them.
    #[arg(long)]
    pub provider: Option<String>,
    /// Model for every prompt (default: the provider's).
    #[arg(long)]
    pub model: Option<String>,
    /// Most tokens in an answer (0 = the provider's default).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<i32>,
    /// StackSpot client id, forwarded in `provider_config`.
    #[arg(long)]
    pub client_id: Option<String>,
    /// StackSpot client key, forwarded in `provider_config`.
    #[arg(long)]
    pub client_key: Option<String>,
    /// StackSpot realm, forwarded in `provider_config`.
    #[arg(long)]
    pub realm: Option<String>,
    /// StackSpot agent id, forwarded in `provider_config`.
    #[arg(long)]
    pub agent_id: Option<String>,
    /// Ollama base URL, forwarded as `provider_config.base_url`.
    #[arg(long, value_name = "URL")]
    pub ollama_url: Option<String>,
    /// One prompt, answered on stdout as it streams; `-` reads the prompt from stdin (so does a
    /// piped stdin without -p).
    #[arg(
        short = 'p',
        long = "prompt",
        value_name = "PROMPT",
        allow_hyphen_values = true
    )]
    pub prompt: Option<String>,
    /// One-shot: print only the answer's text on stdout, nothing added.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub raw: Option<bool>,
    /// One-shot: print one JSON object {answer, provider, model, usage} on stdout; on failure
    /// {"error": {"code", "message"}} instead (same exit code).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", conflicts_with = "raw")]
    pub json: Option<bool>,
    /// Give up on connecting, or on an answer, after this long (`30s`, `2m`, or seconds).
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Say more on stderr (addresses, TLS mode, where credentials came from; never their values).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The examples at the end of `chatcli connect --help`.
const CONNECT_EXAMPLES: &str = "\
Examples:
  chatcli connect localhost:50051                     chat interactively (type /help)
  chatcli connect localhost:50051 -p \"explain TLS\"    one answer, streamed to stdout
  git diff | chatcli connect localhost:50051 --raw -p -    the prompt from stdin
  chatcli connect localhost:50051 --json -p \"hi\" | jq .answer
  chatcli connect dns:///chat.internal:50051 --tls --ca-cert ca.pem --token \"$TOKEN\"
  chatcli connect chat.example.com:443 --use-local-auth --provider CLAUDEAI
  chatcli connect localhost:50051 --provider STACKSPOT --client-id ID --client-key KEY \\
      --realm zup --agent-id AGENT

Exit codes: 0 ok, 64 usage or bad input (as for every subcommand), 3 cannot connect or TLS
failure, 4 unauthenticated or denied, 5 rate limited (also by the failed-auth limiter; the wait is
shown), 6 the provider or the server failed, 70 internal error. With --json a failure is also one
object on stdout: {\"error\": {\"code\": \"NOT_FOUND\" (gRPC code) or \"usage\"|\"connect\"|\"auth\"|
\"rate_limited\"|\"provider\"|\"internal\", \"message\": \"...\"}}.
Environment: CHATCLI_REMOTE_ADDR, CHATCLI_REMOTE_TOKEN, CHATCLI_CLIENT_API_KEY,
CHATCLI_TLS_CLIENT_CERT, CHATCLI_TLS_CLIENT_KEY, CHATCLI_ALLOW_INSECURE, CHATCLI_AUTH_DIR,
CHATCLI_DATA_DIR (history), NO_COLOR.";

/// Server flags. Names, meanings and defaults follow the existing ChatCLI server; the environment
/// variable in each help text is read by the config loader, one layer below the flag.
#[derive(Debug, Clone, Default, Args)]
pub struct ServerArgs {
    /// Config file (env CHATCLI_CONFIG; default /etc/chatcli/chatcli.toml when present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC + HTTP port (env CHATCLI_SERVER_PORT; default 50051). Under systemd socket activation
    /// (LISTEN_FDS) the passed socket is used instead.
    #[arg(long)]
    pub port: Option<u16>,
    /// Listen address (env CHATCLI_BIND_ADDRESS; default 127.0.0.1, 0.0.0.0 in Kubernetes).
    #[arg(long)]
    pub bind_address: Option<IpAddr>,
    /// Shared bearer token (env CHATCLI_SERVER_TOKEN).
    #[arg(long)]
    pub token: Option<String>,
    /// TLS certificate (env CHATCLI_SERVER_TLS_CERT).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (env CHATCLI_SERVER_TLS_KEY).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA that client certificates must chain to (env CHATCLI_TLS_CLIENT_CA).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Default provider (env LLM_PROVIDER; default the first configured).
    #[arg(long)]
    pub provider: Option<String>,
    /// Default model (default: the provider's).
    #[arg(long)]
    pub model: Option<String>,
    /// Prometheus port, 0 = off (env CHATCLI_METRICS_PORT; default 9090).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Fallback chain, comma separated (env CHATCLI_FALLBACK_PROVIDERS).
    #[arg(long)]
    pub fallback_providers: Option<String>,
    /// Retries per provider in the chain (env CHATCLI_FALLBACK_MAX_RETRIES; default 2).
    #[arg(long)]
    pub fallback_max_retries: Option<u32>,
    /// Cooldown base, doubled per failure (env CHATCLI_FALLBACK_COOLDOWN_BASE; default 30s).
    #[arg(long)]
    pub fallback_cooldown_base: Option<String>,
    /// Cooldown cap (env CHATCLI_FALLBACK_COOLDOWN_MAX; default 5m).
    #[arg(long)]
    pub fallback_cooldown_max: Option<String>,
    /// MCP servers JSON whose tools prompts use (env CHATCLI_MCP_CONFIG; default
    /// `<data-dir>/mcp_servers.json` when it exists).
    #[arg(long, value_name = "FILE")]
    pub mcp_config: Option<PathBuf>,
    /// Multi-target watcher YAML (env CHATCLI_WATCH_CONFIG).
    #[arg(long, value_name = "FILE", help_heading = WATCHER)]
    pub watch_config: Option<PathBuf>,
    /// Single watcher target (env CHATCLI_WATCH_DEPLOYMENT).
    #[arg(long, help_heading = WATCHER)]
    pub watch_deployment: Option<String>,
    /// Single target namespace (env CHATCLI_WATCH_NAMESPACE; default "default").
    #[arg(long, help_heading = WATCHER)]
    pub watch_namespace: Option<String>,
    /// Watcher interval (env CHATCLI_WATCH_INTERVAL; default 30s).
    #[arg(long, help_heading = WATCHER)]
    pub watch_interval: Option<String>,
    /// Watcher window (env CHATCLI_WATCH_WINDOW; default 2h).
    #[arg(long, help_heading = WATCHER)]
    pub watch_window: Option<String>,
    /// Log lines per pod (env CHATCLI_WATCH_MAX_LOG_LINES; default 100).
    #[arg(long, help_heading = WATCHER)]
    pub watch_max_log_lines: Option<u32>,
    /// Kubeconfig (env CHATCLI_KUBECONFIG; default in-cluster).
    #[arg(long, value_name = "FILE", help_heading = WATCHER)]
    pub watch_kubeconfig: Option<PathBuf>,
    /// Serve gRPC reflection; CHATCLI_GRPC_REFLECTION=true is needed as well.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub enable_reflection: Option<bool>,
    /// Let the server start without auth on a non-loopback address (env CHATCLI_ALLOW_NO_AUTH).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_no_auth: Option<bool>,
    /// Longest drain of in-flight calls on SIGTERM (env CHATCLI_SHUTDOWN_GRACE; default 30s).
    #[arg(long)]
    pub shutdown_grace: Option<String>,
    /// Log level: trace, debug, info, warn (or warning), error or off, alone or per target, e.g.
    /// "info,chatcli=debug" (env CHATCLI_LOG_LEVEL, LOG_LEVEL; default info).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text or json (env CHATCLI_LOG_FORMAT).
    #[arg(long)]
    pub log_format: Option<String>,
    /// Also log to this file, rotated by size (env CHATCLI_LOG_FILE).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Data dir for sessions and catalog (env CHATCLI_DATA_DIR; default ~/.chatcli).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

fn val<T: Serialize>(x: T) -> Option<Value> {
    Value::serialize(x).ok()
}

impl ServerArgs {
    /// The flags that were given, as config values.
    pub fn flag_values(&self) -> Vec<FlagValue> {
        let entries: [(&'static str, &'static str, Option<Value>); 29] = [
            ("server.port", "--port", self.port.and_then(val)),
            (
                "server.bind_address",
                "--bind-address",
                self.bind_address.map(|a| Value::from(a.to_string())),
            ),
            ("auth.token", "--token", self.token.clone().map(Value::from)),
            (
                "server.tls.cert_file",
                "--tls-cert",
                self.tls_cert.as_ref().and_then(val),
            ),
            (
                "server.tls.key_file",
                "--tls-key",
                self.tls_key.as_ref().and_then(val),
            ),
            (
                "server.tls.client_ca_file",
                "--tls-client-ca",
                self.tls_client_ca.as_ref().and_then(val),
            ),
            (
                "llm.default",
                "--provider",
                self.provider.clone().map(Value::from),
            ),
            ("llm.model", "--model", self.model.clone().map(Value::from)),
            (
                "metrics.port",
                "--metrics-port",
                self.metrics_port.and_then(val),
            ),
            (
                "llm.fallback",
                "--fallback-providers",
                self.fallback_providers.clone().map(Value::from),
            ),
            (
                "llm.fallback_max_retries",
                "--fallback-max-retries",
                self.fallback_max_retries.and_then(val),
            ),
            (
                "llm.fallback_cooldown_base",
                "--fallback-cooldown-base",
                self.fallback_cooldown_base.clone().map(Value::from),
            ),
            (
                "llm.fallback_cooldown_max",
                "--fallback-cooldown-max",
                self.fallback_cooldown_max.clone().map(Value::from),
            ),
            (
                "catalog.mcp_config",
                "--mcp-config",
                self.mcp_config.as_ref().and_then(val),
            ),
            (
                "watcher.config_file",
                "--watch-config",
                self.watch_config.as_ref().and_then(val),
            ),
            (
                "watcher.deployment",
                "--watch-deployment",
                self.watch_deployment.clone().map(Value::from),
            ),
            (
                "watcher.namespace",
                "--watch-namespace",
                self.watch_namespace.clone().map(Value::from),
            ),
            (
                "watcher.interval",
                "--watch-interval",
                self.watch_interval.clone().map(Value::from),
            ),
            (
                "watcher.window",
                "--watch-window",
                self.watch_window.clone().map(Value::from),
            ),
            (
                "watcher.max_log_lines",
                "--watch-max-log-lines",
                self.watch_max_log_lines.and_then(val),
            ),
            (
                "watcher.kubeconfig",
                "--watch-kubeconfig",
                self.watch_kubeconfig.as_ref().and_then(val),
            ),
            (
                "server.reflection",
                "--enable-reflection",
                self.enable_reflection.and_then(val),
            ),
            (
                "server.allow_no_auth",
                "--allow-no-auth",
                self.allow_no_auth.and_then(val),
            ),
            (
                "server.shutdown_grace",
                "--shutdown-grace",
                self.shutdown_grace.clone().map(Value::from),
            ),
            (
                "log.level",
                "--log-level",
                self.log_level.clone().map(Value::from),
            ),
            (
                "log.format",
                "--log-format",
                self.log_format.clone().map(Value::from),
            ),
            (
                "log.file",
                "--log-file",
                self.log_file.as_ref().and_then(val),
            ),
            (
                "state.data_dir",
                "--data-dir",
                self.data_dir.as_ref().and_then(val),
            ),
            ("", "", None),
        ];
        entries
            .into_iter()
            .filter_map(|(key, flag, value)| value.map(|value| FlagValue { key, value, flag }))
            .collect()
    }
}

/// Rewrites Go-style single-dash long flags (`-port=1`, `-token x`) to `--port=1`, `--token x`, for the
/// long flags chatcli knows; short flags and values are left alone.
pub fn normalize_args<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    let mut longs: Vec<String> = Vec::new();
    let cmd = Cli::command();
    let mut stack = vec![cmd];
    while let Some(c) = stack.pop() {
        longs.extend(
            c.get_arguments()
                .filter_map(|a| a.get_long().map(String::from)),
        );
        stack.extend(c.get_subcommands().cloned());
    }
    args.into_iter()
        .map(|arg| {
            let Some(text) = arg.to_str() else { return arg };
            let Some(rest) = text.strip_prefix('-') else {
                return arg;
            };
            if rest.starts_with('-') {
                return arg;
            }
            let name = rest.split_once('=').map_or(rest, |(n, _)| n);
            if name.len() > 1 && longs.iter().any(|l| l == name) {
                OsString::from(format!("-{text}"))
            } else {
                arg
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let args = normalize_args(args.iter().map(OsString::from));
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn serve_is_an_alias_and_go_style_flags_work() {
        let Command::Server(a) = parse(&[
            "chatcli",
            "serve",
            "-port=9",
            "-token",
            "t",
            "--enable-reflection",
        ])
        .command
        else {
            panic!("not server")
        };
        assert_eq!(a.port, Some(9));
        assert_eq!(a.token.as_deref(), Some("t"));
        assert_eq!(a.enable_reflection, Some(true));
        let keys: Vec<_> = a.flag_values().iter().map(|f| f.key).collect();
        assert_eq!(keys, vec!["server.port", "auth.token", "server.reflection"]);
    }

    #[test]
    fn unset_flags_set_nothing() {
        let Command::Server(a) = parse(&["chatcli", "server"]).command else {
            panic!("not server")
        };
        assert!(a.flag_values().is_empty());
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
