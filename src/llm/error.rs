//! Provider errors, classified from typed facts (HTTP status, the provider's error type, transport
//! error kinds), never from message text. The class drives the fallback chain (retry, skip, cool
//! down); `gateway::Error` gives it the stable code and the caller's status. Messages never contain keys.

use std::time::Duration;

/// What kind of failure an upstream call had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// 429 or the provider's rate-limit/overloaded type; retry after `retry_after`.
    RateLimit,
    /// The call or its connection timed out.
    Timeout,
    /// 401/403: the key is wrong or lacks access. Retrying does not help.
    Auth,
    /// 5xx or the provider's server-error type.
    Server,
    /// The model does not exist (404 or the provider's not-found type).
    ModelNotFound,
    /// The prompt is longer than the model's context.
    ContextTooLong,
    /// Any other 4xx: the request itself is wrong. Retrying does not help.
    BadRequest,
    /// Connection refused, reset or dropped, DNS failure.
    Transport,
    /// The upstream answered something that is not its protocol.
    Malformed,
}

impl ErrorClass {
    /// Whether the same provider may succeed on a retry.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimit | Self::Timeout | Self::Server | Self::Transport
        )
    }

    /// Whether another provider may succeed where this one failed.
    pub fn should_fall_back(self) -> bool {
        !matches!(self, Self::BadRequest | Self::ContextTooLong)
    }

    /// Stable machine-readable name (metrics label, logs, error bodies).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::Timeout => "timeout",
            Self::Auth => "auth_error",
            Self::Server => "server_error",
            Self::ModelNotFound => "model_not_found",
            Self::ContextTooLong => "context_too_long",
            Self::BadRequest => "bad_request",
            Self::Transport => "transport_error",
            Self::Malformed => "malformed_response",
        }
    }

    /// The class of an HTTP status, when the provider gave no more specific error type.
    pub fn from_status(status: u16) -> Self {
        match status {
            401 | 403 => Self::Auth,
            404 => Self::ModelNotFound,
            408 | 504 => Self::Timeout,
            413 => Self::ContextTooLong,
            429 => Self::RateLimit,
            500..=599 => Self::Server,
            _ => Self::BadRequest,
        }
    }
}

/// One upstream failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// The provider's name.
    pub provider: String,
    /// Its class.
    pub class: ErrorClass,
    /// The HTTP status, when there was one.
    pub status: Option<u16>,
    /// What the upstream said (its error message, trimmed), or what went wrong.
    pub message: String,
    /// How long the upstream asked us to wait.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.provider, self.class.as_str())?;
        if let Some(s) = self.status {
            write!(f, " (HTTP {s})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// Why a prompt could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// The named provider is not configured.
    #[error("unknown provider `{name}`; available: {available}")]
    UnknownProvider {
        /// What the caller asked for.
        name: String,
        /// The configured names.
        available: String,
    },
    /// No provider is configured at all.
    #[error("no LLM provider is configured on this server")]
    NoProviders,
    /// The caller's request is wrong (bad `provider_config`, refused URL, bad key prefix…).
    #[error("{0}")]
    InvalidRequest(String),
    /// One provider failed.
    #[error("LLM error: {0}")]
    Upstream(UpstreamError),
    /// Every provider of the fallback chain failed; one reason per provider.
    #[error("every provider failed: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    AllFailed(Vec<UpstreamError>),
}

impl LlmError {
    /// A failure of `provider` of class `class`.
    pub fn upstream(provider: &str, class: ErrorClass, message: impl Into<String>) -> Self {
        LlmError::Upstream(UpstreamError {
            provider: provider.to_string(),
            class,
            status: None,
            message: message.into(),
            retry_after: None,
        })
    }

    /// The upstream failure, if this is one.
    pub fn as_upstream(&self) -> Option<&UpstreamError> {
        match self {
            LlmError::Upstream(u) => Some(u),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify() {
        assert_eq!(ErrorClass::from_status(429), ErrorClass::RateLimit);
        assert_eq!(ErrorClass::from_status(401), ErrorClass::Auth);
        assert_eq!(ErrorClass::from_status(503), ErrorClass::Server);
        assert_eq!(ErrorClass::from_status(404), ErrorClass::ModelNotFound);
        assert_eq!(ErrorClass::from_status(400), ErrorClass::BadRequest);
        assert!(ErrorClass::RateLimit.is_retryable());
        assert!(!ErrorClass::Auth.is_retryable());
        assert!(ErrorClass::Auth.should_fall_back());
        assert!(!ErrorClass::ContextTooLong.should_fall_back());
    }

    #[test]
    fn messages_name_the_provider_and_class() {
        let e = LlmError::upstream("p", ErrorClass::RateLimit, "slow down");
        assert_eq!(e.to_string(), "LLM error: p: rate_limit: slow down");
        let all = LlmError::AllFailed(vec![
            UpstreamError {
                provider: "a".into(),
                class: ErrorClass::Auth,
                status: Some(401),
                message: "bad key".into(),
                retry_after: None,
            },
            UpstreamError {
                provider: "b".into(),
                class: ErrorClass::Server,
                status: Some(500),
                message: String::new(),
                retry_after: None,
            },
        ]);
        assert_eq!(
            all.to_string(),
            "every provider failed: a: auth_error (HTTP 401): bad key; b: server_error (HTTP 500)"
        );
    }
}
