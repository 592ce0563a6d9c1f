//! JSON Web Token verification (`[auth.jwt]`): the keys (an HS256 secret, a PEM public key, a
//! JWKS file), the choice of key for a token, and the claims check that turns a token into a
//! [`Principal`].
//!
//! The algorithm always comes from the key, never from the token: each configured key verifies
//! exactly one algorithm (secret → HS256, RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA; a JWKS
//! RSA key may name another RSA algorithm in its own `alg`), and the token's `alg` only selects
//! among the configured keys. So `alg: none` matches no key, and an HS256 token can never be
//! checked with a public key used as an HMAC secret.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, Validation};
use x509_parser::asn1_rs::{FromDer, Oid};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::pem::Pem;
use x509_parser::public_key::RSAPublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{AuthMethod, Principal, Role};
use crate::config::{JwtConfig, Secret};
use crate::config::{credential_path, credentials_directory, read_credential};

/// Longer tokens are refused before any parsing (HTTP servers cap headers near this anyway).
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Smaller RSA moduli are refused at start-up: they are factorable.
const MIN_RSA_BITS: usize = 2048;
/// The RSA implementation refuses larger moduli at every verification; say so at start-up instead.
const MAX_RSA_BITS: usize = 4096;
/// Longest accepted `sub`: it becomes the principal id in logs, audit lines and session paths.
const MAX_SUB_LEN: usize = 256;
/// RFC 7518 §3.2: an HS256 key should have at least 256 bits.
const MIN_SECRET_LEN: usize = 32;
/// Most public-key tokens remembered as verified ([`VerifiedTokens`]).
const VERIFIED_MAX: usize = 1024;

/// Why a token was refused. The caller only ever sees a generic "authentication failed"; this
/// goes to the log and the audit line, so it carries nothing secret (the token's `alg` is
/// shortened and stripped of non-printable characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, or a part is not the JSON it should be.
    #[error("malformed token")]
    Malformed,
    /// The token's `kid` matches no configured key (or it has no `kid` and several JWKS keys fit).
    #[error("no configured key matches the token")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is past, beyond the leeway.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` names none of the configured audiences.
    #[error("wrong audience")]
    WrongAudience,
    /// A required claim is absent (or not of the type it must have).
    #[error("missing claim `{0}`")]
    MissingClaim(&'static str),
    /// A claim is present but unusable (e.g. an empty `sub`, a non-numeric `exp`).
    #[error("invalid claim `{0}`")]
    InvalidClaim(&'static str),
    /// The token's `alg` is not the algorithm of any configured key (e.g. `none`, or HS256 when
    /// only a public key is configured).
    #[error("algorithm {0:?} not allowed")]
    AlgorithmNotAllowed(String),
    /// The selected key could not be used for this token (should not happen: keys are checked
    /// at load).
    #[error("the configured key cannot verify this token")]
    Unverifiable,
    /// Only the cheap checks were allowed ([`JwtVerifier::verify_cheap`]) and this token's
    /// signature is a public-key one that has not verified before.
    #[error(
        "signature not checked: the client address is throttled and this token has not verified before"
    )]
    NotChecked,
}

/// Where a key came from (for `Debug` and for the key choice: JWKS keys are chosen by `kid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeySource {
    Secret,
    PublicKeyFile,
    Jwks,
}

/// One key, pinned to one algorithm, with the validation rules for tokens signed by it.
#[derive(Clone)]
struct VerifyKey {
    source: KeySource,
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("source", &self.source)
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Verifies bearer JWTs against the configured keys. Files are read once, by
/// [`JwtVerifier::from_config`]; a config reload builds a new verifier.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Vec<VerifyKey>,
    /// How many of `keys` came from the JWKS file.
    jwks_keys: usize,
    issuer: Option<String>,
    audience: Vec<String>,
    leeway: Duration,
    /// Public-key tokens that verified with these keys (shared by clones).
    verified: Arc<VerifiedTokens>,
}

/// The public-key tokens that verified recently, by the SHA-256 of the token, each with its
/// principal and the last Unix second it is valid (`exp` plus the leeway), at most
/// [`VERIFIED_MAX`] of them. [`JwtVerifier::verify_cheap`] admits such a token again without
/// checking its signature: the same bytes verified before, and only `exp` can have changed its
/// validity since (`nbf` only moves towards valid, and `iss`/`aud` are in the signed bytes).
///
/// It belongs to the verifier, which a reload rebuilds: a key that is removed or replaced also
/// forgets the tokens it verified. Only successful verifications add entries, so a caller without
/// a valid token cannot fill it; when it is full, expired entries go first, then the one that
/// expires soonest.
#[derive(Default)]
struct VerifiedTokens {
    entries: Mutex<HashMap<[u8; 32], VerifiedToken>>,
}

struct VerifiedToken {
    principal: Principal,
    valid_until: u64,
}

impl VerifiedTokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], VerifiedToken>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The principal of the token with this digest, if it verified and is still valid at `now`.
    fn get(&self, digest: &[u8; 32], now: u64) -> Option<Principal> {
        self.lock()
            .get(digest)
            .filter(|t| now <= t.valid_until)
            .map(|t| t.principal.clone())
    }

    fn insert(&self, digest: [u8; 32], token: VerifiedToken, now: u64) {
        let mut entries = self.lock();
        if entries.contains_key(&digest) {
            return;
        }
        if entries.len() >= VERIFIED_MAX {
            entries.retain(|_, t| now <= t.valid_until);
        }
        if entries.len() >= VERIFIED_MAX
            && let Some(soonest) = entries
                .iter()
                .min_by_key(|(_, t)| t.valid_until)
                .map(|(d, _)| *d)
        {
            entries.remove(&soonest);
        }
        entries.insert(digest, token);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The current Unix time in seconds (what jsonwebtoken compares `exp` with).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `alg` is an HMAC: verifying it costs about as much as hashing the token.
fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).into()
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// The header fields read before the key is chosen. Parsed here rather than with
/// `jsonwebtoken::decode_header`, which fails on an `alg` it does not know (such as `none`) and
/// so could not say why the token was refused.
#[derive(serde::Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The claims turned into a principal. Loosely typed so that an odd `role` or `email` makes the
/// claim absent instead of the whole token unreadable; `exp`, `nbf`, `iss`, `aud` and `sub`
/// are type-checked by jsonwebtoken's validation.
#[derive(serde::Deserialize)]
struct RawClaims {
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    role: Option<serde_json::Value>,
    #[serde(default)]
    email: Option<serde_json::Value>,
    #[serde(default)]
    tenant_id: Option<serde_json::Value>,
}

impl JwtVerifier {
    /// Builds the verifier from `[auth.jwt]`; `None` when no key is configured (no `secret`,
    /// `secret_file`, `public_key_file` or `jwks_file`). Relative file paths are looked up in
    /// `$CREDENTIALS_DIRECTORY` when that is set, as for the other `*_file` settings.
    ///
    /// Errors name the setting, e.g. `auth.jwt.public_key_file: /x.pem is not a PEM public key`;
    /// several problems are reported one per line. They never contain key material.
    pub fn from_config(cfg: &JwtConfig) -> Result<Option<Self>, String> {
        Self::from_config_in(cfg, credentials_directory().as_deref())
    }

    /// [`Self::from_config`] with the credentials directory given explicitly.
    pub fn from_config_in(cfg: &JwtConfig, creds: Option<&Path>) -> Result<Option<Self>, String> {
        let mut problems = Vec::new();
        let issuer = match &cfg.issuer {
            Some(iss) if iss.trim().is_empty() => {
                problems.push("auth.jwt.issuer: empty".to_string());
                None
            }
            other => other.clone(),
        };
        if cfg.audience.iter().any(|a| a.trim().is_empty()) {
            problems.push("auth.jwt.audience: contains an empty value".to_string());
        }
        let audience = cfg.audience.clone();

        // (source, alg, kid, key) before the validation rules are attached.
        let mut loaded: Vec<(KeySource, Algorithm, Option<String>, DecodingKey)> = Vec::new();

        // The config loader has normally read `secret_file` into `secret` already (and keeps
        // `secret_file` set, so a problem is named after the file); it is read here only when the
        // config did not come through the loader.
        let secret_setting = if cfg.secret_file.is_some() {
            "auth.jwt.secret_file"
        } else {
            "auth.jwt.secret"
        };
        let secret = match (&cfg.secret, &cfg.secret_file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(file)) => match read_credential(&credential_path(file, creds)) {
                Ok(s) => Some(Secret::new(s)),
                Err(e) => {
                    problems.push(format!("auth.jwt.secret_file: {e}"));
                    None
                }
            },
            (None, None) => None,
        };
        if let Some(secret) = &secret {
            let s = secret.expose();
            if s.trim().is_empty() {
                problems.push(format!("{secret_setting}: empty"));
            } else if s.trim_start().starts_with("-----BEGIN") {
                problems.push(format!(
                    "{secret_setting}: holds a PEM block, not an HMAC secret; a public key belongs in \
                     auth.jwt.public_key_file (used as an HMAC secret, anyone holding the public key \
                     could sign tokens)"
                ));
            } else {
                if s.len() < MIN_SECRET_LEN {
                    tracing::warn!(
                        setting = secret_setting,
                        "the JWT secret is shorter than {MIN_SECRET_LEN} bytes; HS256 wants at least 256 bits"
                    );
                }
                loaded.push((
                    KeySource::Secret,
                    Algorithm::HS256,
                    None,
                    DecodingKey::from_secret(s.as_bytes()),
                ));
            }
        }

