//! The built-in `echo` provider: answers with the last user message, streamed word by word (each
//! piece keeps its leading whitespace, so the pieces concatenate to the exact prompt). An optional
//! delay between pieces makes streaming visible in demos and lets tests hold a stream open.

use std::time::Duration;

use super::{
    ChatRequest, ClientCredentials, Delta, DeltaStream, LlmError, Provider, ProviderKind, Usage,
};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct EchoProvider {
    name: String,
    model: String,
    delay: Option<Duration>,
}

impl EchoProvider {
    /// A new echo provider.
    pub fn new(name: impl Into<String>, model: Option<String>, delay: Option<Duration>) -> Self {
        Self {
            name: name.into(),
            model: model.unwrap_or_else(|| "echo".into()),
            delay,
        }
    }
}

/// Splits text into pieces that each start at a word, keeping whitespace with the following word.
pub fn words(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    for c in text.chars() {
        if c.is_whitespace() && in_word {
            pieces.push(std::mem::take(&mut current));
            in_word = false;
        } else if !c.is_whitespace() {
            in_word = true;
        }
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

impl EchoProvider {
    /// The pieces echo streams for `text` (see `words`).
    pub fn words_of(text: &str) -> Vec<String> {
        words(text)
    }
}

impl Provider for EchoProvider {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> ProviderKind {
        ProviderKind::Echo
    }
    fn default_model(&self) -> &str {
        &self.model
    }
    fn with_client_credentials<'a>(
        &'a self,
        _creds: &'a ClientCredentials,
    ) -> futures::future::BoxFuture<'a, Result<std::sync::Arc<dyn Provider>, LlmError>> {
        // Echo needs no key; a forwarded one is accepted and ignored, so clients that always send
        // their key (e.g. `chatcli connect --llm-key`) work against the demo.
        let me = self.clone();
        Box::pin(async move { Ok(std::sync::Arc::new(me) as std::sync::Arc<dyn Provider>) })
    }
    fn stream(&self, request: &ChatRequest) -> DeltaStream {
        let prompt = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let prompt_tokens: u64 = request
            .messages
            .iter()
            .map(|m| words(&m.content).len() as u64)
            .sum();
        let delay = self.delay;
        Box::pin(async_stream::stream! {
            let pieces = words(&prompt);
            let completion_tokens = pieces.len() as u64;
            for (i, piece) in pieces.into_iter().enumerate() {
                if let (Some(d), true) = (delay, i > 0) {
                    tokio::time::sleep(d).await;
                }
                yield Ok(Delta::Text(piece));
            }
            yield Ok(Delta::Usage(Usage { prompt_tokens, completion_tokens }));
            yield Ok(Delta::Finish("stop".into()));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Message, collect};

    #[test]
    fn words_keep_all_text() {
        assert_eq!(words("hello  big world"), vec!["hello", "  big", " world"]);
        assert_eq!(words(" lead"), vec![" lead"]);
        assert_eq!(words(""), Vec::<String>::new());
        let s = "日本語 テキスト 🎉 ok";
        assert_eq!(words(s).concat(), s);
    }

    #[tokio::test]
    async fn echoes_the_last_user_message_in_pieces() {
        let p = EchoProvider::new("echo", None, None);
        let req = ChatRequest {
            messages: vec![
                Message {
                    role: "user".into(),
                    content: "old".into(),
                },
                Message {
                    role: "assistant".into(),
                    content: "reply".into(),
                },
                Message {
                    role: "user".into(),
                    content: "one two three".into(),
                },
            ],
            ..ChatRequest::new(Vec::new(), "echo")
        };
        let (text, usage) = collect(p.stream(&req))
            .await
            .map_err(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(text, "one two three");
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3
            })
        );
    }
}
