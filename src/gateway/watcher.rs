//! The watcher's use cases: its status and alerts as both transports show them, and its context
//! in prompts. [`Gateway::prompt_context`] is the one place that decides which prompts get the
//! context; [`Gateway::start`] adds it to every call it starts.

use super::Gateway;
use crate::watcher::{Alert, AlertFilter, WatcherStatus};

/// Which API a prompt arrived by: that decides whether it gets the watcher's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptRoute {
    /// chatcli's own prompts: SendPrompt, StreamPrompt, InteractiveSession turns, `POST /request`.
    /// They get the context whenever the watcher has targets.
    Chatcli,
    /// The OpenAI-compatible API: the context only with `[watcher] inject_openai = true`, since
    /// its clients send whole conversations of their own.
    OpenAi,
    /// AnalyzeIssue and AgenticStep: never (the caller sends the Kubernetes context it wants).
    Aiops,
}

impl Gateway<'_> {
    /// The watcher context a prompt arriving by `route` gets: the summary of every target within
    /// `max_context_chars`, or `None` (no targets, or a route that does not get it).
    pub fn prompt_context(&self, route: PromptRoute) -> Option<String> {
        let wanted = match route {
            PromptRoute::Chatcli => true,
            PromptRoute::OpenAi => self.watcher_config.inject_openai,
            PromptRoute::Aiops => false,
        };
        if !wanted || !self.watcher.is_active() {
            return None;
        }
        self.watcher.prompt_context()
    }

    /// The watcher's targets, their states and the status line (inactive without targets).
    pub fn watcher_status(&self) -> WatcherStatus {
        self.watcher.status()
    }

    /// The live alerts matching `filter`, most severe first.
    pub fn alerts(&self, filter: &AlertFilter) -> Vec<Alert> {
        self.watcher.alerts(filter)
    }

    /// What the watcher watches, for `GetServerInfo.watcher_target` and the `status` command:
    /// `multi/<N> targets`, as the existing ChatCLI says it (a single target is a one-target multi
    /// config there too); `None` when the watcher is off.
    pub fn watcher_target(&self) -> Option<String> {
        let s = self.watcher.status();
        s.active
            .then(|| format!("multi/{} targets", s.targets.len()))
    }
}

impl Gateway<'_> {
    /// The `watcher status` command's answer: the existing ChatCLI's lines, then one line per
    /// target.
    pub fn watcher_status_text(&self) -> String {
        let s = self.watcher.status();
        if !s.active {
            return "K8s Watcher: inactive (no watcher configured)".to_string();
        }
        let sum = |f: fn(&crate::watcher::TargetStatus) -> usize| -> usize {
            s.targets.iter().map(f).sum()
        };
        let mut out = format!(
            "=== K8s Watcher Status ===\nStatus:     active\nDeployment: {} targets\nNamespace:  \
             multi\nSummary:    {}\nAlerts:     {}\nSnapshots:  {}\nPods:       {}",
            s.targets.len(),
            s.status_line,
            sum(|t| t.alerts),
            sum(|t| t.snapshots),
            sum(|t| t.pods),
        );
        for t in &s.targets {
            out.push_str(&format!(
                "\n  {}: {} ({}/{} pods ready, {} alerts)",
                t.key, t.status, t.pods_ready, t.pods, t.alerts
            ));
        }
        out
    }

    /// The `watcher alerts` command's answer: every live alert, most severe first.
    pub fn alerts_text(&self) -> String {
        if !self.watcher.is_active() {
            return "K8s Watcher: inactive (no watcher configured)".to_string();
        }
        let alerts = self.watcher.alerts(&AlertFilter::default());
        if alerts.is_empty() {
            return "No active alerts.".to_string();
        }
        let mut out = format!("=== K8s Alerts ({}) ===", alerts.len());
        for a in alerts {
            out.push_str(&format!(
                "\n  [{}] {} {} ({}/{}): {}",
                a.severity.as_str(),
                a.kind,
                a.object,
                a.namespace,
                a.deployment,
                a.message
            ));
        }
        out
    }
}
