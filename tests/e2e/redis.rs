//! Two real `chatcli` processes sharing one real `redis-server` (`[state] backend = "redis"`):
//! sessions saved through one replica are seen by the other, concurrent session turns on both
//! replicas all land (or fail with `session_conflict`, never silently), and a principal's rate
//! limit is one budget across both replicas.

use std::path::{Path, PathBuf};

use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{
    ChatMessage, DeleteSessionRequest, ListSessionsRequest, LoadSessionRequest, SaveSessionRequest,
};
use chatcli::testing::redis::RedisServer;
use serde_json::{Value, json};
use tonic::Code;

use crate::support::{BinaryServer, connect, sha256_hex};

const ALICE: &str = "alice-token-0123456789abcdef0123456789";
const BOB: &str = "bob-token-0123456789abcdef0123456789abc";

/// A config file for a replica on `redis`, with the echo provider and two named tokens.
fn replica_config(dir: &Path, redis: &RedisServer, limits: &str) -> PathBuf {
    let path = dir.join("chatcli.toml");
    std::fs::write(
        &path,
        format!(
            "[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"{}\"\nkey_prefix = \"e2e:\"\n\
             {limits}\n\
             [llm]\ndefault = \"echo\"\n[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\n\
             [[auth.tokens]]\nname = \"alice\"\nrole = \"user\"\nsha256 = \"{}\"\n\
             [[auth.tokens]]\nname = \"bob\"\nrole = \"user\"\nsha256 = \"{}\"\n",
            redis.url(),
            sha256_hex(ALICE),
            sha256_hex(BOB),
        ),
    )
    .unwrap();
    path
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn client(s: &BinaryServer) -> ChatCliServiceClient<tonic::transport::Channel> {
    ChatCliServiceClient::new(connect(s.addr).await)
}

#[tokio::test]
async fn sessions_are_shared_by_two_replicas_and_concurrent_turns_never_get_lost() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(dir.path(), &redis, "");
    let a = BinaryServer::start(&config, &[]);
    let b = BinaryServer::start(&config, &[]);
    let (mut ca, mut cb) = (client(&a).await, client(&b).await);

    let messages = vec![ChatMessage {
        role: "user".into(),
        content: "saved on a".into(),
        meta: None,
    }];
    let saved = ca
        .save_session(authed(
            SaveSessionRequest {
                name: "shared-1".into(),
                messages: messages.clone(),
                session_data: None,
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(saved.success);
    let listed = cb
        .list_sessions(authed(ListSessionsRequest {}, ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions, ["shared-1"]);
    // Another principal does not see it, on either replica.
    let other = cb
        .list_sessions(authed(ListSessionsRequest {}, BOB))
        .await
        .unwrap()
        .into_inner();
    assert!(other.sessions.is_empty(), "{other:?}");
    let loaded = cb
        .load_session(authed(
            LoadSessionRequest {
                name: "shared-1".into(),
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(loaded.messages, messages);
    cb.delete_session(authed(
        DeleteSessionRequest {
            name: "shared-1".into(),
        },
        ALICE,
    ))
    .await
    .unwrap();
    let gone = ca
        .load_session(authed(
            LoadSessionRequest {
                name: "shared-1".into(),
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    // Concurrent turns of one session through both replicas: each call that succeeded has its
    // two messages in the session; a call that failed says `session_conflict`.
    let http = crate::support::http_client();
    let mut calls = Vec::new();
    for i in 0..24 {
        let url = match i % 2 {
            0 => format!("http://{}/request", a.addr),
            _ => format!("http://{}/request", b.addr),
        };
        let http = http.clone();
        calls.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(ALICE)
                .json(&json!({"prompt": format!("turn {i}"), "session": "busy"}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let code = resp
                .headers()
                .get("x-chatcli-error-code")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = resp.json().await.unwrap();
            (i, status, code, body)
        }));
    }
    let mut ok = Vec::new();
    for c in calls {
        let (i, status, code, body) = c.await.unwrap();
        match status.is_success() {
            true => ok.push(i),
            false => assert_eq!(code.as_deref(), Some("session_conflict"), "{status} {body}"),
        }
    }
    assert!(!ok.is_empty());
    let session = cb
        .load_session(authed(
            LoadSessionRequest {
                name: "busy".into(),
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        session.messages.len(),
        2 * ok.len(),
        "every admitted turn is stored once: {:?}",
        session.messages
    );
    for i in &ok {
        let prompt = format!("turn {i}");
        assert_eq!(
            session
                .messages
                .iter()
                .filter(|m| m.role == "user" && m.content == prompt)
                .count(),
            1,
            "{prompt} missing or doubled"
        );
    }
}

#[tokio::test]
async fn a_burst_is_limited_across_both_replicas_and_per_principal() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Burst 4, then one call per hour: the fifth call of a principal is refused, whichever
    // replica serves it.
    let config = replica_config(
        dir.path(),
        &redis,
        "[limits]\nrate_limit_rps = 0.0002778\nrate_limit_burst = 4\n",
    );
    let a = BinaryServer::start(&config, &[]);
    let b = BinaryServer::start(&config, &[]);
    let (mut ca, mut cb) = (client(&a).await, client(&b).await);
    for i in 0..4 {
        let c = match i % 2 {
            0 => &mut ca,
            _ => &mut cb,
        };
        c.list_sessions(authed(ListSessionsRequest {}, ALICE))
            .await
            .unwrap_or_else(|e| panic!("call {i} within the burst refused: {e:?}"));
    }
    for c in [&mut ca, &mut cb] {
        let refused = c
            .list_sessions(authed(ListSessionsRequest {}, ALICE))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(
            refused
                .metadata()
                .get("x-chatcli-error-code")
                .unwrap()
                .to_str()
                .unwrap(),
            "rate_limited"
        );
        let wait: u64 = refused
            .metadata()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(wait > 3000, "retry-after {wait}");
    }
    // HTTP shares the same bucket.
    let resp = crate::support::http_client()
        .post(format!("http://{}/request", b.addr))
        .bearer_auth(ALICE)
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    // Bob's budget is his own.
    for c in [&mut ca, &mut cb] {
        c.list_sessions(authed(ListSessionsRequest {}, BOB))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn without_redis_sessions_are_unavailable_and_limits_fall_back_then_recover() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(dir.path(), &redis, "");
    let a = BinaryServer::start(&config, &[]);
    let mut ca = client(&a).await;
    ca.list_sessions(authed(ListSessionsRequest {}, ALICE))
        .await
        .unwrap();
    redis.stop();
    // Prompts without a session keep working (rate limits fall back to local buckets).
    let http = crate::support::http_client();
    let resp = http
        .post(format!("http://{}/request", a.addr))
        .bearer_auth(ALICE)
        .json(&json!({"prompt": "still here"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let down = ca
        .list_sessions(authed(ListSessionsRequest {}, ALICE))
        .await
        .unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(down.message().contains("Redis"), "{}", down.message());
    assert_eq!(
        down.metadata()
            .get("x-chatcli-error-code")
            .unwrap()
            .to_str()
            .unwrap(),
        "state_unavailable"
    );
    redis.restart();
    crate::support::eventually("sessions after redis-server came back", || {
        let mut ca = ca.clone();
        async move {
            ca.list_sessions(authed(ListSessionsRequest {}, ALICE))
                .await
                .ok()
        }
    })
    .await;
}

#[tokio::test]
async fn a_required_redis_with_a_wrong_password_stops_the_start_with_exit_78() {
    let redis = RedisServer::start_with(Some("the-right-one"));
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "not-the-right-one\n").unwrap();
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\nbackend = \"redis\"\nrequired = true\n[state.redis]\nurl = \"{}\"\npassword_file = \"{}\"\n\
             [llm]\ndefault = \"echo\"\n[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n",
            redis.url(),
            pw.display()
        ),
    )
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = crate::support::chatcli_command(home.path())
        .args(["server", "--port", "0", "--metrics-port", "0", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("state.redis"), "{stderr}");
    assert!(!stderr.contains("not-the-right-one"), "{stderr}");
}

/// The gRPC health of the whole server.
async fn grpc_health(
    addr: std::net::SocketAddr,
) -> tonic_health::pb::health_check_response::ServingStatus {
    tonic_health::pb::health_client::HealthClient::new(connect(addr).await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

#[tokio::test]
async fn a_required_redis_drives_readiness_and_grpc_health() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut redis = RedisServer::start();
    let mut config = crate::support::echo_config();
    config.state.backend = chatcli::config::StateBackend::Redis;
    config.state.required = true;
    config.state.redis.url = Some(redis.url());
    let s = crate::support::TestServer::start_with_metrics(config).await;
    let http = crate::support::http_client();
    let ready = || async {
        let r = http.get(s.metrics_url("/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    crate::support::eventually("ready with Redis up", || async {
        (ready().await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(grpc_health(s.addr).await, ServingStatus::Serving);
    redis.stop();
    let body = crate::support::eventually("NOT ready with Redis down", || async {
        let (status, body) = ready().await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("Redis"), "{body}");
    crate::support::eventually("grpc health NOT_SERVING", || async {
        (grpc_health(s.addr).await == ServingStatus::NotServing).then_some(())
    })
    .await;
    let metrics = http
        .get(s.metrics_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("chatcli_state_backend_up 0"), "{metrics}");
    assert!(
        metrics.contains("chatcli_state_backend_errors_total{op=\"ping\"}"),
        "{metrics}"
    );
    redis.restart();
    crate::support::eventually("ready again once Redis is back", || async {
        (ready().await.0 == 200).then_some(())
    })
    .await;
    crate::support::eventually("grpc health SERVING again", || async {
        (grpc_health(s.addr).await == ServingStatus::Serving).then_some(())
    })
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn on_unavailable_deny_refuses_rate_limited_calls_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chatcli.toml");
    let base = replica_config(dir.path(), &redis, "");
    let text = std::fs::read_to_string(&base)
        .unwrap()
        .replace("[state]\n", "[state]\non_unavailable = \"deny\"\n");
    std::fs::write(&config, text).unwrap();
    let a = BinaryServer::start(&config, &[]);
    let http = crate::support::http_client();
    let call = || {
        http.post(format!("http://{}/request", a.addr))
            .bearer_auth(ALICE)
            .json(&json!({"prompt": "hello"}))
            .send()
    };
    assert!(call().await.unwrap().status().is_success());
    redis.stop();
    let refused = call().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers().get("x-chatcli-error-code").unwrap(),
        "rate_limited"
    );
    redis.restart();
    crate::support::eventually("calls admitted once Redis is back", || async {
        call()
            .await
            .ok()
            .filter(|r| r.status().is_success())
            .map(drop)
    })
    .await;
}
