//! The models a provider's upstream says it offers (`discover_models`), kept per provider of a
//! prepared config. A list is fetched when `/v1/models` first needs it, and again once it is
//! older than the provider's `models_refresh`: a listing waits (a bounded time) for the first
//! fetch after a start or a reload, and serves the list it has while a later refresh runs in the
//! background. A failed fetch keeps the list it had (the previous config's, across a reload) and
//! is tried again at the next listing a minute later at the soonest. Nothing is fetched without a
//! listing, so a `config check` or a server nobody asks for models makes no upstream call.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::Provider;

/// Longest time between two tries of a list whose fetch failed.
const RETRY_FAILED: Duration = Duration::from_secs(60);

/// One provider's discovered models.
pub struct Discovered {
    provider: Arc<dyn Provider>,
    refresh: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    models: Vec<String>,
    /// Until when `models` needs no fetch; `None` until this config generation fetched once.
    fresh_until: Option<Instant>,
    /// The fetch running now.
    fetching: Option<Shared<BoxFuture<'static, ()>>>,
}

impl std::fmt::Debug for Discovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovered")
            .field("provider", &self.provider.name())
            .field("refresh", &self.refresh)
            .field("models", &self.models().len())
            .finish_non_exhaustive()
    }
}

impl Discovered {
    /// The list of `provider`, refreshed every `refresh`; `carried` is what the previous config
    /// knew (served until, and if, a fetch of this one succeeds).
    pub fn new(provider: Arc<dyn Provider>, refresh: Duration, carried: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            provider,
            refresh,
            state: Mutex::new(State {
                models: carried,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The models known now.
    pub fn models(&self) -> Vec<String> {
        self.lock().models.clone()
    }

    /// Whether this config generation has fetched the list (successfully or not).
    pub fn fetched(&self) -> bool {
        self.lock().fresh_until.is_some()
    }

    /// Whether `model` is in the list known now.
    pub fn contains(&self, model: &str) -> bool {
        self.lock().models.iter().any(|m| m == model)
    }

    /// Makes the list fit to show: waits up to `wait` for the first fetch of this config
    /// generation, and starts a background refresh of a stale one.
    pub async fn ensure_fresh(self: &Arc<Self>, wait: Duration) {
        let (fetch, first) = {
            let mut state = self.lock();
            let first = state.fresh_until.is_none();
            if !first && state.fresh_until.is_some_and(|t| Instant::now() < t) {
                return;
            }
            let fetch = state
                .fetching
                .get_or_insert_with(|| self.clone().spawn_fetch())
                .clone();
            (fetch, first)
        };
        if first && tokio::time::timeout(wait, fetch).await.is_err() {
            tracing::debug!(
                provider = self.provider.name(),
                "the model list is slow to come; listing what is known"
            );
        }
    }

    /// Starts a fetch in its own task (so that a listing that stops waiting does not stop it);
    /// the future completes when the fetch has updated the state.
    fn spawn_fetch(self: Arc<Self>) -> Shared<BoxFuture<'static, ()>> {
        let task = tokio::spawn(async move {
            let result = self.provider.discover_models().await;
            let mut state = self.lock();
            state.fetching = None;
            match result {
                Ok(mut models) => {
                    models.dedup();
                    tracing::debug!(
                        provider = self.provider.name(),
                        count = models.len(),
                        "model list fetched"
                    );
                    state.models = models;
                    state.fresh_until = Some(Instant::now() + self.refresh);
                }
                Err(e) => {
                    tracing::warn!(
                        provider = self.provider.name(),
                        error = %e,
                        "cannot list the upstream's models; keeping the list known so far"
                    );
                    state.fresh_until = Some(Instant::now() + self.refresh.min(RETRY_FAILED));
                }
            }
        });
        task.map(|_| ()).boxed().shared()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::llm::{ChatRequest, DeltaStream, LlmError, ProviderKind};

    /// A provider whose model lists come from a script, one per fetch.
    #[derive(Debug)]
    struct Lists {
        script: Mutex<VecDeque<Result<Vec<String>, LlmError>>>,
        fetches: AtomicUsize,
    }

    impl Provider for Lists {
        fn name(&self) -> &str {
            "p"
        }
        fn kind(&self) -> ProviderKind {
            ProviderKind::OpenAi
        }
        fn default_model(&self) -> &str {
            "m"
        }
        fn stream(&self, _request: &ChatRequest) -> DeltaStream {
            Box::pin(futures::stream::empty())
        }
        fn discover_models(&self) -> BoxFuture<'_, Result<Vec<String>, LlmError>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let next = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| Ok(Vec::new()));
            Box::pin(async move { next })
        }
    }

    fn lists(script: Vec<Result<Vec<String>, LlmError>>) -> Arc<Lists> {
        Arc::new(Lists {
            script: Mutex::new(script.into()),
            fetches: AtomicUsize::new(0),
        })
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn the_first_listing_waits_for_the_list_and_later_ones_use_it_until_it_is_stale() {
        let p = lists(vec![Ok(names(&["a", "b"])), Ok(names(&["a", "b", "c"]))]);
        let d = Discovered::new(p.clone(), Duration::from_millis(200), Vec::new());
        assert!(d.models().is_empty(), "nothing is fetched before a listing");
        d.ensure_fresh(WAIT).await;
        assert_eq!(d.models(), names(&["a", "b"]));
        d.ensure_fresh(WAIT).await;
        assert_eq!(
            p.fetches.load(Ordering::SeqCst),
            1,
            "a fresh list is not fetched again"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Stale: this listing starts a refresh and shows what it has.
        d.ensure_fresh(WAIT).await;
        let refreshed = async {
            while d.models().len() != 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        assert!(
            tokio::time::timeout(WAIT, refreshed).await.is_ok(),
            "{:?}",
            d.models()
        );
        assert_eq!(p.fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_carried_list() {
        let p = lists(vec![Err(LlmError::upstream(
            "p",
            crate::llm::ErrorClass::Transport,
            "down",
        ))]);
        let d = Discovered::new(p.clone(), Duration::from_secs(600), names(&["old"]));
        d.ensure_fresh(WAIT).await;
        assert_eq!(d.models(), names(&["old"]));
        d.ensure_fresh(WAIT).await;
        assert_eq!(
            p.fetches.load(Ordering::SeqCst),
            1,
            "a failed fetch is retried a while later, not at every listing"
        );
    }
}
