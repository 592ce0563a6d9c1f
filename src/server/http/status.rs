//! `GET /status` (what an operator asks first: version, uptime, defaults, every provider's state,
//! the load, who is asking) and `GET /health` (liveness, no auth).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Api, ApiError, Caller};
use crate::gateway::{Error, admin};

/// `GET /health`: `{"status":"SERVING"}`, or 503 `NOT_SERVING` while draining.
pub(super) async fn health(State(api): State<Arc<Api>>) -> Response {
    let (code, status) = match api.state.is_draining() {
        true => (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING"),
        false => (StatusCode::OK, "SERVING"),
    };
    (
        code,
        Json(json!({"status": status, "version": crate::VERSION})),
    )
        .into_response()
}

/// An instant `left` from now, as RFC 3339 UTC.
fn rfc3339_in(left: std::time::Duration) -> String {
    let at = time::OffsetDateTime::now_utc() + left;
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// `GET /status`: the core's status report, with the load and who is asking.
pub(super) async fn status(State(api): State<Arc<Api>>, caller: Caller) -> Response {
    let state = &api.state;
    let report = api
        .core(&caller.prepared)
        .status(&state.unready_providers(), state.reloader());
    let providers: Vec<Value> = report
        .providers
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "kind": p.kind,
                "default_model": p.default_model,
                "state": p.state(),
                "cooldown": p.cooldown.as_ref().map(|c| json!({
                    "until": rfc3339_in(c.remaining),
                    "remaining_seconds": c.remaining.as_secs().max(1),
                    "failures": c.failures,
                    "last_error": c.reason,
                })),
                "unready_reason": p.unready,
            })
        })
        .collect();
    let (grpc, http) = state.in_flight.counts();
    let p = &caller.principal;
    let mut who = json!({
        "id": p.id,
        "role": p.role.as_str(),
        "method": p.method.as_str(),
    });
    if let Some(tenant) = &p.tenant_id {
        who["tenant"] = json!(tenant);
    }
    Json(json!({
        "version": crate::VERSION,
        "uptime_seconds": state.started.elapsed().as_secs(),
        "draining": state.is_draining(),
        "default": {
            "provider": report.default_provider,
            "model": report.default_model,
        },
        "fallback": report.fallback,
        "providers": providers,
        "requests_in_flight": grpc + http,
        "in_flight": {"grpc": grpc, "http": http},
        "update_subscribers": state.events.subscribers(),
        "config": report.config.map(|st| json!({
            "generation": st.generation,
            "hash": st.config_hash,
            "last_reload_error": st.last_error,
            "restart_needed": st.restart_needed,
        })),
        "caller": who,
    }))
    .into_response()
}

/// `POST /admin/reload`: re-reads the configuration now (admins only). A refused configuration
/// answers 422 with `"reloaded": false` and its problems beside the error.
pub(super) async fn admin_reload(State(api): State<Arc<Api>>, caller: Caller) -> Response {
    match admin::reload(&caller.principal, api.state.reloader(), "admin API").await {
        Ok(outcome) => {
            Json(json!({"reloaded": true, "generation": outcome.generation()})).into_response()
        }
        Err(Error::ReloadFailed { problems }) => {
            let e = ApiError::from(Error::ReloadFailed {
                problems: problems.clone(),
            });
            let mut body = e.openai_body();
            body["reloaded"] = json!(false);
            body["error"]["problems"] = json!(problems);
            e.respond(body)
        }
        Err(e) => super::refusal(&caller.notes, e).into_response(),
    }
}
