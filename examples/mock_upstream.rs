//! A mock OpenAI Chat Completions upstream for the benchmarks (`bench/run.sh`).
//!
//! `cargo run --release --example mock_upstream -- --port 18080 [--latency 20ms] [--deltas 64]
//! [--interval 20ms] [--threads 1]`
//!
//! - `POST …/chat/completions` with `"stream": false` (or none): one fixed `chat.completion` body,
//!   after `--latency`.
//! - `POST …/chat/completions` with `"stream": true`: after `--latency`, `--deltas` SSE
//!   `chat.completion.chunk` events, `--interval` apart (the first one right away), then the finish
//!   chunk, a usage chunk when `stream_options.include_usage` is asked for, and `data: [DONE]`. With
//!   a zero interval the whole stream is written at once. The streamed text is the same as the
//!   non-streamed one, so a gateway that always streams upstream carries the same content.
//! - `GET …/models`, `GET /health`.
//!
//! Every answer body is built once at start-up; a request costs the HTTP/1.1 parsing, a scan of
//! the request body for `"stream"`, and the write. The server speaks HTTP/1.1 with keep-alive,
//! `TCP_NODELAY`, on a current-thread runtime by default (`--threads 1`, meant to be pinned to a
//! core with `taskset`). It prints `listening on ADDR` once it accepts connections.

#![allow(clippy::print_stdout, reason = "prints its address for the harness")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Parser, Debug, Clone)]
#[command(about = "Mock OpenAI Chat Completions upstream for benchmarks")]
struct Opts {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// Port (0 = any; the chosen one is printed).
    #[arg(long, default_value_t = 18080)]
    port: u16,
    /// Delay before the answer starts (e.g. `0`, `20ms`, `1s`).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    latency: Duration,
    /// Content deltas of a streamed answer.
    #[arg(long, default_value_t = 4)]
    deltas: usize,
    /// Pause between streamed deltas.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    interval: Duration,
    /// Worker threads (1 = a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "ms"),
    };
    let n: f64 = num.parse().map_err(|e| format!("`{s}`: {e}"))?;
    let secs = match unit {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        other => return Err(format!("`{s}`: unknown unit `{other}` (us, ms, s)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// The answers, built once.
struct Answers {
    whole: Bytes,
    /// One event per delta.
    deltas: Vec<Bytes>,
    /// Finish chunk (+ usage chunk) + `[DONE]`.
    end: Bytes,
    end_with_usage: Bytes,
    /// Everything at once (zero interval).
    all: Bytes,
    all_with_usage: Bytes,
    models: Bytes,
    latency: Duration,
    interval: Duration,
}

const ID: &str = "chatcmpl-mock";
const MODEL: &str = "mock-model";

impl Answers {
    fn new(o: &Opts) -> Self {
        let n = o.deltas.max(1);
        let pieces: Vec<String> = (0..n).map(|i| format!("tok{i} ")).collect();
        let text: String = pieces.concat();
        let usage =
            serde_json::json!({"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n});
        let whole = serde_json::json!({
            "id": ID, "object": "chat.completion", "created": 1_700_000_000u64, "model": MODEL,
            "system_fingerprint": null,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": usage,
        });
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            let v = serde_json::json!({
                "id": ID, "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": MODEL,
                "system_fingerprint": null,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            format!("data: {v}\n\n")
        };
        let deltas: Vec<Bytes> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let d = if i == 0 {
                    serde_json::json!({"role": "assistant", "content": p})
                } else {
                    serde_json::json!({"content": p})
                };
                Bytes::from(chunk(d, None))
            })
            .collect();
        let fin = chunk(serde_json::json!({}), Some("stop"));
        let usage_chunk = format!(
            "data: {}\n\n",
            serde_json::json!({
                "id": ID, "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": MODEL,
                "choices": [], "usage": usage,
            })
        );
        let end = Bytes::from(format!("{fin}data: [DONE]\n\n"));
        let end_with_usage = Bytes::from(format!("{fin}{usage_chunk}data: [DONE]\n\n"));
        let concat = |end: &Bytes| {
            let mut v = Vec::new();
            for d in &deltas {
                v.extend_from_slice(d);
            }
            v.extend_from_slice(end);
            Bytes::from(v)
        };
        let all = concat(&end);
        let all_with_usage = concat(&end_with_usage);
        let models = Bytes::from(
            serde_json::json!({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "mock"}]})
                .to_string(),
        );
        Self {
            whole: Bytes::from(whole.to_string()),
            deltas,
            end,
            end_with_usage,
            all,
            all_with_usage,
            models,
            latency: o.latency,
            interval: o.interval,
        }
    }
}

/// Whether a JSON request body has `"stream": true` (a scan, not a parse: the mock must be cheap).
fn wants_stream(body: &[u8]) -> bool {
    find_value(body, b"\"stream\"").is_some_and(|rest| rest.starts_with(b"true"))
}

/// The bytes after `"key"` and its colon, whitespace skipped.
fn find_value<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = body.windows(key.len()).position(|w| w == key)?;
    let rest = &body[at + key.len()..];
    let rest = trim_start(rest);
    let rest = rest.strip_prefix(b":")?;
    Some(trim_start(rest))
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

type Body = Either<
    Full<Bytes>,
    StreamBody<
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>,
    >,
>;

fn full(status: StatusCode, ct: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ct),
    );
    r
}

async fn handle(a: Arc<Answers>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    use http_body_util::BodyExt;
    let path = req.uri().path();
    if req.method() == Method::GET {
        if path.ends_with("/models") {
            return Ok(full(StatusCode::OK, "application/json", a.models.clone()));
        }
        if path == "/health" {
            return Ok(full(
                StatusCode::OK,
                "text/plain",
                Bytes::from_static(b"ok"),
            ));
        }
    }
    if req.method() != Method::POST || !path.ends_with("/chat/completions") {
        return Ok(full(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(
                br#"{"error":{"message":"not found","type":"invalid_request_error","code":null}}"#,
            ),
        ));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(full(
                StatusCode::BAD_REQUEST,
                "text/plain",
                Bytes::from_static(b"bad body"),
            ));
        }
    };
    let stream = wants_stream(&body);
    let usage = stream
        && find_value(&body, b"\"include_usage\"").is_some_and(|rest| rest.starts_with(b"true"));
    if !a.latency.is_zero() {
        tokio::time::sleep(a.latency).await;
    }
    if !stream {
        return Ok(full(StatusCode::OK, "application/json", a.whole.clone()));
    }
    if a.interval.is_zero() {
        let all = if usage {
            a.all_with_usage.clone()
        } else {
            a.all.clone()
        };
        return Ok(full(StatusCode::OK, "text/event-stream", all));
    }
    let a2 = a.clone();
    let frames = async_stream::stream! {
        let start = tokio::time::Instant::now();
        for (i, d) in a2.deltas.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep_until(start + a2.interval * i as u32).await;
            }
            yield Ok::<_, Infallible>(Frame::data(d.clone()));
        }
        let end = if usage { a2.end_with_usage.clone() } else { a2.end.clone() };
        yield Ok(Frame::data(end));
    };
    let mut r = Response::new(Either::Right(StreamBody::new(Box::pin(frames) as _)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    Ok(r)
}

async fn serve(o: Opts) -> anyhow::Result<()> {
    let answers = Arc::new(Answers::new(&o));
    let listener = TcpListener::bind(SocketAddr::new(o.bind, o.port)).await?;
    println!("listening on {}", listener.local_addr()?);
    {
        use std::io::Write as _;
        std::io::stdout().flush()?;
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let a = answers.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(a.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let rt = if o.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(o.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(serve(o))
}
