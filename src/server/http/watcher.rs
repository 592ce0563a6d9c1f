//! `GET /watcher/status` and `GET /watcher/alerts?namespace=&deployment=`: the watcher's targets
//! with their status, and its alerts, as JSON (the same data as `GetWatcherStatus` and
//! `GetAlerts`, per target).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Api, Caller};
use crate::watcher::AlertFilter;

fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `GET /watcher/status`.
pub(super) async fn status(State(api): State<Arc<Api>>, _caller: Caller) -> Response {
    Json(api.state.watcher.status()).into_response()
}

/// The filters of `GET /watcher/alerts`.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct AlertQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    deployment: String,
}

/// `GET /watcher/alerts`.
pub(super) async fn alerts(
    State(api): State<Arc<Api>>,
    _caller: Caller,
    Query(q): Query<AlertQuery>,
) -> Response {
    let filter = AlertFilter {
        namespace: q.namespace,
        deployment: q.deployment,
    };
    let alerts: Vec<serde_json::Value> = api
        .state
        .watcher
        .alerts(&filter)
        .into_iter()
        .map(|a| {
            json!({
                "type": a.kind,
                "severity": a.severity.as_str(),
                "message": a.message,
                "object": a.object,
                "namespace": a.namespace,
                "deployment": a.deployment,
                "first_seen": rfc3339(a.first_seen),
                "last_seen": rfc3339(a.last_seen),
            })
        })
        .collect();
    Json(json!({ "alerts": alerts })).into_response()
}
