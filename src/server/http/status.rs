//! `GET /status` (what an operator asks first: version, uptime, defaults, every provider's state,
//! the load, who is asking) and `GET /health` (liveness, no auth).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Api, Caller};

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

/// `GET /status`.
pub(super) async fn status(State(api): State<Arc<Api>>, caller: Caller) -> Response {
    let state = &api.state;
    let reg = &caller.prepared.registry;
    let cooling = state.cooldowns.snapshot();
    let unready = state.unready_providers();
    let providers: Vec<Value> = reg
        .providers()
        .iter()
        .map(|p| {
            let name = p.name();
            let cd = cooling
                .iter()
                .find(|c| c.provider.eq_ignore_ascii_case(name));
            let not_ready = unready.get(name);
            let state = match (cd, not_ready) {
                (Some(_), _) => "cooling_down",
                (None, Some(_)) => "unready",
                (None, None) => "ok",
            };
            json!({
                "name": name,
                "kind": p.kind().as_str(),
                "default_model": p.default_model(),
                "state": state,
                "cooldown": cd.map(|c| json!({
                    "until": rfc3339_in(c.remaining),
                    "remaining_seconds": c.remaining.as_secs().max(1),
                    "failures": c.failures,
                    "last_error": c.reason,
                })),
                "unready_reason": not_ready,
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
            "provider": reg.default_provider().map(|p| p.name()),
            "model": reg.default_model(),
        },
        "fallback": reg.fallback().chain,
        "providers": providers,
        "requests_in_flight": grpc + http,
        "in_flight": {"grpc": grpc, "http": http},
        "update_subscribers": state.events.subscribers(),
        "config": state.reloader.get().map(|r| {
            let st = r.status();
            json!({
                "generation": st.generation,
                "hash": st.config_hash,
                "last_reload_error": st.last_error,
                "restart_needed": st.restart_needed,
            })
        }),
        "caller": who,
    }))
    .into_response()
}

/// `POST /admin/reload`: re-reads the configuration now (admins only).
pub(super) async fn admin_reload(State(api): State<Arc<Api>>, caller: Caller) -> Response {
    use axum::http::StatusCode;
    if caller.principal.role != crate::auth::Role::Admin {
        caller.notes.denied();
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": {"message": "reload is for admins", "type": "permission_error", "code": "forbidden"}})),
        )
            .into_response();
    }
    let Some(reloader) = api.state.reloader.get() else {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": {"message": "this server was not started from config files; nothing to reload", "type": "invalid_request_error", "code": "no_reload"}})),
        )
            .into_response();
    };
    match reloader.reload("admin API", true).await {
        Ok(outcome) => {
            let generation = match outcome {
                crate::server::reload::ReloadOutcome::Applied(g) | crate::server::reload::ReloadOutcome::Unchanged(g) => g,
            };
            Json(json!({"reloaded": true, "generation": generation})).into_response()
        }
        Err(problems) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"reloaded": false, "error": {"message": "reload failed; the previous configuration keeps serving", "type": "config_error", "code": "reload_failed", "problems": problems}})),
        )
            .into_response(),
    }
}
