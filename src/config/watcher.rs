//! The watcher's targets: `[[watcher.targets]]` in the TOML, the multi-target YAML that
//! `watcher.config_file` names (`--watch-config`), or the single target of `watcher.deployment`.
//! After [`resolve`] the config's `watcher.targets` is the whole list, whichever way it was given:
//! the YAML wins over the TOML list, which wins over the single target.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::Problem;
use super::types::{WatchTarget, WatcherConfig, WorkloadKind};
use super::values::duration_str;

/// The multi-target YAML (`--watch-config`), with the field names of the existing ChatCLI.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WatchFile {
    /// Collection interval.
    #[serde(default = "default_interval", with = "duration_str")]
    pub interval: Duration,
    /// Observation window: how long an alert outlives its condition.
    #[serde(default = "default_window", with = "duration_str")]
    pub window: Duration,
    /// Log lines per pod.
    #[serde(default = "default_max_log_lines")]
    pub max_log_lines: u32,
    /// Budget of the prompt context.
    #[serde(default = "default_max_context_chars")]
    pub max_context_chars: usize,
    /// The targets, at least one.
    pub targets: serde_saphyr::Spanned<Vec<serde_saphyr::Spanned<FileTarget>>>,
}

/// One target of the YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileTarget {
    /// The workload's name.
    pub deployment: String,
    /// Its kind.
    #[serde(default)]
    pub kind: WorkloadKind,
    /// Its namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Prometheus port.
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// Prometheus path.
    #[serde(default)]
    pub metrics_path: Option<String>,
    /// Metric name globs.
    #[serde(default)]
    pub metrics_filter: Vec<String>,
}

fn default_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_window() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_max_log_lines() -> u32 {
    100
}
fn default_max_context_chars() -> usize {
    32_000
}
fn default_namespace() -> String {
    "default".into()
}

/// Reads and checks the multi-target YAML at `path`; every problem names the file and line.
pub fn read_watch_file(path: &Path) -> Result<WatchFile, Vec<Problem>> {
    let origin = |line: Option<u64>| match line {
        Some(l) => format!("file {}, line {l}", path.display()),
        None => format!("file {}", path.display()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem::new(
            "watcher.config_file",
            &origin(None),
            &format!("cannot read the watcher targets file: {e}"),
        )]
    })?;
    let file: WatchFile = serde_saphyr::from_str(&text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        let message = e.without_snippet().to_string();
        // The location is in the origin already.
        let message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        vec![Problem::new("", &origin(line), &message)]
    })?;
    let mut problems = Vec::new();
    if file.targets.value.is_empty() {
        problems.push(Problem::new(
            "targets",
            &origin(Some(file.targets.referenced.line())),
            "the target list is empty; name at least one workload",
        ));
    }
    for (name, d) in [("interval", file.interval), ("window", file.window)] {
        if d.is_zero() {
            problems.push(Problem::new(name, &origin(None), "must be greater than 0"));
        }
    }
    let mut seen = std::collections::HashMap::new();
    for t in &file.targets.value {
        let line = t.referenced.line();
        problems.extend(
            check_target(&to_target(&t.value))
                .into_iter()
                .map(|(key, why)| {
                    Problem::new(&format!("targets.{key}"), &origin(Some(line)), &why)
                }),
        );
        if let Some(first) = seen.insert(to_target(&t.value).key(), line) {
            problems.push(Problem::new(
                "targets",
                &origin(Some(line)),
                &format!(
                    "{} is named twice (first on line {first})",
                    to_target(&t.value).key()
                ),
            ));
        }
    }
    match problems.is_empty() {
        true => Ok(file),
        false => Err(problems),
    }
}

fn to_target(t: &FileTarget) -> WatchTarget {
    WatchTarget {
        deployment: t.deployment.clone(),
        kind: t.kind,
        namespace: t.namespace.clone(),
        metrics_port: t.metrics_port,
        metrics_path: t.metrics_path.clone(),
        metrics_filter: t.metrics_filter.clone(),
    }
}

/// What is wrong with one target: (field, reason).
fn check_target(t: &WatchTarget) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if t.deployment.trim().is_empty() {
        out.push(("deployment", "the workload name is empty".to_string()));
    }
    if t.namespace.trim().is_empty() {
        out.push(("namespace", "the namespace is empty".to_string()));
    }
    if let Some(path) = &t.metrics_path
        && !path.starts_with('/')
    {
        out.push(("metrics_path", format!("`{path}` does not start with /")));
    }
    if t.metrics_port == Some(0) {
        out.push(("metrics_port", "must be greater than 0".to_string()));
    }
    out
}

