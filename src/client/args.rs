//! Turns the `connect` flags and environment ([`crate::cli::ConnectArgs`]) into checked
//! [`Settings`]: the parsed address, the TLS choice, what to forward, one-shot or interactive.
//! Everything wrong with the command line is found here and reported as a usage error (exit 64).

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::error::ClientError;
use crate::cli::ConnectArgs;

/// How the address asked to be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `host:port` or `dns:///host:port`: TLS as `--tls` says; without it, plaintext to loopback (or
    /// anywhere when insecure is allowed) and TLS otherwise.
    Auto,
    /// `http://host:port`: plaintext (still only to loopback unless insecure is allowed).
    Http,
    /// `https://host:port`: TLS.
    Https,
}

/// A parsed server address. Every address the host resolves to is used, round robin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Scheme given.
    pub scheme: Scheme,
}

impl Address {
    /// `host:port` (IPv6 in brackets), for messages.
    pub fn display(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{}]:{}", self.host, self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// Parses `host:port`, `[v6]:port`, `dns:///host:port`, `http://host:port` or `https://host[:port]`.
pub fn parse_address(raw: &str) -> Result<Address, ClientError> {
    let bad = |why: &str| {
        ClientError::usage(format!(
            "malformed server address {raw:?}: {why}; expected host:port, dns:///host:port or \
             https://host:port"
        ))
    };
    let text = raw.trim();
    if text.is_empty() {
        return Err(bad("it is empty"));
    }
    let (scheme, rest) = if let Some(r) = text.strip_prefix("dns:///") {
        (Scheme::Auto, r)
    } else if text.starts_with("dns://") {
        return Err(bad(
            "a DNS server authority (dns://SERVER/…) is not supported",
        ));
    } else if let Some(r) = text.strip_prefix("http://") {
        (Scheme::Http, r)
    } else if let Some(r) = text.strip_prefix("https://") {
        (Scheme::Https, r)
    } else if text.contains("://") {
        return Err(bad("unknown scheme"));
    } else {
        (Scheme::Auto, text)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(bad("a path, query or user part is not allowed"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err(bad("unclosed '[' in an IPv6 address"));
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address inside [ ]"));
        }
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("unexpected text after ']'")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
            Some(_) => return Err(bad("put an IPv6 address in brackets: [::1]:50051")),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("the host is missing"));
    }
    if host.parse::<IpAddr>().is_err()
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(bad("the host has characters a host name cannot have"));
    }
    let port = match (port, scheme) {
        (Some(p), _) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(bad("the port must be a number from 1 to 65535")),
        },
        (None, Scheme::Https) => 443,
        (None, Scheme::Http) => 80,
        (None, Scheme::Auto) => return Err(bad("the port is missing")),
    };
    Ok(Address { host, port, scheme })
}

/// Parses `30s`, `2m`, `1h`, `500ms` or a plain number of seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, ClientError> {
    let t = raw.trim();
    let bad = || {
        ClientError::usage(format!(
            "--timeout {raw:?} is not a duration; use e.g. 30s, 2m, 500ms or 45"
        ))
    };
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 * 7.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What to forward as the caller's own credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// Nothing: the server's own credentials are used.
    Nothing,
    /// `--llm-key` / `CHATCLI_CLIENT_API_KEY`, as given.
    LlmKey(String),
    /// `--use-local-auth`: resolved from the local store or the environment.
    LocalAuth,
}

/// Where the one-shot prompt comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSource {
    /// `-p TEXT`.
    Text(String),
    /// `-p -` or a piped stdin.
    Stdin,
}

/// How the one-shot answer is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The text as it streams, a newline added at the end.
    Text,
    /// The text exactly, nothing added.
    Raw,
    /// One JSON object.
    Json,
}

/// One-shot or interactive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Answer one prompt and exit.
    OneShot(PromptSource, Output),
    /// The line editor.
    Interactive,
}

/// TLS files and names (used when TLS is chosen).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `--ca-cert`; `None` = the system roots.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key for mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// `--tls-server-name`.
    pub server_name: Option<String>,
}

