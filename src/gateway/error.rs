//! The one error type of the core ([`Error`]) and its stable codes ([`Code`]).
//!
//! Every use case answers a [`Error`]; the core modules' own errors ([`LlmError`],
//! [`SessionError`]) convert into it with `From`. Each error has a stable snake_case [`Code`] that
//! users can grep and alert on (the audit log, the `chatcli_errors_total` metric, the gRPC
//! `x-chatcli-error-code` metadata and the HTTP `x-chatcli-error-code` header and JSON body carry
//! it), whether a retry may help, and how long to wait when that is known. `src/server/error.rs`
//! maps a code to its gRPC status and its HTTP status; the table of codes is `docs/errors.md`.

use std::time::Duration;

use crate::catalog::CatalogError;
use crate::hub::HubError;
use crate::llm::{ErrorClass, LlmError, UpstreamError};
use crate::sessions::SessionError;

/// Declares [`Code`] and its list from one table, so the list cannot miss a code.
macro_rules! codes {
    ($( $(#[doc = $doc:literal])* $variant:ident = $name:literal, )*) => {
        /// The stable code of an [`Error`] (the `code` column of `docs/errors.md`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Code {
            /// Every code, in the order of `docs/errors.md`.
            pub const ALL: &[Code] = &[$(Code::$variant,)*];

            /// The code as users see it: a short snake_case name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $name,)*
                }
            }
        }
    };
}

