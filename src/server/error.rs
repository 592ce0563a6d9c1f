//! The one mapping of the core's [`Error`] to both transports: a [`tonic::Status`]
//! ([`to_status`]) and an HTTP status with a JSON body ([`HttpError`]). The table is
//! `docs/errors.md`; [`grpc_code`] and [`http_status`] are its two columns, so the same error gets
//! the same class on both transports.
//!
//! The stable code travels as the `x-chatcli-error-code` metadata entry on gRPC (with the status,
//! so in the trailers) and as the `x-chatcli-error-code` header on HTTP, where the JSON body also
//! carries it as `chatcli_code` beside the body's own fields: the OpenAI routes answer
//! `{"error":{"message","type","param","code","chatcli_code"}}` (`type` and `code` as OpenAI
//! clients know them), `/request` answers `{"success":false,"error","code","chatcli_code"}`. The
//! gRPC message stays the error's text (clients read its `LLM error` / `every provider failed`
//! prefix); a known wait goes out as `retry-after` (seconds) on both.
//!
//! Two classes were chosen where the transports used to differ:
//! - an unknown provider (`provider_unknown`) is `NOT_FOUND` / 404: the name is valid in form but
//!   names nothing on this server (the set changes with a reload, so it is not an argument error),
//!   like a model the provider does not know (`model_not_found`, `NOT_FOUND` / 404 on both), and
//!   OpenAI clients expect 404 for a model they cannot use. The existing ChatCLI answers
//!   `INTERNAL` here, so neither former answer was the one its clients knew.
//! - every provider of the chain rate-limited (`upstream_rate_limited`) is `RESOURCE_EXHAUSTED` /
//!   429 with `retry-after`, as a single provider's rate limit is: the caller should wait, not
//!   retry at once as gRPC clients do on `UNAVAILABLE`; the existing ChatCLI uses
//!   `RESOURCE_EXHAUSTED` with `retry-after` for rate limits, and the chatcli client turns it into
//!   "retry in N s". For the same reason a chain that timed out everywhere (`upstream_timeout`) is
//!   `DEADLINE_EXCEEDED` / 504, as one provider's timeout is.

use std::borrow::Cow;

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::gateway::{Code, Error, whole_seconds};
use crate::llm::LlmError;

/// The header (HTTP) and metadata key (gRPC) carrying an error's stable code.
pub const ERROR_CODE_HEADER: HeaderName = HeaderName::from_static("x-chatcli-error-code");

/// The gRPC status code of an error code.
pub fn grpc_code(code: Code) -> tonic::Code {
    use tonic::Code as G;
    match code {
        Code::PromptEmpty
        | Code::PromptTooLarge
        | Code::HistoryTooLong
        | Code::HistoryTooLarge
        | Code::MaxTokensOutOfRange
        | Code::ProviderConfigInvalid
        | Code::InvalidArgument
        | Code::AiopsFieldTooLarge
        | Code::SessionNameInvalid
        | Code::ContextTooLong
        | Code::UpstreamBadRequest => G::InvalidArgument,
        Code::SessionNotFound
        | Code::ProviderUnknown
        | Code::ModelNotFound
        | Code::ConversationNotFound
        | Code::PluginNotFound
        | Code::PluginPlatformNotFound
        | Code::AgentNotFound
        | Code::SkillNotFound => G::NotFound,
        Code::SessionCorrupt
        | Code::SessionStorageFailed
        | Code::HubStoreFailed
        | Code::PluginFailed
        | Code::Internal => G::Internal,
        Code::Unauthenticated => G::Unauthenticated,
        Code::PermissionDenied => G::PermissionDenied,
        Code::RateLimited
        | Code::TooManyAuthFailures
        | Code::TooManyStreams
        | Code::UpstreamRateLimited => G::ResourceExhausted,
        Code::NoProviders
        | Code::UpstreamAuthFailed
        | Code::UpstreamUnavailable
        | Code::AllProvidersFailed
        | Code::ShuttingDown => G::Unavailable,
        Code::UpstreamTimeout | Code::IdleTimeout => G::DeadlineExceeded,
        Code::ReloadUnavailable | Code::ReloadFailed | Code::PluginBuiltin => G::FailedPrecondition,
        Code::HubDisabled | Code::HubUnavailable => G::Unavailable,
        Code::SubscriberLagged => G::Aborted,
        Code::NotImplemented => G::Unimplemented,
    }
}

