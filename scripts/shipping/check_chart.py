#!/usr/bin/env python3
"""CI checks of the Helm chart (charts/chatcli), with the Helm v4 SDK from PyPI (helm-python-sdk):

* `helm lint --strict` with the default values, every charts/chatcli/ci/*-values.yaml that is
  meant to pass and every charts/chatcli/examples/*-values.yaml (the files the README installs
  with); no info-level message above "icon is recommended" is tolerated: warnings fail;
* render with those values (the schema is enforced on render, as on install);
* the rendered manifests: `kubernetes-validate --strict` against the oldest and the newest Kubernetes
  the chart supports, the ServiceMonitor (a CRD that tool has no schema for) against a small schema
  of our own, yamllint, and the chart's promises checked on the objects themselves (config mounted as a
  directory and never with subPath, no config checksum annotation, non-root, read-only root
  filesystem, all capabilities dropped, seccomp RuntimeDefault, resources, gRPC probes unless TLS,
  `appProtocol: grpc`);
* with `--chatcli BIN`: the chatcli.toml and drop-ins of each rendered ConfigMap pass `chatcli config
  check`, with the rendered Secret's keys as the credentials directory (a relative `*_file` name the
  Secret does not hold, such as the key an example takes from `--set-string secrets.data.NAME=…` at
  install, is given a placeholder file);
* every ci/bad-*-values.yaml must be refused by values.schema.json (lint and render);
* a copy of the chart with a broken template must fail lint and render.

    check_chart.py CHART_DIR [--extra-lint FILE...] [--chatcli BIN]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

import helm_python as helm
import jsonschema
import yaml

KUBE_VERSIONS = ["1.27.0", "1.37.0"]
YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 160}
  document-start: disable
  comments: {min-spaces-from-content: 1}
  indentation: {spaces: consistent, indent-sequences: whatever}
  truthy: {check-keys: false}
"""
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}

failures: list[str] = []


