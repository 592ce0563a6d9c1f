//! `chatcli connect`, the client (issue #11): connects to a chatcli (or existing ChatCLI) server,
//! prints the banner of PROTOCOL.md §4 on stderr, then answers one prompt for scripts
//! ([`oneshot`]) or runs the line editor ([`interactive`]). Flags and environment are checked in
//! [`args`], the connection (TLS, round robin over every resolved address, keepalive) is
//! [`connection`], `--use-local-auth` is [`credentials`], terminal output is [`render`].
//!
//! Exit codes ([`error::exit`]): 0 ok, 2 usage or bad input, 3 cannot connect or TLS failure,
//! 4 unauthenticated or denied, 5 rate limited, 6 the provider failed. Each failure is one line on
//! stderr saying what happened and what to try. Secrets (token, keys) are never printed.

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

/// Whether this process was started as `chatcli connect` (so command-line errors exit 2).
pub fn invoked() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == "connect")
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
    let settings = match Settings::from_process(args) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatcli connect: cannot start the async runtime: {e}");
            return exit::USAGE;
        }
    };
    match execute(&runtime, settings) {
        Ok(()) => exit::OK,
        Err(e) => fail(&e),
    }
}

fn fail(e: &ClientError) -> i32 {
    eprintln!("chatcli connect: {e}");
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
                    ClientError::Usage(format!(
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
    let info = rt.block_on(connection::handshake(&conn, settings.timeout, &verbose))?;
    eprintln!(
        "{}",
        connection::banner(&info, &forwarded.provider, &forwarded.model, suffix)
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
        .map_err(|e| ClientError::Usage(format!("cannot read the prompt from stdin: {e}")))?;
    let text = String::from_utf8(buf)
        .map_err(|_| ClientError::Usage("the prompt on stdin is not UTF-8 text".into()))?;
    let text = text.trim_end_matches(['\n', '\r']).to_string();
    if text.trim().is_empty() {
        return Err(ClientError::Usage(
            "the prompt on stdin is empty; give one with -p PROMPT or pipe text in".into(),
        ));
    }
    Ok(text)
}
