//! Many streams held open at once against a slow upstream, on both transports: while they are
//! held, the in-flight counts say so; once they end (half answered to the end, half cancelled by
//! the client mid-stream, a few more cancelled before their first delta), the upstream saw every
//! cancelled call go away, the in-flight gauges are
//! back to zero, the open file descriptors are back where they were, and every call has its audit
//! record. `bench/held-streams.sh` runs the full numbers (1,000 per transport, with RSS).

use chatcli::config::Config;
use chatcli::proto::StreamPromptRequest;
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::testing::{Reply, Step};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{
    HANG_GUARD, TestServer, connect, eventually, get_json, http_client, metric_value, openai_fake,
    openai_provider, within,
};

/// Streams per transport: 200, or `CHATCLI_HELD_STREAMS` (the bench script's 1,000).
fn streams() -> usize {
    std::env::var("CHATCLI_HELD_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}
/// gRPC streams per HTTP/2 connection (below `server.max_concurrent_streams`).
const PER_CHANNEL: usize = 50;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The socket inodes of TCP connections from or to `port` (both ends, as both live here).
fn sockets_of_port(port: u16) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if f.len() > 9 && (port_of(f[1]) == Some(port) || port_of(f[2]) == Some(port)) {
                out.insert(f[9].to_string());
            }
        }
    }
    out
}

/// Open descriptors, without the connections to the fake upstream: the server keeps those it may
/// reuse in its pool for `IDLE_TIMEOUT` (90 s) by design, so they are counted apart.
fn open_fds_without_upstream(port: u16) -> (usize, usize) {
    let upstream = sockets_of_port(port);
    let mut others = 0;
    let mut pooled = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        let inode = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'));
        match inode.is_some_and(|i| upstream.contains(i)) {
            true => pooled += 1,
            false => others += 1,
        }
    }
    (others, pooled)
}

