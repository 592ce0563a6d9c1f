#!/usr/bin/env python3
"""Helpers for bench/run.sh: process CPU/RSS snapshots, enriching load results with them, and the
Markdown report. Standard library only.

  benchlib.py snap NAME=PID ...            JSON snapshot: machine busy ticks, per process tree CPU ns and RSS
  benchlib.py watch OUT NAME=PID ...       sample tree RSS every 0.2 s, keep the max per name in OUT (until killed)
  benchlib.py enrich RESULT BEFORE AFTER PEAK GW LABEL [extra JSON]   one enriched JSON line
  benchlib.py quiet SECS NAME=PID ...      other processes' CPU (cores) over SECS seconds
  benchlib.py child -- CMD ...             run CMD, add the CPU it used to its JSON lines (for wrk)
  benchlib.py get FILE KEY [DEFAULT]       a field of the last JSON line of FILE
  benchlib.py report RESULTS_DIR           Markdown report from RESULTS_DIR/*.jsonl: the headline table
                                           (BENCHMARKS.md's first screen, pasted as is), then the details
  benchlib.py headline RESULTS_DIR         the headline table alone
"""

import json
import os
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid, kids=None):
    kids = kids if kids is not None else _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def proc_cpu_ns(pid):
    """CPU time of every thread of pid (schedstat: ns on a CPU)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
    except OSError:
        pass
    return total


def proc_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _busy(v):
    # user nice system idle iowait irq softirq steal
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


def machine_busy_ticks():
    """Busy ticks of the whole machine and of each CPU."""
    total, per = 0, {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *rest = line.split()
            b = _busy([int(x) for x in rest])
            if name == "cpu":
                total = b
            else:
                per[name] = b
    return total, per


def wakeup_irqs():
    """Rescheduling and function-call interrupts (the IPIs that wake a CPU or make it reschedule)
    each CPU has received, by the names /proc/stat uses (cpu0, cpu1, ...); {} where not readable."""
    out = {}
    try:
        with open("/proc/interrupts") as f:
            cpus = [c.lower() for c in f.readline().split()]
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("RES:", "CAL:"):
                    for i, c in enumerate(cpus):
                        out[c] = out.get(c, 0) + int(parts[1 + i])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def parse_named(args):
    out = {}
    for a in args:
        name, pid = a.split("=", 1)
        if pid:
            out[name] = int(pid)
    return out


def snap(named):
    kids = _children_map()
    procs = {}
    for name, pid in named.items():
        ps = tree(pid, kids)
        procs[name] = {
            "cpu_ns": sum(proc_cpu_ns(p) for p in ps),
            "rss_kib": sum(proc_rss_kib(p) for p in ps),
            "pids": len(ps),
        }
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    total, per = machine_busy_ticks()
    return {"t": time.time(), "busy_ticks": total, "cpu_ticks": per, "loadavg": load, "procs": procs,
            "wakeup_irqs": wakeup_irqs()}


def watch(out, named):
    peak = {}
    while True:
        kids = _children_map()
        for name, pid in named.items():
            r = sum(proc_rss_kib(p) for p in tree(pid, kids))
            peak[name] = max(peak.get(name, 0), r)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(peak, f)
        os.replace(tmp, out)
        time.sleep(0.2)


def last_json(path):
    last = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                last = json.loads(line)
    return last


def all_json(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def enrich(result, before, after, peak, gw, label, extra):
    b, a = last_json(before), last_json(after)
    pk = {}
    try:
        with open(peak) as f:
            pk = json.load(f)
    except (OSError, ValueError):
        pass
    dt = a["t"] - b["t"]
    ours_ns = sum(a["procs"][n]["cpu_ns"] - b["procs"][n]["cpu_ns"] for n in a["procs"] if n in b["procs"])
    busy_s = (a["busy_ticks"] - b["busy_ticks"]) / CLK_TCK
    rows = all_json(result)
    lg_s = max([r.get("self_cpu_s", 0.0) or 0.0 for r in rows] or [0.0])
    for r in rows:
        calls = r.get("all_calls") or r.get("ok") or 0
        r["label"] = label
        r["gateway"] = gw
        r["wall_s"] = round(dt, 3)
        r["loadavg_before"] = b["loadavg"]
        r["machine_busy_cores"] = round(busy_s / dt, 3) if dt > 0 else None
        # CPU used by processes that are not ours (other people's builds) during the run, in cores.
        r["foreign_cores"] = round(max(0.0, busy_s - ours_ns / 1e9 - lg_s) / dt, 3) if dt > 0 else None
        if gw and gw in a["procs"] and gw in b["procs"]:
            cpu_s = (a["procs"][gw]["cpu_ns"] - b["procs"][gw]["cpu_ns"]) / 1e9
            r["gw_cpu_s"] = round(cpu_s, 4)
            r["gw_cpu_cores"] = round(cpu_s / dt, 3) if dt > 0 else None
            if calls:
                r["gw_cpu_us_per_call"] = round(cpu_s * 1e6 / calls, 2)
            r["gw_rss_peak_kib"] = pk.get(gw)
            r["gw_rss_after_kib"] = a["procs"][gw]["rss_kib"]
        mocks = [n for n in a["procs"] if n.startswith("mock") and n in b["procs"]]
        if mocks and dt > 0:
            r["mock_cpu_cores"] = round(sum(a["procs"][n]["cpu_ns"] - b["procs"][n]["cpu_ns"] for n in mocks) / 1e9 / dt, 3)
        if dt > 0 and "cpu_ticks" in a:
            # How busy each core was (anything on it: ours and others').
            r["core_busy"] = {c: round((a["cpu_ticks"][c] - b["cpu_ticks"].get(c, 0)) / CLK_TCK / dt, 3) for c in sorted(a["cpu_ticks"])}
        if calls and a.get("wakeup_irqs") and b.get("wakeup_irqs"):
            # Wake-ups each core took per call: on the load core, what the gateway's answers (and the
            # mock's) cost in IPIs when the load side had gone idle.
            r["wakeup_irqs_per_call"] = {c: round((a["wakeup_irqs"][c] - b["wakeup_irqs"].get(c, 0)) / calls, 3)
                                         for c in sorted(a["wakeup_irqs"])}
        if extra:
            r.update(json.loads(extra))
        print(json.dumps(r))


def quiet(secs, named):
    """CPU the machine used over `secs` seconds, minus what `named` process trees used: other
    people's load, in cores."""
    a = snap(named)
    time.sleep(float(secs))
    b = snap(named)
    dt = b["t"] - a["t"]
    ours = sum(b["procs"][n]["cpu_ns"] - a["procs"][n]["cpu_ns"] for n in b["procs"] if n in a["procs"]) / 1e9
    busy = (b["busy_ticks"] - a["busy_ticks"]) / CLK_TCK
    print(f"{max(0.0, busy - ours) / dt:.2f}")


