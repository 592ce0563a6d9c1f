//! Crash safety of what the daemon writes: `kill -9` while sessions are being saved leaves every
//! session file whole (the old or the new version, never a torn one), and the audit log has no
//! torn line: a line cut short by the kill can only be the last one, and the next start drops it
//! before appending. `bench/crash.sh` runs the same loop 1,000 times.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{ChatMessage, LoadSessionRequest, SaveSessionRequest};
use serde_json::Value;

use crate::support::{BinaryServer, HANG_GUARD, connect, files_under};

/// Kill rounds in the test command (each starts the binary once).
fn rounds() -> usize {
    std::env::var("CHATCLI_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

fn config(dir: &Path, audit: &Path) -> std::path::PathBuf {
    let path = dir.join("chatcli.toml");
    let text = format!(
        "[audit]\npath = {:?}\n\n[llm]\ndefault = \"echo\"\n\n\
         [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\n",
        audit.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The messages of version `v` of a session: sizes vary, so a torn write would show.
fn version(name: &str, v: u64) -> Vec<ChatMessage> {
    (0..(v % 7 + 1))
        .map(|i| ChatMessage {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("{name} v{v} m{i} {}", "x".repeat((v as usize * 131) % 3000)),
            meta: None,
        })
        .collect()
}

/// A small deterministic generator for the kill times.
fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *seed >> 33
}

/// Every line of the audit log but the last parses as a JSON object; the last may be cut short.
fn check_audit(path: &Path, torn_last_allowed: bool) -> usize {
    let Ok(bytes) = std::fs::read(path) else {
        return 0;
    };
    let text = String::from_utf8_lossy(&bytes);
    let ends_whole = text.is_empty() || text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let parsed = serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object());
        if !parsed {
            assert!(
                last && !ends_whole && torn_last_allowed,
                "torn audit line {i} of {}: {line:?}",
                lines.len()
            );
        }
    }
    lines.len()
}

#[tokio::test]
async fn kill_9_during_session_saves_leaves_old_or_new_versions_and_no_torn_audit_line() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let audit = dir.path().join("audit").join("audit.log");
    let config = config(dir.path(), &audit);
    let data = data_dir.display().to_string();
    // Every version a save was started with, per session.
    let mut sent: HashMap<&str, HashSet<u64>> = HashMap::new();
    let mut seed = 0x5eed_u64;
    let mut v = 0u64;
    let mut saves_done = 0usize;
    for round in 0..rounds() {
        let mut server =
            BinaryServer::start_with_env(&config, &[], &[("CHATCLI_DATA_DIR", data.as_str())]);
        // The previous round's kill may have cut the audit log's last line: the restart drops it.
        check_audit(&audit, false);
        let mut client = ChatCliServiceClient::new(connect(server.addr).await);
        // What the previous round left: each session loads as one of the versions sent.
        if round > 0 {
            for name in NAMES {
                let Ok(got) = client
                    .load_session(LoadSessionRequest { name: name.into() })
                    .await
                else {
                    continue;
                };
                let msgs = got.into_inner().messages;
                let known = sent[name].iter().any(|v| version(name, *v) == msgs);
                assert!(
                    known,
                    "round {round}: {name} holds no version that was saved"
                );
            }
        }
        // Saves in a loop from three clients, killed at a random moment.
        let mut tasks = Vec::new();
        for name in NAMES {
            let mut client = client.clone();
            let versions: Vec<u64> = (0..1000).map(|i| v + i).collect();
            sent.entry(name)
                .or_default()
                .extend(versions.iter().copied());
            tasks.push(tokio::spawn(async move {
                let mut done = 0;
                for v in versions {
                    let req = SaveSessionRequest {
                        name: name.into(),
                        messages: version(name, v),
                        session_data: None,
                    };
                    if client.save_session(req).await.is_err() {
                        break;
                    }
                    done += 1;
                }
                done
            }));
        }
        v += 1000;
        tokio::time::sleep(Duration::from_millis(30 + next(&mut seed) % 150)).await;
        server.kill();
        for t in tasks {
            saves_done += t.await.unwrap();
        }
        // Straight after the kill: every session file is whole JSON, temp files aside.
        for file in files_under(&data_dir.join("sessions")) {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                serde_json::from_str::<Value>(&text).is_ok(),
                "round {round}: {} is torn",
                file.display()
            );
        }
        check_audit(&audit, true);
    }
    assert!(saves_done > rounds(), "too few saves ran: {saves_done}");
    // A last start drops a cut last line; then every line parses.
    let server = BinaryServer::start_with_env(&config, &[], &[("CHATCLI_DATA_DIR", data.as_str())]);
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    client
        .load_session(LoadSessionRequest {
            name: "alpha".into(),
        })
        .await
        .unwrap();
    assert!(check_audit(&audit, false) > 0);
}

