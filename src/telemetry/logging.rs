//! The process-wide `tracing` subscriber: an `EnvFilter`, human text or JSON lines on stderr, and
//! optionally the same lines in a size-rotated, gzip-compressed, age-pruned log file written by a
//! background thread (the `LOG_FILE` / `LOG_LEVEL` / `LOG_MAX_SIZE` app log of the Go ChatCLI, whose
//! lumberjack semantics are kept: 0 backups keeps all, 0 days keeps forever).
//!
//! Nothing here ever writes to stdout: stdout belongs to the client commands.

use std::fs::{self, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use tracing::Subscriber;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The size limit used when `max_size_mb` is 0, as lumberjack does.
const DEFAULT_MAX_SIZE_MB: u64 = 100;
/// How often the age limit is enforced when no rotation happens.
const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
const SECONDS_PER_DAY: u64 = 24 * 3600;

pub use crate::config::LogFormat;

/// Everything [`init_logging`] needs, already validated by the config layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    /// An `EnvFilter` directive such as `info` or `chatcli=debug,info`.
    pub level: String,
    /// Text or JSON lines.
    pub format: LogFormat,
    /// Also write to this file, rotated; `None` logs to stderr only.
    pub file: Option<PathBuf>,
    /// Rotate once the file has grown past this many MiB; 0 means 100.
    pub max_size_mb: u64,
    /// Rotated files kept (`<file>.1` is the newest); 0 keeps all of them.
    pub max_backups: usize,
    /// Rotated files older than this many days are deleted; 0 keeps them forever.
    pub max_age_days: u64,
    /// Gzip rotated files (`<file>.1.gz`).
    pub compress: bool,
}

impl Default for LogSettings {
    /// The Go ChatCLI defaults, without a file (its default path is the config layer's business).
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
            file: None,
            max_size_mb: DEFAULT_MAX_SIZE_MB,
            max_backups: 3,
            max_age_days: 28,
            compress: true,
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The level is not a valid `EnvFilter` directive.
    #[error("invalid log level {level:?}: {reason}")]
    InvalidLevel {
        /// The rejected directive.
        level: String,
        /// What the parser said.
        reason: String,
    },
    /// The log file path cannot name a file.
    #[error("invalid log file path {}: {reason}", path.display())]
    InvalidPath {
        /// The rejected path.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// The log file's directory could not be created.
    #[error(
        "cannot open log file {}: cannot create its directory {}: {source}",
        file.display(),
        path.display()
    )]
    CreateDir {
        /// The log file.
        file: PathBuf,
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The log file could not be opened for appending.
    #[error("cannot open log file {}: {source}", path.display())]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The background writer thread could not be started.
    #[error("cannot start the log writer thread: {0}")]
    WriterThread(String),
    /// A global subscriber (or `log` logger) is already installed in this process.
    #[error("logging is already initialized: {0}")]
    AlreadyInitialized(String),
}

/// Keeps the background log writer alive; dropping it flushes the buffered lines. Hold it in
/// `main` until exit.
#[must_use = "dropping the guard stops the log file writer"]
#[derive(Default)]
pub struct LogGuard {
    _workers: Vec<WorkerGuard>,
    filter: Option<FilterHandle>,
}

type FilterHandle = tracing_subscriber::reload::Handle<
    EnvFilter,
    tracing_subscriber::layer::Layered<Vec<BoxedLayer>, Registry>,
>;

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard")
            .field("workers", &self._workers.len())
            .field("reloadable", &self.filter.is_some())
            .finish()
    }
}

impl LogGuard {
    /// Swaps the level filter of the running subscriber (hot reload of `log.level`).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = parse_filter(level).map_err(|e| e.to_string())?;
        match &self.filter {
            Some(h) => h.reload(filter).map_err(|e| e.to_string()),
            None => Err("logging is not initialised".into()),
        }
    }
}

