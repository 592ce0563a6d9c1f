//! The typed configuration. Every field's doc comment is its reference documentation; defaults live in
//! the `Default` impls (and in [`Defaults`] for the few that depend on the environment).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{Secret, duration_str, string_or_list};
use super::{LogFormat, Role};

/// The whole daemon configuration, one field per TOML section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The gRPC + HTTP listener and its limits.
    pub server: ServerConfig,
    /// The Prometheus metrics listener.
    pub metrics: MetricsConfig,
    /// Logging to stderr and an optional rotated file.
    pub log: LogConfig,
    /// Who may call the server.
    pub auth: AuthConfig,
    /// Rate limits and request bounds.
    pub limits: LimitsConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// LLM providers, the default one and the fallback chain.
    pub llm: LlmConfig,
    /// The Kubernetes watcher.
    pub watcher: WatcherConfig,
    /// Plugins, agents, skills and MCP servers offered to clients.
    pub catalog: CatalogConfig,
    /// Where state (sessions, plugins, agents, skills) is kept.
    pub state: StateConfig,
    /// The conversation hub: conversations shared by several front ends of one principal.
    pub hub: HubConfig,
}

/// Environment-derived defaults: the bind rule and the data dir depend on the process environment.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// `0.0.0.0` when `KUBERNETES_SERVICE_HOST` is set, else `127.0.0.1`.
    pub bind_address: IpAddr,
    /// `$HOME/.chatcli`.
    pub data_dir: PathBuf,
}

impl Defaults {
    /// Derives the defaults from an environment map.
    pub fn from_env(env: &std::collections::HashMap<String, String>) -> Self {
        let in_kubernetes = env
            .get("KUBERNETES_SERVICE_HOST")
            .is_some_and(|v| !v.is_empty());
        let bind_address = if in_kubernetes {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        let home = env
            .get("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/chatcli"));
        Self {
            bind_address,
            data_dir: home.join(".chatcli"),
        }
    }
}

impl Config {
    /// The built-in defaults, given the environment-derived ones.
    pub fn defaults(d: &Defaults) -> Self {
        let mut c = Config {
            server: ServerConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            audit: AuditConfig::default(),
            llm: LlmConfig::default(),
            watcher: WatcherConfig::default(),
            catalog: CatalogConfig::default(),
            state: StateConfig::default(),
            hub: HubConfig::default(),
        };
        c.server.bind_address = d.bind_address;
        c.metrics.bind_address = d.bind_address;
        c.state.data_dir = d.data_dir.clone();
        c
    }

