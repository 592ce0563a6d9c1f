//! `--use-local-auth`: the existing ChatCLI's local credential store and the
//! environment, turned into the prefixed `client_api_key` the server expects.
//!
//! The store is `auth-profiles.json` in `$CHATCLI_AUTH_DIR` (default `~/.chatcli`): either plain JSON
//! or `chatcli-enc:v1:` + base64(12-byte nonce ‖ AES-256-GCM ciphertext and tag), keyed by the 32 raw
//! bytes of `.auth-key` beside it. Unlike the existing client this one
//! - picks profiles in a fixed order: for each provider, ids ending in `:default` first, then the
//!   others sorted by id (the existing client takes whichever the hash map yields first);
//! - never creates or replaces the key file: a store that is encrypted but has no usable key is
//!   reported and left alone (replacing the key would orphan every credential encrypted with it);
//! - refreshes an OAuth token that expired (or expires within a minute) before using it, writes
//!   the new tokens back in the store's own format, and re-checks before every interactive turn.
//!
//! `CHATCLI_DEBUG_OAUTH_TOKEN_URL` replaces every token endpoint. It exists for tests and debugging
//! only (so tests never reach the real endpoints); never set it in normal use.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde_json::{Map, Value};

use super::error::ClientError;

/// The store's file name.
pub const STORE_FILE: &str = "auth-profiles.json";
/// The key file's name.
pub const KEY_FILE: &str = ".auth-key";
/// Prefix of an encrypted store.
pub const ENC_PREFIX: &str = "chatcli-enc:v1:";
/// Test/debug only: one URL that replaces every OAuth token endpoint.
pub const TOKEN_URL_OVERRIDE_ENV: &str = "CHATCLI_DEBUG_OAUTH_TOKEN_URL";

/// A token this close to its expiry is refreshed before use.
const EXPIRY_MARGIN_MS: i64 = 60_000;

const ANTHROPIC_TOKEN_URLS: [&str; 2] = [
    "https://platform.claude.com/v1/oauth/token",
    "https://console.anthropic.com/v1/oauth/token",
];
const ANTHROPIC_CLIENT_ID: &str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e";
const ANTHROPIC_USER_AGENT: &str = "claude-cli/2.1.2 (external, cli)";
const OPENAI_TOKEN_URL: &str = "https://auth.openai.com/oauth/token";
const OPENAI_CLIENT_ID: &str = "app_EMoamEEZ73f0CkXaXp7hrann";

/// A provider `--use-local-auth` can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalProvider {
    /// Anthropic (`CLAUDEAI`).
    Anthropic,
    /// OpenAI, also through `openai-codex` OAuth profiles (`OPENAI`).
    OpenAi,
    /// GitHub Copilot (`COPILOT`).
    Copilot,
}

impl LocalProvider {
    /// Tried in this order when `--provider` is not given.
    pub const ORDER: [LocalProvider; 3] = [Self::Anthropic, Self::OpenAi, Self::Copilot];

    /// From `--provider` (case-insensitive).
    pub fn from_flag(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "CLAUDEAI" => Some(Self::Anthropic),
            "OPENAI" => Some(Self::OpenAi),
            "COPILOT" => Some(Self::Copilot),
            _ => None,
        }
    }

    /// The server's provider name.
    pub fn server_name(self) -> &'static str {
        match self {
            Self::Anthropic => "CLAUDEAI",
            Self::OpenAi => "OPENAI",
            Self::Copilot => "COPILOT",
        }
    }

    /// Whether a profile's `provider` belongs to this provider.
    fn matches(self, profile_provider: &str) -> bool {
        match self {
            Self::Anthropic => profile_provider == "anthropic",
            Self::OpenAi => matches!(profile_provider, "openai" | "openai-codex"),
            Self::Copilot => profile_provider == "github-copilot",
        }
    }

    /// Environment variables, in order, with the prefix each value gets.
    fn env_vars(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Anthropic => &[
                ("ANTHROPIC_OAUTH_TOKEN", "oauth:"),
                ("ANTHROPIC_API_KEY", "apikey:"),
            ],
            Self::OpenAi => &[("OPENAI_API_KEY", "apikey:")],
            Self::Copilot => &[("GITHUB_COPILOT_TOKEN", "token:")],
        }
    }
}

