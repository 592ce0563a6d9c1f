//! The gRPC codec of the watcher's RPCs: `GetWatcherStatus` and `GetAlerts` read the watcher
//! hanging off the server state and encode what it says; readers of every role may call them.

use crate::proto::{GetAlertsRequest, GetAlertsResponse, GetWatcherStatusResponse, WatcherAlert};
use crate::watcher::{AlertFilter, Watcher};

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// `GetWatcherStatus`, as the existing ChatCLI fills it (a single target is a one-target multi
/// config there): `deployment` = `<N> targets`, `namespace` = `multi`; the summary is the status
/// line, followed by the targets that cannot be read. All empty without targets.
pub(super) fn status(watcher: &Watcher) -> GetWatcherStatusResponse {
    let s = watcher.status();
    if !s.active {
        return GetWatcherStatusResponse::default();
    }
    let troubled: Vec<String> = s
        .targets
        .iter()
        .filter(|t| t.status != "ok")
        .map(|t| format!("{}: {}", t.key, t.status))
        .collect();
    let status_summary = match troubled.is_empty() {
        true => s.status_line.clone(),
        false => format!("{}; {}", s.status_line, troubled.join("; ")),
    };
    GetWatcherStatusResponse {
        active: true,
        deployment: format!("{} targets", s.targets.len()),
        namespace: "multi".to_string(),
        status_summary,
        alert_count: count(s.targets.iter().map(|t| t.alerts).sum()),
        snapshot_count: count(s.targets.iter().map(|t| t.snapshots).sum()),
        pod_count: count(s.targets.iter().map(|t| t.pods).sum()),
    }
}

/// `GetAlerts`, filtered by the target's namespace and workload name when given.
pub(super) fn alerts(watcher: &Watcher, req: &GetAlertsRequest) -> GetAlertsResponse {
    let filter = AlertFilter {
        namespace: req.namespace.clone(),
        deployment: req.deployment.clone(),
    };
    let alerts = watcher
        .alerts(&filter)
        .into_iter()
        .map(|a| WatcherAlert {
            r#type: a.kind.to_string(),
            severity: a.severity.as_str().to_string(),
            message: a.message,
            object: a.object,
            namespace: a.namespace,
            deployment: a.deployment,
            timestamp_unix: a
                .last_seen
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        })
        .collect();
    GetAlertsResponse { alerts }
}