/// Installs the global subscriber described by `settings`. Fails, without panicking, when one is
/// already installed.
pub fn init_logging(settings: &LogSettings) -> Result<LogGuard, LoggingError> {
    let (subscriber, guard) = build_subscriber(settings)?;
    subscriber
        .try_init()
        .map_err(|e| LoggingError::AlreadyInitialized(e.to_string()))?;
    Ok(guard)
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The subscriber [`init_logging`] installs, for callers (tests) that scope it with
/// `tracing::subscriber::with_default` instead.
pub(crate) fn build_subscriber(
    settings: &LogSettings,
) -> Result<
    (
        impl Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
        LogGuard,
    ),
    LoggingError,
> {
    let limit = max_size_bytes(settings.max_size_mb);
    let ansi = io::stderr().is_terminal();
    build_subscriber_with(settings, limit, BoxMakeWriter::new(io::stderr), ansi)
}

/// [`build_subscriber`] with the rotation limit in bytes and the console writer injected.
fn build_subscriber_with(
    settings: &LogSettings,
    max_size_bytes: usize,
    console: BoxMakeWriter,
    console_ansi: bool,
) -> Result<
    (
        impl Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
        LogGuard,
    ),
    LoggingError,
> {
    let filter = parse_filter(&settings.level)?;
    let mut layers: Vec<BoxedLayer> = vec![format_layer(settings.format, console, console_ansi)];
    let mut guard = LogGuard::default();
    if let Some(path) = &settings.file {
        let rotation = Rotation {
            max_size_bytes,
            max_backups: settings.max_backups,
            max_age: max_age(settings.max_age_days),
            compress: settings.compress,
        };
        let file = RotatingFile::open(path, rotation)?;
        let (writer, worker) = NonBlockingBuilder::default()
            .thread_name("chatcli-log-writer")
            .finish(file);
        guard._workers.push(worker);
        layers.push(format_layer(
            settings.format,
            BoxMakeWriter::new(writer),
            false,
        ));
    }
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    guard.filter = Some(handle);
    let subscriber = tracing_subscriber::registry().with(layers).with(filter);
    Ok((subscriber, guard))
}

fn format_layer(format: LogFormat, writer: BoxMakeWriter, ansi: bool) -> BoxedLayer {
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(true)
            .with_level(true)
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    }
}

fn parse_filter(level: &str) -> Result<EnvFilter, LoggingError> {
    crate::config::log_filter(level).map_err(|reason| LoggingError::InvalidLevel {
        level: level.to_owned(),
        reason,
    })
}

