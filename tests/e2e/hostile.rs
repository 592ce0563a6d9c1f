//! Hostile clients against the real `chatcli server` binary: slow headers, too many connections
//! from one address, oversized headers and gRPC messages, a client stalling in the TLS handshake
//! and a plaintext client on the TLS port. Each test checks that the hostile connection is ended
//! and that a well-behaved caller is still served meanwhile.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{BinaryServer, HANG_GUARD, TestCa, connect, http_client, stream_request};

/// An echo-provider config with `server` settings added to `[server]`.
fn config_with(dir: &Path, server: &str, extra: &str) -> PathBuf {
    let path = dir.join("chatcli.toml");
    let text = format!(
        "[server]\n{server}\n{extra}\n[llm]\ndefault = \"echo\"\n\n\
         [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Whether the server closes `conn` (EOF or reset) within `limit`, reading whatever it sends.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return (false, got),
            Ok(Ok(0) | Err(_)) => return (true, got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// `GET /health` on a fresh connection answers 200.
async fn health_ok(server: &BinaryServer) {
    let resp = http_client()
        .get(format!("http://{}/health", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
}

#[tokio::test]
async fn slow_header_clients_are_closed_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(
        &config_with(dir.path(), "header_read_timeout = \"1s\"", ""),
        &[],
    );
    const CLIENTS: usize = 200;
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            // A byte a second, forever: only the header-read timeout ends it.
            for byte in request.iter().cycle() {
                if conn.write_all(&[*byte]).await.is_err() {
                    break;
                }
                let (closed, got) = closed_within(&mut conn, Duration::from_secs(1)).await;
                if closed {
                    assert!(
                        !String::from_utf8_lossy(&got).contains("200 OK"),
                        "a request without the end of its headers was answered"
                    );
                    break;
                }
                assert!(
                    started.elapsed() < HANG_GUARD,
                    "a slow client was never closed"
                );
            }
            started.elapsed()
        }));
    }
    // Meanwhile, a normal caller is answered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        health_ok(&server).await;
    }
    for t in tasks {
        let held = t.await.unwrap();
        assert!(
            held < Duration::from_secs(10),
            "a slow client was held {held:?}"
        );
    }
    health_ok(&server).await;
}

#[tokio::test]
async fn connections_over_the_per_client_limit_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(
        &config_with(dir.path(), "max_connections_per_client = 3", ""),
        &[],
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = TcpStream::connect(server.addr).await.unwrap();
        conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(HANG_GUARD, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(conn);
    }
    // The fourth connection from the same address is closed unanswered.
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (closed, got) = closed_within(&mut extra, HANG_GUARD).await;
    assert!(closed, "the connection over the limit stayed open");
    assert!(got.is_empty(), "the connection over the limit was answered");
    // Once one closes, the address may connect again.
    drop(held.pop());
    crate::support::eventually("a place freed by a closed connection", || async {
        http_client()
            .get(format!("http://{}/health", server.addr))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
}

#[tokio::test]
async fn oversized_headers_are_answered_431() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(
        &config_with(dir.path(), "max_header_bytes = 16384", ""),
        &[],
    );
    let mut conn = TcpStream::connect(server.addr).await.unwrap();
    let big = "a".repeat(40_000);
    let request = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = conn.write_all(request.as_bytes()).await;
    let (closed, got) = closed_within(&mut conn, HANG_GUARD).await;
    assert!(closed, "the connection stayed open after an oversized head");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431"), "answered: {text:?}");
    // Headers under the limit are served.
    let resp = http_client()
        .get(format!("http://{}/health", server.addr))
        .header("x-small", "a".repeat(4_000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
}

#[tokio::test]
async fn oversized_grpc_messages_are_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(
        &config_with(dir.path(), "max_recv_msg_size = 4096", ""),
        &[],
    );
    let mut client = ChatCliServiceClient::new(connect(server.addr).await);
    let err = client
        .stream_prompt(stream_request(&"x".repeat(10_000)))
        .await
        .unwrap_err();
    // tonic refuses a frame over the limit from its header with OUT_OF_RANGE (its choice; the
    // gRPC spec suggests RESOURCE_EXHAUSTED).
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    let ok = client.stream_prompt(stream_request("small")).await.unwrap();
    let chunks = crate::support::collect_stream(&mut ok.into_inner()).await;
    assert!(!chunks.is_empty());
}

/// A TLS server (certificate for localhost from a fresh CA) with a 1 s handshake timeout.
fn tls_server(dir: &Path) -> BinaryServer {
    let ca = TestCa::new("hostile-ca");
    let pair = ca.server_cert(&[7]);
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    let tls = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    BinaryServer::start(
        &config_with(dir, "tls_handshake_timeout = \"1s\"", &tls),
        &[],
    )
}

#[tokio::test]
async fn a_client_stalling_in_the_tls_handshake_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path());
    let started = Instant::now();
    // Connected, then silent: no ClientHello.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // And one that starts a ClientHello record and never finishes it.
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let (closed, _) = closed_within(&mut silent, HANG_GUARD).await;
    assert!(closed, "a silent client was never dropped");
    let (closed, _) = closed_within(&mut partial, HANG_GUARD).await;
    assert!(closed, "a client stuck mid-ClientHello was never dropped");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "dropped after {waited:?}, the handshake timeout is 1 s"
    );
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_gets_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path());
    let mut conn = TcpStream::connect(server.addr).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (closed, got) = closed_within(&mut conn, Duration::from_secs(5)).await;
    assert!(closed, "a plaintext client was left hanging");
    assert!(
        !String::from_utf8_lossy(&got).contains("200"),
        "a plaintext request was answered"
    );
    // The server still serves TLS clients and is alive.
    assert!(server.stderr().contains("listening"));
}

