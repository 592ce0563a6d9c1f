//! Conversions between the stored session types and the generated proto types
//! (`SaveSession`/`LoadSession` payloads).
//!
//! An all-zero `MessageMeta` means "no meta" in proto3, so it maps to `None` in both directions;
//! the stored title has no proto field and is derived again at every save.

use super::data::{SESSION_FORMAT_VERSION, SessionData, StoredMessage, StoredMeta};
use crate::proto::{ChatMessage, MessageMeta, SessionDataV2};

impl SessionData {
    /// A v2 `SaveSession` payload; the version is forced to 2 whatever the client sent.
    pub fn from_proto_v2(proto: SessionDataV2) -> Self {
        let convert =
            |messages: Vec<ChatMessage>| messages.into_iter().map(StoredMessage::from).collect();
        Self {
            version: SESSION_FORMAT_VERSION,
            title: String::new(),
            chat_history: convert(proto.chat_history),
            agent_history: convert(proto.agent_history),
            coder_history: convert(proto.coder_history),
            shared_memory: convert(proto.shared_memory),
        }
    }

    /// A v1 `SaveSession` payload: the messages become the chat history.
    pub fn from_messages(messages: Vec<ChatMessage>) -> Self {
        Self {
            chat_history: messages.into_iter().map(StoredMessage::from).collect(),
            ..Self::default()
        }
    }

    /// The `session_data` of a `LoadSession` answer (version 2).
    pub fn to_proto(&self) -> SessionDataV2 {
        let convert = |messages: &[StoredMessage]| messages.iter().map(ChatMessage::from).collect();
        SessionDataV2 {
            version: SESSION_FORMAT_VERSION,
            chat_history: convert(&self.chat_history),
            agent_history: convert(&self.agent_history),
            coder_history: convert(&self.coder_history),
            shared_memory: convert(&self.shared_memory),
        }
    }
}

impl From<ChatMessage> for StoredMessage {
    fn from(message: ChatMessage) -> Self {
        Self {
            role: message.role,
            content: message.content,
            meta: message.meta.and_then(|meta| {
                StoredMeta {
                    is_summary: meta.is_summary,
                    summary_of: meta.summary_of,
                    mode: meta.mode,
                }
                .non_empty()
            }),
        }
    }
}

impl From<&StoredMessage> for ChatMessage {
    fn from(message: &StoredMessage) -> Self {
        Self {
            role: message.role.clone(),
            content: message.content.clone(),
            meta: message
                .meta
                .as_ref()
                .filter(|meta| !meta.is_empty())
                .map(|meta| MessageMeta {
                    is_summary: meta.is_summary,
                    summary_of: meta.summary_of,
                    mode: meta.mode.clone(),
                }),
        }
    }
}

impl From<StoredMessage> for ChatMessage {
    fn from(message: StoredMessage) -> Self {
        Self {
            role: message.role,
            content: message.content,
            meta: message
                .meta
                .and_then(StoredMeta::non_empty)
                .map(|meta| MessageMeta {
                    is_summary: meta.is_summary,
                    summary_of: meta.summary_of,
                    mode: meta.mode,
                }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn chat(role: &str, content: &str, meta: Option<MessageMeta>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            meta,
        }
    }

    #[test]
    fn proto_v2_round_trip_keeps_every_history_and_meta() {
        let summary = MessageMeta {
            is_summary: true,
            summary_of: 9,
            mode: "agent".into(),
        };
        let proto = SessionDataV2 {
            version: 1, // forced to 2
            chat_history: vec![chat("user", "hi", None)],
            agent_history: vec![chat("assistant", "sum", Some(summary.clone()))],
            coder_history: vec![chat("user", "code", None)],
            shared_memory: vec![chat("system", "mem", None)],
        };
        let data = SessionData::from_proto_v2(proto.clone());
        assert_eq!(data.version, 2);
        assert_eq!(data.title, "");
        assert_eq!(
            data.agent_history[0].meta,
            Some(StoredMeta {
                is_summary: true,
                summary_of: 9,
                mode: "agent".into()
            })
        );
        let back = data.to_proto();
        assert_eq!(
            back,
            SessionDataV2 {
                version: 2,
                ..proto
            }
        );
    }

    #[test]
    fn zero_meta_maps_to_none_both_ways() {
        let stored = StoredMessage::from(chat("user", "x", Some(MessageMeta::default())));
        assert_eq!(stored.meta, None);

        let with_zero = StoredMessage {
            role: "user".into(),
            content: "x".into(),
            meta: Some(StoredMeta::default()),
        };
        assert_eq!(ChatMessage::from(&with_zero).meta, None);
        assert_eq!(ChatMessage::from(with_zero).meta, None);

        let partial = StoredMessage::from(chat(
            "user",
            "x",
            Some(MessageMeta {
                mode: "coder".into(),
                ..MessageMeta::default()
            }),
        ));
        assert_eq!(partial.meta.map(|m| m.mode), Some("coder".to_owned()));
    }

    #[test]
    fn v1_messages_become_the_chat_history() {
        let data =
            SessionData::from_messages(vec![chat("user", "a", None), chat("assistant", "b", None)]);
        assert_eq!(data.version, 2);
        assert_eq!(data.chat_history.len(), 2);
        assert!(data.agent_history.is_empty() && data.coder_history.is_empty());
        assert_eq!(
            data.to_proto().chat_history[1],
            chat("assistant", "b", None)
        );
    }
}
