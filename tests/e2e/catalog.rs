//! The catalog over gRPC against the real server: signed plugins listed by role, run in the
//! sandbox and downloaded in chunks; agents and skills from their folders; the counts of
//! GetServerInfo matching the lists.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use chatcli::auth::Role;
use chatcli::config::{Config, NamedToken};
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{
    DownloadPluginRequest, DownloadPluginResponse, ExecuteRemotePluginRequest,
    GetAgentDefinitionRequest, GetServerInfoRequest, GetSkillContentRequest,
    ListRemoteAgentsRequest, ListRemotePluginsRequest, ListRemoteSkillsRequest,
};
use ed25519_dalek::{Signer, SigningKey};
use futures::StreamExt;
use sha2::Digest as _;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::support::{BearerToken, TestServer, echo_config, sha256_hex};

type Client = ChatCliServiceClient<InterceptedService<Channel, BearerToken>>;

fn client(channel: &Channel, token: &str) -> Client {
    ChatCliServiceClient::with_interceptor(channel.clone(), BearerToken(Some(token.into())))
}

fn token(name: &str, role: Role) -> NamedToken {
    NamedToken {
        name: name.into(),
        role,
        sha256: Some(sha256_hex(&format!("tok-{name}"))),
        ..NamedToken::default()
    }
}

fn config() -> Config {
    let mut c = echo_config();
    c.auth.tokens = vec![
        token("admin", Role::Admin),
        token("user", Role::User),
        token("reader", Role::ReadOnly),
    ];
    c
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A signing key, trusted by the server under `data/trusted-keys/e2e.pub` (as a PKIX PEM block).
fn trust(data: &Path) -> SigningKey {
    let key = SigningKey::from_bytes(&[5u8; 32]);
    let dir = data.join("trusted-keys");
    std::fs::create_dir_all(&dir).unwrap();
    let spki = [
        &[
            0x30u8, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ][..],
        &key.verifying_key().to_bytes(),
    ]
    .concat();
    std::fs::write(
        dir.join("e2e.pub"),
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            b64(&spki)
        ),
    )
    .unwrap();
    key
}

/// Writes an executable plugin script dated a minute back (settled), signed with `key` if given.
fn plugin(data: &Path, file: &str, name: &str, body: &str, key: Option<&SigningKey>) -> PathBuf {
    let dir = data.join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(file);
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --metadata ]; then echo '{{\"name\":\"{name}\",\"description\":\"the {name} plugin\",\"usage\":\"{name} ARGS\",\"version\":\"2.1\"}}'; exit 0; fi\nif [ \"$1\" = --schema ]; then exit 1; fi\n{body}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(60))
        .unwrap();
    if let Some(key) = key {
        let digest: [u8; 32] = sha2::Sha256::digest(std::fs::read(&p).unwrap()).into();
        std::fs::write(
            dir.join(format!("{file}.sig")),
            b64(&key.sign(&digest).to_bytes()),
        )
        .unwrap();
    }
    p
}

async fn plugin_names(c: &mut Client) -> Vec<String> {
    c.list_remote_plugins(ListRemotePluginsRequest {})
        .await
        .unwrap()
        .into_inner()
        .plugins
        .into_iter()
        .map(|p| p.name)
        .collect()
}

fn exec(name: &str, args: &[&str]) -> ExecuteRemotePluginRequest {
    ExecuteRemotePluginRequest {
        plugin_name: name.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        stream: false,
    }
}

