//! TLS for the main listener: loading the certificate, key and optional client CA named in
//! `[server.tls]` into a rustls `ServerConfig` (ALPN h2 + http/1.1, TLS 1.3 or 1.2+), an acceptor
//! whose material can be swapped while serving, its rotation ([`TlsRotation`]: re-read when the
//! reload module's file watcher sees the files change, on SIGHUP, and from the new paths when a
//! config reload changes them), and the identity of a verified client certificate (mTLS).
//!
//! Rotation follows "load → validate → swap": the files are parsed and the key is checked against
//! the certificate before anything is replaced, so a broken or mismatched pair is refused and the old
//! material keeps serving. The whole `ServerConfig` is swapped (not only the certificate) because the
//! client CA rotates too; each handshake takes the config current at accept time, so open
//! connections keep theirs.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, Opts};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;

const CERT_SETTING: &str = "server.tls.cert_file";
const KEY_SETTING: &str = "server.tls.key_file";
const CLIENT_CA_SETTING: &str = "server.tls.client_ca_file";
const MIN_VERSION_SETTING: &str = "server.tls.min_version";

/// A client that opens TCP and never finishes the handshake must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Name of the reload counter, labelled `result="ok|error"`.
pub const RELOADS_METRIC: &str = "chatcli_tls_reloads_total";

/// Loaded TLS material: a rustls `ServerConfig` (ALPN h2 + http/1.1; TLS 1.3 only, or 1.2 and 1.3
/// with `min_version = "1.2"`) built from a certificate chain and the key that matches it, plus,
/// when a client CA is configured, a verifier that requires every client to present a certificate
/// chaining to that CA.
pub struct TlsMaterial {
    config: Arc<rustls::ServerConfig>,
    serial: String,
    client_auth: bool,
    /// SHA-256 over the file contents: tells a real change from a touch or an unrelated file.
    fingerprint: [u8; 32],
}

impl fmt::Debug for TlsMaterial {
    // The key never appears here: only what identifies the material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("serial", &self.serial)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads and checks the files of `cfg`. Errors name the setting and the file, e.g.
    /// `server.tls.cert_file: /x: no certificate found`, `server.tls.key_file: /k: the private key
    /// does not match the certificate in /c`, `server.tls.client_ca_file: /dir is a directory`,
    /// `…: not PEM (…)`. They never contain key material.
    pub fn load(cfg: &TlsConfig) -> Result<Self, String> {
        let files = RawFiles::read(cfg)?;
        Self::build(cfg, &files)
    }

    fn build(cfg: &TlsConfig, files: &RawFiles) -> Result<Self, String> {
        let fingerprint = files.fingerprint(&cfg.min_version);
        let provider = provider();
        let versions: &[&'static rustls::SupportedProtocolVersion] = match cfg.min_version.trim() {
            "1.3" => &[&rustls::version::TLS13],
            "1.2" => &[&rustls::version::TLS12, &rustls::version::TLS13],
            other => {
                return Err(format!(
                    "{MIN_VERSION_SETTING}: {other:?} is not supported (use \"1.2\" or \"1.3\")"
                ));
            }
        };

        let chain = certificates(CERT_SETTING, &files.cert_path, &files.cert)?;
        let serial = leaf_serial(&chain[0]).ok_or_else(|| {
            format!(
                "{CERT_SETTING}: {}: the first certificate is not valid X.509",
                files.cert_path.display()
            )
        })?;
        let key = private_key(&files.key_path, &files.key)?;
        let signing_key = provider.key_provider.load_private_key(key).map_err(|_| {
            format!(
                "{KEY_SETTING}: {}: unsupported or malformed private key (RSA, ECDSA P-256/P-384 or Ed25519 expected)",
                files.key_path.display()
            )
        })?;
        let certified = CertifiedKey::new(chain, signing_key);
        // `CertifiedKey::from_der` lets an undecidable comparison pass; a server key is always one
        // ring can compare, so anything but a match is refused.
        certified.keys_match().map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => format!(
                "{KEY_SETTING}: {}: the private key does not match the certificate in {}",
                files.key_path.display(),
                files.cert_path.display()
            ),
            other => format!(
                "{KEY_SETTING}: {}: cannot check the key against the certificate in {}: {other}",
                files.key_path.display(),
                files.cert_path.display()
            ),
        })?;

        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("{MIN_VERSION_SETTING}: {e}"))?;
        let builder = match &files.client_ca {
            Some((path, bytes)) => {
                let mut roots = RootCertStore::empty();
                for (i, ca) in certificates(CLIENT_CA_SETTING, path, bytes)?
                    .into_iter()
                    .enumerate()
                {
                    roots.add(ca).map_err(|e| {
                        format!(
                            "{CLIENT_CA_SETTING}: {}: certificate {}: {e}",
                            path.display(),
                            i + 1
                        )
                    })?;
                }
                // No `allow_unauthenticated`: with a client CA configured, a certificate is required.
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("{CLIENT_CA_SETTING}: {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        // tonic's client refuses a connection where ALPN did not pick h2.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        Ok(Self {
            config: Arc::new(config),
            serial,
            client_auth: files.client_ca.is_some(),
            fingerprint,
        })
    }
}

