//! The optional Prometheus scrape of a target's pods (`metricsPort`, `metricsPath`,
//! `metricsFilter`): every running pod with an IP is read, each sample line kept whole (labels
//! included) when its metric name matches one of the globs (all when there is none), at most
//! [`MAX_SAMPLES`] per pod.

use std::time::Duration;

use crate::config::WatchTarget;

/// Samples kept per pod and scrape.
pub const MAX_SAMPLES: usize = 50;

/// Whether `name` matches the glob `pattern` (`*` any run, `?` one character).
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Classic two-pointer match with backtracking to the last `*`.
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The sample lines of Prometheus text `body` whose metric name matches `filter`.
pub fn samples(body: &str, filter: &[String]) -> Vec<String> {
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            filter.is_empty() || filter.iter().any(|g| glob(g, name))
        })
        .take(MAX_SAMPLES)
        .map(String::from)
        .collect()
}

/// Scrapes every (pod, IP) of `pods` for `target`; a pod that does not answer is skipped.
pub async fn scrape(
    client: &reqwest::Client,
    target: &WatchTarget,
    pods: &[(String, String)],
) -> Vec<(String, String)> {
    let Some(port) = target.metrics_port else {
        return Vec::new();
    };
    let path = target.metrics_path.as_deref().unwrap_or("/metrics");
    let mut out = Vec::new();
    for (pod, ip) in pods {
        let host = match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => ip.clone(),
        };
        let url = format!("http://{host}:{port}{path}");
        let body = match client
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            Ok(r) => {
                tracing::debug!(pod = %pod, "metrics scrape of {url}: HTTP {}", r.status());
                continue;
            }
            Err(e) => {
                tracing::debug!(pod = %pod, "metrics scrape of {url}: {e}");
                continue;
            }
        };
        out.extend(
            samples(&body, &target.metrics_filter)
                .into_iter()
                .map(|l| (pod.clone(), l)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_samples() {
        assert!(glob("http_*", "http_requests_total"));
        assert!(glob("*_total", "http_requests_total"));
        assert!(glob("h?tp_*_total", "http_x_total"));
        assert!(!glob("http_*", "grpc_requests_total"));
        assert!(glob("*", ""));
        let body = "# HELP http_requests_total Requests.\n# TYPE http_requests_total counter\nhttp_requests_total{code=\"200\",path=\"/\"} 7\nprocess_cpu_seconds_total 1.5\nhttp_latency_seconds_sum 3\n";
        assert_eq!(
            samples(body, &["http_*".into()]),
            [
                "http_requests_total{code=\"200\",path=\"/\"} 7",
                "http_latency_seconds_sum 3"
            ]
        );
        assert_eq!(samples(body, &[]).len(), 3);
    }
}
