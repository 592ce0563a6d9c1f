//! Identity and what is built on it, over plaintext gRPC and HTTP (TLS and mTLS are in `tls.rs`):
//! missing, wrong and expired credentials, JWT verification (algorithm pinning, `iss`/`aud`,
//! leeway), the failed-auth limiter, per-principal rate limits, sessions per principal, RBAC,
//! request validation before any upstream call, the audit log, and start-up refusals of the real
//! binary.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use chatcli::auth::Role;
use chatcli::config::{Config, NamedToken, Secret};
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::session_message::Type;
use chatcli::proto::{
    ChatMessage, DeleteSessionRequest, ExecuteRemotePluginRequest, HealthRequest,
    ListSessionsRequest, LoadSessionRequest, SaveSessionRequest, SendPromptRequest, SessionMessage,
    StreamPromptRequest, health_response,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    BearerToken, BinaryServer, HANG_GUARD, TestCa, TestServer, chatcli_command, collect_stream,
    demo_config, echo_config, eventually, files_under, http_client, openai_fake, openai_provider,
    principal_sessions_dir, sha256_hex, stream_request,
};

/// The shared (legacy) token of the servers below.
const TOKEN: &str = "e2e-shared-token-7f3a";
/// The HS256 secret of the servers below (32 bytes or more, as HS256 wants).
const SECRET: &str = "e2e-jwt-secret-0123456789abcdef-0123456789";

type Client = ChatCliServiceClient<InterceptedService<Channel, BearerToken>>;

fn client(channel: &Channel, token: Option<&str>) -> Client {
    ChatCliServiceClient::with_interceptor(channel.clone(), BearerToken(token.map(String::from)))
}

fn send(prompt: &str) -> SendPromptRequest {
    SendPromptRequest {
        prompt: prompt.into(),
        ..SendPromptRequest::default()
    }
}

fn save(name: &str) -> SaveSessionRequest {
    SaveSessionRequest {
        name: name.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: format!("note for {name}"),
            meta: None,
        }],
        session_data: None,
    }
}

fn load(name: &str) -> LoadSessionRequest {
    LoadSessionRequest { name: name.into() }
}

async fn list(c: &mut Client) -> Vec<String> {
    c.list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// An HS256 JWT over `claims`, signed with `secret`.
fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A JWT for `sub` signed with [`SECRET`], valid for ten minutes.
fn jwt(sub: &str, role: &str) -> String {
    hs256(
        SECRET.as_bytes(),
        &json!({"sub": sub, "role": role, "exp": now() + 600}),
    )
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An unsigned token: header `{"alg":"none","typ":"JWT"}`, the claims, an empty signature.
fn alg_none(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    )
}

fn named_token(name: &str, role: Role, token: &str) -> NamedToken {
    NamedToken {
        name: name.into(),
        role,
        sha256: Some(sha256_hex(token)),
        ..NamedToken::default()
    }
}

/// Asserts that `result` is the generic UNAUTHENTICATED answer.
#[track_caller]
fn assert_unauthenticated<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
    assert_eq!(err.message(), "authentication failed", "{what}: {err:?}");
}

/// Asserts that `result` is the failed-auth limiter's refusal: RESOURCE_EXHAUSTED saying so, with
/// the wait in the message and in `retry-after` (whole seconds, at least 1); returns the wait.
#[track_caller]
fn assert_throttled<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) -> u64 {
    let err = result.expect_err(what);
    assert_eq!(err.code(), Code::ResourceExhausted, "{what}: {err:?}");
    let msg = err.message();
    assert!(
        msg.starts_with("too many failed authentication attempts from this address; retry after "),
        "{what}: {err:?}"
    );
    let secs: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: no retry-after: {err:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs >= 1, "{what}: {err:?}");
    assert!(
        msg.ends_with(&format!("retry after {secs} seconds")),
        "{what}: the message and retry-after disagree: {err:?}"
    );
    secs
}

