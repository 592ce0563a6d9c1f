//! One prompt for scripts: `StreamPrompt`, each chunk written to stdout and flushed as it arrives.
//! `--raw` writes exactly the answer; `--json` writes one object
//! `{"answer", "provider", "model", "usage"}` at the end (a failure is reported by the caller,
//! [`super::run`], as `{"error": {"code", "message"}}` instead). Nothing but the answer goes to
//! stdout.

use std::io::Write as _;
use std::time::Instant;

use super::Forwarded;
use super::args::Output;
use super::connection::Connection;
use super::error::{ClientError, Stage};

/// Sends `prompt` and prints the answer as `output` says.
pub async fn run(
    conn: &Connection,
    forwarded: &Forwarded,
    prompt: String,
    output: Output,
    timeout: Option<std::time::Duration>,
) -> Result<(), ClientError> {
    let started = Instant::now();
    let prompt_bytes = prompt.len();
    let mut req = tonic::Request::new(forwarded.request(prompt, Vec::new()));
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let mut client = conn.client.clone();
    let call = async {
        let mut stream = client
            .stream_prompt(req)
            .await
            .map_err(|s| conn.error(&s, Stage::Call))?
            .into_inner();
        let mut answer = String::new();
        let (mut provider, mut model) = (String::new(), String::new());
        let mut chunks = 0usize;
        let mut done = false;
        let mut out = std::io::stdout();
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(s) => {
                    // Keep what was printed on its own line before the error goes to stderr.
                    if output == Output::Text && !answer.is_empty() && !answer.ends_with('\n') {
                        let _ = out.write_all(b"\n");
                    }
                    return Err(conn.error(&s, Stage::Call));
                }
            };
            if !msg.provider.is_empty() {
                provider = msg.provider;
            }
            if !msg.model.is_empty() {
                model = msg.model;
            }
            if !msg.chunk.is_empty() {
                chunks += 1;
                if output != Output::Json {
                    out.write_all(msg.chunk.as_bytes())
                        .and_then(|_| out.flush())
                        .map_err(stdout_failed)?;
                }
                answer.push_str(&msg.chunk);
            }
            if msg.done {
                done = true;
                break;
            }
        }
        if !done {
            return Err(ClientError::provider(format!(
                "the answer from {} was cut off before its end; try again",
                conn.target
            )));
        }
        match output {
            Output::Raw => {}
            Output::Text => {
                if !answer.ends_with('\n') {
                    out.write_all(b"\n").map_err(stdout_failed)?;
                }
            }
            Output::Json => {
                let v = serde_json::json!({
                    "answer": answer,
                    "provider": provider,
                    "model": model,
                    "usage": {
                        // The protocol carries no token counts; these are what the client saw.
                        "prompt_tokens": null,
                        "completion_tokens": null,
                        "prompt_bytes": prompt_bytes,
                        "answer_bytes": answer.len(),
                        "chunks": chunks,
                        "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    },
                });
                writeln!(out, "{v}").map_err(stdout_failed)?;
            }
        }
        out.flush().map_err(stdout_failed)
    };
    match timeout {
        // The server gets the deadline too (grpc-timeout); this bounds a server that ignores it.
        Some(t) => tokio::time::timeout(t + std::time::Duration::from_secs(1), call)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::provider(format!(
                    "no complete answer within {t:?}; try a larger --timeout"
                )))
            }),
        None => call.await,
    }
}

fn stdout_failed(e: std::io::Error) -> ClientError {
    // A closed pipe (`| head`) is the reader's choice, not a failure of the call.
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    ClientError::usage(format!("cannot write the answer to stdout: {e}"))
}
