//! `chatcli connect`, the real client binary against the real server binary on port 0
//! (echo provider, or fake upstreams for stalls, failures and forwarded credentials): one-shot
//! output modes and incremental streaming, every exit code, TLS and mTLS with rcgen certificates,
//! `dns:///` round robin over two servers behind one name, the interactive client driven through a
//! pseudo-terminal (expectrl), forwarded credentials and `--use-local-auth`, and bad input.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chatcli::config::Config;
use chatcli::server::Listeners;
use chatcli::testing::anthropic::AnthropicFormat;
use chatcli::testing::openai::OpenAiFormat;
use chatcli::testing::stackspot::StackSpotFormat;
use chatcli::testing::{FakeUpstream, Recorded, Reply, Step};
use expectrl::Expect as _;
use serde_json::Value;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

use crate::support::{BIN, BinaryServer, HANG_GUARD, demo_config, echo_provider};

/// What a finished client run left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code {} (wanted {code})\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// A failure is exactly one line on stderr, and never a panic.
    fn assert_one_error_line(&self, needle: &str) -> &Self {
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "{}",
            self.stderr
        );
        let last = lines.last().copied().unwrap_or("");
        assert!(
            last.starts_with("chatcli connect: ") && last.contains(needle),
            "wanted a last stderr line with {needle:?}:\n{}",
            self.stderr
        );
        let errors = lines
            .iter()
            .filter(|l| l.starts_with("chatcli connect: "))
            .count();
        assert_eq!(errors, 1, "{}", self.stderr);
        self
    }
}

