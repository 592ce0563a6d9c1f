//! TLS on the main listener, in-process with certificates made by rcgen: mTLS (no certificate, one
//! from another CA, a good one whose SAN becomes the principal, roles from `auth.mtls.roles`), the
//! minimum TLS version, and rotation by the file watcher (new connections get the new serial, an
//! open stream carries on, a mismatched key is refused while the old pair keeps serving).

use std::path::PathBuf;
use std::sync::Arc;

use chatcli::auth::Role;
use chatcli::config::{Config, TlsConfig};
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{
    ChatMessage, HealthRequest, ListSessionsRequest, SaveSessionRequest, SendPromptRequest,
    StreamPromptRequest,
};
use chatcli::testing::{Reply, Step};
use tonic::Code;

use crate::support::{
    BearerToken, BinaryServer, CertPair, HANG_GUARD, TestCa, TestServer, echo_config, eventually,
    files_under, https_client, metric_value, openai_fake, openai_provider, principal_sessions_dir,
    served_serial, tls_channel, write_atomically,
};

const ALICE: &str = "spiffe://test/alice";
const BOB: &str = "spiffe://test/bob";

/// The server's certificate, key and client CA, written in their own directory.
struct TlsFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl TlsFiles {
    fn write(pair: &CertPair, client_ca_pem: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = Self {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: dir.path().join("ca.crt"),
            _dir: dir,
        };
        std::fs::write(&files.cert, &pair.cert_pem).unwrap();
        std::fs::write(&files.key, &pair.key_pem).unwrap();
        std::fs::write(&files.client_ca, client_ca_pem).unwrap();
        files
    }

    fn config(&self, mtls: bool) -> TlsConfig {
        TlsConfig {
            cert_file: Some(self.cert.clone()),
            key_file: Some(self.key.clone()),
            client_ca_file: mtls.then(|| self.client_ca.clone()),
            ..TlsConfig::default()
        }
    }
}

fn send(prompt: &str) -> SendPromptRequest {
    SendPromptRequest {
        prompt: prompt.into(),
        ..SendPromptRequest::default()
    }
}

fn save(name: &str) -> SaveSessionRequest {
    SaveSessionRequest {
        name: name.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hello".into(),
            meta: None,
        }],
        session_data: None,
    }
}

/// One SendPrompt over a new TLS connection presenting `identity`; the error says where it failed.
async fn prompt_over_tls(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&CertPair>,
) -> Result<String, String> {
    let channel = tls_channel(addr, ca_pem, identity)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let r = ChatCliServiceClient::new(channel)
        .send_prompt(send("over tls"))
        .await
        .map_err(|e| format!("call: {e:?}"))?;
    Ok(r.into_inner().response)
}

