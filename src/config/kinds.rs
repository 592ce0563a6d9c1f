//! The enumerations and small value types that the config names and other modules act on:
//! roles (auth), provider kinds (llm), the log format (telemetry) and the trusted proxy networks
//! (server). They live here so that the config module depends on no other module of the crate.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What a principal may do.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including other principals' data.
    Admin,
    /// Prompts and own sessions.
    #[default]
    User,
    /// Reads only: no plugin runs, no session writes or deletes.
    #[serde(rename = "readonly")]
    ReadOnly,
}

impl Role {
    /// Parses a JWT `role` claim: admin | user | readonly, anything else → user.
    pub fn from_claim(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "admin" => Self::Admin,
            "readonly" | "read-only" | "read_only" => Self::ReadOnly,
            _ => Self::User,
        }
    }

    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::User => "user",
            Self::ReadOnly => "readonly",
        }
    }
}

/// The known provider kinds (wire formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// Built-in: streams the prompt back word by word. For demos and tests.
    Echo,
    /// OpenAI Chat Completions, and the OpenAI-compatible presets (xAI, OpenRouter, …).
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini.
    Gemini,
    /// Ollama's native API.
    Ollama,
    /// StackSpot agents.
    StackSpot,
}

impl ProviderKind {
    /// Every kind name accepted in config (OpenAI-compatible presets included).
    pub const NAMES: &[&str] = &[
        "echo",
        "openai",
        "openai-compatible",
        "xai",
        "openrouter",
        "moonshot",
        "zai",
        "github-models",
        "copilot",
        "anthropic",
        "gemini",
        "ollama",
        "stackspot",
    ];

    /// Parses a config kind name (case-insensitive); presets map to their wire format.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "echo" => Self::Echo,
            "openai" | "openai-compatible" | "xai" | "openrouter" | "moonshot" | "zai"
            | "github-models" | "copilot" => Self::OpenAi,
            "anthropic" => Self::Anthropic,
            "gemini" => Self::Gemini,
            "ollama" => Self::Ollama,
            "stackspot" => Self::StackSpot,
            _ => return None,
        })
    }

    /// Whether providers of this kind can list their upstream's models (`discover_models`).
    pub fn discovers_models(self) -> bool {
        matches!(
            self,
            Self::OpenAi | Self::Anthropic | Self::Gemini | Self::Ollama
        )
    }

    /// The wire format's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::Ollama => "ollama",
            Self::StackSpot => "stackspot",
        }
    }
}

/// How log lines are rendered, on stderr and in the file alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event, with timestamp, level and target.
    #[default]
    Text,
    /// One JSON object per line, event fields flattened to the top level.
    Json,
}

/// The proxies whose word on the client's address is taken (`server.trusted_proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses `server.trusted_proxies`: each entry an address (`192.0.2.7`, `2001:db8::1`) or a
    /// CIDR (`10.0.0.0/8`). The errors name each bad entry.
    pub fn parse(entries: &[String]) -> Result<Self, Vec<String>> {
        let mut nets = Vec::new();
        let mut errors = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            match parse_net(entry) {
                Some(net) => nets.push(net),
                None => errors.push(format!(
                    "server.trusted_proxies.{i}: `{entry}` is not an IP address or CIDR (e.g. 10.0.0.0/8)"
                )),
            }
        }
        match errors.is_empty() {
            true => Ok(Self(nets)),
            false => Err(errors),
        }
    }

    /// Whether no proxy is trusted (then the TCP peer is always the client).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is a trusted proxy (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// One entry of `server.trusted_proxies`: a CIDR, or a single address.
fn parse_net(entry: &str) -> Option<IpNet> {
    let entry = entry.trim();
    entry
        .parse::<IpNet>()
        .ok()
        .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|net| net.trunc())
}
