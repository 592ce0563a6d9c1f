//! The same bad request over gRPC and over HTTP gets the same error class: for every core error a
//! request can provoke on both transports, the gRPC status code and the HTTP status are the pair
//! of `docs/errors.md`, and the stable code is visible on both (the `x-chatcli-error-code`
//! metadata on gRPC; the `x-chatcli-error-code` header and `chatcli_code` in the JSON body on
//! HTTP), with `retry-after` on both when the class is a rate limit. Both answers are counted in
//! `chatcli_errors_total{code}` and their audit records carry the code as `error_code`.

use chatcli::auth::Role;
use chatcli::config::{Config, NamedToken};
use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{ChatMessage, LoadSessionRequest, SaveSessionRequest, SendPromptRequest};
use chatcli::testing::openai::error_body;
use chatcli::testing::{FakeUpstream, Reply};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::support::{
    BearerToken, TestServer, echo_config, eventually, http_client, metrics_with_lines, openai_fake,
};

/// A caller that may prompt and write sessions, and one that may only read.
const USER: &str = "user-token";
const READER: &str = "reader-token";

fn named_token(name: &str, token: &str, role: Role) -> NamedToken {
    NamedToken {
        name: name.into(),
        role,
        sha256: Some(
            Sha256::digest(token.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        ),
        ..NamedToken::default()
    }
}

/// What the upstream behind the server does.
enum Upstream {
    /// The built-in echo provider.
    Echo,
    /// No provider at all.
    None,
    /// One OpenAI-shaped fake answering this every time.
    One(Reply),
    /// A fallback chain of two fakes answering these every time.
    Chain(Reply, Reply),
}

/// The gRPC side of a case.
enum Grpc {
    Send(SendPromptRequest),
    Save(&'static str),
    Load(&'static str),
}

/// The HTTP side of a case: `POST /request` or `POST /v1/chat/completions` with this body.
enum Http {
    Request(Value),
    Completions(Value),
}

struct Case {
    code: &'static str,
    grpc_status: Code,
    http_status: u16,
    upstream: Upstream,
    /// A change to the server's limits.
    limits: fn(&mut Config),
    /// The caller's token (`None`: no credentials).
    token: Option<&'static str>,
    /// A successful gRPC prompt first (to use up a rate-limit burst).
    prime: bool,
    grpc: Grpc,
    http: Http,
}

fn send(prompt: &str) -> SendPromptRequest {
    SendPromptRequest {
        prompt: prompt.into(),
        ..SendPromptRequest::default()
    }
}

fn history(n: usize, size: usize) -> Vec<ChatMessage> {
    (0..n)
        .map(|i| ChatMessage {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: "x".repeat(size),
            meta: None,
        })
        .collect()
}

/// The same history as OpenAI messages, followed by the prompt.
fn messages(n: usize, size: usize, prompt: &str) -> Value {
    let mut out: Vec<Value> = history(n, size)
        .into_iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    out.push(json!({"role": "user", "content": prompt}));
    json!({ "messages": out })
}

fn upstream_error(status: u16, kind: &str) -> Reply {
    Reply::error(status, &error_body(kind, "the upstream says no"))
}

fn no_limits(_: &mut Config) {}

fn cases() -> Vec<Case> {
    let case = |code, grpc_status, http_status, grpc, http| Case {
        code,
        grpc_status,
        http_status,
        upstream: Upstream::Echo,
        limits: no_limits,
        token: Some(USER),
        prime: false,
        grpc,
        http,
    };
    let upstream = |code, grpc_status, http_status, upstream| Case {
        upstream,
        ..case(
            code,
            grpc_status,
            http_status,
            Grpc::Send(send("hi")),
            Http::Request(json!({"prompt": "hi"})),
        )
    };
    vec![
        case(
            "prompt_empty",
            Code::InvalidArgument,
            400,
            Grpc::Send(send("")),
            Http::Request(json!({"prompt": ""})),
        ),
        Case {
            limits: |c| c.limits.max_prompt_bytes = 8,
            ..case(
                "prompt_too_large",
                Code::InvalidArgument,
                400,
                Grpc::Send(send("nine byte")),
                Http::Request(json!({"prompt": "nine byte"})),
            )
        },
        Case {
            limits: |c| c.limits.max_history_messages = 1,
            ..case(
                "history_too_long",
                Code::InvalidArgument,
                400,
                Grpc::Send(SendPromptRequest {
                    history: history(2, 1),
                    ..send("hi")
                }),
                Http::Completions(messages(2, 1, "hi")),
            )
        },
        Case {
            limits: |c| c.limits.max_history_bytes = 20,
            ..case(
                "history_too_large",
                Code::InvalidArgument,
                400,
                Grpc::Send(SendPromptRequest {
                    history: history(1, 30),
                    ..send("hi")
                }),
                Http::Completions(messages(1, 30, "hi")),
            )
        },
        case(
            "max_tokens_out_of_range",
            Code::InvalidArgument,
            400,
            Grpc::Send(SendPromptRequest {
                max_tokens: 200_001,
                ..send("hi")
            }),
            Http::Request(json!({"prompt": "hi", "max_tokens": 200_001})),
        ),
        case(
            "session_name_invalid",
            Code::InvalidArgument,
            400,
            Grpc::Save("../etc"),
            Http::Request(json!({"prompt": "hi", "session": "../etc"})),
        ),
        Case {
            token: None,
            ..case(
                "unauthenticated",
                Code::Unauthenticated,
                401,
                Grpc::Send(send("hi")),
                Http::Request(json!({"prompt": "hi"})),
            )
        },
        Case {
            token: Some(READER),
            ..case(
                "permission_denied",
                Code::PermissionDenied,
                403,
                Grpc::Save("notes"),
                Http::Request(json!({"prompt": "hi", "session": "notes"})),
            )
        },
        Case {
            limits: |c| {
                c.limits.rate_limit_rps = 0.01;
                c.limits.rate_limit_burst = 1;
            },
            prime: true,
            ..case(
                "rate_limited",
                Code::ResourceExhausted,
                429,
                Grpc::Send(send("hi")),
                Http::Request(json!({"prompt": "hi"})),
            )
        },
        case(
            "provider_unknown",
            Code::NotFound,
            404,
            Grpc::Send(SendPromptRequest {
                provider: "nosuch".into(),
                ..send("hi")
            }),
            Http::Request(json!({"prompt": "hi", "provider": "nosuch"})),
        ),
        upstream("no_providers", Code::Unavailable, 503, Upstream::None),
        upstream(
            "model_not_found",
            Code::NotFound,
            404,
            Upstream::One(upstream_error(404, "model_not_found")),
        ),
        upstream(
            "context_too_long",
            Code::InvalidArgument,
            400,
            Upstream::One(upstream_error(400, "context_length_exceeded")),
        ),
        upstream(
            "upstream_bad_request",
            Code::InvalidArgument,
            400,
            Upstream::One(upstream_error(400, "invalid_request_error")),
        ),
        upstream(
            "upstream_auth_failed",
            Code::Unavailable,
            502,
            Upstream::One(upstream_error(401, "invalid_api_key")),
        ),
        upstream(
            "upstream_rate_limited",
            Code::ResourceExhausted,
            429,
            Upstream::One(Reply::rate_limited(
                &error_body("rate_limit_exceeded", "slow down"),
                7,
            )),
        ),
        upstream(
            "upstream_rate_limited",
            Code::ResourceExhausted,
            429,
            Upstream::Chain(
                Reply::rate_limited(&error_body("rate_limit_exceeded", "slow down"), 7),
                Reply::rate_limited(&error_body("rate_limit_exceeded", "slow down"), 9),
            ),
        ),
        upstream(
            "upstream_unavailable",
            Code::Unavailable,
            502,
            Upstream::One(upstream_error(503, "server_error")),
        ),
        upstream(
            "all_providers_failed",
            Code::Unavailable,
            503,
            Upstream::Chain(
                upstream_error(500, "server_error"),
                upstream_error(401, "invalid_api_key"),
            ),
        ),
    ]
}

/// The server of `case` with metrics and an audit log in `audit`, and the fakes behind it (kept
/// alive with it).
async fn server(case: &Case, audit: &std::path::Path) -> (TestServer, Vec<FakeUpstream>) {
    let mut config = match case.upstream {
        Upstream::Echo => echo_config(),
        _ => Config::default(),
    };
    let mut fakes = Vec::new();
    match &case.upstream {
        Upstream::Echo | Upstream::None => {}
        Upstream::One(reply) => {
            let fake = openai_fake().await;
            fake.set_default(reply.clone());
            config.llm.providers = vec![crate::support::openai_provider("primary", &fake, "m")];
            fakes.push(fake);
        }
        Upstream::Chain(a, b) => {
            for (name, reply) in [("a", a), ("b", b)] {
                let fake = openai_fake().await;
                fake.set_default(reply.clone());
                config
                    .llm
                    .providers
                    .push(crate::support::openai_provider(name, &fake, "m"));
                fakes.push(fake);
            }
            config.llm.fallback = vec!["a".into(), "b".into()];
        }
    }
    config.llm.fallback_max_retries = 0;
    config.auth.tokens = vec![
        named_token("user", USER, Role::User),
        named_token("reader", READER, Role::ReadOnly),
    ];
    config.audit.path = Some(audit.to_path_buf());
    (case.limits)(&mut config);
    (TestServer::start_with_metrics(config).await, fakes)
}

async fn grpc_call(s: &TestServer, case: &Case) -> tonic::Status {
    let mut client = ChatCliServiceClient::with_interceptor(
        s.channel.clone(),
        BearerToken(case.token.map(String::from)),
    );
    if case.prime {
        client.send_prompt(send("first")).await.unwrap();
    }
    let result = match &case.grpc {
        Grpc::Send(r) => client.send_prompt(r.clone()).await.map(|_| ()),
        Grpc::Save(name) => client
            .save_session(SaveSessionRequest {
                name: name.to_string(),
                ..SaveSessionRequest::default()
            })
            .await
            .map(|_| ()),
        Grpc::Load(name) => client
            .load_session(LoadSessionRequest {
                name: name.to_string(),
            })
            .await
            .map(|_| ()),
    };
    result.expect_err("the bad request succeeded on gRPC")
}

async fn http_call(s: &TestServer, case: &Case) -> (u16, reqwest::header::HeaderMap, Value, bool) {
    let (path, body, openai) = match &case.http {
        Http::Request(b) => ("/request", b, false),
        Http::Completions(b) => ("/v1/chat/completions", b, true),
    };
    let mut req = http_client().post(s.url(path)).json(body);
    if let Some(t) = case.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap(), openai)
}

#[tokio::test]
async fn the_same_bad_request_gets_the_same_class_on_both_transports() {
    for case in cases() {
        let what = format!("{} ({:?})", case.code, case.grpc_status);
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.jsonl");
        let (s, _fakes) = server(&case, &audit).await;

        let status = grpc_call(&s, &case).await;
        assert_eq!(status.code(), case.grpc_status, "{what}: {status:?}");
        let grpc_code = status
            .metadata()
            .get("x-chatcli-error-code")
            .unwrap_or_else(|| panic!("{what}: no code in the gRPC metadata: {status:?}"));
        assert_eq!(grpc_code, case.code, "{what}");

        let (http_status, headers, body, openai) = http_call(&s, &case).await;
        assert_eq!(http_status, case.http_status, "{what}: {body}");
        assert_eq!(headers["x-chatcli-error-code"], case.code, "{what}");
        // The pipeline's refusals (credentials, rate limit) answer in OpenAI's shape on every
        // route, before any route is chosen.
        let refused_early = matches!(case.code, "unauthenticated" | "rate_limited");
        let in_body = match openai || refused_early {
            true => &body["error"]["chatcli_code"],
            false => &body["chatcli_code"],
        };
        assert_eq!(in_body, case.code, "{what}: {body}");

        // A rate limit says when to come back, on both. (Others may too when a wait is known:
        // the second call of a failed chain finds its providers cooling down.)
        if case.grpc_status == Code::ResourceExhausted {
            assert!(
                status.metadata().get("retry-after").is_some(),
                "{what}: gRPC retry-after"
            );
            assert!(
                headers.get("retry-after").is_some(),
                "{what}: HTTP Retry-After"
            );
        }

        metrics_with_lines(
            &s,
            &[&format!(
                r#"chatcli_errors_total{{code="{}"}} 2"#,
                case.code
            )],
        )
        .await;
        let coded = eventually(&format!("{what}: two audit records"), || async {
            let text = std::fs::read_to_string(&audit).ok()?;
            let coded: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|r| r.get("error_code").is_some())
                .collect();
            (coded.len() >= 2).then_some(coded)
        })
        .await;
        for record in &coded {
            assert_eq!(record["error_code"], case.code, "{what}: {record}");
        }
        s.shutdown().await;
    }
}

#[tokio::test]
async fn a_missing_session_is_not_found_with_its_code() {
    let case = Case {
        code: "session_not_found",
        grpc_status: Code::NotFound,
        http_status: 404,
        upstream: Upstream::Echo,
        limits: no_limits,
        token: Some(USER),
        prime: false,
        grpc: Grpc::Load("missing"),
        // `/request` creates a session on first use: only gRPC can ask for a missing one.
        http: Http::Request(json!({})),
    };
    let dir = tempfile::tempdir().unwrap();
    let (s, _fakes) = server(&case, &dir.path().join("audit.jsonl")).await;
    let status = grpc_call(&s, &case).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        status.metadata().get("x-chatcli-error-code").unwrap(),
        "session_not_found"
    );
    s.shutdown().await;
}
