//! The benchmarks' load client (`bench/run.sh`): OpenAI Chat Completions over HTTP/1.1 (hyper,
//! one keep-alive connection per worker) and the ChatCLI gRPC `SendPrompt` (tonic's generated
//! client over hyper's HTTP/2 connections directly, see [`H2Channel`]) and `StreamPrompt` (over
//! the `h2` crate, see [`GrpcLink::Streams`]).
//!
//! ```text
//! loadgen run    --target SPEC (--concurrency C | --rate R) [--duration 10s] [--warmup 1s]
//! loadgen rounds --target SPEC --target SPEC … [--rounds 15] [--per-round 200]
//! loadgen stream-rounds --target SPEC … [--rounds 4] [--concurrency 4] [--expect-deltas 64]
//! loadgen hold   --target SPEC --streams 1000 [--secs 20]
//! ```
//!
//! A target SPEC is `name=NAME,proto=http|grpc,url=URL[,model=M][,auth=bearer:TOKEN|jwt:SECRET]`:
//! for `http` the URL is the full `…/chat/completions` URL; for `grpc` it is the server's base URL
//! and `model` goes into the request's `provider`. `jwt:SECRET` signs one HS256 token (`sub`
//! `bench`, one hour) with the secret and sends it as the Bearer token.
//!
//! - `run`, closed loop (`--concurrency C`): C workers, each sends its next request when the last
//!   one is answered; throughput and latencies are those of the calls that end inside the measured
//!   window. Open loop (`--rate R`): requests are due at a fixed rate whether or not earlier ones
//!   are answered; `--connections` workers take them in turn. A worker still busy when a call is
//!   due counts its latency from the due time, so queueing in front of a slow server is measured,
//!   not hidden (no coordinated omission); an idle worker counts from when its timer fired (tokio's
//!   timer has millisecond resolution, which is the client's lateness, not the server's). Due
//!   calls still unsent 2 s after the end count as errors.
//! - `rounds`: concurrency 1, the targets called in turn, `--per-round` sequential requests each,
//!   `--rounds` times; p50 is the median of the round medians, p90/p99 are over all samples.
//! - `stream-rounds`: streamed answers, `--concurrency` at once per target per round: time to the
//!   first content delta (TTFT) and the gaps between content deltas as the client receives them.
//! - `hold`: opens `--streams` streamed calls, prints `HELD n` once each has delivered its first
//!   delta, keeps them open (reading) for `--secs`, then exits.
//!
//! Every answer is checked: HTTP 200 (gRPC OK) and the mock's text (`tok0`) in it, or it counts as
//! an error. Results are JSON lines on stdout; progress and the first error go to stderr.

#![allow(clippy::print_stdout, reason = "results go to stdout")]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{SendPromptRequest, StreamPromptRequest, StreamPromptResponse};
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http2;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;

