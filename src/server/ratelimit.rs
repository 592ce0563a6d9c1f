//! Request throttling keyed by who is calling, never by the connection: per-principal request rates
//! ([`RateLimits`], with the limits of one config in a [`RatePlan`]), the failed-authentication
//! limiter keyed by client IP ([`AuthFailureLimiter`]) and the per-principal cap on concurrent
//! streams ([`StreamCaps`]). All three are live state of the server, kept across config reloads:
//! a reload hands them their new limits and they keep what callers have spent.
//!
//! The request limiter runs after authentication and is keyed by principal, so callers sharing an
//! address (a NAT) never throttle each other; its retry-after is read from the bucket and rounded
//! up to whole seconds (at least 1), and only failed authentications consume the IP limiter.
//!
//! Memory stays bounded without a timer: every [`HOUSEKEEPING_EVERY`] calls to
//! [`RateLimits::check_as`] or [`AuthFailureLimiter::record_failure`] drop the keys whose bucket is
//! full again (governor's `retain_recent`). `housekeeping()` does the same on demand (e.g. from a
//! once-a-minute task); [`StreamCaps`] removes a principal's entry when its last stream ends.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use prometheus::{IntCounter, Registry};

use crate::auth::{AuthMethod, Principal, Role};
use crate::config::LimitsConfig;

/// Calls between two automatic clean-ups of stale keys. A clean-up walks every key, so it is not
/// done per call; between two of them at most this many new keys can pile up.
pub const HOUSEKEEPING_EVERY: u64 = 4096;

/// Refilling a whole burst may take at most this long: governor counts time in `u64` nanoseconds
/// (about 584 years) and multiplies the period by the burst without overflow checks in release.
const MAX_BURST_WINDOW: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

type PrincipalLimiter<C> =
    RateLimiter<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type IpLimiter<C> =
    RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, C, StateInformationMiddleware>;

const ROLES: [Role; 3] = [Role::Admin, Role::User, Role::ReadOnly];

fn role_slot(role: Role) -> usize {
    match role {
        Role::Admin => 0,
        Role::User => 1,
        Role::ReadOnly => 2,
    }
}

/// A wait rounded up to whole seconds, at least one: `Retry-After` has second resolution, and
/// rounding down would tell a client to retry before the bucket has a token (or to retry at once,
/// with "0").
pub(crate) fn whole_seconds(wait: Duration) -> Duration {
    let secs = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    Duration::from_secs(secs.max(1))
}

/// True on every [`HOUSEKEEPING_EVERY`]-th call counted by `counter`.
fn due(counter: &AtomicU64) -> bool {
    counter.fetch_add(1, Ordering::Relaxed) % HOUSEKEEPING_EVERY == HOUSEKEEPING_EVERY - 1
}

/// One bucket size: one request per `period`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Limit {
    period: Duration,
    burst: NonZeroU32,
}

impl Limit {
    fn quota(self) -> Quota {
        // `period` is non-zero (checked by `period_of`), so `with_period` cannot refuse it.
        Quota::with_period(self.period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(self.burst)
    }
}

/// Which limit applies to whom, resolved from one config: per role (the role's override in
/// `limits.roles`, else the default rps/burst) and per named token and role of its caller (the
/// token entry's override, else the role's), field by field, so a token that sets only its burst
/// keeps its role's rate. Part of the config snapshot; the buckets themselves are
/// [`RateLimits`], which outlive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatePlan {
    by_role: [Limit; 3],
    /// Only the tokens that override a field.
    by_token: HashMap<String, [Limit; 3]>,
}

/// One rps/burst pair being resolved, with the keys that name each field in errors.
struct Setting<'a> {
    rps: Option<f64>,
    rps_key: &'a str,
    burst: Option<u32>,
    burst_key: &'a str,
}

/// Checks one setting's fields, pushing an error naming each bad one.
fn check_setting(s: &Setting<'_>, errors: &mut Vec<String>) {
    if let Some(rps) = s.rps {
        if !(rps.is_finite() && rps > 0.0) {
            errors.push(format!(
                "{}: must be a positive number (got {rps})",
                s.rps_key
            ));
        } else if period_of(rps).is_none() {
            errors.push(format!(
                "{}: {rps} is out of range (from one request per {} years to 1e9 per second)",
                s.rps_key,
                MAX_BURST_WINDOW.as_secs() / (365 * 24 * 3600)
            ));
        }
    }
    if s.burst == Some(0) {
        errors.push(format!("{}: must be greater than 0", s.burst_key));
    }
}

/// The replenish period of one request at `rps`, when representable and non-zero.
fn period_of(rps: f64) -> Option<Duration> {
    let p = Duration::try_from_secs_f64(1.0 / rps).ok()?;
    (!p.is_zero() && p <= MAX_BURST_WINDOW).then_some(p)
}

