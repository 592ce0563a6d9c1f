//! `chatcli healthcheck`: a `grpc.health.v1` probe of the running server, for container
//! HEALTHCHECKs and scripts. Exit 0 when the server answers SERVING, 1 otherwise, with one line
//! saying why.
//!
//! It reads the configuration the server reads (`--config`, else `CHATCLI_CONFIG`, else
//! `/etc/chatcli/chatcli.toml` when present, then the same variables), so it finds the server where
//! it listens and speaks TLS when it does:
//!
//! - address: `--addr` (`CHATCLI_HEALTHCHECK_ADDR`) when given, else `server.bind_address` (the
//!   loopback address of its family when that is `0.0.0.0` or `::`) and `server.port`;
//! - TLS when `server.tls.cert_file` is set, or with `--tls`. The server's own certificate (the first
//!   one in `server.tls.cert_file`) is accepted as it is, whatever names it carries: the probe
//!   connects to a loopback address a certificate rarely names. Any other certificate must chain to
//!   `--ca-cert` or the system roots and name the host. The handshake's signature is checked
//!   either way, so only the holder of the key passes;
//! - with `server.tls.client_ca_file` set, the server requires a client certificate: the probe
//!   presents `--client-cert` and `--client-key` (`CHATCLI_HEALTHCHECK_CLIENT_CERT`,
//!   `CHATCLI_HEALTHCHECK_CLIENT_KEY`; relative paths are looked up in `$CREDENTIALS_DIRECTORY`, as
//!   the server's TLS files are) and refuses to run without them.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::cli::HealthcheckArgs;
use crate::config::credential_path;
use crate::config::{Config, Sources};

/// Probes the server the configuration describes; `Ok` with its address when it is SERVING, else
/// the reason.
pub async fn probe(args: &HealthcheckArgs) -> Result<String, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sources = Sources::from_process(args.config.clone(), Vec::new());
    let loaded = crate::config::load(&sources).map_err(|e| match e.problems.first() {
        Some(p) => format!(
            "the configuration has {} problem(s), the first: {p}",
            e.problems.len()
        ),
        None => "the configuration could not be loaded".into(),
    })?;
    let target = Target::of(args, &loaded.config, sources.credentials_dir().as_deref())?;
    target
        .check(Duration::from_secs(args.timeout.max(1)))
        .await?;
    Ok(target.addr)
}

/// Where and how to reach the server.
struct Target {
    /// `host:port`.
    addr: String,
    /// The name a certificate other than the server's own must carry.
    host: String,
    /// The TLS client, when the server speaks TLS.
    tls: Option<Arc<ClientConfig>>,
}

impl Target {
    fn of(args: &HealthcheckArgs, config: &Config, creds: Option<&Path>) -> Result<Self, String> {
        let (addr, host) = match &args.addr {
            Some(a) => (a.clone(), host_of(a)),
            None => {
                let ip = connect_ip(config.server.bind_address);
                (
                    SocketAddr::new(ip, config.server.port).to_string(),
                    ip.to_string(),
                )
            }
        };
        let tls_cfg = &config.server.tls;
        let tls = match args.tls || tls_cfg.cert_file.is_some() {
            false => None,
            true => {
                let identity = match (&args.client_cert, &args.client_key) {
                    (Some(c), Some(k)) => {
                        Some((credential_path(c, creds), credential_path(k, creds)))
                    }
                    (None, None) => None,
                    _ => {
                        return Err(
                            "--client-cert and --client-key go together (CHATCLI_HEALTHCHECK_CLIENT_CERT, CHATCLI_HEALTHCHECK_CLIENT_KEY)"
                                .into(),
                        );
                    }
                };
                if tls_cfg.client_ca_file.is_some() && identity.is_none() {
                    return Err(
                        "the server requires a client certificate (server.tls.client_ca_file is set): give the check one with --client-cert and --client-key (CHATCLI_HEALTHCHECK_CLIENT_CERT, CHATCLI_HEALTHCHECK_CLIENT_KEY)"
                            .into(),
                    );
                }
                Some(Arc::new(client_config(
                    tls_cfg.cert_file.as_deref(),
                    args.ca_cert.as_deref(),
                    identity,
                )?))
            }
        };
        Ok(Self { addr, host, tls })
    }

    async fn check(&self, timeout: Duration) -> Result<(), String> {
        // `http://` also over TLS: tonic refuses an `https://` URI without TLS settings of its own,
        // and its settings cannot trust the server's own certificate; `TlsConnect` does the TLS.
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| format!("bad address {}: {e}", self.addr))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let connected = match &self.tls {
            None => endpoint.connect().await,
            Some(config) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("bad host name {}: {e}", self.host))?;
                endpoint
                    .connect_with_connector(TlsConnect {
                        config: config.clone(),
                        name,
                    })
                    .await
            }
        };
        let channel =
            connected.map_err(|e| format!("cannot connect to {}: {}", self.addr, causes(&e)))?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| format!("health check failed: {} ({:?})", s.message(), s.code()))?;
        match ServingStatus::try_from(resp.into_inner().status) {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(other) => Err(format!(
                "server at {} is {}",
                self.addr,
                other.as_str_name()
            )),
            Err(_) => Err(format!(
                "server at {} answered an unknown status",
                self.addr
            )),
        }
    }
}