fn max_size_bytes(max_size_mb: u64) -> usize {
    let mb = if max_size_mb == 0 {
        DEFAULT_MAX_SIZE_MB
    } else {
        max_size_mb
    };
    usize::try_from(mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
}

fn max_age(days: u64) -> Option<Duration> {
    (days > 0).then(|| Duration::from_secs(days.saturating_mul(SECONDS_PER_DAY)))
}

/// How the log file is rotated and pruned.
#[derive(Clone, Copy, Debug)]
struct Rotation {
    max_size_bytes: usize,
    max_backups: usize,
    max_age: Option<Duration>,
    compress: bool,
}

/// A `FileRotate` that also enforces the age limit and keeps compressed backups private.
///
/// file-rotate keeps the list of backups in memory and panics when one it knows of vanished, so
/// after deleting aged backups the `FileRotate` is rebuilt, which rescans the directory.
struct RotatingFile {
    inner: FileRotate<AppendCount>,
    path: PathBuf,
    rotation: Rotation,
    /// Mirrors file-rotate's byte count to know when a write rotated the file.
    written: usize,
    last_sweep: Instant,
}

impl RotatingFile {
    fn open(path: &Path, rotation: Rotation) -> Result<Self, LoggingError> {
        let path = std::path::absolute(path).map_err(|e| LoggingError::InvalidPath {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let Some(dir) = path.parent().filter(|_| path.file_name().is_some()) else {
            return Err(LoggingError::InvalidPath {
                path,
                reason: "it does not name a file".to_owned(),
            });
        };
        fs::create_dir_all(dir).map_err(|source| LoggingError::CreateDir {
            file: path.clone(),
            path: dir.to_owned(),
            source: match source.kind() {
                // What `create_dir_all` reports when a regular file stands where a directory
                // should be ("File exists").
                io::ErrorKind::AlreadyExists => io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "a component of the path is not a directory",
                ),
                _ => source,
            },
        })?;
        // file-rotate swallows open errors and then drops every line: open it once ourselves.
        let file = open_options()
            .open(&path)
            .map_err(|source| LoggingError::OpenFile {
                path: path.clone(),
                source,
            })?;
        let written = file
            .metadata()
            .map_err(|source| LoggingError::OpenFile {
                path: path.clone(),
                source,
            })?
            .len();
        drop(file);
        sweep_backups(&path, rotation.max_age);
        Ok(Self {
            inner: new_file_rotate(&path, rotation),
            written: usize::try_from(written).unwrap_or(usize::MAX),
            path,
            rotation,
            last_sweep: Instant::now(),
        })
    }

    fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        if sweep_backups(&self.path, self.rotation.max_age) {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        // FileRotate::new panics when it cannot read the directory; keep the old one then.
        let readable = self
            .path
            .parent()
            .is_some_and(|dir| fs::read_dir(dir).is_ok());
        if readable {
            self.inner = new_file_rotate(&self.path, self.rotation);
        }
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // ContentLimit::BytesSurpassed rotates before a write once the count is past the limit.
        let rotates = self.written > self.rotation.max_size_bytes;
        let n = self.inner.write(buf)?;
        if rotates {
            self.written = n;
            self.sweep();
        } else {
            self.written = self.written.saturating_add(n);
            if self.last_sweep.elapsed() >= SWEEP_INTERVAL {
                self.sweep();
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn open_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    // file-rotate requires read, create and append.
    options.read(true).create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

fn new_file_rotate(path: &Path, rotation: Rotation) -> FileRotate<AppendCount> {
    let backups = if rotation.max_backups == 0 {
        usize::MAX
    } else {
        rotation.max_backups
    };
    let compression = if rotation.compress {
        Compression::OnRotate(0)
    } else {
        Compression::None
    };
    FileRotate::new(
        path,
        AppendCount::new(backups),
        ContentLimit::BytesSurpassed(rotation.max_size_bytes.max(1)),
        compression,
        Some(open_options()),
    )
}

/// The rotated backups of `path`: `<name>.<n>` and `<name>.<n>.gz`.
fn backups(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            let Some(suffix) = file_name.strip_prefix(&prefix) else {
                return false;
            };
            let number = suffix.strip_suffix(".gz").unwrap_or(suffix);
            !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())
        })
        .map(|entry| entry.path())
        .collect()
}

/// Deletes backups older than `max_age` and makes compressed ones (new files written with the
/// process umask) private. Returns whether anything was deleted.
fn sweep_backups(path: &Path, max_age: Option<Duration>) -> bool {
    let now = SystemTime::now();
    let mut deleted = false;
    for backup in backups(path) {
        let Ok(metadata) = fs::metadata(&backup) else {
            continue;
        };
        let aged = max_age.is_some_and(|max_age| {
            metadata
                .modified()
                .ok()
                .and_then(|modified| now.duration_since(modified).ok())
                .is_some_and(|age| age > max_age)
        });
        if aged {
            deleted |= fs::remove_file(&backup).is_ok();
            continue;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if metadata.permissions().mode() & 0o077 != 0 {
                let _ = fs::set_permissions(&backup, fs::Permissions::from_mode(0o600));
            }
        }
    }
    deleted
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn settings(file: Option<PathBuf>, format: LogFormat) -> LogSettings {
        LogSettings {
            level: "info".to_owned(),
            format,
            file,
            max_size_mb: 1,
            max_backups: 3,
            max_age_days: 28,
            compress: false,
        }
    }

    fn sink() -> BoxMakeWriter {
        BoxMakeWriter::new(io::sink)
    }

    /// A console writer whose output the test can read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
        fn writer(&self) -> BoxMakeWriter {
            let this = self.clone();
            BoxMakeWriter::new(move || this.clone())
        }
    }

    #[test]
    fn json_file_receives_logged_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/app.log");
        let (subscriber, guard) = build_subscriber_with(
            &settings(Some(path.clone()), LogFormat::Json),
            1 << 20,
            sink(),
            false,
        )
        .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(answer = 42, "hello from the json test");
            tracing::debug!("filtered out at info");
        });
        drop(guard);
        let content = fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = content
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{content}");
        assert_eq!(lines[0]["message"], "hello from the json test");
        assert_eq!(lines[0]["answer"], 42);
        assert_eq!(lines[0]["level"], "INFO");
        assert!(lines[0]["target"].as_str().unwrap().starts_with("chatcli"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn console_text_has_level_and_target_and_json_is_json() {
        let captured = Captured::default();
        let (subscriber, _guard) = build_subscriber_with(
            &settings(None, LogFormat::Text),
            1 << 20,
            captured.writer(),
            false,
        )
        .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "chatcli::probe", "text line");
        });
        let text = captured.text();
        assert!(text.contains("WARN"), "{text}");
        assert!(text.contains("chatcli::probe"), "{text}");
        assert!(text.contains("text line"), "{text}");

        let captured = Captured::default();
        let (subscriber, _guard) = build_subscriber_with(
            &settings(None, LogFormat::Json),
            1 << 20,
            captured.writer(),
            false,
        )
        .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "chatcli::probe", "json line");
        });
        let value: serde_json::Value = serde_json::from_str(captured.text().trim()).unwrap();
        assert_eq!(value["message"], "json line");
        assert_eq!(value["target"], "chatcli::probe");
    }

    #[test]
    fn level_directive_filters_per_target() {
        let captured = Captured::default();
        let mut s = settings(None, LogFormat::Text);
        s.level = "warn,chatcli::loud=debug".to_owned();
        let (subscriber, _guard) =
            build_subscriber_with(&s, 1 << 20, captured.writer(), false).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "chatcli::loud", "kept debug");
            tracing::info!(target: "chatcli::quiet", "dropped info");
        });
        let text = captured.text();
        assert!(text.contains("kept debug"), "{text}");
        assert!(!text.contains("dropped info"), "{text}");
    }

    #[test]
    fn file_rotates_past_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let mut s = settings(Some(path.clone()), LogFormat::Text);
        s.max_backups = 2;
        let (subscriber, guard) = build_subscriber_with(&s, 1024, sink(), false).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..200 {
                tracing::info!("line {i} padding padding padding padding padding padding");
            }
        });
        drop(guard);
        assert!(dir.path().join("app.log.1").exists());
        assert!(dir.path().join("app.log.2").exists());
        assert!(!dir.path().join("app.log.3").exists(), "max_backups=2");
        let current = fs::metadata(&path).unwrap().len();
        assert!(current < 2048, "current file has {current} bytes");
        let last = fs::read_to_string(&path).unwrap();
        assert!(last.contains("line 199"), "{last}");
    }

    #[test]
    fn compressed_backups_are_private_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let rotation = Rotation {
            max_size_bytes: 100,
            max_backups: 3,
            max_age: None,
            compress: true,
        };
        let mut file = RotatingFile::open(&path, rotation).unwrap();
        for _ in 0..5 {
            file.write_all(&[b'x'; 80]).unwrap();
        }
        file.flush().unwrap();
        let gz = dir.path().join("app.log.1.gz");
        assert!(gz.exists());
        assert!(!dir.path().join("app.log.1").exists());
        let bytes = fs::read(&gz).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&gz).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn aged_backups_are_deleted_and_rotation_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let old = SystemTime::now() - Duration::from_secs(3 * SECONDS_PER_DAY);
        for name in ["app.log.1", "app.log.2.gz", "app.log.3"] {
            let backup = dir.path().join(name);
            fs::write(&backup, b"old").unwrap();
            fs::File::options()
                .write(true)
                .open(&backup)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        fs::write(dir.path().join("app.log.4"), b"fresh").unwrap();
        fs::write(dir.path().join("app.log.old"), b"not a backup").unwrap();
        let rotation = Rotation {
            max_size_bytes: 10,
            max_backups: 10,
            max_age: Some(Duration::from_secs(SECONDS_PER_DAY)),
            compress: false,
        };
        let mut file = RotatingFile::open(&path, rotation).unwrap();
        assert!(!dir.path().join("app.log.1").exists());
        assert!(!dir.path().join("app.log.2.gz").exists());
        assert!(!dir.path().join("app.log.3").exists());
        assert!(dir.path().join("app.log.4").exists());
        assert!(dir.path().join("app.log.old").exists());
        // Three rotations: app.log.1..3 now exist next to the fresh app.log.4.
        for _ in 0..4 {
            file.write_all(b"0123456789abcdef\n").unwrap();
        }
        for n in 1..=4 {
            assert!(
                dir.path().join(format!("app.log.{n}")).exists(),
                "app.log.{n}"
            );
        }
        // app.log.4 ages while running; the next rotation cascades 1→2→3→4, which panics in
        // file-rotate if it still believes app.log.4 exists.
        fs::File::options()
            .write(true)
            .open(dir.path().join("app.log.4"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        file.sweep();
        assert!(!dir.path().join("app.log.4").exists());
        file.write_all(b"0123456789abcdef\n").unwrap();
        assert!(dir.path().join("app.log.4").exists());
        assert!(!dir.path().join("app.log.5").exists());
    }

    #[test]
    fn unopenable_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let path = dir.path().join("taken");
        fs::create_dir(&path).unwrap();
        let err = build_subscriber_with(
            &settings(Some(path.clone()), LogFormat::Text),
            1024,
            sink(),
            false,
        )
        .err()
        .unwrap();
        assert!(matches!(err, LoggingError::OpenFile { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn invalid_level_is_an_error() {
        let mut s = settings(None, LogFormat::Text);
        s.level = "=[".to_owned();
        let err = build_subscriber_with(&s, 1024, sink(), false)
            .err()
            .unwrap();
        assert!(matches!(err, LoggingError::InvalidLevel { .. }), "{err}");
        s.level = String::new();
        assert!(build_subscriber_with(&s, 1024, sink(), false).is_err());
    }

    #[test]
    fn warning_alias_lets_warnings_through_and_filters_info() {
        let captured = Captured::default();
        let mut s = settings(None, LogFormat::Json);
        s.level = "warning".to_owned();
        let (subscriber, _guard) =
            build_subscriber_with(&s, 1 << 20, captured.writer(), false).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("quiet");
            tracing::warn!("loud");
        });
        let text = captured.text();
        assert!(text.contains("loud") && !text.contains("quiet"), "{text}");
    }

    #[test]
    fn max_size_zero_means_the_lumberjack_default() {
        assert_eq!(max_size_bytes(0), 100 * 1024 * 1024);
        assert_eq!(max_size_bytes(2), 2 * 1024 * 1024);
        assert_eq!(max_age(0), None);
        assert_eq!(max_age(1), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn format_deserializes_lowercase() {
        #[derive(serde::Deserialize)]
        struct Wrapper {
            format: LogFormat,
        }
        let w: Wrapper = serde_json::from_str(r#"{"format":"json"}"#).unwrap();
        assert_eq!(w.format, LogFormat::Json);
        assert!(serde_json::from_str::<Wrapper>(r#"{"format":"Json"}"#).is_err());
    }

    #[test]
    fn second_init_is_an_error_not_a_panic() {
        let s = LogSettings {
            level: "off".to_owned(),
            ..LogSettings::default()
        };
        let first = init_logging(&s);
        let second = init_logging(&s);
        assert!(matches!(second, Err(LoggingError::AlreadyInitialized(_))));
        drop(first);
    }
}
