#!/usr/bin/env python3
"""Assembles the chatcli container image as an OCI image layout without a container engine.

The image is the one docker/Dockerfile describes: its final stage's LABEL, ENV, USER, EXPOSE,
HEALTHCHECK, WORKDIR and ENTRYPOINT/CMD are read from that file, and its COPY lines are turned into
files (`/chatcli` from --binary, a destination ending in `/` as an empty directory with the
`--chown` owner). Anything else in the final stage is refused, so this script cannot silently drift
from the Dockerfile. The base layer stands in for gcr.io/distroless/static-debian12:nonroot: the CA
bundle, passwd/group with the nonroot user (65532), nsswitch.conf, /tmp and /home/nonroot.

The output is reproducible: entries are sorted, owners numeric, times fixed (SOURCE_DATE_EPOCH, else
0) and gzip headers carry no name or time, so the same inputs give the same digests.

    docker/assemble-image.py --binary target/pgo/chatcli \
        --out target/shipping/oci --tag 0.1.0

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import sys
import tarfile
import time
from pathlib import Path

BASE_IMAGE = "gcr.io/distroless/static-debian12:nonroot"
# What the distroless base image sets in its own config.
BASE_ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
]
BASE_WORKDIR = "/home/nonroot"
PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
)
GROUP = "root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n"
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class DockerfileError(Exception):
    pass


def logical_lines(text: str) -> list[str]:
    """Dockerfile lines with continuations joined and comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if cur and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_pairs(rest: str, args: dict[str, str]) -> dict[str, str]:
    """`K=V K2="V 2"` after ARG substitution."""
    rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), rest)
    pairs = {}
    for item in shlex.split(rest):
        if "=" not in item:
            raise DockerfileError(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        pairs[k] = v
    return pairs


def parse_final_stage(path: Path, build_args: dict[str, str]) -> dict:
    lines = logical_lines(path.read_text())
    stages: list[list[str]] = []
    for line in lines:
        if line.split(None, 1)[0].upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(line)
    if not stages:
        raise DockerfileError(f"{path}: no FROM")
    final = stages[-1]
    image = final[0].split()[1]
    spec = {
        "base": image,
        "labels": {},
        "env": [],
        "user": None,
        "ports": [],
        "entrypoint": None,
        "cmd": None,
        "healthcheck": None,
        "workdir": None,
        "copies": [],
    }
    args: dict[str, str] = {}
    for line in final[1:]:
        word, _, rest = line.partition(" ")
        word = word.upper()
        rest = rest.strip()
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, default.strip('"'))
        elif word == "LABEL":
            spec["labels"].update(parse_pairs(rest, args))
        elif word == "ENV":
            spec["env"].extend(f"{k}={v}" for k, v in parse_pairs(rest, args).items())
        elif word == "USER":
            spec["user"] = rest
        elif word == "EXPOSE":
            spec["ports"].extend(p if "/" in p else f"{p}/tcp" for p in rest.split())
        elif word in ("ENTRYPOINT", "CMD"):
            spec[word.lower()] = json.loads(rest)
        elif word == "WORKDIR":
            spec["workdir"] = rest
        elif word == "HEALTHCHECK":
            opts = {}
            while rest.startswith("--"):
                opt, _, rest = rest.partition(" ")
                k, _, v = opt[2:].partition("=")
                opts[k] = v
                rest = rest.strip()
            kind, _, cmd = rest.partition(" ")
            if kind.upper() != "CMD":
                raise DockerfileError(f"HEALTHCHECK {kind} is not supported")
            spec["healthcheck"] = {"test": ["CMD", *json.loads(cmd)], "opts": opts}
        elif word == "COPY":
            parts = rest.split()
            flags = {p[2:].split("=", 1)[0]: p.split("=", 1)[1] for p in parts if p.startswith("--")}
            paths = [p for p in parts if not p.startswith("--")]
            if len(paths) != 2:
                raise DockerfileError(f"COPY with {len(paths)} paths is not supported: {line}")
            spec["copies"].append({"src": paths[0], "dest": paths[1], "chown": flags.get("chown")})
        else:
            raise DockerfileError(f"the final stage has `{word}`, which this script cannot assemble: {line}")
    return spec


def duration_ns(text: str) -> int:
    units = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        raise DockerfileError(f"bad duration {text!r}")
    return int(m.group(1)) * units[m.group(2)]