/// The HTTP status, and the `type` and `code` of the JSON body, of an error code.
fn http_parts(code: Code) -> (StatusCode, &'static str, &'static str) {
    const INVALID: &str = "invalid_request_error";
    match code {
        Code::PromptEmpty
        | Code::PromptTooLarge
        | Code::HistoryTooLong
        | Code::HistoryTooLarge
        | Code::MaxTokensOutOfRange
        | Code::ProviderConfigInvalid
        | Code::InvalidArgument
        | Code::AiopsFieldTooLarge
        | Code::SessionNameInvalid => (StatusCode::BAD_REQUEST, INVALID, "invalid_request"),
        Code::ContextTooLong => (StatusCode::BAD_REQUEST, INVALID, "context_length_exceeded"),
        Code::UpstreamBadRequest => (StatusCode::BAD_REQUEST, INVALID, "upstream_bad_request"),
        Code::SessionNotFound => (
            StatusCode::NOT_FOUND,
            "not_found_error",
            "session_not_found",
        ),
        Code::ProviderUnknown | Code::ModelNotFound => {
            (StatusCode::NOT_FOUND, INVALID, "model_not_found")
        }
        Code::PluginNotFound
        | Code::PluginPlatformNotFound
        | Code::AgentNotFound
        | Code::SkillNotFound => (StatusCode::NOT_FOUND, INVALID, "not_found"),
        Code::PluginBuiltin => (StatusCode::CONFLICT, INVALID, "plugin_builtin"),
        Code::ShuttingDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
        ),
        Code::SessionCorrupt | Code::SessionStorageFailed | Code::PluginFailed | Code::Internal => {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            )
        }
        Code::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "unauthenticated",
        ),
        Code::PermissionDenied => (
            StatusCode::FORBIDDEN,
            "permission_error",
            "permission_denied",
        ),
        Code::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
        ),
        Code::TooManyAuthFailures => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too_many_auth_failures",
        ),
        Code::TooManyStreams => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too_many_streams",
        ),
        Code::UpstreamRateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "upstream_rate_limited",
        ),
        Code::NoProviders => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_providers",
        ),
        Code::UpstreamAuthFailed => (
            StatusCode::BAD_GATEWAY,
            "upstream_auth_error",
            "upstream_auth_error",
        ),
        Code::UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "upstream_error", "server_error"),
        Code::AllProvidersFailed => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            "all_providers_failed",
        ),
        Code::UpstreamTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
        ),
        Code::IdleTimeout => (StatusCode::REQUEST_TIMEOUT, INVALID, "idle_timeout"),
        Code::ReloadUnavailable => (StatusCode::CONFLICT, INVALID, "no_reload"),
        Code::ReloadFailed => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "config_error",
            "reload_failed",
        ),
        Code::HubDisabled => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "hub_disabled",
        ),
        Code::HubUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "hub_unavailable",
        ),
        Code::ConversationNotFound => (StatusCode::NOT_FOUND, INVALID, "conversation_not_found"),
        Code::SubscriberLagged => (StatusCode::CONFLICT, INVALID, "subscriber_lagged"),
        Code::HubStoreFailed => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "hub_store_failed",
        ),
        Code::NotImplemented => (
            StatusCode::NOT_IMPLEMENTED,
            "server_error",
            "not_implemented",
        ),
    }
}

/// The HTTP status of an error code.
pub fn http_status(code: Code) -> StatusCode {
    http_parts(code).0
}

/// The wait to announce, in whole seconds: the error's own when known; a rate limit without one
/// says a second, so that every 429 carries `Retry-After`.
fn announced_wait(e: &Error, status: StatusCode) -> Option<u64> {
    match e.retry_after() {
        Some(d) => Some(whole_seconds(d)),
        None => (status == StatusCode::TOO_MANY_REQUESTS).then_some(1),
    }
}

/// The gRPC status of a core error: its code, its text, the stable code in
/// `x-chatcli-error-code` and, when a wait is known, `retry-after`.
pub fn to_status(e: &Error) -> tonic::Status {
    let code = e.code();
    let mut meta = MetadataMap::new();
    meta.insert(
        "x-chatcli-error-code",
        MetadataValue::from_static(code.as_str()),
    );
    if let Some(secs) = announced_wait(e, http_status(code)) {
        meta.insert("retry-after", MetadataValue::from(secs));
    }
    tonic::Status::with_metadata(grpc_code(code), e.to_string(), meta)
}

/// An HTTP error answer: status, the body's `type` and `code`, a message for people, the stable
/// code when the error is the core's, and the wait to announce.
#[derive(Debug, Clone)]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body's `type` (OpenAI's error types).
    pub kind: &'static str,
    /// The body's `code`.
    pub code: Cow<'static, str>,
    /// What went wrong.
    pub message: String,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// The core's stable code; `None` for what the HTTP codec refuses before calling the core
    /// (malformed JSON, media type, body size, routes).
    pub stable: Option<Code>,
}

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        Self::from(&e)
    }
}

