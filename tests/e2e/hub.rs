//! The conversation hub over gRPC against the real server: idempotent appends under concurrent
//! retries, gapless seqs under 100 concurrent appenders, the backlog-to-live handover, a lagging
//! subscriber aborted while a fast one continues, the principal rules with named tokens, the
//! disabled hub, retention, drain, `kill -9` of the real binary in the middle of appends, and a
//! Python grpcio peer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatcli::auth::Role;
use chatcli::config::{Config, NamedToken};
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{
    AppendEventRequest, ConversationEvent, ListBindingsRequest, NewConversationRequest,
    ReadConversationRequest, ResolveActiveConversationRequest, SetBindingRequest,
    SubscribeConversationRequest,
};
use chatcli::state::HubStore;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::support::{
    BearerToken, BinaryServer, HANG_GUARD, TestServer, connect, demo_config, echo_config,
    eventually, metrics_with_lines, sha256_hex, within,
};

type Client = ChatCliServiceClient<Channel>;

/// The echo config with rate limits high enough for hundreds of calls a second.
fn hub_config() -> Config {
    let mut config = echo_config();
    config.limits.rate_limit_rps = 1_000_000.0;
    config.limits.rate_limit_burst = 1_000_000;
    config
}

fn append(conv: &str, content: &str, id: &str) -> AppendEventRequest {
    AppendEventRequest {
        conv_id: conv.into(),
        channel: "local".into(),
        role: "user".into(),
        content: content.into(),
        client_msg_id: id.into(),
    }
}

async fn active(client: &mut Client) -> String {
    client
        .resolve_active_conversation(ResolveActiveConversationRequest::default())
        .await
        .unwrap()
        .into_inner()
        .conv_id
}

