#!/usr/bin/env python3
"""Runs the chatcli binary the way systemd/chatcli.service runs it, without systemd as PID 1.

The unit's Environment= lines (with %E, %S, %L expanded under a scratch root), its
Configuration/State/LogsDirectory, its LoadCredential= mapping (credstore file chatcli.NAME →
$CREDENTIALS_DIRECTORY/NAME, a missing one skipped as systemd does), NOTIFY_SOCKET and
WATCHDOG_USEC are set up as systemd would; as root the daemon runs as an unprivileged uid, like
DynamicUser=. Then:

* READY=1 arrives over the notify socket, then WATCHDOG=1 keep-alives;
* `chatcli healthcheck` reports SERVING; the log file is written under LogsDirectory; `config show`
  with the same environment puts the data dir under StateDirectory and reads the token credential;
* ExecReload's SIGHUP leaves it serving; SIGTERM sends STOPPING=1 and exits 0 in TimeoutStopSec;
* without the token credential it exits 78 naming the missing file (no crash loop:
  RestartPreventExitStatus has 78 and 73);
* with systemd/chatcli.socket's activation (systemd-socket-activate passing fd 3), when the binary's
  `server --help` mentions LISTEN_FDS, it serves on the passed socket.

    check_unit_env.py --unit systemd/chatcli.service --binary PATH --demo-config config/demo.toml
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RUN_UID = 61873  # stands in for a DynamicUser= uid
failures: list[str] = []


def ok(msg: str) -> None:
    print(f"  ok    {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"  FAIL  {msg}", flush=True)
    failures.append(msg)


def check(cond: bool, msg: str, detail: str = "") -> bool:
    (ok if cond else fail)(msg if cond or not detail else f"{msg}: {detail}")
    return cond


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min|m|h)?", text)
    if not m:
        raise ValueError(f"cannot read duration {text!r}")
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "min": 60, "m": 60, "h": 3600}[m.group(2)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Notify:
    """An sd_notify socket: collects the datagrams the daemon sends."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)
        self.messages: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                self.messages.append((time.monotonic(), line))

    def wait_for(self, line: str, timeout: float, after: float = 0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m == line and t >= after for t, m in self.messages):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.sock.close()


class Scratch:
    """The directories systemd would give the service, under one scratch root."""

    def __init__(self, root: Path, unit: dict[str, list[str]], demo: Path, as_root: bool):
        self.root = root
        self.uid = RUN_UID if as_root else os.getuid()
        spec = {"%E": root / "etc", "%S": root / "var/lib", "%L": root / "var/log", "%t": root / "run", "%%": "%"}
        self.env: dict[str, str] = {}
        for line in unit.get("Environment", []):
            for item in re.findall(r'"[^"]*"|\S+', line):
                k, _, v = item.strip('"').partition("=")
                for s, repl in spec.items():
                    v = v.replace(s, str(repl))
                if "%" in v:
                    raise ValueError(f"Environment={item}: specifier this check does not know")
                self.env[k] = v
        for key, base, mode, owned in (("ConfigurationDirectory", "etc", 0o755, False),
                                       ("StateDirectory", "var/lib", 0o700, True),
                                       ("LogsDirectory", "var/log", 0o700, True)):
            for name in " ".join(unit.get(key, [])).split():
                d = root / base / name
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(mode)
                if owned and as_root:
                    os.chown(d, self.uid, self.uid)
        self.credstore = root / "etc/credstore"
        self.credstore.mkdir(parents=True)
        self.creds = root / "run/credentials/chatcli.service"
        self.load_credential = [tuple(v.split(":", 1)) if ":" in v else (v, v) for v in unit.get("LoadCredential", [])]
        config = Path(self.env["CHATCLI_CONFIG"])
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(demo.read_text() + '\n[auth]\n# Read from $CREDENTIALS_DIRECTORY (LoadCredential=token:chatcli.token).\ntoken_file = "token"\n')
        config.chmod(0o644)
        self.notify = Notify(root / "notify.sock")
        (root / "run").mkdir(exist_ok=True)
        root.chmod(0o755)
        for p in (root / "etc", root / "var", root / "var/lib", root / "var/log", root / "run"):
            p.chmod(0o755)

    def credentials(self) -> None:
        """What systemd does at start: copy each LoadCredential= source that exists."""
        if self.creds.exists():
            shutil.rmtree(self.creds)
        self.creds.mkdir(parents=True)
        for cred_id, source in self.load_credential:
            src = Path(source) if source.startswith("/") else self.credstore / source
            if src.exists():
                dst = self.creds / cred_id
                shutil.copyfile(src, dst)
                dst.chmod(0o400)
                if os.geteuid() == 0:
                    os.chown(dst, self.uid, self.uid)
        self.creds.chmod(0o500)
        if os.geteuid() == 0:
            os.chown(self.creds, self.uid, self.uid)

    def process_env(self, watchdog_usec: int | None) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8",
               "CREDENTIALS_DIRECTORY": str(self.creds), "NOTIFY_SOCKET": str(self.notify.path), **self.env}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def preexec(self):
        if os.geteuid() != 0:
            return None
        uid = self.uid

        def drop():
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        return drop


def healthcheck(binary: Path, port: int, scratch: Scratch) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), "healthcheck", "--addr", f"127.0.0.1:{port}", "--timeout", "5"],
                          capture_output=True, text=True, timeout=20, preexec_fn=scratch.preexec())


def wait_healthy(binary: Path, port: int, scratch: Scratch, proc: subprocess.Popen, timeout: float = 20) -> str:
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        h = healthcheck(binary, port, scratch)
        last = (h.stdout + h.stderr).strip()
        if h.returncode == 0:
            return ""
        time.sleep(0.3)
    return last or "process exited"


