//! Secrets kept in files (`*_file` keys, `token_file`, token tables): where a relative path is
//! looked up (systemd's credentials directory) and how the file is read.

use std::path::{Path, PathBuf};

/// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), when set and not empty.
pub(crate) fn credentials_directory() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// A relative path is looked up in the credentials directory when there is one, as the config
/// loader does for `*_file` secrets.
pub(crate) fn credential_path(file: &Path, creds: Option<&Path>) -> PathBuf {
    match creds {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file.to_path_buf(),
    }
}

/// Reads a file holding one secret; the trailing newline editors add is not part of it.
/// Errors name the path, never the content.
pub(crate) fn read_credential(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim_end_matches(['\n', '\r']);
            if token.trim().is_empty() {
                Err(format!("{} is empty", path.display()))
            } else {
                Ok(token.to_string())
            }
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}
