//! Layering: built-in defaults < TOML file < `CHATCLI_*` nested variables (`__` between keys) <
//! ChatCLI-compatible variable names < command-line flags, merged by figment so every value keeps its
//! origin. Unknown TOML keys are errors; unknown `CHATCLI_*` variables are warnings. The environment is
//! passed in as a map (never read from the process here), so tests need no `set_var`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;

use super::types::{Config, Defaults, ProviderConfig};
use super::values::Secret;
use super::{Problem, validate};
use super::{credential_path, read_credential};

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The process environment (or a test's stand-in).
    pub env: HashMap<String, String>,
    /// `--config`, which wins over `CHATCLI_CONFIG`.
    pub config_flag: Option<PathBuf>,
    /// Read when neither `--config` nor `CHATCLI_CONFIG` is given and the file exists.
    pub default_config_path: PathBuf,
    /// Values of the command-line flags that were given.
    pub flags: Vec<FlagValue>,
}

impl Sources {
    /// The sources of a real process: its environment and `/etc/chatcli/chatcli.toml`.
    pub fn from_process(config_flag: Option<PathBuf>, flags: Vec<FlagValue>) -> Self {
        Self {
            env: std::env::vars().collect(),
            config_flag,
            default_config_path: PathBuf::from("/etc/chatcli/chatcli.toml"),
            flags,
        }
    }

    /// `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`) of these sources, when set and not
    /// empty: where relative `*_file` settings are looked up.
    pub fn credentials_dir(&self) -> Option<PathBuf> {
        credentials_dir(&self.env)
    }
}

/// One command-line flag that was given: the config key it sets, its value and its spelling.
#[derive(Debug, Clone)]
pub struct FlagValue {
    /// Dotted config key, e.g. `server.port`.
    pub key: &'static str,
    /// The value.
    pub value: Value,
    /// The flag as typed, e.g. `--port`.
    pub flag: &'static str,
}

/// A loaded, validated configuration with everything needed to explain it.
#[derive(Debug)]
pub struct Loaded {
    /// The typed configuration, secrets from files already read.
    pub config: Config,
    /// The merged layers, for `config show` (origins).
    pub figment: Figment,
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
    /// Every file read, in merge order: the config file, then its `conf.d/*.toml` drop-ins.
    pub files: Vec<PathBuf>,
    /// Non-fatal findings (unknown `CHATCLI_*` variables, settings without effect yet).
    pub warnings: Vec<String>,
}