/// The address to reach a server bound to `bind`: the loopback address of its family for the
/// unspecified ones.
fn connect_ip(bind: IpAddr) -> IpAddr {
    match bind {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// The host of `host:port` (`[::1]:50051` → `::1`).
fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// An error and its causes on one line (tonic's transport error alone says only "transport error").
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        // An I/O error wrapping another repeats its text; say it once.
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// The TLS client of the probe (see the module docs): the server's own certificate from
/// `own_cert_file`, else `ca_cert` and the system roots; `identity` (certificate and key files)
/// presented when the server asks.
fn client_config(
    own_cert_file: Option<&Path>,
    ca_cert: Option<&Path>,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let own = own_cert_file
        .map(|f| {
            CertificateDer::pem_file_iter(f)
                .ok()
                .and_then(|mut certs| certs.next())
                .and_then(Result::ok)
                .ok_or_else(|| {
                    format!(
                        "cannot read a certificate from server.tls.cert_file {}",
                        f.display()
                    )
                })
        })
        .transpose()?;
    let extra = match ca_cert {
        None => Vec::new(),
        Some(f) => CertificateDer::pem_file_iter(f)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read --ca-cert {}: {e}", f.display()))?,
    };
    let roots =
        match rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone()) {
            Ok(v) => Some(Arc::new(v) as Arc<dyn ServerCertVerifier>),
            Err(_) if own.is_some() => None,
            Err(e) => return Err(format!("no CA to verify the server with: {e}")),
        };
    let verifier = OwnCertOrRoots {
        own,
        roots,
        algorithms: provider.signature_verification_algorithms,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(&cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read --client-cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| format!("cannot read --client-key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate and key do not go together: {e}"))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts the server's own certificate as it is, else asks `roots`.
#[derive(Debug)]
struct OwnCertOrRoots {
    own: Option<CertificateDer<'static>>,
    roots: Option<Arc<dyn ServerCertVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for OwnCertOrRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.own.as_ref().is_some_and(|own| own == end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.roots {
            Some(roots) => {
                roots.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::General(
                "the server's certificate is not the one in server.tls.cert_file, and no CA is trusted"
                    .into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Connects TCP, then TLS with the probe's client; the channel then speaks HTTP/2 over it.
#[derive(Clone)]
struct TlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

type Connected = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for TlsConnect {
    type Response = Connected;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = self.name.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| std::io::Error::other("the address has no host and port"))?;
            let tcp = tokio::net::TcpStream::connect(authority).await?;
            let _ = tcp.set_nodelay(true);
            Ok(hyper_util::rt::TokioIo::new(
                connector.connect(name, tcp).await?,
            ))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn args(addr: Option<&str>) -> HealthcheckArgs {
        HealthcheckArgs {
            config: None,
            addr: addr.map(String::from),
            tls: false,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            timeout: 5,
        }
    }

    #[test]
    fn the_address_is_where_the_server_listens_unless_given() {
        let mut config = Config::default();
        config.server.port = 6000;
        config.server.bind_address = "0.0.0.0".parse().unwrap();
        let t = Target::of(&args(None), &config, None).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str()),
            ("127.0.0.1:6000", "127.0.0.1")
        );
        assert!(t.tls.is_none());
        config.server.bind_address = "::".parse().unwrap();
        assert_eq!(
            Target::of(&args(None), &config, None).unwrap().addr,
            "[::1]:6000"
        );
        config.server.bind_address = "10.1.2.3".parse().unwrap();
        assert_eq!(
            Target::of(&args(None), &config, None).unwrap().addr,
            "10.1.2.3:6000"
        );
        let t = Target::of(&args(Some("chatcli.internal:7000")), &config, None).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str()),
            ("chatcli.internal:7000", "chatcli.internal")
        );
        assert_eq!(host_of("[::1]:50051"), "::1");
    }

    #[test]
    fn mtls_without_a_client_certificate_is_refused_before_connecting() {
        let mut config = Config::default();
        config.server.tls.cert_file = Some("/nonexistent/cert.pem".into());
        config.server.tls.client_ca_file = Some("/nonexistent/ca.pem".into());
        let err = Target::of(&args(None), &config, None).err().unwrap();
        assert!(err.contains("--client-cert"), "{err}");
        let mut half = args(None);
        half.client_cert = Some("cert.pem".into());
        let err = Target::of(&half, &config, None).err().unwrap();
        assert!(err.contains("go together"), "{err}");
    }
}
