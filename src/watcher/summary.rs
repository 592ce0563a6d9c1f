//! The context added to prompts: every target scored (2 with a critical alert; 1 with a warning,
//! a pod not ready, error logs or a status other than `ok`; else 0), sorted by score then alert
//! count, full detail for the targets needing attention and one line for the healthy ones, under
//! the headers the existing ChatCLI writes. Over the budget (characters, not bytes) the healthiest
//! targets are shortened first (full detail → detail without logs → one line), then dropped;
//! text is only ever cut between lines, so no UTF-8 character and no log line is split.

use std::fmt::Write as _;

use super::alerts::{Alert, Severity};
use super::snapshot::Snapshot;

/// What the summarizer knows of one target.
#[derive(Debug, Clone)]
pub struct TargetView {
    /// `Kind/namespace/name`.
    pub key: String,
    /// `ok`, `forbidden`, `not found`, `unreachable since …`, `starting`.
    pub status: String,
    /// The last collection, if any.
    pub snapshot: Option<Snapshot>,
    /// Its alerts, most severe first.
    pub alerts: Vec<Alert>,
}

impl TargetView {
    /// 2, 1 or 0 (see the module docs).
    pub fn score(&self) -> u8 {
        if self.alerts.iter().any(|a| a.severity == Severity::Critical) {
            return 2;
        }
        let snap = self.snapshot.as_ref();
        let not_ready =
            snap.is_some_and(|s| s.pods.iter().any(|p| !p.ready && p.phase != "Succeeded"));
        let error_logs = snap.is_some_and(|s| s.error_logs().next().is_some());
        match !self.alerts.is_empty() || not_ready || error_logs || self.status != "ok" {
            true => 1,
            false => 0,
        }
    }

    fn one_line(&self) -> String {
        let mut line = format!("{}: {}", self.key, self.status);
        if let Some(s) = &self.snapshot {
            let restarts: i32 = s.pods.iter().map(|p| p.restarts()).sum();
            let _ = write!(
                line,
                ", {}/{} pods ready, {restarts} restarts",
                s.pods_ready(),
                s.pods.len()
            );
        }
        match self.alerts.len() {
            0 => line.push_str(", no alerts"),
            n => {
                let _ = write!(line, ", {n} alerts");
            }
        }
        line
    }

    fn detail(&self, with_logs: bool) -> String {
        let mut out = format!(
            "## {} (status: {}, score {})\n",
            self.key,
            self.status,
            self.score()
        );
        let Some(s) = &self.snapshot else {
            for a in &self.alerts {
                let _ = writeln!(
                    out,
                    "  [{}] {} {}: {}",
                    a.severity.as_str(),
                    a.kind,
                    a.object,
                    a.message
                );
            }
            return out;
        };
        if let Some(w) = &s.workload {
            let _ = writeln!(out, "Workload: {}/{} ready", w.ready, w.desired);
        }
        if let Some(h) = &s.hpa {
            let _ = writeln!(
                out,
                "HPA {}: min {} max {}, current {}, desired {}",
                h.name, h.min, h.max, h.current, h.desired
            );
        }
        if !self.alerts.is_empty() {
            out.push_str("Alerts:\n");
            for a in &self.alerts {
                let _ = writeln!(
                    out,
                    "  [{}] {} {}: {}",
                    a.severity.as_str(),
                    a.kind,
                    a.object,
                    a.message
                );
            }
        }
        if !s.pods.is_empty() {
            out.push_str("Pods:\n");
            for p in &s.pods {
                let _ = write!(
                    out,
                    "  {} {} ready={} restarts={}",
                    p.name,
                    p.phase,
                    p.ready,
                    p.restarts()
                );
                for c in &p.containers {
                    if let Some(w) = &c.waiting {
                        let _ = write!(out, " {}:waiting={w}", c.name);
                    }
                    if let Some(t) = &c.last_termination {
                        let _ = write!(out, " {}:last={t}", c.name);
                    }
                }
                if let Some(n) = &p.node {
                    let _ = write!(out, " node={n}");
                }
                out.push('\n');
            }
        }
        if !s.events.is_empty() {
            out.push_str("Events:\n");
            for e in &s.events {
                let _ = writeln!(
                    out,
                    "  {} {} {}: {} (x{})",
                    e.kind, e.reason, e.object, e.message, e.count
                );
            }
        }
        let troubled: Vec<String> = s
            .nodes
            .iter()
            .filter_map(|n| {
                let bad: Vec<&str> = n
                    .conditions
                    .iter()
                    .filter(|(k, v)| (k.as_str() == "Ready") != (v.as_str() == "True"))
                    .map(|(k, _)| k.as_str())
                    .collect();
                (!bad.is_empty() || n.unschedulable).then(|| {
                    let mut l = format!("  {}: {}", n.name, bad.join(", "));
                    if n.unschedulable {
                        l.push_str(" (cordoned)");
                    }
                    l
                })
            })
            .collect();
        if !troubled.is_empty() {
            out.push_str("Nodes:\n");
            for l in troubled {
                out.push_str(&l);
                out.push('\n');
            }
        }
        if with_logs && !s.metrics.is_empty() {
            out.push_str("Metrics:\n");
            for (pod, sample) in &s.metrics {
                let _ = writeln!(out, "  {pod} {sample}");
            }
        }
        if with_logs {
            let errors: Vec<_> = s.error_logs().collect();
            if !errors.is_empty() {
                out.push_str("Error logs:\n");
                for l in errors {
                    let _ = writeln!(out, "  {}/{} {} {}", l.pod, l.container, l.time, l.text);
                }
            }
        }
        out
    }
}

