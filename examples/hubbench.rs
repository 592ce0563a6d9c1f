//! The conversation hub's benchmark client (`bench/hub.sh` starts the server and runs it):
//!
//! ```text
//! hubbench --addr HOST:PORT [--pid PID] [--conversations 100] [--appenders 200] [--duration 10s]
//!          [--subscribers 1000] [--events 200]
//! ```
//!
//! - appends: `--appenders` workers spread over `--conversations` conversations (each its own
//!   principal), each appending its next event once the last is acknowledged, for `--duration`;
//!   reports acknowledged appends per second.
//! - fan-out: `--subscribers` subscriptions of one conversation over connections of 50 streams
//!   each; once all have joined, `--events` events are appended 20 ms apart. Latency is from just
//!   before the `AppendEvent` call to the moment a subscriber receives the event; reports p50, p99
//!   and max over every (event, subscriber).
//! - memory: with `--pid`, the server's RSS (`VmRSS`) before the subscribers join and while they
//!   are all connected.
//!
//! Results are JSON lines on stdout.

#![allow(clippy::print_stdout, reason = "results go to stdout")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark client"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{AppendEventRequest, NewConversationRequest, SubscribeConversationRequest};
use clap::Parser;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Opts {
    /// The server's gRPC address.
    #[arg(long)]
    addr: String,
    /// The server's process id, for its RSS.
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value_t = 100)]
    conversations: usize,
    #[arg(long, default_value_t = 200)]
    appenders: usize,
    /// Seconds of the append phase.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 200)]
    events: usize,
}

type Client = ChatCliServiceClient<Channel>;

async fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn new_conversation(c: &mut Client, principal: String) -> String {
    c.new_conversation(NewConversationRequest { principal })
        .await
        .unwrap()
        .into_inner()
        .conv_id
}

fn event(conv: &str, content: String) -> AppendEventRequest {
    AppendEventRequest {
        conv_id: conv.into(),
        channel: "bench".into(),
        role: "user".into(),
        content,
        client_msg_id: String::new(),
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

async fn appends(o: &Opts) {
    let channels: Vec<Channel> = futures::future::join_all((0..8).map(|_| channel(&o.addr))).await;
    let mut c = Client::new(channels[0].clone());
    let mut convs = Vec::new();
    for i in 0..o.conversations {
        convs.push(new_conversation(&mut c, format!("bench-{i}")).await);
    }
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(o.duration);
    let started = Instant::now();
    let workers: Vec<_> = (0..o.appenders)
        .map(|w| {
            let mut c = Client::new(channels[w % channels.len()].clone());
            let conv = convs[w % convs.len()].clone();
            let (done, errors) = (done.clone(), errors.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < end {
                    match c
                        .append_event(event(&conv, format!("w{w} event {i}")))
                        .await
                    {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                    i += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "phase": "appends",
            "conversations": o.conversations,
            "appenders": o.appenders,
            "acknowledged": n,
            "errors": errors.load(Ordering::Relaxed),
            "seconds": secs,
            "appends_per_sec": n as f64 / secs,
        })
    );
}

async fn fanout(o: &Opts) {
    let mut c = Client::new(channel(&o.addr).await);
    let conv = new_conversation(&mut c, "bench-fanout".into()).await;
    c.append_event(event(&conv, "ready".into())).await.unwrap();
    let rss_before = o.pid.and_then(rss_kib);
    let sent: Arc<Vec<std::sync::OnceLock<Instant>>> = Arc::new(
        (0..=o.events + 1)
            .map(|_| std::sync::OnceLock::new())
            .collect(),
    );
    let joined = Arc::new(tokio::sync::Semaphore::new(0));
    let per_connection = 50;
    let mut subscribers = Vec::new();
    let mut conn = None;
    for s in 0..o.subscribers {
        if s % per_connection == 0 {
            conn = Some(channel(&o.addr).await);
        }
        let mut c = Client::new(conn.clone().unwrap());
        let conv = conv.clone();
        let sent = sent.clone();
        let joined = joined.clone();
        let events = o.events;
        subscribers.push(tokio::spawn(async move {
            let mut stream = c
                .subscribe_conversation(SubscribeConversationRequest {
                    conv_id: conv,
                    since_seq: 0,
                })
                .await
                .unwrap()
                .into_inner();
            // The backlog's first event says the subscription is in place.
            stream.message().await.unwrap().unwrap();
            joined.add_permits(1);
            let mut latencies = Vec::with_capacity(events);
            while latencies.len() < events {
                let e = stream.message().await.unwrap().unwrap();
                let at = Instant::now();
                let since = sent[e.seq as usize].get().copied().unwrap_or(at);
                latencies.push(at.duration_since(since));
            }
            latencies
        }));
    }
    let _all = joined.acquire_many(o.subscribers as u32).await.unwrap();
    // Joined the backlog; give the last ones a moment to join the live tail.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_with = o.pid.and_then(rss_kib);
    for i in 0..o.events {
        let seq = i + 2;
        let _ = sent[seq].set(Instant::now());
        let e = c
            .append_event(event(&conv, format!("fan-out {i}")))
            .await
            .unwrap()
            .into_inner()
            .event
            .unwrap();
        assert_eq!(
            e.seq as usize, seq,
            "another writer appended to the fan-out conversation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut all = Vec::new();
    for s in subscribers {
        all.extend(s.await.unwrap());
    }
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "phase": "fanout",
            "subscribers": o.subscribers,
            "events": o.events,
            "deliveries": all.len(),
            "p50_ms": ms(pct(0.50)),
            "p99_ms": ms(pct(0.99)),
            "max_ms": ms(all[all.len() - 1]),
            "server_rss_mib_before_subscribers": rss_before.map(|k| k as f64 / 1024.0),
            "server_rss_mib_with_subscribers": rss_with.map(|k| k as f64 / 1024.0),
        })
    );
}

#[tokio::main]
async fn main() {
    let o = Opts::parse();
    appends(&o).await;
    fanout(&o).await;
}