/// The bytes of the configured files, read once so that the fingerprint and the parsed material
/// describe the same contents.
struct RawFiles {
    cert_path: PathBuf,
    cert: Vec<u8>,
    key_path: PathBuf,
    key: Vec<u8>,
    client_ca: Option<(PathBuf, Vec<u8>)>,
}

impl RawFiles {
    fn read(cfg: &TlsConfig) -> Result<Self, String> {
        let cert_path = cfg.cert_file.clone().ok_or_else(|| {
            format!("{CERT_SETTING}: not set (TLS needs a certificate and a key)")
        })?;
        let key_path = cfg
            .key_file
            .clone()
            .ok_or_else(|| format!("{KEY_SETTING}: not set (TLS needs a certificate and a key)"))?;
        let cert = read_file(CERT_SETTING, &cert_path)?;
        let key = read_file(KEY_SETTING, &key_path)?;
        let client_ca = match &cfg.client_ca_file {
            Some(p) => Some((p.clone(), read_file(CLIENT_CA_SETTING, p)?)),
            None => None,
        };
        Ok(Self {
            cert_path,
            cert,
            key_path,
            key,
            client_ca,
        })
    }

    /// Over the contents and the minimum version, so a reload that changes only `min_version`
    /// is a change too.
    fn fingerprint(&self, min_version: &str) -> [u8; 32] {
        let min_version = min_version.trim().as_bytes().to_vec();
        let mut h = Sha256::new();
        // Length prefixes keep (a, bc) and (ab, c) apart.
        for part in [
            Some(&min_version),
            Some(&self.cert),
            Some(&self.key),
            self.client_ca.as_ref().map(|(_, b)| b),
        ] {
            match part {
                Some(b) => {
                    h.update((b.len() as u64).to_be_bytes());
                    h.update(b);
                }
                None => h.update(u64::MAX.to_be_bytes()),
            }
        }
        h.finalize().into()
    }
}

fn read_file(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(format!("{setting}: {shown} is a directory")),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("{setting}: {shown}: no such file"));
        }
        Err(e) => return Err(format!("{setting}: {shown}: {e}")),
    }
    std::fs::read(path).map_err(|e| format!("{setting}: {shown}: {e}"))
}

/// All known PEM sections of a file. The error describes the syntax problem without quoting the
/// file, which may be a private key.
fn pem_sections(
    setting: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        match item {
            Ok(section) => out.push(section),
            Err(e) => {
                let why = match e {
                    rustls_pki_types::pem::Error::MissingSectionEnd { .. } => {
                        "a section has no END line"
                    }
                    rustls_pki_types::pem::Error::IllegalSectionStart { .. } => {
                        "malformed BEGIN line"
                    }
                    rustls_pki_types::pem::Error::Base64Decode(_) => "invalid base64",
                    rustls_pki_types::pem::Error::SectionTooLarge => "section too large",
                    _ => "unreadable",
                };
                return Err(format!("{setting}: {}: not PEM ({why})", path.display()));
            }
        }
    }
    if out.is_empty() {
        return Err(format!(
            "{setting}: {}: not PEM (no -----BEGIN …----- section)",
            path.display()
        ));
    }
    Ok(out)
}

fn certificates(
    setting: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = pem_sections(setting, path, bytes)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err(format!(
            "{setting}: {}: no certificate found",
            path.display()
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    let mut keys = pem_sections(KEY_SETTING, path, bytes)?
        .into_iter()
        .filter_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der));
    let key = keys.next().ok_or_else(|| {
        format!(
            "{KEY_SETTING}: {}: no private key found (expected a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section)",
            path.display()
        )
    })?;
    if keys.next().is_some() {
        return Err(format!(
            "{KEY_SETTING}: {}: more than one private key; the file must hold exactly one",
            path.display()
        ));
    }
    Ok(key)
}

/// The process-wide provider (ring, installed by `main`), or ring itself when none is installed:
/// the crate is built with ring only.
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn serial_hex(raw: &[u8]) -> String {
    // Like `openssl x509 -serial`: no DER sign byte, upper-case hex.
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02X}")).collect()
}