    /// The ways a caller can authenticate under this config, by name (`shared token`,
    /// `named tokens`, `jwt`, `mtls`); empty when every caller is let in as admin.
    pub fn auth_methods(&self) -> Vec<&'static str> {
        let auth = &self.auth;
        let jwt = &auth.jwt;
        [
            (
                auth.token.is_some() || auth.token_file.is_some(),
                "shared token",
            ),
            (!auth.tokens.is_empty(), "named tokens"),
            (
                jwt.secret.is_some()
                    || jwt.secret_file.is_some()
                    || jwt.public_key_file.is_some()
                    || jwt.jwks_file.is_some(),
                "jwt",
            ),
            (self.server.tls.client_ca_file.is_some(), "mtls"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::defaults(&Defaults {
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            data_dir: PathBuf::from(".chatcli"),
        })
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address for gRPC and HTTP (`CHATCLI_BIND_ADDRESS`); default 127.0.0.1, or 0.0.0.0 when
    /// `KUBERNETES_SERVICE_HOST` is set. Needs a restart.
    pub bind_address: IpAddr,
    /// Listen port for gRPC and HTTP (`--port`, `CHATCLI_SERVER_PORT`). Needs a restart.
    pub port: u16,
    /// How long in-flight calls may run after SIGTERM before the daemon exits (`--shutdown-grace`).
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    /// Largest gRPC message accepted, in bytes (`CHATCLI_MAX_RECV_MSG_SIZE`).
    pub max_recv_msg_size: usize,
    /// Largest gRPC message sent, in bytes (`CHATCLI_MAX_SEND_MSG_SIZE`).
    pub max_send_msg_size: usize,
    /// HTTP/2 streams per connection (`CHATCLI_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Longest time an HTTP/1 client may take to send a request's headers, counted from when the
    /// server starts waiting for them (on a kept-alive connection, from the end of the previous
    /// response, so this is also how long an idle kept-alive HTTP/1 connection stays open). A client
    /// that stalls is disconnected and cannot hold connections by trickling headers. HTTP/2 and gRPC
    /// connections are not affected. `0` = no limit. Needs a restart.
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    /// Longest time a client may take to send the body of an HTTP API request, counted from the
    /// end of its headers. A client that trickles its body is answered 408 and disconnected, so
    /// it cannot hold a connection and a handler by sending a byte at a time. gRPC calls are not
    /// affected (their streams have deadlines of their own). `0` = no limit.
    #[serde(with = "duration_str")]
    pub body_read_timeout: Duration,
    /// Largest request head a client may send, in bytes: an HTTP/1 request line and headers over
    /// it are answered 431, an HTTP/2 header list over it is refused (the stream is reset). Needs
    /// a restart.
    pub max_header_bytes: u32,
    /// Connections one client address (the TCP peer) may hold open at once; a further one is
    /// closed as soon as it is accepted. `0` = no limit. Needs a restart.
    pub max_connections_per_client: u32,
    /// Longest time a client may take to complete the TLS handshake; a client that stalls in it
    /// is disconnected. Needs a restart.
    #[serde(with = "duration_str")]
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 streams a client may open and reset before the server accepts them; a client over it
    /// (the "rapid reset" attack) gets GOAWAY and its connection is closed. Needs a restart.
    pub max_pending_reset_streams: u32,
    /// Serve gRPC reflection (`--enable-reflection`); also needs `CHATCLI_GRPC_REFLECTION=true`.
    pub reflection: bool,
    /// Start without any authentication on a non-loopback address (`--allow-no-auth`).
    pub allow_no_auth: bool,
    /// Proxies (load balancers, ingresses) trusted to say who the client is, as addresses or CIDRs,
    /// e.g. `["10.0.0.0/8", "192.0.2.7"]` (`CHATCLI_SERVER__TRUSTED_PROXIES`, comma separated).
    /// Only for a request whose TCP peer is one of them is the client's address read from
    /// `Forwarded: for=` or `X-Forwarded-For` (HTTP headers or gRPC metadata): the right-most
    /// address that is not itself a trusted proxy; headers from any other peer are ignored. That
    /// address is what the failed-auth limiter and the rate limit of callers without credentials
    /// are keyed on and what the audit log records as `client_addr` (with the proxy as
    /// `peer_addr`). Empty (the default): the TCP peer is the client.
    #[serde(deserialize_with = "string_or_list")]
    pub trusted_proxies: Vec<String>,
    /// Every connection must start with a PROXY protocol header (HAProxy's, version 2 binary or
    /// version 1 text), as load balancers such as HAProxy, AWS NLB or an ingress send it with
    /// `send-proxy`; a connection without a valid header within 10 s is closed. When the TCP peer
    /// is in `trusted_proxies`, the source address in the header is the client (it is ignored
    /// otherwise). Health probes on this port must then send the header too (probe the metrics
    /// port's `/healthz` and `/readyz` instead). Needs a restart.
    pub proxy_protocol: bool,
    /// TLS for the listener.
    pub tls: TlsConfig,
    /// `CHATCLI_GRPC_REFLECTION=true` was set: the environment's half of the reflection switch.
    /// Not a config key; set by the loader.
    #[serde(skip)]
    pub reflection_env: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 50051,
            shutdown_grace: Duration::from_secs(30),
            max_recv_msg_size: 52_428_800,
            max_send_msg_size: 52_428_800,
            max_concurrent_streams: 100,
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            max_header_bytes: 65_536,
            max_connections_per_client: 0,
            tls_handshake_timeout: Duration::from_secs(10),
            max_pending_reset_streams: 20,
            reflection: false,
            allow_no_auth: false,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            tls: TlsConfig::default(),
            reflection_env: false,
        }
    }
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain (`--tls-cert`, `CHATCLI_SERVER_TLS_CERT`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key (`--tls-key`, `CHATCLI_SERVER_TLS_KEY`). Relative TLS paths are looked up in
    /// `$CREDENTIALS_DIRECTORY` when that is set (systemd `LoadCredential=`).
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to (`--tls-client-ca`, `CHATCLI_TLS_CLIENT_CA`).
    pub client_ca_file: Option<PathBuf>,
    /// Lowest TLS version accepted: "1.2" or "1.3".
    pub min_version: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            min_version: "1.3".into(),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Port of the metrics listener (`--metrics-port`, `CHATCLI_METRICS_PORT`); 0 turns metrics off.
    pub port: u16,
    /// Listen address of the metrics listener; same default rule as `server.bind_address`.
    pub bind_address: IpAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            port: 9090,
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// trace, debug, info, warn (or warning), error or off, alone or per target, e.g. "info" or
    /// "info,chatcli=debug"; any other word is refused (`CHATCLI_LOG_LEVEL`, else `LOG_LEVEL`).
    pub level: String,
    /// "text" or "json" (`CHATCLI_LOG_FORMAT`).
    pub format: LogFormat,
    /// Also log to this file, rotated by size (`CHATCLI_LOG_FILE`).
    pub file: Option<PathBuf>,
    /// Rotate the log file when it passes this size (`CHATCLI_LOG_MAX_SIZE_MB`).
    pub max_size_mb: u64,
    /// Rotated files kept (`CHATCLI_LOG_MAX_BACKUPS`).
    pub max_backups: usize,
    /// Rotated files older than this many days are deleted (`CHATCLI_LOG_MAX_AGE_DAYS`).
    pub max_age_days: u64,
    /// Gzip rotated files (`CHATCLI_LOG_COMPRESS`).
    pub compress: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            file: None,
            max_size_mb: 100,
            max_backups: 5,
            max_age_days: 30,
            compress: false,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared bearer token; callers presenting it are admin `legacy-token` (`--token`, `CHATCLI_SERVER_TOKEN`).
    pub token: Option<Secret>,
    /// Read the shared token from this file (`CHATCLI_SERVER_TOKEN_FILE`).
    pub token_file: Option<PathBuf>,
    /// JSON Web Tokens.
    pub jwt: JwtConfig,
    /// Named tokens with roles, so a fleet can hand out one token per team.
    pub tokens: Vec<NamedToken>,
    /// Roles of client-certificate identities (mTLS).
    pub mtls: MtlsConfig,
}

/// One `[[auth.tokens]]` entry: a token known by its SHA-256 or read from a file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamedToken {
    /// The principal id of callers presenting this token.
    pub name: String,
    /// admin | user | readonly.
    pub role: Role,
    /// Lower-case hex SHA-256 of the token (so the config holds no secret).
    pub sha256: Option<String>,
    /// A file holding the token itself.
    pub file: Option<PathBuf>,
    /// Requests per second for this token (overrides the role's and the default).
    pub rate_limit_rps: Option<f64>,
    /// Burst for this token.
    pub rate_limit_burst: Option<u32>,
}

