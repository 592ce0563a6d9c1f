//! Saved sessions as use cases: list, load, save and delete in the caller's namespace (writes need
//! a role that may write), and a prompt's session turn ([`SessionTurn`]): the session's history
//! before the call, and the new user and assistant turns appended once the answer is complete.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Error, Gateway, require_write};
use crate::auth::Principal;
use crate::llm::Message;
use crate::sessions::{SessionData, SessionError, StoredMessage};
use crate::telemetry::SessionOperation;

/// A session's lock, held while its turn is appended.
type SessionLock = Arc<tokio::sync::Mutex<()>>;

/// One lock per (namespace, session) so that concurrent calls on a session append both turns.
#[derive(Debug, Default)]
pub struct SessionLocks {
    inner: Mutex<HashMap<(String, String), SessionLock>>,
}

impl SessionLocks {
    fn get(&self, ns: &str, name: &str) -> SessionLock {
        let mut map = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget locks nobody holds, so the map stays as small as the calls in flight.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry((ns.to_string(), name.to_string()))
            .or_default()
            .clone()
    }
}

/// The session a prompt continues, and the prompt to append to it.
#[derive(Debug)]
pub struct SessionTurn {
    namespace: String,
    name: String,
    prompt: String,
}

impl SessionTurn {
    pub(super) fn new(namespace: String, name: String, prompt: String) -> Self {
        Self {
            namespace,
            name,
            prompt,
        }
    }

    /// The session's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session's chat history (empty for a new session).
    pub(super) async fn history(&self, g: &Gateway<'_>) -> Result<Vec<Message>, Error> {
        Ok(self
            .load(g)
            .await?
            .0
            .chat_history
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect())
    }

    /// The session, or a new empty one, with its version.
    async fn load(&self, g: &Gateway<'_>) -> Result<(SessionData, u64), Error> {
        g.count(SessionOperation::Load);
        match g.sessions.load_versioned(&self.namespace, &self.name).await {
            Ok(d) => Ok(d),
            Err(SessionError::NotFound { .. }) => Ok((SessionData::default(), 0)),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends the prompt and `answer` to the session as it is now (another call may have added a
    /// turn meanwhile), under the session's lock. With the shared (Redis) store, a call on another
    /// replica may save in between: the write is conditional on the version read, and a conflict
    /// re-reads and appends again, up to `TURN_SAVE_ATTEMPTS` times, then answers
    /// `session_conflict`; a turn is never dropped silently.
    pub async fn save(
        self,
        g: &Gateway<'_>,
        locks: &SessionLocks,
        answer: String,
    ) -> Result<(), Error> {
        let lock = locks.get(&self.namespace, &self.name);
        let _held = lock.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut data, version) = self.load(g).await?;
            data.chat_history.push(StoredMessage {
                role: "user".into(),
                content: self.prompt.clone(),
                meta: None,
            });
            data.chat_history.push(StoredMessage {
                role: "assistant".into(),
                content: answer.clone(),
                meta: None,
            });
            g.count(SessionOperation::Save);
            match g
                .sessions
                .save_if(&self.namespace, &self.name, data, version)
                .await
            {
                Ok(()) => return Ok(()),
                Err(SessionError::Conflict { .. }) if attempt < TURN_SAVE_ATTEMPTS => {
                    tracing::debug!(session = %self.name, attempt, "session changed meanwhile; appending the turn again");
                }
                Err(e) => {
                    tracing::warn!(session = %self.name, error = %e, "saving the session turn failed");
                    return Err(e.into());
                }
            }
        }
    }
}

/// How often a session turn is re-read and appended again when another replica saved the session
/// in between, before the call answers `session_conflict`.
pub const TURN_SAVE_ATTEMPTS: u32 = 8;

impl Gateway<'_> {
    fn count(&self, op: SessionOperation) {
        if let Some(m) = self.metrics {
            m.session_operation(op);
        }
    }

    /// The names of `who`'s sessions.
    pub async fn list_sessions(&self, who: &Principal) -> Result<Vec<String>, Error> {
        self.count(SessionOperation::List);
        Ok(self.sessions.list(&who.session_namespace()).await?)
    }

    /// `who`'s session `name`.
    pub async fn load_session(&self, who: &Principal, name: &str) -> Result<SessionData, Error> {
        self.count(SessionOperation::Load);
        Ok(self.sessions.load(&who.session_namespace(), name).await?)
    }

    /// Saves `data` as `who`'s session `name` (readonly principals may not).
    pub async fn save_session(
        &self,
        who: &Principal,
        name: &str,
        data: SessionData,
    ) -> Result<(), Error> {
        self.count(SessionOperation::Save);
        require_write(who, "write sessions")?;
        Ok(self
            .sessions
            .save(&who.session_namespace(), name, data)
            .await?)
    }

    /// Deletes `who`'s session `name` (readonly principals may not).
    pub async fn delete_session(&self, who: &Principal, name: &str) -> Result<(), Error> {
        self.count(SessionOperation::Delete);
        require_write(who, "delete sessions")?;
        Ok(self.sessions.delete(&who.session_namespace(), name).await?)
    }
}
