//! The Redis backend against a real `redis-server` (crate::testing::redis).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::{StateBackend, StateConfig};
use crate::sessions::{RedisSessions, SessionData, SessionError, SessionStore, StoredMessage};
use crate::testing::redis::RedisServer;

fn render(registry: &prometheus::Registry) -> String {
    let mut out = String::new();
    prometheus::TextEncoder::new()
        .encode_utf8(&registry.gather(), &mut out)
        .unwrap();
    out
}

fn config(url: &str, prefix: &str) -> StateConfig {
    let mut c = StateConfig {
        backend: StateBackend::Redis,
        ..StateConfig::default()
    };
    c.redis.url = Some(url.to_string());
    c.redis.key_prefix = prefix.to_string();
    c
}

fn turn(text: &str) -> StoredMessage {
    StoredMessage {
        role: "user".into(),
        content: text.into(),
        meta: None,
    }
}

fn store(state: &Arc<RedisState>) -> SessionStore {
    SessionStore::shared(
        std::path::PathBuf::from("/nonexistent"),
        RedisSessions::new(state.clone()),
    )
}

#[tokio::test]
async fn sessions_round_trip_list_delete_and_conflict() {
    let server = RedisServer::start();
    let state = RedisState::new(&config(&server.url(), "t1:"), None).unwrap();
    let a = store(&state);
    // A second handle on the same Redis: another replica.
    let b = store(&RedisState::new(&config(&server.url(), "t1:"), None).unwrap());

    assert!(a.list("alice").await.unwrap().is_empty());
    let mut data = SessionData::default();
    data.chat_history.push(turn("hello"));
    a.save("alice", "chat-1", data.clone()).await.unwrap();
    a.save("bob", "chat-9", data.clone()).await.unwrap();
    assert_eq!(b.list("alice").await.unwrap(), ["chat-1"]);
    let loaded = b.load("alice", "chat-1").await.unwrap();
    assert_eq!(loaded.chat_history, data.chat_history);
    assert_eq!(loaded.title, "hello", "the title is derived as for files");
    // The stored document is the session file's format.
    let raw = server.command(&format!("HGET t1:session:{{{}}}:chat-1 data", hex("alice")));
    assert!(raw.contains("\"version\": 2"), "{raw}");
    assert!(raw.contains("\"chat_history\""), "{raw}");

    // Compare-and-set: two readers of version v, the first write wins, the second conflicts and
    // nothing of it is stored.
    let (mut one, v) = a.load_versioned("alice", "chat-1").await.unwrap();
    let (mut two, v2) = b.load_versioned("alice", "chat-1").await.unwrap();
    assert_eq!(v, v2);
    one.chat_history.push(turn("from a"));
    two.chat_history.push(turn("from b"));
    a.save_if("alice", "chat-1", one, v).await.unwrap();
    let err = b.save_if("alice", "chat-1", two, v2).await.unwrap_err();
    assert!(
        matches!(err, SessionError::Conflict { ref name } if name == "chat-1"),
        "{err:?}"
    );
    let now = a.load("alice", "chat-1").await.unwrap();
    assert_eq!(
        now.chat_history
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>(),
        ["hello", "from a"]
    );
    // Version 0 means "not stored yet": creating twice conflicts.
    b.save_if("alice", "new-one", SessionData::default(), 0)
        .await
        .unwrap();
    assert!(matches!(
        a.save_if("alice", "new-one", SessionData::default(), 0)
            .await
            .unwrap_err(),
        SessionError::Conflict { .. }
    ));

    b.delete("alice", "chat-1").await.unwrap();
    assert!(matches!(
        a.load("alice", "chat-1").await.unwrap_err(),
        SessionError::NotFound { .. }
    ));
    assert!(matches!(
        a.delete("alice", "chat-1").await.unwrap_err(),
        SessionError::NotFound { .. }
    ));
    assert_eq!(a.list("alice").await.unwrap(), ["new-one"]);
    assert_eq!(a.list("bob").await.unwrap(), ["chat-9"]);
    assert!(matches!(
        a.save("alice", "../x", SessionData::default())
            .await
            .unwrap_err(),
        SessionError::InvalidName { .. }
    ));
}

