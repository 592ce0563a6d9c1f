//! The harness: [`TestServer`] runs `chatcli::server::run` in-process on listeners bound to port 0,
//! [`BinaryServer`] runs the real `chatcli` binary and reads its address from the "listening on"
//! log line, plus small helpers (clients, prompts, bounded waits).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatcli::config::{Config, ProviderConfig};
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{StreamPromptRequest, StreamPromptResponse};
use chatcli::server::{Listeners, ServerError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Upper bound of every wait, only there so a broken feature fails instead of hanging.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// The path of the real binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_chatcli");

/// `<repo>/config/demo.toml`.
pub fn demo_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml")
}

/// An echo provider answering with model `echo-1`.
pub fn echo_provider(name: &str, delay: Option<Duration>) -> ProviderConfig {
    ProviderConfig {
        name: name.into(),
        kind: "echo".into(),
        model: Some("echo-1".into()),
        delay,
        ..ProviderConfig::default()
    }
}

/// Defaults plus one echo provider named `echo` without delay.
pub fn echo_config() -> Config {
    echo_config_with_delay(None)
}

/// Defaults plus one echo provider named `echo` pausing `delay` between words.
pub fn echo_config_with_delay(delay: Option<Duration>) -> Config {
    let mut config = Config::default();
    config.llm.providers = vec![echo_provider("echo", delay)];
    config
}

/// A `StreamPrompt` request for the default provider.
pub fn stream_request(prompt: &str) -> StreamPromptRequest {
    StreamPromptRequest {
        prompt: prompt.into(),
        ..StreamPromptRequest::default()
    }
}

/// Connects a channel to `addr`.
pub async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(HANG_GUARD)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// Reads a stream to its end, failing on any error status.
pub async fn collect_stream(
    stream: &mut tonic::Streaming<StreamPromptResponse>,
) -> Vec<StreamPromptResponse> {
    let mut out = Vec::new();
    while let Some(msg) = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .expect("stream stalled")
        .expect("stream failed")
    {
        out.push(msg);
    }
    out
}

/// Adds `authorization: Bearer <token>` to every call when a token is given.
#[derive(Clone)]
pub struct BearerToken(pub Option<String>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

/// The services listed by gRPC reflection (v1), or the status of the attempt.
pub async fn list_services(
    channel: Channel,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut client =
        ServerReflectionClient::with_interceptor(channel, BearerToken(token.map(String::from)));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let first = responses
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("no reflection response"))?;
    match first.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

/// A reqwest client for plain HTTP.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(HANG_GUARD)
        .build()
        .unwrap()
}

/// `GET url` with `http` and its body as JSON.
pub async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls `check` until it returns `Some`, failing after [`HANG_GUARD`] with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// The server running in this process.
pub struct TestServer {
    /// gRPC + HTTP address.
    pub addr: SocketAddr,
    /// Metrics address, when started with metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// A channel to `addr`.
    pub channel: Channel,
    /// A ChatCLI client on `channel`.
    pub client: ChatCliServiceClient<Channel>,
    /// `state.data_dir`, inside [`TestServer::root`].
    pub data_dir: PathBuf,
    root: tempfile::TempDir,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

impl TestServer {
    /// One echo provider, metrics off.
    pub async fn start() -> Self {
        Self::launch(echo_config(), false).await
    }

    /// `config` (its data dir replaced by a fresh one), metrics off.
    pub async fn start_with(config: Config) -> Self {
        Self::launch(config, false).await
    }

    /// `config` (its data dir replaced by a fresh one), with a metrics listener.
    pub async fn start_with_metrics(config: Config) -> Self {
        Self::launch(config, true).await
    }

    async fn launch(mut config: Config, metrics: bool) -> Self {
        let root = tempfile::tempdir().unwrap();
        let data_dir = root.path().join("data");
        config.state.data_dir = data_dir.clone();
        // Bounds shutdown() should a client connection linger.
        config.server.shutdown_grace = Duration::from_secs(5);
        let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = match metrics {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let addr = main.local_addr().unwrap();
        let metrics_addr = metrics.as_ref().map(|l| l.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chatcli::server::run(
            Listeners { main, metrics },
            config,
            shutdown.clone(),
        ));
        let channel = connect(addr).await;
        Self {
            addr,
            metrics_addr,
            client: ChatCliServiceClient::new(channel.clone()),
            channel,
            data_dir,
            root,
            shutdown,
            task,
        }
    }

    /// The temp dir holding `data_dir`; nothing the server writes should land outside of it.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://<metrics addr><path>`.
    pub fn metrics_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.metrics_addr.expect("metrics are off")
        )
    }

    /// Starts the drain (what SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancels the server and waits for `run` to return `Ok`.
    pub async fn shutdown(self) {
        drop(self.client);
        drop(self.channel);
        self.shutdown.cancel();
        tokio::time::timeout(HANG_GUARD, self.task)
            .await
            .expect("server did not stop")
            .expect("server task panicked")
            .expect("server returned an error");
    }
}

