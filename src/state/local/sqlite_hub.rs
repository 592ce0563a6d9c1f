//! [`HubStore`] on an embedded SQLite database (the `rusqlite` crate's bundled SQLite, so no system
//! library is needed).
//!
//! The database runs in WAL mode with `synchronous = FULL`: a write returns only after its
//! transaction is in the write-ahead log on disk, so it survives the process being killed and the
//! machine losing power. One writer thread owns the only writing connection and commits the
//! operations waiting for it together in one transaction (each in its own savepoint, so one that
//! fails leaves the others alone): a commit's fsync is shared by every append that arrived while the
//! previous one ran, and since the writer is alone, `seq` assignment needs no further locking. Reads
//! run on a small pool of read-only connections on tokio's blocking threads; WAL lets them read the
//! last committed state while the writer writes.
//!
//! The schema has a version table; [`MIGRATIONS`] brings an older database up to date when it is
//! opened, and a database from a newer chatcli is refused rather than misread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::state::hub::{
    AppendOutcome, Binding, BindingOutcome, Conversation, HubStore, NewEvent, StoreError,
    StoredEvent,
};

/// The schema, one step per version: step `i` takes a database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        principal TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        last_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX conversations_updated ON conversations (updated_ms);
    CREATE TABLE active_conversations (
        principal TEXT PRIMARY KEY,
        conv_id TEXT NOT NULL
    );
    CREATE INDEX active_conversations_conv ON active_conversations (conv_id);
    CREATE TABLE events (
        conv_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        principal TEXT NOT NULL,
        channel TEXT NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        client_msg_id TEXT NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (conv_id, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX events_client_msg_id ON events (conv_id, client_msg_id)
        WHERE client_msg_id <> '';
    CREATE TABLE bindings (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        principal TEXT NOT NULL,
        PRIMARY KEY (platform, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX bindings_principal ON bindings (principal);
"];

/// Operations one commit takes at most.
const MAX_BATCH: usize = 512;

/// Read connections kept open for reuse.
const MAX_IDLE_READERS: usize = 8;

/// Answers an operation once its transaction's fate is known.
type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// One write operation: runs inside the writer's transaction (or gets the reason there is none).
type Job = Box<dyn FnOnce(Result<&Connection, StoreError>) -> Done + Send>;

/// See the module docs.
pub struct SqliteHubStore {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

impl std::fmt::Debug for SqliteHubStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteHubStore")
            .field("path", &self.path)
            .finish()
    }
}

fn backend(what: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("hub store: {what}: {e}"))
}

fn sql(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(format!("hub store: {e}"))
}

fn closed() -> StoreError {
    StoreError::Backend("hub store: closed".into())
}

impl SqliteHubStore {
    /// Opens (creating it and its folder when missing) the database at `path` and brings its
    /// schema up to date. Blocks: call it from a blocking context.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!(
                    "hub store: cannot create the folder of {shown}: {e}"
                ))
            })?;
        }
        let mut conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("hub store: cannot open {shown}: {e}")))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(backend("setting WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "hub store: {shown} cannot use WAL mode (journal mode stays {mode})"
            )));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")
            .map_err(backend("setting pragmas"))?;
        migrate(&mut conn, &shown)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = std::thread::Builder::new()
            .name("hub-store".into())
            .spawn(move || write_loop(conn, rx))
            .map_err(|e| {
                StoreError::Backend(format!("hub store: cannot start its writer thread: {e}"))
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            readers: Arc::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops taking writes, lets the writer commit what it has and waits for it. Operations after
    /// this fail. Blocks.
    pub fn close(&self) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }

    /// Runs `op` in the writer's next transaction; answers once that transaction committed.
    async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = conn.and_then(|c| in_savepoint(c, op));
            Box::new(move |committed: Result<(), StoreError>| {
                let _ = tx.send(committed.and(result));
            })
        });
        let sender = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(closed)?;
        sender.send(job).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Runs `op` on a read connection on a blocking thread.
    async fn read_with<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let idle = readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let conn = match idle {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let result = op(&conn);
            let mut idle = readers.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("hub store: read task failed: {e}")))?
    }
}