#[tokio::test]
async fn key_prefixes_keep_deployments_apart() {
    let server = RedisServer::start();
    let one = store(&RedisState::new(&config(&server.url(), "one:"), None).unwrap());
    let two = store(&RedisState::new(&config(&server.url(), "two:"), None).unwrap());
    one.save("p", "s", SessionData::default()).await.unwrap();
    assert!(two.list("p").await.unwrap().is_empty());
    assert_eq!(one.list("p").await.unwrap(), ["s"]);
}

#[tokio::test]
async fn gcra_limits_a_key_across_handles_and_leaves_other_keys_alone() {
    let server = RedisServer::start();
    let a = RedisState::new(&config(&server.url(), "rl:"), None).unwrap();
    let b = RedisState::new(&config(&server.url(), "rl:"), None).unwrap();
    let hour = Duration::from_secs(3600);
    // Burst 4, one more per hour: four calls pass, split over two replicas.
    for r in [&a, &b, &a, &b] {
        assert_eq!(
            r.rate_check("alice", hour, 4).await.unwrap(),
            RateCheck::Allowed
        );
    }
    match b.rate_check("alice", hour, 4).await.unwrap() {
        RateCheck::Wait(w) => assert!(w > Duration::from_secs(3000) && w <= hour, "{w:?}"),
        other => panic!("the fifth call passed: {other:?}"),
    }
    assert!(matches!(
        a.rate_check("alice", hour, 4).await.unwrap(),
        RateCheck::Wait(_)
    ));
    assert_eq!(
        a.rate_check("bob", hour, 4).await.unwrap(),
        RateCheck::Allowed
    );
    // A fast limit refills: 1000/s with burst 1 admits again once a millisecond has passed.
    let ms = Duration::from_millis(1);
    assert_eq!(
        a.rate_check("fast", ms, 1).await.unwrap(),
        RateCheck::Allowed
    );
    let mut admitted = false;
    for _ in 0..1000 {
        if a.rate_check("fast", ms, 1).await.unwrap() == RateCheck::Allowed {
            admitted = true;
            break;
        }
        tokio::time::sleep(ms).await;
    }
    assert!(admitted, "the bucket never refilled");
}

#[tokio::test]
async fn redis_going_away_is_unavailable_and_coming_back_recovers_without_restart() {
    let mut server = RedisServer::start();
    let registry = prometheus::Registry::new();
    let state = RedisState::new(&config(&server.url(), "up:"), Some(&registry)).unwrap();
    let sessions = store(&state);
    state.ping().await.unwrap();
    assert!(state.is_up());
    sessions
        .save("p", "kept", SessionData::default())
        .await
        .unwrap();
    server.stop();
    let err = sessions.list("p").await.unwrap_err();
    match &err {
        SessionError::Unavailable { reason, .. } => {
            assert!(reason.contains("Redis"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(!state.is_up());
    let text = render(&registry);
    assert!(text.contains("chatcli_state_backend_up 0"), "{text}");
    assert!(
        text.contains("chatcli_state_backend_errors_total{op=\"session_list\"}"),
        "{text}"
    );
    server.restart();
    // The connection comes back by itself (with backoff); the restarted server is empty.
    let mut back = false;
    for _ in 0..500 {
        if state.ping().await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "no reconnection after redis-server came back");
    assert!(state.is_up());
    assert!(sessions.list("p").await.unwrap().is_empty());
    let text = render(&registry);
    assert!(text.contains("chatcli_state_backend_up 1"), "{text}");
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error() {
    let server = RedisServer::start_with(Some("right-password"));
    let dir = server.dir();
    let file = dir.join("redis-password");
    std::fs::write(&file, "wrong-password\n").unwrap();
    let mut c = config(&server.url(), "pw:");
    c.redis.password_file = Some(file.clone());
    let err = RedisState::new(&c, None).unwrap().ping().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("Redis"), "{text}");
    assert!(
        text.to_lowercase().contains("pass") || text.contains("WRONGPASS"),
        "{text}"
    );
    std::fs::write(&file, "right-password\n").unwrap();
    RedisState::new(&c, None).unwrap().ping().await.unwrap();
    c.redis.password_file = Some(dir.join("missing"));
    let err = RedisState::new(&c, None).unwrap_err();
    assert!(err.starts_with("state.redis.password_file:"), "{err}");
}
