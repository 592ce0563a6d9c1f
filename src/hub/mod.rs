//! The conversation hub: several front ends (a terminal, a chat-platform bridge, a web page) share
//! one conversation per principal. Events are appended with a per-conversation `seq`, read back
//! from any point and followed live; chat-platform users are bound to principals.
//!
//! [`Hub`] applies the rules (who acts for whom, [`principal`]; bounds on what is stored) over a
//! [`HubStore`] from the state seam, and fans appended events out to the subscribers of their
//! conversation ([`live`]). It knows no transport: the gRPC codec converts to and from it and maps
//! [`HubError`] to a status.

pub mod live;
pub mod principal;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;

pub use principal::Caller;

use crate::config::{HubConfig, LimitsConfig};
use crate::state::{Binding, BindingOutcome, HubStore, NewEvent, StoreError, StoredEvent};
use crate::telemetry::HubMetrics;

/// Why a hub operation failed. [`HubError::code`] is its stable machine-readable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The hub is turned off.
    #[error(
        "the conversation hub is disabled on this server; turn it on with `[hub] enabled = true` or CHATCLI_HUB_ENABLED=true and restart"
    )]
    Disabled,
    /// The store cannot be opened or reached; the message says why.
    #[error("the conversation hub is unavailable: {0}")]
    Unavailable(String),
    /// The caller has no subject to act as.
    #[error("the conversation hub needs an authenticated caller")]
    Unauthenticated,
    /// The caller may not do this; the message says why.
    #[error("{0}")]
    PermissionDenied(String),
    /// A request field is missing or out of bounds; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// No conversation has this id.
    #[error("conversation {0} not found")]
    ConversationNotFound(String),
    /// A subscriber fell further behind the live events than the tail buffer holds.
    #[error(
        "subscriber fell {behind} events behind the live tail (hub.tail_buffer = {tail_buffer}); read from seq {last_seq} and subscribe again"
    )]
    SubscriberLagged {
        /// Events it missed.
        behind: u64,
        /// The last seq it was sent.
        last_seq: i64,
        /// The tail buffer's size.
        tail_buffer: usize,
    },
    /// The store failed an operation; the message says how.
    #[error("the conversation hub store failed: {0}")]
    Store(String),
}

impl HubError {
    /// The stable snake_case name of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Disabled => "hub_disabled",
            Self::Unavailable(_) => "hub_unavailable",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::ConversationNotFound(_) => "conversation_not_found",
            Self::SubscriberLagged { .. } => "subscriber_lagged",
            Self::Store(_) => "hub_store_failed",
        }
    }
}

impl From<StoreError> for HubError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ConversationNotFound(id) => Self::ConversationNotFound(id),
            StoreError::Backend(why) => Self::Store(why),
        }
    }
}

/// The bounds on what one call may store (from `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubLimits {
    /// Largest event content, in bytes.
    pub max_content_bytes: usize,
    /// Longest channel, role, client_msg_id, platform, user_id or principal, in bytes.
    pub max_field_bytes: usize,
}

impl From<&LimitsConfig> for HubLimits {
    fn from(l: &LimitsConfig) -> Self {
        Self {
            max_content_bytes: l.hub_max_content_bytes,
            max_field_bytes: l.hub_max_field_bytes,
        }
    }
}

/// The roles an event may have.
pub const EVENT_ROLES: &[&str] = &["user", "assistant", "tool_summary", "checkpoint"];

/// An event to append.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendRequest {
    /// The conversation.
    pub conv_id: String,
    /// The front end writing it.
    pub channel: String,
    /// One of [`EVENT_ROLES`].
    pub role: String,
    /// The text.
    pub content: String,
    /// Idempotency key; empty = none.
    pub client_msg_id: String,
}

/// A subscriber's events: the backlog, then live ones; ends on drain.
pub type EventStream = BoxStream<'static, Result<StoredEvent, HubError>>;

/// Events read per store call while sending a subscriber its backlog.
const BACKLOG_PAGE: usize = 500;

/// Conversation owners remembered; past this many the memory starts over.
const OWNERS_MAX: usize = 100_000;

/// How the store is reached.
enum Backend {
    /// Turned off.
    Disabled,
    /// The SQLite database at this path, opened on first use.
    Sqlite(PathBuf),
}

