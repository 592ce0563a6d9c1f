//! Hot reload end to end: the provider list rewritten under load without a failed
//! request, a broken file that keeps the old config serving, the Kubernetes `..data` symlink swap,
//! an editor's truncate-then-write read once, SIGHUP, a revoked token, a changed rate limit, a
//! caller's remaining rate-limit budget kept across a reload that changes something else, open
//! streams still counted by the stream cap after a reload, a port change that needs a restart, sd-notify's RELOADING/READY, bad files that never take the
//! daemon down, and the log level changed at runtime. The in-process server reloads from a config
//! file in a temp dir (its reload metrics and `/status` command are the observation points); the
//! real binary is used where signals, the log or sd-notify are what is tested.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatcli::config::Sources;
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::session_message::Type;
use chatcli::proto::{
    GetServerInfoRequest, GetServerInfoResponse, HealthRequest, SaveSessionRequest,
    SendPromptRequest, SessionMessage,
};
use chatcli::server::{Listeners, RunOptions, ServerError};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::support::{
    BearerToken, BinaryServer, HANG_GUARD, collect_stream, connect, eventually, http_client,
    metric_value, openai_fake, sha256_hex, stream_request, within, write_atomically,
};

/// The debounce of the watcher is ~250 ms; waiting this long after a reload shows whether a second
/// one follows.
const SETTLE: Duration = Duration::from_millis(1200);

// ---------------------------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------------------------

/// One `[[llm.providers]]` entry.
#[derive(Clone, Debug)]
enum Prov {
    /// An echo provider (model `echo-1`) pausing the config's echo delay between words.
    Echo(&'static str),
    /// An `openai` provider at `base_url` reading its key from `key_file`.
    OpenAi {
        name: &'static str,
        base_url: String,
        key_file: PathBuf,
    },
}

impl Prov {
    fn name(&self) -> &'static str {
        match self {
            Prov::Echo(n) => n,
            Prov::OpenAi { name, .. } => name,
        }
    }
}

/// A named token: name, role, the token itself.
#[derive(Clone, Debug)]
struct Tok {
    name: &'static str,
    role: &'static str,
    token: &'static str,
}

/// The parts of a config file the tests change.
#[derive(Clone, Debug)]
struct Conf {
    providers: Vec<Prov>,
    default: Option<&'static str>,
    echo_delay: &'static str,
    rps: f64,
    burst: u32,
    tokens: Vec<Tok>,
    log_level: &'static str,
    /// `server.port` (with `bind_address = 127.0.0.1` and metrics off), for the real binary.
    port: Option<u16>,
    /// `server.shutdown_grace`.
    grace: &'static str,
    /// `limits.auth_failures_per_minute`, when set.
    auth_failures: Option<u32>,
    /// `limits.max_streams_per_principal`, when set.
    max_streams: Option<u32>,
    /// TOML appended after everything else (whole tables that `render` does not write).
    tail: String,
}

impl Conf {
    /// Echo providers named `names`, the first one the default, no auth, a generous rate limit.
    fn echo(names: &[&'static str]) -> Self {
        Self {
            providers: names.iter().map(|n| Prov::Echo(n)).collect(),
            default: names.first().copied(),
            echo_delay: "0ms",
            rps: 1_000_000.0,
            burst: 1_000_000,
            tokens: Vec::new(),
            log_level: "info",
            port: None,
            grace: "5s",
            auth_failures: None,
            max_streams: None,
            tail: String::new(),
        }
    }

    fn with_default(mut self, name: &'static str) -> Self {
        self.default = Some(name);
        self
    }

    fn with_delay(mut self, delay: &'static str) -> Self {
        self.echo_delay = delay;
        self
    }

    /// The TOML text; `root` holds the data dir.
    fn render(&self, root: &Path) -> String {
        let q = |s: &str| format!("{s:?}");
        let mut t = format!("[server]\nshutdown_grace = {}\n", q(self.grace));
        if let Some(port) = self.port {
            t.push_str(&format!(
                "bind_address = \"127.0.0.1\"\nport = {port}\n\n[metrics]\nport = 0\n"
            ));
        }
        t.push_str(&format!("\n[log]\nlevel = {}\n", q(self.log_level)));
        t.push_str(&format!(
            "\n[state]\ndata_dir = {}\n",
            q(&root.join("data").display().to_string())
        ));
        t.push_str(&format!(
            "\n[limits]\nrate_limit_rps = {:?}\nrate_limit_burst = {}\n",
            self.rps, self.burst
        ));
        if let Some(n) = self.auth_failures {
            t.push_str(&format!("auth_failures_per_minute = {n}\n"));
        }
        if let Some(n) = self.max_streams {
            t.push_str(&format!("max_streams_per_principal = {n}\n"));
        }
        for tok in &self.tokens {
            t.push_str(&format!(
                "\n[[auth.tokens]]\nname = {}\nrole = {}\nsha256 = {}\n",
                q(tok.name),
                q(tok.role),
                q(&sha256_hex(tok.token))
            ));
        }
        t.push_str("\n[llm]\nfallback_max_retries = 0\n");
        if let Some(d) = self.default {
            t.push_str(&format!("default = {}\n", q(d)));
        }
        for p in &self.providers {
            match p {
                Prov::Echo(name) => t.push_str(&format!(
                    "\n[[llm.providers]]\nname = {}\nkind = \"echo\"\nmodel = \"echo-1\"\ndelay = {}\n",
                    q(name),
                    q(self.echo_delay)
                )),
                Prov::OpenAi {
                    name,
                    base_url,
                    key_file,
                } => t.push_str(&format!(
                    "\n[[llm.providers]]\nname = {}\nkind = \"openai\"\nbase_url = {}\napi_key_file = {}\nmodel = \"gpt-test\"\n",
                    q(name),
                    q(base_url),
                    q(&key_file.display().to_string())
                )),
            }
        }
        t.push_str(&self.tail);
        t
    }

    fn names(&self) -> Vec<String> {
        self.providers
            .iter()
            .map(|p| p.name().to_string())
            .collect()
    }
}

/// `<root>/etc/chatcli.toml`, with `conf` written into it.
fn write_config(root: &Path, conf: &Conf) -> PathBuf {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let path = etc.join("chatcli.toml");
    std::fs::write(&path, conf.render(root)).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// The in-process server, reloading from its file
// ---------------------------------------------------------------------------------------------

/// Reload counters read from `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reloads {
    ok: u64,
    error: u64,
    generation: u64,
}

/// `chatcli::server::run_with` in this process, started from a config file it reloads.
struct Daemon {
    root: tempfile::TempDir,
    /// The config file (`--config`).
    path: PathBuf,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    channel: Channel,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Daemon {
    /// Writes `conf` to `<root>/etc/chatcli.toml` and serves it.
    async fn start(root: tempfile::TempDir, conf: &Conf) -> Self {
        let path = write_config(root.path(), conf);
        Self::serve(root, path).await
    }

    /// Serves the config file at `path` (already written), reloading it: the config handed to
    /// `run_with` is the one the reloader's sources load, so its first hash matches.
    async fn serve(root: tempfile::TempDir, path: PathBuf) -> Self {
        let sources = Sources {
            env: HashMap::new(),
            config_flag: Some(path.clone()),
            default_config_path: "/nonexistent/chatcli.toml".into(),
            flags: vec![],
        };
        let loaded = chatcli::config::load(&sources)
            .unwrap_or_else(|e| panic!("the test config does not load: {:?}", e.problems));
        let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = main.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chatcli::server::run_with(
            Listeners {
                main,
                metrics: Some(metrics),
            },
            loaded.config,
            shutdown.clone(),
            RunOptions {
                reload: Some(sources),
                set_log_level: None,
                audit: None,
            },
        ));
        let channel = connect(addr).await;
        let daemon = Self {
            root,
            path,
            addr,
            metrics_addr,
            channel,
            http: http_client(),
            shutdown,
            task,
        };
        // The metrics listener is served after the watcher is armed: once it answers, every
        // write is seen. Generation 1 is the start.
        eventually("the reload metrics", || async {
            daemon
                .reloads()
                .await
                .filter(|r| r.generation == 1)
                .map(|_| ())
        })
        .await;
        daemon
    }

