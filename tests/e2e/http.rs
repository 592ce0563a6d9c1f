//! HTTP on the gRPC port (`/health`), and the metrics listener (`/metrics`, `/healthz`, `/readyz`).

use chatcli::proto::{SaveSessionRequest, SendPromptRequest};
use reqwest::StatusCode;
use tonic::Code;

use crate::support::{
    TestServer, collect_stream, echo_config, echo_config_with_delay, eventually, http_client,
    stream_request,
};

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
    // Two streams, so the kept counter of messages sent is counted into again.
    let mut messages = 0;
    for prompt in ["one two three", "four five"] {
        let mut stream = s
            .client
            .stream_prompt(stream_request(prompt))
            .await
            .unwrap()
            .into_inner();
        messages += collect_stream(&mut stream).await.len();
    }
    assert!(messages >= 4, "{messages} messages");

    let http = http_client();
    let url = s.metrics_url("/metrics");
    let sent = format!(
        r#"chatcli_grpc_stream_messages_sent_total{{method="/chatcli.v1.ChatCLIService/StreamPrompt"}} {messages}"#
    );
    let wanted = [
        r#"chatcli_grpc_requests_total{code="OK",method="/chatcli.v1.ChatCLIService/SendPrompt"} 1"#,
        r#"chatcli_grpc_requests_total{code="InvalidArgument",method="/chatcli.v1.ChatCLIService/SaveSession"} 1"#,
        sent.as_str(),
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

#[tokio::test]
async fn metrics_count_calls_refused_by_auth() {
    let mut config = echo_config();
    config.auth.token = Some(chatcli::config::Secret::new("s3cret"));
    let mut s = TestServer::start_with_metrics(config).await;
    let err = s
        .client
        .send_prompt(SendPromptRequest {
            prompt: "no token".into(),
            ..SendPromptRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let http = http_client();
    let url = s.metrics_url("/metrics");
    let want = r#"chatcli_grpc_requests_total{code="Unauthenticated",method="/chatcli.v1.ChatCLIService/SendPrompt"} 1"#;
    eventually("the refused call in /metrics", || async {
        let text = http.get(&url).send().await.ok()?.text().await.ok()?;
        text.lines().any(|l| l == want).then_some(())
    })
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn http_metrics_count_calls_refused_by_auth_under_their_route() {
    let mut config = echo_config();
    config.auth.token = Some(chatcli::config::Secret::new("s3cret"));
    let s = TestServer::start_with_metrics(config).await;
    let http = http_client();
    let resp = http
        .post(s.url("/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "no token"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let url = s.metrics_url("/metrics");
    let want = r#"chatcli_http_requests_total{route="/v1/chat/completions",status="401"} 1"#;
    eventually("the refused HTTP call in /metrics", || async {
        let text = http.get(&url).send().await.ok()?.text().await.ok()?;
        text.lines().any(|l| l == want).then_some(())
    })
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn metrics_do_not_grow_a_series_per_unknown_path() {
    let s = TestServer::start_with_metrics(echo_config()).await;
    let h2 = {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .timeout(crate::support::HANG_GUARD)
            .build()
            .unwrap()
    };
    for i in 0..3 {
        let resp = h2
            .post(s.url(&format!("/probe.Service/Method{i}")))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(vec![0u8; 5])
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers().get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"12"[..]),
            "unknown method must answer UNIMPLEMENTED: {resp:?}"
        );
    }
    let http = http_client();
    let url = s.metrics_url("/metrics");
    let unknown = r#"chatcli_grpc_requests_total{code="Unimplemented",method="unknown"} 3"#;
    let text = eventually("the probes counted as `unknown` in /metrics", || async {
        let text = http.get(&url).send().await.ok()?.text().await.ok()?;
        text.lines().any(|l| l == unknown).then_some(text)
    })
    .await;
    let probes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("probe.Service"))
        .collect();
    assert!(
        probes.is_empty(),
        "each unknown path got its own series:\n{}",
        probes.join("\n")
    );
    s.shutdown().await;
}

#[tokio::test]
async fn readyz_reports_the_drain() {
    let config = echo_config_with_delay(Some(std::time::Duration::from_secs(2)));
    let mut s = TestServer::start_with_metrics(config).await;
    let mut stream = s
        .client
        .stream_prompt(crate::support::stream_request("keep the drain going"))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let http = http_client();
    let resp = http.get(s.metrics_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // SIGTERM: a call is still streaming, so the drain lasts about 6s.
    s.begin_shutdown();
    let url = s.metrics_url("/readyz");
    eventually("/readyz answering 503 during the drain", || async {
        let status = http.get(&url).send().await.ok()?.status();
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    drop(stream);
    s.shutdown().await;
}
