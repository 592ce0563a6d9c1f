//! AIOps: `AnalyzeIssue` (a root-cause analysis of one issue) and `AgenticStep` (one turn of a
//! remediation loop). Each asks the LLM once, without history or the watcher's context, for a JSON
//! answer of a fixed contract: structured output where the provider's API takes a schema
//! ([`ResponseSchema`]), the contract in the prompt for all. The answer is read with its code
//! fences stripped and checked against the contract; a failure is shown to the model once, and a
//! second failure gives the fallback answer (the raw text, no invented confidence) and counts
//! `chatcli_aiops_parse_failures_total`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Error, Gateway, PromptCall, PromptRoute};
use crate::llm::{Message, ResponseSchema};

/// Longest `issue_name`, in bytes.
pub const MAX_ISSUE_NAME: usize = 1024;
/// Longest `description`, in bytes.
pub const MAX_DESCRIPTION: usize = 50 * 1024;
/// Longest `kubernetes_context` (and `previous_failure_context`), in bytes.
pub const MAX_KUBERNETES_CONTEXT: usize = 1024 * 1024;

/// The issue both RPCs are about.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Issue {
    /// A short name of the issue.
    pub issue_name: String,
    /// The namespace of the resource.
    pub namespace: String,
    /// Its kind (`Deployment`, …).
    pub resource_kind: String,
    /// Its name.
    pub resource_name: String,
    /// The signal that raised it (`error_rate`, `oom_kill`, `pod_restart`, …).
    pub signal_type: String,
    /// `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// What was observed.
    pub description: String,
    /// The caller's risk score.
    pub risk_score: i32,
    /// The caller's snapshot of the cluster around the resource.
    pub kubernetes_context: String,
    /// What failed in an earlier attempt (AnalyzeIssue only).
    pub previous_failure_context: String,
}

/// One remediation action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuggestedAction {
    /// A human name of the step.
    pub name: String,
    /// The action type (`RestartDeployment`, `ScaleDeployment`, …).
    pub action: String,
    /// What it does.
    pub description: String,
    /// Its parameters (`{"replicas": "3"}`).
    pub params: BTreeMap<String, String>,
}

/// The answer of `AnalyzeIssue`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Analysis {
    /// The analysis (the raw answer when it could not be read).
    pub analysis: String,
    /// 0..=1 (0 when the answer could not be read).
    pub confidence: f32,
    /// Recommendations, in order.
    pub recommendations: Vec<String>,
    /// Suggested actions (the answer's `actions`).
    pub suggested_actions: Vec<SuggestedAction>,
    /// Who answered.
    pub provider: String,
    /// With which model.
    pub model: String,
}

/// One earlier step of the remediation loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Its number.
    pub step_number: i32,
    /// What the model said.
    pub ai_message: String,
    /// The action taken.
    pub action: String,
    /// Its parameters.
    pub params: BTreeMap<String, String>,
    /// What came of it.
    pub observation: String,
}

/// The request of `AgenticStep`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepRequest {
    /// The issue (with a fresh `kubernetes_context` each step).
    pub issue: Issue,
    /// The steps so far.
    pub history: Vec<HistoryEntry>,
    /// The most steps the loop takes.
    pub max_steps: i32,
    /// This step's number.
    pub current_step: i32,
    /// The earlier analysis (AnalyzeIssue's answer), when there is one.
    pub insight_analysis: String,
    /// Its confidence.
    pub insight_confidence: f32,
    /// Its recommendations.
    pub insight_recommendations: Vec<String>,
    /// Its suggested actions.
    pub insight_suggested_actions: Vec<SuggestedAction>,
}

/// The answer of `AgenticStep`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// The model's reasoning (the parse error and the raw answer when it could not be read).
    pub reasoning: String,
    /// Whether the issue is resolved.
    pub resolved: bool,
    /// The next action; `None` when resolved.
    pub next_action: Option<SuggestedAction>,
    /// Postmortem fields, only when resolved.
    pub postmortem_summary: String,
    /// See `postmortem_summary`.
    pub root_cause: String,
    /// See `postmortem_summary`.
    pub impact: String,
    /// See `postmortem_summary`.
    pub lessons_learned: Vec<String>,
    /// See `postmortem_summary`.
    pub prevention_actions: Vec<String>,
    /// Computed by the server: the next action departs from the insight's first action.
    pub diverges_from_insight: bool,
    /// The model's reason for departing from the insight.
    pub divergence_reason: String,
}

