//! Alert rules and the alert book. [`conditions`] reads one snapshot (and the one before it, for
//! scale changes) and says which conditions hold now; [`AlertBook::observe`] keeps one alert per
//! type + object: raised when its condition first holds, its `last_seen` advanced at every
//! collection that still sees it, and dropped `window` after it was last seen. A condition that
//! lasts is seen at every collection, so it never expires while it holds.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::snapshot::Snapshot;
use crate::config::WorkloadKind;

/// How bad an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Needs a look.
    Warning,
    /// Broken.
    Critical,
}

impl Severity {
    /// `WARNING` or `CRITICAL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warning => "WARNING",
            Self::Critical => "CRITICAL",
        }
    }
}

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `OOMKilled`, `HighRestartCount`, …
    pub kind: &'static str,
    /// How bad.
    pub severity: Severity,
    /// `Kind/namespace/name` of the object it is about.
    pub object: String,
    /// What was seen.
    pub message: String,
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// The type (`OOMKilled`, …).
    pub kind: &'static str,
    /// How bad.
    pub severity: Severity,
    /// What was last seen.
    pub message: String,
    /// `Kind/namespace/name` of the object.
    pub object: String,
    /// The target's namespace.
    pub namespace: String,
    /// The target's workload name.
    pub deployment: String,
    /// When the condition was first seen.
    pub first_seen: SystemTime,
    /// When it was last seen.
    pub last_seen: SystemTime,
}

/// The node conditions that raise an alert when `True` (`Ready` raises one when it is not).
const NODE_CONDITIONS: [(&str, &str, Severity); 4] = [
    ("DiskPressure", "DiskPressure", Severity::Critical),
    ("MemoryPressure", "MemoryPressure", Severity::Critical),
    (
        "NetworkUnavailable",
        "NetworkUnavailable",
        Severity::Critical,
    ),
    ("PIDPressure", "PIDPressure", Severity::Warning),
];

/// How long a CronJob may go without running before `CronJobMissed`.
const CRONJOB_MISSED_AFTER: Duration = Duration::from_secs(2 * 3600);

/// The conditions that hold in `now` (`before` is the previous snapshot of the same target).
pub fn conditions(now: &Snapshot, before: Option<&Snapshot>) -> Vec<Condition> {
    let t = &now.target;
    let ns = &t.namespace;
    let mut out = Vec::new();
    let mut add = |kind, severity, object: String, message: String| {
        out.push(Condition {
            kind,
            severity,
            object,
            message,
        })
    };
    for p in &now.pods {
        let object = format!("Pod/{ns}/{}", p.name);
        let restarts = p.restarts();
        if restarts > 5 {
            add(
                "HighRestartCount",
                Severity::Critical,
                object.clone(),
                format!("pod {} restarted {restarts} times", p.name),
            );
        }
        for c in &p.containers {
            if c.last_termination.as_deref() == Some("OOMKilled") {
                add(
                    "OOMKilled",
                    Severity::Critical,
                    object.clone(),
                    format!("container {} of pod {} was OOMKilled", c.name, p.name),
                );
            }
            if c.waiting.as_deref() == Some("CrashLoopBackOff") {
                add(
                    "CrashLoopBackOff",
                    Severity::Critical,
                    object.clone(),
                    format!(
                        "container {} of pod {} is in CrashLoopBackOff ({} restarts)",
                        c.name, p.name, c.restarts
                    ),
                );
            }
        }
        if p.phase == "Running" && !p.ready {
            add(
                "PodNotReady",
                Severity::Warning,
                object.clone(),
                format!("pod {} is running but not ready", p.name),
            );
        }
    }
    let workload = format!("{}/{ns}/{}", t.kind, t.deployment);
    if let Some(w) = &now.workload {
        match t.kind {
            WorkloadKind::Deployment | WorkloadKind::StatefulSet | WorkloadKind::DaemonSet => {
                if w.ready < w.desired {
                    add(
                        "DeploymentFailing",
                        Severity::Warning,
                        workload.clone(),
                        format!("{} of {} replicas ready", w.ready, w.desired),
                    );
                }
            }
            WorkloadKind::Job => {
                if w.failed > 0 {
                    add(
                        "JobFailed",
                        Severity::Critical,
                        workload.clone(),
                        format!("{} pod(s) of the job failed", w.failed),
                    );
                }
            }
            WorkloadKind::CronJob => {
                let taken = now.taken.unwrap_or_else(SystemTime::now);
                if !w.suspended
                    && let Some(last) = w.last_schedule
                    && taken.duration_since(last).unwrap_or_default() > CRONJOB_MISSED_AFTER
                {
                    let ago = taken.duration_since(last).unwrap_or_default().as_secs() / 60;
                    add(
                        "CronJobMissed",
                        Severity::Warning,
                        workload.clone(),
                        format!("last scheduled {ago} minutes ago"),
                    );
                }
            }
        }
    }
    // Desired replicas changed since the last collection, from the HPA or the workload.
    let desired = |s: &Snapshot| {
        s.hpa
            .as_ref()
            .map(|h| h.desired)
            .filter(|d| *d > 0)
            .or(s.workload.as_ref().map(|w| w.desired))
    };
    if let (Some(b), Some(n)) = (before.and_then(desired), desired(now))
        && b != n
    {
        let by = match &now.hpa {
            Some(h) => format!(" (HPA {})", h.name),
            None => String::new(),
        };
        add(
            "ScaleEvent",
            Severity::Warning,
            workload.clone(),
            format!("desired replicas changed from {b} to {n}{by}"),
        );
    }
    for n in &now.nodes {
        let object = format!("Node/{}", n.name);
        if n.conditions.get("Ready").is_some_and(|s| s != "True") {
            add(
                "NodeNotReady",
                Severity::Critical,
                object.clone(),
                format!("node {} is not ready", n.name),
            );
        }
        for (cond, kind, severity) in NODE_CONDITIONS {
            if n.conditions.get(cond).is_some_and(|s| s == "True") {
                add(
                    kind,
                    severity,
                    object.clone(),
                    format!("node {} reports {cond}", n.name),
                );
            }
        }
        if n.unschedulable {
            add(
                "Unschedulable",
                Severity::Warning,
                object.clone(),
                format!("node {} is cordoned", n.name),
            );
        }
    }
    out
}