/// What `--use-local-auth` found.
#[derive(Clone)]
pub struct LocalCredential {
    /// The provider it is for.
    pub provider: LocalProvider,
    /// `oauth:…`, `token:…` or `apikey:…`.
    pub client_api_key: String,
    /// Where it came from, without the secret (e.g. `profile anthropic:default (oauth)`).
    pub source: String,
    /// The profile id, when it came from the store.
    pub profile: Option<String>,
    /// Expiry in epoch milliseconds (OAuth profiles; 0 = never).
    pub expires_ms: i64,
}

impl std::fmt::Debug for LocalCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCredential")
            .field("provider", &self.provider)
            .field("source", &self.source)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

impl LocalCredential {
    /// Whether it should be resolved again before the next use.
    pub fn needs_refresh(&self) -> bool {
        self.expires_ms > 0 && now_ms() + EXPIRY_MARGIN_MS >= self.expires_ms
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The store's folder: `$CHATCLI_AUTH_DIR`, else `$HOME/.chatcli`.
pub fn store_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    match env("CHATCLI_AUTH_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env("HOME").unwrap_or_else(|| ".".into())).join(".chatcli"),
    }
}

/// The local store, read into memory.
pub struct AuthStore {
    path: PathBuf,
    /// The key, when the store is encrypted.
    key: Option<[u8; 32]>,
    doc: Value,
}

impl std::fmt::Debug for AuthStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthStore")
            .field("path", &self.path)
            .field("encrypted", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

fn store_err(msg: String) -> ClientError {
    ClientError::auth(msg)
}

impl AuthStore {
    /// Reads the store in `dir`; `Ok(None)` when there is none. An encrypted store whose key file
    /// is missing or malformed is an error, and nothing is written.
    pub fn open(dir: &Path) -> Result<Option<Self>, ClientError> {
        let path = dir.join(STORE_FILE);
        let key_path = dir.join(KEY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(store_err(format!(
                    "cannot read the local credential store {}: {e}",
                    path.display()
                )));
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let trimmed = text.trim();
        let (json, key) = if let Some(b64) = trimmed.strip_prefix(ENC_PREFIX) {
            let key = read_key(&key_path, &path)?;
            let plain = decrypt(&key, b64).map_err(|why| {
                store_err(format!(
                    "cannot decrypt the local credential store {} with {}: {why}; the key file \
                     does not belong to this store (restore the right one, or log in again)",
                    path.display(),
                    key_path.display()
                ))
            })?;
            (plain, Some(key))
        } else {
            (trimmed.as_bytes().to_vec(), None)
        };
        let doc: Value = serde_json::from_slice(&json).map_err(|e| {
            store_err(format!(
                "the local credential store {} is not valid JSON ({e}); log in again",
                path.display()
            ))
        })?;
        if !doc.is_object() {
            return Err(store_err(format!(
                "the local credential store {} is not a JSON object; log in again",
                path.display()
            )));
        }
        Ok(Some(Self { path, key, doc }))
    }

    /// The store's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn profiles(&self) -> Option<&Map<String, Value>> {
        self.doc.get("profiles")?.as_object()
    }

    /// Profile ids for `provider`, in the documented order: `…:default` first, then by id.
    pub fn candidates(&self, provider: LocalProvider) -> Vec<String> {
        let Some(profiles) = self.profiles() else {
            return Vec::new();
        };
        let mut ids: Vec<String> = profiles
            .iter()
            .filter(|(_, p)| provider.matches(str_field(p, "provider")))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort_by(|a, b| {
            (!a.ends_with(":default"), a.as_str()).cmp(&(!b.ends_with(":default"), b.as_str()))
        });
        ids
    }

    fn profile(&self, id: &str) -> Option<&Map<String, Value>> {
        self.profiles()?.get(id)?.as_object()
    }

    /// Writes the store back in its own format (encrypted with its own key, or plain), through a
    /// temporary file and a rename; the key file is never touched.
    fn save(&self) -> Result<(), ClientError> {
        let json = serde_json::to_string_pretty(&self.doc)
            .map_err(|e| store_err(format!("cannot encode the credential store: {e}")))?;
        let content = match &self.key {
            Some(key) => format!("{ENC_PREFIX}{}", encrypt(key, json.as_bytes())?),
            None => json,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{STORE_FILE}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(content.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            store_err(format!(
                "cannot write the refreshed token to {}: {e}",
                self.path.display()
            ))
        })
    }
}

fn str_field<'a>(p: &'a Value, key: &str) -> &'a str {
    p.get(key).and_then(Value::as_str).unwrap_or("")
}

