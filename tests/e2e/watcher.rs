//! The Kubernetes watcher against the fake API server of the test support code: a multi-target
//! YAML with one forbidden namespace, alerts raised once and expired after the window, and the
//! API server going away and coming back; read through `GetWatcherStatus`, `GetAlerts`,
//! `/watcher/status`, `/watcher/alerts` and `/metrics`.

use std::path::Path;
use std::time::Duration;

use chatcli::config::Config;
use chatcli::proto::{GetAlertsRequest, GetWatcherStatusRequest};
use chatcli::testing::kube::{FakeKube, deployment, pod};
use serde_json::{Value, json};

use crate::support::{TestServer, echo_config, http_client};

/// Waits (up to 30 s) until `probe` returns `Some`.
async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(v) = probe().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The echo config watching the targets of `yaml` through `kubeconfig`.
fn config(dir: &Path, fake: &FakeKube, yaml: &str) -> Config {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig()).unwrap();
    let targets = dir.join("targets.yaml");
    std::fs::write(&targets, yaml).unwrap();
    let mut config = echo_config();
    config.watcher.kubeconfig = Some(kubeconfig);
    config.watcher.config_file = Some(targets);
    let problems = chatcli::config::resolve_watcher(&mut config.watcher);
    assert!(problems.is_empty(), "{problems:?}");
    config
}