const PROMPT: &str = "Say hello to the benchmark.";
/// Longest wait for one answer before it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "Load client for chatcli benchmarks")]
struct Cli {
    /// Worker threads of the client (1 = a current-thread runtime; pin it with taskset).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Closed-loop (--concurrency) or open-loop (--rate) load against one target.
    Run(RunArgs),
    /// Interleaved concurrency-1 rounds over several targets (non-streamed).
    Rounds(RoundsArgs),
    /// Interleaved streamed rounds over several targets: TTFT and gaps between deltas.
    StreamRounds(StreamRoundsArgs),
    /// Hold streamed calls open.
    Hold(HoldArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    #[arg(long)]
    target: String,
    /// Closed loop: workers, each with one request in flight.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: workers (connections) taking the due requests.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Measured time after the warm-up.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Time before measuring starts.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// Closed loop: stop after this many requests (all measured, no warm-up).
    #[arg(long)]
    requests: Option<u64>,
    /// Streamed calls (HTTP `stream: true`, gRPC StreamPrompt) instead of whole answers.
    #[arg(long)]
    stream: bool,
    /// Closed loop: spread the workers' first calls evenly over this long (so long streams do not
    /// all start, and deliver their deltas, at the same instant).
    #[arg(long, default_value = "0", value_parser = parse_secs)]
    stagger: Duration,
    /// gRPC: HTTP/2 connections the workers share (default: one per 50 workers).
    #[arg(long)]
    grpc_connections: Option<usize>,
}

#[derive(Args, Debug)]
struct RoundsArgs {
    #[arg(long, required = true)]
    target: Vec<String>,
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    #[arg(long, default_value_t = 200)]
    per_round: usize,
    /// Requests per target before the first round.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// The target the others are compared with (default: the first).
    #[arg(long)]
    baseline: Option<String>,
}

#[derive(Args, Debug)]
struct StreamRoundsArgs {
    #[arg(long, required = true)]
    target: Vec<String>,
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Streams at once per target per round.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Content deltas each stream must deliver (0 = don't check).
    #[arg(long, default_value_t = 0)]
    expect_deltas: usize,
    #[arg(long)]
    baseline: Option<String>,
}

#[derive(Args, Debug)]
struct HoldArgs {
    #[arg(long)]
    target: String,
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// How long to hold them once all are open.
    #[arg(long, default_value = "20", value_parser = parse_secs)]
    secs: Duration,
    /// Longest wait for all streams to open.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    open_timeout: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let s = s.strip_suffix('s').unwrap_or(s);
    s.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| format!("`{s}`: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Targets

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http,
    Grpc,
}

#[derive(Debug, Clone)]
struct Target {
    name: String,
    proto: Proto,
    url: String,
    model: String,
    /// The `Authorization` header value.
    auth: Option<String>,
    addr: SocketAddr,
    host: String,
    path: String,
    /// Scheme and authority: where gRPC calls go.
    origin: hyper::Uri,
}

impl Target {
    fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut name = None;
        let mut proto = None;
        let mut url = None;
        let mut model = String::new();
        let mut auth = None;
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("target `{spec}`: `{part}` is not key=value"))?;
            match k.trim() {
                "name" => name = Some(v.to_string()),
                "proto" => {
                    proto = Some(match v {
                        "http" => Proto::Http,
                        "grpc" => Proto::Grpc,
                        other => bail!("target `{spec}`: proto `{other}` (http, grpc)"),
                    })
                }
                "url" => url = Some(v.to_string()),
                "model" => model = v.to_string(),
                "auth" => auth = Some(auth_header(v)?),
                other => bail!("target `{spec}`: unknown key `{other}`"),
            }
        }
        let url = url.ok_or_else(|| anyhow!("target `{spec}`: url= is required"))?;
        let uri: hyper::Uri = url.parse().with_context(|| format!("target url `{url}`"))?;
        let host = uri
            .authority()
            .ok_or_else(|| anyhow!("target url `{url}` has no host"))?
            .to_string();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&host)
            .with_context(|| format!("resolving `{host}`"))?
            .next()
            .ok_or_else(|| anyhow!("`{host}` resolves to nothing"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let origin = hyper::Uri::builder()
            .scheme(uri.scheme_str().unwrap_or("http"))
            .authority(host.as_str())
            .path_and_query("/")
            .build()
            .with_context(|| format!("target url `{url}`"))?;
        Ok(Self {
            name: name.unwrap_or_else(|| host.clone()),
            proto: proto.unwrap_or(Proto::Http),
            url,
            model,
            auth,
            addr,
            host,
            path,
            origin,
        })
    }
}

fn auth_header(v: &str) -> anyhow::Result<String> {
    if let Some(t) = v.strip_prefix("bearer:") {
        return Ok(format!("Bearer {t}"));
    }
    if let Some(secret) = v.strip_prefix("jwt:") {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims = json!({"sub": "bench", "iat": now, "exp": now + 3600});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )?;
        return Ok(format!("Bearer {token}"));
    }
    bail!("auth `{v}`: bearer:TOKEN or jwt:SECRET")
}

// ---------------------------------------------------------------------------------------------
// One caller: a connection to one target

type HttpSender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// What one streamed call saw.
#[derive(Debug, Default)]
struct StreamSample {
    ttft_us: u64,
    gaps_us: Vec<u64>,
    deltas: usize,
}

enum Caller {
    Http {
        t: Arc<Target>,
        body: Bytes,
        sender: Option<HttpSender>,
    },
    Grpc {
        t: Arc<Target>,
        link: GrpcLink,
    },
}

/// What gRPC callers send their calls over.
enum GrpcLink {
    /// Unary calls: tonic's generated client.
    Unary(ChatCliServiceClient<H2Channel>),
    /// Streamed calls: an `h2` connection, so that the request's HEADERS and its one DATA frame
    /// leave in one TCP segment, as gRPC's own clients send them. Over hyper's HTTP/2 client the
    /// DATA frame waits for the new stream to open and goes out in a second segment about 25 µs
    /// later (hyper pipes a request body from a task of its own once the stream has send
    /// capacity), and the server cannot start before it: that wait is the client's, not the
    /// gateway's, yet the time to first token would count it.
    Streams(h2::client::SendRequest<Bytes>),
}

