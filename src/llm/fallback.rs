//! The fallback chain: the resolved provider first, then the configured chain in order. Each
//! provider is retried on retryable failures (rate limit, timeout, 5xx, transport) with exponential
//! backoff and jitter, or after its `Retry-After` when that is short enough; then the next provider
//! is tried. A stream falls back only before its first delta: once text went to the caller, a
//! failure is reported, never retried. A non-streamed call (the caller takes the whole answer at
//! once) is read to its end here, so any failure before that end, a stall included, still moves on
//! to the next provider; its provider's `unary_timeout` caps that read.
//!
//! Cooldowns are shared by every caller, so only failures that say something about the provider as
//! the server uses it (its own URL and credentials) start or lengthen one ([`Blame`]):
//! - the whole provider cools down when it cannot be reached or dropped the connection
//!   (transport) or refused the server's key (401; at once to the longest cooldown);
//! - one model of it cools down on 429, 5xx, the provider's own timeouts and garbage, since quotas,
//!   outages and slowness are often per model and a caller picks the model;
//! - nothing cools down for what the caller caused: its deadline, the `unary_timeout` cap (how long
//!   an answer takes depends on what was asked), a model the upstream does not know (404) or lets
//!   no one use (403), a bad request; and calls made with the caller's own key or URL (forwarded
//!   credentials) neither read, start nor clear any cooldown.
//!
//! A cooling provider (or model) is skipped, unless it is the only candidate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;
use futures::StreamExt;

use super::error::{ErrorClass, LlmError, UpstreamError};
use super::{ChatRequest, Delta, DeltaStream, Provider};
use crate::telemetry::{LlmSeries, Metrics};

/// Settings of the chain, from `[llm]`.
#[derive(Debug, Clone)]
pub struct FallbackSettings {
    /// Provider names in chain order (empty = no fallback).
    pub chain: Vec<String>,
    /// Retries per provider.
    pub max_retries: u32,
    /// First cooldown.
    pub cooldown_base: Duration,
    /// Longest cooldown.
    pub cooldown_max: Duration,
    /// Longest `Retry-After` worth waiting for; longer ones move on to the next provider.
    pub max_retry_wait: Duration,
    /// Model per provider (lower-case name) when it answers as a fallback (`CHATCLI_FALLBACK_MODEL_<P>`).
    pub models: HashMap<String, String>,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        Self {
            chain: Vec::new(),
            max_retries: 2,
            cooldown_base: Duration::from_secs(30),
            cooldown_max: Duration::from_secs(300),
            max_retry_wait: Duration::from_secs(10),
            models: HashMap::new(),
        }
    }
}

/// One provider to try, with the model to ask it for.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// The model.
    pub model: String,
    /// The provider as the server configured it (its URL and credentials), so its failures and
    /// successes count in the shared cooldowns. `false` for a request-scoped copy built from the
    /// caller's forwarded key or URL.
    pub shared: bool,
    /// Longest time a whole non-streamed answer may take (zero = no bound).
    pub unary_timeout: Duration,
}

impl Candidate {
    /// The server's own `provider`, asked for `model`, with no cap on a whole answer.
    pub fn new(provider: Arc<dyn Provider>, model: impl Into<String>) -> Self {
        Self {
            provider,
            model: model.into(),
            shared: true,
            unary_timeout: Duration::ZERO,
        }
    }
}

