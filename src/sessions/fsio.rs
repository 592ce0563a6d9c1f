//! Blocking, durable file-system primitives of the session store: private folders, crash-safe
//! replacement of a file, removal and listing.
//!
//! Callers run these inside `tokio::task::spawn_blocking`. Replacement goes through a temp file in
//! the same folder, fsync, rename and a folder fsync, so a crash or a failed write leaves either the
//! old or the new file, never a torn one.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Session folders hold conversations; only the daemon's user may read or list them.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Session files, likewise private.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Longest file name common Linux file systems (ext4, xfs, btrfs, tmpfs) accept, in bytes.
pub(crate) const NAME_MAX: usize = 255;

/// Creates `dir` and any missing parent with mode 0700; existing folders keep their mode, since an
/// operator may have set it deliberately.
pub(crate) fn ensure_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Atomically replaces `dir/file_name` with `bytes`.
pub(crate) fn write_atomic(dir: &Path, file_name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(dir, file_name, bytes, |_| Ok(()))
}

/// [`write_atomic`] with a hook that runs once the temp file is fully written and fsynced, right
/// before the rename; an error from it aborts the write like any I/O error (tests use it to inject
/// a failure at the most delicate point, migration uses it to detect a concurrent change).
pub(crate) fn write_atomic_with(
    dir: &Path,
    file_name: &str,
    bytes: &[u8],
    before_rename: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let temp = dir.join(temp_file_name(file_name));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&temp)?;
    // From here on the temp file is ours and must not outlive a failure.
    let written = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        before_rename(&temp)?;
        fs::rename(&temp, dir.join(file_name))
    })();
    if let Err(error) = written {
        if let Err(cleanup) = fs::remove_file(&temp)
            && cleanup.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(temp = %temp.display(), error = %cleanup, "could not remove session temp file");
        }
        return Err(error);
    }
    sync_dir(dir)
}

/// `<file_name>.<uuid>.tmp`, which `list` never mistakes for a session since it does not end in
/// `.json`. For names so long that this would exceed NAME_MAX, the name part is dropped instead of
/// failing a save whose final file name does fit.
fn temp_file_name(file_name: &str) -> String {
    let id = uuid::Uuid::new_v4().simple();
    let full = format!("{file_name}.{id}.tmp");
    if full.len() <= NAME_MAX {
        full
    } else {
        format!(".{id}.tmp")
    }
}

/// Removes `dir/file_name` durably.
pub(crate) fn remove(dir: &Path, file_name: &str) -> io::Result<()> {
    fs::remove_file(dir.join(file_name))?;
    sync_dir(dir)
}

/// File names (without `.json`) of the regular `*.json` files in `dir` accepted by `keep`, sorted.
/// A missing folder has no sessions.
pub(crate) fn list_json_stems(dir: &Path, keep: impl Fn(&str) -> bool) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if keep(stem) {
            names.push(stem.to_owned());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn failure_before_rename_keeps_the_old_file_and_removes_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let old = b"{\n  \"version\": 2,\n  \"chat_history\": []\n}";
        write_atomic(dir.path(), "s.json", old).unwrap();

        let mut seen_temp = None;
        let error = write_atomic_with(dir.path(), "s.json", b"new bytes", |temp| {
            // The hook runs at the promised point: temp complete, private, next to the target.
            assert_eq!(fs::read(temp).unwrap(), b"new bytes");
            assert_eq!(
                fs::metadata(temp).unwrap().permissions().mode() & 0o777,
                FILE_MODE
            );
            assert_eq!(temp.parent(), Some(dir.path()));
            let name = temp.file_name().unwrap().to_str().unwrap().to_owned();
            assert!(
                name.starts_with("s.json.") && name.ends_with(".tmp"),
                "{name}"
            );
            seen_temp = Some(temp.to_path_buf());
            Err(io::Error::other("injected failure"))
        })
        .unwrap_err();

        assert_eq!(error.to_string(), "injected failure");
        assert_eq!(fs::read(dir.path().join("s.json")).unwrap(), old);
        assert!(!seen_temp.unwrap().exists());
        assert_eq!(entries(dir.path()), vec!["s.json"]);
    }

    #[test]
    fn successful_write_replaces_the_file_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "s.json", b"one").unwrap();
        write_atomic(dir.path(), "s.json", b"two").unwrap();
        let path = dir.path().join("s.json");
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            FILE_MODE
        );
        assert_eq!(entries(dir.path()), vec!["s.json"]);
    }

    #[test]
    fn failure_to_create_the_temp_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let error = write_atomic(&missing, "s.json", b"x").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn temp_names_stay_within_name_max() {
        let long = format!("{}.json", "a".repeat(250));
        assert!(temp_file_name(&long).len() <= NAME_MAX);
        assert!(temp_file_name(&long).ends_with(".tmp"));
        assert!(temp_file_name("s.json").starts_with("s.json."));
    }
}
