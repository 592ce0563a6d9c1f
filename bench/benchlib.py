#!/usr/bin/env python3
"""Helpers for bench/run.sh: process CPU/RSS snapshots, enriching load results with them, and the
Markdown report. Standard library only.

  benchlib.py snap NAME=PID ...            JSON snapshot: machine busy ticks, per process tree CPU ns and RSS
  benchlib.py watch OUT NAME=PID ...       sample tree RSS every 0.2 s, keep the max per name in OUT (until killed)
  benchlib.py enrich RESULT BEFORE AFTER PEAK GW LABEL [extra JSON]   one enriched JSON line
  benchlib.py get FILE KEY [DEFAULT]       a field of the last JSON line of FILE
  benchlib.py report RESULTS_DIR           Markdown tables from RESULTS_DIR/*.jsonl
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
    return {"t": time.time(), "busy_ticks": total, "cpu_ticks": per, "loadavg": load, "procs": procs}


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
            calls = r.get("all_calls") or r.get("ok") or 0
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
        if extra:
            r.update(json.loads(extra))
        print(json.dumps(r))


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


def cores(v):
    return "–" if v is None else f"{v:.2f}"


def mib(kib):
    return "–" if kib in (None, "") else f"{float(kib) / 1024:.1f} MiB"


ORDER = ["direct", "nginx", "chatcli-http", "chatcli-grpc", "chatcli-http-auth", "chatcli-grpc-auth", "litellm"]


def order_key(name):
    return ORDER.index(name) if name in ORDER else len(ORDER)


def report(d):
    rows = load_dir(d)
    meta = {}
    try:
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
    except OSError:
        pass
    out = []
    w = out.append
    if meta:
        w(f"Run `{meta.get('run_id')}`: {meta.get('cmdline')}; {meta.get('cpu')}, {meta.get('nproc')} cores, "
          f"{meta.get('mem')}; load average at start {meta.get('loadavg_start')}; "
          f"chatcli {meta.get('chatcli_rev')}, LiteLLM {meta.get('litellm_version')}, nginx {meta.get('nginx_version')}.")
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
        w(f"### Throughput, {title}, gateway pinned to core 0")
        w("")
        w(f"Closed loop (concurrency {closed[0].get('concurrency')}, load client `loadgen`) gives the peak; the "
          "open-loop rate is the highest tried (peak × " + ", ".join(str(f) for f in sorted({r.get('factor') for r in opens if r.get('factor')}, reverse=True))
          + ") whose p99 stayed under 1 s with under 0.1% errors. CPU µs/call = the gateway process's CPU time "
          "(all threads, user + kernel) over the run ÷ calls answered.")
        w("")
        w("| target | closed-loop req/s | p50 | p99 | errors | gateway CPU µs/call | core 0 busy | core 1 busy | max rate with p99 < 1 s | its p50 / p99 | vs LiteLLM | vs nginx | other CPU |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in closed:
            t = r["target"]
            b = best.get(t)
            rate = f"{b['rate']:.0f}" if b else ("none passed" if t in tried else "–")
            pp = f"{us(b['p50_us'])} / {us(b['p99_us'])}" if b else "–"
            flag = ""
            if ceiling and t != "direct" and mock == "m0" and r["rps"] >= 0.9 * ceiling["rps"]:
                flag = " ⚠ ≥ 90% of the mock ceiling"
            w(f"| {t} | {r['rps']:.0f}{flag} | {us(r.get('p50_us'))} | {us(r.get('p99_us'))} | {r.get('errors')} | "
              f"{r.get('gw_cpu_us_per_call', '–') if t != 'direct' else '–'} | {busy(r, 'cpu0')} | {busy(r, 'cpu1')} | "
              f"{rate} | {pp} | {ratio(r['rps'], lit['rps'], '{:.0f}×') if lit and t not in ('direct', 'litellm') else '–'} | "
              f"{ratio(r['rps'], ngx['rps'], '{:.0%}') if ngx and t not in ('direct', 'nginx') else '–'} | {cores(r.get('foreign_cores'))} |")
        w("")
        wrk = [r for r in rows if r.get("label") == f"wrk-{mock}"]
        if wrk:
            w(f"Cross-check with `wrk -t1 -c64` (a lighter client than loadgen, so more of core 1 is left to the mock), {title}:")
            w("")
            w("| target | req/s | p50 | p99 | errors | gateway CPU µs/call | core 0 busy | core 1 busy |")
            w("|---|---|---|---|---|---|---|---|")
            for r in sorted(wrk, key=lambda r: order_key(r["target"])):
                w(f"| {r['target']} | {r['rps']:.0f} | {us(r.get('p50_us'))} | {us(r.get('p99_us'))} | {r.get('errors')} | "
                  f"{r.get('gw_cpu_us_per_call', '–')} | {busy(r, 'cpu0')} | {busy(r, 'cpu1')} |")
            w("")
    # Streaming
    st = sorted([r for r in rows if r.get("kind") == "stream-rounds"], key=lambda r: order_key(r["target"]))
    if st:
        w("### Streaming: 64 deltas 20 ms apart")
        w("")
        w(f"{st[0]['rounds']} interleaved rounds × {st[0]['concurrency']} concurrent streams per target. TTFT = request "
          "sent → first content delta received; gap = time between consecutive content deltas at the client.")
        w("")
        w("| target | TTFT p50 | TTFT p99 | added TTFT p50 | gap p50 | gap p99 | added gap p50 | added gap p99 | streams ok | errors |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for r in st:
            d = r["target"] == "direct"
            w(f"| {r['target']} | {us(r['ttft']['p50_us'])} | {us(r['ttft']['p99_us'])} | "
              f"{'–' if d else us(r['added_ttft_p50_us'])} | {us(r['gap']['p50_us'])} | {us(r['gap']['p99_us'])} | "
              f"{'–' if d else us(r['added_gap_p50_us'])} | {'–' if d else us(r['added_gap_p99_us'])} | {r['ok']} | {r['errors']} |")
        w("")
    # Memory
    mem = [r for r in rows if r.get("kind") == "memory"]
    if mem:
        w("### Memory (RSS of the gateway's process tree)")
        w("")
        w("| gateway | idle | peak during the zero-delay throughput runs | 1,000 streams open (HTTP) | 1,000 streams open (gRPC) |")
        w("|---|---|---|---|---|")
        for r in sorted(mem, key=lambda r: order_key(r["target"])):
            w(f"| {r['target']} | {mib(r.get('idle_kib'))} | {mib(r.get('peak_kib'))} | "
              f"{mib(r.get('hold_http_kib'))}{'' if r.get('hold_http_opened') in (None, 1000) else ' (' + str(r.get('hold_http_opened')) + ' opened)'} | "
              f"{mib(r.get('hold_grpc_kib'))}{'' if r.get('hold_grpc_opened') in (None, 1000) else ' (' + str(r.get('hold_grpc_opened')) + ' opened)'} |")
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
    elif cmd == "get":
        get(args[0], args[1], args[2] if len(args) > 2 else None)
    elif cmd == "report":
        report(args[0])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
