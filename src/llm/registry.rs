//! The providers configured for this server, in config order, with the default one. Names match
//! case-insensitively, so ChatCLI clients sending `ECHO` or `OpenAI` find `echo` and `openai`.

use std::sync::Arc;

use super::{EchoProvider, LlmError, PendingProvider, Provider, ProviderKind};
use crate::config::LlmConfig;

/// What a request resolved to: the provider and the model to ask it for.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// The model.
    pub model: String,
}

/// See the module docs.
#[derive(Debug, Clone, Default)]
pub struct ProviderRegistry {
    providers: Vec<Arc<dyn Provider>>,
    default: Option<usize>,
    default_model: Option<String>,
}

impl ProviderRegistry {
    /// Builds the registry from validated config.
    pub fn from_config(llm: &LlmConfig) -> Self {
        let providers: Vec<Arc<dyn Provider>> = llm
            .providers
            .iter()
            .filter_map(|p| {
                let kind = ProviderKind::parse(&p.kind)?;
                Some(match kind {
                    ProviderKind::Echo => {
                        Arc::new(EchoProvider::new(&p.name, p.model.clone(), p.delay))
                            as Arc<dyn Provider>
                    }
                    other => Arc::new(PendingProvider {
                        name: p.name.clone(),
                        kind: other,
                        model: p.model.clone().unwrap_or_default(),
                    }),
                })
            })
            .collect();
        let default = match &llm.default {
            Some(name) => providers
                .iter()
                .position(|p| p.name().eq_ignore_ascii_case(name)),
            None if providers.is_empty() => None,
            None => Some(0),
        };
        Self {
            providers,
            default,
            default_model: llm.model.clone(),
        }
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

    /// Whether any provider is configured.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Resolves a request's provider and model; empty strings mean "the default".
    pub fn resolve(&self, provider: &str, model: &str) -> Result<Resolved, LlmError> {
        let provider = provider.trim();
        let chosen = if provider.is_empty() {
            self.default_provider()
                .ok_or(LlmError::NoProviders)?
                .clone()
        } else {
            self.providers
                .iter()
                .find(|p| p.name().eq_ignore_ascii_case(provider))
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
            provider: chosen,
            model,
        })
    }
}

#[cfg(test)]
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

    #[test]
    fn default_is_first_in_config_order_unless_named() {
        let r = ProviderRegistry::from_config(&cfg(&["b", "a"], None));
        assert_eq!(
            r.default_provider()
                .map(|p| p.name().to_string())
                .as_deref(),
            Some("b")
        );
        let r = ProviderRegistry::from_config(&cfg(&["b", "a"], Some("A")));
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
        let r = ProviderRegistry::from_config(&cfg(&["echo", "other"], None));
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
}