async fn download(
    c: &mut Client,
    name: &str,
    os: &str,
    arch: &str,
) -> Result<Vec<DownloadPluginResponse>, tonic::Status> {
    let mut stream = c
        .download_plugin(DownloadPluginRequest {
            plugin_name: name.into(),
            target_os: os.into(),
            target_arch: arch.into(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        out.push(m?);
    }
    Ok(out)
}

#[tokio::test]
async fn plugins_are_listed_by_role_run_sandboxed_and_downloaded() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_path = audit_dir.path().join("audit.jsonl");
    let mut c = config();
    c.audit.path = Some(audit_path.clone());
    let s = TestServer::start_with(c).await;
    let d = &s.data_dir;
    let key = trust(d);
    // Padded past two chunks, so the download has three data messages.
    let hello = plugin(
        d,
        "hello",
        "hello",
        &format!(
            "printf '%s|' \"$@\"; echo; echo \"home=$HOME\"; pwd\n# {}",
            "x".repeat(150 * 1024)
        ),
        Some(&key),
    );
    plugin(d, "secret", "_secret", "echo admin only", Some(&key));
    plugin(d, "rogue", "rogue", "echo unsigned", None);
    plugin(
        d,
        "fails",
        "fails",
        "echo partial; echo broken >&2; exit 4",
        Some(&key),
    );
    let wrong = SigningKey::from_bytes(&[6u8; 32]);
    plugin(d, "forged", "forged", "echo forged", Some(&wrong));

    let (mut admin, mut user, mut reader) = (
        client(&s.channel, "tok-admin"),
        client(&s.channel, "tok-user"),
        client(&s.channel, "tok-reader"),
    );
    assert!(plugin_names(&mut reader).await.is_empty());
    assert_eq!(plugin_names(&mut user).await, ["@coder", "fails", "hello"]);
    let all = plugin_names(&mut admin).await;
    assert_eq!(all, ["@coder", "_secret", "fails", "hello"]);
    let listed = user
        .list_remote_plugins(ListRemotePluginsRequest {})
        .await
        .unwrap()
        .into_inner()
        .plugins;
    let h = listed.iter().find(|p| p.name == "hello").unwrap();
    assert_eq!(
        (h.description.as_str(), h.usage.as_str(), h.version.as_str()),
        ("the hello plugin", "hello ARGS", "2.1")
    );
    let info = user
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.plugin_count as usize, all.len());

    // Run: an argv without a shell, no inherited environment, a fresh working folder.
    let err = reader
        .execute_remote_plugin(exec("hello", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let out = user
        .execute_remote_plugin(exec("hello", &["a b", "$(id)", "; rm -rf /"]))
        .await
        .unwrap()
        .into_inner();
    assert!(out.done);
    assert_eq!(out.error, "");
    let mut lines = out.output.lines();
    assert_eq!(lines.next(), Some("a b|$(id)|; rm -rf /|"));
    assert_eq!(lines.next(), Some("home="));
    assert!(lines.next().unwrap().contains("chatcli-plugin-run-"));
    // stream=true is answered whole, the same way.
    let streamed = user
        .execute_remote_plugin(ExecuteRemotePluginRequest {
            stream: true,
            ..exec("hello", &["a b", "$(id)", "; rm -rf /"])
        })
        .await
        .unwrap()
        .into_inner();
    let (first, again): (Vec<_>, Vec<_>) = (
        out.output.lines().collect(),
        streamed.output.lines().collect(),
    );
    assert_eq!(first[..2], again[..2]);
    assert_ne!(first[2], again[2], "each run gets a fresh working folder");
    let failed = user
        .execute_remote_plugin(exec("fails", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.output, "partial\n");
    assert!(
        failed.error.contains("exit status: 4") && failed.error.contains("broken"),
        "{failed:?}"
    );
    for (admin_call, name) in [
        (false, "_secret"),
        (false, "rogue"),
        (true, "forged"),
        (true, "missing"),
    ] {
        let caller = if admin_call { &mut admin } else { &mut user };
        let err = caller
            .execute_remote_plugin(exec(name, &[]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{name}: {err:?}");
    }
    let admin_out = admin
        .execute_remote_plugin(exec("_secret", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(admin_out.output, "admin only\n");
    let err = user
        .execute_remote_plugin(exec("hello", &["a"; 101]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Download: filename and total_size first, 64 KiB chunks, then one empty `done`.
    let msgs = download(&mut reader, "hello", "", "").await.unwrap();
    let bytes = std::fs::read(&hello).unwrap();
    assert_eq!(msgs[0].filename, "hello");
    assert_eq!(msgs[0].total_size as usize, bytes.len());
    let (last, data) = msgs.split_last().unwrap();
    assert!(last.done && last.chunk.is_empty() && last.filename.is_empty());
    assert_eq!(data.len(), bytes.len().div_ceil(64 * 1024));
    assert!(data.iter().all(|m| !m.done && m.chunk.len() <= 64 * 1024));
    assert!(
        data[1..]
            .iter()
            .all(|m| m.filename.is_empty() && m.total_size == 0)
    );
    assert_eq!(
        data.iter()
            .flat_map(|m| m.chunk.clone())
            .collect::<Vec<_>>(),
        bytes
    );
    let err = download(&mut user, "hello", "plan9", "amd64")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = download(&mut user, "rogue", "", "").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Downloads and runs are audited with the plugin as the resource; a readonly run as denied.
    let lines: Vec<serde_json::Value> = crate::support::eventually("the audit lines", || async {
        let text = std::fs::read_to_string(&audit_path).ok()?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        lines
            .iter()
            .any(|l| {
                l["method"] == "/chatcli.v1.ChatCLIService/DownloadPlugin" && l["result"] == "error"
            })
            .then_some(lines)
    })
    .await;
    let has = |method: &str, resource: &str, result: &str| {
        lines.iter().any(|l| {
            l["method"] == format!("/chatcli.v1.ChatCLIService/{method}")
                && l.to_string().contains(&format!("\"{resource}\""))
                && l["result"] == result
        })
    };
    assert!(has("DownloadPlugin", "hello", "ok"), "{lines:#?}");
    assert!(has("ExecuteRemotePlugin", "hello", "ok"), "{lines:#?}");
    assert!(has("ExecuteRemotePlugin", "hello", "denied"), "{lines:#?}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_hanging_plugin_is_stopped_at_the_timeout() {
    let mut c = config();
    c.catalog.exec_timeout = Duration::from_secs(3);
    let s = TestServer::start_with(c).await;
    let d = &s.data_dir;
    let key = trust(d);
    let pidfile = s.root().join("child.pid");
    plugin(
        d,
        "hang",
        "hang",
        &format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
        Some(&key),
    );
    let mut user = client(&s.channel, "tok-user");
    let out = user
        .execute_remote_plugin(exec("hang", &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(out.error.contains("timed out"), "{out:?}");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    crate::support::eventually("the plugin's child to be gone", || async {
        let gone = std::fs::read_to_string(&stat).map_or(true, |s| {
            s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z'))
        });
        gone.then_some(())
    })
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn agents_and_skills_come_from_their_folders() {
    let s = TestServer::start_with(config()).await;
    let d = &s.data_dir;
    let agents = d.join("agents");
    let skills = d.join("skills");
    std::fs::create_dir_all(&agents).unwrap();
    std::fs::create_dir_all(skills.join("deploy/scripts")).unwrap();
    std::fs::write(
        agents.join("ops.md"),
        "---\nname: ops\ndescription: Operations\nskills: [deploy]\nplugins: [hello]\nmodel: m1\neffort: high\ncategory: infra\nversion: \"3\"\nauthor: me\ntags: [a, b]\n---\nYou run things.\n",
    )
    .unwrap();
    std::fs::write(agents.join("broken.md"), "---\nname: [oops\n---\nx\n").unwrap();
    std::fs::write(
        skills.join("deploy/SKILL.md"),
        "---\nname: deploy\ndescription: Deploys\nallowed-tools: [Bash]\n---\nHow to deploy.\n",
    )
    .unwrap();
    std::fs::write(skills.join("deploy/rollback.md"), "Rollback steps").unwrap();
    std::fs::write(skills.join("deploy/scripts/go.sh"), "#!/bin/sh\n").unwrap();
    std::fs::write(skills.join("lint.md"), "Lint it.\n").unwrap();

    let mut reader = client(&s.channel, "tok-reader");
    let listed = reader
        .list_remote_agents(ListRemoteAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(
        listed.len(),
        1,
        "the malformed agent is skipped: {listed:?}"
    );
    let ops = reader
        .get_agent_definition(GetAgentDefinitionRequest { name: "ops".into() })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap();
    assert_eq!(ops, listed[0]);
    assert_eq!(
        (
            ops.description.as_str(),
            ops.model.as_str(),
            ops.effort.as_str()
        ),
        ("Operations", "m1", "high")
    );
    assert_eq!(
        (ops.skills.clone(), ops.plugins.clone()),
        (vec!["deploy".to_string()], vec!["hello".to_string()])
    );
    assert_eq!(ops.tags, ["a", "b"]);
    assert_eq!(
        (
            ops.version.as_str(),
            ops.author.as_str(),
            ops.category.as_str()
        ),
        ("3", "me", "infra")
    );
    assert_eq!(ops.content, "You run things.\n");
    assert!(
        ops.frontmatter.contains("author: me"),
        "{:?}",
        ops.frontmatter
    );
    let err = reader
        .get_agent_definition(GetAgentDefinitionRequest {
            name: "broken".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let skills_listed = reader
        .list_remote_skills(ListRemoteSkillsRequest {})
        .await
        .unwrap()
        .into_inner()
        .skills;
    let names: Vec<_> = skills_listed.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["deploy", "lint"]);
    let deploy = reader
        .get_skill_content(GetSkillContentRequest {
            name: "deploy".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .skill
        .unwrap();
    assert_eq!(deploy.content, "How to deploy.\n");
    assert_eq!(deploy.allowed_tools, ["Bash"]);
    assert_eq!(
        deploy.subskills.get("rollback.md").unwrap(),
        "Rollback steps"
    );
    let script = PathBuf::from(deploy.scripts.get("go.sh").unwrap());
    assert!(script.is_absolute() && script.is_file(), "{script:?}");
    let err = reader
        .get_skill_content(GetSkillContentRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = reader
        .get_skill_content(GetSkillContentRequest {
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let info = reader
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.agent_count, info.skill_count),
        (listed.len() as i32, skills_listed.len() as i32)
    );
    // A file added later is seen without a restart.
    std::fs::write(agents.join("new.md"), "New agent\n").unwrap();
    let n = reader
        .list_remote_agents(ListRemoteAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents
        .len();
    assert_eq!(n, 2);
    s.shutdown().await;
}

use crate::python::python;

#[tokio::test]
async fn python_peer_lists_and_downloads_a_plugin() {
    let s = TestServer::start_with(config()).await;
    let key = trust(&s.data_dir);
    let p = plugin(
        &s.data_dir,
        "pytool",
        "pytool",
        &format!("echo hi\n# {}", "y".repeat(100 * 1024)),
        Some(&key),
    );
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/catalog_peer.py");
    let home = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(python())
        .arg(&peer)
        .arg(s.addr.to_string())
        .arg("tok-user")
        .arg("pytool")
        .arg(&p)
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    // Generating the stubs takes a few seconds; the bound only keeps a stuck peer from hanging.
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the python peer did not finish within 120s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "catalog peer failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("catalog peer: OK"), "{stdout}");
    s.shutdown().await;
}

async fn http_exec(s: &TestServer, token: &str, name: &str, body: &str) -> reqwest::Response {
    crate::support::http_client()
        .post(s.url(&format!("/plugins/{name}/exec")))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn http_exec_streams_output_lines_as_sse() {
    let s = TestServer::start_with(config()).await;
    let d = &s.data_dir;
    let key = trust(d);
    plugin(
        d,
        "lines",
        "lines",
        "for a in \"$@\"; do echo \"out $a\"; done; echo warn >&2; printf 'tail'; exit 2",
        Some(&key),
    );
    let pidfile = s.root().join("sse-child.pid");
    plugin(
        d,
        "forever",
        "forever",
        &format!(
            "echo started; sleep 300 & echo $! > {}; wait",
            pidfile.display()
        ),
        Some(&key),
    );

    let resp = http_exec(&s, "tok-user", "lines", r#"{"args": ["a b", "$(id)"]}"#).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = resp.text().await.unwrap();
    let events: Vec<(String, serde_json::Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let event = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    let lines = |kind: &str| -> Vec<String> {
        events
            .iter()
            .filter(|(e, _)| e == kind)
            .map(|(_, d)| d["line"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(lines("stdout"), ["out a b", "out $(id)", "tail"], "{text}");
    assert_eq!(lines("stderr"), ["warn"], "{text}");
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "done", "{text}");
    assert!(
        done["error"].as_str().unwrap().contains("exit status: 2"),
        "{done}"
    );
    assert_eq!(done["truncated"], false);

    assert_eq!(
        http_exec(&s, "tok-reader", "lines", "{}").await.status(),
        403
    );
    assert_eq!(
        http_exec(&s, "tok-user", "missing", "{}").await.status(),
        404
    );
    assert_eq!(
        http_exec(&s, "tok-user", "lines", r#"{"args": "not a list"}"#)
            .await
            .status(),
        400
    );

    // The client goes away: the plugin's process group is killed.
    let resp = http_exec(&s, "tok-user", "forever", "{}").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&first).contains("started"),
        "{first:?}"
    );
    let pid = crate::support::eventually("the child's pid", || async {
        std::fs::read_to_string(&pidfile)
            .ok()
            .filter(|p| p.ends_with('\n'))
    })
    .await;
    drop(body);
    let stat = format!("/proc/{}/stat", pid.trim());
    crate::support::eventually("the plugin's child to be gone", || async {
        let gone = std::fs::read_to_string(&stat).map_or(true, |s| {
            s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z'))
        });
        gone.then_some(())
    })
    .await;
    s.shutdown().await;
}

/// Sends one remote command over InteractiveSession as the holder of `token`; the reply text.
async fn remote_command(s: &TestServer, token: &str, command: &str) -> String {
    use chatcli::proto::SessionMessage;
    use chatcli::proto::session_message::Type;
    let mut c = client(&s.channel, token);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(SessionMessage {
        r#type: Type::Command as i32,
        content: command.into(),
        metadata: Default::default(),
    })
    .await
    .unwrap();
    let mut replies = c
        .interactive_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    assert_eq!(reply.r#type(), Type::CommandResult, "{reply:?}");
    reply.content
}

#[tokio::test]
async fn remote_commands_list_the_catalog() {
    let s = TestServer::start_with(config()).await;
    let d = &s.data_dir;
    let key = trust(d);
    plugin(d, "hello", "hello", "echo hi", Some(&key));
    plugin(d, "secret", "_secret", "echo s", Some(&key));
    plugin(d, "rogue", "rogue", "echo r", None);
    std::fs::create_dir_all(d.join("agents")).unwrap();
    std::fs::write(d.join("agents/ops.md"), "---\ndescription: Ops\n---\nx\n").unwrap();

    let user = remote_command(&s, "tok-user", "/plugins list").await;
    assert!(user.starts_with("=== Plugins (2) ==="), "{user}");
    assert!(
        user.contains("  - hello (v2.1) — the hello plugin"),
        "{user}"
    );
    assert!(!user.contains("_secret"), "{user}");
    let admin = remote_command(&s, "tok-admin", "/plugins list").await;
    assert!(
        admin.starts_with("=== Plugins (3) ===") && admin.contains("_secret"),
        "{admin}"
    );
    assert_eq!(
        remote_command(&s, "tok-reader", "/plugins list").await,
        "No plugins available."
    );
    let agents = remote_command(&s, "tok-reader", "/agents list").await;
    assert_eq!(agents, "=== Agents (1) ===\n  - ops — Ops");
    assert_eq!(
        remote_command(&s, "tok-user", "/skills list").await,
        "No skills available."
    );
    let status = remote_command(&s, "tok-admin", "/status").await;
    assert!(status.contains("Plugins:  3 loaded"), "{status}");
    assert!(status.contains("Agents:   1 available"), "{status}");
    assert!(
        status.contains("Refused plugin: ") && status.contains("rogue: unsigned"),
        "{status}"
    );
    let status = remote_command(&s, "tok-user", "/status").await;
    assert!(!status.contains("Refused plugin"), "{status}");
    s.shutdown().await;
}