async fn get(s: &TestServer, path: &str) -> Value {
    http_client()
        .get(s.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `key` → status, from `/watcher/status`.
async fn statuses(s: &TestServer) -> Vec<(String, String)> {
    let v = get(s, "/watcher/status").await;
    v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["key"].as_str().unwrap().to_string(),
                t["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (type, object) of every alert of `/watcher/alerts` (with `query`), sorted.
async fn alerts(s: &TestServer, query: &str) -> Vec<(String, String)> {
    let v = get(s, &format!("/watcher/alerts{query}")).await;
    let mut out: Vec<(String, String)> = v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["type"].as_str().unwrap().to_string(),
                a["object"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_forbidden_namespace_is_one_targets_status_and_alerts_come_only_where_due() {
    let fake = FakeKube::start().await.unwrap();
    fake.apply(deployment("prod", "api", 1, 1));
    fake.apply(pod("prod", "api-1", "api", true, 7));
    fake.apply(deployment("shop", "web", 1, 1));
    fake.apply(pod("shop", "web-1", "web", true, 0));
    fake.forbid_namespace("secret");
    let dir = tempfile::tempdir().unwrap();
    let yaml = "interval: 300ms\nwindow: 1m\ntargets:\n  - deployment: api\n    namespace: prod\n  - deployment: vault\n    namespace: secret\n  - deployment: web\n    namespace: shop\n";
    let mut s = TestServer::start_with(config(dir.path(), &fake, yaml)).await;

    let want = vec![
        ("Deployment/prod/api".to_string(), "ok".to_string()),
        (
            "Deployment/secret/vault".to_string(),
            "forbidden".to_string(),
        ),
        ("Deployment/shop/web".to_string(), "ok".to_string()),
    ];
    until("every target's status", || async {
        (statuses(&s).await == want).then_some(())
    })
    .await;
    until("the restart alert", || async {
        (!alerts(&s, "").await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        alerts(&s, "").await,
        [("HighRestartCount".to_string(), "Pod/prod/api-1".to_string())]
    );
    assert!(alerts(&s, "?namespace=secret").await.is_empty());
    assert!(
        alerts(&s, "?namespace=shop&deployment=web")
            .await
            .is_empty()
    );

    let status = s
        .client
        .get_watcher_status(GetWatcherStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.active);
    assert!(
        status
            .status_summary
            .starts_with("Watching 3 targets: 1 healthy, 1 warning, 1 critical"),
        "{status:?}"
    );
    assert!(
        status
            .status_summary
            .contains("Deployment/secret/vault: forbidden"),
        "{status:?}"
    );
    assert_eq!(status.alert_count, 1);
    assert_eq!(status.pod_count, 2);
    assert_eq!(
        (status.deployment.as_str(), status.namespace.as_str()),
        ("3 targets", "multi")
    );
    let grpc_alerts = s
        .client
        .get_alerts(GetAlertsRequest {
            namespace: "prod".into(),
            deployment: "api".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(grpc_alerts.len(), 1);
    assert_eq!(grpc_alerts[0].r#type, "HighRestartCount");
    assert_eq!(grpc_alerts[0].severity, "CRITICAL");
    assert_eq!(grpc_alerts[0].deployment, "api");
    s.shutdown().await;
}

/// A pod with one container in the given state.
fn sick_pod(name: &str, restarts: i32, waiting: Option<&str>, last: Option<&str>) -> Value {
    let mut p = pod("prod", name, "api", waiting.is_none(), restarts);
    let status = &mut p["status"]["containerStatuses"][0];
    if let Some(reason) = waiting {
        status["state"] = json!({"waiting": {"reason": reason}});
    }
    if let Some(reason) = last {
        status["lastState"] = json!({"terminated": {"reason": reason, "exitCode": 137}});
    }
    p
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn oom_restarts_and_crash_loops_are_raised_once_and_expire_after_the_window() {
    let fake = FakeKube::start().await.unwrap();
    fake.apply(deployment("prod", "api", 3, 3));
    fake.apply(sick_pod("api-oom", 1, None, Some("OOMKilled")));
    fake.apply(sick_pod("api-restarts", 6, None, None));
    fake.apply(sick_pod("api-crash", 3, Some("CrashLoopBackOff"), None));
    let dir = tempfile::tempdir().unwrap();
    let yaml = "interval: 250ms\nwindow: 2s\ntargets:\n  - deployment: api\n    namespace: prod\n";
    let s = TestServer::start_with_metrics(config(dir.path(), &fake, yaml)).await;

    let want: Vec<(String, String)> = [
        ("CrashLoopBackOff", "Pod/prod/api-crash"),
        ("HighRestartCount", "Pod/prod/api-restarts"),
        ("OOMKilled", "Pod/prod/api-oom"),
        ("PodNotReady", "Pod/prod/api-crash"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    until("the alerts", || async {
        (alerts(&s, "").await == want).then_some(())
    })
    .await;
    let first = get(&s, "/watcher/alerts").await;
    // Several intervals later: the same alerts, each once, seen again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(alerts(&s, "").await, want);
    let later = get(&s, "/watcher/alerts").await;
    for (a, b) in first["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(later["alerts"].as_array().unwrap())
    {
        assert_eq!(a["first_seen"], b["first_seen"]);
        assert_ne!(a["last_seen"], b["last_seen"], "{a} {b}");
    }
    let text = http_client()
        .get(s.metrics_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for kind in ["OOMKilled", "HighRestartCount", "CrashLoopBackOff"] {
        let series = format!(
            "chatcli_watcher_alerts_total{{severity=\"CRITICAL\",target=\"Deployment/prod/api\",type=\"{kind}\"}}"
        );
        assert_eq!(metric(&text, &series), Some(1.0), "{series} in\n{text}");
    }

    // Healed: the alerts stay for the window after they were last seen, then go.
    fake.apply(sick_pod("api-oom", 1, None, None));
    fake.apply(sick_pod("api-restarts", 0, None, None));
    fake.apply(sick_pod("api-crash", 0, None, None));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(alerts(&s, "").await, want, "expired before the window");
    until("the expiry", || async {
        alerts(&s, "").await.is_empty().then_some(())
    })
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn the_api_server_going_away_makes_the_target_unreachable_until_it_returns() {
    let fake = FakeKube::start().await.unwrap();
    fake.apply(deployment("prod", "api", 1, 1));
    fake.apply(pod("prod", "api-1", "api", true, 0));
    let dir = tempfile::tempdir().unwrap();
    let yaml = "interval: 250ms\ntargets:\n  - deployment: api\n    namespace: prod\n";
    let s = TestServer::start_with(config(dir.path(), &fake, yaml)).await;
    let status = |s: &TestServer| {
        let s = s.url("/watcher/status");
        async move {
            let v: Value = http_client()
                .get(s)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["targets"][0].clone()
        }
    };
    until("ok", || async {
        (status(&s).await["status"] == "ok").then_some(())
    })
    .await;

    fake.stop();
    until("unreachable", || async {
        status(&s).await["status"]
            .as_str()
            .unwrap()
            .starts_with("unreachable since ")
            .then_some(())
    })
    .await;
    // A change made while the watcher could not see it is picked up once it can.
    fake.apply(pod("prod", "api-2", "api", true, 0));
    fake.resume();
    until("collection resumed", || async {
        let t = status(&s).await;
        (t["status"] == "ok" && t["pods"] == 2).then_some(())
    })
    .await;
    s.shutdown().await;
}

#[test]
fn a_bad_targets_file_stops_the_start_with_its_file_and_line() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("chatcli.toml");
    let yaml = home.path().join("targets.yaml");
    std::fs::write(
        &config,
        "[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n",
    )
    .unwrap();
    for (text, line, says) in [
        (
            "targets:\n  - deployment: api\n    kind: Pod\n",
            3,
            "unknown variant `Pod`",
        ),
        ("interval: 30s\ntargets: []\n", 2, "target list is empty"),
        (
            "window: 2 hours\ntargets:\n  - deployment: api\n",
            1,
            "2 hours",
        ),
        (
            "targets:\n  - deployment: api\n    replicas: 3\n",
            3,
            "unknown field `replicas`",
        ),
    ] {
        std::fs::write(&yaml, text).unwrap();
        let out = crate::support::chatcli_command(home.path())
            .args(["server", "--port", "0", "--metrics-port", "0", "--config"])
            .arg(&config)
            .arg("--watch-config")
            .arg(&yaml)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{text}: {stderr}");
        let place = format!("{}, line {line}", yaml.display());
        assert!(
            stderr.contains(&place) && stderr.contains(says),
            "{text}: {stderr}"
        );
    }
}

#[tokio::test]
async fn targets_added_and_removed_in_the_yaml_are_applied_by_the_reload() {
    let fake = FakeKube::start().await.unwrap();
    fake.apply(deployment("prod", "api", 1, 1));
    fake.apply(deployment("prod", "web", 1, 1));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig()).unwrap();
    let yaml = dir.path().join("targets").join("targets.yaml");
    std::fs::create_dir(yaml.parent().unwrap()).unwrap();
    let one = "interval: 250ms\ntargets:\n  - deployment: api\n    namespace: prod\n";
    std::fs::write(&yaml, one).unwrap();
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        format!(
            "[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n\n[watcher]\nconfig_file = {:?}\nkubeconfig = {:?}\n",
            yaml, kubeconfig
        ),
    )
    .unwrap();
    let server = crate::support::BinaryServer::start(&config, &[]);
    let keys = || {
        let url = format!("http://{}/watcher/status", server.addr);
        async move {
            let v: Value = http_client()
                .get(url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    format!(
                        "{} {}",
                        t["key"].as_str().unwrap(),
                        t["status"].as_str().unwrap()
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    until("the first target", || async {
        (keys().await == ["Deployment/prod/api ok"]).then_some(())
    })
    .await;
    // Prompts keep going through every edit below; none may fail.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn({
        let (stop, url) = (stop.clone(), format!("http://{}/request", server.addr));
        async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.is_cancelled() {
                let r = http_client()
                    .post(&url)
                    .json(&json!({"prompt": "still there?"}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }
    });
    let two = format!("{one}  - deployment: web\n    namespace: prod\n");
    std::fs::write(&yaml, two).unwrap();
    until("the added target", || async {
        (keys().await == ["Deployment/prod/api ok", "Deployment/prod/web ok"]).then_some(())
    })
    .await;
    // A broken file keeps the running targets.
    std::fs::write(&yaml, "targets: []\n").unwrap();
    server.wait_for_log("target list is empty").await;
    assert_eq!(
        keys().await,
        ["Deployment/prod/api ok", "Deployment/prod/web ok"]
    );
    std::fs::write(
        &yaml,
        "interval: 250ms\ntargets:\n  - deployment: web\n    namespace: prod\n",
    )
    .unwrap();
    until("the removed target", || async {
        (keys().await == ["Deployment/prod/web ok"]).then_some(())
    })
    .await;
    stop.cancel();
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "failed prompts under the edits: {failed:?}"
    );
    assert!(ok > 0, "no prompt was answered during the edits");
    server.terminate();
}

#[tokio::test]
async fn node_pressure_failed_jobs_missed_cronjobs_and_scaling_are_alerted_once() {
    use chatcli::testing::kube::{cronjob, hpa, job, node};
    let fake = FakeKube::start().await.unwrap();
    fake.apply(node("node-1", true, &["DiskPressure"]));
    fake.apply(deployment("prod", "api", 2, 2));
    fake.apply(pod("prod", "api-1", "api", true, 0));
    fake.apply(hpa("prod", "api", 2, 2));
    fake.apply(job("prod", "migrate", 1));
    fake.apply(cronjob("prod", "nightly", Duration::from_secs(3 * 3600)));
    let dir = tempfile::tempdir().unwrap();
    let yaml = "interval: 250ms\nwindow: 2s\ntargets:\n  - deployment: api\n    namespace: prod\n  - deployment: migrate\n    kind: Job\n    namespace: prod\n  - deployment: nightly\n    kind: CronJob\n    namespace: prod\n";
    let s = TestServer::start_with_metrics(config(dir.path(), &fake, yaml)).await;
    let want = |extra: &[(&str, &str)]| {
        let mut v: Vec<(String, String)> = [
            ("CronJobMissed", "CronJob/prod/nightly"),
            ("DiskPressure", "Node/node-1"),
            ("JobFailed", "Job/prod/migrate"),
        ]
        .iter()
        .chain(extra)
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        v.sort();
        v
    };
    until("the alerts", || async {
        (alerts(&s, "").await == want(&[])).then_some(())
    })
    .await;
    // The HPA asks for more replicas: one ScaleEvent, kept over the next intervals.
    fake.apply(hpa("prod", "api", 2, 4));
    let scaled = want(&[("ScaleEvent", "Deployment/prod/api")]);
    until("the scale event", || async {
        (alerts(&s, "").await == scaled).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(alerts(&s, "").await, scaled);
    let text = http_client()
        .get(s.metrics_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (target, severity, kind) in [
        ("Deployment/prod/api", "WARNING", "ScaleEvent"),
        ("Deployment/prod/api", "CRITICAL", "DiskPressure"),
        ("Job/prod/migrate", "CRITICAL", "JobFailed"),
        ("CronJob/prod/nightly", "WARNING", "CronJobMissed"),
    ] {
        let series = format!(
            "chatcli_watcher_alerts_total{{severity=\"{severity}\",target=\"{target}\",type=\"{kind}\"}}"
        );
        assert_eq!(metric(&text, &series), Some(1.0), "{series} in\n{text}");
    }
    assert_eq!(
        metric(
            &text,
            "chatcli_watcher_pods_ready{deployment=\"api\",namespace=\"prod\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains(
        "chatcli_watcher_collection_duration_seconds_count{target=\"Job/prod/migrate\"}"
    ));
    // The scale is over: its alert expires after the window; the lasting conditions stay.
    until("the scale event's expiry", || async {
        (alerts(&s, "").await == want(&[])).then_some(())
    })
    .await;
    s.shutdown().await;
}

/// The user turn of the last chat request `up` saw.
fn last_user_turn(up: &chatcli::testing::FakeUpstream) -> String {
    let reqs = up.requests();
    let body = reqs.last().expect("a request upstream").json();
    let messages = body["messages"].as_array().unwrap();
    messages.last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn prompts_carry_the_watcher_context_within_its_budget_except_where_they_must_not() {
    use chatcli::proto::{AnalyzeIssueRequest, SendPromptRequest};
    use chatcli::testing::Reply;

    let fake = FakeKube::start().await.unwrap();
    fake.apply(deployment("prod", "api", 1, 1));
    fake.apply(pod("prod", "api-1", "api", true, 7));
    for i in 0..40 {
        fake.log(
            "prod",
            "api-1",
            "app",
            &format!("ERROR ünïcödé ✓ payment {i} failed — retrying"),
        );
    }
    fake.apply(deployment("shop", "web", 1, 1));
    fake.apply(pod("shop", "web-1", "web", true, 0));
    let dir = tempfile::tempdir().unwrap();
    let budget = 700;
    let yaml = format!(
        "interval: 300ms\nwindow: 1m\nmaxContextChars: {budget}\ntargets:\n  - deployment: api\n    namespace: prod\n  - deployment: web\n    namespace: shop\n"
    );
    let up = crate::support::openai_fake().await;
    up.set_default(Reply::text("ok"));
    let mut config = config(dir.path(), &fake, &yaml);
    config.llm.providers = vec![crate::support::openai_provider("up", &up, "gpt-x")];
    config.llm.fallback_max_retries = 0;
    let mut s = TestServer::start_with(config).await;
    until("the restart alert", || async {
        (!alerts(&s, "").await.is_empty()).then_some(())
    })
    .await;

    // SendPrompt: the context, its headers, then the question.
    s.client
        .send_prompt(SendPromptRequest {
            prompt: "why is checkout failing?".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let turn = last_user_turn(&up);
    let (context, question) = turn.split_once("\n\nUser Question: ").expect(&turn);
    assert_eq!(question, "why is checkout failing?");
    assert!(
        context.starts_with("[K8s Multi-Watcher: 2 targets monitored]\nWatching 2 targets:"),
        "{context}"
    );
    assert!(
        context.contains("--- Targets Requiring Attention ---"),
        "{context}"
    );
    assert!(context.contains("Deployment/prod/api"), "{context}");
    assert!(context.chars().count() <= budget, "{}", context.len());
    // The budget cut the logs, whole lines at a time: every log line shown is one the pod wrote.
    let shown: Vec<&str> = context.lines().filter(|l| l.contains("payment")).collect();
    assert!(shown.len() < 40, "nothing was cut: {context}");
    for line in shown {
        assert!(line.trim_end().ends_with("failed — retrying"), "{line:?}");
    }

    // StreamPrompt too.
    let mut stream = s
        .client
        .stream_prompt(crate::support::stream_request("and now?"))
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    let turn = last_user_turn(&up);
    assert!(
        turn.starts_with("[K8s Multi-Watcher: 2 targets monitored]"),
        "{turn}"
    );
    assert!(turn.ends_with("\n\nUser Question: and now?"), "{turn}");

    // InteractiveSession turns too.
    use chatcli::proto::session_message::Type;
    let replies = interact(&s, &[(Type::UserInput, "in a session")]).await;
    assert_eq!(replies[0].r#type(), Type::AssistantResponse, "{replies:?}");
    let turn = last_user_turn(&up);
    assert!(
        turn.starts_with("[K8s Multi-Watcher: 2 targets monitored]"),
        "{turn}"
    );
    assert!(turn.ends_with("\n\nUser Question: in a session"), "{turn}");

    // POST /request too.
    let resp = http_client()
        .post(s.url("/request"))
        .json(&json!({"prompt": "over http"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    assert!(last_user_turn(&up).starts_with("[K8s Multi-Watcher: 2 targets monitored]"));

    // The OpenAI-compatible route does not get it (inject_openai is off).
    let resp = http_client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "up/gpt-x", "messages": [{"role": "user", "content": "plain"}]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    assert_eq!(last_user_turn(&up), "plain");

    // Nor does AnalyzeIssue.
    up.push(Reply::text(
        r#"{"analysis":"a","confidence":0.5,"recommendations":[]}"#,
    ));
    s.client
        .analyze_issue(AnalyzeIssueRequest {
            issue_name: "checkout down".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let turn = last_user_turn(&up);
    assert!(!turn.contains("K8s Multi-Watcher"), "{turn}");
    assert!(turn.contains("checkout down"), "{turn}");
    s.shutdown().await;
}

#[tokio::test]
async fn the_openai_route_gets_the_context_when_inject_openai_is_on() {
    use chatcli::testing::Reply;

    let fake = FakeKube::start().await.unwrap();
    fake.apply(deployment("prod", "api", 1, 1));
    fake.apply(pod("prod", "api-1", "api", true, 0));
    let dir = tempfile::tempdir().unwrap();
    let yaml = "interval: 300ms\ntargets:\n  - deployment: api\n    namespace: prod\n";
    let up = crate::support::openai_fake().await;
    up.set_default(Reply::text("ok"));
    let mut config = config(dir.path(), &fake, yaml);
    config.watcher.inject_openai = true;
    config.llm.providers = vec![crate::support::openai_provider("up", &up, "gpt-x")];
    let s = TestServer::start_with(config).await;
    until("the target's status", || async {
        (statuses(&s).await.iter().any(|(_, st)| st == "ok")).then_some(())
    })
    .await;
    let resp = http_client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "up/gpt-x", "messages": [{"role": "user", "content": "plain"}]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let turn = last_user_turn(&up);
    assert!(
        turn.starts_with("[K8s Multi-Watcher: 1 targets monitored]"),
        "{turn}"
    );
    assert!(turn.ends_with("\n\nUser Question: plain"), "{turn}");
    s.shutdown().await;
}

/// The replies to `messages` (type and content) sent over one `InteractiveSession`, in order.
async fn interact(
    s: &TestServer,
    messages: &[(chatcli::proto::session_message::Type, &str)],
) -> Vec<chatcli::proto::SessionMessage> {
    use chatcli::proto::SessionMessage;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut replies = s
        .client
        .clone()
        .interactive_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    for (kind, content) in messages {
        tx.send(SessionMessage {
            r#type: *kind as i32,
            content: content.to_string(),
            metadata: Default::default(),
        })
        .await
        .unwrap();
        out.push(replies.message().await.unwrap().unwrap());
    }
    out
}

/// The reply of each `InteractiveSession` command of `commands`, in order.
async fn commands(s: &TestServer, commands: &[&str]) -> Vec<String> {
    use chatcli::proto::session_message::Type;
    let messages: Vec<(Type, &str)> = commands.iter().map(|c| (Type::Command, *c)).collect();
    interact(s, &messages)
        .await
        .into_iter()
        .map(|r| {
            assert_eq!(r.r#type(), Type::CommandResult, "{r:?}");
            r.content
        })
        .collect()
}

#[tokio::test]
async fn server_info_and_the_watcher_commands_show_a_running_watcher() {
    use chatcli::proto::GetServerInfoRequest;

    let fake = FakeKube::start().await.unwrap();
    fake.apply(deployment("prod", "api", 1, 1));
    fake.apply(pod("prod", "api-1", "api", true, 7));
    fake.apply(deployment("shop", "web", 1, 1));
    fake.apply(pod("shop", "web-1", "web", true, 0));
    let dir = tempfile::tempdir().unwrap();
    let yaml = "interval: 300ms\nwindow: 1m\ntargets:\n  - deployment: api\n    namespace: prod\n  - deployment: web\n    namespace: shop\n";
    let mut s = TestServer::start_with(config(dir.path(), &fake, yaml)).await;
    until("the restart alert", || async {
        (!alerts(&s, "").await.is_empty()).then_some(())
    })
    .await;

    let info = s
        .client
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.watcher_active);
    assert_eq!(info.watcher_target, "multi/2 targets");
    let banner = chatcli::client::connection::banner(&info, "", "", "");
    assert!(
        banner
            .ends_with("\nK8s watcher active: multi/2 targets (context injected into all prompts)"),
        "{banner}"
    );

    let out = commands(
        &s,
        &["/status", "/watcher", "watcher status", "/watcher alerts"],
    )
    .await;
    assert!(
        out[0].contains("Watcher:  active (multi/2 targets)"),
        "{}",
        out[0]
    );
    assert_eq!(out[1], out[2]);
    assert!(
        out[1].starts_with("=== K8s Watcher Status ===\nStatus:     active\n"),
        "{}",
        out[1]
    );
    assert!(
        out[1].contains("Summary:    Watching 2 targets: 1 healthy, 0 warning, 1 critical"),
        "{}",
        out[1]
    );
    assert!(
        out[1].contains("\n  Deployment/prod/api: ok ("),
        "{}",
        out[1]
    );
    assert!(out[3].starts_with("=== K8s Alerts (1) ==="), "{}", out[3]);
    assert!(
        out[3].contains("[CRITICAL] HighRestartCount Pod/prod/api-1 (prod/api)"),
        "{}",
        out[3]
    );
    s.shutdown().await;
}