/// A connection gRPC callers share.
#[derive(Clone)]
enum GrpcConn {
    Unary(H2Channel),
    Streams(h2::client::SendRequest<Bytes>),
}

/// A TCP connection to the target, with Nagle's algorithm off (both protocols).
async fn tcp_connect(t: &Target) -> anyhow::Result<TokioIo<TcpStream>> {
    let s = TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connecting to {}", t.addr))?;
    s.set_nodelay(true)?;
    Ok(TokioIo::new(s))
}

/// Drives a client connection in a task of its own until it closes.
fn drive<C: Future + Send + 'static>(conn: C) {
    tokio::spawn(async move {
        let _ = conn.await;
    });
}

async fn http_connect(t: &Target) -> anyhow::Result<HttpSender> {
    let (sender, conn) = hyper::client::conn::http1::handshake(tcp_connect(t).await?).await?;
    drive(conn);
    Ok(sender)
}

/// One HTTP/2 connection for gRPC callers to share: hyper's client connection as the service
/// under tonic's generated client. tonic's `Channel` would put a `Buffer` in front of it, i.e. a
/// hop through a task of its own for every call on the load core; the harness measures the
/// gateway, so the client stays as direct as its HTTP/1 side.
#[derive(Clone)]
struct H2Channel(http2::SendRequest<tonic::body::Body>);

type H2Future = Pin<
    Box<dyn Future<Output = Result<hyper::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower::Service<hyper::Request<tonic::body::Body>> for H2Channel {
    type Response = hyper::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = H2Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<tonic::body::Body>) -> H2Future {
        Box::pin(self.0.send_request(req))
    }
}

async fn grpc_channel(t: &Target) -> anyhow::Result<H2Channel> {
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(tcp_connect(t).await?)
        .await
        .with_context(|| format!("HTTP/2 handshake with {}", t.url))?;
    drive(conn);
    Ok(H2Channel(sender))
}

/// A connection for gRPC calls: `h2` for streamed calls, hyper's for unary ones.
async fn grpc_conn(t: &Target, stream: bool) -> anyhow::Result<GrpcConn> {
    if !stream {
        return grpc_channel(t).await.map(GrpcConn::Unary);
    }
    let s = TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connecting to {}", t.addr))?;
    s.set_nodelay(true)?;
    // hyper's client windows, so flow control costs what it cost over hyper.
    let (sender, conn) = h2::client::Builder::new()
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .handshake(s)
        .await
        .with_context(|| format!("HTTP/2 handshake with {}", t.url))?;
    drive(conn);
    Ok(GrpcConn::Streams(sender))
}

/// A gRPC message on the wire: uncompressed flag, length, protobuf.
fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    msg.encode_raw(&mut buf);
    Bytes::from(buf)
}

/// The error a gRPC answer's `grpc-status` (in its headers or trailers) reports, if any.
fn grpc_error(h: &hyper::HeaderMap) -> Option<String> {
    let status = h.get("grpc-status")?.to_str().unwrap_or("?");
    (status != "0").then(|| {
        let msg = h.get("grpc-message").and_then(|m| m.to_str().ok());
        format!("gRPC status {status}: {}", msg.unwrap_or(""))
    })
}

fn http_body(t: &Target, stream: bool) -> Bytes {
    let mut v = json!({"messages": [{"role": "user", "content": PROMPT}], "stream": stream});
    if !t.model.is_empty() {
        v["model"] = json!(t.model);
    }
    Bytes::from(v.to_string())
}

/// Whether an SSE event carries non-empty content.
fn is_content_event(ev: &[u8]) -> bool {
    const KEY: &[u8] = b"\"content\":\"";
    ev.windows(KEY.len())
        .position(|w| w == KEY)
        .is_some_and(|at| ev.get(at + KEY.len()).is_some_and(|c| *c != b'"'))
}

