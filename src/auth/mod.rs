//! Who is calling: the shared bearer token of the existing ChatCLI (`--token`,
//! `CHATCLI_SERVER_TOKEN`, compared in constant time), named tokens with roles ([`tokens`]), JWT
//! ([`jwt`]) and the mTLS client certificate's identity, each resolved to a [`Principal`] with a
//! role; the RBAC checks. The principal goes into the request extensions, where handlers read it.
//! [`Verification::Cheap`] is what a caller whose address is throttled by the failed-auth limiter
//! gets checked.

pub mod jwt;
pub mod tokens;

use subtle::ConstantTimeEq;

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// No auth configured.
    None,
    /// A bearer token (shared or named).
    Token,
    /// A JSON Web Token.
    Jwt,
    /// A client certificate.
    Mtls,
}

impl AuthMethod {
    /// Stable name (audit, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Token => "token",
            Self::Jwt => "jwt",
            Self::Mtls => "mtls",
        }
    }
}

pub use crate::config::Role;

/// The caller, resolved before any handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable id: `legacy-token` for the shared token, a token's name, a JWT `sub`, a certificate
    /// identity, or `anonymous` without auth.
    pub id: String,
    /// Role.
    pub role: Role,
    /// Method.
    pub method: AuthMethod,
    /// JWT `email`, when given.
    pub email: Option<String>,
    /// JWT `tenant_id`, when given.
    pub tenant_id: Option<String>,
}

impl Principal {
    /// Who this principal is across the server: `<method>:<id>` (`jwt:alice`, `token:team-a`), and
    /// `jwt@<tenant>:<sub>` for a JWT that names a `tenant_id`, so a JWT `sub` never matches a
    /// token's name and the same `sub` in two tenants is two principals. In the tenant, `%` and `:`
    /// are written `%25` and `%3A`: the first `:` after the `@` ends it, so no two (tenant, sub)
    /// pairs give the same text. Sessions, rate-limit buckets, stream caps and `/updates` events are
    /// keyed by it.
    pub fn qualified_id(&self) -> String {
        let method = self.method.as_str();
        match &self.tenant_id {
            None => format!("{method}:{}", self.id),
            Some(tenant) => format!(
                "{method}@{}:{}",
                tenant.replace('%', "%25").replace(':', "%3A"),
                self.id
            ),
        }
    }

    /// The session namespace of this principal. The shared token and no-auth mode use `default`, the
    /// existing ChatCLI's flat sessions folder, so existing files keep working; every other principal
    /// gets its own, named by its [`Principal::qualified_id`].
    pub fn session_namespace(&self) -> String {
        match self.method {
            AuthMethod::None => "default".into(),
            AuthMethod::Token if self.id == "legacy-token" => "default".into(),
            _ => self.qualified_id(),
        }
    }

    /// The name of this principal's rate-limit bucket and stream cap: its
    /// [`Principal::qualified_id`]; callers without auth are told apart by their address.
    pub fn limit_key(&self, client_ip: Option<std::net::IpAddr>) -> String {
        match (self.method, client_ip) {
            (AuthMethod::None, Some(ip)) => format!("none:{ip}"),
            _ => self.qualified_id(),
        }
    }

    /// Whether this principal may write or delete sessions.
    pub fn can_write(&self) -> bool {
        self.role != Role::ReadOnly
    }
}

/// Why a call was refused (logged and audited). The caller only sees "authentication failed",
/// except for [`AuthError::Throttled`], which it is told (with the wait) so that it knows to wait
/// rather than look for another cause.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials.
    #[error("missing credentials")]
    Missing,
    /// Not `Bearer <token>`.
    #[error("malformed authorization header")]
    Malformed,
    /// No token or key accepts it.
    #[error("invalid token")]
    Invalid,
    /// A JWT that failed verification.
    #[error("invalid JWT: {0}")]
    Jwt(String),
    /// Too many failures from this address: for `retry_after_secs` more seconds (whole seconds, at
    /// least 1) the failed-auth limiter refuses every credential from it that is not valid by the
    /// cheap checks ([`Verification::Cheap`]); valid ones are still admitted.
    #[error(
        "too many failed authentication attempts from this address; retry after {retry_after_secs} seconds"
    )]
    Throttled {
        /// Seconds until the address may try again.
        retry_after_secs: u64,
    },
}

