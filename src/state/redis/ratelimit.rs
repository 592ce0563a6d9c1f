//! Rate-limit buckets on Redis: GCRA (the generic cell rate algorithm, what governor runs
//! locally) in one Lua script, so a check is one round trip and every replica charges the same
//! bucket. The time is Redis' own (`TIME`), so the replicas' clocks need not agree.

use std::sync::LazyLock;
use std::time::Duration;

use super::{RedisState, RedisStateError};

/// KEYS[1] the bucket; ARGV[1] the emission interval (µs per request), ARGV[2] the burst.
/// Returns 0 when the call is admitted (and charged), else the wait in µs until it would be.
static GCRA: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allow_at = tat - (burst - 1) * period
if now < allow_at then return allow_at - now end
local new_tat = tat + period
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return 0
",
    )
});

/// The outcome of one shared rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateCheck {
    /// Admitted and charged.
    Allowed,
    /// Refused; the wait until one more call would be admitted.
    Wait(Duration),
}

impl RedisState {
    /// Charges one call to the bucket `key` of limit (`period` per call, `burst` at once) shared by
    /// every replica.
    pub async fn rate_check(
        &self,
        key: &str,
        period: Duration,
        burst: u32,
    ) -> Result<RateCheck, RedisStateError> {
        let period_us = u64::try_from(period.as_micros()).unwrap_or(u64::MAX).max(1);
        let bucket = self.key(&format!("rl:{period_us}:{burst}:{{{}}}", super::hex(key)));
        let mut invocation = GCRA.key(bucket);
        invocation.arg(period_us).arg(burst);
        let wait_us: i64 = self.script("rate_limit", &invocation).await?;
        Ok(match u64::try_from(wait_us) {
            Ok(0) | Err(_) => RateCheck::Allowed,
            Ok(us) => RateCheck::Wait(Duration::from_micros(us)),
        })
    }
}
