//! Saved chat sessions: a per-principal [`SessionStore`] whose files are compatible with the local
//! ChatCLI's `~/.chatcli/sessions`, the session name rule ([`validate_name`]) and the store's
//! errors ([`SessionError`], which name the session at most, never a path).
//!
//! # On-disk layout
//!
//! `root` is `<data_dir>/sessions`; folders are created lazily with mode 0700, files with 0600.
//!
//! ```text
//! <data_dir>/sessions/
//!   <name>.json                      sessions of principal "default", exactly where the local
//!                                    ChatCLI keeps its files, so an operator's files load as is
//!   <name>.json.<uuid>.tmp           a write in flight, renamed over <name>.json when complete
//!   principals/
//!     p<hex>/<name>.json             sessions of any other principal; <hex> is the lowercase hex
//!                                    of the principal id's UTF-8 bytes (ids up to 100 bytes)
//!     h<sha256-hex>/<name>.json      ids longer than 100 bytes: hex of the SHA-256 of the id
//! ```
//!
//! The hex encoding is injective and uses only `[0-9a-f]`, so two principals never share a folder,
//! no id (`..`, `a/b`, the empty id) can name a path outside `principals/`, and case-insensitive
//! file systems cannot merge `Alice` with `alice`. The `p`/`h` prefixes keep the two forms apart
//! and keep the folder name non-empty for the empty id. A default-principal session named
//! `principals` is the file `principals.json` and never collides with the folder.
//!
//! The principal the server passes is the caller's session namespace
//! ([`crate::auth::Principal::session_namespace`]): `default` for the shared token and no-auth mode,
//! else the method and id (`jwt:alice`, `token:team-a`), with the tenant for a JWT that names one
//! (`jwt@acme:alice`), so the same subject in two tenants has two folders.
//!
//! The file format is described in `format.rs`; the durable write in `fsio.rs`.

mod convert;
mod data;
mod format;
mod fsio;
mod redis;

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use self::redis::RedisSessions;
pub use data::{SESSION_FORMAT_VERSION, SessionData, StoredMessage, StoredMeta, derive_title};
use format::Decoded;

/// The principal every caller is until authentication lands; its sessions live directly in `root`.
pub const DEFAULT_PRINCIPAL: &str = "default";

/// Longest valid session name (the `{0,254}` of the name rule plus the first character).
pub const MAX_NAME_LEN: usize = 255;

/// Principal ids up to this many bytes are hex-encoded as is (2 chars per byte plus the prefix
/// stays well under the 255-byte file-name limit); longer ids are hashed.
const MAX_HEX_PRINCIPAL_BYTES: usize = 100;

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The session name breaks the name rule; nothing was read or written.
    #[error("invalid session name: {reason}")]
    InvalidName { reason: String },
    /// No session of that name for the principal.
    #[error("session '{name}' not found")]
    NotFound { name: String },
    /// The file exists but is not a session; it is left untouched.
    #[error("session '{name}' is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
    /// Another writer saved the session after it was read (the shared state backend); nothing was
    /// written. Re-read and try again.
    #[error("session '{name}' was changed by another call; reload it and try again")]
    Conflict { name: String },
    /// The shared state backend (Redis) cannot be reached; `action` names the operation.
    #[error("{action} failed: {reason}")]
    Unavailable { action: String, reason: String },
    /// The file system failed; `action` names the operation and session, never a path.
    #[error("{action} failed: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
}

impl SessionError {
    fn io(action: String, source: io::Error) -> Self {
        Self::Io { action, source }
    }
}

/// Checks `name` against `^[a-zA-Z0-9][a-zA-Z0-9_\-.]{0,254}$`.
///
/// The first character being alphanumeric rules out `.`, `..` and hidden files; `/`, `\` and NUL
/// are outside the alphabet, so a valid name is always a single plain file-name component.
pub fn validate_name(name: &str) -> Result<(), SessionError> {
    let invalid = |reason: &str| {
        Err(SessionError::InvalidName {
            reason: reason.to_owned(),
        })
    };
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return invalid("session name cannot be empty");
    };
    if !first.is_ascii_alphanumeric() {
        return invalid("session name must start with an ASCII letter or digit");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        return invalid("session name may only contain ASCII letters, digits, '_', '-' and '.'");
    }
    // All accepted characters are ASCII, so bytes and characters agree here.
    if name.len() > MAX_NAME_LEN {
        return invalid("session name is longer than 255 characters");
    }
    Ok(())
}