/// The checked settings of one `chatcli connect` run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server.
    pub address: Address,
    /// `--token`.
    pub token: Option<String>,
    /// `--tls` given (true), or refused with `--tls=false` (false), or left to the rules (None).
    pub tls: Option<bool>,
    /// Files for TLS.
    pub tls_files: TlsFiles,
    /// `CHATCLI_ALLOW_INSECURE`: plaintext to non-loopback addresses without `--tls`.
    pub allow_insecure: bool,
    /// Credentials to forward.
    pub forward: Forward,
    /// `--provider` ("" = the server's default).
    pub provider: String,
    /// `--model` ("" = the provider's default).
    pub model: String,
    /// `--max-tokens` (0 = provider default).
    pub max_tokens: i32,
    /// StackSpot / Ollama settings forwarded as `provider_config`.
    pub provider_config: HashMap<String, String>,
    /// One-shot or interactive.
    pub mode: Mode,
    /// `--timeout`: bounds connecting and each answer.
    pub timeout: Option<Duration>,
    /// `-v` count.
    pub verbose: u8,
    /// Styling allowed (`NO_COLOR` unset or empty).
    pub color: bool,
    /// Where the line editor keeps its history (`$CHATCLI_DATA_DIR`, else `~/.chatcli`).
    pub data_dir: PathBuf,
}

/// The largest `max_tokens` the server accepts.
const MAX_TOKENS_LIMIT: i32 = 200_000;

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