def ok(msg: str) -> None:
    print(f"  ok    {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"  FAIL  {msg}", flush=True)
    failures.append(msg)


def lint(chart: Path, values: dict | None) -> list[str]:
    report = helm.lint(str(chart), values, strict=True, namespace="chatcli")
    problems = list(report.get("errors") or [])
    problems += [f"{m['path']}: {m['error'].strip()}" for m in report.get("messages", [])
                 if m["severity"] >= 2 or (m["severity"] == 1 and "icon is recommended" not in m["error"])]
    return problems


def render(chart: Path, values: dict | None) -> dict[str, str]:
    with helm.Chart.load(str(chart)) as c:
        return c.render(values, name="ci", namespace="chatcli", is_install=True)


def documents(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for name, text in sorted(rendered.items()):
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def check_promises(docs: list[dict], label: str, values: dict) -> None:
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        fail(f"{label}: expected one Deployment, got {len(deployments)}")
        return
    pod = deployments[0]["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    problems = []
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    if any("subPath" in m or "subPathExpr" in m for m in mounts.values()):
        problems.append("a volumeMount uses subPath (the kubelet's atomic swap would not reach the reloader)")
    if mounts.get("config", {}).get("mountPath") != "/etc/chatcli":
        problems.append("the config volume is not mounted as the directory /etc/chatcli")
    config_volume = next((v for v in spec["volumes"] if v["name"] == "config"), {})
    if "configMap" not in config_volume:
        problems.append("the config volume is not a ConfigMap")
    annotations = pod.get("metadata", {}).get("annotations", {}) or {}
    if any("checksum" in k for k in annotations):
        problems.append("a checksum annotation would restart pods on every config change")
    psc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if not sc.get("readOnlyRootFilesystem"):
        problems.append("readOnlyRootFilesystem is not set")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in (sc.get("capabilities", {}).get("drop") or []):
        problems.append("capabilities are not all dropped")
    if (psc.get("seccompProfile") or sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("seccomp profile is not RuntimeDefault")
    if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
        problems.append("resources requests/limits missing")
    tls = values.get("tls", {}).get("enabled", False)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = c.get(probe)
        if not p:
            problems.append(f"{probe} missing")
        elif not tls and "grpc" not in p:
            problems.append(f"{probe} is not a native gRPC probe")
    services = by_kind.get("Service", [])
    grpc_ports = [p for s in services for p in s["spec"]["ports"] if p["name"] == "grpc"]
    if not grpc_ports or any(p.get("appProtocol") != "grpc" for p in grpc_ports):
        problems.append("the Service's grpc port has no appProtocol: grpc")
    roles = by_kind.get("Role", []) + by_kind.get("ClusterRole", [])
    for role in roles:
        verbs = {v for r in role["rules"] for v in r["verbs"]}
        if verbs - {"get", "list", "watch"}:
            problems.append(f"{role['kind']} grants more than read: {sorted(verbs)}")
    # The watcher's RBAC is exactly what it reads: nothing without it, pods/log only get, nodes
    # only when asked, never secrets, configmaps or metrics it does not read.
    watcher = values.get("watcher", {}) or {}
    if roles and not watcher.get("enabled"):
        problems.append("a Role or ClusterRole is rendered without watcher.enabled")
    for role in roles:
        for r in role["rules"]:
            resources = set(r.get("resources", []))
            if "pods/log" in resources and set(r["verbs"]) != {"get"}:
                problems.append(f"{role['kind']} grants pods/log more than get: {r['verbs']}")
            if "nodes" in resources and not watcher.get("nodes"):
                problems.append(f"{role['kind']} grants nodes without watcher.nodes")
            if resources & {"secrets", "configmaps", "services", "endpoints"}:
                problems.append(f"{role['kind']} grants what the watcher never reads: {sorted(resources)}")
    for sm in by_kind.get("ServiceMonitor", []):
        try:
            jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
        except jsonschema.ValidationError as e:
            problems.append(f"ServiceMonitor: {e.message}")
    if problems:
        for p in problems:
            fail(f"{label}: {p}")
    else:
        ok(f"{label}: {len(docs)} objects keep the chart's promises (directory mount, no subPath/checksum, hardened, gRPC probes)")


def kube_validate(path: Path, label: str) -> None:
    exe = Path(sys.executable).with_name("kubernetes-validate")
    for version in KUBE_VERSIONS:
        r = subprocess.run([str(exe), "--strict", "--quiet", "-k", version, str(path)], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        unexplained = [line for line in out.splitlines()
                       if line.strip() and "Couldn't find schema for kind ServiceMonitor" not in line]
        if r.returncode != 0 or unexplained:
            fail(f"{label}: kubernetes-validate --strict -k {version}: " + " | ".join(unexplained or [out])[:600])
        else:
            ok(f"{label}: kubernetes-validate --strict against Kubernetes {version}")


def yamllint(paths: list[Path], label: str) -> None:
    exe = Path(sys.executable).with_name("yamllint")
    r = subprocess.run([str(exe), "-f", "parsable", "-d", YAMLLINT_CONFIG, *map(str, paths)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"{label}: yamllint: " + " | ".join(r.stdout.strip().splitlines()[:8]))
    else:
        ok(f"{label}: yamllint")


def relative_file_names(table: dict) -> set[str]:
    """Relative names in `*_file` keys (and `[[auth.tokens]] file`): looked up in CREDENTIALS_DIRECTORY."""
    names: set[str] = set()
    for key, value in table.items():
        if isinstance(value, dict):
            names |= relative_file_names(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    names |= relative_file_names(item)
        elif isinstance(value, str) and (key.endswith("_file") or key == "file") and not value.startswith("/"):
            names.add(value)
    return names


def config_check(chatcli: Path, docs: list[dict], label: str, work: Path) -> None:
    configmaps = [d for d in docs if d["kind"] == "ConfigMap" and "chatcli.toml" in (d.get("data") or {})]
    if not configmaps:
        ok(f"{label}: no ConfigMap rendered (existingConfigMap), nothing for chatcli config check")
        return
    base = work / (label.replace(" ", "-") + ".config")
    etc, creds, data = base / "etc", base / "credentials", base / "data"
    for d in (etc / "conf.d", creds, data):
        d.mkdir(parents=True)
    tables = []
    for key, text in configmaps[0]["data"].items():
        target = etc / "chatcli.toml" if key == "chatcli.toml" else etc / "conf.d" / key.removeprefix("conf.d_")
        target.write_text(text)
        try:
            tables.append(tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            fail(f"{label}: {key} is not TOML: {e}")
            return
    secrets = [d for d in docs if d["kind"] == "Secret"]
    held = set()
    for s in secrets:
        for key, value in (s.get("data") or {}).items():
            (creds / key).write_bytes(base64.b64decode(value))
            held.add(key)
    supplied = sorted(set().union(*map(relative_file_names, tables)) - held)
    for name in supplied:
        (creds / name).write_text("placeholder-given-at-install\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(base),
           "CREDENTIALS_DIRECTORY": str(creds), "CHATCLI_DATA_DIR": str(data)}
    r = subprocess.run([str(chatcli), "config", "check", "--config", str(etc / "chatcli.toml")],
                       capture_output=True, text=True, env=env)
    extra = f" (placeholder for {', '.join(supplied)}, given at install)" if supplied else ""
    if r.returncode != 0:
        fail(f"{label}: chatcli config check (exit {r.returncode}): " + " | ".join(r.stderr.strip().splitlines())[:800])
    else:
        ok(f"{label}: the rendered chatcli.toml and {len(configmaps[0]['data']) - 1} drop-in(s) pass chatcli config check{extra}")


def check_good(chart: Path, values_file: Path | None, work: Path, chatcli: Path | None = None) -> None:
    label = values_file.name if values_file else "default values"
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    problems = lint(chart, values)
    if problems:
        fail(f"{label}: helm lint --strict: " + " | ".join(problems)[:800])
    else:
        ok(f"{label}: helm lint --strict")
    try:
        rendered = render(chart, values)
    except helm.HelmError as e:
        fail(f"{label}: render: {e}")
        return
    notes = rendered.get(f"{chart.name}/templates/NOTES.txt", "")
    if "port-forward" not in notes:
        fail(f"{label}: NOTES.txt does not say how to connect")
    out = work / (label.replace(" ", "-") + ".rendered.yaml")
    out.write_text("".join(f"---\n# Source: {name}\n{text.strip()}\n" for name, text in sorted(rendered.items())
                           if name.endswith(".yaml") and text.strip()))
    ok(f"{label}: rendered {out.stat().st_size} bytes")
    kube_validate(out, label)
    yamllint([out], label)
    docs = documents(rendered)
    check_promises(docs, label, values or {})
    if chatcli:
        config_check(chatcli, docs, label, work)


def check_refused(chart: Path, values_file: Path) -> None:
    values = yaml.safe_load(values_file.read_text())
    problems = lint(chart, values)
    try:
        render(chart, values)
        rendered = True
    except helm.HelmValuesError as e:
        rendered, why = False, " ".join(str(e).split())
    except helm.HelmError as e:
        rendered, why = False, f"(not a schema error) {e}"
    if problems and not rendered:
        ok(f"{values_file.name}: refused by the schema ({why[:160]})")
    else:
        fail(f"{values_file.name}: a values file that violates the schema was accepted (lint problems: {len(problems)}, rendered: {rendered})")


def check_template_error(chart: Path, work: Path) -> None:
    broken = work / "broken" / chart.name
    shutil.copytree(chart, broken)
    (broken / "templates" / "zz-broken.yaml").write_text("value: {{ .Values.config.noSuchMap.key }}\n")
    problems = lint(broken, None)
    try:
        render(broken, None)
        rendered, why = True, ""
    except helm.HelmError as e:
        rendered, why = False, " ".join(str(e).split())
    if problems and not rendered:
        ok(f"a chart with a broken template fails lint and render ({why[:140]})")
    else:
        fail("a chart with a broken template was accepted")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("chart")
    p.add_argument("--extra-lint", nargs="*", default=[], help="more YAML files for yamllint (e.g. compose.yaml)")
    p.add_argument("--chatcli", type=Path, help="a chatcli binary: run `config check` on each rendered config")
    args = p.parse_args()
    chart = Path(args.chart).resolve()
    chatcli = args.chatcli.resolve() if args.chatcli else None
    print(f"helm chart {chart.name} (Helm SDK {helm.helm_sdk_version()})")
    with tempfile.TemporaryDirectory(prefix="chatcli-chart-") as tmp:
        work = Path(tmp)
        ci = chart / "ci"
        goods = sorted(f for f in ci.glob("*-values.yaml") if not f.name.startswith("bad-"))
        examples = sorted((chart / "examples").glob("*-values.yaml"))
        bads = sorted(ci.glob("bad-*-values.yaml"))
        check_good(chart, None, work, chatcli)
        for f in goods + examples:
            check_good(chart, f, work, chatcli)
        for f in bads:
            check_refused(chart, f)
        if not bads:
            fail("no ci/bad-*-values.yaml to prove the schema refuses bad values")
        check_template_error(chart, work)
        yamllint([chart / "Chart.yaml", chart / "values.yaml", *goods, *examples, *bads, *map(Path, args.extra_lint)],
                 "chart and values files")
    if failures:
        print(f"chart check failed: {len(failures)} problem(s)")
        return 1
    print("chart check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
