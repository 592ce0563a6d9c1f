//! What can go wrong in `chatcli connect`, as one-line messages that say what happened and what to
//! try, and the exit code of each (the issue's codes, not the daemon's sysexits): 0 ok, 2 usage or
//! bad input, 3 cannot connect or TLS failure, 4 unauthenticated or denied, 5 rate limited, 6 the
//! provider failed.

use std::error::Error as _;

/// Exit codes of `chatcli connect`.
pub mod exit {
    /// The answer was printed.
    pub const OK: i32 = 0;
    /// A usage error or input the server refused as invalid (prompt too long, unknown provider).
    pub const USAGE: i32 = 2;
    /// The server could not be reached, the TLS handshake failed, or it is not a ChatCLI server.
    pub const CONNECT: i32 = 3;
    /// The server refused the credentials or the caller's role; or local credentials are unusable.
    pub const AUTH: i32 = 4;
    /// The server (or the provider behind it) rate-limited the call.
    pub const RATE_LIMITED: i32 = 5;
    /// The provider failed to answer.
    pub const PROVIDER: i32 = 6;
}

/// A failure of the client, carrying its message (one line) and exit code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Exit 2.
    #[error("{0}")]
    Usage(String),
    /// Exit 3.
    #[error("{0}")]
    Connect(String),
    /// Exit 4.
    #[error("{0}")]
    Auth(String),
    /// Exit 5.
    #[error("{0}")]
    RateLimited(String),
    /// Exit 6.
    #[error("{0}")]
    Provider(String),
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Usage(_) => exit::USAGE,
            ClientError::Connect(_) => exit::CONNECT,
            ClientError::Auth(_) => exit::AUTH,
            ClientError::RateLimited(_) => exit::RATE_LIMITED,
            ClientError::Provider(_) => exit::PROVIDER,
        }
    }

    /// Whether a retry after reconnecting may help (the connection, not the request, failed).
    pub fn is_connection(&self) -> bool {
        matches!(self, ClientError::Connect(_))
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

/// Maps a failed call to an error. `target` names the server in messages; `tls` says whether TLS
/// was in use (a transport failure then mentions the handshake).
pub fn from_status(status: &tonic::Status, stage: Stage, target: &str, tls: bool) -> ClientError {
    use tonic::Code;
    let msg = status.message();
    if let Some(source) = status.source() {
        let cause = chain(source);
        if tls && stage == Stage::Handshake {
            let lower = cause.to_lowercase();
            if ["closed", "canceled", "cancelled", "reset", "eof"]
                .iter()
                .any(|w| lower.contains(w))
            {
                return ClientError::Connect(format!(
                    "{target} closed the TLS connection right after the handshake ({cause}); it \
                     probably requires a client certificate (mTLS) that it accepts: give \
                     --tls-client-cert and --tls-client-key (or CHATCLI_TLS_CLIENT_CERT/_KEY)"
                ));
            }
        }
        if !tls && stage == Stage::Handshake {
            let lower = cause.to_lowercase();
            if ["closed", "canceled", "cancelled", "reset", "eof"]
                .iter()
                .any(|w| lower.contains(w))
            {
                return ClientError::Connect(format!(
                    "{target} closed the connection without answering gRPC ({cause}); check the \
                     address and port: is it a ChatCLI server (and does it want --tls)?"
                ));
            }
        }
        return connection_failed(target, &cause, tls);
    }
    match status.code() {
        Code::Unauthenticated => ClientError::Auth(format!(
            "{target} refused the credentials ({msg}); check --token / CHATCLI_REMOTE_TOKEN \
             (or the client certificate)"
        )),
        Code::PermissionDenied => ClientError::Auth(format!(
            "{target} denied the call ({msg}); your token's role does not allow it"
        )),
        Code::ResourceExhausted => {
            let when = match retry_after(status) {
                Some(s) => format!("retry in {s} s"),
                None => "retry in a little while".to_string(),
            };
            ClientError::RateLimited(format!("rate limited ({msg}); {when}"))
        }
        Code::Unimplemented if stage == Stage::Handshake => ClientError::Connect(format!(
            "{target} answers gRPC but not as a ChatCLI server ({msg}); check the address and port"
        )),
        Code::Unimplemented => ClientError::Connect(format!(
            "{target} does not implement this call ({msg}); the server may be too old"
        )),
        _ if stage == Stage::Handshake => ClientError::Connect(format!(
            "{target} did not answer as a ChatCLI server ({:?}: {msg}); check the address and port",
            status.code()
        )),
        Code::InvalidArgument if !msg.starts_with("LLM error") => {
            ClientError::Usage(format!("the server refused the request: {msg}"))
        }
        Code::DeadlineExceeded => ClientError::Provider(format!(
            "no answer in time ({msg}); try a larger --timeout or another --provider/--model"
        )),
        Code::Unavailable if msg.contains("draining") || msg.contains("shutting down") => {
            ClientError::Connect(format!(
                "{target} is shutting down ({msg}); try again in a moment"
            ))
        }
        Code::Cancelled => ClientError::Connect(format!(
            "the call to {target} was cancelled ({msg}); try again"
        )),
        _ => ClientError::Provider(format!(
            "the provider failed ({msg}); try again later or pick another --provider/--model"
        )),
    }
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
        return ClientError::Connect(format!(
            "the TLS handshake with {target} failed ({cause}); check that the server serves TLS, \
             that --ca-cert is the CA that signed its certificate and, for mTLS, the client \
             certificate"
        ));
    }
    if tls && (lower.contains("eof") || lower.contains("connection reset")) {
        return ClientError::Connect(format!(
            "the TLS handshake with {target} failed: the server closed the connection ({cause}); \
             is it serving plaintext? Leave out --tls for a plaintext server on loopback"
        ));
    }
    if lower.contains("http2 error") || lower.contains("frame with invalid") {
        return ClientError::Connect(format!(
            "{target} does not speak gRPC over HTTP/2 ({cause}); check the address and port: is \
             it a ChatCLI server?"
        ));
    }
    ClientError::Connect(format!(
        "cannot connect to {target} ({cause}); check that the server is running and the address \
         is right"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: a failed unwrap is a failed test
mod tests {
    use super::*;

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
            2
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