impl Caller {
    /// A caller; gRPC callers share `channel` when given.
    async fn new(t: Arc<Target>, stream: bool, channel: Option<GrpcConn>) -> anyhow::Result<Self> {
        Ok(match t.proto {
            Proto::Http => Caller::Http {
                body: http_body(&t, stream),
                sender: Some(http_connect(&t).await?),
                t,
            },
            Proto::Grpc => {
                let ch = match channel {
                    Some(c) => c,
                    None => grpc_conn(&t, stream).await?,
                };
                let link = match ch {
                    GrpcConn::Unary(ch) => GrpcLink::Unary(
                        ChatCliServiceClient::with_origin(ch, t.origin.clone())
                            .max_decoding_message_size(64 << 20),
                    ),
                    GrpcConn::Streams(tx) => GrpcLink::Streams(tx),
                };
                Caller::Grpc { link, t }
            }
        })
    }

    fn http_request(t: &Target, body: &Bytes) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::post(t.path.as_str())
            .header(HOST, t.host.as_str())
            .header(CONTENT_TYPE, "application/json");
        if let Some(a) = &t.auth {
            b = b.header(AUTHORIZATION, a.as_str());
        }
        Ok(b.body(Full::new(body.clone()))?)
    }

    fn grpc_request<T>(t: &Target, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        if let Some(a) = &t.auth {
            r.metadata_mut().insert("authorization", a.parse()?);
        }
        Ok(r)
    }

    /// One non-streamed call.
    async fn call(&mut self) -> anyhow::Result<()> {
        match self {
            Caller::Http { t, body, sender } => {
                let mut s = match sender.take() {
                    Some(s) if !s.is_closed() => s,
                    _ => http_connect(t).await?,
                };
                s.ready().await?;
                let resp = s.send_request(Self::http_request(t, body)?).await?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                *sender = Some(s);
                if status != hyper::StatusCode::OK {
                    bail!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                    );
                }
                if !bytes.windows(4).any(|w| w == b"tok0") {
                    bail!(
                        "unexpected answer: {}",
                        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                    );
                }
                Ok(())
            }
            Caller::Grpc { t, link } => {
                let GrpcLink::Unary(client) = link else {
                    bail!("a streaming caller was asked for a unary call");
                };
                let req = Self::grpc_request(
                    t,
                    SendPromptRequest {
                        prompt: PROMPT.into(),
                        provider: t.model.clone(),
                        ..Default::default()
                    },
                )?;
                let resp = client.send_prompt(req).await?.into_inner();
                if !resp.response.contains("tok0") {
                    bail!("unexpected answer: {:?}", resp.response);
                }
                Ok(())
            }
        }
    }

    /// One streamed call; `opened` is called at the first content delta.
    async fn call_stream(&mut self, mut opened: impl FnMut()) -> anyhow::Result<StreamSample> {
        let mut sample = StreamSample::default();
        let started = Instant::now();
        let mut last: Option<Instant> = None;
        let mut on_delta = |at: Instant, sample: &mut StreamSample| {
            match last {
                None => {
                    sample.ttft_us = (at - started).as_micros() as u64;
                    opened();
                }
                Some(prev) => sample.gaps_us.push((at - prev).as_micros() as u64),
            }
            last = Some(at);
            sample.deltas += 1;
        };
        match self {
            Caller::Http { t, body, sender } => {
                let mut s = match sender.take() {
                    Some(s) if !s.is_closed() => s,
                    _ => http_connect(t).await?,
                };
                s.ready().await?;
                let resp = s.send_request(Self::http_request(t, body)?).await?;
                let status = resp.status();
                let mut body = resp.into_body();
                let mut buf: Vec<u8> = Vec::new();
                let mut done = false;
                while let Some(frame) = body.frame().await {
                    let frame = frame?;
                    let at = Instant::now();
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if status != hyper::StatusCode::OK {
                        buf.extend_from_slice(&data);
                        continue;
                    }
                    buf.extend_from_slice(&data);
                    // Complete events: up to the last blank line.
                    while let Some(end) = find_event_end(&buf) {
                        let ev: Vec<u8> = buf.drain(..end).collect();
                        if ev.windows(6).any(|w| w == b"[DONE]") {
                            done = true;
                        } else if is_content_event(&ev) {
                            on_delta(at, &mut sample);
                        }
                    }
                }
                *sender = Some(s);
                if status != hyper::StatusCode::OK {
                    bail!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&buf[..buf.len().min(300)])
                    );
                }
                if !done {
                    bail!("the stream ended without [DONE]");
                }
            }
            Caller::Grpc { t, link } => {
                let GrpcLink::Streams(tx) = link else {
                    bail!("a unary caller was asked for a streamed call");
                };
                let msg = StreamPromptRequest {
                    prompt: PROMPT.into(),
                    provider: t.model.clone(),
                    ..Default::default()
                };
                let mut req = Request::post(format!(
                    "{}chatcli.v1.ChatCLIService/StreamPrompt",
                    t.origin
                ))
                .header(CONTENT_TYPE, "application/grpc")
                .header("te", "trailers");
                if let Some(a) = &t.auth {
                    req = req.header(AUTHORIZATION, a.as_str());
                }
                let mut tx = tx.clone().ready().await?;
                let (answer, mut send) = tx.send_request(req.body(())?, false)?;
                // Queued before the connection's task writes the HEADERS: one segment.
                send.send_data(grpc_frame(&msg), true)?;
                let answer = answer.await?;
                if answer.status() != hyper::StatusCode::OK {
                    bail!("HTTP {}", answer.status());
                }
                if let Some(e) = grpc_error(answer.headers()) {
                    bail!("{e}");
                }
                let mut body = answer.into_body();
                let mut buf = bytes::BytesMut::new();
                let mut done = false;
                while !done && let Some(data) = body.data().await {
                    let data = data?;
                    let at = Instant::now();
                    let _ = body.flow_control().release_capacity(data.len());
                    buf.extend_from_slice(&data);
                    while let Some(len) = buf
                        .get(1..5)
                        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
                        .filter(|len| buf.len() >= 5 + len)
                    {
                        let frame = buf.split_to(5 + len);
                        let m = <StreamPromptResponse as prost::Message>::decode(&frame[5..])?;
                        if !m.chunk.is_empty() {
                            on_delta(at, &mut sample);
                        }
                        done |= m.done;
                    }
                }
                if !done && let Some(e) = body.trailers().await?.as_ref().and_then(grpc_error) {
                    bail!("{e}");
                }
                if !done {
                    bail!("the stream ended without done");
                }
            }
        }
        if sample.deltas == 0 {
            bail!("the stream had no content");
        }
        Ok(sample)
    }
}

