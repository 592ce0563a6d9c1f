//! The client-credential rule, the same for every provider kind: a caller's `base_url` only with
//! the caller's own credentials (without them, `INVALID_ARGUMENT` and no request anywhere), the
//! caller's URL called with the caller's credentials and never the server's, and a caller's key
//! alone sent to the server's upstream in place of the server's key. One table over the five kinds
//! (openai, anthropic, gemini, ollama, stackspot) and the three cases, against fake upstreams that
//! record the headers they received.

use chatcli::config::{Config, ProviderConfig, Secret};
use chatcli::proto::SendPromptRequest;
use chatcli::testing::anthropic::AnthropicFormat;
use chatcli::testing::gemini::GeminiFormat;
use chatcli::testing::ollama::OllamaFormat;
use chatcli::testing::openai::OpenAiFormat;
use chatcli::testing::stackspot::{StackSpotFormat, TOKEN_PATH_SUFFIX};
use chatcli::testing::{FakeUpstream, Recorded};
use tonic::Code;

use crate::support::{HANG_GUARD, TestServer, within};

/// The server's key (and StackSpot's client key): must never reach a caller's host, nor go
/// anywhere once a caller forwarded its own key.
const SERVER_KEY: &str = "sk-server-own";
/// What the caller forwards.
const CALLER_KEY: &str = "sk-caller-own";
/// The answer every fake gives to an unscripted request.
const FAKE_ANSWER: &str = "hello from the fake";

/// One provider kind: how it is configured, how a caller forwards its key, and where the key is
/// read on a request.
struct Kind {
    kind: &'static str,
    /// What `client_api_key` carries (StackSpot takes a forwarded access token).
    forwarded: &'static str,
    /// The header that carries a key, and its value for `key`.
    auth: fn(key: &str) -> (&'static str, String),
}

const KINDS: &[Kind] = &[
    Kind {
        kind: "openai",
        forwarded: CALLER_KEY,
        auth: |k| ("authorization", format!("Bearer {k}")),
    },
    Kind {
        kind: "anthropic",
        forwarded: CALLER_KEY,
        auth: |k| ("x-api-key", k.to_string()),
    },
    Kind {
        kind: "gemini",
        forwarded: CALLER_KEY,
        auth: |k| ("x-goog-api-key", k.to_string()),
    },
    Kind {
        kind: "ollama",
        forwarded: CALLER_KEY,
        auth: |k| ("authorization", format!("Bearer {k}")),
    },
    Kind {
        kind: "stackspot",
        forwarded: concat!("token:", "sk-caller-own"),
        auth: |k| ("authorization", format!("Bearer {k}")),
    },
];

async fn fake(kind: &str) -> FakeUpstream {
    match kind {
        "openai" => FakeUpstream::start(OpenAiFormat).await,
        "anthropic" => FakeUpstream::start(AnthropicFormat).await,
        "gemini" => FakeUpstream::start(GeminiFormat).await,
        "ollama" => FakeUpstream::start(OllamaFormat::with_models(&["m:latest"])).await,
        "stackspot" => FakeUpstream::start(StackSpotFormat::new()).await,
        other => unreachable!("{other}"),
    }
    .unwrap()
}

/// The base URL of `fake` for `kind` (the OpenAI API sits under `/v1`).
fn base_url(kind: &str, fake: &FakeUpstream) -> String {
    match kind {
        "openai" => format!("{}/v1", fake.base_url()),
        _ => fake.base_url(),
    }
}

/// The server's provider `p` of `kind` at `fake`, with the server's own credentials.
fn provider(kind: &str, fake: &FakeUpstream) -> ProviderConfig {
    let mut p = ProviderConfig {
        name: "p".into(),
        kind: kind.into(),
        base_url: Some(base_url(kind, fake)),
        model: Some("m".into()),
        ..ProviderConfig::default()
    };
    match kind {
        "stackspot" => {
            p.token_url = Some(format!("{}/zup{TOKEN_PATH_SUFFIX}", fake.base_url()));
            p.client_id = Some("server-id".into());
            p.client_key = Some(Secret::new(SERVER_KEY));
            p.agent_id = Some("AGENT1".into());
        }
        _ => p.api_key = Some(Secret::new(SERVER_KEY)),
    }
    p
}

/// Whether any header or the body of `r` carries the server's key or a token issued for the
/// server's StackSpot account (`tok-N`).
fn carries_server_credentials(r: &Recorded) -> bool {
    let body = String::from_utf8_lossy(&r.body);
    r.headers.values().any(|v| {
        let v = String::from_utf8_lossy(v.as_bytes());
        v.contains(SERVER_KEY) || v.contains("tok-")
    }) || body.contains(SERVER_KEY)
}

/// The chat calls `fake` received: its POSTs other than StackSpot's token endpoint (the server may
/// also list the models of its own upstream, with its own key, at start-up).
fn calls(fake: &FakeUpstream) -> Vec<Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == http::Method::POST && !r.path.ends_with(TOKEN_PATH_SUFFIX))
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Case {
    /// `provider_config.base_url` without `client_api_key`.
    UrlWithoutKey,
    /// `provider_config.base_url` and `client_api_key`.
    UrlAndKey,
    /// `client_api_key` only.
    KeyOnly,
}