/// The provider and model a call overrides (empty: the server defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// Provider name.
    pub provider: String,
    /// Model.
    pub model: String,
}

fn action_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "action": {"type": "string"},
            "description": {"type": "string"},
            "params": {"type": "object", "additionalProperties": {"type": "string"}}
        },
        "required": ["name", "action", "description"]
    })
}

/// The contract of `AnalyzeIssue`'s answer.
pub fn analysis_schema() -> ResponseSchema {
    ResponseSchema {
        name: "issue_analysis",
        description: "The root-cause analysis of a Kubernetes issue.",
        schema: json!({
            "type": "object",
            "properties": {
                "analysis": {"type": "string"},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "recommendations": {"type": "array", "items": {"type": "string"}},
                "actions": {"type": "array", "items": action_schema()}
            },
            "required": ["analysis", "confidence", "recommendations"]
        }),
    }
}

/// The contract of `AgenticStep`'s answer.
pub fn step_schema() -> ResponseSchema {
    let strings = json!({"type": "array", "items": {"type": "string"}});
    ResponseSchema {
        name: "remediation_step",
        description: "One step of a Kubernetes remediation loop.",
        schema: json!({
            "type": "object",
            "properties": {
                "reasoning": {"type": "string"},
                "resolved": {"type": "boolean"},
                "next_action": action_schema(),
                "postmortem_summary": {"type": "string"},
                "root_cause": {"type": "string"},
                "impact": {"type": "string"},
                "lessons_learned": strings,
                "prevention_actions": strings,
                "divergence_reason": {"type": "string"}
            },
            "required": ["reasoning", "resolved"]
        }),
    }
}

/// The answer with one leading code fence (```` ```json ```` or ```` ``` ````) and its closing
/// fence removed.
pub fn strip_fences(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    // The fence's info string (`json`) runs to the end of its line.
    let body = match rest.find('\n') {
        Some(i) => &rest[i + 1..],
        None => rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric()),
    };
    body.trim_end().strip_suffix("```").unwrap_or(body).trim()
}

/// A `params` map whose values may be written as numbers or booleans; each becomes its text.
fn params<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: Option<BTreeMap<String, Value>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

#[derive(Debug, Deserialize)]
struct WireAction {
    #[serde(default)]
    name: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    description: String,
    #[serde(default, deserialize_with = "params")]
    params: BTreeMap<String, String>,
}

impl From<WireAction> for SuggestedAction {
    fn from(a: WireAction) -> Self {
        SuggestedAction {
            name: a.name,
            action: a.action,
            description: a.description,
            params: a.params,
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireAnalysis {
    analysis: String,
    confidence: f64,
    recommendations: Vec<String>,
    #[serde(default)]
    actions: Vec<WireAction>,
}

#[derive(Debug, Deserialize)]
struct WireStep {
    reasoning: String,
    resolved: bool,
    #[serde(default)]
    next_action: Option<WireAction>,
    #[serde(default)]
    postmortem_summary: String,
    #[serde(default)]
    root_cause: String,
    #[serde(default)]
    impact: String,
    #[serde(default)]
    lessons_learned: Vec<String>,
    #[serde(default)]
    prevention_actions: Vec<String>,
    #[serde(default)]
    divergence_reason: String,
}

/// Reads an `AnalyzeIssue` answer against its contract.
pub fn parse_analysis(text: &str) -> Result<Analysis, String> {
    let w: WireAnalysis = serde_json::from_str(strip_fences(text)).map_err(|e| e.to_string())?;
    if !w.confidence.is_finite() {
        return Err("confidence must be a number between 0 and 1".into());
    }
    if w.analysis.trim().is_empty() {
        return Err("analysis must not be empty".into());
    }
    Ok(Analysis {
        analysis: w.analysis,
        confidence: w.confidence.clamp(0.0, 1.0) as f32,
        recommendations: w.recommendations,
        suggested_actions: w.actions.into_iter().map(SuggestedAction::from).collect(),
        ..Default::default()
    })
}

/// Reads an `AgenticStep` answer against its contract; `diverges_from_insight` is left for
/// [`diverges`].
pub fn parse_step(text: &str) -> Result<Step, String> {
    let w: WireStep = serde_json::from_str(strip_fences(text)).map_err(|e| e.to_string())?;
    let next_action = w
        .next_action
        .map(SuggestedAction::from)
        .filter(|a| !a.action.is_empty() || !a.name.is_empty());
    if !w.resolved && next_action.is_none() {
        return Err("next_action is required while the issue is not resolved".into());
    }
    let mut step = Step {
        reasoning: w.reasoning,
        resolved: w.resolved,
        divergence_reason: w.divergence_reason,
        ..Default::default()
    };
    if w.resolved {
        step.postmortem_summary = w.postmortem_summary;
        step.root_cause = w.root_cause;
        step.impact = w.impact;
        step.lessons_learned = w.lessons_learned;
        step.prevention_actions = w.prevention_actions;
    } else {
        step.next_action = next_action;
    }
    Ok(step)
}

/// Whether `step` departs from the insight: not resolved, a next action with an action type,
/// the insight's first suggested action has one, and the two differ in their action or their
/// `containment` parameter.
pub fn diverges(step: &Step, insight: &[SuggestedAction]) -> bool {
    let Some(next) = step.next_action.as_ref().filter(|a| !a.action.is_empty()) else {
        return false;
    };
    let Some(first) = insight.first().filter(|a| !a.action.is_empty()) else {
        return false;
    };
    !step.resolved
        && (next.action != first.action
            || next.params.get("containment") != first.params.get("containment"))
}

fn check_issue(issue: &Issue) -> Result<(), Error> {
    let fields = [
        ("issue_name", issue.issue_name.len(), MAX_ISSUE_NAME),
        ("description", issue.description.len(), MAX_DESCRIPTION),
        (
            "kubernetes_context",
            issue.kubernetes_context.len(),
            MAX_KUBERNETES_CONTEXT,
        ),
        (
            "previous_failure_context",
            issue.previous_failure_context.len(),
            MAX_KUBERNETES_CONTEXT,
        ),
    ];
    for (field, bytes, limit) in fields {
        if bytes > limit {
            return Err(Error::AiopsFieldTooLarge {
                field,
                bytes,
                limit,
            });
        }
    }
    if issue.issue_name.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "validation: issue_name is required".into(),
        ));
    }
    Ok(())
}