/// The loader's resolution of the targets, for a config built in code (tests, embedders):
/// makes `w.targets` the whole list, reading the YAML `w.config_file` names, and returns the
/// problems found.
pub fn resolve_watcher(w: &mut WatcherConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    resolve(w, &|_: &str| "config".to_string(), &mut problems);
    problems
}

/// Makes `watcher.targets` the whole list (see the module docs) and checks it. `origin` tells
/// where a `watcher.*` key came from.
pub(super) fn resolve(
    w: &mut WatcherConfig,
    origin: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) {
    if let Some(path) = w.config_file.clone() {
        match read_watch_file(&path) {
            Ok(file) => {
                w.interval = file.interval;
                w.window = file.window;
                w.max_log_lines = file.max_log_lines;
                w.max_context_chars = file.max_context_chars;
                w.targets = file
                    .targets
                    .value
                    .iter()
                    .map(|t| to_target(&t.value))
                    .collect();
            }
            Err(p) => problems.extend(p),
        }
        return;
    }
    let mut bad = |key: &str, why: String| problems.push(Problem::new(key, &origin(key), &why));
    if w.targets.is_empty()
        && let Some(name) = &w.deployment
        && !name.trim().is_empty()
    {
        w.targets.push(WatchTarget {
            deployment: name.clone(),
            namespace: w.namespace.clone(),
            ..WatchTarget::default()
        });
    }
    if w.interval.is_zero() {
        bad("watcher.interval", "must be greater than 0".into());
    }
    if w.window.is_zero() {
        bad("watcher.window", "must be greater than 0".into());
    }
    let mut seen = std::collections::HashSet::new();
    for (i, t) in w.targets.iter().enumerate() {
        for (key, why) in check_target(t) {
            bad(&format!("watcher.targets.{i}.{key}"), why);
        }
        if !seen.insert(t.key()) {
            bad(
                &format!("watcher.targets.{i}"),
                format!("{} is named twice", t.key()),
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("targets.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn problems(text: &str) -> Vec<String> {
        let (_dir, path) = write(text);
        read_watch_file(&path)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_full_file_is_read_with_defaults_filled_in() {
        let (_dir, path) = write(
            "interval: 1m30s\nmaxContextChars: 900\ntargets:\n  - deployment: api\n    namespace: prod\n    metricsPort: 9090\n    metricsFilter: [\"http_*\"]\n  - deployment: db\n    kind: StatefulSet\n",
        );
        let f = read_watch_file(&path).unwrap();
        assert_eq!(f.interval, Duration::from_secs(90));
        assert_eq!(f.window, Duration::from_secs(7200));
        assert_eq!(f.max_log_lines, 100);
        assert_eq!(f.max_context_chars, 900);
        let keys: Vec<String> = f
            .targets
            .value
            .iter()
            .map(|t| to_target(&t.value).key())
            .collect();
        assert_eq!(keys, ["Deployment/prod/api", "StatefulSet/default/db"]);
        assert_eq!(f.targets.value[0].value.metrics_filter, ["http_*"]);
    }

    #[test]
    fn problems_name_the_file_and_the_line() {
        let p = problems("targets:\n  - deployment: api\n    colour: blue\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("targets.yaml, line 3"), "{p:?}");
        assert!(p[0].contains("unknown field `colour`"), "{p:?}");

        let p = problems("targets:\n  - deployment: api\n  - deployment: job\n    kind: Pod\n");
        assert!(
            p[0].contains("line 4") && p[0].contains("unknown variant `Pod`"),
            "{p:?}"
        );

        let p = problems("interval: soon\ntargets:\n  - deployment: api\n");
        assert!(p[0].contains("line 1") && p[0].contains("soon"), "{p:?}");

        let p = problems("interval: 30s\ntargets: []\n");
        assert!(
            p[0].contains("line 2") && p[0].contains("target list is empty"),
            "{p:?}"
        );

        let p = problems("interval: 30s\n");
        assert!(p[0].contains("missing field `targets`"), "{p:?}");

        let p = problems("targets:\n  - deployment: api\n  - deployment: api\n");
        assert!(
            p[0].contains("line 3") && p[0].contains("first on line 2"),
            "{p:?}"
        );
    }

    #[test]
    fn the_single_target_becomes_the_list_and_the_yaml_wins() {
        let mut w = WatcherConfig {
            deployment: Some("api".into()),
            namespace: "prod".into(),
            ..WatcherConfig::default()
        };
        let mut problems = Vec::new();
        resolve(&mut w, &|k: &str| format!("default {k}"), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(w.targets.len(), 1);
        assert_eq!(w.targets[0].key(), "Deployment/prod/api");

        let (_dir, path) =
            write("window: 10m\ntargets:\n  - deployment: web\n    kind: DaemonSet\n");
        let mut w = WatcherConfig {
            deployment: Some("api".into()),
            config_file: Some(path),
            ..WatcherConfig::default()
        };
        resolve(&mut w, &|k: &str| k.to_string(), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(w.window, Duration::from_secs(600));
        let keys: Vec<String> = w.targets.iter().map(WatchTarget::key).collect();
        assert_eq!(keys, ["DaemonSet/default/web"]);
    }

    fn load_toml(toml: &str, env: &[(&str, &str)]) -> Result<crate::config::Config, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chatcli.toml");
        std::fs::write(&path, toml).unwrap();
        let sources = crate::config::Sources {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            config_flag: Some(path),
            default_config_path: "/nonexistent/chatcli.toml".into(),
            flags: Vec::new(),
        };
        crate::config::load(&sources)
            .map(|l| l.config)
            .map_err(|e| e.problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn targets_come_from_the_toml_the_environment_or_the_yaml() {
        let c = load_toml(
            "[watcher]\ninterval = \"10s\"\n[[watcher.targets]]\ndeployment = \"api\"\nnamespace = \"prod\"\n[[watcher.targets]]\ndeployment = \"nightly\"\nkind = \"CronJob\"\n",
            &[],
        )
        .unwrap();
        let keys: Vec<String> = c.watcher.targets.iter().map(WatchTarget::key).collect();
        assert_eq!(keys, ["Deployment/prod/api", "CronJob/default/nightly"]);
        assert_eq!(c.watcher.interval, Duration::from_secs(10));

        let c = load_toml(
            "",
            &[
                ("CHATCLI_WATCH_DEPLOYMENT", "web"),
                ("CHATCLI_WATCH_NAMESPACE", "shop"),
                ("CHATCLI_WATCH_INTERVAL", "1m"),
            ],
        )
        .unwrap();
        let keys: Vec<String> = c.watcher.targets.iter().map(WatchTarget::key).collect();
        assert_eq!(keys, ["Deployment/shop/web"]);
        assert_eq!(c.watcher.interval, Duration::from_secs(60));

        let (_dir, yaml) = write("targets:\n  - deployment: a\n    namespace: x\n");
        let c = load_toml(
            "",
            &[
                ("CHATCLI_WATCH_CONFIG", yaml.to_str().unwrap()),
                ("CHATCLI_WATCH_DEPLOYMENT", "web"),
            ],
        )
        .unwrap();
        let keys: Vec<String> = c.watcher.targets.iter().map(WatchTarget::key).collect();
        assert_eq!(keys, ["Deployment/x/a"]);
    }

    #[test]
    fn bad_toml_targets_are_problems_naming_the_key() {
        let p = load_toml(
            "[[watcher.targets]]\ndeployment = \"api\"\ncolour = \"red\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.contains("watcher.targets.0.colour") && p.contains("unknown key")),
            "{p:?}"
        );
        let p = load_toml(
            "[[watcher.targets]]\ndeployment = \"api\"\nkind = \"Pod\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.contains("watcher.targets") && p.contains("Pod")),
            "{p:?}"
        );
        let p = load_toml("[watcher]\nwindow = \"forever\"\n", &[]).unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.contains("watcher.window") && p.contains("forever")),
            "{p:?}"
        );
        let p = load_toml("[[watcher.targets]]\ndeployment = \"\"\n", &[]).unwrap_err();
        assert!(
            p.iter().any(|p| p.contains("watcher.targets.0.deployment")),
            "{p:?}"
        );
        let (_dir, yaml) = write("targets: []\n");
        let p = load_toml(&format!("[watcher]\nconfig_file = {:?}\n", yaml), &[]).unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.contains("targets.yaml, line 1") && p.contains("empty")),
            "{p:?}"
        );
    }
}
