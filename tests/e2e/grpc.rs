//! The gRPC surface of the in-process server: health, server info, prompts (unary and streamed),
//! request limits, token auth, reflection and the RPCs that still answer UNIMPLEMENTED.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use chatcli::config::Secret;
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{
    ChatMessage, GetServerInfoRequest, HealthRequest, SendPromptRequest, health_response,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    HANG_GUARD, TestServer, collect_stream, echo_config, echo_config_with_delay, echo_provider,
    http_client, list_services, stream_request,
};

const SERVICE: &str = "chatcli.v1.ChatCLIService";

fn send_request(prompt: &str) -> SendPromptRequest {
    SendPromptRequest {
        prompt: prompt.into(),
        ..SendPromptRequest::default()
    }
}

async fn grpc_health(channel: Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let mut health = HealthClient::new(channel);
    let r = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(r.into_inner().status())
}

#[tokio::test]
async fn health_services_answer_serving() {
    let mut s = TestServer::start().await;
    for service in ["", SERVICE] {
        assert_eq!(
            grpc_health(s.channel.clone(), service).await.unwrap(),
            ServingStatus::Serving,
            "grpc.health.v1 Check({service:?})"
        );
    }
    let h = s
        .client
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status(), health_response::Status::Serving);
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    s.shutdown().await;
}

#[tokio::test]
async fn server_info_reports_providers_and_catalog_counts() {
    let mut s = TestServer::start().await;
    let d = &s.data_dir;
    for dir in ["plugins", "agents", "skills/y"] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
    }
    let plugin = d.join("plugins/tool");
    std::fs::write(&plugin, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Not executable: not a plugin.
    std::fs::write(d.join("plugins/README.txt"), "notes").unwrap();
    std::fs::write(d.join("agents/one.md"), "---\nname: one\n---\nbody\n").unwrap();
    std::fs::write(d.join("agents/two.md"), "---\nname: two\n---\nbody\n").unwrap();
    std::fs::write(d.join("agents/notes.txt"), "not an agent").unwrap();
    std::fs::write(d.join("skills/x.md"), "# x\n").unwrap();
    std::fs::write(d.join("skills/y/SKILL.md"), "# y\n").unwrap();

    let info = s
        .client
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.provider, "echo");
    assert_eq!(info.model, "echo-1");
    assert_eq!(info.available_providers, vec!["echo"]);
    // The unsigned `tool` is not offered: the one plugin is the built-in `@coder`.
    assert_eq!(
        (info.plugin_count, info.agent_count, info.skill_count),
        (1, 2, 2)
    );
    assert!(!info.watcher_active);
    s.shutdown().await;

    let mut config = echo_config();
    config.llm.providers = vec![echo_provider("b", None), echo_provider("a", None)];
    let mut s = TestServer::start_with(config).await;
    let info = s
        .client
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.available_providers, vec!["b", "a"]);
    assert_eq!(info.provider, "b", "the default is the first configured");
    assert_eq!(info.model, "echo-1");
    assert_eq!(
        (info.plugin_count, info.agent_count, info.skill_count),
        (1, 0, 0)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn stream_prompt_echoes_in_chunks() {
    // A short pause between words: a server may merge deltas that are ready together, but must
    // forward each one that arrives on its own.
    let mut s =
        TestServer::start_with(echo_config_with_delay(Some(Duration::from_millis(25)))).await;
    let prompt = "one two three four";
    let mut stream = s
        .client
        .stream_prompt(stream_request(prompt))
        .await
        .unwrap()
        .into_inner();
    let msgs = collect_stream(&mut stream).await;
    let (last, chunks) = msgs.split_last().expect("no messages");
    assert!(last.done, "the last message must have done=true");
    assert!(
        chunks.len() >= 4,
        "expected at least 4 chunks before done, got {chunks:?}"
    );
    assert!(chunks.iter().all(|m| !m.done), "only the last is done");
    let text: String = msgs.iter().map(|m| m.chunk.as_str()).collect();
    assert_eq!(text, prompt);
    for m in &msgs {
        assert_eq!((m.provider.as_str(), m.model.as_str()), ("echo", "echo-1"));
    }
    s.shutdown().await;
}

#[tokio::test]
async fn stream_prompt_is_not_buffered() {
    let mut s =
        TestServer::start_with(echo_config_with_delay(Some(Duration::from_millis(300)))).await;
    let mut stream = s
        .client
        .stream_prompt(stream_request("alpha beta gamma delta"))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .unwrap()
        .unwrap()
        .expect("stream ended before the first chunk");
    assert_eq!(first.chunk, "alpha");
    assert!(!first.done);
    // The next word is 300ms away on the server: a buffered answer would have it ready now.
    let next = tokio::time::timeout(Duration::from_millis(50), stream.message()).await;
    assert!(
        next.is_err(),
        "the rest of the answer was already there: {next:?}"
    );
    let rest = collect_stream(&mut stream).await;
    let text: String = std::iter::once(&first)
        .chain(&rest)
        .map(|m| m.chunk.as_str())
        .collect();
    assert_eq!(text, "alpha beta gamma delta");
    assert!(rest.last().unwrap().done);
    drop(stream);
    s.shutdown().await;
}

#[tokio::test]
async fn provider_names_match_case_insensitively() {
    let mut s = TestServer::start().await;
    let mut req = stream_request("shout it");
    req.provider = "ECHO".into();
    let mut stream = s.client.stream_prompt(req).await.unwrap().into_inner();
    let msgs = collect_stream(&mut stream).await;
    let text: String = msgs.iter().map(|m| m.chunk.as_str()).collect();
    assert_eq!(text, "shout it");
    assert!(msgs.last().unwrap().done);

    let mut req = send_request("quietly");
    req.provider = "Echo".into();
    let r = s.client.send_prompt(req).await.unwrap().into_inner();
    assert_eq!(r.response, "quietly");
    s.shutdown().await;
}

#[tokio::test]
async fn stream_prompt_rejects_invalid_requests() {
    let mut s = TestServer::start().await;

    let mut req = stream_request("hello");
    req.provider = "nosuch".into();
    let err = s.client.stream_prompt(req).await.unwrap_err();
    // An unknown provider names nothing on this server: NOT_FOUND, as HTTP's 404.
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("nosuch"), "{err:?}");

    let err = s
        .client
        .stream_prompt(stream_request(""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), "prompt cannot be empty");

    for bad in [200_001, -1] {
        let mut req = stream_request("hello");
        req.max_tokens = bad;
        let err = s.client.stream_prompt(req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "max_tokens {bad}: {err:?}"
        );
    }
    // The upper bound itself is accepted.
    let mut req = stream_request("hello");
    req.max_tokens = 200_000;
    let mut stream = s.client.stream_prompt(req).await.unwrap().into_inner();
    assert!(collect_stream(&mut stream).await.last().unwrap().done);
    s.shutdown().await;
}