/// `[auth.mtls]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtlsConfig {
    /// Certificate identity (first URI SAN, else DNS SAN, else CN) → role.
    pub roles: std::collections::BTreeMap<String, Role>,
    /// Role of a verified certificate identity not listed in `roles`.
    pub default_role: Role,
}

/// `[auth.jwt]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// HS256 secret (`CHATCLI_JWT_SECRET`).
    pub secret: Option<Secret>,
    /// Read the HS256 secret from this file (`CHATCLI_JWT_SECRET_FILE`).
    pub secret_file: Option<PathBuf>,
    /// PEM public key (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA) (`CHATCLI_JWT_PUBLIC_KEY_FILE`).
    pub public_key_file: Option<PathBuf>,
    /// JWKS file with public keys, chosen by `kid` (`CHATCLI_JWT_JWKS_FILE`).
    pub jwks_file: Option<PathBuf>,
    /// Required `iss` claim (`CHATCLI_JWT_ISSUER`).
    pub issuer: Option<String>,
    /// Accepted `aud` values (`CHATCLI_JWT_AUDIENCE`, comma separated).
    #[serde(deserialize_with = "string_or_list")]
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "duration_str")]
    pub leeway: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: Vec::new(),
            leeway: Duration::from_secs(30),
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per second per caller (`CHATCLI_RATE_LIMIT_RPS`).
    pub rate_limit_rps: f64,
    /// Burst per caller (`CHATCLI_RATE_LIMIT_BURST`).
    pub rate_limit_burst: u32,
    /// Largest prompt accepted, in bytes.
    pub max_prompt_bytes: usize,
    /// Most history messages accepted with one prompt; an interactive session keeps at most this
    /// many, dropping its oldest turns first.
    pub max_history_messages: usize,
    /// Most history bytes (all contents together) accepted with one prompt; an interactive session
    /// keeps at most this many, dropping its oldest turns first.
    pub max_history_bytes: usize,
    /// An InteractiveSession stream with no message from its client for this long is closed
    /// (`DEADLINE_EXCEEDED`), freeing its stream slot and its history; the time the server spends
    /// answering does not count. `0` = never (`CHATCLI_LIMITS__INTERACTIVE_IDLE_TIMEOUT`).
    #[serde(with = "duration_str")]
    pub interactive_idle_timeout: Duration,
    /// Rate limit per role, overriding the default (`[limits.roles.readonly] rate_limit_rps = 1`).
    pub roles: std::collections::BTreeMap<Role, RoleLimits>,
    /// Concurrent streams one principal may hold open (0 = no cap beyond the per-connection limit).
    pub max_streams_per_principal: u32,
    /// Failed authentications allowed per client IP per minute before they are slowed.
    pub auth_failures_per_minute: u32,
    /// Largest `content` of one hub event (`AppendEvent`), in bytes.
    pub hub_max_content_bytes: usize,
    /// Longest `channel`, `role` or `client_msg_id` of one hub event, and longest `platform`,
    /// `user_id` or `principal` of a hub binding, in bytes.
    pub hub_max_field_bytes: usize,
}

