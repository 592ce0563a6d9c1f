//! The conversation hub's store: conversations owned by a principal, each principal's active
//! conversation, the events of each conversation numbered 1, 2, 3 … by `seq`, and the bindings of
//! chat-platform users to principals.
//!
//! Every operation is one atomic step of the backend (a transaction, a script): the store, not its
//! caller, assigns `seq` and applies `client_msg_id` idempotency, so callers on several tasks, or
//! several servers sharing one backend, never see a gap or a duplicate. An operation that returned
//! `Ok` is durable. Access rules (who may read or write what) are the caller's business; the store
//! only keeps the data.
//!
//! [`suite`] is the behaviour every backend must show, as one async function over `&dyn HubStore`.

use async_trait::async_trait;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No conversation has this id.
    #[error("conversation {0} not found")]
    ConversationNotFound(String),
    /// The backend failed (I/O, corruption, connection); the message says how.
    #[error("{0}")]
    Backend(String),
}

/// One conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Its id.
    pub id: String,
    /// The principal it belongs to.
    pub principal: String,
    /// When it was created (unix ms).
    pub created_ms: i64,
    /// When its last event was appended, else when it was created (unix ms); retention goes by it.
    pub updated_ms: i64,
    /// The `seq` of its last event (0 = none yet).
    pub last_seq: i64,
}

/// An event to append; the store assigns its `seq` and stamps the conversation's principal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewEvent {
    /// The conversation.
    pub conv_id: String,
    /// The front end that wrote it (`telegram`, `slack`, `local`, …).
    pub channel: String,
    /// `user`, `assistant`, `tool_summary` or `checkpoint`.
    pub role: String,
    /// The text.
    pub content: String,
    /// The writer's idempotency key; empty = none.
    pub client_msg_id: String,
    /// When it was written (unix ms).
    pub ts: i64,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredEvent {
    /// The conversation.
    pub conv_id: String,
    /// Its number in the conversation: 1, 2, 3 … with no gaps.
    pub seq: i64,
    /// The conversation's principal.
    pub principal: String,
    /// See [`NewEvent::channel`].
    pub channel: String,
    /// See [`NewEvent::role`].
    pub role: String,
    /// See [`NewEvent::content`].
    pub content: String,
    /// See [`NewEvent::client_msg_id`].
    pub client_msg_id: String,
    /// See [`NewEvent::ts`].
    pub ts: i64,
}

/// What [`HubStore::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The stored event: the new one, or for a repeated `client_msg_id` the first one.
    pub event: StoredEvent,
    /// Whether the `client_msg_id` was seen before (nothing new was stored).
    pub duplicate: bool,
}

/// A chat-platform user bound to a principal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    /// The platform (`telegram`, `slack`, …).
    pub platform: String,
    /// The user's id on that platform.
    pub user_id: String,
    /// The principal.
    pub principal: String,
}

/// What [`HubStore::set_binding`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingOutcome {
    /// The binding is stored.
    Set,
    /// The (platform, user_id) is bound to this other principal, and replacing it was not allowed;
    /// nothing changed.
    HeldBy(String),
}

/// The hub's storage operations; see the module docs.
#[async_trait]
pub trait HubStore: Send + Sync + std::fmt::Debug {
    /// The principal's active conversation. When it has none and `create` is given, the
    /// conversation `create` names (its id and creation time) is created, made active and
    /// returned with `true`; without `create`, `None`.
    async fn resolve_active(
        &self,
        principal: &str,
        create: Option<(&str, i64)>,
    ) -> Result<Option<(Conversation, bool)>, StoreError>;

    /// Creates conversation `conv_id` for `principal` at `now_ms` and makes it the principal's
    /// active one.
    async fn new_conversation(
        &self,
        principal: &str,
        conv_id: &str,
        now_ms: i64,
    ) -> Result<Conversation, StoreError>;

    /// One conversation.
    async fn conversation(&self, conv_id: &str) -> Result<Option<Conversation>, StoreError>;