/// See the module docs.
pub struct Hub {
    backend: Backend,
    store: tokio::sync::OnceCell<Arc<dyn HubStore>>,
    live: live::Live,
    tail_buffer: usize,
    metrics: Option<HubMetrics>,
    drain: CancellationToken,
    /// The principal of each conversation seen (a conversation never changes hands), so a call
    /// on a known conversation checks its owner without a store read; forgotten when retention
    /// deletes conversations.
    owners: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Disabled => "disabled".to_string(),
            Backend::Sqlite(p) => format!("sqlite {}", p.display()),
        };
        f.debug_struct("Hub")
            .field("backend", &backend)
            .field("tail_buffer", &self.tail_buffer)
            .finish()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), HubError> {
    match value.len() > max {
        true => Err(HubError::InvalidArgument(format!(
            "{field} is {} bytes, more than the {max} allowed",
            value.len()
        ))),
        false => Ok(()),
    }
}

fn required(field: &str, value: &str) -> Result<(), HubError> {
    match value.is_empty() {
        true => Err(HubError::InvalidArgument(format!("{field} is required"))),
        false => Ok(()),
    }
}

impl Hub {
    /// The hub `config` describes, its SQLite database at `db` opened on first use (see
    /// [`Hub::open`]); `metrics` when the server has metrics.
    pub fn new(config: &HubConfig, db: PathBuf, metrics: Option<HubMetrics>) -> Self {
        let backend = match config.enabled {
            true => Backend::Sqlite(db),
            false => Backend::Disabled,
        };
        Self::build(backend, config.tail_buffer, metrics)
    }

    /// A hub over a store that is already open.
    pub fn with_store(
        store: Arc<dyn HubStore>,
        tail_buffer: usize,
        metrics: Option<HubMetrics>,
    ) -> Self {
        let hub = Self::build(Backend::Sqlite(PathBuf::new()), tail_buffer, metrics);
        let _ = hub.store.set(store);
        hub
    }

