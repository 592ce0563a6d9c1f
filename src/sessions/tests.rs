//! Tests of the session store as the gRPC service uses it: name rule, file shape and modes,
//! compatibility with the local ChatCLI's files, legacy migration, durability and isolation.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;

fn store() -> (tempfile::TempDir, SessionStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = SessionStore::new(tmp.path().join("data").join("sessions"));
    (tmp, store)
}

fn msg(role: &str, content: &str) -> StoredMessage {
    StoredMessage {
        role: role.into(),
        content: content.into(),
        meta: None,
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file and folder below `dir`, recursively, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(tree(&path));
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

fn write_default(store: &SessionStore, name: &str, content: &str) -> PathBuf {
    fs::create_dir_all(store.root()).unwrap();
    let path = store.root().join(format!("{name}.json"));
    fs::write(&path, content).unwrap();
    path
}

#[test]
fn name_rule_table() {
    let valid = [
        "a".to_owned(),
        "Z".to_owned(),
        "0".to_owned(),
        "a..b".to_owned(),
        "a.".to_owned(),
        "9-_".to_owned(),
        "my-session_1.v2".to_owned(),
        "x.json".to_owned(),
        "autosave-20260720-1504".to_owned(),
        "a".repeat(255),
    ];
    for name in &valid {
        assert!(validate_name(name).is_ok(), "{name:?} should be valid");
    }
    let invalid = [
        String::new(),
        ".".to_owned(),
        "..".to_owned(),
        ".hidden".to_owned(),
        "-a".to_owned(),
        "_a".to_owned(),
        "a/b".to_owned(),
        "../x".to_owned(),
        "/abs".to_owned(),
        "a\\b".to_owned(),
        "a b".to_owned(),
        " a".to_owned(),
        "a\0b".to_owned(),
        "\0".to_owned(),
        "a\n".to_owned(),
        "a:b".to_owned(),
        "a*".to_owned(),
        "a".repeat(256),
        "é".to_owned(),
        "sessão".to_owned(),
        "日本".to_owned(),
        "a\u{200b}".to_owned(),
    ];
    for name in &invalid {
        assert!(
            matches!(validate_name(name), Err(SessionError::InvalidName { .. })),
            "{name:?} should be invalid"
        );
    }
    let Err(SessionError::InvalidName { reason }) = validate_name("") else {
        panic!("empty name must be invalid");
    };
    assert_eq!(reason, "session name cannot be empty");
}

#[tokio::test]
async fn save_load_round_trip_writes_the_exact_v2_file_with_private_modes() {
    let (_tmp, store) = store();
    let data = SessionData {
        version: 1, // forced to 2
        title: String::new(),
        chat_history: vec![
            msg("user", "  Plan the\n  trip "),
            StoredMessage {
                role: "assistant".into(),
                content: "summary".into(),
                meta: Some(StoredMeta {
                    is_summary: true,
                    summary_of: 6,
                    mode: "chat".into(),
                }),
            },
        ],
        agent_history: vec![msg("user", "run ls")],
        coder_history: vec![StoredMessage {
            role: "assistant".into(),
            content: "patched".into(),
            meta: Some(StoredMeta {
                is_summary: false,
                summary_of: 0,
                mode: "coder".into(),
            }),
        }],
        shared_memory: vec![msg("system", "the user likes Rust")],
    };
    store.save("default", "trip", data.clone()).await.unwrap();

    let path = store.root().join("trip.json");
    let expected = r#"{
  "version": 2,
  "title": "Plan the trip",
  "chat_history": [
    {
      "role": "user",
      "content": "  Plan the\n  trip "
    },
    {
      "role": "assistant",
      "content": "summary",
      "meta": {
        "is_summary": true,
        "summary_of": 6,
        "mode": "chat"
      }
    }
  ],
  "agent_history": [
    {
      "role": "user",
      "content": "run ls"
    }
  ],
  "coder_history": [
    {
      "role": "assistant",
      "content": "patched",
      "meta": {
        "mode": "coder"
      }
    }
  ],
  "shared_memory": [
    {
      "role": "system",
      "content": "the user likes Rust"
    }
  ]
}"#;
    assert_eq!(fs::read_to_string(&path).unwrap(), expected);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(store.root()), 0o700);

    let loaded = store.load("default", "trip").await.unwrap();
    assert_eq!(
        loaded,
        SessionData {
            version: 2,
            title: "Plan the trip".into(),
            ..data
        }
    );

    // Other principals' folders are private too, at every level the store creates.
    store
        .save("alice", "empty", SessionData::default())
        .await
        .unwrap();
    let dir = store.principal_dir("alice");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(dir.parent().unwrap()), 0o700);
    assert_eq!(mode(&dir.join("empty.json")), 0o600);
    assert_eq!(
        fs::read_to_string(dir.join("empty.json")).unwrap(),
        "{\n  \"version\": 2,\n  \"chat_history\": []\n}"
    );
}