/// The end (exclusive, blank line included) of the first complete SSE event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

// ---------------------------------------------------------------------------------------------
// Statistics

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(v: &mut [u64]) -> serde_json::Value {
    v.sort_unstable();
    json!({
        "n": v.len(),
        "p50_us": pct(v, 50.0),
        "p90_us": pct(v, 90.0),
        "p99_us": pct(v, 99.0),
        "max_us": v.last().copied().unwrap_or(0),
        "mean_us": if v.is_empty() { 0 } else { v.iter().sum::<u64>() / v.len() as u64 },
    })
}

#[derive(Default)]
struct Tally {
    lat_us: Vec<u64>,
    /// Streamed calls: time to the first delta, and the gaps between deltas.
    ttft_us: Vec<u64>,
    gap_us: Vec<u64>,
    ok: u64,
    errors: u64,
    /// Answered calls, the warm-up's included (for CPU time per call).
    all: u64,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.lat_us.extend(o.lat_us);
        self.ttft_us.extend(o.ttft_us);
        self.gap_us.extend(o.gap_us);
        self.ok += o.ok;
        self.errors += o.errors;
        self.all += o.all;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}").chars().take(400).collect());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Modes

async fn callers(
    t: &Arc<Target>,
    n: usize,
    stream: bool,
    grpc_connections: Option<usize>,
) -> anyhow::Result<Vec<Caller>> {
    let channels = match t.proto {
        Proto::Grpc => {
            let k = grpc_connections.unwrap_or(n.div_ceil(50)).max(1);
            let mut v = Vec::with_capacity(k);
            for _ in 0..k {
                v.push(grpc_conn(t, stream).await?);
            }
            v
        }
        Proto::Http => Vec::new(),
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ch = (!channels.is_empty()).then(|| channels[i % channels.len()].clone());
        out.push(Caller::new(t.clone(), stream, ch).await?);
    }
    Ok(out)
}