impl RatePlan {
    /// Resolves `[limits]` and the named tokens' overrides.
    ///
    /// `token_overrides`: token name → (rps, burst) from `[[auth.tokens]]`, in config order (the
    /// index names the entry in errors). Every bad setting (rps ≤ 0, NaN, infinite or out of range;
    /// burst 0; a burst that would take more than ten years to refill) is reported, joined by `; `,
    /// each naming its key (`limits.rate_limit_rps`, `limits.roles.readonly.rate_limit_burst`,
    /// `auth.tokens.2.rate_limit_rps`).
    pub fn from_config(
        limits: &LimitsConfig,
        token_overrides: &[(String, Option<f64>, Option<u32>)],
    ) -> Result<Self, String> {
        let mut errors = Vec::new();
        check_setting(
            &Setting {
                rps: Some(limits.rate_limit_rps),
                rps_key: "limits.rate_limit_rps",
                burst: Some(limits.rate_limit_burst),
                burst_key: "limits.rate_limit_burst",
            },
            &mut errors,
        );
        let role_keys: Vec<(Role, String, String)> = ROLES
            .iter()
            .map(|r| {
                (
                    *r,
                    format!("limits.roles.{}.rate_limit_rps", r.as_str()),
                    format!("limits.roles.{}.rate_limit_burst", r.as_str()),
                )
            })
            .collect();
        for (role, rps_key, burst_key) in &role_keys {
            if let Some(rl) = limits.roles.get(role) {
                check_setting(
                    &Setting {
                        rps: rl.rate_limit_rps,
                        rps_key,
                        burst: rl.rate_limit_burst,
                        burst_key,
                    },
                    &mut errors,
                );
            }
        }
        for (i, (name, rps, burst)) in token_overrides.iter().enumerate() {
            check_setting(
                &Setting {
                    rps: *rps,
                    rps_key: &format!("auth.tokens.{i}.rate_limit_rps (token `{name}`)"),
                    burst: *burst,
                    burst_key: &format!("auth.tokens.{i}.rate_limit_burst (token `{name}`)"),
                },
                &mut errors,
            );
        }

        // Resolves a pair to a limit; errors of single fields were collected above.
        let mut resolve = |rps: f64, burst: u32, key: (&str, &str)| -> Option<Limit> {
            let (Some(period), Some(burst)) = (period_of(rps), NonZeroU32::new(burst)) else {
                return None;
            };
            if period.saturating_mul(burst.get()) > MAX_BURST_WINDOW {
                errors.push(format!(
                    "{} / {}: refilling a burst of {burst} at {rps}/s would take more than {} years",
                    key.0,
                    key.1,
                    MAX_BURST_WINDOW.as_secs() / (365 * 24 * 3600)
                ));
                return None;
            }
            Some(Limit { period, burst })
        };

        let mut by_role: [Option<Limit>; 3] = [None; 3];
        let mut role_pairs = [(0.0f64, 0u32); 3];
        let mut ok = true;
        for (role, rps_key, burst_key) in &role_keys {
            let rl = limits.roles.get(role);
            let rps = rl
                .and_then(|r| r.rate_limit_rps)
                .unwrap_or(limits.rate_limit_rps);
            let burst = rl
                .and_then(|r| r.rate_limit_burst)
                .unwrap_or(limits.rate_limit_burst);
            role_pairs[role_slot(*role)] = (rps, burst);
            let keys = match rl {
                Some(_) => (rps_key.as_str(), burst_key.as_str()),
                None => ("limits.rate_limit_rps", "limits.rate_limit_burst"),
            };
            by_role[role_slot(*role)] = resolve(rps, burst, keys);
            ok &= by_role[role_slot(*role)].is_some();
        }
        let mut by_token = HashMap::new();
        for (i, (name, rps, burst)) in token_overrides.iter().enumerate() {
            if rps.is_none() && burst.is_none() {
                continue;
            }
            let rps_key = format!("auth.tokens.{i}.rate_limit_rps (token `{name}`)");
            let burst_key = format!("auth.tokens.{i}.rate_limit_burst (token `{name}`)");
            let mut slots: [Option<Limit>; 3] = [None; 3];
            for role in ROLES {
                let (role_rps, role_burst) = role_pairs[role_slot(role)];
                slots[role_slot(role)] = resolve(
                    rps.unwrap_or(role_rps),
                    burst.unwrap_or(role_burst),
                    (&rps_key, &burst_key),
                );
            }
            match slots {
                [Some(a), Some(u), Some(r)] => {
                    by_token.insert(name.clone(), [a, u, r]);
                }
                _ => ok = false,
            }
        }
        match (errors.is_empty() && ok, by_role) {
            (true, [Some(a), Some(u), Some(r)]) => Ok(Self {
                by_role: [a, u, r],
                by_token,
            }),
            _ => {
                errors.dedup();
                if errors.is_empty() {
                    // Unreachable: every refusal in `resolve` is reported above or by `check_setting`.
                    errors.push("limits: invalid rate limit".into());
                }
                Err(errors.join("; "))
            }
        }
    }

    /// The limit of the named token `token` called with `role`: its override, else the role's.
    fn for_token(&self, token: &str, role: usize) -> Limit {
        self.by_token
            .get(token)
            .map_or(self.by_role[role], |slots| slots[role])
    }
}

/// The buckets of one [`RatePlan`]: a keyed limiter (bucket per principal key) per role and per
/// named token and role. Entries share a limiter when they inherited it or were built with it.
struct Table<C: Clock> {
    plan: RatePlan,
    by_role: [Arc<PrincipalLimiter<C>>; 3],
    by_token: HashMap<String, [Arc<PrincipalLimiter<C>>; 3]>,
}

impl<C: Clock> Table<C> {
    fn limiter_for(&self, principal: &Principal) -> &PrincipalLimiter<C> {
        let role = role_slot(principal.role);
        match principal.method {
            // Only a named token's own principal gets its override: a JWT `sub` or certificate
            // identity that happens to equal a token name keeps its role's quota.
            AuthMethod::Token => self
                .by_token
                .get(&principal.id)
                .map_or(&self.by_role[role], |s| &s[role]),
            _ => &self.by_role[role],
        }
    }

    /// Every limiter once.
    fn limiters(&self) -> Vec<&Arc<PrincipalLimiter<C>>> {
        let mut all: Vec<&Arc<PrincipalLimiter<C>>> = Vec::new();
        for l in self.by_role.iter().chain(self.by_token.values().flatten()) {
            if !all.iter().any(|seen| Arc::ptr_eq(seen, l)) {
                all.push(l);
            }
        }
        all
    }
}

/// Per-principal request limits: live state of the server, kept across reloads. The key of a
/// bucket is the principal's limit key; its limit comes from the [`RatePlan`] last
/// [`apply`](Self::apply)ed. One principal's burst never throttles another.
///
/// A reload applies the new plan by comparing, for each role and each named token, the limit it
/// had with the one it has now: where they are equal the buckets are kept, so a caller's remaining
/// budget survives a reload that changes something else; where they differ the buckets start
/// full under the new limit. A token that gains an override equal to the limit it had through its
/// role keeps its role's buckets; a token that loses its override is charged in its role's
/// buckets from then on. A check reads the current table through one `ArcSwap` load,
/// takes no lock and allocates only the key, as governor's keyed limiter needs an owned key.
pub struct RateLimits<C: Clock = DefaultClock> {
    table: ArcSwap<Table<C>>,
    clock: C,
    /// Serialises [`apply`](Self::apply)s.
    applying: Mutex<()>,
    calls: AtomicU64,
}