/// An answer that has started: who is answering and the deltas, first one included.
pub struct Answer {
    /// The provider that answers.
    pub provider: String,
    /// Its model.
    pub model: String,
    /// The deltas.
    pub stream: DeltaStream,
    /// The provider and model's LLM metric series when metrics are on and the time to the first
    /// delta was counted in it, so that counting the rest of the call needs no second lookup
    /// (the gateway takes it for that; `None` on the answers it hands on).
    pub series: Option<Arc<LlmSeries>>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("provider", &self.provider)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Whose fault a failure is, which decides the cooldown it starts (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The provider as a whole: unreachable, or the server's key refused.
    Provider,
    /// The provider for this model: rate limited, failing, silent or garbled.
    Model,
    /// The request: nothing cools down.
    Caller,
}

impl Blame {
    /// The blame of an upstream failure of the server's own provider.
    pub fn of(u: &UpstreamError) -> Self {
        match u.class {
            ErrorClass::Transport => Blame::Provider,
            // 403: the key is valid but may not use what the request named (usually its model).
            ErrorClass::Auth if u.status == Some(403) => Blame::Caller,
            ErrorClass::Auth => Blame::Provider,
            ErrorClass::RateLimit
            | ErrorClass::Server
            | ErrorClass::Timeout
            | ErrorClass::Malformed => Blame::Model,
            ErrorClass::ModelNotFound | ErrorClass::BadRequest | ErrorClass::ContextTooLong => {
                Blame::Caller
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Cooling {
    failures: u32,
    until: Instant,
    class: ErrorClass,
}

/// Most cooldown entries kept; past it, expired entries are dropped, and new per-model entries are
/// not recorded while every kept one is still running (so that callers naming ever new models
/// cannot grow the map).
const MAX_COOLDOWNS: usize = 1024;

/// Longest model name a per-model cooldown is kept for.
const MAX_MODEL_KEY: usize = 256;

/// A cooldown's key: lower-case provider name, and the model for a per-model cooldown.
type CoolKey = (String, Option<String>);

/// Cooldown state per provider and per (provider, model). It lives beside the prepared config, so
/// a reload that keeps a provider keeps its cooldowns.
#[derive(Debug, Default)]
pub struct Cooldowns {
    inner: Mutex<HashMap<CoolKey, Cooling>>,
}

/// One cooldown, for `/status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CooldownInfo {
    /// Provider name.
    pub provider: String,
    /// The model, for a per-model cooldown; `None` when the whole provider cools down.
    pub model: Option<String>,
    /// Time left.
    pub remaining: Duration,
    /// Consecutive failures.
    pub failures: u32,
    /// The class of the last failure.
    pub reason: &'static str,
}

impl Cooldowns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CoolKey, Cooling>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `name` (as a whole, or for `model`) cools down: the time left and why.
    fn cooling(&self, name: &str, model: &str) -> Option<(Duration, ErrorClass)> {
        let map = self.lock();
        if map.is_empty() {
            return None;
        }
        let now = Instant::now();
        let name = name.to_ascii_lowercase();
        let whole = map.get(&(name.clone(), None));
        let one = map.get(&(name, Some(model.to_string())));
        [whole, one]
            .into_iter()
            .flatten()
            .filter(|c| c.until > now)
            .max_by_key(|c| c.until)
            .map(|c| (c.until - now, c.class))
    }

    /// Counts a failure of `name` asked for `model`, by its blame.
    fn fail(&self, name: &str, model: &str, u: &UpstreamError, s: &FallbackSettings) {
        let key = match Blame::of(u) {
            Blame::Caller => return,
            Blame::Provider => (name.to_ascii_lowercase(), None),
            Blame::Model if model.len() > MAX_MODEL_KEY => return,
            Blame::Model => (name.to_ascii_lowercase(), Some(model.to_string())),
        };
        let mut map = self.lock();
        let now = Instant::now();
        if !map.contains_key(&key) && map.len() >= MAX_COOLDOWNS {
            map.retain(|_, c| c.until > now);
            if map.len() >= MAX_COOLDOWNS && key.1.is_some() {
                tracing::debug!(
                    provider = name,
                    "too many cooldowns running; this one is not kept"
                );
                return;
            }
        }
        let entry = map.entry(key).or_insert(Cooling {
            failures: 0,
            until: now,
            class: u.class,
        });
        entry.failures += 1;
        entry.class = u.class;
        let wait = if u.class == ErrorClass::Auth {
            s.cooldown_max
        } else {
            let factor = 2u32.saturating_pow(entry.failures.saturating_sub(1).min(16));
            s.cooldown_base.saturating_mul(factor).min(s.cooldown_max)
        };
        entry.until = now + wait;
    }

    /// `name` answered for `model`: it is reachable and its key works, and this model works.
    fn succeed(&self, name: &str, model: &str) {
        let mut map = self.lock();
        // The common case, on every answered call: nothing is cooling down.
        if map.is_empty() {
            return;
        }
        let name = name.to_ascii_lowercase();
        map.remove(&(name.clone(), Some(model.to_string())));
        map.remove(&(name, None));
    }

    /// Cooldowns running now.
    pub fn snapshot(&self) -> Vec<CooldownInfo> {
        let now = Instant::now();
        let mut v: Vec<CooldownInfo> = self
            .lock()
            .iter()
            .filter(|(_, c)| c.until > now)
            .map(|((name, model), c)| CooldownInfo {
                provider: name.clone(),
                model: model.clone(),
                remaining: c.until - now,
                failures: c.failures,
                reason: c.class.as_str(),
            })
            .collect();
        v.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
        v
    }
}

/// How one try of one provider failed.
struct Failed {
    error: LlmError,
    /// The caller's deadline or the `unary_timeout` cap ended it: the provider is not to blame, and
    /// trying it again does not help.
    cut: bool,
}

/// What one try of a provider produced: the start of a stream, or a whole answer.
struct Started {
    stream: DeltaStream,
    /// When the first delta came (none for an empty answer).
    first_delta: Option<Duration>,
}

/// One try of `c`: for a stream, up to its first delta (bounded by the caller's deadline); for a
/// whole answer, to its end (bounded by the deadline and the candidate's `unary_timeout`). Dropping
/// the provider's stream on a failure closes its connection.
async fn try_once(
    c: &Candidate,
    request: &ChatRequest,
    deadline: Option<Instant>,
) -> Result<Started, Failed> {
    let name = c.provider.name();
    let started = Instant::now();
    let mut stream = c.provider.stream(request);
    if request.stream {
        let first = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), stream.next()).await {
                Ok(item) => item,
                Err(_) => return Err(deadline_passed(name)),
            },
            None => stream.next().await,
        };
        return match first {
            Some(Ok(delta)) => Ok(Started {
                first_delta: Some(started.elapsed()),
                stream: Box::pin(futures::stream::once(async move { Ok(delta) }).chain(stream)),
            }),
            None => Ok(Started {
                first_delta: None,
                stream: Box::pin(futures::stream::empty()),
            }),
            Some(Err(error)) => Err(Failed { error, cut: false }),
        };
    }
    let cap = (!c.unary_timeout.is_zero()).then(|| started + c.unary_timeout);
    let mut deltas: Vec<Delta> = Vec::new();
    let mut first_delta = None;
    let read = async {
        while let Some(item) = stream.next().await {
            first_delta.get_or_insert_with(|| started.elapsed());
            match (item?, deltas.last_mut()) {
                // Kept as one text: the caller joins it anyway.
                (Delta::Text(t), Some(Delta::Text(all))) => all.push_str(&t),
                (d, _) => deltas.push(d),
            }
        }
        Ok::<(), LlmError>(())
    };
    let limit = match (deadline, cap) {
        (Some(d), Some(c)) => Some(d.min(c)),
        (d, c) => d.or(c),
    };
    let outcome = match limit {
        Some(at) => tokio::time::timeout_at(at.into(), read).await.ok(),
        None => Some(read.await),
    };
    match outcome {
        Some(Ok(())) => Ok(Started {
            first_delta,
            stream: Box::pin(futures::stream::iter(deltas.into_iter().map(Ok))),
        }),
        Some(Err(error)) => Err(Failed { error, cut: false }),
        None if deadline.is_some_and(|d| Some(d) == limit) => Err(deadline_passed(name)),
        None => Err(Failed {
            error: LlmError::upstream(
                name,
                ErrorClass::Timeout,
                format!(
                    "the whole answer took longer than {}s (unary_timeout)",
                    c.unary_timeout.as_secs_f64()
                ),
            ),
            cut: true,
        }),
    }
}

