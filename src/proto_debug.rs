//! `Debug` of the generated messages that carry credentials: `client_api_key`, the values of
//! `provider_config` (StackSpot's client id and key, a provider URL that may hold a user and
//! password) and the secret-looking entries of a `SessionMessage`'s metadata (`client_api_key`)
//! print as `[redacted]`, so a request logged with `{:?}` never reveals them. `build.rs` turns
//! prost's derived `Debug` off for exactly these messages.

use std::collections::HashMap;
use std::fmt;

use crate::config::values::REDACTED;
use crate::proto::{SendPromptRequest, SessionMessage, StreamPromptRequest, session_message};

/// A credential field: `[redacted]` when set, `""` when empty (whether it was sent is worth
/// seeing; its value never is).
struct Hidden<'a>(&'a str);

impl fmt::Debug for Hidden<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.is_empty() {
            true => f.write_str("\"\""),
            false => f.write_str(REDACTED),
        }
    }
}

/// A string map in key order, each value shown only when `shown(key)` says so.
struct Map<'a> {
    map: &'a HashMap<String, String>,
    shown: fn(&str) -> bool,
}

impl fmt::Debug for Map<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut entries: Vec<(&String, &String)> = self.map.iter().collect();
        entries.sort();
        let mut out = f.debug_map();
        for (k, v) in entries {
            match (self.shown)(k) {
                true => out.entry(k, v),
                false => out.entry(k, &Hidden(v)),
            };
        }
        out.finish()
    }
}

/// Metadata keys whose values are shown: those that do not name a credential.
fn not_a_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    !["key", "token", "secret", "password", "credential", "auth"]
        .iter()
        .any(|w| k.contains(w))
}

/// SendPromptRequest and StreamPromptRequest have the same fields.
macro_rules! prompt_debug {
    ($t:ty) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($t))
                    .field("prompt", &self.prompt)
                    .field("history", &self.history)
                    .field("max_tokens", &self.max_tokens)
                    .field("provider", &self.provider)
                    .field("model", &self.model)
                    .field("client_api_key", &Hidden(&self.client_api_key))
                    .field(
                        "provider_config",
                        &Map {
                            map: &self.provider_config,
                            shown: |_| false,
                        },
                    )
                    .finish()
            }
        }
    };
}

prompt_debug!(SendPromptRequest);
prompt_debug!(StreamPromptRequest);

impl fmt::Debug for SessionMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("SessionMessage");
        match session_message::Type::try_from(self.r#type) {
            Ok(kind) => out.field("type", &kind),
            Err(_) => out.field("type", &self.r#type),
        };
        out.field("content", &self.content)
            .field(
                "metadata",
                &Map {
                    map: &self.metadata,
                    shown: not_a_secret,
                },
            )
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const KEY: &str = "sk-live-0123456789abcdef";

    fn config() -> HashMap<String, String> {
        [
            ("client_id", "stackspot-client-id-77"),
            ("client_key", "stackspot-client-key-99"),
            ("base_url", "https://user:hunter2@llm.example"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn assert_redacted(text: &str) {
        for secret in [
            KEY,
            "stackspot-client-id-77",
            "stackspot-client-key-99",
            "hunter2",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains(REDACTED), "{text}");
    }

    #[test]
    fn prompt_requests_print_no_key_or_provider_config_value() {
        let send = SendPromptRequest {
            prompt: "hello".into(),
            model: "gpt-test".into(),
            client_api_key: KEY.into(),
            provider_config: config(),
            ..Default::default()
        };
        let text = format!("{send:?}");
        assert_redacted(&text);
        // The rest is still there to debug with, the config's keys included.
        for shown in [
            "hello",
            "gpt-test",
            "client_api_key",
            "client_key",
            "base_url",
        ] {
            assert!(text.contains(shown), "{shown} missing from {text}");
        }
        let stream = StreamPromptRequest {
            client_api_key: KEY.into(),
            provider_config: config(),
            ..Default::default()
        };
        let text = format!("{stream:#?}");
        assert_redacted(&text);
        assert!(text.starts_with("StreamPromptRequest"), "{text}");
        // An empty key says so instead of pretending one was sent.
        let text = format!("{:?}", SendPromptRequest::default());
        assert!(text.contains("client_api_key: \"\""), "{text}");
    }

    #[test]
    fn session_messages_print_no_key_from_their_metadata() {
        let msg = SessionMessage {
            r#type: session_message::Type::UserInput as i32,
            content: "question".into(),
            metadata: [("client_api_key", KEY), ("provider", "OPENAI")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let text = format!("{msg:?}");
        assert!(!text.contains(KEY), "{text}");
        assert!(text.contains(REDACTED), "{text}");
        for shown in ["UserInput", "question", "OPENAI", "client_api_key"] {
            assert!(text.contains(shown), "{shown} missing from {text}");
        }
    }
}