#[tokio::test]
async fn loads_files_written_by_the_local_chatcli() {
    let (_tmp, store) = store();
    let null_chat = r#"{
  "version": 2,
  "title": "deploy the app",
  "chat_history": null,
  "agent_history": [
    {
      "role": "user",
      "content": "deploy the app"
    },
    {
      "role": "assistant",
      "content": "",
      "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "exec", "arguments": "{\"cmd\":\"make deploy\"}"}}
      ]
    },
    {
      "role": "tool",
      "content": "done",
      "tool_call_id": "call_1"
    }
  ]
}"#;
    let path = write_default(&store, "deploy", null_chat);
    let data = store.load("default", "deploy").await.unwrap();
    assert_eq!(data.version, 2);
    assert_eq!(data.title, "deploy the app");
    assert!(data.chat_history.is_empty());
    assert_eq!(
        data.agent_history,
        vec![
            msg("user", "deploy the app"),
            msg("assistant", ""),
            msg("tool", "done")
        ]
    );
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        null_chat,
        "a v2 file is not rewritten"
    );

    let extra_keys = r#"{
  "version": 2,
  "title": "review",
  "chat_history": [
    {"role": "system", "content": "be brief", "system_parts": [{"text": "be brief", "cache": true}]},
    {"role": "user", "content": "look at this", "images": [{"mime_type": "image/png", "data": "iVBORw0KGgo="}]},
    {"role": "assistant", "content": "summary of 12 turns",
     "meta": {"is_summary": true, "summary_of": 12, "mode": "coder", "pinned": true, "compacted_at": "2026-01-02T03:04:05Z"}},
    {"role": "assistant", "content": "ok", "meta": {"hidden": true}}
  ],
  "coder_history": [],
  "shared_memory": [{"role": "user", "content": "fact"}],
  "workspace": "/home/op/project",
  "created_at": "2026-01-02T03:04:05Z"
}"#;
    write_default(&store, "review", extra_keys);
    let data = store.load("default", "review").await.unwrap();
    assert_eq!(data.title, "review");
    assert_eq!(data.chat_history.len(), 4);
    assert_eq!(data.chat_history[1], msg("user", "look at this"));
    assert_eq!(
        data.chat_history[2].meta,
        Some(StoredMeta {
            is_summary: true,
            summary_of: 12,
            mode: "coder".into()
        })
    );
    assert_eq!(
        data.chat_history[3].meta, None,
        "a meta with only unknown flags is no meta"
    );
    assert!(data.coder_history.is_empty());
    assert_eq!(data.shared_memory, vec![msg("user", "fact")]);

    write_default(
        &store,
        "versionless",
        r#"{"chat_history": [{"role": "user", "content": "hi"}]}"#,
    );
    let data = store.load("default", "versionless").await.unwrap();
    assert_eq!(
        (data.version, data.chat_history),
        (2, vec![msg("user", "hi")])
    );
}

#[tokio::test]
async fn legacy_array_loads_and_is_migrated_on_disk() {
    let (_tmp, store) = store();
    let legacy = r#"[
  {"role": "user", "content": "old   times"},
  {"role": "assistant", "content": "hello", "tool_calls": [{"id": "c1"}]}
]"#;
    let path = write_default(&store, "old", legacy);
    let data = store.load("default", "old").await.unwrap();
    let expected = SessionData {
        version: 2,
        title: "old times".into(),
        chat_history: vec![msg("user", "old   times"), msg("assistant", "hello")],
        ..SessionData::default()
    };
    assert_eq!(data, expected);

    let on_disk: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let original: serde_json::Value = serde_json::from_str(legacy).unwrap();
    assert_eq!(on_disk["version"], 2);
    assert_eq!(on_disk["title"], "old times");
    assert_eq!(
        on_disk["chat_history"], original,
        "messages, local-only fields included, are kept"
    );
    assert_eq!(mode(&path), 0o600);
    assert_eq!(tree(store.root()), vec![path.clone()], "no temp file left");

    let migrated = fs::read(&path).unwrap();
    assert_eq!(store.load("default", "old").await.unwrap(), expected);
    assert_eq!(
        fs::read(&path).unwrap(),
        migrated,
        "a v2 file is not migrated again"
    );
}