#[tokio::test]
async fn slow_bodies_are_answered_408_and_closed_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(
        &config_with(
            dir.path(),
            "body_read_timeout = \"1s\"",
            "[limits]\nrate_limit_rps = 100000.0\nrate_limit_burst = 100000\n",
        ),
        &[],
    );
    const CLIENTS: usize = 50;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
                Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(head.as_bytes()).await.unwrap();
            let started = Instant::now();
            // A byte every 200 ms: the body would take 200 s; only the body-read timeout ends it.
            let mut got = Vec::new();
            loop {
                if conn.write_all(b" ").await.is_err() {
                    break;
                }
                let (closed, more) = closed_within(&mut conn, Duration::from_millis(200)).await;
                got.extend_from_slice(&more);
                if closed {
                    break;
                }
                assert!(
                    started.elapsed() < HANG_GUARD,
                    "a slow body was never ended"
                );
            }
            String::from_utf8_lossy(&got).into_owned()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        health_ok(&server).await;
    }
    for t in tasks {
        let answer = t.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "a slow body was answered {answer:?}"
        );
        // Only the server can have ended it: the client trickles until the connection closes.
        assert!(answer.contains("request_timeout"), "{answer}");
    }
    // A body sent at once is served as before.
    let resp = http_client()
        .post(format!("http://{}/v1/chat/completions", server.addr))
        .json(
            &serde_json::json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
}

