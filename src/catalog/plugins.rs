//! Scanning the plugins folder: each executable is read once, its SHA-256 checked against its
//! `.sig`, and the very bytes that were checked are written into the private cache
//! (`<cache>/<sha256>`, a 0700 folder only the server can write), which is what is probed and run;
//! a file replaced in the plugins folder after its check never runs until it is checked in turn.
//! Probing runs `--metadata` (JSON `{name, description, usage, version}`) and `--schema` in the
//! sandbox of [`super::exec`]. Plugins that fail are kept with the reason, and not offered.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Settings;
use super::exec::{self, Ending, Limits};
use super::sig::{self, TrustedKey};

/// Time allowed to each probe (`--metadata`, `--schema`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Output kept from each probe.
pub const PROBE_MAX_OUTPUT: usize = 1024 * 1024;
/// A plugin file changed more recently than this is taken as still being written: it is looked at
/// again on the next scan.
pub const SETTLE: Duration = Duration::from_secs(1);
/// Largest plugin file read.
pub const MAX_PLUGIN_BYTES: u64 = 512 * 1024 * 1024;

/// Operating systems and architectures of per-platform builds (`<name>-<os>-<arch>`), which are
/// offered for download only.
const OSES: &[&str] = &["linux", "darwin", "windows", "freebsd", "openbsd", "netbsd"];
const ARCHES: &[&str] = &[
    "amd64", "arm64", "386", "arm", "riscv64", "ppc64le", "s390x", "x86_64", "aarch64",
];

/// An offered plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plugin {
    /// Name (from `--metadata`).
    pub name: String,
    /// Description.
    pub description: String,
    /// Usage.
    pub usage: String,
    /// Version.
    pub version: String,
    /// The JSON schema `--schema` printed (may be empty).
    pub schema: String,
    /// The file in the plugins folder.
    pub source: PathBuf,
    /// The checked copy that runs.
    pub exec_path: PathBuf,
    /// SHA-256 of the checked bytes, hex.
    pub sha256: String,
    /// The trusted key that signed it; `None` when admitted unsigned (`allow_unsigned`).
    pub signed_by: Option<String>,
}

/// A plugin file that is not offered, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The file.
    pub file: PathBuf,
    /// Why.
    pub reason: String,
}

/// What `--metadata` prints.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Metadata {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Usage.
    #[serde(default)]
    pub usage: String,
    /// Version.
    #[serde(default)]
    pub version: String,
}

/// Probe results by digest, so an unchanged plugin is not probed again.
pub type ProbeCache = HashMap<String, Result<(Metadata, String), String>>;

/// Whether `name` is a per-platform build (`<name>-<os>-<arch>[.exe]`).
pub fn is_platform_build(name: &str) -> bool {
    let name = name.strip_suffix(".exe").unwrap_or(name);
    let mut parts = name.rsplitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(arch), Some(os), Some(base)) => {
            !base.is_empty() && OSES.contains(&os) && ARCHES.contains(&arch)
        }
        _ => false,
    }
}

/// The candidate plugin files of `dir`: executable regular files, not `.sig`, not dot-files, not
/// per-platform builds. Files changed within [`SETTLE`] are returned apart, as still settling.
pub fn candidates(dir: &Path) -> (Vec<PathBuf>, bool) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (Vec::new(), false);
    };
    let now = SystemTime::now();
    let mut settling = false;
    let mut v = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(".sig") || is_platform_build(&name) {
            continue;
        }
        let p = e.path();
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
            continue;
        }
        let recent = m
            .modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age < SETTLE);
        if recent {
            settling = true;
            continue;
        }
        v.push(p);
    }
    v.sort();
    (v, settling)
}

/// A plugin file read and checked.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The bytes that were checked.
    pub bytes: Vec<u8>,
    /// Their SHA-256.
    pub digest: [u8; 32],
    /// The key file that signed them; `None` when admitted unsigned (`allow_unsigned`).
    pub signed_by: Option<String>,
}

/// Reads `path` (at most [`MAX_PLUGIN_BYTES`]) and checks its signature.
pub fn read_checked(
    path: &Path,
    keys: &[TrustedKey],
    allow_unsigned: bool,
) -> Result<Checked, String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    f.take(MAX_PLUGIN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_PLUGIN_BYTES {
        return Err(format!("larger than {MAX_PLUGIN_BYTES} bytes"));
    }
    let digest = sig::digest(&bytes);
    let mut sig_path = path.as_os_str().to_owned();
    sig_path.push(".sig");
    let checked = match std::fs::read_to_string(PathBuf::from(sig_path)) {
        Ok(text) => sig::verify(&digest, &text, keys),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("unsigned (no .sig file)".into()),
        Err(e) => Err(format!("cannot read its .sig: {e}")),
    };
    let signed_by = match checked {
        Ok(key) => Some(key),
        Err(why) if allow_unsigned => {
            tracing::warn!(plugin = %path.display(), "plugin admitted without a valid signature (allow_unsigned): {why}");
            None
        }
        Err(why) => return Err(why),
    };
    Ok(Checked {
        bytes,
        digest,
        signed_by,
    })
}

/// Writes `bytes` as `<cache>/<hex>` (mode 0500) unless it is there already; its path.
pub fn cache_copy(cache: &Path, hex: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;
    let target = cache.join(hex);
    if target.is_file() {
        return Ok(target);
    }
    let mut tmp = tempfile::NamedTempFile::new_in(cache)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o500))?;
    tmp.persist(&target).map_err(|e| e.error)?;
    Ok(target)
}

/// The environment of a plugin: the allowed variables of the server's own environment.
pub fn plugin_env(allow: &[String]) -> Vec<(String, String)> {
    allow
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect()
}

