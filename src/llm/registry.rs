//! The providers configured for this server, in config order, with the default one and the
//! fallback settings. Names match case-insensitively, so ChatCLI clients sending `ECHO` or
//! `OpenAI` find `echo` and `openai`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::fallback::{Candidate, FallbackSettings};
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
}
