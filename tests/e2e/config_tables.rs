//! Tables keyed by names the operator chooses, written in the TOML file (or in variables) and read
//! by the real binary, each shown in effect by a call: a certificate mapped to `readonly` is
//! refused a write, a role's rate limit applies to that role only, a provider's extra header
//! reaches the upstream, and `llm.fallback_models` picks the model a fallback provider answers with.

use std::path::Path;

use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{SaveSessionRequest, SendPromptRequest};
use chatcli::testing::Reply;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::support::{BinaryServer, TestCa, connect, openai_fake, sha256_hex, tls_channel};

fn send(prompt: &str) -> SendPromptRequest {
    SendPromptRequest {
        prompt: prompt.into(),
        ..SendPromptRequest::default()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A SendPrompt with `token` as bearer credentials.
async fn prompt_as(channel: &Channel, token: &str, text: &str) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(send(text));
    req.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    let mut client = ChatCliServiceClient::new(channel.clone());
    client
        .send_prompt(req)
        .await
        .map(|r| r.into_inner().response)
}

#[tokio::test]
async fn a_certificate_mapped_to_readonly_in_the_file_is_refused_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("config-tables-ca");
    let server = ca.server_cert(&[7]);
    let reader = ca.client_cert("spiffe://example.test/reader", "reader");
    let writer = ca.client_cert("spiffe://example.test/writer", "writer");
    let cert = write(dir.path(), "server.pem", &server.cert_pem);
    let key = write(dir.path(), "server.key", &server.key_pem);
    let client_ca = write(dir.path(), "ca.pem", &ca.ca_pem);
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            "[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_ca_file = \"{client_ca}\"\n\n\
             [auth.mtls]\ndefault_role = \"user\"\n\n\
             [auth.mtls.roles]\n\"spiffe://example.test/reader\" = \"readonly\"\n\n\
             [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n"
        ),
    )
    .unwrap();
    let s = BinaryServer::start(&config, &[]);
    let save = || SaveSessionRequest {
        name: "notes".into(),
        ..SaveSessionRequest::default()
    };

    let mut as_reader = ChatCliServiceClient::new(
        tls_channel(s.addr, &ca.ca_pem, Some(&reader))
            .await
            .unwrap(),
    );
    let err = as_reader.save_session(save()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let answer = as_reader
        .send_prompt(send("reading is fine"))
        .await
        .unwrap();
    assert_eq!(answer.into_inner().response, "reading is fine");

    // The same server, a certificate the table does not name: the default role may write.
    let mut as_writer = ChatCliServiceClient::new(
        tls_channel(s.addr, &ca.ca_pem, Some(&writer))
            .await
            .unwrap(),
    );
    assert!(
        as_writer
            .save_session(save())
            .await
            .unwrap()
            .into_inner()
            .success
    );
}

#[tokio::test]
async fn a_role_limit_from_the_file_and_from_a_variable_applies_to_that_role_only() {
    for how in ["file", "env"] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("chatcli.toml");
        let role_limit = match how {
            "file" => "[limits.roles.user]\nrate_limit_rps = 0.001\nrate_limit_burst = 2\n",
            _ => "",
        };
        std::fs::write(
            &config,
            format!(
                "[auth]\ntoken = \"admin-token-0123456789abcdefghijkl\"\n\n\
                 [[auth.tokens]]\nname = \"worker\"\nrole = \"user\"\nsha256 = \"{}\"\n\n\
                 {role_limit}\n[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n",
                sha256_hex("worker-token")
            ),
        )
        .unwrap();
        let env: &[(&str, &str)] = match how {
            "file" => &[],
            _ => &[
                ("CHATCLI_LIMITS__ROLES__USER__RATE_LIMIT_RPS", "0.001"),
                ("CHATCLI_LIMITS__ROLES__USER__RATE_LIMIT_BURST", "2"),
            ],
        };
        let s = BinaryServer::start_with_env(&config, &[], env);
        assert!(
            !s.stderr().contains("unknown environment variable"),
            "{}",
            s.stderr()
        );
        let channel = connect(s.addr).await;
        for i in 0..2 {
            prompt_as(&channel, "worker-token", &format!("call {i}"))
                .await
                .unwrap_or_else(|e| panic!("{how}: call {i} refused: {e:?}"));
        }
        let err = prompt_as(&channel, "worker-token", "one too many")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{how}: {err:?}");
        // The admin's budget is the default one (burst 30), untouched by the user role's limit.
        for i in 0..5 {
            prompt_as(
                &channel,
                "admin-token-0123456789abcdefghijkl",
                &format!("admin {i}"),
            )
            .await
            .unwrap_or_else(|e| panic!("{how}: admin call {i} refused: {e:?}"));
        }
    }
}

#[tokio::test]
async fn provider_headers_and_fallback_models_from_the_file_are_used() {
    let first = openai_fake().await;
    let second = openai_fake().await;
    first.set_default(Reply::error(500, r#"{"error":{"message":"down"}}"#));
    second.set_default(Reply::text("from the fallback"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            "[llm]\ndefault = \"first\"\nfallback = [\"first\", \"second\"]\nfallback_max_retries = 0\n\n\
             [llm.fallback_models]\nsecond = \"second-as-fallback\"\n\n\
             [[llm.providers]]\nname = \"first\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\n\
             api_key = \"sk-first\"\nmodel = \"first-model\"\n\n\
             [llm.providers.headers]\nX-Team = \"blue\"\n\n\
             [[llm.providers]]\nname = \"second\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\n\
             api_key = \"sk-second\"\nmodel = \"second-model\"\n\n\
             [llm.providers.headers]\nHTTP-Referer = \"https://chatcli.example\"\n",
            first.base_url(),
            second.base_url()
        ),
    )
    .unwrap();
    let s = BinaryServer::start(&config, &[]);
    let mut client = ChatCliServiceClient::new(connect(s.addr).await);
    let answer = client
        .send_prompt(send("hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.response, "from the fallback");

    let to_first = first.requests();
    assert!(!to_first.is_empty(), "the first provider was never called");
    assert_eq!(to_first[0].header("x-team").as_deref(), Some("blue"));
    let to_second = second.requests();
    assert_eq!(to_second.len(), 1, "{to_second:?}");
    assert_eq!(
        to_second[0].header("http-referer").as_deref(),
        Some("https://chatcli.example")
    );
    assert_eq!(
        to_second[0].header("x-team"),
        None,
        "a header leaked across providers"
    );
    assert_eq!(to_second[0].json()["model"], "second-as-fallback");
}