/// A `chatcli` command with a controlled environment: only `PATH` and `HOME` (a fresh dir).
pub fn chatcli_command(home: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

/// The real binary running `chatcli server`.
pub struct BinaryServer {
    child: Child,
    /// gRPC + HTTP address, from the listening line.
    pub addr: SocketAddr,
    /// `CHATCLI_DATA_DIR` of the process.
    pub data_dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    _home: tempfile::TempDir,
}

impl BinaryServer {
    /// Runs `chatcli server --config <config> --port 0 --metrics-port 0 <extra>` with a fresh
    /// `HOME` and `CHATCLI_DATA_DIR`, and waits for its listening line.
    pub fn start(config: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(config, extra, &[])
    }

    /// [`BinaryServer::start`] with extra environment variables.
    pub fn start_with_env(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let home = tempfile::tempdir().unwrap();
        let data_dir = home.path().join("data");
        let mut child = chatcli_command(home.path())
            .env("CHATCLI_DATA_DIR", &data_dir)
            .envs(env.iter().copied())
            .arg("server")
            .arg("--config")
            .arg(config)
            .args(["--port", "0", "--metrics-port", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut buf = sink.lock().unwrap();
                buf.push_str(&line);
                buf.push('\n');
            }
        });
        let mut server = Self {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            data_dir,
            stderr,
            _home: home,
        };
        server.addr = server.wait_for_listening();
        server
    }

    fn wait_for_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Some(addr) = parse_listening(&self.stderr()) {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the drain thread catch up before reporting.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "chatcli exited ({status}) before listening; stderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no listening line; stderr so far:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Kills the process with SIGKILL (no drain, no flush) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until stderr contains `needle`; panics after [`HANG_GUARD`].
    pub async fn wait_for_log(&self, needle: &str) {
        eventually(&format!("log line containing {needle:?}"), || async {
            self.stderr().contains(needle).then_some(())
        })
        .await;
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address in a "listening on <addr> ..." log line.
pub fn parse_listening(log: &str) -> Option<SocketAddr> {
    let rest = &log[log.find("listening on ")? + "listening on ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A provider of `kind` at `base_url`, with an API key and a model (kinds whose API sits under a
/// `/v1` prefix, like `openai`, need it in `base_url`).
pub fn upstream_provider(name: &str, kind: &str, base_url: String, model: &str) -> ProviderConfig {
    ProviderConfig {
        name: name.into(),
        kind: kind.into(),
        base_url: Some(base_url),
        api_key: Some(chatcli::config::Secret::new("sk-test")),
        model: Some(model.into()),
        ..ProviderConfig::default()
    }
}

/// An `openai` provider named `name` pointing at `fake` (`<fake>/v1`) with key `sk-test`.
pub fn openai_provider(
    name: &str,
    fake: &chatcli::testing::FakeUpstream,
    model: &str,
) -> ProviderConfig {
    upstream_provider(name, "openai", format!("{}/v1", fake.base_url()), model)
}

/// A fake OpenAI upstream on port 0.
pub async fn openai_fake() -> chatcli::testing::FakeUpstream {
    chatcli::testing::FakeUpstream::start(chatcli::testing::openai::OpenAiFormat)
        .await
        .unwrap()
}

/// Polls the metrics listener of `server` until every line of `wanted` is in `/metrics` (exact
/// lines), then returns the whole text; fails after [`HANG_GUARD`].
pub async fn metrics_with_lines(server: &TestServer, wanted: &[&str]) -> String {
    let http = http_client();
    let url = server.metrics_url("/metrics");
    eventually(&format!("{wanted:?} in /metrics"), || async {
        let text = http.get(&url).send().await.ok()?.text().await.ok()?;
        wanted
            .iter()
            .all(|w| text.lines().any(|l| l == *w))
            .then_some(text)
    })
    .await
}

/// The Python for the gRPC peers: `$CHATCLI_TEST_PYTHON`, else `<repo>/.venv/bin/python`.
pub fn python_interpreter() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidate = match std::env::var_os("CHATCLI_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo.join(".venv/bin/python"),
    };
    assert!(
        candidate.exists(),
        "no Python for the gRPC peer at {}: set CHATCLI_TEST_PYTHON to an interpreter with grpcio \
         and grpcio-tools, or create the venv in {}: `python3 -m venv .venv && .venv/bin/pip \
         install -r tests/python/requirements.txt`",
        candidate.display(),
        repo.display()
    );
    candidate
}

/// A certificate and its private key, as PEM.
#[derive(Clone)]
pub struct CertPair {
    /// The certificate.
    pub cert_pem: String,
    /// Its PKCS#8 private key.
    pub key_pem: String,
}

impl CertPair {
    /// The DER of the certificate.
    pub fn der(&self) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    /// The serial number of the certificate (hex, as the server logs it).
    pub fn serial(&self) -> String {
        serial_of(&self.der())
    }
}

/// The serial number of a DER certificate as upper-case hex.
pub fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// A test certificate authority made with rcgen (ECDSA P-256 keys).
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate.
    pub ca_pem: String,
}

impl TestCa {
    /// A new CA whose subject CN is `name`.
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1 with serial number `serial`.
    pub fn server_cert(&self, serial: &[u8]) -> CertPair {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose first SAN is the URI `uri` and whose CN is `cn`.
    pub fn client_cert(&self, uri: &str, cn: &str) -> CertPair {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: rcgen::CertificateParams) -> CertPair {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Writes `contents` to `path` the way deployment tools do: a temp file in the same directory,
/// renamed over the target.
pub fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A gRPC channel over TLS to `addr` trusting `ca_pem` for `localhost`, presenting `identity`
/// (a client certificate) when given.
pub async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&CertPair>,
) -> Result<Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(HANG_GUARD)
        .timeout(HANG_GUARD)
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// A reqwest client trusting only `ca_pem`, presenting `identity` when given.
pub fn https_client(ca_pem: &str, identity: Option<&CertPair>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .timeout(HANG_GUARD)
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()]);
    if let Some(id) = identity {
        let pem = format!("{}{}", id.key_pem, id.cert_pem);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// Opens a new TLS connection to `addr` (a raw rustls handshake, no HTTP) and returns the serial
/// number of the certificate the server presented.
pub async fn served_serial(addr: SocketAddr, ca_pem: &str) -> std::io::Result<String> {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(HANG_GUARD, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok(serial_of(&leaf))
}

impl TestServer {
    /// `config` (which sets `server.tls`; its data dir replaced by a fresh one) with a metrics
    /// listener; [`TestServer::channel`] is a TLS channel trusting `ca_pem` that presents
    /// `identity` when given.
    pub async fn start_tls(config: Config, ca_pem: &str, identity: Option<&CertPair>) -> Self {
        let mut config = config;
        let root = tempfile::tempdir().unwrap();
        let data_dir = root.path().join("data");
        config.state.data_dir = data_dir.clone();
        config.server.shutdown_grace = Duration::from_secs(5);
        let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = main.local_addr().unwrap();
        let metrics_addr = Some(metrics.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chatcli::server::run(
            Listeners {
                main,
                metrics: Some(metrics),
            },
            config,
            shutdown.clone(),
        ));
        let channel = tls_channel(addr, ca_pem, identity)
            .await
            .unwrap_or_else(|e| panic!("cannot connect over TLS to {addr}: {e:?}"));
        Self {
            addr,
            metrics_addr,
            client: ChatCliServiceClient::new(channel.clone()),
            channel,
            data_dir,
            root,
            shutdown,
            task,
        }
    }
}

/// Lower-case hex SHA-256 of `text` (what `[[auth.tokens]] sha256` holds).
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The folder of a principal's sessions: `<data_dir>/sessions/principals/p<hex of namespace>`.
pub fn principal_sessions_dir(data_dir: &Path, namespace: &str) -> PathBuf {
    let hex: String = namespace.bytes().map(|b| format!("{b:02x}")).collect();
    data_dir
        .join("sessions")
        .join("principals")
        .join(format!("p{hex}"))
}

/// The value of the metric line starting with `prefix` (e.g. `x_total{result="ok"}`), 0 when absent.
pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Awaits `fut` for at most `limit`, failing with `what` instead of hanging.
pub async fn within<F: std::future::Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {limit:?}"))
}

impl BinaryServer {
    /// Runs `chatcli server <args>` as given (no `--port 0` added: the ports come from `args` or
    /// the config) with a fresh `HOME` and `CHATCLI_DATA_DIR` plus `env`, and waits for its
    /// listening line.
    pub fn start_args(args: &[&str], env: &[(&str, &str)]) -> Self {
        let home = tempfile::tempdir().unwrap();
        let data_dir = home.path().join("data");
        let mut child = chatcli_command(home.path())
            .env("CHATCLI_DATA_DIR", &data_dir)
            .envs(env.iter().copied())
            .arg("server")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut buf = sink.lock().unwrap();
                buf.push_str(&line);
                buf.push('\n');
            }
        });
        let mut server = Self {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            data_dir,
            stderr,
            _home: home,
        };
        server.addr = server.wait_for_listening();
        server
    }

    /// Sends `signal` (a `kill` name such as `HUP`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `needle` occurs in stderr more than `count` times; panics after [`HANG_GUARD`].
    pub async fn wait_for_log_count(&self, needle: &str, count: usize) {
        eventually(
            &format!("more than {count} log lines containing {needle:?}"),
            || async { (self.stderr().matches(needle).count() > count).then_some(()) },
        )
        .await;
    }
}
