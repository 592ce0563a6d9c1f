//! Session file loading ([`crate::sessions::SessionStore::load`]) of hostile files in both formats
//! (v2 objects and legacy bare arrays): no panic, a clear error or data no bigger than the file;
//! and save → load gives back what was saved.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::sessions::{SessionData, SessionStore, StoredMessage, StoredMeta};

const NAME: &str = "fuzzed";
const PRINCIPAL: &str = crate::sessions::DEFAULT_PRINCIPAL;

/// Loads `bytes` as the session file `NAME`; the loaded data, or the error's message.
fn load_file(rt: &tokio::runtime::Runtime, bytes: &[u8]) -> Result<SessionData, String> {
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::new(dir.path().to_path_buf());
    std::fs::write(dir.path().join(format!("{NAME}.json")), bytes).unwrap();
    rt.block_on(store.load(PRINCIPAL, NAME))
        .map_err(|e| e.to_string())
}

/// Bounded output: the loaded text (roles, contents, modes, title) is no longer than the file,
/// apart from a title derived from the first message (at most 60 characters).
fn assert_bounded(bytes: &[u8], loaded: &Result<SessionData, String>) {
    if let Ok(d) = loaded {
        let text: usize = [
            &d.chat_history,
            &d.agent_history,
            &d.coder_history,
            &d.shared_memory,
        ]
        .iter()
        .flat_map(|h| h.iter())
        .map(|m| m.role.len() + m.content.len() + m.meta.as_ref().map_or(0, |x| x.mode.len()))
        .sum();
        assert!(
            text <= bytes.len(),
            "{text} bytes of text from a {}-byte file",
            bytes.len()
        );
        assert!(d.title.chars().count() <= bytes.len().max(60));
    }
}

fn message() -> impl Strategy<Value = StoredMessage> {
    (
        prop_oneof![
            Just("user"),
            Just("assistant"),
            Just("system"),
            Just("tool")
        ],
        "[^\u{0}]{0,40}",
        proptest::option::of((any::<bool>(), any::<i32>(), "(chat|agent|coder)?")),
    )
        .prop_map(|(role, content, meta)| StoredMessage {
            role: role.into(),
            content,
            meta: meta.and_then(|(is_summary, summary_of, mode)| {
                StoredMeta {
                    is_summary,
                    summary_of,
                    mode,
                }
                .non_empty()
            }),
        })
}

fn history() -> impl Strategy<Value = Vec<StoredMessage>> {
    proptest::collection::vec(message(), 0..5)
}

fn session() -> impl Strategy<Value = SessionData> {
    ("[^\u{0}]{0,30}", history(), history(), history(), history()).prop_map(
        |(title, chat_history, agent_history, coder_history, shared_memory)| SessionData {
            title,
            chat_history,
            agent_history,
            coder_history,
            shared_memory,
            ..SessionData::default()
        },
    )
}

/// JSON shaped like a session file, with fields of the wrong type, nulls and unknown keys.
fn session_like_json() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(|n| json!(n)),
        any::<bool>().prop_map(Value::Bool),
        "[^\u{0}]{0,12}".prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
        Just(json!({ "is_summary": "yes", "summary_of": 1e300, "mode": [] })),
    ];
    let msg = proptest::collection::btree_map(
        prop_oneof![
            Just("role"),
            Just("content"),
            Just("meta"),
            Just("tool_calls"),
            Just("x")
        ],
        field.clone(),
        0..5,
    )
    .prop_map(|m| json!(m));
    let list = prop_oneof![
        proptest::collection::vec(msg.clone(), 0..4).prop_map(Value::Array),
        field.clone(),
    ];
    prop_oneof![
        proptest::collection::vec(msg, 0..4).prop_map(Value::Array),
        (field, list.clone(), list.clone(), list).prop_map(
            |(version, chat, agent, shared)| json!({
                "version": version, "title": "t", "chat_history": chat,
                "agent_history": agent, "shared_memory": shared, "unknown": 1,
            })
        ),
    ]
}

proptest! {
    #![proptest_config(super::config(64))]

    #[test]
    fn arbitrary_session_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let rt = super::runtime();
        let loaded = load_file(&rt, &bytes);
        assert_bounded(&bytes, &loaded);
    }

    #[test]
    fn session_shaped_json_loads_or_fails_cleanly(value in session_like_json()) {
        let rt = super::runtime();
        let bytes = serde_json::to_vec(&value).unwrap();
        let loaded = load_file(&rt, &bytes);
        assert_bounded(&bytes, &loaded);
        if let Err(e) = &loaded {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn saved_sessions_load_back_unchanged(data in session()) {
        let rt = super::runtime();
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::new(dir.path().to_path_buf());
        rt.block_on(store.save(PRINCIPAL, NAME, data.clone())).unwrap();
        let loaded = rt.block_on(store.load(PRINCIPAL, NAME)).unwrap();
        let expected = SessionData { title: data.title_for_save(), ..data };
        prop_assert_eq!(loaded, expected);
    }

    #[test]
    fn legacy_arrays_load_as_their_chat_history(history in history()) {
        let rt = super::runtime();
        let items: Vec<Value> = history.iter().map(|m| {
            let mut v = json!({ "role": m.role, "content": m.content });
            if let Some(meta) = &m.meta {
                v["meta"] = json!({ "is_summary": meta.is_summary, "summary_of": meta.summary_of, "mode": meta.mode });
            }
            v
        }).collect();
        let loaded = load_file(&rt, &serde_json::to_vec(&items).unwrap()).unwrap();
        prop_assert_eq!(loaded.chat_history, history);
    }
}

/// Corpus: every file loads or fails with a message, within the bounds.
#[test]
fn session_corpus() {
    let rt = super::runtime();
    for (name, bytes) in super::corpus("sessions") {
        let loaded = load_file(&rt, &bytes);
        assert_bounded(&bytes, &loaded);
        if let Err(e) = &loaded {
            assert!(!e.is_empty(), "{name}");
        }
    }
}
