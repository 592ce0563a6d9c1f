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
            .chat_history
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect())
    }

    /// The session, or a new empty one.
    async fn load(&self, g: &Gateway<'_>) -> Result<SessionData, Error> {
        g.count(SessionOperation::Load);
        match g.sessions.load(&self.namespace, &self.name).await {
            Ok(d) => Ok(d),
            Err(SessionError::NotFound { .. }) => Ok(SessionData::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends the prompt and `answer` to the session as it is now (another call may have added a
    /// turn meanwhile), under the session's lock.
    pub async fn save(
        self,
        g: &Gateway<'_>,
        locks: &SessionLocks,
        answer: String,
    ) -> Result<(), Error> {
        let lock = locks.get(&self.namespace, &self.name);
        let _held = lock.lock().await;
        let mut data = self.load(g).await?;
        data.chat_history.push(StoredMessage {
            role: "user".into(),
            content: self.prompt,
            meta: None,
        });
        data.chat_history.push(StoredMessage {
            role: "assistant".into(),
            content: answer,
            meta: None,
        });
        g.count(SessionOperation::Save);
        g.sessions
            .save(&self.namespace, &self.name, data)
            .await
            .map_err(|e| {
                tracing::warn!(session = %self.name, error = %e, "saving the session turn failed");
                e.into()
            })
    }
}

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