impl From<&Error> for HttpError {
    /// The mapping of a core error (see the module docs).
    fn from(e: &Error) -> Self {
        let stable = e.code();
        let (status, kind, code) = http_parts(stable);
        // A single provider's failure names its class, as the body always did (`timeout`,
        // `transport_error`, …).
        let code = match e {
            Error::Provider(LlmError::Upstream(u))
                if matches!(stable, Code::UpstreamUnavailable | Code::UpstreamTimeout) =>
            {
                u.class.as_str()
            }
            _ => code,
        };
        Self {
            status,
            kind,
            code: Cow::Borrowed(code),
            message: e.to_string(),
            retry_after: announced_wait(e, status),
            stable: Some(stable),
        }
    }
}

impl HttpError {
    /// An answer of the HTTP codec itself (no core error behind it).
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            retry_after: None,
            stable: None,
        }
    }

    /// 400 for a request the HTTP codec cannot read.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    /// The stable code's text, when there is one.
    fn stable_str(&self) -> Option<&'static str> {
        self.stable.map(Code::as_str)
    }

    /// The OpenAI error object `{"error":{"message","type","param","code","chatcli_code"}}`.
    pub fn openai_body(&self) -> Value {
        let mut body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }});
        if let Some(c) = self.stable_str() {
            body["error"]["chatcli_code"] = json!(c);
        }
        body
    }

    /// `/request`'s error body `{"success":false,"error","code","chatcli_code"}`.
    pub fn request_body(&self) -> Value {
        let mut body = json!({"success": false, "error": self.message, "code": self.code});
        if let Some(c) = self.stable_str() {
            body["chatcli_code"] = json!(c);
        }
        body
    }

    /// The `data` of an SSE `error` event: `{"message","code","chatcli_code"}`.
    pub fn event_data(&self) -> Value {
        let mut data = json!({"message": self.message, "code": self.code});
        if let Some(c) = self.stable_str() {
            data["chatcli_code"] = json!(c);
        }
        data
    }

    /// The response with `body`, `Retry-After`, `WWW-Authenticate` for a 401, and the stable code.
    pub fn respond(&self, body: Value) -> Response {
        let mut resp = (self.status, Json(body)).into_response();
        let h = resp.headers_mut();
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(c) = self.stable_str() {
            h.insert(ERROR_CODE_HEADER, HeaderValue::from_static(c));
        }
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }

    /// In `/request`'s shape.
    pub fn into_request_response(self) -> Response {
        self.respond(self.request_body())
    }
}

impl IntoResponse for HttpError {
    /// In OpenAI's shape.
    fn into_response(self) -> Response {
        self.respond(self.openai_body())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::llm::{ErrorClass, UpstreamError};

    fn up(class: ErrorClass, retry_after: Option<Duration>) -> UpstreamError {
        UpstreamError {
            provider: "p".into(),
            class,
            status: None,
            message: String::new(),
            retry_after,
        }
    }

    /// Each HTTP status has one gRPC class.
    /// The gRPC codes an HTTP status may stand for (409 Conflict is both a failed precondition
    /// and an aborted operation, as in Google's API design guide).
    fn classes_of(status: StatusCode) -> &'static [tonic::Code] {
        use tonic::Code as G;
        match status.as_u16() {
            400 => &[G::InvalidArgument],
            401 => &[G::Unauthenticated],
            403 => &[G::PermissionDenied],
            404 => &[G::NotFound],
            408 | 504 => &[G::DeadlineExceeded],
            409 => &[G::FailedPrecondition, G::Aborted],
            422 => &[G::FailedPrecondition],
            429 => &[G::ResourceExhausted],
            500 => &[G::Internal],
            501 => &[G::Unimplemented],
            502 | 503 => &[G::Unavailable],
            other => panic!("unexpected status {other}"),
        }
    }