    /// Appends `event` with the next `seq` of its conversation; a non-empty `client_msg_id` the
    /// conversation has seen returns the first event with that id and stores nothing.
    async fn append(&self, event: NewEvent) -> Result<AppendOutcome, StoreError>;

    /// Events of `conv_id` with `seq > since_seq`, in order, at most `limit` (0 = all).
    async fn read(
        &self,
        conv_id: &str,
        since_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Binds (platform, user_id) to the binding's principal. When it is bound to another
    /// principal and `replace_others` is false, nothing changes.
    async fn set_binding(
        &self,
        binding: &Binding,
        replace_others: bool,
    ) -> Result<BindingOutcome, StoreError>;

    /// The bindings of `principal`, or all of them; sorted by platform, then user id.
    async fn list_bindings(&self, principal: Option<&str>) -> Result<Vec<Binding>, StoreError>;

    /// Deletes the conversations (with their events and active marks) last updated before
    /// `before_ms`; returns how many.
    async fn delete_idle(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// The store's size in bytes.
    async fn size_bytes(&self) -> Result<u64, StoreError>;
}

/// The behaviour every [`HubStore`] backend must show. Each check uses its own principals and
/// conversation ids, so the suite runs on an empty store or one used before.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod suite {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;

    fn event(conv: &str, content: &str, id: &str, ts: i64) -> NewEvent {
        NewEvent {
            conv_id: conv.into(),
            channel: "local".into(),
            role: "user".into(),
            content: content.into(),
            client_msg_id: id.into(),
            ts,
        }
    }

    /// Runs every check against `store`; `tag` keeps the ids of one run apart from another's.
    pub async fn run(store: Arc<dyn HubStore>, tag: &str) {
        conversations_and_active(&*store, tag).await;
        seq_and_read(&*store, tag).await;
        idempotency(&*store, tag).await;
        concurrent_appends(store.clone(), tag).await;
        concurrent_retries(store.clone(), tag).await;
        bindings(&*store, tag).await;
        retention(&*store, tag).await;
        assert!(store.size_bytes().await.unwrap() > 0);
    }

    /// The active conversation is created once, and a new conversation becomes active.
    pub async fn conversations_and_active(store: &dyn HubStore, tag: &str) {
        let p = format!("{tag}-alice");
        assert_eq!(store.resolve_active(&p, None).await.unwrap(), None);
        let c1 = format!("{tag}-c1");
        let (first, created) = store
            .resolve_active(&p, Some((&c1, 1_000)))
            .await
            .unwrap()
            .unwrap();
        assert!(created);
        assert_eq!(first.id, c1);
        assert_eq!(first.principal, p);
        assert_eq!(
            (first.created_ms, first.updated_ms, first.last_seq),
            (1_000, 1_000, 0)
        );
        let (again, created) = store
            .resolve_active(&p, Some((&format!("{tag}-other"), 2_000)))
            .await
            .unwrap()
            .unwrap();
        assert!(!created, "the active conversation exists");
        assert_eq!(again, first);
        assert_eq!(
            store.conversation(&format!("{tag}-other")).await.unwrap(),
            None
        );
        let c2 = format!("{tag}-c2");
        let fresh = store.new_conversation(&p, &c2, 3_000).await.unwrap();
        assert_eq!(fresh.id, c2);
        let (active, _) = store.resolve_active(&p, None).await.unwrap().unwrap();
        assert_eq!(active.id, c2);
        assert_eq!(store.conversation(&c1).await.unwrap(), Some(first));
        // Another principal's active conversation is its own.
        let q = format!("{tag}-bob");
        assert_eq!(store.resolve_active(&q, None).await.unwrap(), None);
    }

    /// Seqs are 1, 2, 3 …; reads start after `since_seq` and stop at `limit`.
    pub async fn seq_and_read(store: &dyn HubStore, tag: &str) {
        let p = format!("{tag}-seq");
        let conv = format!("{tag}-seq-conv");
        store.new_conversation(&p, &conv, 10).await.unwrap();
        for i in 1..=5 {
            let out = store
                .append(event(&conv, &format!("m{i}"), "", 100 + i))
                .await
                .unwrap();
            assert!(!out.duplicate);
            assert_eq!(out.event.seq, i);
            assert_eq!(out.event.principal, p);
            assert_eq!(out.event.ts, 100 + i);
        }
        let all = store.read(&conv, 0, 0).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.content.as_str()).collect::<Vec<_>>(),
            ["m1", "m2", "m3", "m4", "m5"]
        );
        assert_eq!(all[2].channel, "local");
        assert_eq!(all[2].role, "user");
        let tail = store.read(&conv, 3, 0).await.unwrap();
        assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        let page = store.read(&conv, 1, 2).await.unwrap();
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        assert!(store.read(&conv, 5, 0).await.unwrap().is_empty());
        let c = store.conversation(&conv).await.unwrap().unwrap();
        assert_eq!((c.last_seq, c.updated_ms), (5, 105));
        let missing = store
            .append(event(&format!("{tag}-nope"), "x", "", 1))
            .await
            .unwrap_err();
        assert_eq!(
            missing,
            StoreError::ConversationNotFound(format!("{tag}-nope"))
        );
        assert!(
            store
                .read(&format!("{tag}-nope"), 0, 0)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A repeated `client_msg_id` returns the first event and stores nothing; ids are per
    /// conversation.
    pub async fn idempotency(store: &dyn HubStore, tag: &str) {
        let p = format!("{tag}-idem");
        let conv = format!("{tag}-idem-conv");
        let other = format!("{tag}-idem-other");
        store.new_conversation(&p, &conv, 1).await.unwrap();
        store.new_conversation(&p, &other, 1).await.unwrap();
        let first = store.append(event(&conv, "hello", "k1", 5)).await.unwrap();
        let again = store
            .append(event(&conv, "hello, changed", "k1", 6))
            .await
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(again.event, first.event);
        let next = store.append(event(&conv, "next", "k2", 7)).await.unwrap();
        assert_eq!(next.event.seq, 2);
        let elsewhere = store.append(event(&other, "hello", "k1", 8)).await.unwrap();
        assert!(!elsewhere.duplicate, "ids are per conversation");
        assert_eq!(elsewhere.event.seq, 1);
        assert_eq!(store.read(&conv, 0, 0).await.unwrap().len(), 2);
    }

    /// 100 concurrent appenders get seqs 1..=N with no gap and no repeat, in store order.
    pub async fn concurrent_appends(store: Arc<dyn HubStore>, tag: &str) {
        let conv = format!("{tag}-conc");
        store
            .new_conversation(&format!("{tag}-conc-p"), &conv, 1)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for w in 0..100 {
            let store = store.clone();
            let conv = conv.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..5 {
                    let out = store
                        .append(event(&conv, &format!("w{w}-{i}"), "", 1))
                        .await
                        .unwrap();
                    seqs.push(out.event.seq);
                }
                seqs
            }));
        }
        let mut seen = BTreeSet::new();
        for t in tasks {
            let seqs = t.await.unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
            for s in seqs {
                assert!(seen.insert(s), "seq {s} given twice");
            }
        }
        assert_eq!(seen, (1..=500).collect());
        let read = store.read(&conv, 0, 0).await.unwrap();
        assert_eq!(
            read.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=500).collect::<Vec<_>>()
        );
    }

    /// Concurrent retries of the same `client_msg_id` store it once and all get its seq.
    pub async fn concurrent_retries(store: Arc<dyn HubStore>, tag: &str) {
        let conv = format!("{tag}-retry");
        store
            .new_conversation(&format!("{tag}-retry-p"), &conv, 1)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for m in 0..10 {
            for _ in 0..10 {
                let store = store.clone();
                let conv = conv.clone();
                tasks.push(tokio::spawn(async move {
                    let out = store
                        .append(event(&conv, &format!("msg {m}"), &format!("id-{m}"), 1))
                        .await
                        .unwrap();
                    (m, out)
                }));
            }
        }
        let mut by_id = std::collections::BTreeMap::new();
        let mut firsts = 0;
        for t in tasks {
            let (m, out) = t.await.unwrap();
            firsts += usize::from(!out.duplicate);
            assert_eq!(out.event.content, format!("msg {m}"));
            let seq = *by_id.entry(m).or_insert(out.event.seq);
            assert_eq!(seq, out.event.seq, "retries of id-{m} got different seqs");
        }
        assert_eq!(firsts, 10, "each id stored once");
        let read = store.read(&conv, 0, 0).await.unwrap();
        assert_eq!(
            read.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
    }

    /// Bindings are set, replaced only when allowed, and listed per principal.
    pub async fn bindings(store: &dyn HubStore, tag: &str) {
        let a = format!("{tag}-bind-a");
        let b = format!("{tag}-bind-b");
        let bind = |platform: &str, user: &str, p: &str| Binding {
            platform: platform.into(),
            user_id: format!("{tag}-{user}"),
            principal: p.into(),
        };
        let set = |binding: Binding, replace: bool| async move {
            store.set_binding(&binding, replace).await.unwrap()
        };
        assert_eq!(
            set(bind("telegram", "1", &a), false).await,
            BindingOutcome::Set
        );
        assert_eq!(
            set(bind("slack", "U1", &a), false).await,
            BindingOutcome::Set
        );
        assert_eq!(
            set(bind("telegram", "2", &b), false).await,
            BindingOutcome::Set
        );
        // Setting the same binding again is fine; taking another's needs `replace_others`.
        assert_eq!(
            set(bind("telegram", "1", &a), false).await,
            BindingOutcome::Set
        );
        assert_eq!(
            set(bind("telegram", "1", &b), false).await,
            BindingOutcome::HeldBy(a.clone())
        );
        assert_eq!(
            store.list_bindings(Some(&a)).await.unwrap(),
            [bind("slack", "U1", &a), bind("telegram", "1", &a)]
        );
        assert_eq!(
            set(bind("telegram", "1", &b), true).await,
            BindingOutcome::Set
        );
        assert_eq!(
            store.list_bindings(Some(&b)).await.unwrap(),
            [bind("telegram", "1", &b), bind("telegram", "2", &b)]
        );
        let all = store.list_bindings(None).await.unwrap();
        for want in [bind("slack", "U1", &a), bind("telegram", "2", &b)] {
            assert!(all.contains(&want), "{want:?} missing from {all:?}");
        }
        assert!(
            all.windows(2)
                .all(|w| (&w[0].platform, &w[0].user_id) <= (&w[1].platform, &w[1].user_id))
        );
    }

    /// Conversations idle since before the cutoff go, with their events and active mark.
    pub async fn retention(store: &dyn HubStore, tag: &str) {
        let p = format!("{tag}-ret");
        let old = format!("{tag}-ret-old");
        let busy = format!("{tag}-ret-busy");
        let fresh = format!("{tag}-ret-fresh");
        store.new_conversation(&p, &busy, 100).await.unwrap();
        store
            .append(event(&busy, "recent", "", 5_000))
            .await
            .unwrap();
        store.new_conversation(&p, &old, 100).await.unwrap();
        store.append(event(&old, "old", "", 200)).await.unwrap();
        // Only conversations of this run count: other runs' data may be older.
        let deleted = store.delete_idle(1_000).await.unwrap();
        assert!(deleted >= 1, "{deleted}");
        assert_eq!(store.conversation(&old).await.unwrap(), None);
        assert!(store.read(&old, 0, 0).await.unwrap().is_empty());
        assert!(store.conversation(&busy).await.unwrap().is_some());
        assert_eq!(store.read(&busy, 0, 0).await.unwrap().len(), 1);
        // The deleted conversation was active: the principal has none until it makes one.
        assert_eq!(store.resolve_active(&p, None).await.unwrap(), None);
        let (c, created) = store
            .resolve_active(&p, Some((&fresh, 6_000)))
            .await
            .unwrap()
            .unwrap();
        assert!(created);
        assert_eq!(c.id, fresh);
    }
}