/// A role's rate limit.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoleLimits {
    /// Requests per second.
    pub rate_limit_rps: Option<f64>,
    /// Burst.
    pub rate_limit_burst: Option<u32>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            rate_limit_rps: 10.0,
            rate_limit_burst: 30,
            max_prompt_bytes: 524_288,
            max_history_messages: 1000,
            max_history_bytes: 8 * 1024 * 1024,
            interactive_idle_timeout: Duration::from_secs(15 * 60),
            roles: Default::default(),
            max_streams_per_principal: 32,
            auth_failures_per_minute: 5,
            hub_max_content_bytes: 1024 * 1024,
            hub_max_field_bytes: 256,
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// JSON-lines audit file; unset = off (`CHATCLI_AUDIT_LOG_PATH`).
    pub path: Option<PathBuf>,
    /// Rotate the audit file when it passes this size.
    pub max_size_mb: u64,
    /// Rotated audit files kept.
    pub max_backups: usize,
    /// Records waiting to be written; when full, new records are dropped and counted. The writer
    /// lets records gather for 10 ms between writes, so this must hold 10 ms of calls.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: None,
            max_size_mb: 100,
            max_backups: 10,
            queue: 10_000,
        }
    }
}

/// `[llm]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Provider used when a request names none (`--provider`, `LLM_PROVIDER`); default: the first in `providers`.
    pub default: Option<String>,
    /// Model used when a request names none (`--model`); default: the default provider's model.
    pub model: Option<String>,
    /// Order of the fallback chain; empty = no fallback (`--fallback-providers`, comma separated).
    #[serde(deserialize_with = "string_or_list")]
    pub fallback: Vec<String>,
    /// Retries per provider in the chain (`--fallback-max-retries`).
    pub fallback_max_retries: u32,
    /// First cooldown of a failing provider, doubled per failure (`--fallback-cooldown-base`).
    #[serde(with = "duration_str")]
    pub fallback_cooldown_base: Duration,
    /// Longest cooldown (`--fallback-cooldown-max`).
    #[serde(with = "duration_str")]
    pub fallback_cooldown_max: Duration,
    /// Model each provider uses when it answers as a fallback, by provider name
    /// (`CHATCLI_FALLBACK_MODEL_<PROVIDER>`); default: the provider's model.
    pub fallback_models: std::collections::BTreeMap<String, String>,
    /// Allow `http://` URLs from clients' `provider_config` (`CHATCLI_ALLOW_HTTP_PROVIDERS`).
    pub allow_http_providers: bool,
    /// Hosts (`name`, `*.domain`) and addresses/CIDRs that client-supplied URLs may reach even though
    /// they are private (e.g. a team's Ollama box).
    pub ssrf_allow: Vec<String>,
    /// The providers, in order. Providers are also registered from the existing ChatCLI's variables
    /// (`OPENAI_API_KEY`, `ANTHROPIC_API_KEY`, `OLLAMA_ENABLED`, …) after these, alphabetically.
    pub providers: Vec<ProviderConfig>,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            default: None,
            model: None,
            fallback: Vec::new(),
            fallback_max_retries: 2,
            fallback_cooldown_base: Duration::from_secs(30),
            fallback_cooldown_max: Duration::from_secs(300),
            fallback_models: Default::default(),
            allow_http_providers: false,
            ssrf_allow: Vec::new(),
            providers: Vec::new(),
        }
    }
}