def child(cmd):
    """Runs cmd, copies its output, and adds the CPU time it used (`self_cpu_s`) to each JSON line
    it printed: how the harness accounts for wrk, which cannot report its own."""
    import resource
    import subprocess
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True).stdout
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            r["self_cpu_s"] = round(cpu, 3)
            line = json.dumps(r)
        print(line)


def get(path, key, default=None):
    r = last_json(path) or {}
    v = r
    for k in key.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    if v is None:
        v = default
    print("" if v is None else v)


# ------------------------------------------------------------------------------------------------
# Report


def load_dir(d):
    rows = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".jsonl"):
            with open(os.path.join(d, name)) as f:
                for line in f:
                    line = line.strip()
                    if line.startswith("{"):
                        rows.append(json.loads(line))
    return rows


def us(v):
    if v is None or v == "":
        return "–"
    v = float(v)
    if abs(v) >= 10000:
        return f"{v / 1000:.1f} ms"
    if abs(v) >= 1000:
        return f"{v / 1000:.2f} ms"
    return f"{v:.0f} µs"


def ratio(a, b, fmt="{:.2f}×"):
    try:
        if a is None or b is None or float(b) == 0:
            return "–"
        return fmt.format(float(a) / float(b))
    except (TypeError, ValueError):
        return "–"