codes! {
    /// The prompt is empty.
    PromptEmpty = "prompt_empty",
    /// The prompt is longer than `limits.max_prompt_bytes`.
    PromptTooLarge = "prompt_too_large",
    /// The history has more messages than `limits.max_history_messages`.
    HistoryTooLong = "history_too_long",
    /// The history is larger than `limits.max_history_bytes`.
    HistoryTooLarge = "history_too_large",
    /// `max_tokens` is outside 0..=[`MAX_TOKENS_LIMIT`](super::MAX_TOKENS_LIMIT).
    MaxTokensOutOfRange = "max_tokens_out_of_range",
    /// A `provider_config` key or value the server does not accept, or forwarded credentials the
    /// provider refuses (a refused URL, a key of the wrong form).
    ProviderConfigInvalid = "provider_config_invalid",
    /// Another field of the request is wrong (OpenAI sampling fields, messages, plugin arguments).
    InvalidArgument = "invalid_argument",
    /// An AnalyzeIssue or AgenticStep field is over its size limit.
    AiopsFieldTooLarge = "aiops_field_too_large",
    /// The session name breaks the name rule.
    SessionNameInvalid = "session_name_invalid",
    /// No session of that name for the caller.
    SessionNotFound = "session_not_found",
    /// The session file exists but is not a session.
    SessionCorrupt = "session_corrupt",
    /// The session store's file system failed.
    SessionStorageFailed = "session_storage_failed",
    /// The call carries no valid credentials.
    Unauthenticated = "unauthenticated",
    /// The caller's role may not do this.
    PermissionDenied = "permission_denied",
    /// The caller is over its rate limit.
    RateLimited = "rate_limited",
    /// The caller's address failed authentication too often.
    TooManyAuthFailures = "too_many_auth_failures",
    /// The caller holds as many open streams as it may.
    TooManyStreams = "too_many_streams",
    /// The named provider is not configured on this server.
    ProviderUnknown = "provider_unknown",
    /// No provider is configured at all.
    NoProviders = "no_providers",
    /// The provider does not know the model.
    ModelNotFound = "model_not_found",
    /// The prompt and history are longer than the model's context.
    ContextTooLong = "context_too_long",
    /// The provider refused the request as invalid.
    UpstreamBadRequest = "upstream_bad_request",
    /// The provider refused the server's (or the forwarded) key.
    UpstreamAuthFailed = "upstream_auth_failed",
    /// The provider (every provider of the fallback chain) rate-limited the call.
    UpstreamRateLimited = "upstream_rate_limited",
    /// The provider (every provider of the chain) did not answer in time.
    UpstreamTimeout = "upstream_timeout",
    /// The provider failed: a 5xx, a dropped connection, an answer that is not its protocol.
    UpstreamUnavailable = "upstream_unavailable",
    /// Every provider of the fallback chain failed, for different reasons.
    AllProvidersFailed = "all_providers_failed",
    /// An interactive session waited longer than `limits.interactive_idle_timeout`.
    IdleTimeout = "idle_timeout",
    /// The server was not started from config files, so there is nothing to reload.
    ReloadUnavailable = "reload_unavailable",
    /// The new configuration was refused; the previous one keeps serving.
    ReloadFailed = "reload_failed",
    /// The conversation hub is turned off on this server.
    HubDisabled = "hub_disabled",
    /// The conversation hub's store cannot be opened or reached.
    HubUnavailable = "hub_unavailable",
    /// No conversation has this id.
    ConversationNotFound = "conversation_not_found",
    /// A hub subscriber fell further behind the live events than the tail buffer holds.
    SubscriberLagged = "subscriber_lagged",
    /// The conversation hub's store failed an operation.
    HubStoreFailed = "hub_store_failed",
    /// No plugin of that name (or none the caller may see).
    PluginNotFound = "plugin_not_found",
    /// The plugin has no build for the `os`/`arch` asked for.
    PluginPlatformNotFound = "plugin_platform_not_found",
    /// `@coder` is built in: it runs in the client.
    PluginBuiltin = "plugin_builtin",
    /// The plugin could not be started or read.
    PluginFailed = "plugin_failed",
    /// No agent of that name.
    AgentNotFound = "agent_not_found",
    /// No skill of that name.
    SkillNotFound = "skill_not_found",
    /// The server is shutting down: it takes no new calls and stops long work (a plugin run);
    /// another instance may take the call.
    ShuttingDown = "shutting_down",
    /// The capability is not in this build.
    NotImplemented = "not_implemented",
    /// The server failed in a way the caller cannot fix.
    Internal = "internal",
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a use case failed. The message is for people; [`Error::code`] is for programs. Messages
/// never contain keys, tokens or file paths.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// See [`Code::PromptEmpty`].
    #[error("prompt cannot be empty")]
    PromptEmpty,
    /// See [`Code::PromptTooLarge`].
    #[error("validation: prompt is {bytes} bytes; the limit is {limit}")]
    PromptTooLarge {
        /// The prompt's size.
        bytes: usize,
        /// `limits.max_prompt_bytes`.
        limit: usize,
    },
    /// See [`Code::HistoryTooLong`].
    #[error("validation: history has {messages} messages; the limit is {limit}")]
    HistoryTooLong {
        /// The history's length.
        messages: usize,
        /// `limits.max_history_messages`.
        limit: usize,
    },
    /// See [`Code::HistoryTooLarge`].
    #[error("validation: history is {bytes} bytes; the limit is {limit}")]
    HistoryTooLarge {
        /// The history's size (roles and contents).
        bytes: usize,
        /// `limits.max_history_bytes`.
        limit: usize,
    },
    /// See [`Code::MaxTokensOutOfRange`].
    #[error("validation: max_tokens must be between 0 and {limit}")]
    MaxTokensOutOfRange {
        /// The largest accepted value.
        limit: u32,
    },
    /// A `provider_config` entry the server refuses (see [`Code::ProviderConfigInvalid`]).
    #[error("validation: {0}")]
    ProviderConfigInvalid(String),
    /// See [`Code::InvalidArgument`]; the message is whole as given.
    #[error("{0}")]
    InvalidArgument(String),
    /// See [`Code::AiopsFieldTooLarge`].
    #[error("validation: {field} is {bytes} bytes; the limit is {limit}")]
    AiopsFieldTooLarge {
        /// The field.
        field: &'static str,
        /// Its size.
        bytes: usize,
        /// Its limit.
        limit: usize,
    },
    /// See [`Code::SessionNameInvalid`].
    #[error("validation: {0}")]
    SessionNameInvalid(String),
    /// See [`Code::SessionNotFound`].
    #[error("session '{0}' not found")]
    SessionNotFound(String),
    /// A session the store could not read or write ([`Code::SessionCorrupt`],
    /// [`Code::SessionStorageFailed`]); the message names the session at most.
    #[error("{message}")]
    SessionStore {
        /// Which of the two.
        code: Code,
        /// What failed.
        message: String,
    },
    /// See [`Code::Unauthenticated`].
    #[error("authentication failed")]
    Unauthenticated,
    /// See [`Code::PermissionDenied`]; the message says what the role may not do.
    #[error("{0}")]
    PermissionDenied(String),
    /// See [`Code::RateLimited`].
    #[error("rate limit exceeded, retry after {secs} seconds")]
    RateLimited {
        /// Whole seconds until the next call would be admitted (at least 1).
        secs: u64,
    },
    /// See [`Code::TooManyAuthFailures`]; the message is the authenticator's.
    #[error("{message}")]
    TooManyAuthFailures {
        /// What the caller is told.
        message: String,
        /// How long the address stays refused.
        retry_after: Duration,
    },
    /// See [`Code::TooManyStreams`].
    #[error("too many open streams for this principal (the limit is {limit})")]
    TooManyStreams {
        /// `limits.max_streams_per_principal`.
        limit: u32,
    },
    /// A provider error ([`LlmError`]); its code follows its class.
    #[error(transparent)]
    Provider(#[from] LlmError),
    /// See [`Code::IdleTimeout`].
    #[error("interactive session closed: no message for {idle} (limits.interactive_idle_timeout)")]
    IdleTimeout {
        /// The timeout, as the config writes it.
        idle: String,
    },
    /// See [`Code::ReloadUnavailable`].
    #[error("this server was not started from config files; nothing to reload")]
    ReloadUnavailable,
    /// See [`Code::ReloadFailed`].
    #[error("reload failed; the previous configuration keeps serving")]
    ReloadFailed {
        /// What was wrong with the new configuration, one problem each.
        problems: Vec<String>,
    },
    /// A conversation hub error; its code follows its kind.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A catalog failure (plugins, agents, skills) other than a bad argument or a refused
    /// permission; its code says which.
    #[error("{message}")]
    Catalog {
        /// One of the `plugin_*`, `agent_not_found`, `skill_not_found`, `shutting_down` codes.
        code: Code,
        /// What failed.
        message: String,
    },
    /// See [`Code::NotImplemented`].
    #[error("{rpc} is not in this build yet: it waits for {capability}")]
    NotImplemented {
        /// The call.
        rpc: &'static str,
        /// The capability it waits for.
        capability: &'static str,
    },
    /// See [`Code::Internal`].
    #[error("{0}")]
    Internal(String),
}

/// Whole seconds of a wait, at least one (a caller told "0" would retry at once).
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs_f64().ceil() as u64).max(1)
}