async fn one(c: &mut Caller, stream: bool) -> anyhow::Result<Option<StreamSample>> {
    let fut = async {
        if stream {
            c.call_stream(|| {}).await.map(Some)
        } else {
            c.call().await.map(|()| None)
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => bail!("no answer within {CALL_TIMEOUT:?}"),
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let t = Arc::new(Target::parse(&a.target)?);
    let (workers, mode) = match (a.concurrency, a.rate) {
        (Some(c), None) => (c.max(1), "closed"),
        (None, Some(_)) => (a.connections.max(1), "open"),
        _ => bail!("give --concurrency (closed loop) or --rate (open loop)"),
    };
    let cs = callers(&t, workers, a.stream, a.grpc_connections).await?;
    let warmup = if a.requests.is_some() {
        Duration::ZERO
    } else {
        a.warmup
    };
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + warmup;
    let end = measure_from + a.duration;
    let hard_end = end + Duration::from_secs(2);
    let budget = a.requests.map(|n| Arc::new(AtomicU64::new(n)));
    let next = Arc::new(AtomicU64::new(0));
    let period = a.rate.map(|r| Duration::from_secs_f64(1.0 / r.max(1e-9)));
    let stream = a.stream;
    let mut set = tokio::task::JoinSet::new();
    let n_workers = cs.len() as u32;
    for (w, mut c) in cs.into_iter().enumerate() {
        let budget = budget.clone();
        let next = next.clone();
        let first = start + a.stagger * w as u32 / n_workers.max(1);
        set.spawn(async move {
            let mut tally = Tally::default();
            tokio::time::sleep_until(first).await;
            loop {
                let due = match period {
                    None => {
                        if let Some(b) = &budget
                            && b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_err()
                        {
                            break;
                        }
                        let now = Instant::now();
                        if budget.is_none() && now >= end {
                            break;
                        }
                        now
                    }
                    Some(p) => {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let due = start + p * i as u32;
                        if due >= end {
                            break;
                        }
                        if Instant::now() >= hard_end {
                            // Due but never sent: the client fell this far behind.
                            tally.error("due but not sent within 2 s after the end (backlog)");
                            continue;
                        }
                        // A worker that is idle when the call is due starts it when the timer
                        // fires (its millisecond lateness is the client's, not the server's); a
                        // worker still busy with an earlier call counts from the due time, so the
                        // queueing in front of a slow server is measured.
                        if due > Instant::now() {
                            tokio::time::sleep_until(due).await;
                            Instant::now()
                        } else {
                            due
                        }
                    }
                };
                let r = one(&mut c, stream).await;
                let done = Instant::now();
                let took = done - due;
                tally.all += 1;
                // Closed loop: the calls that end inside the measured window (the throughput is
                // the completions per second). Open loop: the calls due inside it.
                let counted = match period {
                    None => budget.is_some() || (done >= measure_from && done < end),
                    Some(_) => due >= measure_from,
                };
                if !counted {
                    continue;
                }
                match r {
                    Ok(sample) => {
                        tally.ok += 1;
                        tally.lat_us.push(took.as_micros() as u64);
                        if let Some(s) = sample {
                            tally.ttft_us.push(s.ttft_us);
                            tally.gap_us.extend(s.gaps_us);
                        }
                    }
                    Err(e) => tally.error(e),
                }
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(r) = set.join_next().await {
        all.merge(r?);
    }
    let finished = Instant::now();
    let window = match a.requests {
        Some(_) => (finished - start).as_secs_f64(),
        None => a.duration.as_secs_f64(),
    };
    let total = all.ok + all.errors;
    let mut out = json!({
        "kind": "run",
        "target": t.name,
        "proto": format!("{:?}", t.proto).to_lowercase(),
        "stream": stream,
        "mode": mode,
        "concurrency": a.concurrency,
        "rate": a.rate,
        "connections": workers,
        "window_s": window,
        "requests": total,
        "all_calls": all.all,
        "ok": all.ok,
        "errors": all.errors,
        "error_rate": if total == 0 { 0.0 } else { all.errors as f64 / total as f64 },
        "rps": all.ok as f64 / window.max(1e-9),
        "first_error": all.first_error,
        "self_cpu_s": self_cpu_s(),
    });
    let s = summary(&mut all.lat_us);
    if let (Some(o), Some(s)) = (out.as_object_mut(), s.as_object()) {
        for (k, v) in s {
            o.insert(k.clone(), v.clone());
        }
        if stream {
            o.insert("ttft".into(), summary(&mut all.ttft_us));
            o.insert("gap".into(), summary(&mut all.gap_us));
        }
    }
    if let Some(e) = &all.first_error {
        eprintln!("{}: {} errors, first: {e}", t.name, all.errors);
    }
    println!("{out}");
    Ok(())
}

/// CPU time this process has used (all threads), from `/proc/self/task/*/schedstat`.
fn self_cpu_s() -> f64 {
    let mut ns = 0u64;
    if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    ns as f64 / 1e9
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    if v.is_empty() {
        0
    } else {
        v[(v.len() - 1) / 2]
    }
}

async fn rounds(a: RoundsArgs) -> anyhow::Result<()> {
    let targets: Vec<Arc<Target>> = a
        .target
        .iter()
        .map(|s| Target::parse(s).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let mut cs = Vec::new();
    for t in &targets {
        let mut c = Caller::new(t.clone(), false, None).await?;
        for _ in 0..a.warmup {
            one(&mut c, false)
                .await
                .with_context(|| format!("warm-up call to {}", t.name))?;
        }
        cs.push(c);
    }
    let n = targets.len();
    let mut round_medians: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut pooled: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut tallies: Vec<Tally> = (0..n).map(|_| Tally::default()).collect();
    for r in 0..a.rounds {
        // Rotate the order so no target always follows the same one.
        for k in 0..n {
            let i = (k + r) % n;
            let mut lat = Vec::with_capacity(a.per_round);
            for _ in 0..a.per_round {
                let t0 = Instant::now();
                match one(&mut cs[i], false).await {
                    Ok(_) => {
                        lat.push(t0.elapsed().as_nanos() as u64 / 1000);
                        tallies[i].ok += 1;
                    }
                    Err(e) => tallies[i].error(e),
                }
            }
            pooled[i].extend_from_slice(&lat);
            round_medians[i].push(median(&mut lat));
        }
        eprintln!("round {}/{} done", r + 1, a.rounds);
    }
    let base = a
        .baseline
        .as_ref()
        .and_then(|b| targets.iter().position(|t| &t.name == b))
        .unwrap_or(0);
    let p50s: Vec<u64> = round_medians.iter_mut().map(|m| median(m)).collect();
    let mut sums: Vec<serde_json::Value> = pooled.iter_mut().map(|p| summary(p)).collect();
    let base_p90 = sums[base]["p90_us"].as_u64().unwrap_or(0) as i64;
    let base_p99 = sums[base]["p99_us"].as_u64().unwrap_or(0) as i64;
    for i in 0..n {
        let s = &mut sums[i];
        let p90 = s["p90_us"].as_u64().unwrap_or(0) as i64;
        let p99 = s["p99_us"].as_u64().unwrap_or(0) as i64;
        let out = json!({
            "kind": "rounds",
            "target": targets[i].name,
            "baseline": targets[base].name,
            "rounds": a.rounds,
            "per_round": a.per_round,
            "ok": tallies[i].ok,
            "errors": tallies[i].errors,
            "first_error": tallies[i].first_error,
            "p50_us": p50s[i],
            "p90_us": p90,
            "p99_us": p99,
            "mean_us": s["mean_us"],
            "round_medians_us": round_medians[i],
            "added_p50_us": p50s[i] as i64 - p50s[base] as i64,
            "added_p90_us": p90 - base_p90,
            "added_p99_us": p99 - base_p99,
            "self_cpu_s": self_cpu_s(),
        });
        println!("{out}");
    }
    Ok(())
}

async fn stream_rounds(a: StreamRoundsArgs) -> anyhow::Result<()> {
    let targets: Vec<Arc<Target>> = a
        .target
        .iter()
        .map(|s| Target::parse(s).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let n = targets.len();
    let mut pools: Vec<Vec<Caller>> = Vec::new();
    for t in &targets {
        pools.push(callers(t, a.concurrency, true, Some(1)).await?);
    }
    let mut ttft: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut gaps: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut tallies: Vec<Tally> = (0..n).map(|_| Tally::default()).collect();
    // Round 0 warms the connections up and is not recorded.
    for r in 0..=a.rounds {
        for k in 0..n {
            let i = (k + r) % n;
            let pool = std::mem::take(&mut pools[i]);
            let mut set = tokio::task::JoinSet::new();
            for mut c in pool {
                set.spawn(async move {
                    let r =
                        tokio::time::timeout(Duration::from_secs(30), c.call_stream(|| {})).await;
                    (c, r)
                });
            }
            while let Some(j) = set.join_next().await {
                let (c, res) = j?;
                pools[i].push(c);
                if r == 0 {
                    if let Ok(Err(e)) = &res {
                        bail!("warm-up stream to {}: {e:#}", targets[i].name);
                    }
                    continue;
                }
                match res {
                    Ok(Ok(s)) => {
                        if a.expect_deltas > 0 && s.deltas != a.expect_deltas {
                            tallies[i].error(format!(
                                "{} deltas arrived, {} expected (coalesced?)",
                                s.deltas, a.expect_deltas
                            ));
                        } else {
                            tallies[i].ok += 1;
                        }
                        ttft[i].push(s.ttft_us);
                        gaps[i].extend(s.gaps_us);
                    }
                    Ok(Err(e)) => tallies[i].error(e),
                    Err(_) => tallies[i].error("stream timed out"),
                }
            }
        }
        eprintln!("stream round {}/{} done", r, a.rounds);
    }
    let base = a
        .baseline
        .as_ref()
        .and_then(|b| targets.iter().position(|t| &t.name == b))
        .unwrap_or(0);
    let ts: Vec<serde_json::Value> = ttft.iter_mut().map(|v| summary(v)).collect();
    let gs: Vec<serde_json::Value> = gaps.iter_mut().map(|v| summary(v)).collect();
    let g = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0) as i64;
    for i in 0..n {
        let out = json!({
            "kind": "stream-rounds",
            "target": targets[i].name,
            "baseline": targets[base].name,
            "rounds": a.rounds,
            "concurrency": a.concurrency,
            "ok": tallies[i].ok,
            "errors": tallies[i].errors,
            "first_error": tallies[i].first_error,
            "ttft": ts[i],
            "gap": gs[i],
            "added_ttft_p50_us": g(&ts[i], "p50_us") - g(&ts[base], "p50_us"),
            "added_ttft_p99_us": g(&ts[i], "p99_us") - g(&ts[base], "p99_us"),
            "added_gap_p50_us": g(&gs[i], "p50_us") - g(&gs[base], "p50_us"),
            "added_gap_p99_us": g(&gs[i], "p99_us") - g(&gs[base], "p99_us"),
            "self_cpu_s": self_cpu_s(),
        });
        println!("{out}");
    }
    Ok(())
}

async fn hold(a: HoldArgs) -> anyhow::Result<()> {
    let t = Arc::new(Target::parse(&a.target)?);
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Default::default();
    // gRPC: at most 90 streams per HTTP/2 connection (servers default to 100).
    let channels = match t.proto {
        Proto::Grpc => {
            let mut v = Vec::new();
            for _ in 0..a.streams.div_ceil(90) {
                v.push(grpc_conn(&t, true).await?);
            }
            v
        }
        Proto::Http => Vec::new(),
    };
    let mut set = tokio::task::JoinSet::new();
    for i in 0..a.streams {
        let t = t.clone();
        let opened = opened.clone();
        let failed = failed.clone();
        let first_error = first_error.clone();
        let ch = (!channels.is_empty()).then(|| channels[i % channels.len()].clone());
        set.spawn(async move {
            let r = async {
                let mut c = Caller::new(t, true, ch).await?;
                c.call_stream(|| {
                    opened.fetch_add(1, Ordering::SeqCst);
                })
                .await
            }
            .await;
            if let Err(e) = r {
                failed.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut f) = first_error.lock()
                    && f.is_none()
                {
                    *f = Some(format!("{e:#}"));
                }
            }
        });
        if i % 100 == 99 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + a.open_timeout;
    loop {
        let o = opened.load(Ordering::SeqCst);
        let f = failed.load(Ordering::SeqCst);
        if o + f >= a.streams || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let o = opened.load(Ordering::SeqCst);
    println!("HELD {o}");
    {
        use std::io::Write as _;
        std::io::stdout().flush()?;
    }
    tokio::time::sleep(a.secs).await;
    let still = a.streams - failed.load(Ordering::SeqCst) - set.try_join_next().map_or(0, |_| 1);
    let fe = first_error.lock().ok().and_then(|f| f.clone());
    if let Some(e) = &fe {
        eprintln!(
            "{}: {} streams failed, first: {e}",
            t.name,
            failed.load(Ordering::SeqCst)
        );
    }
    println!(
        "{}",
        json!({
            "kind": "hold",
            "target": t.name,
            "streams": a.streams,
            "opened": o,
            "failed": failed.load(Ordering::SeqCst),
            "still_open_approx": still,
            "first_error": fe,
        })
    );
    set.abort_all();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(a) => run(a).await,
            Cmd::Rounds(a) => rounds(a).await,
            Cmd::StreamRounds(a) => stream_rounds(a).await,
            Cmd::Hold(a) => hold(a).await,
        }
    })
}
