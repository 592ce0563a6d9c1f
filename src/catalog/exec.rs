//! Running a plugin executable in a small sandbox: an argv (never a shell), a cleared environment
//! plus the allowed variables, a fresh temporary working folder, its own process group, a deadline,
//! and stdout and stderr each kept up to a cap (the rest is read and dropped, so the plugin never
//! blocks on a full pipe). On timeout, on cancellation (the server shutting down) and when the
//! future is dropped (the client went away), the whole process group is killed.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The bounds of one run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest run before the process group is killed.
    pub timeout: Duration,
    /// Bytes of stdout, and again of stderr, kept.
    pub max_output: usize,
    /// The whole environment the plugin sees.
    pub env: Vec<(String, String)>,
}

/// One stream of a run: the kept bytes and how many were written in all.
#[derive(Debug, Default, Clone)]
pub struct Captured {
    /// The first `max_output` bytes.
    pub bytes: Vec<u8>,
    /// Everything the plugin wrote to the stream.
    pub total: u64,
}

impl Captured {
    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }

    /// The kept text (invalid UTF-8 replaced), with a line saying how much was dropped.
    pub fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.bytes).into_owned();
        if self.truncated() {
            s.push_str(&format!(
                "\n[output truncated: {} bytes written, the first {} kept]",
                self.total,
                self.bytes.len()
            ));
        }
        s
    }
}

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Receives the kept output of a run as it is read (nothing past the cap).
pub type Sink = tokio::sync::mpsc::UnboundedSender<(Pipe, Vec<u8>)>;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The plugin exited.
    Exited(ExitStatus),
    /// The deadline passed; the process group was killed.
    TimedOut,
    /// The run was cancelled (server shutdown); the process group was killed.
    Cancelled,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Standard output.
    pub stdout: Captured,
    /// Standard error.
    pub stderr: Captured,
    /// How it ended.
    pub ending: Ending,
}

/// Kills a process group when dropped while armed: the run did not reach its normal end.
struct GroupGuard {
    pgid: Option<i32>,
}

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// "Text file busy": another thread forked while a freshly written executable was still open for
/// writing in that child; it clears as soon as the child execs.
const ETXTBSY: i32 = 26;

/// Runs `program` with `args` under `limits`, until it exits, the deadline passes or `cancel` fires.
pub async fn run(
    program: &Path,
    args: &[String],
    limits: &Limits,
    cancel: &CancellationToken,
) -> std::io::Result<RunOutput> {
    run_with(program, args, limits, cancel, None).await
}

/// [`run`], also sending the kept output to `sink` as it is read.
pub async fn run_with(
    program: &Path,
    args: &[String],
    limits: &Limits,
    cancel: &CancellationToken,
    sink: Option<Sink>,
) -> std::io::Result<RunOutput> {
    let workdir = tempfile::Builder::new()
        .prefix("chatcli-plugin-run-")
        .tempdir()?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(limits.env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut attempt = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            other => break other?,
        }
    };
    // Declared after `child`, so dropped before it: the group is killed while its leader is not
    // yet reaped, so its id cannot have been reused.
    let mut group = GroupGuard {
        pgid: child.id().and_then(|id| i32::try_from(id).ok()),
    };
    let cap = limits.max_output;
    let mut out_task = reader(
        child.stdout.take(),
        cap,
        sink.clone().map(|s| (s, Pipe::Stdout)),
    );
    let mut err_task = reader(child.stderr.take(), cap, sink.map(|s| (s, Pipe::Stderr)));
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let finished = tokio::select! {
        r = async {
            let status = child.wait().await;
            let out = (&mut out_task).await;
            let err = (&mut err_task).await;
            (status, out, err)
        } => Some(r),
        _ = tokio::time::sleep_until(deadline) => None,
        _ = cancel.cancelled() => None,
    };
    match finished {
        Some((status, out, err)) => {
            // Normal end: the leader is reaped, so the group id is not signalled any more.
            group.pgid = None;
            Ok(RunOutput {
                stdout: out.unwrap_or_default(),
                stderr: err.unwrap_or_default(),
                ending: Ending::Exited(status?),
            })
        }
        None => {
            let ending = match cancel.is_cancelled() {
                true => Ending::Cancelled,
                false => Ending::TimedOut,
            };
            group.kill();
            let _ = child.kill().await;
            // A process that left the group could keep the pipes open: do not wait for it.
            let grace = Duration::from_secs(2);
            let stdout = collect(out_task, grace).await;
            let stderr = collect(err_task, grace).await;
            Ok(RunOutput {
                stdout,
                stderr,
                ending,
            })
        }
    }
}

