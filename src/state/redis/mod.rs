//! The Redis backend of the state seam: one connection to the Redis server every replica shares
//! (`[state.redis]`), the key layout under `key_prefix`, and the health of that connection
//! (`chatcli_state_backend_up`, `chatcli_state_backend_errors_total{op}`).
//!
//! The connection is a [`ConnectionManager`]: multiplexed (one TCP connection carries every
//! concurrent command), created lazily, and re-established with exponential backoff after an I/O
//! error, so a Redis that goes away and comes back needs no restart. Each operation of a store is
//! one command or one Lua script, i.e. one round trip.
//!
//! Keys (every one starts with `key_prefix`, default `chatcli:`); `{…}` hash tags keep the keys
//! of one principal in one Redis Cluster slot, so a script may touch several of them:
//!
//! ```text
//! session:{<hex principal>}:<name>    hash {v: version, data: the session file's JSON}
//! sessions:{<hex principal>}          set of that principal's session names
//! rl:<period µs>:<burst>:{<key>}      GCRA: the bucket's theoretical arrival time (µs)
//! ```

mod ratelimit;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, RedisError};

use crate::config::{OnUnavailable, StateConfig};

pub use ratelimit::RateCheck;

/// Why a Redis operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisStateError {
    /// Redis could not be reached or did not answer in time (retryable: the connection is being
    /// re-established).
    #[error("the Redis state backend is unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error (a refused command, a script error, wrong credentials).
    #[error("the Redis state backend failed: {0}")]
    Failed(String),
}

/// The shared Redis connection and what the stores on it need (see the module docs).
pub struct RedisState {
    conn: ConnectionManager,
    prefix: String,
    on_unavailable: OnUnavailable,
    required: bool,
    up: AtomicBool,
    metrics: Option<StateMetrics>,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("prefix", &self.prefix)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish()
    }
}

/// `chatcli_state_backend_up` and `chatcli_state_backend_errors_total{op}`.
#[derive(Debug, Clone)]
struct StateMetrics {
    up: IntGauge,
    errors: IntCounterVec,
}

impl RedisState {
    /// Prepares the connection of `state` (`backend = "redis"`) without connecting: the first
    /// command connects. The errors are config problems (they name the setting): a URL that does
    /// not parse, a password file that cannot be read, a CA file that cannot be read. Needs a
    /// Tokio runtime.
    pub fn new(state: &StateConfig, registry: Option<&Registry>) -> Result<Arc<Self>, String> {
        let r = &state.redis;
        if !r.sentinels.is_empty() || r.master_name.is_some() {
            return Err(
                "state.redis.sentinels: Redis Sentinel is not supported by this build yet; \
                 point state.redis.url at the master"
                    .into(),
            );
        }
        let url = r.url.as_deref().unwrap_or_default();
        if url.contains(',') {
            return Err(
                "state.redis.url: Redis Cluster (several URLs) is not supported by this build yet"
                    .into(),
            );
        }
        let mut info = url
            .into_connection_info()
            .map_err(|_| "state.redis.url: not a redis:// or rediss:// URL".to_string())?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = r.username.as_deref().filter(|u| !u.is_empty()) {
            settings = settings.set_username(user);
        }
        if let Some(file) = &r.password_file {
            let path = crate::config::credential_path(
                file,
                crate::config::credentials_directory().as_deref(),
            );
            let password = crate::config::read_credential(&path)
                .map_err(|e| format!("state.redis.password_file: {e}"))?;
            settings = settings.set_password(password);
        }
        info = info.set_redis_settings(settings);
        let client = match &r.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| {
                    format!("state.redis.ca_file: cannot read {}: {e}", ca.display())
                })?;
                Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => Client::open(info),
        }
        .map_err(|e| format!("state.redis.url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(r.connect_timeout))
            .set_response_timeout(Some(r.response_timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(5))
            .set_number_of_retries(6);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("state.redis.url: {e}"))?;
        let metrics = match registry {
            Some(reg) => Some(StateMetrics::register(reg).map_err(|e| format!("metrics: {e}"))?),
            None => None,
        };
        Ok(Arc::new(Self {
            conn,
            prefix: r.key_prefix.clone(),
            on_unavailable: state.on_unavailable,
            required: state.required,
            up: AtomicBool::new(false),
            metrics,
        }))
    }

    /// Checks the connection with `PING` (connecting if needed); an answer marks the backend up.
    pub async fn ping(&self) -> Result<(), RedisStateError> {
        self.run::<String>("ping", redis::cmd("PING"))
            .await
            .map(drop)
    }

    /// Whether the last command reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// `[state] required`.
    pub fn required(&self) -> bool {
        self.required
    }

    /// `[state] on_unavailable`.
    pub fn on_unavailable(&self) -> OnUnavailable {
        self.on_unavailable
    }

    /// `key_prefix` followed by `rest`.
    pub fn key(&self, rest: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + rest.len());
        k.push_str(&self.prefix);
        k.push_str(rest);
        k
    }

    /// A clone of the multiplexed connection (cheap: a handle).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs `cmd`, recording the outcome under `op`.
    pub async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: redis::Cmd,
    ) -> Result<T, RedisStateError> {
        let mut conn = self.conn();
        let out = cmd.query_async(&mut conn).await;
        self.outcome(op, out)
    }

    /// Runs `invocation` of a script, recording the outcome under `op`.
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisStateError> {
        let mut conn = self.conn();
        let out = invocation.invoke_async(&mut conn).await;
        self.outcome(op, out)
    }

    /// Maps a command's result into the state backend's error, keeping `up` and the metrics.
    pub fn outcome<T>(
        &self,
        op: &'static str,
        out: Result<T, RedisError>,
    ) -> Result<T, RedisStateError> {
        match out {
            Ok(v) => {
                self.set_up(true);
                Ok(v)
            }
            Err(e) => {
                if let Some(m) = &self.metrics {
                    m.errors.with_label_values(&[op]).inc();
                }
                let unreachable = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal();
                if unreachable {
                    if self.up.swap(false, Ordering::Relaxed) {
                        tracing::warn!(op, error = %e, "lost the Redis state backend; reconnecting with backoff");
                    }
                    if let Some(m) = &self.metrics {
                        m.up.set(0);
                    }
                    Err(RedisStateError::Unavailable(e.to_string()))
                } else {
                    tracing::warn!(op, error = %e, "the Redis state backend refused a command");
                    Err(RedisStateError::Failed(e.to_string()))
                }
            }
        }
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            match up {
                true => tracing::info!("the Redis state backend is reachable"),
                false => tracing::warn!("the Redis state backend is unreachable"),
            }
            if let Some(m) = &self.metrics {
                m.up.set(i64::from(up));
            }
        }
    }
}

impl StateMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let up = IntGauge::new(
            "chatcli_state_backend_up",
            "1 while the shared state backend (Redis) answers, else 0",
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "chatcli_state_backend_errors_total",
                "Operations on the shared state backend (Redis) that failed, by operation",
            ),
            &["op"],
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Self { up, errors })
    }
}

/// Lowercase hex of `s`'s bytes: a principal inside a key, unable to contain `{`, `}` or `:`.
pub fn hex(s: &str) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.as_bytes() {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