#[tokio::test]
async fn prompt_size_limit_is_enforced() {
    let mut config = echo_config();
    config.limits.max_prompt_bytes = 16;
    let mut s = TestServer::start_with(config).await;
    let err = s
        .client
        .send_prompt(send_request(&"y".repeat(17)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("validation:"), "{err:?}");
    let err = s
        .client
        .stream_prompt(stream_request(&"y".repeat(17)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let ok = s
        .client
        .send_prompt(send_request(&"y".repeat(16)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.response.len(), 16);
    s.shutdown().await;
}

#[tokio::test]
async fn send_prompt_returns_the_echo_with_provider_and_model() {
    let mut s = TestServer::start().await;
    let mut req = send_request("what is the answer?");
    req.history = vec![
        ChatMessage {
            role: "user".into(),
            content: "an earlier question".into(),
            meta: None,
        },
        ChatMessage {
            role: "assistant".into(),
            content: "an earlier answer".into(),
            meta: None,
        },
    ];
    let r = s.client.send_prompt(req).await.unwrap().into_inner();
    assert_eq!(r.response, "what is the answer?");
    assert_eq!(r.provider, "echo");
    assert_eq!(r.model, "echo-1");

    let err = s.client.send_prompt(send_request("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "prompt cannot be empty");
    s.shutdown().await;
}

#[tokio::test]
async fn oversized_message_is_refused() {
    let mut config = echo_config();
    config.server.max_recv_msg_size = 1024;
    let mut s = TestServer::start_with(config).await;
    let err = s
        .client
        .send_prompt(send_request(&"x".repeat(4096)))
        .await
        .unwrap_err();
    // tonic's decoder answers OUT_OF_RANGE for a message over the limit (grpc-go would say
    // RESOURCE_EXHAUSTED).
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("1024"), "{err:?}");
    let ok = s
        .client
        .send_prompt(send_request("small enough"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.response, "small enough");
    s.shutdown().await;
}

#[tokio::test]
async fn token_auth_guards_everything_but_health() {
    let mut config = echo_config();
    config.auth.token = Some(Secret::new("s3cret"));
    let mut s = TestServer::start_with(config).await;

    let err = s
        .client
        .send_prompt(send_request("hello"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(err.message(), "authentication failed");

    let mut wrong = tonic::Request::new(send_request("hello"));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    let err = s.client.send_prompt(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(err.message(), "authentication failed");

    let mut authed =
        ChatCliServiceClient::with_interceptor(s.channel.clone(), |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", "Bearer s3cret".parse().unwrap());
            Ok(req)
        });
    let r = authed
        .send_prompt(send_request("hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "hello");
    let mut stream = authed
        .stream_prompt(stream_request("hello there"))
        .await
        .unwrap()
        .into_inner();
    assert!(collect_stream(&mut stream).await.last().unwrap().done);

    // Exempt: both health services, and HTTP /health.
    let h = s
        .client
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status(), health_response::Status::Serving);
    assert_eq!(
        grpc_health(s.channel.clone(), SERVICE).await.unwrap(),
        ServingStatus::Serving
    );
    let resp = http_client().get(s.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    s.shutdown().await;
}

#[tokio::test]
async fn reflection_needs_both_switches() {
    for (flag, env) in [(false, false), (true, false), (false, true)] {
        let mut config = echo_config();
        config.server.reflection = flag;
        config.server.reflection_env = env;
        let s = TestServer::start_with(config).await;
        let err = list_services(s.channel.clone(), None).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unimplemented,
            "reflection={flag} env={env}: {err:?}"
        );
        s.shutdown().await;
    }

    let mut config = echo_config();
    config.server.reflection = true;
    config.server.reflection_env = true;
    let s = TestServer::start_with(config).await;
    let services = list_services(s.channel.clone(), None).await.unwrap();
    for want in [SERVICE, "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == want),
            "{want} not in {services:?}"
        );
    }
    s.shutdown().await;
}
