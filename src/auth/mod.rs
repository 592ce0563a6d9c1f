//! Who is calling. This build knows the shared bearer token of the existing ChatCLI (`--token`,
//! `CHATCLI_SERVER_TOKEN`), compared in constant time; named tokens, JWT and mTLS arrive with
//! issue #6. The resolved [`Principal`] goes into the request extensions, where handlers read it.

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

/// What a principal may do.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including other principals' data.
    Admin,
    /// Prompts and own sessions.
    #[default]
    User,
    /// Reads only: no plugin runs, no session writes or deletes.
    #[serde(rename = "readonly")]
    ReadOnly,
}

impl Role {
    /// Parses a JWT `role` claim: admin | user | readonly, anything else → user.
    pub fn from_claim(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "admin" => Self::Admin,
            "readonly" | "read-only" | "read_only" => Self::ReadOnly,
            _ => Self::User,
        }
    }

    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::User => "user",
            Self::ReadOnly => "readonly",
        }
    }
}

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
    /// The session namespace of this principal. Until per-user sessions land (issue #6) every caller
    /// shares the `default` namespace, which is the existing ChatCLI's session folder.
    pub fn session_namespace(&self) -> &str {
        "default"
    }
}

/// Why a call was refused (logged; the caller only sees "authentication failed").
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `authorization` header.
    #[error("missing bearer token")]
    Missing,
    /// Not `Bearer <token>`.
    #[error("malformed authorization header")]
    Malformed,
    /// Wrong token.
    #[error("invalid token")]
    Invalid,
}

/// The configured ways to authenticate.
#[derive(Clone, Default)]
pub struct Authenticator {
    token: Option<Vec<u8>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
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
    /// From the configured shared token, if any.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| t.as_bytes().to_vec()),
        }
    }

    /// Whether any auth is configured.
    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Resolves the principal from the `authorization` header value.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Principal, AuthError> {
        let Some(expected) = &self.token else {
            return Ok(Principal {
                id: "anonymous".into(),
                role: Role::Admin,
                method: AuthMethod::None,
                email: None,
                tenant_id: None,
            });
        };
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix(b"Bearer ")
            .ok_or(AuthError::Malformed)?;
        if bool::from(token.ct_eq(expected.as_slice())) {
            Ok(Principal {
                id: "legacy-token".into(),
                role: Role::Admin,
                method: AuthMethod::Token,
                email: None,
                tenant_id: None,
            })
        } else {
            Err(AuthError::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_token_is_checked() {
        let a = Authenticator::new(Some("s3cret"));
        assert_eq!(a.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            a.authenticate(Some(b"Basic s3cret")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(Some(b"bearer s3cret")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(Some(b"Bearer s3cre")),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            a.authenticate(Some(b"Bearer s3cret")).map(|p| p.id),
            Ok("legacy-token".to_string())
        );
        let none = Authenticator::new(None);
        assert_eq!(
            none.authenticate(None).map(|p| p.method),
            Ok(AuthMethod::None)
        );
        assert!(format!("{a:?}").contains("[redacted]"));
    }
}
