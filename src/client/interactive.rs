//! The interactive client: a rustyline editor (history in `<data dir>/connect_history`), each turn
//! a `StreamPrompt` carrying the whole conversation, the answer streamed (Markdown on a terminal)
//! after a spinner, Ctrl-C cancelling the answer in flight (dropping the stream aborts the
//! server's upstream call; the notice is printed once, before the prompt comes back), Ctrl-C twice
//! at the prompt or Ctrl-D leaving, and slash commands: remote ones through
//! `InteractiveSession` `COMMAND`, sessions through the session RPCs (v2 format), and local ones.
//! A turn or command that fails because the connection dropped is retried with backoff; the
//! conversation is kept.

use std::io::IsTerminal as _;
use std::time::Duration;

use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use tokio::runtime::Runtime;

use super::Forwarded;
use super::connection::{self, Connection, ServerInfo};
use super::error::{ClientError, Stage};
use super::render::{AnswerPrinter, Spinner};
use crate::proto::session_message::Type as SessionType;
use crate::proto::{
    ChatMessage, DeleteSessionRequest, ListSessionsRequest, LoadSessionRequest, SaveSessionRequest,
    SessionDataV2, SessionMessage,
};

/// Waits before reconnect attempts.
const BACKOFF: [Duration; 6] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// The prompt of the line editor.
const PROMPT: &str = "chatcli> ";

/// How long after a cancel further Ctrl-C presses still count as part of it (people press it
/// twice to be sure): they are absorbed instead of cancelling the next answer or, arriving at
/// the prompt, asking to leave.
const CANCEL_SETTLE: Duration = Duration::from_millis(200);

/// The notice of a cancelled answer.
const CANCELLED: &str = "(answer cancelled)";

const HELP: &str = "\
Type a message and press Enter. Ctrl-C cancels an answer; at the prompt, Ctrl-C twice or Ctrl-D
leaves.
  /status                 server status
  /watcher status         Kubernetes watcher status
  /watcher alerts         Kubernetes watcher alerts
  /plugins list           plugins on the server
  /agents list            agents on the server
  /skills list            skills on the server
  /session save NAME      save this conversation on the server
  /session load NAME      continue a saved conversation
  /session list           saved conversations
  /session delete NAME    delete a saved conversation
  /provider [NAME]        show or set the provider (one the server offers)
  /model [NAME]           show or set the model (empty = the provider's default)
  /clear                  forget the conversation
  /help                   this text
  /exit                   leave";

/// What one turn ended with.
enum Turn {
    Answered(String),
    Cancelled,
    Failed(ClientError),
}

/// The state of an interactive run.
pub struct Interactive<'a> {
    rt: &'a Runtime,
    conn: Connection,
    forwarded: Forwarded,
    history: Vec<ChatMessage>,
    markdown: bool,
    spinner: bool,
    timeout: Option<Duration>,
    /// Re-resolves `--use-local-auth` credentials (for `/provider` and expiring tokens).
    local_auth: Option<super::LocalAuth>,
    /// What the server said about itself (the providers `/provider` may choose from).
    server: ServerInfo,
}

impl std::fmt::Debug for Interactive<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interactive")
            .field("target", &self.conn.target)
            .field("history", &self.history.len())
            .finish_non_exhaustive()
    }
}

fn say(text: &str) {
    eprintln!("{text}");
}

impl<'a> Interactive<'a> {
    /// Prepares a run over an open connection.
    pub fn new(
        rt: &'a Runtime,
        conn: Connection,
        forwarded: Forwarded,
        color: bool,
        timeout: Option<Duration>,
        local_auth: Option<super::LocalAuth>,
        server: ServerInfo,
    ) -> Self {
        Self {
            rt,
            conn,
            forwarded,
            history: Vec::new(),
            markdown: color && std::io::stdout().is_terminal(),
            spinner: std::io::stderr().is_terminal(),
            timeout,
            local_auth,
            server,
        }
    }

