#!/usr/bin/env python3
"""Checks the OCI image that docker/assemble-image.py wrote, the way a container engine would use it.

1. Layout: oci-layout, index.json, manifest, config and layers present, with the digests and sizes
   their descriptors claim, and diff_ids matching the uncompressed layers.
2. Config: user 65532, entrypoint ["/chatcli","server"], ports 50051/tcp and 9090/tcp, the OCI labels,
   and a HEALTHCHECK that runs `/chatcli healthcheck`.
3. Size: layers + config + manifest (compressed) under --max-mb.
4. Filesystem (unpacked by umoci when it is installed, an independent reader of the layout): no shell,
   /chatcli executable and static (no ELF interpreter, no DT_NEEDED).
5. Run (as root): in private network, mount and PID namespaces, the rootfs is mounted read-only with
   tmpfs on /tmp and /var/lib/chatcli, a config directory on /etc/chatcli holding the demo config as
   chatcli.toml, and a token in /run/secrets; the entrypoint runs chrooted as 65532:65532 with the
   image's environment and default ports. The image's own HEALTHCHECK command must report healthy,
   /readyz must answer, `chatcli healthcheck` against a dead port must exit 1 with one line, SIGTERM
   must end it with exit 0, and a missing secret file must stop it with exit 78 naming the file.
   Then the same with a config that turns TLS on: the image's HEALTHCHECK must report healthy
   (it reads the mounted config, as the server does). Without root, the binary runs unconfined on free ports instead (and says so).

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

REQUIRED_LABELS = [
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.base.name",
]
UID = 65532

failures: list[str] = []


def ok(msg: str) -> None:
    print(f"  ok    {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"  FAIL  {msg}", flush=True)
    failures.append(msg)


def check(cond: bool, msg: str, detail: str = "") -> bool:
    (ok if cond else fail)(msg if cond or not detail else f"{msg}: {detail}")
    return cond


# --- 1-3: layout, config, size -------------------------------------------------------------------


def blob(layout: Path, desc: dict) -> bytes:
    algo, _, hexd = desc["digest"].partition(":")
    data = (layout / "blobs" / algo / hexd).read_bytes()
    if hashlib.sha256(data).hexdigest() != hexd or len(data) != desc["size"]:
        raise ValueError(f"blob {desc['digest']} does not match its descriptor (digest or size)")
    return data


def check_layout(layout: Path, tag: str, max_mb: float) -> dict | None:
    print("image layout and config")
    try:
        if json.loads((layout / "oci-layout").read_text()).get("imageLayoutVersion") != "1.0.0":
            raise ValueError("oci-layout: imageLayoutVersion is not 1.0.0")
        index = json.loads((layout / "index.json").read_text())
        descs = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
        if len(descs) != 1:
            raise ValueError(f"index.json has {len(descs)} manifests named {tag!r}")
        manifest = json.loads(blob(layout, descs[0]))
        config = json.loads(blob(layout, manifest["config"]))
        diff_ids = []
        for layer in manifest["layers"]:
            if layer["mediaType"] != "application/vnd.oci.image.layer.v1.tar+gzip":
                raise ValueError(f"layer {layer['digest']} has media type {layer['mediaType']}")
            diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(blob(layout, layer))).hexdigest())
        if diff_ids != config["rootfs"]["diff_ids"]:
            raise ValueError("rootfs.diff_ids do not match the uncompressed layers")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        fail(f"layout: {e}")
        return None
    ok(f"layout valid: {len(manifest['layers'])} layers, every digest, size and diff_id matches")

    c = config.get("config", {})
    check(config.get("os") == "linux" and config.get("architecture") == "amd64", "platform linux/amd64", f"{config.get('os')}/{config.get('architecture')}")
    check(str(c.get("User", "")).split(":")[0] == str(UID), f"user {UID} (non-root)", f"User={c.get('User')!r}")
    check(c.get("Entrypoint") == ["/chatcli", "server"], 'entrypoint ["/chatcli","server"]', f"Entrypoint={c.get('Entrypoint')!r}")
    ports = set(c.get("ExposedPorts", {}))
    check(ports == {"50051/tcp", "9090/tcp"}, "exposed ports 50051/tcp and 9090/tcp", f"ExposedPorts={sorted(ports)}")
    labels = c.get("Labels", {})
    missing = [k for k in REQUIRED_LABELS if not labels.get(k)]
    check(not missing, f"OCI labels present ({len(REQUIRED_LABELS)})", f"missing or empty: {missing}")
    hc = c.get("Healthcheck", {}).get("Test", [])
    check(hc[:3] == ["CMD", "/chatcli", "healthcheck"], "HEALTHCHECK runs /chatcli healthcheck", f"Healthcheck.Test={hc!r}")

    total = sum(layer["size"] for layer in manifest["layers"]) + manifest["config"]["size"] + descs[0]["size"]
    check(total < max_mb * 1e6, f"compressed image {total / 1e6:.1f} MB < {max_mb:g} MB", f"{total / 1e6:.1f} MB")
    return {"manifest": manifest, "config": config}


# --- 4: filesystem ------------------------------------------------------------------------------


def unpack(layout: Path, tag: str, image: dict, dest: Path) -> Path | None:
    if shutil.which("umoci") and os.geteuid() == 0:
        bundle = dest / "bundle"
        r = subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], capture_output=True, text=True)
        if not check(r.returncode == 0, "umoci unpacks the layout", r.stderr.strip()[-400:]):
            return None
        spec = json.loads((bundle / "config.json").read_text())
        proc = spec.get("process", {})
        check(proc.get("user", {}).get("uid") == UID and proc.get("args") == ["/chatcli", "server"],
              "umoci's runtime spec: uid 65532, args /chatcli server", f"user={proc.get('user')} args={proc.get('args')}")
        return bundle / "rootfs"
    rootfs = dest / "rootfs"
    rootfs.mkdir()
    for layer in image["manifest"]["layers"]:
        with tarfile.open(fileobj=__import__("io").BytesIO(blob(layout, layer)), mode="r:gz") as tf:
            try:
                tf.extractall(rootfs, numeric_owner=True, filter="fully_trusted" if os.geteuid() == 0 else "data")
            except TypeError:  # Python before 3.11.4 has no extraction filters
                tf.extractall(rootfs, numeric_owner=True)
    ok("layers unpacked with Python's tarfile (umoci not installed, or not root)")
    return rootfs


def elf_dynamic_deps(path: Path) -> tuple[bool, int]:
    """(has an ELF interpreter, number of DT_NEEDED entries) of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    interp, needed = False, 0
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            interp = True
        elif p_type == 2:  # PT_DYNAMIC
            for off in range(p_offset, p_offset + p_filesz, 16):
                tag, _ = struct.unpack_from("<qQ", data, off)
                if tag == 0:
                    break
                needed += tag == 1  # DT_NEEDED
    return interp, needed