#[tokio::test]
async fn every_kind_applies_the_same_client_credential_rule() {
    for kind in KINDS {
        for case in [Case::UrlWithoutKey, Case::UrlAndKey, Case::KeyOnly] {
            check(kind, case).await;
        }
    }
}

async fn check(kind: &Kind, case: Case) {
    let what = format!("{} / {case:?}", kind.kind);
    let server_fake = fake(kind.kind).await;
    let callers_fake = fake(kind.kind).await;
    let mut config = Config::default();
    config.llm.providers = vec![provider(kind.kind, &server_fake)];
    // The caller's fake listens on loopback over plain HTTP: allowed here, so that the rule is
    // what decides.
    config.llm.allow_http_providers = true;
    config.llm.ssrf_allow = vec!["127.0.0.1".into()];
    let mut s = TestServer::start_with(config).await;
    let mut req = SendPromptRequest {
        prompt: "hi".into(),
        provider: "p".into(),
        ..SendPromptRequest::default()
    };
    if matches!(case, Case::UrlWithoutKey | Case::UrlAndKey) {
        req.provider_config = [("base_url".to_string(), base_url(kind.kind, &callers_fake))]
            .into_iter()
            .collect();
    }
    if matches!(case, Case::UrlAndKey | Case::KeyOnly) {
        req.client_api_key = kind.forwarded.into();
    }
    let answer = within(HANG_GUARD, &what, s.client.send_prompt(req)).await;
    let (header, expected) = (kind.auth)(CALLER_KEY);
    match case {
        Case::UrlWithoutKey => {
            let err = answer.expect_err(&what);
            assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
            assert!(
                err.message().contains("own credentials"),
                "{what}: says why: {err:?}"
            );
            assert!(!err.message().contains(SERVER_KEY), "{what}: {err:?}");
            assert!(
                calls(&server_fake).is_empty(),
                "{what}: server's upstream called"
            );
            assert!(
                callers_fake.requests().is_empty(),
                "{what}: caller's URL called"
            );
        }
        Case::UrlAndKey => {
            let r = answer
                .unwrap_or_else(|e| panic!("{what}: {e:?}"))
                .into_inner();
            assert_eq!(r.response, FAKE_ANSWER, "{what}");
            assert!(
                calls(&server_fake).is_empty(),
                "{what}: server's upstream called"
            );
            let got = calls(&callers_fake);
            assert_eq!(got.len(), 1, "{what}: {got:?}");
            assert_eq!(
                got[0].header(header).as_deref(),
                Some(expected.as_str()),
                "{what}"
            );
            for r in callers_fake.requests() {
                assert!(!carries_server_credentials(&r), "{what}: {r:?}");
            }
        }
        Case::KeyOnly => {
            let r = answer
                .unwrap_or_else(|e| panic!("{what}: {e:?}"))
                .into_inner();
            assert_eq!(r.response, FAKE_ANSWER, "{what}");
            assert!(
                callers_fake.requests().is_empty(),
                "{what}: caller's fake called"
            );
            let got = calls(&server_fake);
            assert_eq!(got.len(), 1, "{what}: {got:?}");
            assert_eq!(
                got[0].header(header).as_deref(),
                Some(expected.as_str()),
                "{what}"
            );
            assert!(!carries_server_credentials(&got[0]), "{what}: {:?}", got[0]);
        }
    }
    s.shutdown().await;
}
