//! Reaching the server: resolve every address of the host (the `dns:///` behaviour, also for a
//! plain `host:port`), choose TLS or plaintext, open one HTTP/2 channel per address with keepalive
//! pings (every 10 s, also while idle, so idle connections through load balancers survive), and
//! spread calls over them round robin. Every call carries `authorization: Bearer <token>` when a
//! token is set. [`handshake`] then calls `Health` and `GetServerInfo` for the banner.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::args::Settings;
use super::error::{self, Class, ClientError, Stage};
use crate::proto::chat_cli_service_client::ChatCliServiceClient;
use crate::proto::{GetServerInfoRequest, GetServerInfoResponse, HealthRequest, health_response};

/// Keepalive ping interval (the issue asks for 10 s).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Connect timeout when `--timeout` is not given.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// System CA bundles, tried in order after `SSL_CERT_FILE`.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// Calls spread over one channel per resolved address, in turn.
#[derive(Clone, Debug)]
pub struct RoundRobin {
    channels: Arc<[Channel]>,
    next: Arc<AtomicUsize>,
}

impl tower::Service<http::Request<tonic::body::Body>> for RoundRobin {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each channel is buffered; readiness is awaited on the chosen one in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let channel = self.channels[i].clone();
        Box::pin(tower::ServiceExt::oneshot(channel, req))
    }
}

/// Adds the bearer token to every call.
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The generated client over the round-robin channels.
pub type Client = ChatCliServiceClient<InterceptedService<RoundRobin, Bearer>>;

/// An open connection.
#[derive(Clone, Debug)]
pub struct Connection {
    /// The client; clone it per call.
    pub client: Client,
    /// `host:port` as given, for messages.
    pub target: String,
    /// Whether TLS is in use.
    pub tls: bool,
    /// The addresses that accepted a connection.
    pub addresses: Vec<SocketAddr>,
}

impl Connection {
    /// Maps a failed call on this connection.
    pub fn error(&self, status: &tonic::Status, stage: Stage) -> ClientError {
        error::from_status(status, stage, &self.target, self.tls)
    }
}

/// Loads the CA roots for TLS: `--ca-cert`, else `SSL_CERT_FILE`, else the first system bundle.
fn roots(
    settings: &Settings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<u8>, ClientError> {
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p)
            .map_err(|e| ClientError::usage(format!("cannot read the {what} {}: {e}", p.display())))
    };
    if let Some(ca) = &settings.tls_files.ca_cert {
        return read(ca, "CA certificate");
    }
    if let Some(f) = env("SSL_CERT_FILE").filter(|v| !v.is_empty()) {
        return read(std::path::Path::new(&f), "CA bundle (SSL_CERT_FILE)");
    }
    for p in SYSTEM_CA_BUNDLES {
        if let Ok(b) = std::fs::read(p) {
            return Ok(b);
        }
    }
    Err(ClientError::connect(
        "no system CA certificates found (install ca-certificates, set SSL_CERT_FILE, or give \
         --ca-cert)",
    ))
}

fn check_pem(bytes: &[u8], path: &std::path::Path, what: &str) -> Result<(), ClientError> {
    if String::from_utf8_lossy(bytes).contains("-----BEGIN") {
        Ok(())
    } else {
        Err(ClientError::usage(format!(
            "{} is not a PEM {what}",
            path.display()
        )))
    }
}

