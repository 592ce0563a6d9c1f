//! The real `chatcli` binary: startup and the listening line, exit codes, `config show` origins and
//! redaction, and the SIGTERM drain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::health_response;
use chatcli::proto::{HealthRequest, SaveSessionRequest};
use predicates::prelude::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    BearerToken, BinaryServer, HANG_GUARD, TestCa, chatcli_command, collect_stream, connect,
    demo_config, list_services, sha256_hex, stream_request,
};

/// `chatcli` with a controlled environment, as an assert_cmd command bounded by [`HANG_GUARD`].
fn cli(home: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::from_std(chatcli_command(home));
    cmd.timeout(HANG_GUARD);
    cmd
}

/// Writes a config with one echo provider pausing `delay` between words.
fn slow_echo_config(dir: &Path, delay: &str) -> PathBuf {
    let path = dir.join("chatcli.toml");
    std::fs::write(
        &path,
        format!(
            "[llm]\ndefault = \"echo\"\n\n[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n\
             model = \"echo-1\"\ndelay = \"{delay}\"\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn binary_serves_the_demo_config() {
    let server = BinaryServer::start(&demo_config(), &[]);
    assert_ne!(server.addr.port(), 0);
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    let channel = connect(server.addr).await;
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    let mut client = ChatCliServiceClient::new(channel);
    let h = client.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.status(), health_response::Status::Serving);
    let mut stream = client
        .stream_prompt(stream_request("hello from the demo"))
        .await
        .unwrap()
        .into_inner();
    let msgs = collect_stream(&mut stream).await;
    let text: String = msgs.iter().map(|m| m.chunk.as_str()).collect();
    assert_eq!(text, "hello from the demo");
    assert!(msgs.last().unwrap().done);
    assert!(msgs.len() >= 4, "{msgs:?}");
    assert!(server.stderr().contains("metrics off"));

    // CHATCLI_DATA_DIR wins over the demo file's data_dir.
    let saved = client
        .save_session(SaveSessionRequest {
            name: "demo".into(),
            ..SaveSessionRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(saved.success);
    assert!(server.data_dir.join("sessions/demo.json").is_file());
}

#[test]
fn version_flag_prints_the_version() {
    let home = tempfile::tempdir().unwrap();
    cli(home.path())
        .arg("--version")
        .assert()
        .code(0)
        .stdout(predicate::str::contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn config_check_lists_every_problem() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("bad.toml");
    std::fs::write(
        &config,
        "[server]\nbogus_key = 1\nport = \"not a number\"\n\n\
         [[llm.providers]]\nname = \"x\"\nkind = \"nope\"\n",
    )
    .unwrap();
    cli(home.path())
        .args(["config", "check", "--config"])
        .arg(&config)
        .assert()
        .code(78)
        .stderr(
            predicate::str::contains("server.bogus_key")
                .and(predicate::str::contains("server.port"))
                .and(predicate::str::contains("llm.providers.0.kind"))
                .and(predicate::str::contains("3 problem")),
        );
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let home = tempfile::tempdir().unwrap();
    cli(home.path())
        .args(["server", "--bogus-flag"])
        .assert()
        .code(64)
        .stderr(predicate::str::contains("--bogus-flag"));
}

#[test]
fn missing_config_file_is_a_config_error() {
    let home = tempfile::tempdir().unwrap();
    let missing = home.path().join("does-not-exist.toml");
    cli(home.path())
        .args(["server", "--port", "0", "--metrics-port", "0", "--config"])
        .arg(&missing)
        .assert()
        .code(78)
        .stderr(predicate::str::contains("does-not-exist.toml"));
}

#[test]
fn busy_port_is_unavailable() {
    let home = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    cli(home.path())
        .env("CHATCLI_DATA_DIR", home.path().join("data"))
        .arg("server")
        .arg("--config")
        .arg(demo_config())
        .args(["--port", &addr.port().to_string(), "--metrics-port", "0"])
        .assert()
        .code(69)
        .stderr(predicate::str::contains(addr.to_string()));
    drop(taken);
}

#[test]
fn config_show_names_origins_and_redacts_secrets() {
    let home = tempfile::tempdir().unwrap();
    let out = cli(home.path())
        .env("CHATCLI_SERVER_PORT", "6000")
        .env("CHATCLI_SERVER_TOKEN", "topsecret")
        .args(["config", "show", "--metrics-port", "7000", "--config"])
        .arg(demo_config())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "port = 6000  # env CHATCLI_SERVER_PORT",
        "port = 7000  # flag --metrics-port",
        "token = \"[redacted]\"  # env CHATCLI_SERVER_TOKEN",
    ] {
        assert!(lines.contains(&want), "{want:?} missing from:\n{stdout}");
    }
    assert!(!stdout.contains("topsecret"), "{stdout}");
    assert!(!stderr.contains("topsecret"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_a_streaming_call() {
    let dir = tempfile::tempdir().unwrap();
    let config = slow_echo_config(dir.path(), "200ms");
    let mut server = BinaryServer::start(&config, &["--shutdown-grace", "20s"]);
    let prompt = "one two three four five six seven eight nine ten";
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    let mut stream = client
        .stream_prompt(stream_request(prompt))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .unwrap()
        .unwrap()
        .expect("no first chunk");
    assert_eq!(first.chunk, "one");

    server.terminate();
    let second = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .unwrap()
        .expect("stream failed after SIGTERM")
        .expect("stream ended after SIGTERM");
    // The listener is closed before the drain is logged.
    server.wait_for_log("draining").await;
    let refused = std::net::TcpStream::connect_timeout(&server.addr, Duration::from_secs(5));
    assert!(
        refused.is_err(),
        "a new connection was accepted while draining"
    );

    let rest = collect_stream(&mut stream).await;
    let all: Vec<_> = [first, second].into_iter().chain(rest).collect();
    let text: String = all.iter().map(|m| m.chunk.as_str()).collect();
    assert_eq!(text, prompt, "the drained stream lost words");
    assert!(
        all.last().unwrap().done,
        "the drained stream did not finish"
    );
    drop(stream);
    drop(client);

    let status = server
        .wait_exit(HANG_GUARD)
        .await
        .unwrap_or_else(|| panic!("still running; stderr:\n{}", server.stderr()));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
}

/// Idle keep-alive connections (HTTP/1 and an HTTP/2 gRPC channel) are closed as soon as the drain
/// starts, so the daemon exits at once instead of waiting out the grace period for them.
#[tokio::test]
async fn sigterm_closes_idle_connections_at_once() {
    use std::io::{Read as _, Write as _};
    let dir = tempfile::tempdir().unwrap();
    let config = slow_echo_config(dir.path(), "0ms");
    let mut server = BinaryServer::start(&config, &["--shutdown-grace", "60s"]);
    // An HTTP/1.1 connection that has been answered once and stays open.
    let mut h1 = std::net::TcpStream::connect(server.addr).unwrap();
    h1.set_read_timeout(Some(HANG_GUARD)).unwrap();
    h1.write_all(b"GET /health HTTP/1.1\r\nhost: chatcli\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    h1.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // A gRPC channel that has made a call and stays open.
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    client.health(HealthRequest {}).await.unwrap();

    let sent = std::time::Instant::now();
    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!(
                "still running 20s after SIGTERM with idle connections open (grace 60s); stderr:\n{}",
                server.stderr()
            )
        });
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
    assert!(
        !server.stderr().contains("grace period over"),
        "the idle connections were only closed by the grace period ({:?}); stderr:\n{}",
        sent.elapsed(),
        server.stderr()
    );
    // The HTTP/1 connection was closed by the server: the rest of the answer, then EOF.
    let mut rest = Vec::new();
    h1.read_to_end(&mut rest).unwrap();
    drop(client);
}

#[tokio::test]
async fn sigterm_exits_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let config = slow_echo_config(dir.path(), "5s");
    let mut server = BinaryServer::start(&config, &["--shutdown-grace", "1s"]);
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    let mut stream = client
        .stream_prompt(stream_request("this answer takes fifty seconds to stream"))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .unwrap()
        .unwrap()
        .expect("no first chunk");
    assert!(!first.done);

    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| {
            panic!(
                "not exited 15s after SIGTERM with a 1s grace; stderr:\n{}",
                server.stderr()
            )
        });
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
    assert!(server.stderr().contains("grace period over"));
    // The unfinished call was cut, not completed.
    let next = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .unwrap();
    assert!(
        !matches!(next, Ok(Some(ref m)) if m.done),
        "the stream claims completion: {next:?}"
    );
}

#[tokio::test]
async fn second_sigterm_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = slow_echo_config(dir.path(), "5s");
    let mut server = BinaryServer::start(&config, &["--shutdown-grace", "60s"]);
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    let mut stream = client
        .stream_prompt(stream_request("a slow answer that would outlast the test"))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .unwrap()
        .unwrap()
        .expect("no first chunk");
    server.terminate();
    server.wait_for_log("draining").await;
    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| {
            panic!(
                "a second SIGTERM did not end a 60s drain; stderr:\n{}",
                server.stderr()
            )
        });
    assert_eq!(status.code(), Some(70), "stderr:\n{}", server.stderr());
}

#[tokio::test]
async fn token_and_reflection_switch_come_from_the_environment() {
    let server = BinaryServer::start_with_env(
        &demo_config(),
        &["--enable-reflection"],
        &[
            ("CHATCLI_SERVER_TOKEN", "topsecret"),
            ("CHATCLI_GRPC_REFLECTION", "true"),
        ],
    );
    let channel = connect(server.addr).await;
    let err = ChatCliServiceClient::new(channel.clone())
        .send_prompt(chatcli::proto::SendPromptRequest {
            prompt: "hello".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let mut authed = ChatCliServiceClient::with_interceptor(
        channel.clone(),
        BearerToken(Some("topsecret".into())),
    );
    let r = authed
        .send_prompt(chatcli::proto::SendPromptRequest {
            prompt: "hello".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "hello");

    let err = list_services(channel.clone(), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let services = list_services(channel, Some("topsecret")).await.unwrap();
    assert!(
        services.iter().any(|s| s == "chatcli.v1.ChatCLIService"),
        "{services:?}"
    );
    assert!(
        !server.stderr().contains("topsecret"),
        "the token leaked into the log:\n{}",
        server.stderr()
    );
}

/// Runs `chatcli server` on `config` with the main port held by another socket: a daemon that
/// bound its ports before opening its output files would fail with 69 (port in use) instead.
fn serve_on_a_taken_port(home: &Path, config: &Path) -> assert_cmd::assert::Assert {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let assert = cli(home)
        .env("CHATCLI_DATA_DIR", home.join("data"))
        .args(["server", "--port", &port, "--metrics-port", "0", "--config"])
        .arg(config)
        .assert();
    drop(taken);
    assert
}

/// `<home>/chatcli.toml` with one echo provider and `extra` appended, beside a regular file
/// `not-a-dir` to put paths under.
fn config_with(home: &Path, extra: &str) -> PathBuf {
    std::fs::write(home.join("not-a-dir"), "a regular file").unwrap();
    let config = home.join("chatcli.toml");
    std::fs::write(
        &config,
        format!("[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n\n{extra}"),
    )
    .unwrap();
    config
}

#[test]
fn unwritable_log_file_exits_73_before_binding() {
    let home = tempfile::tempdir().unwrap();
    let log = home.path().join("not-a-dir/chatcli.log");
    let config = config_with(home.path(), &format!("[log]\nfile = {:?}\n", log));
    serve_on_a_taken_port(home.path(), &config).code(73).stderr(
        predicate::str::contains(log.display().to_string())
            .and(predicate::str::contains("not a directory"))
            .and(predicate::str::contains("listening on").not())
            .and(predicate::str::contains("cannot listen").not()),
    );
}

#[test]
fn unwritable_audit_path_exits_73_before_binding() {
    let home = tempfile::tempdir().unwrap();
    let audit = home.path().join("not-a-dir/audit.log");
    let config = config_with(home.path(), &format!("[audit]\npath = {:?}\n", audit));
    let out = serve_on_a_taken_port(home.path(), &config).code(73);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("cannot open the audit log"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "audit.path: {}: a parent is not a directory",
            audit.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    assert!(!stderr.contains("cannot listen"), "{stderr}");
}

/// Under socket activation the listener is the socket systemd passes, whatever
/// `server.bind_address` says: a non-loopback one needs authentication, as a bound one does.
#[tokio::test]
async fn an_inherited_non_loopback_socket_needs_authentication() {
    use std::os::fd::AsRawFd;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 0)).into())
        .unwrap();
    socket.listen(16).unwrap();
    // Handed to the child as fd `fd` (listenfd reads LISTEN_FDS_FIRST_FD; no LISTEN_PID needed).
    socket.set_cloexec(false).unwrap();
    let fd = socket.as_raw_fd().to_string();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    let home = tempfile::tempdir().unwrap();
    // The config's own address is loopback: only the passed socket is not.
    let config = slow_echo_config(home.path(), "0ms");
    let activation = [("LISTEN_FDS", "1"), ("LISTEN_FDS_FIRST_FD", fd.as_str())];

    let out = cli(home.path())
        .env("CHATCLI_DATA_DIR", home.path().join("data"))
        .envs(activation)
        .args(["server", "--metrics-port", "0", "--config"])
        .arg(&config)
        .assert()
        .code(78);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains("using the listening socket passed by systemd"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("listens on 0.0.0.0:{port}"))
            && stderr.contains("not a loopback address")
            && stderr.contains("server.bind_address is 127.0.0.1"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");

    // With a token, the same socket serves.
    let mut env = activation.to_vec();
    env.push(("CHATCLI_SERVER_TOKEN", "activation-token-41d7"));
    let server = BinaryServer::start_args(
        &["--metrics-port", "0", "--config", config.to_str().unwrap()],
        &env,
    );
    assert_eq!(
        server.addr,
        std::net::SocketAddr::from(([0, 0, 0, 0], port))
    );
}

#[tokio::test]
async fn the_no_auth_warning_is_printed_exactly_when_no_method_is_configured() {
    const WARNING: &str = "no authentication is configured";
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("auth warning CA");
    let pair = ca.server_cert(&[0x07]);
    let (cert, key, client_ca) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("client-ca.pem"),
    );
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    std::fs::write(&client_ca, &ca.ca_pem).unwrap();
    let tls = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let echo = "[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n";
    // (what, extra config, environment, the method the start-up line names)
    type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("nothing", String::new(), &[], None),
        ("TLS without a client CA", tls.clone(), &[], None),
        (
            "the shared token",
            String::new(),
            &[("CHATCLI_SERVER_TOKEN", "warning-test-token")],
            Some("shared token"),
        ),
        (
            "named tokens",
            format!(
                "[[auth.tokens]]\nname = \"team\"\nsha256 = \"{}\"\n",
                sha256_hex("team-token")
            ),
            &[],
            Some("named tokens"),
        ),
        (
            "a JWT secret",
            "[auth.jwt]\nsecret = \"warning-test-jwt-secret-0123456789abcdef\"\n".into(),
            &[],
            Some("jwt"),
        ),
        (
            "mTLS",
            format!(
                "{tls}client_ca_file = {:?}\n",
                client_ca.display().to_string()
            ),
            &[],
            Some("mtls"),
        ),
    ];
    for (what, extra, env, method) in cases {
        let path = dir.path().join("chatcli.toml");
        std::fs::write(&path, format!("{extra}\n{echo}")).unwrap();
        let server = BinaryServer::start_with_env(&path, &[], env);
        let log = server.stderr();
        assert_eq!(
            log.contains(WARNING),
            method.is_none(),
            "{what}: the warning must be printed exactly without any method; stderr:\n{log}"
        );
        if let Some(m) = method {
            assert!(
                log.contains(&format!("authentication: {m}")),
                "{what}: the start-up line names {m}; stderr:\n{log}"
            );
        }
    }
}