async fn read_all(client: &mut Client, conv: &str) -> Vec<ConversationEvent> {
    client
        .read_conversation(ReadConversationRequest {
            conv_id: conv.into(),
            since_seq: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

fn seqs(events: &[ConversationEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_a_client_msg_id_store_it_once() {
    let s = TestServer::start_with(hub_config()).await;
    let mut c = s.client.clone();
    let conv = active(&mut c).await;
    let mut tasks = Vec::new();
    for m in 0..20 {
        for _ in 0..8 {
            let mut c = s.client.clone();
            let conv = conv.clone();
            tasks.push(tokio::spawn(async move {
                let e = c
                    .append_event(append(&conv, &format!("message {m}"), &format!("msg-{m}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .event
                    .unwrap();
                (m, e)
            }));
        }
    }
    let mut seq_of = BTreeMap::new();
    for t in tasks {
        let (m, e) = t.await.unwrap();
        assert_eq!(e.client_msg_id, format!("msg-{m}"));
        assert_eq!(e.content, format!("message {m}"));
        let first = *seq_of.entry(m).or_insert(e.seq);
        assert_eq!(first, e.seq, "retries of msg-{m} answered different seqs");
    }
    let events = read_all(&mut c, &conv).await;
    assert_eq!(seqs(&events), (1..=20).collect::<Vec<_>>());
    for e in &events {
        let m: i64 = e.client_msg_id["msg-".len()..].parse().unwrap();
        assert_eq!(seq_of[&m], e.seq);
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_appenders_get_gapless_ordered_seqs() {
    let s = TestServer::start_with(hub_config()).await;
    let mut c = s.client.clone();
    let conv = active(&mut c).await;
    let tasks: Vec<_> = (0..100)
        .map(|w| {
            let mut c = s.client.clone();
            let conv = conv.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..10 {
                    let e = c
                        .append_event(append(&conv, &format!("w{w}-{i}"), ""))
                        .await
                        .unwrap()
                        .into_inner()
                        .event
                        .unwrap();
                    acked.push((e.seq, e.content));
                }
                acked
            })
        })
        .collect();
    let mut content_of = BTreeMap::new();
    for t in tasks {
        let acked = t.await.unwrap();
        assert!(
            acked.windows(2).all(|p| p[0].0 < p[1].0),
            "one appender's seqs go backwards: {acked:?}"
        );
        for (seq, content) in acked {
            assert!(
                content_of.insert(seq, content).is_none(),
                "seq {seq} given twice"
            );
        }
    }
    let events = read_all(&mut c, &conv).await;
    assert_eq!(seqs(&events), (1..=1000).collect::<Vec<_>>());
    for e in &events {
        assert_eq!(content_of[&e.seq], e.content, "seq {}", e.seq);
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_get_the_backlog_then_live_events_without_gap_or_duplicate() {
    let s = TestServer::start_with(hub_config()).await;
    let mut c = s.client.clone();
    let conv = active(&mut c).await;
    for i in 0..50 {
        c.append_event(append(&conv, &format!("backlog {i}"), ""))
            .await
            .unwrap();
    }
    let total: i64 = 450;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut c = s.client.clone();
            let conv = conv.clone();
            tokio::spawn(async move {
                for i in 0..(total - 50) / 4 {
                    c.append_event(append(&conv, &format!("live {w}-{i}"), ""))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    // Subscribers join while the writers write, from the start and from the middle.
    let mut readers = Vec::new();
    for since in [0_i64, 30, 50] {
        let mut c = s.client.clone();
        let mut stream = c
            .subscribe_conversation(SubscribeConversationRequest {
                conv_id: conv.clone(),
                since_seq: since,
            })
            .await
            .unwrap()
            .into_inner();
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < (total - since) as usize {
                let e = within(HANG_GUARD, "the next event", stream.message())
                    .await
                    .unwrap()
                    .expect("the stream ended early");
                got.push(e.seq);
            }
            (since, got)
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    for r in readers {
        let (since, got) = r.await.unwrap();
        assert_eq!(
            got,
            ((since + 1)..=total).collect::<Vec<_>>(),
            "since {since}"
        );
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_is_aborted_while_a_fast_one_continues() {
    let mut config = hub_config();
    config.hub.tail_buffer = 8;
    let s = TestServer::start_with(config).await;
    let mut c = s.client.clone();
    let conv = active(&mut c).await;
    let subscribe = |channel: Channel, conv: String| async move {
        Client::new(channel)
            .subscribe_conversation(SubscribeConversationRequest {
                conv_id: conv,
                since_seq: 0,
            })
            .await
            .unwrap()
            .into_inner()
    };
    // Each on its own connection, so the slow one's unread data holds up only itself.
    let mut slow = subscribe(connect(s.addr).await, conv.clone()).await;
    let mut fast = subscribe(connect(s.addr).await, conv.clone()).await;
    // Large events (30 MB in all, more than the HTTP/2 windows and socket buffers hold), so the
    // slow subscriber's transport fills and it falls behind the live tail; the fast one takes
    // each event before the next is appended.
    let big = "x".repeat(60_000);
    let n = 500;
    for i in 0..n {
        c.append_event(append(&conv, &format!("{i} {big}"), ""))
            .await
            .unwrap();
        let e = within(
            HANG_GUARD,
            "the fast subscriber's next event",
            fast.message(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(e.seq, i + 1);
    }
    let mut got = Vec::new();
    let status = loop {
        match within(
            HANG_GUARD,
            "the slow subscriber's next message",
            slow.message(),
        )
        .await
        {
            Ok(Some(e)) => got.push(e.seq),
            Ok(None) => panic!("the slow subscriber's stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("subscribe again"), "{status:?}");
    assert!((got.len() as i64) < n, "the slow subscriber got everything");
    assert_eq!(got, (1..=got.len() as i64).collect::<Vec<_>>());
    // The fast one still follows.
    c.append_event(append(&conv, "after", "")).await.unwrap();
    let e = within(HANG_GUARD, "the fast subscriber's event", fast.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((e.seq, e.content.as_str()), (n + 1, "after"));
    drop(fast);
    s.shutdown().await;
}

/// The code of a call that must fail.
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map(drop).unwrap_err().code()
}

fn token_client(
    channel: &Channel,
    token: &str,
) -> ChatCliServiceClient<InterceptedService<Channel, BearerToken>> {
    ChatCliServiceClient::with_interceptor(channel.clone(), BearerToken(Some(token.into())))
}

#[tokio::test]
async fn principals_own_their_conversations_and_bindings() {
    let mut config = hub_config();
    let token = |name: &str, role| NamedToken {
        name: name.into(),
        role,
        sha256: Some(sha256_hex(&format!("{name}-secret"))),
        ..NamedToken::default()
    };
    config.auth.tokens = vec![
        token("alice", Role::User),
        token("bob", Role::User),
        token("ops", Role::Admin),
        token("viewer", Role::ReadOnly),
    ];
    let s = TestServer::start_with_metrics(config).await;
    let mut alice = token_client(&s.channel, "alice-secret");
    let mut bob = token_client(&s.channel, "bob-secret");
    let mut ops = token_client(&s.channel, "ops-secret");
    let mut viewer = token_client(&s.channel, "viewer-secret");

    let resolved = alice
        .resolve_active_conversation(ResolveActiveConversationRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.principal, "token:alice");
    let conv = resolved.conv_id;
    alice
        .append_event(append(&conv, "mine", "a1"))
        .await
        .unwrap();

    let read = |conv: &str| ReadConversationRequest {
        conv_id: conv.into(),
        ..Default::default()
    };
    assert_eq!(
        code(bob.read_conversation(read(&conv)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(bob.append_event(append(&conv, "not mine", "")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            bob.resolve_active_conversation(ResolveActiveConversationRequest {
                principal: "token:alice".into()
            })
            .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(bob.read_conversation(read("no-such-conv")).await),
        Code::NotFound
    );
    assert_eq!(
        code(viewer.append_event(append(&conv, "x", "")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            alice
                .append_event(AppendEventRequest {
                    content: "x".repeat(2 * 1024 * 1024),
                    ..append(&conv, "", "")
                })
                .await
        ),
        Code::InvalidArgument
    );
    let missing = alice
        .set_binding(SetBindingRequest {
            platform: "telegram".into(),
            user_id: String::new(),
            principal: "token:alice".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(missing.message().contains("user_id"), "{missing:?}");
    // The admin reads alice's conversation and acts for her.
    assert_eq!(
        ops.read_conversation(read(&conv))
            .await
            .unwrap()
            .into_inner()
            .events[0]
            .content,
        "mine"
    );
    let fresh = ops
        .new_conversation(NewConversationRequest {
            principal: "token:alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .conv_id;
    assert_eq!(
        alice
            .resolve_active_conversation(ResolveActiveConversationRequest::default())
            .await
            .unwrap()
            .into_inner()
            .conv_id,
        fresh
    );
    for (client, platform, user, principal) in [
        (&mut alice, "telegram", "1", "token:alice"),
        (&mut bob, "slack", "U2", "token:bob"),
    ] {
        client
            .set_binding(SetBindingRequest {
                platform: platform.into(),
                user_id: user.into(),
                principal: principal.into(),
            })
            .await
            .unwrap();
    }
    let own = alice
        .list_bindings(ListBindingsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .bindings;
    assert_eq!(own.len(), 1);
    assert_eq!(
        (
            own[0].platform.as_str(),
            own[0].user_id.as_str(),
            own[0].principal.as_str()
        ),
        ("telegram", "1", "token:alice")
    );
    let all = ops
        .list_bindings(ListBindingsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .bindings;
    assert_eq!(all.len(), 2);

    let text = metrics_with_lines(
        &s,
        &[
            "chatcli_hub_events_appended_total 1",
            "chatcli_hub_subscribers 0",
        ],
    )
    .await;
    assert!(text.contains("chatcli_hub_store_bytes"), "{text}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_disabled_hub_answers_unavailable_saying_how_to_turn_it_on() {
    let mut config = hub_config();
    config.hub.enabled = false;
    let s = TestServer::start_with(config).await;
    let mut c = s.client.clone();
    let statuses = [
        c.resolve_active_conversation(ResolveActiveConversationRequest::default())
            .await
            .map(drop),
        c.new_conversation(NewConversationRequest::default())
            .await
            .map(drop),
        c.append_event(append("c", "x", "")).await.map(drop),
        c.read_conversation(ReadConversationRequest::default())
            .await
            .map(drop),
        c.subscribe_conversation(SubscribeConversationRequest::default())
            .await
            .map(drop),
        c.set_binding(SetBindingRequest::default()).await.map(drop),
        c.list_bindings(ListBindingsRequest::default())
            .await
            .map(drop),
    ];
    for st in statuses {
        let st = st.unwrap_err();
        assert_eq!(st.code(), Code::Unavailable, "{st:?}");
        assert!(st.message().contains("CHATCLI_HUB_ENABLED=true"), "{st:?}");
    }
    assert!(
        !s.data_dir.join("hub.db").exists(),
        "a disabled hub made a database"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn retention_deletes_conversations_idle_for_longer_than_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.db");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    {
        // An old conversation, and one used a minute ago, written before the server starts.
        let store = chatcli::state::local::SqliteHubStore::open(&db).unwrap();
        store
            .new_conversation("system", "old-conv", now - 10 * 86_400_000)
            .await
            .unwrap();
        store
            .new_conversation("system", "recent-conv", now - 60_000)
            .await
            .unwrap();
    }
    let mut config = hub_config();
    config.hub.db = Some(db);
    config.hub.retention_days = 2;
    let s = TestServer::start_with(config).await;
    let mut c = s.client.clone();
    eventually("the old conversation to be deleted", || {
        let mut c = c.clone();
        async move {
            let r = c
                .read_conversation(ReadConversationRequest {
                    conv_id: "old-conv".into(),
                    ..Default::default()
                })
                .await;
            matches!(r, Err(st) if st.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    assert!(read_all(&mut c, "recent-conv").await.is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn subscriber_streams_end_cleanly_when_the_server_drains() {
    let s = TestServer::start_with(hub_config()).await;
    let mut c = s.client.clone();
    let conv = active(&mut c).await;
    c.append_event(append(&conv, "one", "")).await.unwrap();
    let mut stream = c
        .subscribe_conversation(SubscribeConversationRequest {
            conv_id: conv,
            since_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().seq, 1);
    s.begin_shutdown();
    let end = within(
        HANG_GUARD,
        "the end of the stream on drain",
        stream.message(),
    )
    .await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(stream);
    drop(c);
    s.shutdown().await;
}

/// What the appenders of the kill loop saw: acknowledged (client_msg_id → seq) and sent but not
/// acknowledged.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, i64>,
    unacked: BTreeSet<String>,
}

/// Appends with fresh ids (and first retries the ids whose answer was lost) until the server dies.
async fn append_until_killed(
    addr: std::net::SocketAddr,
    conv: String,
    ledger: Arc<Mutex<Ledger>>,
    worker: usize,
    round: usize,
) {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    else {
        return;
    };
    let mut c = Client::new(channel);
    let retries: Vec<String> = {
        let l = ledger.lock().unwrap();
        l.unacked
            .iter()
            .filter(|id| id.starts_with(&format!("w{worker}-")))
            .cloned()
            .collect()
    };
    let fresh = (0..).map(|i| format!("w{worker}-r{round}-{i}"));
    for id in retries.into_iter().chain(fresh) {
        ledger.lock().unwrap().unacked.insert(id.clone());
        match c
            .append_event(append(&conv, &format!("content of {id}"), &id))
            .await
        {
            Ok(r) => {
                let e = r.into_inner().event.unwrap();
                let mut l = ledger.lock().unwrap();
                l.unacked.remove(&id);
                if let Some(before) = l.acked.insert(id.clone(), e.seq) {
                    assert_eq!(before, e.seq, "{id} acknowledged with two seqs");
                }
            }
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_appends_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.db");
    let db_env = db.to_str().unwrap().to_string();
    let env = [
        ("CHATCLI_HUB_DB", db_env.as_str()),
        ("CHATCLI_RATE_LIMIT_RPS", "1000000"),
        ("CHATCLI_RATE_LIMIT_BURST", "1000000"),
    ];
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut conv = String::new();
    for round in 0..5 {
        let mut server = BinaryServer::start_with_env(&demo_config(), &[], &env);
        let mut c = Client::new(connect(server.addr).await);
        let resolved = active(&mut c).await;
        if round == 0 {
            conv = resolved;
        } else {
            assert_eq!(
                resolved, conv,
                "the active conversation survives the restart"
            );
        }
        let workers: Vec<_> = (0..4)
            .map(|w| {
                tokio::spawn(append_until_killed(
                    server.addr,
                    conv.clone(),
                    ledger.clone(),
                    w,
                    round,
                ))
            })
            .collect();
        // A different point in the stream of appends each round.
        let pause = 150 + (std::process::id() as u64 * 7 + round as u64 * 97) % 250;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.signal("KILL");
        within(
            HANG_GUARD,
            "the killed server to exit",
            server.wait_exit(HANG_GUARD),
        )
        .await;
        for w in workers {
            w.await.unwrap();
        }
    }
    let server = BinaryServer::start_with_env(&demo_config(), &[], &env);
    let mut c = Client::new(connect(server.addr).await);
    let events = read_all(&mut c, &conv).await;
    let ledger = ledger.lock().unwrap();
    assert!(
        ledger.acked.len() > 20,
        "too few appends acknowledged: {}",
        ledger.acked.len()
    );
    assert_eq!(
        seqs(&events),
        (1..=events.len() as i64).collect::<Vec<_>>(),
        "seqs have a gap"
    );
    let mut seen = BTreeSet::new();
    for e in &events {
        assert!(
            seen.insert(e.client_msg_id.clone()),
            "{} stored twice",
            e.client_msg_id
        );
        assert_eq!(e.content, format!("content of {}", e.client_msg_id));
    }
    for (id, seq) in &ledger.acked {
        let stored = events.iter().find(|e| &e.client_msg_id == id);
        assert_eq!(
            stored.map(|e| e.seq),
            Some(*seq),
            "acknowledged {id} (seq {seq}) is not there after kill -9"
        );
    }
    // Whatever is stored was sent: acknowledged, or sent when the server died.
    for e in &events {
        assert!(
            ledger.acked.contains_key(&e.client_msg_id)
                || ledger.unacked.contains(&e.client_msg_id),
            "{} was never sent",
            e.client_msg_id
        );
    }
}

use crate::python::python;

#[tokio::test]
async fn a_python_peer_appends_and_subscribes() {
    let python = python();
    let server = BinaryServer::start(&demo_config(), &[]);
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/hub_peer.py");
    let home = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(&python)
        .arg(&peer)
        .arg(server.addr.to_string())
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the python hub peer did not finish within 120s")
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python hub peer failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server stderr\n{}",
        out.status,
        server.stderr()
    );
    assert!(stdout.contains("hub peer: OK"), "{stdout}");
    // What the peer appended is in the store, seen from Rust.
    let conv = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("conv="))
        .expect("the peer names its conversation")
        .to_string();
    let mut c = Client::new(connect(server.addr).await);
    let events = read_all(&mut c, &conv).await;
    assert_eq!(seqs(&events), (1..=6).collect::<Vec<_>>());
    assert_eq!(events[0].channel, "python");
}