/// The alerts of one target, keyed by type + object.
#[derive(Debug, Default)]
pub struct AlertBook {
    alerts: BTreeMap<(&'static str, String), Alert>,
}

impl AlertBook {
    /// Records the conditions seen at `now` and drops alerts last seen more than `window` ago.
    /// Returns the alerts raised now (new, or back after expiring).
    pub fn observe(
        &mut self,
        conditions: Vec<Condition>,
        now: SystemTime,
        window: Duration,
        namespace: &str,
        deployment: &str,
    ) -> Vec<Alert> {
        let mut raised = Vec::new();
        for c in conditions {
            match self.alerts.get_mut(&(c.kind, c.object.clone())) {
                Some(a) => {
                    a.last_seen = now;
                    a.message = c.message;
                    a.severity = c.severity;
                }
                None => {
                    let alert = Alert {
                        kind: c.kind,
                        severity: c.severity,
                        message: c.message,
                        object: c.object.clone(),
                        namespace: namespace.into(),
                        deployment: deployment.into(),
                        first_seen: now,
                        last_seen: now,
                    };
                    raised.push(alert.clone());
                    self.alerts.insert((c.kind, c.object), alert);
                }
            }
        }
        self.expire(now, window);
        raised
    }

    /// Drops the alerts last seen more than `window` before `now`.
    pub fn expire(&mut self, now: SystemTime, window: Duration) {
        self.alerts
            .retain(|_, a| now.duration_since(a.last_seen).unwrap_or_default() <= window);
    }