/// One `[[llm.providers]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// What clients put in `provider` (matched case-insensitively).
    pub name: String,
    /// Wire format: echo | openai | anthropic | gemini | ollama | stackspot, or an OpenAI-compatible
    /// preset with its own base URL, model and headers: openai-compatible | xai | openrouter |
    /// moonshot | zai | github-models | copilot.
    pub kind: String,
    /// Base URL of the provider's API.
    pub base_url: Option<String>,
    /// API key.
    pub api_key: Option<Secret>,
    /// Read the API key from this file.
    pub api_key_file: Option<PathBuf>,
    /// Default model of this provider.
    pub model: Option<String>,
    /// Other models this provider offers: `GET /v1/models` lists them as `<name>/<model>` after
    /// the default one, and an OpenAI-style model id such as `anthropic/claude-x` goes to the
    /// default provider when it offers that id and no provider named `anthropic` offers
    /// `claude-x`. Callers may still ask for any model.
    pub models: Vec<String>,
    /// Also list the models the upstream itself reports (openai and its compatible presets:
    /// `GET <base_url>/models`; ollama: `/api/tags`; gemini: `models`; anthropic: `/v1/models`),
    /// asked with the server's credentials when `/v1/models` is first called after a start or a
    /// reload, then again once the list is older than `models_refresh`.
    pub discover_models: bool,
    /// How long a discovered model list is used before the next `/v1/models` refreshes it.
    #[serde(with = "duration_str")]
    pub models_refresh: Duration,
    /// Pause between streamed pieces (echo provider only; useful for demos and tests).
    #[serde(with = "duration_str::option")]
    pub delay: Option<Duration>,
    /// Extra HTTP headers sent upstream (e.g. OpenRouter's `HTTP-Referer` and `X-Title`).
    pub headers: std::collections::BTreeMap<String, String>,
    /// Longest wait for the upstream's response headers (`0s` = no bound). OpenAI-format providers
    /// ask for a non-streamed call (SendPrompt, `stream: false`) as one whole answer, which most
    /// upstreams send with its headers once it is complete, so there it also bounds the generation.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// Longest wait, once the response headers are in, for the first byte of the body (`0s` = no
    /// bound). On expiry the upstream connection is closed and the call fails as a timeout: the
    /// fallback chain moves on when nothing was sent to the caller yet.
    #[serde(with = "duration_str")]
    pub first_byte_timeout: Duration,
    /// Longest silence between two bytes of an answer's body (`0s` = no bound); keep-alive bytes
    /// (SSE comments, Anthropic `ping` events) count as bytes. On expiry the connection is closed
    /// and the call fails as a timeout (an SSE `error` event, or a gRPC DEADLINE_EXCEEDED, when
    /// part of the answer was already sent).
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Longest time a whole non-streamed answer (SendPrompt, `stream: false`, `/request` without
    /// `stream`) may take from this provider, from sending the request to its last byte (`0s` = no bound): the cap of an
    /// upstream that keeps trickling bytes. On expiry the connection is closed and the next
    /// provider of the fallback chain is asked. Ending a call this long is never held against the
    /// provider's cooldown: how long an answer takes depends on what was asked.
    #[serde(with = "duration_str")]
    pub unary_timeout: Duration,
    /// Largest answer body this provider may send, in bytes (`0` = no bound): an upstream that
    /// sends more is cut off and the call fails as a malformed answer (the fallback chain moves
    /// on when nothing was sent to the caller yet). Bounds the memory one call can take.
    pub max_response_bytes: u64,
    /// Anthropic `anthropic-version` header.
    pub api_version: Option<String>,
    /// StackSpot client id.
    pub client_id: Option<String>,
    /// StackSpot client key.
    pub client_key: Option<Secret>,
    /// Read the StackSpot client key from this file.
    pub client_key_file: Option<PathBuf>,
    /// StackSpot realm (default "zup").
    pub realm: Option<String>,
    /// StackSpot agent id.
    pub agent_id: Option<String>,
    /// StackSpot token endpoint (default `https://idm.stackspot.com/<realm>/oidc/oauth/token`).
    pub token_url: Option<String>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: String::new(),
            base_url: None,
            api_key: None,
            api_key_file: None,
            model: None,
            models: Vec::new(),
            discover_models: false,
            models_refresh: Duration::from_secs(600),
            delay: None,
            headers: Default::default(),
            timeout: Duration::from_secs(120),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            unary_timeout: Duration::from_secs(300),
            max_response_bytes: 16 * 1024 * 1024,
            api_version: None,
            client_id: None,
            client_key: None,
            client_key_file: None,
            realm: None,
            agent_id: None,
            token_url: None,
        }
    }
}

