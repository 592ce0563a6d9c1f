//! `chatcli connect`, the client: connects to a chatcli (or existing ChatCLI) server,
//! prints the existing ChatCLI client's banner on stderr, then answers one prompt for scripts
//! ([`oneshot`]) or runs the line editor ([`interactive`]). Flags and environment are checked in
//! [`args`], the connection (TLS, round robin over every resolved address, keepalive) is
//! [`connection`], `--use-local-auth` is [`credentials`], terminal output is [`render`].
//!
//! Exit codes ([`error::exit`]): 0 ok, 64 usage or bad input (EX_USAGE, as for every subcommand),
//! 3 cannot connect or TLS failure, 4 unauthenticated or denied, 5 rate limited (also by the
//! server's failed-auth limiter), 6 the provider or the server failed, 70 internal error. Each
//! failure is one line on stderr saying what happened and what to try; with `--json` the same
//! failure is also one JSON object on stdout, `{"error": {"code", "message"}}`, so a pipeline into
//! `jq` can tell what happened. Secrets (token, keys) are never printed.

pub mod args;
pub mod connection;
pub mod credentials;
pub mod error;
pub mod interactive;
pub mod oneshot;
pub mod render;

use std::collections::HashMap;
use std::io::Read as _;

use args::{Forward, Mode, PromptSource, Settings};
use credentials::{LocalCredential, LocalProvider};
pub use error::{ClientError, exit};

use crate::cli::ConnectArgs;
use crate::proto::{ChatMessage, StreamPromptRequest};

/// Whether a command line (program name first) is `chatcli connect … --json` (`--json=false`
/// turns it off again): its errors are then also printed as JSON on stdout.
pub fn wants_json<I: IntoIterator<Item = std::ffi::OsString>>(args: I) -> bool {
    let mut args = args.into_iter().skip(1);
    if args.next().is_none_or(|a| a != "connect") {
        return false;
    }
    let mut json = false;
    for a in args {
        match a.to_str() {
            // Everything after `--` is a value, not a flag.
            Some("--") => break,
            Some("--json" | "-json") => json = true,
            Some(other) => {
                if let Some(v) = other
                    .strip_prefix("--json=")
                    .or_else(|| other.strip_prefix("-json="))
                {
                    json = v != "false";
                }
            }
            None => {}
        }
    }
    json
}

/// Reports a command line that clap refused for `chatcli connect`: with `--json`, also as the JSON
/// error object on stdout (clap has already printed its own message on stderr).
pub fn report_usage_error(clap_message: &str) {
    if !wants_json(std::env::args_os()) {
        return;
    }
    // clap's first line is "error: <what is wrong>"; the rest is usage and a hint.
    let first = clap_message
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid command line");
    let what = first.strip_prefix("error: ").unwrap_or(first).trim();
    print_json_error(&ClientError::usage(what.to_string()));
}

/// Prints `e` as the one JSON object of `--json` on stdout.
fn print_json_error(e: &ClientError) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", e.to_json());
    let _ = out.flush();
}

/// What every prompt carries besides the text and history.
#[derive(Clone, Default)]
pub struct Forwarded {
    /// `provider` ("" = server default).
    pub provider: String,
    /// `model` ("" = provider default).
    pub model: String,
    /// `max_tokens`.
    pub max_tokens: i32,
    /// `client_api_key`, already prefixed when it came from `--use-local-auth`.
    pub client_api_key: String,
    /// `provider_config`.
    pub provider_config: HashMap<String, String>,
}

impl std::fmt::Debug for Forwarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarded")
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("max_tokens", &self.max_tokens)
            .field("client_api_key", &(!self.client_api_key.is_empty()))
            .field(
                "provider_config",
                &self.provider_config.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Forwarded {
    /// A `StreamPrompt` request for `prompt` after `history`.
    pub fn request(&self, prompt: String, history: Vec<ChatMessage>) -> StreamPromptRequest {
        StreamPromptRequest {
            prompt,
            history,
            max_tokens: self.max_tokens,
            provider: self.provider.clone(),
            model: self.model.clone(),
            client_api_key: self.client_api_key.clone(),
            provider_config: self.provider_config.clone(),
        }
    }
}

fn process_env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// `--use-local-auth` state: the credential in use, resolved again when it nears its expiry or
/// when `/provider` switches.
#[derive(Debug)]
pub struct LocalAuth {
    /// The credential in use.
    pub credential: LocalCredential,
}

impl LocalAuth {
    /// Resolves the same provider again (refreshing an expiring OAuth token).
    pub async fn resolve_again(&mut self) -> Result<LocalCredential, ClientError> {
        self.switch(self.credential.provider).await
    }

    /// Resolves `provider` and makes it the one in use.
    pub async fn switch(
        &mut self,
        provider: LocalProvider,
    ) -> Result<LocalCredential, ClientError> {
        let c = credentials::resolve(Some(provider), &process_env).await?;
        self.credential = c.clone();
        Ok(c)
    }
}

/// Runs `chatcli connect`; returns the exit code.
pub fn run(args: ConnectArgs) -> i32 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Known before the flags are checked, so a usage error is printed as JSON too.
    let json = args.json.unwrap_or(false);
    let settings = match Settings::from_process(args) {
        Ok(s) => s,
        Err(e) => return fail(&e, json),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatcli connect: cannot start the async runtime: {e}");
            if json {
                print_json_error(&ClientError::internal(format!(
                    "cannot start the async runtime: {e}"
                )));
            }
            return exit::SOFTWARE;
        }
    };
    match execute(&runtime, settings) {
        Ok(()) => exit::OK,
        Err(e) => fail(&e, json),
    }
}

