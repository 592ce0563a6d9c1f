//! The audit log: one JSON line per call, gRPC and HTTP alike, written to
//! `audit.path` with mode 0600 and rotated by size through file-rotate.
//!
//! Writing never holds up a request: [`AuditLog::log`] only puts the record into a bounded queue
//! and returns; a dedicated OS thread (not a tokio worker, so file I/O never stalls the runtime)
//! drains the queue, writes the lines and flushes once per batch. A full queue drops the record and
//! counts it in `chatcli_audit_dropped_total`; lines written are counted in
//! `chatcli_audit_records_total`, lines lost to I/O errors in `chatcli_audit_write_errors_total`.
//! [`AuditLog::close`] flushes what is queued on shutdown.
//!
//! Records carry who called what and how it ended, never prompt text, keys or tokens: nothing here
//! can tell a secret from a name, so keeping them out is the caller's duty.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use prometheus::{IntCounter, Registry};
use serde::{Serialize, Serializer};
use tokio::sync::{mpsc, oneshot};

/// Longest `error` text kept in a record, in bytes (cut on a character boundary).
pub const ERROR_MAX_BYTES: usize = 500;

/// How long [`AuditLog::close`] waits for the queue to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines are written to the file in chunks of about this size (or the rotation size, if smaller),
/// so rotation, which file-rotate checks before each write, never lets a file grow far past its
/// limit even when a large backlog is drained at once.
const CHUNK_BYTES: usize = 64 * 1024;

/// How long the writer lets records gather after it has written out everything queued. The queue
/// must hold this long's worth of calls (the default 10 000 holds a million calls a second); a
/// shutdown waits at most this much longer.
const GATHER: Duration = Duration::from_millis(10);

/// Records taken from the queue before the writer flushes, so a steady stream of records still
/// reaches the disk regularly.
const BATCH_RECORDS: usize = 1024;

/// The audit file and its parent directories are private to the daemon's user.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

/// One audited call. Never carries prompt text, keys or tokens.
///
/// Callers must not put secrets into any field (e.g. a bearer token as `principal`, a provider key
/// in `error`): every field is written to the audit file as is, except that `error` is cut to
/// [`ERROR_MAX_BYTES`].
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// When the call ended: RFC 3339 with nanoseconds, UTC ([`now_rfc3339`]).
    pub timestamp: String,
    /// The request id, also returned to the caller as `x-request-id`.
    pub request_id: String,
    /// The principal's id; `"anonymous"` when the call was not authenticated.
    pub principal: String,
    /// The JWT `tenant_id` of the principal; left out when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// `none`, `token`, `jwt`, `mtls`, or `failed` when authentication was attempted and failed.
    pub auth_method: String,
    /// The client's address: the TCP peer's IP and port, or the client a trusted proxy named
    /// (`server.trusted_proxies`), with its port when the proxy gave one.
    pub client_addr: String,
    /// The TCP peer (IP and port), when it is a trusted proxy that named another client; left
    /// out otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// The full gRPC method (`/chatcli.v1.ChatCLIService/SendPrompt`) or `"GET /path"` for HTTP.
    pub method: String,
    /// The session, plugin or agent the call was about; left out when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub resource: String,
    /// How the call ended.
    pub result: AuditResult,
    /// gRPC code name (`OK`, `InvalidArgument`, …) or the HTTP status as text (`"429"`).
    pub code: String,
    /// The stable error code of a failed call (`docs/errors.md`), when it has one; left out
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Wall time of the call, streams included until their end.
    pub duration_ms: f64,
    /// Request bytes received.
    pub bytes_in: u64,
    /// Response bytes sent.
    pub bytes_out: u64,
    /// Provider used, for prompts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Model used, for prompts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Why the call failed or was denied; serialized cut to [`ERROR_MAX_BYTES`].
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_error"
    )]
    pub error: Option<String>,
}

/// How an audited call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditResult {
    /// The call succeeded.
    Ok,
    /// The call failed (bad argument, upstream error, …).
    Error,
    /// Authentication failed, or the principal may not do this (RBAC, rate limit).
    Denied,
}

