//! The session file format: encoding [`SessionData`] to the v2 JSON object and decoding whatever
//! the local ChatCLI writes (v2 objects, lenient older objects, legacy bare arrays).
//!
//! Writing is strict and canonical (2-space indent, empties omitted, version 2). Reading is lenient
//! on purpose: the local CLI shares the folder and writes `null` lists and fields this server does
//! not know (`tool_calls`, `images`, extra `meta` flags, ...), which must load, not fail.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::data::{SESSION_FORMAT_VERSION, SessionData, StoredMessage, StoredMeta};

/// What a file held.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// A JSON object (v2, or an older/versionless object read leniently); nothing to rewrite.
    Object(SessionData),
    /// A legacy bare array of messages; `migrated` is the v2 file that should replace it.
    Legacy {
        data: SessionData,
        migrated: Vec<u8>,
    },
}

/// Canonical bytes of `data` as a v2 file. The title is derived here when `data` has none.
pub(crate) fn encode(data: &SessionData) -> serde_json::Result<Vec<u8>> {
    let title = data.title_for_save();
    let file = FileOut {
        version: SESSION_FORMAT_VERSION,
        title: &title,
        chat_history: Messages(&data.chat_history),
        agent_history: Messages(&data.agent_history),
        coder_history: Messages(&data.coder_history),
        shared_memory: Messages(&data.shared_memory),
    };
    serde_json::to_vec_pretty(&file)
}

/// Decodes a session file. The error is a human-readable reason without any path.
pub(crate) fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match &value {
        Value::Array(items) => {
            let messages = Vec::<MessageIn>::deserialize(&value).map_err(|e| e.to_string())?;
            let mut data = SessionData {
                chat_history: messages.into_iter().map(StoredMessage::from).collect(),
                ..SessionData::default()
            };
            // The migrated file carries the derived title; return it too, so this load and the
            // next one (of the migrated file) agree.
            data.title = data.title_for_save();
            let migrated = encode_legacy_migration(&data, items).map_err(|e| e.to_string())?;
            Ok(Decoded::Legacy { data, migrated })
        }
        Value::Object(_) => {
            let file = FileIn::deserialize(&value).map_err(|e| e.to_string())?;
            Ok(Decoded::Object(file.into()))
        }
        other => Err(format!(
            "expected a JSON object or array, found {}",
            json_kind(other)
        )),
    }
}

/// The migrated file keeps each legacy message object verbatim rather than re-encoding it from
/// [`StoredMessage`], so local-only fields (`tool_calls`, `images`, ...) survive the migration.
fn encode_legacy_migration(data: &SessionData, items: &[Value]) -> serde_json::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct MigratedOut<'a> {
        version: i32,
        #[serde(skip_serializing_if = "str::is_empty")]
        title: &'a str,
        chat_history: &'a [Value],
    }
    let title = data.title_for_save();
    serde_json::to_vec_pretty(&MigratedOut {
        version: SESSION_FORMAT_VERSION,
        title: &title,
        chat_history: items,
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Serialize)]
struct FileOut<'a> {
    version: i32,
    #[serde(skip_serializing_if = "str::is_empty")]
    title: &'a str,
    chat_history: Messages<'a>,
    #[serde(skip_serializing_if = "Messages::is_empty")]
    agent_history: Messages<'a>,
    #[serde(skip_serializing_if = "Messages::is_empty")]
    coder_history: Messages<'a>,
    #[serde(skip_serializing_if = "Messages::is_empty")]
    shared_memory: Messages<'a>,
}

struct Messages<'a>(&'a [StoredMessage]);

impl Messages<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Messages<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(MessageOut::from))
    }
}

#[derive(Serialize)]
struct MessageOut<'a> {
    role: &'a str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<MetaOut<'a>>,
}

impl<'a> From<&'a StoredMessage> for MessageOut<'a> {
    fn from(message: &'a StoredMessage) -> Self {
        Self {
            role: &message.role,
            content: &message.content,
            meta: message
                .meta
                .as_ref()
                .filter(|meta| !meta.is_empty())
                .map(|meta| MetaOut {
                    is_summary: meta.is_summary,
                    summary_of: meta.summary_of,
                    mode: &meta.mode,
                }),
        }
    }
}

#[derive(Serialize)]
struct MetaOut<'a> {
    #[serde(skip_serializing_if = "is_false")]
    is_summary: bool,
    #[serde(skip_serializing_if = "is_zero")]
    summary_of: i32,
    #[serde(skip_serializing_if = "str::is_empty")]
    mode: &'a str,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

/// Unknown keys are ignored (serde's default), `null` reads as the zero value like Go's
/// `encoding/json` does for the local CLI's files.
#[derive(Deserialize)]
struct FileIn {
    #[serde(default, deserialize_with = "null_as_default")]
    version: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    title: String,
    #[serde(default, deserialize_with = "null_as_default")]
    chat_history: Vec<MessageIn>,
    #[serde(default, deserialize_with = "null_as_default")]
    agent_history: Vec<MessageIn>,
    #[serde(default, deserialize_with = "null_as_default")]
    coder_history: Vec<MessageIn>,
    #[serde(default, deserialize_with = "null_as_default")]
    shared_memory: Vec<MessageIn>,
}

