//! AnalyzeIssue and AgenticStep against fake upstreams: the schema asked for, valid JSON, fenced
//! JSON, invalid JSON twice (the raw text with confidence 0, counted), the retry that repairs an
//! answer, `diverges_from_insight` computed by the server, and the size limits.

use chatcli::config::Config;
use chatcli::proto::{AgenticStepRequest, AnalyzeIssueRequest, SuggestedAction};
use chatcli::testing::{FakeUpstream, Reply};

use crate::support::{TestServer, metrics_with_lines, openai_fake, openai_provider};

fn config(up: &FakeUpstream) -> Config {
    let mut config = Config::default();
    config.llm.providers = vec![openai_provider("up", up, "gpt-x")];
    config.llm.fallback_max_retries = 0;
    config
}

fn issue() -> AnalyzeIssueRequest {
    AnalyzeIssueRequest {
        issue_name: "checkout-oom".into(),
        namespace: "shop".into(),
        resource_kind: "Deployment".into(),
        resource_name: "checkout".into(),
        signal_type: "oom_kill".into(),
        severity: "high".into(),
        description: "pods killed for memory".into(),
        kubernetes_context: "pod checkout-1 OOMKilled 3 times".into(),
        ..Default::default()
    }
}

const VALID: &str = r#"{"analysis":"the heap outgrew the limit","confidence":0.8,"recommendations":["raise the memory limit"],"actions":[{"name":"Raise memory","action":"AdjustResources","description":"limit to 1Gi","params":{"memory":"1Gi"}}]}"#;

#[tokio::test]
async fn analyze_issue_reads_valid_fenced_and_repaired_answers_and_falls_back_on_two_failures() {
    let up = openai_fake().await;
    let mut s = TestServer::start_with_metrics(config(&up)).await;

    // Valid JSON, asked for with the contract as a JSON schema.
    up.push(Reply::text(VALID));
    let a = s.client.analyze_issue(issue()).await.unwrap().into_inner();
    assert_eq!(a.analysis, "the heap outgrew the limit");
    assert!((a.confidence - 0.8).abs() < 1e-6);
    assert_eq!(a.recommendations, ["raise the memory limit"]);
    assert_eq!(a.suggested_actions.len(), 1);
    assert_eq!(a.suggested_actions[0].action, "AdjustResources");
    assert_eq!(a.suggested_actions[0].params["memory"], "1Gi");
    assert_eq!((a.provider.as_str(), a.model.as_str()), ("up", "gpt-x"));
    let reqs = up.requests();
    let body = reqs[0].json();
    assert_eq!(body["response_format"]["type"], "json_schema");
    let schema = &body["response_format"]["json_schema"]["schema"];
    assert_eq!(schema["required"][0], "analysis");
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "no history: {body}");
    let prompt = messages[0]["content"].as_str().unwrap();
    assert!(prompt.contains("checkout-oom") && prompt.contains("OOMKilled 3 times"));

    // Fenced JSON.
    up.push(Reply::text(&format!("```json\n{VALID}\n```")));
    let a = s.client.analyze_issue(issue()).await.unwrap().into_inner();
    assert_eq!(a.analysis, "the heap outgrew the limit");
    assert_eq!(up.requests().len(), 2, "no retry for a fenced answer");

    // Invalid, then repaired by the retry, which shows the model the parse error.
    up.push(Reply::text("I think it is memory."));
    up.push(Reply::text(VALID));
    let a = s.client.analyze_issue(issue()).await.unwrap().into_inner();
    assert!((a.confidence - 0.8).abs() < 1e-6);
    let reqs = up.requests();
    assert_eq!(reqs.len(), 4);
    let retry = reqs[3].json();
    let messages = retry["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{retry}");
    assert_eq!(messages[1]["content"], "I think it is memory.");
    assert!(
        messages[2]["content"]
            .as_str()
            .unwrap()
            .starts_with("Your answer could not be read: "),
        "{retry}"
    );

    // Invalid twice: the raw answer, confidence 0, nothing recommended, counted.
    up.push(Reply::text("not json"));
    up.push(Reply::text("still { not json"));
    let a = s.client.analyze_issue(issue()).await.unwrap().into_inner();
    assert_eq!(a.analysis, "still { not json");
    assert_eq!(a.confidence, 0.0);
    assert!(a.recommendations.is_empty());
    assert!(a.suggested_actions.is_empty());
    assert_eq!(up.requests().len(), 6);
    metrics_with_lines(
        &s,
        &["chatcli_aiops_parse_failures_total{rpc=\"AnalyzeIssue\"} 1"],
    )
    .await;

    // Size limits answer their stable code.
    let mut big = issue();
    big.issue_name = "x".repeat(1025);
    let e = s.client.analyze_issue(big).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        e.metadata().get("x-chatcli-error-code").unwrap(),
        "aiops_field_too_large"
    );
    assert_eq!(up.requests().len(), 6, "refused before any upstream call");
    s.shutdown().await;
}