impl Loaded {
    /// The files the config was built from, in merge order, for the log (`a.toml, conf.d/b.toml`),
    /// or `no file (defaults, environment and flags)`.
    pub fn sources_line(&self) -> String {
        match self.files.is_empty() {
            true => "no file (defaults, environment and flags)".into(),
            false => self
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Every problem found, and the warnings collected on the way.
#[derive(Debug)]
pub struct LoadError {
    /// The problems, each with its key, origin and reason.
    pub problems: Vec<Problem>,
    /// Warnings found before the problems.
    pub warnings: Vec<String>,
}

/// ChatCLI-compatible variable names and the keys they set, lowest priority first (so `LOG_LEVEL`
/// loses to `CHATCLI_LOG_LEVEL`).
pub const COMPAT_ENV: &[(&str, &str)] = &[
    ("LOG_LEVEL", "log.level"),
    ("LOG_FILE", "log.file"),
    ("LOG_MAX_SIZE", "log.max_size_mb"),
    ("CHATCLI_LOG_LEVEL", "log.level"),
    ("CHATCLI_LOG_FORMAT", "log.format"),
    ("CHATCLI_LOG_FILE", "log.file"),
    ("CHATCLI_LOG_MAX_SIZE_MB", "log.max_size_mb"),
    ("CHATCLI_LOG_MAX_BACKUPS", "log.max_backups"),
    ("CHATCLI_LOG_MAX_AGE_DAYS", "log.max_age_days"),
    ("CHATCLI_LOG_COMPRESS", "log.compress"),
    ("CHATCLI_SERVER_PORT", "server.port"),
    ("CHATCLI_BIND_ADDRESS", "server.bind_address"),
    ("CHATCLI_SHUTDOWN_GRACE", "server.shutdown_grace"),
    ("CHATCLI_MAX_RECV_MSG_SIZE", "server.max_recv_msg_size"),
    ("CHATCLI_MAX_SEND_MSG_SIZE", "server.max_send_msg_size"),
    (
        "CHATCLI_MAX_CONCURRENT_STREAMS",
        "server.max_concurrent_streams",
    ),
    ("CHATCLI_ALLOW_NO_AUTH", "server.allow_no_auth"),
    ("CHATCLI_SERVER_TLS_CERT", "server.tls.cert_file"),
    ("CHATCLI_SERVER_TLS_KEY", "server.tls.key_file"),
    ("CHATCLI_TLS_CLIENT_CA", "server.tls.client_ca_file"),
    ("CHATCLI_METRICS_PORT", "metrics.port"),
    ("CHATCLI_SERVER_TOKEN", "auth.token"),
    ("CHATCLI_SERVER_TOKEN_FILE", "auth.token_file"),
    ("CHATCLI_JWT_SECRET", "auth.jwt.secret"),
    ("CHATCLI_JWT_SECRET_FILE", "auth.jwt.secret_file"),
    ("CHATCLI_JWT_PUBLIC_KEY_FILE", "auth.jwt.public_key_file"),
    ("CHATCLI_JWT_JWKS_FILE", "auth.jwt.jwks_file"),
    ("CHATCLI_JWT_ISSUER", "auth.jwt.issuer"),
    ("CHATCLI_JWT_AUDIENCE", "auth.jwt.audience"),
    ("CHATCLI_RATE_LIMIT_RPS", "limits.rate_limit_rps"),
    ("CHATCLI_RATE_LIMIT_BURST", "limits.rate_limit_burst"),
    ("CHATCLI_AUDIT_LOG_PATH", "audit.path"),
    ("LLM_PROVIDER", "llm.default"),
    ("CHATCLI_FALLBACK_PROVIDERS", "llm.fallback"),
    ("CHATCLI_FALLBACK_MAX_RETRIES", "llm.fallback_max_retries"),
    (
        "CHATCLI_FALLBACK_COOLDOWN_BASE",
        "llm.fallback_cooldown_base",
    ),
    ("CHATCLI_FALLBACK_COOLDOWN_MAX", "llm.fallback_cooldown_max"),
    ("CHATCLI_ALLOW_HTTP_PROVIDERS", "llm.allow_http_providers"),
    ("CHATCLI_WATCH_CONFIG", "watcher.config_file"),
    ("CHATCLI_WATCH_DEPLOYMENT", "watcher.deployment"),
    ("CHATCLI_WATCH_NAMESPACE", "watcher.namespace"),
    ("CHATCLI_WATCH_INTERVAL", "watcher.interval"),
    ("CHATCLI_WATCH_WINDOW", "watcher.window"),
    ("CHATCLI_WATCH_MAX_LOG_LINES", "watcher.max_log_lines"),
    ("CHATCLI_KUBECONFIG", "watcher.kubeconfig"),
    ("CHATCLI_MCP_CONFIG", "catalog.mcp_config"),
    ("CHATCLI_ALLOW_UNSIGNED_PLUGINS", "catalog.allow_unsigned"),
    ("CHATCLI_DATA_DIR", "state.data_dir"),
    ("CHATCLI_HUB_ENABLED", "hub.enabled"),
    ("CHATCLI_HUB_DB", "hub.db"),
    ("CHATCLI_HUB_TAIL_BUFFER", "hub.tail_buffer"),
];

/// `CHATCLI_*` names that are read elsewhere (the client, the switch for reflection, features still
/// to come) and so are not "unknown".
const OTHER_KNOWN_ENV: &[&str] = &[
    "CHATCLI_CONFIG",
    "CHATCLI_GRPC_REFLECTION",
    "CHATCLI_REMOTE_ADDR",
    "CHATCLI_REMOTE_TOKEN",
    "CHATCLI_CLIENT_API_KEY",
    "CHATCLI_TLS_CLIENT_CERT",
    "CHATCLI_TLS_CLIENT_KEY",
    "CHATCLI_ALLOW_INSECURE",
    "CHATCLI_AUTH_DIR",
    "CHATCLI_OPENAI_CLIENT_ID",
    "CHATCLI_GATEWAY_IN_SERVER",
    "CHATCLI_DEBUG",
    "CHATCLI_MCP_ENABLED",
    "CHATCLI_HEALTHCHECK_ADDR",
    "CHATCLI_HEALTHCHECK_CLIENT_CERT",
    "CHATCLI_HEALTHCHECK_CLIENT_KEY",
    "CHATCLI_DEBUG_OAUTH_TOKEN_URL",
];

/// Keys whose compatible variable ignores values ≤ 0 (the existing ChatCLI does).
const POSITIVE_ONLY: &[&str] = &["server.max_recv_msg_size", "server.max_send_msg_size"];

/// A figment provider holding one layer, with a per-key origin for `config show`.
struct Layer {
    kind: &'static str,
    source: Option<Source>,
    dict: Dict,
    origins: BTreeMap<String, String>,
}

impl Layer {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            source: None,
            dict: Dict::new(),
            origins: BTreeMap::new(),
        }
    }

    fn set(&mut self, key: &str, value: Value, origin: String) {
        insert_path(&mut self.dict, key, value);
        self.origins.insert(key.to_string(), origin);
    }
}

fn insert_path(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let origins = self.origins.clone();
        let md = Metadata::named(self.kind).interpolater(move |_: &Profile, keys: &[&str]| {
            let key = keys.join(".");
            origins.get(&key).cloned().unwrap_or(key)
        });
        match &self.source {
            Some(s) => md.source(s.clone()),
            None => md,
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// The shape of the config: every key with its default (options as null), used to tell known keys
/// from unknown ones and how to read an environment value.
struct Schema {
    root: serde_json::Value,
    provider: serde_json::Value,
    /// One `[limits.roles.<role>]` table, with values so that its leaves read as numbers.
    role_limits: serde_json::Value,
    /// One `[[watcher.targets]]` item.
    watch_target: serde_json::Value,
}

enum Leaf {
    Text,
    Number,
    Bool,
}

/// Tables whose keys the user chooses (a certificate identity, a role, a provider name, a header
/// name): any key is accepted there, and [`Schema::free_map_value`] says what each value holds.
const FREE_MAPS: [&str; 3] = ["auth.mtls.roles", "limits.roles", "llm.fallback_models"];
/// The same inside each `[[llm.providers]]` item.
const PROVIDER_FREE_MAPS: [&str; 1] = ["headers"];

impl Schema {
    fn new() -> Self {
        let role_limits = crate::config::RoleLimits {
            rate_limit_rps: Some(1.0),
            rate_limit_burst: Some(1),
        };
        Self {
            root: serde_json::to_value(Config::default()).unwrap_or_default(),
            provider: serde_json::to_value(ProviderConfig::default()).unwrap_or_default(),
            role_limits: serde_json::to_value(role_limits).unwrap_or_default(),
            watch_target: serde_json::to_value(super::WatchTarget::default()).unwrap_or_default(),
        }
    }

    /// For a free map at `path` (`limits.roles`, or `headers` inside a provider), the shape of one
    /// of its values: `Some(None)` for plain text, `Some(Some(table))` for a table. `None` when
    /// `path` is not a free map.
    fn free_map_value(&self, path: &str) -> Option<Option<&serde_json::Value>> {
        let in_provider = path
            .strip_prefix("llm.providers.")
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(index, key)| {
                index.parse::<usize>().is_ok() && PROVIDER_FREE_MAPS.contains(&key)
            });
        match path {
            "limits.roles" => Some(Some(&self.role_limits)),
            _ if FREE_MAPS.contains(&path) || in_provider => Some(None),
            _ => None,
        }
    }

    /// The leaf type of a dotted key, or `None` if the key does not exist.
    fn leaf(&self, key: &str) -> Option<Leaf> {
        let mut node = &self.root;
        let mut walked = String::new();
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            if let Some(value) = self.free_map_value(&walked) {
                // `part` is a name the user chose; what follows is inside its value.
                match (value, parts.peek()) {
                    (None, None) => return Some(Leaf::Text),
                    (Some(table), Some(_)) => node = table,
                    _ => return None,
                }
                walked = format!("{walked}.{part}");
                continue;
            }
            node = match node {
                serde_json::Value::Object(m) => m.get(part)?,
                _ => return None,
            };
            walked = match walked.is_empty() {
                true => part.to_string(),
                false => format!("{walked}.{part}"),
            };
            if (key.starts_with("llm.providers") && part == "providers"
                || key.starts_with("watcher.targets") && part == "targets")
                && parts.peek().is_some()
            {
                return None;
            }
        }
        match node {
            serde_json::Value::Number(_) => Some(Leaf::Number),
            serde_json::Value::Bool(_) => Some(Leaf::Bool),
            serde_json::Value::Object(_) => None,
            _ => Some(Leaf::Text),
        }
    }

    /// Removes the keys of `table` that the schema does not have, returning them.
    fn strip_unknown(&self, table: &mut toml::Table) -> Vec<String> {
        let mut unknown = Vec::new();
        self.strip(&self.root, table, "", &mut unknown);
        unknown
    }

    fn strip(
        &self,
        schema: &serde_json::Value,
        table: &mut toml::Table,
        prefix: &str,
        unknown: &mut Vec<String>,
    ) {
        if let Some(value) = self.free_map_value(prefix) {
            // Any key is allowed; a table value is checked against its own shape.
            if let Some(shape) = value {
                for (k, v) in table.iter_mut() {
                    if let toml::Value::Table(t) = v {
                        self.strip(shape, t, &format!("{prefix}.{k}"), unknown);
                    }
                }
            }
            return;
        }
        let keys: Vec<String> = table.keys().cloned().collect();
        for k in keys {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            let Some(sub) = schema.get(&k) else {
                table.remove(&k);
                unknown.push(path);
                continue;
            };
            match (sub, table.get_mut(&k)) {
                (serde_json::Value::Object(_), Some(toml::Value::Table(t))) => {
                    self.strip(sub, t, &path, unknown)
                }
                (serde_json::Value::Array(_), Some(toml::Value::Array(items)))
                    if path == "llm.providers" =>
                {
                    for (i, item) in items.iter_mut().enumerate() {
                        if let toml::Value::Table(t) = item {
                            self.strip(&self.provider, t, &format!("{path}.{i}"), unknown);
                        }
                    }
                }
                (serde_json::Value::Array(_), Some(toml::Value::Array(items)))
                    if path == "watcher.targets" =>
                {
                    for (i, item) in items.iter_mut().enumerate() {
                        if let toml::Value::Table(t) = item {
                            self.strip(&self.watch_target, t, &format!("{path}.{i}"), unknown);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Loads, merges, extracts and validates the configuration. Every problem is collected.
pub fn load(sources: &Sources) -> Result<Loaded, LoadError> {
    let schema = Schema::new();
    let mut warnings = Vec::new();
    let mut problems = Vec::new();
    let secrets = read_secret_variable_files(&sources.env, &mut problems);
    let env = &secrets.env;

    let defaults = Defaults::from_env(env);
    let mut figment = Figment::new().merge(defaults_layer(&defaults));

    // The file.
    let file = config_file(sources);
    let mut files: Vec<PathBuf> = file.iter().cloned().collect();
    files.extend(drop_ins(
        file.as_deref(),
        &sources.default_config_path,
        &mut problems,
    ));
    for (i, path) in files.iter().enumerate() {
        match file_layer(path, &schema) {
            Ok((layer, unknown)) => {
                for key in unknown {
                    problems.push(Problem::new(
                        &key,
                        &format!("file {}", path.display()),
                        "unknown key",
                    ));
                }
                // Drop-ins append to lists (a file can add a provider) and override the rest.
                figment = match i {
                    0 if file.is_some() => figment.merge(layer),
                    _ => figment.admerge(layer),
                };
            }
            Err(p) => problems.push(p),
        }
    }

    // Nested `CHATCLI_SECTION__KEY` variables.
    let mut nested = Layer::new("env");
    let mut names: Vec<&String> = env.keys().collect();
    names.sort();
    for name in &names {
        let Some(rest) = name.strip_prefix("CHATCLI_") else {
            continue;
        };
        if !rest.contains("__") {
            continue;
        }
        let key = rest
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join(".");
        match schema.leaf(&key) {
            Some(leaf) => nested.set(&key, env_value(&env[*name], leaf), name.to_string()),
            None => warnings.push(format!(
                "unknown environment variable {name}: there is no config key `{key}`; it is ignored"
            )),
        }
    }
    figment = figment.merge(nested);

    // ChatCLI-compatible names.
    let mut compat = Layer::new("env");
    for (name, key) in COMPAT_ENV {
        let Some(raw) = env.get(*name) else { continue };
        if POSITIVE_ONLY.contains(key) && raw.trim().parse::<i64>().is_ok_and(|n| n <= 0) {
            warnings.push(format!("{name}={raw} is not positive; the default is kept"));
            continue;
        }
        let leaf = schema.leaf(key).unwrap_or(Leaf::Text);
        compat.set(key, env_value(raw, leaf), name.to_string());
    }
    figment = figment.merge(compat);
    for name in &names {
        if name.starts_with("CHATCLI_")
            && !name.contains("__")
            && !COMPAT_ENV.iter().any(|(n, _)| n == name)
            && !OTHER_KNOWN_ENV.contains(&name.as_str())
            && !name.starts_with("CHATCLI_FALLBACK_MODEL_")
        {
            warnings.push(format!(
                "unknown environment variable {name}; it is ignored"
            ));
        }
    }

    // Flags.
    let mut flags = Layer::new("flag");
    for f in &sources.flags {
        flags.set(f.key, f.value.clone(), f.flag.to_string());
    }
    figment = figment.merge(flags);

    let mut config = extract(&figment, &mut problems);
    let reflection_env = env
        .get("CHATCLI_GRPC_REFLECTION")
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"));

    config.server.reflection_env = reflection_env;
    add_env_providers(&mut config, &secrets, &mut warnings);
    read_secret_files(&mut config, &figment, env, &mut problems);
    warnings.extend(validate::short_token_warnings(
        &config,
        credentials_dir(env).as_deref(),
    ));
    resolve_tls_files(&mut config, env);
    super::watcher::resolve(
        &mut config.watcher,
        &|key| super::origin(&figment, key),
        &mut problems,
    );
    problems.extend(validate::validate(&config, &figment));
    warnings.extend(validate::warnings(&config));
    if !problems.is_empty() {
        return Err(LoadError { problems, warnings });
    }
    Ok(Loaded {
        config,
        figment,
        file,
        files,
        warnings,
    })
}

fn defaults_layer(defaults: &Defaults) -> Layer {
    let mut layer = Layer::new("default");
    if let Ok(Value::Dict(_, dict)) = Value::serialize(Config::defaults(defaults)) {
        layer.dict = dict;
    }
    layer
}

/// The drop-ins merged after the main file, in name order: `<config dir>/conf.d/*.toml`, or
/// `/etc/chatcli/conf.d/` when no config file is used and the default path's folder has one.
pub fn drop_in_dir(file: Option<&Path>, default_config_path: &Path) -> Option<PathBuf> {
    let base = file.unwrap_or(default_config_path);
    let dir = base.parent()?.join("conf.d");
    dir.is_dir().then_some(dir)
}

/// The config file `sources` name: `--config`, else `CHATCLI_CONFIG`, else the default path when
/// that file exists.
pub fn config_file(sources: &Sources) -> Option<PathBuf> {
    sources
        .config_flag
        .clone()
        .or_else(|| {
            sources
                .env
                .get("CHATCLI_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            sources
                .default_config_path
                .exists()
                .then(|| sources.default_config_path.clone())
        })
}

/// The config file and its drop-ins in merge order, as [`load`] reads them (a drop-in folder that
/// cannot be read adds none).
pub fn config_files(sources: &Sources) -> Vec<PathBuf> {
    let file = config_file(sources);
    let mut files: Vec<PathBuf> = file.iter().cloned().collect();
    files.extend(drop_ins(
        file.as_deref(),
        &sources.default_config_path,
        &mut Vec::new(),
    ));
    files
}

fn drop_ins(
    file: Option<&Path>,
    default_config_path: &Path,
    problems: &mut Vec<Problem>,
) -> Vec<PathBuf> {
    let Some(dir) = drop_in_dir(file, default_config_path) else {
        return Vec::new();
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem::new(
                "",
                &format!("dir {}", dir.display()),
                &format!("cannot read the drop-in folder: {e}"),
            ));
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

fn file_layer(path: &Path, schema: &Schema) -> Result<(Layer, Vec<String>), Problem> {
    let origin = format!("file {}", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|e| Problem::new("", &origin, &format!("cannot read the config file: {e}")))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
        Problem::new(
            "",
            &origin,
            &format!("invalid TOML: {}", e.to_string().trim()),
        )
    })?;
    let unknown = schema.strip_unknown(&mut table);
    let mut layer = Layer::new("file");
    layer.source = Some(Source::File(path.to_path_buf()));
    if let Ok(Value::Dict(_, dict)) = Value::serialize(&table) {
        layer.dict = dict;
    }
    Ok((layer, unknown))
}

/// Environment text as a config value: numbers and booleans parsed where the key wants them.
fn env_value(raw: &str, leaf: Leaf) -> Value {
    match leaf {
        Leaf::Text => Value::from(raw.to_string()),
        Leaf::Number | Leaf::Bool => raw
            .trim()
            .parse::<Value>()
            .unwrap_or_else(|_| Value::from(raw.to_string())),
    }
}

/// Extracts each section on its own so that a type error in one section does not hide the problems
/// of the others; a section that fails is replaced by its defaults (and the load fails anyway).
fn extract(figment: &Figment, problems: &mut Vec<Problem>) -> Config {
    fn section<T: DeserializeOwned + Default>(
        f: &Figment,
        key: &str,
        problems: &mut Vec<Problem>,
    ) -> T {
        match f.extract_inner::<T>(key) {
            Ok(v) => v,
            Err(e) => {
                for err in e {
                    problems.push(Problem::from_figment(&err, key));
                }
                T::default()
            }
        }
    }
    Config {
        server: section(figment, "server", problems),
        metrics: section(figment, "metrics", problems),
        log: section(figment, "log", problems),
        auth: section(figment, "auth", problems),
        limits: section(figment, "limits", problems),
        audit: section(figment, "audit", problems),
        llm: section(figment, "llm", problems),
        watcher: section(figment, "watcher", problems),
        catalog: section(figment, "catalog", problems),
        state: section(figment, "state", problems),
        hub: section(figment, "hub", problems),
    }
}

/// The environment with the provider secrets given as files read in.
struct SecretEnv {
    /// The process environment with `<NAME>` set to the content of each `<NAME>_FILE`.
    env: HashMap<String, String>,
    /// `<NAME>` → the file it was read from.
    files: HashMap<&'static str, PathBuf>,
}

/// Reads every provider secret variable given as a file (`OPENAI_API_KEY_FILE=openai`) as
/// `CHATCLI_SERVER_TOKEN_FILE` is read: a relative name is looked up in `$CREDENTIALS_DIRECTORY`,
/// the trailing newline is dropped, an empty or unreadable file is a problem, and so is a variable
/// given both ways.
fn read_secret_variable_files(
    env: &HashMap<String, String>,
    problems: &mut Vec<Problem>,
) -> SecretEnv {
    let creds = credentials_dir(env);
    let set = |name: &str| env.get(name).filter(|v| !v.trim().is_empty());
    let mut out = SecretEnv {
        env: env.clone(),
        files: HashMap::new(),
    };
    for name in super::env_providers::secret_variables() {
        let file_var = format!("{name}_FILE");
        let Some(file) = set(&file_var) else { continue };
        let origin = format!("env {file_var}");
        if set(name).is_some() {
            problems.push(Problem::new(
                "",
                &origin,
                &format!("both {name} and {file_var} are set; keep one"),
            ));
            continue;
        }
        let path = credential_path(Path::new(file), creds.as_deref());
        match read_credential(&path) {
            Ok(secret) => {
                out.env.insert(name.to_string(), secret);
                out.files.insert(name, path);
            }
            Err(why) => problems.push(Problem::new("", &origin, &why)),
        }
    }
    out
}

/// Registers providers from the existing ChatCLI's variables and applies `<PROVIDER>_MODEL` and
/// `CHATCLI_FALLBACK_MODEL_<PROVIDER>`. A key that came from a `<NAME>_FILE` variable becomes the
/// provider's `api_key_file` (`client_key_file` for StackSpot), so it is read, and watched for
/// rotation, like every other key file.
fn add_env_providers(config: &mut Config, secrets: &SecretEnv, warnings: &mut Vec<String>) {
    let env = &secrets.env;
    for p in &mut config.llm.providers {
        if p.model.is_none() {
            p.model = super::env_providers::model_for(env, &p.name);
        }
    }
    for (mut p, var) in super::env_providers::from_env(env) {
        if config
            .llm
            .providers
            .iter()
            .any(|q| q.name.eq_ignore_ascii_case(&p.name))
        {
            let var = match secrets.files.contains_key(var) {
                true => format!("{var}_FILE"),
                false => var.to_string(),
            };
            warnings.push(format!(
                "{var} is set but provider `{}` is configured in the file; the file wins",
                p.name
            ));
            continue;
        }
        if let Some(file) = secrets.files.get(var)
            && p.api_key.is_some()
        {
            p.api_key = None;
            p.api_key_file = Some(file.clone());
        }
        if let Some(file) = secrets.files.get("CLIENT_KEY")
            && p.client_key.is_some()
        {
            p.client_key = None;
            p.client_key_file = Some(file.clone());
        }
        config.llm.providers.push(p);
    }
    for (k, v) in super::env_providers::fallback_models(env) {
        config.llm.fallback_models.entry(k).or_insert(v);
    }
}

/// `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`), when set and not empty.
fn credentials_dir(env: &HashMap<String, String>) -> Option<PathBuf> {
    env.get("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// The TLS files, like the other `*_file` settings: a relative path is looked up in
/// `$CREDENTIALS_DIRECTORY` when that is set (so `key_file = "tls_key"` with
/// `LoadCredential=tls_key:…`). The resolved path is what the server reads and watches for rotation.
fn resolve_tls_files(config: &mut Config, env: &HashMap<String, String>) {
    let Some(dir) = credentials_dir(env) else {
        return;
    };
    let tls = &mut config.server.tls;
    for file in [
        &mut tls.cert_file,
        &mut tls.key_file,
        &mut tls.client_ca_file,
    ]
    .into_iter()
    .flatten()
    {
        *file = credential_path(file, Some(&dir));
    }
}

/// Reads `*_file` secrets. A relative path is looked up in `$CREDENTIALS_DIRECTORY` (systemd's
/// `LoadCredential=`) when that is set.
fn read_secret_files(
    config: &mut Config,
    figment: &Figment,
    env: &HashMap<String, String>,
    problems: &mut Vec<Problem>,
) {
    let creds = credentials_dir(env);
    let mut read =
        |secret_key: &str, file_key: &str, secret: &mut Option<Secret>, file: &Option<PathBuf>| {
            let Some(file) = file else { return };
            let origin = super::origin(figment, file_key);
            if secret.is_some() {
                problems.push(Problem::new(
                    file_key,
                    &origin,
                    &format!(
                        "both `{secret_key}` ({}) and `{file_key}` are set; keep one",
                        super::origin(figment, secret_key)
                    ),
                ));
                return;
            }
            match read_credential(&credential_path(file, creds.as_deref())) {
                Ok(text) => *secret = Some(Secret::new(text)),
                Err(why) => problems.push(Problem::new(file_key, &origin, &why)),
            }
        };
    let token_file = config.auth.token_file.clone();
    read(
        "auth.token",
        "auth.token_file",
        &mut config.auth.token,
        &token_file,
    );
    let jwt_file = config.auth.jwt.secret_file.clone();
    read(
        "auth.jwt.secret",
        "auth.jwt.secret_file",
        &mut config.auth.jwt.secret,
        &jwt_file,
    );
    for (i, p) in config.llm.providers.iter_mut().enumerate() {
        let file = p.api_key_file.clone();
        read(
            &format!("llm.providers.{i}.api_key"),
            &format!("llm.providers.{i}.api_key_file"),
            &mut p.api_key,
            &file,
        );
        let file = p.client_key_file.clone();
        read(
            &format!("llm.providers.{i}.client_key"),
            &format!("llm.providers.{i}.client_key_file"),
            &mut p.client_key,
            &file,
        );
    }
}