async fn probe(
    exec_path: &Path,
    settings: &Settings,
    cancel: &CancellationToken,
) -> Result<(Metadata, String), String> {
    let limits = Limits {
        timeout: PROBE_TIMEOUT,
        max_output: PROBE_MAX_OUTPUT,
        env: plugin_env(&settings.env_allow),
    };
    let run = |flag: &'static str| {
        let limits = limits.clone();
        async move {
            let out = exec::run(exec_path, &[flag.to_string()], &limits, cancel)
                .await
                .map_err(|e| format!("{flag}: cannot run: {e}"))?;
            match out.ending {
                Ending::Exited(s) if s.success() => {}
                Ending::Exited(s) => return Err(format!("{flag}: exited with {s}")),
                Ending::TimedOut => {
                    return Err(format!("{flag}: no answer in {}s", PROBE_TIMEOUT.as_secs()));
                }
                Ending::Cancelled => return Err(format!("{flag}: cancelled")),
            }
            if out.stdout.truncated() {
                return Err(format!(
                    "{flag}: more than {PROBE_MAX_OUTPUT} bytes of output"
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout.bytes)
                .trim()
                .to_string())
        }
    };
    let meta_text = run("--metadata").await?;
    let meta: Metadata = serde_json::from_str(&meta_text)
        .map_err(|e| format!("--metadata did not print a JSON object: {e}"))?;
    // A plugin without a schema may fail `--schema`; only JSON is kept.
    let schema = match run("--schema").await {
        Ok(s) if !s.is_empty() && serde_json::from_str::<serde_json::Value>(&s).is_ok() => s,
        _ => String::new(),
    };
    Ok((meta, schema))
}

/// A valid plugin name: 1 to 256 bytes, no `/`, no control characters, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

/// Scans the plugins folder.
pub async fn scan(
    settings: &Settings,
    cache: &Path,
    probes: &mut ProbeCache,
    cancel: &CancellationToken,
) -> (Vec<Plugin>, Vec<Refused>, bool) {
    let (dir, keys_dir, allow) = (
        settings.plugins_dir.clone(),
        settings.trusted_keys_dir.clone(),
        settings.allow_unsigned,
    );
    let cache_dir = cache.to_path_buf();
    // Reading, hashing and copying are blocking file work.
    let checked = tokio::task::spawn_blocking(move || {
        let keys = sig::load_keys(&keys_dir);
        let (files, settling) = candidates(&dir);
        let results: Vec<_> = files
            .into_iter()
            .map(|f| {
                let r = read_checked(&f, &keys, allow).and_then(|c| {
                    let hex = hex(&c.digest);
                    cache_copy(&cache_dir, &hex, &c.bytes)
                        .map(|p| (p, hex, c.signed_by))
                        .map_err(|e| format!("cannot copy into the plugin cache: {e}"))
                });
                (f, r)
            })
            .collect();
        (results, settling)
    })
    .await;
    let Ok((checked, settling)) = checked else {
        return (Vec::new(), Vec::new(), true);
    };
    // Probe results and cached copies of contents no longer in the folder are dropped (a run
    // already started keeps its open file).
    let current: std::collections::HashSet<String> = checked
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|(_, hex, _)| hex.clone()))
        .collect();
    probes.retain(|k, _| current.contains(k));
    if let Ok(entries) = std::fs::read_dir(cache) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && !current.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut plugins: Vec<Plugin> = Vec::new();
    let mut refused = Vec::new();
    for (file, r) in checked {
        let (exec_path, sha256, signed_by) = match r {
            Ok(v) => v,
            Err(reason) => {
                refused.push(Refused { file, reason });
                continue;
            }
        };
        let probed = match probes.get(&sha256) {
            Some(p) => p.clone(),
            None => {
                let p = probe(&exec_path, settings, cancel).await;
                if !cancel.is_cancelled() {
                    probes.insert(sha256.clone(), p.clone());
                }
                p
            }
        };
        let (meta, schema) = match probed {
            Ok(v) => v,
            Err(reason) => {
                refused.push(Refused { file, reason });
                continue;
            }
        };
        let name = match meta.name.trim() {
            "" => file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            n => n.to_string(),
        };
        if !valid_name(&name) || name.starts_with('@') {
            refused.push(Refused {
                file,
                reason: format!("`{name}` is not a valid plugin name"),
            });
            continue;
        }
        if plugins.iter().any(|p| p.name == name) {
            refused.push(Refused {
                file,
                reason: format!("another plugin file is already named `{name}`"),
            });
            continue;
        }
        plugins.push(Plugin {
            name,
            description: meta.description,
            usage: meta.usage,
            version: meta.version,
            schema,
            source: file,
            exec_path,
            sha256,
            signed_by,
        });
    }
    for r in &refused {
        tracing::warn!(plugin = %r.file.display(), "plugin not offered: {}", r.reason);
    }
    plugins.sort_by(|a, b| a.name.cmp(&b.name));
    (plugins, refused, settling)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Go-style name of this machine's OS and architecture, as clients send them.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    (std::env::consts::OS, arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_builds_are_recognised() {
        assert!(is_platform_build("tool-linux-amd64"));
        assert!(is_platform_build("my-tool-darwin-arm64"));
        assert!(is_platform_build("tool-windows-amd64.exe"));
        assert!(!is_platform_build("tool"));
        assert!(!is_platform_build("linux-amd64"));
        assert!(!is_platform_build("tool-linux-sparc"));
    }

    #[test]
    fn names() {
        assert!(valid_name("k8s_tool-1.2"));
        assert!(valid_name("_admin"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name(&"x".repeat(257)));
    }
}