/// GET `path` on `s` with an optional bearer token.
async fn http_get(s: &TestServer, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = http_client().get(s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

/// A channel to `addr` whose connections come from 127.0.0.2, another client IP than the
/// 127.0.0.1 of every other channel.
async fn channel_from_127_0_0_2(addr: std::net::SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect_timeout(HANG_GUARD)
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn missing_wrong_and_expired_credentials_are_refused() {
    let mut config = echo_config();
    config.auth.token = Some(Secret::new(TOKEN));
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    // Many failures from one address below; the limiter has its own test.
    config.limits.auth_failures_per_minute = 0;
    let s = TestServer::start_with(config).await;
    let expired = hs256(
        SECRET.as_bytes(),
        &json!({"sub": "alice", "exp": now() - 3600}),
    );
    let cases = [
        ("missing", None),
        ("wrong", Some("not-the-token")),
        ("expired JWT", Some(expired.as_str())),
    ];
    for (what, cred) in cases {
        let mut c = client(&s.channel, cred);
        let err = c.send_prompt(send("hello")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        assert_eq!(err.message(), "authentication failed", "{what}: {err:?}");
        assert!(
            err.metadata().get("x-request-id").is_some(),
            "{what}: no x-request-id on the refusal: {err:?}"
        );
        assert_unauthenticated(
            c.stream_prompt(stream_request("hello")).await,
            &format!("{what} (stream)"),
        );
        assert_unauthenticated(c.list_sessions(ListSessionsRequest {}).await, what);

        let resp = http_get(&s, "/v1/models", cred).await;
        assert_eq!(resp.status(), 401, "{what}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{what}");
        assert!(resp.headers().contains_key("x-request-id"), "{what}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": "authentication failed", "type": "authentication_error", "code": "unauthenticated", "chatcli_code": "unauthenticated"}}),
            "{what}"
        );
    }

    // The right credentials pass the same routes.
    let r = client(&s.channel, Some(TOKEN))
        .send_prompt(send("hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "hello");
    let r = client(&s.channel, Some(&jwt("alice", "user")))
        .send_prompt(send("hello jwt"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "hello jwt");
    assert_eq!(http_get(&s, "/v1/models", Some(TOKEN)).await.status(), 200);

    // Health needs no credentials, and wrong ones do not break it.
    for cred in [None, Some("not-the-token")] {
        let h = client(&s.channel, cred)
            .health(HealthRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.status(), health_response::Status::Serving);
        let mut health =
            HealthClient::with_interceptor(s.channel.clone(), BearerToken(cred.map(String::from)));
        for service in ["", "chatcli.v1.ChatCLIService"] {
            let st = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status();
            assert_eq!(st, ServingStatus::Serving, "{service:?} with {cred:?}");
        }
        let resp = http_get(&s, "/health", cred).await;
        assert_eq!(resp.status(), 200, "{cred:?}");
        assert!(resp.headers().contains_key("x-request-id"));
    }
    s.shutdown().await;
}

#[tokio::test]
async fn responses_carry_the_request_id() {
    let mut config = echo_config();
    config.auth.token = Some(Secret::new(TOKEN));
    let s = TestServer::start_with(config).await;
    let mut c = client(&s.channel, Some(TOKEN));

    let mut req = tonic::Request::new(send("hi"));
    req.metadata_mut()
        .insert("x-request-id", "e2e-request-42".parse().unwrap());
    let resp = c.send_prompt(req).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-request-id").unwrap(),
        "e2e-request-42"
    );

    let ids: Vec<String> = [
        c.send_prompt(send("a")).await,
        c.send_prompt(send("b")).await,
    ]
    .into_iter()
    .map(|r| {
        r.unwrap()
            .metadata()
            .get("x-request-id")
            .expect("a generated x-request-id")
            .to_str()
            .unwrap()
            .to_string()
    })
    .collect();
    assert!(!ids[0].is_empty() && ids[0] != ids[1], "{ids:?}");

    // Refusals carry it too: the caller can quote it when asking why.
    let mut req = tonic::Request::new(send("hi"));
    req.metadata_mut()
        .insert("x-request-id", "e2e-refused-7".parse().unwrap());
    let err = client(&s.channel, None).send_prompt(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.metadata().get("x-request-id").unwrap(), "e2e-refused-7");

    for (path, token, status) in [
        ("/health", None, 200),
        ("/v1/models", None, 401),
        ("/v1/models", Some(TOKEN), 200),
    ] {
        let mut req = http_client()
            .get(s.url(path))
            .header("x-request-id", "e2e-http-9");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), status, "{path}");
        assert_eq!(resp.headers()["x-request-id"], "e2e-http-9", "{path}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn jwt_algorithm_is_pinned_by_the_public_key() {
    let keys = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let public_pem = key.public_key_pem();
    let public_file = keys.path().join("jwt.pub.pem");
    std::fs::write(&public_file, &public_pem).unwrap();
    let signer = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let es256 = |claims: &Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &signer).unwrap()
    };

    let mut config = echo_config();
    config.auth.jwt.public_key_file = Some(public_file);
    config.limits.auth_failures_per_minute = 0;
    let s = TestServer::start_with(config).await;
    let claims = json!({"sub": "carol", "exp": now() + 600});

    let good = es256(&claims);
    let mut carol = client(&s.channel, Some(&good));
    let r = carol
        .send_prompt(send("signed"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "signed");
    // The principal is the token's `sub`, as /status reports it and as the sessions show: they
    // land in carol's own folder.
    let status: Value = http_get(&s, "/status", Some(&good))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["caller"],
        json!({"id": "carol", "role": "user", "method": "jwt"}),
        "{status}"
    );
    carol.save_session(save("carols")).await.unwrap();
    let dir = principal_sessions_dir(&s.data_dir, "jwt:carol");
    assert!(
        dir.join("carols.json").is_file(),
        "{:?}",
        files_under(&s.data_dir)
    );

    let other = rcgen::KeyPair::generate().unwrap();
    let other_signer = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
    let truncated = good[..good.len() - 6].to_string();
    let two_parts = good.rsplit_once('.').unwrap().0.to_string();
    let refused = [
        ("alg none", alg_none(&claims)),
        (
            "alg none, upper case",
            alg_none(&claims).replacen(
                &b64url(br#"{"alg":"none","typ":"JWT"}"#),
                &b64url(br#"{"alg":"NONE","typ":"JWT"}"#),
                1,
            ),
        ),
        (
            "HS256 signed with the public key as the secret",
            hs256(public_pem.as_bytes(), &claims),
        ),
        (
            "ES256 signed by another key",
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &other_signer).unwrap(),
        ),
        ("no exp", es256(&json!({"sub": "carol"}))),
        ("no sub", es256(&json!({"exp": now() + 600}))),
        ("truncated signature", truncated),
        ("two segments", two_parts),
    ];
    for (what, token) in &refused {
        assert_unauthenticated(
            client(&s.channel, Some(token)).send_prompt(send("x")).await,
            what,
        );
        let resp = http_get(&s, "/v1/models", Some(token)).await;
        assert_eq!(resp.status(), 401, "{what}");
    }
    // The good token still works after all of that.
    assert_eq!(list(&mut carol).await, vec!["carols"]);
    s.shutdown().await;
}

#[tokio::test]
async fn jwt_issuer_audience_and_leeway_are_checked() {
    let mut config = echo_config();
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    config.auth.jwt.issuer = Some("https://idp.test".into());
    config.auth.jwt.audience = vec!["chatcli".into()];
    config.limits.auth_failures_per_minute = 0;
    assert_eq!(config.auth.jwt.leeway, Duration::from_secs(30));
    let s = TestServer::start_with(config).await;
    let token = |extra: Value| {
        let mut claims =
            json!({"sub": "dave", "iss": "https://idp.test", "aud": "chatcli", "exp": now() + 600});
        for (k, v) in extra.as_object().unwrap() {
            match v {
                Value::Null => claims.as_object_mut().unwrap().remove(k),
                v => claims.as_object_mut().unwrap().insert(k.clone(), v.clone()),
            };
        }
        hs256(SECRET.as_bytes(), &claims)
    };
    let accepted = [
        ("as configured", json!({})),
        ("aud as a list", json!({"aud": ["other", "chatcli"]})),
        (
            "expired 10 s ago (within the leeway)",
            json!({"exp": now() - 10}),
        ),
        (
            "nbf 10 s ahead (within the leeway)",
            json!({"nbf": now() + 10}),
        ),
    ];
    for (what, extra) in accepted {
        let r = client(&s.channel, Some(&token(extra)))
            .send_prompt(send("ok"))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(r.into_inner().response, "ok", "{what}");
    }
    let refused = [
        ("wrong iss", json!({"iss": "https://evil.test"})),
        ("no iss", json!({"iss": null})),
        ("wrong aud", json!({"aud": "someone-else"})),
        ("no aud", json!({"aud": null})),
        (
            "expired 120 s ago (beyond the leeway)",
            json!({"exp": now() - 120}),
        ),
        ("nbf 120 s ahead", json!({"nbf": now() + 120})),
    ];
    for (what, extra) in refused {
        assert_unauthenticated(
            client(&s.channel, Some(&token(extra)))
                .send_prompt(send("x"))
                .await,
            what,
        );
    }
    s.shutdown().await;
}

#[tokio::test]
async fn rate_limits_are_per_principal_with_retry_after() {
    let mut config = echo_config();
    // One request per 20 s after a burst of 2: the third quick call is refused however slow the
    // machine is, and the bucket says how long to wait.
    config.limits.rate_limit_rps = 0.05;
    config.limits.rate_limit_burst = 2;
    config.auth.tokens = vec![
        named_token("a", Role::User, "token-a"),
        named_token("b", Role::User, "token-b"),
        NamedToken {
            rate_limit_rps: Some(1000.0),
            rate_limit_burst: Some(50),
            ..named_token("fast", Role::User, "token-fast")
        },
    ];
    let s = TestServer::start_with(config).await;
    let mut a = client(&s.channel, Some("token-a"));
    for i in 0..2 {
        a.send_prompt(send("within the burst"))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
    }
    let err = a.send_prompt(send("one too many")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let retry: u64 = err
        .metadata()
        .get("retry-after")
        .expect("retry-after metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    let err = a
        .stream_prompt(stream_request("a stream over the limit"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.metadata().get("retry-after").is_some(), "{err:?}");
    let resp = http_get(&s, "/v1/models", Some("token-a")).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    // Health is not rate limited.
    a.health(HealthRequest {}).await.unwrap();

    // a's burst never throttles b, on either protocol.
    let mut b = client(&s.channel, Some("token-b"));
    let r = b.send_prompt(send("b is fine")).await.unwrap().into_inner();
    assert_eq!(r.response, "b is fine");
    assert_eq!(
        http_get(&s, "/v1/models", Some("token-b")).await.status(),
        200
    );

    // A token's own limit overrides the default.
    let mut fast = client(&s.channel, Some("token-fast"));
    for i in 0..10 {
        fast.send_prompt(send("fast"))
            .await
            .unwrap_or_else(|e| panic!("fast call {i}: {e:?}"));
    }
    s.shutdown().await;
}

#[tokio::test]
async fn rate_limit_retry_after_is_whole_seconds_at_least_one() {
    let mut config = echo_config();
    config.limits.rate_limit_rps = 1.0;
    config.limits.rate_limit_burst = 2;
    config.auth.token = Some(Secret::new(TOKEN));
    let s = TestServer::start_with(config).await;
    let mut c = client(&s.channel, Some(TOKEN));
    // At one per second a refill can sneak in between calls on a slow machine; keep calling until
    // the bucket is empty. The wait is then under a second, which rounds up to 1, never 0.
    let mut outcome = None;
    for _ in 0..50 {
        if let Err(e) = c.send_prompt(send("go")).await {
            outcome = Some(e);
            break;
        }
    }
    let err = outcome.expect("50 calls at 1 rps with a burst of 2 were never refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.metadata().get("retry-after").unwrap(), "1");
    s.shutdown().await;
}

#[tokio::test]
async fn jwt_subject_named_like_a_token_has_its_own_bucket() {
    let mut config = echo_config();
    config.limits.rate_limit_rps = 0.05;
    config.limits.rate_limit_burst = 2;
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    config.auth.tokens = vec![named_token("team", Role::User, "token-team")];
    let s = TestServer::start_with(config).await;
    let mut impostor = client(&s.channel, Some(&jwt("team", "user")));
    for _ in 0..2 {
        impostor.send_prompt(send("burst")).await.unwrap();
    }
    let err = impostor.send_prompt(send("third")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // The named token "team" is another principal (its sessions are apart, too).
    client(&s.channel, Some("token-team"))
        .send_prompt(send("mine"))
        .await
        .expect("the token's bucket was drained by a JWT principal");
    s.shutdown().await;
}

#[tokio::test]
async fn failed_authentications_throttle_bad_attempts_from_the_address_not_good_ones() {
    let mut config = echo_config();
    config.auth.token = Some(Secret::new(TOKEN));
    config.limits.auth_failures_per_minute = 3;
    let s = TestServer::start_with(config).await;
    let mut wrong = client(&s.channel, Some("wrong-token"));
    for i in 0..3 {
        assert_unauthenticated(wrong.send_prompt(send("x")).await, &format!("wrong {i}"));
    }
    // Now a wrong token from this address is refused by the limiter, told so...
    assert_throttled(wrong.send_prompt(send("x")).await, "wrong token, throttled");
    assert_eq!(
        http_get(&s, "/v1/models", Some("wrong-token"))
            .await
            .status(),
        429
    );
    assert_throttled(
        client(&s.channel, None).send_prompt(send("x")).await,
        "no token, throttled",
    );
    // ...and the right token from the same address is still served, on both protocols.
    let mut right = client(&s.channel, Some(TOKEN));
    let r = right.send_prompt(send("still me")).await.unwrap();
    assert_eq!(r.into_inner().response, "still me");
    assert_eq!(http_get(&s, "/v1/models", Some(TOKEN)).await.status(), 200);
    // Health stays open, and another address is not affected.
    right.health(HealthRequest {}).await.unwrap();
    let elsewhere = channel_from_127_0_0_2(s.addr).await;
    assert_unauthenticated(
        client(&elsewhere, Some("wrong-token"))
            .send_prompt(send("x"))
            .await,
        "wrong token from 127.0.0.2",
    );
    s.shutdown().await;

    // The default limit (5 failures a minute): 100 successes first consume none of it.
    let mut config = echo_config();
    config.auth.token = Some(Secret::new(TOKEN));
    config.limits.rate_limit_rps = 10_000.0;
    config.limits.rate_limit_burst = 10_000;
    assert_eq!(config.limits.auth_failures_per_minute, 5);
    let s = TestServer::start_with(config).await;
    let mut right = client(&s.channel, Some(TOKEN));
    for i in 0..100 {
        right
            .send_prompt(send("ok"))
            .await
            .unwrap_or_else(|e| panic!("success {i} refused: {e:?}"));
    }
    let mut wrong = client(&s.channel, Some("wrong-token"));
    for i in 0..4 {
        assert_unauthenticated(wrong.send_prompt(send("x")).await, &format!("wrong {i}"));
        right
            .send_prompt(send("still ok"))
            .await
            .unwrap_or_else(|e| panic!("refused after {} failures: {e:?}", i + 1));
    }
    assert_unauthenticated(wrong.send_prompt(send("x")).await, "fifth wrong");
    assert_throttled(wrong.send_prompt(send("x")).await, "sixth wrong");
    right
        .send_prompt(send("ok"))
        .await
        .expect("the right token after five failures");
    s.shutdown().await;
}

/// The real binary with a token and a failed-auth limit of 3 a minute: after three wrong tokens
/// from 127.0.0.1, a fourth wrong one is answered RESOURCE_EXHAUSTED with the wait (message and
/// `retry-after`) on gRPC, 429 with `Retry-After` and a JSON error saying so on HTTP, and
/// `chatcli connect` says it was refused for too many failed authentication attempts and how long
/// to wait (exit 5); with `--json` the same as one object on stdout. The right token from the same
/// address is answered as usual, by `chatcli connect` too.
#[tokio::test]
async fn the_failed_auth_limiter_says_so_and_how_long_to_wait() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        "[limits]\nauth_failures_per_minute = 3\n\n[llm]\ndefault = \"echo\"\n\n\
         [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\n",
    )
    .unwrap();
    let server = BinaryServer::start(&config, &["--token", TOKEN]);
    let addr = server.addr.to_string();
    let home = tempfile::tempdir().unwrap();
    let connect = |token: &str, json: bool| {
        let mut cmd = chatcli_command(home.path());
        cmd.args(["connect", &addr, "--token", token, "-p", "hi"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Three wrong tokens: each is told the credentials were refused (exit 4).
    for i in 0..3 {
        let (code, _, stderr) = connect("wrong-token", false);
        assert_eq!(code, Some(4), "wrong {i}: {stderr}");
        assert!(
            stderr.contains("refused the credentials"),
            "wrong {i}: {stderr}"
        );
    }

    // A fourth wrong token from the same address is now refused by the limiter, and told so.
    let (code, stdout, stderr) = connect("wrong-token", false);
    assert_eq!(code, Some(5), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("chatcli connect: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        line.contains("too many failed authentication attempts from this address"),
        "{line}"
    );
    assert!(
        !line.contains("--token") && !line.contains("credentials"),
        "{line}"
    );
    let wait: u64 = line[line.find("retry in ").expect(line) + "retry in ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{line}");

    // --json: exactly one object on stdout naming the gRPC code, and the same exit code.
    let (code, stdout, stderr) = connect("wrong-token", true);
    assert_eq!(code, Some(5), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["error"]["code"], "RESOURCE_EXHAUSTED", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("too many failed authentication attempts"),
        "{v}"
    );
    assert!(message.contains("retry in "), "{v}");

    // The right token from the same address is served.
    let (code, stdout, stderr) = connect(TOKEN, false);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim_end(), "hi", "{stderr}");

    // gRPC: RESOURCE_EXHAUSTED with the wait in the message and in retry-after.
    let channel = crate::support::connect(server.addr).await;
    let secs = assert_throttled(
        client(&channel, Some("wrong-token"))
            .send_prompt(send("x"))
            .await,
        "gRPC, wrong token",
    );
    assert!(secs <= 60, "{secs}");
    let mut right = client(&channel, Some(TOKEN));
    right.send_prompt(send("x")).await.unwrap();
    // Health stays open.
    right.health(HealthRequest {}).await.unwrap();

    // HTTP: 429, Retry-After and a JSON error saying why.
    let url = format!("http://{}/v1/models", server.addr);
    let ok = http_client().get(&url).bearer_auth(TOKEN).send().await;
    assert_eq!(ok.unwrap().status(), 200);
    let resp = http_client()
        .get(&url)
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(!resp.headers().contains_key("www-authenticate"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["code"], "too_many_auth_failures", "{body}");
    let text = body["error"]["message"].as_str().unwrap();
    assert_eq!(
        text,
        format!(
            "too many failed authentication attempts from this address; retry after {retry} seconds"
        ),
        "{body}"
    );
    // The server log names the reason too.
    assert!(
        server
            .stderr()
            .contains("too many failed authentication attempts"),
        "{}",
        server.stderr()
    );
}

/// The lines of the audit file at `path`, once it has at least `n`.
async fn audit_lines(path: &Path, n: usize) -> Vec<Value> {
    eventually(&format!("{n} audit lines"), || async {
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
            .collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}

/// The real binary with every kind of bearer credential (shared token, a named token from a file,
/// an HS256 secret and an EC public key) and a failed-auth limit of 3 a minute. Once 127.0.0.1 is
/// throttled, every valid credential that is cheap to check is still admitted from it: the shared
/// and the named token, a new HS256 JWT, and an ES256 JWT that verified before. What would need an
/// expensive check (an ES256 JWT never seen) and whatever is invalid is refused with the wait and
/// audited as such; from another address, the new ES256 JWT verifies, and from then on it is
/// admitted from the throttled address too.
#[tokio::test]
async fn a_valid_credential_is_admitted_from_a_throttled_address() {
    use chatcli::proto::SendPromptResponse;
    let dir = tempfile::tempdir().unwrap();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec_signing = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let es256 = |sub: &str| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &json!({"sub": sub, "exp": now() + 600}),
            &ec_signing,
        )
        .unwrap()
    };
    let named = "team-token-2b7e151628aed2a6abf7158809cf4f3c";
    std::fs::write(dir.path().join("jwt-ec.pem"), ec.public_key_pem()).unwrap();
    std::fs::write(dir.path().join("team.token"), named).unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            "[auth.jwt]\nsecret = \"{SECRET}\"\npublic_key_file = \"{}\"\n\n\
             [[auth.tokens]]\nname = \"team\"\nrole = \"user\"\nfile = \"{}\"\n\n\
             [limits]\nauth_failures_per_minute = 3\n\n[audit]\npath = \"{}\"\n\n\
             [llm]\ndefault = \"echo\"\n\n\
             [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\n",
            dir.path().join("jwt-ec.pem").display(),
            dir.path().join("team.token").display(),
            audit_path.display(),
        ),
    )
    .unwrap();
    let server = BinaryServer::start(&config, &["--token", TOKEN]);
    let channel = crate::support::connect(server.addr).await;
    let call = |cred: String| {
        let channel = channel.clone();
        async move {
            client(&channel, Some(&cred))
                .send_prompt(send("hello"))
                .await
                .map(|r| r.into_inner())
        }
    };
    let answered = |r: Result<SendPromptResponse, tonic::Status>, what: &str| {
        let r = r.unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(r.response, "hello", "{what}");
    };

    // An ES256 token that verifies while the address is in good standing.
    let seen = es256("erin");
    answered(call(seen.clone()).await, "ES256 before the failures");
    for i in 0..3 {
        assert_unauthenticated(call("wrong-token".into()).await, &format!("wrong {i}"));
    }
    assert_throttled(call("wrong-token".into()).await, "wrong token, throttled");

    // Valid and cheap to check: admitted.
    answered(call(TOKEN.into()).await, "shared token");
    answered(call(named.into()).await, "named token from a file");
    answered(call(jwt("gina", "user")).await, "a new HS256 JWT");
    answered(
        call(seen.clone()).await,
        "the ES256 JWT that verified before",
    );
    let http = |cred: String| {
        http_client()
            .get(format!("http://{}/v1/models", server.addr))
            .bearer_auth(cred)
            .send()
    };
    assert_eq!(http(TOKEN.into()).await.unwrap().status(), 200);
    assert_eq!(http(named.into()).await.unwrap().status(), 200);
    assert_eq!(http("wrong-token".into()).await.unwrap().status(), 429);

    // Expensive or invalid: refused unchecked, with the wait.
    let fresh = es256("frank");
    assert_throttled(call(fresh.clone()).await, "an ES256 JWT never seen");
    let forged = hs256(
        b"not-the-server-secret-0123456789abcdef",
        &json!({"sub": "gina", "exp": now() + 600}),
    );
    assert_throttled(call(forged).await, "HS256 with another secret");
    let expired = hs256(
        SECRET.as_bytes(),
        &json!({"sub": "gina", "exp": now() - 3600}),
    );
    assert_throttled(call(expired).await, "expired HS256");

    // The new ES256 token is valid: another address gets it verified, and from then on it is
    // admitted from the throttled address as well.
    let elsewhere = channel_from_127_0_0_2(server.addr).await;
    let r = client(&elsewhere, Some(&fresh))
        .send_prompt(send("hello"))
        .await;
    answered(
        r.map(|r| r.into_inner()),
        "the new ES256 JWT from 127.0.0.2",
    );
    answered(call(fresh).await, "the new ES256 JWT, now verified");

    // Each refusal is audited as denied, with the limiter named as the reason.
    let lines = audit_lines(&audit_path, 17).await;
    let throttled: Vec<&Value> = lines
        .iter()
        .filter(|l| l["code"] == "ResourceExhausted" || l["code"] == "429")
        .collect();
    assert_eq!(throttled.len(), 5, "{lines:#?}");
    for line in &throttled {
        assert_eq!(
            (&line["result"], &line["auth_method"], &line["principal"]),
            (&json!("denied"), &json!("failed"), &json!("anonymous")),
            "{line}"
        );
        let error = line["error"].as_str().unwrap();
        assert!(
            error.contains("too many failed authentication attempts from this address"),
            "{line}"
        );
    }
    assert!(
        throttled.iter().any(|l| l["error"]
            .as_str()
            .unwrap()
            .contains("signature not checked")),
        "{throttled:#?}"
    );
    let admitted: Vec<&str> = lines
        .iter()
        .filter(|l| l["result"] == "ok")
        .map(|l| l["principal"].as_str().unwrap())
        .collect();
    for who in ["legacy-token", "team", "gina", "erin", "frank"] {
        assert!(admitted.contains(&who), "{who} not admitted: {lines:#?}");
    }
    // The start of the block is logged once, as a warning.
    assert_eq!(
        server
            .stderr()
            .matches("too many failed authentication attempts from this address")
            .count(),
        1,
        "{}",
        server.stderr()
    );
}

/// Refusals by the failed-auth limiter are counted apart from the failures that led to them.
#[tokio::test]
async fn throttled_refusals_are_counted_in_a_metric() {
    let mut config = echo_config();
    config.auth.token = Some(Secret::new(TOKEN));
    config.limits.auth_failures_per_minute = 2;
    let s = TestServer::start_with_metrics(config).await;
    let mut wrong = client(&s.channel, Some("wrong-token"));
    for i in 0..2 {
        assert_unauthenticated(wrong.send_prompt(send("x")).await, &format!("wrong {i}"));
    }
    for i in 0..3 {
        assert_throttled(
            wrong.send_prompt(send("x")).await,
            &format!("throttled {i}"),
        );
    }
    client(&s.channel, Some(TOKEN))
        .send_prompt(send("ok"))
        .await
        .unwrap();
    crate::support::metrics_with_lines(
        &s,
        &[
            "chatcli_auth_failures_total 2",
            "chatcli_auth_throttled_total 3",
        ],
    )
    .await;
    s.shutdown().await;
}

/// A verified client certificate was checked in the TLS handshake: it is admitted from a
/// throttled address, while a bad bearer token on top of it is refused with the wait.
#[tokio::test]
async fn a_client_certificate_is_admitted_from_a_throttled_address() {
    use chatcli::config::TlsConfig;
    let ca = crate::support::TestCa::new("e2e CA");
    let dir = tempfile::tempdir().unwrap();
    let server_pair = ca.server_cert(&[0x20, 0x01]);
    for (name, pem) in [
        ("tls.crt", &server_pair.cert_pem),
        ("tls.key", &server_pair.key_pem),
        ("ca.crt", &ca.ca_pem),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let alice = ca.client_cert("spiffe://test/alice", "alice");
    let mut config = echo_config();
    config.server.tls = TlsConfig {
        cert_file: Some(dir.path().join("tls.crt")),
        key_file: Some(dir.path().join("tls.key")),
        client_ca_file: Some(dir.path().join("ca.crt")),
        ..TlsConfig::default()
    };
    config.limits.auth_failures_per_minute = 2;
    let s = TestServer::start_tls(config, &ca.ca_pem, Some(&alice)).await;
    let mut bad = client(&s.channel, Some("not-a-token"));
    for i in 0..2 {
        assert_unauthenticated(bad.send_prompt(send("x")).await, &format!("bad {i}"));
    }
    assert_throttled(bad.send_prompt(send("x")).await, "bad token, throttled");
    let r = ChatCliServiceClient::new(s.channel.clone())
        .send_prompt(send("certificate only"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "certificate only");
    s.shutdown().await;
}

/// A `SendPrompt` over `channel` with `token` and one extra metadata entry (a forwarding header).
async fn prompt_with_header(
    channel: &Channel,
    token: &str,
    header: (&'static str, &str),
) -> Result<tonic::Response<chatcli::proto::SendPromptResponse>, tonic::Status> {
    let mut req = tonic::Request::new(send("x"));
    req.metadata_mut()
        .insert(header.0, header.1.parse().unwrap());
    client(channel, Some(token)).send_prompt(req).await
}

/// The real binary with `CHATCLI_SERVER__TRUSTED_PROXIES=127.0.0.1/32, 10.0.0.0/8`: calls from
/// 127.0.0.1 are keyed and audited by the client that `X-Forwarded-For` or `Forwarded` names
/// (the right-most address that is not a trusted proxy), on HTTP and gRPC alike, so one client's
/// failures throttle that client only. From 127.0.0.2, which is not trusted, the same headers are
/// ignored: the key and the audit line stay 127.0.0.2.
#[tokio::test]
async fn a_trusted_proxy_names_the_client_for_the_limiter_and_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            "[limits]\nauth_failures_per_minute = 2\n\n[audit]\npath = \"{}\"\n\n\
             [llm]\ndefault = \"echo\"\n\n\
             [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\n",
            audit_path.display()
        ),
    )
    .unwrap();
    let server = BinaryServer::start_with_env(
        &config,
        &["--token", TOKEN],
        &[(
            "CHATCLI_SERVER__TRUSTED_PROXIES",
            "127.0.0.1/32, 10.0.0.0/8",
        )],
    );
    let url = format!("http://{}/v1/models", server.addr);
    let via_proxy = http_client();
    let get = |c: &reqwest::Client, xff: Option<&str>, token: &str| {
        let mut req = c.get(&url).bearer_auth(token);
        if let Some(v) = xff {
            req = req.header("x-forwarded-for", v);
        }
        req.send()
    };
    let status = |r: reqwest::Result<reqwest::Response>| r.unwrap().status().as_u16();

    // Client 198.51.100.7 behind an ingress (10.0.0.9) and the proxy on 127.0.0.1; the left-most
    // entry is whatever the client sent and plays no part.
    let chain = "1.2.3.4, 198.51.100.7, 10.0.0.9";
    assert_eq!(status(get(&via_proxy, Some(chain), "wrong").await), 401);
    assert_eq!(status(get(&via_proxy, Some(chain), "wrong").await), 401);
    assert_eq!(status(get(&via_proxy, Some(chain), "wrong").await), 429);
    assert_eq!(status(get(&via_proxy, Some(chain), TOKEN).await), 200);
    // Other clients of the same proxy are not throttled, nor is the proxy itself.
    assert_eq!(
        status(get(&via_proxy, Some("198.51.100.8"), "wrong").await),
        401
    );
    assert_eq!(status(get(&via_proxy, None, "wrong").await), 401);
    // gRPC reads the same headers from its metadata.
    let channel = crate::support::connect(server.addr).await;
    assert_throttled(
        prompt_with_header(&channel, "wrong", ("x-forwarded-for", "198.51.100.7")).await,
        "gRPC, X-Forwarded-For of the throttled client",
    );
    assert_unauthenticated(
        prompt_with_header(
            &channel,
            "wrong",
            ("forwarded", "for=\"198.51.100.9:4711\""),
        )
        .await,
        "gRPC, Forwarded naming another client",
    );

    // From 127.0.0.2, not a trusted proxy, the header naming the throttled client is ignored:
    // the call is keyed on 127.0.0.2, which has no failures yet...
    let _ = rustls::crypto::ring::default_provider().install_default();
    let untrusted = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .timeout(HANG_GUARD)
        .build()
        .unwrap();
    assert_eq!(
        status(get(&untrusted, Some("198.51.100.7"), "wrong").await),
        401
    );
    // ...and once 127.0.0.2 is throttled, no header gets it out.
    assert_eq!(
        status(get(&untrusted, Some("198.51.100.50"), "wrong").await),
        401
    );
    assert_eq!(
        status(get(&untrusted, Some("198.51.100.51"), "wrong").await),
        429
    );

    let lines = audit_lines(&audit_path, 11).await;
    let by_client = |addr: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["client_addr"].as_str().unwrap().starts_with(addr))
            .collect()
    };
    let proxied = by_client("198.51.100.7");
    assert_eq!(proxied.len(), 5, "{lines:#?}");
    for line in &proxied {
        assert_eq!(line["client_addr"], "198.51.100.7", "{line}");
        assert!(
            line["peer_addr"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"),
            "{line}"
        );
    }
    assert_eq!(by_client("198.51.100.9:4711").len(), 1, "{lines:#?}");
    let spoofed = by_client("127.0.0.2:");
    assert_eq!(spoofed.len(), 3, "{lines:#?}");
    for line in &spoofed {
        assert!(line.get("peer_addr").is_none(), "{line}");
    }
    assert!(
        !lines.iter().any(|l| l["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("198.51.100.5")),
        "a header from an untrusted peer reached the audit: {lines:#?}"
    );
}

/// Callers without credentials are rate-limited by their address: behind a trusted proxy, by the
/// address it names, even when many clients share the proxy's one connection.
#[tokio::test]
async fn anonymous_callers_behind_a_trusted_proxy_have_their_own_buckets() {
    let mut config = echo_config();
    config.server.trusted_proxies = vec!["127.0.0.1".into()];
    config.limits.rate_limit_rps = 0.05;
    config.limits.rate_limit_burst = 1;
    let s = TestServer::start_with(config).await;
    let mut raw = ChatCliServiceClient::new(s.channel.clone());
    let call = |xff: &str| {
        let mut req = tonic::Request::new(send("x"));
        req.metadata_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
        req
    };
    raw.send_prompt(call("198.51.100.1")).await.unwrap();
    let err = raw.send_prompt(call("198.51.100.1")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    raw.send_prompt(call("198.51.100.2"))
        .await
        .expect("another client on the same connection has its own bucket");
    s.shutdown().await;
}

/// A PROXY protocol version 2 header (command PROXY, TCP over IPv4) from `src` to `dst`.
fn proxy_v2(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// `GET /v1/models` with `token` over a new connection from `local` that first sends `preamble`:
/// the answer's status, or `None` when the server closed the connection without one.
async fn raw_get(
    addr: std::net::SocketAddr,
    local: &str,
    preamble: &[u8],
    token: &str,
) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    let mut bytes = preamble.to_vec();
    bytes.extend_from_slice(
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    // The server may close before reading it all; the answer (or its absence) says what happened.
    let _ = conn.write_all(&bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, conn.read_to_end(&mut answer))
        .await
        .expect("the connection stayed open");
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The real binary with `proxy_protocol = true` and 127.0.0.1 as its trusted proxy: the source
/// address of each connection's PROXY header (version 2 or 1) is the client the failed-auth
/// limiter keys on and the audit line names. A connection without a valid header is closed
/// unanswered, and the header of a peer that is not trusted (127.0.0.2) is read but its address
/// ignored.
#[tokio::test]
async fn the_proxy_protocol_header_names_the_client_and_a_connection_without_one_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\n\
             [limits]\nauth_failures_per_minute = 2\n\n[audit]\npath = \"{}\"\n\n\
             [llm]\ndefault = \"echo\"\n\n\
             [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\n",
            audit_path.display()
        ),
    )
    .unwrap();
    let server = BinaryServer::start(&config, &["--token", TOKEN]);
    let addr = server.addr;
    let dst = std::net::SocketAddrV4::new([127, 0, 0, 1].into(), addr.port());
    let from = |ip: [u8; 4], port| proxy_v2(std::net::SocketAddrV4::new(ip.into(), port), dst);

    // Client 198.51.100.20 through the load balancer on 127.0.0.1: its failures are its own.
    let client_a = from([198, 51, 100, 20], 4242);
    assert_eq!(
        raw_get(addr, "127.0.0.1", &client_a, "wrong").await,
        Some(401)
    );
    assert_eq!(
        raw_get(addr, "127.0.0.1", &client_a, "wrong").await,
        Some(401)
    );
    assert_eq!(
        raw_get(addr, "127.0.0.1", &client_a, "wrong").await,
        Some(429)
    );
    assert_eq!(
        raw_get(addr, "127.0.0.1", &client_a, TOKEN).await,
        Some(200)
    );
    // Another client (a version 1 header), and the load balancer's own LOCAL connection.
    let v1 = format!(
        "PROXY TCP4 198.51.100.21 127.0.0.1 5555 {}\r\n",
        addr.port()
    );
    assert_eq!(
        raw_get(addr, "127.0.0.1", v1.as_bytes(), "wrong").await,
        Some(401)
    );
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    assert_eq!(raw_get(addr, "127.0.0.1", local, "wrong").await, Some(401));
    // No header, or a broken one: closed without an answer.
    assert_eq!(raw_get(addr, "127.0.0.1", b"", TOKEN).await, None);
    assert_eq!(
        raw_get(addr, "127.0.0.1", b"PROXY TCP4 nonsense\r\n", TOKEN).await,
        None
    );
    assert_eq!(
        http_client()
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .ok()
            .map(|r| r.status()),
        None
    );
    // 127.0.0.2 is not a trusted proxy: the throttled client's address in its header is ignored.
    assert_eq!(
        raw_get(addr, "127.0.0.2", &client_a, "wrong").await,
        Some(401)
    );

    let lines = audit_lines(&audit_path, 7).await;
    let count = |prefix: &str| {
        lines
            .iter()
            .filter(|l| l["client_addr"].as_str().unwrap().starts_with(prefix))
            .count()
    };
    assert_eq!(count("198.51.100.20:4242"), 4, "{lines:#?}");
    assert_eq!(count("198.51.100.21:5555"), 1, "{lines:#?}");
    assert_eq!(count("127.0.0.1:"), 1, "{lines:#?}");
    assert_eq!(count("127.0.0.2:"), 1, "{lines:#?}");
    assert_eq!(lines.len(), 7, "{lines:#?}");
    for line in &lines {
        let proxied = line["client_addr"].as_str().unwrap().starts_with("198.");
        assert_eq!(line.get("peer_addr").is_some(), proxied, "{line}");
    }
}

/// `chatcli config check` and `chatcli server` warn about a static token shorter than 32
/// characters (the shared token, or a named token read from a file) without refusing it, and
/// never print the token.
#[tokio::test]
async fn short_static_tokens_are_warned_about_at_check_and_start() {
    let dir = tempfile::tempdir().unwrap();
    let short_named = "team-token-9";
    std::fs::write(dir.path().join("team.token"), format!("{short_named}\n")).unwrap();
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            "[[auth.tokens]]\nname = \"team\"\nfile = \"{}\"\n\n[llm]\ndefault = \"echo\"\n\n\
             [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\nmodel = \"echo-1\"\n",
            dir.path().join("team.token").display()
        ),
    )
    .unwrap();
    let short = "short-shared-1";
    let home = tempfile::tempdir().unwrap();
    let out = chatcli_command(home.path())
        .args(["config", "check", "--token", short, "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("configuration OK"), "{stderr}");
    for setting in ["auth.token:", "auth.tokens.0.file (\"team\"):"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("warning: {setting}"))
                    && l.contains("shorter than 32 characters")),
            "no warning for {setting}: {stderr}"
        );
    }
    assert!(
        !stderr.contains(short) && !stderr.contains(short_named),
        "{stderr}"
    );

    // A long enough token: no such warning.
    let long = "a-shared-token-of-40-characters-or-so-ok";
    let out = chatcli_command(home.path())
        .args(["config", "check", "--token", long])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("shorter than 32"), "{stderr}");

    // The server starts with the short tokens, says so in its log, and they work.
    let server = BinaryServer::start(&config, &["--token", short]);
    server
        .wait_for_log("auth.token: the token is 14 characters long")
        .await;
    server
        .wait_for_log("auth.tokens.0.file (\"team\"): the token is 12 characters long")
        .await;
    let channel = crate::support::connect(server.addr).await;
    for token in [short, short_named] {
        client(&channel, Some(token))
            .send_prompt(send("x"))
            .await
            .unwrap_or_else(|e| panic!("{token}: {e:?}"));
    }
}

#[tokio::test]
async fn garbage_credentials_are_refused_and_others_keep_being_served() {
    let mut config = echo_config();
    config.auth.token = Some(Secret::new(TOKEN));
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    // Ten failures from one address below, each to be answered UNAUTHENTICATED; the limiter,
    // which would refuse the later ones as RESOURCE_EXHAUSTED, has its own tests.
    config.limits.auth_failures_per_minute = 0;
    let s = TestServer::start_with(config).await;
    let good_jwt = jwt("erin", "user");
    let garbage: Vec<Vec<u8>> = vec![
        b"Basic dXNlcjpwYXNz".to_vec(),
        b"Bearer".to_vec(),
        b"Bearer ".to_vec(),
        format!("bearer {TOKEN}").into_bytes(),
        format!("Bearer  {TOKEN}").into_bytes(),
        b"Bearer \xff\xfe\x80garbage".to_vec(),
        b"Bearer a.b.c".to_vec(),
        b"Bearer ..".to_vec(),
        format!("Bearer {}", &good_jwt[..good_jwt.len() / 2]).into_bytes(),
        format!("Bearer {}", "x.".repeat(4000)).into_bytes(),
    ];
    let mut raw = ChatCliServiceClient::new(s.channel.clone());
    for value in &garbage {
        let shown = String::from_utf8_lossy(&value[..value.len().min(40)]).into_owned();
        let mut req = tonic::Request::new(send("x"));
        req.metadata_mut().insert(
            "authorization",
            tonic::metadata::AsciiMetadataValue::try_from(value.as_slice()).unwrap(),
        );
        assert_unauthenticated(raw.send_prompt(req).await, &shown);
    }
    // The server is still up, and serves a correct caller from another address.
    raw.health(HealthRequest {}).await.unwrap();
    let elsewhere = channel_from_127_0_0_2(s.addr).await;
    for cred in [TOKEN, good_jwt.as_str()] {
        let r = client(&elsewhere, Some(cred))
            .send_prompt(send("still serving"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.response, "still serving");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn jwt_users_cannot_see_each_others_sessions() {
    let mut config = echo_config();
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    let s = TestServer::start_with(config).await;
    let mut alice = client(&s.channel, Some(&jwt("alice", "user")));
    let mut bob = client(&s.channel, Some(&jwt("bob", "user")));
    alice.save_session(save("alice-notes")).await.unwrap();
    bob.save_session(save("bob-notes")).await.unwrap();
    bob.save_session(save("same-name")).await.unwrap();
    alice.save_session(save("same-name")).await.unwrap();

    assert_eq!(list(&mut alice).await, vec!["alice-notes", "same-name"]);
    assert_eq!(list(&mut bob).await, vec!["bob-notes", "same-name"]);
    for (who, c, other) in [
        ("bob", &mut bob, "alice-notes"),
        ("alice", &mut alice, "bob-notes"),
    ] {
        let err = c.load_session(load(other)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{who} loading {other}: {err:?}");
        let err = c
            .delete_session(DeleteSessionRequest { name: other.into() })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::NotFound,
            "{who} deleting {other}: {err:?}"
        );
    }
    // Same name, two sessions: each loads its own.
    let mine = alice
        .load_session(load("same-name"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.messages[0].content, "note for same-name");
    alice
        .delete_session(DeleteSessionRequest {
            name: "same-name".into(),
        })
        .await
        .unwrap();
    assert_eq!(list(&mut bob).await, vec!["bob-notes", "same-name"]);

    let alice_dir = principal_sessions_dir(&s.data_dir, "jwt:alice");
    let bob_dir = principal_sessions_dir(&s.data_dir, "jwt:bob");
    assert!(alice_dir.join("alice-notes.json").is_file());
    assert!(bob_dir.join("bob-notes.json").is_file());
    assert!(bob_dir.join("same-name.json").is_file());
    let root = s.data_dir.join("sessions");
    assert!(!root.join("alice-notes.json").exists());
    assert!(!root.join("bob-notes.json").exists());
    s.shutdown().await;
}

/// A JWT for `sub` in `tenant` signed with [`SECRET`], valid for ten minutes.
fn tenant_jwt(sub: &str, tenant: &str) -> String {
    hs256(
        SECRET.as_bytes(),
        &json!({"sub": sub, "role": "user", "tenant_id": tenant, "exp": now() + 600}),
    )
}

#[tokio::test]
async fn jwt_tenants_with_the_same_subject_never_share_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let mut config = echo_config();
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    config.audit.path = Some(audit_path.clone());
    let s = TestServer::start_with(config).await;
    let mut acme = client(&s.channel, Some(&tenant_jwt("alice", "acme")));
    let mut globex = client(&s.channel, Some(&tenant_jwt("alice", "globex")));
    let mut tenantless = client(&s.channel, Some(&jwt("alice", "user")));

    acme.save_session(save("acme-plan")).await.unwrap();
    assert_eq!(list(&mut acme).await, vec!["acme-plan"]);
    for (who, c) in [("globex", &mut globex), ("no tenant", &mut tenantless)] {
        assert!(list(c).await.is_empty(), "{who} sees acme's sessions");
        let err = c.load_session(load("acme-plan")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{who} loading: {err:?}");
        let err = c
            .delete_session(DeleteSessionRequest {
                name: "acme-plan".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{who} deleting: {err:?}");
    }
    // The same name in the other tenant is another session.
    globex.save_session(save("acme-plan")).await.unwrap();
    globex
        .delete_session(DeleteSessionRequest {
            name: "acme-plan".into(),
        })
        .await
        .unwrap();
    let mine = acme.load_session(load("acme-plan")).await.unwrap();
    assert_eq!(mine.into_inner().messages[0].content, "note for acme-plan");
    assert!(
        principal_sessions_dir(&s.data_dir, "jwt@acme:alice")
            .join("acme-plan.json")
            .is_file()
    );
    assert!(!principal_sessions_dir(&s.data_dir, "jwt:alice").exists());

    // HTTP /status names the tenant of the caller.
    let status: Value = http_get(&s, "/status", Some(&tenant_jwt("alice", "acme")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["caller"],
        json!({"id": "alice", "role": "user", "method": "jwt", "tenant": "acme"})
    );

    // Each audit line carries the tenant of its caller.
    let saves: Vec<Value> = eventually("the audit lines of the saves", || async {
        let text = std::fs::read_to_string(&audit_path).ok()?;
        let saves: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["method"] == "/chatcli.v1.ChatCLIService/SaveSession")
            .collect();
        (saves.len() == 2).then_some(saves)
    })
    .await;
    let tenants: Vec<(&Value, &Value)> = saves
        .iter()
        .map(|l| (&l["principal"], &l["tenant"]))
        .collect();
    assert_eq!(
        tenants,
        vec![
            (&json!("alice"), &json!("acme")),
            (&json!("alice"), &json!("globex"))
        ]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn shared_token_and_no_auth_use_the_flat_sessions_folder() {
    for with_token in [true, false] {
        let mut config = echo_config();
        if with_token {
            config.auth.token = Some(Secret::new(TOKEN));
            config.auth.jwt.secret = Some(Secret::new(SECRET));
        }
        let s = TestServer::start_with(config).await;
        let root = s.data_dir.join("sessions");
        std::fs::create_dir_all(&root).unwrap();
        // A file the local ChatCLI wrote before the server existed.
        std::fs::write(
            root.join("existing.json"),
            r#"[{"role":"user","content":"from before"}]"#,
        )
        .unwrap();
        let mut c = client(&s.channel, with_token.then_some(TOKEN));
        let old = c.load_session(load("existing")).await.unwrap().into_inner();
        assert_eq!(old.messages[0].content, "from before");
        c.save_session(save("fresh")).await.unwrap();
        assert!(
            root.join("fresh.json").is_file(),
            "{:?}",
            files_under(&root)
        );
        assert_eq!(list(&mut c).await, vec!["existing", "fresh"]);
        if with_token {
            // A JWT principal has a namespace of its own: the flat folder is not its.
            let mut alice = client(&s.channel, Some(&jwt("alice", "user")));
            assert!(list(&mut alice).await.is_empty());
            let err = alice.load_session(load("existing")).await.unwrap_err();
            assert_eq!(err.code(), Code::NotFound);
            alice.save_session(save("hers")).await.unwrap();
            assert_eq!(list(&mut c).await, vec!["existing", "fresh"]);
        }
        s.shutdown().await;
    }
}

#[tokio::test]
async fn readonly_principals_cannot_write() {
    let mut config = echo_config();
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    config.auth.tokens = vec![
        named_token("reader", Role::ReadOnly, "token-reader"),
        named_token("writer", Role::User, "token-writer"),
    ];
    let s = TestServer::start_with(config).await;
    // A session the reader may read, put where its namespace lives.
    let dir = principal_sessions_dir(&s.data_dir, "token:reader");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("shared.json"),
        r#"[{"role":"user","content":"read me"}]"#,
    )
    .unwrap();

    let reader_jwt = jwt("rita", "readonly");
    for cred in ["token-reader", reader_jwt.as_str()] {
        let mut r = client(&s.channel, Some(cred));
        let err = r.save_session(save("mine")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{cred}: {err:?}");
        assert!(err.message().contains("readonly"), "{err:?}");
        let err = r
            .delete_session(DeleteSessionRequest {
                name: "shared".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{cred}: {err:?}");
        let err = r
            .execute_remote_plugin(ExecuteRemotePluginRequest {
                plugin_name: "tool".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{cred}: {err:?}");
        let answer = r
            .send_prompt(send("may I ask?"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.response, "may I ask?");
        let mut stream = r
            .stream_prompt(stream_request("and stream?"))
            .await
            .unwrap()
            .into_inner();
        assert!(collect_stream(&mut stream).await.last().unwrap().done);
    }
    let mut reader = client(&s.channel, Some("token-reader"));
    assert_eq!(list(&mut reader).await, vec!["shared"]);
    let loaded = reader
        .load_session(load("shared"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(loaded.messages[0].content, "read me");
    assert!(
        dir.join("shared.json").is_file(),
        "the denied delete removed it"
    );
    assert!(
        !principal_sessions_dir(&s.data_dir, "token:reader")
            .join("mine.json")
            .exists()
    );
    assert!(!principal_sessions_dir(&s.data_dir, "jwt:rita").exists());

    // A user may write, and reaches the plugin RPC itself.
    let mut writer = client(&s.channel, Some("token-writer"));
    writer.save_session(save("mine")).await.unwrap();
    let err = writer
        .execute_remote_plugin(ExecuteRemotePluginRequest {
            plugin_name: "tool".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    s.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_before_any_upstream_call() {
    let fake = openai_fake().await;
    let mut config = Config::default();
    config.llm.providers = vec![openai_provider("up", &fake, "gpt-test")];
    config.limits.max_prompt_bytes = 64;
    config.limits.max_history_messages = 3;
    config.limits.max_history_bytes = 256;
    let mut s = TestServer::start_with(config).await;
    let msg = |content: &str| ChatMessage {
        role: "user".into(),
        content: content.into(),
        meta: None,
    };
    struct Case {
        what: &'static str,
        names: &'static str,
        req: SendPromptRequest,
    }
    let base = send("hello");
    let cases = [
        Case {
            what: "prompt over max_prompt_bytes",
            names: "prompt",
            req: send(&"p".repeat(65)),
        },
        Case {
            what: "history over max_history_messages",
            names: "history",
            req: SendPromptRequest {
                history: vec![msg("1"), msg("2"), msg("3"), msg("4")],
                ..base.clone()
            },
        },
        Case {
            what: "history over max_history_bytes",
            names: "history",
            req: SendPromptRequest {
                history: vec![msg(&"h".repeat(300))],
                ..base.clone()
            },
        },
        Case {
            what: "unknown provider_config key",
            names: "evil_key",
            req: SendPromptRequest {
                provider_config: HashMap::from([("evil_key".to_string(), "x".to_string())]),
                ..base.clone()
            },
        },
        Case {
            what: "max_tokens above the range",
            names: "max_tokens",
            req: SendPromptRequest {
                max_tokens: 200_001,
                ..base.clone()
            },
        },
        Case {
            what: "negative max_tokens",
            names: "max_tokens",
            req: SendPromptRequest {
                max_tokens: -5,
                ..base.clone()
            },
        },
    ];
    for case in cases {
        let err = s.client.send_prompt(case.req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}: {err:?}", case.what);
        assert!(
            err.message().contains(case.names),
            "{}: {:?} does not name {}",
            case.what,
            err.message(),
            case.names
        );
        let r = case.req;
        let streamed = StreamPromptRequest {
            prompt: r.prompt,
            history: r.history,
            max_tokens: r.max_tokens,
            provider: r.provider,
            model: r.model,
            client_api_key: r.client_api_key,
            provider_config: r.provider_config,
        };
        let err = s.client.stream_prompt(streamed).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{} (stream): {err:?}",
            case.what
        );
        assert!(
            err.message().contains(case.names),
            "{} (stream): {err:?}",
            case.what
        );
    }

    // InteractiveSession validates each turn too.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = s
        .client
        .interactive_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(SessionMessage {
        r#type: Type::UserInput as i32,
        content: "i".repeat(65),
        metadata: HashMap::new(),
    })
    .await
    .unwrap();
    let reply = tokio::time::timeout(HANG_GUARD, replies.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.r#type(), Type::Error, "{reply:?}");
    assert!(reply.content.contains("prompt"), "{reply:?}");
    drop(tx);

    // Plugin arguments are bounded as well (the caller here is the no-auth admin).
    let err = s
        .client
        .execute_remote_plugin(ExecuteRemotePluginRequest {
            plugin_name: "tool".into(),
            args: vec!["a".into(); 101],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("args"), "{err:?}");

    assert!(
        fake.requests().is_empty(),
        "an invalid request reached the upstream: {:?}",
        fake.requests()
    );
    // A valid request does reach it, so the emptiness above means something.
    let r = s
        .client
        .send_prompt(send(&"p".repeat(64)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.provider, "up");
    assert_eq!(fake.requests().len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn audit_log_records_every_call_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit").join("audit.jsonl");
    let mut config = echo_config();
    config.auth.token = Some(Secret::new(TOKEN));
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    config.auth.tokens = vec![named_token("reader", Role::ReadOnly, "token-reader-5c1e")];
    config.audit.path = Some(audit_path.clone());
    let s = TestServer::start_with(config).await;
    let user_jwt = jwt("auditee", "user");
    let prompt = "a prompt that must never reach the audit file";

    let mut req = tonic::Request::new(send(prompt));
    req.metadata_mut()
        .insert("x-request-id", "audit-ok-1".parse().unwrap());
    client(&s.channel, Some(&user_jwt))
        .send_prompt(req)
        .await
        .unwrap();
    let err = client(&s.channel, Some(TOKEN))
        .load_session(load("missing"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client(&s.channel, Some("token-reader-5c1e"))
        .save_session(save("nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let wrong = "wrong-token-d00d";
    assert_unauthenticated(
        client(&s.channel, Some(wrong))
            .send_prompt(send(prompt))
            .await,
        "wrong token",
    );
    assert_eq!(http_get(&s, "/v1/models", Some(wrong)).await.status(), 401);

    let lines: Vec<Value> = eventually("5 audit lines", || async {
        let text = std::fs::read_to_string(&audit_path).ok()?;
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
            .collect();
        (lines.len() >= 5).then_some(lines)
    })
    .await;
    for line in &lines {
        for field in [
            "timestamp",
            "request_id",
            "principal",
            "auth_method",
            "client_addr",
            "method",
            "result",
            "code",
            "duration_ms",
            "bytes_in",
            "bytes_out",
        ] {
            assert!(line.get(field).is_some(), "no {field} in {line}");
        }
        assert!(
            line["duration_ms"].is_number() && line["bytes_in"].is_u64(),
            "{line}"
        );
        assert!(
            line["client_addr"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"),
            "{line}"
        );
        assert!(
            ["ok", "error", "denied"].contains(&line["result"].as_str().unwrap()),
            "{line}"
        );
    }
    let find = |method: &str, result: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["method"] == method && l["result"] == result)
            .unwrap_or_else(|| panic!("no {result} line for {method}: {lines:#?}"))
    };
    let ok = find("/chatcli.v1.ChatCLIService/SendPrompt", "ok");
    assert_eq!(ok["request_id"], "audit-ok-1");
    assert_eq!(
        (&ok["principal"], &ok["auth_method"]),
        (&json!("auditee"), &json!("jwt"))
    );
    assert_eq!(
        (&ok["provider"], &ok["model"]),
        (&json!("echo"), &json!("echo-1"))
    );
    assert_eq!(ok["code"], "OK");
    assert!(ok["bytes_in"].as_u64().unwrap() > 0 && ok["bytes_out"].as_u64().unwrap() > 0);
    let error = find("/chatcli.v1.ChatCLIService/LoadSession", "error");
    assert_eq!(error["code"], "NotFound");
    assert_eq!(error["principal"], "legacy-token");
    assert_eq!(error["resource"], "missing");
    let denied = find("/chatcli.v1.ChatCLIService/SaveSession", "denied");
    assert_eq!(denied["code"], "PermissionDenied");
    assert_eq!(
        (&denied["principal"], &denied["auth_method"]),
        (&json!("reader"), &json!("token"))
    );
    let unauth = find("/chatcli.v1.ChatCLIService/SendPrompt", "denied");
    assert_eq!(unauth["code"], "Unauthenticated");
    assert_eq!(unauth["auth_method"], "failed");
    assert_eq!(unauth["principal"], "anonymous");
    let http = find("GET /v1/models", "denied");
    assert_eq!(http["code"], "401");

    let text = std::fs::read_to_string(&audit_path).unwrap();
    let jwt_signature = user_jwt.rsplit('.').next().unwrap();
    for secret in [
        TOKEN,
        "token-reader-5c1e",
        wrong,
        user_jwt.as_str(),
        jwt_signature,
        SECRET,
        prompt,
    ] {
        assert!(
            !text.contains(secret),
            "{secret:?} is in the audit file:\n{text}"
        );
    }
    let mode = std::fs::metadata(&audit_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "audit file mode {mode:o}");
    // Rotation by size (`audit.max_size_mb`) needs megabytes of records; the unit tests of
    // src/server/audit.rs cover it with a small limit.
    s.shutdown().await;
}

/// `chatcli server --config <demo> --port 0 --metrics-port 0 <extra>` with `env`, as an
/// assert_cmd command bounded by [`HANG_GUARD`].
fn server_command(home: &Path, extra: &[&str], env: &[(&str, &str)]) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::from_std(chatcli_command(home));
    cmd.envs(env.iter().copied())
        .arg("server")
        .arg("--config")
        .arg(demo_config())
        .args(["--port", "0", "--metrics-port", "0"])
        .args(extra)
        .timeout(HANG_GUARD);
    cmd
}

/// Runs `cmd`, expects exit 78 and returns its stderr.
fn config_error(cmd: &mut assert_cmd::Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(78), "stderr:\n{stderr}");
    stderr
}

#[tokio::test]
async fn no_auth_on_a_public_address_needs_allow_no_auth() {
    let home = tempfile::tempdir().unwrap();
    let public = [("CHATCLI_BIND_ADDRESS", "0.0.0.0")];
    let stderr = config_error(&mut server_command(home.path(), &[], &public));
    assert!(stderr.contains("server.bind_address"), "{stderr}");
    assert!(stderr.contains("--allow-no-auth"), "{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");

    let server = BinaryServer::start_with_env(&demo_config(), &["--allow-no-auth"], &public);
    assert!(server.addr.ip().is_unspecified(), "{}", server.addr);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    let channel = crate::support::connect(addr).await;
    let r = client(&channel, None)
        .send_prompt(send("open to all"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "open to all");
    assert!(
        server.stderr().contains("no authentication is configured"),
        "no warning:\n{}",
        server.stderr()
    );
}

#[test]
fn bad_key_files_stop_start_up_naming_the_setting() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let not_a_key = dir.join("not-a-key.pem");
    std::fs::write(&not_a_key, "this is not a key\n").unwrap();
    let bad_pem = dir.join("bad.pem");
    std::fs::write(
        &bad_pem,
        "-----BEGIN PUBLIC KEY-----\nAAAAAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let private = dir.join("private.pem");
    std::fs::write(
        &private,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    for (file, says) in [
        (&not_a_key, "is not a PEM public key"),
        (&bad_pem, "is not a PEM public key"),
        (&private, "private key"),
    ] {
        let stderr = config_error(&mut server_command(
            dir,
            &[],
            &[("CHATCLI_JWT_PUBLIC_KEY_FILE", file.to_str().unwrap())],
        ));
        assert!(stderr.contains("auth.jwt.public_key_file"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }

    // A valid certificate and key, and a client CA that is a directory.
    let ca = TestCa::new("e2e CA");
    let pair = ca.server_cert(&[0x01]);
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    let ca_dir = dir.join("ca.d");
    std::fs::create_dir(&ca_dir).unwrap();
    let stderr = config_error(&mut server_command(
        dir,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-client-ca",
            ca_dir.to_str().unwrap(),
        ],
        &[],
    ));
    assert!(stderr.contains("server.tls.client_ca_file"), "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}

#[test]
fn start_up_key_errors_are_not_blamed_on_the_providers() {
    let home = tempfile::tempdir().unwrap();
    let not_a_key = home.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "this is not a key\n").unwrap();
    let stderr = config_error(&mut server_command(
        home.path(),
        &[],
        &[("CHATCLI_JWT_PUBLIC_KEY_FILE", not_a_key.to_str().unwrap())],
    ));
    assert!(!stderr.contains("`llm.providers`"), "{stderr}");
}

#[tokio::test]
async fn rate_limited_calls_are_audited_as_denied() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let mut config = echo_config();
    config.auth.token = Some(Secret::new(TOKEN));
    config.limits.rate_limit_rps = 0.05;
    config.limits.rate_limit_burst = 1;
    config.audit.path = Some(audit_path.clone());
    let s = TestServer::start_with(config).await;
    let mut c = client(&s.channel, Some(TOKEN));
    c.send_prompt(send("first")).await.unwrap();
    let err = c.send_prompt(send("second")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let lines: Vec<Value> = eventually("2 audit lines", || async {
        let text = std::fs::read_to_string(&audit_path).ok()?;
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    let limited = lines
        .iter()
        .find(|l| l["code"] == "ResourceExhausted")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(limited["result"], "denied", "{limited}");
    s.shutdown().await;
}

#[tokio::test]
async fn audit_names_the_reason_of_an_authentication_failure() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let mut config = echo_config();
    config.auth.jwt.secret = Some(Secret::new(SECRET));
    config.audit.path = Some(audit_path.clone());
    let s = TestServer::start_with(config).await;
    let expired = hs256(
        SECRET.as_bytes(),
        &json!({"sub": "alice", "exp": now() - 3600}),
    );
    assert_unauthenticated(
        client(&s.channel, Some(&expired))
            .send_prompt(send("x"))
            .await,
        "expired",
    );
    let line: Value = eventually("the audit line", || async {
        let text = std::fs::read_to_string(&audit_path).ok()?;
        serde_json::from_str(text.lines().next()?).ok()
    })
    .await;
    assert_eq!(line["auth_method"], "failed", "{line}");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(error.contains("expired"), "no reason in {line}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stalls_in_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = echo_config();
    config.server.header_read_timeout = Duration::from_millis(300);
    let s = TestServer::start_with(config).await;
    // A whole request is answered as usual.
    let resp = http_client().get(s.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    // Headers that never end: the server closes the connection instead of waiting forever.
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(HANG_GUARD, conn.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the stalled connection is still open");
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "a request without the end of its headers was answered"
    );
    s.shutdown().await;
}