/// Reports `e`: one line on stderr, and with `--json` the JSON error object on stdout.
fn fail(e: &ClientError, json: bool) -> i32 {
    eprintln!("chatcli connect: {e}");
    if json {
        print_json_error(e);
    }
    e.exit_code()
}

fn execute(rt: &tokio::runtime::Runtime, settings: Settings) -> Result<(), ClientError> {
    let level = settings.verbose;
    let verbose = move |msg: &str| {
        if level > 0 {
            eprintln!("chatcli connect: {msg}");
        }
    };
    // Read a piped prompt first: a script's input problem should not cost a connection.
    let prompt = match &settings.mode {
        Mode::OneShot(PromptSource::Text(t), _) => Some(t.clone()),
        Mode::OneShot(PromptSource::Stdin, _) => Some(read_stdin_prompt()?),
        Mode::Interactive => None,
    };
    let mut forwarded = Forwarded {
        provider: settings.provider.clone(),
        model: settings.model.clone(),
        max_tokens: settings.max_tokens,
        client_api_key: String::new(),
        provider_config: settings.provider_config.clone(),
    };
    let mut local_auth = None;
    let suffix = match &settings.forward {
        Forward::Nothing => "",
        Forward::LlmKey(k) => {
            forwarded.client_api_key = k.clone();
            verbose("forwarding your own API key (--llm-key / CHATCLI_CLIENT_API_KEY)");
            ", using your own API key"
        }
        Forward::LocalAuth => {
            let wanted = match settings.provider.as_str() {
                "" => None,
                p => Some(LocalProvider::from_flag(p).ok_or_else(|| {
                    ClientError::usage(format!(
                        "--use-local-auth works with --provider CLAUDEAI, OPENAI or COPILOT, not \
                         {p:?}"
                    ))
                })?),
            };
            let c = rt.block_on(credentials::resolve(wanted, &process_env))?;
            verbose(&format!(
                "local credentials for {}: {}",
                c.provider.server_name(),
                c.source
            ));
            if forwarded.provider.is_empty() {
                forwarded.provider = c.provider.server_name().to_string();
            }
            forwarded.client_api_key = c.client_api_key.clone();
            local_auth = Some(LocalAuth { credential: c });
            ", using local OAuth credentials"
        }
    };
    let conn = rt.block_on(connection::connect(&settings, &process_env, &verbose))?;
    let server = rt.block_on(connection::handshake(&conn, settings.timeout, &verbose))?;
    // A provider the server does not offer would fail every prompt: say so before the banner
    // shows it as if accepted.
    let origin = match (settings.provider.is_empty(), &settings.forward) {
        (true, Forward::LocalAuth) => "--use-local-auth chose provider",
        _ => "--provider",
    };
    forwarded.provider =
        connection::check_provider(&server, &conn.target, &forwarded.provider, origin)?;
    eprintln!(
        "{}",
        connection::banner(&server.info, &forwarded.provider, &forwarded.model, suffix)
    );
    match (prompt, &settings.mode) {
        (Some(p), Mode::OneShot(_, output)) => rt.block_on(oneshot::run(
            &conn,
            &forwarded,
            p,
            *output,
            settings.timeout,
        )),
        _ => {
            let history_file = settings.data_dir.join("connect_history");
            interactive::Interactive::new(
                rt,
                conn,
                forwarded,
                settings.color,
                settings.timeout,
                local_auth,
                server,
            )
            .run(&history_file)
        }
    }
}

/// The whole of stdin, without its trailing newlines; empty is a usage error.
fn read_stdin_prompt() -> Result<String, ClientError> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| ClientError::usage(format!("cannot read the prompt from stdin: {e}")))?;
    let text = String::from_utf8(buf)
        .map_err(|_| ClientError::usage("the prompt on stdin is not UTF-8 text"))?;
    let text = text.trim_end_matches(['\n', '\r']).to_string();
    if text.trim().is_empty() {
        return Err(ClientError::usage(
            "the prompt on stdin is empty; give one with -p PROMPT or pipe text in",
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<std::ffi::OsString> {
        args.iter().map(std::ffi::OsString::from).collect()
    }

    #[test]
    fn json_is_wanted_only_by_connect_with_json_on() {
        assert!(wants_json(argv(&["chatcli", "connect", "h:1", "--json"])));
        assert!(wants_json(argv(&[
            "chatcli",
            "connect",
            "--json=true",
            "--bogus"
        ])));
        assert!(wants_json(argv(&["chatcli", "connect", "-json"])));
        assert!(!wants_json(argv(&["chatcli", "connect", "--json=false"])));
        assert!(!wants_json(argv(&["chatcli", "connect", "h:1", "-p", "x"])));
        assert!(!wants_json(argv(&["chatcli", "server", "--json"])));
        assert!(!wants_json(argv(&["chatcli", "connect", "--", "--json"])));
        assert!(!wants_json(argv(&["chatcli"])));
    }
}
