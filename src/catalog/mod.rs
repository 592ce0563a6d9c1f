//! The catalog offered to clients: plugins (signature-checked executables run in a sandbox, see
//! [`plugins`] and [`exec`]), agents and skills (markdown with YAML front matter, see [`docs`]),
//! and the built-in `@coder` plugin entry.
//!
//! The catalog is an in-memory snapshot of its folders. [`Catalog::snapshot`] rebuilds it when
//! the settings changed (a reload) or the folders did (a cheap listing of names, sizes and
//! modification times is compared on each use), so a plugin, agent or skill added, replaced or
//! removed is seen without a restart; [`Catalog::rescan`] forces a rebuild (for a file watcher,
//! over the folders of [`Settings::watch_dirs`]). A plugin file modified within the last second is
//! taken as still being written and is looked at on a later use. Probe results are kept by SHA-256,
//! so an unchanged plugin is probed once.

pub mod docs;
pub mod exec;
pub mod plugins;
pub mod sig;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;

use crate::auth::Role;
use crate::config::Config;
pub use docs::{Agent, Skill};
pub use plugins::{Plugin, Refused};

/// The built-in plugin every server offers (the existing ChatCLI registers it in server mode). It
/// runs in the client's coder mode, not on the server: it is listed and counted, never executed
/// or downloaded here.
pub const BUILTIN_CODER: &str = "@coder";
const BUILTIN_CODER_DESCRIPTION: &str =
    "Built-in coding assistant (read, write, search and run in the client's workspace)";
const BUILTIN_CODER_USAGE: &str = "@coder <task>";

/// Largest number of arguments of one plugin call.
pub const MAX_ARGS: usize = 100;
/// Largest argument, in bytes.
pub const MAX_ARG_BYTES: usize = 10 * 1024;
/// Largest plugin name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// What the catalog needs from the config (`[catalog]`, folders resolved against the data dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Plugin executables.
    pub plugins_dir: PathBuf,
    /// Agent files.
    pub agents_dir: PathBuf,
    /// Skills.
    pub skills_dir: PathBuf,
    /// Public keys of plugin signers.
    pub trusted_keys_dir: PathBuf,
    /// Admit plugins without a valid signature.
    pub allow_unsigned: bool,
    /// Longest plugin run.
    pub exec_timeout: Duration,
    /// Output kept per stream of a plugin run.
    pub max_output_bytes: usize,
    /// Environment variables passed to plugins.
    pub env_allow: Vec<String>,
}

impl Settings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Self {
        let c = &config.catalog;
        Self {
            plugins_dir: config.plugins_dir(),
            agents_dir: config.agents_dir(),
            skills_dir: config.skills_dir(),
            trusted_keys_dir: config.trusted_keys_dir(),
            allow_unsigned: c.allow_unsigned,
            exec_timeout: c.exec_timeout,
            max_output_bytes: c.max_output_bytes,
            env_allow: c.env_allow.clone(),
        }
    }

    /// The folders whose changes call for a [`Catalog::rescan`]: plugins, trusted keys, agents
    /// and skills (skills are folders of files: watch it recursively).
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        vec![
            self.plugins_dir.clone(),
            self.trusted_keys_dir.clone(),
            self.agents_dir.clone(),
            self.skills_dir.clone(),
        ]
    }
}

/// Why a catalog call failed. Each kind has a stable code once it is a `gateway::Error`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CatalogError {
    /// Bad request values.
    #[error("validation: {0}")]
    Invalid(String),
    /// The caller's role may not do this.
    #[error("readonly principals cannot {0}")]
    Forbidden(&'static str),
    /// No such plugin (or not one the caller may see).
    #[error("plugin `{0}` not found")]
    PluginNotFound(String),
    /// No build of the plugin for the platform asked for.
    #[error("plugin `{name}` has no build for {os}/{arch}")]
    NoPlatformBuild {
        /// Plugin.
        name: String,
        /// OS asked for.
        os: String,
        /// Architecture asked for.
        arch: String,
    },
    /// No such agent.
    #[error("agent `{0}` not found")]
    AgentNotFound(String),
    /// No such skill.
    #[error("skill `{0}` not found")]
    SkillNotFound(String),
    /// The built-in plugin runs in the client.
    #[error("{0} is built in: it runs in the client, not on the server")]
    Builtin(String),
    /// The plugin could not be started or read.
    #[error("plugin `{name}`: {reason}")]
    Failed {
        /// Plugin.
        name: String,
        /// Why.
        reason: String,
    },
    /// The server is shutting down; the run was stopped.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// A plugin as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSummary {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Usage.
    pub usage: String,
    /// Version.
    pub version: String,
    /// JSON schema text (may be empty).
    pub schema: String,
}