def busy(r, cpu):
    v = (r.get("core_busy") or {}).get(cpu)
    return "–" if v is None else f"{v:.2f}"


def wakeups(r, cpu):
    v = (r.get("wakeup_irqs_per_call") or {}).get(cpu)
    return "–" if v is None else f"{v:.3f}"


def cores(v):
    return "–" if v is None else f"{v:.2f}"


def mib(kib):
    return "–" if kib in (None, "") else f"{float(kib) / 1024:.1f} MiB"


# Targets, and the gateway processes of the memory table, in the order the tables list them.
ORDER = ["direct", "nginx", "chatcli-http", "chatcli-grpc", "chatcli", "chatcli-plain-http", "chatcli-plain-grpc",
         "chatcli-plain", "chatcli-http-auth", "chatcli-grpc-auth", "chatcli-auth", "litellm"]


def order_key(name):
    return ORDER.index(name) if name in ORDER else len(ORDER)


def load_meta(d):
    try:
        with open(os.path.join(d, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def build_kind(meta, proc):
    """Which build the chatcli process `proc` ran: pgo, plain, given (--chatcli) or None (not run).
    Runs from before meta.json named each process's build say it in chatcli_build only."""
    b = (meta.get("chatcli_builds") or {}).get(proc)
    if b:
        return b.get("kind")
    if meta.get("chatcli_builds") is None and proc == "chatcli":
        s = meta.get("chatcli_build") or "release build"
        return "pgo" if "profile-guided" in s else "debug" if "debug" in s else "plain"
    return None


def build_note(meta, proc):
    b = (meta.get("chatcli_builds") or {}).get(proc)
    if not b:
        return meta.get("chatcli_build", "release build") if proc == "chatcli" else None
    extra = ", ".join(x for x in (f"{b['linked']}ally linked" if b.get("linked") else None,
                                  f"binary of {b['built']}" if b.get("built") else None) if x)
    return b.get("what", "?") + (f" ({extra})" if extra else "")


HEADLINE_BEGIN = "<!-- headline: the first part of `python3 bench/benchlib.py report <run dir>`, pasted as is -->"
HEADLINE_END = "<!-- end of the headline -->"


def headline(d, rows=None, meta=None):
    """The one table a reader needs first: each chatcli build, over HTTP and gRPC, against nginx and
    LiteLLM, from one run; with the command that produced it."""
    rows = load_dir(d) if rows is None else rows
    meta = load_meta(d) if meta is None else meta
    out = []
    w = out.append

    kc = build_kind(meta, "chatcli")
    has_plain_proc = build_kind(meta, "chatcli-plain") == "plain" or any(
        str(r.get("target", "")).startswith("chatcli-plain-") for r in rows)
    shipped = "chatcli" if kc in ("pgo", "given") else None
    plain = "chatcli-plain" if has_plain_proc else ("chatcli" if kc in ("plain", "debug") else None)
    shipped_label = "chatcli, the `--chatcli` binary" if kc == "given" else "chatcli shipped build (PGO)"
    plain_label = "chatcli plain release build" + (" (debug)" if plain == "chatcli" and kc == "debug" else "")
    lines = [  # (row label, target, gateway process, protocol)
        (f"{shipped_label}, HTTP", shipped and f"{shipped}-http", shipped, "http"),
        (f"{shipped_label}, gRPC", shipped and f"{shipped}-grpc", shipped, "grpc"),
        (f"{plain_label}, HTTP", plain and f"{plain}-http", plain, "http"),
        (f"{plain_label}, gRPC", plain and f"{plain}-grpc", plain, "grpc"),
        (f"nginx {str(meta.get('nginx_version', '')).replace('nginx/', '')} (reverse proxy)".replace(" ()", "").replace("  ", " "),
         "nginx", "nginx", "http"),
        ("LiteLLM" + (f" {meta['litellm_version']}" if meta.get("litellm_version") not in (None, "", "not run") else "")
         + " (proxy)", "litellm", "litellm", "http"),
        ("the mock called directly (reference)", "direct", None, "http"),
    ]

    closed = {r["target"]: r for r in rows if r.get("label", "").startswith("tput-m0-closed")}
    opens = [r for r in rows if r.get("label", "").startswith("tput-m0-open")]
    limited = any("p99_limit_us" in r for r in opens)
    best, tried = {}, set()
    for r in opens:
        if "p99_limit_us" not in r:
            continue
        tried.add(r["target"])
        if r.get("passed") and (r["target"] not in best or r["rate"] > best[r["target"]]["rate"]):
            best[r["target"]] = r
    lat = {r["target"]: r for r in rows if r.get("kind") == "rounds"}
    sst = {r["target"]: r for r in rows if r.get("label") == "streaming-steady"}
    mem = {r["target"]: r for r in rows if r.get("kind") == "memory"}
    base = sst.get("direct") or {}
    ngx = closed.get("nginx")

    def tput(t):
        r = closed.get(t)
        if not r:
            return "–"
        s = f"{r['rps']:,.0f}"
        if ngx and t not in ("nginx", "direct") and ngx.get("rps"):
            share = r["rps"] / ngx["rps"]
            s += f" ({share:.0%})" if share >= 0.1 else f" ({share:.2%})"
        return s

    def open_rate(t):
        b = best.get(t)
        if b:
            return f"{b['rate']:,.0f} (p99 {us(b.get('p99_us'))})"
        return "none passed" if t in tried else "–"

    def added_lat(t):
        r = lat.get(t)
        if not r:
            return "–"
        return f"base: {us(r.get('p50_us'))}" if t == "direct" else us(r.get("added_p50_us"))

    def cpu(t):
        v = (closed.get(t) or {}).get("gw_cpu_us_per_call")
        if v is None or t == "direct":
            return "–"
        return us(v) if float(v) >= 1000 else f"{float(v):.1f} µs"

    def streamed(t, k):
        r = sst.get(t)
        if not r or not base:
            return "–"
        v = (r.get(k) or {}).get("p50_us")
        if t == "direct":
            return f"base: {us(v)}"
        b = (base.get(k) or {}).get("p50_us")
        return "–" if v is None or b is None else us(v - b)

    def rss(g, proto, held):
        r = mem.get(g) if g else None
        if not r:
            return "–"
        if not held:
            return mib(r.get("idle_kib"))
        k = "hold_grpc" if proto == "grpc" else "hold_http"
        n = r.get(f"{k}_opened")
        return mib(r.get(f"{k}_kib")) + ("" if n in (None, 1000) else f" ({n} opened)")

    missing = []
    w(HEADLINE_BEGIN)
    w("")
    w("## chatcli against nginx and LiteLLM: one run, the gateway on one core")
    w("")
    w("| | throughput on one core, req/s (share of nginx's) | highest open-loop rate with p99 within the limit, req/s (its p99) | "
      "added latency p50, concurrency 1 | gateway CPU per call | streamed: added time to first token p50 | "
      "streamed: added gap between chunks p50 | RSS idle | RSS with 1,000 streams open |")
    w("|---|---|---|---|---|---|---|---|---|")
    for label, t, g, proto in lines:
        if not t or not any(t in x for x in (closed, lat, sst)):
            missing.append(label)
            w(f"| {label} | – | – | – | – | – | – | – | – |")
            continue
        direct = t == "direct"
        w(f"| {label} | {tput(t)} | {open_rate(t)} | {added_lat(t)} | {cpu(t)} | {streamed(t, 'ttft')} | "
          f"{streamed(t, 'gap')} | {'–' if direct else rss(g, proto, False)} | {'–' if direct else rss(g, proto, True)} |")
    w("")
    dirname = os.path.basename(os.path.realpath(d))
    rid = meta.get("run_id") or dirname
    w(f"Command: `{meta.get('cmdline', 'bench/run.sh')}` (run `{rid}`, chatcli {meta.get('chatcli_rev') or '?'}; "
      f"this table: `python3 bench/benchlib.py report bench/results/{dirname}`).")
    w("")
    notes = []
    if shipped:
        notes.append(f"*{shipped_label}*: {build_note(meta, shipped)}")
    if plain:
        notes.append(f"*{plain_label}*: {build_note(meta, plain)}")
    if notes:
        w("Builds: " + "; ".join(notes) + ".")
        w("")
    if meta:
        w(f"Machine: {meta.get('cpu')}, {meta.get('nproc')} cores, {meta.get('mem')}, kernel {meta.get('kernel', '?')}, "
          f"{meta.get('rustc', 'rustc ?')}; load average {meta.get('loadavg_start')} at the start, "
          f"{meta.get('loadavg_end', '?')} at the end"
          + ("; **some points were measured while other processes kept the machine busy**" if meta.get("under_load") else "")
          + ". The gateway under test on core 0 (`taskset`; the other gateways sit idle there), the mock upstream and "
          "the load client on core 1.")
        w("")
    factors = sorted({r.get("factor") for r in opens if r.get("factor") and "p99_limit_us" in r}, reverse=True)
    w("Columns: *throughput* = closed loop, 64 connections, zero-delay mock (the direct row is what the mock and the "
      "load client manage on core 1 by themselves); *open-loop rate* = the highest rate tried (the closed-loop peak "
      f"× {', '.join(str(f) for f in factors) if factors else '1.0, 0.9, 0.75, …'}, until one passes) whose p99 stayed under 10 ms or 5× the target's own p99 at concurrency 1, whichever is "
      "larger, with under 0.1% errors; *added* = minus the same figure for the mock called directly (the direct row "
      "shows that figure); *CPU per call* = the gateway process's CPU time (user + kernel) in the closed-loop run ÷ "
      "calls answered; *streamed* = steady state, 32 streams open, 64 deltas 20 ms apart; *RSS* = the gateway's "
      "process tree, idle = started and one call answered, 1,000 streams = a freshly started process holding "
      "1,000 streamed calls of the row's protocol (nginx and LiteLLM: HTTP).")
    w("")
    if opens and not limited:
        w("This run predates the p99 limit (its open-loop points were judged by p99 < 1 s, which queues of seconds "
          "pass), so the open-loop column is left empty; its detailed tables below show those points.")
        w("")
    if missing:
        grouped = {}
        for m in missing:
            head, _, proto = m.rpartition(", ")
            if proto in ("HTTP", "gRPC"):
                grouped.setdefault(head, []).append(proto)
            else:
                grouped.setdefault(m, [])
        w("Not in this run: " + "; ".join(k + (f" ({', '.join(v)})" if v else "") for k, v in grouped.items())
          + " (`bench/run.sh` measures both chatcli builds unless "
          "`--no-plain` or `--no-pgo`; `--no-litellm` skips LiteLLM).")
        w("")
    w(HEADLINE_END)
    return out


def report(d):
    rows = load_dir(d)
    meta = load_meta(d)
    out = headline(d, rows, meta)
    w = out.append
    w("")
    w("## Details of the run")
    w("")
    if meta:
        w(f"Run `{meta.get('run_id')}`: {meta.get('cmdline')}; {meta.get('cpu')}, {meta.get('nproc')} cores, "
          f"{meta.get('mem')}; load average at start {meta.get('loadavg_start')}; "
          f"chatcli {meta.get('chatcli_rev')} ({meta.get('chatcli_build', 'release build')}), LiteLLM {meta.get('litellm_version')}, nginx {meta.get('nginx_version')}.")
        w("")
    noisy = [r for r in rows if (r.get("foreign_cores") or 0) > 0.25]
    # Ceiling
    ceil = [r for r in rows if r.get("label", "").startswith("ceiling")]
    if ceil:
        w("### Mock ceiling (mock and load client together on core 1)")
        w("")
        w("| client | concurrency | req/s | p50 | p90 | p99 | errors | core 1 busy | other processes' CPU |")
        w("|---|---|---|---|---|---|---|---|---|")
        for r in ceil:
            w(f"| {r.get('client', 'loadgen')} | {r.get('concurrency')} | {r.get('rps', 0):.0f} | {us(r.get('p50_us'))} | "
              f"{us(r.get('p90_us'))} | {us(r.get('p99_us'))} | {r.get('errors')} | {busy(r, 'cpu1')} | {cores(r.get('foreign_cores'))} |")
        w("")
    # Added latency
    lat = sorted([r for r in rows if r.get("kind") == "rounds"], key=lambda r: order_key(r["target"]))
    if lat:
        nginx = next((r for r in lat if r["target"] == "nginx"), None)
        w("### Added latency at concurrency 1, zero-delay mock, non-streamed")
        w("")
        w(f"{lat[0]['rounds']} interleaved rounds × {lat[0]['per_round']} sequential calls per target; p50 = median "
          "of round medians, p90/p99 over all calls; *added* = minus the same statistic of the direct calls.")
        w("")
        w("| target | p50 | p90 | p99 | added p50 | added p90 | added p99 | added p50 / nginx's | errors |")
        w("|---|---|---|---|---|---|---|---|---|")
        for r in lat:
            rel = ratio(r["added_p50_us"], nginx["added_p50_us"]) if nginx and r["target"] not in ("direct", "nginx") else "–"
            w(f"| {r['target']} | {us(r['p50_us'])} | {us(r['p90_us'])} | {us(r['p99_us'])} | "
              f"{us(r['added_p50_us']) if r['target'] != 'direct' else '–'} | "
              f"{us(r['added_p90_us']) if r['target'] != 'direct' else '–'} | "
              f"{us(r['added_p99_us']) if r['target'] != 'direct' else '–'} | {rel} | {r['errors']} |")
        w("")
    # Throughput
    ceiling = next((c for c in ceil if c.get("client", "loadgen") == "loadgen"), None)
    for mock, title in (("m0", "zero-delay mock"), ("m20", "20 ms mock")):
        closed = [r for r in rows if r.get("label", "").startswith(f"tput-{mock}-closed")]
        if not closed:
            continue
        opens = [r for r in rows if r.get("label", "").startswith(f"tput-{mock}-open")]
        closed.sort(key=lambda r: order_key(r["target"]))
        by = {r["target"]: r for r in closed}
        best, tried = {}, {}
        for r in opens:
            tried.setdefault(r["target"], []).append(r)
            if r.get("passed") and (r["target"] not in best or r["rate"] > best[r["target"]]["rate"]):
                best[r["target"]] = r
        lit, ngx = by.get("litellm"), by.get("nginx")
        limited = any("p99_limit_us" in r for r in opens)
        criterion = ("whose p99 stayed under 10 ms or 5× the target's unloaded p99 (concurrency 1), whichever is larger, "
                     if limited or not opens else
                     "whose p99 stayed under 1 s (this run predates the 10 ms / 5× unloaded p99 limit), ")
        w(f"### Throughput, {title}, gateway pinned to core 0")
        w("")
        w(f"Closed loop (concurrency {closed[0].get('concurrency')}, load client `loadgen`) gives the peak; the "
          "open-loop rate is the highest tried (peak × " + ", ".join(str(f) for f in sorted({r.get('factor') for r in opens if r.get('factor')}, reverse=True))
          + ") " + criterion +
          "with under 0.1% errors. CPU µs/call = the gateway process's CPU time "
          "(all threads, user + kernel) over the run ÷ calls answered. Core 1 wake-ups/call = rescheduling and "
          "function-call interrupts core 1 took per call (`/proc/interrupts`): mostly the gateway's writes waking "
          "the mock or the client after core 1 went idle, which the writer pays for in kernel time.")
        w("")
        w("| target | closed-loop req/s | p50 | p99 | errors | gateway CPU µs/call | core 0 busy | core 1 busy | core 1 wake-ups/call | max open-loop rate, p99 within limit | its p50 / p99 (limit) | vs LiteLLM | vs nginx | other CPU |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in closed:
            t = r["target"]
            b = best.get(t)
            rate = f"{b['rate']:.0f}" if b else ("none passed" if t in tried else "–")
            pp = (f"{us(b['p50_us'])} / {us(b['p99_us'])}" + (f" ({us(b['p99_limit_us'])})" if b.get("p99_limit_us") else "")) if b else "–"
            flag = ""
            # The direct row is what the mock and the client manage on their own at this concurrency:
            # a gateway within 10% of it is measuring the load side, not itself.
            direct = by.get("direct")
            if direct and t != "direct" and r["rps"] >= 0.9 * direct["rps"]:
                flag = " ⚠ within 10% of direct"
            label = t if r.get("concurrency") == closed[0].get("concurrency") else f"{t} (concurrency {r.get('concurrency')})"
            w(f"| {label} | {r['rps']:.0f}{flag} | {us(r.get('p50_us'))} | {us(r.get('p99_us'))} | {r.get('errors')} | "
              f"{r.get('gw_cpu_us_per_call', '–') if t != 'direct' else '–'} | {busy(r, 'cpu0')} | {busy(r, 'cpu1')} | "
              f"{wakeups(r, 'cpu1')} | {rate} | {pp} | {ratio(r['rps'], lit['rps'], '{:.0f}×') if lit and t not in ('direct', 'litellm') else '–'} | "
              f"{ratio(r['rps'], ngx['rps'], '{:.0%}') if ngx and t not in ('direct', 'nginx') else '–'} | {cores(r.get('foreign_cores'))} |")
        w("")
        wrk = [r for r in rows if r.get("label") == f"wrk-{mock}"]
        if wrk:
            w(f"Cross-check with `wrk -t1 -c64` (a lighter client than loadgen, so more of core 1 is left to the mock), {title}:")
            w("")
            w("| target | req/s | p50 | p99 | errors | gateway CPU µs/call | core 0 busy | core 1 busy | core 1 wake-ups/call |")
            w("|---|---|---|---|---|---|---|---|---|")
            for r in sorted(wrk, key=lambda r: order_key(r["target"])):
                w(f"| {r['target']} | {r['rps']:.0f} | {us(r.get('p50_us'))} | {us(r.get('p99_us'))} | {r.get('errors')} | "
                  f"{r.get('gw_cpu_us_per_call', '–')} | {busy(r, 'cpu0')} | {busy(r, 'cpu1')} | {wakeups(r, 'cpu1')} |")
            w("")
    # Streaming
    st = sorted([r for r in rows if r.get("kind") == "stream-rounds"], key=lambda r: order_key(r["target"]))
    if st:
        w("### Streaming, one at a time: 64 deltas 20 ms apart")
        w("")
        w(f"{st[0]['rounds']} interleaved rounds × {st[0]['concurrency']} concurrent streams per target. TTFT = request "
          "sent → first content delta received; gap = time between consecutive content deltas at the client. Between "
          "streams the machine idles, so each TTFT includes waking both cores (milliseconds on this VM).")
        w("")
        w("| target | TTFT p50 | TTFT p99 | added TTFT p50 | gap p50 | gap p99 | added gap p50 | added gap p99 | streams ok | errors |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for r in st:
            d = r["target"] == "direct"
            w(f"| {r['target']} | {us(r['ttft']['p50_us'])} | {us(r['ttft']['p99_us'])} | "
              f"{'–' if d else us(r['added_ttft_p50_us'])} | {us(r['gap']['p50_us'])} | {us(r['gap']['p99_us'])} | "
              f"{'–' if d else us(r['added_gap_p50_us'])} | {'–' if d else us(r['added_gap_p99_us'])} | {r['ok']} | {r['errors']} |")
        w("")
    sst = sorted([r for r in rows if r.get("label") == "streaming-steady"], key=lambda r: order_key(r["target"]))
    if sst:
        base = next((r for r in sst if r["target"] == "direct"), None)
        w("### Streaming, steady state: 32 streams open per target, 64 deltas 20 ms apart")
        w("")
        w("Closed loop of streamed calls (a new stream starts when one ends), so the cores stay awake between deltas; "
          "TTFT and gaps of every stream that ended inside the measured window. *added* = minus the direct figure.")
        w("")
        w("| target | streams | TTFT p50 | TTFT p99 | added TTFT p50 | gap p50 | gap p99 | added gap p50 | added gap p99 | gateway CPU per stream | errors |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sst:
            d = r["target"] == "direct" or not base
            t, g = r.get("ttft") or {}, r.get("gap") or {}
            bt, bg = (base or {}).get("ttft") or {}, (base or {}).get("gap") or {}
            add = lambda a, b, k: "–" if d else us((a.get(k) or 0) - (b.get(k) or 0))
            w(f"| {r['target']} | {r.get('ok')} | {us(t.get('p50_us'))} | {us(t.get('p99_us'))} | {add(t, bt, 'p50_us')} | "
              f"{us(g.get('p50_us'))} | {us(g.get('p99_us'))} | {add(g, bg, 'p50_us')} | {add(g, bg, 'p99_us')} | "
              f"{'–' if r['target'] == 'direct' else us(r.get('gw_cpu_us_per_call'))} | {r.get('errors')} |")
        w("")
    # Memory
    mem = [r for r in rows if r.get("kind") == "memory"]
    if mem:
        w("### Memory (RSS of the gateway's process tree)")
        w("")
        w("Idle = started, one call answered. Peaks = the highest RSS sampled (every 0.2 s) during the zero-delay runs "
          "(64 connections) and the 20 ms runs (2,048 connections). *After the load* = when those runs were over. "
          "The 1,000-stream figures come from a freshly started chatcli (chatcli-plain likewise; restarted before "
          "each), so they measure only the open streams.")
        w("")
        w("| gateway | idle | peak, zero-delay runs | peak, 20 ms runs | after the load | 1,000 streams open (HTTP) | 1,000 streams open (gRPC) |")
        w("|---|---|---|---|---|---|---|")
        for r in sorted(mem, key=lambda r: order_key(r["target"])):
            def held(k, o):
                n = r.get(o)
                return mib(r.get(k)) + ("" if n in (None, 1000) else f" ({n} opened in 60 s)")
            w(f"| {r['target']} | {mib(r.get('idle_kib'))} | {mib(r.get('peak_kib'))} | {mib(r.get('peak20_kib'))} | "
              f"{mib(r.get('after_kib'))} | {held('hold_http_kib', 'hold_http_opened')} | {held('hold_grpc_kib', 'hold_grpc_opened')} |")
        w("")
    if noisy:
        w("Runs during which other processes used more than a quarter of a core (their numbers are less trustworthy): "
          + ", ".join(sorted({f"{r.get('label')}/{r.get('target')} ({r.get('foreign_cores')})" for r in noisy})) + ".")
        w("")
    print("\n".join(out))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "snap":
        print(json.dumps(snap(parse_named(args))))
    elif cmd == "watch":
        watch(args[0], parse_named(args[1:]))
    elif cmd == "enrich":
        enrich(*args[:6], args[6] if len(args) > 6 else None)
    elif cmd == "child":
        child(args[1:] if args and args[0] == "--" else args)
    elif cmd == "quiet":
        quiet(args[0], parse_named(args[1:]))
    elif cmd == "get":
        get(args[0], args[1], args[2] if len(args) > 2 else None)
    elif cmd == "report":
        report(args[0])
    elif cmd == "headline":
        print("\n".join(headline(args[0])))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