impl Error {
    /// The stable code.
    pub fn code(&self) -> Code {
        match self {
            Error::PromptEmpty => Code::PromptEmpty,
            Error::PromptTooLarge { .. } => Code::PromptTooLarge,
            Error::HistoryTooLong { .. } => Code::HistoryTooLong,
            Error::HistoryTooLarge { .. } => Code::HistoryTooLarge,
            Error::MaxTokensOutOfRange { .. } => Code::MaxTokensOutOfRange,
            Error::ProviderConfigInvalid(_) => Code::ProviderConfigInvalid,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::AiopsFieldTooLarge { .. } => Code::AiopsFieldTooLarge,
            Error::SessionNameInvalid(_) => Code::SessionNameInvalid,
            Error::SessionNotFound(_) => Code::SessionNotFound,
            Error::SessionStore { code, .. } => *code,
            Error::Unauthenticated => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::RateLimited { .. } => Code::RateLimited,
            Error::TooManyAuthFailures { .. } => Code::TooManyAuthFailures,
            Error::TooManyStreams { .. } => Code::TooManyStreams,
            Error::Provider(e) => provider_code(e),
            Error::IdleTimeout { .. } => Code::IdleTimeout,
            Error::ReloadUnavailable => Code::ReloadUnavailable,
            Error::ReloadFailed { .. } => Code::ReloadFailed,
            Error::Hub(e) => hub_code(e),
            Error::Catalog { code, .. } => *code,
            Error::NotImplemented { .. } => Code::NotImplemented,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// Whether the same call may succeed if the caller tries again (later, when
    /// [`Error::retry_after`] says when).
    pub fn retryable(&self) -> bool {
        self.code().retryable()
    }

    /// How long the caller should wait before trying again, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { secs } => Some(Duration::from_secs(*secs)),
            Error::TooManyAuthFailures { retry_after, .. } => Some(*retry_after),
            // A stream slot frees up when one of the caller's streams ends; a second is a fair
            // first wait.
            Error::TooManyStreams { .. } => Some(Duration::from_secs(1)),
            Error::Provider(LlmError::Upstream(u)) => u.retry_after,
            Error::Provider(LlmError::AllFailed(all)) => {
                all.iter().filter_map(|u| u.retry_after).min()
            }
            _ => None,
        }
    }
}

impl Code {
    /// Whether a retry may help: the failure is about load or time, not about the request.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Code::RateLimited
                | Code::TooManyAuthFailures
                | Code::TooManyStreams
                | Code::UpstreamRateLimited
                | Code::UpstreamTimeout
                | Code::UpstreamUnavailable
                | Code::AllProvidersFailed
                | Code::SessionStorageFailed
                | Code::HubUnavailable
                | Code::SubscriberLagged
                | Code::HubStoreFailed
                | Code::ShuttingDown
                | Code::Internal
        )
    }
}