impl AuthError {
    /// The wait before the caller may try again, when the failed-auth limiter refused it.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Throttled { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

/// How much a credential may cost to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Every check.
    Full,
    /// Only the checks that cost about as much as hashing the credential, for a caller whose
    /// address the failed-auth limiter throttles: the shared token (compared in constant time),
    /// named tokens (SHA-256, compared in constant time), a verified client certificate (checked
    /// in the TLS handshake already), and JWTs as [`jwt::JwtVerifier::verify_cheap`] says: an
    /// HS256 token is verified, a public-key token is admitted only if that same token verified
    /// before and has not expired. Everything else is refused unchecked.
    Cheap,
}

/// The configured ways to authenticate, prepared from config (rebuilt on reload).
#[derive(Default)]
pub struct Authenticator {
    token: Option<Vec<u8>>,
    tokens: tokens::TokenTable,
    jwt: Option<jwt::JwtVerifier>,
    mtls: Option<crate::config::MtlsConfig>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("shared_token", &self.token.is_some())
            .field("named_tokens", &!self.tokens.is_empty())
            .field("jwt", &self.jwt.is_some())
            .field("mtls", &self.mtls.is_some())
            .finish()
    }
}

/// gRPC methods and HTTP paths that need no credentials.
pub fn is_exempt(path: &str) -> bool {
    path == "/chatcli.v1.ChatCLIService/Health"
        || path.starts_with("/grpc.health.v1.Health/")
        || path == "/health"
}

