//! The Kubernetes watcher's memory and API load against the fake API server of the test support
//! code: `cargo run --example watcher_load -- [TARGETS] [PODS] [SECONDS] [INTERVAL_MS]`
//! (defaults 50 targets of 20 pods, 30 s at steady state, a 2 s interval).
//!
//! Fills the fake API with the targets (10 namespaces, one log line per pod), reads this
//! process's RSS, starts the watcher on every target, waits until each target is collected with
//! all its pods, then counts the API requests made over SECONDS at steady state: list calls
//! (none expected: watches only), watch requests, and log reads per pod per collection (at most
//! one expected). The RSS added is the watcher's stores, snapshots and tasks (the fake server's
//! objects are in the first reading already, and its request log is drained every second). The
//! example runs on the system allocator, not the daemon's mimalloc.

#![allow(clippy::print_stdout, reason = "an example prints its measurements")]

use std::time::{Duration, Instant};

use chatcli::config::{WatchTarget, WatcherConfig};
use chatcli::testing::kube::{FakeKube, deployment, pod};
use chatcli::watcher::Watcher;

/// This process's resident set, in KiB (`VmRSS` of `/proc/self/status`).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (targets, pods, secs, interval_ms) = (arg(1, 50), arg(2, 20), arg(3, 30), arg(4, 2000));
    let kube = FakeKube::start_with(Duration::from_secs(1)).await?;
    let mut list = Vec::new();
    for t in 0..targets {
        let ns = format!("ns{}", t % 10);
        let name = format!("app{t}");
        kube.apply(deployment(&ns, &name, pods as i32, pods as i32));
        for p in 0..pods {
            let pod_name = format!("{name}-{p}");
            kube.apply(pod(&ns, &pod_name, &name, true, 0));
            kube.log(&ns, &pod_name, "app", "INFO started");
        }
        list.push(WatchTarget {
            deployment: name,
            namespace: ns,
            ..WatchTarget::default()
        });
    }
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_kib();

    let watcher = Watcher::new(None);
    watcher.apply(&WatcherConfig {
        interval: Duration::from_millis(interval_ms),
        window: Duration::from_secs(3600),
        kubeconfig: Some(kubeconfig),
        targets: list,
        ..WatcherConfig::default()
    });
    let started = Instant::now();
    let ready = |w: &Watcher| {
        w.status()
            .targets
            .iter()
            .all(|t| t.status == "ok" && t.pods == pods as usize)
    };
    while !ready(&watcher) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "targets not collected after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let collected_in = started.elapsed();
    let collections =
        |w: &Watcher| -> usize { w.status().targets.iter().map(|t| t.snapshots).sum() };
    // Two more rounds, so every reflector has listed and is watching.
    tokio::time::sleep(Duration::from_millis(2 * interval_ms)).await;
    kube.take_requests();
    let c0 = collections(&watcher);
    let (mut lists, mut watches, mut logs) = (0, 0, 0);
    let mut rss_steady = Vec::new();
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Read as it goes, so the fake's request log does not count in the RSS.
        for r in kube.take_requests() {
            match (r.is_watch(), r.is_log()) {
                (true, _) => watches += 1,
                (_, true) => logs += 1,
                _ => lists += 1,
            }
        }
        rss_steady.push(rss_kib());
    }
    let c1 = collections(&watcher);
    let rss_after = rss_kib();
    let third = rss_steady.len() / 3;
    let early = rss_steady.get(third).copied().unwrap_or(rss_after);
    let rounds = (c1 - c0) as f64 / targets as f64;
    println!("targets: {targets} x {pods} pods, interval {interval_ms} ms");
    println!(
        "all targets collected after {:.1} s",
        collected_in.as_secs_f64()
    );
    println!(
        "RSS: {:.1} MiB before the watcher, {:.1} MiB a third into the steady state, {:.1} MiB at \
         its end: +{:.1} MiB",
        rss_before as f64 / 1024.0,
        early as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0
    );
    println!(
        "over {secs} s at steady state: {} collections ({rounds:.1} per target), {lists} list \
         calls, {watches} watch requests, {logs} log reads ({:.2} per pod per collection)",
        c1 - c0,
        logs as f64 / ((c1 - c0).max(1) as f64 * pods as f64)
    );
    watcher.stop();
    Ok(())
}