/// `[watcher]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatcherConfig {
    /// Multi-target YAML file (`--watch-config`).
    pub config_file: Option<PathBuf>,
    /// Single target deployment; enables the watcher (`--watch-deployment`).
    pub deployment: Option<String>,
    /// Single target namespace (`--watch-namespace`).
    pub namespace: String,
    /// Collection interval (`--watch-interval`).
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// Observation window (`--watch-window`).
    #[serde(with = "duration_str")]
    pub window: Duration,
    /// Log lines per pod (`--watch-max-log-lines`).
    pub max_log_lines: u32,
    /// Kubeconfig path; unset = in-cluster when running in a pod, else `KUBECONFIG` or
    /// `~/.kube/config` (`--watch-kubeconfig`, `CHATCLI_KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// Most characters of watcher context added to a prompt.
    pub max_context_chars: usize,
    /// Whether prompts of the OpenAI-compatible API (`/v1/chat/completions`) get the watcher's
    /// context too; chatcli's own prompts always do, AnalyzeIssue and AgenticStep never.
    pub inject_openai: bool,
    /// The targets (`[[watcher.targets]]`); the multi-target YAML of `config_file` replaces them,
    /// and without either `deployment` is the one target.
    pub targets: Vec<WatchTarget>,
}

impl Default for WatcherConfig {
    fn default() -> Self {
        Self {
            config_file: None,
            deployment: None,
            namespace: "default".into(),
            interval: Duration::from_secs(30),
            window: Duration::from_secs(2 * 3600),
            max_log_lines: 100,
            kubeconfig: None,
            max_context_chars: 32_000,
            inject_openai: false,
            targets: Vec::new(),
        }
    }
}

/// The kind of workload a target names.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize,
)]
pub enum WorkloadKind {
    /// `apps/v1` Deployment.
    #[default]
    Deployment,
    /// `apps/v1` StatefulSet.
    StatefulSet,
    /// `apps/v1` DaemonSet.
    DaemonSet,
    /// `batch/v1` Job.
    Job,
    /// `batch/v1` CronJob.
    CronJob,
}

