//! Credentials a caller forwards with a request (`client_api_key`, `provider_config`). They build a
//! request-scoped provider that is never logged, stored or reused. The key's prefix picks the auth
//! scheme, as in the existing ChatCLI: `apikey:` or none = API key, `oauth:` = OAuth bearer token,
//! `token:` = plain bearer token.

use std::collections::BTreeMap;

use crate::config::Secret;

/// How a forwarded key authenticates upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyScheme {
    /// A provider API key (e.g. `x-api-key` for Anthropic, Bearer for OpenAI).
    ApiKey,
    /// An OAuth access token (Bearer).
    OAuth,
    /// A plain bearer token (e.g. a GitHub token for Copilot).
    Token,
}

/// A forwarded key.
#[derive(Debug, Clone)]
pub struct ClientKey {
    /// Its scheme, from the prefix.
    pub scheme: KeyScheme,
    /// The key without its prefix.
    pub secret: Secret,
}

impl ClientKey {
    /// Parses `client_api_key`; empty means none.
    pub fn parse(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        if raw.is_empty() {
            return None;
        }
        let (scheme, rest) = if let Some(r) = raw.strip_prefix("apikey:") {
            (KeyScheme::ApiKey, r)
        } else if let Some(r) = raw.strip_prefix("oauth:") {
            (KeyScheme::OAuth, r)
        } else if let Some(r) = raw.strip_prefix("token:") {
            (KeyScheme::Token, r)
        } else {
            (KeyScheme::ApiKey, raw)
        };
        Some(Self {
            scheme,
            secret: Secret::new(rest),
        })
    }
}

/// What a caller forwarded.
#[derive(Debug, Clone, Default)]
pub struct ClientCredentials {
    /// `client_api_key`, parsed.
    pub key: Option<ClientKey>,
    /// `provider_config` (StackSpot `client_id`/`client_key`/`realm`/`agent_id`, Ollama `base_url`).
    pub config: BTreeMap<String, String>,
}

impl ClientCredentials {
    /// From the request fields; `None` when the caller forwarded nothing.
    pub fn from_request(
        client_api_key: &str,
        provider_config: impl IntoIterator<Item = (String, String)>,
    ) -> Option<Self> {
        let c = Self {
            key: ClientKey::parse(client_api_key),
            config: provider_config
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .collect(),
        };
        (c.key.is_some() || !c.config.is_empty()).then_some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_pick_the_scheme() {
        let k = |s: &str| ClientKey::parse(s).map(|k| (k.scheme, k.secret.expose().to_string()));
        assert_eq!(k("sk-1"), Some((KeyScheme::ApiKey, "sk-1".into())));
        assert_eq!(k("apikey:sk-2"), Some((KeyScheme::ApiKey, "sk-2".into())));
        assert_eq!(k("oauth:at"), Some((KeyScheme::OAuth, "at".into())));
        assert_eq!(k("token:gh"), Some((KeyScheme::Token, "gh".into())));
        assert!(k("  ").is_none());
        assert!(ClientCredentials::from_request("", Vec::new()).is_none());
        assert!(
            ClientCredentials::from_request("", vec![("base_url".into(), "x".into())]).is_some()
        );
    }
}