fn issue_text(issue: &Issue) -> String {
    let mut s = format!(
        "Issue: {}\nResource: {} {}/{}\nSignal: {}\nSeverity: {}\nRisk score: {}\n",
        issue.issue_name,
        issue.resource_kind,
        issue.namespace,
        issue.resource_name,
        issue.signal_type,
        issue.severity,
        issue.risk_score
    );
    if !issue.description.is_empty() {
        s.push_str(&format!("\nDescription:\n{}\n", issue.description));
    }
    if !issue.kubernetes_context.is_empty() {
        s.push_str(&format!(
            "\nKubernetes context:\n{}\n",
            issue.kubernetes_context
        ));
    }
    if !issue.previous_failure_context.is_empty() {
        s.push_str(&format!(
            "\nAn earlier remediation failed:\n{}\n",
            issue.previous_failure_context
        ));
    }
    s
}

fn action_line(a: &SuggestedAction) -> String {
    let params: Vec<String> = a.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{} ({}): {} [{}]",
        a.name,
        a.action,
        a.description,
        params.join(", ")
    )
}

fn analysis_prompt(issue: &Issue) -> String {
    format!(
        "You are a Kubernetes site reliability engineer. Analyze the issue below and find its \
         root cause.\n\n{}\nAnswer with only a JSON object, no prose and no code fences: \
         {{\"analysis\": string, \"confidence\": number between 0 and 1, \"recommendations\": \
         [string], \"actions\": [{{\"name\": string, \"action\": string (RestartDeployment, \
         ScaleDeployment, RollbackDeployment, AdjustResources, DeletePod, PatchConfig, \
         AdjustHPA, CordonNode, DrainNode, ExecDiagnostic, Custom, …), \"description\": string, \
         \"params\": {{string: string}}}}]}}",
        issue_text(issue)
    )
}