impl<C: Clock> std::fmt::Debug for RateLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table.load();
        f.debug_struct("RateLimits")
            .field("plan", &table.plan)
            .field("limiters", &table.limiters().len())
            .finish()
    }
}

impl RateLimits {
    /// Buckets for `plan`, all full.
    pub fn new(plan: &RatePlan) -> Self {
        Self::with_clock(plan, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    fn with_clock(plan: &RatePlan, clock: C) -> Self {
        let table = build(plan, None, &clock);
        Self {
            table: ArcSwap::from_pointee(table),
            clock,
            applying: Mutex::new(()),
            calls: AtomicU64::new(0),
        }
    }

    /// Switches to `plan` (a reload): the buckets of every role and named token whose limit is
    /// unchanged are kept, the others start full under their new limit. Returns how many
    /// role and token entries got new buckets (0 when nothing changed).
    pub fn apply(&self, plan: &RatePlan) -> usize {
        let _one_at_a_time = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.table.load_full();
        if old.plan == *plan {
            return 0;
        }
        let table = build(plan, Some(&old), &self.clock);
        let rebuilt = table
            .by_role
            .iter()
            .chain(table.by_token.values().flatten())
            .filter(|l| !old.limiters().iter().any(|o| Arc::ptr_eq(o, l)))
            .count();
        self.table.store(Arc::new(table));
        rebuilt
    }

    #[cfg(test)]
    fn check(&self, principal: &Principal) -> Result<(), Duration> {
        self.check_as(principal, &principal.limit_key(None))
    }

    /// Ok, or `Err(retry_after)`: how long until one more request of `principal` is allowed in
    /// the bucket named by `key` (see [`Principal::limit_key`]), read from the bucket and rounded
    /// up to whole seconds, at least 1 s.
    pub fn check_as(&self, principal: &Principal, key: &str) -> Result<(), Duration> {
        if due(&self.calls) {
            self.housekeeping();
        }
        let table = self.table.load();
        let limiter = table.limiter_for(principal);
        limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| whole_seconds(not_until.wait_time_from(limiter.clock().now())))
    }

    /// The limit [`Self::check_as`] applies to `principal`: one call per `period`, `burst` at once.
    /// The shared (Redis) buckets use the same limit.
    pub fn limit_of(&self, principal: &Principal) -> (Duration, u32) {
        let table = self.table.load();
        let role = role_slot(principal.role);
        let limit = match principal.method {
            AuthMethod::Token => table.plan.for_token(&principal.id, role),
            _ => table.plan.by_role[role],
        };
        (limit.period, limit.burst.get())
    }

    /// Drops the principals whose bucket is full again (indistinguishable from a new one). Runs by
    /// itself every [`HOUSEKEEPING_EVERY`] checks; callers may also run it from a timer.
    pub fn housekeeping(&self) {
        for l in self.table.load().limiters() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    #[cfg(test)]
    fn tracked_keys(&self) -> usize {
        self.table.load().limiters().iter().map(|l| l.len()).sum()
    }

    #[cfg(test)]
    fn limiter_count(&self) -> usize {
        self.table.load().limiters().len()
    }
}

/// The table of `plan`. With the `old` table, an entry whose limit equals the one the same callers
/// had in `old` (a token without an override of its own had its role's) keeps `old`'s limiter;
/// the others get a new one, shared by the new entries of equal limit.
fn build<C: Clock + Clone>(plan: &RatePlan, old: Option<&Table<C>>, clock: &C) -> Table<C> {
    let mut fresh: HashMap<Limit, Arc<PrincipalLimiter<C>>> = HashMap::new();
    let mut pick = |limit: Limit, before: Option<(Limit, &Arc<PrincipalLimiter<C>>)>| match before {
        Some((was, limiter)) if was == limit => limiter.clone(),
        _ => fresh
            .entry(limit)
            .or_insert_with(|| {
                Arc::new(RateLimiter::new(
                    limit.quota(),
                    DefaultKeyedStateStore::default(),
                    clock.clone(),
                ))
            })
            .clone(),
    };
    let by_role = [0, 1, 2].map(|r| {
        pick(
            plan.by_role[r],
            old.map(|o| (o.plan.by_role[r], &o.by_role[r])),
        )
    });
    let by_token = plan
        .by_token
        .iter()
        .map(|(name, limits)| {
            let slots = [0, 1, 2].map(|r| {
                let before = old.map(|o| {
                    let limiter = o.by_token.get(name).map_or(&o.by_role[r], |s| &s[r]);
                    (o.plan.for_token(name, r), limiter)
                });
                pick(limits[r], before)
            });
            (name.clone(), slots)
        })
        .collect();
    Table {
        plan: plan.clone(),
        by_role,
        by_token,
    }
}

/// The key of a client address: IPv4-mapped IPv6 counts as IPv4, and IPv6 is keyed by its /64 —
/// one host usually owns a whole /64, so per-address keys would let it rotate past the limiter and
/// grow the key set without bound.
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(
            u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
        )),
        v4 => v4,
    }
}

/// Failed-authentication limiter keyed by client IP (not ip:port; IPv6 by /64):
/// `auth_failures_per_minute` failures per minute with that burst (the existing ChatCLI's 5 is
/// "5 at once, then one per 12 s"). Only failures consume it ([`record_failure`]); successful
/// calls never touch it. A reload changes the limit with [`set_per_minute`].
///
/// A blocked address ([`is_blocked`]) is not refused outright: many callers can share one address
/// (a NAT, an ingress that is not a trusted proxy), and one of them failing must not lock the
/// others out. The pipeline still admits a valid credential from it, but checks only what is cheap
/// (see `Authenticator::authenticate_as` with `Verification::Cheap`), and refuses everything else
/// with the wait ([`refused`](Self::refused) counts those refusals).
///
/// [`record_failure`]: AuthFailureLimiter::record_failure
/// [`is_blocked`]: AuthFailureLimiter::is_blocked
/// [`set_per_minute`]: AuthFailureLimiter::set_per_minute
pub struct AuthFailureLimiter<C: Clock = DefaultClock> {
    /// `None` when off (`auth_failures_per_minute = 0`). A governor limiter has one quota for
    /// life, so a new limit replaces the whole state.
    inner: ArcSwapOption<FailureState<C>>,
    /// The limit `inner` was built for; the lock also keeps two changes from interleaving.
    per_minute: Mutex<u32>,
    clock: C,
    /// The counters, once [`register`](Self::register)ed.
    counters: OnceLock<FailureCounters>,
}

