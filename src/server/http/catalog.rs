//! `POST /plugins/{name}/exec`: runs a catalog plugin and streams its output as server-sent events.
//!
//! The body is JSON `{"args": ["…", …]}` (`{}` for none); the checks and the sandbox are those of
//! `ExecuteRemotePlugin` (see [`crate::catalog::Catalog::execute`]). A refused call answers with
//! an error status and the OpenAI error shape; once the run starts, the answer is `200` with
//! `text/event-stream`:
//!
//! - `event: stdout` / `event: stderr`, `data: {"line": "…"}`: one per line of output as the plugin
//!   writes it (a last line without a newline comes when the run ends), up to the output cap;
//! - `event: done`, `data: {"error": "…", "truncated": bool}`: the end (`error` empty when the
//!   plugin exited 0);
//! - `event: error`, `data: {"message", "code"}`: the run was stopped by the server shutting down.
//!
//! Closing the connection stops the plugin (its process group is killed).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Api, ApiError, Caller};
use crate::catalog::CatalogError;
use crate::catalog::exec::Pipe;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    #[serde(default)]
    args: Vec<String>,
}

fn api_error(e: CatalogError) -> ApiError {
    ApiError::from(crate::gateway::Error::from(e))
}

fn line_event(pipe: Pipe, line: &[u8]) -> Event {
    let name = match pipe {
        Pipe::Stdout => "stdout",
        Pipe::Stderr => "stderr",
    };
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Event::default()
        .event(name)
        .data(json!({ "line": text }).to_string())
}

/// The complete lines of `buf` after appending `bytes`, as events; the rest stays in `buf`.
fn complete_lines(buf: &mut Vec<u8>, pipe: Pipe, bytes: &[u8]) -> Vec<Event> {
    buf.extend_from_slice(bytes);
    let mut events = Vec::new();
    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=i).collect();
        events.push(line_event(pipe, &line));
    }
    events
}

/// See the module docs.
pub(super) async fn exec(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    caller: Caller,
    req: Request,
) -> Response {
    caller.notes.resource(&name);
    let (parts, body) = req.into_parts();
    let args = match super::json_body::<ExecBody>(&parts.headers, body).await {
        Ok(b) => b.args,
        Err(e) => return e.into_response(),
    };
    if !super::accepts_event_stream(&parts.headers, false) {
        return super::not_acceptable().into_response();
    }
    let settings = crate::catalog::Settings::from_config(&caller.prepared.config);
    let state = api.state.clone();
    let plugin = match state
        .catalog
        .prepare_exec(&settings, caller.principal.role, &name, &args)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            if matches!(e, CatalogError::Forbidden(_)) {
                caller.notes.denied();
            }
            return api_error(e).into_response();
        }
    };
    let slot = match api.stream_slot(&caller.prepared, &caller.limit_key) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let notes = caller.notes.clone();
    let stream = async_stream::stream! {
        let _slot = slot;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = state.catalog.run_plugin(&settings, &plugin, &args, Some(tx));
        tokio::pin!(run);
        let mut bufs = (Vec::new(), Vec::new());
        let mut take = |pipe: Pipe, bytes: &[u8]| match pipe {
            Pipe::Stdout => complete_lines(&mut bufs.0, pipe, bytes),
            Pipe::Stderr => complete_lines(&mut bufs.1, pipe, bytes),
        };
        let result = loop {
            tokio::select! {
                Some((pipe, bytes)) = rx.recv() => {
                    for ev in take(pipe, &bytes) {
                        yield Ok::<Event, Infallible>(ev);
                    }
                }
                r = &mut run => break r,
            }
        };
        while let Ok((pipe, bytes)) = rx.try_recv() {
            for ev in take(pipe, &bytes) {
                yield Ok(ev);
            }
        }
        for (pipe, rest) in [(Pipe::Stdout, &bufs.0), (Pipe::Stderr, &bufs.1)] {
            if !rest.is_empty() {
                yield Ok(line_event(pipe, rest));
            }
        }
        match result {
            Ok(out) => {
                yield Ok(Event::default().event("done").data(
                    json!({"error": out.error, "truncated": out.truncated}).to_string(),
                ));
            }
            Err(e) => {
                notes.failed(&e.to_string());
                yield Ok(Event::default()
                    .event("error")
                    .data(api_error(e).event_data().to_string()));
            }
        }
    };
    super::sse_headers(
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}