impl Drop for SqliteHubStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(backend("opening a read connection"))?;
    conn.execute_batch("PRAGMA busy_timeout = 5000;")
        .map_err(backend("setting pragmas"))?;
    Ok(conn)
}

/// Brings the schema up to [`MIGRATIONS`]' length, each step in its own transaction.
fn migrate(conn: &mut Connection, shown: &str) -> Result<(), StoreError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")
        .map_err(backend("creating the schema version table"))?;
    let version: i64 = conn
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .map_err(backend("reading the schema version"))?
        .unwrap_or(0);
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Backend(format!(
            "hub store: {shown} has schema version {version}, newer than this chatcli knows ({known}); use a newer chatcli or another hub.db"
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(sql)?;
        tx.execute_batch(step)
            .map_err(backend("migrating the schema"))?;
        tx.execute("DELETE FROM schema_version", []).map_err(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            params![i as i64 + 1],
        )
        .map_err(sql)?;
        tx.commit().map_err(backend("migrating the schema"))?;
        tracing::info!(db = shown, version = i + 1, "hub store schema migrated");
    }
    Ok(())
}

fn in_savepoint<T>(
    conn: &Connection,
    op: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("SAVEPOINT op").map_err(sql)?;
    match op(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE op").map_err(sql)?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
            Err(e)
        }
    }
}

/// The writer thread: takes the waiting operations, runs them in one transaction, commits, and
/// then answers each. Ends when every sender is gone.
fn write_loop(conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let begun = conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(backend("starting a transaction"));
        let dones: Vec<Done> = batch
            .into_iter()
            .map(|job| job(begun.clone().map(|()| &conn)))
            .collect();
        let committed = match begun {
            Ok(()) => conn.execute_batch("COMMIT").map_err(backend("committing")),
            Err(e) => Err(e),
        };
        if let Err(e) = &committed {
            tracing::error!("hub store: a write failed: {e}");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for done in dones {
            done(committed.clone());
        }
    }
}

fn conversation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Conversation> {
    Ok(Conversation {
        id: r.get(0)?,
        principal: r.get(1)?,
        created_ms: r.get(2)?,
        updated_ms: r.get(3)?,
        last_seq: r.get(4)?,
    })
}

const CONVERSATION_COLUMNS: &str = "id, principal, created_ms, updated_ms, last_seq";

fn get_conversation(conn: &Connection, id: &str) -> Result<Option<Conversation>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?1"
    ))
    .map_err(sql)?
    .query_row(params![id], conversation_row)
    .optional()
    .map_err(sql)
}

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        conv_id: r.get(0)?,
        seq: r.get(1)?,
        principal: r.get(2)?,
        channel: r.get(3)?,
        role: r.get(4)?,
        content: r.get(5)?,
        client_msg_id: r.get(6)?,
        ts: r.get(7)?,
    })
}

const EVENT_COLUMNS: &str = "conv_id, seq, principal, channel, role, content, client_msg_id, ts";

fn create_conversation(
    conn: &Connection,
    principal: &str,
    id: &str,
    now_ms: i64,
) -> Result<Conversation, StoreError> {
    conn.prepare_cached(
        "INSERT INTO conversations (id, principal, created_ms, updated_ms, last_seq)
         VALUES (?1, ?2, ?3, ?3, 0)",
    )
    .map_err(sql)?
    .execute(params![id, principal, now_ms])
    .map_err(backend("creating a conversation"))?;
    conn.prepare_cached(
        "INSERT INTO active_conversations (principal, conv_id) VALUES (?1, ?2)
         ON CONFLICT (principal) DO UPDATE SET conv_id = excluded.conv_id",
    )
    .map_err(sql)?
    .execute(params![principal, id])
    .map_err(sql)?;
    Ok(Conversation {
        id: id.into(),
        principal: principal.into(),
        created_ms: now_ms,
        updated_ms: now_ms,
        last_seq: 0,
    })
}