def check_rootfs(rootfs: Path) -> bool:
    print("image filesystem")
    check(not (rootfs / "bin" / "sh").exists() and not (rootfs / "usr" / "bin" / "sh").exists(), "no shell in the image")
    binary = rootfs / "chatcli"
    if not check(binary.is_file() and os.access(binary, os.X_OK), "/chatcli is an executable file"):
        return False
    try:
        interp, needed = elf_dynamic_deps(binary)
    except (OSError, ValueError) as e:
        return check(False, "/chatcli is a static ELF binary", str(e))
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True) if shutil.which("ldd") else None
    said = (ldd.stdout + ldd.stderr).strip().splitlines()[0] if ldd else "ldd not installed"
    return check(not interp and needed == 0, f"/chatcli is static (no interpreter, no DT_NEEDED; ldd: {said.strip()})",
                 f"interpreter={interp}, DT_NEEDED={needed}, ldd: {said.strip()}")


# --- 5: run -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_health_probe(addr: str) -> tuple[int, str]:
    """grpc.health.v1 Check with an empty service name, over grpcio (used only if the binary has no
    `healthcheck` subcommand yet)."""
    try:
        import grpc  # type: ignore
    except ImportError:
        return 1, "grpcio is not installed"
    try:
        with grpc.insecure_channel(addr) as ch:
            reply = ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=3)
    except grpc.RpcError as e:
        return 1, f"health check failed: {e.code().name}"
    status = reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0
    return (0, "SERVING") if status == 1 else (1, f"status {status}")


