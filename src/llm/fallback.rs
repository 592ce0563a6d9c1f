//! The fallback chain: the resolved provider first, then the configured chain in order. Each
//! provider is retried on retryable failures (rate limit, timeout, 5xx, transport) with exponential
//! backoff and jitter, or after its `Retry-After` when that is short enough; then the next provider
//! is tried. A provider that keeps failing cools down (base × 2ⁿ, capped; an auth failure at once to
//! the cap) and is skipped while cooling. A stream falls back only before its first delta: once text
//! went to the caller, a failure is reported, never retried.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;
use futures::StreamExt;

use super::error::{ErrorClass, LlmError, UpstreamError};
use super::{ChatRequest, DeltaStream, Provider};
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

#[derive(Debug, Clone)]
struct Cooling {
    failures: u32,
    until: Instant,
    class: ErrorClass,
}

/// Cooldown state per provider name. It lives beside the prepared config, so a reload that keeps a
/// provider keeps its cooldown.
#[derive(Debug, Default)]
pub struct Cooldowns {
    inner: Mutex<HashMap<String, Cooling>>,
}

/// One provider's cooldown, for `/status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CooldownInfo {
    /// Provider name.
    pub provider: String,
    /// Time left.
    pub remaining: Duration,
    /// Consecutive failures.
    pub failures: u32,
    /// The class of the last failure.
    pub reason: &'static str,
}

impl Cooldowns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cooling>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cooling(&self, name: &str) -> Option<(Duration, ErrorClass)> {
        let map = self.lock();
        let c = map.get(&name.to_ascii_lowercase())?;
        let now = Instant::now();
        (c.until > now).then(|| (c.until - now, c.class))
    }

    fn fail(&self, name: &str, class: ErrorClass, s: &FallbackSettings) {
        let mut map = self.lock();
        let entry = map.entry(name.to_ascii_lowercase()).or_insert(Cooling {
            failures: 0,
            until: Instant::now(),
            class,
        });
        entry.failures += 1;
        entry.class = class;
        let wait = if class == ErrorClass::Auth {
            s.cooldown_max
        } else {
            let factor = 2u32.saturating_pow(entry.failures.saturating_sub(1).min(16));
            s.cooldown_base.saturating_mul(factor).min(s.cooldown_max)
        };
        entry.until = Instant::now() + wait;
    }

    fn succeed(&self, name: &str) {
        let mut cooling = self.lock();
        // The common case, on every answered call: nothing is cooling down.
        if !cooling.is_empty() {
            cooling.remove(&name.to_ascii_lowercase());
        }
    }

    /// Providers cooling down now.
    pub fn snapshot(&self) -> Vec<CooldownInfo> {
        let now = Instant::now();
        let mut v: Vec<CooldownInfo> = self
            .lock()
            .iter()
            .filter(|(_, c)| c.until > now)
            .map(|(name, c)| CooldownInfo {
                provider: name.clone(),
                remaining: c.until - now,
                failures: c.failures,
                reason: c.class.as_str(),
            })
            .collect();
        v.sort_by(|a, b| a.provider.cmp(&b.provider));
        v
    }
}