/// How much of a target is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Dropped,
    OneLine,
    NoLogs,
    Full,
}

/// The status line: `Watching N targets: h healthy, w warning, c critical`.
pub fn status_line(targets: &[TargetView]) -> String {
    let count = |s: u8| targets.iter().filter(|t| t.score() == s).count();
    format!(
        "Watching {} targets: {} healthy, {} warning, {} critical",
        targets.len(),
        count(0),
        count(1),
        count(2)
    )
}

/// The context within `budget` characters, or `None` when there is no target.
pub fn context(targets: &[TargetView], budget: usize) -> Option<String> {
    if targets.is_empty() {
        return None;
    }
    let mut sorted: Vec<&TargetView> = targets.iter().collect();
    sorted.sort_by(|a, b| {
        b.score()
            .cmp(&a.score())
            .then(b.alerts.len().cmp(&a.alerts.len()))
            .then(a.key.cmp(&b.key))
    });
    // Each target's text at each level, computed once.
    let pieces: Vec<[String; 3]> = sorted
        .iter()
        .map(|t| {
            [
                format!("{}\n", t.one_line()),
                t.detail(false),
                t.detail(true),
            ]
        })
        .collect();
    let mut levels: Vec<Level> = sorted
        .iter()
        .map(|t| match t.score() {
            0 => Level::OneLine,
            _ => Level::Full,
        })
        .collect();
    let head = format!(
        "[K8s Multi-Watcher: {} targets monitored]\n{}\n",
        targets.len(),
        status_line(targets)
    );
    const ATTENTION: &str = "--- Targets Requiring Attention ---\n";
    const HEALTHY: &str = "--- Healthy Targets ---\n";
    let piece = |i: usize, level: Level| match level {
        Level::Dropped => "",
        Level::OneLine => pieces[i][0].as_str(),
        Level::NoLogs => pieces[i][1].as_str(),
        Level::Full => pieces[i][2].as_str(),
    };
    let dropped_line = |n: usize| format!("({n} more targets not shown)\n");
    let size = |levels: &[Level]| {
        let shown = |attention: bool| {
            (0..sorted.len())
                .filter(|&i| (sorted[i].score() > 0) == attention && levels[i] != Level::Dropped)
                .count()
        };
        let mut n = head.chars().count();
        if shown(true) > 0 {
            n += ATTENTION.len();
        }
        if shown(false) > 0 {
            n += HEALTHY.len();
        }
        n += (0..sorted.len())
            .map(|i| piece(i, levels[i]).chars().count())
            .sum::<usize>();
        let dropped = levels.iter().filter(|l| **l == Level::Dropped).count();
        if dropped > 0 {
            n += dropped_line(dropped).len();
        }
        n
    };
    let render = |levels: &[Level]| {
        let mut out = head.clone();
        for (attention, header) in [(true, ATTENTION), (false, HEALTHY)] {
            let shown: Vec<usize> = (0..sorted.len())
                .filter(|&i| (sorted[i].score() > 0) == attention && levels[i] != Level::Dropped)
                .collect();
            if !shown.is_empty() {
                out.push_str(header);
                shown
                    .iter()
                    .for_each(|&i| out.push_str(piece(i, levels[i])));
            }
        }
        let dropped = levels.iter().filter(|l| **l == Level::Dropped).count();
        if dropped > 0 {
            out.push_str(&dropped_line(dropped));
        }
        out
    };
    // Shorten one step at a time, healthiest (last) first: every target down one level before
    // any goes down two.
    for floor in [Level::NoLogs, Level::OneLine, Level::Dropped] {
        for i in (0..sorted.len()).rev() {
            if size(&levels) <= budget {
                return Some(render(&levels));
            }
            if levels[i] > floor {
                levels[i] = floor;
            }
        }
    }
    let text = render(&levels);
    Some(cut_at_line(&text, budget))
}