struct FailureCounters {
    /// `chatcli_auth_failures_total`: failed authentications charged to an address.
    failures: IntCounter,
    /// `chatcli_auth_throttled_total`: calls refused because their address was blocked and their
    /// credential was not valid by the cheap checks.
    throttled: IntCounter,
}

struct FailureState<C: Clock> {
    limiter: IpLimiter<C>,
    /// IPs with no failures left, and until when. governor cannot test a bucket without taking a
    /// token from it, so the moment a failure empties a bucket is remembered here, where
    /// `is_blocked` can read it without charging anyone.
    blocked: RwLock<HashMap<IpAddr, C::Instant>>,
    calls: AtomicU64,
}

impl<C: Clock> std::fmt::Debug for AuthFailureLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFailureLimiter")
            .field("enabled", &self.inner.load().is_some())
            .finish()
    }
}

impl AuthFailureLimiter {
    /// `per_minute` failures per minute per IP, all of them usable at once; 0 = off.
    pub fn new(per_minute: u32) -> Self {
        Self::with_clock(per_minute, DefaultClock::default())
    }
}

impl<C: Clock + Clone> AuthFailureLimiter<C> {
    fn with_clock(per_minute: u32, clock: C) -> Self {
        Self {
            inner: ArcSwapOption::new(Self::state(per_minute, &clock, HashMap::new())),
            per_minute: Mutex::new(per_minute),
            clock,
            counters: OnceLock::new(),
        }
    }

    fn state(
        per_minute: u32,
        clock: &C,
        blocked: HashMap<IpAddr, C::Instant>,
    ) -> Option<Arc<FailureState<C>>> {
        NonZeroU32::new(per_minute).map(|n| {
            Arc::new(FailureState {
                limiter: RateLimiter::new(
                    Quota::per_minute(n),
                    DefaultKeyedStateStore::default(),
                    clock.clone(),
                ),
                blocked: RwLock::new(blocked),
                calls: AtomicU64::new(0),
            })
        })
    }

    /// Applies a new `auth_failures_per_minute` (a reload); 0 turns the limiter off. IPs blocked
    /// now stay blocked until their block ends; the failures counted so far start again from a
    /// full allowance under the new limit.
    pub fn set_per_minute(&self, per_minute: u32) {
        let mut current = self
            .per_minute
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *current == per_minute {
            return;
        }
        *current = per_minute;
        let blocked = self
            .inner
            .load()
            .as_ref()
            .map(|s| {
                s.blocked
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            })
            .unwrap_or_default();
        self.inner
            .store(Self::state(per_minute, &self.clock, blocked));
    }

    /// The limit in force (failures per minute per IP; 0 = off).
    #[cfg(test)]
    fn per_minute(&self) -> u32 {
        *self
            .per_minute
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates the limiter's counters on `registry` (the metrics listener's):
    /// `chatcli_auth_failures_total` and `chatcli_auth_throttled_total`. Without it nothing is
    /// counted.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        let counters = FailureCounters {
            failures: IntCounter::new(
                "chatcli_auth_failures_total",
                "Failed authentications charged to the failed-auth limiter of their client address.",
            )?,
            throttled: IntCounter::new(
                "chatcli_auth_throttled_total",
                "Calls refused by the failed-auth limiter: their client address had too many failed \
                 authentications and their credential was not valid by the cheap checks.",
            )?,
        };
        registry.register(Box::new(counters.failures.clone()))?;
        registry.register(Box::new(counters.throttled.clone()))?;
        let _ = self.counters.set(counters);
        Ok(())
    }

    /// Counts one call refused because its address is blocked ([`is_blocked`](Self::is_blocked))
    /// and its credential was not valid by the cheap checks. Such a call charges nothing more.
    pub fn refused(&self) {
        if let Some(c) = self.counters.get() {
            c.throttled.inc();
        }
    }

    /// Charges one failed authentication to `ip`. When that uses up its last failure, the IP is
    /// blocked until the bucket has one again, and the block's length is returned (whole seconds,
    /// at least 1), so that the start of a block can be logged once rather than every refusal.
    pub fn record_failure(&self, ip: IpAddr) -> Option<Duration> {
        if let Some(c) = self.counters.get() {
            c.failures.inc();
        }
        let inner = self.inner.load();
        let s = inner.as_ref()?;
        if due(&s.calls) {
            Self::clean(s);
        }
        let key = ip_key(ip);
        let empty_until = match s.limiter.check_key(&key) {
            Ok(snapshot) if snapshot.remaining_burst_capacity() > 0 => None,
            // That was the last one: a second look is refused without changing the bucket (a
            // refused check does not update governor's state) and tells exactly until when.
            // Should the refill time have been reached in between, the look costs one more
            // failure, which errs on the strict side.
            Ok(_) => s.limiter.check_key(&key).err(),
            // Already empty (concurrent failures that all passed `is_blocked`).
            Err(not_until) => Some(not_until),
        };
        let not_until = empty_until?;
        let until = not_until.earliest_possible();
        let mut blocked = s.blocked.write().unwrap_or_else(PoisonError::into_inner);
        let entry = blocked.entry(key).or_insert(until);
        if *entry < until {
            *entry = until;
        }
        let now = s.limiter.clock().now();
        Some(whole_seconds(until.duration_since(now).into()))
    }

    /// `Some(retry_after)` (whole seconds, at least 1) when `ip` has no failed authentications
    /// left; `None` otherwise. Never charges the IP.
    pub fn is_blocked(&self, ip: IpAddr) -> Option<Duration> {
        let inner = self.inner.load();
        let s = inner.as_ref()?;
        let until = *s
            .blocked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip_key(ip))?;
        let now = s.limiter.clock().now();
        (until > now).then(|| whole_seconds(until.duration_since(now).into()))
    }

    /// Forgets IPs whose bucket is full again and blocks that have ended. Runs by itself every
    /// [`HOUSEKEEPING_EVERY`] failures; callers may also run it from a timer.
    pub fn housekeeping(&self) {
        if let Some(s) = self.inner.load().as_ref() {
            Self::clean(s);
        }
    }

    fn clean(s: &FailureState<C>) {
        s.limiter.retain_recent();
        s.limiter.shrink_to_fit();
        let now = s.limiter.clock().now();
        s.blocked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, until| *until > now);
    }
}