/// Raw HTTP/2 frames, for clients that break the rules a well-behaved client library keeps.
mod frames {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// `POST /v1/chat/completions` (`:method POST`, `:scheme http` from the HPACK static table,
    /// `:path` as a literal): its handler waits for the body, so the stream stays open.
    pub fn post(stream: u32) -> Vec<u8> {
        let path = b"/v1/chat/completions";
        let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path);
        frame(HEADERS, END_HEADERS, stream, &block)
    }

    /// `GET /` (HPACK static table: `:method GET`, `:scheme http`, `:path /`).
    pub fn get(stream: u32, end_stream: bool) -> Vec<u8> {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        frame(HEADERS, flags, stream, &[0x82, 0x86, 0x84])
    }

    pub fn rst(stream: u32, code: u32) -> Vec<u8> {
        frame(RST_STREAM, 0, stream, &code.to_be_bytes())
    }

    pub fn ping(n: u64) -> Vec<u8> {
        frame(PING, 0, 0, &n.to_be_bytes())
    }

    /// Connects, sends the preface and empty SETTINGS, and acknowledges the server's SETTINGS.
    pub async fn open(addr: std::net::SocketAddr) -> TcpStream {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        conn.write_all(&hello).await.unwrap();
        loop {
            let (kind, flags, _, _) = read(&mut conn).await.expect("closed in the handshake");
            if kind == SETTINGS && flags & ACK == 0 {
                conn.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
                return conn;
            }
        }
    }

    /// The next frame: type, flags, stream, payload; `None` once the connection is closed.
    pub async fn read(
        conn: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], stream, payload))
    }

    /// Reads frames until GOAWAY (its error code) or the end of the connection (`None`).
    pub async fn until_goaway(conn: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<u32> {
        while let Some((kind, _, _, payload)) = read(conn).await {
            if kind == GOAWAY {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
        None
    }
}

#[tokio::test]
async fn http2_oversized_header_lists_get_a_stream_error_and_the_connection_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(
        &config_with(dir.path(), "max_header_bytes = 16384", ""),
        &[],
    );
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let get = |big: Option<usize>| {
        let mut req = http::Request::get(format!("http://{}/health", server.addr));
        if let Some(n) = big {
            req = req.header("x-big", "a".repeat(n));
        }
        req.body(()).unwrap()
    };
    let mut h2 = h2.ready().await.unwrap();
    let (answer, _) = h2.send_request(get(Some(40_000)), true).unwrap();
    let answer = tokio::time::timeout(HANG_GUARD, answer).await.unwrap();
    match answer {
        Ok(r) => assert_eq!(r.status(), 431, "{r:?}"),
        Err(e) => assert!(
            e.is_reset(),
            "a connection error, not a stream error: {e:?}"
        ),
    }
    // The same connection still serves a request with small headers.
    let mut h2 = h2.ready().await.unwrap();
    let (answer, _) = h2.send_request(get(Some(1_000)), true).unwrap();
    let answer = tokio::time::timeout(HANG_GUARD, answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn http2_streams_over_the_concurrency_limit_are_refused() {
    use frames::*;
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(
        &config_with(dir.path(), "max_concurrent_streams = 4", ""),
        &[],
    );
    let mut conn = open(server.addr).await;
    // Six requests whose bodies never end: the first four are open streams, the rest are over
    // the limit the server announced.
    let mut burst = Vec::new();
    for i in 0..6u32 {
        burst.extend(post(2 * i + 1));
    }
    conn.write_all(&burst).await.unwrap();
    let mut refused = Vec::new();
    let mut answered = Vec::new();
    while refused.len() < 2 {
        let (kind, _, stream, payload) = tokio::time::timeout(HANG_GUARD, read(&mut conn))
            .await
            .unwrap()
            .expect("the connection was closed");
        match kind {
            RST_STREAM => {
                let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                assert_eq!(code, REFUSED_STREAM, "stream {stream} reset with {code}");
                refused.push(stream);
            }
            HEADERS => answered.push(stream),
            GOAWAY => panic!("the whole connection was closed for a stream over the limit"),
            _ => {}
        }
    }
    assert_eq!(refused, vec![9, 11], "answered: {answered:?}");
    assert!(
        answered.is_empty(),
        "streams waiting for their body were answered: {answered:?}"
    );
    health_ok(&server).await;
}

#[tokio::test]
async fn http2_rapid_reset_gets_goaway_and_other_connections_are_served() {
    use frames::*;
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(
        &config_with(dir.path(), "max_pending_reset_streams = 20", ""),
        &[],
    );
    let conn = open(server.addr).await;
    let (mut rx, mut tx) = conn.into_split();
    let reader = tokio::spawn(async move {
        let code = until_goaway(&mut rx).await;
        // After GOAWAY, the server closes the connection.
        while read(&mut rx).await.is_some() {}
        code
    });
    // Streams opened and reset at once, in a loop, as the "rapid reset" attack does; it stops
    // when the server closes the connection.
    for round in 0..200u32 {
        let mut burst = Vec::new();
        for i in 0..50u32 {
            let id = 2 * (round * 50 + i) + 1;
            burst.extend(get(id, true));
            burst.extend(rst(id, 0x8));
        }
        if tx.write_all(&burst).await.is_err() || reader.is_finished() {
            break;
        }
    }
    let code = tokio::time::timeout(HANG_GUARD, reader)
        .await
        .expect("the connection stayed open")
        .unwrap();
    assert_eq!(code, Some(ENHANCE_YOUR_CALM), "the attack got no GOAWAY");
    health_ok(&server).await;
}

#[tokio::test]
async fn an_http2_ping_flood_gets_goaway_and_other_connections_are_served() {
    use frames::*;
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(&config_with(dir.path(), "", ""), &[]);
    // A well-behaved HTTP/2 connection open beside the flood.
    let mut other = ChatCliServiceClient::new(connect(server.addr).await);
    let conn = open(server.addr).await;
    let (mut rx, mut tx) = conn.into_split();
    let reader = tokio::spawn(async move {
        let code = until_goaway(&mut rx).await;
        // After GOAWAY, the server closes the connection.
        while read(&mut rx).await.is_some() {}
        code
    });
    // Pings as fast as the socket takes them, until the server closes the connection.
    let burst: Vec<u8> = (0..1000u64).flat_map(ping).collect();
    for _ in 0..200 {
        if tx.write_all(&burst).await.is_err() || reader.is_finished() {
            break;
        }
    }
    let code = tokio::time::timeout(HANG_GUARD, reader)
        .await
        .expect("the flooding connection stayed open")
        .unwrap();
    assert!(code.is_some(), "the flood got no GOAWAY");
    // The other connection, and new ones, are served.
    let ok = other
        .stream_prompt(stream_request("still here"))
        .await
        .unwrap();
    let chunks = crate::support::collect_stream(&mut ok.into_inner()).await;
    assert!(!chunks.is_empty());
    health_ok(&server).await;
}
