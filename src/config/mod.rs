//! Configuration: the typed config (`types`, whose doc comments are the reference), figment layering
//! (`load`), validation collecting every problem (`validate`), and `config show` (`show`).

mod env_providers;
pub mod example;
mod kinds;
mod load;
mod log_level;
mod secret_files;
mod show;
mod types;
mod validate;
pub mod values;
mod watcher;

use figment::Figment;

pub use kinds::{LogFormat, ProviderKind, Role, TrustedProxies};
pub use load::{
    COMPAT_ENV, FlagValue, LoadError, Loaded, Sources, config_file, config_files, drop_in_dir, load,
};
pub use log_level::log_filter;
pub(crate) use secret_files::{credential_path, credentials_directory, read_credential};
pub use show::render_show;
pub use types::*;
pub use values::Secret;
pub use watcher::{FileTarget, WatchFile, read_watch_file, resolve_watcher};

/// One thing wrong with the configuration: which key, where its value came from, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, empty for whole-file problems.
    pub key: String,
    /// Where the value came from: `default`, `file <path>`, `env <NAME>`, `flag <--flag>`.
    pub origin: String,
    /// Why it is wrong.
    pub message: String,
}

impl Problem {
    /// A problem with a key.
    pub fn new(key: &str, origin: &str, message: &str) -> Self {
        Self {
            key: key.into(),
            origin: origin.into(),
            message: message.into(),
        }
    }

    /// From an error of `figment.extract_inner(section)`. figment appends the section to the end of
    /// the error's path; the key is put back in order here.
    fn from_figment(err: &figment::Error, section: &str) -> Self {
        let mut path = err.path.clone();
        if path.last().is_some_and(|l| l == section) {
            path.pop();
        }
        path.insert(0, section.to_string());
        let key = path.join(".");
        let origin = match &err.metadata {
            Some(md) => describe(md, &path),
            None => "unknown".into(),
        };
        Self {
            key,
            origin,
            message: err.kind.to_string(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.key.is_empty() {
            true => write!(f, "{}: {}", self.origin, self.message),
            false => write!(f, "{}: `{}`: {}", self.origin, self.key, self.message),
        }
    }
}

/// Describes where the value of `key` came from: `default`, `file <path>`, `env <NAME>` or `flag <--x>`.
/// Array elements (`llm.providers.1.name`) take the origin of the layer that added them; a key that
/// no layer set is `default`.
pub fn origin(figment: &Figment, key: &str) -> String {
    origin_of_path(figment, &key.split('.').collect::<Vec<_>>())
}

/// [`origin`] of a key given as its parts, for keys that hold dots themselves (a certificate
/// identity `client.example.com` in `[auth.mtls.roles]`).
pub fn origin_of_path(figment: &Figment, key: &[&str]) -> String {
    // Walk the merged value along the key: a list item (`llm.providers.1.name`) keeps the tag of
    // the layer that added it (a drop-in appending a provider), where the list itself carries the
    // tag of the layer that started it.
    let mut parts = key.iter().copied();
    let Some(first) = parts.next() else {
        return "default".into();
    };
    let Ok(mut value) = figment.find_value(first) else {
        return "default".into();
    };
    let mut found = vec![first.to_string()];
    for part in parts {
        let next = match &value {
            figment::value::Value::Dict(_, d) => d.get(part).cloned(),
            figment::value::Value::Array(_, a) => {
                part.parse::<usize>().ok().and_then(|i| a.get(i).cloned())
            }
            _ => None,
        };
        // A key no layer set (a provider's `timeout` left to its serde default) is a default, not
        // a value of the layer that set its parent.
        let Some(next) = next else {
            return "default".into();
        };
        value = next;
        found.push(part.to_string());
    }
    match figment.get_metadata(value.tag()) {
        Some(md) => describe(md, &found),
        None => "default".into(),
    }
}

fn describe(md: &figment::Metadata, keys: &[String]) -> String {
    let kind = md.name.as_ref();
    match kind {
        "file" => match md.source.as_ref().and_then(|s| s.file_path()) {
            Some(p) => format!("file {}", p.display()),
            None => "file".into(),
        },
        "env" | "flag" => format!(
            "{kind} {}",
            md.interpolate(&figment::Profile::Default, keys)
        ),
        _ => "default".into(),
    }
}

#[cfg(test)]
mod tests;