#[tokio::test]
async fn failed_legacy_migration_still_returns_the_data() {
    let (_tmp, store) = store();
    let legacy = r#"[{"role": "user", "content": "keep me"}]"#;
    let path = write_default(&store, "old", legacy);
    let data = store
        .load_with("default", "old", |_| {
            Err(std::io::Error::other("disk full"))
        })
        .await
        .unwrap();
    assert_eq!(data.chat_history, vec![msg("user", "keep me")]);
    assert_eq!(fs::read_to_string(&path).unwrap(), legacy);
    assert_eq!(tree(store.root()), vec![path]);
}

#[tokio::test]
async fn write_failing_between_temp_file_and_rename_keeps_the_old_session() {
    let (_tmp, store) = store();
    let old = SessionData::from_messages(vec![]);
    store.save("alice", "s", old.clone()).await.unwrap();
    let dir = store.principal_dir("alice");
    let path = dir.join("s.json");
    let before = fs::read(&path).unwrap();

    let new = format::encode(&SessionData {
        chat_history: vec![msg("user", "new")],
        ..SessionData::default()
    })
    .unwrap();
    let mut temp_existed = false;
    let result = fsio::write_atomic_with(&dir, "s.json", &new, |temp| {
        temp_existed = temp.is_file();
        Err(std::io::Error::other("crash before rename"))
    });
    assert!(result.is_err());
    assert!(temp_existed);

    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(tree(&dir), vec![path], "no temp file left");
    assert_eq!(store.load("alice", "s").await.unwrap(), old);
    assert_eq!(store.list("alice").await.unwrap(), vec!["s"]);
}

#[tokio::test]
async fn principals_are_isolated() {
    let (_tmp, store) = store();
    let alice = SessionData::from_messages(vec![]);
    store.save("alice", "notes", alice.clone()).await.unwrap();

    for other in ["bob", "default", "Alice", "alice "] {
        assert!(store.list(other).await.unwrap().is_empty(), "{other}");
        assert!(
            matches!(
                store.load(other, "notes").await,
                Err(SessionError::NotFound { .. })
            ),
            "{other}"
        );
        assert!(
            matches!(
                store.delete(other, "notes").await,
                Err(SessionError::NotFound { .. })
            ),
            "{other}"
        );
    }

    let bob = SessionData {
        chat_history: vec![msg("user", "bob's")],
        ..SessionData::default()
    };
    store.save("bob", "notes", bob.clone()).await.unwrap();
    store.save("default", "notes", bob.clone()).await.unwrap();
    assert_eq!(store.load("alice", "notes").await.unwrap(), alice);
    store.delete("bob", "notes").await.unwrap();
    assert_eq!(store.list("alice").await.unwrap(), vec!["notes"]);
    assert_eq!(store.list("default").await.unwrap(), vec!["notes"]);
}