#[async_trait]
impl HubStore for SqliteHubStore {
    async fn resolve_active(
        &self,
        principal: &str,
        create: Option<(&str, i64)>,
    ) -> Result<Option<(Conversation, bool)>, StoreError> {
        let principal = principal.to_string();
        let create = create.map(|(id, now)| (id.to_string(), now));
        let find = |conn: &Connection, principal: &str| {
            conn.prepare_cached(&format!(
                "SELECT {CONVERSATION_COLUMNS} FROM conversations
                 WHERE id = (SELECT conv_id FROM active_conversations WHERE principal = ?1)"
            ))
            .map_err(sql)?
            .query_row(params![principal], conversation_row)
            .optional()
            .map_err(sql)
        };
        match create {
            None => {
                self.read_with(move |conn| Ok(find(conn, &principal)?.map(|c| (c, false))))
                    .await
            }
            Some((id, now)) => {
                self.write(move |conn| {
                    if let Some(c) = find(conn, &principal)? {
                        return Ok(Some((c, false)));
                    }
                    Ok(Some((
                        create_conversation(conn, &principal, &id, now)?,
                        true,
                    )))
                })
                .await
            }
        }
    }

    async fn new_conversation(
        &self,
        principal: &str,
        conv_id: &str,
        now_ms: i64,
    ) -> Result<Conversation, StoreError> {
        let (principal, id) = (principal.to_string(), conv_id.to_string());
        self.write(move |conn| create_conversation(conn, &principal, &id, now_ms))
            .await
    }

    async fn conversation(&self, conv_id: &str) -> Result<Option<Conversation>, StoreError> {
        let id = conv_id.to_string();
        self.read_with(move |conn| get_conversation(conn, &id))
            .await
    }

    async fn append(&self, event: NewEvent) -> Result<AppendOutcome, StoreError> {
        self.write(move |conn| {
            let Some(conv) = get_conversation(conn, &event.conv_id)? else {
                return Err(StoreError::ConversationNotFound(event.conv_id));
            };
            if !event.client_msg_id.is_empty() {
                let first = conn
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE conv_id = ?1 AND client_msg_id = ?2"
                    ))
                    .map_err(sql)?
                    .query_row(params![event.conv_id, event.client_msg_id], event_row)
                    .optional()
                    .map_err(sql)?;
                if let Some(first) = first {
                    return Ok(AppendOutcome {
                        event: first,
                        duplicate: true,
                    });
                }
            }
            let stored = StoredEvent {
                seq: conv.last_seq + 1,
                principal: conv.principal,
                conv_id: event.conv_id,
                channel: event.channel,
                role: event.role,
                content: event.content,
                client_msg_id: event.client_msg_id,
                ts: event.ts,
            };
            conn.prepare_cached(&format!(
                "INSERT INTO events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ))
            .map_err(sql)?
            .execute(params![
                stored.conv_id,
                stored.seq,
                stored.principal,
                stored.channel,
                stored.role,
                stored.content,
                stored.client_msg_id,
                stored.ts
            ])
            .map_err(backend("storing an event"))?;
            conn.prepare_cached(
                "UPDATE conversations SET last_seq = ?2, updated_ms = MAX(updated_ms, ?3) WHERE id = ?1",
            )
            .map_err(sql)?
            .execute(params![stored.conv_id, stored.seq, stored.ts])
            .map_err(sql)?;
            Ok(AppendOutcome {
                event: stored,
                duplicate: false,
            })
        })
        .await
    }

