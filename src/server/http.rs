//! The HTTP router on the main listener (everything that is not `application/grpc`). This build
//! serves `GET /health`; the OpenAI-compatible and prompt/SSE APIs arrive with issue #7.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use super::AppState;

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let (code, status) = match state.is_draining() {
        true => (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING"),
        false => (StatusCode::OK, "SERVING"),
    };
    (
        code,
        Json(json!({"status": status, "version": crate::VERSION})),
    )
}

async fn not_found(uri: axum::http::Uri) -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(
            json!({"error": {"message": format!("no route for {}", uri.path()), "type": "not_found", "code": "not_found"}}),
        ),
    )
}
