//! Sessions on the Redis state backend: the same JSON document as a session file, in a hash with a
//! version, so that every replica sees the same sessions and a write can be made conditional on
//! the version it read (compare-and-set in one Lua script): two replicas appending a turn to the
//! same session never lose one silently, the second one gets [`SessionError::Conflict`] and
//! re-reads. Key layout in [`crate::state::redis`].

use std::sync::{Arc, LazyLock};

use super::format::{self, Decoded};
use super::{SessionData, SessionError, validate_name};
use crate::state::redis::{RedisState, RedisStateError, hex};

/// KEYS[1] the session hash, KEYS[2] the principal's name set; ARGV[1] the expected version
/// (-1 = any), ARGV[2] the document, ARGV[3] the name. Returns the new version, or -1 when the
/// stored version is not the expected one (nothing written).
static SAVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
local want = tonumber(ARGV[1])
if want >= 0 and cur ~= want then return -1 end
redis.call('HSET', KEYS[1], 'v', cur + 1, 'data', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return cur + 1
",
    )
});

/// KEYS as for SAVE; ARGV[1] the name. Returns how many sessions were deleted (0 or 1).
static DELETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return n
",
    )
});

/// The sessions of every principal on one Redis.
#[derive(Debug, Clone)]
pub struct RedisSessions {
    state: Arc<RedisState>,
}

impl RedisSessions {
    pub fn new(state: Arc<RedisState>) -> Self {
        Self { state }
    }

    fn keys(&self, principal: &str, name: &str) -> (String, String) {
        let p = hex(principal);
        (
            self.state.key(&format!("session:{{{p}}}:{name}")),
            self.state.key(&format!("sessions:{{{p}}}")),
        )
    }

    pub async fn list(&self, principal: &str) -> Result<Vec<String>, SessionError> {
        let (_, index) = self.keys(principal, "");
        let mut names: Vec<String> = self
            .state
            .run("session_list", redis::cmd("SMEMBERS").arg(index).clone())
            .await
            .map_err(|e| unavailable("listing sessions", e))?;
        names.retain(|n| validate_name(n).is_ok());
        names.sort();
        Ok(names)
    }

    /// The session and its version.
    pub async fn load(
        &self,
        principal: &str,
        name: &str,
    ) -> Result<(SessionData, u64), SessionError> {
        validate_name(name)?;
        let (key, _) = self.keys(principal, name);
        let (version, bytes): (Option<u64>, Option<Vec<u8>>) = self
            .state
            .run(
                "session_load",
                redis::cmd("HMGET").arg(key).arg("v").arg("data").clone(),
            )
            .await
            .map_err(|e| unavailable(&format!("loading session '{name}'"), e))?;
        let (Some(version), Some(bytes)) = (version, bytes) else {
            return Err(SessionError::NotFound {
                name: name.to_owned(),
            });
        };
        match format::decode(&bytes) {
            Ok(Decoded::Object(data)) | Ok(Decoded::Legacy { data, .. }) => Ok((data, version)),
            Err(reason) => Err(SessionError::Corrupt {
                name: name.to_owned(),
                reason,
            }),
        }
    }

    /// Stores `data` as `name`; with `expected`, only when the stored version is that one (0 = the
    /// session must not exist yet), else [`SessionError::Conflict`]. Returns the new version.
    pub async fn save(
        &self,
        principal: &str,
        name: &str,
        data: &SessionData,
        expected: Option<u64>,
    ) -> Result<u64, SessionError> {
        validate_name(name)?;
        let bytes = format::encode(data).map_err(|e| SessionError::Io {
            action: format!("saving session '{name}'"),
            source: std::io::Error::other(e),
        })?;
        let (key, index) = self.keys(principal, name);
        let want = expected.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let mut inv = SAVE.key(key);
        inv.key(index).arg(want).arg(bytes).arg(name);
        let version: i64 = self
            .state
            .script("session_save", &inv)
            .await
            .map_err(|e| unavailable(&format!("saving session '{name}'"), e))?;
        u64::try_from(version).map_err(|_| SessionError::Conflict {
            name: name.to_owned(),
        })
    }

    pub async fn delete(&self, principal: &str, name: &str) -> Result<(), SessionError> {
        validate_name(name)?;
        let (key, index) = self.keys(principal, name);
        let mut inv = DELETE.key(key);
        inv.key(index).arg(name);
        let n: i64 = self
            .state
            .script("session_delete", &inv)
            .await
            .map_err(|e| unavailable(&format!("deleting session '{name}'"), e))?;
        match n {
            0 => Err(SessionError::NotFound {
                name: name.to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

fn unavailable(action: &str, e: RedisStateError) -> SessionError {
    SessionError::Unavailable {
        action: action.to_owned(),
        reason: e.to_string(),
    }
}
