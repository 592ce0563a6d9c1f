//! The providers configured for this server, in config order, with the default one, the fallback
//! settings and the models each offers (its default, its configured `models`, what its upstream
//! reports when `discover_models` is on). Names match case-insensitively, so ChatCLI clients
//! sending `ECHO` or `OpenAI` find `echo` and `openai`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::fallback::{Candidate, FallbackSettings};
use super::models::Discovered;
use super::{LlmError, Provider, ProviderContext};
use crate::config::LlmConfig;

/// What a request resolved to: the provider and the model to ask it for.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// The model.
    pub model: String,
    /// The provider's cap on a whole non-streamed answer (`unary_timeout`).
    pub unary_timeout: Duration,
}

/// See the module docs.
#[derive(Debug, Clone, Default)]
pub struct ProviderRegistry {
    providers: Vec<Arc<dyn Provider>>,
    /// A digest of each provider's settings (secrets included), to reuse unchanged providers, with
    /// their connection pools, across reloads.
    fingerprints: Vec<String>,
    /// Each provider's `unary_timeout`, in the same order.
    unary_timeouts: Vec<Duration>,
    /// Each provider's models besides its default, in the same order.
    models: Vec<Offered>,
    default: Option<usize>,
    default_model: Option<String>,
    fallback: FallbackSettings,
}

impl ProviderRegistry {
    /// Builds every provider of a validated config; the errors name each provider that cannot be built.
    pub fn build(llm: &LlmConfig, ctx: &ProviderContext) -> Result<Self, Vec<String>> {
        Self::build_reusing(llm, ctx, None)
    }