def run(args: argparse.Namespace) -> None:
    unit_path, binary = Path(args.unit), Path(args.binary).resolve()
    unit = parse_unit(unit_path)
    service = unit.get("Service", {})
    as_root = os.geteuid() == 0
    stop_timeout = seconds(service.get("TimeoutStopSec", ["90s"])[-1])
    print(f"unit environment: {unit_path} run as " + (f"uid {RUN_UID} (DynamicUser stand-in)" if as_root else "the current user"))
    with tempfile.TemporaryDirectory(prefix="chatcli-unit-") as tmp:
        root = Path(tmp)
        sc = Scratch(root, service, Path(args.demo_config), as_root)
        check("token" in dict(sc.load_credential), "the unit loads a `token` credential (LoadCredential=token:…)", str(sc.load_credential))
        (sc.credstore / "chatcli.token").write_text("unit-check-token\n")
        sc.credentials()
        grpc, metrics = free_port(), free_port()
        flags = ["--port", str(grpc), "--metrics-port", str(metrics)]

        show = subprocess.run([str(binary), "config", "show", *flags], env=sc.process_env(None), capture_output=True, text=True,
                              preexec_fn=sc.preexec(), timeout=30)
        data_dir = str(root / "var/lib/chatcli")
        check(show.returncode == 0 and f'data_dir = "{data_dir}"' in show.stdout,
              "config show: CHATCLI_CONFIG read, data dir in StateDirectory, token from the credentials directory",
              f"exit {show.returncode}: {show.stderr.strip()[-300:]}")

        log_path = Path(sc.env.get("CHATCLI_LOG_FILE", root / "missing.log"))
        out = tempfile.TemporaryFile(mode="w+")
        started = time.monotonic()
        proc = subprocess.Popen([str(binary), "server", *flags], env=sc.process_env(2_000_000), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=sc.preexec())
        try:
            check(sc.notify.wait_for("READY=1", 20), "sd_notify READY=1 (Type=notify)")
            check(sc.notify.wait_for("WATCHDOG=1", 5, after=started), "sd_notify WATCHDOG=1 keep-alives (WatchdogSec)")
            why = wait_healthy(binary, grpc, sc, proc)
            check(not why, "chatcli healthcheck: SERVING", why)
            time.sleep(0.3)
            log_text = log_path.read_text() if log_path.exists() else ""
            check("listening on" in log_text, f"log file written in LogsDirectory ({log_path.relative_to(root)})",
                  "missing" if not log_path.exists() else "no `listening on` line")
            proc.send_signal(signal.SIGHUP)  # ExecReload=kill -HUP $MAINPID
            time.sleep(1.0)
            why = wait_healthy(binary, grpc, sc, proc, timeout=10)
            check(proc.poll() is None and not why, "ExecReload (SIGHUP) keeps it serving", why or f"exit {proc.returncode}")
            stop_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=stop_timeout)
                check(code == 0, f"SIGTERM: exit 0 in {time.monotonic() - stop_at:.1f}s (TimeoutStopSec={stop_timeout:g}s)", f"exit {code}")
            except subprocess.TimeoutExpired:
                fail(f"SIGTERM: still running after TimeoutStopSec={stop_timeout:g}s")
            check(sc.notify.wait_for("STOPPING=1", 2, after=stop_at), "sd_notify STOPPING=1 on SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if failures:
                out.seek(0)
                print("  --- daemon output ---\n" + "\n".join("  | " + line for line in out.read().splitlines()[-25:]))

        (sc.credstore / "chatcli.token").unlink()
        sc.credentials()
        bad = subprocess.run([str(binary), "server", *flags], env=sc.process_env(None), capture_output=True, text=True,
                             preexec_fn=sc.preexec(), timeout=30)
        check(bad.returncode == 78 and str(sc.creds / "token") in bad.stderr,
              "without the token credential: exit 78 naming the missing file", f"exit {bad.returncode}: {bad.stderr.strip()[-300:]}")
        prevented = " ".join(service.get("RestartPreventExitStatus", [])).split()
        check("78" in prevented and "73" in prevented,
              "RestartPreventExitStatus has 78 and 73: no restart loop on a bad config or an unwritable log/audit path")

        help_text = subprocess.run([str(binary), "server", "--help"], capture_output=True, text=True).stdout
        if "LISTEN_FDS" not in help_text and b"LISTEN_FDS" not in binary.read_bytes():
            print("  skip  socket activation: this build does not read LISTEN_FDS")
            return
        activate = shutil.which("systemd-socket-activate")
        if not activate:
            fail("socket activation: systemd-socket-activate is not installed")
            return
        (sc.credstore / "chatcli.token").write_text("unit-check-token\n")
        sc.credentials()
        sock_port, other = free_port(), free_port()
        env_args = [f"-E{k}={v}" for k, v in sc.process_env(None).items()]
        proc = subprocess.Popen([activate, "-l", f"127.0.0.1:{sock_port}", "--fdname=grpc", *env_args, str(binary), "server",
                                 "--port", str(other), "--metrics-port", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=sc.preexec())
        try:
            time.sleep(0.5)
            why = wait_healthy(binary, sock_port, sc, proc)
            check(not why, "socket activation: serves on the listener passed as fd 3 (LISTEN_FDS)", why)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sc.notify.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unit", required=True)
    p.add_argument("--binary", required=True)
    p.add_argument("--demo-config", required=True)
    args = p.parse_args()
    try:
        run(args)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        fail(f"{type(e).__name__}: {e}")
    if failures:
        print(f"unit environment check failed: {len(failures)} problem(s)")
        return 1
    print("unit environment check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