fn read_key(key_path: &Path, store: &Path) -> Result<[u8; 32], ClientError> {
    let bytes = match std::fs::read(key_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(store_err(format!(
                "the local credential store {} is encrypted but its key file {} is missing; \
                 restore the key file (chatcli will not create a new key, which would make the \
                 store unreadable for good) or log in again with the existing ChatCLI",
                store.display(),
                key_path.display()
            )));
        }
        Err(e) => {
            return Err(store_err(format!(
                "cannot read the key file {}: {e}",
                key_path.display()
            )));
        }
    };
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        store_err(format!(
            "the key file {} is {} bytes long, not 32; restore the right key file",
            key_path.display(),
            bytes.len()
        ))
    })
}

fn aead_key(key: &[u8; 32]) -> Result<LessSafeKey, ClientError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| store_err("cannot use the credential store key".into()))
}

/// Decrypts the base64 text after the prefix.
pub fn decrypt(key: &[u8; 32], b64: &str) -> Result<Vec<u8>, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("not base64 ({e})"))?;
    if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err("too short".into());
    }
    let (nonce, sealed) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_string())?;
    let mut buf = sealed.to_vec();
    let key = aead_key(key).map_err(|e| e.to_string())?;
    let plain = key
        .open_in_place(nonce, Aad::empty(), &mut buf)
        .map_err(|_| "authentication tag mismatch".to_string())?;
    Ok(plain.to_vec())
}