/// `chatcli connect <args>` with only `HOME`, `PATH` and `env` set, stdin from `stdin` (or
/// closed), bounded by [`HANG_GUARD`].
async fn client(home: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .arg("connect")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        use tokio::io::AsyncWriteExt as _;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let out = tokio::time::timeout(HANG_GUARD, child.wait_with_output())
        .await
        .expect("chatcli connect hung")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A server config with one provider section (TOML) as the default, plus `extra` TOML.
fn config_with(dir: &Path, default: &str, provider: &str, extra: &str) -> PathBuf {
    write(
        dir,
        "chatcli.toml",
        &format!("{extra}\n[llm]\ndefault = \"{default}\"\n\n[[llm.providers]]\n{provider}\n"),
    )
}

fn echo_toml(delay: &str) -> String {
    format!("name = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\ndelay = \"{delay}\"")
}

fn openai_toml(fake: &FakeUpstream) -> String {
    format!(
        "name = \"fake\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key = \"sk-server-own\"\n\
         model = \"fake-model\"",
        fake.base_url()
    )
}

fn addr_of(server: &BinaryServer) -> String {
    server.addr.to_string()
}

const BANNER_ECHO: &str =
    "Connected to ChatCLI server (version: 0.1.0, provider: echo, model: echo-1)";

fn chat_requests(fake: &FakeUpstream) -> Vec<Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// One-shot

#[tokio::test]
async fn oneshot_prints_the_answer_and_the_banner_on_stderr() {
    let server = BinaryServer::start(&demo_config(), &[]);
    let home = tempfile::tempdir().unwrap();
    let run = client(
        home.path(),
        &[&addr_of(&server), "-p", "hello from a script"],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "hello from a script\n");
    assert_eq!(
        run.stderr.lines().next(),
        Some(BANNER_ECHO),
        "{}",
        run.stderr
    );

    // The address may come after the flags, or from --addr / CHATCLI_REMOTE_ADDR.
    let run = client(
        home.path(),
        &["-p", "late address", &addr_of(&server)],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "late address\n");
    let run = client(
        home.path(),
        &["-p", "from env"],
        &[("CHATCLI_REMOTE_ADDR", &addr_of(&server))],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "from env\n");
}

#[tokio::test]
async fn oneshot_reads_the_prompt_from_stdin() {
    let server = BinaryServer::start(&demo_config(), &[]);
    let home = tempfile::tempdir().unwrap();
    // A piped stdin without -p.
    let run = client(
        home.path(),
        &[&addr_of(&server)],
        &[],
        Some("piped words\n"),
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "piped words\n");
    // `-p -`.
    let run = client(
        home.path(),
        &[&addr_of(&server), "-p", "-"],
        &[],
        Some("dash words\n"),
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "dash words\n");
    // An empty stdin is a usage error.
    let run = client(
        home.path(),
        &[&addr_of(&server), "-p", "-"],
        &[],
        Some("\n"),
    )
    .await;
    run.assert_code(64).assert_one_error_line("empty");
}

#[tokio::test]
async fn raw_prints_exactly_the_answer() {
    let server = BinaryServer::start(&demo_config(), &[]);
    let home = tempfile::tempdir().unwrap();
    let run = client(
        home.path(),
        &[&addr_of(&server), "--raw", "-p", "exactly  these words"],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "exactly  these words");
    assert!(run.stderr.contains(BANNER_ECHO), "{}", run.stderr);
}

#[tokio::test]
async fn json_prints_one_object_with_answer_provider_model_and_usage() {
    let server = BinaryServer::start(&demo_config(), &[]);
    let home = tempfile::tempdir().unwrap();
    let run = client(
        home.path(),
        &[&addr_of(&server), "--json", "-p", "json please"],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["answer"], "json please");
    assert_eq!(v["provider"], "echo");
    assert_eq!(v["model"], "echo-1");
    assert!(v["usage"].is_object(), "{v}");
    assert_eq!(v["usage"]["answer_bytes"], 11);
    assert_eq!(v["usage"]["prompt_bytes"], 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_reach_stdout_before_the_answer_ends() {
    let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
    fake.push(Reply::steps(vec![
        Step::Text("first words".into()),
        Step::AwaitRelease,
        Step::Text(" and the rest".into()),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "fake", &openai_toml(&fake), "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .env_clear()
        .env("HOME", home.path())
        .args(["connect", &addr_of(&server), "--raw", "-p", "stream please"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    tokio::time::timeout(HANG_GUARD, async {
        while !String::from_utf8_lossy(&seen).contains("first words") {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "stdout closed before the first delta");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first delta never reached stdout while the upstream stalled");
    // The answer is still open: the upstream has not been released.
    assert!(child.try_wait().unwrap().is_none());
    assert_eq!(String::from_utf8_lossy(&seen), "first words");
    fake.release();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).await.unwrap();
    let status = tokio::time::timeout(HANG_GUARD, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    seen.extend_from_slice(&rest);
    assert_eq!(String::from_utf8_lossy(&seen), "first words and the rest");
}

// ---------------------------------------------------------------------------------------------
// Exit codes

#[tokio::test]
async fn server_down_exits_3() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let home = tempfile::tempdir().unwrap();
    let run = client(home.path(), &[&addr.to_string(), "-p", "hi"], &[], None).await;
    run.assert_code(3).assert_one_error_line("cannot connect");
    assert!(run.stdout.is_empty());
}

#[tokio::test]
async fn wrong_token_exits_4_and_the_right_one_works() {
    let server = BinaryServer::start(&demo_config(), &["--token", "right-token"]);
    let home = tempfile::tempdir().unwrap();
    let run = client(
        home.path(),
        &[&addr_of(&server), "--token", "wrong-token", "-p", "hi"],
        &[],
        None,
    )
    .await;
    run.assert_code(4).assert_one_error_line("--token");
    assert!(!run.stderr.contains("wrong-token"), "{}", run.stderr);
    let run = client(
        home.path(),
        &[&addr_of(&server), "-p", "hi"],
        &[("CHATCLI_REMOTE_TOKEN", "right-token")],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "hi\n");
}

#[tokio::test]
async fn tls_to_a_plaintext_server_exits_3() {
    let server = BinaryServer::start(&demo_config(), &[]);
    let home = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = write(home.path(), "ca.pem", &ca.ca_pem);
    let run = client(
        home.path(),
        &[
            &addr_of(&server),
            "--tls",
            "--ca-cert",
            ca_file.to_str().unwrap(),
            "-p",
            "hi",
        ],
        &[],
        None,
    )
    .await;
    run.assert_code(3).assert_one_error_line("TLS handshake");
}

#[tokio::test]
async fn rate_limited_exits_5_and_says_when_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        "echo",
        &echo_toml("0ms"),
        "[limits]\nrate_limit_rps = 0.01\nrate_limit_burst = 1\n",
    );
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    // Health is exempt; GetServerInfo takes the only token of the bucket; StreamPrompt is refused.
    let run = client(home.path(), &[&addr_of(&server), "-p", "hi"], &[], None).await;
    run.assert_code(5).assert_one_error_line("retry in ");
    let line = run.stderr.lines().last().unwrap();
    let secs: u64 = line[line.find("retry in ").unwrap() + 9..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=100).contains(&secs), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_failure_exits_6() {
    let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
    fake.set_default(Reply::error(
        401,
        &chatcli::testing::openai::error_body("invalid_api_key", "bad upstream key"),
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "fake", &openai_toml(&fake), "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let run = client(home.path(), &[&addr_of(&server), "-p", "hi"], &[], None).await;
    run.assert_code(6).assert_one_error_line("provider failed");
    assert!(!chat_requests(&fake).is_empty());
}

/// `chatcli <args>` (no subcommand added) with only `HOME` and `PATH`, bounded by [`HANG_GUARD`].
async fn chatcli(home: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(BIN)
        .env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(HANG_GUARD, out)
        .await
        .expect("chatcli hung")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn usage_errors_exit_64_for_every_subcommand_and_help_lists_the_codes() {
    let home = tempfile::tempdir().unwrap();
    for args in [
        &["server", "--bogus-flag"][..],
        &["connect", "127.0.0.1:1", "--bogus-flag"],
        &["config", "check", "--bogus-flag"],
        &["healthcheck", "--bogus-flag"],
        &["no-such-subcommand"],
    ] {
        let run = chatcli(home.path(), args).await;
        assert_eq!(run.code, 64, "{args:?}: {run:?}");
        assert!(run.stderr.contains("error:"), "{args:?}: {run:?}");
    }
    let help = chatcli(home.path(), &["--help"]).await;
    help.assert_code(0);
    let codes = &help.stdout[help.stdout.find("Exit codes").expect(&help.stdout)..];
    for line in ["  0 ", "  1 ", "  64 ", "  69 ", "  70 ", "  78 "] {
        assert!(codes.contains(line), "{line:?} missing from:\n{codes}");
    }
    assert!(codes.contains("connect also: 3"), "{codes}");
    let help = chatcli(home.path(), &["connect", "--help"]).await;
    help.assert_code(0);
    assert!(
        help.stdout.contains("64 usage or bad input") && !help.stdout.contains(" 2 usage"),
        "{}",
        help.stdout
    );
}

/// Exactly one JSON object `{"error": {"code", "message"}}` on stdout, and the same exit code as
/// without `--json`.
#[track_caller]
fn assert_json_error(run: &Run, exit: i32, code: &str, needle: &str) {
    run.assert_code(exit);
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "wanted one line on stdout:\n{}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let v: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", run.stdout));
    assert_eq!(v["error"]["code"], code, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{needle:?} not in {v}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    assert_eq!(v["error"].as_object().map(|o| o.len()), Some(2), "{v}");
}

#[tokio::test]
async fn json_failures_print_one_error_object_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        "echo",
        &echo_toml("0ms"),
        "[limits]\nmax_prompt_bytes = 16\n",
    );
    let server = BinaryServer::start(&config, &["--token", "right-token"]);
    let addr = addr_of(&server);
    let home = tempfile::tempdir().unwrap();
    let ok = ["--token", "right-token", "--json", "-p"];

    // Answered by the server with a gRPC status: its code name.
    let long = "x".repeat(100);
    let run = client(
        home.path(),
        &[&addr, ok[0], ok[1], ok[2], ok[3], &long],
        &[],
        None,
    )
    .await;
    assert_json_error(&run, 64, "INVALID_ARGUMENT", "limit");
    let run = client(
        home.path(),
        &[&addr, "--token", "wrong-token", "--json", "-p", "hi"],
        &[],
        None,
    )
    .await;
    assert_json_error(&run, 4, "UNAUTHENTICATED", "refused the credentials");

    // Failures of the client itself: their class.
    let run = client(
        home.path(),
        &[
            &addr,
            ok[0],
            ok[1],
            "--provider",
            "NOPE",
            ok[2],
            ok[3],
            "hi",
        ],
        &[],
        None,
    )
    .await;
    assert_json_error(&run, 64, "usage", "not offered");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = free.local_addr().unwrap().to_string();
    drop(free);
    let run = client(home.path(), &[&gone, "--json", "-p", "hi"], &[], None).await;
    assert_json_error(&run, 3, "connect", "cannot connect");
    let run = client(
        home.path(),
        &["local host:1", "--json", "-p", "hi"],
        &[],
        None,
    )
    .await;
    assert_json_error(&run, 64, "usage", "malformed server address");
    // A command line clap refuses, and --json without one-shot.
    let run = client(
        home.path(),
        &[&addr, "--json", "--bogus", "-p", "hi"],
        &[],
        None,
    )
    .await;
    assert_json_error(&run, 64, "usage", "--bogus");
    let run = client(home.path(), &[&addr, "--json"], &[], Some("")).await;
    assert_json_error(&run, 64, "usage", "empty");

    // Without --json nothing goes to stdout on failure; with it, success is unchanged.
    let run = client(home.path(), &[&addr, "-p", "hi"], &[], None).await;
    run.assert_code(4);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    let run = client(
        home.path(),
        &[&addr, ok[0], ok[1], ok[2], ok[3], "fine"],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["answer"], "fine");
    assert!(v.get("error").is_none(), "{v}");
}

#[tokio::test]
async fn a_provider_the_server_does_not_offer_is_refused_at_connect() {
    // The demo config and its conf.d drop-in: echo and echo-slow.
    let server = BinaryServer::start(&demo_config(), &[]);
    let home = tempfile::tempdir().unwrap();
    let run = client(
        home.path(),
        &[&addr_of(&server), "--provider", "NOPE", "-p", "hi"],
        &[],
        None,
    )
    .await;
    run.assert_code(64).assert_one_error_line(&format!(
        "--provider NOPE is not offered by {}; it offers: echo, echo-slow",
        addr_of(&server)
    ));
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        !run.stderr.contains("provider: NOPE"),
        "the banner showed the provider as accepted: {}",
        run.stderr
    );
    // The server's names match without regard to case, and the banner uses its spelling.
    let run = client(
        home.path(),
        &[
            &addr_of(&server),
            "--provider",
            "ECHO-SLOW",
            "-p",
            "slow words",
        ],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "slow words\n");
    assert!(
        run.stderr.contains("provider: echo-slow, model: default)"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_server_without_providers_says_so_in_the_banner() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "empty.toml", "[log]\nlevel = \"info\"\n");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let run = client(home.path(), &[&addr_of(&server), "-p", "hi"], &[], None).await;
    let banner = run
        .stderr
        .lines()
        .find(|l| l.starts_with("Connected to ChatCLI server"))
        .unwrap_or_else(|| panic!("no banner: {}", run.stderr));
    assert_eq!(
        banner,
        "Connected to ChatCLI server (version: 0.1.0, provider: (none configured), model: (none))"
    );
    run.assert_code(6)
        .assert_one_error_line("has no LLM provider configured");
}

// ---------------------------------------------------------------------------------------------
// TLS, mTLS, dns:///

/// A CA made with rcgen, issuing server certificates for localhost / 127.0.0.1 and client
/// certificates.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl TestCa {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "chatcli client test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM).
    fn issue(&self, server: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A TLS server (optionally requiring client certificates from `client_ca`) and the CA file.
fn tls_server(dir: &Path, client_ca: Option<&TestCa>) -> (BinaryServer, PathBuf) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = TestCa::new();
    let (cert, key) = ca.issue(true);
    let cert_file = write(dir, "server.pem", &cert);
    let key_file = write(dir, "server-key.pem", &key);
    let ca_file = write(dir, "ca.pem", &ca.ca_pem);
    let mut tls = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert_file.display(),
        key_file.display()
    );
    if let Some(c) = client_ca {
        let f = write(dir, "client-ca.pem", &c.ca_pem);
        tls.push_str(&format!("client_ca_file = \"{}\"\n", f.display()));
    }
    let config = config_with(dir, "echo", &echo_toml("0ms"), &tls);
    (BinaryServer::start(&config, &[]), ca_file)
}

#[tokio::test]
async fn tls_with_a_generated_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca_file) = tls_server(dir.path(), None);
    let home = tempfile::tempdir().unwrap();
    let addr = format!("localhost:{}", server.addr.port());
    let run = client(
        home.path(),
        &[
            &addr,
            "--tls",
            "--ca-cert",
            ca_file.to_str().unwrap(),
            "-p",
            "over tls",
        ],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "over tls\n");
    assert!(run.stderr.contains(BANNER_ECHO), "{}", run.stderr);

    // A CA that did not sign the server's certificate: the handshake fails, said plainly.
    let other = TestCa::new();
    let other_file = write(home.path(), "other-ca.pem", &other.ca_pem);
    let run = client(
        home.path(),
        &[
            &addr,
            "--tls",
            "--ca-cert",
            other_file.to_str().unwrap(),
            "-p",
            "x",
        ],
        &[],
        None,
    )
    .await;
    run.assert_code(3).assert_one_error_line("TLS handshake");
}

#[tokio::test]
async fn mtls_needs_the_client_certificate_from_env_or_flags() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = TestCa::new();
    let (server, ca_file) = tls_server(dir.path(), Some(&client_ca));
    let home = tempfile::tempdir().unwrap();
    let (cert, key) = client_ca.issue(false);
    let cert_file = write(home.path(), "client.pem", &cert);
    let key_file = write(home.path(), "client-key.pem", &key);
    let addr = format!("127.0.0.1:{}", server.addr.port());
    let base = [
        addr.as_str(),
        "--tls",
        "--ca-cert",
        ca_file.to_str().unwrap(),
        "-p",
        "mutual",
    ];

    let run = client(home.path(), &base, &[], None).await;
    run.assert_code(3).assert_one_error_line("TLS");

    let run = client(
        home.path(),
        &base,
        &[
            ("CHATCLI_TLS_CLIENT_CERT", cert_file.to_str().unwrap()),
            ("CHATCLI_TLS_CLIENT_KEY", key_file.to_str().unwrap()),
        ],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "mutual\n");

    let mut args = base.to_vec();
    args.extend([
        "--tls-client-cert",
        cert_file.to_str().unwrap(),
        "--tls-client-key",
        key_file.to_str().unwrap(),
    ]);
    let run = client(home.path(), &args, &[], None).await;
    run.assert_code(0);
    assert_eq!(run.stdout, "mutual\n");
}

/// An in-process server on `listener` whose echo provider answers with model `model`.
async fn echo_server_on(
    listener: tokio::net::TcpListener,
    model: &str,
    data: &Path,
) -> CancellationToken {
    let mut config = Config::default();
    let mut p = echo_provider("echo", None);
    p.model = Some(model.into());
    config.llm.providers = vec![p];
    config.state.data_dir = data.to_path_buf();
    config.server.shutdown_grace = Duration::from_secs(2);
    let shutdown = CancellationToken::new();
    tokio::spawn(chatcli::server::run(
        Listeners {
            main: listener,
            metrics: None,
        },
        config,
        shutdown.clone(),
    ));
    shutdown
}

/// `dns:///NAME:PORT` where NAME resolves (through the system resolver, `/etc/hosts` in a private
/// mount namespace) to 127.0.0.1 and 127.0.0.2, each with its own server: both must get calls.
#[tokio::test(flavor = "multi_thread")]
async fn dns_name_with_two_addresses_spreads_calls_over_both() {
    let dir = tempfile::tempdir().unwrap();
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = a.local_addr().unwrap().port();
    let b = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 2], port)))
        .await
        .expect("cannot bind 127.0.0.2 on the same port");
    let stop_a = echo_server_on(a, "echo-a", &dir.path().join("a")).await;
    let stop_b = echo_server_on(b, "echo-b", &dir.path().join("b")).await;

    let hosts = write(
        dir.path(),
        "hosts",
        "127.0.0.1 localhost\n127.0.0.1 chatcli-two.test\n127.0.0.2 chatcli-two.test\n",
    );
    let probe = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/hosts && getent ahostsv4 chatcli-two.test",
            hosts.display()
        ))
        .output();
    let probe = probe.expect(
        "this test needs `unshare` (util-linux) and root, to give the client a private /etc/hosts \
         where one name has two addresses",
    );
    let text = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success() && text.contains("127.0.0.2"),
        "cannot give the client a private /etc/hosts (needs root and mount namespaces): {}{}",
        text,
        String::from_utf8_lossy(&probe.stderr)
    );

    let mut models = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let out = tokio::process::Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/hosts && exec env -i HOME={} {BIN} connect \
                 dns:///chatcli-two.test:{port} --json -v -p 'which server'",
                hosts.display(),
                dir.path().display()
            ))
            .stdin(Stdio::null())
            .output();
        let out = tokio::time::timeout(HANG_GUARD, out)
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        // -v lists both addresses behind the name.
        assert!(
            stderr.contains("127.0.0.1:") && stderr.contains("127.0.0.2:"),
            "{stderr}"
        );
        // Health, GetServerInfo (the banner) and StreamPrompt (the JSON) go round robin.
        let banner = stderr
            .lines()
            .find(|l| l.starts_with("Connected to ChatCLI server"))
            .unwrap();
        let banner_model = banner
            .split("model: ")
            .nth(1)
            .unwrap()
            .trim_end_matches(')')
            .to_string();
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["answer"], "which server");
        models.insert(banner_model);
        models.insert(v["model"].as_str().unwrap().to_string());
    }
    assert_eq!(
        models.into_iter().collect::<Vec<_>>(),
        vec!["echo-a".to_string(), "echo-b".to_string()],
        "both servers behind the name must have answered calls"
    );
    stop_a.cancel();
    stop_b.cancel();
}