class Layer:
    """A deterministic tar layer built in memory."""

    def __init__(self, mtime: int):
        self.mtime = mtime
        self.entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def _info(self, name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name.strip("/"))
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = self.mtime
        return info

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = (self._info(parent, tarfile.DIRTYPE, 0o755, 0, 0), None)
        self.entries[path.strip("/")] = (self._info(path, tarfile.DIRTYPE, mode, uid, gid), None)

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        parent = os.path.dirname(path.strip("/"))
        if parent and parent not in self.entries:
            self.dir("/" + parent)
        info = self._info(path, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        self.entries[path.strip("/")] = (info, data)

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(self.entries):
                info, data = self.entries[name]
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def owner(chown: str | None) -> tuple[int, int]:
    if not chown:
        return 0, 0
    user, _, group = chown.partition(":")
    if not user.isdigit() or (group and not group.isdigit()):
        raise DockerfileError(f"--chown={chown}: use numeric ids")
    return int(user), int(group or user)


def write_blob(blobs: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def assemble(args: argparse.Namespace) -> dict:
    build_args = dict(a.split("=", 1) for a in args.build_arg)
    spec = parse_final_stage(Path(args.dockerfile), build_args)
    if spec["base"] != BASE_IMAGE:
        raise DockerfileError(f"the final stage is FROM {spec['base']}; this script stands in for {BASE_IMAGE} only")
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))

    base = Layer(mtime)
    base.file("/etc/passwd", PASSWD.encode())
    base.file("/etc/group", GROUP.encode())
    base.file("/etc/nsswitch.conf", NSSWITCH.encode())
    base.file("/etc/ssl/certs/ca-certificates.crt", Path(args.ca_bundle).read_bytes())
    base.dir("/tmp", mode=0o1777)
    base.dir("/home/nonroot", mode=0o700, uid=65532, gid=65532)

    app = Layer(mtime)
    for c in spec["copies"]:
        uid, gid = owner(c["chown"])
        if c["dest"] == "/chatcli":
            app.file("/chatcli", Path(args.binary).read_bytes(), mode=0o755, uid=uid, gid=gid)
        elif c["dest"].endswith("/"):
            app.dir(c["dest"].rstrip("/"), mode=0o700, uid=uid, gid=gid)
        else:
            raise DockerfileError(f"COPY {c['src']} {c['dest']}: only /chatcli and empty directories can be assembled")

    out = Path(args.out)
    blobs = out / "blobs" / "sha256"
    if out.exists():
        for p in sorted(out.rglob("*"), reverse=True):
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
    blobs.mkdir(parents=True, exist_ok=True)

    layers, diff_ids, history = [], [], []
    for name, layer in (("distroless static-debian12:nonroot stand-in", base), ("chatcli", app)):
        raw = layer.tar()
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        layers.append({"mediaType": MEDIA_LAYER, **write_blob(blobs, gzip_bytes(raw))})
        history.append({"created": created, "created_by": f"assemble-image.py: {name}"})

    cfg: dict = {
        "User": spec["user"] or "65532",
        "ExposedPorts": {p: {} for p in spec["ports"]},
        "Env": BASE_ENV + spec["env"],
        "WorkingDir": spec["workdir"] or BASE_WORKDIR,
        "Labels": spec["labels"],
    }
    if spec["entrypoint"] is not None:
        cfg["Entrypoint"] = spec["entrypoint"]
    if spec["cmd"] is not None:
        cfg["Cmd"] = spec["cmd"]
    if spec["healthcheck"]:
        hc = {"Test": spec["healthcheck"]["test"]}
        for opt, key in (("interval", "Interval"), ("timeout", "Timeout"), ("start-period", "StartPeriod")):
            if opt in spec["healthcheck"]["opts"]:
                hc[key] = duration_ns(spec["healthcheck"]["opts"][opt])
        if "retries" in spec["healthcheck"]["opts"]:
            hc["Retries"] = int(spec["healthcheck"]["opts"]["retries"])
        cfg["Healthcheck"] = hc
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config_desc = {"mediaType": MEDIA_CONFIG, **write_blob(blobs, json.dumps(config, sort_keys=True).encode())}
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_desc,
        "layers": layers,
        "annotations": {k: v for k, v in spec["labels"].items() if k.startswith("org.opencontainers.image.")},
    }
    manifest_desc = {
        "mediaType": MEDIA_MANIFEST,
        **write_blob(blobs, json.dumps(manifest, sort_keys=True).encode()),
        "annotations": {"org.opencontainers.image.ref.name": args.tag},
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest_desc]}, sort_keys=True))
    return {"manifest": manifest_desc["digest"], "compressed_bytes": sum(l["size"] for l in layers) + config_desc["size"] + manifest_desc["size"]}


def main() -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", required=True, help="the static chatcli binary")
    p.add_argument("--out", required=True, help="OCI layout directory to (re)create")
    p.add_argument("--tag", default="latest-local", help="ref name in index.json")
    p.add_argument("--dockerfile", default=str(here / "Dockerfile"))
    p.add_argument("--ca-bundle", default="/etc/ssl/certs/ca-certificates.crt")
    p.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args()
    try:
        result = assemble(args)
    except (DockerfileError, OSError, ValueError) as e:
        print(f"assemble-image: {e}", file=sys.stderr)
        return 1
    print(f"assembled {args.out} ({args.tag}): manifest {result['manifest']}, {result['compressed_bytes'] / 1e6:.1f} MB compressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