impl WorkloadKind {
    /// The kind's name as Kubernetes writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
        }
    }
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One workload to watch (`[[watcher.targets]]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchTarget {
    /// The workload's name (required).
    pub deployment: String,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job` or `CronJob`.
    pub kind: WorkloadKind,
    /// The workload's namespace.
    pub namespace: String,
    /// Port of the pods' Prometheus endpoint to scrape; unset = no scrape.
    pub metrics_port: Option<u16>,
    /// Path of that endpoint (default `/metrics`).
    pub metrics_path: Option<String>,
    /// Glob patterns of the scraped metric names to keep (e.g. `http_*`); empty = all.
    pub metrics_filter: Vec<String>,
}

impl Default for WatchTarget {
    fn default() -> Self {
        Self {
            deployment: String::new(),
            kind: WorkloadKind::Deployment,
            namespace: "default".into(),
            metrics_port: None,
            metrics_path: None,
            metrics_filter: Vec::new(),
        }
    }
}

impl WatchTarget {
    /// The target's key in the store and in alerts: `Kind/namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.deployment)
    }
}

/// `[catalog]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// Plugin executables; default `<data_dir>/plugins`.
    pub plugins_dir: Option<PathBuf>,
    /// Agent markdown files; default `<data_dir>/agents`.
    pub agents_dir: Option<PathBuf>,
    /// Skills; default `<data_dir>/skills`.
    pub skills_dir: Option<PathBuf>,
    /// Public keys (`*.pub`) plugin signatures are checked against; default `<data_dir>/trusted-keys`.
    pub trusted_keys_dir: Option<PathBuf>,
    /// Load plugins without a signature (`CHATCLI_ALLOW_UNSIGNED_PLUGINS`).
    pub allow_unsigned: bool,
    /// Longest run of one plugin call before its process group is killed (at most 15m).
    #[serde(with = "duration_str")]
    pub exec_timeout: Duration,
    /// Bytes of a plugin's stdout, and again of its stderr, kept per call; the rest is dropped and
    /// the output marked as truncated.
    pub max_output_bytes: usize,
    /// Variables of the server's environment a plugin sees; every other one is removed.
    pub env_allow: Vec<String>,
    /// MCP servers JSON (`--mcp-config`, `CHATCLI_MCP_CONFIG`); default
    /// `<data_dir>/mcp_servers.json` when that file exists. Its changes are reloaded.
    pub mcp_config: Option<PathBuf>,
    /// Roles whose prompts may use the MCP servers' tools.
    pub mcp_roles: Vec<Role>,
    /// Rounds of tool calls a prompt may make before the model must answer (1 to 64).
    pub mcp_max_rounds: u32,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            plugins_dir: None,
            agents_dir: None,
            skills_dir: None,
            trusted_keys_dir: None,
            allow_unsigned: false,
            exec_timeout: Duration::from_secs(15 * 60),
            max_output_bytes: 8 * 1024 * 1024,
            env_allow: ["PATH", "LANG", "LC_ALL", "TZ"].map(String::from).to_vec(),
            mcp_config: None,
            mcp_roles: vec![Role::Admin, Role::User],
            mcp_max_rounds: 8,
        }
    }
}

/// `[state]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Where sessions, plugins, agents and skills live (`CHATCLI_DATA_DIR`); default `$HOME/.chatcli`.
    /// Needs a restart.
    pub data_dir: PathBuf,
    /// Where the state replicas share lives: `local` (files and the embedded store of this machine)
    /// or `redis` (sessions, rate limits and the hub on `[state.redis]`, shared by every replica
    /// pointed at it) (`CHATCLI_STATE_BACKEND`). Needs a restart.
    pub backend: StateBackend,
    /// What rate limits do while Redis cannot be reached: `local` (each replica limits with its own
    /// buckets) or `deny` (calls are refused). Session calls answer `UNAVAILABLE` either way. Needs
    /// a restart.
    pub on_unavailable: OnUnavailable,
    /// With `backend = "redis"`: refuse to start when Redis cannot be reached or refuses the
    /// credentials (exit 78), and report NOT_SERVING on `/readyz` and `grpc.health.v1` while it is
    /// down. Needs a restart.
    pub required: bool,
    /// The Redis server of `backend = "redis"`.
    pub redis: RedisConfig,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".chatcli"),
            backend: StateBackend::Local,
            on_unavailable: OnUnavailable::Local,
            required: false,
            redis: RedisConfig::default(),
        }
    }
}

