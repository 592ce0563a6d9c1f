//! The bus behind `GET /updates`: every event of a `/request` call (deltas, completion, error) is
//! published here, tagged with the caller, and each subscriber sees the events of its own principal
//! (admins see everyone's).
//!
//! The bus is a tokio `broadcast` ring of [`EventBus::new`]'s capacity: publishing never waits, and
//! a subscriber that falls that far behind (a slow reader whose socket stopped draining) gets one
//! [`Received::Dropped`] and is closed, so a slow reader costs only itself.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::auth::Principal;

/// Events one subscriber may fall behind before it is dropped.
pub const DEFAULT_CAPACITY: usize = 1024;

/// One event of one call, as `/updates` sends it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Update {
    /// `delta`, `response_complete` or `error`, as in the `/request` stream.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The event's payload, as in the `/request` stream.
    pub data: serde_json::Value,
    /// The call it belongs to.
    pub request_id: String,
    /// The caller's principal id.
    pub principal: String,
    /// Whose event this is ([`owner_key`]); not sent.
    #[serde(skip)]
    pub owner: String,
}

/// The key that tells principals apart ([`Principal::qualified_id`]): the method keeps a JWT `sub`
/// from matching a token name, the tenant keeps one tenant's `sub` from matching another's.
pub fn owner_key(p: &Principal) -> String {
    p.qualified_id()
}

/// Which events a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everyone's (admins).
    All,
    /// Those whose [`Update::owner`] is this key.
    Owner(String),
}

impl Scope {
    /// The scope of `p`: everything for admins, else its own events.
    pub fn of(p: &Principal) -> Self {
        match p.role {
            crate::auth::Role::Admin => Self::All,
            _ => Self::Owner(owner_key(p)),
        }
    }

    fn admits(&self, u: &Update) -> bool {
        match self {
            Self::All => true,
            Self::Owner(k) => *k == u.owner,
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Update>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl EventBus {
    /// A bus whose subscribers may fall `capacity` events behind.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// Sends `update` to every subscriber; never waits (nobody listening is fine).
    pub fn publish(&self, update: Update) {
        let _ = self.tx.send(Arc::new(update));
    }

    /// A new subscription: events published from now on, filtered by `scope`.
    pub fn subscribe(&self, scope: Scope) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            scope,
        }
    }

    /// How many subscriptions are open.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum Received {
    /// An event in scope.
    Update(Arc<Update>),
    /// The subscriber fell behind by this many events; the subscription is over.
    Dropped {
        /// Events it missed.
        missed: u64,
    },
}

/// One subscriber's view of the bus.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Update>>,
    scope: Scope,
}

impl Subscription {
    /// The next event in scope; `None` once the bus is gone or after [`Received::Dropped`].
    pub async fn next(&mut self) -> Option<Received> {
        loop {
            match self.rx.recv().await {
                Ok(u) if self.scope.admits(&u) => return Some(Received::Update(u)),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Close our receiver, so the next call ends the subscription.
                    self.rx = broadcast::channel(1).1;
                    return Some(Received::Dropped { missed });
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn update(owner: &str, n: u64) -> Update {
        Update {
            kind: "delta",
            data: serde_json::json!({ "delta": n.to_string() }),
            request_id: format!("r{n}"),
            principal: owner.into(),
            owner: owner.into(),
        }
    }

    #[tokio::test]
    async fn subscribers_see_their_own_events_and_admins_all() {
        let bus = EventBus::new(16);
        let mut alice = bus.subscribe(Scope::Owner("alice".into()));
        let mut admin = bus.subscribe(Scope::All);
        bus.publish(update("bob", 1));
        bus.publish(update("alice", 2));
        match alice.next().await {
            Some(Received::Update(u)) => assert_eq!(u.request_id, "r2"),
            other => panic!("{other:?}"),
        }
        for want in ["r1", "r2"] {
            match admin.next().await {
                Some(Received::Update(u)) => assert_eq!(u.request_id, want),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(bus.subscribers(), 2);
        drop(alice);
        assert_eq!(bus.subscribers(), 1);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_dropped_once_and_ends_without_slowing_others() {
        let bus = EventBus::new(4);
        let mut slow = bus.subscribe(Scope::All);
        let mut fast = bus.subscribe(Scope::All);
        for n in 0..10 {
            bus.publish(update("a", n));
            match fast.next().await {
                Some(Received::Update(u)) => assert_eq!(u.request_id, format!("r{n}")),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            slow.next().await,
            Some(Received::Dropped { missed: 6 })
        ));
        assert!(slow.next().await.is_none());
    }

    #[test]
    fn the_wire_shape_leaves_the_owner_key_out() {
        let v = serde_json::to_value(update("token:alice", 1)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "delta", "data": {"delta": "1"}, "request_id": "r1", "principal": "token:alice"})
        );
    }
}