// ---------------------------------------------------------------------------------------------
// Forwarded credentials

#[tokio::test(flavor = "multi_thread")]
async fn llm_key_reaches_the_upstream_and_never_the_output() {
    let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "fake", &openai_toml(&fake), "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let secret = "sk-client-secret-4242";
    let run = client(
        home.path(),
        &[
            &addr_of(&server),
            "-vv",
            "--llm-key",
            secret,
            "-p",
            "with my key",
        ],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "hello from the fake\n");
    assert!(
        run.stderr.contains(", using your own API key)"),
        "{}",
        run.stderr
    );
    let reqs = chat_requests(&fake);
    assert_eq!(
        reqs.last().unwrap().header("authorization").as_deref(),
        Some(&*format!("Bearer {secret}"))
    );
    assert!(!run.stdout.contains(secret) && !run.stderr.contains(secret));

    // The same through CHATCLI_CLIENT_API_KEY.
    let run = client(
        home.path(),
        &[&addr_of(&server), "-v", "-p", "env key"],
        &[("CHATCLI_CLIENT_API_KEY", "sk-from-env-77")],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(
        chat_requests(&fake)
            .last()
            .unwrap()
            .header("authorization")
            .as_deref(),
        Some("Bearer sk-from-env-77")
    );
    assert!(!run.stderr.contains("sk-from-env-77"));
}

#[tokio::test(flavor = "multi_thread")]
async fn stackspot_flags_arrive_as_provider_config() {
    let fake = FakeUpstream::start(StackSpotFormat::new()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let provider = format!(
        "name = \"stackspot\"\nkind = \"stackspot\"\nbase_url = \"{0}\"\n\
         token_url = \"{0}/zup/oidc/oauth/token\"\nclient_id = \"server-id\"\n\
         client_key = \"server-secret\"\nagent_id = \"AGENT1\"",
        fake.base_url()
    );
    let config = config_with(dir.path(), "stackspot", &provider, "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let run = client(
        home.path(),
        &[
            &addr_of(&server),
            "-v",
            "--provider",
            "stackspot",
            "--client-id",
            "my-client",
            "--client-key",
            "ck-very-secret",
            "--realm",
            "zup",
            "--agent-id",
            "agent-7",
            "-p",
            "hi stackspot",
        ],
        &[],
        None,
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout, "hello from the fake\n");
    let reqs = fake.requests();
    let token = reqs
        .iter()
        .find(|r| r.path.ends_with("/oidc/oauth/token"))
        .expect("no token request");
    let body = String::from_utf8_lossy(&token.body);
    assert!(
        body.contains("client_id=my-client") && body.contains("client_secret=ck-very-secret"),
        "{body}"
    );
    assert!(
        reqs.iter().any(|r| r.path == "/v1/agent/agent-7/chat"),
        "{:?}",
        reqs.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    assert!(!run.stdout.contains("ck-very-secret") && !run.stderr.contains("ck-very-secret"));
}

const STORE_KEY: [u8; 32] = [0x5a; 32];

/// Writes an encrypted store with the given profiles into `dir`.
fn write_store(dir: &Path, profiles: Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(".auth-key"), STORE_KEY).unwrap();
    let doc = serde_json::json!({"version": 1, "profiles": profiles});
    let sealed = chatcli::client::credentials::encrypt(
        &STORE_KEY,
        serde_json::to_string_pretty(&doc).unwrap().as_bytes(),
    )
    .unwrap();
    std::fs::write(
        dir.join("auth-profiles.json"),
        format!("chatcli-enc:v1:{sealed}"),
    )
    .unwrap();
}

fn read_store(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("auth-profiles.json")).unwrap();
    let b64 = text
        .strip_prefix("chatcli-enc:v1:")
        .expect("the store is no longer encrypted");
    serde_json::from_slice(&chatcli::client::credentials::decrypt(&STORE_KEY, b64).unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn use_local_auth_refreshes_an_expired_token_and_forwards_it() {
    let upstream = FakeUpstream::start(AnthropicFormat).await.unwrap();
    let idp = FakeUpstream::start(OpenAiFormat).await.unwrap();
    idp.set_default(Reply::Raw {
        content_type: "application/json".into(),
        body: r#"{"access_token":"at-fresh-123","refresh_token":"rt-new","expires_in":7200}"#
            .into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let provider = format!(
        "name = \"CLAUDEAI\"\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key = \"sk-ant-server\"\n\
         model = \"claude-test\"",
        upstream.base_url()
    );
    let config = config_with(dir.path(), "CLAUDEAI", &provider, "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let auth_dir = home.path().join("auth");
    write_store(
        &auth_dir,
        serde_json::json!({
            "anthropic:default": {"type": "oauth", "provider": "anthropic",
                "access": "at-expired", "refresh": "rt-old", "expires": 1000},
            "openai:default": {"type": "api_key", "provider": "openai", "key": "sk-openai-store"},
        }),
    );
    let run = client(
        home.path(),
        &[
            &addr_of(&server),
            "--use-local-auth",
            "-v",
            "-p",
            "local auth",
        ],
        &[
            ("CHATCLI_AUTH_DIR", auth_dir.to_str().unwrap()),
            (
                "CHATCLI_DEBUG_OAUTH_TOKEN_URL",
                &format!("{}/v1/oauth/token", idp.base_url()),
            ),
        ],
        None,
    )
    .await;
    run.assert_code(0);
    assert!(
        run.stderr.contains("provider: CLAUDEAI")
            && run.stderr.contains(", using local OAuth credentials)"),
        "{}",
        run.stderr
    );
    // The refresh went to the (fake) token endpoint with the refresh token.
    let refresh = idp.requests();
    assert_eq!(refresh.len(), 1);
    let body = refresh[0].json();
    assert_eq!(body["grant_type"], "refresh_token");
    assert_eq!(body["refresh_token"], "rt-old");
    assert_eq!(body["client_id"], "9d1c250a-e61b-44d9-88ed-5944d1962f5e");
    // The fresh token was forwarded with the oauth: prefix (the server sends it as Bearer).
    let calls: Vec<_> = upstream
        .requests()
        .into_iter()
        .filter(|r| r.header("authorization").as_deref() == Some("Bearer at-fresh-123"))
        .collect();
    assert!(
        !calls.is_empty(),
        "the upstream never saw the refreshed token"
    );
    // The store was rewritten, still encrypted with the same key, which was left alone.
    let store = read_store(&auth_dir);
    let p = &store["profiles"]["anthropic:default"];
    assert_eq!(p["access"], "at-fresh-123");
    assert_eq!(p["refresh"], "rt-new");
    assert!(p["expires"].as_i64().unwrap() > 1000);
    assert_eq!(
        std::fs::read(auth_dir.join(".auth-key")).unwrap(),
        STORE_KEY
    );
    for secret in ["at-fresh-123", "rt-new", "rt-old", "at-expired"] {
        assert!(!run.stderr.contains(secret) && !run.stdout.contains(secret));
    }
}

#[tokio::test]
async fn use_local_auth_without_the_key_file_stops_and_creates_none() {
    let home = tempfile::tempdir().unwrap();
    let auth_dir = home.path().join("auth");
    write_store(
        &auth_dir,
        serde_json::json!({"openai:default": {"type": "api_key", "provider": "openai", "key": "k"}}),
    );
    std::fs::remove_file(auth_dir.join(".auth-key")).unwrap();
    let before = std::fs::read(auth_dir.join("auth-profiles.json")).unwrap();
    let run = client(
        home.path(),
        &["127.0.0.1:1", "--use-local-auth", "-p", "hi"],
        &[("CHATCLI_AUTH_DIR", auth_dir.to_str().unwrap())],
        None,
    )
    .await;
    run.assert_code(4).assert_one_error_line("key file");
    assert!(!auth_dir.join(".auth-key").exists());
    assert_eq!(
        std::fs::read(auth_dir.join("auth-profiles.json")).unwrap(),
        before
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[tokio::test]
async fn bad_input_gets_one_line_and_its_exit_code() {
    let home = tempfile::tempdir().unwrap();
    // Malformed addresses.
    for bad in ["local host:1", "localhost", "localhost:99999", "ftp://x:1"] {
        let run = client(home.path(), &[bad, "-p", "hi"], &[], None).await;
        run.assert_code(64)
            .assert_one_error_line("malformed server address");
    }
    // A missing CA file.
    let run = client(
        home.path(),
        &[
            "127.0.0.1:1",
            "--tls",
            "--ca-cert",
            "/nonexistent/ca.pem",
            "-p",
            "hi",
        ],
        &[],
        None,
    )
    .await;
    run.assert_code(64)
        .assert_one_error_line("/nonexistent/ca.pem");
    // Unknown flags and bad values are usage errors (clap's own message).
    let run = client(home.path(), &["127.0.0.1:1", "--bogus"], &[], None).await;
    run.assert_code(64);
    let run = client(
        home.path(),
        &["127.0.0.1:1", "--timeout", "soon", "-p", "x"],
        &[],
        None,
    )
    .await;
    run.assert_code(64).assert_one_error_line("--timeout");
    // No address at all.
    let run = client(home.path(), &["-p", "x"], &[], None).await;
    run.assert_code(64)
        .assert_one_error_line("no server address");
    // --help has the examples and exits 0.
    let run = client(home.path(), &["--help"], &[], None).await;
    run.assert_code(0);
    assert!(run.stdout.contains("Examples:") && run.stdout.contains("Exit codes:"));
}

#[tokio::test]
async fn a_prompt_over_the_server_limit_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        "echo",
        &echo_toml("0ms"),
        "[limits]\nmax_prompt_bytes = 16\n",
    );
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let long = "x".repeat(100);
    let run = client(home.path(), &[&addr_of(&server), "-p", &long], &[], None).await;
    run.assert_code(64).assert_one_error_line("limit");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_is_not_chatcli_exits_3() {
    // An HTTP server that answers every request with a JSON body (also over HTTP/2).
    let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let run = client(
        home.path(),
        &[&fake.addr().to_string(), "-p", "hi"],
        &[],
        None,
    )
    .await;
    run.assert_code(3).assert_one_error_line("ChatCLI server");
    // A TCP port that speaks no HTTP at all.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        while let Ok((mut s, _)) = silent.accept().await {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        }
    });
    let run = client(
        home.path(),
        &[&addr.to_string(), "--timeout", "5s", "-p", "hi"],
        &[],
        None,
    )
    .await;
    run.assert_code(3).assert_one_error_line("ChatCLI server");
}

#[tokio::test]
async fn timeout_bounds_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "echo", &echo_toml("400ms"), "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let run = client(
        home.path(),
        &[
            &addr_of(&server),
            "--timeout",
            "1s",
            "-p",
            "one two three four five six seven eight nine ten",
        ],
        &[],
        None,
    )
    .await;
    run.assert_code(6).assert_one_error_line("--timeout");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // What arrived before the deadline was printed.
    assert!(run.stdout.starts_with("one"), "{:?}", run.stdout);
}

// ---------------------------------------------------------------------------------------------
// Interactive, through a pseudo-terminal

/// `chatcli connect <args>` in a pseudo-terminal.
fn pty_client(home: &Path, args: &[&str], env: &[(&str, &str)]) -> expectrl::session::OsSession {
    let mut cmd = std::process::Command::new(BIN);
    cmd.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERM", "xterm-256color")
        .envs(env.iter().copied())
        .arg("connect")
        .args(args);
    let mut p = expectrl::Session::spawn(cmd).unwrap();
    p.set_expect_timeout(Some(HANG_GUARD));
    p.get_process_mut().set_window_size(120, 40).unwrap();
    p
}

fn expect(p: &mut expectrl::session::OsSession, needle: &str) -> String {
    match p.expect(needle) {
        Ok(found) => String::from_utf8_lossy(found.before()).into_owned(),
        Err(e) => panic!("never saw {needle:?} on the terminal: {e}"),
    }
}

/// Waits for the client to exit and returns its status text (`Exited(Pid(..), 0)`).
fn wait_exit(p: &mut expectrl::session::OsSession) -> String {
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        // Keep reading so the client never blocks on a full terminal.
        let mut buf = [0u8; 4096];
        let _ = p.try_read(&mut buf);
        let status = format!("{:?}", p.get_process().status().unwrap());
        if !status.contains("StillAlive") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The messages (role, content) of the OpenAI request.
fn messages(r: &Recorded) -> Vec<(String, String)> {
    r.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or("").to_string(),
                m["content"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn interactive_keeps_history_saves_and_loads_sessions_and_shows_status() {
    let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
    fake.push(Reply::text("Nice to meet you Ada"));
    fake.push(Reply::text("Your name is **Ada**"));
    fake.push(Reply::text("model answer"));
    fake.push(Reply::text("Still Ada"));
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "fake", &openai_toml(&fake), "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let addr = addr_of(&server);

    let mut p = pty_client(home.path(), &[&addr], &[]);
    expect(
        &mut p,
        "Connected to ChatCLI server (version: 0.1.0, provider: fake, model: fake-model)",
    );
    expect(&mut p, "chatcli> ");
    p.send_line("my name is Ada").unwrap();
    expect(&mut p, "Nice to meet you Ada");
    expect(&mut p, "chatcli> ");
    p.send_line("what is my name?").unwrap();
    // Rendered as Markdown: the raw text streams first, then the line is redrawn without `**`.
    let shown = expect(&mut p, "chatcli> ");
    assert!(shown.contains("Your name is"), "{shown:?}");
    let raw_at = shown.find("**Ada**").expect("the raw text did not stream");
    let redraw = shown[raw_at..]
        .find("\r\x1b[J")
        .expect("no redraw of the finished line");
    let after_redraw = &shown[raw_at + redraw..];
    assert!(
        after_redraw.contains("Ada") && !after_redraw.contains("**"),
        "{after_redraw:?}"
    );

    // The second turn carried the first one.
    let reqs = chat_requests(&fake);
    assert_eq!(reqs.len(), 2);
    let second = messages(&reqs[1]);
    let want = [
        ("user", "my name is Ada"),
        ("assistant", "Nice to meet you Ada"),
        ("user", "what is my name?"),
    ];
    for (role, content) in want {
        assert!(
            second.iter().any(|(r, c)| r == role && c == content),
            "{role}: {content:?} missing from {second:?}"
        );
    }

    p.send_line("/status").unwrap();
    expect(&mut p, "=== Server Status ===");
    expect(&mut p, "History:  4 messages");
    expect(&mut p, "chatcli> ");
    p.send_line("/session save ada").unwrap();
    expect(&mut p, "session ada saved (4 messages)");
    p.send_line("/watcher status").unwrap();
    expect(&mut p, "K8s Watcher");
    p.send_line("/help").unwrap();
    expect(&mut p, "/session save NAME");
    // /model changes what the next turn asks for.
    p.send_line("/model custom-model").unwrap();
    expect(&mut p, "model set to custom-model");
    p.send_line("which model?").unwrap();
    expect(&mut p, "model answer");
    assert_eq!(
        chat_requests(&fake).last().unwrap().json()["model"],
        "custom-model"
    );
    // /clear forgets the conversation (the saved session keeps it).
    p.send_line("/clear").unwrap();
    expect(&mut p, "conversation cleared");
    p.send_line("/status").unwrap();
    expect(&mut p, "History:  0 messages");
    p.send_line("/nonsense").unwrap();
    expect(&mut p, "unknown command /nonsense");
    p.send_line("/exit").unwrap();
    let status = wait_exit(&mut p);
    assert!(status.contains(", 0)"), "{status}");
    // The editor's history file is in the data dir.
    let history = std::fs::read_to_string(home.path().join(".chatcli/connect_history")).unwrap();
    assert!(history.contains("what is my name?"), "{history}");
    // The session is the v2 format the existing ChatCLI reads.
    let saved: Value = serde_json::from_slice(
        &std::fs::read(server.data_dir.join("sessions/ada.json"))
            .or_else(|_| {
                let files = crate::support::files_under(&server.data_dir);
                let f = files
                    .iter()
                    .find(|f| f.file_name().is_some_and(|n| n == "ada.json"))
                    .expect("no ada.json under the data dir");
                std::fs::read(f)
            })
            .unwrap(),
    )
    .unwrap();
    assert_eq!(saved["version"], 2);
    assert_eq!(saved["chat_history"].as_array().unwrap().len(), 4);

    // A new run loads the session and continues the conversation.
    let mut p = pty_client(home.path(), &[&addr], &[]);
    expect(&mut p, "chatcli> ");
    p.send_line("/session list").unwrap();
    expect(&mut p, "ada");
    p.send_line("/session load ada").unwrap();
    expect(&mut p, "session ada loaded (4 messages)");
    p.send_line("and now?").unwrap();
    expect(&mut p, "Still Ada");
    let reqs = chat_requests(&fake);
    let third = messages(reqs.last().unwrap());
    assert!(
        third
            .iter()
            .any(|(r, c)| r == "user" && c == "my name is Ada"),
        "{third:?}"
    );
    assert!(
        third
            .iter()
            .any(|(r, c)| r == "assistant" && c == "Your name is **Ada**"),
        "{third:?}"
    );
    // Ctrl-D at the prompt leaves (wait for the prompt: the answer may still be rendering).
    expect(&mut p, "chatcli> ");
    p.send(expectrl::ControlCode::EndOfTransmission).unwrap();
    let status = wait_exit(&mut p);
    assert!(status.contains(", 0)"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_cancels_a_stalled_answer_and_the_upstream_sees_it() {
    let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
    fake.push(Reply::steps(vec![
        Step::Text("partial answer".into()),
        Step::AwaitRelease,
        Step::Text(" never shown".into()),
    ]));
    fake.push(Reply::text("second **answer**"));
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "fake", &openai_toml(&fake), "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    // NO_COLOR: plain output, no Markdown styling.
    let mut p = pty_client(home.path(), &[&addr_of(&server)], &[("NO_COLOR", "1")]);
    expect(&mut p, "chatcli> ");
    p.send_line("tell me a long story").unwrap();
    expect(&mut p, "partial answer");
    p.send(expectrl::ControlCode::EndOfText).unwrap();
    expect(&mut p, "(answer cancelled)");
    assert!(
        fake.wait_cancelled(1, HANG_GUARD).await,
        "the upstream call was not aborted"
    );
    // The client is still there, and the cancelled turn is not in the history.
    expect(&mut p, "chatcli> ");
    p.send_line("next **question**").unwrap();
    // NO_COLOR: the Markdown is shown as it is, with no redraw.
    let shown = expect(&mut p, "second **answer**");
    assert!(!shown.contains("\r\x1b[J"), "{shown:?}");
    expect(&mut p, "chatcli> ");
    let reqs = chat_requests(&fake);
    let last = messages(reqs.last().unwrap());
    assert!(
        !last.iter().any(|(_, c)| c.contains("long story")),
        "{last:?}"
    );
    fake.release();
    // Ctrl-C at the prompt asks first, the second one leaves.
    p.send(expectrl::ControlCode::EndOfText).unwrap();
    expect(&mut p, "Ctrl-C again");
    p.send(expectrl::ControlCode::EndOfText).unwrap();
    let status = wait_exit(&mut p);
    assert!(status.contains(", 0)"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn interactive_errors_say_what_the_server_answered() {
    let server = BinaryServer::start(&demo_config(), &[]);
    let home = tempfile::tempdir().unwrap();
    let mut p = pty_client(home.path(), &[&addr_of(&server)], &[("NO_COLOR", "1")]);
    expect(&mut p, "chatcli> ");
    p.send_line("/session load nosuch").unwrap();
    let shown = expect(&mut p, "chatcli> ");
    let error = shown
        .lines()
        .find(|l| l.contains("error: "))
        .unwrap_or_else(|| panic!("no error line: {shown:?}"));
    assert!(
        error.contains("not found on") && error.contains("session 'nosuch' not found"),
        "{error:?}"
    );
    assert!(!error.contains("provider"), "{error:?}");
    // /provider only takes what the server offers.
    p.send_line("/provider NOPE").unwrap();
    let shown = expect(&mut p, "chatcli> ");
    assert!(
        shown.contains("/provider NOPE is not offered by")
            && shown.contains("it offers: echo, echo-slow"),
        "{shown:?}"
    );
    p.send_line("/provider").unwrap();
    expect(&mut p, "provider: server default");
    p.send_line("/provider Echo-Slow").unwrap();
    expect(&mut p, "provider set to echo-slow");
    p.send_line("/exit").unwrap();
    let status = wait_exit(&mut p);
    assert!(status.contains(", 0)"), "{status}");
}

/// Twenty answers from a slow echo provider, each cancelled with Ctrl-C once it streams (every
/// fourth one with Ctrl-C pressed twice, 50 ms apart, as people do to be sure): every cancel
/// prints `(answer cancelled)` exactly once, the answer stops, and the prompt is drawn again after
/// the notice (never before it, and no second notice or leave hint follows it); the client stays.
#[tokio::test(flavor = "multi_thread")]
async fn every_ctrl_c_prints_one_cancel_notice_then_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "echo", &echo_toml("150ms"), "");
    let server = BinaryServer::start(&config, &[]);
    let home = tempfile::tempdir().unwrap();
    let mut p = pty_client(home.path(), &[&addr_of(&server)], &[]);
    expect(&mut p, "chatcli> ");
    const NOTICE: &str = "(answer cancelled)";
    for round in 0..20 {
        let line = format!("round{round} alpha beta gamma delta epsilon zeta eta theta");
        p.send_line(&line).unwrap();
        // The line editor echoes the line; the answer (the same words) streams after it.
        let echoed = expect(&mut p, &line);
        assert!(
            !echoed.contains(NOTICE),
            "round {round}: a cancel notice after the previous prompt: {echoed:?}"
        );
        expect(&mut p, &format!("round{round} alpha"));
        p.send(expectrl::ControlCode::EndOfText).unwrap();
        if round % 4 == 3 {
            std::thread::sleep(Duration::from_millis(50));
            p.send(expectrl::ControlCode::EndOfText).unwrap();
        }
        let answered = expect(&mut p, NOTICE);
        assert!(
            !answered.contains("theta"),
            "round {round}: the answer was not cut short: {answered:?}"
        );
        assert!(
            !answered.contains("chatcli> "),
            "round {round}: the prompt came before the cancel notice: {answered:?}"
        );
        let between = expect(&mut p, "chatcli> ");
        assert!(
            !between.contains(NOTICE),
            "round {round}: the cancel notice came twice: {between:?}"
        );
        assert!(
            !between.contains("Ctrl-C again"),
            "round {round}: the second Ctrl-C reached the prompt: {between:?}"
        );
    }
    // Nothing more arrives after the last prompt: no late notice, and the client still answers.
    p.send_line("/help").unwrap();
    let rest = expect(&mut p, "/session save NAME");
    assert!(!rest.contains(NOTICE), "a late cancel notice: {rest:?}");
    p.send_line("/exit").unwrap();
    let status = wait_exit(&mut p);
    assert!(status.contains(", 0)"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn interactive_reconnects_when_the_server_restarts() {
    let fake = FakeUpstream::start(OpenAiFormat).await.unwrap();
    fake.push(Reply::text("before the restart"));
    fake.push(Reply::text("after the restart"));
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = || {
        let mut c = Config::default();
        c.llm.providers = vec![crate::support::openai_provider("fake", &fake, "fake-model")];
        c.state.data_dir = dir.path().join("data");
        c.server.shutdown_grace = Duration::from_secs(1);
        c
    };
    let stop = CancellationToken::new();
    let first = tokio::spawn(chatcli::server::run(
        Listeners {
            main: listener,
            metrics: None,
        },
        config(),
        stop.clone(),
    ));
    let home = tempfile::tempdir().unwrap();
    let mut p = pty_client(home.path(), &[&addr.to_string()], &[("NO_COLOR", "1")]);
    expect(&mut p, "chatcli> ");
    p.send_line("first turn").unwrap();
    expect(&mut p, "before the restart");
    expect(&mut p, "chatcli> ");

    stop.cancel();
    let _ = tokio::time::timeout(HANG_GUARD, first).await.unwrap();
    // The same address comes back a moment later (a restart).
    let restart = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(chatcli::server::run(
            Listeners {
                main: listener,
                metrics: None,
            },
            config(),
            stop.clone(),
        ));
        stop
    };
    p.send_line("second turn").unwrap();
    let stop2 = restart.await;
    let shown = expect(&mut p, "after the restart");
    assert!(shown.contains("reconnecting"), "{shown:?}");
    let reqs = chat_requests(&fake);
    let last = messages(reqs.last().unwrap());
    assert!(
        last.iter()
            .any(|(r, c)| r == "assistant" && c == "before the restart"),
        "the history was lost: {last:?}"
    );
    p.send_line("/exit").unwrap();
    wait_exit(&mut p);
    stop2.cancel();
}