type Held = Arc<Mutex<HashMap<String, u32>>>;

/// Per-principal cap on concurrent streams. [`try_acquire`](StreamCaps::try_acquire) returns a guard
/// that releases its slot on drop; a principal's entry is removed when its count drops to 0. Clones
/// share the counts.
#[derive(Debug, Clone)]
pub struct StreamCaps {
    max: u32,
    held: Held,
}

/// One open stream of one principal; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamGuard {
    /// `None` when streams are not capped (nothing to release).
    slot: Option<(Held, String)>,
}

impl StreamCaps {
    /// At most `max` concurrent streams per principal; 0 = no cap.
    pub fn new(max: u32) -> Self {
        Self {
            max,
            held: Arc::default(),
        }
    }

    /// A slot for one more stream of `principal_id`, or `None` when it already holds `max`.
    pub fn try_acquire(&self, principal_id: &str) -> Option<StreamGuard> {
        if self.max == 0 {
            return Some(StreamGuard { slot: None });
        }
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        match held.get_mut(principal_id) {
            Some(n) if *n >= self.max => return None,
            Some(n) => *n += 1,
            None => {
                held.insert(principal_id.to_owned(), 1);
            }
        }
        Some(StreamGuard {
            slot: Some((self.held.clone(), principal_id.to_owned())),
        })
    }

    /// Streams `principal_id` holds now (0 when uncapped: nothing is counted then).
    #[cfg(test)]
    fn active(&self, principal_id: &str) -> u32 {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(principal_id)
            .copied()
            .unwrap_or(0)
    }

    #[cfg(test)]
    fn tracked_principals(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let Some((held, id)) = self.slot.take() else {
            return;
        };
        let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&id);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::config::RoleLimits;

    fn principal(id: &str, role: Role, method: AuthMethod) -> Principal {
        Principal {
            id: id.into(),
            role,
            method,
            email: None,
            tenant_id: None,
        }
    }

    fn user(id: &str) -> Principal {
        principal(id, Role::User, AuthMethod::Jwt)
    }

    fn limits(rps: f64, burst: u32) -> LimitsConfig {
        LimitsConfig {
            rate_limit_rps: rps,
            rate_limit_burst: burst,
            ..LimitsConfig::default()
        }
    }