impl From<FileIn> for SessionData {
    fn from(file: FileIn) -> Self {
        let convert =
            |messages: Vec<MessageIn>| messages.into_iter().map(StoredMessage::from).collect();
        Self {
            // Older or versionless objects are read as v2; a newer version is reported as found.
            version: i32::try_from(file.version)
                .unwrap_or(i32::MAX)
                .max(SESSION_FORMAT_VERSION),
            title: file.title,
            chat_history: convert(file.chat_history),
            agent_history: convert(file.agent_history),
            coder_history: convert(file.coder_history),
            shared_memory: convert(file.shared_memory),
        }
    }
}

#[derive(Deserialize)]
struct MessageIn {
    #[serde(default, deserialize_with = "null_as_default")]
    role: String,
    #[serde(default, deserialize_with = "null_as_default")]
    content: String,
    #[serde(default)]
    meta: Option<MetaIn>,
}

impl From<MessageIn> for StoredMessage {
    fn from(message: MessageIn) -> Self {
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

#[derive(Deserialize)]
struct MetaIn {
    #[serde(default, deserialize_with = "null_as_default")]
    is_summary: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    summary_of: i32,
    #[serde(default, deserialize_with = "null_as_default")]
    mode: String,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> StoredMessage {
        StoredMessage {
            role: role.into(),
            content: content.into(),
            meta: None,
        }
    }

    fn decode_object(json: &str) -> SessionData {
        match decode(json.as_bytes()).unwrap() {
            Decoded::Object(data) => data,
            Decoded::Legacy { .. } => panic!("an object must not decode as legacy"),
        }
    }

    #[test]
    fn encode_writes_the_exact_canonical_shape() {
        let data = SessionData {
            version: 7, // ignored: files are always written as version 2
            title: String::new(),
            chat_history: vec![
                msg("user", "  hello \n world "),
                StoredMessage {
                    role: "assistant".into(),
                    content: "summary".into(),
                    meta: Some(StoredMeta {
                        is_summary: true,
                        summary_of: 4,
                        mode: "chat".into(),
                    }),
                },
                StoredMessage {
                    role: "assistant".into(),
                    content: "partial meta".into(),
                    meta: Some(StoredMeta {
                        is_summary: false,
                        summary_of: 0,
                        mode: "agent".into(),
                    }),
                },
                StoredMessage {
                    role: "assistant".into(),
                    content: "zero meta".into(),
                    meta: Some(StoredMeta::default()),
                },
            ],
            agent_history: vec![msg("user", "agent")],
            coder_history: Vec::new(),
            shared_memory: vec![msg("system", "remember")],
        };
        let expected = r#"{
  "version": 2,
  "title": "hello world",
  "chat_history": [
    {
      "role": "user",
      "content": "  hello \n world "
    },
    {
      "role": "assistant",
      "content": "summary",
      "meta": {
        "is_summary": true,
        "summary_of": 4,
        "mode": "chat"
      }
    },
    {
      "role": "assistant",
      "content": "partial meta",
      "meta": {
        "mode": "agent"
      }
    },
    {
      "role": "assistant",
      "content": "zero meta"
    }
  ],
  "agent_history": [
    {
      "role": "user",
      "content": "agent"
    }
  ],
  "shared_memory": [
    {
      "role": "system",
      "content": "remember"
    }
  ]
}"#;
        assert_eq!(String::from_utf8(encode(&data).unwrap()).unwrap(), expected);
    }

    #[test]
    fn encode_of_an_empty_session_keeps_chat_history_and_drops_the_rest() {
        let bytes = encode(&SessionData::default()).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "{\n  \"version\": 2,\n  \"chat_history\": []\n}"
        );
    }

    #[test]
    fn decode_accepts_null_lists_and_null_fields() {
        let data = decode_object(
            r#"{"version": 2, "title": null, "chat_history": null, "agent_history": null,
                "coder_history": [{"role": "user", "content": null, "meta": null}],
                "shared_memory": null}"#,
        );
        assert_eq!(data.version, 2);
        assert!(data.chat_history.is_empty());
        assert_eq!(data.coder_history, vec![msg("user", "")]);
    }

    #[test]
    fn decode_of_versionless_or_old_objects_is_lenient() {
        for json in [
            r#"{"chat_history": [{"role": "user", "content": "hi"}]}"#,
            r#"{"version": 1, "chat_history": [{"role": "user", "content": "hi"}]}"#,
            r#"{"version": null, "chat_history": [{"role": "user", "content": "hi"}]}"#,
        ] {
            let data = decode_object(json);
            assert_eq!(data.version, 2, "{json}");
            assert_eq!(data.chat_history, vec![msg("user", "hi")], "{json}");
        }
    }

    #[test]
    fn decode_round_trips_encode() {
        let data = SessionData {
            title: "t".into(),
            chat_history: vec![StoredMessage {
                role: "assistant".into(),
                content: "x".into(),
                meta: Some(StoredMeta {
                    is_summary: true,
                    summary_of: -3,
                    mode: "coder".into(),
                }),
            }],
            coder_history: vec![msg("user", "c")],
            ..SessionData::default()
        };
        assert_eq!(
            decode_object(&String::from_utf8(encode(&data).unwrap()).unwrap()),
            data
        );
    }

    #[test]
    fn decode_rejects_non_json_and_wrong_types_with_a_reason() {
        for (input, needle) in [
            ("", "EOF"),
            ("{not json", "key must be a string"),
            ("\"a string\"", "found a string"),
            ("42", "found a number"),
            ("null", "found null"),
            (r#"{"chat_history": 5}"#, "invalid type"),
            (r#"[{"role": 1, "content": "x"}]"#, "invalid type"),
        ] {
            let reason = decode(input.as_bytes()).unwrap_err();
            assert!(reason.contains(needle), "{input:?}: {reason}");
        }
    }
}