/// SIGTERM while many calls stream on both transports: each finishes whole within the grace
/// period, a call started after it is refused with a clean status, and the process exits 0.
#[tokio::test]
async fn sigterm_under_load_finishes_in_flight_calls_refuses_new_ones_and_exits_0() {
    use futures::StreamExt;
    const CALLS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chatcli.toml");
    std::fs::write(
        &path,
        "[limits]\nmax_streams_per_principal = 0\nrate_limit_rps = 1000000.0\n\
         rate_limit_burst = 1000000\n\n[llm]\ndefault = \"echo\"\n\n[[llm.providers]]\n\
         name = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\ndelay = \"200ms\"\n",
    )
    .unwrap();
    let mut server = BinaryServer::start(&path, &["--shutdown-grace", "20s"]);
    let prompt = "one two three four five six seven eight";
    let channel = connect(server.addr).await;
    let http = crate::support::http_client();
    let mut grpc = Vec::new();
    let mut sse = Vec::new();
    for _ in 0..CALLS {
        let mut client = ChatCliServiceClient::new(channel.clone());
        grpc.push(tokio::spawn(async move {
            let mut s = client
                .stream_prompt(crate::support::stream_request(prompt))
                .await
                .unwrap()
                .into_inner();
            let first = s.message().await.unwrap().unwrap();
            (first.chunk, s)
        }));
        let req = http
            .post(format!("http://{}/v1/chat/completions", server.addr))
            .json(&serde_json::json!({"model": "echo", "stream": true,
                                      "messages": [{"role": "user", "content": prompt}]}));
        sse.push(tokio::spawn(async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            let first = body.next().await.unwrap().unwrap();
            (String::from_utf8_lossy(&first).into_owned(), body)
        }));
    }
    let mut grpc_held = Vec::new();
    for t in grpc {
        grpc_held.push(t.await.unwrap());
    }
    let mut sse_held = Vec::new();
    for t in sse {
        sse_held.push(t.await.unwrap());
    }

    server.terminate();
    server.wait_for_log("draining").await;
    // A new call is refused with a clean status, not left hanging.
    let mut late = ChatCliServiceClient::new(channel.clone());
    let refused = tokio::time::timeout(
        HANG_GUARD,
        late.stream_prompt(crate::support::stream_request("late")),
    )
    .await
    .expect("a call after SIGTERM hung");
    let err = refused.expect_err("a call after SIGTERM was accepted");
    // Refused by the server (`shutting_down`), by the closed listener, or by GOAWAY before the
    // server read it (tonic says CANCELLED for a stream the connection refused): each says the
    // call was not run and may be retried elsewhere.
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    let refused = http
        .post(format!("http://{}/v1/chat/completions", server.addr))
        .json(&serde_json::json!({"model": "echo", "messages": [{"role": "user", "content": "late"}]}))
        .send()
        .await;
    if let Ok(r) = refused {
        assert_eq!(r.status(), 503, "an HTTP call after SIGTERM was served");
        assert_eq!(r.headers()["x-chatcli-error-code"], "shutting_down");
    }

    // Every call in flight finishes whole.
    for (first, mut s) in grpc_held {
        let mut text = first;
        while let Some(m) = tokio::time::timeout(HANG_GUARD, s.message())
            .await
            .unwrap()
            .expect("a stream failed during the drain")
        {
            text.push_str(&m.chunk);
        }
        assert_eq!(text, prompt, "a drained gRPC stream lost words");
    }
    for (first, mut body) in sse_held {
        let mut text = first;
        while let Some(chunk) = tokio::time::timeout(HANG_GUARD, body.next()).await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("a stream failed")));
        }
        assert!(
            text.contains("[DONE]"),
            "a drained HTTP stream was cut: {text}"
        );
    }
    drop(late);
    drop(channel);
    let status = server
        .wait_exit(HANG_GUARD)
        .await
        .unwrap_or_else(|| panic!("still running; stderr:\n{}", server.stderr()));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
}