/// Resolves the host, decides TLS, and connects to every address that answers.
pub async fn connect(
    settings: &Settings,
    env: &dyn Fn(&str) -> Option<String>,
    verbose: &dyn Fn(&str),
) -> Result<Connection, ClientError> {
    let target = settings.address.display();
    let connect_timeout = settings.timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let host_port = format!("{}:{}", settings.address.host, settings.address.port);
    let lookup = tokio::time::timeout(connect_timeout, tokio::net::lookup_host(host_port.clone()));
    let mut addrs: Vec<SocketAddr> = match lookup.await {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            return Err(ClientError::connect(format!(
                "cannot resolve {}: {e}; check the host name",
                settings.address.host
            )));
        }
        Err(_) => {
            return Err(ClientError::connect(format!(
                "resolving {} took longer than {connect_timeout:?}",
                settings.address.host
            )));
        }
    };
    addrs.dedup();
    if addrs.is_empty() {
        return Err(ClientError::connect(format!(
            "{} resolves to no address",
            settings.address.host
        )));
    }
    let all_loopback = addrs.iter().all(|a| a.ip().is_loopback());
    let tls = match settings.tls {
        Some(t) => t,
        None => !(all_loopback || settings.allow_insecure),
    };
    if !tls && !all_loopback && !settings.allow_insecure {
        return Err(ClientError::usage(format!(
            "refusing plaintext to {target}, which is not a loopback address (the token and keys \
             would cross the network in the clear); use --tls, or set CHATCLI_ALLOW_INSECURE=true"
        )));
    }
    verbose(&format!(
        "{} resolves to {}; {}",
        settings.address.host,
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        if tls { "TLS" } else { "plaintext" }
    ));
    let tls_config = if tls {
        let ca = roots(settings, env)?;
        if let Some(p) = &settings.tls_files.ca_cert {
            check_pem(&ca, p, "certificate")?;
        }
        let name = settings
            .tls_files
            .server_name
            .clone()
            .unwrap_or_else(|| settings.address.host.clone());
        let mut cfg = ClientTlsConfig::new()
            .domain_name(name)
            .ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &settings.tls_files.identity {
            let c = std::fs::read(cert)
                .map_err(|e| ClientError::usage(format!("cannot read {}: {e}", cert.display())))?;
            let k = std::fs::read(key)
                .map_err(|e| ClientError::usage(format!("cannot read {}: {e}", key.display())))?;
            check_pem(&c, cert, "certificate")?;
            check_pem(&k, key, "private key")?;
            cfg = cfg.identity(Identity::from_pem(c, k));
            verbose(&format!("client certificate {}", cert.display()));
        }
        Some(cfg)
    } else {
        None
    };
    let token = match &settings.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| ClientError::usage("--token cannot be sent in a header"))?,
        ),
        None => None,
    };

    let mut channels = Vec::new();
    let mut connected = Vec::new();
    let mut failures = Vec::new();
    for addr in &addrs {
        let scheme = if tls { "https" } else { "http" };
        let uri = format!("{scheme}://{addr}");
        let mut ep = Endpoint::from_shared(uri.clone())
            .map_err(|e| ClientError::usage(format!("bad address {uri}: {e}")))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .user_agent(concat!("chatcli-connect/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| ClientError::usage(format!("bad user agent: {e}")))?;
        if let Some(cfg) = &tls_config {
            ep = ep.tls_config(cfg.clone()).map_err(|e| {
                ClientError::usage(format!("bad TLS settings: {}", error::chain(&e)))
            })?;
        }
        match ep.connect().await {
            Ok(ch) => {
                channels.push(ch);
                connected.push(*addr);
            }
            Err(e) => {
                let cause = error::chain(&e);
                verbose(&format!("{addr}: {cause}"));
                failures.push((*addr, cause));
            }
        }
    }
    if channels.is_empty() {
        let cause = match failures.as_slice() {
            [(_, only)] => only.clone(),
            many => many
                .iter()
                .map(|(a, c)| format!("{a}: {c}"))
                .collect::<Vec<_>>()
                .join("; "),
        };
        return Err(error::connection_failed(&target, &cause, tls));
    }
    let rr = RoundRobin {
        channels: channels.into(),
        next: Arc::new(AtomicUsize::new(0)),
    };
    let client = ChatCliServiceClient::with_interceptor(rr, Bearer(token))
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    Ok(Connection {
        client,
        target,
        tls,
        addresses: connected,
    })
}

/// What the handshake learnt about the server.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// `GetServerInfo`'s answer, or a stand-in (provider and model "remote") when the server does
    /// not answer it.
    pub info: GetServerInfoResponse,
    /// Whether `info` came from the server, so its provider list can be trusted.
    pub from_server: bool,
}

impl ServerInfo {
    /// The providers the server offers, when it said so.
    pub fn offered(&self) -> Option<&[String]> {
        self.from_server
            .then_some(self.info.available_providers.as_slice())
    }
}

/// Calls `Health` (must answer SERVING) then `GetServerInfo` (its failure leaves "remote" in the
/// banner, except a refusal of the credentials or a rate limit, which stop here).
pub async fn handshake(
    conn: &Connection,
    timeout: Option<Duration>,
    verbose: &dyn Fn(&str),
) -> Result<ServerInfo, ClientError> {
    let limit = timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let mut client = conn.client.clone();
    let mut req = tonic::Request::new(HealthRequest {});
    req.set_timeout(limit);
    let health = match tokio::time::timeout(limit, client.health(req)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => return Err(conn.error(&status, Stage::Handshake)),
        Err(_) => {
            return Err(ClientError::connect(format!(
                "{} did not answer Health within {limit:?}; check the address and port",
                conn.target
            )));
        }
    };
    if health.status() != health_response::Status::Serving {
        return Err(ClientError::connect(format!(
            "{} is not healthy (NOT_SERVING: it is starting or shutting down); try again shortly",
            conn.target
        )));
    }
    let mut req = tonic::Request::new(GetServerInfoRequest {});
    req.set_timeout(limit);
    match client.get_server_info(req).await {
        Ok(r) => Ok(ServerInfo {
            info: r.into_inner(),
            from_server: true,
        }),
        Err(status) => {
            let e = conn.error(&status, Stage::Call);
            let fatal = match e.class() {
                Class::Auth | Class::RateLimited => true,
                // An older server without the RPC still serves prompts.
                Class::Connect => status.code() != tonic::Code::Unimplemented,
                _ => false,
            };
            if fatal {
                return Err(e);
            }
            verbose(&format!("GetServerInfo failed: {e}"));
            Ok(ServerInfo {
                info: GetServerInfoResponse {
                    version: if health.version.is_empty() {
                        "remote".into()
                    } else {
                        health.version
                    },
                    provider: "remote".into(),
                    model: "remote".into(),
                    ..Default::default()
                },
                from_server: false,
            })
        }
    }
}