        if let Some(file) = &cfg.public_key_file {
            match load_public_key(&credential_path(file, creds)) {
                Ok((alg, key)) => loaded.push((KeySource::PublicKeyFile, alg, None, key)),
                Err(e) => problems.push(format!("auth.jwt.public_key_file: {e}")),
            }
        }

        if let Some(file) = &cfg.jwks_file {
            match load_jwks(&credential_path(file, creds)) {
                Ok(keys) => loaded.extend(
                    keys.into_iter()
                        .map(|(alg, kid, key)| (KeySource::Jwks, alg, kid, key)),
                ),
                Err(e) => problems.push(format!("auth.jwt.jwks_file: {e}")),
            }
        }

        let any_key_configured = cfg.secret.is_some()
            || cfg.secret_file.is_some()
            || cfg.public_key_file.is_some()
            || cfg.jwks_file.is_some();
        if !any_key_configured && (cfg.issuer.is_some() || !cfg.audience.is_empty()) {
            problems.push(
                "auth.jwt: issuer or audience is set but no key is (auth.jwt.secret, \
                 auth.jwt.public_key_file or auth.jwt.jwks_file)"
                    .to_string(),
            );
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        if loaded.is_empty() {
            return Ok(None);
        }

        let jwks_keys = loaded
            .iter()
            .filter(|(s, ..)| *s == KeySource::Jwks)
            .count();
        let keys = loaded
            .into_iter()
            .map(|(source, alg, kid, key)| VerifyKey {
                source,
                alg,
                kid,
                key,
                validation: validation(alg, issuer.as_deref(), &audience, cfg.leeway),
            })
            .collect();
        Ok(Some(Self {
            keys,
            jwks_keys,
            issuer,
            audience,
            leeway: cfg.leeway,
            verified: Arc::default(),
        }))
    }

    /// Verifies a bearer token (without the `Bearer ` prefix) and returns its principal:
    /// `sub` → id, `role` → role (missing or unknown → user), `email`, `tenant_id`. A token
    /// signed with a public key is remembered as verified until it expires (see
    /// [`Self::verify_cheap`]).
    pub fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        let key = self.key_for(token)?;
        self.decode(token, key)
    }

    /// [`Self::verify`] limited to what costs about as much as hashing the token, for callers
    /// whose address the failed-auth limiter throttles:
    ///
    /// - a token whose key is an HMAC secret (HS256) is verified in full: an HMAC is cheap;
    /// - a token whose key is a public one (RS256, ES256, EdDSA, JWKS) is admitted only if the
    ///   very same token verified before with these keys and has not expired (by `exp` plus the
    ///   leeway), and is otherwise refused with [`JwtError::NotChecked`] without checking its
    ///   signature. A public-key token that the server has never seen must wait until the
    ///   address is no longer throttled, or come from another address.
    pub fn verify_cheap(&self, token: &str) -> Result<Principal, JwtError> {
        let key = self.key_for(token)?;
        if is_hmac(key.alg) {
            return self.decode(token, key);
        }
        self.verified
            .get(&digest(token), unix_now())
            .ok_or(JwtError::NotChecked)
    }

    /// The configured key that must verify `token`, from its header.
    fn key_for(&self, token: &str) -> Result<&VerifyKey, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed);
        }
        let header = parse_header(token)?;
        self.select_key(&header)
    }

    /// Checks the signature and the claims of `token` with `key`; a public-key token that passes
    /// is remembered in [`VerifiedTokens`].
    fn decode(&self, token: &str, key: &VerifyKey) -> Result<Principal, JwtError> {
        let data = jsonwebtoken::decode::<RawClaims>(token, &key.key, &key.validation)
            .map_err(|e| map_error(&e, key.alg))?;
        let exp = match &data.claims.exp {
            Some(serde_json::Value::Number(n)) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f as u64)
            }),
            _ => None,
        };
        let principal = principal(data.claims)?;
        if !is_hmac(key.alg)
            && let Some(exp) = exp
        {
            self.verified.insert(
                digest(token),
                VerifiedToken {
                    principal: principal.clone(),
                    valid_until: exp.saturating_add(self.leeway.as_secs()),
                },
                unix_now(),
            );
        }
        Ok(principal)
    }

    /// The key for this token. The token's `alg` only selects: it must be the pinned algorithm of
    /// a configured key. A `kid` selects among the JWKS keys; the secret and the PEM key have no
    /// kid and serve tokens of their algorithm whatever kid they carry. A token without `kid`
    /// falls back to the JWKS only when that holds exactly one key.
    fn select_key(&self, header: &RawHeader) -> Result<&VerifyKey, JwtError> {
        let not_allowed = || JwtError::AlgorithmNotAllowed(printable(&header.alg));
        let alg = Algorithm::from_str(&header.alg).map_err(|_| not_allowed())?;
        if !self.keys.iter().any(|k| k.alg == alg) {
            return Err(not_allowed());
        }
        let jwks = || self.keys.iter().filter(|k| k.source == KeySource::Jwks);
        if let Some(kid) = &header.kid {
            let mut named = jwks().filter(|k| k.kid.as_deref() == Some(kid)).peekable();
            if named.peek().is_some() {
                return named.find(|k| k.alg == alg).ok_or_else(not_allowed);
            }
        }
        if let Some(k) = self
            .keys
            .iter()
            .find(|k| k.source != KeySource::Jwks && k.alg == alg)
        {
            return Ok(k);
        }
        if header.kid.is_none() && self.jwks_keys == 1 {
            return jwks().find(|k| k.alg == alg).ok_or_else(not_allowed);
        }
        Err(JwtError::UnknownKey)
    }
}

/// Validation rules for tokens verified by a key of algorithm `alg`.
fn validation(
    alg: Algorithm,
    issuer: Option<&str>,
    audience: &[String],
    leeway: Duration,
) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    // jsonwebtoken only compares `iss`/`aud` when present; require them so that a token without
    // them does not slip past a configured check.
    if let Some(iss) = issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    if audience.is_empty() {
        // Otherwise jsonwebtoken refuses every token that carries an `aud`.
        v.validate_aud = false;
    } else {
        v.set_audience(audience);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn parse_header(token: &str) -> Result<RawHeader, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let json = b64url_decode(header).ok_or(JwtError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| JwtError::Malformed)
}

fn map_error(e: &jsonwebtoken::errors::Error, alg: Algorithm) -> JwtError {
    match e.kind() {
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => JwtError::MissingClaim(claim_name(c)),
        ErrorKind::InvalidClaimFormat(c) => JwtError::InvalidClaim(claim_name(c)),
        ErrorKind::InvalidAlgorithm => JwtError::AlgorithmNotAllowed(format!("{alg:?}")),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => JwtError::Malformed,
        _ => JwtError::Unverifiable,
    }
}

/// The registered claim names jsonwebtoken reports, as `'static` strings.
fn claim_name(c: &str) -> &'static str {
    match c {
        "exp" => "exp",
        "nbf" => "nbf",
        "iss" => "iss",
        "aud" => "aud",
        "sub" => "sub",
        _ => "unknown",
    }
}