    /// Like [`build`](Self::build), but a provider whose settings did not change since `previous`
    /// is kept as it is (same HTTP connection pool, same token cache).
    pub fn build_reusing(
        llm: &LlmConfig,
        ctx: &ProviderContext,
        previous: Option<&ProviderRegistry>,
    ) -> Result<Self, Vec<String>> {
        let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
        let mut fingerprints = Vec::new();
        let mut unary_timeouts = Vec::new();
        let mut models = Vec::new();
        let mut errors = Vec::new();
        for p in &llm.providers {
            let fp = fingerprint(p, llm);
            let kept = previous.and_then(|prev| {
                prev.fingerprints
                    .iter()
                    .position(|f| *f == fp)
                    .and_then(|i| prev.providers.get(i).cloned())
            });
            match kept
                .map(Ok)
                .unwrap_or_else(|| super::build_provider(p, ctx))
            {
                Ok(built) => {
                    models.push(Offered::of(p, &built, previous));
                    providers.push(built);
                    fingerprints.push(fp);
                    unary_timeouts.push(p.unary_timeout);
                }
                Err(e) => errors.push(format!("provider `{}`: {e}", p.name)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let default = match &llm.default {
            Some(name) => providers
                .iter()
                .position(|p| p.name().eq_ignore_ascii_case(name)),
            None if providers.is_empty() => None,
            None => Some(0),
        };
        let fallback = FallbackSettings {
            chain: llm.fallback.clone(),
            max_retries: llm.fallback_max_retries,
            cooldown_base: llm.fallback_cooldown_base,
            cooldown_max: llm.fallback_cooldown_max,
            max_retry_wait: Duration::from_secs(10),
            models: llm
                .fallback_models
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect::<HashMap<_, _>>(),
        };
        Ok(Self {
            providers,
            fingerprints,
            unary_timeouts,
            models,
            default,
            default_model: llm.model.clone(),
            fallback,
        })
    }

    /// The default provider, if any is configured.
    pub fn default_provider(&self) -> Option<&Arc<dyn Provider>> {
        self.default.and_then(|i| self.providers.get(i))
    }

    /// The model used when a request names neither provider nor model.
    pub fn default_model(&self) -> String {
        match (&self.default_model, self.default_provider()) {
            (Some(m), _) => m.clone(),
            (None, Some(p)) => p.default_model().to_string(),
            (None, None) => String::new(),
        }
    }

    /// Names of every configured provider, in config order.
    pub fn names(&self) -> Vec<String> {
        self.providers
            .iter()
            .map(|p| p.name().to_string())
            .collect()
    }

    /// Every provider, in config order.
    pub fn providers(&self) -> &[Arc<dyn Provider>] {
        &self.providers
    }

    /// Whether any provider is configured.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// The fallback settings.
    pub fn fallback(&self) -> &FallbackSettings {
        &self.fallback
    }

    fn find(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers
            .iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
    }

    /// The `unary_timeout` of `provider` (one of ours, by identity).
    fn unary_timeout_of(&self, provider: &Arc<dyn Provider>) -> Duration {
        self.providers
            .iter()
            .position(|p| Arc::ptr_eq(p, provider))
            .and_then(|i| self.unary_timeouts.get(i).copied())
            .unwrap_or_default()
    }

    /// Resolves a request's provider and model; empty strings mean "the default".
    pub fn resolve(&self, provider: &str, model: &str) -> Result<Resolved, LlmError> {
        let provider = provider.trim();
        let chosen = if provider.is_empty() {
            self.default_provider()
                .ok_or(LlmError::NoProviders)?
                .clone()
        } else {
            self.find(provider)
                .cloned()
                .ok_or_else(|| LlmError::UnknownProvider {
                    name: provider.to_string(),
                    available: if self.providers.is_empty() {
                        "none".into()
                    } else {
                        self.names().join(", ")
                    },
                })?
        };
        let is_default = self
            .default_provider()
            .is_some_and(|d| Arc::ptr_eq(d, &chosen));
        let model = match (model.trim(), is_default) {
            ("", true) => self.default_model(),
            ("", false) => chosen.default_model().to_string(),
            (m, _) => m.to_string(),
        };
        Ok(Resolved {
            unary_timeout: self.unary_timeout_of(&chosen),
            provider: chosen,
            model,
        })
    }

    /// The providers to try for `resolved`, in order: it first, then the fallback chain.
    pub fn candidates(&self, resolved: &Resolved) -> Vec<Candidate> {
        let mut out = vec![Candidate {
            unary_timeout: resolved.unary_timeout,
            ..Candidate::new(resolved.provider.clone(), resolved.model.clone())
        }];
        for name in &self.fallback.chain {
            let Some(p) = self.find(name) else { continue };
            if out.iter().any(|c| Arc::ptr_eq(&c.provider, p)) {
                continue;
            }
            let model = self
                .fallback
                .models
                .get(&p.name().to_ascii_lowercase())
                .cloned()
                .unwrap_or_else(|| p.default_model().to_string());
            out.push(Candidate {
                unary_timeout: self.unary_timeout_of(p),
                ..Candidate::new(p.clone(), model)
            });
        }
        out
    }
}

/// The models a provider offers besides its default.
#[derive(Debug, Clone, Default)]
struct Offered {
    /// `models` from the config.
    listed: Vec<String>,
    /// What its upstream reports, when `discover_models` is on.
    discovered: Option<Arc<Discovered>>,
}

impl Offered {
    /// The models of `cfg`, built as `provider`; a discovered list starts from what `previous`
    /// knew for the provider of that name, and is fetched again for this config.
    fn of(
        cfg: &crate::config::ProviderConfig,
        provider: &Arc<dyn Provider>,
        previous: Option<&ProviderRegistry>,
    ) -> Self {
        let listed = cfg
            .models
            .iter()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        let discovered = cfg.discover_models.then(|| {
            let carried = previous
                .and_then(|prev| {
                    let i = prev
                        .providers
                        .iter()
                        .position(|p| p.name().eq_ignore_ascii_case(&cfg.name))?;
                    prev.models.get(i)?.discovered.as_ref()
                })
                .map(|d| d.models())
                .unwrap_or_default();
            Discovered::new(provider.clone(), cfg.models_refresh, carried)
        });
        Self { listed, discovered }
    }
}

/// Longest time a listing (or a model id's resolution) waits for a list this config has not
/// fetched yet.
const LIST_WAIT: Duration = Duration::from_secs(10);

impl ProviderRegistry {
    /// Every model of every provider as (provider, model), in config order: each provider's
    /// default model first (the server's default model for the default provider), then its
    /// configured `models`, then the ones its upstream reported; without repeats.
    pub fn offered_models(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, p) in self.providers.iter().enumerate() {
            let is_default = self.default == Some(i);
            let first = match is_default {
                true => self.default_model(),
                false => p.default_model().to_string(),
            };
            let offered = self.models.get(i).cloned().unwrap_or_default();
            let discovered = offered
                .discovered
                .as_ref()
                .map(|d| d.models())
                .unwrap_or_default();
            let mut seen = std::collections::HashSet::new();
            let all = std::iter::once(first)
                .chain(is_default.then(|| p.default_model().to_string()))
                .chain(offered.listed)
                .chain(discovered);
            for m in all {
                if !m.is_empty() && seen.insert(m.clone()) {
                    out.push((p.name().to_string(), m));
                }
            }
        }
        out
    }

    /// Brings the discovered model lists up to date for a listing: waits (a bounded time) for the
    /// first fetch of this config's lists, and refreshes stale ones in the background.
    pub async fn refresh_models(&self) {
        let lists = self
            .models
            .iter()
            .filter_map(|m| m.discovered.as_ref())
            .map(|d| d.ensure_fresh(LIST_WAIT));
        futures::future::join_all(lists).await;
    }

    /// Whether provider `i` offers `model`: its default, a configured one or a discovered one.
    fn offers(&self, i: usize, model: &str) -> bool {
        let Some(p) = self.providers.get(i) else {
            return false;
        };
        p.default_model() == model
            || (self.default == Some(i) && self.default_model() == model)
            || self.models.get(i).is_some_and(|o| {
                o.listed.iter().any(|m| m == model)
                    || o.discovered.as_ref().is_some_and(|d| d.contains(model))
            })
    }

    /// The provider and model an OpenAI-style model id names (empty strings = the default):
    /// - a provider's name alone: its default model;
    /// - `provider/model` when the part before the first `/` names a configured provider (so
    ///   `openrouter/meta-llama/llama-3` works), unless that provider does not offer `model`
    ///   while the default provider offers the whole id: a provider named `anthropic` beside an
    ///   OpenRouter default that lists or discovered `anthropic/claude-x` leaves that id to
    ///   OpenRouter (and `anthropic/<its own model>` to itself);
    /// - anything else: the whole id as a model of the default provider, which is how a model id
    ///   with a `/` of its own (OpenRouter's `anthropic/claude-…`) reaches it when no provider
    ///   has that prefix as its name. An id nothing offers still goes upstream, which judges it
    ///   (an unknown model answers 404 there).
    ///
    /// Where the answer depends on a discovered list this config has not fetched yet (a prefix
    /// naming a provider that does not offer the rest, beside a default provider), that list is
    /// fetched first, waiting a bounded time.
    pub async fn resolve_model_id(&self, id: &str) -> (String, String) {
        let id = id.trim();
        if let Some((prefix, rest)) = id.split_once('/')
            && let Some(i) = self
                .providers
                .iter()
                .position(|p| p.name().eq_ignore_ascii_case(prefix))
            && self.default.is_some_and(|d| d != i)
            && !self.offers(i, rest)
        {
            let unfetched = [Some(i), self.default]
                .into_iter()
                .flatten()
                .filter_map(|k| self.models.get(k)?.discovered.clone())
                .filter(|d| !d.fetched());
            let fetches = unfetched.map(|d| async move { d.ensure_fresh(LIST_WAIT).await });
            futures::future::join_all(fetches).await;
        }
        self.resolve_model_id_now(id)
    }

    /// [`Self::resolve_model_id`] with the lists as they are now.
    fn resolve_model_id_now(&self, id: &str) -> (String, String) {
        let id = id.trim();
        if id.is_empty() {
            return (String::new(), String::new());
        }
        if let Some(p) = self.find(id) {
            return (p.name().to_string(), String::new());
        }
        if let Some((prefix, rest)) = id.split_once('/')
            && let Some((i, p)) = self
                .providers
                .iter()
                .enumerate()
                .find(|(_, p)| p.name().eq_ignore_ascii_case(prefix))
        {
            let the_defaults = self
                .default
                .is_some_and(|d| d != i && self.offers(d, id) && !self.offers(i, rest));
            if !the_defaults {
                return (p.name().to_string(), rest.to_string());
            }
        }
        (String::new(), id.to_string())
    }
}

/// A digest of everything a built provider depends on: its settings with the secrets themselves (the
/// serialized config redacts them) and the SSRF policy settings.
fn fingerprint(p: &crate::config::ProviderConfig, llm: &LlmConfig) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(p).unwrap_or_default());
    for secret in [&p.api_key, &p.client_key].into_iter().flatten() {
        h.update(b"\0secret:");
        h.update(secret.expose().as_bytes());
    }
    h.update(format!("\0ssrf:{}:{:?}", llm.allow_http_providers, llm.ssrf_allow).as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ProviderConfig;

    fn cfg(names: &[&str], default: Option<&str>) -> LlmConfig {
        LlmConfig {
            default: default.map(String::from),
            providers: names
                .iter()
                .map(|n| ProviderConfig {
                    name: n.to_string(),
                    kind: "echo".into(),
                    model: Some(format!("{n}-model")),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn build(c: &LlmConfig) -> ProviderRegistry {
        ProviderRegistry::build(c, &ProviderContext::default()).unwrap_or_default()
    }

    #[test]
    fn default_is_first_in_config_order_unless_named() {
        let r = build(&cfg(&["b", "a"], None));
        assert_eq!(
            r.default_provider()
                .map(|p| p.name().to_string())
                .as_deref(),
            Some("b")
        );
        let r = build(&cfg(&["b", "a"], Some("A")));
        assert_eq!(
            r.default_provider()
                .map(|p| p.name().to_string())
                .as_deref(),
            Some("a")
        );
        assert_eq!(r.names(), vec!["b", "a"]);
    }

    #[test]
    fn resolves_case_insensitively_with_models() {
        let r = build(&cfg(&["echo", "other"], None));
        let x = r.resolve("ECHO", "").map_err(|e| e.to_string());
        assert_eq!(x.as_ref().map(|r| r.model.as_str()), Ok("echo-model"));
        let x = r.resolve("Other", "").map_err(|e| e.to_string());
        assert_eq!(x.as_ref().map(|r| r.provider.name()), Ok("other"));
        let x = r.resolve("", "m2").map_err(|e| e.to_string());
        assert_eq!(x.as_ref().map(|r| r.model.as_str()), Ok("m2"));
        let err = r.resolve("nope", "").map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err("unknown provider `nope`; available: echo, other".to_string())
        );
        assert!(matches!(
            ProviderRegistry::default().resolve("", ""),
            Err(LlmError::NoProviders)
        ));
    }

    #[test]
    fn unchanged_providers_are_reused_across_rebuilds() {
        let c = cfg(&["a", "b"], None);
        let first = build(&c);
        let mut changed = c.clone();
        changed.providers[1].model = Some("other".into());
        changed.providers.reverse();
        let second =
            ProviderRegistry::build_reusing(&changed, &ProviderContext::default(), Some(&first))
                .unwrap();
        let a1 = first.find("a").unwrap();
        let a2 = second.find("a").unwrap();
        assert!(Arc::ptr_eq(a1, a2), "a did not change: same instance");
        assert!(!Arc::ptr_eq(
            first.find("b").unwrap(),
            second.find("b").unwrap()
        ));
        let mut rekeyed = c.clone();
        rekeyed.providers[0].api_key = Some(crate::config::Secret::new("new"));
        let third =
            ProviderRegistry::build_reusing(&rekeyed, &ProviderContext::default(), Some(&first))
                .unwrap();
        assert!(
            !Arc::ptr_eq(a1, third.find("a").unwrap()),
            "a new key builds a new provider"
        );
    }

    #[test]
    fn candidates_follow_the_chain_with_fallback_models() {
        let mut c = cfg(&["a", "b", "c"], None);
        c.fallback = vec!["c".into(), "A".into(), "b".into(), "zz".into()];
        c.fallback_models.insert("C".into(), "c-fallback".into());
        let r = build(&c);
        let res = r.resolve("a", "").unwrap_or_else(|_| unreachable!());
        let got: Vec<(String, String)> = r
            .candidates(&res)
            .into_iter()
            .map(|c| (c.provider.name().to_string(), c.model))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".to_string(), "a-model".to_string()),
                ("c".to_string(), "c-fallback".to_string()),
                ("b".to_string(), "b-model".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn a_prefix_wins_unless_only_the_default_provider_offers_the_whole_id() {
        let mut c = cfg(&["router", "anthropic"], None);
        c.providers[0].models = vec!["anthropic/claude-x".into(), "mistral/large".into()];
        c.providers[1].model = Some("claude-own".into());
        c.providers[1].models = vec!["claude-listed".into()];
        let r = build(&c);
        let cases = [
            ("anthropic/claude-x", ("", "anthropic/claude-x")),
            ("anthropic/claude-own", ("anthropic", "claude-own")),
            ("anthropic/claude-listed", ("anthropic", "claude-listed")),
            ("anthropic/unknown", ("anthropic", "unknown")),
            ("mistral/large", ("", "mistral/large")),
            (
                "router/anthropic/claude-x",
                ("router", "anthropic/claude-x"),
            ),
        ];
        for (id, (p, m)) in cases {
            assert_eq!(
                r.resolve_model_id(id).await,
                (p.to_string(), m.to_string()),
                "{id}"
            );
        }
    }

    #[test]
    fn offered_models_list_defaults_then_configured_without_repeats() {
        let mut c = cfg(&["a", "b"], None);
        c.model = Some("server-default".into());
        c.providers[0].models = vec!["x".into(), "a-model".into(), "x".into()];
        c.providers[1].models = vec!["y".into()];
        let got: Vec<String> = build(&c)
            .offered_models()
            .into_iter()
            .map(|(p, m)| format!("{p}/{m}"))
            .collect();
        assert_eq!(
            got,
            ["a/server-default", "a/a-model", "a/x", "b/b-model", "b/y"]
        );
    }
}
