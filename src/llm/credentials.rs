//! Credentials a caller forwards with a request (`client_api_key`, `provider_config`), and the one
//! rule every provider kind applies to them. They build a request-scoped provider that is never
//! logged, stored or reused. The key's prefix picks the auth scheme, as in the existing ChatCLI:
//! `apikey:` or none = API key, `oauth:` = OAuth bearer token, `token:` = plain bearer token.
//!
//! The client-credential rule ([`ClientCredentials::caller_url`]), the same for every kind:
//!
//! | caller sends | the call goes to | with |
//! |---|---|---|
//! | a key, no URL | the server's upstream (its URL and operator headers) | the caller's key |
//! | a URL and its own credentials | the caller's URL, after the SSRF guard | the caller's credentials only; no operator headers |
//! | a URL without its own credentials | nowhere: `InvalidRequest` | — |
//!
//! So the server's key (and the operator's extra headers, which may carry credentials) is never
//! sent to a host the caller chose, and a caller's URL is never answered with the server's
//! account. A caller's "own credentials" are its `client_api_key` for every kind; StackSpot also
//! takes its own `client_id` and `client_key` in `provider_config`.

use std::collections::BTreeMap;

use super::error::LlmError;
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

    /// Applies the client-credential rule for `provider`: only `accepted` keys may be set; the
    /// first of `url_keys` the caller set is the caller's URL, which needs the caller's own
    /// credentials (`own`). Returns that URL (trimmed), still to pass the SSRF guard.
    pub fn caller_url(
        &self,
        provider: &str,
        accepted: &[&str],
        url_keys: &[&str],
        own: bool,
    ) -> Result<Option<&str>, LlmError> {
        super::http::check_config_keys(provider, &self.config, accepted)?;
        let Some((key, url)) = url_keys.iter().find_map(|k| {
            self.config
                .get(*k)
                .map(|v| (*k, v.trim()))
                .filter(|(_, v)| !v.is_empty())
        }) else {
            return Ok(None);
        };
        if !own {
            return Err(LlmError::InvalidRequest(format!(
                "provider `{provider}`: provider_config {key} needs the caller's own credentials \
                 (client_api_key); the server's credentials are never sent to a URL the caller chose"
            )));
        }
        Ok(Some(url))
    }

    /// The forwarded key, refused when it is empty after its prefix (`apikey:` alone).
    pub fn nonempty_key(&self, provider: &str) -> Result<Option<&ClientKey>, LlmError> {
        match &self.key {
            Some(k) if k.secret.expose().trim().is_empty() => Err(LlmError::InvalidRequest(
                format!("provider `{provider}`: client_api_key is empty"),
            )),
            other => Ok(other.as_ref()),
        }
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

    #[test]
    fn a_callers_url_needs_its_own_credentials_and_the_first_url_key_wins() {
        const KEYS: &[&str] = &["base_url", "api_base"];
        let creds = |key: &str, pairs: &[(&str, &str)]| {
            ClientCredentials::from_request(
                key,
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default()
        };
        let url = |c: &ClientCredentials| {
            c.caller_url("p", KEYS, KEYS, c.key.is_some())
                .map(|u| u.map(String::from))
                .map_err(|e| e.to_string())
        };
        // A key alone: the server's URL.
        assert_eq!(url(&creds("k", &[])), Ok(None));
        // A URL with the caller's key: that URL, the first key in order of precedence.
        let both = creds(
            "k",
            &[("api_base", "https://b"), ("base_url", " https://a ")],
        );
        assert_eq!(url(&both), Ok(Some("https://a".to_string())));
        // A URL without the caller's key: refused, naming the key and why.
        let err = url(&creds("", &[("api_base", "https://b")]))
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("api_base") && err.contains("own credentials"),
            "{err}"
        );
        // A key the kind does not take: refused, naming it (never its value).
        let err = url(&creds("k", &[("realm", "secret-realm")]))
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("`realm`") && !err.contains("secret-realm"),
            "{err}"
        );
        // `apikey:` alone is no key.
        let empty = creds("apikey:", &[]);
        assert!(empty.nonempty_key("p").is_err());
    }
}
