//! What can go wrong in `chatcli connect`, as one-line messages that say what happened and what to
//! try, and the exit code of each: 0 ok, 64 usage or bad input (EX_USAGE, like every other
//! subcommand), 3 cannot connect or TLS failure, 4 unauthenticated or denied, 5 rate limited (the
//! server's limits, the failed-auth limiter, the provider's), 6 the provider or the server failed
//! to answer, 70 internal error. Every gRPC status code the server can answer has its own message
//! ([`from_status`]); an error that came from one keeps its code for `--json` output.

use std::error::Error as _;

/// Exit codes of `chatcli connect`.
pub mod exit {
    /// The answer was printed.
    pub const OK: i32 = 0;
    /// A usage error or input the server refused as invalid (prompt too long, unknown provider):
    /// EX_USAGE, as for every subcommand.
    pub const USAGE: i32 = crate::exit::USAGE;
    /// The server could not be reached, the TLS handshake failed, or it is not a ChatCLI server.
    pub const CONNECT: i32 = 3;
    /// The server refused the credentials or the caller's role; or local credentials are unusable.
    pub const AUTH: i32 = 4;
    /// The server (its rate limit or its failed-auth limiter) or the provider behind it
    /// rate-limited the call.
    pub const RATE_LIMITED: i32 = 5;
    /// The provider, or the server itself, failed to answer.
    pub const PROVIDER: i32 = 6;
    /// The client itself failed (it could not start its async runtime).
    pub const SOFTWARE: i32 = crate::exit::SOFTWARE;
}

/// The kind of a failure: decides the exit code, and names the error in `--json` output when no
/// gRPC status code does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Exit 64.
    Usage,
    /// Exit 3.
    Connect,
    /// Exit 4.
    Auth,
    /// Exit 5.
    RateLimited,
    /// Exit 6.
    Provider,
    /// Exit 70: the client itself failed.
    Internal,
}

impl Class {
    /// The process exit code of this class.
    pub fn exit_code(self) -> i32 {
        match self {
            Class::Usage => exit::USAGE,
            Class::Connect => exit::CONNECT,
            Class::Auth => exit::AUTH,
            Class::RateLimited => exit::RATE_LIMITED,
            Class::Provider => exit::PROVIDER,
            Class::Internal => exit::SOFTWARE,
        }
    }

    /// Stable lower-case name (`--json` output when no gRPC code applies).
    pub fn name(self) -> &'static str {
        match self {
            Class::Usage => "usage",
            Class::Connect => "connect",
            Class::Auth => "auth",
            Class::RateLimited => "rate_limited",
            Class::Provider => "provider",
            Class::Internal => "internal",
        }
    }
}

/// A failure of the client: its class, its message (one line) and, when the server answered it
/// with a gRPC status, that status code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    class: Class,
    message: String,
    code: Option<tonic::Code>,
}

impl ClientError {
    fn new(class: Class, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            code: None,
        }
    }

    /// A usage error or refused input (exit 64).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Class::Usage, message)
    }

    /// The server cannot be reached or is not a ChatCLI server (exit 3).
    pub fn connect(message: impl Into<String>) -> Self {
        Self::new(Class::Connect, message)
    }

    /// Credentials refused or role denied (exit 4).
    pub fn auth(message: impl Into<String>) -> Self {
        Self::new(Class::Auth, message)
    }

    /// Rate limited (exit 5).
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(Class::RateLimited, message)
    }

    /// The provider or the server failed (exit 6).
    pub fn provider(message: impl Into<String>) -> Self {
        Self::new(Class::Provider, message)
    }

    /// The client itself failed (exit 70).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Class::Internal, message)
    }

    fn with_code(mut self, code: tonic::Code) -> Self {
        self.code = Some(code);
        self
    }

    /// The class of this error.
    pub fn class(&self) -> Class {
        self.class
    }

    /// The gRPC status code the server answered, when this error is one.
    pub fn grpc_code(&self) -> Option<tonic::Code> {
        self.code
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        self.class.exit_code()
    }

    /// Whether a retry after reconnecting may help (the connection, not the request, failed).
    pub fn is_connection(&self) -> bool {
        self.class == Class::Connect
    }

    /// What `--json` prints on stdout for this error:
    /// `{"error": {"code": "<gRPC code name or class>", "message": "..."}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let code = match self.code {
            Some(c) => code_name(c),
            None => self.class.name(),
        };
        serde_json::json!({"error": {"code": code, "message": self.message}})
    }
}