    fn root(&self) -> &Path {
        self.root.path()
    }

    fn client(&self) -> ChatCliServiceClient<Channel> {
        ChatCliServiceClient::new(self.channel.clone())
    }

    /// Replaces the config file atomically (temp file + rename), as deployment tools do.
    fn write(&self, conf: &Conf) {
        write_atomically(&self.path, &conf.render(self.root()));
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn metrics(&self) -> Option<String> {
        let url = format!("http://{}/metrics", self.metrics_addr);
        self.http.get(url).send().await.ok()?.text().await.ok()
    }

    async fn reloads(&self) -> Option<Reloads> {
        let text = self.metrics().await?;
        text.contains("chatcli_config_generation ")
            .then(|| Reloads {
                ok: metric_value(&text, "chatcli_config_reloads_total{result=\"ok\"} ") as u64,
                error: metric_value(&text, "chatcli_config_reloads_total{result=\"error\"} ")
                    as u64,
                generation: metric_value(&text, "chatcli_config_generation ") as u64,
            })
    }

    async fn reloads_now(&self) -> Reloads {
        self.reloads().await.expect("metrics unavailable")
    }

    /// Waits until the generation is at least `generation`, and checks it is exactly that.
    async fn wait_generation(&self, generation: u64) -> Reloads {
        let r = eventually(&format!("config generation {generation}"), || async {
            self.reloads().await.filter(|r| r.generation >= generation)
        })
        .await;
        assert_eq!(r.generation, generation, "more reloads than changes: {r:?}");
        r
    }

    /// Waits until the error counter is above `errors`.
    async fn wait_errors(&self, errors: u64) -> Reloads {
        eventually(&format!("more than {errors} failed reloads"), || async {
            self.reloads().await.filter(|r| r.error > errors)
        })
        .await
    }

    async fn info(&self) -> GetServerInfoResponse {
        server_info(self.channel.clone(), None).await.unwrap()
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.shutdown.cancel();
        tokio::time::timeout(HANG_GUARD, self.task)
            .await
            .expect("server did not stop")
            .expect("server task panicked")
            .expect("server returned an error");
    }
}

async fn server_info(
    channel: Channel,
    token: Option<&str>,
) -> Result<GetServerInfoResponse, tonic::Status> {
    let mut client =
        ChatCliServiceClient::with_interceptor(channel, BearerToken(token.map(String::from)));
    within(
        HANG_GUARD,
        "GetServerInfo",
        client.get_server_info(GetServerInfoRequest {}),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Sends one COMMAND message in a new InteractiveSession and returns the reply's text.
async fn command(
    channel: Channel,
    token: Option<&str>,
    cmd: &str,
) -> Result<String, tonic::Status> {
    let mut client =
        ChatCliServiceClient::with_interceptor(channel, BearerToken(token.map(String::from)));
    let (tx, rx) = mpsc::channel(1);
    tx.send(SessionMessage {
        r#type: Type::Command as i32,
        content: cmd.into(),
        metadata: HashMap::new(),
    })
    .await
    .unwrap();
    let mut replies = within(
        HANG_GUARD,
        "InteractiveSession",
        client.interactive_session(ReceiverStream::new(rx)),
    )
    .await?
    .into_inner();
    let reply = within(HANG_GUARD, "the command's reply", replies.message())
        .await?
        .expect("the session ended without a reply");
    drop(tx);
    assert_eq!(reply.r#type(), Type::CommandResult, "{reply:?}");
    Ok(reply.content)
}

/// The generation in the `/status` command's `Config:   generation N, hash …` line.
fn status_generation(status: &str) -> Option<u64> {
    let rest = status.split("Config:   generation ").nth(1)?;
    rest.split(',').next()?.trim().parse().ok()
}

/// Polls the `/status` command until its generation is at least `generation`; returns the text.
async fn wait_status_generation(channel: &Channel, generation: u64) -> String {
    let status = eventually(&format!("/status at generation {generation}"), || async {
        let s = command(channel.clone(), None, "/status").await.ok()?;
        (status_generation(&s)? >= generation).then_some(s)
    })
    .await;
    assert_eq!(status_generation(&status), Some(generation), "{status}");
    status
}

/// The providers `/v1/models` lists (`owned_by`), in order and without repeats.
async fn http_model_owners(d: &Daemon) -> Vec<String> {
    let body: serde_json::Value = d
        .http
        .get(d.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut owners: Vec<String> = Vec::new();
    for m in body["data"].as_array().unwrap() {
        let o = m["owned_by"].as_str().unwrap().to_string();
        if !owners.contains(&o) {
            owners.push(o);
        }
    }
    owners
}

/// The `config` part of HTTP `GET /status` (generation, hash, last reload error).
async fn http_config_status(d: &Daemon) -> serde_json::Value {
    let body: serde_json::Value = d
        .http
        .get(d.url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["config"].clone()
}

fn unary(prompt: &str, provider: &str) -> SendPromptRequest {
    SendPromptRequest {
        prompt: prompt.into(),
        provider: provider.into(),
        ..SendPromptRequest::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// Background traffic: streams, unary calls and HTTP completions on the default provider. Each
/// request records the step the checker had observed when it started; its answer must come from
/// the default provider of that step or of a later one (at most one write is ever pending).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    failures: Arc<Mutex<Vec<String>>>,
    done: Arc<[AtomicUsize; 3]>,
}

impl Load {
    /// `streams` concurrent StreamPrompt loops, one SendPrompt loop, one HTTP completions loop.
    /// `observed` is the index of the last step the checker saw serving; `defaults[i]` is the
    /// default provider of step `i`.
    fn start(
        d: &Daemon,
        streams: usize,
        observed: Arc<AtomicUsize>,
        defaults: Arc<Vec<&'static str>>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let done: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
        let check = {
            let failures = failures.clone();
            move |what: &str, from: usize, to: usize, provider: &str| {
                let to = (to + 1).min(defaults.len() - 1);
                if !defaults[from..=to].contains(&provider) {
                    failures.lock().unwrap().push(format!(
                        "{what} started at step {from} was answered by {provider:?}, not by a \
                         default of steps {from}..={to} ({:?})",
                        &defaults[from..=to]
                    ));
                }
            }
        };
        let mut tasks = Vec::new();
        for i in 0..streams {
            let (stop, failures, done, observed, check) = (
                stop.clone(),
                failures.clone(),
                done.clone(),
                observed.clone(),
                check.clone(),
            );
            let mut client = d.client();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let from = observed.load(Ordering::SeqCst);
                    let prompt = format!("stream {i} one two three four five six seven");
                    let result = async {
                        let mut s = client
                            .stream_prompt(stream_request(&prompt))
                            .await?
                            .into_inner();
                        let mut last = None;
                        while let Some(m) = s.message().await? {
                            last = Some(m);
                        }
                        Ok::<_, tonic::Status>(last)
                    };
                    match within(HANG_GUARD, "a stream under load", result).await {
                        Ok(Some(last)) if last.done => {
                            check(
                                "stream",
                                from,
                                observed.load(Ordering::SeqCst),
                                &last.provider,
                            );
                            done[0].fetch_add(1, Ordering::SeqCst);
                        }
                        other => failures
                            .lock()
                            .unwrap()
                            .push(format!("stream failed: {other:?}")),
                    }
                }
            }));
        }
        {
            let (stop, failures, done, observed, check) = (
                stop.clone(),
                failures.clone(),
                done.clone(),
                observed.clone(),
                check.clone(),
            );
            let mut client = d.client();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let from = observed.load(Ordering::SeqCst);
                    match within(
                        HANG_GUARD,
                        "a unary call under load",
                        client.send_prompt(unary("unary one two", "")),
                    )
                    .await
                    {
                        Ok(r) => {
                            let r = r.into_inner();
                            check("unary", from, observed.load(Ordering::SeqCst), &r.provider);
                            done[1].fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("SendPrompt failed: {e:?}")),
                    }
                }
            }));
        }
        {
            let (stop, failures, done, observed, check) = (
                stop.clone(),
                failures.clone(),
                done.clone(),
                observed.clone(),
                check.clone(),
            );
            let (http, url) = (d.http.clone(), d.url("/v1/chat/completions"));
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let from = observed.load(Ordering::SeqCst);
                    let body = serde_json::json!({
                        "messages": [{"role": "user", "content": "http one two"}]
                    });
                    let result = async {
                        let resp = http.post(&url).json(&body).send().await?;
                        let status = resp.status();
                        let text = resp.text().await?;
                        Ok::<_, reqwest::Error>((status, text))
                    };
                    match result.await {
                        Ok((status, text)) if status.is_success() => {
                            let v: serde_json::Value =
                                serde_json::from_str(&text).unwrap_or_default();
                            let model = v["model"].as_str().unwrap_or_default();
                            let provider = model.split('/').next().unwrap_or_default();
                            check(
                                "completion",
                                from,
                                observed.load(Ordering::SeqCst),
                                provider,
                            );
                            done[2].fetch_add(1, Ordering::SeqCst);
                        }
                        other => failures
                            .lock()
                            .unwrap()
                            .push(format!("HTTP completion failed: {other:?}")),
                    }
                }
            }));
        }
        Self {
            stop,
            tasks,
            failures,
            done,
        }
    }

    /// Stops the traffic; returns (streams, unary calls, completions) that succeeded and the
    /// failures.
    async fn finish(self) -> ([usize; 3], Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            within(HANG_GUARD, "load task", t).await.unwrap();
        }
        let done = [0, 1, 2].map(|i| self.done[i].load(Ordering::SeqCst));
        let failures = self.failures.lock().unwrap().clone();
        (done, failures)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The provider list rewritten 20 times under load