    /// The rows of `docs/errors.md`'s table: code, gRPC, HTTP, retryable.
    fn documented_rows() -> Vec<(String, String, u16, bool)> {
        include_str!("../../docs/errors.md")
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                let code = cells[0].trim_matches('`').to_string();
                let grpc = cells[2].trim_matches('`').to_string();
                let http = cells[3].parse().unwrap();
                (code, grpc, http, cells[4] == "yes")
            })
            .collect()
    }

    #[test]
    fn the_documented_table_is_the_mapping() {
        let rows = documented_rows();
        assert_eq!(rows.len(), Code::ALL.len());
        for ((code, grpc, http, retryable), c) in rows.iter().zip(Code::ALL) {
            assert_eq!(code, c.as_str());
            assert_eq!(
                grpc,
                &crate::telemetry::code_name(grpc_code(*c)).chars().fold(
                    String::new(),
                    |mut out, ch| {
                        if ch.is_uppercase() && !out.is_empty() {
                            out.push('_');
                        }
                        out.push(ch.to_ascii_uppercase());
                        out
                    }
                ),
                "{code}"
            );
            assert_eq!(*http, http_status(*c).as_u16(), "{code}");
            assert_eq!(*retryable, c.retryable(), "{code}");
        }
    }

    #[test]
    fn every_code_has_one_class_on_both_transports() {
        for code in Code::ALL {
            assert!(
                classes_of(http_status(*code)).contains(&grpc_code(*code)),
                "{code}: gRPC {:?} and HTTP {} disagree",
                grpc_code(*code),
                http_status(*code)
            );
        }
    }

    #[test]
    fn core_errors_map_to_statuses_and_bodies() {
        let cases = [
            (
                Error::from(LlmError::UnknownProvider {
                    name: "x".into(),
                    available: "p".into(),
                }),
                404,
                "model_not_found",
                tonic::Code::NotFound,
            ),
            (
                LlmError::NoProviders.into(),
                503,
                "no_providers",
                tonic::Code::Unavailable,
            ),
            (
                LlmError::InvalidRequest("bad".into()).into(),
                400,
                "invalid_request",
                tonic::Code::InvalidArgument,
            ),
            (
                LlmError::Upstream(up(ErrorClass::RateLimit, Some(Duration::from_millis(2500))))
                    .into(),
                429,
                "upstream_rate_limited",
                tonic::Code::ResourceExhausted,
            ),
            (
                LlmError::Upstream(up(ErrorClass::Auth, None)).into(),
                502,
                "upstream_auth_error",
                tonic::Code::Unavailable,
            ),
            (
                LlmError::Upstream(up(ErrorClass::Server, None)).into(),
                502,
                "server_error",
                tonic::Code::Unavailable,
            ),
            (
                LlmError::Upstream(up(ErrorClass::Transport, None)).into(),
                502,
                "transport_error",
                tonic::Code::Unavailable,
            ),
            (
                LlmError::Upstream(up(ErrorClass::ModelNotFound, None)).into(),
                404,
                "model_not_found",
                tonic::Code::NotFound,
            ),
            (
                LlmError::Upstream(up(ErrorClass::Timeout, None)).into(),
                504,
                "timeout",
                tonic::Code::DeadlineExceeded,
            ),
            (
                LlmError::AllFailed(vec![
                    up(ErrorClass::Server, None),
                    up(ErrorClass::Auth, None),
                ])
                .into(),
                503,
                "all_providers_failed",
                tonic::Code::Unavailable,
            ),
            (
                LlmError::AllFailed(vec![up(ErrorClass::RateLimit, None)]).into(),
                429,
                "upstream_rate_limited",
                tonic::Code::ResourceExhausted,
            ),
            (
                LlmError::AllFailed(vec![
                    up(ErrorClass::Timeout, None),
                    up(ErrorClass::Timeout, None),
                ])
                .into(),
                504,
                "upstream_timeout",
                tonic::Code::DeadlineExceeded,
            ),
            (
                Error::SessionNotFound("s".into()),
                404,
                "session_not_found",
                tonic::Code::NotFound,
            ),
        ];
        for (e, status, body_code, grpc) in cases {
            let a = HttpError::from(&e);
            assert_eq!(
                (a.status.as_u16(), a.code.as_ref()),
                (status, body_code),
                "{e}"
            );
            assert_eq!(
                a.retry_after.is_some(),
                status == 429,
                "Retry-After goes with 429: {e}"
            );
            let s = to_status(&e);
            assert_eq!(s.code(), grpc, "{e}");
            assert_eq!(s.message(), e.to_string());
            assert_eq!(
                s.metadata()
                    .get(ERROR_CODE_HEADER.as_str())
                    .unwrap()
                    .to_str()
                    .unwrap(),
                e.code().as_str()
            );
            assert_eq!(a.openai_body()["error"]["chatcli_code"], e.code().as_str());
            assert_eq!(a.request_body()["chatcli_code"], e.code().as_str());
        }
        let e = Error::from(LlmError::Upstream(up(
            ErrorClass::RateLimit,
            Some(Duration::from_millis(2500)),
        )));
        assert_eq!(HttpError::from(&e).retry_after, Some(3));
        assert_eq!(to_status(&e).metadata().get("retry-after").unwrap(), "3");
        assert_eq!(
            HttpError::from(Error::from(LlmError::Upstream(up(ErrorClass::Auth, None)))).kind,
            "upstream_auth_error"
        );
    }
}