/// The longest prefix of `text` that fits in [`ERROR_MAX_BYTES`] without splitting a character.
pub fn truncate_error(text: &str) -> &str {
    if text.len() <= ERROR_MAX_BYTES {
        return text;
    }
    let mut end = ERROR_MAX_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn serialize_error<S: Serializer>(error: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match error {
        Some(text) => s.serialize_some(truncate_error(text)),
        None => s.serialize_none(),
    }
}

/// The current time as RFC 3339 UTC with nine fractional digits (`2025-01-02T03:04:05.123456789Z`);
/// the fixed width keeps lines sortable as text.
pub fn now_rfc3339() -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
    );
    let now = time::OffsetDateTime::now_utc();
    // Formatting a UTC date with this description only fails for years past 9999.
    now.format(FORMAT)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[allow(
    clippy::large_enum_variant,
    reason = "nearly every message is a record; boxing would add an allocation per call"
)]
enum Message {
    Record(AuditRecord),
    Close(oneshot::Sender<()>),
}

/// The writer: a background thread owning the file (file-rotate, size-based: `max_size_mb`,
/// `max_backups`; file mode 0600, parent directories created 0700), fed by a bounded tokio mpsc
/// queue of `queue` records. [`log`](Self::log) never blocks and never fails the caller: when the
/// queue is full the record is dropped and `chatcli_audit_dropped_total` counts it.
///
/// Cheap to clone; all clones feed the same writer. When the last clone is dropped without
/// [`close`](Self::close), the writer still writes what was queued before it stops.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Message>,
    path: PathBuf,
    written: IntCounter,
    dropped: IntCounter,
    write_errors: IntCounter,
    /// The first drop is logged; later ones only counted, so a flood cannot flood the log too.
    drop_warned: AtomicBool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the audit file of `cfg` and starts its writer; `None` when `cfg.path` is `None`.
    /// The counters are registered on `registry` when given.
    ///
    /// Errors name the setting: `audit.path: /x: permission denied`, `audit.path: /x: is a
    /// directory`, `audit.max_size_mb: must be at least 1`, `audit.queue: must be at least 1`, or
    /// `audit: metrics: …` when the counters are already registered on `registry`.
    pub fn open(
        cfg: &crate::config::AuditConfig,
        registry: Option<&Registry>,
    ) -> Result<Option<Self>, String> {
        let Some(path) = cfg.path.as_deref() else {
            return Ok(None);
        };
        let max_bytes = cfg
            .max_size_mb
            .checked_mul(1024 * 1024)
            .and_then(|b| usize::try_from(b).ok())
            .filter(|b| *b > 0)
            .ok_or_else(|| {
                if cfg.max_size_mb == 0 {
                    "audit.max_size_mb: must be at least 1".to_owned()
                } else {
                    format!("audit.max_size_mb: {} is too large", cfg.max_size_mb)
                }
            })?;
        let (log, writer) = Self::prepare(path, max_bytes, cfg.max_backups, cfg.queue, registry)?;
        writer.spawn()?;
        Ok(Some(log))
    }

    /// Queues `record` for writing and returns at once; drops and counts it when the queue is full
    /// or the log is closed.
    pub fn log(&self, record: AuditRecord) {
        if let Err(e) = self.inner.tx.try_send(Message::Record(record)) {
            self.inner.dropped.inc();
            if !self.inner.drop_warned.swap(true, Ordering::Relaxed) {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "the queue is full",
                    mpsc::error::TrySendError::Closed(_) => "the audit log is closed",
                };
                tracing::warn!(
                    path = %self.inner.path.display(),
                    "audit record dropped because {why}; further drops are only counted in chatcli_audit_dropped_total"
                );
            }
        }
    }

    /// Writes and flushes everything queued so far, then closes the file; for shutdown. Waits at
    /// most 5 s. Records logged afterwards are dropped and counted. Calling it again returns at once.
    pub async fn close(&self) {
        let (ack_tx, ack_rx) = oneshot::channel();
        let done = async {
            // The close message queues behind every record already sent, so the ack means they
            // are on disk. A failed send means the writer is already gone.
            if self.inner.tx.send(Message::Close(ack_tx)).await.is_ok() {
                let _ = ack_rx.await;
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, done).await.is_err() {
            tracing::warn!(
                path = %self.inner.path.display(),
                "audit log not flushed within {}s; queued records may be lost",
                CLOSE_TIMEOUT.as_secs()
            );
        }
    }

    /// Registers the counters on `registry`, for a log opened (with no registry) before the
    /// metrics existed: the daemon opens it before binding its ports, so an unwritable path stops
    /// it before it listens.
    pub fn register(&self, registry: &Registry) -> Result<(), String> {
        let i = &self.inner;
        for c in [&i.written, &i.dropped, &i.write_errors] {
            registry
                .register(Box::new(c.clone()))
                .map_err(|e| format!("audit: metrics: {e}"))?;
        }
        Ok(())
    }

    /// Records written so far (`chatcli_audit_records_total`).
    pub fn written(&self) -> u64 {
        self.inner.written.get()
    }

    /// Records dropped so far (`chatcli_audit_dropped_total`).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.get()
    }

    /// Checks and opens the file and builds the queue and counters, without starting the writer.
    /// Split from [`open`](Self::open) so tests can fill the queue before anything drains it, and
    /// use a rotation size in bytes.
    fn prepare(
        path: &Path,
        max_bytes: usize,
        max_backups: usize,
        queue: usize,
        registry: Option<&Registry>,
    ) -> Result<(Self, Writer), String> {
        if queue == 0 {
            return Err("audit.queue: must be at least 1".to_owned());
        }
        if path.file_name().is_none() {
            return Err(format!(
                "audit.path: {}: does not name a file",
                path.display()
            ));
        }
        // file-rotate resolves relative paths against the working directory each time it scans;
        // fixing the path now keeps one file even if the directory changes.
        let path = std::path::absolute(path).map_err(|e| setting_error(path, &e))?;
        if path.is_dir() {
            return Err(format!("audit.path: {}: is a directory", path.display()));
        }
        let rotator =
            open_rotator(&path, max_bytes, max_backups).map_err(|e| setting_error(&path, &e))?;

        let written = counter(
            registry,
            "chatcli_audit_records_total",
            "Audit records written to the audit file.",
        )?;
        let dropped = counter(
            registry,
            "chatcli_audit_dropped_total",
            "Audit records dropped because the audit queue was full or closed.",
        )?;
        let write_errors = counter(
            registry,
            "chatcli_audit_write_errors_total",
            "Audit records lost because the audit file could not be written.",
        )?;

        let (tx, rx) = mpsc::channel(queue);
        let writer = Writer {
            rx,
            path: path.clone(),
            max_bytes,
            max_backups,
            chunk_bytes: max_bytes.min(CHUNK_BYTES),
            rotator: Some(rotator),
            buf: Vec::new(),
            pending: 0,
            failing: false,
            written: written.clone(),
            write_errors: write_errors.clone(),
        };
        let log = Self {
            inner: Arc::new(Inner {
                tx,
                path,
                written,
                dropped,
                write_errors,
                drop_warned: AtomicBool::new(false),
            }),
        };
        Ok((log, writer))
    }
}