/// Encrypts `plain` with a fresh random nonce; returns the base64 text that follows the prefix.
pub fn encrypt(key: &[u8; 32], plain: &[u8]) -> Result<String, ClientError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| store_err("no randomness for a nonce".into()))?;
    let mut buf = plain.to_vec();
    aead_key(key)?
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
        .map_err(|_| store_err("cannot encrypt the credential store".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

/// Resolves a credential for `wanted` (or the first of Anthropic, OpenAI, Copilot that has one):
/// for each provider the store's profiles in order, then the environment.
pub async fn resolve(
    wanted: Option<LocalProvider>,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<LocalCredential, ClientError> {
    let dir = store_dir(env);
    let mut store = AuthStore::open(&dir)?;
    let providers: Vec<LocalProvider> = match wanted {
        Some(p) => vec![p],
        None => LocalProvider::ORDER.to_vec(),
    };
    for provider in &providers {
        if let Some(store) = store.as_mut() {
            for id in store.candidates(*provider) {
                if let Some(c) = from_profile(store, &id, *provider, env).await? {
                    return Ok(c);
                }
            }
        }
        for (var, prefix) in provider.env_vars() {
            if let Some(v) = env(var).filter(|v| !v.trim().is_empty()) {
                return Ok(LocalCredential {
                    provider: *provider,
                    client_api_key: format!("{prefix}{}", v.trim()),
                    source: format!("environment variable {var}"),
                    profile: None,
                    expires_ms: 0,
                });
            }
        }
    }
    let names: Vec<&str> = providers
        .iter()
        .flat_map(|p| p.env_vars().iter().map(|(v, _)| *v))
        .collect();
    Err(ClientError::auth(format!(
        "--use-local-auth found no credentials: no usable profile in {} and none of {} is set; \
         log in with the existing ChatCLI (/auth login) or pass --llm-key",
        dir.join(STORE_FILE).display(),
        names.join(", ")
    )))
}

/// The credential in one profile, refreshing an expired OAuth token; `None` when the profile has
/// nothing usable (an empty token or key).
async fn from_profile(
    store: &mut AuthStore,
    id: &str,
    provider: LocalProvider,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Option<LocalCredential>, ClientError> {
    let Some(p) = store.profile(id) else {
        return Ok(None);
    };
    let p = Value::Object(p.clone());
    let kind = str_field(&p, "type");
    let found = |prefix: &str, secret: &str, expires_ms: i64, note: &str| LocalCredential {
        provider,
        client_api_key: format!("{prefix}{secret}"),
        source: format!("profile {id} ({kind}{note})"),
        profile: Some(id.to_string()),
        expires_ms,
    };
    match kind {
        "token" => {
            let t = str_field(&p, "token");
            Ok((!t.is_empty()).then(|| found("token:", t, 0, "")))
        }
        "api_key" => {
            let k = str_field(&p, "key");
            Ok((!k.is_empty()).then(|| found("apikey:", k, 0, "")))
        }
        "oauth" => {
            let access = str_field(&p, "access");
            let refresh = str_field(&p, "refresh");
            let expires = p.get("expires").and_then(Value::as_i64).unwrap_or(0);
            if access.is_empty() && refresh.is_empty() {
                return Ok(None);
            }
            let expired =
                access.is_empty() || (expires > 0 && now_ms() + EXPIRY_MARGIN_MS >= expires);
            if !expired {
                return Ok(Some(found("oauth:", access, expires, "")));
            }
            let fresh = refresh_token(store, id, &p, env).await?;
            Ok(Some(found("oauth:", &fresh.0, fresh.1, ", refreshed")))
        }
        _ => Ok(None),
    }
}

/// Refreshes the OAuth profile `id`, writes the new tokens back, returns (access, expires_ms).
async fn refresh_token(
    store: &mut AuthStore,
    id: &str,
    p: &Value,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<(String, i64), ClientError> {
    let provider = str_field(p, "provider");
    let refresh = str_field(p, "refresh");
    let fail = |why: String| {
        ClientError::auth(format!(
            "the OAuth token in profile {id} expired and refreshing it failed: {why}; log in again \
             with the existing ChatCLI (/auth login) or pass --llm-key"
        ))
    };
    if refresh.is_empty() {
        return Err(fail("the profile has no refresh token".into()));
    }
    let (urls, client_id, anthropic): (Vec<String>, String, bool) = match provider {
        "anthropic" => (
            ANTHROPIC_TOKEN_URLS.iter().map(|u| u.to_string()).collect(),
            non_empty_or(str_field(p, "client_id"), ANTHROPIC_CLIENT_ID),
            true,
        ),
        "openai-codex" | "openai" => (
            vec![OPENAI_TOKEN_URL.to_string()],
            match str_field(p, "client_id") {
                "" => env("CHATCLI_OPENAI_CLIENT_ID")
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| OPENAI_CLIENT_ID.to_string()),
                c => c.to_string(),
            },
            false,
        ),
        other => {
            return Err(fail(format!(
                "provider {other:?} tokens cannot be refreshed"
            )));
        }
    };
    let urls = match env(TOKEN_URL_OVERRIDE_ENV).filter(|v| !v.is_empty()) {
        Some(u) => vec![u],
        None => urls,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| fail(format!("cannot build an HTTP client: {e}")))?;
    let body = serde_json::json!({
        "grant_type": "refresh_token",
        "client_id": client_id,
        "refresh_token": refresh,
    });
    let mut last = String::new();
    for url in &urls {
        let mut req = http.post(url).json(&body);
        if anthropic {
            req = req.header(reqwest::header::USER_AGENT, ANTHROPIC_USER_AGENT);
        }
        let answer = match req.send().await {
            Ok(r) if r.status().is_success() => r.json::<Value>().await,
            Ok(r) => {
                last = format!("{url} answered HTTP {}", r.status().as_u16());
                continue;
            }
            Err(e) => {
                last = format!("{url}: {}", super::error::chain(&e));
                continue;
            }
        };
        let v = match answer {
            Ok(v) => v,
            Err(e) => {
                last = format!("{url} answered something that is not JSON ({e})");
                continue;
            }
        };
        let Some(access) = v.get("access_token").and_then(Value::as_str) else {
            last = format!("{url} answered without access_token");
            continue;
        };
        let expires_in = v.get("expires_in").and_then(Value::as_i64).unwrap_or(3600);
        let now = now_ms();
        let mut expires = now + expires_in.saturating_mul(1000) - 5 * 60 * 1000;
        if expires <= now {
            expires = now + 3600 * 1000;
        }
        if let Some(obj) = store
            .doc
            .get_mut("profiles")
            .and_then(|ps| ps.get_mut(id))
            .and_then(Value::as_object_mut)
        {
            obj.insert("access".into(), Value::from(access));
            if let Some(r) = v.get("refresh_token").and_then(Value::as_str)
                && !r.is_empty()
            {
                obj.insert("refresh".into(), Value::from(r));
            }
            obj.insert("expires".into(), Value::from(expires));
        }
        store.save()?;
        return Ok((access.to_string(), expires));
    }
    Err(fail(last))
}

fn non_empty_or(v: &str, default: &str) -> String {
    if v.is_empty() {
        default.to_string()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: a failed unwrap is a failed test
mod tests {
    use super::*;

    fn write_store(dir: &Path, doc: &Value, key: Option<&[u8; 32]>) {
        let json = serde_json::to_string_pretty(doc).unwrap();
        let content = match key {
            Some(k) => {
                std::fs::write(dir.join(KEY_FILE), k).unwrap();
                format!("{ENC_PREFIX}{}", encrypt(k, json.as_bytes()).unwrap())
            }
            None => json,
        };
        std::fs::write(dir.join(STORE_FILE), content).unwrap();
    }

    fn env_for(dir: &Path) -> impl Fn(&str) -> Option<String> + Sync + use<> {
        let d = dir.to_string_lossy().to_string();
        move |k: &str| (k == "CHATCLI_AUTH_DIR").then(|| d.clone())
    }

    #[test]
    fn encryption_round_trips_and_detects_tampering() {
        let key = [7u8; 32];
        let sealed = encrypt(&key, b"{\"version\":1}").unwrap();
        assert_eq!(decrypt(&key, &sealed).unwrap(), b"{\"version\":1}");
        assert!(decrypt(&[8u8; 32], &sealed).is_err());
    }

    #[tokio::test]
    async fn profiles_are_picked_in_a_fixed_order() {
        let dir = tempfile::tempdir().unwrap();
        let doc = serde_json::json!({"version": 1, "profiles": {
            "anthropic:zeta": {"type": "api_key", "provider": "anthropic", "key": "k-zeta"},
            "anthropic:alpha": {"type": "api_key", "provider": "anthropic", "key": "k-alpha"},
            "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": ""},
            "github-copilot:default": {"type": "token", "provider": "github-copilot", "token": "gh"},
        }});
        write_store(dir.path(), &doc, Some(&[3u8; 32]));
        let env = env_for(dir.path());
        let store = AuthStore::open(dir.path()).unwrap().unwrap();
        assert_eq!(
            store.candidates(LocalProvider::Anthropic),
            vec!["anthropic:default", "anthropic:alpha", "anthropic:zeta"]
        );
        // The default profile's key is empty, so the next in order serves.
        for _ in 0..5 {
            let c = resolve(None, &env).await.unwrap();
            assert_eq!(c.client_api_key, "apikey:k-alpha");
            assert_eq!(c.provider, LocalProvider::Anthropic);
        }
        let c = resolve(Some(LocalProvider::Copilot), &env).await.unwrap();
        assert_eq!(c.client_api_key, "token:gh");
        assert!(!c.source.contains("gh\""));
    }

    #[tokio::test]
    async fn a_missing_key_file_stops_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let doc = serde_json::json!({"version": 1, "profiles": {}});
        write_store(dir.path(), &doc, Some(&[1u8; 32]));
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let before = std::fs::read(dir.path().join(STORE_FILE)).unwrap();
        let err = resolve(None, &env_for(dir.path())).await.unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert!(err.to_string().contains("key file"), "{err}");
        assert!(!dir.path().join(KEY_FILE).exists());
        assert_eq!(std::fs::read(dir.path().join(STORE_FILE)).unwrap(), before);
    }

    #[tokio::test]
    async fn environment_is_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_string_lossy().to_string();
        let env = move |k: &str| match k {
            "CHATCLI_AUTH_DIR" => Some(d.clone()),
            "OPENAI_API_KEY" => Some("sk-env".into()),
            _ => None,
        };
        let c = resolve(None, &env).await.unwrap();
        assert_eq!(c.provider, LocalProvider::OpenAi);
        assert_eq!(c.client_api_key, "apikey:sk-env");
        let err = resolve(Some(LocalProvider::Copilot), &env)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("GITHUB_COPILOT_TOKEN"), "{err}");
    }
}