impl Authenticator {
    /// From config; errors name the setting. `client_ca` says whether mTLS is on.
    pub fn from_config(
        auth: &crate::config::AuthConfig,
        client_ca: bool,
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let tokens = tokens::TokenTable::from_config(&auth.tokens).unwrap_or_else(|e| {
            errors.push(e);
            tokens::TokenTable::default()
        });
        let jwt = jwt::JwtVerifier::from_config(&auth.jwt).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            token: auth.token.as_ref().map(|t| t.expose().as_bytes().to_vec()),
            tokens,
            jwt,
            mtls: client_ca.then(|| auth.mtls.clone()),
        })
    }

    /// From a shared token only (tests and simple setups).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| t.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    /// Whether any auth is configured.
    pub fn enabled(&self) -> bool {
        self.token.is_some() || !self.tokens.is_empty() || self.jwt.is_some() || self.mtls.is_some()
    }

    /// Resolves the caller. A bearer credential, when present, must be valid (it is never ignored in
    /// favour of a certificate); without one, a verified client certificate identifies the caller.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        client_identity: Option<&str>,
    ) -> Result<Principal, AuthError> {
        self.authenticate_as(authorization, client_identity, Verification::Full)
    }

    /// [`Self::authenticate`] with only the checks `verification` allows.
    pub fn authenticate_as(
        &self,
        authorization: Option<&[u8]>,
        client_identity: Option<&str>,
        verification: Verification,
    ) -> Result<Principal, AuthError> {
        if !self.enabled() {
            return Ok(Principal {
                id: "anonymous".into(),
                role: Role::Admin,
                method: AuthMethod::None,
                email: None,
                tenant_id: None,
            });
        }
        let Some(header) = authorization else {
            return match (client_identity, &self.mtls) {
                (Some(id), Some(m)) => Ok(Principal {
                    id: id.to_string(),
                    role: m.roles.get(id).copied().unwrap_or(m.default_role),
                    method: AuthMethod::Mtls,
                    email: None,
                    tenant_id: None,
                }),
                _ => Err(AuthError::Missing),
            };
        };
        let token = header
            .strip_prefix(b"Bearer ")
            .ok_or(AuthError::Malformed)?;
        if let Some(expected) = &self.token
            && bool::from(token.ct_eq(expected.as_slice()))
        {
            return Ok(Principal {
                id: "legacy-token".into(),
                role: Role::Admin,
                method: AuthMethod::Token,
                email: None,
                tenant_id: None,
            });
        }
        let text = std::str::from_utf8(token).map_err(|_| AuthError::Malformed)?;
        if let Some(entry) = self.tokens.lookup(text) {
            return Ok(entry.principal());
        }
        if let Some(jwt) = &self.jwt
            && text.split('.').count() == 3
        {
            let verified = match verification {
                Verification::Full => jwt.verify(text),
                Verification::Cheap => jwt.verify_cheap(text),
            };
            return verified.map_err(|e| AuthError::Jwt(e.to_string()));
        }
        Err(AuthError::Invalid)
    }

    /// Rate-limit overrides of the named tokens: (name, rps, burst).
    pub fn token_overrides(&self) -> Vec<(String, Option<f64>, Option<u32>)> {
        self.tokens
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.rate_limit_rps, e.rate_limit_burst))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, MtlsConfig, NamedToken};
    use sha2::Digest;

    #[test]
    fn shared_token_is_checked() {
        let a = Authenticator::new(Some("s3cret"));
        assert_eq!(a.authenticate(None, None), Err(AuthError::Missing));
        assert_eq!(
            a.authenticate(Some(b"Basic s3cret"), None),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(Some(b"bearer s3cret"), None),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(Some(b"Bearer s3cre"), None),
            Err(AuthError::Invalid)
        );
        let p = a.authenticate(Some(b"Bearer s3cret"), None).unwrap();
        assert_eq!(
            (p.id.as_str(), p.role, p.method),
            ("legacy-token", Role::Admin, AuthMethod::Token)
        );
        assert_eq!(p.session_namespace(), "default");
        let none = Authenticator::new(None);
        let p = none.authenticate(None, None).unwrap();
        assert_eq!(
            (p.method, p.session_namespace().as_str()),
            (AuthMethod::None, "default")
        );
        assert!(!format!("{a:?}").contains("s3cret"));
    }

    fn config() -> AuthConfig {
        let digest = hex(&sha2::Sha256::digest(b"team-token"));
        AuthConfig {
            tokens: vec![NamedToken {
                name: "team-a".into(),
                role: Role::ReadOnly,
                sha256: Some(digest),
                ..Default::default()
            }],
            mtls: MtlsConfig {
                roles: [("spiffe://test/admin".to_string(), Role::Admin)]
                    .into_iter()
                    .collect(),
                default_role: Role::User,
            },
            ..Default::default()
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn named_tokens_and_certificates_resolve_principals() {
        let a = Authenticator::from_config(&config(), true).unwrap();
        let p = a.authenticate(Some(b"Bearer team-token"), None).unwrap();
        assert_eq!((p.id.as_str(), p.role), ("team-a", Role::ReadOnly));
        assert_eq!(p.session_namespace(), "token:team-a");
        assert!(!p.can_write());
        let p = a.authenticate(None, Some("spiffe://test/admin")).unwrap();
        assert_eq!((p.role, p.method), (Role::Admin, AuthMethod::Mtls));
        let p = a.authenticate(None, Some("spiffe://test/bob")).unwrap();
        assert_eq!(
            (p.role, p.session_namespace().as_str()),
            (Role::User, "mtls:spiffe://test/bob")
        );
        // A bad bearer token is never ignored in favour of a good certificate.
        assert_eq!(
            a.authenticate(Some(b"Bearer wrong"), Some("spiffe://test/admin")),
            Err(AuthError::Invalid)
        );
        assert_eq!(a.authenticate(None, None), Err(AuthError::Missing));
        // Without a client CA, a certificate identity is not a credential.
        let no_ca = Authenticator::from_config(&config(), false).unwrap();
        assert_eq!(
            no_ca.authenticate(None, Some("spiffe://test/admin")),
            Err(AuthError::Missing)
        );
        assert_eq!(
            a.token_overrides(),
            vec![("team-a".to_string(), None, None)]
        );
    }

    #[test]
    fn a_throttled_address_is_told_so_and_how_long_to_wait() {
        let e = AuthError::Throttled {
            retry_after_secs: 12,
        };
        assert_eq!(
            e.to_string(),
            "too many failed authentication attempts from this address; retry after 12 seconds"
        );
        assert_eq!(e.retry_after_secs(), Some(12));
        assert_eq!(AuthError::Invalid.retry_after_secs(), None);
    }

    #[test]
    fn jwt_claims_become_the_principal() {
        let mut cfg = AuthConfig::default();
        cfg.jwt.secret = Some(crate::config::Secret::new(
            "0123456789abcdef0123456789abcdef",
        ));
        let a = Authenticator::from_config(&cfg, false).unwrap();
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": "alice", "role": "readonly", "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        let p = a
            .authenticate(Some(format!("Bearer {token}").as_bytes()), None)
            .unwrap();
        assert_eq!(
            (p.id.as_str(), p.role, p.method),
            ("alice", Role::ReadOnly, AuthMethod::Jwt)
        );
        assert_eq!(p.session_namespace(), "jwt:alice");
        assert!(matches!(
            a.authenticate(Some(b"Bearer a.b.c"), None),
            Err(AuthError::Jwt(_))
        ));
    }

    fn jwt_principal(sub: &str, tenant: Option<&str>) -> Principal {
        Principal {
            id: sub.into(),
            role: Role::User,
            method: AuthMethod::Jwt,
            email: None,
            tenant_id: tenant.map(String::from),
        }
    }

    #[test]
    fn the_tenant_is_part_of_who_a_jwt_principal_is() {
        let plain = jwt_principal("alice", None);
        let acme = jwt_principal("alice", Some("acme"));
        let globex = jwt_principal("alice", Some("globex"));
        assert_eq!(plain.session_namespace(), "jwt:alice");
        assert_eq!(acme.session_namespace(), "jwt@acme:alice");
        assert_eq!(acme.limit_key(None), "jwt@acme:alice");
        assert_ne!(acme.session_namespace(), globex.session_namespace());
        assert_ne!(acme.limit_key(None), globex.limit_key(None));
        // A separator in the tenant or the sub cannot make two pairs look alike.
        let pairs = [
            ("a:b", "c"),
            ("a", "b:c"),
            ("a%3Ab", "c"),
            ("a", "%3Ab:c"),
            ("", "x"),
        ];
        let ids: std::collections::HashSet<String> = pairs
            .iter()
            .map(|(t, s)| jwt_principal(s, Some(t)).qualified_id())
            .chain([
                plain.qualified_id(),
                jwt_principal("@a:x", None).qualified_id(),
            ])
            .collect();
        assert_eq!(ids.len(), pairs.len() + 2, "{ids:?}");
    }

    #[test]
    fn cheap_checks_still_admit_tokens_and_certificates() {
        let mut cfg = config();
        cfg.token = Some(crate::config::Secret::new("shared-secret"));
        let a = Authenticator::from_config(&cfg, true).unwrap();
        let cheap =
            |h: Option<&[u8]>, id: Option<&str>| a.authenticate_as(h, id, Verification::Cheap);
        assert_eq!(
            cheap(Some(b"Bearer shared-secret"), None).unwrap().id,
            "legacy-token"
        );
        assert_eq!(
            cheap(Some(b"Bearer team-token"), None).unwrap().id,
            "team-a"
        );
        assert_eq!(
            cheap(None, Some("spiffe://test/admin")).unwrap().method,
            AuthMethod::Mtls
        );
        assert_eq!(cheap(Some(b"Bearer wrong"), None), Err(AuthError::Invalid));
        assert_eq!(cheap(None, None), Err(AuthError::Missing));
    }
}