    fn fake(
        l: &LimitsConfig,
        tokens: &[(String, Option<f64>, Option<u32>)],
    ) -> (RateLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            RateLimits::with_clock(&RatePlan::from_config(l, tokens).unwrap(), clock.clone()),
            clock,
        )
    }

    /// Calls `check` until the first refusal; returns how many passed and the retry-after.
    fn passes_until_refused<C: Clock + Clone>(r: &RateLimits<C>, p: &Principal) -> (u32, Duration) {
        for n in 0..10_000 {
            if let Err(wait) = r.check(p) {
                return (n, wait);
            }
        }
        panic!("never refused");
    }

    #[test]
    fn burst_passes_then_refused_with_whole_second_retry_after() {
        let (r, _clock) = fake(&limits(10.0, 30), &[]);
        let (passed, wait) = passes_until_refused(&r, &user("alice"));
        assert_eq!(passed, 30);
        // 10 rps: the next token is 100 ms away, announced as 1 s (never 0).
        assert_eq!(wait, Duration::from_secs(1));
    }

    #[test]
    fn real_clock_burst_and_retry_after_at_least_one_second() {
        let r = RateLimits::new(&RatePlan::from_config(&limits(10.0, 30), &[]).unwrap());
        let p = user("alice");
        for _ in 0..30 {
            assert!(r.check(&p).is_ok());
        }
        let wait = r.check(&p).unwrap_err();
        assert!(wait >= Duration::from_secs(1));
        assert_eq!(wait.subsec_nanos(), 0, "whole seconds");
    }

    #[test]
    fn bucket_refills_with_time() {
        let (r, clock) = fake(&limits(1.0, 2), &[]);
        let p = user("alice");
        assert_eq!(passes_until_refused(&r, &p).0, 2);
        clock.advance(Duration::from_millis(999));
        assert!(r.check(&p).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(r.check(&p).is_ok());
        assert_eq!(r.check(&p), Err(Duration::from_secs(1)));
    }

    #[test]
    fn one_principals_exhaustion_leaves_another_alone() {
        let (r, _clock) = fake(&limits(1.0, 3), &[]);
        assert_eq!(passes_until_refused(&r, &user("alice")).0, 3);
        assert!(r.check(&user("alice")).is_err());
        assert_eq!(passes_until_refused(&r, &user("bob")).0, 3);
    }

    #[test]
    fn role_override_applies() {
        let mut l = limits(10.0, 30);
        l.roles.insert(
            Role::ReadOnly,
            RoleLimits {
                rate_limit_rps: Some(1.0),
                rate_limit_burst: Some(1),
            },
        );
        let (r, _clock) = fake(&l, &[]);
        let ro = principal("viewer", Role::ReadOnly, AuthMethod::Jwt);
        assert!(r.check(&ro).is_ok());
        assert_eq!(r.check(&ro), Err(Duration::from_secs(1)));
        // Other roles keep the default.
        assert_eq!(passes_until_refused(&r, &user("alice")).0, 30);
    }

    #[test]
    fn role_override_of_one_field_keeps_the_default_other() {
        let mut l = limits(10.0, 30);
        l.roles.insert(
            Role::Admin,
            RoleLimits {
                rate_limit_rps: None,
                rate_limit_burst: Some(50),
            },
        );
        let (r, _clock) = fake(&l, &[]);
        let admin = principal("root", Role::Admin, AuthMethod::Jwt);
        assert_eq!(
            passes_until_refused(&r, &admin),
            (50, Duration::from_secs(1))
        );
    }

    #[test]
    fn token_override_beats_its_role() {
        let mut l = limits(10.0, 30);
        l.roles.insert(
            Role::ReadOnly,
            RoleLimits {
                rate_limit_rps: Some(1.0),
                rate_limit_burst: Some(1),
            },
        );
        let tokens = vec![
            ("ci".to_string(), Some(1.0), Some(5)),
            ("dash".to_string(), None, Some(3)),
        ];
        let (r, _clock) = fake(&l, &tokens);
        let ci = principal("ci", Role::ReadOnly, AuthMethod::Token);
        assert_eq!(passes_until_refused(&r, &ci).0, 5);
        // Only the burst is overridden: the role's 1 rps stays.
        let dash = principal("dash", Role::ReadOnly, AuthMethod::Token);
        assert_eq!(passes_until_refused(&r, &dash), (3, Duration::from_secs(1)));
        // A JWT subject named like a token does not get the token's quota.
        let jwt_ci = principal("ci", Role::ReadOnly, AuthMethod::Jwt);
        let (r2, _clock) = fake(&l, &tokens);
        assert_eq!(passes_until_refused(&r2, &jwt_ci).0, 1);
    }

    #[test]
    fn fractional_rps_gives_two_second_retry_after() {
        let (r, _clock) = fake(&limits(0.5, 1), &[]);
        let p = user("alice");
        assert!(r.check(&p).is_ok());
        assert_eq!(r.check(&p), Err(Duration::from_secs(2)));
        let real = RateLimits::new(&RatePlan::from_config(&limits(0.5, 1), &[]).unwrap());
        assert!(real.check(&p).is_ok());
        assert_eq!(real.check(&p), Err(Duration::from_secs(2)));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(whole_seconds(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            whole_seconds(Duration::from_millis(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            whole_seconds(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            whole_seconds(Duration::from_millis(1001)),
            Duration::from_secs(2)
        );
        // 3 rps: a third of a second, still 1.
        let (r, _clock) = fake(&limits(3.0, 1), &[]);
        let p = user("a");
        assert!(r.check(&p).is_ok());
        assert_eq!(r.check(&p), Err(Duration::from_secs(1)));
        // 0.4 rps: 2.5 s → 3 s.
        let (r, _clock) = fake(&limits(0.4, 1), &[]);
        assert!(r.check(&p).is_ok());
        assert_eq!(r.check(&p), Err(Duration::from_secs(3)));
    }

    #[test]
    fn invalid_config_names_the_key() {
        let err = |l: &LimitsConfig, t: &[(String, Option<f64>, Option<u32>)]| {
            RatePlan::from_config(l, t).unwrap_err()
        };
        let e = err(&limits(0.0, 30), &[]);
        assert!(e.contains("limits.rate_limit_rps"), "{e}");
        let e = err(&limits(-1.0, 30), &[]);
        assert!(e.contains("limits.rate_limit_rps"), "{e}");
        let e = err(&limits(f64::NAN, 30), &[]);
        assert!(
            e.contains("limits.rate_limit_rps") && e.contains("NaN"),
            "{e}"
        );
        let e = err(&limits(f64::INFINITY, 30), &[]);
        assert!(e.contains("limits.rate_limit_rps"), "{e}");
        let e = err(&limits(10.0, 0), &[]);
        assert!(e.contains("limits.rate_limit_burst"), "{e}");
        assert!(!e.contains("limits.rate_limit_rps"), "{e}");

        let mut l = limits(10.0, 30);
        l.roles.insert(
            Role::ReadOnly,
            RoleLimits {
                rate_limit_rps: Some(-2.0),
                rate_limit_burst: Some(0),
            },
        );
        let e = err(&l, &[]);
        assert!(e.contains("limits.roles.readonly.rate_limit_rps"), "{e}");
        assert!(e.contains("limits.roles.readonly.rate_limit_burst"), "{e}");

        let e = err(
            &limits(10.0, 30),
            &[
                ("ok".into(), Some(1.0), None),
                ("bad".into(), Some(f64::NAN), Some(0)),
            ],
        );
        assert!(
            e.contains("auth.tokens.1.rate_limit_rps (token `bad`)"),
            "{e}"
        );
        assert!(e.contains("auth.tokens.1.rate_limit_burst"), "{e}");
        assert!(!e.contains("auth.tokens.0"), "{e}");

        // Representable but absurd: refilling would overflow governor's clock arithmetic.
        let e = err(&limits(1e-12, 30), &[]);
        assert!(e.contains("limits.rate_limit_rps"), "{e}");
        let e = err(&limits(1e12, 30), &[]);
        assert!(e.contains("limits.rate_limit_rps"), "{e}");
        let e = err(&limits(1e-8, 1000), &[]);
        assert!(e.contains("limits.rate_limit_burst"), "{e}");
    }

    #[test]
    fn equal_quotas_share_one_limiter() {
        let mut l = limits(10.0, 30);
        l.roles.insert(
            Role::Admin,
            RoleLimits {
                rate_limit_rps: Some(10.0),
                rate_limit_burst: None,
            },
        );
        let r =
            RateLimits::new(&RatePlan::from_config(&l, &[("t".into(), None, Some(30))]).unwrap());
        assert_eq!(r.limiter_count(), 1);
    }

    fn plan(l: &LimitsConfig, tokens: &[(String, Option<f64>, Option<u32>)]) -> RatePlan {
        RatePlan::from_config(l, tokens).unwrap()
    }

    fn with_role(mut l: LimitsConfig, role: Role, rps: f64, burst: u32) -> LimitsConfig {
        l.roles.insert(
            role,
            RoleLimits {
                rate_limit_rps: Some(rps),
                rate_limit_burst: Some(burst),
            },
        );
        l
    }

    /// Spends `n` calls of `p`, all of which must pass.
    fn spend<C: Clock + Clone>(r: &RateLimits<C>, p: &Principal, n: u32) {
        for i in 0..n {
            assert!(r.check(p).is_ok(), "call {i} of {n} refused");
        }
    }

    #[test]
    fn an_unchanged_plan_keeps_every_bucket() {
        let l = limits(1.0, 5);
        let (r, _clock) = fake(&l, &[]);
        spend(&r, &user("alice"), 3);
        assert_eq!(r.apply(&plan(&l, &[])), 0);
        assert_eq!(passes_until_refused(&r, &user("alice")).0, 2);
    }

    #[test]
    fn a_limit_change_elsewhere_keeps_a_callers_remaining_budget() {
        let l = limits(1.0, 5);
        let (r, _clock) = fake(&l, &[("ci".into(), None, Some(4))]);
        let ci = principal("ci", Role::User, AuthMethod::Token);
        spend(&r, &user("alice"), 3);
        spend(&r, &ci, 1);
        spend(&r, &principal("viewer", Role::ReadOnly, AuthMethod::Jwt), 5);
        // Only the read-only role's limit changes; a token is added.
        let next = plan(
            &with_role(l, Role::ReadOnly, 1.0, 2),
            &[
                ("ci".into(), None, Some(4)),
                ("new".into(), Some(1.0), Some(9)),
            ],
        );
        assert!(r.apply(&next) > 0);
        assert_eq!(passes_until_refused(&r, &user("alice")).0, 2);
        assert_eq!(passes_until_refused(&r, &ci).0, 3);
        // The read-only bucket was rebuilt under its new limit: full, with the new burst.
        let viewer = principal("viewer", Role::ReadOnly, AuthMethod::Jwt);
        assert_eq!(passes_until_refused(&r, &viewer).0, 2);
        let new = principal("new", Role::User, AuthMethod::Token);
        assert_eq!(passes_until_refused(&r, &new).0, 9);
    }

    #[test]
    fn a_changed_limit_rebuilds_only_the_buckets_it_applies_to() {
        let l = limits(1.0, 5);
        let tokens = [
            ("ci".to_string(), None, Some(4)),
            ("dash".to_string(), None, Some(3)),
        ];
        let (r, _clock) = fake(&l, &tokens);
        let (ci, dash) = (
            principal("ci", Role::User, AuthMethod::Token),
            principal("dash", Role::User, AuthMethod::Token),
        );
        let root = principal("root", Role::Admin, AuthMethod::Jwt);
        spend(&r, &user("alice"), 4);
        spend(&r, &root, 4);
        spend(&r, &ci, 4);
        spend(&r, &dash, 2);

        // The user role's burst and ci's override change; admin and dash keep theirs.
        let next = plan(
            &with_role(l, Role::User, 1.0, 8),
            &[
                ("ci".to_string(), None, Some(6)),
                ("dash".to_string(), None, Some(3)),
            ],
        );
        // The user role's entry, and ci's under each of the three roles.
        assert_eq!(r.apply(&next), 4);
        assert_eq!(passes_until_refused(&r, &user("alice")).0, 8);
        assert_eq!(passes_until_refused(&r, &ci).0, 6);
        assert_eq!(passes_until_refused(&r, &root).0, 1);
        assert_eq!(passes_until_refused(&r, &dash).0, 1);
    }

    #[test]
    fn a_token_given_the_limit_it_already_had_keeps_its_bucket() {
        let l = limits(1.0, 5);
        let (r, _clock) = fake(&l, &[]);
        let ci = principal("ci", Role::User, AuthMethod::Token);
        spend(&r, &ci, 3);
        // An override equal to the role's limit: the same limit, the same bucket.
        assert_eq!(r.apply(&plan(&l, &[("ci".into(), Some(1.0), Some(5))])), 0);
        assert_eq!(passes_until_refused(&r, &ci).0, 2);
        // A different one: a new bucket with the new burst.
        let (r, _clock) = fake(&l, &[]);
        spend(&r, &ci, 3);
        assert!(r.apply(&plan(&l, &[("ci".into(), None, Some(7))])) > 0);
        assert_eq!(passes_until_refused(&r, &ci).0, 7);
        assert_eq!(passes_until_refused(&r, &user("alice")).0, 5);
    }

    #[test]
    fn housekeeping_forgets_full_buckets() {
        let (r, clock) = fake(&limits(1.0, 2), &[]);
        for i in 0..50 {
            assert!(r.check(&user(&format!("p{i}"))).is_ok());
        }
        assert_eq!(r.tracked_keys(), 50);
        r.housekeeping();
        assert_eq!(r.tracked_keys(), 50, "buckets not yet full are kept");
        clock.advance(Duration::from_secs(5));
        r.housekeeping();
        assert_eq!(r.tracked_keys(), 0);
    }

    #[test]
    fn housekeeping_runs_by_itself() {
        let (r, clock) = fake(&limits(1.0, 2), &[]);
        assert!(r.check(&user("old")).is_ok());
        clock.advance(Duration::from_secs(5));
        for _ in 0..HOUSEKEEPING_EVERY {
            let _ = r.check(&user("busy"));
        }
        // "old" was dropped by the automatic clean-up; "busy" is still throttled.
        assert_eq!(r.tracked_keys(), 1);
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    fn fake_auth(per_minute: u32) -> (AuthFailureLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            AuthFailureLimiter::with_clock(per_minute, clock.clone()),
            clock,
        )
    }

    #[test]
    fn five_failures_block_the_ip_and_not_another() {
        let l = AuthFailureLimiter::new(5);
        for _ in 0..4 {
            l.record_failure(A);
            assert_eq!(l.is_blocked(A), None);
        }
        l.record_failure(A);
        let wait = l.is_blocked(A).unwrap();
        assert!(wait >= Duration::from_secs(1) && wait <= Duration::from_secs(12));
        assert_eq!(wait.subsec_nanos(), 0);
        assert_eq!(l.is_blocked(B), None);
    }

    #[test]
    fn blocked_ip_gets_one_more_try_per_period() {
        let (l, clock) = fake_auth(5);
        for _ in 0..5 {
            l.record_failure(A);
        }
        assert_eq!(l.is_blocked(A), Some(Duration::from_secs(12)));
        clock.advance(Duration::from_millis(11_500));
        assert_eq!(l.is_blocked(A), Some(Duration::from_secs(1)));
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.is_blocked(A), None);
        l.record_failure(A);
        assert_eq!(l.is_blocked(A), Some(Duration::from_secs(12)));
    }

    #[test]
    fn the_failure_that_blocks_says_for_how_long() {
        let (l, clock) = fake_auth(3);
        assert_eq!(l.record_failure(A), None);
        assert_eq!(l.record_failure(A), None);
        assert_eq!(l.record_failure(A), Some(Duration::from_secs(20)));
        clock.advance(Duration::from_secs(20));
        assert_eq!(l.is_blocked(A), None);
        assert_eq!(l.record_failure(A), Some(Duration::from_secs(20)));
        assert_eq!(AuthFailureLimiter::new(0).record_failure(A), None);
    }

    #[test]
    fn failures_and_refusals_are_counted_once_registered() {
        let l = AuthFailureLimiter::new(1);
        l.record_failure(A);
        l.refused();
        let registry = Registry::new();
        l.register(&registry).unwrap();
        l.record_failure(A);
        l.refused();
        l.refused();
        let values: HashMap<String, f64> = registry
            .gather()
            .iter()
            .map(|f| {
                (
                    f.name().to_string(),
                    f.get_metric()[0].get_counter().get_value(),
                )
            })
            .collect();
        assert_eq!(values["chatcli_auth_failures_total"], 1.0);
        assert_eq!(values["chatcli_auth_throttled_total"], 2.0);
    }

    #[test]
    fn successes_never_block() {
        let (l, _clock) = fake_auth(5);
        // Four failures, then any number of authenticated calls (which only look): still open.
        for _ in 0..4 {
            l.record_failure(A);
        }
        for _ in 0..1000 {
            assert_eq!(l.is_blocked(A), None);
        }
        // The fifth failure is what blocks, not the looks before it.
        l.record_failure(A);
        assert!(l.is_blocked(A).is_some());
    }

    #[test]
    fn a_new_limit_applies_and_keeps_current_blocks() {
        let (l, _clock) = fake_auth(5);
        l.record_failure(A);
        l.record_failure(B);
        l.record_failure(B);
        assert_eq!(l.is_blocked(B), None);
        l.set_per_minute(2);
        assert_eq!(l.per_minute(), 2);
        // The allowance starts again under the new limit: two failures block now.
        l.record_failure(B);
        assert_eq!(l.is_blocked(B), None);
        l.record_failure(B);
        assert!(l.is_blocked(B).is_some());
        // A block survives a later change; off means off.
        l.set_per_minute(10);
        assert!(l.is_blocked(B).is_some());
        assert_eq!(l.is_blocked(A), None);
        l.set_per_minute(0);
        for _ in 0..100 {
            l.record_failure(A);
        }
        assert_eq!(l.is_blocked(A), None);
        l.set_per_minute(1);
        l.record_failure(A);
        assert!(l.is_blocked(A).is_some());
    }

    #[test]
    fn zero_per_minute_never_blocks() {
        let l = AuthFailureLimiter::new(0);
        for _ in 0..100 {
            l.record_failure(A);
        }
        assert_eq!(l.is_blocked(A), None);
    }

    #[test]
    fn failures_are_keyed_by_ip_and_ipv6_by_64() {
        let (l, _clock) = fake_auth(2);
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.record_failure(v6a);
        l.record_failure(v6b);
        assert!(l.is_blocked(v6a).is_some());
        assert!(l.is_blocked(v6b).is_some());
        assert_eq!(l.is_blocked(v6other), None);

        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        l.record_failure(mapped);
        l.record_failure(A);
        assert!(l.is_blocked(A).is_some());
        assert!(l.is_blocked(mapped).is_some());
        assert_eq!(l.is_blocked(B), None);
        assert_eq!(
            ip_key(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn auth_housekeeping_forgets_old_ips() {
        let (l, clock) = fake_auth(5);
        for i in 0..5 {
            l.record_failure(A);
            l.record_failure(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)));
        }
        let s = l.inner.load_full().unwrap();
        assert_eq!(s.limiter.len(), 6);
        assert_eq!(s.blocked.read().unwrap().len(), 1);
        clock.advance(Duration::from_secs(120));
        l.housekeeping();
        assert_eq!(s.limiter.len(), 0);
        assert_eq!(s.blocked.read().unwrap().len(), 0);
    }

    #[test]
    fn stream_cap_limits_each_principal() {
        let caps = StreamCaps::new(2);
        let g1 = caps.try_acquire("alice").unwrap();
        let _g2 = caps.try_acquire("alice").unwrap();
        assert!(caps.try_acquire("alice").is_none());
        assert_eq!(caps.active("alice"), 2);
        // Another principal is unaffected.
        let b = caps.try_acquire("bob").unwrap();
        drop(g1);
        assert_eq!(caps.active("alice"), 1);
        let _g3 = caps.try_acquire("alice").unwrap();
        assert!(caps.try_acquire("alice").is_none());
        drop(b);
        assert_eq!(caps.active("bob"), 0);
        assert_eq!(caps.tracked_principals(), 1, "bob's entry removed at zero");
    }

    #[test]
    fn stream_cap_entry_removed_at_zero() {
        let caps = StreamCaps::new(2);
        let a = caps.try_acquire("alice").unwrap();
        let b = caps.clone().try_acquire("alice").unwrap();
        assert_eq!(caps.tracked_principals(), 1);
        drop(a);
        drop(b);
        assert_eq!(caps.tracked_principals(), 0);
        assert_eq!(caps.active("alice"), 0);
    }

    #[test]
    fn stream_cap_zero_is_uncapped() {
        let caps = StreamCaps::new(0);
        let guards: Vec<_> = (0..1000)
            .map(|_| caps.try_acquire("alice").unwrap())
            .collect();
        assert_eq!(guards.len(), 1000);
        assert_eq!(caps.tracked_principals(), 0);
    }

    #[test]
    fn stream_guard_is_send_and_static() {
        fn assert_send<T: Send + Sync + 'static>() {}
        assert_send::<StreamGuard>();
        assert_send::<StreamCaps>();
        assert_send::<RateLimits>();
        assert_send::<AuthFailureLimiter>();
    }
}