#[tokio::test]
async fn weird_principal_ids_stay_inside_root() {
    let (tmp, store) = store();
    let principals_dir = store.root().join("principals");
    let weird = [
        "../x".to_owned(),
        "..".to_owned(),
        ".".to_owned(),
        "a/b".to_owned(),
        "/etc".to_owned(),
        "a\\b".to_owned(),
        String::new(),
        "default/../..".to_owned(),
        "a\0b".to_owned(),
        "principals".to_owned(),
        "DEFAULT".to_owned(),
        "x".repeat(1000),
        "é".repeat(200),
    ];
    let mut dirs = Vec::new();
    for principal in &weird {
        store
            .save(principal, "s", SessionData::from_messages(vec![]))
            .await
            .unwrap();
        let dir = store.principal_dir(principal);
        assert_eq!(
            dir.parent(),
            Some(principals_dir.as_path()),
            "{principal:?}"
        );
        let folder = dir.file_name().unwrap().to_str().unwrap();
        assert!(folder.len() <= 201, "{principal:?}");
        assert!(
            folder[1..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{principal:?}: {folder}"
        );
        assert!(dir.join("s.json").is_file(), "{principal:?}");
        assert_eq!(
            store.list(principal).await.unwrap(),
            vec!["s"],
            "{principal:?}"
        );
        dirs.push(dir);
    }
    let mut unique = dirs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        weird.len(),
        "every principal has its own folder"
    );

    // Nothing was written outside root, and root itself holds no session of "default".
    for path in tree(tmp.path()) {
        assert!(
            path.starts_with(store.root()) || store.root().starts_with(&path),
            "{path:?}"
        );
    }
    assert!(store.list("default").await.unwrap().is_empty());
}

#[tokio::test]
async fn invalid_name_writes_nothing() {
    let (_tmp, store) = store();
    for name in ["", "../escape", "a/b", ".hidden", "a b", "é"] {
        for principal in ["default", "alice"] {
            let err = store
                .save(principal, name, SessionData::from_messages(vec![]))
                .await
                .unwrap_err();
            assert!(matches!(err, SessionError::InvalidName { .. }), "{name:?}");
            assert!(!store.root().exists(), "{name:?} created the store folder");
            assert!(matches!(
                store.load(principal, name).await,
                Err(SessionError::InvalidName { .. })
            ));
            assert!(matches!(
                store.delete(principal, name).await,
                Err(SessionError::InvalidName { .. })
            ));
        }
    }
    assert!(!store.root().parent().unwrap().exists());

    store
        .save("default", "ok", SessionData::default())
        .await
        .unwrap();
    let before = tree(store.root());
    assert!(
        store
            .save("default", "../ok", SessionData::default())
            .await
            .is_err()
    );
    assert_eq!(tree(store.root()), before);
}

#[tokio::test]
async fn names_too_long_for_a_file_are_refused_before_touching_disk() {
    let (_tmp, store) = store();
    let longest = "a".repeat(250);
    store
        .save("default", &longest, SessionData::default())
        .await
        .unwrap();
    assert_eq!(store.list("default").await.unwrap(), vec![longest.clone()]);
    store.load("default", &longest).await.unwrap();

    let too_long = "a".repeat(251);
    assert!(validate_name(&too_long).is_ok());
    let err = store
        .save("alice", &too_long, SessionData::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::InvalidName { .. }), "{err}");
    assert!(!store.principal_dir("alice").exists());
    assert!(matches!(
        store.load("default", &"b".repeat(255)).await,
        Err(SessionError::NotFound { .. })
    ));
}

#[tokio::test]
async fn saved_title_is_derived_collapsed_and_cut_at_60_chars() {
    let (_tmp, store) = store();
    let content = format!("  {}\n\t{}  ", "ü".repeat(40), "日本".repeat(20));
    let data = SessionData::from_messages(vec![
        crate::proto::ChatMessage {
            role: "assistant".into(),
            content: "not a user turn".into(),
            meta: None,
        },
        crate::proto::ChatMessage {
            role: "user".into(),
            content,
            meta: None,
        },
    ]);
    store.save("default", "t", data).await.unwrap();
    let on_disk: serde_json::Value =
        serde_json::from_slice(&fs::read(store.root().join("t.json")).unwrap()).unwrap();
    let expected = format!(
        "{} {}",
        "ü".repeat(40),
        "日本".repeat(10).chars().take(19).collect::<String>()
    );
    assert_eq!(expected.chars().count(), 60);
    assert_eq!(on_disk["title"], expected.as_str());
    assert_eq!(store.load("default", "t").await.unwrap().title, expected);

    // A session without any user turn has no title key at all.
    store
        .save("default", "untitled", SessionData::from_messages(vec![]))
        .await
        .unwrap();
    let untitled = fs::read_to_string(store.root().join("untitled.json")).unwrap();
    assert!(!untitled.contains("title"), "{untitled}");
}

