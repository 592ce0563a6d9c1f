//! HTTP on the gRPC port (`/health`), and the metrics listener (`/metrics`, `/healthz`, `/readyz`).

use chatcli::proto::{SaveSessionRequest, SendPromptRequest};
use reqwest::StatusCode;
use tonic::Code;

use crate::support::{TestServer, echo_config, eventually, http_client};

#[tokio::test]
async fn http_health_on_the_grpc_port() {
    let s = TestServer::start().await;
    let http = http_client();
    let resp = http.get(s.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "SERVING", "{body}");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"), "{body}");

    let resp = http.get(s.url("/no/such/path")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    s.shutdown().await;
}

#[tokio::test]
async fn metrics_count_calls_and_probes_answer() {
    let mut s = TestServer::start_with_metrics(echo_config()).await;
    let r = s
        .client
        .send_prompt(SendPromptRequest {
            prompt: "count me".into(),
            ..SendPromptRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().response, "count me");
    let err = s
        .client
        .save_session(SaveSessionRequest {
            name: "../nope".into(),
            ..SaveSessionRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let http = http_client();
    let url = s.metrics_url("/metrics");
    let wanted = [
        r#"chatcli_grpc_requests_total{code="OK",method="/chatcli.v1.ChatCLIService/SendPrompt"} 1"#,
        r#"chatcli_grpc_requests_total{code="InvalidArgument",method="/chatcli.v1.ChatCLIService/SaveSession"} 1"#,
    ];
    // A call is counted when the server finishes its response, which can be just after the client
    // has read it: poll until both show up.
    let text = eventually("both calls in /metrics", || async {
        let text = http.get(&url).send().await.ok()?.text().await.ok()?;
        wanted
            .iter()
            .all(|w| text.lines().any(|l| l == *w))
            .then_some(text)
    })
    .await;
    for needle in [
        "chatcli_server_info{",
        "chatcli_server_uptime_seconds",
        r#"chatcli_session_operations_total{operation="save"} 1"#,
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let info = text
        .lines()
        .find(|l| l.starts_with("chatcli_server_info{"))
        .unwrap();
    assert!(
        info.contains(r#"provider="echo""#)
            && info.contains(&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))),
        "{info}"
    );

    let resp = http.get(s.metrics_url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "ok");
    let resp = http.get(s.metrics_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    s.shutdown().await;
}

#[tokio::test]
async fn readyz_is_unavailable_without_providers() {
    let mut config = echo_config();
    config.llm.providers.clear();
    let s = TestServer::start_with_metrics(config).await;
    let resp = http_client()
        .get(s.metrics_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let resp = http_client()
        .get(s.metrics_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "alive even when not ready");
    s.shutdown().await;
}