fn counter(registry: Option<&Registry>, name: &str, help: &str) -> Result<IntCounter, String> {
    let c = IntCounter::new(name, help).map_err(|e| format!("audit: metrics: {e}"))?;
    if let Some(r) = registry {
        r.register(Box::new(c.clone()))
            .map_err(|e| format!("audit: metrics: {name}: {e}"))?;
    }
    Ok(c)
}

/// `audit.path: <path>: <reason>`, with the common reasons in plain words.
fn setting_error(path: &Path, e: &io::Error) -> String {
    let reason = match e.kind() {
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        io::ErrorKind::NotFound => "not found".to_owned(),
        io::ErrorKind::IsADirectory => "is a directory".to_owned(),
        // `create_dir_all` says "File exists" when a regular file stands where a directory
        // should be.
        io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists => {
            "a parent is not a directory".to_owned()
        }
        io::ErrorKind::ReadOnlyFilesystem => "read-only file system".to_owned(),
        _ => e.to_string(),
    };
    format!("audit.path: {}: {reason}", path.display())
}

/// Creates the parent directories (0700) and the file (0600), tightens an existing file to 0600,
/// and hands it to file-rotate.
///
/// file-rotate panics when it cannot create or list the directory and silently discards writes
/// when it cannot open the file, so both are checked here first and its constructor is guarded.
fn open_rotator(
    path: &Path,
    max_bytes: usize,
    max_backups: usize,
) -> io::Result<FileRotate<AppendCount>> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(parent)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    // `mode` applies only when the file is created; an older, wider file is tightened.
    if file.metadata()?.permissions().mode() & 0o777 != FILE_MODE {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    drop(file);
    drop_torn_tail(path)?;

    let mut options = OpenOptions::new();
    options.read(true).create(true).append(true).mode(FILE_MODE);
    catch_unwind(AssertUnwindSafe(|| {
        FileRotate::new(
            path,
            AppendCount::new(max_backups),
            // Rotate before a write once the file is past the size, so lines are never split.
            ContentLimit::BytesSurpassed(max_bytes),
            Compression::None,
            Some(options),
        )
    }))
    .map_err(|_| io::Error::other("cannot set up rotation (is the directory readable?)"))
}