/// The code of a provider error: a single upstream failure by its class; a whole fallback chain
/// by the class its links share (every link rate-limited is the chain rate-limited), else
/// [`Code::AllProvidersFailed`].
fn provider_code(e: &LlmError) -> Code {
    match e {
        LlmError::UnknownProvider { .. } => Code::ProviderUnknown,
        LlmError::NoProviders => Code::NoProviders,
        LlmError::InvalidRequest(_) => Code::ProviderConfigInvalid,
        LlmError::Upstream(u) => class_code(u.class),
        LlmError::AllFailed(all) => match shared_class(all) {
            Some(ErrorClass::RateLimit) => Code::UpstreamRateLimited,
            Some(ErrorClass::Timeout) => Code::UpstreamTimeout,
            _ => Code::AllProvidersFailed,
        },
    }
}

/// The class every failure of a chain has, when they all have the same one.
fn shared_class(all: &[UpstreamError]) -> Option<ErrorClass> {
    let first = all.first()?.class;
    all.iter().all(|u| u.class == first).then_some(first)
}

fn class_code(class: ErrorClass) -> Code {
    match class {
        ErrorClass::RateLimit => Code::UpstreamRateLimited,
        ErrorClass::Timeout => Code::UpstreamTimeout,
        ErrorClass::Auth => Code::UpstreamAuthFailed,
        ErrorClass::ModelNotFound => Code::ModelNotFound,
        ErrorClass::ContextTooLong => Code::ContextTooLong,
        ErrorClass::BadRequest => Code::UpstreamBadRequest,
        ErrorClass::Server | ErrorClass::Transport | ErrorClass::Malformed => {
            Code::UpstreamUnavailable
        }
    }
}

fn hub_code(e: &HubError) -> Code {
    match e {
        HubError::Disabled => Code::HubDisabled,
        HubError::Unavailable(_) => Code::HubUnavailable,
        HubError::Unauthenticated => Code::Unauthenticated,
        HubError::PermissionDenied(_) => Code::PermissionDenied,
        HubError::InvalidArgument(_) => Code::InvalidArgument,
        HubError::ConversationNotFound(_) => Code::ConversationNotFound,
        HubError::SubscriberLagged { .. } => Code::SubscriberLagged,
        HubError::Store(_) => Code::HubStoreFailed,
    }
}

impl From<SessionError> for Error {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::InvalidName { reason } => Error::SessionNameInvalid(reason),
            SessionError::NotFound { name } => Error::SessionNotFound(name),
            e @ SessionError::Corrupt { .. } => Error::SessionStore {
                code: Code::SessionCorrupt,
                message: e.to_string(),
            },
            e @ SessionError::Io { .. } => Error::SessionStore {
                code: Code::SessionStorageFailed,
                message: e.to_string(),
            },
        }
    }
}

