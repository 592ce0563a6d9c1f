//! The shared-state seam: each kind of state the server keeps is behind one trait, with a `local`
//! backend (files, an embedded SQLite database) for a single server. A backend shared by several
//! replicas implements the same traits.
//!
//! Today the seam holds the conversation hub's store, [`HubStore`]; sessions, rate limits,
//! cooldowns and events get their traits here as they move behind it.

pub mod hub;
pub mod local;

pub use hub::{
    AppendOutcome, Binding, BindingOutcome, Conversation, HubStore, NewEvent, StoreError,
    StoredEvent,
};