    async fn read(
        &self,
        conv_id: &str,
        since_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let id = conv_id.to_string();
        // SQLite reads a negative LIMIT as "no limit".
        let limit = match limit {
            0 => -1,
            n => i64::try_from(n).unwrap_or(i64::MAX),
        };
        self.read_with(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE conv_id = ?1 AND seq > ?2
                 ORDER BY seq LIMIT ?3"
            ))
            .map_err(sql)?
            .query_map(params![id, since_seq, limit], event_row)
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)
        })
        .await
    }

    async fn set_binding(
        &self,
        binding: &Binding,
        replace_others: bool,
    ) -> Result<BindingOutcome, StoreError> {
        let b = binding.clone();
        self.write(move |conn| {
            let held: Option<String> = conn
                .prepare_cached(
                    "SELECT principal FROM bindings WHERE platform = ?1 AND user_id = ?2",
                )
                .map_err(sql)?
                .query_row(params![b.platform, b.user_id], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            if let Some(other) = held.filter(|p| *p != b.principal)
                && !replace_others
            {
                return Ok(BindingOutcome::HeldBy(other));
            }
            conn.prepare_cached(
                "INSERT INTO bindings (platform, user_id, principal) VALUES (?1, ?2, ?3)
                 ON CONFLICT (platform, user_id) DO UPDATE SET principal = excluded.principal",
            )
            .map_err(sql)?
            .execute(params![b.platform, b.user_id, b.principal])
            .map_err(backend("storing a binding"))?;
            Ok(BindingOutcome::Set)
        })
        .await
    }

    async fn list_bindings(&self, principal: Option<&str>) -> Result<Vec<Binding>, StoreError> {
        let principal = principal.map(str::to_string);
        self.read_with(move |conn| {
            let row = |r: &rusqlite::Row<'_>| {
                Ok(Binding {
                    platform: r.get(0)?,
                    user_id: r.get(1)?,
                    principal: r.get(2)?,
                })
            };
            let out = match &principal {
                Some(p) => conn
                    .prepare_cached(
                        "SELECT platform, user_id, principal FROM bindings WHERE principal = ?1
                         ORDER BY platform, user_id",
                    )
                    .map_err(sql)?
                    .query_map(params![p], row)
                    .map_err(sql)?
                    .collect::<Result<Vec<_>, _>>(),
                None => conn
                    .prepare_cached(
                        "SELECT platform, user_id, principal FROM bindings ORDER BY platform, user_id",
                    )
                    .map_err(sql)?
                    .query_map([], row)
                    .map_err(sql)?
                    .collect::<Result<Vec<_>, _>>(),
            };
            out.map_err(sql)
        })
        .await
    }

    async fn delete_idle(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM events WHERE conv_id IN
                 (SELECT id FROM conversations WHERE updated_ms < ?1)",
                params![before_ms],
            )
            .map_err(sql)?;
            conn.execute(
                "DELETE FROM active_conversations WHERE conv_id IN
                 (SELECT id FROM conversations WHERE updated_ms < ?1)",
                params![before_ms],
            )
            .map_err(sql)?;
            let n = conn
                .execute(
                    "DELETE FROM conversations WHERE updated_ms < ?1",
                    params![before_ms],
                )
                .map_err(sql)?;
            Ok(n as u64)
        })
        .await
    }

    async fn size_bytes(&self) -> Result<u64, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut total = 0;
            for suffix in ["", "-wal", "-shm"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                total += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            }
            total
        })
        .await
        .map_err(|e| StoreError::Backend(format!("hub store: size task failed: {e}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "chatcli-hub-test-{}-{name}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        dir.join("nested").join("hub.db")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_sqlite_store_passes_the_hub_store_suite() {
        let path = temp_db("suite");
        let store = Arc::new(SqliteHubStore::open(&path).unwrap());
        crate::state::hub::suite::run(store.clone(), "a").await;
        // A second run on the used store: the checks do not depend on an empty store.
        crate::state::hub::suite::run(store, "b").await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn data_survives_reopening_and_the_schema_is_versioned() {
        let path = temp_db("reopen");
        {
            let store = SqliteHubStore::open(&path).unwrap();
            store.new_conversation("p", "c", 1).await.unwrap();
            store
                .append(NewEvent {
                    conv_id: "c".into(),
                    role: "user".into(),
                    content: "kept".into(),
                    ts: 2,
                    ..NewEvent::default()
                })
                .await
                .unwrap();
        }
        let store = SqliteHubStore::open(&path).unwrap();
        let events = store.read("c", 0, 0).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].content, "kept");
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        drop(store);
        // A database from a newer chatcli is refused, naming the versions.
        conn.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(conn);
        let err = SqliteHubStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("schema version 99"), "{err}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn an_unopenable_path_is_a_clear_error() {
        let err = SqliteHubStore::open(Path::new("/proc/chatcli-no/hub.db"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/proc/chatcli-no"), "{err}");
    }
}