#[tokio::test]
async fn list_is_sorted_and_ignores_temp_and_foreign_files() {
    let (_tmp, store) = store();
    assert!(
        store.list("default").await.unwrap().is_empty(),
        "missing folder is empty"
    );
    for name in ["b", "a", "C", "a..b", "10"] {
        store
            .save("default", name, SessionData::default())
            .await
            .unwrap();
    }
    let root = store.root();
    fs::write(root.join("zz.json.0123456789abcdef.tmp"), "{}").unwrap();
    fs::write(root.join("notes.txt"), "x").unwrap();
    fs::write(root.join("upper.JSON"), "{}").unwrap();
    fs::write(root.join(".hidden.json"), "{}").unwrap();
    fs::write(root.join("bad name.json"), "{}").unwrap();
    fs::write(root.join(".json"), "{}").unwrap();
    fs::create_dir(root.join("folder.json")).unwrap();
    std::os::unix::fs::symlink(root.join("a.json"), root.join("link.json")).unwrap();
    store
        .save("alice", "other", SessionData::default())
        .await
        .unwrap();

    assert_eq!(
        store.list("default").await.unwrap(),
        vec!["10", "C", "a", "a..b", "b"]
    );
}

#[tokio::test]
async fn corrupt_file_is_reported_and_left_untouched() {
    let (_tmp, store) = store();
    let path = write_default(&store, "broken", "{\"version\": 2, \"chat_history\": [");
    let err = store.load("default", "broken").await.unwrap_err();
    let SessionError::Corrupt { name, reason } = &err else {
        panic!("expected Corrupt, got {err:?}");
    };
    assert_eq!(name, "broken");
    assert!(reason.contains("EOF"), "{reason}");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "{\"version\": 2, \"chat_history\": ["
    );

    let message = err.to_string();
    assert!(message.contains("'broken'"), "{message}");
    assert!(!message.contains(&*store.root().to_string_lossy()));

    write_default(&store, "scalar", "\"just a string\"");
    assert!(matches!(
        store.load("default", "scalar").await,
        Err(SessionError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn delete_removes_the_file_and_reports_missing_sessions() {
    let (_tmp, store) = store();
    store
        .save("alice", "gone", SessionData::default())
        .await
        .unwrap();
    store
        .save("alice", "kept", SessionData::default())
        .await
        .unwrap();
    store.delete("alice", "gone").await.unwrap();
    assert!(!store.principal_dir("alice").join("gone.json").exists());
    assert_eq!(store.list("alice").await.unwrap(), vec!["kept"]);
    let err = store.delete("alice", "gone").await.unwrap_err();
    assert!(matches!(&err, SessionError::NotFound { name } if name == "gone"));
    assert!(matches!(
        store.load("alice", "gone").await,
        Err(SessionError::NotFound { .. })
    ));
}

#[tokio::test]
async fn errors_name_the_session_never_a_path() {
    let (_tmp, store) = store();
    let invalid = store
        .save("default", "", SessionData::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&invalid, SessionError::InvalidName { reason } if reason == "session name cannot be empty"),
        "{invalid:?}"
    );

    let missing = store.load("default", "nope").await.unwrap_err();
    assert!(
        matches!(&missing, SessionError::NotFound { .. }),
        "{missing:?}"
    );
    assert_eq!(missing.to_string(), "session 'nope' not found");

    // An I/O failure: the store folder is a plain file.
    fs::create_dir_all(store.root().parent().unwrap()).unwrap();
    fs::write(store.root(), "not a folder").unwrap();
    let io = store
        .save("default", "s", SessionData::default())
        .await
        .unwrap_err();
    assert!(matches!(io, SessionError::Io { .. }), "{io:?}");
    let message = io.to_string();
    assert!(
        message.starts_with("saving session 's' failed"),
        "{message}"
    );
    assert!(!message.contains(&*store.root().to_string_lossy()));
}

#[tokio::test]
async fn concurrent_saves_leave_one_complete_file() {
    let (_tmp, store) = store();
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let data = SessionData {
                chat_history: vec![msg("user", &format!("writer {i}"))],
                ..SessionData::default()
            };
            store.save("alice", "shared", data).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let data = store.load("alice", "shared").await.unwrap();
    assert!(data.title.starts_with("writer "), "{}", data.title);
    assert_eq!(
        tree(&store.principal_dir("alice")),
        vec![store.principal_dir("alice").join("shared.json")]
    );
}