#[tokio::test]
async fn mtls_principal_comes_from_the_certificate_san() {
    let ca = TestCa::new("e2e CA");
    let files = TlsFiles::write(&ca.server_cert(&[0x10, 0x01]), &ca.ca_pem);
    let alice = ca.client_cert(ALICE, "alice-common-name");
    let bob = ca.client_cert(BOB, "bob-common-name");
    let mut config = echo_config();
    config.server.tls = files.config(true);
    // Roles are keyed by the URI SAN; the CN plays no part.
    config.auth.mtls.roles = [(BOB.to_string(), Role::ReadOnly)].into_iter().collect();
    config
        .auth
        .mtls
        .roles
        .insert("alice-common-name".into(), Role::ReadOnly);
    config.auth.mtls.default_role = Role::User;
    let mut s = TestServer::start_tls(config, &ca.ca_pem, Some(&alice)).await;

    let r = s
        .client
        .send_prompt(send("hi alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "hi alice");
    s.client.save_session(save("alice-notes")).await.unwrap();
    let dir = principal_sessions_dir(&s.data_dir, &format!("mtls:{ALICE}"));
    assert!(
        dir.join("alice-notes.json").is_file(),
        "{:?}",
        files_under(&s.data_dir)
    );
    assert!(!s.data_dir.join("sessions/alice-notes.json").exists());

    let bob_channel = tls_channel(s.addr, &ca.ca_pem, Some(&bob)).await.unwrap();
    let mut bob_client = ChatCliServiceClient::new(bob_channel.clone());
    let err = bob_client.save_session(save("bobs")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let sessions = bob_client
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert!(sessions.is_empty(), "bob sees {sessions:?}");
    let r = bob_client
        .send_prompt(send("hi bob"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "hi bob");

    // A bearer credential on top of a good certificate must itself be valid.
    let mut with_bad_token = ChatCliServiceClient::with_interceptor(
        s.channel.clone(),
        BearerToken(Some("not-a-token".into())),
    );
    let err = with_bad_token.send_prompt(send("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // HTTP shares the port, and the principal is the same.
    let status: serde_json::Value = https_client(&ca.ca_pem, Some(&alice))
        .get(format!("https://localhost:{}/status", s.addr.port()))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["caller"],
        serde_json::json!({"id": ALICE, "role": "user", "method": "mtls"}),
        "{status}"
    );
    let resp = https_client(&ca.ca_pem, Some(&alice))
        .get(format!("https://localhost:{}/health", s.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(bob_client);
    drop(bob_channel);
    s.shutdown().await;
}

#[tokio::test]
async fn mtls_refuses_missing_and_foreign_certificates() {
    let ca = TestCa::new("e2e CA");
    let other_ca = TestCa::new("someone else's CA");
    let files = TlsFiles::write(&ca.server_cert(&[0x10, 0x02]), &ca.ca_pem);
    let good = ca.client_cert(ALICE, "alice");
    // Same identity, wrong issuer.
    let foreign = other_ca.client_cert(ALICE, "alice");
    let mut config = echo_config();
    config.server.tls = files.config(true);
    let s = TestServer::start_tls(config, &ca.ca_pem, Some(&good)).await;

    for (what, identity) in [
        ("no client certificate", None),
        ("another CA", Some(&foreign)),
    ] {
        let result = prompt_over_tls(s.addr, &ca.ca_pem, identity).await;
        assert!(result.is_err(), "{what}: {result:?}");
        let resp = https_client(&ca.ca_pem, identity)
            .get(format!("https://localhost:{}/health", s.addr.port()))
            .send()
            .await;
        assert!(resp.is_err(), "{what}: HTTP got {resp:?}");
    }
    // Health too is behind the handshake.
    let health = async {
        let channel = tls_channel(s.addr, &ca.ca_pem, None).await.ok()?;
        ChatCliServiceClient::new(channel)
            .health(HealthRequest {})
            .await
            .ok()
    };
    assert!(health.await.is_none());
    // Plain text on the TLS port gets nowhere either.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect_timeout(HANG_GUARD)
        .timeout(HANG_GUARD)
        .connect_lazy();
    assert!(
        ChatCliServiceClient::new(plain)
            .health(HealthRequest {})
            .await
            .is_err()
    );

    // The server still serves a client with a good certificate.
    assert_eq!(
        prompt_over_tls(s.addr, &ca.ca_pem, Some(&good))
            .await
            .unwrap(),
        "over tls"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn tls_1_2_is_refused_unless_configured() {
    let ca = TestCa::new("e2e CA");
    let files = TlsFiles::write(&ca.server_cert(&[0x10, 0x03]), &ca.ca_pem);
    for (min_version, accepted) in [("1.3", false), ("1.2", true)] {
        let mut config = echo_config();
        config.server.tls = TlsConfig {
            min_version: min_version.into(),
            ..files.config(false)
        };
        let s = TestServer::start_tls(config, &ca.ca_pem, None).await;
        let handshake = tls12_handshake(s.addr, &ca.ca_pem).await;
        assert_eq!(
            handshake.is_ok(),
            accepted,
            "min_version {min_version}: {handshake:?}"
        );
        s.shutdown().await;
    }
}

/// A handshake from a client that speaks TLS 1.2 only.
async fn tls12_handshake(addr: std::net::SocketAddr, ca_pem: &str) -> std::io::Result<()> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        HANG_GUARD,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake"))??;
    Ok(())
}

/// `chatcli_tls_reloads_total{result="<result>"}` on the metrics listener of `s`.
async fn reloads(s: &TestServer, result: &str) -> f64 {
    let text = crate::support::http_client()
        .get(s.metrics_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_value(
        &text,
        &format!("chatcli_tls_reloads_total{{result=\"{result}\"}}"),
    )
}

/// Replaces the certificate, then the key, each by an atomic rename.
fn rotate(files: &TlsFiles, pair: &CertPair) {
    write_atomically(&files.cert, &pair.cert_pem);
    write_atomically(&files.key, &pair.key_pem);
}

fn stream_config(fake: &chatcli::testing::FakeUpstream, tls: TlsConfig) -> Config {
    let mut config = Config::default();
    config.llm.providers = vec![openai_provider("up", fake, "gpt-test")];
    config.server.tls = tls;
    config
}

#[tokio::test]
async fn certificate_rotation_reaches_new_connections_only() {
    let ca = TestCa::new("e2e CA");
    let first = ca.server_cert(&[0x21, 0x01]);
    let second = ca.server_cert(&[0x21, 0x02]);
    assert_ne!(first.serial(), second.serial());
    let files = TlsFiles::write(&first, &ca.ca_pem);
    let fake = openai_fake().await;
    // The answer stops half-way until the test releases it, so the stream is open across the swap.
    fake.push(Reply::steps(vec![
        Step::Text("before the swap".into()),
        Step::AwaitRelease,
        Step::Text(", after the swap".into()),
    ]));
    let mut s =
        TestServer::start_tls(stream_config(&fake, files.config(false)), &ca.ca_pem, None).await;
    assert_eq!(
        served_serial(s.addr, &ca.ca_pem).await.unwrap(),
        first.serial()
    );

    let mut stream = s
        .client
        .stream_prompt(StreamPromptRequest {
            prompt: "tell me".into(),
            ..StreamPromptRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let head = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(head.chunk, "before the swap");

    rotate(&files, &second);
    eventually("new connections to get the new serial", || async {
        (served_serial(s.addr, &ca.ca_pem).await.ok()? == second.serial()).then_some(())
    })
    .await;
    assert!(reloads(&s, "ok").await >= 1.0);
    // A new connection works end to end with the new certificate.
    fake.set_default(Reply::text("fresh"));
    assert_eq!(
        prompt_over_tls(s.addr, &ca.ca_pem, None).await.unwrap(),
        "fresh"
    );

    // The stream opened before the swap carries on to its end on its old connection.
    fake.release();
    let mut rest = String::new();
    let mut done = false;
    while let Some(m) = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        rest.push_str(&m.chunk);
        done |= m.done;
    }
    assert_eq!(rest, ", after the swap");
    assert!(done);
    // And the old connection still takes new calls.
    let r = s
        .client
        .send_prompt(send("again"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "fresh");

    // A key that does not match the certificate is refused; the second pair keeps serving.
    let errors_before = reloads(&s, "error").await;
    let stranger = ca.server_cert(&[0x21, 0x03]);
    write_atomically(&files.key, &stranger.key_pem);
    eventually("the mismatched key to be refused", || async {
        (reloads(&s, "error").await > errors_before).then_some(())
    })
    .await;
    assert_eq!(
        served_serial(s.addr, &ca.ca_pem).await.unwrap(),
        second.serial()
    );
    assert_eq!(
        prompt_over_tls(s.addr, &ca.ca_pem, None).await.unwrap(),
        "fresh"
    );

    // Fixing the files is picked up again.
    write_atomically(&files.cert, &stranger.cert_pem);
    eventually("the repaired pair to be served", || async {
        (served_serial(s.addr, &ca.ca_pem).await.ok()? == stranger.serial()).then_some(())
    })
    .await;
    s.shutdown().await;
}

/// A relative `server.tls.cert_file` / `key_file` is looked up in `$CREDENTIALS_DIRECTORY`, the way
/// systemd's `LoadCredential=` hands a key to the service: the binary serves that certificate.
#[tokio::test(flavor = "multi_thread")]
async fn relative_tls_files_come_from_the_credentials_directory() {
    let ca = TestCa::new("credentials test CA");
    let pair = ca.server_cert(&[0x4c, 0x43]);
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("tls_cert"), &pair.cert_pem).unwrap();
    std::fs::write(creds.path().join("tls_key"), &pair.key_pem).unwrap();
    let conf = tempfile::tempdir().unwrap();
    let config = conf.path().join("chatcli.toml");
    std::fs::write(
        &config,
        "[server.tls]\ncert_file = \"tls_cert\"\nkey_file = \"tls_key\"\n\n\
         [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n",
    )
    .unwrap();
    let server = BinaryServer::start_with_env(
        &config,
        &[],
        &[("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())],
    );
    let serial = served_serial(server.addr, &ca.ca_pem).await.unwrap();
    assert_eq!(serial, pair.serial());
}

/// A config file for the real binary serving TLS with the files in `dir` (`tls.crt`, `tls.key`,
/// and `ca.crt` as client CA when `mtls`), one echo provider.
fn tls_config_text(dir: &std::path::Path, mtls: bool) -> String {
    let mut text = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        dir.join("tls.crt"),
        dir.join("tls.key")
    );
    if mtls {
        text.push_str(&format!("client_ca_file = {:?}\n", dir.join("ca.crt")));
    }
    text.push_str("\n[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n");
    text
}

/// Writes `pair` (and `client_ca_pem` when given) into `dir` as `tls.crt`, `tls.key`, `ca.crt`,
/// each by an atomic rename.
fn write_tls_dir(dir: &std::path::Path, pair: &CertPair, client_ca_pem: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    write_atomically(&dir.join("tls.crt"), &pair.cert_pem);
    write_atomically(&dir.join("tls.key"), &pair.key_pem);
    if let Some(ca) = client_ca_pem {
        write_atomically(&dir.join("ca.crt"), ca);
    }
}

/// After a reload moves the certificate and key to another directory, a renewal in the new
/// directory is served, and SIGHUP re-reads the new paths (a renewal left in the old directory is
/// never served again).
#[tokio::test(flavor = "multi_thread")]
async fn tls_paths_changed_by_a_reload_are_followed_by_renewals_and_sighup() {
    let ca = TestCa::new("path change CA");
    let (first, second, renewed, stale) = (
        ca.server_cert(&[0x31, 0x01]),
        ca.server_cert(&[0x31, 0x02]),
        ca.server_cert(&[0x31, 0x03]),
        ca.server_cert(&[0x31, 0x04]),
    );
    let root = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (root.path().join("old"), root.path().join("new"));
    write_tls_dir(&old_dir, &first, None);
    let config = root.path().join("chatcli.toml");
    std::fs::write(&config, tls_config_text(&old_dir, false)).unwrap();
    let server = BinaryServer::start(&config, &[]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    let serving = || async { served_serial(addr, &ca.ca_pem).await.ok() };
    assert_eq!(serving().await.unwrap(), first.serial());

    // The reload points at the new directory.
    write_tls_dir(&new_dir, &second, None);
    write_atomically(&config, &tls_config_text(&new_dir, false));
    eventually("the certificate at the new path", || async {
        (serving().await? == second.serial()).then_some(())
    })
    .await;

    // A renewal at the new path is served; one at the old path is not.
    write_tls_dir(&old_dir, &stale, None);
    write_tls_dir(&new_dir, &renewed, None);
    eventually("the renewal at the new path", || async {
        (serving().await? == renewed.serial()).then_some(())
    })
    .await;

    // SIGHUP reloads from the new paths: nothing to change.
    let reloaded_before = server.stderr().matches("TLS certificate reloaded").count();
    server.signal("HUP");
    server
        .wait_for_log(&format!(
            "TLS files unchanged, still serving serial {}",
            renewed.serial()
        ))
        .await;
    assert_eq!(serving().await.unwrap(), renewed.serial());
    let log = server.stderr();
    assert_eq!(
        log.matches("TLS certificate reloaded").count(),
        reloaded_before,
        "{log}"
    );
    assert!(!log.contains(&stale.serial()), "{log}");
}

/// The same for the client CA: after a reload moves it, a renewed CA at the new path is trusted,
/// and SIGHUP does not bring back the CA of the old path.
#[tokio::test(flavor = "multi_thread")]
async fn client_ca_path_changed_by_a_reload_is_followed_by_renewals_and_sighup() {
    let server_ca = TestCa::new("server CA");
    let pair = server_ca.server_cert(&[0x32, 0x01]);
    let (ca_old, ca_new, ca_renewed) = (
        TestCa::new("client CA at the old path"),
        TestCa::new("client CA at the new path"),
        TestCa::new("client CA renewed at the new path"),
    );
    let client = |ca: &TestCa, name: &str| ca.client_cert(&format!("spiffe://test/{name}"), name);
    let (old_client, new_client, renewed_client) = (
        client(&ca_old, "old"),
        client(&ca_new, "new"),
        client(&ca_renewed, "renewed"),
    );
    let root = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (root.path().join("old"), root.path().join("new"));
    write_tls_dir(&old_dir, &pair, Some(&ca_old.ca_pem));
    let config = root.path().join("chatcli.toml");
    std::fs::write(&config, tls_config_text(&old_dir, true)).unwrap();
    let server = BinaryServer::start(&config, &[]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    let accepted = |who: &CertPair| {
        let (who, ca) = (who.clone(), server_ca.ca_pem.clone());
        async move { prompt_over_tls(addr, &ca, Some(&who)).await.is_ok() }
    };
    assert!(accepted(&old_client).await);
    assert!(!accepted(&new_client).await);

    write_tls_dir(&new_dir, &pair, Some(&ca_new.ca_pem));
    write_atomically(&config, &tls_config_text(&new_dir, true));
    eventually("the client CA at the new path", || async {
        accepted(&new_client).await.then_some(())
    })
    .await;
    assert!(!accepted(&old_client).await);

    write_atomically(&new_dir.join("ca.crt"), &ca_renewed.ca_pem);
    eventually("the client CA renewed at the new path", || async {
        accepted(&renewed_client).await.then_some(())
    })
    .await;

    server.signal("HUP");
    server
        .wait_for_log(&format!(
            "TLS files unchanged, still serving serial {}",
            pair.serial()
        ))
        .await;
    assert!(accepted(&renewed_client).await);
    assert!(!accepted(&old_client).await);
    assert!(!accepted(&new_client).await);
}

/// Runs `chatcli healthcheck --config <config>` with `CHATCLI_SERVER_PORT=<port>` (the server's
/// port variable, which the probe reads as the server does) plus `env`: the exit code and stderr.
fn healthcheck(config: &std::path::Path, port: u16, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let home = tempfile::tempdir().unwrap();
    let out = crate::support::chatcli_command(home.path())
        .arg("healthcheck")
        .arg("--config")
        .arg(config)
        .env("CHATCLI_SERVER_PORT", port.to_string())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `chatcli healthcheck` reads the server's config: it finds the TLS listener, trusts the server's
/// own certificate (its CA is in no trust store) and no other, presents the configured client
/// certificate when the server requires one, and fails once the server is gone.
#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_reads_the_servers_config_and_speaks_its_tls() {
    let ca = TestCa::new("healthcheck CA");
    let files = TlsFiles::write(&ca.server_cert(&[0x48, 0x43]), &ca.ca_pem);
    let dir = tempfile::tempdir().unwrap();
    let write_config = |name: &str, files: &TlsFiles, mtls: bool| {
        let path = dir.path().join(name);
        let client_ca = match mtls {
            true => format!(
                "client_ca_file = {:?}\n",
                files.client_ca.display().to_string()
            ),
            false => String::new(),
        };
        std::fs::write(
            &path,
            format!(
                "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n{client_ca}\n\
                 [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n",
                files.cert.display().to_string(),
                files.key.display().to_string(),
            ),
        )
        .unwrap();
        path
    };

    let tls = write_config("tls.toml", &files, false);
    let mut server = BinaryServer::start(&tls, &[]);
    let port = server.addr.port();
    let (code, stderr) = healthcheck(&tls, port, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port} is SERVING")),
        "{stderr}"
    );
    // Only that certificate is trusted as it is: a probe that expects another one refuses it.
    let other = TlsFiles::write(&ca.server_cert(&[0x4f, 0x54]), &ca.ca_pem);
    let expects_other = write_config("other.toml", &other, false);
    let (code, stderr) = healthcheck(&expects_other, port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
    server.terminate();
    server
        .wait_exit(HANG_GUARD)
        .await
        .expect("the server did not stop");
    let (code, stderr) = healthcheck(&tls, port, &[]);
    assert_eq!(code, Some(1), "a stopped server is unhealthy: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // mTLS: the server requires a client certificate, the probe presents the configured one.
    let mtls = write_config("mtls.toml", &files, true);
    let server = BinaryServer::start(&mtls, &[]);
    let port = server.addr.port();
    let (code, stderr) = healthcheck(&mtls, port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--client-cert"), "{stderr}");
    let write_identity = |name: &str, pair: &CertPair| {
        let (cert, key) = (
            dir.path().join(format!("{name}.crt")),
            dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert, &pair.cert_pem).unwrap();
        std::fs::write(&key, &pair.key_pem).unwrap();
        (cert, key)
    };
    let (cert, key) = write_identity("probe", &ca.client_cert("spiffe://test/probe", "probe"));
    let identity = [
        ("CHATCLI_HEALTHCHECK_CLIENT_CERT", cert.to_str().unwrap()),
        ("CHATCLI_HEALTHCHECK_CLIENT_KEY", key.to_str().unwrap()),
    ];
    let (code, stderr) = healthcheck(&mtls, port, &identity);
    assert_eq!(code, Some(0), "{stderr}");
    let other_ca = TestCa::new("a CA the server does not trust");
    let (cert, key) = write_identity("foreign", &other_ca.client_cert(ALICE, "alice"));
    let foreign = [
        ("CHATCLI_HEALTHCHECK_CLIENT_CERT", cert.to_str().unwrap()),
        ("CHATCLI_HEALTHCHECK_CLIENT_KEY", key.to_str().unwrap()),
    ];
    let (code, stderr) = healthcheck(&mtls, port, &foreign);
    assert_eq!(code, Some(1), "{stderr}");
}
