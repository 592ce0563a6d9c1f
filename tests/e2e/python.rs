//! A second implementation talks to the real binary: `tests/python/peer.py` generates Python stubs
//! from our proto with grpcio-tools and checks Health, a v2 session round trip and a stream.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::{BinaryServer, demo_config};

const SETUP: &str =
    "python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt";

/// `$CHATCLI_TEST_PYTHON`, else `<repo>/.venv/bin/python`: the interpreter every Python peer runs on.
pub(crate) fn python() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidate = match std::env::var_os("CHATCLI_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo.join(".venv/bin/python"),
    };
    assert!(
        candidate.exists(),
        "no Python for the gRPC peer at {}: set CHATCLI_TEST_PYTHON to an interpreter with grpcio \
         and grpcio-tools, or create the venv in {}: `{SETUP}`",
        candidate.display(),
        repo.display()
    );
    candidate
}

#[tokio::test]
async fn python_peer_speaks_the_protocol() {
    let python = python();
    let server = BinaryServer::start(&demo_config(), &[]);
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/peer.py");
    let home = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(&python)
        .arg(&peer)
        .arg(server.addr.to_string())
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // Generating the stubs takes a few seconds; the bound only keeps a stuck peer from hanging.
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the python peer did not finish within 120s")
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python peer failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server stderr\n{}",
        out.status,
        server.stderr()
    );
    assert!(stdout.contains("peer: OK"), "{stdout}");
}