    fn build(backend: Backend, tail_buffer: usize, metrics: Option<HubMetrics>) -> Self {
        let tail_buffer = tail_buffer.max(1);
        Self {
            backend,
            store: tokio::sync::OnceCell::new(),
            live: live::Live::new(tail_buffer),
            tail_buffer,
            metrics,
            drain: CancellationToken::new(),
            owners: Default::default(),
        }
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the hub is turned on.
    pub fn enabled(&self) -> bool {
        !matches!(self.backend, Backend::Disabled)
    }

    /// Opens the store now; a failure is returned and the next call tries again.
    pub async fn open(&self) -> Result<(), HubError> {
        self.store().await.map(|_| ())
    }

    /// Opens the store now when its database exists (the server does at start, so a damaged or
    /// unreadable database is reported before the first call, and retention applies to it); a
    /// server whose hub is never used writes no database. Returns whether the store is open.
    pub async fn open_existing(&self) -> Result<bool, HubError> {
        if self.store.get().is_some() {
            return Ok(true);
        }
        match &self.backend {
            Backend::Sqlite(path) if path.exists() => self.open().await.map(|()| true),
            _ => Ok(false),
        }
    }

    async fn store(&self) -> Result<Arc<dyn HubStore>, HubError> {
        let path = match &self.backend {
            Backend::Disabled => return Err(HubError::Disabled),
            Backend::Sqlite(p) => p.clone(),
        };
        self.store
            .get_or_try_init(|| async move {
                let opened = tokio::task::spawn_blocking(move || {
                    crate::state::local::SqliteHubStore::open(&path)
                })
                .await
                .map_err(|e| HubError::Unavailable(format!("opening the store failed: {e}")))?;
                let store = opened.map_err(|e| HubError::Unavailable(e.to_string()))?;
                tracing::info!(db = %store.path().display(), "conversation hub store open");
                Ok::<Arc<dyn HubStore>, HubError>(Arc::new(store))
            })
            .await
            .cloned()
    }

    /// Ends every subscriber's stream (cleanly) and refuses new subscriptions: the server drains.
    pub fn drain(&self) {
        self.drain.cancel();
    }

    /// `ResolveActiveConversation`: the principal's active conversation, created when it has none
    /// (a readonly caller is not allowed to create one). Returns (conv_id, principal).
    pub async fn resolve_active(
        &self,
        caller: &Caller,
        principal: &str,
    ) -> Result<(String, String), HubError> {
        let store = self.store().await?;
        let principal = caller.resolve(principal)?;
        let id = uuid::Uuid::new_v4().to_string();
        let create = caller.can_write.then_some((id.as_str(), now_ms()));
        match store.resolve_active(&principal, create).await? {
            Some((conv, created)) => {
                if created {
                    tracing::debug!(conv_id = %conv.id, principal = %principal, "hub conversation created");
                }
                Ok((conv.id, principal))
            }
            None => Err(HubError::PermissionDenied(format!(
                "principal `{principal}` has no active conversation, and readonly principals cannot create one"
            ))),
        }
    }

    /// `NewConversation`: a new conversation, made the principal's active one.
    pub async fn new_conversation(
        &self,
        caller: &Caller,
        principal: &str,
    ) -> Result<String, HubError> {
        let store = self.store().await?;
        let principal = caller.resolve(principal)?;
        caller.require_write("create conversations")?;
        let id = uuid::Uuid::new_v4().to_string();
        let conv = store.new_conversation(&principal, &id, now_ms()).await?;
        Ok(conv.id)
    }

    /// The conversation `conv_id`, when the caller may see it.
    async fn owned(
        &self,
        store: &dyn HubStore,
        caller: &Caller,
        conv_id: &str,
    ) -> Result<(), HubError> {
        required("conv_id", conv_id)?;
        let known = self.owners().get(conv_id).cloned();
        let owner = match known {
            Some(owner) => owner,
            None => {
                let conv = store
                    .conversation(conv_id)
                    .await?
                    .ok_or_else(|| HubError::ConversationNotFound(conv_id.to_string()))?;
                let mut owners = self.owners();
                if owners.len() >= OWNERS_MAX {
                    owners.clear();
                }
                owners.insert(conv.id, conv.principal.clone());
                conv.principal
            }
        };
        caller.check_owned_by(conv_id, &owner)
    }

    /// `AppendEvent`: stores the event with the next seq of its conversation (or, for a repeated
    /// `client_msg_id`, returns the first event with it) and sends it to the subscribers.
    pub async fn append(
        &self,
        caller: &Caller,
        limits: HubLimits,
        req: AppendRequest,
    ) -> Result<StoredEvent, HubError> {
        let store = self.store().await?;
        caller.require_write("append events")?;
        required("conv_id", &req.conv_id)?;
        required("role", &req.role)?;
        if !EVENT_ROLES.contains(&req.role.as_str()) {
            return Err(HubError::InvalidArgument(format!(
                "role `{}` is not one of {}",
                req.role.escape_debug(),
                EVENT_ROLES.join(", ")
            )));
        }
        check_len("channel", &req.channel, limits.max_field_bytes)?;
        check_len("client_msg_id", &req.client_msg_id, limits.max_field_bytes)?;
        check_len("content", &req.content, limits.max_content_bytes)?;
        self.owned(&*store, caller, &req.conv_id).await?;
        let out = store
            .append(NewEvent {
                conv_id: req.conv_id,
                channel: req.channel,
                role: req.role,
                content: req.content,
                client_msg_id: req.client_msg_id,
                ts: now_ms(),
            })
            .await?;
        if !out.duplicate {
            if let Some(m) = &self.metrics {
                m.events_appended.inc();
            }
            self.live.publish(&out.event);
        }
        Ok(out.event)
    }

    /// `ReadConversation`: events after `since_seq`, at most `limit` (0 = all).
    pub async fn read(
        &self,
        caller: &Caller,
        conv_id: &str,
        since_seq: i64,
        limit: i32,
    ) -> Result<Vec<StoredEvent>, HubError> {
        let store = self.store().await?;
        if since_seq < 0 {
            return Err(HubError::InvalidArgument(format!(
                "since_seq is {since_seq}; it must be 0 or more"
            )));
        }
        let limit = usize::try_from(limit).map_err(|_| {
            HubError::InvalidArgument(format!("limit is {limit}; it must be 0 (all) or more"))
        })?;
        self.owned(&*store, caller, conv_id).await?;
        Ok(store.read(conv_id, since_seq, limit).await?)
    }

    /// `SubscribeConversation`: the events after `since_seq`, then the live ones as they are
    /// appended, in seq order with no gap and no repeat. Ends with
    /// [`HubError::SubscriberLagged`] when the subscriber falls more than the tail buffer behind,
    /// and cleanly when the server drains.
    pub async fn subscribe(
        self: &Arc<Self>,
        caller: &Caller,
        conv_id: &str,
        since_seq: i64,
    ) -> Result<EventStream, HubError> {
        let store = self.store().await?;
        if since_seq < 0 {
            return Err(HubError::InvalidArgument(format!(
                "since_seq is {since_seq}; it must be 0 or more"
            )));
        }
        self.owned(&*store, caller, conv_id).await?;
        Ok(live::follow(
            self.clone(),
            store,
            conv_id.to_string(),
            since_seq,
        ))
    }

    /// `SetBinding`: binds (platform, user_id) to a principal. A non-admin binds only to itself,
    /// and cannot take a (platform, user_id) bound to someone else.
    pub async fn set_binding(
        &self,
        caller: &Caller,
        limits: HubLimits,
        binding: Binding,
    ) -> Result<(), HubError> {
        let store = self.store().await?;
        required("platform", &binding.platform)?;
        required("user_id", &binding.user_id)?;
        required("principal", &binding.principal)?;
        check_len("platform", &binding.platform, limits.max_field_bytes)?;
        check_len("user_id", &binding.user_id, limits.max_field_bytes)?;
        check_len("principal", &binding.principal, limits.max_field_bytes)?;
        let principal = caller.resolve(&binding.principal)?;
        caller.require_write("set bindings")?;
        let binding = Binding {
            principal,
            ..binding
        };
        match store.set_binding(&binding, caller.admin).await? {
            BindingOutcome::Set => Ok(()),
            BindingOutcome::HeldBy(_) => Err(HubError::PermissionDenied(format!(
                "{}/{} is bound to another principal; only admins can rebind it",
                binding.platform, binding.user_id
            ))),
        }
    }

    /// `ListBindings`: the bindings of a principal (empty = the caller's own, or all of them for
    /// an admin).
    pub async fn list_bindings(
        &self,
        caller: &Caller,
        principal: &str,
    ) -> Result<Vec<Binding>, HubError> {
        let store = self.store().await?;
        if principal.is_empty() && caller.admin {
            return Ok(store.list_bindings(None).await?);
        }
        let principal = caller.resolve(principal)?;
        Ok(store.list_bindings(Some(&principal)).await?)
    }

    /// One housekeeping pass: deletes the conversations idle for `retention_days` (0 = keep) and
    /// updates the store size metric. Does nothing while there is no database.
    pub async fn housekeeping(&self, retention_days: u32) {
        if let Err(e) = self.open_existing().await {
            tracing::warn!("hub housekeeping: {e}");
            return;
        }
        let Some(store) = self.store.get() else {
            return;
        };
        if retention_days > 0 {
            let cutoff = now_ms().saturating_sub(i64::from(retention_days) * 86_400_000);
            match store.delete_idle(cutoff).await {
                Ok(0) => {}
                Ok(n) => {
                    self.owners().clear();
                    tracing::info!(
                        deleted = n,
                        retention_days,
                        "hub: deleted conversations idle for longer than the retention"
                    )
                }
                Err(e) => tracing::warn!("hub: retention sweep failed: {e}"),
            }
        }
        if let Some(m) = &self.metrics {
            match store.size_bytes().await {
                Ok(bytes) => m.store_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX)),
                Err(e) => tracing::warn!("hub: store size unknown: {e}"),
            }
        }
    }

    /// Runs [`Hub::housekeeping`] now and every `every`, with the retention `retention_days`
    /// reads at each pass (so a reload applies), until the hub drains.
    pub fn spawn_housekeeping(
        self: &Arc<Self>,
        every: Duration,
        retention_days: impl Fn() -> u32 + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = hub.drain.cancelled() => break,
                    _ = tick.tick() => hub.housekeeping(retention_days()).await,
                }
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