/// Starts the first candidate that produces a first delta. Cooldowns apply only when there is more
/// than one candidate (a lone provider is always tried). `deadline` is the caller's.
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
        if chain && let Some((left, class)) = cooldowns.cooling(&name) {
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
        let failure = loop {
            if request.model != c.model {
                request.model.clone_from(&c.model);
            }
            let started = Instant::now();
            let mut stream = c.provider.stream(&request);
            let first = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), stream.next()).await {
                    Ok(item) => item,
                    Err(_) => Some(Err(LlmError::upstream(
                        &name,
                        ErrorClass::Timeout,
                        "the caller's deadline passed",
                    ))),
                },
                None => stream.next().await,
            };
            let err = match first {
                Some(Ok(delta)) => {
                    cooldowns.succeed(&name);
                    let series = metrics.map(|m| m.llm(&name, &c.model));
                    if let Some(s) = &series {
                        s.ttft(started.elapsed());
                    }
                    let rest = futures::stream::once(async move { Ok(delta) }).chain(stream);
                    return Ok(Answer {
                        provider: name,
                        model: c.model.clone(),
                        stream: Box::pin(rest),
                        series,
                    });
                }
                None => {
                    cooldowns.succeed(&name);
                    return Ok(Answer {
                        provider: name,
                        model: c.model.clone(),
                        stream: Box::pin(futures::stream::empty()),
                        series: None,
                    });
                }
                Some(Err(e)) => e,
            };
            let LlmError::Upstream(u) = err else {
                return Err(err);
            };
            if !u.class.should_fall_back() {
                return Err(LlmError::Upstream(u));
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
                _ => break u,
            }
        };
        tracing::warn!(provider = %name, class = failure.class.as_str(), status = ?failure.status, "provider failed");
        if chain {
            cooldowns.fail(&name, failure.class, settings);
        }
        if let (Some(m), Some(to)) = (metrics, &next) {
            m.record_fallback(&name, to, failure.class.as_str());
        }
        failures.push(failure);
        if deadline.is_some_and(|d| Instant::now() >= d) {
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

    /// A provider answering from a script: each call pops one outcome.
    #[derive(Debug)]
    struct Scripted {
        name: String,
        script: Mutex<VecDeque<Vec<Result<Delta, LlmError>>>>,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn new(name: &str, script: Vec<Vec<Result<Delta, LlmError>>>) -> Arc<Self> {
            Arc::new(Self {
                name: name.into(),
                script: Mutex::new(script.into()),
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
            let items = self.script.lock().unwrap().pop_front().unwrap_or_default();
            Box::pin(futures::stream::iter(items))
        }
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
            .map(|p| Candidate {
                provider: (*p).clone() as Arc<dyn Provider>,
                model: "m".into(),
            })
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
        let ans = start(
            cands(&[&a, &b]),
            ChatRequest::new(vec![], "m"),
            &settings(2),
            &cd,
            None,
            None,
        )
        .await
        .unwrap();
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
        let ans = start(
            cands(&[&a]),
            ChatRequest::new(vec![], "m"),
            &settings(2),
            &cd,
            None,
            None,
        )
        .await
        .unwrap();
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
        let first = start(
            cands(&[&a, &b]),
            ChatRequest::new(vec![], "m"),
            &s,
            &cd,
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(answer_text(first).await.0, "b");
        assert_eq!(a.calls(), 1, "auth failures are not retried");
        let snap = cd.snapshot();
        assert_eq!(snap[0].reason, "auth_error");
        assert!(
            snap[0].remaining > s.cooldown_base,
            "auth cools down to the maximum at once"
        );
        let second = start(
            cands(&[&a, &b]),
            ChatRequest::new(vec![], "m"),
            &s,
            &cd,
            None,
            None,
        )
        .await
        .unwrap();
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
        let err = start(
            cands(&[&a, &b]),
            ChatRequest::new(vec![], "m"),
            &settings(1),
            &cd,
            None,
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(b.calls(), 2, "one retry of a server error");
        assert_eq!(err.to_status().code(), tonic::Code::Unavailable);
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
        let ans = start(
            cands(&[&a, &b]),
            ChatRequest::new(vec![], "m"),
            &settings(2),
            &cd,
            None,
            None,
        )
        .await
        .unwrap();
        let (who, res) = answer_text(ans).await;
        assert_eq!(who, "a");
        assert!(matches!(res, Err(LlmError::Upstream(ref u)) if u.class == ErrorClass::Transport));
        assert_eq!((a.calls(), b.calls()), (1, 0));
    }

    #[tokio::test]
    async fn bad_requests_do_not_fall_back() {
        let a = Scripted::new("a", vec![vec![fail("a", ErrorClass::ContextTooLong, None)]]);
        let b = Scripted::new("b", vec![vec![text("b")]]);
        let err = start(
            cands(&[&a, &b]),
            ChatRequest::new(vec![], "m"),
            &settings(2),
            &Cooldowns::default(),
            None,
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_status().code(), tonic::Code::InvalidArgument);
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
        let err = start(
            cands(&[&a]),
            ChatRequest::new(vec![], "m"),
            &s,
            &cd,
            None,
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_status().code(), tonic::Code::Unavailable);
        let ok = start(
            cands(&[&a]),
            ChatRequest::new(vec![], "m"),
            &s,
            &cd,
            None,
            None,
        )
        .await
        .unwrap();
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
}