impl From<CatalogError> for Error {
    fn from(e: CatalogError) -> Self {
        let code = match &e {
            CatalogError::Invalid(_) => return Error::InvalidArgument(e.to_string()),
            CatalogError::Forbidden(_) => return Error::PermissionDenied(e.to_string()),
            CatalogError::PluginNotFound(_) => Code::PluginNotFound,
            CatalogError::NoPlatformBuild { .. } => Code::PluginPlatformNotFound,
            CatalogError::AgentNotFound(_) => Code::AgentNotFound,
            CatalogError::SkillNotFound(_) => Code::SkillNotFound,
            CatalogError::Builtin(_) => Code::PluginBuiltin,
            CatalogError::Failed { .. } => Code::PluginFailed,
            CatalogError::ShuttingDown => Code::ShuttingDown,
        };
        Error::Catalog {
            code,
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The codes of `docs/errors.md`'s table, in its order.
    fn documented_codes() -> Vec<String> {
        let doc = include_str!("../../docs/errors.md");
        doc.lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_documented_table_lists_exactly_the_codes() {
        let listed: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(documented_codes(), listed);
    }

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            let s = c.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(
                !s.is_empty() && s.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
                "{s}"
            );
        }
    }

    #[test]
    fn hub_errors_keep_the_code_the_hub_names() {
        let all = [
            HubError::Disabled,
            HubError::Unavailable("x".into()),
            HubError::Unauthenticated,
            HubError::PermissionDenied("x".into()),
            HubError::InvalidArgument("x".into()),
            HubError::ConversationNotFound("c".into()),
            HubError::SubscriberLagged {
                behind: 3,
                last_seq: 1,
                tail_buffer: 2,
            },
            HubError::Store("x".into()),
        ];
        for e in all {
            assert_eq!(Error::from(e.clone()).code().as_str(), e.code(), "{e}");
        }
    }

    fn up(class: ErrorClass, retry_after: Option<Duration>) -> UpstreamError {
        UpstreamError {
            provider: "p".into(),
            class,
            status: None,
            message: String::new(),
            retry_after,
        }
    }

    #[test]
    fn provider_errors_get_the_code_of_their_class() {
        let cases = [
            (
                LlmError::UnknownProvider {
                    name: "x".into(),
                    available: "p".into(),
                },
                Code::ProviderUnknown,
            ),
            (LlmError::NoProviders, Code::NoProviders),
            (
                LlmError::InvalidRequest("bad".into()),
                Code::ProviderConfigInvalid,
            ),
            (
                LlmError::Upstream(up(ErrorClass::RateLimit, None)),
                Code::UpstreamRateLimited,
            ),
            (
                LlmError::Upstream(up(ErrorClass::Transport, None)),
                Code::UpstreamUnavailable,
            ),
            (
                LlmError::Upstream(up(ErrorClass::Auth, None)),
                Code::UpstreamAuthFailed,
            ),
            (
                LlmError::AllFailed(vec![
                    up(ErrorClass::RateLimit, Some(Duration::from_secs(9))),
                    up(ErrorClass::RateLimit, Some(Duration::from_secs(4))),
                ]),
                Code::UpstreamRateLimited,
            ),
            (
                LlmError::AllFailed(vec![
                    up(ErrorClass::Timeout, None),
                    up(ErrorClass::Timeout, None),
                ]),
                Code::UpstreamTimeout,
            ),
            (
                LlmError::AllFailed(vec![
                    up(ErrorClass::Timeout, None),
                    up(ErrorClass::Server, None),
                ]),
                Code::AllProvidersFailed,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(Error::from(e.clone()).code(), code, "{e}");
        }
        let chain = Error::from(LlmError::AllFailed(vec![
            up(ErrorClass::RateLimit, Some(Duration::from_secs(9))),
            up(ErrorClass::RateLimit, Some(Duration::from_secs(4))),
        ]));
        assert_eq!(chain.retry_after(), Some(Duration::from_secs(4)));
        assert!(chain.retryable());
        assert!(!Error::PromptEmpty.retryable());
    }

    #[test]
    fn catalog_errors_keep_their_messages() {
        let e = Error::from(CatalogError::Invalid("too many arguments".into()));
        assert_eq!(
            (e.code(), e.to_string()),
            (
                Code::InvalidArgument,
                "validation: too many arguments".to_string()
            )
        );
        let e = Error::from(CatalogError::Forbidden("run plugins"));
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = Error::from(CatalogError::NoPlatformBuild {
            name: "t".into(),
            os: "plan9".into(),
            arch: "mips".into(),
        });
        assert_eq!(
            (e.code(), e.to_string()),
            (
                Code::PluginPlatformNotFound,
                "plugin `t` has no build for plan9/mips".to_string()
            )
        );
        assert!(Error::from(CatalogError::ShuttingDown).retryable());
        assert!(!Error::from(CatalogError::PluginNotFound("x".into())).retryable());
    }

    #[test]
    fn session_errors_keep_their_messages() {
        let e = Error::from(SessionError::NotFound { name: "s".into() });
        assert_eq!(
            (e.code(), e.to_string()),
            (Code::SessionNotFound, "session 's' not found".to_string())
        );
        let e = Error::from(SessionError::InvalidName {
            reason: "session name cannot be empty".into(),
        });
        assert_eq!(e.to_string(), "validation: session name cannot be empty");
        let e = Error::from(SessionError::Corrupt {
            name: "s".into(),
            reason: "EOF".into(),
        });
        assert_eq!(e.code(), Code::SessionCorrupt);
        assert_eq!(e.to_string(), "session 's' is corrupt: EOF");
        let e = Error::from(SessionError::Io {
            action: "saving session 's'".into(),
            source: std::io::Error::other("disk full"),
        });
        assert_eq!(
            (e.code(), e.to_string()),
            (
                Code::SessionStorageFailed,
                "saving session 's' failed: disk full".to_string()
            )
        );
    }
}