// ---------------------------------------------------------------------------------------------

/// One step of the rewrite: the providers in order (`o1`/`o2` = the openai provider `o` reading
/// key file 1/2), the default, and for key-only steps the key file rewritten instead.
struct Step {
    providers: &'static [&'static str],
    default: &'static str,
    rekey: Option<(usize, &'static str)>,
}

const STEPS: &[Step] = &[
    // 0: the start.
    Step {
        providers: &["a", "o1"],
        default: "a",
        rekey: None,
    },
    Step {
        providers: &["a", "o1", "b"],
        default: "a",
        rekey: None,
    }, // add
    Step {
        providers: &["b", "a", "o1"],
        default: "a",
        rekey: None,
    }, // reorder
    Step {
        providers: &["b", "a", "o1"],
        default: "b",
        rekey: None,
    }, // default
    Step {
        providers: &["b", "a", "o1"],
        default: "o",
        rekey: None,
    }, // default → openai
    Step {
        providers: &["b", "a", "o1"],
        default: "o",
        rekey: Some((1, "sk-one-v2")),
    }, // key content
    Step {
        providers: &["b", "a", "o2"],
        default: "o",
        rekey: None,
    }, // key file
    Step {
        providers: &["a", "o2"],
        default: "o",
        rekey: None,
    }, // remove
    Step {
        providers: &["a"],
        default: "a",
        rekey: None,
    }, // remove the openai provider
    Step {
        providers: &["a", "c"],
        default: "c",
        rekey: None,
    }, // add, default
    Step {
        providers: &["c", "a", "o2"],
        default: "o",
        rekey: None,
    }, // add back
    Step {
        providers: &["c", "a", "o2"],
        default: "o",
        rekey: Some((2, "sk-two-v2")),
    }, // key content
    Step {
        providers: &["o2", "c", "a"],
        default: "a",
        rekey: None,
    }, // reorder, default
    Step {
        providers: &["o2", "c"],
        default: "c",
        rekey: None,
    }, // remove
    Step {
        providers: &["o1", "c", "b"],
        default: "b",
        rekey: None,
    }, // key file, add
    Step {
        providers: &["b", "c", "o1"],
        default: "o",
        rekey: None,
    }, // reorder
    Step {
        providers: &["b"],
        default: "b",
        rekey: None,
    }, // remove all but one
    Step {
        providers: &["b", "a"],
        default: "a",
        rekey: None,
    }, // add
    Step {
        providers: &["a", "b", "c", "o2"],
        default: "c",
        rekey: None,
    }, // add two
    Step {
        providers: &["c", "b", "a", "o2"],
        default: "o",
        rekey: None,
    }, // reorder
    Step {
        providers: &["a", "o1"],
        default: "a",
        rekey: None,
    }, // back to the start
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_list_rewritten_20_times_under_load_fails_no_request() {
    let fake = openai_fake().await;
    let root = tempfile::tempdir().unwrap();
    let keys = root.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key_file = |i: usize| keys.join(format!("key{i}"));
    let mut key_text = ["", "sk-one", "sk-two"];
    std::fs::write(key_file(1), key_text[1]).unwrap();
    std::fs::write(key_file(2), key_text[2]).unwrap();
    let conf_of = |step: &Step| {
        let mut c = Conf::echo(&[])
            .with_delay("10ms")
            .with_default(step.default);
        c.providers = step
            .providers
            .iter()
            .map(|p| match *p {
                "o1" | "o2" => Prov::OpenAi {
                    name: "o",
                    base_url: format!("{}/v1", fake.base_url()),
                    key_file: key_file(if *p == "o1" { 1 } else { 2 }),
                },
                echo => Prov::Echo(echo),
            })
            .collect();
        c
    };
    assert_eq!(STEPS.len(), 21, "20 rewrites after the start");
    let d = Daemon::start(root, &conf_of(&STEPS[0])).await;
    let observed = Arc::new(AtomicUsize::new(0));
    let defaults: Arc<Vec<&'static str>> = Arc::new(STEPS.iter().map(|s| s.default).collect());
    let load = Load::start(&d, 4, observed.clone(), defaults);
    let mut client = d.client();

    for (i, step) in STEPS.iter().enumerate().skip(1) {
        // Let some traffic run on the previous state.
        tokio::time::sleep(Duration::from_millis(100)).await;
        match step.rekey {
            Some((k, text)) => {
                write_atomically(&key_file(k), text);
                key_text[k] = text;
            }
            None => d.write(&conf_of(step)),
        }
        d.wait_generation(1 + i as u64).await;
        observed.store(i, Ordering::SeqCst);

        let expected = conf_of(step).names();
        let info = d.info().await;
        assert_eq!(
            info.available_providers, expected,
            "step {i}: GetServerInfo"
        );
        assert_eq!(info.provider, step.default, "step {i}: default provider");
        assert_eq!(
            http_model_owners(&d).await,
            expected,
            "step {i}: /v1/models"
        );
        let r = client
            .send_prompt(unary("check default", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.provider, step.default, "step {i}: who answered");
        if let Some(o) = step.providers.iter().find(|p| p.starts_with('o')) {
            let k = if *o == "o1" { 1 } else { 2 };
            let marker = format!("key check at step {i}");
            client.send_prompt(unary(&marker, "o")).await.unwrap();
            let seen = fake
                .requests()
                .into_iter()
                .filter(|r| String::from_utf8_lossy(&r.body).contains(&marker))
                .map(|r| r.header("authorization"))
                .collect::<Vec<_>>();
            assert_eq!(
                seen,
                vec![Some(format!("Bearer {}", key_text[k]))],
                "step {i}: the key the upstream saw"
            );
        }
    }
    // Traffic on the last state, then the totals.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (done, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    assert!(
        done.iter().all(|n| *n >= 20),
        "too little traffic to mean anything: {done:?} (streams, unary, HTTP)"
    );
    let r = d.reloads_now().await;
    assert_eq!((r.ok, r.error), (20, 0), "{r:?}");
    drop(client);
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. A broken config mid-load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_config_keeps_the_old_one_serving_and_fixing_it_recovers() {
    let conf = Conf::echo(&["a", "b"]).with_delay("10ms");
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;
    let observed = Arc::new(AtomicUsize::new(0));
    let load = Load::start(&d, 3, observed.clone(), Arc::new(vec!["a", "a"]));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let good = conf.render(d.root());
    let broken = format!("{good}\n[[llm.providers]\nname = \"c\nkind = echo\n");
    write_atomically(&d.path, &broken);
    let r = d.wait_errors(0).await;
    assert_eq!((r.ok, r.error, r.generation), (0, 1, 1), "{r:?}");
    let status = command(d.channel.clone(), None, "/status").await.unwrap();
    assert!(status.contains("Last reload error:"), "{status}");
    assert!(
        status.contains("chatcli.toml"),
        "the error names the file: {status}"
    );
    assert_eq!(status_generation(&status), Some(1), "{status}");
    let http_status = http_config_status(&d).await;
    assert_eq!(http_status["generation"], 1, "{http_status}");
    assert!(
        http_status["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("chatcli.toml")),
        "{http_status}"
    );
    assert_eq!(d.info().await.available_providers, ["a", "b"]);
    // The old config keeps serving for a while.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Fixed without a signal.
    d.write(&Conf::echo(&["a", "b", "c"]).with_delay("10ms"));
    observed.store(1, Ordering::SeqCst);
    let r = d.wait_generation(2).await;
    assert_eq!((r.ok, r.error), (1, 1), "{r:?}");
    let status = wait_status_generation(&d.channel, 2).await;
    assert!(!status.contains("Last reload error"), "{status}");
    let http_status = http_config_status(&d).await;
    assert_eq!(http_status["generation"], 2, "{http_status}");
    assert!(http_status["last_reload_error"].is_null(), "{http_status}");
    assert_eq!(d.info().await.available_providers, ["a", "b", "c"]);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (done, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(done.iter().all(|n| *n > 0), "{done:?}");
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The Kubernetes ConfigMap `..data` swap
// ---------------------------------------------------------------------------------------------

/// Publishes `text` the way the kubelet updates a ConfigMap volume: a new timestamped dir, a
/// `..data_tmp` symlink to it renamed over `..data`, the old dir removed.
fn configmap_swap(etc: &Path, old: &str, new: &str, text: &str) {
    std::fs::create_dir(etc.join(new)).unwrap();
    std::fs::write(etc.join(new).join("chatcli.toml"), text).unwrap();
    std::os::unix::fs::symlink(new, etc.join("..data_tmp")).unwrap();
    std::fs::rename(etc.join("..data_tmp"), etc.join("..data")).unwrap();
    std::fs::remove_dir_all(etc.join(old)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_data_symlink_swap_is_picked_up() {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    let first = etc.join("..2026_01_01");
    std::fs::create_dir_all(&first).unwrap();
    std::fs::write(
        first.join("chatcli.toml"),
        Conf::echo(&["a"]).render(root.path()),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_01_01", etc.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/chatcli.toml", etc.join("chatcli.toml")).unwrap();
    let path = etc.join("chatcli.toml");
    let d = Daemon::serve(root, path).await;
    assert_eq!(d.info().await.available_providers, ["a"]);

    let second = Conf::echo(&["a", "b"]).with_default("b");
    configmap_swap(
        &etc,
        "..2026_01_01",
        "..2026_01_02",
        &second.render(d.root()),
    );
    d.wait_generation(2).await;
    let info = d.info().await;
    assert_eq!(info.available_providers, ["a", "b"]);
    assert_eq!(info.provider, "b");

    // And again: the watch survives the swap.
    let third = Conf::echo(&["c"]);
    configmap_swap(
        &etc,
        "..2026_01_02",
        "..2026_01_03",
        &third.render(d.root()),
    );
    let r = d.wait_generation(3).await;
    assert_eq!(d.info().await.available_providers, ["c"]);
    assert_eq!(r.error, 0, "{r:?}");
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Editor pattern
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editor_truncate_pause_write_is_read_once_whole() {
    use std::io::Write as _;
    let d = Daemon::start(tempfile::tempdir().unwrap(), &Conf::echo(&["a"])).await;
    let before = d.reloads_now().await;
    assert_eq!((before.ok, before.error), (0, 0));

    let new = Conf::echo(&["a", "b"]).with_default("b").render(d.root());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&d.path)
        .unwrap();
    f.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.write_all(new.as_bytes()).unwrap();
    drop(f);

    d.wait_generation(2).await;
    tokio::time::sleep(SETTLE).await;
    let after = d.reloads_now().await;
    assert_eq!(
        (after.ok, after.error, after.generation),
        (1, 0, 2),
        "one successful reload, no failed one: {after:?}"
    );
    let info = d.info().await;
    assert_eq!(info.available_providers, ["a", "b"]);
    assert_eq!(info.provider, "b");
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Triggers that must not reload, and drop-ins that must
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_files_and_unchanged_rewrites_do_not_reload() {
    let conf = Conf::echo(&["a"]);
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;
    // A neighbour in the watched directory, and the same content written again.
    std::fs::write(d.path.with_file_name("notes.txt"), "unrelated").unwrap();
    d.write(&conf);
    tokio::time::sleep(SETTLE).await;
    let r = d.reloads_now().await;
    assert_eq!((r.ok, r.error, r.generation), (0, 0, 1), "{r:?}");
    // A real change still goes through.
    d.write(&Conf::echo(&["a", "b"]));
    d.wait_generation(2).await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_faster_than_the_debounce_still_apply_within_a_second() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &Conf::echo(&["a"])).await;
    let started = Instant::now();
    let mut applied_after = None;
    for i in 0..30u32 {
        let extra = if i.is_multiple_of(2) { "b" } else { "c" };
        d.write(&Conf::echo(&["a", extra]));
        tokio::time::sleep(Duration::from_millis(100)).await;
        if applied_after.is_none() && d.reloads_now().await.generation > 1 {
            applied_after = Some(started.elapsed());
        }
    }
    assert!(
        applied_after.is_some_and(|t| t < Duration::from_millis(1500)),
        "first reload after {applied_after:?} of writes every 100 ms"
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conf_d_drop_ins_are_watched() {
    let root = tempfile::tempdir().unwrap();
    let conf = Conf::echo(&["a", "b"]);
    let path = write_config(root.path(), &conf);
    let conf_d = path.with_file_name("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::fs::write(conf_d.join("10-default.toml"), "[llm]\ndefault = \"a\"\n").unwrap();
    let d = Daemon::serve(root, path).await;
    assert_eq!(d.info().await.provider, "a");

    write_atomically(&conf_d.join("10-default.toml"), "[llm]\ndefault = \"b\"\n");
    d.wait_generation(2).await;
    assert_eq!(d.info().await.provider, "b");

    // A new drop-in, later in name order, wins.
    std::fs::write(conf_d.join("20-default.toml"), "[llm]\ndefault = \"a\"\n").unwrap();
    d.wait_generation(3).await;
    assert_eq!(d.info().await.provider, "a");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conf_d_created_after_the_start_is_watched() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &Conf::echo(&["a", "b"])).await;
    let conf_d = d.path.with_file_name("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::fs::write(conf_d.join("10-default.toml"), "[llm]\ndefault = \"b\"\n").unwrap();
    d.wait_generation(2).await;
    assert_eq!(d.info().await.provider, "b");
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Tokens, and the admin-only /reload command
// ---------------------------------------------------------------------------------------------

const ALICE: Tok = Tok {
    name: "alice",
    role: "user",
    token: "token-alice-3f1a9c",
};
const BOB: Tok = Tok {
    name: "bob",
    role: "user",
    token: "token-bob-77d2e0",
};
const ROOT: Tok = Tok {
    name: "root",
    role: "admin",
    token: "token-root-b41c55",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_is_refused_while_its_open_stream_finishes() {
    let mut conf = Conf::echo(&["a"]).with_delay("100ms");
    conf.tokens = vec![ALICE, BOB];
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;
    let alice = Some(ALICE.token);
    server_info(d.channel.clone(), alice).await.unwrap();
    server_info(d.channel.clone(), Some(BOB.token))
        .await
        .unwrap();

    // A stream of alice's, open across the reload (20 words, 100 ms apart).
    let mut client = ChatCliServiceClient::with_interceptor(
        d.channel.clone(),
        BearerToken(alice.map(String::from)),
    );
    let words = (1..=20)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut stream = client
        .stream_prompt(stream_request(&words))
        .await
        .unwrap()
        .into_inner();
    let first = within(HANG_GUARD, "the first chunk", stream.message())
        .await
        .unwrap()
        .unwrap();

    conf.tokens = vec![BOB];
    d.write(&conf);
    d.wait_generation(2).await;

    let mut rest = collect_stream(&mut stream).await;
    assert!(!rest.is_empty(), "the stream ended before the reload");
    rest.insert(0, first);
    let text: String = rest.iter().map(|m| m.chunk.as_str()).collect();
    assert_eq!(text.split_whitespace().count(), 20, "{text:?}");
    assert!(rest.last().unwrap().done);

    let err = server_info(d.channel.clone(), alice).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    server_info(d.channel.clone(), Some(BOB.token))
        .await
        .expect("the other token still works");
    drop(client);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_command_is_for_admins_and_forces_a_reload() {
    let mut conf = Conf::echo(&["a"]);
    conf.tokens = vec![BOB, ROOT];
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;

    let refused = command(d.channel.clone(), Some(BOB.token), "/reload")
        .await
        .unwrap();
    assert!(refused.contains("for admins"), "{refused}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.reloads_now().await.generation, 1);

    // Nothing changed on disk, and still a reload: the command forces it.
    let done = command(d.channel.clone(), Some(ROOT.token), "/reload")
        .await
        .unwrap();
    assert!(done.contains("Configuration reloaded"), "{done}");
    let r = d.wait_generation(2).await;
    assert_eq!((r.ok, r.error), (1, 0), "{r:?}");
    let status = command(d.channel.clone(), Some(BOB.token), "/status")
        .await
        .unwrap();
    assert_eq!(status_generation(&status), Some(2), "{status}");

    // The same over HTTP: `POST /admin/reload`.
    let url = d.url("/admin/reload");
    let refused = d
        .http
        .post(&url)
        .bearer_auth(BOB.token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::FORBIDDEN);
    let done = d
        .http
        .post(&url)
        .bearer_auth(ROOT.token)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = done.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"reloaded": true, "generation": 3}));
    let r = d.wait_generation(3).await;
    assert_eq!((r.ok, r.error), (2, 0), "{r:?}");
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Rate limit
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowered_rate_limit_applies_after_the_reload() {
    let mut conf = Conf::echo(&["a"]);
    conf.rps = 1000.0;
    conf.burst = 1000;
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;
    for _ in 0..10 {
        server_info(d.channel.clone(), None).await.unwrap();
    }

    conf.rps = 0.01;
    conf.burst = 3;
    d.write(&conf);
    d.wait_generation(2).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(match server_info(d.channel.clone(), None).await {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        });
    }
    use tonic::Code::{Ok as Pass, ResourceExhausted as Limited};
    assert_eq!(codes, [Pass, Pass, Pass, Limited, Limited, Limited]);

    // Raised again: calls pass at once.
    conf.rps = 1000.0;
    conf.burst = 1000;
    d.write(&conf);
    d.wait_generation(3).await;
    server_info(d.channel.clone(), None).await.unwrap();
    d.shutdown().await;
}

const VIEWER: Tok = Tok {
    name: "viewer",
    role: "readonly",
    token: "token-viewer-0c9e41",
};

/// Makes `n` GetServerInfo calls with `token`, one after the other: which passed and which were
/// refused by the rate limit (any other failure fails the test).
async fn limited_calls(d: &Daemon, token: &str, n: usize) -> Vec<bool> {
    let mut refused = Vec::new();
    for _ in 0..n {
        refused.push(match server_info(d.channel.clone(), Some(token)).await {
            Ok(_) => false,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => true,
            Err(e) => panic!("GetServerInfo failed otherwise: {e:?}"),
        });
    }
    refused
}

/// A burst of 5 that refills one call per 100 s (nothing refills during the test), for ALICE,
/// BOB, VIEWER and ROOT.
fn budget_conf() -> Conf {
    let mut conf = Conf::echo(&["a"]);
    conf.rps = 0.01;
    conf.burst = 5;
    conf.tokens = vec![ALICE, BOB, VIEWER, ROOT];
    conf
}

const PASS: bool = false;
const LIMITED: bool = true;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_remaining_budget_survives_an_unrelated_reload() {
    let mut conf = budget_conf();
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;
    assert_eq!(limited_calls(&d, ALICE.token, 3).await, [PASS; 3]);

    // Unrelated changes: the log level and the provider list.
    conf.log_level = "debug";
    conf.providers.push(Prov::Echo("b"));
    d.write(&conf);
    d.wait_generation(2).await;
    let info = server_info(d.channel.clone(), Some(ROOT.token))
        .await
        .unwrap();
    assert_eq!(info.available_providers, ["a", "b"], "the reload applied");

    // Alice has the 2 calls she had left, refused where she would have been without the reload;
    // Bob, who spent nothing, still has his whole burst.
    assert_eq!(
        limited_calls(&d, ALICE.token, 3).await,
        [PASS, PASS, LIMITED]
    );
    assert_eq!(
        limited_calls(&d, BOB.token, 6).await,
        [PASS, PASS, PASS, PASS, PASS, LIMITED]
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_changed_limit_gives_it_a_new_bucket_and_leaves_the_others() {
    let mut conf = budget_conf();
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;
    assert_eq!(limited_calls(&d, ALICE.token, 3).await, [PASS; 3]);
    assert_eq!(limited_calls(&d, VIEWER.token, 3).await, [PASS; 3]);

    // Only the read-only role's limit changes: a burst of 4 instead of 5.
    conf.tail = "\n[limits.roles.readonly]\nrate_limit_burst = 4\n".into();
    d.write(&conf);
    d.wait_generation(2).await;

    // The viewer's bucket was rebuilt under the new limit: full, 4 calls. Alice's was kept.
    assert_eq!(
        limited_calls(&d, VIEWER.token, 5).await,
        [PASS, PASS, PASS, PASS, LIMITED]
    );
    assert_eq!(
        limited_calls(&d, ALICE.token, 3).await,
        [PASS, PASS, LIMITED]
    );
    d.shutdown().await;
}

/// Opens a StreamPrompt of `words` words with `token` and reads its first chunk; the refusal's
/// code when the stream is refused.
async fn open_stream(
    d: &Daemon,
    token: &str,
    words: usize,
) -> Result<tonic::Streaming<chatcli::proto::StreamPromptResponse>, tonic::Code> {
    let mut client = ChatCliServiceClient::with_interceptor(
        d.channel.clone(),
        BearerToken(Some(token.to_string())),
    );
    let prompt = (1..=words)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut stream = within(
        HANG_GUARD,
        "StreamPrompt",
        client.stream_prompt(stream_request(&prompt)),
    )
    .await
    .map_err(|e| e.code())?
    .into_inner();
    match within(HANG_GUARD, "the first chunk", stream.message()).await {
        Ok(Some(_)) => Ok(stream),
        Ok(None) => panic!("the stream ended without a chunk"),
        Err(e) => Err(e.code()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_stay_counted_by_the_stream_cap_across_a_reload() {
    let mut conf = Conf::echo(&["a"]).with_delay("100ms");
    conf.tokens = vec![ALICE, BOB];
    conf.max_streams = Some(1);
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;
    // Alice's one stream, open across the reload (20 words, 100 ms apart).
    let mut open = open_stream(&d, ALICE.token, 20).await.unwrap();

    conf.log_level = "debug";
    d.write(&conf);
    d.wait_generation(2).await;

    assert_eq!(
        open_stream(&d, ALICE.token, 1).await.err(),
        Some(tonic::Code::ResourceExhausted),
        "the open stream still counts against alice's cap"
    );
    let bobs = open_stream(&d, BOB.token, 1).await.unwrap();
    drop(bobs);
    // Once it ends, alice may open another.
    let rest = collect_stream(&mut open).await;
    assert!(rest.last().is_some_and(|m| m.done));
    drop(open);
    eventually("alice's slot freed", || async {
        open_stream(&d, ALICE.token, 1).await.ok().map(|_| ())
    })
    .await;
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 10. A config that removes every provider
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_without_providers_is_refused() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &Conf::echo(&["a", "b"])).await;
    d.write(&Conf::echo(&[]));
    let r = eventually("a reload attempt", || async {
        d.reloads().await.filter(|r| r.ok + r.error > 0)
    })
    .await;
    assert_eq!(
        (r.ok, r.error, r.generation),
        (0, 1, 1),
        "a config without providers was applied; GetServerInfo now lists {:?}",
        d.info().await.available_providers
    );
    assert_eq!(d.info().await.available_providers, ["a", "b"]);
    let mut client = d.client();
    let mut s = client
        .stream_prompt(stream_request("still here"))
        .await
        .unwrap()
        .into_inner();
    collect_stream(&mut s).await;
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The real binary: SIGHUP, restart-only settings, sd-notify, bad files, log level
// ---------------------------------------------------------------------------------------------

/// A config dir for the real binary: `<root>/etc/chatcli.toml`.
fn binary_config(conf: &Conf) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let path = write_config(root.path(), conf);
    (root, path)
}

/// The lines of `log` containing every one of `needles`.
fn log_lines<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

async fn health(channel: Channel) {
    let mut client = ChatCliServiceClient::new(channel);
    within(HANG_GUARD, "Health", client.health(HealthRequest {}))
        .await
        .expect("Health failed");
}

async fn stream_ok(channel: Channel) {
    let mut client = ChatCliServiceClient::new(channel);
    let mut s = client
        .stream_prompt(stream_request("are you there"))
        .await
        .unwrap()
        .into_inner();
    let msgs = collect_stream(&mut s).await;
    assert!(msgs.last().is_some_and(|m| m.done), "{msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_forces_a_reload_of_an_unchanged_file() {
    let (_root, path) = binary_config(&Conf::echo(&["a"]));
    let server = BinaryServer::start(&path, &[]);
    let channel = connect(server.addr).await;
    wait_status_generation(&channel, 1).await;
    assert!(!server.stderr().contains("configuration reloaded"));

    server.signal("HUP");
    server.wait_for_log("configuration reloaded").await;
    let log = server.stderr();
    let lines = log_lines(&log, &["configuration reloaded", "SIGHUP"]);
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("trigger=\"SIGHUP\""), "{}", lines[0]);
    wait_status_generation(&channel, 2).await;
    stream_ok(channel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_change_needs_a_restart_and_the_old_port_keeps_serving() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut conf = Conf::echo(&["a"]);
    conf.port = Some(port);
    let (root, path) = binary_config(&conf);
    let server = BinaryServer::start_args(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(server.addr.port(), port);
    let channel = connect(server.addr).await;

    // The port changes, and a provider is added: the provider applies, the port does not.
    let new_port = if port == u16::MAX { port - 1 } else { port + 1 };
    conf.port = Some(new_port);
    conf.providers.push(Prov::Echo("b"));
    write_atomically(&path, &conf.render(root.path()));
    server.wait_for_log("need a restart").await;
    let log = server.stderr();
    let lines = log_lines(&log, &["need a restart"]);
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains(&format!("server.port ({port} → {new_port})")),
        "{}",
        lines[0]
    );
    wait_status_generation(&channel, 2).await;
    assert_eq!(
        server_info(channel.clone(), None)
            .await
            .unwrap()
            .available_providers,
        ["a", "b"]
    );
    // The old port still answers, on a new connection too.
    health(connect(SocketAddr::from(([127, 0, 0, 1], port))).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_reloading_ready_stopping_in_order() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(n) = sock.recv(&mut buf) {
                    received
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        })
    };
    // The states, in arrival order, without STATUS=…; MONOTONIC_USEC kept to check its value.
    let states = || -> Vec<String> {
        received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|d| d.lines().map(String::from).collect::<Vec<_>>())
            .filter(|l| !l.starts_with("STATUS="))
            .collect()
    };
    let wait_for = |n: usize, what: &'static str| {
        let states = &states;
        async move {
            eventually(what, || async { (states().len() >= n).then_some(()) }).await;
        }
    };

    let conf = Conf::echo(&["a"]);
    let (root, path) = binary_config(&conf);
    let mut server = BinaryServer::start_with_env(
        &path,
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    wait_for(1, "READY=1 at the start").await;

    write_atomically(&path, &Conf::echo(&["a", "b"]).render(root.path()));
    wait_for(4, "RELOADING=1, MONOTONIC_USEC, READY=1 after the change").await;

    server.terminate();
    assert!(
        server.wait_exit(HANG_GUARD).await.is_some(),
        "no exit after SIGTERM"
    );
    wait_for(5, "STOPPING=1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();

    let got = states();
    let datagrams = received.lock().unwrap().clone();
    let usec = got
        .iter()
        .find_map(|s| s.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {datagrams:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|v| v > 0), "{usec:?}");
    let order: Vec<&str> = got
        .iter()
        .map(String::as_str)
        .filter(|s| !s.starts_with("MONOTONIC_USEC="))
        .collect();
    assert_eq!(
        order,
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{datagrams:?}"
    );
    // MONOTONIC_USEC travels with RELOADING=1.
    assert!(
        datagrams
            .iter()
            .any(|d| d.contains("RELOADING=1") && d.contains("MONOTONIC_USEC=")),
        "{datagrams:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_are_refused_and_the_daemon_keeps_serving() {
    const FAILED: &str = "configuration reload failed";
    let conf = Conf::echo(&["a", "b"]);
    let (root, path) = binary_config(&conf);
    let good = conf.render(root.path());
    let etc = path.parent().unwrap().to_path_buf();
    let mut server = BinaryServer::start(&path, &[]);
    let channel = connect(server.addr).await;
    wait_status_generation(&channel, 1).await;

    let failed_once_more = |what: &'static str| {
        let before = server.stderr().matches(FAILED).count();
        let (server, channel) = (&server, channel.clone());
        async move {
            server.wait_for_log_count(FAILED, before).await;
            let status = command(channel.clone(), None, "/status").await.unwrap();
            assert!(status.contains("Last reload error:"), "{what}: {status}");
            assert_eq!(status_generation(&status), Some(1), "{what}: {status}");
            let info = server_info(channel.clone(), None).await.unwrap();
            assert_eq!(info.available_providers, ["a", "b"], "{what}");
            stream_ok(channel).await;
            status
        }
    };
    let restore = || {
        write_atomically(&path, &good);
        let channel = channel.clone();
        async move {
            eventually("the reload error cleared", || async {
                let s = command(channel.clone(), None, "/status").await.ok()?;
                (!s.contains("Last reload error")).then_some(())
            })
            .await;
        }
    };

    // A half-written file.
    write_atomically(&path, &good[..good.len() - 12]);
    let status = failed_once_more("half-written file").await;
    assert!(status.contains("chatcli.toml"), "{status}");
    restore().await;

    // A directory where the file should be.
    std::fs::rename(&path, etc.join("moved-away.toml")).unwrap();
    std::fs::create_dir(&path).unwrap();
    let status = failed_once_more("a directory").await;
    assert!(
        status.contains("Is a directory") || status.contains("os error 21"),
        "{status}"
    );
    std::fs::remove_dir(&path).unwrap();
    restore().await;

    // A symlink loop.
    std::os::unix::fs::symlink("loop-2", etc.join("loop-1")).unwrap();
    std::os::unix::fs::symlink("loop-1", etc.join("loop-2")).unwrap();
    std::os::unix::fs::symlink("loop-1", etc.join("link-tmp")).unwrap();
    std::fs::rename(etc.join("link-tmp"), &path).unwrap();
    let status = failed_once_more("a symlink loop").await;
    assert!(
        status.contains("symbolic links") || status.contains("os error 40"),
        "{status}"
    );
    restore().await;

    // A config that removes every provider.
    write_atomically(&path, &Conf::echo(&[]).render(root.path()));
    let status = failed_once_more("no provider left").await;
    assert!(status.contains("llm.providers"), "{status}");
    restore().await;

    // Deleted, then re-created with a new provider list.
    std::fs::remove_file(&path).unwrap();
    let status = failed_once_more("the file deleted").await;
    assert!(
        status.contains("No such file") || status.contains("os error 2"),
        "{status}"
    );
    std::fs::write(&path, Conf::echo(&["a", "b", "c"]).render(root.path())).unwrap();
    let status = wait_status_generation(&channel, 2).await;
    assert!(!status.contains("Last reload error"), "{status}");
    assert_eq!(
        server_info(channel.clone(), None)
            .await
            .unwrap()
            .available_providers,
        ["a", "b", "c"]
    );

    // Each failure was logged once, with its reason.
    let log = server.stderr();
    assert_eq!(log.matches(FAILED).count(), 5, "{log}");
    for reason in [
        "invalid TOML",
        "Is a directory",
        "Too many levels of symbolic links",
        "no provider left",
        "No such file",
    ] {
        assert_eq!(
            log.matches(reason).count(),
            1,
            "{reason:?} logged once:\n{log}"
        );
    }
    health(channel.clone()).await;
    stream_ok(channel).await;
    assert!(server.is_running(), "the daemon exited:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_change_applies_without_a_restart() {
    const SAVED: &str = "session saved";
    let conf = Conf::echo(&["a"]);
    let (root, path) = binary_config(&conf);
    let server = BinaryServer::start(&path, &[]);
    let channel = connect(server.addr).await;
    let save = |name: &'static str| {
        let mut client = ChatCliServiceClient::new(channel.clone());
        async move {
            client
                .save_session(SaveSessionRequest {
                    name: name.into(),
                    ..SaveSessionRequest::default()
                })
                .await
                .unwrap();
        }
    };
    save("at-info").await;

    let mut debug = conf.clone();
    debug.log_level = "debug";
    write_atomically(&path, &debug.render(root.path()));
    server.wait_for_log("configuration reloaded").await;
    save("at-debug").await;
    server.wait_for_log(SAVED).await;

    let log = server.stderr();
    assert!(log_lines(&log, &[SAVED, "at-info"]).is_empty(), "{log}");
    assert_eq!(log_lines(&log, &[SAVED, "at-debug"]).len(), 1, "{log}");
    // And back to info: quiet again.
    write_atomically(&path, &conf.render(root.path()));
    server.wait_for_log_count("configuration reloaded", 1).await;
    save("at-info-again").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = server.stderr();
    assert!(
        log_lines(&log, &[SAVED, "at-info-again"]).is_empty(),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Numbers for BENCHMARKS.md (not assertions): `bench/reload.sh`
// ---------------------------------------------------------------------------------------------

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Unary SendPrompt calls from `clients` concurrent loops for `length`: latencies and errors.
async fn unary_traffic(d: &Daemon, clients: usize, length: Duration) -> (Vec<Duration>, usize) {
    let deadline = Instant::now() + length;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = d.client();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.send_prompt(unary("bench one two three", "")).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    all.sort();
    (all, errors)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run bench/reload.sh"]
async fn bench_reload() {
    let storm_secs: u64 = std::env::var("RELOAD_BENCH_STORM_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let storm = Duration::from_secs(storm_secs);
    let d = Daemon::start(tempfile::tempdir().unwrap(), &Conf::echo(&["a"])).await;
    let mut out = String::new();

    // Time from the rename to the new state serving, over 50 reloads.
    let mut latencies = Vec::new();
    for i in 0..50u64 {
        let extra: &'static str = if i.is_multiple_of(2) { "b" } else { "c" };
        let conf = Conf::echo(&["a", extra]);
        let t = Instant::now();
        d.write(&conf);
        eventually("the new provider", || async {
            let info = d.info().await;
            info.available_providers
                .iter()
                .any(|p| p == extra)
                .then_some(())
        })
        .await;
        latencies.push(t.elapsed());
        d.wait_generation(2 + i).await;
    }
    latencies.sort();
    out.push_str(&format!(
        "file write (atomic rename) to new state serving, 50 reloads: p50 {}, p99 {}, max {}\n",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(*latencies.last().unwrap())
    ));

    // Steady state, then a storm of file writes (one every 100 ms), then of forced reloads.
    let clients = 8;
    let (steady, steady_err) = unary_traffic(&d, clients, storm).await;
    out.push_str(&format!(
        "steady state ({clients} clients, {storm_secs} s): {} requests, p50 {}, p99 {}, errors {steady_err}\n",
        steady.len(),
        ms(percentile(&steady, 50.0)),
        ms(percentile(&steady, 99.0)),
    ));
    for kind in ["file writes", "/reload commands"] {
        let before = d.reloads_now().await;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, path, root) = (stop.clone(), d.path.clone(), d.root().to_path_buf());
            let channel = d.channel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    i += 1;
                    if kind == "file writes" {
                        let extra: &'static str = if i.is_multiple_of(2) { "b" } else { "c" };
                        write_atomically(&path, &Conf::echo(&["a", extra]).render(&root));
                    } else {
                        let _ = command(channel.clone(), None, "/reload").await;
                    }
                }
                i
            })
        };
        let (lat, errors) = unary_traffic(&d, clients, storm).await;
        stop.store(true, Ordering::SeqCst);
        let triggers = writer.await.unwrap();
        tokio::time::sleep(SETTLE).await;
        let after = d.reloads_now().await;
        out.push_str(&format!(
            "reload storm, {kind} every 100 ms ({clients} clients, {storm_secs} s): {} requests, p50 {}, p99 {}, errors {errors}; {triggers} triggers, {} reloads applied, {} failed\n",
            lat.len(),
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0)),
            after.ok - before.ok,
            after.error - before.error,
        ));
    }
    d.shutdown().await;

    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let header = format!(
        "# chatcli hot reload ({profile} build, {} CPUs, in-process server, echo provider without delay)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let text = format!("{header}{out}");
    eprint!("{text}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("reload.txt"), text).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Files a failed reload names, authentication on the bound address, restart-only settings
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_named_by_a_failed_reload_applies_when_it_appears() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &Conf::echo(&["a"])).await;
    // In a directory of its own, which nothing of the serving config lives in.
    let secrets = d.root().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let token_file = secrets.join("token");
    let mut conf = Conf::echo(&["a"]);
    conf.tail = format!(
        "\n[auth]\ntoken_file = {:?}\n",
        token_file.display().to_string()
    );
    d.write(&conf);
    let failed = d.wait_errors(0).await;
    assert_eq!((failed.generation, failed.error), (1, 1), "{failed:?}");
    server_info(d.channel.clone(), None)
        .await
        .expect("the old config, without auth, keeps serving");

    // No SIGHUP, no other write: the token file appearing is what applies the reload.
    std::fs::write(&token_file, "token-from-file-5e2d\n").unwrap();
    let applied = d.wait_generation(2).await;
    assert_eq!(
        applied.error, 1,
        "the failure was reported once: {applied:?}"
    );
    let err = server_info(d.channel.clone(), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    server_info(d.channel.clone(), Some("token-from-file-5e2d"))
        .await
        .expect("the token from the file");
    d.shutdown().await;
}

/// One edit that moves `bind_address` to loopback (a restart-only setting, so the listener stays
/// on 0.0.0.0) and removes the token is refused: the daemon keeps asking for the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_leaves_a_non_loopback_listener_without_auth_is_refused() {
    const TOKEN: &str = "bind-test-token-0c3e";
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("chatcli.toml");
    let echo = "[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n";
    std::fs::write(
        &path,
        format!("[server]\nbind_address = \"0.0.0.0\"\n\n[auth]\ntoken = {TOKEN:?}\n\n{echo}"),
    )
    .unwrap();
    let server = BinaryServer::start(&path, &[]);
    assert!(server.addr.ip().is_unspecified(), "{}", server.addr);
    let channel = connect(SocketAddr::from(([127, 0, 0, 1], server.addr.port()))).await;
    server_info(channel.clone(), Some(TOKEN)).await.unwrap();

    write_atomically(
        &path,
        &format!("[server]\nbind_address = \"127.0.0.1\"\n\n{echo}"),
    );
    server.wait_for_log("configuration reload failed").await;
    let log = server.stderr();
    assert!(
        log.contains("listens on 0.0.0.0:") && log.contains("not a loopback address"),
        "{log}"
    );
    assert!(!log.contains("configuration reloaded"), "{log}");
    let err = server_info(channel.clone(), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    server_info(channel.clone(), Some(TOKEN))
        .await
        .expect("the token still works");

    // Named tokens are authentication too: that edit applies.
    write_atomically(
        &path,
        &format!(
            "[server]\nbind_address = \"0.0.0.0\"\n\n[[auth.tokens]]\nname = \"team\"\nrole = \"admin\"\nsha256 = {:?}\n\n{echo}",
            sha256_hex("team-token-9a1b")
        ),
    );
    server.wait_for_log("configuration reloaded").await;
    server_info(channel.clone(), Some("team-token-9a1b"))
        .await
        .unwrap();
    let err = server_info(channel, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_per_minute_applies_on_reload() {
    let mut conf = Conf::echo(&["a"]);
    conf.tokens = vec![ROOT];
    conf.auth_failures = Some(3);
    let d = Daemon::start(tempfile::tempdir().unwrap(), &conf).await;
    let bad = server_info(d.channel.clone(), Some("not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::Unauthenticated);
    server_info(d.channel.clone(), Some(ROOT.token))
        .await
        .expect("one failure of three allowed does not block");

    conf.auth_failures = Some(1);
    d.write(&conf);
    d.wait_generation(2).await;
    let _ = server_info(d.channel.clone(), Some("not-a-token")).await;
    // One failure is the whole allowance now: the next bad attempt is refused by the limiter.
    let err = server_info(d.channel.clone(), Some("not-a-token-either"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("too many failed authentication attempts"),
        "{err:?}"
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_applies_on_reload() {
    let mut conf = Conf::echo(&["a"]);
    let (root, path) = binary_config(&conf);
    let mut server = BinaryServer::start(&path, &[]);
    conf.grace = "1s";
    write_atomically(&path, &conf.render(root.path()));
    server.wait_for_log("configuration reloaded").await;
    let log = server.stderr();
    assert!(!log.contains("need a restart"), "{log}");

    server.terminate();
    assert!(server.wait_exit(HANG_GUARD).await.is_some(), "no exit");
    let log = server.stderr();
    let draining = log_lines(&log, &["draining"]);
    assert_eq!(draining.len(), 1, "{log}");
    assert!(draining[0].contains("grace=1s"), "{}", draining[0]);
}

/// A change to a restart-only key is named in the reload's log lines and flagged by
/// `chatcli_config_reload_restart_needed` until the file has the running value again; the rest of
/// the same edit applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_only_changes_are_reported_until_the_file_agrees_again() {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut conf = Conf::echo(&["a"]);
    let (root, path) = binary_config(&conf);
    let server = BinaryServer::start_args(
        &[
            "--config",
            path.to_str().unwrap(),
            "--port",
            "0",
            "--metrics-port",
            &metrics_port.to_string(),
        ],
        &[],
    );
    let channel = connect(server.addr).await;
    let http = http_client();
    let flag = |key: &'static str| {
        let http = http.clone();
        async move {
            let text = http
                .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let line = format!("chatcli_config_reload_restart_needed{{key=\"{key}\"}} ");
            text.contains(&line).then(|| metric_value(&text, &line))
        }
    };
    assert_eq!(flag("audit.queue").await, Some(0.0));

    conf.tail = "\n[audit]\nqueue = 64\nmax_backups = 3\n".into();
    conf.providers.push(Prov::Echo("b"));
    write_atomically(&path, &conf.render(root.path()));
    server.wait_for_log("configuration reloaded").await;
    let log = server.stderr();
    let reloaded = log_lines(&log, &["configuration reloaded"]);
    assert_eq!(reloaded.len(), 1, "{log}");
    assert!(
        reloaded[0].contains("audit.queue") && reloaded[0].contains("audit.max_backups"),
        "{}",
        reloaded[0]
    );
    let warned = log_lines(&log, &["need a restart"]);
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("audit.queue (10000 → 64)"),
        "{}",
        warned[0]
    );
    assert_eq!(flag("audit.queue").await, Some(1.0));
    assert_eq!(flag("audit.max_backups").await, Some(1.0));
    assert_eq!(flag("audit.path").await, Some(0.0));
    let status: serde_json::Value =
        crate::support::get_json(&http, format!("http://{}/status", server.addr)).await;
    assert_eq!(
        status["config"]["restart_needed"],
        serde_json::json!(["audit.max_backups", "audit.queue"]),
        "{status}"
    );
    // The reloadable part of the same edit applied.
    assert_eq!(
        server_info(channel.clone(), None)
            .await
            .unwrap()
            .available_providers,
        ["a", "b"]
    );

    // Back to the running values: nothing left to restart for.
    conf.tail.clear();
    write_atomically(&path, &conf.render(root.path()));
    server.wait_for_log_count("configuration reloaded", 1).await;
    eventually("the restart flag cleared", || async {
        (flag("audit.queue").await? == 0.0).then_some(())
    })
    .await;
    assert_eq!(flag("audit.max_backups").await, Some(0.0));
    assert_eq!(server.stderr().matches("need a restart").count(), 1);
}