fn leaf_serial(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(serial_hex(cert.raw_serial()))
}

/// What a successful reload did.
enum Reloaded {
    Swapped { serial: String },
    Unchanged { serial: String },
}

/// Why a reload failed, and a key that identifies this failure (so the watcher logs it once).
struct ReloadFailure {
    message: String,
    key: String,
}

/// A TLS acceptor whose material can be swapped: each new connection uses the `ServerConfig`
/// current when it is accepted; open connections keep theirs. Clones share the material.
#[derive(Clone)]
pub struct RotatingAcceptor {
    current: Arc<ArcSwap<TlsMaterial>>,
    // Serialises read-and-swap, so a slow reload of older contents cannot overwrite a newer one.
    reload_lock: Arc<Mutex<()>>,
}

impl fmt::Debug for RotatingAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingAcceptor")
            .field("material", &*self.current.load())
            .finish()
    }
}

impl RotatingAcceptor {
    /// An acceptor serving `material` until the next successful reload.
    pub fn new(material: TlsMaterial) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(material)),
            reload_lock: Arc::new(Mutex::new(())),
        }
    }

    /// Runs the TLS handshake on `stream` with the current material. Fails with `TimedOut` when
    /// the handshake takes longer than 10 s, and with the rustls error (e.g. `peer sent no
    /// certificates`, `invalid peer certificate: UnknownIssuer`) when it is refused. Run it in the
    /// connection's own task, not in the accept loop.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(self.current.load().config.clone());
        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }

    /// Serial number (hex) of the leaf certificate now served.
    pub fn current_serial(&self) -> String {
        self.current.load().serial.clone()
    }

    fn reload_checked(&self, cfg: &TlsConfig) -> Result<Reloaded, ReloadFailure> {
        let _serial = self
            .reload_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let files = RawFiles::read(cfg).map_err(|message| ReloadFailure {
            key: message.clone(),
            message,
        })?;
        let fingerprint = files.fingerprint(&cfg.min_version);
        {
            let current = self.current.load();
            if current.fingerprint == fingerprint {
                return Ok(Reloaded::Unchanged {
                    serial: current.serial.clone(),
                });
            }
        }
        let material = TlsMaterial::build(cfg, &files).map_err(|message| ReloadFailure {
            message,
            key: fingerprint.iter().map(|b| format!("{b:02x}")).collect(),
        })?;
        let serial = material.serial.clone();
        self.current.store(Arc::new(material));
        Ok(Reloaded::Swapped { serial })
    }
}

/// The rotation of the TLS material: re-reads the files named by the paths now configured when
/// the reload module's file watcher sees a change in their directories, on SIGHUP, and when a
/// config reload changes a path or the minimum version. Logs "TLS certificate reloaded, serial …"
/// or the failure (the old material keeps serving; a failure is logged once until the files
/// change again) and counts `chatcli_tls_reloads_total{result="ok|error"}`.
pub struct TlsRotation {
    acceptor: RotatingAcceptor,
    /// The paths now configured. Held for the whole of each reload, so a reload that read the
    /// previous paths cannot swap their material in after a newer reload of the current ones.
    cfg: Mutex<TlsConfig>,
    reloads: IntCounterVec,
    /// The failure last logged, so a broken file is reported once, not on every unrelated event.
    last_failure: Mutex<Option<String>>,
}

impl fmt::Debug for TlsRotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsRotation")
            .field("dirs", &self.dirs())
            .finish_non_exhaustive()
    }
}

