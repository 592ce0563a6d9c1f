#!/usr/bin/env python3
"""CI checks of flake.nix that need no nixpkgs (nixpkgs cannot be downloaded here, so the package and
the dev shell are not built; see README):

* `nix-instantiate --parse` of the flake;
* evaluation of its nixpkgs-free outputs: `lib.version` equals Cargo.toml's version, and
  `lib.systemdService` (the settings the NixOS module gives its unit) equals systemd/chatcli.service
  setting for setting (ExecStart/ExecReload/LoadCredential apart), so the module and the unit file
  cannot drift apart in hardening;
* evaluation of the NixOS module against a stand-in `lib`/`pkgs` (scripts/shipping/nixos-module-eval.nix):
  settings and drop-ins become /etc/chatcli files, credentials become LoadCredential=, a config
  change reloads rather than restarts, extraArgs reach ExecStart, openFirewall opens the ports.

    check_nix.py --flake flake.nix --unit systemd/chatcli.service
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from check_unit_env import parse_unit

# Unit settings that the module sets from its own options instead.
MODULE_OWNED = {"ExecStart", "ExecReload", "LoadCredential", "Environment"}
failures: list[str] = []


def ok(msg: str) -> None:
    print(f"  ok    {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"  FAIL  {msg}", flush=True)
    failures.append(msg)


def nix_eval(expr: str, cwd: Path) -> object:
    r = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr], capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(" ".join(r.stderr.split())[:600])
    return json.loads(r.stdout)


def unit_value(v: object) -> list[str]:
    if isinstance(v, bool):
        return ["yes" if v else "no"]
    if isinstance(v, list):
        return [str(x) for x in v]
    return [str(v)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flake", required=True)
    p.add_argument("--unit", required=True)
    p.add_argument("--cargo-toml", default="Cargo.toml")
    p.add_argument("--module-eval", default=str(Path(__file__).with_name("nixos-module-eval.nix")))
    args = p.parse_args()
    flake = Path(args.flake).resolve()
    print(f"nix flake {flake.name} ({subprocess.run(['nix-instantiate', '--version'], capture_output=True, text=True).stdout.strip()})")

    r = subprocess.run(["nix-instantiate", "--parse", str(flake)], capture_output=True, text=True)
    if r.returncode != 0:
        fail("nix-instantiate --parse: " + " ".join(r.stderr.split())[:400])
        return 1
    ok("nix-instantiate --parse")

    stub = f'let f = import {flake}; o = f.outputs {{ self = o; nixpkgs = throw "nixpkgs is not available here"; }}; in'
    try:
        out = nix_eval(f"{stub} {{ inherit (f) description inputs; inherit (o) lib; outputs = builtins.attrNames o; }}", flake.parent)
    except RuntimeError as e:
        fail(f"evaluating the flake's nixpkgs-free outputs: {e}")
        return 1
    missing = {"packages", "nixosModules", "devShells", "lib"} - set(out["outputs"])
    (fail if missing else ok)(f"outputs: {', '.join(sorted(out['outputs']))}" + (f" (missing {sorted(missing)})" if missing else ""))
    cargo_version = tomllib.loads(Path(args.cargo_toml).read_text())["package"]["version"]
    (ok if out["lib"]["version"] == cargo_version else fail)(f"lib.version {out['lib']['version']} = Cargo.toml {cargo_version}")

    service = parse_unit(Path(args.unit))["Service"]
    nix_service = out["lib"]["systemdService"]
    problems = []
    for key, value in sorted(nix_service["serviceConfig"].items()):
        if service.get(key) != unit_value(value):
            problems.append(f"{key}: flake {unit_value(value)} vs unit {service.get(key)}")
    for key in sorted(set(service) - set(nix_service["serviceConfig"]) - MODULE_OWNED):
        problems.append(f"{key}: in the unit, not in the flake")
    unit_env = dict(item.split("=", 1) for line in service.get("Environment", []) for item in line.split())
    if unit_env != nix_service["environment"]:
        problems.append(f"Environment: flake {nix_service['environment']} vs unit {unit_env}")
    if problems:
        for p_ in problems:
            fail(f"flake lib.systemdService differs from {args.unit}: {p_}")
    else:
        ok(f"the module's unit settings equal {args.unit} ({len(nix_service['serviceConfig'])} settings, environment)")

    try:
        m = nix_eval(f"import {Path(args.module_eval).resolve()}", flake.parent)
    except RuntimeError as e:
        fail(f"evaluating the NixOS module with a stand-in lib: {e}")
        return 1
    expect = {
        "options": ["credentials", "dropIns", "enable", "extraArgs", "openFirewall", "package", "settings"],
        "etc": ["chatcli/chatcli.toml", "chatcli/conf.d/50-anthropic.toml"],
        "loadCredential": ["openai:/run/keys/openai", "token:/run/keys/token"],
        "reloadTriggers": ["/nix/store/stub-chatcli.toml", "/nix/store/stub-50-anthropic.toml"],
        "firewall": [50051, 9464],
        "keepsServiceConfig": True,
    }
    wrong = [f"{k}: {m.get(k)!r}, expected {v!r}" for k, v in expect.items() if m.get(k) != v]
    if "'server' '--log-format' 'json'" not in m.get("execStart", "") or "-HUP $MAINPID" not in m.get("execReload", ""):
        wrong.append(f"ExecStart/ExecReload: {m.get('execStart')!r} / {m.get('execReload')!r}")
    if wrong:
        for w in wrong:
            fail(f"NixOS module: {w}")
    else:
        ok("NixOS module (stand-in lib): /etc/chatcli files, LoadCredential, reload on config change, ExecStart, firewall")
    if failures:
        print(f"nix check failed: {len(failures)} problem(s)")
        return 1
    print("nix check passed (parse and nixpkgs-free evaluation; the package, module and dev shell were not built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