fn reader(
    pipe: Option<impl AsyncRead + Unpin + Send + 'static>,
    cap: usize,
    sink: Option<(Sink, Pipe)>,
) -> JoinHandle<Captured> {
    tokio::spawn(async move {
        match pipe {
            Some(p) => read_capped(p, cap, sink).await,
            None => Captured::default(),
        }
    })
}

async fn collect(mut task: JoinHandle<Captured>, grace: Duration) -> Captured {
    match tokio::time::timeout(grace, &mut task).await {
        Ok(r) => r.unwrap_or_default(),
        Err(_) => {
            task.abort();
            Captured::default()
        }
    }
}

/// Reads `r` to its end, keeping the first `cap` bytes (and sending them to `sink`).
async fn read_capped(
    mut r: impl AsyncRead + Unpin,
    cap: usize,
    sink: Option<(Sink, Pipe)>,
) -> Captured {
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                let room = cap.saturating_sub(kept.len());
                let piece = &buf[..n.min(room)];
                if let Some((tx, pipe)) = &sink
                    && !piece.is_empty()
                {
                    let _ = tx.send((*pipe, piece.to_vec()));
                }
                kept.extend_from_slice(piece);
            }
        }
    }
    Captured { bytes: kept, total }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn limits(timeout: Duration, max_output: usize) -> Limits {
        Limits {
            timeout,
            max_output,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        }
    }

    #[tokio::test]
    async fn argv_env_and_workdir_are_the_sandbox() {
        let d = tempfile::tempdir().unwrap();
        let p = script(
            d.path(),
            "p",
            "printf '%s|' \"$@\"; echo; env | sort; pwd; echo oops >&2; exit 3",
        );
        // The test process's own environment does not leak: HOME is set for it but not allowed.
        let out = run(
            &p,
            &["a b".into(), "$(id)".into(), ";x".into()],
            &limits(Duration::from_secs(10), 1 << 20),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let text = out.stdout.text();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("a b|$(id)|;x|"));
        assert!(text.contains("PATH=/usr/bin:/bin"), "{text}");
        assert!(!text.contains("HOME="), "{text}");
        assert!(text.contains("chatcli-plugin-run-"), "{text}");
        assert_eq!(out.stderr.text(), "oops\n");
        match out.ending {
            Ending::Exited(s) => assert_eq!(s.code(), Some(3)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn output_over_the_cap_is_dropped_and_marked() {
        let d = tempfile::tempdir().unwrap();
        let p = script(d.path(), "big", "head -c 3000000 /dev/zero | tr '\\0' 'x'");
        let out = run(
            &p,
            &[],
            &limits(Duration::from_secs(30), 1000),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.stdout.bytes.len(), 1000);
        assert_eq!(out.stdout.total, 3_000_000);
        assert!(out.stdout.text().ends_with("the first 1000 kept]"));
        assert!(matches!(out.ending, Ending::Exited(s) if s.success()));
    }

    /// Waits until the pid file is written (a line with its newline).
    async fn written(p: &Path) {
        while !std::fs::read_to_string(p).is_ok_and(|t| t.ends_with('\n')) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn alive(pid: i32) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
    }

    #[tokio::test]
    async fn timeout_and_cancel_kill_the_whole_group() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        let p = script(
            d.path(),
            "hang",
            &format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
        );
        let out = run(
            &p,
            &[],
            &limits(Duration::from_secs(2), 1000),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.ending, Ending::TimedOut);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!alive(pid), "the background sleep {pid} survived");

        std::fs::remove_file(&pidfile).unwrap();
        let cancel = CancellationToken::new();
        let (c2, pf) = (cancel.clone(), pidfile.clone());
        tokio::spawn(async move {
            written(&pf).await;
            c2.cancel();
        });
        let out = run(&p, &[], &limits(Duration::from_secs(60), 1000), &cancel)
            .await
            .unwrap();
        assert_eq!(out.ending, Ending::Cancelled);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!alive(pid), "the background sleep {pid} survived");
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_group() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        let p = script(
            d.path(),
            "hang",
            &format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
        );
        let l = limits(Duration::from_secs(60), 1000);
        let cancel = CancellationToken::new();
        tokio::select! {
            r = run(&p, &[], &l, &cancel) => panic!("the run ended: {r:?}"),
            _ = written(&pidfile) => {}
        }
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!alive(pid), "the background sleep {pid} survived");
    }
}