impl Settings {
    /// Checks the flags; `env` reads environment variables not covered by clap (`NO_COLOR`,
    /// `CHATCLI_DATA_DIR`, `HOME`), `stdin_is_tty` decides between a piped prompt and the editor.
    pub fn from_args(
        args: ConnectArgs,
        env: &dyn Fn(&str) -> Option<String>,
        stdin_is_tty: bool,
    ) -> Result<Self, ClientError> {
        let raw_addr = match (non_empty(args.address), non_empty(args.addr)) {
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(ClientError::usage(
                    "no server address: give it as the first argument (host:port), with --addr \
                     or in CHATCLI_REMOTE_ADDR",
                ));
            }
        };
        let address = parse_address(&raw_addr)?;
        let token = non_empty(args.token);
        if let Some(t) = &token
            && (t.chars().any(|c| c.is_control()) || !t.is_ascii())
        {
            return Err(ClientError::usage(
                "--token has characters that cannot go in a header",
            ));
        }
        let tls = match (args.tls, address.scheme) {
            (Some(false), Scheme::Https) => {
                return Err(ClientError::usage(
                    "--tls=false contradicts an https:// address",
                ));
            }
            (Some(true), Scheme::Http) => {
                return Err(ClientError::usage("--tls contradicts an http:// address"));
            }
            (t, Scheme::Auto) => t,
            (_, Scheme::Https) => Some(true),
            (_, Scheme::Http) => Some(false),
        };
        let ca_cert = args.ca_cert.filter(|p| !p.as_os_str().is_empty());
        if let Some(ca) = &ca_cert
            && !ca.is_file()
        {
            return Err(ClientError::usage(format!(
                "--ca-cert {}: no such file",
                ca.display()
            )));
        }
        let identity = match (
            args.tls_client_cert.filter(|p| !p.as_os_str().is_empty()),
            args.tls_client_key.filter(|p| !p.as_os_str().is_empty()),
        ) {
            (Some(c), Some(k)) => {
                for (what, p) in [("certificate", &c), ("key", &k)] {
                    if !p.is_file() {
                        return Err(ClientError::usage(format!(
                            "client {what} {}: no such file",
                            p.display()
                        )));
                    }
                }
                Some((c, k))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(ClientError::usage(
                    "a client certificate needs its key: --tls-client-key or \
                     CHATCLI_TLS_CLIENT_KEY",
                ));
            }
            (None, Some(_)) => {
                return Err(ClientError::usage(
                    "a client key needs its certificate: --tls-client-cert or \
                     CHATCLI_TLS_CLIENT_CERT",
                ));
            }
        };
        let forward = match (
            non_empty(args.llm_key),
            args.use_local_auth.unwrap_or(false),
        ) {
            (Some(k), _) => Forward::LlmKey(k),
            (None, true) => Forward::LocalAuth,
            (None, false) => Forward::Nothing,
        };
        let max_tokens = args.max_tokens.unwrap_or(0);
        if !(0..=MAX_TOKENS_LIMIT).contains(&max_tokens) {
            return Err(ClientError::usage(format!(
                "--max-tokens must be between 0 and {MAX_TOKENS_LIMIT}"
            )));
        }
        let mut provider_config = HashMap::new();
        for (key, value) in [
            ("client_id", args.client_id),
            ("client_key", args.client_key),
            ("realm", args.realm),
            ("agent_id", args.agent_id),
            ("base_url", args.ollama_url),
        ] {
            if let Some(v) = non_empty(value) {
                provider_config.insert(key.to_string(), v);
            }
        }
        let output = match (args.raw.unwrap_or(false), args.json.unwrap_or(false)) {
            (true, true) => {
                return Err(ClientError::usage("--raw and --json exclude each other"));
            }
            (true, false) => Output::Raw,
            (false, true) => Output::Json,
            (false, false) => Output::Text,
        };
        let mode = match args.prompt {
            Some(p) if p == "-" => Mode::OneShot(PromptSource::Stdin, output),
            Some(p) if p.trim().is_empty() => {
                return Err(ClientError::usage("the prompt given with -p is empty"));
            }
            Some(p) => Mode::OneShot(PromptSource::Text(p), output),
            None if !stdin_is_tty => Mode::OneShot(PromptSource::Stdin, output),
            None if output != Output::Text => {
                return Err(ClientError::usage(
                    "--raw and --json are for one-shot use: add -p PROMPT or pipe the prompt on \
                     stdin",
                ));
            }
            None => Mode::Interactive,
        };
        let timeout = args.timeout.as_deref().map(parse_duration).transpose()?;
        let color = env("NO_COLOR").is_none_or(|v| v.is_empty());
        let data_dir = match env("CHATCLI_DATA_DIR").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(env("HOME").unwrap_or_else(|| ".".into())).join(".chatcli"),
        };
        Ok(Self {
            address,
            token,
            tls,
            tls_files: TlsFiles {
                ca_cert,
                identity,
                server_name: non_empty(args.tls_server_name),
            },
            allow_insecure: args.allow_insecure.unwrap_or(false),
            forward,
            provider: non_empty(args.provider).unwrap_or_default(),
            model: non_empty(args.model).unwrap_or_default(),
            max_tokens,
            provider_config,
            mode,
            timeout,
            verbose: args.verbose,
            color,
            data_dir,
        })
    }

    /// From the process: the real environment and stdin.
    pub fn from_process(args: ConnectArgs) -> Result<Self, ClientError> {
        let env = |k: &str| std::env::var(k).ok();
        Self::from_args(args, &env, std::io::stdin().is_terminal())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: a failed unwrap is a failed test
mod tests {
    use super::*;

    fn addr(s: &str) -> Result<(String, u16, Scheme), i32> {
        parse_address(s)
            .map(|a| (a.host, a.port, a.scheme))
            .map_err(|e| e.exit_code())
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            addr("localhost:50051"),
            Ok(("localhost".into(), 50051, Scheme::Auto))
        );
        assert_eq!(
            addr("dns:///chat.internal:9"),
            Ok(("chat.internal".into(), 9, Scheme::Auto))
        );
        assert_eq!(addr("[::1]:7"), Ok(("::1".into(), 7, Scheme::Auto)));
        assert_eq!(
            addr("https://example.com"),
            Ok(("example.com".into(), 443, Scheme::Https))
        );
        assert_eq!(
            addr("http://127.0.0.1:8/"),
            Ok(("127.0.0.1".into(), 8, Scheme::Http))
        );
        for bad in [
            "",
            "localhost",
            "localhost:0",
            "localhost:99999",
            "local host:1",
            "::1:50051",
            "dns://8.8.8.8/x:1",
            "ftp://x:1",
            "x:1/path",
            "[::1",
            ":50051",
        ] {
            assert_eq!(addr(bad), Err(64), "{bad:?} should be a usage error");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0").is_err());
    }

    fn settings(args: ConnectArgs, tty: bool) -> Result<Settings, ClientError> {
        Settings::from_args(args, &|_| None, tty)
    }

    #[test]
    fn modes_and_forwarding() {
        let base = ConnectArgs {
            address: Some("127.0.0.1:1".into()),
            ..ConnectArgs::default()
        };
        let s = settings(base.clone(), true).unwrap();
        assert_eq!(s.mode, Mode::Interactive);
        assert_eq!(s.forward, Forward::Nothing);
        let s = settings(base.clone(), false).unwrap();
        assert_eq!(s.mode, Mode::OneShot(PromptSource::Stdin, Output::Text));
        let s = settings(
            ConnectArgs {
                prompt: Some("hi".into()),
                json: Some(true),
                llm_key: Some("sk".into()),
                use_local_auth: Some(true),
                client_id: Some("id".into()),
                ollama_url: Some("https://o".into()),
                ..base.clone()
            },
            true,
        )
        .unwrap();
        assert_eq!(
            s.mode,
            Mode::OneShot(PromptSource::Text("hi".into()), Output::Json)
        );
        assert_eq!(s.forward, Forward::LlmKey("sk".into()));
        assert_eq!(s.provider_config["client_id"], "id");
        assert_eq!(s.provider_config["base_url"], "https://o");
        let err = settings(
            ConnectArgs {
                raw: Some(true),
                ..base.clone()
            },
            true,
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), 64);
        let err = settings(ConnectArgs::default(), true).unwrap_err();
        assert!(err.to_string().contains("no server address"), "{err}");
        let err = settings(
            ConnectArgs {
                ca_cert: Some("/nonexistent/ca.pem".into()),
                ..base
            },
            true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