fn action(action: &str, containment: &str) -> SuggestedAction {
    SuggestedAction {
        name: action.into(),
        action: action.into(),
        description: String::new(),
        params: [("containment".to_string(), containment.to_string())].into(),
    }
}

fn step(insight: Vec<SuggestedAction>) -> AgenticStepRequest {
    let i = issue();
    AgenticStepRequest {
        issue_name: i.issue_name,
        namespace: i.namespace,
        resource_kind: i.resource_kind,
        resource_name: i.resource_name,
        kubernetes_context: i.kubernetes_context,
        max_steps: 5,
        current_step: 1,
        insight_analysis: "memory".into(),
        insight_confidence: 0.8,
        insight_suggested_actions: insight,
        ..Default::default()
    }
}

#[tokio::test]
async fn agentic_step_computes_divergence_itself_and_falls_back_to_unresolved() {
    let up = openai_fake().await;
    let mut s = TestServer::start_with_metrics(config(&up)).await;

    // The model claims no divergence; the server finds the action differs from the insight's.
    up.push(Reply::text(
        r#"{"reasoning":"scale out first","resolved":false,"next_action":{"name":"Scale","action":"ScaleDeployment","description":"to 4","params":{"replicas":4,"containment":"pod"}},"divergence_reason":"load","diverges_from_insight":false}"#,
    ));
    let r = s
        .client
        .agentic_step(step(vec![action("RestartDeployment", "pod")]))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.resolved);
    let next = r.next_action.unwrap();
    assert_eq!(next.action, "ScaleDeployment");
    assert_eq!(next.params["replicas"], "4");
    assert!(r.diverges_from_insight);
    assert_eq!(r.divergence_reason, "load");

    // Same action and containment: no divergence, whatever the model says.
    up.push(Reply::text(
        r#"```json
{"reasoning":"restart","resolved":false,"next_action":{"name":"Restart","action":"RestartDeployment","description":"","params":{"containment":"pod"}},"diverges_from_insight":true}
```"#,
    ));
    let r = s
        .client
        .agentic_step(step(vec![action("RestartDeployment", "pod")]))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.diverges_from_insight);

    // Resolved: the postmortem, no next action, no divergence.
    up.push(Reply::text(
        r#"{"reasoning":"done","resolved":true,"next_action":{"name":"x","action":"ScaleDeployment","description":""},"postmortem_summary":"fixed","root_cause":"leak","impact":"5 min","lessons_learned":["watch heap"],"prevention_actions":["alert on heap"]}"#,
    ));
    let r = s
        .client
        .agentic_step(step(vec![action("RestartDeployment", "pod")]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.resolved);
    assert!(r.next_action.is_none());
    assert!(!r.diverges_from_insight);
    assert_eq!(r.root_cause, "leak");
    assert_eq!(r.lessons_learned, ["watch heap"]);

    // Unreadable twice: not resolved, the reasoning says why, counted.
    up.push(Reply::text("let me think"));
    up.push(Reply::text("still thinking"));
    let r = s
        .client
        .agentic_step(step(Vec::new()))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.resolved);
    assert!(r.next_action.is_none());
    assert!(r.reasoning.contains("still thinking"), "{}", r.reasoning);
    metrics_with_lines(
        &s,
        &["chatcli_aiops_parse_failures_total{rpc=\"AgenticStep\"} 1"],
    )
    .await;
    s.shutdown().await;
}