fn step_prompt(req: &StepRequest) -> String {
    let mut s = format!(
        "You are a Kubernetes site reliability engineer running a remediation loop, step {} of \
         at most {}.\n\n{}",
        req.current_step,
        req.max_steps,
        issue_text(&req.issue)
    );
    if !req.insight_analysis.is_empty() || !req.insight_suggested_actions.is_empty() {
        s.push_str(&format!(
            "\nEarlier analysis (confidence {}):\n{}\n",
            req.insight_confidence, req.insight_analysis
        ));
        for r in &req.insight_recommendations {
            s.push_str(&format!("- recommendation: {r}\n"));
        }
        for a in &req.insight_suggested_actions {
            s.push_str(&format!("- suggested action: {}\n", action_line(a)));
        }
    }
    if !req.history.is_empty() {
        s.push_str("\nSteps so far:\n");
        for h in &req.history {
            let params: Vec<String> = h.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!(
                "Step {}: {}\n  action: {} [{}]\n  observation: {}\n",
                h.step_number,
                h.ai_message,
                h.action,
                params.join(", "),
                h.observation
            ));
        }
    }
    s.push_str(
        "\nDecide the next step. Answer with only a JSON object, no prose and no code fences: \
         {\"reasoning\": string, \"resolved\": boolean, \"next_action\": {\"name\": string, \
         \"action\": string, \"description\": string, \"params\": {string: string}} (required \
         while not resolved), \"postmortem_summary\": string, \"root_cause\": string, \"impact\": \
         string, \"lessons_learned\": [string], \"prevention_actions\": [string] (these five when \
         resolved), \"divergence_reason\": string (why the next action departs from the earlier \
         analysis's first suggested action, if it does)}",
    );
    s
}

/// What one structured call came to.
enum Outcome<T> {
    Parsed(T),
    /// The last raw answer and why it could not be read.
    Unparsable {
        raw: String,
        error: String,
    },
}