fn principal(claims: RawClaims) -> Result<Principal, JwtError> {
    let Some(serde_json::Value::String(sub)) = claims.sub else {
        return Err(JwtError::MissingClaim("sub"));
    };
    if sub.trim().is_empty() || sub.len() > MAX_SUB_LEN || sub.chars().any(char::is_control) {
        return Err(JwtError::InvalidClaim("sub"));
    }
    let role = match &claims.role {
        Some(serde_json::Value::String(r)) => Role::from_claim(r),
        _ => Role::User,
    };
    let email = match claims.email {
        Some(serde_json::Value::String(e)) if !e.is_empty() => Some(e),
        _ => None,
    };
    let tenant_id = match claims.tenant_id {
        Some(serde_json::Value::String(t)) if !t.is_empty() => Some(t),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(Principal {
        id: sub,
        role,
        method: AuthMethod::Jwt,
        email,
        tenant_id,
    })
}

/// The token's `alg`, fit for a log line: at most 16 printable ASCII characters.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(16)
        .collect()
}

/// Unpadded base64url (RFC 7515 §2), as used by JWS compact serialization.
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Whether jsonwebtoken can build a verifier for this key (EC points and Ed25519 keys are
/// decoded there); a dummy signature failing is expected, an error is not.
fn key_usable(alg: Algorithm, key: &DecodingKey) -> bool {
    jsonwebtoken::crypto::verify("", b"probe", key, alg).is_ok()
}

/// Bits of a big-endian unsigned integer.
fn bit_len(bytes: &[u8]) -> usize {
    let bytes = match bytes.iter().position(|b| *b != 0) {
        Some(i) => &bytes[i..],
        None => return 0,
    };
    let lead = usize::try_from(bytes[0].leading_zeros()).unwrap_or(0);
    bytes.len() * 8 - lead
}

fn check_rsa_bits(bits: usize) -> Result<(), String> {
    if bits < MIN_RSA_BITS {
        Err(format!(
            "is a {bits}-bit RSA key; at least {MIN_RSA_BITS} bits are required"
        ))
    } else if bits > MAX_RSA_BITS {
        Err(format!(
            "is a {bits}-bit RSA key; at most {MAX_RSA_BITS} bits are supported"
        ))
    } else {
        Ok(())
    }
}

/// Reads a PEM public key (`PUBLIC KEY`, `RSA PUBLIC KEY`, or the key of a `CERTIFICATE`) and
/// pins its algorithm by its type. Errors start with the path and never quote the file.
fn load_public_key(path: &Path) -> Result<(Algorithm, DecodingKey), String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let not_a_key = || format!("{shown} is not a PEM public key");
    let mut private_seen = false;
    for block in Pem::iter_from_buffer(&bytes) {
        let Ok(block) = block else {
            return Err(not_a_key());
        };
        let result = match block.label.as_str() {
            "PUBLIC KEY" => spki_key(&block.contents),
            "RSA PUBLIC KEY" => rsa_key(&block.contents),
            "CERTIFICATE" => match x509_parser::parse_x509_certificate(&block.contents) {
                Ok((_, cert)) => spki_key(cert.public_key().raw),
                Err(_) => Err("is not a PEM public key (its CERTIFICATE does not parse)".into()),
            },
            label if label.contains("PRIVATE KEY") => {
                private_seen = true;
                continue;
            }
            _ => continue,
        };
        return result.map_err(|e| format!("{shown} {e}"));
    }
    if private_seen {
        Err(format!(
            "{shown} holds a private key, not a public key; give the public key \
             (`openssl pkey -in KEY -pubout`)"
        ))
    } else {
        Err(not_a_key())
    }
}

/// A DER SubjectPublicKeyInfo → (pinned algorithm, key). Errors are phrased to follow the path.
fn spki_key(der: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(der)
        .map_err(|_| "is not a PEM public key (its PUBLIC KEY block does not parse)".to_string())?;
    let oid = &spki.algorithm.algorithm;
    let data: &[u8] = &spki.subject_public_key.data;
    if *oid == OID_PKCS1_RSAENCRYPTION {
        rsa_key(data)
    } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| Oid::try_from(p).ok());
        match curve {
            Some(c) if c == OID_EC_P256 => {
                let key = DecodingKey::from_ec_der(data);
                if key_usable(Algorithm::ES256, &key) {
                    Ok((Algorithm::ES256, key))
                } else {
                    Err("is not a usable EC P-256 public key".into())
                }
            }
            Some(c) => Err(format!(
                "is an EC key on curve {}; only P-256 (ES256) is supported",
                curve_name(&c)
            )),
            None => {
                Err("is an EC key without a named curve; only P-256 (ES256) is supported".into())
            }
        }
    } else if *oid == OID_SIG_ED25519 {
        let key = DecodingKey::from_ed_der(data);
        if data.len() == 32 && key_usable(Algorithm::EdDSA, &key) {
            Ok((Algorithm::EdDSA, key))
        } else {
            Err("is not a usable Ed25519 public key".into())
        }
    } else {
        Err(format!(
            "holds a key of type {}; supported are RSA (RS256), EC P-256 (ES256) and Ed25519 (EdDSA)",
            oid.to_id_string()
        ))
    }
}

/// A DER PKCS#1 RSAPublicKey → RS256 (the PEM file carries no `alg`, so RSA is pinned to RS256).
fn rsa_key(der: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let (_, rsa) = RSAPublicKey::from_der(der)
        .map_err(|_| "is not a PEM public key (its RSA key does not parse)".to_string())?;
    check_rsa_bits(bit_len(rsa.modulus))?;
    Ok((Algorithm::RS256, DecodingKey::from_rsa_der(der)))
}

fn curve_name(oid: &Oid<'_>) -> String {
    let id = oid.to_id_string();
    match id.as_str() {
        "1.3.132.0.34" => "P-384".into(),
        "1.3.132.0.35" => "P-521".into(),
        "1.3.132.0.10" => "secp256k1".into(),
        _ => id,
    }
}

/// Reads a JWKS file. Keys that cannot verify signatures here (encryption keys, symmetric keys,
/// other curves) are skipped with a warning; a file left with no usable key is an error.
fn load_jwks(path: &Path) -> Result<Vec<(Algorithm, Option<String>, DecodingKey)>, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    // Only the position of a JSON error is reported: serde's message could quote the file.
    let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{shown} is not a JWKS document (`{{\"keys\": [...]}}`; JSON error at line {} column {})",
            e.line(),
            e.column()
        )
    })?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.common.key_id.clone();
        match jwk_key(jwk) {
            Ok((alg, key)) => keys.push((alg, kid, key)),
            Err(reason) => {
                let label = match &kid {
                    Some(k) => format!("key {i} (kid {:?})", printable(k)),
                    None => format!("key {i}"),
                };
                skipped.push(format!("{label}: {reason}"));
            }
        }
    }
    if keys.is_empty() {
        return Err(if skipped.is_empty() {
            format!("{shown} has no keys")
        } else {
            format!(
                "{shown} has no usable signature key ({})",
                skipped.join("; ")
            )
        });
    }
    for s in &skipped {
        tracing::warn!(file = %shown, "JWKS {s}; the key is ignored");
    }
    Ok(keys)
}