/// `[state] backend`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// Files and the embedded store of one machine.
    #[default]
    Local,
    /// A Redis server shared by every replica.
    Redis,
}

/// `[state] on_unavailable`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Rate limits fall back to this replica's own buckets.
    #[default]
    Local,
    /// Rate-limited calls are refused.
    Deny,
}

/// `[state.redis]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://host:port/db` (TLS through rustls); a Redis Cluster is
    /// given as several comma-separated URLs (`CHATCLI_STATE_REDIS_URL`). Put the password in
    /// `password_file`, not in the URL. Needs a restart.
    pub url: Option<String>,
    /// The ACL user name (Redis 6+); empty = the default user. Needs a restart.
    pub username: Option<String>,
    /// A file holding the password (relative names are looked up in `$CREDENTIALS_DIRECTORY`).
    /// Needs a restart.
    pub password_file: Option<PathBuf>,
    /// A PEM file of the CA certificates trusted for `rediss://`; default the system's roots.
    /// Needs a restart.
    pub ca_file: Option<PathBuf>,
    /// Prepended to every key, so several deployments can share one Redis. Needs a restart.
    pub key_prefix: String,
    /// How long connecting (TCP, TLS, AUTH) may take. Needs a restart.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// How long one command may take before it counts as a failure of Redis. Needs a restart.
    #[serde(with = "duration_str")]
    pub response_timeout: Duration,
    /// Redis Sentinel addresses (`host:port`); with `master_name`, the master is found through
    /// them instead of `url`'s host. Needs a restart.
    pub sentinels: Vec<String>,
    /// The master's name at the sentinels. Needs a restart.
    pub master_name: Option<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password_file: None,
            ca_file: None,
            key_prefix: "chatcli:".into(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_millis(500),
            sentinels: Vec::new(),
            master_name: None,
        }
    }
}

/// `[hub]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Serve the conversation hub RPCs; when off they answer `UNAVAILABLE`
    /// (`CHATCLI_HUB_ENABLED`). Needs a restart.
    pub enabled: bool,
    /// The hub's SQLite database; default `<state.data_dir>/hub.db` (`CHATCLI_HUB_DB`). Needs a
    /// restart.
    pub db: Option<PathBuf>,
    /// Live events a subscriber may fall behind by before it is cut off with `ABORTED` (it then
    /// re-reads and re-subscribes) (`CHATCLI_HUB_TAIL_BUFFER`). Needs a restart.
    pub tail_buffer: usize,
    /// Conversations with no event for this many days are deleted (checked every minute);
    /// `0` = keep them forever.
    pub retention_days: u32,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            db: None,
            tail_buffer: 1024,
            retention_days: 0,
        }
    }
}

impl Config {
    /// The hub's database file.
    pub fn hub_db(&self) -> PathBuf {
        self.hub
            .db
            .clone()
            .unwrap_or_else(|| self.state.data_dir.join("hub.db"))
    }
    /// The sessions folder.
    pub fn sessions_dir(&self) -> PathBuf {
        self.state.data_dir.join("sessions")
    }
    /// The plugins folder.
    pub fn plugins_dir(&self) -> PathBuf {
        self.catalog
            .plugins_dir
            .clone()
            .unwrap_or_else(|| self.state.data_dir.join("plugins"))
    }
    /// The agents folder.
    pub fn agents_dir(&self) -> PathBuf {
        self.catalog
            .agents_dir
            .clone()
            .unwrap_or_else(|| self.state.data_dir.join("agents"))
    }
    /// The skills folder.
    pub fn skills_dir(&self) -> PathBuf {
        self.catalog
            .skills_dir
            .clone()
            .unwrap_or_else(|| self.state.data_dir.join("skills"))
    }
    /// The trusted public keys folder of plugin signatures.
    pub fn trusted_keys_dir(&self) -> PathBuf {
        self.catalog
            .trusted_keys_dir
            .clone()
            .unwrap_or_else(|| self.state.data_dir.join("trusted-keys"))
    }
}