class Runner:
    def __init__(self, rootfs: Path, image: dict, confined: bool, python_probe: bool):
        self.rootfs = rootfs
        self.cfg = image["config"]["config"]
        self.confined = confined
        self.python_probe = python_probe
        self.env = dict(e.split("=", 1) for e in self.cfg.get("Env", []))
        self.env["HOME"] = "/home/nonroot"
        self.workdir = self.cfg.get("WorkingDir") or "/"

    def _preexec(self):
        if self.confined:
            def go():
                os.chroot(self.rootfs)
                os.chdir(self.workdir)
                os.setgroups([])
                os.setgid(UID)
                os.setuid(UID)
            return go
        return None

    def path(self, p: str) -> str:
        return p if self.confined else str(self.rootfs / p.lstrip("/"))

    def popen(self, args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        args = [self.path(args[0])] + args[1:]
        return subprocess.Popen(args, env=env, preexec_fn=self._preexec(),
                                cwd=None if self.confined else tempfile.mkdtemp(), **kw)

    def run(self, args: list[str], env: dict[str, str], timeout: float = 15) -> subprocess.CompletedProcess:
        p = self.popen(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        return subprocess.CompletedProcess(args, p.returncode, out, err)


def wait_healthy(r: Runner, server: subprocess.Popen, health_cmd: list[str], env: dict[str, str],
                 addr: str) -> tuple[bool, str, str]:
    """Runs the health command every half second for up to 30 s while the server runs, as a container
    engine runs a HEALTHCHECK: inside the container, with its environment. Returns whether it said
    healthy, its last words, and what probed (the image's HEALTHCHECK, or the Python probe when the
    binary has no `healthcheck` and --python-probe allows it)."""
    last, used = "", "image HEALTHCHECK"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        h = r.run(health_cmd, env, timeout=10)
        if h.returncode == 64 or "unrecognized subcommand" in h.stderr:
            if not r.python_probe:
                return False, "this binary has no `healthcheck` subcommand", used
            used = "Python grpc.health.v1 probe (binary has no `healthcheck` yet)"
            code, last = python_health_probe(addr)
        else:
            code, last = h.returncode, (h.stdout + h.stderr).strip()
        if code == 0:
            return True, last, used
        time.sleep(0.5)
    return False, last, used


def run_checks(r: Runner, secrets: Path, grpc_port: int, metrics_port: int, extra_args: list[str]) -> None:
    print("running the image" + (" (chrooted as 65532, read-only rootfs, private namespaces)" if r.confined else " (unconfined: not root)"))
    token = secrets / "token"
    token.write_text("image-check-token\n")
    token.chmod(0o400)
    if os.geteuid() == 0:
        os.chown(token, UID, UID)
    env = dict(r.env, CHATCLI_SERVER_TOKEN_FILE="token")
    if not r.confined:
        env["CREDENTIALS_DIRECTORY"] = str(secrets)
    log = tempfile.TemporaryFile(mode="w+")
    argv = r.cfg["Entrypoint"] + r.cfg.get("Cmd", []) + extra_args
    server = r.popen(argv, env, stdout=log, stderr=subprocess.STDOUT)
    health_cmd = r.cfg["Healthcheck"]["Test"][1:]
    addr = f"127.0.0.1:{grpc_port}"
    if grpc_port != 50051:
        health_cmd = health_cmd + ["--addr", addr]
    try:
        healthy, last, used = wait_healthy(r, server, health_cmd, env, addr)
        check(healthy, f"healthy by the {used} ({last})", f"not healthy: {last!r}")
        if server.poll() is None and r.confined:
            status = Path(f"/proc/{server.pid}/status").read_text()
            uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            check(uid == str(UID), "the server process runs as uid 65532", f"uid {uid}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as resp:
                body = resp.read().decode().strip()
                check(resp.status == 200, f"/readyz on the metrics port answers 200 ({body})", f"{resp.status} {body}")
        except OSError as e:
            fail(f"/readyz on the metrics port: {e}")
        if used == "image HEALTHCHECK":
            dead = r.run(["/chatcli", "healthcheck", "--addr", "127.0.0.1:1"], env, timeout=15)
            lines = (dead.stdout + dead.stderr).strip().splitlines()
            check(dead.returncode == 1 and len(lines) == 1, f"healthcheck against a dead port exits 1 with one line ({lines[0] if lines else ''})",
                  f"exit {dead.returncode}, output {lines!r}")
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=40)
            check(code == 0, "SIGTERM drains and exits 0", f"exit {code}")
        except subprocess.TimeoutExpired:
            fail("SIGTERM: still running after 40s")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.seek(0)
        output = log.read()
        if r.confined:
            check("/etc/chatcli/chatcli.toml" in output and "listening on" in output,
                  "it read the mounted /etc/chatcli/chatcli.toml (the default path) and logged `listening on`")
        if failures:
            print("  --- server output ---\n" + "\n".join("  | " + line for line in output.splitlines()[-30:]))

    bad = r.run(argv, dict(env, CHATCLI_SERVER_TOKEN_FILE="no-such-secret"), timeout=15)
    named = "no-such-secret" in bad.stderr
    check(bad.returncode == 78 and named, "a missing secret file stops it with exit 78 naming the file",
          f"exit {bad.returncode}, stderr {bad.stderr.strip()[-300:]!r}")


def run_phase(args: argparse.Namespace, image: dict, rootfs: Path) -> None:
    """Inside `unshare --net --mount --pid --fork`: set up the container's mounts, then run."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="chatcli-image-run-"))
    confdir, secrets = work / "config", work / "secrets"
    confdir.mkdir()
    secrets.mkdir()
    shutil.copyfile(args.demo_config, confdir / "chatcli.toml")
    for d in ("proc", "dev", "etc/chatcli", "run/secrets"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    mounts = [
        ["--bind", str(rootfs), str(rootfs)],
        ["-o", "remount,bind,ro", str(rootfs)],
        ["-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(rootfs / "tmp")],
        ["-t", "tmpfs", "-o", f"mode=0700,uid={UID},gid={UID}", "tmpfs", str(rootfs / "var/lib/chatcli")],
        ["-t", "proc", "proc", str(rootfs / "proc")],
        ["--rbind", "/dev", str(rootfs / "dev")],
        ["--bind", "-o", "ro", str(confdir), str(rootfs / "etc/chatcli")],
        ["--bind", str(secrets), str(rootfs / "run/secrets")],
    ]
    for m in mounts:
        subprocess.run(["mount", *m], check=True)
    os.chown(secrets, UID, UID)
    runner = Runner(rootfs, image, confined=True, python_probe=args.python_probe)
    # The image's default ports: nothing else listens in this network namespace.
    run_checks(runner, secrets, 50051, 9090, [])
    run_tls_healthcheck(runner, secrets, confdir, Path(args.demo_config))


def run_tls_healthcheck(r: Runner, secrets: Path, confdir: Path, demo_config: Path) -> None:
    """The image's HEALTHCHECK against a server that speaks TLS: the probe reads the same config
    (the mounted /etc/chatcli/chatcli.toml) and so knows the port and that TLS is on."""
    print("running the image with a TLS config (its HEALTHCHECK must follow the config)")
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(confdir / "tls.key"), "-out", str(confdir / "tls.crt")],
        capture_output=True, text=True)
    if made.returncode != 0:
        fail(f"openssl could not make a test certificate: {made.stderr.strip()[-300:]}")
        return
    os.chown(confdir / "tls.key", UID, UID)
    (confdir / "tls.key").chmod(0o400)
    (confdir / "chatcli.toml").write_text(
        demo_config.read_text()
        + '\n[server.tls]\ncert_file = "/etc/chatcli/tls.crt"\nkey_file = "/etc/chatcli/tls.key"\n')
    env = dict(r.env, CHATCLI_SERVER_TOKEN_FILE="token")
    argv = r.cfg["Entrypoint"] + r.cfg.get("Cmd", [])
    log = tempfile.TemporaryFile(mode="w+")
    server = r.popen(argv, env, stdout=log, stderr=subprocess.STDOUT)
    try:
        healthy, last, _ = wait_healthy(r, server, r.cfg["Healthcheck"]["Test"][1:], env, "127.0.0.1:50051")
        check(healthy, f"healthy over TLS by the image HEALTHCHECK ({last})", f"not healthy over TLS: {last!r}")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=40)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if failures:
            log.seek(0)
            print("  --- server output ---\n" + "\n".join("  | " + line for line in log.read().splitlines()[-20:]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--demo-config", default=str(Path(__file__).resolve().parent.parent / "config" / "demo.toml"))
    p.add_argument("--max-mb", type=float, default=25)
    p.add_argument("--python-probe", action="store_true", help="fall back to a grpcio health probe when the binary has no `healthcheck`")
    p.add_argument("--no-run", action="store_true", help="static checks only")
    p.add_argument("--run-phase", help=argparse.SUPPRESS)
    args = p.parse_args()
    layout = Path(args.layout)

    if args.run_phase:  # re-executed inside the namespaces
        image = check_layout_quiet(layout, args.tag)
        run_phase(args, image, Path(args.run_phase))
        return 1 if failures else 0

    image = check_layout(layout, args.tag, args.max_mb)
    if image is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="chatcli-image-") as tmp:
        rootfs = unpack(layout, args.tag, image, Path(tmp))
        if rootfs is None or not check_rootfs(rootfs) or args.no_run:
            return 1 if failures else 0
        if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
            cmd = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, __file__,
                   "--layout", str(layout), "--tag", args.tag, "--demo-config", args.demo_config, "--run-phase", str(rootfs)]
            if args.python_probe:
                cmd.append("--python-probe")
            rc = subprocess.run(cmd).returncode
            if rc != 0:
                failures.append("run phase")
        else:
            runner = Runner(rootfs, image, confined=False, python_probe=args.python_probe)
            secrets = Path(tmp) / "secrets"
            secrets.mkdir()
            g, m = free_port(), free_port()
            runner.env.update(CHATCLI_BIND_ADDRESS="127.0.0.1", CHATCLI_METRICS__BIND_ADDRESS="127.0.0.1")
            for k in ("CHATCLI_DATA_DIR", "SSL_CERT_FILE"):  # image paths, seen from outside the image
                if runner.env.get(k, "").startswith("/"):
                    runner.env[k] = str(rootfs / runner.env[k].lstrip("/"))
            run_checks(runner, secrets, g, m, ["--config", args.demo_config, "--port", str(g), "--metrics-port", str(m)])
    if failures:
        print(f"image check failed: {len(failures)} problem(s)")
        return 1
    print("image check passed")
    return 0


def check_layout_quiet(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads(blob(layout, desc))
    return {"manifest": manifest, "config": json.loads(blob(layout, manifest["config"]))}


if __name__ == "__main__":
    sys.exit(main())