/// The longest run of whole lines of `text` within `budget` characters.
fn cut_at_line(text: &str, budget: usize) -> String {
    let mut out = String::new();
    let mut used = 0;
    for line in text.split_inclusive('\n') {
        let n = line.chars().count();
        if used + n > budget {
            break;
        }
        out.push_str(line);
        used += n;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::config::WatchTarget;
    use crate::watcher::snapshot::{ContainerInfo, LogLine, PodInfo, WorkloadInfo};

    fn view(name: &str, critical: bool, logs: usize) -> TargetView {
        let target = WatchTarget {
            deployment: name.into(),
            namespace: "prod".into(),
            ..WatchTarget::default()
        };
        let pods = vec![PodInfo {
            name: format!("{name}-1"),
            phase: "Running".into(),
            ready: !critical,
            node: None,
            ip: None,
            containers: vec![ContainerInfo {
                name: "app".into(),
                ready: !critical,
                restarts: if critical { 7 } else { 0 },
                waiting: None,
                last_termination: None,
            }],
        }];
        let logs = (0..logs)
            .map(|i| LogLine {
                pod: format!("{name}-1"),
                container: "app".into(),
                time: "2026-01-01T00:00:00Z".into(),
                text: format!("ERROR ünïcödé failure number {i} — ✗"),
            })
            .collect();
        let alerts = match critical {
            true => vec![Alert {
                kind: "HighRestartCount",
                severity: Severity::Critical,
                message: "restarted 7 times".into(),
                object: format!("Pod/prod/{name}-1"),
                namespace: "prod".into(),
                deployment: name.into(),
                first_seen: SystemTime::now(),
                last_seen: SystemTime::now(),
            }],
            false => Vec::new(),
        };
        TargetView {
            key: target.key(),
            status: "ok".into(),
            snapshot: Some(Snapshot {
                target,
                taken: Some(SystemTime::now()),
                workload: Some(WorkloadInfo {
                    desired: 1,
                    ready: i32::from(!critical),
                    ..WorkloadInfo::default()
                }),
                pods,
                logs,
                ..Snapshot::default()
            }),
            alerts,
        }
    }

    #[test]
    fn headers_status_line_and_order() {
        let targets = vec![
            view("web", false, 0),
            view("api", true, 2),
            view("db", false, 0),
        ];
        let text = context(&targets, 32_000).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "[K8s Multi-Watcher: 3 targets monitored]");
        assert_eq!(
            lines[1],
            "Watching 3 targets: 2 healthy, 0 warning, 1 critical"
        );
        assert_eq!(lines[2], "--- Targets Requiring Attention ---");
        assert!(lines[3].starts_with("## Deployment/prod/api (status: ok, score 2)"));
        assert!(text.contains("[CRITICAL] HighRestartCount Pod/prod/api-1"));
        assert!(text.contains("ERROR ünïcödé failure number 1"));
        let healthy = text.find("--- Healthy Targets ---").unwrap();
        assert!(text[healthy..].contains(
            "Deployment/prod/db: ok, 1/1 pods ready, 0 restarts, no alerts\nDeployment/prod/web: ok"
        ));
        assert!(context(&[], 100).is_none());
    }

    #[test]
    fn the_budget_shortens_the_healthiest_first_then_drops_and_never_splits_a_character() {
        let targets = vec![
            view("a", true, 40),
            view("b", true, 40),
            view("c", false, 0),
            view("d", false, 0),
        ];
        let full = context(&targets, usize::MAX).unwrap();
        for budget in [
            full.chars().count() - 1,
            2500,
            1200,
            600,
            300,
            150,
            90,
            10,
            0,
        ] {
            let text = context(&targets, budget).unwrap();
            assert!(
                text.chars().count() <= budget,
                "{budget}: {}",
                text.chars().count()
            );
            // Whole lines only: every log line is complete or absent.
            for l in text.lines().filter(|l| l.contains("failure number")) {
                assert!(l.ends_with("— ✗"), "{l}");
            }
            assert!(text.is_empty() || text.ends_with('\n'));
        }
        // Just under the full size: the healthiest needing attention (b) lost its logs first.
        let text = context(&targets, full.chars().count() - 1).unwrap();
        let b = text.find("## Deployment/prod/b").unwrap();
        assert!(!text[b..].contains("Error logs:"), "{text}");
        assert!(text[..b].contains("Error logs:"), "{text}");
        // Tighter: the healthy ones go before the critical ones, and the drop is said.
        let text = context(&targets, 300).unwrap();
        assert!(text.contains("Deployment/prod/a"), "{text}");
        assert!(text.contains("more targets not shown"), "{text}");
        assert!(!text.contains("Deployment/prod/d"), "{text}");
    }
}