/// What one plugin run gave: its output, and the failure text (empty on success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Standard output (capped, with a truncation line when cut).
    pub output: String,
    /// Empty when the plugin exited 0; else how it failed, and its standard error.
    pub error: String,
    /// Standard output or standard error was cut at the cap.
    pub truncated: bool,
}

/// A plugin file to send.
#[derive(Debug, Clone)]
pub struct Download {
    /// The file's base name.
    pub filename: String,
    /// Its bytes (signature-checked, as for running).
    pub bytes: Vec<u8>,
}

/// One state of the folders.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Offered plugins, by name.
    pub plugins: Vec<Plugin>,
    /// Plugin files not offered, with the reason.
    pub refused: Vec<Refused>,
    /// Agents, by name.
    pub agents: Vec<Agent>,
    /// Skills, by name.
    pub skills: Vec<Skill>,
    settings: Option<Settings>,
    fingerprint: Vec<(PathBuf, u64, Option<SystemTime>)>,
    settling: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct Catalog {
    current: ArcSwapOption<Snapshot>,
    probes: tokio::sync::Mutex<plugins::ProbeCache>,
    cache: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Catalog {
    /// An empty catalog with its private plugin cache (a fresh 0700 temporary folder); the first
    /// use scans. Warns when unsigned plugins are admitted.
    pub fn new(settings: &Settings) -> std::io::Result<Self> {
        if settings.allow_unsigned {
            tracing::warn!(
                "catalog.allow_unsigned (CHATCLI_ALLOW_UNSIGNED_PLUGINS) is on: plugins without a valid signature are offered and run"
            );
        }
        let cache = tempfile::Builder::new()
            .prefix("chatcli-plugin-cache-")
            .tempdir()?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self {
            current: ArcSwapOption::empty(),
            probes: Default::default(),
            cache,
            shutdown: CancellationToken::new(),
        })
    }

    /// The private folder checked plugin copies run from.
    pub fn cache_dir(&self) -> &Path {
        self.cache.path()
    }

    /// Stops every plugin run (their process groups are killed) and every probe; later runs are
    /// refused.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The current snapshot for `settings`, rebuilt first when the settings or the folders changed.
    pub async fn snapshot(&self, settings: &Settings) -> Arc<Snapshot> {
        if let Some(s) = self.current.load_full()
            && !s.settling
            && s.settings.as_ref() == Some(settings)
            && s.fingerprint == fingerprint(settings).await
        {
            return s;
        }
        self.rebuild(settings, false).await
    }

    /// Rebuilds the snapshot now.
    pub async fn rescan(&self, settings: &Settings) -> Arc<Snapshot> {
        self.rebuild(settings, true).await
    }

    async fn rebuild(&self, settings: &Settings, force: bool) -> Arc<Snapshot> {
        let mut probes = self.probes.lock().await;
        let fp = fingerprint(settings).await;
        // Another call may have rebuilt it while this one waited.
        if !force
            && let Some(s) = self.current.load_full()
            && !s.settling
            && s.settings.as_ref() == Some(settings)
            && s.fingerprint == fp
        {
            return s;
        }
        let (plugins, refused, settling) =
            plugins::scan(settings, self.cache.path(), &mut probes, &self.shutdown).await;
        let (agents_dir, skills_dir) = (settings.agents_dir.clone(), settings.skills_dir.clone());
        let (agents, skills) = tokio::task::spawn_blocking(move || {
            (
                docs::load_agents(&agents_dir),
                docs::load_skills(&skills_dir),
            )
        })
        .await
        .unwrap_or_default();
        let snap = Arc::new(Snapshot {
            plugins,
            refused,
            agents,
            skills,
            settings: Some(settings.clone()),
            fingerprint: fp,
            settling,
        });
        tracing::debug!(
            plugins = snap.plugins.len(),
            refused = snap.refused.len(),
            agents = snap.agents.len(),
            skills = snap.skills.len(),
            "catalog scanned"
        );
        self.current.store(Some(snap.clone()));
        snap
    }

    /// The plugins `role` may see: none for readonly; `_`-prefixed ones for admins only; the
    /// built-in `@coder` for the others.
    pub async fn list_plugins(&self, settings: &Settings, role: Role) -> Vec<PluginSummary> {
        if role == Role::ReadOnly {
            return Vec::new();
        }
        let snap = self.snapshot(settings).await;
        let mut out = vec![PluginSummary {
            name: BUILTIN_CODER.into(),
            description: BUILTIN_CODER_DESCRIPTION.into(),
            usage: BUILTIN_CODER_USAGE.into(),
            version: crate::VERSION.into(),
            schema: String::new(),
        }];
        out.extend(
            snap.plugins
                .iter()
                .filter(|p| visible(&p.name, role))
                .map(|p| PluginSummary {
                    name: p.name.clone(),
                    description: p.description.clone(),
                    usage: p.usage.clone(),
                    version: p.version.clone(),
                    schema: p.schema.clone(),
                }),
        );
        out
    }

    /// Counts as `GetServerInfo` reports them: offered plugins plus `@coder`, agents, skills.
    pub async fn counts(&self, settings: &Settings) -> CatalogCounts {
        let snap = self.snapshot(settings).await;
        let n = |x: usize| i32::try_from(x).unwrap_or(i32::MAX);
        CatalogCounts {
            plugins: n(snap.plugins.len() + 1),
            agents: n(snap.agents.len()),
            skills: n(snap.skills.len()),
        }
    }

    async fn find_plugin(
        &self,
        settings: &Settings,
        role: Role,
        name: &str,
    ) -> Result<Plugin, CatalogError> {
        if name == BUILTIN_CODER {
            return Err(CatalogError::Builtin(name.into()));
        }
        let snap = self.snapshot(settings).await;
        snap.plugins
            .iter()
            .find(|p| p.name == name && visible(&p.name, role))
            .cloned()
            .ok_or_else(|| CatalogError::PluginNotFound(name.into()))
    }

    /// Runs plugin `name` with `args` (an argv, no shell) in the sandbox: the `[catalog]` timeout
    /// and output cap, a cleared environment plus `env_allow`, a fresh working folder. A plugin
    /// that fails, or runs out of time, still gives an [`ExecOutcome`] (with `error` set).
    pub async fn execute(
        &self,
        settings: &Settings,
        role: Role,
        name: &str,
        args: &[String],
    ) -> Result<ExecOutcome, CatalogError> {
        let plugin = self.prepare_exec(settings, role, name, args).await?;
        self.run_plugin(settings, &plugin, args, None).await
    }

    /// The checks of [`Catalog::execute`] before anything runs: the request's bounds, the role,
    /// and the plugin (which `role` must be able to see).
    pub async fn prepare_exec(
        &self,
        settings: &Settings,
        role: Role,
        name: &str,
        args: &[String],
    ) -> Result<Plugin, CatalogError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(CatalogError::Invalid(format!(
                "plugin_name must be 1 to {MAX_NAME_BYTES} bytes"
            )));
        }
        if args.len() > MAX_ARGS || args.iter().any(|a| a.len() > MAX_ARG_BYTES) {
            return Err(CatalogError::Invalid(format!(
                "args must be at most {MAX_ARGS} arguments of at most {} KiB each",
                MAX_ARG_BYTES / 1024
            )));
        }
        if args.iter().any(|a| a.contains('\0')) {
            return Err(CatalogError::Invalid("args must not contain NUL".into()));
        }
        if role == Role::ReadOnly {
            return Err(CatalogError::Forbidden("run plugins"));
        }
        if self.shutdown.is_cancelled() {
            return Err(CatalogError::ShuttingDown);
        }
        self.find_plugin(settings, role, name).await
    }

    /// Runs a plugin [`Catalog::prepare_exec`] returned, sending its kept output to `sink` as it
    /// comes when one is given.
    pub async fn run_plugin(
        &self,
        settings: &Settings,
        plugin: &Plugin,
        args: &[String],
        sink: Option<exec::Sink>,
    ) -> Result<ExecOutcome, CatalogError> {
        let name = plugin.name.as_str();
        let limits = exec::Limits {
            timeout: settings.exec_timeout,
            max_output: settings.max_output_bytes,
            env: plugins::plugin_env(&settings.env_allow),
        };
        let out = exec::run_with(&plugin.exec_path, args, &limits, &self.shutdown, sink)
            .await
            .map_err(|e| CatalogError::Failed {
                name: name.into(),
                reason: format!("cannot run: {e}"),
            })?;
        let stderr = out.stderr.text();
        let with_stderr = |head: String| match stderr.trim().is_empty() {
            true => head,
            false => format!("{head}: {}", stderr.trim_end()),
        };
        let error = match out.ending {
            exec::Ending::Exited(s) if s.success() => String::new(),
            exec::Ending::Exited(s) => with_stderr(format!("plugin {name} failed ({s})")),
            exec::Ending::TimedOut => with_stderr(format!(
                "plugin {name} timed out after {}s and was stopped",
                settings.exec_timeout.as_secs_f64()
            )),
            exec::Ending::Cancelled => return Err(CatalogError::ShuttingDown),
        };
        Ok(ExecOutcome {
            output: out.stdout.text(),
            error,
            truncated: out.stdout.truncated() || out.stderr.truncated(),
        })
    }

    /// The file of plugin `name` for download: the checked copy for this machine's platform (or
    /// when neither `os` nor `arch` is given), else the `<file>-<os>-<arch>` build of the plugins
    /// folder, signature-checked like the plugin itself. `_`-prefixed plugins only for admins.
    pub async fn download(
        &self,
        settings: &Settings,
        role: Role,
        name: &str,
        os: &str,
        arch: &str,
    ) -> Result<Download, CatalogError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(CatalogError::Invalid(format!(
                "plugin_name must be 1 to {MAX_NAME_BYTES} bytes"
            )));
        }
        let plugin = match self.find_plugin(settings, role, name).await {
            Err(CatalogError::Builtin(n)) => return Err(CatalogError::PluginNotFound(n)),
            other => other?,
        };
        let file_name = plugin
            .source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.to_string());
        let (host_os, host_arch) = plugins::host_platform();
        let norm_arch = |a: &str| match a {
            "x86_64" => "amd64".to_string(),
            "aarch64" => "arm64".to_string(),
            other => other.to_string(),
        };
        let os = match os.trim() {
            "" => host_os.to_string(),
            o => o.to_ascii_lowercase(),
        };
        let arch = match arch.trim() {
            "" => host_arch.to_string(),
            a => norm_arch(&a.to_ascii_lowercase()),
        };
        let fail = |reason: String| CatalogError::Failed {
            name: name.into(),
            reason,
        };
        if os == host_os && arch == host_arch {
            let bytes = tokio::fs::read(&plugin.exec_path)
                .await
                .map_err(|e| fail(format!("cannot read the checked copy: {e}")))?;
            return Ok(Download {
                filename: file_name,
                bytes,
            });
        }
        let dir = settings.plugins_dir.clone();
        let (keys_dir, allow) = (settings.trusted_keys_dir.clone(), settings.allow_unsigned);
        let base = format!("{file_name}-{os}-{arch}");
        let found = tokio::task::spawn_blocking(move || {
            let keys = sig::load_keys(&keys_dir);
            [base.clone(), format!("{base}.exe")]
                .into_iter()
                .map(|f| (dir.join(&f), f))
                .find(|(p, _)| p.is_file())
                .map(|(p, f)| plugins::read_checked(&p, &keys, allow).map(|c| (f, c.bytes)))
        })
        .await
        .map_err(|e| fail(e.to_string()))?;
        match found {
            None => Err(CatalogError::NoPlatformBuild {
                name: name.into(),
                os,
                arch,
            }),
            Some(Err(reason)) => Err(fail(reason)),
            Some(Ok((filename, bytes))) => Ok(Download { filename, bytes }),
        }
    }

    /// The agents.
    pub async fn agents(&self, settings: &Settings) -> Vec<Agent> {
        self.snapshot(settings).await.agents.clone()
    }

    /// One agent.
    pub async fn agent(&self, settings: &Settings, name: &str) -> Result<Agent, CatalogError> {
        if name.trim().is_empty() {
            return Err(CatalogError::Invalid("name is required".into()));
        }
        self.snapshot(settings)
            .await
            .agents
            .iter()
            .find(|a| a.name == name)
            .cloned()
            .ok_or_else(|| CatalogError::AgentNotFound(name.into()))
    }

    /// The skills.
    pub async fn skills(&self, settings: &Settings) -> Vec<Skill> {
        self.snapshot(settings).await.skills.clone()
    }

    /// One skill.
    pub async fn skill(&self, settings: &Settings, name: &str) -> Result<Skill, CatalogError> {
        if name.trim().is_empty() {
            return Err(CatalogError::Invalid("name is required".into()));
        }
        self.snapshot(settings)
            .await
            .skills
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| CatalogError::SkillNotFound(name.into()))
    }
}