/// Cuts a last line that has no newline off the file: the rest of a record whose write a crash
/// (`kill -9`, power loss) interrupted. Appending after it would glue the next record onto it, so
/// the log would hold a torn line in the middle; cut off, the only torn line a reader can ever see
/// is the last one of a log whose writer died mid-write (SECURITY.md tells readers to skip it).
fn drop_torn_tail(path: &Path) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 8192];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        let newline = chunk.iter().rposition(|b| *b == b'\n');
        if end == len && newline == Some(chunk.len() - 1) {
            return Ok(());
        }
        if let Some(i) = newline {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        tracing::warn!(path = %path.display(), bytes = len - end, "audit log: dropped a line cut short by a crash");
        file.set_len(end)?;
        file.sync_all()?;
    }
    Ok(())
}

/// The writer side: owns the queue's receiver and the file, on its own thread.
struct Writer {
    rx: mpsc::Receiver<Message>,
    path: PathBuf,
    max_bytes: usize,
    max_backups: usize,
    chunk_bytes: usize,
    /// `None` after a failure; reopened before the next write.
    rotator: Option<FileRotate<AppendCount>>,
    /// Serialized lines not yet handed to the file.
    buf: Vec<u8>,
    /// Records in `buf`.
    pending: u64,
    /// Whether the last write failed, so a broken disk is logged once, not once per batch.
    failing: bool,
    written: IntCounter,
    write_errors: IntCounter,
}

impl Writer {
    fn spawn(self) -> Result<(), String> {
        std::thread::Builder::new()
            .name("chatcli-audit".into())
            .spawn(move || self.run())
            .map(drop)
            .map_err(|e| format!("audit: cannot start the writer thread: {e}"))
    }

    fn run(mut self) {
        // `None` once every sender is gone: write what is left and stop.
        while let Some(first) = self.rx.blocking_recv() {
            let mut acks = Vec::new();
            self.take(first, &mut acks);
            let mut taken = 1;
            let mut drained = false;
            while acks.is_empty() && taken < BATCH_RECORDS {
                match self.rx.try_recv() {
                    Ok(msg) => self.take(msg, &mut acks),
                    Err(_) => {
                        drained = true;
                        break;
                    }
                }
                taken += 1;
            }
            if !acks.is_empty() {
                // Refuse new records, then write those already queued behind the close.
                self.rx.close();
                while let Ok(msg) = self.rx.try_recv() {
                    self.take(msg, &mut acks);
                }
                self.write_out();
                self.rotator = None;
                for ack in acks {
                    let _ = ack.send(());
                }
                return;
            }
            self.write_out();
            if drained {
                // Let records gather instead of parking at once: a parked writer costs every
                // call a futex wake-up (a tenth of the daemon's CPU at 20k calls/s), a sleeping
                // one costs nothing, and the next pass takes what arrived in one batch.
                std::thread::sleep(GATHER);
            }
        }
        self.write_out();
    }

    fn take(&mut self, msg: Message, acks: &mut Vec<oneshot::Sender<()>>) {
        match msg {
            Message::Record(record) => self.push(&record),
            Message::Close(ack) => acks.push(ack),
        }
    }

    fn push(&mut self, record: &AuditRecord) {
        let start = self.buf.len();
        match serde_json::to_writer(&mut self.buf, record) {
            Ok(()) => {
                self.buf.push(b'\n');
                self.pending += 1;
            }
            Err(e) => {
                self.buf.truncate(start);
                self.write_errors.inc();
                tracing::error!(error = %e, "audit record could not be serialized");
            }
        }
        if self.buf.len() >= self.chunk_bytes {
            self.write_out();
        }
    }