impl Gateway<'_> {
    /// `AnalyzeIssue`: the model's root-cause analysis of `issue`.
    pub async fn analyze_issue(&self, target: Target, issue: Issue) -> Result<Analysis, Error> {
        check_issue(&issue)?;
        let prompt = analysis_prompt(&issue);
        let (outcome, provider, model) = self
            .structured(&target, analysis_schema(), prompt, parse_analysis)
            .await?;
        let mut analysis = match outcome {
            Outcome::Parsed(a) => a,
            Outcome::Unparsable { raw, error } => {
                tracing::warn!(%error, "AnalyzeIssue answer is not the JSON asked for");
                self.count_parse_failure("AnalyzeIssue");
                Analysis {
                    analysis: raw,
                    confidence: 0.0,
                    ..Default::default()
                }
            }
        };
        analysis.provider = provider;
        analysis.model = model;
        Ok(analysis)
    }

    /// `AgenticStep`: the model's next remediation step for `req`.
    pub async fn agentic_step(&self, target: Target, req: StepRequest) -> Result<Step, Error> {
        check_issue(&req.issue)?;
        if req.history.len() > 100 {
            return Err(Error::InvalidArgument(
                "validation: history must have at most 100 steps".into(),
            ));
        }
        let prompt = step_prompt(&req);
        let (outcome, _, _) = self
            .structured(&target, step_schema(), prompt, parse_step)
            .await?;
        let mut step = match outcome {
            Outcome::Parsed(s) => s,
            Outcome::Unparsable { raw, error } => {
                tracing::warn!(%error, "AgenticStep answer is not the JSON asked for");
                self.count_parse_failure("AgenticStep");
                Step {
                    reasoning: format!(
                        "the model's answer could not be read as a step ({error}): {raw}"
                    ),
                    resolved: false,
                    ..Default::default()
                }
            }
        };
        step.diverges_from_insight = diverges(&step, &req.insight_suggested_actions);
        Ok(step)
    }

    fn count_parse_failure(&self, rpc: &str) {
        if let Some(m) = self.metrics {
            m.aiops_parse_failure(rpc);
        }
    }

    /// Asks for an answer following `schema`, reads it with `parse`, and on a failure asks once
    /// more with the answer and the parse error; returns the outcome and who answered.
    async fn structured<T>(
        &self,
        target: &Target,
        schema: ResponseSchema,
        prompt: String,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<(Outcome<T>, String, String), Error> {
        let schema = Arc::new(schema);
        let call = |history: Vec<Message>, prompt: String| PromptCall {
            provider: target.provider.clone(),
            model: target.model.clone(),
            history,
            prompt,
            unary: true,
            schema: Some(schema.clone()),
            ..Default::default()
        };
        let first = self.ask(call(Vec::new(), prompt.clone())).await?;
        let error = match parse(&first.0) {
            Ok(v) => return Ok((Outcome::Parsed(v), first.1, first.2)),
            Err(e) => e,
        };
        tracing::debug!(%error, "structured answer unreadable; asking once more");
        let history = vec![
            Message {
                role: "user".into(),
                content: prompt,
            },
            Message {
                role: "assistant".into(),
                content: first.0,
            },
        ];
        let retry = format!(
            "Your answer could not be read: {error}. Answer again with only the JSON object \
             described above, no prose and no code fences."
        );
        let (raw, provider, model) = self.ask(call(history, retry)).await?;
        let outcome = match parse(&raw) {
            Ok(v) => Outcome::Parsed(v),
            Err(error) => Outcome::Unparsable { raw, error },
        };
        Ok((outcome, provider, model))
    }

    /// One whole answer, without the watcher's context.
    async fn ask(&self, call: PromptCall) -> Result<(String, String, String), Error> {
        let answer = self.start(PromptRoute::Aiops, call).await?;
        let (text, _) = crate::llm::collect(answer.stream).await?;
        Ok((text, answer.provider, answer.model))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn fences_are_stripped() {
        assert_eq!(strip_fences("```json\n{\"a\":1}\n```"), "{\"a\":1}");
        assert_eq!(strip_fences("  ```\n{}\n```  "), "{}");
        assert_eq!(strip_fences("{\"a\":1}"), "{\"a\":1}");
        assert_eq!(strip_fences("```json{}```"), "{}");
    }

    #[test]
    fn an_analysis_is_read_and_its_confidence_clamped() {
        let a = parse_analysis(
            "```json\n{\"analysis\":\"OOM\",\"confidence\":1.5,\"recommendations\":[\"raise \
             memory\"],\"actions\":[{\"name\":\"n\",\"action\":\"AdjustResources\",\
             \"description\":\"d\",\"params\":{\"memory\":\"1Gi\",\"replicas\":3}}]}\n```",
        )
        .unwrap();
        assert_eq!(a.analysis, "OOM");
        assert_eq!(a.confidence, 1.0);
        assert_eq!(a.recommendations, vec!["raise memory".to_string()]);
        assert_eq!(a.suggested_actions[0].action, "AdjustResources");
        assert_eq!(a.suggested_actions[0].params["replicas"], "3");
        assert!(parse_analysis("{\"analysis\":\"x\"}").is_err());
        assert!(parse_analysis("not json").is_err());
    }

    #[test]
    fn a_step_keeps_postmortem_fields_only_when_resolved() {
        let s = parse_step(
            "{\"reasoning\":\"r\",\"resolved\":false,\"next_action\":{\"name\":\"n\",\
             \"action\":\"ScaleDeployment\",\"description\":\"d\"},\"root_cause\":\"x\"}",
        )
        .unwrap();
        assert!(s.next_action.is_some());
        assert_eq!(s.root_cause, "");
        let s = parse_step(
            "{\"reasoning\":\"r\",\"resolved\":true,\"next_action\":{\"name\":\"n\",\
             \"action\":\"A\",\"description\":\"d\"},\"root_cause\":\"x\"}",
        )
        .unwrap();
        assert!(s.next_action.is_none());
        assert_eq!(s.root_cause, "x");
        assert!(parse_step("{\"reasoning\":\"r\",\"resolved\":false}").is_err());
    }

    #[test]
    fn divergence_compares_the_action_and_its_containment() {
        let act = |action: &str, containment: Option<&str>| SuggestedAction {
            action: action.into(),
            params: containment
                .map(|c| BTreeMap::from([("containment".to_string(), c.to_string())]))
                .unwrap_or_default(),
            ..Default::default()
        };
        let step = |a: SuggestedAction, resolved: bool| Step {
            next_action: Some(a),
            resolved,
            ..Default::default()
        };
        let insight = [act("RestartDeployment", Some("pod"))];
        assert!(!diverges(
            &step(act("RestartDeployment", Some("pod")), false),
            &insight
        ));
        assert!(diverges(
            &step(act("ScaleDeployment", Some("pod")), false),
            &insight
        ));
        assert!(diverges(
            &step(act("RestartDeployment", Some("node")), false),
            &insight
        ));
        assert!(!diverges(
            &step(act("ScaleDeployment", None), true),
            &insight
        ));
        assert!(!diverges(&step(act("", None), false), &insight));
        assert!(!diverges(
            &step(act("ScaleDeployment", None), false),
            &[act("", None)]
        ));
        assert!(!diverges(&step(act("ScaleDeployment", None), false), &[]));
    }

    #[test]
    fn the_gemini_and_openai_contracts_are_objects() {
        for s in [analysis_schema(), step_schema()] {
            assert_eq!(s.schema["type"], "object");
            assert!(s.name.len() <= 64);
        }
    }
}