/// This process's resident set (server and clients together), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn held_streams_end_with_gauges_and_descriptors_back_to_their_baseline() {
    let streams = streams();
    let fake = openai_fake().await;
    // Every answer sends one delta, then waits for the test.
    fake.set_default(Reply::steps(vec![
        Step::Text("first".into()),
        Step::AwaitRelease,
        Step::Text(" second".into()),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let mut config = Config::default();
    config.llm.providers = vec![openai_provider("slow", &fake, "m")];
    config.limits.max_streams_per_principal = 0;
    config.limits.rate_limit_rps = 1e6;
    config.limits.rate_limit_burst = 1_000_000;
    config.audit.path = Some(audit.clone());
    let s = TestServer::start_with_metrics(config).await;
    let http = http_client();
    // Warm up both paths once, so lazily made things (pools, series) are in the baseline.
    let r = tokio::spawn(
        http.post(s.url("/v1/chat/completions"))
            .json(&json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}))
            .send(),
    );
    let mut warm = s.client.clone();
    let g = tokio::spawn(async move {
        let mut g = warm
            .stream_prompt(StreamPromptRequest {
                prompt: "warm".into(),
                ..StreamPromptRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        while g.message().await.unwrap().is_some() {}
    });
    eventually("the warm-up calls upstream", || async {
        (fake.requests().len() >= 2).then_some(())
    })
    .await;
    fake.release();
    let _ = r.await.unwrap().unwrap().bytes().await;
    within(HANG_GUARD, "the warm-up stream", g).await.unwrap();
    let upstream_port = fake.addr().port();
    let (baseline, _) = open_fds_without_upstream(upstream_port);
    let rss_before = rss_kib();

    // gRPC: StreamPrompt over a few channels, each stream read to its first message.
    let mut channels = Vec::new();
    for _ in 0..streams.div_ceil(PER_CHANNEL) {
        channels.push(ChatCliServiceClient::new(connect(s.addr).await));
    }
    let mut grpc = Vec::new();
    for i in 0..streams {
        let mut client = channels[i / PER_CHANNEL].clone();
        grpc.push(tokio::spawn(async move {
            let mut stream = client
                .stream_prompt(StreamPromptRequest {
                    prompt: format!("held {i}"),
                    ..StreamPromptRequest::default()
                })
                .await
                .unwrap()
                .into_inner();
            let first = stream.message().await.unwrap().unwrap();
            assert_eq!(first.chunk, "first");
            stream
        }));
    }
    // HTTP: streamed chat completions, each read to its first event; one connection each.
    let mut sse = Vec::new();
    for i in 0..streams {
        let http = http.clone();
        let url = s.url("/v1/chat/completions");
        sse.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .json(&json!({"model": "slow", "stream": true,
                              "messages": [{"role": "user", "content": format!("held {i}")}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            let first = body.next().await.unwrap().unwrap();
            assert!(String::from_utf8_lossy(&first).contains("first"));
            body
        }));
    }
    let mut grpc_streams = Vec::new();
    for t in grpc {
        grpc_streams.push(within(HANG_GUARD, "a held gRPC stream", t).await.unwrap());
    }
    let mut sse_streams = Vec::new();
    for t in sse {
        sse_streams.push(within(HANG_GUARD, "a held HTTP stream", t).await.unwrap());
    }
    let status = get_json(&http, s.url("/status")).await;
    assert_eq!(status["requests_in_flight"], 2 * streams, "{status}");
    let rss_held = rss_kib();
    let fds_held = open_fds();

    // Half of each are cancelled by their client mid-stream: the upstream sees them go.
    let keep_grpc = grpc_streams.split_off(streams / 2);
    let keep_sse = sse_streams.split_off(streams / 2);
    drop(grpc_streams);
    drop(sse_streams);
    assert!(
        fake.wait_cancelled(streams, HANG_GUARD).await,
        "the upstream saw {} of {streams} cancelled calls go",
        fake.cancelled()
    );
    // And calls cancelled before their first delta, on both transports, while the upstream holds
    // it: the upstream sees those go too.
    const EARLY: usize = 10;
    fake.on_model(
        "early",
        Reply::steps(vec![Step::AwaitRelease, Step::Text("late".into())]),
    );
    let upstream_before = fake.requests().len();
    let mut early = Vec::new();
    for i in 0..EARLY {
        let mut client = channels[0].clone();
        early.push(tokio::spawn(async move {
            let _ = client
                .stream_prompt(StreamPromptRequest {
                    prompt: format!("early {i}"),
                    model: "early".into(),
                    ..StreamPromptRequest::default()
                })
                .await;
        }));
        let req = http
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": "slow/early", "stream": true,
                          "messages": [{"role": "user", "content": "early"}]}));
        early.push(tokio::spawn(async move {
            let _ = req.send().await;
        }));
    }
    eventually("the early calls upstream", || async {
        (fake.requests().len() >= upstream_before + 2 * EARLY).then_some(())
    })
    .await;
    for t in &early {
        t.abort();
    }
    assert!(
        fake.wait_cancelled(streams + 2 * EARLY, HANG_GUARD).await,
        "the upstream saw {} of {} cancelled calls go",
        fake.cancelled(),
        streams + 2 * EARLY
    );
    // The others are answered to their end.
    fake.release();
    for mut stream in keep_grpc {
        let mut text = String::from("first");
        while let Some(m) = within(HANG_GUARD, "the rest", stream.message())
            .await
            .unwrap()
        {
            text.push_str(&m.chunk);
        }
        assert_eq!(text, "first second");
    }
    for mut body in keep_sse {
        let mut rest = String::new();
        while let Some(chunk) = within(HANG_GUARD, "the rest", body.next()).await {
            rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        assert!(rest.contains("[DONE]"), "{rest}");
    }
    drop(channels);

    // Back to the baseline: nothing in flight, descriptors within 10% (plus the test's few).
    let metrics_url = s.metrics_url("/metrics");
    eventually("the in-flight counts back to zero", || async {
        let status = get_json(&http, s.url("/status")).await;
        let metrics = http
            .get(&metrics_url)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let grpc_gauge = metric_value(
            &metrics,
            r#"chatcli_grpc_in_flight_requests{method="/chatcli.v1.ChatCLIService/StreamPrompt"}"#,
        );
        (status["requests_in_flight"] == 0 && grpc_gauge == 0.0).then_some(())
    })
    .await;
    drop(http);
    let allowed = baseline + baseline / 10 + 8;
    eventually("the open descriptors back to their baseline", || async {
        (open_fds_without_upstream(upstream_port).0 <= allowed).then_some(())
    })
    .await;
    // Every call has its audit record: the two warm-up calls, every held one and every early one.
    let calls = 2 + 2 * streams + 2 * EARLY;
    let lines = eventually("every audit record", || async {
        let text = std::fs::read_to_string(&audit).ok()?;
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| {
                l["method"].as_str().is_some_and(|m| {
                    m.ends_with("/StreamPrompt") || m.ends_with("/chat/completions")
                })
            })
            .collect();
        (lines.len() >= calls).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), calls);
    // For bench/held-streams.sh: the figures of this run (server and clients in one process).
    eprintln!(
        "held-streams: {streams} per transport; fds {baseline} -> {fds_held} -> {:?} \
         (others, pooled upstream); RSS KiB {rss_before} -> {rss_held} -> {}",
        open_fds_without_upstream(upstream_port),
        rss_kib()
    );
    s.shutdown().await;
}