impl TlsRotation {
    /// Rotates `acceptor`'s material from the files of `cfg`; the reload counter is registered in
    /// `registry` when given.
    pub fn new(
        acceptor: RotatingAcceptor,
        cfg: TlsConfig,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Self, prometheus::Error> {
        let reloads = IntCounterVec::new(
            Opts::new(
                RELOADS_METRIC,
                "Reloads of the TLS certificate, key and client CA, by result.",
            ),
            &["result"],
        )?;
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        if let Some(registry) = registry {
            registry.register(Box::new(reloads.clone()))?;
        }
        Ok(Self {
            acceptor,
            cfg: Mutex::new(cfg),
            reloads,
            last_failure: Mutex::new(None),
        })
    }

    /// The directories whose changes may change the material: those of the certificate, key and
    /// client CA (directories, not files, so atomic renames and Kubernetes `..data` symlink swaps
    /// are seen) and, for a symlinked file, the directory of its target too.
    pub fn dirs(&self) -> Vec<PathBuf> {
        watched_dirs(&self.cfg.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// After a file event in [`dirs`](Self::dirs): reloads if the contents changed; a failure
    /// already reported for the same contents is not reported again.
    pub fn changed(&self) {
        let cfg = self.cfg.lock().unwrap_or_else(PoisonError::into_inner);
        match self.acceptor.reload_checked(&cfg) {
            Ok(Reloaded::Swapped { serial }) => self.ok(&serial),
            Ok(Reloaded::Unchanged { serial }) => {
                // The files are back to what is served: a later, identical breakage is news again.
                let had_failed = self
                    .last_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .is_some();
                if had_failed {
                    tracing::info!(serial = %serial, "TLS files restored, still serving serial {serial}");
                } else {
                    tracing::debug!("TLS files touched, contents unchanged");
                }
            }
            Err(failure) => {
                let mut last = self
                    .last_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if last.as_deref() == Some(failure.key.as_str()) {
                    return;
                }
                *last = Some(failure.key);
                drop(last);
                self.failed(&failure.message);
            }
        }
    }

    /// Reloads now (SIGHUP): always logs and counts the outcome, and returns the failure.
    pub fn reload(&self) -> Result<(), String> {
        let cfg = self.cfg.lock().unwrap_or_else(PoisonError::into_inner);
        match self.acceptor.reload_checked(&cfg) {
            Ok(Reloaded::Swapped { serial }) => {
                self.ok(&serial);
                Ok(())
            }
            Ok(Reloaded::Unchanged { serial }) => {
                tracing::info!(serial = %serial, "TLS files unchanged, still serving serial {serial}");
                Ok(())
            }
            Err(failure) => {
                *self
                    .last_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(failure.key);
                self.failed(&failure.message);
                Err(failure.message)
            }
        }
    }

    /// Switches to the files of `cfg` (a config reload changed a path or the minimum version):
    /// later file events and SIGHUP read these paths (the watcher asks [`dirs`](Self::dirs)
    /// again), and the material is reloaded from them now, like [`reload`](Self::reload).
    pub fn follow(&self, cfg: TlsConfig) -> Result<(), String> {
        *self.cfg.lock().unwrap_or_else(PoisonError::into_inner) = cfg;
        self.reload()
    }

    fn ok(&self, serial: &str) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.reloads.with_label_values(&["ok"]).inc();
        tracing::info!(serial = %serial, "TLS certificate reloaded, serial {serial}");
    }

    fn failed(&self, message: &str) {
        self.reloads.with_label_values(&["error"]).inc();
        tracing::error!(
            serial = %self.acceptor.current_serial(),
            "TLS reload failed, still serving the previous certificate: {message}"
        );
    }
}

fn watched_dirs(cfg: &TlsConfig) -> Vec<PathBuf> {
    let mut dirs = BTreeSet::new();
    for file in [&cfg.cert_file, &cfg.key_file, &cfg.client_ca_file]
        .into_iter()
        .flatten()
    {
        dirs.insert(parent_dir(file));
        // certbot's `live/` links into `archive/`: watch where the bytes are, too.
        if let Ok(target) = std::fs::canonicalize(file) {
            dirs.insert(parent_dir(&target));
        }
    }
    dirs.into_iter().collect()
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The identity of a verified client certificate: its first URI SAN, else its first DNS SAN, else
/// its subject CN. `None` when the certificate cannot be parsed or names nothing.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let sans: Vec<&GeneralName<'_>> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.iter().collect())
        .unwrap_or_default();
    let uri = sans.iter().find_map(|n| match n {
        GeneralName::URI(u) if !u.is_empty() => Some(*u),
        _ => None,
    });
    let dns = || {
        sans.iter().find_map(|n| match n {
            GeneralName::DNSName(d) if !d.is_empty() => Some(*d),
            _ => None,
        })
    };
    let cn = || {
        cert.subject()
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok().filter(|s| !s.is_empty()))
    };
    uri.or_else(dns).or_else(cn).map(str::to_owned)
}

/// Extension put into each request of a TLS connection by the accept loop: the verified client
/// chain (leaf first). Absent on connections without a client certificate.
#[derive(Clone, Debug)]
pub struct PeerCertificates(pub Arc<Vec<CertificateDer<'static>>>);

impl PeerCertificates {
    /// The verified client chain of an accepted connection, if the client presented one.
    pub fn from_stream(stream: &TlsStream<TcpStream>) -> Option<Self> {
        let (_, conn) = stream.get_ref();
        conn.peer_certificates()
            .filter(|chain| !chain.is_empty())
            .map(|chain| Self(Arc::new(chain.to_vec())))
    }

    /// The client's own certificate.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.0.first()
    }

    /// [`peer_identity`] of the leaf.
    pub fn identity(&self) -> Option<String> {
        self.leaf().and_then(peer_identity)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };
    use std::future::Future;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream as ClientTlsStream;

    /// Guards against hangs only; nothing asserts on time.
    async fn bounded<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("test step hung")
    }

