//! Sessions over gRPC against the files on disk: v1 and v2 round trips, files the local ChatCLI
//! wrote, the name rule, and where and how the files are written.

use std::os::unix::fs::PermissionsExt;

use chatcli::proto::{
    ChatMessage, DeleteSessionRequest, ListSessionsRequest, LoadSessionRequest, MessageMeta,
    SaveSessionRequest, SessionDataV2,
};
use tonic::Code;

use crate::support::{TestServer, files_under};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        meta: None,
    }
}

fn save_v1(name: &str, messages: Vec<ChatMessage>) -> SaveSessionRequest {
    SaveSessionRequest {
        name: name.into(),
        messages,
        session_data: None,
    }
}

fn load(name: &str) -> LoadSessionRequest {
    LoadSessionRequest { name: name.into() }
}

#[tokio::test]
async fn sessions_round_trip_v1_and_v2() {
    let mut s = TestServer::start().await;
    let c = &mut s.client;
    let list = c
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.sessions.is_empty(), "fresh data dir: {list:?}");

    let v1 = vec![msg("user", "hello"), msg("assistant", "hi there")];
    let saved = c
        .save_session(save_v1("chat-one", v1.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(saved.success);
    let loaded = c.load_session(load("chat-one")).await.unwrap().into_inner();
    assert_eq!(loaded.messages, v1);
    let data = loaded.session_data.expect("session_data missing");
    assert_eq!(data.version, 2);
    assert_eq!(data.chat_history, v1);
    assert!(data.agent_history.is_empty() && data.coder_history.is_empty());

    let v2 = SessionDataV2 {
        version: 2,
        chat_history: vec![msg("user", "plan the release"), msg("assistant", "ok")],
        agent_history: vec![
            msg("user", "list the pods"),
            ChatMessage {
                role: "assistant".into(),
                content: "summary of three turns".into(),
                meta: Some(MessageMeta {
                    is_summary: true,
                    summary_of: 3,
                    mode: "agent".into(),
                }),
            },
        ],
        coder_history: vec![msg("user", "fix main.rs"), msg("assistant", "done")],
        shared_memory: vec![msg("system", "the cluster is prod-eu")],
    };
    let saved = c
        .save_session(SaveSessionRequest {
            name: "agent.v2".into(),
            // v2 wins over messages when both are present.
            messages: vec![msg("user", "ignored")],
            session_data: Some(v2.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(saved.success);
    let loaded = c.load_session(load("agent.v2")).await.unwrap().into_inner();
    assert_eq!(loaded.session_data.as_ref(), Some(&v2));
    assert_eq!(loaded.messages, v2.chat_history);

    let list = c
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sessions, vec!["agent.v2", "chat-one"]);

    let dir = s.data_dir.join("sessions");
    for name in ["chat-one", "agent.v2"] {
        let path = dir.join(format!("{name}.json"));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{path:?}");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(json.is_object(), "{path:?}: {json}");
        assert_eq!(json["version"], 2, "{path:?}: {json}");
    }
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("agent.v2.json")).unwrap()).unwrap();
    assert_eq!(
        file["agent_history"][1]["meta"],
        serde_json::json!({"is_summary": true, "summary_of": 3, "mode": "agent"})
    );
    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "sessions folder mode");

    let deleted = c
        .delete_session(DeleteSessionRequest {
            name: "chat-one".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.success);
    assert!(!dir.join("chat-one.json").exists());
    let err = c.load_session(load("chat-one")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .delete_session(DeleteSessionRequest {
            name: "chat-one".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let list = c
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sessions, vec!["agent.v2"]);
    s.shutdown().await;
}

#[tokio::test]
async fn files_written_by_the_local_chatcli_load() {
    let mut s = TestServer::start().await;
    let dir = s.data_dir.join("sessions");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("legacy.json"),
        r#"[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("old.json"),
        r#"{
  "version": 2,
  "title": "pods",
  "chat_history": null,
  "agent_history": [
    {"role": "user", "content": "list pods", "images": ["a.png"]},
    {"role": "assistant", "content": "three pods", "tool_calls": [{"id": "1", "name": "kubectl"}],
     "meta": {"is_summary": true, "summary_of": 2, "mode": "agent", "pinned": true}}
  ],
  "tool_calls": [],
  "images": null
}"#,
    )
    .unwrap();

    let legacy = s
        .client
        .load_session(load("legacy"))
        .await
        .unwrap()
        .into_inner();
    let want = vec![msg("user", "hi"), msg("assistant", "hello")];
    assert_eq!(legacy.messages, want);
    let data = legacy.session_data.unwrap();
    assert_eq!(data.version, 2);
    assert_eq!(data.chat_history, want);
    // The legacy file was rewritten as a private v2 object that keeps the messages.
    let path = dir.join("legacy.json");
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(file["version"], 2, "{file}");
    assert_eq!(file["chat_history"][1]["content"], "hello", "{file}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = s
        .client
        .load_session(load("legacy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.messages, want);

    let old = s
        .client
        .load_session(load("old"))
        .await
        .unwrap()
        .into_inner();
    assert!(old.messages.is_empty());
    let data = old.session_data.unwrap();
    assert!(data.chat_history.is_empty());
    assert_eq!(
        data.agent_history,
        vec![
            msg("user", "list pods"),
            ChatMessage {
                role: "assistant".into(),
                content: "three pods".into(),
                meta: Some(MessageMeta {
                    is_summary: true,
                    summary_of: 2,
                    mode: "agent".into()
                }),
            },
        ]
    );
    let list = s
        .client
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sessions, vec!["legacy", "old"]);
    s.shutdown().await;
}

#[tokio::test]
async fn bad_session_names_are_refused_and_write_nothing() {
    let mut s = TestServer::start().await;
    for name in ["../evil", "", ".hidden", "a/b", "/abs", "..", "a\\b"] {
        let err = s
            .client
            .save_session(save_v1(name, vec![msg("user", "x")]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?}: {err:?}");
        let err = s.client.load_session(load(name)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "load {name:?}: {err:?}");
    }
    let written = files_under(s.root());
    assert!(written.is_empty(), "files were written: {written:?}");
    s.shutdown().await;
}
