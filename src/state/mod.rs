//! The shared-state seam: each kind of state the server keeps is behind one trait, with a `local`
//! backend (files, an embedded SQLite database) for a single server. A backend shared by several
//! replicas implements the same traits.
//!
//! The seam holds the conversation hub's store, [`HubStore`]. With `[state] backend = "redis"`
//! the [`redis`] module's connection also carries the sessions
//! ([`crate::sessions::RedisSessions`]) and the rate-limit buckets; with the default `local`
//! backend none of its code runs.

pub mod hub;
pub mod local;
pub mod redis;

pub use hub::{
    AppendOutcome, Binding, BindingOutcome, Conversation, HubStore, NewEvent, StoreError,
    StoredEvent,
};