/// Checks a provider the client will ask for against the ones the server offers (matched without
/// regard to case, as the server does), and returns the server's spelling of it. `requested` is ""
/// for the server's default; `origin` names where the name came from (`--provider`, `/provider`).
/// A provider the server does not offer would fail every prompt, so it is refused here as a usage
/// error naming what the server offers. When the server did not say what it offers, the name is
/// taken as given.
pub fn check_provider(
    server: &ServerInfo,
    target: &str,
    requested: &str,
    origin: &str,
) -> Result<String, ClientError> {
    let Some(offered) = server.offered() else {
        return Ok(requested.to_string());
    };
    if requested.is_empty() {
        return Ok(String::new());
    }
    if let Some(name) = offered.iter().find(|n| n.eq_ignore_ascii_case(requested)) {
        return Ok(name.clone());
    }
    Err(ClientError::usage(if offered.is_empty() {
        format!(
            "{origin} {requested}: {target} has no LLM provider configured, so it cannot answer              prompts"
        )
    } else {
        format!(
            "{origin} {requested} is not offered by {target}; it offers: {}",
            offered.join(", ")
        )
    }))
}

/// The existing ChatCLI client's banner, then the watcher line when the watcher is active. `provider` and
/// `model` are what the client asks for ("" = the server's default). A server without providers
/// says so instead of showing empty names.
pub fn banner(info: &GetServerInfoResponse, provider: &str, model: &str, suffix: &str) -> String {
    let no_default = info.provider.is_empty();
    let provider_text = match (provider.is_empty(), no_default) {
        (false, _) => provider,
        (true, false) => info.provider.as_str(),
        (true, true) if info.available_providers.is_empty() => "(none configured)",
        (true, true) => "(no default; pick one with --provider)",
    };
    let model = match (
        model.is_empty(),
        provider.is_empty() || provider.eq_ignore_ascii_case(&info.provider),
    ) {
        (false, _) => model,
        (true, true) if !info.model.is_empty() => info.model.as_str(),
        (true, true) => "(none)",
        // Another provider than the server's default: its model is that provider's default.
        (true, false) => "default",
    };
    let mut out = format!(
        "Connected to ChatCLI server (version: {}, provider: {provider_text}, model: \
         {model}{suffix})",
        info.version
    );
    if info.watcher_active {
        out.push_str(&format!(
            "\nK8s watcher active: {} (context injected into all prompts)",
            info.watcher_target
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(provider: &str, model: &str, offered: &[&str]) -> GetServerInfoResponse {
        GetServerInfoResponse {
            version: "0.1.0".into(),
            provider: provider.into(),
            model: model.into(),
            available_providers: offered.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_banner_never_shows_empty_names() {
        let none = info("", "", &[]);
        assert_eq!(
            banner(&none, "", "", ""),
            "Connected to ChatCLI server (version: 0.1.0, provider: (none configured), model: \
             (none))"
        );
        let echo = info("echo", "echo-1", &["echo", "echo-slow"]);
        assert_eq!(
            banner(&echo, "", "", ""),
            "Connected to ChatCLI server (version: 0.1.0, provider: echo, model: echo-1)"
        );
        assert_eq!(
            banner(&echo, "echo-slow", "", ", using your own API key"),
            "Connected to ChatCLI server (version: 0.1.0, provider: echo-slow, model: default, \
             using your own API key)"
        );
        assert!(banner(&echo, "ECHO", "", "").contains("model: echo-1"));
    }

    #[test]
    fn providers_are_checked_against_the_server_list() {
        let known = |offered: &[&str]| ServerInfo {
            info: info("echo", "echo-1", offered),
            from_server: true,
        };
        let server = known(&["echo", "echo-slow"]);
        assert_eq!(
            check_provider(&server, "srv", "ECHO-slow", "--provider").unwrap_or_default(),
            "echo-slow"
        );
        assert_eq!(
            check_provider(&server, "srv", "", "--provider").unwrap_or_default(),
            ""
        );
        let Err(e) = check_provider(&server, "srv", "NOPE", "--provider") else {
            panic!("NOPE was accepted");
        };
        assert_eq!(
            e.to_string(),
            "--provider NOPE is not offered by srv; it offers: echo, echo-slow"
        );
        assert_eq!(e.exit_code(), 64);
        let Err(e) = check_provider(&known(&[]), "srv", "echo", "--provider") else {
            panic!("a provider was accepted by a server without any");
        };
        assert!(e.to_string().contains("no LLM provider configured"), "{e}");
        // A server that did not answer GetServerInfo cannot be checked: the name is kept.
        let unknown = ServerInfo {
            info: info("remote", "remote", &[]),
            from_server: false,
        };
        assert_eq!(
            check_provider(&unknown, "srv", "NOPE", "--provider").unwrap_or_default(),
            "NOPE"
        );
    }
}