/// Whether `role` sees plugin `name`: `_`-prefixed plugins are for admins.
fn visible(name: &str, role: Role) -> bool {
    role == Role::Admin || !name.starts_with('_')
}

/// Names, sizes and modification times of what the folders hold (two levels under skills, for
/// folder skills and their scripts).
async fn fingerprint(settings: &Settings) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let dirs = [
        (settings.plugins_dir.clone(), 1),
        (settings.trusted_keys_dir.clone(), 1),
        (settings.agents_dir.clone(), 1),
        (settings.skills_dir.clone(), 3),
    ];
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (d, depth) in dirs {
            walk(&d, depth, &mut out);
        }
        out
    })
    .await
    .unwrap_or_default()
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        out.push((p.clone(), m.len(), m.modified().ok()));
        if m.is_dir() && depth > 1 {
            walk(&p, depth - 1, out);
        }
    }
}

/// Counts of what the catalog offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatalogCounts {
    /// Offered plugins, the built-in `@coder` included.
    pub plugins: i32,
    /// Agents.
    pub agents: i32,
    /// Skills.
    pub skills: i32,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use ed25519_dalek::{Signer, SigningKey};
    use std::os::unix::fs::PermissionsExt;

    struct Fixture {
        dir: tempfile::TempDir,
        settings: Settings,
        key: SigningKey,
    }

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let settings = Settings {
                plugins_dir: dir.path().join("plugins"),
                agents_dir: dir.path().join("agents"),
                skills_dir: dir.path().join("skills"),
                trusted_keys_dir: dir.path().join("keys"),
                allow_unsigned: false,
                exec_timeout: Duration::from_secs(30),
                max_output_bytes: 1024 * 1024,
                env_allow: vec!["PATH".into()],
            };
            for d in settings.watch_dirs() {
                std::fs::create_dir_all(d).unwrap();
            }
            let key = SigningKey::from_bytes(&[42u8; 32]);
            std::fs::write(
                settings.trusted_keys_dir.join("test.pub"),
                b64(&key.verifying_key().to_bytes()),
            )
            .unwrap();
            Self { dir, settings, key }
        }

        fn path(&self, file: &str) -> PathBuf {
            self.settings.plugins_dir.join(file)
        }

        /// Writes a plugin script answering `--metadata` with `name`, running `body` otherwise,
        /// dated in the past (so it is not taken as still being written).
        fn plugin(&self, file: &str, name: &str, body: &str) -> PathBuf {
            let p = self.path(file);
            let text = format!(
                "#!/bin/sh\nif [ \"$1\" = --metadata ]; then echo '{{\"name\":\"{name}\",\"description\":\"d-{name}\",\"usage\":\"u\",\"version\":\"1.0\"}}'; exit 0; fi\nif [ \"$1\" = --schema ]; then echo '{{\"type\":\"object\"}}'; exit 0; fi\n{body}\n"
            );
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            age(&p);
            p
        }

        fn sign_with(&self, p: &Path, key: &SigningKey) {
            let digest = sig::digest(&std::fs::read(p).unwrap());
            let mut s = p.as_os_str().to_owned();
            s.push(".sig");
            std::fs::write(PathBuf::from(s), b64(&key.sign(&digest).to_bytes())).unwrap();
        }

        fn sign(&self, p: &Path) {
            self.sign_with(p, &self.key)
        }
    }

    fn age(p: &Path) {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
    }

    fn names(v: &[PluginSummary]) -> Vec<&str> {
        v.iter().map(|p| p.name.as_str()).collect()
    }

    fn refused_reason<'a>(snap: &'a Snapshot, file: &str) -> &'a str {
        snap.refused
            .iter()
            .find(|r| r.file.file_name().is_some_and(|n| n == file))
            .map(|r| r.reason.as_str())
            .unwrap_or_else(|| panic!("{file} not refused: {:?}", snap.refused))
    }

    #[tokio::test]
    async fn signatures_decide_what_is_offered() {
        let f = Fixture::new();
        let good = f.plugin("good", "good", "echo hello \"$1\"");
        f.sign(&good);
        let tampered = f.plugin("tampered", "tampered", "echo a");
        f.sign(&tampered);
        std::fs::write(
            &tampered,
            std::fs::read_to_string(&tampered).unwrap() + "echo evil\n",
        )
        .unwrap();
        age(&tampered);
        let wrong = f.plugin("wrongkey", "wrongkey", "echo b");
        f.sign_with(&wrong, &SigningKey::from_bytes(&[1u8; 32]));
        f.plugin("unsigned", "unsigned", "echo c");
        let admin = f.plugin("admin", "_admin", "echo secret");
        f.sign(&admin);
        std::fs::write(f.path("notes.txt"), "not executable").unwrap();

        let cat = Catalog::new(&f.settings).unwrap();
        let snap = cat.snapshot(&f.settings).await;
        assert_eq!(
            snap.plugins
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["_admin", "good"]
        );
        assert!(refused_reason(&snap, "tampered").contains("does not match"));
        assert!(refused_reason(&snap, "wrongkey").contains("does not match"));
        assert!(refused_reason(&snap, "unsigned").contains("unsigned"));
        let good_p = &snap.plugins[1];
        assert_eq!(good_p.signed_by.as_deref(), Some("test.pub"));
        assert_eq!(good_p.schema, "{\"type\":\"object\"}");
        assert!(good_p.exec_path.starts_with(cat.cache_dir()));
        let mode = std::fs::metadata(cat.cache_dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);

        assert_eq!(
            names(&cat.list_plugins(&f.settings, Role::User).await),
            ["@coder", "good"]
        );
        assert_eq!(
            names(&cat.list_plugins(&f.settings, Role::Admin).await),
            ["@coder", "_admin", "good"]
        );
        assert!(
            cat.list_plugins(&f.settings, Role::ReadOnly)
                .await
                .is_empty()
        );
        assert_eq!(cat.counts(&f.settings).await.plugins, 3);

        let out = cat
            .execute(&f.settings, Role::User, "good", &["x y".into()])
            .await
            .unwrap();
        assert_eq!(
            out,
            ExecOutcome {
                output: "hello x y\n".into(),
                error: String::new(),
                truncated: false,
            }
        );
        assert_eq!(
            cat.execute(&f.settings, Role::ReadOnly, "good", &[]).await,
            Err(CatalogError::Forbidden("run plugins"))
        );
        assert_eq!(
            cat.execute(&f.settings, Role::User, "_admin", &[]).await,
            Err(CatalogError::PluginNotFound("_admin".into()))
        );
        assert_eq!(
            cat.execute(&f.settings, Role::Admin, "_admin", &[])
                .await
                .unwrap()
                .output,
            "secret\n"
        );
        assert_eq!(
            cat.execute(&f.settings, Role::User, "unsigned", &[]).await,
            Err(CatalogError::PluginNotFound("unsigned".into()))
        );
        assert!(matches!(
            cat.execute(&f.settings, Role::User, "good", &vec!["a".into(); 101])
                .await,
            Err(CatalogError::Invalid(_))
        ));
        assert!(matches!(
            cat.execute(
                &f.settings,
                Role::User,
                "good",
                &["a".repeat(10 * 1024 + 1)]
            )
            .await,
            Err(CatalogError::Invalid(_))
        ));
        assert!(matches!(
            cat.execute(&f.settings, Role::User, "@coder", &[])
                .await
                .unwrap_err(),
            CatalogError::Builtin(_)
        ));

        // allow_unsigned admits the unsigned, tampered and wrongly signed ones.
        let mut loose = f.settings.clone();
        loose.allow_unsigned = true;
        let snap = cat.snapshot(&loose).await;
        assert_eq!(snap.plugins.len(), 5, "{:?}", snap.refused);
        assert!(
            snap.plugins
                .iter()
                .any(|p| p.name == "unsigned" && p.signed_by.is_none())
        );
    }

    #[tokio::test]
    async fn a_file_swapped_after_its_check_never_runs() {
        let f = Fixture::new();
        let marker = f.dir.path().join("swapped-ran");
        let evil = format!("touch {}", marker.display());
        // The same length as `evil`, so the swap keeps the file's size.
        let body = format!("echo original #{}", "x".repeat(evil.len() - 15));
        let p = f.plugin("swap", "swap", &body);
        f.sign(&p);
        let cat = Catalog::new(&f.settings).unwrap();
        let checked_copy = cat.snapshot(&f.settings).await.plugins[0].exec_path.clone();
        // Same size and modification time: nothing tells the folder changed.
        let text = std::fs::read_to_string(&p).unwrap();
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        let swapped = text.replace(&body, &evil);
        assert_eq!(swapped.len(), text.len());
        std::fs::write(&p, &swapped).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let out = cat
            .execute(&f.settings, Role::User, "swap", &[])
            .await
            .unwrap();
        assert_eq!(out.output, "original\n");
        let snap = cat.rescan(&f.settings).await;
        assert!(snap.plugins.is_empty());
        assert!(refused_reason(&snap, "swap").contains("does not match"));
        assert!(
            !checked_copy.exists(),
            "the cache keeps a copy no file has any more"
        );
        assert_eq!(
            cat.execute(&f.settings, Role::User, "swap", &[]).await,
            Err(CatalogError::PluginNotFound("swap".into()))
        );
        assert!(!marker.exists(), "the swapped plugin ran");
    }

    #[tokio::test]
    async fn hanging_and_flooding_plugins_are_bounded() {
        let f = Fixture::new();
        let pidfile = f.dir.path().join("pid");
        let hang = f.plugin(
            "hang",
            "hang",
            &format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
        );
        f.sign(&hang);
        let flood = f.plugin("flood", "flood", "head -c 52428800 /dev/zero");
        f.sign(&flood);
        let slow_probe = f.path("slowprobe");
        std::fs::write(&slow_probe, "#!/bin/sh\nsleep 30\n").unwrap();
        std::fs::set_permissions(&slow_probe, std::fs::Permissions::from_mode(0o755)).unwrap();
        age(&slow_probe);
        f.sign(&slow_probe);
        let mut settings = f.settings.clone();
        settings.exec_timeout = Duration::from_secs(3);
        let cat = Catalog::new(&settings).unwrap();
        let snap = cat.snapshot(&settings).await;
        assert!(refused_reason(&snap, "slowprobe").contains("no answer in 5s"));

        let out = cat
            .execute(&settings, Role::User, "hang", &[])
            .await
            .unwrap();
        assert!(out.error.contains("timed out"), "{out:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')));
        assert!(!alive, "the plugin's child {pid} survived the timeout");

        settings.exec_timeout = Duration::from_secs(60);
        let out = cat
            .execute(&settings, Role::User, "flood", &[])
            .await
            .unwrap();
        assert!(out.output.len() < 1024 * 1024 + 200);
        assert!(
            out.output
                .ends_with("52428800 bytes written, the first 1048576 kept]")
        );
        assert_eq!(out.error, "");
        assert!(out.truncated);
    }

    #[tokio::test]
    async fn downloads_pick_the_platform_build() {
        let f = Fixture::new();
        let p = f.plugin("tool", "tool", "echo t");
        f.sign(&p);
        std::fs::write(f.path("tool-darwin-arm64"), b"mach-o bytes").unwrap();
        f.sign(&f.path("tool-darwin-arm64"));
        std::fs::write(f.path("tool-windows-amd64.exe"), b"pe bytes").unwrap();
        let cat = Catalog::new(&f.settings).unwrap();
        let d = cat
            .download(&f.settings, Role::User, "tool", "", "")
            .await
            .unwrap();
        assert_eq!(d.filename, "tool");
        assert_eq!(d.bytes, std::fs::read(&p).unwrap());
        let d = cat
            .download(&f.settings, Role::User, "tool", "darwin", "arm64")
            .await
            .unwrap();
        assert_eq!(
            (d.filename.as_str(), d.bytes.as_slice()),
            ("tool-darwin-arm64", &b"mach-o bytes"[..])
        );
        // Present but unsigned.
        assert!(matches!(
            cat.download(&f.settings, Role::User, "tool", "windows", "amd64")
                .await
                .unwrap_err(),
            CatalogError::Failed { .. }
        ));
        assert!(matches!(
            cat.download(&f.settings, Role::User, "tool", "freebsd", "amd64")
                .await
                .unwrap_err(),
            CatalogError::NoPlatformBuild { .. }
        ));
        assert!(matches!(
            cat.download(&f.settings, Role::User, "nope", "", "")
                .await
                .unwrap_err(),
            CatalogError::PluginNotFound(_)
        ));
        // Platform builds are not plugins of their own.
        assert_eq!(cat.snapshot(&f.settings).await.plugins.len(), 1);
    }

    #[tokio::test]
    async fn folders_changes_are_seen_and_counts_match_the_lists() {
        let f = Fixture::new();
        let cat = Catalog::new(&f.settings).unwrap();
        assert_eq!(
            cat.counts(&f.settings).await,
            CatalogCounts {
                plugins: 1,
                agents: 0,
                skills: 0
            }
        );
        std::fs::write(f.settings.agents_dir.join("a.md"), "---\nname: a\n---\nA\n").unwrap();
        std::fs::write(f.settings.agents_dir.join("bad.md"), "---\nname: [\n---\n").unwrap();
        std::fs::write(f.settings.skills_dir.join("s.md"), "S\n").unwrap();
        let p = f.plugin("late", "late", "echo late");
        f.sign(&p);
        let c = cat.counts(&f.settings).await;
        assert_eq!(
            c,
            CatalogCounts {
                plugins: 2,
                agents: 1,
                skills: 1
            }
        );
        assert_eq!(cat.agents(&f.settings).await.len() as i32, c.agents);
        assert_eq!(cat.skills(&f.settings).await.len() as i32, c.skills);
        assert_eq!(cat.agent(&f.settings, "a").await.unwrap().content, "A\n");
        assert!(matches!(
            cat.agent(&f.settings, "bad").await.unwrap_err(),
            CatalogError::AgentNotFound(_)
        ));
        assert_eq!(cat.skill(&f.settings, "s").await.unwrap().content, "S\n");
        std::fs::remove_file(&p).unwrap();
        assert_eq!(cat.counts(&f.settings).await.plugins, 1);
        // A plugin still being written (just modified) is not probed yet.
        let fresh = f.plugin("fresh", "fresh", "echo f");
        f.sign(&fresh);
        std::fs::File::options()
            .write(true)
            .open(&fresh)
            .unwrap()
            .set_modified(SystemTime::now())
            .unwrap();
        assert_eq!(cat.counts(&f.settings).await.plugins, 1);
        age(&fresh);
        assert_eq!(cat.counts(&f.settings).await.plugins, 2);
    }

    #[tokio::test]
    async fn shutdown_stops_running_plugins() {
        let f = Fixture::new();
        let p = f.plugin("hang", "hang", "sleep 300");
        f.sign(&p);
        let cat = Arc::new(Catalog::new(&f.settings).unwrap());
        cat.snapshot(&f.settings).await;
        let c2 = cat.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            c2.shutdown();
        });
        assert_eq!(
            cat.execute(&f.settings, Role::User, "hang", &[]).await,
            Err(CatalogError::ShuttingDown)
        );
    }
}