    fn init() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    type Ca = CertifiedIssuer<'static, KeyPair>;

    fn new_ca(name: &str) -> Ca {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    struct Leaf {
        cert_pem: String,
        der: CertificateDer<'static>,
        key: KeyPair,
    }

    fn leaf(ca: &Ca, sans: Vec<SanType>, cn: Option<&str>, serial: u64, server: bool) -> Leaf {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p.serial_number = Some(SerialNumber::from(serial));
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &**ca).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            key,
        }
    }

    fn server_leaf(ca: &Ca, serial: u64) -> Leaf {
        leaf(
            ca,
            vec![SanType::DnsName("localhost".try_into().unwrap())],
            Some("chatcli test server"),
            serial,
            true,
        )
    }

    struct Files {
        dir: tempfile::TempDir,
        cfg: TlsConfig,
    }

    /// Writes cert, key (and the client CA) into a fresh directory, `tls/` inside a tempdir.
    fn write_files(server: &Leaf, client_ca: Option<&Ca>, min_version: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls).unwrap();
        std::fs::write(tls.join("cert.pem"), &server.cert_pem).unwrap();
        std::fs::write(tls.join("key.pem"), server.key.serialize_pem()).unwrap();
        let client_ca_file = client_ca.map(|ca| {
            let p = tls.join("client-ca.pem");
            std::fs::write(&p, ca.pem()).unwrap();
            p
        });
        let cfg = TlsConfig {
            cert_file: Some(tls.join("cert.pem")),
            key_file: Some(tls.join("key.pem")),
            client_ca_file,
            min_version: min_version.into(),
        };
        Files { dir, cfg }
    }

    /// Replaces `name` in `dir` the way deployment tools do: write a temp file, rename over.
    fn atomic_write(dir: &Path, name: &str, contents: &str) {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    fn client_config(
        ca: &Ca,
        versions: &[&'static rustls::SupportedProtocolVersion],
        identity: Option<&Leaf>,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
        let mut cfg = match identity {
            Some(leaf) => builder
                .with_client_auth_cert(
                    vec![leaf.der.clone()],
                    PrivateKeyDer::try_from(leaf.key.serialize_der()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    async fn connect(
        addr: std::net::SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
    ) -> io::Result<ClientTlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        TlsConnector::from(cfg).connect(name, tcp).await
    }

    async fn bind() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// Accepts one connection and hands back the handshake result (and the client chain).
    fn accept_one(
        listener: TcpListener,
        acceptor: RotatingAcceptor,
    ) -> tokio::task::JoinHandle<io::Result<Option<PeerCertificates>>> {
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let tls = acceptor.accept(tcp).await?;
            let peer = PeerCertificates::from_stream(&tls);
            echo(tls).await;
            Ok(peer)
        })
    }

    async fn echo(mut tls: TlsStream<TcpStream>) {
        let mut buf = [0u8; 64];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn roundtrip(c: &mut ClientTlsStream<TcpStream>, msg: &[u8]) -> io::Result<Vec<u8>> {
        c.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        c.read_exact(&mut buf).await?;
        Ok(buf)
    }

    fn served_serial(c: &ClientTlsStream<TcpStream>) -> String {
        let certs = c.get_ref().1.peer_certificates().unwrap();
        leaf_serial(&certs[0]).unwrap()
    }

    /// A client the server refuses: the handshake or the first exchange fails on the client, and
    /// the server's `accept` returns the reason.
    async fn refused(
        acceptor: &RotatingAcceptor,
        cfg: Arc<rustls::ClientConfig>,
    ) -> (io::Error, bool) {
        let (listener, addr) = bind().await;
        let server = accept_one(listener, acceptor.clone());
        let client_ok = match bounded(connect(addr, cfg)).await {
            // TLS 1.3: the client finishes before the server has checked its certificate.
            Ok(mut c) => bounded(roundtrip(&mut c, b"x")).await.is_ok(),
            Err(_) => false,
        };
        let err = bounded(server).await.unwrap().unwrap_err();
        (err, client_ok)
    }

    #[tokio::test]
    async fn tls13_handshake_negotiates_h2_and_http11() {
        init();
        let ca = new_ca("test CA");
        let server = server_leaf(&ca, 0x1001);
        let f = write_files(&server, None, "1.3");
        let acceptor = RotatingAcceptor::new(TlsMaterial::load(&f.cfg).unwrap());
        assert_eq!(acceptor.current_serial(), "1001");

        for (offered, expected) in [
            (&[b"h2".as_slice(), b"http/1.1"][..], b"h2".as_slice()),
            (&[b"http/1.1".as_slice()][..], b"http/1.1".as_slice()),
        ] {
            let (listener, addr) = bind().await;
            let task = accept_one(listener, acceptor.clone());
            let mut c = bounded(connect(
                addr,
                client_config(&ca, &[&rustls::version::TLS13], None, offered),
            ))
            .await
            .unwrap();
            assert_eq!(
                c.get_ref().1.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            assert_eq!(c.get_ref().1.alpn_protocol(), Some(expected));
            assert_eq!(bounded(roundtrip(&mut c, b"ping")).await.unwrap(), b"ping");
            assert_eq!(served_serial(&c), "1001");
            drop(c);
            // No client CA: no client certificate asked for or recorded.
            assert!(bounded(task).await.unwrap().unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn min_version_13_refuses_a_tls12_client_and_12_accepts_it() {
        init();
        let ca = new_ca("test CA");
        let server = server_leaf(&ca, 7);
        let tls12_only = || client_config(&ca, &[&rustls::version::TLS12], None, &[b"h2"]);

        let f13 = write_files(&server, None, "1.3");
        let strict = RotatingAcceptor::new(TlsMaterial::load(&f13.cfg).unwrap());
        let (_err, client_ok) = refused(&strict, tls12_only()).await;
        assert!(
            !client_ok,
            "a TLS 1.2-only client got through a 1.3-only server"
        );

        let f12 = write_files(&server, None, "1.2");
        let lenient = RotatingAcceptor::new(TlsMaterial::load(&f12.cfg).unwrap());
        let (listener, addr) = bind().await;
        let task = accept_one(listener, lenient);
        let mut c = bounded(connect(addr, tls12_only())).await.unwrap();
        assert_eq!(
            c.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert_eq!(c.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
        assert_eq!(bounded(roundtrip(&mut c, b"hi")).await.unwrap(), b"hi");
        drop(c);
        bounded(task).await.unwrap().unwrap();
    }

    #[test]
    fn load_errors_name_the_setting_and_the_file() {
        init();
        let ca = new_ca("test CA");
        let server = server_leaf(&ca, 1);
        let f = write_files(&server, Some(&ca), "1.3");
        assert!(TlsMaterial::load(&f.cfg).unwrap().client_auth);
        let dir = f.dir.path();

        let err = |cfg: &TlsConfig| TlsMaterial::load(cfg).unwrap_err();

        // Missing file.
        let missing = dir.join("nope.pem");
        let mut cfg = f.cfg.clone();
        cfg.cert_file = Some(missing.clone());
        let e = err(&cfg);
        assert!(e.starts_with("server.tls.cert_file: "), "{e}");
        assert!(e.contains(&missing.display().to_string()), "{e}");

        // Directory instead of a file.
        let mut cfg = f.cfg.clone();
        cfg.client_ca_file = Some(dir.to_path_buf());
        let e = err(&cfg);
        assert_eq!(
            e,
            format!(
                "server.tls.client_ca_file: {} is a directory",
                dir.display()
            )
        );

        // PEM that is not a key (the certificate given as the key).
        let mut cfg = f.cfg.clone();
        cfg.key_file = f.cfg.cert_file.clone();
        let e = err(&cfg);
        assert!(e.starts_with("server.tls.key_file: "), "{e}");
        assert!(e.contains("no private key found"), "{e}");

        // Not PEM at all.
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello, this is not a certificate\n").unwrap();
        let mut cfg = f.cfg.clone();
        cfg.cert_file = Some(junk.clone());
        let e = err(&cfg);
        assert_eq!(
            e,
            format!(
                "server.tls.cert_file: {}: not PEM (no -----BEGIN …----- section)",
                junk.display()
            )
        );

        // A key PEM that is not a certificate, as the certificate.
        let mut cfg = f.cfg.clone();
        cfg.cert_file = f.cfg.key_file.clone();
        let e = err(&cfg);
        assert!(e.starts_with("server.tls.cert_file: "), "{e}");
        assert!(e.ends_with("no certificate found"), "{e}");

        // Broken key PEM: the message must not quote the file.
        let broken = dir.join("broken-key.pem");
        std::fs::write(
            &broken,
            "-----BEGIN PRIVATE KEY-----\nSUPERSECRET!!*\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let mut cfg = f.cfg.clone();
        cfg.key_file = Some(broken);
        let e = err(&cfg);
        assert!(e.starts_with("server.tls.key_file: "), "{e}");
        assert!(e.contains("not PEM"), "{e}");
        assert!(!e.contains("SUPERSECRET"), "{e}");

        // A key that does not match the certificate.
        let other_key = dir.join("other-key.pem");
        std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let mut cfg = f.cfg.clone();
        cfg.key_file = Some(other_key);
        let e = err(&cfg);
        assert!(e.starts_with("server.tls.key_file: "), "{e}");
        assert!(e.contains("does not match the certificate"), "{e}");

        // Unknown TLS version; key not configured.
        let mut cfg = f.cfg.clone();
        cfg.min_version = "1.1".into();
        assert!(err(&cfg).starts_with("server.tls.min_version: "));
        let mut cfg = f.cfg.clone();
        cfg.key_file = None;
        assert!(err(&cfg).starts_with("server.tls.key_file: not set"));

        // Debug output never shows the key.
        let m = TlsMaterial::load(&f.cfg).unwrap();
        let shown = format!("{m:?}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
        assert!(shown.contains(&m.serial), "{shown}");
    }

    #[tokio::test]
    async fn mtls_requires_a_certificate_from_the_client_ca() {
        init();
        let ca = new_ca("server CA");
        let client_ca = new_ca("client CA");
        let server = server_leaf(&ca, 42);
        let f = write_files(&server, Some(&client_ca), "1.3");
        let acceptor = RotatingAcceptor::new(TlsMaterial::load(&f.cfg).unwrap());
        let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

        // No client certificate.
        let (e, client_ok) = refused(&acceptor, client_config(&ca, v13, None, &[b"h2"])).await;
        assert!(!client_ok);
        assert!(e.to_string().contains("peer sent no certificates"), "{e}");

        // A certificate from another CA.
        let stranger_ca = new_ca("stranger CA");
        let stranger = leaf(
            &stranger_ca,
            vec![SanType::URI("spiffe://test/mallory".try_into().unwrap())],
            Some("mallory"),
            5,
            false,
        );
        let (e, client_ok) = refused(
            &acceptor,
            client_config(&ca, v13, Some(&stranger), &[b"h2"]),
        )
        .await;
        assert!(!client_ok);
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");

        // A good certificate: URI SAN wins over DNS SAN and CN.
        let alice = leaf(
            &client_ca,
            vec![
                SanType::DnsName("alice.example".try_into().unwrap()),
                SanType::URI("spiffe://test/alice".try_into().unwrap()),
            ],
            Some("alice-cn"),
            6,
            false,
        );
        let (listener, addr) = bind().await;
        let task = accept_one(listener, acceptor.clone());
        let mut c = bounded(connect(
            addr,
            client_config(&ca, v13, Some(&alice), &[b"h2"]),
        ))
        .await
        .unwrap();
        assert_eq!(
            bounded(roundtrip(&mut c, b"hello")).await.unwrap(),
            b"hello"
        );
        drop(c);
        let peer = bounded(task).await.unwrap().unwrap().expect("client chain");
        assert_eq!(peer.leaf(), Some(&alice.der));
        assert_eq!(peer.identity().as_deref(), Some("spiffe://test/alice"));
        assert_eq!(
            peer_identity(&alice.der).as_deref(),
            Some("spiffe://test/alice")
        );
    }

    #[test]
    fn peer_identity_falls_back_to_dns_san_then_cn() {
        let ca = new_ca("client CA");
        let dns_only = leaf(
            &ca,
            vec![SanType::DnsName("bob.example".try_into().unwrap())],
            Some("bob-cn"),
            8,
            false,
        );
        assert_eq!(peer_identity(&dns_only.der).as_deref(), Some("bob.example"));
        let cn_only = leaf(&ca, vec![], Some("carol"), 9, false);
        assert_eq!(peer_identity(&cn_only.der).as_deref(), Some("carol"));
        let nameless = leaf(&ca, vec![], None, 10, false);
        assert_eq!(peer_identity(&nameless.der), None);
        assert_eq!(peer_identity(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    #[tokio::test]
    async fn reload_serves_new_connections_and_keeps_open_ones() {
        init();
        let ca = new_ca("test CA");
        let old = server_leaf(&ca, 0xA1);
        let f = write_files(&old, None, "1.3");
        let acceptor = RotatingAcceptor::new(TlsMaterial::load(&f.cfg).unwrap());
        let client = client_config(&ca, &[&rustls::version::TLS13], None, &[b"h2"]);
        let (listener, addr) = bind().await;
        let server = {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            echo(tls).await;
                        }
                    });
                }
            })
        };

        let mut before = bounded(connect(addr, client.clone())).await.unwrap();
        assert_eq!(bounded(roundtrip(&mut before, b"a")).await.unwrap(), b"a");
        assert_eq!(served_serial(&before), "A1");

        // New pair on disk, reloaded.
        let new = server_leaf(&ca, 0xB2);
        let tls_dir = f.cfg.cert_file.as_ref().unwrap().parent().unwrap();
        atomic_write(tls_dir, "cert.pem", &new.cert_pem);
        atomic_write(tls_dir, "key.pem", &new.key.serialize_pem());
        let rotation = TlsRotation::new(acceptor.clone(), f.cfg.clone(), None).unwrap();
        rotation.reload().unwrap();
        assert_eq!(acceptor.current_serial(), "B2");

        let mut after = bounded(connect(addr, client.clone())).await.unwrap();
        assert_eq!(served_serial(&after), "B2");
        assert_eq!(bounded(roundtrip(&mut after, b"b")).await.unwrap(), b"b");
        // The connection opened before the reload carries on with its certificate.
        assert_eq!(bounded(roundtrip(&mut before, b"c")).await.unwrap(), b"c");
        assert_eq!(served_serial(&before), "A1");

        // A mismatched key is refused; the last good pair keeps serving.
        let stray = KeyPair::generate().unwrap();
        let third = server_leaf(&ca, 0xC3);
        atomic_write(tls_dir, "cert.pem", &third.cert_pem);
        atomic_write(tls_dir, "key.pem", &stray.serialize_pem());
        let e = rotation.reload().unwrap_err();
        assert!(e.contains("does not match the certificate"), "{e}");
        assert_eq!(acceptor.current_serial(), "B2");
        let mut later = bounded(connect(addr, client)).await.unwrap();
        assert_eq!(served_serial(&later), "B2");
        assert_eq!(bounded(roundtrip(&mut later, b"d")).await.unwrap(), b"d");

        server.abort();
    }

    fn counter(registry: &prometheus::Registry, result: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|mf| mf.name() == RELOADS_METRIC)
            .flat_map(|mf| mf.get_metric().iter())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "result" && l.value() == result)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    #[test]
    fn a_broken_pair_is_reported_once_until_the_files_change_again() {
        init();
        let ca = new_ca("test CA");
        let good = server_leaf(&ca, 0x61);
        let f = write_files(&good, None, "1.3");
        let acceptor = RotatingAcceptor::new(TlsMaterial::load(&f.cfg).unwrap());
        let registry = prometheus::Registry::new();
        let reloader = TlsRotation::new(acceptor.clone(), f.cfg.clone(), Some(&registry)).unwrap();
        let tls_dir = f.cfg.cert_file.as_ref().unwrap().parent().unwrap();
        let stray = KeyPair::generate().unwrap().serialize_pem();

        atomic_write(tls_dir, "key.pem", &stray);
        reloader.changed();
        reloader.changed();
        assert_eq!(
            counter(&registry, "error"),
            1,
            "same broken files reported twice"
        );

        // Back to the served pair: nothing swapped or counted, but the next breakage is news.
        atomic_write(tls_dir, "key.pem", &good.key.serialize_pem());
        reloader.changed();
        assert_eq!(counter(&registry, "ok"), 0);
        atomic_write(tls_dir, "key.pem", &stray);
        reloader.changed();
        assert_eq!(counter(&registry, "error"), 2);
        assert_eq!(acceptor.current_serial(), "61");

        // A missing file is a failure too, and the old pair keeps serving.
        std::fs::remove_file(tls_dir.join("key.pem")).unwrap();
        reloader.changed();
        assert_eq!(counter(&registry, "error"), 3);
        assert_eq!(acceptor.current_serial(), "61");
    }

    #[test]
    fn a_new_minimum_version_alone_is_a_change() {
        init();
        let ca = new_ca("test CA");
        let f = write_files(&server_leaf(&ca, 0x71), None, "1.3");
        let acceptor = RotatingAcceptor::new(TlsMaterial::load(&f.cfg).unwrap());
        let tls12 = TlsConfig {
            min_version: "1.2".into(),
            ..f.cfg.clone()
        };
        assert!(matches!(
            acceptor.reload_checked(&tls12),
            Ok(Reloaded::Swapped { .. })
        ));
        assert!(matches!(
            acceptor.reload_checked(&tls12),
            Ok(Reloaded::Unchanged { .. })
        ));
    }
}