    /// Hands the buffered lines to the file and flushes.
    fn write_out(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let result = self.write_buf();
        let records = std::mem::take(&mut self.pending);
        self.buf.clear();
        match result {
            Ok(()) => {
                self.written.inc_by(records);
                if self.failing {
                    self.failing = false;
                    tracing::info!(path = %self.path.display(), "audit file writable again");
                }
            }
            Err(e) => {
                self.write_errors.inc_by(records);
                if !self.failing {
                    self.failing = true;
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        "audit records could not be written; further losses are only counted in chatcli_audit_write_errors_total"
                    );
                }
            }
        }
    }

    fn write_buf(&mut self) -> io::Result<()> {
        let mut rotator = match self.rotator.take() {
            Some(r) => r,
            None => open_rotator(&self.path, self.max_bytes, self.max_backups)?,
        };
        let buf = &self.buf;
        // file-rotate asserts on files renamed or removed behind its back; a panic must not end
        // the writer thread, so the rotator is dropped and rebuilt (rescanning the directory).
        match catch_unwind(AssertUnwindSafe(|| {
            rotator.write_all(buf)?;
            rotator.flush()
        })) {
            Ok(Ok(())) => {
                self.rotator = Some(rotator);
                Ok(())
            }
            // Dropped on error too: reopening goes through the checks in `open_rotator`, which
            // report a file that cannot be opened instead of losing lines silently.
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other("file rotation failed")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::fs;

    fn record(id: &str) -> AuditRecord {
        AuditRecord {
            timestamp: now_rfc3339(),
            request_id: id.to_owned(),
            principal: "alice".into(),
            tenant: None,
            auth_method: "jwt".into(),
            client_addr: "127.0.0.1:50000".into(),
            peer_addr: None,
            method: "/chatcli.v1.ChatCLIService/SendPrompt".into(),
            resource: String::new(),
            result: AuditResult::Ok,
            code: "OK".into(),
            error_code: None,
            duration_ms: 12.5,
            bytes_in: 10,
            bytes_out: 20,
            provider: None,
            model: None,
            error: None,
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn keys(v: &serde_json::Value) -> BTreeSet<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn config(path: &Path) -> crate::config::AuditConfig {
        crate::config::AuditConfig {
            path: Some(path.to_path_buf()),
            ..Default::default()
        }
    }

    fn metric(registry: &Registry, name: &str) -> u64 {
        let family = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("{name} not registered"));
        family.get_metric()[0].get_counter().get_value() as u64
    }

    #[tokio::test]
    async fn writes_json_lines_with_exactly_the_listed_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&config(&path), None).unwrap().unwrap();

        let minimal = record("r1");
        let mut full = record("r2");
        full.resource = "my-session".into();
        full.result = AuditResult::Denied;
        full.code = "PermissionDenied".into();
        full.provider = Some("openai".into());
        full.model = Some("gpt-4o".into());
        full.error = Some("readonly may not save sessions".into());
        log.log(minimal);
        log.log(full);
        log.close().await;

        let got = lines(&path);
        assert_eq!(got.len(), 2);
        let base: BTreeSet<&str> = [
            "timestamp",
            "request_id",
            "principal",
            "auth_method",
            "client_addr",
            "method",
            "result",
            "code",
            "duration_ms",
            "bytes_in",
            "bytes_out",
        ]
        .into();
        assert_eq!(keys(&got[0]), base);
        let mut all = base.clone();
        all.extend(["resource", "provider", "model", "error"]);
        assert_eq!(keys(&got[1]), all);

        assert_eq!(got[0]["request_id"], "r1");
        assert_eq!(got[0]["result"], "ok");
        assert_eq!(got[0]["duration_ms"], 12.5);
        assert_eq!(got[0]["bytes_out"], 20);
        assert_eq!(got[1]["result"], "denied");
        assert_eq!(got[1]["resource"], "my-session");
        assert_eq!(got[1]["model"], "gpt-4o");
        assert_eq!(log.written(), 2);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn result_names_are_lowercase() {
        let names: Vec<String> = [AuditResult::Ok, AuditResult::Error, AuditResult::Denied]
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        assert_eq!(names, ["\"ok\"", "\"error\"", "\"denied\""]);
    }

    #[tokio::test]
    async fn creates_private_parent_and_tightens_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/audit.log");
        let log = AuditLog::open(&config(&nested), None).unwrap().unwrap();
        log.close().await;
        assert_eq!(mode(&nested), 0o600);
        assert_eq!(mode(nested.parent().unwrap()), 0o700);

        let wide = dir.path().join("wide.log");
        fs::write(&wide, "").unwrap();
        fs::set_permissions(&wide, Permissions::from_mode(0o644)).unwrap();
        let log = AuditLog::open(&config(&wide), None).unwrap().unwrap();
        log.close().await;
        assert_eq!(mode(&wide), 0o600);
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_dropped_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let whole = "{\"a\":1}\n{\"b\":2}\n";
        for (on_disk, kept) in [
            ("", ""),
            (whole, whole),
            ("{\"a\":1}\n{\"b\":2}\n{\"c\":", whole),
            ("{\"cut", ""),
        ] {
            fs::write(&path, on_disk).unwrap();
            drop_torn_tail(&path).unwrap();
            assert_eq!(fs::read_to_string(&path).unwrap(), kept, "{on_disk:?}");
        }
        // A torn line longer than one read chunk.
        let long = format!("{whole}{{\"x\":\"{}", "y".repeat(20_000));
        fs::write(&path, long).unwrap();
        drop_torn_tail(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), whole);
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let registry = Registry::new();
        // The writer is not started yet, so nothing drains the queue of one.
        let (log, writer) = AuditLog::prepare(&path, 1 << 20, 1, 1, Some(&registry)).unwrap();
        for i in 0..5 {
            log.log(record(&format!("r{i}")));
        }
        assert_eq!(log.dropped(), 4);
        assert_eq!(metric(&registry, "chatcli_audit_dropped_total"), 4);

        writer.spawn().unwrap();
        log.close().await;
        let got = lines(&path);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["request_id"], "r0");
        assert_eq!(metric(&registry, "chatcli_audit_records_total"), 1);

        // After close, records are dropped and counted, not written.
        log.log(record("late"));
        assert_eq!(log.dropped(), 5);
        log.close().await;
        assert_eq!(lines(&path).len(), 1);
    }

    #[tokio::test]
    async fn rotates_past_the_size_and_keeps_max_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, writer) = AuditLog::prepare(&path, 1024, 2, 100, None).unwrap();
        for i in 0..40 {
            log.log(record(&format!("r{i}")));
        }
        writer.spawn().unwrap();
        log.close().await;
        assert_eq!(log.written(), 40);

        let backup = |n: u32| dir.path().join(format!("audit.log.{n}"));
        assert!(backup(1).exists() && backup(2).exists());
        assert!(
            !backup(3).exists(),
            "only max_backups rotated files are kept"
        );
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["audit.log", "audit.log.1", "audit.log.2"]);

        // Whole lines in every file, rotated files near the limit, newest records in the live file.
        let record_len = serde_json::to_vec(&record("r10")).unwrap().len() + 1;
        for p in [backup(2), backup(1), path.clone()] {
            assert!(!lines(&p).is_empty());
            assert_eq!(mode(&p), 0o600);
        }
        for p in [backup(2), backup(1)] {
            let len = fs::metadata(&p).unwrap().len() as usize;
            assert!(len >= 1024 && len < 1024 + record_len + 4, "{len}");
        }
        let live = lines(&path);
        assert_eq!(live.last().unwrap()["request_id"], "r39");
    }

    #[tokio::test]
    async fn close_flushes_everything_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut cfg = config(&path);
        cfg.queue = 100;
        let log = AuditLog::open(&cfg, None).unwrap().unwrap();
        for i in 0..100 {
            log.log(record(&format!("r{i}")));
        }
        log.close().await;
        let ids: Vec<String> = lines(&path)
            .iter()
            .map(|v| v["request_id"].as_str().unwrap().to_owned())
            .collect();
        let want: Vec<String> = (0..100).map(|i| format!("r{i}")).collect();
        assert_eq!(ids, want);
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn dropping_every_handle_still_writes_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, writer) = AuditLog::prepare(&path, 1 << 20, 1, 10, None).unwrap();
        log.log(record("r0"));
        log.log(record("r1"));
        drop(log);
        // Without a sender, the writer writes what is queued and returns.
        writer.run();
        assert_eq!(lines(&path).len(), 2);
    }

    #[test]
    fn a_rotation_failure_loses_one_chunk_and_the_writer_carries_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let registry = Registry::new();
        let (_log, mut w) = AuditLog::prepare(&path, 1024, 3, 10, Some(&registry)).unwrap();
        let mut n = 0;
        let mut push_chunk = |w: &mut Writer| {
            let before = w.written.get() + w.write_errors.get();
            while w.written.get() + w.write_errors.get() == before {
                w.push(&record(&format!("r{n}")));
                n += 1;
            }
        };
        push_chunk(&mut w);
        assert!(w.written.get() > 0);
        // A backup file file-rotate did not see at start: its rename asserts and panics.
        fs::write(dir.path().join("audit.log.1"), "stranger\n").unwrap();
        push_chunk(&mut w);
        let lost = metric(&registry, "chatcli_audit_write_errors_total");
        assert!(lost > 0);
        assert!(w.rotator.is_none());

        // The next chunk reopens the file, rescans the backups and rotates.
        let written = w.written.get();
        push_chunk(&mut w);
        assert!(w.written.get() > written);
        assert_eq!(metric(&registry, "chatcli_audit_write_errors_total"), lost);
        assert_eq!(
            fs::read_to_string(dir.path().join("audit.log.2")).unwrap(),
            "stranger\n"
        );
        assert!(!lines(&dir.path().join("audit.log.1")).is_empty());
        assert!(!lines(&path).is_empty());
    }

    #[test]
    fn open_errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let err = AuditLog::open(&config(dir.path()), None).unwrap_err();
        assert!(err.starts_with("audit.path: "), "{err}");
        assert!(err.ends_with(": is a directory"), "{err}");

        let err = AuditLog::open(&config(Path::new("/")), None).unwrap_err();
        assert!(err.starts_with("audit.path: "), "{err}");

        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let err = AuditLog::open(&config(&blocker.join("audit.log")), None).unwrap_err();
        assert!(err.starts_with("audit.path: "), "{err}");

        let mut cfg = config(&dir.path().join("a.log"));
        cfg.queue = 0;
        assert_eq!(
            AuditLog::open(&cfg, None).unwrap_err(),
            "audit.queue: must be at least 1"
        );
        let mut cfg = config(&dir.path().join("a.log"));
        cfg.max_size_mb = 0;
        assert_eq!(
            AuditLog::open(&cfg, None).unwrap_err(),
            "audit.max_size_mb: must be at least 1"
        );

        assert!(
            AuditLog::open(&crate::config::AuditConfig::default(), None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn metrics_registered_twice_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new();
        let cfg = config(&dir.path().join("audit.log"));
        let _first = AuditLog::open(&cfg, Some(&registry)).unwrap();
        let err = AuditLog::open(&cfg, Some(&registry)).unwrap_err();
        assert!(err.starts_with("audit: metrics: "), "{err}");
    }

    #[test]
    fn error_is_cut_at_500_bytes_on_a_char_boundary() {
        // "a" then two-byte characters: byte 500 falls inside a character.
        let long = format!("a{}", "é".repeat(400));
        let cut = truncate_error(&long);
        assert_eq!(cut.len(), 499);
        assert_eq!(cut, format!("a{}", "é".repeat(249)));
        assert_eq!(truncate_error("short"), "short");
        let exact = "x".repeat(ERROR_MAX_BYTES);
        assert_eq!(truncate_error(&exact), exact);

        let mut r = record("r1");
        r.error = Some(long.clone());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["error"].as_str().unwrap(), cut);
    }

    #[test]
    fn timestamp_is_utc_rfc3339_with_nanoseconds() {
        let ts = now_rfc3339();
        let parsed =
            time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
                .unwrap();
        assert_eq!(parsed.offset(), time::UtcOffset::UTC);
        let frac = ts.split('.').nth(1).unwrap();
        assert_eq!(frac.len(), 10, "{ts}"); // nine digits and the Z
        assert!(frac.ends_with('Z'));
    }
}