/// Saved sessions of every principal under one root folder (layout in the module docs).
#[derive(Debug)]
pub struct SessionStore {
    root: PathBuf,
    /// Serialises this process's writes, so a legacy migration (which re-checks the file under
    /// this lock) can never overwrite a concurrent save or resurrect a concurrent delete.
    writes: tokio::sync::Mutex<()>,
    /// The sessions on Redis, when `[state] backend = "redis"`: every method goes there instead.
    shared: Option<RedisSessions>,
}

impl SessionStore {
    /// `root` is `<data_dir>/sessions`. Created lazily (mode 0700) on first save.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            writes: tokio::sync::Mutex::new(()),
            shared: None,
        }
    }

    /// Sessions kept on Redis (`root` is then unused, except by `chatcli state migrate`).
    pub fn shared(root: PathBuf, redis: RedisSessions) -> Self {
        Self {
            shared: Some(redis),
            ..Self::new(root)
        }
    }

    /// The session and the version a [`Self::save_if`] compares with. Files have no versions
    /// (this process's writes are serialised): their version is always 0.
    pub async fn load_versioned(
        &self,
        principal: &str,
        name: &str,
    ) -> Result<(SessionData, u64), SessionError> {
        match &self.shared {
            Some(r) => r.load(principal, name).await,
            None => Ok((self.load(principal, name).await?, 0)),
        }
    }

    /// [`Self::save`] when the stored session still has `version` (0 = none stored yet), else
    /// [`SessionError::Conflict`]. Files save unconditionally.
    pub async fn save_if(
        &self,
        principal: &str,
        name: &str,
        data: SessionData,
        version: u64,
    ) -> Result<(), SessionError> {
        match &self.shared {
            Some(r) => r
                .save(principal, name, &data, Some(version))
                .await
                .map(drop),
            None => self.save(principal, name, data).await,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder holding `principal`'s sessions; always `root` or a direct child of
    /// `root/principals`.
    pub fn principal_dir(&self, principal: &str) -> PathBuf {
        if principal == DEFAULT_PRINCIPAL {
            self.root.clone()
        } else {
            self.root
                .join("principals")
                .join(principal_folder_name(principal))
        }
    }

    /// Names of `principal`'s sessions, sorted. Temp files, non-`.json` files, folders and files
    /// whose name breaks the name rule are not sessions.
    pub async fn list(&self, principal: &str) -> Result<Vec<String>, SessionError> {
        if let Some(r) = &self.shared {
            return r.list(principal).await;
        }
        let dir = self.principal_dir(principal);
        blocking(move || fsio::list_json_stems(&dir, |stem| validate_name(stem).is_ok()))
            .await
            .map_err(|e| SessionError::io("listing sessions".to_owned(), e))
    }

    /// Loads a session. A legacy bare-array file is returned as v2 and rewritten on disk as a v2
    /// object; if that rewrite fails the data is still returned and a warning is logged.
    pub async fn load(&self, principal: &str, name: &str) -> Result<SessionData, SessionError> {
        if let Some(r) = &self.shared {
            return r.load(principal, name).await.map(|(d, _)| d);
        }
        self.load_with(principal, name, |_| Ok(())).await
    }

    /// [`Self::load`] with a hook run before the migration's rename (see
    /// [`fsio::write_atomic_with`]), so tests can make the migration fail.
    async fn load_with(
        &self,
        principal: &str,
        name: &str,
        before_migration_rename: impl FnOnce(&Path) -> io::Result<()> + Send + 'static,
    ) -> Result<SessionData, SessionError> {
        validate_name(name)?;
        if !fits_file_system(name) {
            return Err(not_found(name));
        }
        let dir = self.principal_dir(principal);
        let file_name = session_file_name(name);
        let path = dir.join(&file_name);
        let (bytes, decoded) = blocking(move || {
            let bytes = std::fs::read(path)?;
            let decoded = format::decode(&bytes);
            Ok((bytes, decoded))
        })
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => not_found(name),
            _ => SessionError::io(format!("reading session '{name}'"), e),
        })?;
        match decoded {
            Ok(Decoded::Object(data)) => Ok(data),
            Ok(Decoded::Legacy { data, migrated }) => {
                self.migrate_legacy(
                    dir,
                    file_name,
                    name,
                    bytes,
                    migrated,
                    before_migration_rename,
                )
                .await;
                Ok(data)
            }
            Err(reason) => Err(SessionError::Corrupt {
                name: name.to_owned(),
                reason,
            }),
        }
    }

    /// Replaces the legacy file with its v2 form, unless it changed since it was read (another
    /// writer won; its content is newer). Failure only costs the migration, so it is logged here.
    async fn migrate_legacy(
        &self,
        dir: PathBuf,
        file_name: String,
        name: &str,
        original: Vec<u8>,
        migrated: Vec<u8>,
        before_rename: impl FnOnce(&Path) -> io::Result<()> + Send + 'static,
    ) {
        let _writes = self.writes.lock().await;
        let outcome = blocking(move || {
            match std::fs::read(dir.join(&file_name)) {
                Ok(current) if current == original => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
            fsio::write_atomic_with(&dir, &file_name, &migrated, before_rename)?;
            Ok(true)
        })
        .await;
        match outcome {
            Ok(true) => tracing::info!(
                session = name,
                "migrated legacy session file to the v2 format"
            ),
            Ok(false) => tracing::debug!(
                session = name,
                "legacy session changed while loading; not migrated"
            ),
            Err(error) => tracing::warn!(
                session = name,
                %error,
                "loaded legacy session file but could not migrate it to the v2 format"
            ),
        }
    }

    /// Stores `data` as `name` (version forced to 2, title derived when empty), atomically
    /// replacing any previous version.
    pub async fn save(
        &self,
        principal: &str,
        name: &str,
        data: SessionData,
    ) -> Result<(), SessionError> {
        if let Some(r) = &self.shared {
            return r.save(principal, name, &data, None).await.map(drop);
        }
        validate_name(name)?;
        if !fits_file_system(name) {
            return Err(SessionError::InvalidName {
                reason: format!(
                    "session name is too long to store (at most {} characters)",
                    fsio::NAME_MAX - ".json".len()
                ),
            });
        }
        let dir = self.principal_dir(principal);
        let file_name = session_file_name(name);
        let _writes = self.writes.lock().await;
        blocking(move || {
            let bytes = format::encode(&data).map_err(io::Error::other)?;
            fsio::ensure_dir(&dir)?;
            fsio::write_atomic(&dir, &file_name, &bytes)
        })
        .await
        .map_err(|e| SessionError::io(format!("saving session '{name}'"), e))?;
        tracing::debug!(session = name, "session saved");
        Ok(())
    }

    /// Removes the session `name`.
    pub async fn delete(&self, principal: &str, name: &str) -> Result<(), SessionError> {
        if let Some(r) = &self.shared {
            return r.delete(principal, name).await;
        }
        validate_name(name)?;
        if !fits_file_system(name) {
            return Err(not_found(name));
        }
        let dir = self.principal_dir(principal);
        let file_name = session_file_name(name);
        let _writes = self.writes.lock().await;
        blocking(move || fsio::remove(&dir, &file_name))
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => not_found(name),
                _ => SessionError::io(format!("deleting session '{name}'"), e),
            })?;
        tracing::debug!(session = name, "session deleted");
        Ok(())
    }
}

fn session_file_name(name: &str) -> String {
    format!("{name}.json")
}

/// Valid names of 251-255 characters cannot be stored as `<name>.json`: saving them is refused
/// as a name error rather than surfacing the OS error, and such a file cannot exist to load.
fn fits_file_system(name: &str) -> bool {
    session_file_name(name).len() <= fsio::NAME_MAX
}

fn not_found(name: &str) -> SessionError {
    SessionError::NotFound {
        name: name.to_owned(),
    }
}

fn principal_folder_name(principal: &str) -> String {
    let bytes = principal.as_bytes();
    if bytes.len() <= MAX_HEX_PRINCIPAL_BYTES {
        format!("p{}", lower_hex(bytes))
    } else {
        format!("h{}", lower_hex(&Sha256::digest(bytes)))
    }
}

fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Runs blocking file-system work off the async executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
