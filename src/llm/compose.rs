//! The one place that builds what is sent upstream from a caller's history and prompt, so that any
//! server-side context added to a prompt reaches every prompt path alike: SendPrompt, StreamPrompt,
//! InteractiveSession and the HTTP APIs.

use super::Message;

/// History (roles and contents as given, oldest first) followed by the prompt as the user's turn.
/// With server context the prompt becomes `<context>\n\nUser Question: <prompt>`, as the existing
/// ChatCLI sends it.
pub fn compose(context: Option<&str>, history: Vec<Message>, prompt: &str) -> Vec<Message> {
    let mut messages = history;
    let content = match context {
        Some(ctx) if !ctx.trim().is_empty() => format!("{ctx}\n\nUser Question: {prompt}"),
        _ => prompt.to_string(),
    };
    messages.push(Message {
        role: "user".into(),
        content,
    });
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_goes_last_with_optional_context() {
        let h = vec![Message {
            role: "assistant".into(),
            content: "a".into(),
        }];
        let m = compose(None, h.clone(), "q");
        assert_eq!(m.len(), 2);
        assert_eq!((m[1].role.as_str(), m[1].content.as_str()), ("user", "q"));
        let m = compose(Some("[K8s] ok"), h, "q");
        assert_eq!(m[1].content, "[K8s] ok\n\nUser Question: q");
    }
}