    /// Runs the editor loop until `/exit`, Ctrl-D or a second Ctrl-C at the prompt.
    pub fn run(mut self, history_file: &std::path::Path) -> Result<(), ClientError> {
        // From here on SIGINT cancels the answer in flight instead of killing the process; while
        // the editor reads a line the terminal is raw and Ctrl-C arrives as a key instead.
        let rt = self.rt;
        let sigint = rt.block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        });
        let mut sigint = match sigint {
            Ok(s) => s,
            Err(e) => return Err(ClientError::usage(format!("cannot handle Ctrl-C: {e}"))),
        };
        let mut editor = DefaultEditor::new()
            .map_err(|e| ClientError::usage(format!("cannot start the line editor: {e}")))?;
        if let Some(dir) = history_file.parent() {
            use std::os::unix::fs::DirBuilderExt as _;
            // Like the existing ChatCLI's ~/.chatcli: private to the user.
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        let _ = editor.load_history(history_file);
        say("Type /help for commands; Ctrl-D leaves.");
        let mut interrupted = false;
        loop {
            let line = match editor.readline(PROMPT) {
                Ok(l) => l,
                Err(ReadlineError::Interrupted) => {
                    if interrupted {
                        break;
                    }
                    say("(Ctrl-C again or Ctrl-D to leave)");
                    interrupted = true;
                    continue;
                }
                Err(ReadlineError::Eof) => break,
                Err(e) => {
                    return Err(ClientError::usage(format!("cannot read input: {e}")));
                }
            };
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            interrupted = false;
            let _ = editor.add_history_entry(text);
            let _ = editor.save_history(history_file);
            if let Some(cmd) = text.strip_prefix('/') {
                match self.command(cmd.trim()) {
                    Flow::Continue => {}
                    Flow::Exit => break,
                }
                continue;
            }
            match rt.block_on(self.turn(text, &mut sigint)) {
                Turn::Answered(answer) => {
                    self.history.push(ChatMessage {
                        role: "user".into(),
                        content: text.to_string(),
                        meta: None,
                    });
                    self.history.push(ChatMessage {
                        role: "assistant".into(),
                        content: answer,
                        meta: None,
                    });
                }
                Turn::Cancelled => {
                    // The answer's partial line is ended and the spinner erased by now: the
                    // notice gets a line of its own, once, and only then is the prompt drawn.
                    say(CANCELLED);
                    rt.block_on(absorb_interrupts(&mut sigint, CANCEL_SETTLE));
                    // A Ctrl-C at the prompt after a cancel asks first, like any other.
                    interrupted = false;
                }
                Turn::Failed(e) => say(&format!("error: {e}")),
            }
        }
        let _ = editor.save_history(history_file);
        Ok(())
    }

    /// Refreshes forwarded local credentials that expire soon (the existing client forwards a
    /// snapshot that can expire mid-session).
    async fn fresh_credentials(&mut self) -> Result<(), ClientError> {
        if let Some(auth) = &mut self.local_auth
            && auth.credential.needs_refresh()
        {
            let c = auth.resolve_again().await?;
            self.forwarded.client_api_key = c.client_api_key;
        }
        Ok(())
    }

    /// One turn: stream the answer; Ctrl-C cancels; a dropped connection is retried with backoff
    /// while nothing of the answer has arrived.
    async fn turn(&mut self, prompt: &str, sigint: &mut tokio::signal::unix::Signal) -> Turn {
        // A Ctrl-C pressed while no answer was running (e.g. during a slash command) is stale:
        // it must not cancel this answer.
        while let Some(Some(())) = futures::FutureExt::now_or_never(sigint.recv()) {}
        if let Err(e) = self.fresh_credentials().await {
            return Turn::Failed(e);
        }
        let mut attempt = 0;
        loop {
            let mut spinner = Spinner::start(self.spinner, "waiting for the answer…");
            let mut req = tonic::Request::new(
                self.forwarded
                    .request(prompt.to_string(), self.history.clone()),
            );
            if let Some(t) = self.timeout {
                req.set_timeout(t);
            }
            let mut client = self.conn.client.clone();
            let started = tokio::select! {
                r = client.stream_prompt(req) => r,
                _ = sigint.recv() => {
                    spinner.stop().await;
                    return Turn::Cancelled;
                }
            };
            let mut stream = match started {
                Ok(s) => s.into_inner(),
                Err(status) => {
                    spinner.stop().await;
                    let e = self.conn.error(&status, Stage::Call);
                    if e.is_connection() && attempt < BACKOFF.len() {
                        if !self.backoff(attempt, &e, sigint).await {
                            return Turn::Cancelled;
                        }
                        attempt += 1;
                        continue;
                    }
                    return Turn::Failed(e);
                }
            };
            let mut printer = AnswerPrinter::new(self.markdown);
            let mut answer = String::new();
            let mut first = true;
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = sigint.recv() => {
                        spinner.stop().await;
                        drop(stream);
                        let _ = printer.abandon();
                        return Turn::Cancelled;
                    }
                };
                match msg {
                    Ok(Some(m)) => {
                        if !m.chunk.is_empty() {
                            if first {
                                spinner.stop().await;
                                first = false;
                            }
                            if let Err(e) = printer.push(&m.chunk) {
                                return Turn::Failed(ClientError::usage(format!(
                                    "cannot write to the terminal: {e}"
                                )));
                            }
                            answer.push_str(&m.chunk);
                        }
                        if m.done {
                            spinner.stop().await;
                            let _ = printer.finish();
                            return Turn::Answered(answer);
                        }
                    }
                    Ok(None) => {
                        spinner.stop().await;
                        let _ = printer.abandon();
                        return Turn::Failed(ClientError::provider(
                            "the answer was cut off before its end; try again",
                        ));
                    }
                    Err(status) => {
                        spinner.stop().await;
                        let _ = printer.abandon();
                        let e = self.conn.error(&status, Stage::Call);
                        if first && e.is_connection() && attempt < BACKOFF.len() {
                            if !self.backoff(attempt, &e, sigint).await {
                                return Turn::Cancelled;
                            }
                            attempt += 1;
                            break;
                        }
                        return Turn::Failed(e);
                    }
                }
            }
        }
    }

    /// Waits before reconnect attempt `attempt`; false when Ctrl-C ended the wait.
    async fn backoff(
        &self,
        attempt: usize,
        e: &ClientError,
        sigint: &mut tokio::signal::unix::Signal,
    ) -> bool {
        let wait = BACKOFF[attempt.min(BACKOFF.len() - 1)];
        say(&format!(
            "connection lost ({e}); reconnecting in {:.1}s (attempt {} of {})…",
            wait.as_secs_f64(),
            attempt + 1,
            BACKOFF.len()
        ));
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = sigint.recv() => false,
        }
    }

    /// Runs an RPC, retrying with backoff while the connection is down.
    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ClientError>
    where
        F: Fn(super::connection::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.rt.block_on(async {
            let mut attempt = 0;
            loop {
                match f(self.conn.client.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(status) => {
                        let e = self.conn.error(&status, Stage::Call);
                        if e.is_connection() && attempt < BACKOFF.len() {
                            let wait = BACKOFF[attempt];
                            say(&format!(
                                "{what}: connection lost; reconnecting in {:.1}s…",
                                wait.as_secs_f64()
                            ));
                            tokio::time::sleep(wait).await;
                            attempt += 1;
                            continue;
                        }
                        return Err(e);
                    }
                }
            }
        })
    }

    /// A remote command through `InteractiveSession` (one message, one reply).
    fn remote_command(&self, command: &str) -> Result<String, ClientError> {
        self.call("command", |mut client| {
            let msg = SessionMessage {
                r#type: SessionType::Command as i32,
                content: command.to_string(),
                metadata: Default::default(),
            };
            async move {
                let mut replies = client
                    .interactive_session(futures::stream::iter([msg]))
                    .await?
                    .into_inner();
                match replies.message().await? {
                    Some(r) => Ok(r.content),
                    None => Ok(String::from("(no reply)")),
                }
            }
        })
    }

    fn command(&mut self, cmd: &str) -> Flow {
        let mut words = cmd.split_whitespace();
        let head = words.next().unwrap_or("");
        let rest: Vec<&str> = words.collect();
        let arg = rest.join(" ");
        match (head, rest.as_slice()) {
            ("exit" | "quit", _) => return Flow::Exit,
            ("help", _) => println_out(HELP),
            ("clear", _) => {
                self.history.clear();
                say("conversation cleared");
            }
            ("status", [])
            | ("watcher", [] | ["status" | "alerts"])
            | ("plugins", ["list"])
            | ("agents", ["list"])
            | ("skills", ["list"]) => {
                let text = if rest.is_empty() {
                    head.to_string()
                } else {
                    format!("{head} {arg}")
                };
                match self.remote_command(&text) {
                    Ok(out) => {
                        println_out(&out);
                        if head == "status" {
                            println_out(&format!(
                                "=== This client ===\nProvider: {}\nModel:    {}\nHistory:  {} messages\nServer:   {} ({})",
                                or_default(&self.forwarded.provider, "server default"),
                                or_default(&self.forwarded.model, "provider default"),
                                self.history.len(),
                                self.conn.target,
                                if self.conn.tls { "TLS" } else { "plaintext" },
                            ));
                        }
                    }
                    Err(e) => say(&format!("error: {e}")),
                }
            }
            ("session", [sub, names @ ..]) => self.session(sub, names),
            ("session", []) => say("usage: /session save|load|list|delete NAME"),
            ("provider", _) => {
                if arg.is_empty() {
                    say(&format!(
                        "provider: {}",
                        or_default(&self.forwarded.provider, "server default")
                    ));
                } else {
                    self.set_provider(&arg);
                }
            }
            ("model", _) => {
                if arg.is_empty() {
                    say(&format!(
                        "model: {}",
                        or_default(&self.forwarded.model, "provider default")
                    ));
                } else {
                    self.forwarded.model = arg;
                    say(&format!("model set to {}", self.forwarded.model));
                }
            }
            _ => say(&format!("unknown command /{cmd}; type /help")),
        }
        Flow::Continue
    }

    fn set_provider(&mut self, name: &str) {
        let name =
            match connection::check_provider(&self.server, &self.conn.target, name, "/provider") {
                Ok(n) => n,
                Err(e) => {
                    say(&format!("error: {e}"));
                    return;
                }
            };
        let name = name.as_str();
        if let Some(auth) = &mut self.local_auth {
            let Some(p) = super::credentials::LocalProvider::from_flag(name) else {
                say("with --use-local-auth the provider must be CLAUDEAI, OPENAI or COPILOT");
                return;
            };
            match self.rt.block_on(auth.switch(p)) {
                Ok(c) => self.forwarded.client_api_key = c.client_api_key,
                Err(e) => {
                    say(&format!("error: {e}"));
                    return;
                }
            }
        }
        self.forwarded.provider = name.to_string();
        self.forwarded.model.clear();
        say(&format!(
            "provider set to {name} (model: the provider's default; /model NAME to choose)"
        ));
    }

    fn session(&mut self, sub: &str, names: &[&str]) {
        let name = names.join(" ");
        let need_name = |what: &str| {
            say(&format!("usage: /session {what} NAME"));
        };
        match sub {
            "list" => match self.call("session list", |mut c| async move {
                c.list_sessions(ListSessionsRequest {}).await
            }) {
                Ok(r) => {
                    let mut names = r.into_inner().sessions;
                    names.sort();
                    if names.is_empty() {
                        println_out("No saved sessions.");
                    } else {
                        println_out(&names.join("\n"));
                    }
                }
                Err(e) => say(&format!("error: {e}")),
            },
            "save" if !name.is_empty() => {
                let history = self.history.clone();
                let result = self.call("session save", |mut c| {
                    let req = SaveSessionRequest {
                        name: name.clone(),
                        messages: history.clone(),
                        session_data: Some(SessionDataV2 {
                            version: 2,
                            chat_history: history.clone(),
                            ..Default::default()
                        }),
                    };
                    async move { c.save_session(req).await }
                });
                match result {
                    Ok(_) => say(&format!(
                        "session {name} saved ({} messages)",
                        self.history.len()
                    )),
                    Err(e) => say(&format!("error: {e}")),
                }
            }
            "load" if !name.is_empty() => {
                let result = self.call("session load", |mut c| {
                    let req = LoadSessionRequest { name: name.clone() };
                    async move { c.load_session(req).await }
                });
                match result {
                    Ok(r) => {
                        let r = r.into_inner();
                        self.history = match r.session_data {
                            Some(v2) if v2.version >= 2 || !v2.chat_history.is_empty() => {
                                v2.chat_history
                            }
                            _ => r.messages,
                        };
                        say(&format!(
                            "session {name} loaded ({} messages)",
                            self.history.len()
                        ));
                    }
                    Err(e) => say(&format!("error: {e}")),
                }
            }
            "delete" if !name.is_empty() => {
                let result = self.call("session delete", |mut c| {
                    let req = DeleteSessionRequest { name: name.clone() };
                    async move { c.delete_session(req).await }
                });
                match result {
                    Ok(_) => say(&format!("session {name} deleted")),
                    Err(e) => say(&format!("error: {e}")),
                }
            }
            "save" | "load" | "delete" => need_name(sub),
            _ => say("usage: /session save|load|list|delete NAME"),
        }
    }
}

enum Flow {
    Continue,
    Exit,
}

/// Takes every Ctrl-C that arrives within `settle`, so it does nothing more.
async fn absorb_interrupts(sigint: &mut tokio::signal::unix::Signal, settle: Duration) {
    let until = tokio::time::Instant::now() + settle;
    loop {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

fn or_default<'s>(v: &'s str, default: &'s str) -> &'s str {
    if v.is_empty() { default } else { v }
}

/// Command output goes to stdout (it is what the user asked for), diagnostics to stderr.
fn println_out(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}
