//! The gRPC codec of the AIOps RPCs: `AnalyzeIssue` and `AgenticStep` requests decoded into the
//! core's types ([`crate::gateway::aiops`]) and its answers encoded back.

use std::collections::{BTreeMap, HashMap};

use crate::gateway::aiops::{
    Analysis, HistoryEntry, Issue, Step, StepRequest, SuggestedAction, Target,
};
use crate::proto;

fn params_in(p: HashMap<String, String>) -> BTreeMap<String, String> {
    p.into_iter().collect()
}

fn action_in(a: proto::SuggestedAction) -> SuggestedAction {
    SuggestedAction {
        name: a.name,
        action: a.action,
        description: a.description,
        params: params_in(a.params),
    }
}

fn action_out(a: SuggestedAction) -> proto::SuggestedAction {
    proto::SuggestedAction {
        name: a.name,
        action: a.action,
        description: a.description,
        params: a.params.into_iter().collect(),
    }
}

/// The override and the issue of an `AnalyzeIssue` request.
pub(super) fn analyze_in(r: proto::AnalyzeIssueRequest) -> (Target, Issue) {
    let target = Target {
        provider: r.provider,
        model: r.model,
    };
    let issue = Issue {
        issue_name: r.issue_name,
        namespace: r.namespace,
        resource_kind: r.resource_kind,
        resource_name: r.resource_name,
        signal_type: r.signal_type,
        severity: r.severity,
        description: r.description,
        risk_score: r.risk_score,
        kubernetes_context: r.kubernetes_context,
        previous_failure_context: r.previous_failure_context,
    };
    (target, issue)
}

pub(super) fn analyze_out(a: Analysis) -> proto::AnalyzeIssueResponse {
    proto::AnalyzeIssueResponse {
        analysis: a.analysis,
        confidence: a.confidence,
        recommendations: a.recommendations,
        model: a.model,
        provider: a.provider,
        suggested_actions: a.suggested_actions.into_iter().map(action_out).collect(),
    }
}

/// The override and the step of an `AgenticStep` request.
pub(super) fn step_in(r: proto::AgenticStepRequest) -> (Target, StepRequest) {
    let target = Target {
        provider: r.provider,
        model: r.model,
    };
    let issue = Issue {
        issue_name: r.issue_name,
        namespace: r.namespace,
        resource_kind: r.resource_kind,
        resource_name: r.resource_name,
        signal_type: r.signal_type,
        severity: r.severity,
        description: r.description,
        risk_score: r.risk_score,
        kubernetes_context: r.kubernetes_context,
        previous_failure_context: String::new(),
    };
    let history = r
        .history
        .into_iter()
        .map(|h| HistoryEntry {
            step_number: h.step_number,
            ai_message: h.ai_message,
            action: h.action,
            params: params_in(h.params),
            observation: h.observation,
        })
        .collect();
    let step = StepRequest {
        issue,
        history,
        max_steps: r.max_steps,
        current_step: r.current_step,
        insight_analysis: r.insight_analysis,
        insight_confidence: r.insight_confidence,
        insight_recommendations: r.insight_recommendations,
        insight_suggested_actions: r
            .insight_suggested_actions
            .into_iter()
            .map(action_in)
            .collect(),
    };
    (target, step)
}

pub(super) fn step_out(s: Step) -> proto::AgenticStepResponse {
    proto::AgenticStepResponse {
        reasoning: s.reasoning,
        resolved: s.resolved,
        next_action: s.next_action.map(action_out),
        postmortem_summary: s.postmortem_summary,
        root_cause: s.root_cause,
        impact: s.impact,
        lessons_learned: s.lessons_learned,
        prevention_actions: s.prevention_actions,
        diverges_from_insight: s.diverges_from_insight,
        divergence_reason: s.divergence_reason,
    }
}