    /// The alerts, most severe first.
    pub fn alerts(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = self.alerts.values().cloned().collect();
        v.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.object.cmp(&b.object)));
        v
    }

    /// The most severe alert's severity.
    pub fn worst(&self) -> Option<Severity> {
        self.alerts.values().map(|a| a.severity).max()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.alerts.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.alerts.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::WatchTarget;
    use crate::watcher::snapshot::{ContainerInfo, HpaInfo, NodeInfo, PodInfo, WorkloadInfo};

    fn snap(kind: WorkloadKind) -> Snapshot {
        Snapshot {
            target: WatchTarget {
                deployment: "api".into(),
                kind,
                namespace: "prod".into(),
                ..WatchTarget::default()
            },
            taken: Some(SystemTime::now()),
            workload: Some(WorkloadInfo {
                desired: 2,
                ready: 2,
                ..WorkloadInfo::default()
            }),
            ..Snapshot::default()
        }
    }

    fn pod(
        name: &str,
        restarts: i32,
        waiting: Option<&str>,
        last: Option<&str>,
        ready: bool,
    ) -> PodInfo {
        PodInfo {
            name: name.into(),
            phase: "Running".into(),
            ready,
            node: Some("n1".into()),
            ip: None,
            containers: vec![ContainerInfo {
                name: "app".into(),
                ready,
                restarts,
                waiting: waiting.map(String::from),
                last_termination: last.map(String::from),
            }],
        }
    }

    fn kinds(c: &[Condition]) -> Vec<(&'static str, &str)> {
        let mut v: Vec<_> = c.iter().map(|c| (c.kind, c.object.as_str())).collect();
        v.sort();
        v
    }

    #[test]
    fn each_rule_raises_its_condition() {
        let healthy = snap(WorkloadKind::Deployment);
        assert!(conditions(&healthy, None).is_empty());

        let mut s = snap(WorkloadKind::Deployment);
        s.workload.as_mut().unwrap().ready = 1;
        s.pods = vec![
            pod("a", 6, Some("CrashLoopBackOff"), Some("OOMKilled"), false),
            pod("b", 5, None, None, true),
        ];
        s.nodes = vec![NodeInfo {
            name: "n1".into(),
            conditions: [
                ("Ready", "False"),
                ("DiskPressure", "True"),
                ("PIDPressure", "True"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
            unschedulable: true,
        }];
        assert_eq!(
            kinds(&conditions(&s, None)),
            [
                ("CrashLoopBackOff", "Pod/prod/a"),
                ("DeploymentFailing", "Deployment/prod/api"),
                ("DiskPressure", "Node/n1"),
                ("HighRestartCount", "Pod/prod/a"),
                ("NodeNotReady", "Node/n1"),
                ("OOMKilled", "Pod/prod/a"),
                ("PIDPressure", "Node/n1"),
                ("PodNotReady", "Pod/prod/a"),
                ("Unschedulable", "Node/n1"),
            ]
        );

        let mut job = snap(WorkloadKind::Job);
        job.workload.as_mut().unwrap().failed = 1;
        assert_eq!(
            kinds(&conditions(&job, None)),
            [("JobFailed", "Job/prod/api")]
        );

        let mut cron = snap(WorkloadKind::CronJob);
        cron.workload.as_mut().unwrap().last_schedule =
            Some(SystemTime::now() - Duration::from_secs(3 * 3600));
        assert_eq!(
            kinds(&conditions(&cron, None)),
            [("CronJobMissed", "CronJob/prod/api")]
        );
        cron.workload.as_mut().unwrap().suspended = true;
        assert!(conditions(&cron, None).is_empty());

        let before = snap(WorkloadKind::Deployment);
        let mut after = snap(WorkloadKind::Deployment);
        after.hpa = Some(HpaInfo {
            name: "api".into(),
            min: 2,
            max: 10,
            current: 2,
            desired: 4,
        });
        after.workload.as_mut().unwrap().ready = 4;
        let c = conditions(&after, Some(&before));
        assert_eq!(kinds(&c), [("ScaleEvent", "Deployment/prod/api")]);
        assert!(c[0].message.contains("from 2 to 4"), "{}", c[0].message);
    }

    #[test]
    fn an_alert_is_raised_once_advances_and_expires_after_the_window() {
        let window = Duration::from_secs(60);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cond = || Condition {
            kind: "OOMKilled",
            severity: Severity::Critical,
            object: "Pod/prod/a".into(),
            message: "oom".into(),
        };
        let mut book = AlertBook::default();
        assert_eq!(
            book.observe(vec![cond()], t0, window, "prod", "api").len(),
            1
        );
        // Still there over many windows: raised once, last_seen advancing.
        for i in 1..10u64 {
            let now = t0 + Duration::from_secs(50 * i);
            assert!(
                book.observe(vec![cond()], now, window, "prod", "api")
                    .is_empty()
            );
            assert_eq!(book.alerts()[0].last_seen, now);
            assert_eq!(book.alerts()[0].first_seen, t0);
        }
        let last = t0 + Duration::from_secs(450);
        // Gone: kept for the window after it was last seen, then dropped.
        assert!(
            book.observe(vec![], last + window, window, "prod", "api")
                .is_empty()
        );
        assert_eq!(book.len(), 1);
        book.observe(
            vec![],
            last + window + Duration::from_secs(1),
            window,
            "prod",
            "api",
        );
        assert!(book.is_empty());
        // Back: raised again.
        assert_eq!(
            book.observe(vec![cond()], last + window * 2, window, "prod", "api")
                .len(),
            1
        );
    }
}
