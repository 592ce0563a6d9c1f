use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::*;
use crate::auth::{AuthMethod, Principal, Role};
use crate::state::local::SqliteHubStore;

struct TempHub {
    hub: Arc<Hub>,
    store: Arc<SqliteHubStore>,
    dir: PathBuf,
    metrics: HubMetrics,
}

impl Drop for TempHub {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_hub(tail_buffer: usize) -> TempHub {
    let dir = std::env::temp_dir().join(format!(
        "chatcli-hub-svc-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    let store = Arc::new(SqliteHubStore::open(&dir.join("hub.db")).unwrap());
    let metrics = HubMetrics::register(&prometheus::Registry::new()).unwrap();
    let hub = Arc::new(Hub::with_store(
        store.clone(),
        tail_buffer,
        Some(metrics.clone()),
    ));
    TempHub {
        hub,
        store,
        dir,
        metrics,
    }
}

fn caller(method: AuthMethod, id: &str, role: Role) -> Caller {
    Caller::from_principal(&Principal {
        id: id.into(),
        role,
        method,
        email: None,
        tenant_id: None,
    })
}

fn alice() -> Caller {
    caller(AuthMethod::Jwt, "alice", Role::User)
}
fn bob() -> Caller {
    caller(AuthMethod::Jwt, "bob", Role::User)
}
fn admin() -> Caller {
    caller(AuthMethod::Token, "legacy-token", Role::Admin)
}
fn reader() -> Caller {
    caller(AuthMethod::Token, "viewer", Role::ReadOnly)
}

const LIMITS: HubLimits = HubLimits {
    max_content_bytes: 64,
    max_field_bytes: 16,
};

fn msg(conv: &str, content: &str, id: &str) -> AppendRequest {
    AppendRequest {
        conv_id: conv.into(),
        channel: "local".into(),
        role: "user".into(),
        content: content.into(),
        client_msg_id: id.into(),
    }
}

#[tokio::test]
async fn a_disabled_hub_refuses_every_call_saying_how_to_turn_it_on() {
    let config = crate::config::HubConfig {
        enabled: false,
        ..Default::default()
    };
    let hub = Arc::new(Hub::new(
        &config,
        PathBuf::from("/nonexistent/hub.db"),
        None,
    ));
    assert!(!hub.enabled());
    let a = admin();
    let errors = [
        hub.resolve_active(&a, "").await.unwrap_err(),
        hub.new_conversation(&a, "").await.unwrap_err(),
        hub.append(&a, LIMITS, msg("c", "x", "")).await.unwrap_err(),
        hub.read(&a, "c", 0, 0).await.unwrap_err(),
        hub.subscribe(&a, "c", 0).await.err().unwrap(),
        hub.set_binding(
            &a,
            LIMITS,
            Binding {
                platform: "p".into(),
                user_id: "u".into(),
                principal: "x".into(),
            },
        )
        .await
        .unwrap_err(),
        hub.list_bindings(&a, "").await.unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e, HubError::Disabled);
        assert!(e.to_string().contains("CHATCLI_HUB_ENABLED=true"), "{e}");
        assert!(e.to_string().contains("[hub] enabled = true"), "{e}");
    }
}

#[tokio::test]
async fn a_store_that_cannot_open_is_unavailable_and_names_the_path() {
    let hub = Hub::new(
        &crate::config::HubConfig::default(),
        PathBuf::from("/proc/chatcli-hub/hub.db"),
        None,
    );
    let e = hub.open().await.unwrap_err();
    assert_eq!(e.code(), "hub_unavailable");
    assert!(e.to_string().contains("/proc/chatcli-hub"), "{e}");
}

#[tokio::test]
async fn conversations_are_resolved_created_and_kept_to_their_principal() {
    let t = temp_hub(16);
    let hub = &t.hub;
    let (c1, p) = hub.resolve_active(&alice(), "").await.unwrap();
    assert_eq!(p, "jwt:alice");
    assert_eq!(
        hub.resolve_active(&alice(), "jwt:alice").await.unwrap(),
        (c1.clone(), p)
    );
    let c2 = hub.new_conversation(&alice(), "").await.unwrap();
    assert_ne!(c1, c2);
    assert_eq!(hub.resolve_active(&alice(), "").await.unwrap().0, c2);
    // An admin resolves (and so creates) another principal's conversation; the owner sees it.
    let (bobs, p) = hub.resolve_active(&admin(), "jwt:bob").await.unwrap();
    assert_eq!(p, "jwt:bob");
    assert_eq!(hub.resolve_active(&bob(), "").await.unwrap().0, bobs);

    hub.append(&alice(), LIMITS, msg(&c2, "hi", ""))
        .await
        .unwrap();
    // (who, call) → error code; each call is refused without touching the store.
    let cases: Vec<(&str, Result<(), HubError>)> = vec![
        (
            "bob reads alice's",
            hub.read(&bob(), &c2, 0, 0).await.map(drop),
        ),
        (
            "bob appends to alice's",
            hub.append(&bob(), LIMITS, msg(&c2, "x", ""))
                .await
                .map(drop),
        ),
        (
            "bob follows alice's",
            hub.subscribe(&bob(), &c2, 0).await.map(drop),
        ),
        (
            "bob resolves for alice",
            hub.resolve_active(&bob(), "jwt:alice").await.map(drop),
        ),
        (
            "bob starts one for alice",
            hub.new_conversation(&bob(), "jwt:alice").await.map(drop),
        ),
        (
            "unknown conv",
            hub.read(&alice(), "nope", 0, 0).await.map(drop),
        ),
        (
            "unknown conv append",
            hub.append(&alice(), LIMITS, msg("nope", "x", ""))
                .await
                .map(drop),
        ),
        (
            "empty conv_id",
            hub.read(&alice(), "", 0, 0).await.map(drop),
        ),
        (
            "negative since",
            hub.read(&alice(), &c2, -1, 0).await.map(drop),
        ),
        (
            "negative limit",
            hub.read(&alice(), &c2, 0, -1).await.map(drop),
        ),
        (
            "reader appends",
            hub.append(&reader(), LIMITS, msg(&c2, "x", ""))
                .await
                .map(drop),
        ),
        (
            "reader without a conversation",
            hub.resolve_active(&reader(), "").await.map(drop),
        ),
        (
            "unknown role",
            hub.append(
                &alice(),
                LIMITS,
                AppendRequest {
                    role: "wizard".into(),
                    ..msg(&c2, "x", "")
                },
            )
            .await
            .map(drop),
        ),
        (
            "content too long",
            hub.append(&alice(), LIMITS, msg(&c2, &"x".repeat(65), ""))
                .await
                .map(drop),
        ),
        (
            "client_msg_id too long",
            hub.append(&alice(), LIMITS, msg(&c2, "x", &"k".repeat(17)))
                .await
                .map(drop),
        ),
    ];
    let want = [
        "permission_denied",
        "permission_denied",
        "permission_denied",
        "permission_denied",
        "permission_denied",
        "conversation_not_found",
        "conversation_not_found",
        "invalid_argument",
        "invalid_argument",
        "invalid_argument",
        "permission_denied",
        "permission_denied",
        "invalid_argument",
        "invalid_argument",
        "invalid_argument",
    ];
    assert_eq!(cases.len(), want.len());
    for ((what, got), code) in cases.into_iter().zip(want) {
        assert_eq!(got.unwrap_err().code(), code, "{what}");
    }
    let events = hub.read(&admin(), &c2, 0, 0).await.unwrap();
    assert_eq!(events.len(), 1, "only the first append was stored");
    assert_eq!(events[0].principal, "jwt:alice");
    assert!(events[0].ts > 0);
    // The field names in the messages.
    let e = hub
        .append(&alice(), LIMITS, msg(&c2, &"x".repeat(65), ""))
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("content is 65 bytes"), "{e}");
}

#[tokio::test]
async fn a_repeated_client_msg_id_returns_the_first_event_and_is_counted_once() {
    let t = temp_hub(16);
    let (conv, _) = t.hub.resolve_active(&alice(), "").await.unwrap();
    let first = t
        .hub
        .append(&alice(), LIMITS, msg(&conv, "one", "m1"))
        .await
        .unwrap();
    let retry = t
        .hub
        .append(&alice(), LIMITS, msg(&conv, "one", "m1"))
        .await
        .unwrap();
    assert_eq!(retry, first);
    assert_eq!(t.metrics.events_appended.get(), 1);
    assert_eq!(t.hub.read(&alice(), &conv, 0, 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn bindings_follow_the_principal_rules() {
    let t = temp_hub(16);
    let hub = &t.hub;
    let bind = |platform: &str, user: &str, p: &str| Binding {
        platform: platform.into(),
        user_id: user.into(),
        principal: p.into(),
    };
    hub.set_binding(&alice(), LIMITS, bind("telegram", "1", "jwt:alice"))
        .await
        .unwrap();
    hub.set_binding(&admin(), LIMITS, bind("slack", "U2", "jwt:bob"))
        .await
        .unwrap();
    for (missing, b) in [
        ("platform", bind("", "1", "jwt:alice")),
        ("user_id", bind("telegram", "", "jwt:alice")),
        ("principal", bind("telegram", "1", "")),
    ] {
        let e = hub.set_binding(&alice(), LIMITS, b).await.unwrap_err();
        assert_eq!(
            e,
            HubError::InvalidArgument(format!("{missing} is required"))
        );
    }
    let refused = [
        // Binding to someone else, or taking a user bound to someone else, needs an admin.
        hub.set_binding(&alice(), LIMITS, bind("telegram", "9", "jwt:bob"))
            .await
            .unwrap_err(),
        hub.set_binding(&alice(), LIMITS, bind("slack", "U2", "jwt:alice"))
            .await
            .unwrap_err(),
        hub.set_binding(&reader(), LIMITS, bind("slack", "U3", "token:viewer"))
            .await
            .unwrap_err(),
        hub.list_bindings(&alice(), "jwt:bob").await.unwrap_err(),
    ];
    for e in refused {
        assert_eq!(e.code(), "permission_denied", "{e}");
    }
    assert_eq!(
        hub.list_bindings(&alice(), "").await.unwrap(),
        [bind("telegram", "1", "jwt:alice")]
    );
    assert_eq!(
        hub.list_bindings(&bob(), "").await.unwrap(),
        [bind("slack", "U2", "jwt:bob")]
    );
    assert_eq!(
        hub.list_bindings(&admin(), "").await.unwrap(),
        [
            bind("slack", "U2", "jwt:bob"),
            bind("telegram", "1", "jwt:alice")
        ]
    );
    assert_eq!(
        hub.list_bindings(&admin(), "jwt:alice").await.unwrap(),
        [bind("telegram", "1", "jwt:alice")]
    );
    // An admin may rebind.
    hub.set_binding(&admin(), LIMITS, bind("telegram", "1", "jwt:bob"))
        .await
        .unwrap();
    assert!(hub.list_bindings(&alice(), "").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_gets_the_backlog_then_live_events_without_gap_or_repeat() {
    let t = temp_hub(4096);
    let (conv, _) = t.hub.resolve_active(&alice(), "").await.unwrap();
    for i in 0..20 {
        t.hub
            .append(&alice(), LIMITS, msg(&conv, &format!("b{i}"), ""))
            .await
            .unwrap();
    }
    // Appenders keep writing from several tasks while subscribers join at different points.
    let total = 600;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let hub = t.hub.clone();
            let conv = conv.clone();
            tokio::spawn(async move {
                for i in 0..(total - 20) / 4 {
                    hub.append(&alice(), LIMITS, msg(&conv, &format!("w{w}-{i}"), ""))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut readers = Vec::new();
    for since in [0, 5, 20] {
        let stream = t.hub.subscribe(&alice(), &conv, since).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            let mut stream = stream;
            while seqs.len() < (total - since) as usize {
                let e = tokio::time::timeout(Duration::from_secs(30), stream.next())
                    .await
                    .expect("the stream stalled")
                    .expect("the stream ended")
                    .unwrap();
                seqs.push(e.seq);
            }
            (since, seqs)
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    for r in readers {
        let (since, seqs) = r.await.unwrap();
        assert_eq!(
            seqs,
            ((since + 1)..=total).collect::<Vec<_>>(),
            "since {since}"
        );
    }
    assert_eq!(t.metrics.events_appended.get(), total as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_is_aborted_while_a_fast_one_continues() {
    let t = temp_hub(4);
    let (conv, _) = t.hub.resolve_active(&alice(), "").await.unwrap();
    t.hub
        .append(&alice(), LIMITS, msg(&conv, "first", ""))
        .await
        .unwrap();
    let mut slow = t.hub.subscribe(&alice(), &conv, 0).await.unwrap();
    let mut fast = t.hub.subscribe(&alice(), &conv, 0).await.unwrap();
    assert_eq!(slow.next().await.unwrap().unwrap().seq, 1);
    assert_eq!(fast.next().await.unwrap().unwrap().seq, 1);
    // Both have joined the live channel once they wait for the next event.
    for s in [&mut slow, &mut fast] {
        assert!(
            tokio::time::timeout(Duration::from_millis(50), s.next())
                .await
                .is_err()
        );
    }
    assert_eq!(t.metrics.subscribers.get(), 2);
    // The fast subscriber takes each event as it comes; the slow one takes none.
    let mut seqs = Vec::new();
    for i in 0..40 {
        t.hub
            .append(&alice(), LIMITS, msg(&conv, &format!("m{i}"), ""))
            .await
            .unwrap();
        seqs.push(fast.next().await.unwrap().unwrap().seq);
    }
    assert_eq!(seqs, (2..=41).collect::<Vec<_>>());
    let err = slow.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), "subscriber_lagged");
    let HubError::SubscriberLagged {
        last_seq,
        tail_buffer,
        ..
    } = err
    else {
        unreachable!()
    };
    assert_eq!((last_seq, tail_buffer), (1, 4));
    assert!(slow.next().await.is_none(), "the aborted stream ends");
    drop(slow);
    drop(fast);
    assert_eq!(t.metrics.subscribers.get(), 0);
    assert_eq!(t.hub.live.channels(), 0, "the unused channel is dropped");
}

#[tokio::test]
async fn draining_ends_subscriber_streams_cleanly() {
    let t = temp_hub(16);
    let (conv, _) = t.hub.resolve_active(&alice(), "").await.unwrap();
    let mut s = t.hub.subscribe(&alice(), &conv, 0).await.unwrap();
    let waiting = tokio::spawn(async move { s.next().await.map(|r| r.map(|e| e.seq)) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.hub.drain();
    let end = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the stream did not end on drain")
        .unwrap();
    assert_eq!(end, None);
}

#[tokio::test]
async fn housekeeping_deletes_idle_conversations_and_measures_the_store() {
    let t = temp_hub(16);
    let (kept, _) = t.hub.resolve_active(&alice(), "").await.unwrap();
    let old_ms = now_ms() - 3 * 86_400_000;
    t.store
        .new_conversation("jwt:bob", "old-conv", old_ms)
        .await
        .unwrap();
    t.hub.housekeeping(0).await;
    assert!(t.store.conversation("old-conv").await.unwrap().is_some());
    assert!(t.metrics.store_bytes.get() > 0);
    // Known to the hub (its owner remembered) before it is deleted.
    assert!(
        t.hub
            .read(&admin(), "old-conv", 0, 0)
            .await
            .unwrap()
            .is_empty()
    );
    t.hub.housekeeping(2).await;
    assert_eq!(t.store.conversation("old-conv").await.unwrap(), None);
    assert_eq!(
        t.hub.read(&admin(), "old-conv", 0, 0).await.unwrap_err(),
        HubError::ConversationNotFound("old-conv".into())
    );
    assert!(t.store.conversation(&kept).await.unwrap().is_some());
}

#[tokio::test]
async fn an_unused_hub_writes_no_database_and_an_existing_one_opens_at_start() {
    let dir = std::env::temp_dir().join(format!("chatcli-hub-lazy-{}", uuid::Uuid::new_v4()));
    let db = dir.join("hub.db");
    let hub = Hub::new(&crate::config::HubConfig::default(), db.clone(), None);
    assert_eq!(hub.open_existing().await, Ok(false));
    hub.housekeeping(1).await;
    assert!(!db.exists(), "a hub nobody used made {}", db.display());
    // The first call makes it.
    let (conv, _) = hub.resolve_active(&alice(), "").await.unwrap();
    assert!(db.exists());
    drop(hub);
    let again = Hub::new(&crate::config::HubConfig::default(), db.clone(), None);
    assert_eq!(again.open_existing().await, Ok(true));
    assert_eq!(again.resolve_active(&alice(), "").await.unwrap().0, conv);
    let _ = std::fs::remove_dir_all(&dir);
}
