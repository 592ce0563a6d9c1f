//! A real `redis-server` for tests: started on 127.0.0.1 with a free port and its own temporary
//! directory (no persistence), stopped when dropped. It can be stopped and started again on the
//! same port, to test what chatcli does while Redis is away and after it comes back.
//!
//! Needs Debian's `redis-server` package; `scripts/test.sh` installs it when it is missing. Without
//! it the helper panics with that instruction rather than letting a test pass without Redis.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started `redis-server` may take to answer `PING` before the test gives up.
const START_WAIT: Duration = Duration::from_secs(20);

/// A running `redis-server` (see the module docs).
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server without a password.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts a server that requires `password` (`requirepass`) when given.
    #[allow(clippy::panic)]
    pub fn start_with(password: Option<&str>) -> Self {
        let dir = tempfile::tempdir()
            .unwrap_or_else(|e| panic!("a temporary directory for redis-server: {e}"));
        let mut server = Self {
            child: None,
            port: 0,
            password: password.map(str::to_string),
            dir,
        };
        let mut last = String::new();
        // Another process may take the free port before redis-server binds it: try a few.
        for _ in 0..10 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// `redis://127.0.0.1:<port>/0`, without the password.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The temporary directory the server runs in (tests put password files and configs here).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Stops the server (SIGKILL, as a crash would); the port stays reserved for [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty (nothing was persisted).
    #[allow(clippy::panic)]
    pub fn restart(&mut self) {
        self.stop();
        let mut last = String::new();
        // The old socket may linger for a moment; a few tries cover it.
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}: {last}", self.port);
    }

    /// Runs one command (inline protocol) and returns the raw reply, e.g. `FLUSHALL` → `+OK\r\n`.
    #[allow(clippy::panic)]
    pub fn command(&self, line: &str) -> String {
        let mut s = TcpStream::connect(self.addr())
            .unwrap_or_else(|e| panic!("connecting to redis-server: {e}"));
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if let Some(p) = &self.password {
            let _ = write!(s, "AUTH {p}\r\n");
            let _ = read_reply(&mut s);
        }
        let _ = write!(s, "{line}\r\n");
        read_reply(&mut s)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                #[allow(clippy::panic)]
                {
                    panic!(
                        "redis-server is not installed; the Redis tests need a real server. \
                         Install Debian's package (`apt-get install redis-server`) or run \
                         scripts/test.sh, which installs it"
                    )
                }
            }
            Err(e) => return Err(format!("cannot run redis-server: {e}")),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("redis-server exited with {status}"));
            }
            if let Ok(mut s) = TcpStream::connect(self.addr()) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"PING\r\n");
                let reply = read_reply(&mut s);
                if reply.starts_with("+PONG") || reply.starts_with("-NOAUTH") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("no answer on port {} in {START_WAIT:?}", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_reply(s: &mut TcpStream) -> String {
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

#[allow(clippy::panic)]
fn free_port() -> u16 {
    // redis-server takes a port number, not a socket: ask the OS for a free one and hand it over.
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("binding port 0: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"))
        .port()
}