/// One JWK → (pinned algorithm, key), or why it is skipped.
fn jwk_key(jwk: &Jwk) -> Result<(Algorithm, DecodingKey), String> {
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return Err("not a signature key (`use`)".into()),
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("`key_ops` does not allow verify".into());
    }
    let declared = jwk.common.key_algorithm;
    let wrong_alg = |a: KeyAlgorithm, kty: &str| Err(format!("`alg` {a} does not fit a {kty} key"));
    let bad_key = |kty: &str| format!("not a usable {kty} public key");
    match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let alg = match declared {
                None => Algorithm::RS256,
                Some(
                    a @ (KeyAlgorithm::RS256
                    | KeyAlgorithm::RS384
                    | KeyAlgorithm::RS512
                    | KeyAlgorithm::PS256
                    | KeyAlgorithm::PS384
                    | KeyAlgorithm::PS512),
                ) => Algorithm::try_from(a).map_err(|_| bad_key("RSA"))?,
                Some(a) => return wrong_alg(a, "RSA"),
            };
            let key = DecodingKey::from_rsa_components(&p.n, &p.e).map_err(|_| bad_key("RSA"))?;
            let bits = match key.kind() {
                DecodingKeyKind::RsaModulusExponent { n, .. } => bit_len(n),
                DecodingKeyKind::SecretOrDer(_) => 0,
            };
            check_rsa_bits(bits)?;
            Ok((alg, key))
        }
        AlgorithmParameters::EllipticCurve(p) => {
            if p.curve != EllipticCurve::P256 {
                return Err(format!(
                    "curve {:?} is not supported; only P-256 (ES256)",
                    p.curve
                ));
            }
            match declared {
                None | Some(KeyAlgorithm::ES256) => {}
                Some(a) => return wrong_alg(a, "EC P-256"),
            }
            let key = DecodingKey::from_ec_components(&p.x, &p.y).map_err(|_| bad_key("EC"))?;
            if key_usable(Algorithm::ES256, &key) {
                Ok((Algorithm::ES256, key))
            } else {
                Err(bad_key("EC P-256"))
            }
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                return Err(format!(
                    "curve {:?} is not supported; only Ed25519 (EdDSA)",
                    p.curve
                ));
            }
            match declared {
                None | Some(KeyAlgorithm::EdDSA) => {}
                Some(a) => return wrong_alg(a, "Ed25519"),
            }
            let key = DecodingKey::from_ed_components(&p.x).map_err(|_| bad_key("Ed25519"))?;
            if key_usable(Algorithm::EdDSA, &key) {
                Ok((Algorithm::EdDSA, key))
            } else {
                Err(bad_key("Ed25519"))
            }
        }
        AlgorithmParameters::OctetKey(_) => {
            Err("symmetric (`oct`) keys are not taken from a JWKS file; use auth.jwt.secret".into())
        }
        _ => Err("unsupported key type; supported are RSA, EC P-256 and Ed25519".into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::{Value, json};
    use std::path::PathBuf;

    const SECRET: &str = "a-test-secret-that-is-32-bytes-long!";

    /// A 2048-bit RSA key pair made with `openssl genpkey` for these tests only (rcgen with ring
    /// cannot generate RSA keys).
    const RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDAGD3j1sEAIcoI
6U489QIbuJK5mYiH32sfwfe041lbYnkL0OMyjZFUZrzep38MIPV3fcDoWf1JpVQh
4JxHExghD/J895a1sFwEt2138IGlEJkhD0UEb9/tY6YeB8lzLHjqBp5ZuKuJ2dT4
2JPeFf1Bi806516xILXfHnx1j3ALOaSiYHw3C5zvmEa3MBSsgSOht0XU/U2Rz+NR
Fzvbp+RAE0A3B1OhFEwgKMs5TIcLgXcNDvpLYjeALSNPMZgS82dxTkU1ZhiAFL34
IWoWdIE6yISL+nkeoq/rS2nwdFQtj12HtVWpkHi1g1KuTDh2nshXid30XZzUTePh
rAkaSEGVAgMBAAECggEADBa6dlyCeDFS10K6HhNGgbDDkxM6yLTiYfTr/iHnSAf8
xCXuK7VFtcENa8RbYMuw3Ec5XPtPeais5cDj34PacIziCW6aDm8TK2d7vSDml8O2
pKJNs/IdGSxnPNvn7UFEOWjB4wrrHgQWZ16sgj0csK5NSRgHGTCMzDDNS6dY5BaC
4WPNrj57zma5/zckI8GLWpxJAE0eatmzvpnnXhn/rjf7FnrxmqwssM/p5jB3X5U8
L1jrj7YrJwr24TGgdlzIWZzh/Kj6XEhX0ihDFkkGL7VIKX4rwCaQpA2BW+Em6iMO
HTg64YQ0cSebyHe+2Hfmr1Eop6y5mh/BifhS56SCgQKBgQDzk0RMQsoaDsLdRaZK
40mLJHiy1qbjVT45IZBjGaSFdENXISgtLnkKvv7acMcTXZoztQfOcx3zyD1mdO7D
sAZLEnyTUs9ca4cxXlg8au8Ry/1iutGh9Qu+1ZZ0tt0wdnXsyez9XbUdxKpeAnSE
3PjTVNL5rpw6VHqDW55kDTWMNQKBgQDJ5Lb8s5a7KavnPlzeUSvmG/tAbIFn8SAE
lUL8GK6y42uF82EPDNhUvxSgemnrbmNWAvwWRF58yihEpz+6DGe9JnHMxPZs9yZc
Vz2wxUYNdecNHr9zOr4u7k26xZxYdRQrZDF8f83978oFcj/mEi86JM0ILippa1H1
wiq45SLL4QKBgQDXJ4Sy4GRpdBSJJFbp269A62x6fMVaFhgqmw1RnHsJL1O0iSNW
FbDx3xh7mBchchMeDZDhuioBByXFdRDbZoeIlMHZ2NI2Tv1SjIXgiIy46bnfFirK
pwxC+6Q1YLotbtZn3U4r2DR+IRRkikKmghKBinH5/1Uc6TZ3Bdz5f/mG6QKBgDrV
VaXKR9B+0kNu3u1CRkKmQM+DTyqVD7mGLaD9KFuk/j5osA4MtjXsAPzK73bWEkiM
Uh3DCq3e02E+Q8nZt5ldTKhZdV5Hn3wlSCrtMf7WLuCZ5zyTD7zpYOlekLMOWzRR
3EHllIe9iuePZaOMBQsykjUiDuXtilLNpFmBHGTBAoGAA8Zx5FRhPRR4GKRAKRap
jU7HzAso0XWJHJSuvTW/aXVV8eJv0/vMbHoTVzDqMx/0Nz7nr6g2/BVFSyWtjmGE
9agn5wZnm6/4Bif0wqVeVUN62vQAZu3kncQrZ6/3qccQDvvu6igLYmeodcoyzwbx
aUOh10SRjsrK7bT8VTBXUzw=
-----END PRIVATE KEY-----
";
    const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwBg949bBACHKCOlOPPUC
G7iSuZmIh99rH8H3tONZW2J5C9DjMo2RVGa83qd/DCD1d33A6Fn9SaVUIeCcRxMY
IQ/yfPeWtbBcBLdtd/CBpRCZIQ9FBG/f7WOmHgfJcyx46gaeWbiridnU+NiT3hX9
QYvNOudesSC13x58dY9wCzmkomB8Nwuc75hGtzAUrIEjobdF1P1Nkc/jURc726fk
QBNANwdToRRMICjLOUyHC4F3DQ76S2I3gC0jTzGYEvNncU5FNWYYgBS9+CFqFnSB
OsiEi/p5HqKv60tp8HRULY9dh7VVqZB4tYNSrkw4dp7IV4nd9F2c1E3j4awJGkhB
lQIDAQAB
-----END PUBLIC KEY-----
";
    /// The same public key in the PKCS#1 form (`openssl rsa -pubin -RSAPublicKey_out`).
    const RSA_PKCS1_PUBLIC_PEM: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAwBg949bBACHKCOlOPPUCG7iSuZmIh99rH8H3tONZW2J5C9DjMo2R
VGa83qd/DCD1d33A6Fn9SaVUIeCcRxMYIQ/yfPeWtbBcBLdtd/CBpRCZIQ9FBG/f
7WOmHgfJcyx46gaeWbiridnU+NiT3hX9QYvNOudesSC13x58dY9wCzmkomB8Nwuc
75hGtzAUrIEjobdF1P1Nkc/jURc726fkQBNANwdToRRMICjLOUyHC4F3DQ76S2I3
gC0jTzGYEvNncU5FNWYYgBS9+CFqFnSBOsiEi/p5HqKv60tp8HRULY9dh7VVqZB4
tYNSrkw4dp7IV4nd9F2c1E3j4awJGkhBlQIDAQAB
-----END RSA PUBLIC KEY-----
";
    /// The JWK `n` and `e` of the key above.
    const RSA_N: &str = "wBg949bBACHKCOlOPPUCG7iSuZmIh99rH8H3tONZW2J5C9DjMo2RVGa83qd_DCD1d33A6Fn9SaVUIeCcRxMYIQ_yfPeWtbBcBLdtd_CBpRCZIQ9FBG_f7WOmHgfJcyx46gaeWbiridnU-NiT3hX9QYvNOudesSC13x58dY9wCzmkomB8Nwuc75hGtzAUrIEjobdF1P1Nkc_jURc726fkQBNANwdToRRMICjLOUyHC4F3DQ76S2I3gC0jTzGYEvNncU5FNWYYgBS9-CFqFnSBOsiEi_p5HqKv60tp8HRULY9dh7VVqZB4tYNSrkw4dp7IV4nd9F2c1E3j4awJGkhBlQ";
    const RSA_E: &str = "AQAB";
    /// A 1024-bit RSA public key: too small.
    const RSA_1024_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDiZn1DccVNxlv6ViQeqc1A5nag
tGVm7FseTwbZsBOgLybFo64w5WBsaJZmdevZRymN70pkR5x1na3vbyvW+u/KXvyl
HpgPwo5k3PUppl7BP1xTqDHeGwiSqcogPfarflZqThTfQBpcoHKw8D46z03JZwZe
MBNCiPynTmmeHC8axwIDAQAB
-----END PUBLIC KEY-----
";

    fn b64url(bytes: &[u8]) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }

    fn now() -> u64 {
        get_current_timestamp()
    }

    fn claims(sub: &str) -> Value {
        json!({ "sub": sub, "exp": now() + 300 })
    }

    fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, key).unwrap()
    }

    fn hs(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            None,
            claims,
        )
    }

    fn secret_cfg() -> JwtConfig {
        JwtConfig {
            secret: Some(Secret::new(SECRET)),
            ..JwtConfig::default()
        }
    }

    fn verifier(cfg: &JwtConfig) -> JwtVerifier {
        JwtVerifier::from_config_in(cfg, None).unwrap().unwrap()
    }

    fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn pem_cfg(path: PathBuf) -> JwtConfig {
        JwtConfig {
            public_key_file: Some(path),
            ..JwtConfig::default()
        }
    }

    fn config_error(cfg: &JwtConfig) -> String {
        JwtVerifier::from_config_in(cfg, None).unwrap_err()
    }

    struct Pair {
        public_pem: String,
        signing: EncodingKey,
        /// The raw public key (SEC1 point for EC, 32 bytes for Ed25519).
        raw: Vec<u8>,
    }

    fn ec_pair() -> Pair {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Pair {
            public_pem: kp.public_key_pem(),
            signing: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            raw: kp.public_key_raw().to_vec(),
        }
    }

    fn ed_pair() -> Pair {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Pair {
            public_pem: kp.public_key_pem(),
            signing: EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap(),
            raw: kp.public_key_raw().to_vec(),
        }
    }

    fn rsa_signing() -> EncodingKey {
        EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap()
    }

    fn ec_jwk(kid: &str, raw: &[u8]) -> Value {
        assert_eq!(raw.len(), 65);
        json!({ "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                "x": b64url(&raw[1..33]), "y": b64url(&raw[33..]) })
    }

    fn ed_jwk(kid: &str, raw: &[u8]) -> Value {
        json!({ "kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64url(raw) })
    }

    fn rsa_jwk(kid: &str) -> Value {
        json!({ "kty": "RSA", "kid": kid, "n": RSA_N, "e": RSA_E })
    }

    fn jwks_cfg(dir: &tempfile::TempDir, keys: &[Value]) -> JwtConfig {
        let path = write(dir, "jwks.json", &json!({ "keys": keys }).to_string());
        JwtConfig {
            jwks_file: Some(path),
            ..JwtConfig::default()
        }
    }

    fn unsigned(header: &Value, claims: &Value) -> String {
        format!(
            "{}.{}.",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn base64url_round_trips() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "\u{ff}\u{fe}?>",
        ] {
            assert_eq!(b64url_decode(&b64url(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert!(b64url_decode("abcde").is_none());
        assert!(b64url_decode("ab+/").is_none());
        assert!(b64url_decode("YQ==").is_none());
    }

    #[test]
    fn valid_hs256_token_gives_its_principal() {
        let v = verifier(&secret_cfg());
        let p = v.verify(&hs(&claims("alice"))).unwrap();
        assert_eq!(
            p,
            Principal {
                id: "alice".into(),
                role: Role::User,
                method: AuthMethod::Jwt,
                email: None,
                tenant_id: None,
            }
        );
    }

    #[test]
    fn valid_es256_token_via_pem() {
        let dir = tempfile::tempdir().unwrap();
        let pair = ec_pair();
        let v = verifier(&pem_cfg(write(&dir, "ec.pem", &pair.public_pem)));
        let t = sign(Algorithm::ES256, &pair.signing, None, &claims("ec-user"));
        assert_eq!(v.verify(&t).unwrap().id, "ec-user");
        // Another key pair's signature does not verify.
        let other = ec_pair();
        let t = sign(Algorithm::ES256, &other.signing, None, &claims("ec-user"));
        assert_eq!(v.verify(&t), Err(JwtError::BadSignature));
    }

    #[test]
    fn valid_eddsa_token_via_pem() {
        let dir = tempfile::tempdir().unwrap();
        let pair = ed_pair();
        let v = verifier(&pem_cfg(write(&dir, "ed.pem", &pair.public_pem)));
        let t = sign(Algorithm::EdDSA, &pair.signing, None, &claims("ed-user"));
        assert_eq!(v.verify(&t).unwrap().id, "ed-user");
        let other = ed_pair();
        let t = sign(Algorithm::EdDSA, &other.signing, None, &claims("ed-user"));
        assert_eq!(v.verify(&t), Err(JwtError::BadSignature));
    }

    #[test]
    fn valid_rs256_token_via_pem_and_rsa_is_pinned_to_rs256() {
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(&pem_cfg(write(&dir, "rsa.pem", RSA_PUBLIC_PEM)));
        let t = sign(Algorithm::RS256, &rsa_signing(), None, &claims("rsa-user"));
        assert_eq!(v.verify(&t).unwrap().id, "rsa-user");
        // Same key, another RSA algorithm: the PEM pins RS256.
        for alg in [Algorithm::RS384, Algorithm::PS256] {
            let t = sign(alg, &rsa_signing(), None, &claims("rsa-user"));
            assert_eq!(
                v.verify(&t),
                Err(JwtError::AlgorithmNotAllowed(format!("{alg:?}")))
            );
        }
    }

    #[test]
    fn pkcs1_rsa_public_key_and_certificate_pems_load() {
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(&pem_cfg(write(&dir, "rsa1.pem", RSA_PKCS1_PUBLIC_PEM)));
        let t = sign(Algorithm::RS256, &rsa_signing(), None, &claims("p1"));
        assert_eq!(v.verify(&t).unwrap().id, "p1");

        // A certificate: its public key is used.
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["issuer.test".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let v = verifier(&pem_cfg(write(&dir, "cert.pem", &cert.pem())));
        let signing = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let t = sign(Algorithm::ES256, &signing, None, &claims("c1"));
        assert_eq!(v.verify(&t).unwrap().id, "c1");
    }

    #[test]
    fn jwks_key_is_chosen_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let ec = ec_pair();
        let ed = ed_pair();
        let ed2 = ed_pair();
        let v = verifier(&jwks_cfg(
            &dir,
            &[
                ec_jwk("ec-1", &ec.raw),
                ed_jwk("ed-1", &ed.raw),
                ed_jwk("ed-2", &ed2.raw),
                rsa_jwk("rsa-1"),
            ],
        ));
        let ok = |alg, key: &EncodingKey, kid| v.verify(&sign(alg, key, Some(kid), &claims(kid)));
        assert_eq!(
            ok(Algorithm::ES256, &ec.signing, "ec-1").unwrap().id,
            "ec-1"
        );
        assert_eq!(
            ok(Algorithm::EdDSA, &ed.signing, "ed-1").unwrap().id,
            "ed-1"
        );
        assert_eq!(
            ok(Algorithm::EdDSA, &ed2.signing, "ed-2").unwrap().id,
            "ed-2"
        );
        assert_eq!(
            ok(Algorithm::RS256, &rsa_signing(), "rsa-1").unwrap().id,
            "rsa-1"
        );
        // The kid decides which key checks the signature.
        assert_eq!(
            ok(Algorithm::EdDSA, &ed.signing, "ed-2"),
            Err(JwtError::BadSignature)
        );
        // A kid nobody knows.
        assert_eq!(
            ok(Algorithm::EdDSA, &ed.signing, "ed-9"),
            Err(JwtError::UnknownKey)
        );
        // The kid's key pins its algorithm: an EdDSA token naming the EC key is refused.
        assert_eq!(
            ok(Algorithm::EdDSA, &ed.signing, "ec-1"),
            Err(JwtError::AlgorithmNotAllowed("EdDSA".into()))
        );
        // Several keys and no kid: no guessing.
        let t = sign(Algorithm::ES256, &ec.signing, None, &claims("x"));
        assert_eq!(v.verify(&t), Err(JwtError::UnknownKey));
    }

    #[test]
    fn jwks_with_one_key_serves_tokens_without_kid() {
        let dir = tempfile::tempdir().unwrap();
        let ec = ec_pair();
        let v = verifier(&jwks_cfg(&dir, &[ec_jwk("only", &ec.raw)]));
        let t = sign(Algorithm::ES256, &ec.signing, None, &claims("solo"));
        assert_eq!(v.verify(&t).unwrap().id, "solo");
        // With a kid, it must match.
        let t = sign(
            Algorithm::ES256,
            &ec.signing,
            Some("other"),
            &claims("solo"),
        );
        assert_eq!(v.verify(&t), Err(JwtError::UnknownKey));
    }

    #[test]
    fn jwks_alg_pins_the_rsa_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let mut jwk = rsa_jwk("r384");
        jwk["alg"] = json!("RS384");
        let v = verifier(&jwks_cfg(&dir, &[jwk]));
        let t = sign(Algorithm::RS384, &rsa_signing(), Some("r384"), &claims("r"));
        assert_eq!(v.verify(&t).unwrap().id, "r");
        let t = sign(Algorithm::RS256, &rsa_signing(), Some("r384"), &claims("r"));
        assert_eq!(
            v.verify(&t),
            Err(JwtError::AlgorithmNotAllowed("RS256".into()))
        );
    }

    #[test]
    fn jwks_skips_keys_it_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let ec = ec_pair();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let raw = p384.public_key_raw();
        let mut enc = ec_jwk("enc", &ec.raw);
        enc["use"] = json!("enc");
        let unusable = [
            enc,
            json!({ "kty": "oct", "kid": "hmac", "k": b64url(SECRET.as_bytes()) }),
            json!({ "kty": "EC", "crv": "P-384", "kid": "p384",
                    "x": b64url(&raw[1..49]), "y": b64url(&raw[49..]) }),
            json!({ "kty": "EC", "crv": "P-256", "kid": "off-curve",
                    "x": b64url(&[1u8; 32]), "y": b64url(&[2u8; 32]) }),
            json!({ "kty": "RSA", "kid": "ec-alg", "alg": "ES256", "n": RSA_N, "e": RSA_E }),
        ];
        let mut keys = unusable.to_vec();
        keys.push(ec_jwk("good", &ec.raw));
        let v = verifier(&jwks_cfg(&dir, &keys));
        assert_eq!(v.jwks_keys, 1);
        // An HS256 token signed with the skipped `oct` key is not accepted.
        let t = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Some("hmac"),
            &claims("h"),
        );
        assert_eq!(
            v.verify(&t),
            Err(JwtError::AlgorithmNotAllowed("HS256".into()))
        );
        // The encryption key's kid does not select the (same) key either.
        let t = sign(Algorithm::ES256, &ec.signing, Some("enc"), &claims("e"));
        assert_eq!(v.verify(&t), Err(JwtError::UnknownKey));

        // Nothing usable left: a start-up error listing why.
        let cfg = jwks_cfg(&dir, &unusable);
        let path = cfg.jwks_file.clone().unwrap();
        let err = config_error(&cfg);
        assert!(
            err.starts_with(&format!(
                "auth.jwt.jwks_file: {} has no usable signature key (key 0 (kid \"enc\"): not a signature key (`use`); ",
                path.display()
            )),
            "{err}"
        );
        assert!(err.contains("curve P384 is not supported"), "{err}");
        assert!(err.contains("`alg` ES256 does not fit a RSA key"), "{err}");
        assert!(err.contains("not a usable EC P-256 public key"), "{err}");
        assert!(!err.contains(&b64url(SECRET.as_bytes())), "{err}");
        let err = config_error(&jwks_cfg(&dir, &[]));
        assert_eq!(
            err,
            format!("auth.jwt.jwks_file: {} has no keys", path.display())
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ec = ec_pair();
        let mut all = jwks_cfg(&dir, &[ec_jwk("k", &ec.raw)]);
        all.secret = Some(Secret::new(SECRET));
        all.public_key_file = Some(write(&dir, "rsa.pem", RSA_PUBLIC_PEM));
        for cfg in [secret_cfg(), all] {
            let v = verifier(&cfg);
            for alg in ["none", "None", "NONE"] {
                for header in [
                    json!({ "alg": alg, "typ": "JWT" }),
                    json!({ "alg": alg, "typ": "JWT", "kid": "k" }),
                ] {
                    let t = unsigned(&header, &claims("mallory"));
                    assert_eq!(
                        v.verify(&t),
                        Err(JwtError::AlgorithmNotAllowed(alg.into())),
                        "{t}"
                    );
                    // Even with a signature part attached.
                    let t = format!("{t}AAAA");
                    assert_eq!(v.verify(&t), Err(JwtError::AlgorithmNotAllowed(alg.into())));
                }
            }
        }
    }

    #[test]
    fn hs256_token_signed_with_the_public_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ec = ec_pair();
        let ed = ed_pair();
        for pem in [RSA_PUBLIC_PEM, &ec.public_pem, &ed.public_pem] {
            let v = verifier(&pem_cfg(write(&dir, "pub.pem", pem)));
            // The HS/RS confusion attack: the public key's bytes used as the HMAC secret.
            for secret in [pem.as_bytes(), pem.trim_end().as_bytes()] {
                let t = sign(
                    Algorithm::HS256,
                    &EncodingKey::from_secret(secret),
                    None,
                    &claims("mallory"),
                );
                assert_eq!(
                    v.verify(&t),
                    Err(JwtError::AlgorithmNotAllowed("HS256".into()))
                );
            }
        }
        // With a real secret configured too, the HS256 token is checked with that secret only.
        let mut both = pem_cfg(write(&dir, "rsa.pem", RSA_PUBLIC_PEM));
        both.secret = Some(Secret::new(SECRET));
        let v = verifier(&both);
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(RSA_PUBLIC_PEM.as_bytes()),
            None,
            &claims("mallory"),
        );
        assert_eq!(v.verify(&forged), Err(JwtError::BadSignature));
        assert_eq!(v.verify(&hs(&claims("alice"))).unwrap().id, "alice");
        let t = sign(Algorithm::RS256, &rsa_signing(), None, &claims("bob"));
        assert_eq!(v.verify(&t).unwrap().id, "bob");
    }

    #[test]
    fn asymmetric_token_against_a_secret_only_config_is_refused() {
        let v = verifier(&secret_cfg());
        let t = sign(Algorithm::RS256, &rsa_signing(), None, &claims("x"));
        assert_eq!(
            v.verify(&t),
            Err(JwtError::AlgorithmNotAllowed("RS256".into()))
        );
        let t = sign(
            Algorithm::HS512,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            None,
            &claims("x"),
        );
        assert_eq!(
            v.verify(&t),
            Err(JwtError::AlgorithmNotAllowed("HS512".into()))
        );
    }

    #[test]
    fn issuer_is_checked_when_configured() {
        let mut cfg = secret_cfg();
        cfg.issuer = Some("https://idp.example".into());
        let v = verifier(&cfg);
        let mut c = claims("a");
        c["iss"] = json!("https://idp.example");
        assert!(v.verify(&hs(&c)).is_ok());
        c["iss"] = json!("https://evil.example");
        assert_eq!(v.verify(&hs(&c)), Err(JwtError::WrongIssuer));
        assert_eq!(
            v.verify(&hs(&claims("a"))),
            Err(JwtError::MissingClaim("iss"))
        );
        // Not configured: any issuer passes.
        assert!(verifier(&secret_cfg()).verify(&hs(&c)).is_ok());
    }

    #[test]
    fn audience_is_checked_when_configured() {
        let mut cfg = secret_cfg();
        cfg.audience = vec!["chatcli".into(), "chatcli-staging".into()];
        let v = verifier(&cfg);
        let mut c = claims("a");
        c["aud"] = json!("chatcli-staging");
        assert!(v.verify(&hs(&c)).is_ok());
        c["aud"] = json!(["other", "chatcli"]);
        assert!(v.verify(&hs(&c)).is_ok(), "a list containing ours");
        c["aud"] = json!("other");
        assert_eq!(v.verify(&hs(&c)), Err(JwtError::WrongAudience));
        c["aud"] = json!(["other", "another"]);
        assert_eq!(v.verify(&hs(&c)), Err(JwtError::WrongAudience));
        assert_eq!(
            v.verify(&hs(&claims("a"))),
            Err(JwtError::MissingClaim("aud"))
        );
        // Not configured: a token with an audience is still accepted.
        assert!(verifier(&secret_cfg()).verify(&hs(&c)).is_ok());
    }

    #[test]
    fn expiry_has_a_leeway() {
        let v = verifier(&secret_cfg());
        assert_eq!(v.leeway, Duration::from_secs(30));
        let at = |exp: u64| json!({ "sub": "a", "exp": exp });
        assert!(v.verify(&hs(&at(now() - 10))).is_ok(), "within leeway");
        assert_eq!(v.verify(&hs(&at(now() - 120))), Err(JwtError::Expired));
        let mut cfg = secret_cfg();
        cfg.leeway = Duration::ZERO;
        assert_eq!(
            verifier(&cfg).verify(&hs(&at(now() - 10))),
            Err(JwtError::Expired)
        );
    }

    #[test]
    fn not_before_is_checked_when_present() {
        let v = verifier(&secret_cfg());
        let mut c = claims("a");
        c["nbf"] = json!(now() + 600);
        assert_eq!(v.verify(&hs(&c)), Err(JwtError::NotYetValid));
        c["nbf"] = json!(now() + 10);
        assert!(v.verify(&hs(&c)).is_ok(), "within leeway");
        c["nbf"] = json!("soon");
        assert_eq!(v.verify(&hs(&c)), Err(JwtError::InvalidClaim("nbf")));
    }

    #[test]
    fn exp_and_sub_are_required() {
        let v = verifier(&secret_cfg());
        assert_eq!(
            v.verify(&hs(&json!({ "sub": "a" }))),
            Err(JwtError::MissingClaim("exp"))
        );
        assert_eq!(
            v.verify(&hs(&json!({ "sub": "a", "exp": "tomorrow" }))),
            Err(JwtError::MissingClaim("exp"))
        );
        assert_eq!(
            v.verify(&hs(&json!({ "exp": now() + 60 }))),
            Err(JwtError::MissingClaim("sub"))
        );
        assert_eq!(
            v.verify(&hs(&json!({ "sub": 42, "exp": now() + 60 }))),
            Err(JwtError::MissingClaim("sub"))
        );
        for bad in ["", "  ", "a\nb", &"x".repeat(MAX_SUB_LEN + 1)] {
            assert_eq!(
                v.verify(&hs(&json!({ "sub": bad, "exp": now() + 60 }))),
                Err(JwtError::InvalidClaim("sub"))
            );
        }
    }

    #[test]
    fn truncated_tampered_and_garbage_tokens_are_refused() {
        let v = verifier(&secret_cfg());
        let good = hs(&claims("alice"));
        let (head, sig) = good.rsplit_once('.').unwrap();
        // Truncated: signature shortened, signature dropped, last part gone.
        for t in [
            &good[..good.len() - 4],
            &good[..good.len() - 1],
            &format!("{head}."),
            head,
            &good[..good.len() / 2],
        ] {
            let r = v.verify(t);
            assert!(
                matches!(r, Err(JwtError::BadSignature | JwtError::Malformed)),
                "{t}: {r:?}"
            );
        }
        // Claims swapped for others under the same signature.
        let (h, _) = head.split_once('.').unwrap();
        let forged = format!(
            "{h}.{}.{sig}",
            b64url(claims("root").to_string().as_bytes())
        );
        assert_eq!(v.verify(&forged), Err(JwtError::BadSignature));
        for t in [
            "",
            "garbage",
            "a.b.c",
            "....",
            "Bearer x.y.z",
            &format!("{good}.extra"),
            &format!(" {good}"),
            &"A".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert_eq!(v.verify(t), Err(JwtError::Malformed), "{t:.40}");
        }
        // The signature is checked before the claims are read.
        assert_eq!(
            v.verify("eyJhbGciOiJIUzI1NiJ9.!!!.AAAA"),
            Err(JwtError::BadSignature)
        );
        // A correctly signed token whose claims are not JSON.
        let message = format!("{}.{}", b64url(br#"{"alg":"HS256"}"#), b64url(b"not json"));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            v.verify(&format!("{message}.{signature}")),
            Err(JwtError::Malformed)
        );
        // A header that is JSON but has no usable `alg`.
        let t = unsigned(&json!({ "typ": "JWT" }), &claims("a"));
        assert_eq!(v.verify(&t), Err(JwtError::Malformed));
        // The refused alg is shortened and stripped before it reaches a log line.
        let t = unsigned(&json!({ "alg": "x\n".repeat(40) }), &claims("a"));
        assert_eq!(
            v.verify(&t),
            Err(JwtError::AlgorithmNotAllowed("x".repeat(16)))
        );
    }

    #[test]
    fn role_claim_is_mapped() {
        let v = verifier(&secret_cfg());
        let role = |r: Value| {
            let mut c = claims("a");
            c["role"] = r;
            v.verify(&hs(&c)).unwrap().role
        };
        assert_eq!(role(json!("admin")), Role::Admin);
        assert_eq!(role(json!("readonly")), Role::ReadOnly);
        assert_eq!(role(json!("user")), Role::User);
        assert_eq!(role(json!("superuser")), Role::User);
        assert_eq!(role(json!(["admin"])), Role::User);
        assert_eq!(role(Value::Null), Role::User);
        assert_eq!(v.verify(&hs(&claims("a"))).unwrap().role, Role::User);
    }

    #[test]
    fn email_and_tenant_id_are_carried() {
        let v = verifier(&secret_cfg());
        let mut c = claims("alice");
        c["email"] = json!("alice@example.com");
        c["tenant_id"] = json!("acme");
        let p = v.verify(&hs(&c)).unwrap();
        assert_eq!(p.email.as_deref(), Some("alice@example.com"));
        assert_eq!(p.tenant_id.as_deref(), Some("acme"));
        c["tenant_id"] = json!(42);
        c["email"] = json!(7);
        let p = v.verify(&hs(&c)).unwrap();
        assert_eq!(p.tenant_id.as_deref(), Some("42"));
        assert_eq!(p.email, None);
    }

    #[test]
    fn nothing_configured_gives_no_verifier() {
        assert!(
            JwtVerifier::from_config_in(&JwtConfig::default(), None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn secret_file_is_read_when_the_loader_did_not() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir, "jwt.secret", &format!("{SECRET}\n"));
        let cfg = JwtConfig {
            secret_file: Some(PathBuf::from("jwt.secret")),
            ..JwtConfig::default()
        };
        let v = JwtVerifier::from_config_in(&cfg, Some(dir.path()))
            .unwrap()
            .unwrap();
        assert_eq!(v.verify(&hs(&claims("f"))).unwrap().id, "f");
        let err = JwtVerifier::from_config_in(&cfg, None).unwrap_err();
        assert!(
            err.starts_with("auth.jwt.secret_file: cannot read jwt.secret: "),
            "{err}"
        );
    }

    #[test]
    fn pem_that_is_not_a_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("text.pem", "hello, this is not a key\n"),
            ("empty.pem", ""),
            (
                "other.pem",
                "-----BEGIN DH PARAMETERS-----\nMAYCAQACAQI=\n-----END DH PARAMETERS-----\n",
            ),
        ] {
            let path = write(&dir, name, content);
            assert_eq!(
                config_error(&pem_cfg(path.clone())),
                format!(
                    "auth.jwt.public_key_file: {} is not a PEM public key",
                    path.display()
                )
            );
        }
        let path = write(
            &dir,
            "broken.pem",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        );
        assert_eq!(
            config_error(&pem_cfg(path.clone())),
            format!(
                "auth.jwt.public_key_file: {} is not a PEM public key (its PUBLIC KEY block does not parse)",
                path.display()
            )
        );
    }

    #[test]
    fn private_key_pem_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "priv.pem", RSA_PRIVATE_PEM);
        let err = config_error(&pem_cfg(path.clone()));
        assert_eq!(
            err,
            format!(
                "auth.jwt.public_key_file: {} holds a private key, not a public key; give the public key (`openssl pkey -in KEY -pubout`)",
                path.display()
            )
        );
        assert!(!err.contains("MII"), "{err}");
    }

    #[test]
    fn unsupported_public_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let path = write(&dir, "p384.pem", &p384.public_key_pem());
        assert_eq!(
            config_error(&pem_cfg(path.clone())),
            format!(
                "auth.jwt.public_key_file: {} is an EC key on curve P-384; only P-256 (ES256) is supported",
                path.display()
            )
        );
        let path = write(&dir, "rsa1024.pem", RSA_1024_PUBLIC_PEM);
        assert_eq!(
            config_error(&pem_cfg(path.clone())),
            format!(
                "auth.jwt.public_key_file: {} is a 1024-bit RSA key; at least 2048 bits are required",
                path.display()
            )
        );
    }

    #[test]
    fn jwks_that_is_not_json_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "jwks.json", "keys: [secret-looking-text]");
        let err = config_error(&JwtConfig {
            jwks_file: Some(path.clone()),
            ..JwtConfig::default()
        });
        assert_eq!(
            err,
            format!(
                "auth.jwt.jwks_file: {} is not a JWKS document (`{{\"keys\": [...]}}`; JSON error at line 1 column 1)",
                path.display()
            )
        );
        let path = write(
            &dir,
            "jwks2.json",
            r#"{"keys": [{"kty": 5, "kid": "secret-looking-text"}]}"#,
        );
        let err = config_error(&JwtConfig {
            jwks_file: Some(path),
            ..JwtConfig::default()
        });
        assert!(err.starts_with("auth.jwt.jwks_file: "), "{err}");
        assert!(!err.contains("secret-looking-text"), "{err}");
    }

    #[test]
    fn missing_files_name_their_setting() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let cfg = JwtConfig {
            public_key_file: Some(missing.clone()),
            jwks_file: Some(missing.clone()),
            ..JwtConfig::default()
        };
        let err = config_error(&cfg);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(
            lines[0].starts_with(&format!(
                "auth.jwt.public_key_file: cannot read {}: ",
                missing.display()
            )),
            "{err}"
        );
        assert!(
            lines[1].starts_with(&format!(
                "auth.jwt.jwks_file: cannot read {}: ",
                missing.display()
            )),
            "{err}"
        );
        // A directory is not a key file either.
        let err = config_error(&pem_cfg(dir.path().to_path_buf()));
        assert!(
            err.starts_with("auth.jwt.public_key_file: cannot read "),
            "{err}"
        );
    }

    #[test]
    fn bad_secret_settings_are_refused() {
        let cfg = JwtConfig {
            secret: Some(Secret::new("  ")),
            ..JwtConfig::default()
        };
        assert_eq!(config_error(&cfg), "auth.jwt.secret: empty");
        let cfg = JwtConfig {
            secret: Some(Secret::new(RSA_PUBLIC_PEM)),
            ..JwtConfig::default()
        };
        let err = config_error(&cfg);
        assert!(
            err.starts_with("auth.jwt.secret: holds a PEM block, not an HMAC secret"),
            "{err}"
        );
        assert!(!err.contains("MII"), "{err}");
        let mut cfg = secret_cfg();
        cfg.issuer = Some(String::new());
        cfg.audience = vec![String::new()];
        assert_eq!(
            config_error(&cfg),
            "auth.jwt.issuer: empty\nauth.jwt.audience: contains an empty value"
        );
        let cfg = JwtConfig {
            issuer: Some("https://idp.example".into()),
            ..JwtConfig::default()
        };
        assert_eq!(
            config_error(&cfg),
            "auth.jwt: issuer or audience is set but no key is (auth.jwt.secret, auth.jwt.public_key_file or auth.jwt.jwks_file)"
        );
    }

    #[test]
    fn debug_shows_no_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let ec = ec_pair();
        let mut cfg = jwks_cfg(&dir, &[ec_jwk("k1", &ec.raw), rsa_jwk("k2")]);
        cfg.secret = Some(Secret::new(SECRET));
        cfg.public_key_file = Some(write(&dir, "rsa.pem", RSA_PUBLIC_PEM));
        let dbg = format!("{:?}", verifier(&cfg));
        assert!(
            dbg.contains("HS256") && dbg.contains("RS256") && dbg.contains("ES256"),
            "{dbg}"
        );
        assert!(dbg.contains("\"k1\""), "{dbg}");
        for material in [SECRET, &RSA_N[..20], &b64url(&ec.raw[1..33])[..20], "MII"] {
            assert!(!dbg.contains(material), "{dbg}");
        }
    }

    #[test]
    fn cheap_checks_verify_hs256_and_admit_only_public_key_tokens_seen_verified() {
        // HS256: verified in full even when only the cheap checks are allowed.
        let v = verifier(&secret_cfg());
        let good = hs(&claims("alice"));
        assert_eq!(v.verify_cheap(&good).unwrap().id, "alice");
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret-of-32-bytes-or-more"),
            None,
            &claims("alice"),
        );
        assert_eq!(v.verify_cheap(&forged), Err(JwtError::BadSignature));
        assert_eq!(v.verified.len(), 0, "HS256 tokens are never cached");

        // A public key: a token never verified is refused unchecked, even a good one.
        let dir = tempfile::tempdir().unwrap();
        let pair = ec_pair();
        let v = verifier(&pem_cfg(write(&dir, "ec.pem", &pair.public_pem)));
        let token = sign(Algorithm::ES256, &pair.signing, None, &claims("bob"));
        assert_eq!(v.verify_cheap(&token), Err(JwtError::NotChecked));
        // Once it verified, the same token passes the cheap checks, with the same principal.
        let full = v.verify(&token).unwrap();
        assert_eq!(v.verify_cheap(&token).unwrap(), full);
        // Another token of the same subject, or the token altered, is not the one that verified.
        let other = sign(
            Algorithm::ES256,
            &pair.signing,
            None,
            &json!({"sub": "bob", "exp": now() + 301}),
        );
        assert_eq!(v.verify_cheap(&other), Err(JwtError::NotChecked));
        let mut altered = token.clone();
        altered.pop();
        assert_eq!(v.verify_cheap(&altered), Err(JwtError::NotChecked));
        // Garbage and tokens for no configured key are refused before any lookup.
        assert_eq!(v.verify_cheap("a.b.c"), Err(JwtError::Malformed));
        assert!(matches!(
            v.verify_cheap(&hs(&claims("x"))),
            Err(JwtError::AlgorithmNotAllowed(_))
        ));
        // A clone (the same keys) shares what verified; a new verifier (a reload) does not.
        assert!(v.clone().verify_cheap(&token).is_ok());
        let reloaded = verifier(&pem_cfg(write(&dir, "ec.pem", &pair.public_pem)));
        assert_eq!(reloaded.verify_cheap(&token), Err(JwtError::NotChecked));
    }

    #[test]
    fn a_remembered_token_stops_passing_when_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = pem_cfg(write(&dir, "rsa.pem", RSA_PUBLIC_PEM));
        cfg.leeway = Duration::from_secs(5);
        let v = verifier(&cfg);
        // Expired 3 s ago: still inside the 5 s leeway, so it verifies and is remembered...
        let exp = now() - 3;
        let token = sign(
            Algorithm::RS256,
            &rsa_signing(),
            None,
            &json!({"sub": "carol", "exp": exp}),
        );
        assert!(v.verify(&token).is_ok());
        assert!(v.verify_cheap(&token).is_ok());
        // ...until `exp` plus the leeway, like a full verification.
        let d = digest(&token);
        let entries = v.verified.lock();
        let until = entries.get(&d).unwrap().valid_until;
        assert_eq!(until, exp + 5);
        drop(entries);
        assert!(v.verified.get(&d, until).is_some());
        assert!(v.verified.get(&d, until + 1).is_none());
    }

    #[test]
    fn the_verified_token_cache_is_bounded() {
        let cache = VerifiedTokens::default();
        let entry = |valid_until| VerifiedToken {
            principal: Principal {
                id: "p".into(),
                role: Role::User,
                method: AuthMethod::Jwt,
                email: None,
                tenant_id: None,
            },
            valid_until,
        };
        let key = |i: usize| {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i as u64).to_le_bytes());
            d
        };
        // Full of entries valid until 1000 + i; one more at time 500 evicts the soonest (i = 0).
        for i in 0..VERIFIED_MAX {
            cache.insert(key(i), entry(1000 + i as u64), 500);
        }
        assert_eq!(cache.len(), VERIFIED_MAX);
        cache.insert(key(VERIFIED_MAX), entry(5000), 500);
        assert_eq!(cache.len(), VERIFIED_MAX);
        assert!(cache.get(&key(0), 500).is_none());
        assert!(cache.get(&key(1), 500).is_some());
        assert!(cache.get(&key(VERIFIED_MAX), 500).is_some());
        // Later, when all but two have expired, a new entry clears every expired one.
        let later = 1000 + VERIFIED_MAX as u64 - 1;
        cache.insert(key(VERIFIED_MAX + 1), entry(9000), later);
        assert_eq!(
            cache.len(),
            3,
            "valid until `later`, until 5000, and the new entry"
        );
    }
}
