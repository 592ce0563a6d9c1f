//! The gRPC codec of the watcher's RPCs: `GetWatcherStatus` and `GetAlerts` read the watcher
//! hanging off the server state and encode what it says; readers of every role may call them.

use crate::proto::{GetAlertsRequest, GetAlertsResponse, GetWatcherStatusResponse, WatcherAlert};
use crate::watcher::{AlertFilter, Watcher};

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// `GetWatcherStatus`: one target's name and namespace, or the lists of them (comma-separated)
/// when there are several; the summary is the status line, followed by the targets that cannot
/// be read.
pub(super) fn status(watcher: &Watcher) -> GetWatcherStatusResponse {
    let s = watcher.status();
    let mut names: Vec<&str> = s.targets.iter().map(|t| t.name.as_str()).collect();
    names.dedup();
    let mut namespaces: Vec<&str> = s.targets.iter().map(|t| t.namespace.as_str()).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let troubled: Vec<String> = s
        .targets
        .iter()
        .filter(|t| t.status != "ok")
        .map(|t| format!("{}: {}", t.key, t.status))
        .collect();
    let status_summary = match (s.active, troubled.is_empty()) {
        (false, _) => String::new(),
        (true, true) => s.status_line.clone(),
        (true, false) => format!("{}; {}", s.status_line, troubled.join("; ")),
    };
    GetWatcherStatusResponse {
        active: s.active,
        deployment: names.join(","),
        namespace: namespaces.join(","),
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