/// The canonical name of a gRPC status code, as the gRPC specification spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Which call failed, for the wording of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The first call (`Health`): failing here means "not reachable / not a ChatCLI server".
    Handshake,
    /// Any later call.
    Call,
}

/// The messages of an error and of its sources, joined by ": " with repeats left out.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// The server's `retry-after` (seconds), else the seconds in "retry after N seconds".
pub fn retry_after(status: &tonic::Status) -> Option<u64> {
    if let Some(v) = status.metadata().get("retry-after")
        && let Ok(text) = v.to_str()
        && let Ok(secs) = text.trim().parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(secs.ceil() as u64);
    }
    let msg = status.message();
    let rest = &msg[msg.find("retry after ")? + "retry after ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The wait a rate-limited caller is told: "retry in N s", or a vaguer hint without a number.
fn wait_hint(status: &tonic::Status) -> String {
    match retry_after(status) {
        Some(s) => format!("retry in {} s", s.max(1)),
        None => "retry in a little while".to_string(),
    }
}

/// Whether the server's message is about the provider behind it (the server prefixes those).
fn from_provider(msg: &str) -> bool {
    msg.starts_with("LLM error") || msg.starts_with("every provider failed")
}

/// Maps a failed call to an error. `target` names the server in messages; `tls` says whether TLS
/// was in use (a transport failure then mentions the handshake).
pub fn from_status(status: &tonic::Status, stage: Stage, target: &str, tls: bool) -> ClientError {
    use tonic::Code;
    if let Some(source) = status.source() {
        return transport_failed(&chain(source), stage, target, tls);
    }
    let code = status.code();
    let msg = match status.message() {
        "" => "no details given",
        m => m,
    };
    let e = match code {
        Code::Unauthenticated => ClientError::auth(format!(
            "{target} refused the credentials ({msg}); check --token / CHATCLI_REMOTE_TOKEN \
             (or the client certificate)"
        )),
        Code::PermissionDenied => ClientError::auth(format!(
            "{target} denied the call ({msg}): the role of your token or certificate does not \
             allow it; use one with a role that does (user for prompts and sessions, admin for \
             everything)"
        )),
        Code::ResourceExhausted if msg.contains("failed authentication attempts") => {
            // The wait is said once, from `retry-after` when the server sent it.
            let what = msg.split("; retry after").next().unwrap_or(msg);
            ClientError::rate_limited(format!(
                "{target} refused the call: {what}; {}",
                wait_hint(status)
            ))
        }
        Code::ResourceExhausted if from_provider(msg) => ClientError::rate_limited(format!(
            "the provider rate-limited the call ({msg}); {}, or pick another --provider",
            wait_hint(status)
        )),
        Code::ResourceExhausted => ClientError::rate_limited(format!(
            "rate limited by {target} ({msg}); {}",
            wait_hint(status)
        )),
        Code::Unimplemented if stage == Stage::Handshake => ClientError::connect(format!(
            "{target} answers gRPC but not as a ChatCLI server ({msg}); check the address and port"
        )),
        // Any other answer to Health: not the server this client talks to.
        _ if stage == Stage::Handshake => {
            return ClientError::connect(format!(
                "{target} did not answer as a ChatCLI server ({}: {msg}); check the address and \
                 port",
                code_name(code)
            ));
        }
        Code::Unimplemented => ClientError::connect(format!(
            "{target} does not implement this call ({msg}); the server may be too old or not \
             have this feature"
        )),
        Code::InvalidArgument if from_provider(msg) => ClientError::provider(format!(
            "the provider refused the request as invalid ({msg}); shorten the prompt or the \
             history, or check --model and --max-tokens"
        )),
        Code::InvalidArgument => {
            ClientError::usage(format!("{target} refused the request as invalid: {msg}"))
        }
        Code::NotFound if from_provider(msg) => ClientError::usage(format!(
            "the provider does not know the model ({msg}); check --model (or /model)"
        )),
        Code::NotFound if msg.starts_with("session") => ClientError::usage(format!(
            "not found on {target}: {msg}; /session list shows the saved sessions"
        )),
        Code::NotFound => ClientError::usage(format!("not found on {target}: {msg}")),
        Code::AlreadyExists => ClientError::usage(format!(
            "{target} refused the request: it already exists ({msg}); pick another name"
        )),
        Code::FailedPrecondition => ClientError::usage(format!(
            "{target} cannot do this in its current state ({msg})"
        )),
        Code::OutOfRange => {
            ClientError::usage(format!("{target} refused a value out of range: {msg}"))
        }
        Code::DeadlineExceeded => ClientError::provider(format!(
            "no answer in time ({msg}); try a larger --timeout or another --provider/--model"
        )),
        Code::Unavailable if msg.contains("draining") || msg.contains("shutting down") => {
            ClientError::connect(format!(
                "{target} is shutting down ({msg}); try again in a moment"
            ))
        }
        Code::Unavailable if msg.starts_with("no LLM provider") => ClientError::provider(format!(
            "{target} has no LLM provider configured ({msg}); ask its operator to add one"
        )),
        Code::Unavailable if from_provider(msg) => ClientError::provider(format!(
            "the provider failed ({msg}); try again later or pick another --provider/--model"
        )),
        Code::Unavailable => ClientError::connect(format!(
            "{target} is unavailable ({msg}); try again in a moment"
        )),
        Code::Cancelled => ClientError::connect(format!(
            "the call to {target} was cancelled ({msg}); try again"
        )),
        Code::Aborted => {
            ClientError::connect(format!("{target} aborted the call ({msg}); try again"))
        }
        Code::Internal => ClientError::provider(format!(
            "{target} failed with an internal error ({msg}); try again, and see the server's log \
             if it persists"
        )),
        Code::DataLoss => ClientError::provider(format!(
            "{target} reported lost or corrupt data ({msg}); see the server's log"
        )),
        Code::Unknown => ClientError::provider(format!(
            "{target} failed with an unknown error ({msg}); try again, and see the server's log \
             if it persists"
        )),
        Code::Ok => ClientError::provider(format!(
            "{target} ended the call without an answer ({msg}); try again"
        )),
    };
    e.with_code(code)
}

/// A call that failed below gRPC (connection refused, reset, TLS, not HTTP/2).
fn transport_failed(cause: &str, stage: Stage, target: &str, tls: bool) -> ClientError {
    if stage == Stage::Handshake {
        let lower = cause.to_lowercase();
        let closed = ["closed", "canceled", "cancelled", "reset", "eof"]
            .iter()
            .any(|w| lower.contains(w));
        if closed && tls {
            return ClientError::connect(format!(
                "{target} closed the TLS connection right after the handshake ({cause}); it \
                 probably requires a client certificate (mTLS) that it accepts: give \
                 --tls-client-cert and --tls-client-key (or CHATCLI_TLS_CLIENT_CERT/_KEY)"
            ));
        }
        if closed {
            return ClientError::connect(format!(
                "{target} closed the connection without answering gRPC ({cause}); check the \
                 address and port: is it a ChatCLI server (and does it want --tls)?"
            ));
        }
    }
    connection_failed(target, cause, tls)
}

/// A failure to reach `target`, with the cause; TLS failures say so in plain words.
pub fn connection_failed(target: &str, cause: &str, tls: bool) -> ClientError {
    let lower = cause.to_lowercase();
    let tlsish = [
        "tls",
        "certificate",
        "handshake",
        "corrupt message",
        "peer sent no certificates",
        "invalid peer",
        "unknownissuer",
        "alert",
    ]
    .iter()
    .any(|w| lower.contains(w));
    if tls && tlsish {
        return ClientError::connect(format!(
            "the TLS handshake with {target} failed ({cause}); check that the server serves TLS, \
             that --ca-cert is the CA that signed its certificate and, for mTLS, the client \
             certificate"
        ));
    }
    if tls && (lower.contains("eof") || lower.contains("connection reset")) {
        return ClientError::connect(format!(
            "the TLS handshake with {target} failed: the server closed the connection ({cause}); \
             is it serving plaintext? Leave out --tls for a plaintext server on loopback"
        ));
    }
    if lower.contains("http2 error") || lower.contains("frame with invalid") {
        return ClientError::connect(format!(
            "{target} does not speak gRPC over HTTP/2 ({cause}); check the address and port: is \
             it a ChatCLI server?"
        ));
    }
    ClientError::connect(format!(
        "cannot connect to {target} ({cause}); check that the server is running and the address \
         is right"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: a failed unwrap is a failed test
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes_follow_the_issue() {
        let t = |s: tonic::Status| from_status(&s, Stage::Call, "srv", false).exit_code();
        assert_eq!(
            t(tonic::Status::unauthenticated("authentication failed")),
            4
        );
        assert_eq!(t(tonic::Status::permission_denied("no")), 4);
        assert_eq!(t(tonic::Status::resource_exhausted("slow")), 5);
        assert_eq!(
            t(tonic::Status::unavailable("LLM error: p: server: boom")),
            6
        );
        assert_eq!(t(tonic::Status::internal("LLM error: x")), 6);
        assert_eq!(
            t(tonic::Status::invalid_argument(
                "validation: prompt is 9 bytes; the limit is 1"
            )),
            64
        );
        assert_eq!(
            t(tonic::Status::invalid_argument("LLM error: p: context")),
            6
        );
        assert_eq!(
            from_status(
                &tonic::Status::internal("x"),
                Stage::Handshake,
                "srv",
                false
            )
            .exit_code(),
            3
        );
    }

    /// One row per gRPC status code the server may answer a call with: the message the user
    /// sees must say what the code means (not another code's story), and the exit code and the
    /// `--json` code must follow.
    #[test]
    fn every_grpc_code_has_its_own_message() {
        struct Row {
            code: Code,
            server_says: &'static str,
            says: &'static [&'static str],
            never: &'static [&'static str],
            exit: i32,
        }
        const PROVIDER_FAILED: &str = "the provider failed";
        const CHECK_TOKEN: &str = "check --token";
        let rows = [
            Row {
                code: Code::Ok,
                server_says: "",
                says: &["without an answer"],
                never: &[PROVIDER_FAILED],
                exit: 6,
            },
            Row {
                code: Code::Cancelled,
                server_says: "client went away",
                says: &["was cancelled", "client went away"],
                never: &[PROVIDER_FAILED],
                exit: 3,
            },
            Row {
                code: Code::Unknown,
                server_says: "boom",
                says: &["unknown error", "boom"],
                never: &[PROVIDER_FAILED],
                exit: 6,
            },
            Row {
                code: Code::InvalidArgument,
                server_says: "validation: history has 900 messages; the limit is 500",
                says: &["refused the request as invalid", "the limit is 500"],
                never: &[PROVIDER_FAILED],
                exit: 64,
            },
            Row {
                code: Code::DeadlineExceeded,
                server_says: "Deadline expired before operation could complete",
                says: &["no answer in time", "--timeout"],
                never: &[PROVIDER_FAILED],
                exit: 6,
            },
            Row {
                code: Code::NotFound,
                server_says: "session 'nosuch' not found",
                says: &[
                    "not found on srv",
                    "session 'nosuch' not found",
                    "/session list",
                ],
                never: &[PROVIDER_FAILED, "try again later"],
                exit: 64,
            },
            Row {
                code: Code::AlreadyExists,
                server_says: "binding exists",
                says: &["already exists", "binding exists"],
                never: &[PROVIDER_FAILED],
                exit: 64,
            },
            Row {
                code: Code::PermissionDenied,
                server_says: "readonly principals cannot save sessions",
                says: &[
                    "denied the call",
                    "role",
                    "readonly principals cannot save sessions",
                ],
                never: &[PROVIDER_FAILED, CHECK_TOKEN],
                exit: 4,
            },
            Row {
                code: Code::ResourceExhausted,
                server_says: "rate limit exceeded, retry after 7 seconds",
                says: &["rate limited by srv", "retry in 7 s"],
                never: &[PROVIDER_FAILED, CHECK_TOKEN],
                exit: 5,
            },
            Row {
                code: Code::FailedPrecondition,
                server_says: "not ready",
                says: &["current state", "not ready"],
                never: &[PROVIDER_FAILED],
                exit: 64,
            },
            Row {
                code: Code::Aborted,
                server_says: "subscriber fell behind",
                says: &["aborted the call", "subscriber fell behind"],
                never: &[PROVIDER_FAILED],
                exit: 3,
            },
            Row {
                code: Code::OutOfRange,
                server_says: "since_seq is past the end",
                says: &["out of range", "since_seq"],
                never: &[PROVIDER_FAILED],
                exit: 64,
            },
            Row {
                code: Code::Unimplemented,
                server_says: "AnalyzeIssue is not in this build yet",
                says: &["does not implement this call"],
                never: &[PROVIDER_FAILED],
                exit: 3,
            },
            Row {
                code: Code::Internal,
                server_says: "session 'x' is corrupt: bad json",
                says: &["internal error", "is corrupt"],
                never: &[PROVIDER_FAILED],
                exit: 6,
            },
            Row {
                code: Code::Unavailable,
                server_says: "the hub is disabled",
                says: &["srv is unavailable", "the hub is disabled"],
                never: &[PROVIDER_FAILED],
                exit: 3,
            },
            Row {
                code: Code::DataLoss,
                server_says: "truncated",
                says: &["lost or corrupt data", "truncated"],
                never: &[PROVIDER_FAILED],
                exit: 6,
            },
            Row {
                code: Code::Unauthenticated,
                server_says: "authentication failed",
                says: &["refused the credentials", CHECK_TOKEN],
                never: &[PROVIDER_FAILED],
                exit: 4,
            },
        ];
        // Every code is in the table exactly once.
        for n in 0..=16 {
            let code = Code::from_i32(n);
            assert_eq!(
                rows.iter().filter(|r| r.code == code).count(),
                1,
                "{code:?} must have one row"
            );
        }
        let mut messages = std::collections::HashSet::new();
        for row in &rows {
            let status = tonic::Status::new(row.code, row.server_says);
            let e = from_status(&status, Stage::Call, "srv", false);
            let text = e.to_string();
            for want in row.says {
                assert!(
                    text.contains(want),
                    "{:?}: {want:?} not in {text:?}",
                    row.code
                );
            }
            for unwanted in row.never {
                assert!(
                    !text.contains(unwanted),
                    "{:?}: {unwanted:?} in {text:?}",
                    row.code
                );
            }
            assert_eq!(e.exit_code(), row.exit, "{:?}: {text}", row.code);
            assert_eq!(e.grpc_code(), Some(row.code));
            assert_eq!(
                e.to_json(),
                serde_json::json!({"error": {"code": code_name(row.code), "message": text}})
            );
            // No two codes share a message template.
            let template = text.replace(row.server_says, "");
            assert!(
                messages.insert(template),
                "{:?} repeats another code's message",
                row.code
            );
        }
    }

    #[test]
    fn provider_failures_keep_their_own_words() {
        let t = |s: tonic::Status| from_status(&s, Stage::Call, "srv", false);
        let e = t(tonic::Status::unavailable(
            "LLM error: echo: server: upstream answered 500",
        ));
        assert!(e.to_string().starts_with("the provider failed"), "{e}");
        assert_eq!(e.exit_code(), 6);
        let e = t(tonic::Status::unavailable(
            "every provider failed: a: server; b: timeout",
        ));
        assert!(e.to_string().starts_with("the provider failed"), "{e}");
        let e = t(tonic::Status::unavailable(
            "no LLM provider is configured on this server",
        ));
        assert!(e.to_string().contains("no LLM provider configured"), "{e}");
        let e = t(tonic::Status::unavailable("server is draining"));
        assert!(e.to_string().contains("shutting down"), "{e}");
        assert!(e.is_connection());
        let e = t(tonic::Status::not_found(
            "LLM error: p: model_not_found: gpt-9",
        ));
        assert!(e.to_string().contains("check --model"), "{e}");
        assert_eq!(e.exit_code(), 64);
        let e = t(tonic::Status::invalid_argument(
            "unknown provider `NOPE`; available: echo",
        ));
        assert!(e.to_string().contains("unknown provider `NOPE`"), "{e}");
        assert_eq!(e.exit_code(), 64);
        let mut s = tonic::Status::resource_exhausted("LLM error: p: rate_limit: slow down");
        s.metadata_mut()
            .insert("retry-after", "12".parse().unwrap());
        let e = t(s);
        assert!(e.to_string().contains("the provider rate-limited"), "{e}");
        assert!(e.to_string().contains("retry in 12 s"), "{e}");
    }

    #[test]
    fn the_failed_auth_limiter_is_not_a_wrong_token() {
        let mut s = tonic::Status::resource_exhausted(
            "too many failed authentication attempts from this address; retry after 9 seconds",
        );
        s.metadata_mut().insert("retry-after", "9".parse().unwrap());
        let e = from_status(&s, Stage::Call, "srv", false);
        let text = e.to_string();
        assert!(
            text.contains("too many failed authentication attempts"),
            "{text}"
        );
        assert!(text.contains("retry in 9 s"), "{text}");
        assert_eq!(text.matches("retry").count(), 1, "{text}");
        assert!(!text.contains("--token"), "{text}");
        assert_eq!(e.exit_code(), 5);
        assert_eq!(e.to_json()["error"]["code"], "RESOURCE_EXHAUSTED");
    }

    #[test]
    fn errors_without_a_status_are_named_by_their_class() {
        for (e, name, exit) in [
            (ClientError::usage("u"), "usage", 64),
            (ClientError::connect("c"), "connect", 3),
            (ClientError::auth("a"), "auth", 4),
            (ClientError::rate_limited("r"), "rate_limited", 5),
            (ClientError::provider("p"), "provider", 6),
            (ClientError::internal("i"), "internal", 70),
        ] {
            assert_eq!(e.exit_code(), exit);
            assert_eq!(e.grpc_code(), None);
            assert_eq!(e.to_json()["error"]["code"], name);
            assert_eq!(e.to_json()["error"]["message"], e.to_string());
        }
        // A refusal of Health by something that is not a ChatCLI server is a connection problem.
        let e = from_status(
            &tonic::Status::internal("x"),
            Stage::Handshake,
            "srv",
            false,
        );
        assert_eq!(e.to_json()["error"]["code"], "connect");
    }

    #[test]
    fn retry_after_comes_from_metadata_or_message() {
        let mut s = tonic::Status::resource_exhausted("rate limit exceeded");
        s.metadata_mut().insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&s), Some(7));
        let s = tonic::Status::resource_exhausted("rate limit exceeded, retry after 3 seconds");
        assert_eq!(retry_after(&s), Some(3));
        let e = from_status(&s, Stage::Call, "srv", false);
        assert!(e.to_string().contains("retry in 3 s"), "{e}");
    }
}