fn deadline_passed(name: &str) -> Failed {
    Failed {
        error: LlmError::upstream(name, ErrorClass::Timeout, "the caller's deadline passed"),
        cut: true,
    }
}

/// Starts the first candidate that produces a first delta (for a non-streamed request: a whole
/// answer). Cooldowns apply only when there is more than one candidate (a lone provider is always
/// tried). `deadline` is the caller's.
pub async fn start(
    candidates: Vec<Candidate>,
    mut request: ChatRequest,
    settings: &FallbackSettings,
    cooldowns: &Cooldowns,
    metrics: Option<&Metrics>,
    deadline: Option<Instant>,
) -> Result<Answer, LlmError> {
    let chain = candidates.len() > 1;
    let mut failures: Vec<UpstreamError> = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        let name = c.provider.name().to_string();
        let next = candidates.get(i + 1).map(|n| n.provider.name().to_string());
        if chain
            && c.shared
            && let Some((left, class)) = cooldowns.cooling(&name, &c.model)
        {
            failures.push(UpstreamError {
                provider: name.clone(),
                class,
                status: None,
                message: format!(
                    "cooling down for {}s after repeated failures",
                    left.as_secs().max(1)
                ),
                retry_after: Some(left),
            });
            if let (Some(m), Some(to)) = (metrics, &next) {
                m.record_fallback(&name, to, "cooldown");
            }
            continue;
        }
        // Built at the first failure: most calls never need it.
        let mut backoff = None;
        let mut attempt = 0u32;
        let (failure, cut) = loop {
            if request.model != c.model {
                request.model.clone_from(&c.model);
            }
            let Failed { error, cut } = match try_once(c, &request, deadline).await {
                Ok(Started {
                    stream,
                    first_delta,
                }) => {
                    if c.shared {
                        cooldowns.succeed(&name, &c.model);
                    }
                    let series = first_delta
                        .and_then(|ttft| metrics.map(|m| (m.llm(&name, &c.model), ttft)))
                        .map(|(s, ttft)| {
                            s.ttft(ttft);
                            s
                        });
                    return Ok(Answer {
                        provider: name,
                        model: c.model.clone(),
                        stream,
                        series,
                    });
                }
                Err(f) => f,
            };
            let LlmError::Upstream(u) = error else {
                return Err(error);
            };
            if !u.class.should_fall_back() {
                return Err(LlmError::Upstream(u));
            }
            if cut {
                break (u, true);
            }
            let wait = match u.retry_after {
                Some(w) if w <= settings.max_retry_wait => Some(w),
                Some(_) => None,
                None => backoff
                    .get_or_insert_with(|| {
                        backon::ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(200))
                            .with_max_delay(Duration::from_secs(5))
                            .with_jitter()
                            .build()
                    })
                    .next(),
            };
            let past_deadline = |w: Duration| deadline.is_some_and(|d| Instant::now() + w >= d);
            match wait {
                Some(w)
                    if u.class.is_retryable()
                        && attempt < settings.max_retries
                        && !past_deadline(w) =>
                {
                    attempt += 1;
                    tracing::debug!(provider = %name, class = u.class.as_str(), attempt, wait = ?w, "retrying");
                    tokio::time::sleep(w).await;
                }
                _ => break (u, false),
            }
        };
        tracing::warn!(provider = %name, class = failure.class.as_str(), status = ?failure.status, message = %failure.message, "provider failed");
        if chain && c.shared && !cut {
            cooldowns.fail(&name, &c.model, &failure, settings);
        }
        if let (Some(m), Some(to)) = (metrics, &next) {
            m.record_fallback(&name, to, failure.class.as_str());
        }
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if out_of_time && cut {
            // The caller's deadline ended the call: that is what it is told (DEADLINE_EXCEEDED),
            // not that every provider failed.
            return Err(LlmError::Upstream(failure));
        }
        failures.push(failure);
        if out_of_time {
            break;
        }
    }
    match (candidates.len(), failures.len()) {
        (1, 1) => Err(LlmError::Upstream(failures.remove(0))),
        _ => Err(LlmError::AllFailed(failures)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::llm::{Delta, DeltaStream, ProviderKind};

    /// A provider answering from a script: each call pops one outcome. A stalling one yields its
    /// one outcome on every call and then goes silent, forever.
    #[derive(Debug)]
    struct Scripted {
        name: String,
        script: Mutex<VecDeque<Vec<Result<Delta, LlmError>>>>,
        stalls: bool,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn new(name: &str, script: Vec<Vec<Result<Delta, LlmError>>>) -> Arc<Self> {
            Arc::new(Self {
                name: name.into(),
                script: Mutex::new(script.into()),
                stalls: false,
                calls: AtomicUsize::new(0),
            })
        }
        fn stalling(name: &str, items: Vec<Result<Delta, LlmError>>) -> Arc<Self> {
            Arc::new(Self {
                name: name.into(),
                script: Mutex::new(VecDeque::from([items])),
                stalls: true,
                calls: AtomicUsize::new(0),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Provider for Scripted {
        fn name(&self) -> &str {
            &self.name
        }
        fn kind(&self) -> ProviderKind {
            ProviderKind::Echo
        }
        fn default_model(&self) -> &str {
            "m"
        }
        fn stream(&self, _request: &ChatRequest) -> DeltaStream {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut script = self.script.lock().unwrap();
            if self.stalls {
                let items = script.front().cloned().unwrap_or_default();
                return Box::pin(futures::stream::iter(items).chain(futures::stream::pending()));
            }
            Box::pin(futures::stream::iter(
                script.pop_front().unwrap_or_default(),
            ))
        }
    }

    /// [`start`] of an empty request for model `m`, without metrics or deadline.
    async fn start_m(
        candidates: Vec<Candidate>,
        settings: &FallbackSettings,
        cooldowns: &Cooldowns,
    ) -> Result<Answer, LlmError> {
        start(
            candidates,
            ChatRequest::new(vec![], "m"),
            settings,
            cooldowns,
            None,
            None,
        )
        .await
    }

    fn fail_with(p: &str, class: ErrorClass, status: Option<u16>) -> Result<Delta, LlmError> {
        Err(LlmError::Upstream(UpstreamError {
            provider: p.into(),
            class,
            status,
            message: format!("{} failed", class.as_str()),
            retry_after: None,
        }))
    }

    fn unary() -> ChatRequest {
        let mut r = ChatRequest::new(vec![], "m");
        r.stream = false;
        r
    }

    fn fail(p: &str, class: ErrorClass, retry_after: Option<Duration>) -> Result<Delta, LlmError> {
        Err(LlmError::Upstream(UpstreamError {
            provider: p.into(),
            class,
            status: None,
            message: format!("{} failed", class.as_str()),
            retry_after,
        }))
    }

    fn text(t: &str) -> Result<Delta, LlmError> {
        Ok(Delta::Text(t.into()))
    }

    fn cands(ps: &[&Arc<Scripted>]) -> Vec<Candidate> {
        ps.iter()
            .map(|p| Candidate::new((*p).clone() as Arc<dyn Provider>, "m"))
            .collect()
    }

    fn settings(max_retries: u32) -> FallbackSettings {
        FallbackSettings {
            max_retries,
            max_retry_wait: Duration::from_millis(50),
            ..Default::default()
        }
    }

    async fn answer_text(a: Answer) -> (String, Result<String, LlmError>) {
        (
            a.provider.clone(),
            crate::llm::collect(a.stream).await.map(|(t, _)| t),
        )
    }

    #[tokio::test]
    async fn rate_limited_primary_hands_over_to_the_secondary() {
        let a = Scripted::new(
            "a",
            vec![vec![fail(
                "a",
                ErrorClass::RateLimit,
                Some(Duration::from_secs(60)),
            )]],
        );
        let b = Scripted::new("b", vec![vec![text("from"), text(" b")]]);
        let cd = Cooldowns::default();
        let ans = start_m(cands(&[&a, &b]), &settings(2), &cd).await.unwrap();
        let (who, t) = answer_text(ans).await;
        assert_eq!((who.as_str(), t.unwrap().as_str()), ("b", "from b"));
        // A Retry-After longer than we wait moves on at once, without retrying a.
        assert_eq!(a.calls(), 1);
        assert_eq!(
            cd.snapshot()
                .iter()
                .map(|c| c.provider.as_str())
                .collect::<Vec<_>>(),
            vec!["a"]
        );
    }

    #[tokio::test]
    async fn short_retry_after_retries_the_same_provider() {
        let a = Scripted::new(
            "a",
            vec![
                vec![fail(
                    "a",
                    ErrorClass::RateLimit,
                    Some(Duration::from_millis(10)),
                )],
                vec![text("ok")],
            ],
        );
        let cd = Cooldowns::default();
        let ans = start_m(cands(&[&a]), &settings(2), &cd).await.unwrap();
        assert_eq!(answer_text(ans).await.1.unwrap(), "ok");
        assert_eq!(a.calls(), 2);
    }

    #[tokio::test]
    async fn auth_failure_cools_down_and_is_skipped_next_time() {
        let a = Scripted::new(
            "a",
            vec![vec![fail("a", ErrorClass::Auth, None)], vec![text("never")]],
        );
        let b = Scripted::new("b", vec![vec![text("b1")], vec![text("b2")]]);
        let cd = Cooldowns::default();
        let s = settings(2);
        let first = start_m(cands(&[&a, &b]), &s, &cd).await.unwrap();
        assert_eq!(answer_text(first).await.0, "b");
        assert_eq!(a.calls(), 1, "auth failures are not retried");
        let snap = cd.snapshot();
        assert_eq!(snap[0].reason, "auth_error");
        assert!(
            snap[0].remaining > s.cooldown_base,
            "auth cools down to the maximum at once"
        );
        let second = start_m(cands(&[&a, &b]), &s, &cd).await.unwrap();
        assert_eq!(answer_text(second).await.0, "b");
        assert_eq!(a.calls(), 1, "a cooling provider is skipped");
    }

    #[tokio::test]
    async fn every_provider_failing_lists_every_reason() {
        let a = Scripted::new("a", vec![vec![fail("a", ErrorClass::Auth, None)]]);
        let b = Scripted::new(
            "b",
            vec![
                vec![fail("b", ErrorClass::Server, None)],
                vec![fail("b", ErrorClass::Server, None)],
            ],
        );
        let cd = Cooldowns::default();
        let err = start_m(cands(&[&a, &b]), &settings(1), &cd)
            .await
            .unwrap_err();
        assert_eq!(b.calls(), 2, "one retry of a server error");
        let LlmError::AllFailed(list) = &err else {
            panic!("{err:?}")
        };
        let who: Vec<(&str, ErrorClass)> = list
            .iter()
            .map(|u| (u.provider.as_str(), u.class))
            .collect();
        assert_eq!(
            who,
            vec![("a", ErrorClass::Auth), ("b", ErrorClass::Server)]
        );
    }

    #[tokio::test]
    async fn a_failure_after_the_first_delta_is_reported_not_retried() {
        let a = Scripted::new(
            "a",
            vec![vec![
                text("partial"),
                fail("a", ErrorClass::Transport, None),
            ]],
        );
        let b = Scripted::new("b", vec![vec![text("b")]]);
        let cd = Cooldowns::default();
        let ans = start_m(cands(&[&a, &b]), &settings(2), &cd).await.unwrap();
        let (who, res) = answer_text(ans).await;
        assert_eq!(who, "a");
        assert!(matches!(res, Err(LlmError::Upstream(ref u)) if u.class == ErrorClass::Transport));
        assert_eq!((a.calls(), b.calls()), (1, 0));
    }

    #[tokio::test]
    async fn bad_requests_do_not_fall_back() {
        let a = Scripted::new("a", vec![vec![fail("a", ErrorClass::ContextTooLong, None)]]);
        let b = Scripted::new("b", vec![vec![text("b")]]);
        let err = start_m(cands(&[&a, &b]), &settings(2), &Cooldowns::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LlmError::Upstream(u) if u.class == ErrorClass::ContextTooLong),
            "{err:?}"
        );
        assert_eq!(b.calls(), 0);
    }

    #[tokio::test]
    async fn a_lone_provider_is_never_skipped_for_cooldown() {
        let a = Scripted::new(
            "a",
            vec![vec![fail("a", ErrorClass::Auth, None)], vec![text("ok")]],
        );
        let cd = Cooldowns::default();
        let s = settings(0);
        let err = start_m(cands(&[&a]), &s, &cd).await.unwrap_err();
        assert!(
            matches!(&err, LlmError::Upstream(u) if u.class == ErrorClass::Auth),
            "{err:?}"
        );
        let ok = start_m(cands(&[&a]), &s, &cd).await.unwrap();
        assert_eq!(answer_text(ok).await.1.unwrap(), "ok");
    }

    #[tokio::test]
    async fn the_deadline_stops_retries() {
        let a = Scripted::new(
            "a",
            vec![
                vec![fail("a", ErrorClass::Server, None)],
                vec![text("late")],
            ],
        );
        let cd = Cooldowns::default();
        let deadline = Some(Instant::now() + Duration::from_millis(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let err = start(
            cands(&[&a]),
            ChatRequest::new(vec![], "m"),
            &settings(3),
            &cd,
            None,
            deadline,
        )
        .await
        .unwrap_err();
        assert!(err.as_upstream().is_some());
        assert_eq!(a.calls(), 1);
    }

    #[tokio::test]
    async fn failures_the_caller_causes_start_no_cooldown() {
        // A model the upstream does not know, one the server's key may not use, a bad request.
        let a = Scripted::new(
            "a",
            vec![
                vec![fail_with("a", ErrorClass::ModelNotFound, Some(404))],
                vec![fail_with("a", ErrorClass::Auth, Some(403))],
                vec![fail_with("a", ErrorClass::BadRequest, Some(400))],
                vec![text("a answers")],
            ],
        );
        let b = Scripted::new("b", vec![vec![text("b")], vec![text("b")], vec![]]);
        let cd = Cooldowns::default();
        let s = settings(0);
        for _ in 0..3 {
            let _ = start_m(cands(&[&a, &b]), &s, &cd).await;
            assert!(cd.snapshot().is_empty(), "{:?}", cd.snapshot());
        }
        let ans = start_m(cands(&[&a, &b]), &s, &cd).await.unwrap();
        assert_eq!(answer_text(ans).await.0, "a", "a was skipped");
        assert_eq!(a.calls(), 4);
    }

    #[tokio::test]
    async fn the_callers_deadline_starts_no_cooldown() {
        let a = Scripted::stalling("a", vec![]);
        let b = Scripted::new("b", vec![vec![text("b")]]);
        let cd = Cooldowns::default();
        let deadline = Some(Instant::now() + Duration::from_millis(50));
        let cands = vec![
            Candidate::new(a.clone() as Arc<dyn Provider>, "m"),
            Candidate::new(b.clone() as Arc<dyn Provider>, "m"),
        ];
        let err = start(
            cands,
            ChatRequest::new(vec![], "m"),
            &settings(2),
            &cd,
            None,
            deadline,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("deadline"), "{err}");
        assert_eq!(
            a.calls.load(Ordering::SeqCst),
            1,
            "a deadline is not retried"
        );
        assert!(cd.snapshot().is_empty(), "{:?}", cd.snapshot());
    }

    #[tokio::test]
    async fn rate_limits_cool_one_model_and_transport_failures_the_whole_provider() {
        let a = Scripted::new(
            "a",
            vec![
                vec![fail(
                    "a",
                    ErrorClass::RateLimit,
                    Some(Duration::from_secs(60)),
                )],
                vec![text("other model")],
                vec![fail("a", ErrorClass::Transport, None)],
            ],
        );
        let b = Scripted::new("b", vec![vec![text("b")]; 4]);
        let cd = Cooldowns::default();
        let s = settings(0);
        let on = |model: &str| {
            vec![
                Candidate::new(a.clone() as Arc<dyn Provider>, model),
                Candidate::new(b.clone() as Arc<dyn Provider>, "m"),
            ]
        };
        let ans = start(on("x"), ChatRequest::new(vec![], "x"), &s, &cd, None, None)
            .await
            .unwrap();
        assert_eq!(answer_text(ans).await.0, "b");
        let snap = cd.snapshot();
        assert_eq!(
            (snap.len(), snap[0].model.as_deref(), snap[0].reason),
            (1, Some("x"), "rate_limit")
        );
        // Another model of a is not cooling down.
        let ans = start(on("y"), ChatRequest::new(vec![], "y"), &s, &cd, None, None)
            .await
            .unwrap();
        let (who, t) = answer_text(ans).await;
        assert_eq!((who.as_str(), t.unwrap().as_str()), ("a", "other model"));
        // x still is: skipped without a call.
        let ans = start(on("x"), ChatRequest::new(vec![], "x"), &s, &cd, None, None)
            .await
            .unwrap();
        assert_eq!(answer_text(ans).await.0, "b");
        assert_eq!(a.calls(), 2);
        // A connection failure cools the whole provider: y is skipped too.
        let _ = start(on("y"), ChatRequest::new(vec![], "y"), &s, &cd, None, None).await;
        assert!(cd.snapshot().iter().any(|c| c.model.is_none()));
        let ans = start(on("z"), ChatRequest::new(vec![], "z"), &s, &cd, None, None)
            .await
            .unwrap();
        assert_eq!(answer_text(ans).await.0, "b");
        assert_eq!(a.calls(), 3);
    }

    #[tokio::test]
    async fn forwarded_credentials_neither_read_nor_write_the_cooldowns() {
        let a = Scripted::new(
            "a",
            vec![
                vec![fail("a", ErrorClass::Server, None)],
                vec![text("with the caller's key")],
                vec![fail("a", ErrorClass::Transport, None)],
            ],
        );
        let b = Scripted::new("b", vec![vec![text("b")]; 3]);
        let cd = Cooldowns::default();
        let s = settings(0);
        let callers = |p: &Arc<Scripted>| Candidate {
            shared: false,
            ..Candidate::new(p.clone() as Arc<dyn Provider>, "m")
        };
        // The server's a fails: it cools down.
        let _ = start_m(cands(&[&a, &b]), &s, &cd).await;
        assert_eq!(cd.snapshot().len(), 1);
        // A copy of a with the caller's key is not skipped for it, and its success clears nothing.
        let ans = start_m(
            vec![
                callers(&a),
                Candidate::new(b.clone() as Arc<dyn Provider>, "m"),
            ],
            &s,
            &cd,
        )
        .await
        .unwrap();
        assert_eq!(answer_text(ans).await.0, "a");
        assert_eq!(
            cd.snapshot().len(),
            1,
            "the caller's success cleared a cooldown"
        );
        // Its failure starts none.
        let before = cd.snapshot();
        let _ = start_m(
            vec![
                callers(&a),
                Candidate::new(b.clone() as Arc<dyn Provider>, "m"),
            ],
            &s,
            &cd,
        )
        .await;
        let after = cd.snapshot();
        assert_eq!(
            (after.len(), after[0].failures, after[0].model.as_deref()),
            (1, before[0].failures, Some("m"))
        );
    }

    #[tokio::test]
    async fn a_whole_answer_that_fails_midway_falls_back_since_nothing_was_sent() {
        let a = Scripted::new(
            "a",
            vec![vec![text("half an "), fail("a", ErrorClass::Timeout, None)]],
        );
        let b = Scripted::new("b", vec![vec![text("whole "), text("answer")]]);
        let cd = Cooldowns::default();
        let ans = start(cands(&[&a, &b]), unary(), &settings(0), &cd, None, None)
            .await
            .unwrap();
        let (who, t) = answer_text(ans).await;
        assert_eq!((who.as_str(), t.unwrap().as_str()), ("b", "whole answer"));
        // The silence of a is the provider's: its model cools down.
        assert_eq!(cd.snapshot()[0].reason, "timeout");
    }

    #[tokio::test]
    async fn the_unary_cap_ends_a_trickle_moves_on_and_blames_no_one() {
        let a = Scripted::stalling("a", vec![text("a trickle that never ends")]);
        let b = Scripted::new("b", vec![vec![text("b")]]);
        let cd = Cooldowns::default();
        let capped = Candidate {
            unary_timeout: Duration::from_millis(100),
            ..Candidate::new(a.clone() as Arc<dyn Provider>, "m")
        };
        let ans = start(
            vec![
                capped.clone(),
                Candidate::new(b.clone() as Arc<dyn Provider>, "m"),
            ],
            unary(),
            &settings(2),
            &cd,
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(answer_text(ans).await.0, "b");
        assert_eq!(a.calls.load(Ordering::SeqCst), 1, "the cap is not retried");
        assert!(cd.snapshot().is_empty(), "{:?}", cd.snapshot());
        // Alone, it is a timeout.
        let err = start(vec![capped], unary(), &settings(0), &cd, None, None)
            .await
            .unwrap_err();
        let u = err.as_upstream().unwrap();
        assert_eq!(u.class, ErrorClass::Timeout);
        assert!(u.message.contains("unary_timeout"), "{}", u.message);
    }

    #[test]
    fn callers_naming_ever_new_models_cannot_grow_the_cooldowns_without_bound() {
        let cd = Cooldowns::default();
        let s = FallbackSettings::default();
        let u = UpstreamError {
            provider: "a".into(),
            class: ErrorClass::Server,
            status: Some(500),
            message: String::new(),
            retry_after: None,
        };
        for i in 0..MAX_COOLDOWNS + 100 {
            cd.fail("a", &format!("model-{i}"), &u, &s);
        }
        cd.fail("a", &"x".repeat(MAX_MODEL_KEY + 1), &u, &s);
        assert_eq!(cd.snapshot().len(), MAX_COOLDOWNS);
        // A whole-provider cooldown is still kept.
        let down = UpstreamError {
            class: ErrorClass::Transport,
            status: None,
            ..u
        };
        cd.fail("a", "m", &down, &s);
        assert!(cd.snapshot().iter().any(|c| c.model.is_none()));
    }
}
