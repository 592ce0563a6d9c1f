#!/usr/bin/env bash
# The benchmark harness: chatcli's OpenAI-compatible HTTP route and gRPC SendPrompt
# side by side with LiteLLM's proxy, nginx as a plain reverse proxy, and the mock upstream called
# directly, all against the same mock, in one run. Both chatcli builds are measured in that run: the
# shipped one (profile-guided, scripts/build-pgo.sh → target/pgo/chatcli, process `chatcli`) and the
# plain `cargo build --release --locked` (target/release/chatcli, process `chatcli-plain`, targets
# chatcli-plain-http/-grpc). Results go to bench/results/<run id>/ (JSON lines + report.md, which
# starts with the headline table of BENCHMARKS.md); BENCHMARKS.md explains them.
#
#   bench/run.sh            full run (~17 min on the 2-core VM, plus ~15 min for scripts/build-pgo.sh
#                           and a few for the plain release build)
#   bench/run.sh --quick    shorter points, fewer rounds (~6 min)
#   bench/run.sh --smoke    mock + chatcli only, a few hundred calls, asserts zero errors (~10 s
#                           after the build); for the test suite: `bench/run.sh --smoke --debug`
#                           uses the debug build the tests already made
#
# Options: --no-litellm (skip the LiteLLM baseline), --no-build (use the built binaries),
#          --no-plain (skip the plain release build: measure the profile-guided one only),
#          --no-pgo (measure only the plain release build, as the process `chatcli`; no
#          chatcli-plain then),
#          --debug (debug build instead of release: only for --smoke, numbers would be meaningless),
#          --chatcli PATH (measure this chatcli binary in place of the profile-guided build, e.g.
#          the shipped one scripts/release.sh builds; the plain build is still measured beside it
#          unless --no-plain),
#          --max-wait SECS (how long to wait for a quiet machine before each point, default 180),
#          --quiet-max CORES (quiet = processes other than the harness's use less than this many
#          cores over 3 s, default 0.3; the load average is no use here: the harness's own load
#          keeps it above 1).
# Environment: BENCH_PORT_BASE (default 18000): ports BASE+80.. are used.
#
# Pinning (taskset): the gateway under test (chatcli, chatcli-plain, nginx, LiteLLM) on core 0; the
# mock upstreams and the load client on core 1. The gateways not under test sit idle meanwhile.
set -euo pipefail

QUICK=0 SMOKE=0 LITELLM=1 BUILD=1 PGO=1 PLAIN=1 MAXWAIT=180 QUIET_MAX=0.3 PROFILE=release CHATCLI_BIN=
CMDLINE="bench/run.sh $*"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --smoke) SMOKE=1 ;;
        --no-litellm) LITELLM=0 ;;
        --no-build) BUILD=0 ;;
        --no-pgo) PGO=0 ;;
        --no-plain) PLAIN=0 ;;
        --debug) PROFILE=debug ;;
        --max-wait) MAXWAIT=$2; shift ;;
        --quiet-max) QUIET_MAX=$2; shift ;;
        --chatcli) CHATCLI_BIN=$2; shift ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
[[ $SMOKE == 1 ]] && LITELLM=0 PGO=0 PLAIN=0
# Without the profile-guided build, `chatcli` itself is the plain release build: no second copy.
[[ $PGO == 0 && -z $CHATCLI_BIN ]] && PLAIN=0
if [[ -n $CHATCLI_BIN ]]; then
    PGO=0
    CHATCLI_BIN=$(cd "$(dirname "$CHATCLI_BIN")" && pwd)/$(basename "$CHATCLI_BIN")
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
LIB="python3 $BENCH/benchlib.py"
# Pinned LiteLLM: a recent release that installs from PyPI here. Never 1.82.7 or 1.82.8 (those two
# releases were compromised).
LITELLM_VERSION=1.106.12
VENV=$BENCH/.litellm-venv
MASTER_KEY=sk-bench-master-key
JWT_SECRET=bench-jwt-secret-0123456789abcdefghijklmnopqrstuvwxyz

BASE=${BENCH_PORT_BASE:-18000}
M0=$((BASE + 80)) M20=$((BASE + 81)) MS=$((BASE + 82)) MH=$((BASE + 83))
CC=$((BASE + 100)) CCM=$((BASE + 190)) CA=$((BASE + 101)) CAM=$((BASE + 191))
CP=$((BASE + 102)) CPM=$((BASE + 192))
NGX=$((BASE + 200)) LLM=$((BASE + 300))

RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
if [[ $SMOKE == 1 ]]; then
    OUT=$(mktemp -d /tmp/chatcli-bench-smoke.XXXXXX)
else
    OUT=$BENCH/results/$RUN_ID
    [[ $QUICK == 1 ]] && OUT+=-quick
fi
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/chatcli-bench.XXXXXX)
START_TS=$(date +%s)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench/run.sh: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

declare -A PID=()
cleanup() {
    local p
    if [[ -n ${WATCH_PID:-} ]]; then kill "$WATCH_PID" 2>/dev/null || true; fi
    for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PID[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Preconditions, installs, build

NPROC=$(nproc)
# Command prefixes (arrays, not functions: a background job of an external command is that
# command's own PID, which is what gets measured and stopped).
if (( NPROC >= 2 )); then
    GW_CORE=0 LOAD_CORE=1
    PIN_GW=(taskset -c "$GW_CORE")
    PIN_LOAD=(taskset -c "$LOAD_CORE")
else
    log "only $NPROC core: no pinning, gateway and load share it"
    PIN_GW=() PIN_LOAD=()
fi

need=()
command -v curl >/dev/null || need+=(curl)
command -v taskset >/dev/null || need+=(util-linux)
if [[ $SMOKE == 0 ]]; then
    [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
    command -v wrk >/dev/null || need+=(wrk)
fi
if (( ${#need[@]} )); then
    log "installing ${need[*]} (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || die "apt-get install ${need[*]} failed"
fi

if [[ $LITELLM == 1 ]]; then
    if ! "$VENV/bin/python" -c "import sys; from importlib.metadata import version; sys.exit(version('litellm') != '$LITELLM_VERSION')" 2>/dev/null; then
        log "installing LiteLLM $LITELLM_VERSION into $VENV"
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed"
        "$VENV/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION" || die "pip install litellm[proxy]==$LITELLM_VERSION failed"
    fi
fi

[[ $PROFILE == debug && $SMOKE == 0 ]] && die "--debug is only for --smoke (a debug build's numbers mean nothing)"
if [[ $BUILD == 1 && $PGO == 1 ]]; then
    # The script builds the mock and the load client (release) too.
    log "building chatcli with profile-guided optimization (scripts/build-pgo.sh)"
    "$ROOT/scripts/build-pgo.sh" --out "$ROOT/target/pgo/chatcli" || die "the PGO build failed (--no-pgo measures a plain release build)"
fi
if [[ $BUILD == 1 ]]; then
    # The mock and the load client (no-ops after build-pgo.sh), and chatcli's plain build when it is
    # measured: as `chatcli` (--no-pgo, --smoke) or as `chatcli-plain` beside the PGO build.
    flag=(--release)
    [[ $PROFILE == debug ]] && flag=()
    what=(--example mock_upstream --example loadgen)
    if [[ $PLAIN == 1 ]] || [[ $PGO == 0 && -z $CHATCLI_BIN ]]; then what=(--bins "${what[@]}"); fi
    log "building (cargo build ${flag[*]} --locked ${what[*]})"
    (cd "$ROOT" && cargo build "${flag[@]}" --locked "${what[@]}") || die "the $PROFILE build failed"
fi
BIN=$ROOT/target/$PROFILE/chatcli
[[ $PGO == 1 ]] && BIN=$ROOT/target/pgo/chatcli
[[ -n $CHATCLI_BIN ]] && BIN=$CHATCLI_BIN
BIN_PLAIN=$ROOT/target/release/chatcli
MOCK=$ROOT/target/$PROFILE/examples/mock_upstream
LG=$ROOT/target/$PROFILE/examples/loadgen
bins=("$BIN" "$MOCK" "$LG")
[[ $PLAIN == 1 ]] && bins+=("$BIN_PLAIN")
for b in "${bins[@]}"; do [[ -x $b ]] || die "$b is missing (run without --no-build)"; done

ports=("$M0" "$M20" "$MS" "$MH" "$CC" "$CCM")
[[ $SMOKE == 0 ]] && ports+=("$CA" "$CAM" "$NGX")
[[ $PLAIN == 1 ]] && ports+=("$CP" "$CPM")
[[ $LITELLM == 1 ]] && ports+=("$LLM")
ports_free BENCH_PORT_BASE "${ports[@]}"

# ---------------------------------------------------------------------------------------------
# Processes

start() { # NAME CMD...: starts CMD in the background, logs to $TMP/NAME.log
    local name=$1; shift
    "$@" >"$TMP/$name.log" 2>&1 &
    PID[$name]=$!
}

wait_http() { # NAME URL TIMEOUT_S [curl args...]
    local name=$1 url=$2 timeout=$3; shift 3
    local i=0
    until curl -sf -o /dev/null --max-time 2 "$@" "$url"; do
        if ! kill -0 "${PID[$name]}" 2>/dev/null; then
            tail -n 30 "$TMP/$name.log" >&2 || true
            die "$name exited before answering $url (log above)"
        fi
        (( i++ >= timeout * 5 )) && { tail -n 30 "$TMP/$name.log" >&2; die "$name did not answer $url within ${timeout}s"; }
        sleep 0.2
    done
}

completion_ok() { # URL MODEL [curl args...]: a non-streamed completion answers with the mock's text
    local url=$1 model=$2; shift 2
    local body
    body=$(curl -s --max-time 10 -H 'content-type: application/json' "$@" \
        -d "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" "$url") || return 1
    [[ $body == *tok0* ]] || { echo "$body" | head -c 400 >&2; echo >&2; return 1; }
}

render() { # IN OUT KEY=VALUE...
    local in=$1 out=$2; shift 2
    local s
    s=$(<"$in")
    for kv in "$@"; do s=${s//@${kv%%=*}@/${kv#*=}}; done
    printf '%s\n' "$s" >"$out"
}

log "starting the mocks on core ${LOAD_CORE:-any}"
start mock-m0 "${PIN_LOAD[@]}" "$MOCK" --port "$M0"
start mock-m20 "${PIN_LOAD[@]}" "$MOCK" --port "$M20" --latency 20ms
start mock-ms "${PIN_LOAD[@]}" "$MOCK" --port "$MS" --deltas 64 --interval 20ms
# Long streams for holding 1,000 open: 1200 deltas 50 ms apart (a minute).
start mock-mh "${PIN_LOAD[@]}" "$MOCK" --port "$MH" --deltas 1200 --interval 50ms
for m in m0:$M0 m20:$M20 ms:$MS mh:$MH; do
    wait_http "mock-${m%%:*}" "http://127.0.0.1:${m#*:}/health" 10
done
completion_ok "http://127.0.0.1:$M0/v1/chat/completions" x || die "the mock does not answer a completion"

fill=(TMP="$TMP" M0="$M0" M20="$M20" MS="$MS" MH="$MH")
# Each chatcli config sits alone in its own directory: chatcli watches its config's directory for
# hot reload, so files the harness writes must not land next to it.
# conf-noauth: `chatcli` (the measured build); conf-auth: `chatcli-auth` (same binary, JWT + audit);
# conf-plain-build: `chatcli-plain` (the plain release build, the same settings as conf-noauth).
mkdir -p "$TMP/conf-noauth" "$TMP/conf-auth" "$TMP/conf-plain-build" "$TMP/audit"
render "$BENCH/chatcli.toml.in" "$TMP/conf-noauth/chatcli.toml" "${fill[@]}" PORT="$CC" METRICS="$CCM" NAME=noauth EXTRA=""
render "$BENCH/chatcli.toml.in" "$TMP/conf-auth/chatcli.toml" "${fill[@]}" PORT="$CA" METRICS="$CAM" NAME=auth \
    EXTRA="[auth.jwt]
secret = \"$JWT_SECRET\"

[audit]
path = \"$TMP/audit/audit.jsonl\""
render "$BENCH/chatcli.toml.in" "$TMP/conf-plain-build/chatcli.toml" "${fill[@]}" PORT="$CP" METRICS="$CPM" NAME=plain-build EXTRA=""

# The chatcli processes: the binary, config and port of each, to start them and restart them.
declare -A GW_BIN=([chatcli]="$BIN" [chatcli-auth]="$BIN" [chatcli-plain]="$BIN_PLAIN")
declare -A GW_CONF=([chatcli]=noauth [chatcli-auth]=auth [chatcli-plain]=plain-build)
declare -A GW_PORT=([chatcli]="$CC" [chatcli-auth]="$CA" [chatcli-plain]="$CP")
start_chatcli() { # NAME: starts it pinned to the gateway core; waits until it answers (and, without
    # auth, answers a completion through the mock)
    local n=$1
    start "$n" "${PIN_GW[@]}" "${GW_BIN[$n]}" server --config "$TMP/conf-${GW_CONF[$n]}/chatcli.toml"
    wait_http "$n" "http://127.0.0.1:${GW_PORT[$n]}/health" 30
    [[ $n == chatcli-auth ]] && return 0
    completion_ok "http://127.0.0.1:${GW_PORT[$n]}/v1/chat/completions" m0 || die "$n does not answer a completion through the mock"
}

log "starting chatcli on core ${GW_CORE:-any}"
start_chatcli chatcli
[[ $SMOKE == 0 ]] && start_chatcli chatcli-auth
if [[ $PLAIN == 1 ]]; then
    log "starting chatcli-plain (the plain release build, target/release/chatcli) on core ${GW_CORE:-any}"
    start_chatcli chatcli-plain
fi

if [[ $SMOKE == 0 ]]; then
    log "starting nginx on core $GW_CORE"
    mkdir -p "$TMP"/nginx-{body,proxy,fastcgi,uwsgi,scgi}
    render "$BENCH/nginx.conf.in" "$TMP/nginx.conf" "${fill[@]}" NGINX="$NGX"
    start nginx "${PIN_GW[@]}" /usr/sbin/nginx -c "$TMP/nginx.conf" -p "$TMP"
    wait_http nginx "http://127.0.0.1:$NGX/m0/health" 10
    completion_ok "http://127.0.0.1:$NGX/m0/v1/chat/completions" m0 || die "nginx does not proxy a completion"
fi

if [[ $LITELLM == 1 ]]; then
    log "starting LiteLLM $LITELLM_VERSION on core $GW_CORE (can take a minute)"
    render "$BENCH/litellm.yaml.in" "$TMP/litellm.yaml" "${fill[@]}"
    start litellm env -C "$TMP" LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR LITELLM_TELEMETRY=False \
        DISABLE_SCHEMA_UPDATE=True NO_DOCS=True \
        "${PIN_GW[@]}" "$VENV/bin/litellm" --config "$TMP/litellm.yaml" \
        --host 127.0.0.1 --port "$LLM" --num_workers 1
    wait_http litellm "http://127.0.0.1:$LLM/health/liveliness" 240
    completion_ok "http://127.0.0.1:$LLM/v1/chat/completions" m0 -H "authorization: Bearer $MASTER_KEY" \
        || die "LiteLLM started but does not answer a completion through the mock"
fi

# Target specs for the load client.
spec_direct() { echo "name=direct,proto=http,url=http://127.0.0.1:$(mport "$1")/v1/chat/completions,model=$1"; }
spec_nginx() { echo "name=nginx,proto=http,url=http://127.0.0.1:$NGX/$1/v1/chat/completions,model=$1"; }
spec_cchttp() { echo "name=chatcli-http,proto=http,url=http://127.0.0.1:$CC/v1/chat/completions,model=$1"; }
spec_ccgrpc() { echo "name=chatcli-grpc,proto=grpc,url=http://127.0.0.1:$CC,model=$1"; }
spec_cphttp() { echo "name=chatcli-plain-http,proto=http,url=http://127.0.0.1:$CP/v1/chat/completions,model=$1"; }
spec_cpgrpc() { echo "name=chatcli-plain-grpc,proto=grpc,url=http://127.0.0.1:$CP,model=$1"; }
spec_cahttp() { echo "name=chatcli-http-auth,proto=http,url=http://127.0.0.1:$CA/v1/chat/completions,model=$1,auth=jwt:$JWT_SECRET"; }
spec_cagrpc() { echo "name=chatcli-grpc-auth,proto=grpc,url=http://127.0.0.1:$CA,model=$1,auth=jwt:$JWT_SECRET"; }
spec_litellm() { echo "name=litellm,proto=http,url=http://127.0.0.1:$LLM/v1/chat/completions,model=$1,auth=bearer:$MASTER_KEY"; }
mport() { case $1 in m0) echo "$M0" ;; m20) echo "$M20" ;; ms) echo "$MS" ;; mh) echo "$MH" ;; esac; }
gw_of() { # TARGET: the process that serves it (empty for direct)
    case $1 in
        direct) echo "" ;; nginx) echo nginx ;; litellm) echo litellm ;;
        chatcli-http|chatcli-grpc) echo chatcli ;; chatcli-plain-http|chatcli-plain-grpc) echo chatcli-plain ;;
        chatcli-http-auth|chatcli-grpc-auth) echo chatcli-auth ;;
    esac
}

# The gateway processes, and all the processes whose CPU and RSS are recorded.
GATEWAYS=(chatcli chatcli-plain chatcli-auth nginx litellm)
named_pids() {
    local n
    for n in "${GATEWAYS[@]}" mock-m0 mock-m20 mock-ms mock-mh; do
        [[ -n ${PID[$n]:-} ]] && printf '%s=%s ' "$n" "$(gw_pid "$n")"
    done
    echo
}
# The real server process (the started PID may be taskset/env that exec'd it: same PID).
gw_pid() { echo "${PID[$1]}"; }

UNDER_LOAD=0
wait_quiet() { # waits until other processes use less than QUIET_MAX cores (at most MAXWAIT s)
    local waited=0 other
    while :; do
        # shellcheck disable=SC2046
        other=$($LIB quiet 3 $(named_pids))
        awk -v a="$other" -v b="$QUIET_MAX" 'BEGIN{exit !(a < b)}' && return 0
        if (( waited >= MAXWAIT )); then
            log "other processes still use $other cores after ${waited}s: measuring anyway (marked as under load)"
            UNDER_LOAD=1
            return 0
        fi
        (( waited == 0 )) && log "waiting for a quiet machine (other processes use $other cores; load average $(cut -d' ' -f1 /proc/loadavg))"
        sleep 7
        waited=$((waited + 10))
    done
}

# measure LABEL FILE GATEWAY EXTRA_JSON -- LOADGEN ARGS...: runs the load client pinned to the load
# core, with CPU/RSS snapshots of every gateway around it, and appends the enriched JSON to FILE.
# (`-- wrk ARGS...` runs wrk instead.)
WATCH_PID=
measure() {
    local label=$1 file=$2 gw=$3 extra=$4; shift 5
    local names
    names=$(named_pids)
    # shellcheck disable=SC2086
    $LIB snap $names >"$TMP/before.json"
    rm -f "$TMP/peak.json"
    # shellcheck disable=SC2086
    $LIB watch "$TMP/peak.json" $names &
    WATCH_PID=$!
    local rc=0
    local cmd=("$LG")
    [[ $1 == wrk ]] && cmd=(python3 "$BENCH/benchlib.py" child --)
    "${PIN_LOAD[@]}" "${cmd[@]}" "$@" >"$TMP/result.json" 2>"$TMP/loadgen.err" || rc=$?
    kill "$WATCH_PID" 2>/dev/null || true
    wait "$WATCH_PID" 2>/dev/null || true
    WATCH_PID=
    # shellcheck disable=SC2086
    $LIB snap $names >"$TMP/after.json"
    if (( rc != 0 )); then
        cat "$TMP/loadgen.err" >&2
        die "the load client failed in $label (exit $rc)"
    fi
    $LIB enrich "$TMP/result.json" "$TMP/before.json" "$TMP/after.json" "$TMP/peak.json" "$gw" "$label" "$extra" \
        | tee -a "$file" >"$TMP/last.json"
    grep -v '^round\|^stream round' "$TMP/loadgen.err" >&2 || true
}
jget() { $LIB get "$TMP/last.json" "$@"; }

gw_rss() { $LIB snap "x=$(gw_pid "$1")" | python3 -c 'import json,sys; print(json.load(sys.stdin)["procs"]["x"]["rss_kib"])'; }

# ---------------------------------------------------------------------------------------------
# Smoke run (test suite): correctness, not speed

if [[ $SMOKE == 1 ]]; then
    log "smoke: HTTP and gRPC through chatcli"
    measure smoke-http "$OUT/smoke.jsonl" chatcli '{}' -- run --target "$(spec_cchttp m0)" --concurrency 4 --requests 300
    [[ $(jget errors) == 0 && $(jget ok) == 300 ]] || die "smoke: HTTP calls failed: $(jget first_error)"
    measure smoke-grpc "$OUT/smoke.jsonl" chatcli '{}' -- run --target "$(spec_ccgrpc m0)" --concurrency 4 --requests 300
    [[ $(jget errors) == 0 && $(jget ok) == 300 ]] || die "smoke: gRPC calls failed: $(jget first_error)"
    measure smoke-stream "$OUT/smoke.jsonl" "" '{}' -- stream-rounds --rounds 1 --concurrency 2 --expect-deltas 64 \
        --target "$(spec_direct ms)" --target "$(spec_cchttp ms)" --target "$(spec_ccgrpc ms)"
    errs=$(python3 -c 'import json,sys; print(sum(json.loads(l)["errors"] for l in open(sys.argv[1]) if "stream-rounds" in l))' "$OUT/smoke.jsonl")
    [[ $errs == 0 ]] || die "smoke: streamed calls failed (see $OUT/smoke.jsonl)"
    log "smoke: ok (600 calls and 6 streams, zero errors) in $(( $(date +%s) - START_TS ))s"
    rm -rf "$OUT"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Scenarios

if [[ $QUICK == 1 ]]; then
    DUR=5 ROUNDS=6 PER_ROUND=100 SROUNDS=3 FACTORS="1.0 0.75 0.5 0.25" HOLD_SECS=3
else
    DUR=10 ROUNDS=15 PER_ROUND=200 SROUNDS=5 FACTORS="1.0 0.9 0.75 0.5 0.25 0.1" HOLD_SECS=5
fi

meta() {
    python3 - "$@" <<'EOF'
import json, os, subprocess, sys, time
def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return ""
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
out, run_id, cmdline, litellm, root = sys.argv[1:6]
# The chatcli processes' builds: NAME KIND WHAT BINARY, four arguments each.
builds = {}
for name, kind, what, path in zip(*[iter(sys.argv[6:])] * 4):
    st = os.stat(path)
    try:
        r = subprocess.run(["ldd", path], capture_output=True, text=True)
        ldd = r.stdout + r.stderr
    except OSError:
        ldd = ""
    builds[name] = {"kind": kind, "what": what, "bin": path, "bytes": st.st_size,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
                    "linked": ("static" if ("statically linked" in ldd or "not a dynamic" in ldd) else "dynamic") if ldd else None}
build = "; ".join(f"{n}: {b['what']}" for n, b in builds.items())
json.dump({
    "run_id": run_id, "cmdline": cmdline, "cpu": cpu, "nproc": os.cpu_count(),
    "mem": f"{int(mem) / 1024 / 1024:.1f} GiB", "loadavg_start": open("/proc/loadavg").read().split()[0],
    "kernel": sh("uname -r"), "chatcli_rev": sh(f"git -C {root} rev-parse --short HEAD") + (" (+ uncommitted changes)" if sh(f"git -C {root} status --porcelain -- src Cargo.toml Cargo.lock") else ""),
    "litellm_version": litellm, "nginx_version": sh("/usr/sbin/nginx -v 2>&1").replace("nginx version: ", ""),
    "wrk": sh("wrk -v 2>&1 | head -1"), "rustc": sh("rustc --version"), "chatcli_build": build,
    "chatcli_builds": builds,
}, open(os.path.join(out, "meta.json"), "w"), indent=1)
EOF
}
# Which build each chatcli process runs (kind: pgo, plain or given; the report names its rows by it).
if [[ -n $CHATCLI_BIN ]]; then
    builds=(chatcli given "the binary given with --chatcli ($CHATCLI_BIN)" "$BIN")
elif [[ $PGO == 1 ]]; then
    builds=(chatcli pgo "profile-guided release build (scripts/build-pgo.sh → target/pgo/chatcli), the build that ships" "$BIN")
else
    builds=(chatcli plain "plain release build (cargo build --release --locked → target/release/chatcli)" "$BIN")
fi
[[ $PLAIN == 1 ]] && builds+=(chatcli-plain plain "plain release build (cargo build --release --locked → target/release/chatcli)" "$BIN_PLAIN")
meta "$OUT" "$RUN_ID" "$CMDLINE" "$([[ $LITELLM == 1 ]] && echo "$LITELLM_VERSION" || echo "not run")" "$ROOT" "${builds[@]}"

# Memory at idle: every gateway started, one call answered, nothing in flight.
sleep 2
declare -A IDLE=()
for g in "${GATEWAYS[@]}"; do
    [[ -n ${PID[$g]:-} ]] && IDLE[$g]=$(gw_rss "$g")
done

# The plain build's targets (empty with --no-plain): in the latency, zero-delay throughput,
# steady-state streaming and memory scenarios; the auth targets and the 20 ms mock are the
# measured (PGO) build's only.
PLAIN_TARGETS=()
[[ $PLAIN == 1 ]] && PLAIN_TARGETS=(chatcli-plain-http chatcli-plain-grpc)
TARGETS_ALL=(direct nginx chatcli-http chatcli-grpc "${PLAIN_TARGETS[@]}" chatcli-http-auth chatcli-grpc-auth)
[[ $LITELLM == 1 ]] && TARGETS_ALL+=(litellm)
spec_of() { # TARGET MOCK
    case $1 in
        direct) spec_direct "$2" ;; nginx) spec_nginx "$2" ;; chatcli-http) spec_cchttp "$2" ;;
        chatcli-grpc) spec_ccgrpc "$2" ;; chatcli-plain-http) spec_cphttp "$2" ;;
        chatcli-plain-grpc) spec_cpgrpc "$2" ;; chatcli-http-auth) spec_cahttp "$2" ;;
        chatcli-grpc-auth) spec_cagrpc "$2" ;; litellm) spec_litellm "$2" ;;
    esac
}

# 1. The mock's own ceiling: the mock and the load client together on the load core, as in every
# proxied run (where the gateway has core 0 to itself).
wait_quiet
log "scenario: mock ceiling"
measure ceiling "$OUT/1-ceiling.jsonl" "" '{"client":"loadgen"}' -- \
    run --target "$(spec_direct m0)" --concurrency 64 --duration "$DUR" --warmup 1
CEILING=$(jget rps)
log "  mock ceiling (loadgen, c=64): $CEILING req/s"
# Cross-check with wrk (same pinning, one thread, HTTP/1.1 keep-alive, same body; wrk checks the
# status only): the mock's ceiling with a lighter client, and later nginx and chatcli with it.
printf '%s' '{"model":"m0","messages":[{"role":"user","content":"Say hello to the benchmark."}],"stream":false}' >"$TMP/body.json"
wrk_lua() { # TARGET_NAME: a wrk script that posts the body and prints one JSON line
    cat >"$TMP/wrk-$1.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$TMP/body.json"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout
  io.write(string.format('{"kind":"wrk","client":"wrk","target":"$1","concurrency":64,"rps":%f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"errors":%d,"ok":%d,"all_calls":%d}\n',
    (summary.requests - errors) / (summary.duration / 1e6), latency:percentile(50), latency:percentile(90), latency:percentile(99),
    errors, summary.requests - errors, summary.requests))
end
EOF
    echo "$TMP/wrk-$1.lua"
}
measure ceiling-wrk "$OUT/1-ceiling.jsonl" "" '{}' -- \
    wrk -t1 -c64 -d"${DUR}s" -s "$(wrk_lua direct)" "http://127.0.0.1:$M0/v1/chat/completions"
log "  mock ceiling (wrk, c=64): $(jget rps) req/s"

# 2. Added latency at concurrency 1 (zero-delay mock), interleaved rounds.
wait_quiet
log "scenario: added latency at concurrency 1 ($ROUNDS rounds × $PER_ROUND calls per target)"
args=()
for t in "${TARGETS_ALL[@]}"; do args+=(--target "$(spec_of "$t" m0)"); done
measure latency "$OUT/2-latency.jsonl" "" '{}' -- rounds --rounds "$ROUNDS" --per-round "$PER_ROUND" --warmup 200 "${args[@]}"

# 3. Throughput: closed-loop peak, then the highest open-loop rate whose p99 stays under 10 ms or
# 5× the target's unloaded p99 (concurrency 1), whichever is larger, with < 0.1% errors. A p99 of
# seconds means queues still growing, not a rate the target sustains.
tput() { # MOCK TARGET CONCURRENCY CONNECTIONS
    local mock=$1 t=$2 conc=$3 conns=$4 gw peak rate f p99 er pass limit
    gw=$(gw_of "$t")
    wait_quiet
    measure "tput-$mock-unloaded" "$OUT/3-tput-$mock.jsonl" "$gw" '{}' -- \
        run --target "$(spec_of "$t" "$mock")" --concurrency 1 --requests 300
    limit=$(awk -v u="$(jget p99_us)" 'BEGIN{l=5*u; if (l < 10000) l = 10000; printf "%.0f", l}')
    measure "tput-$mock-closed" "$OUT/3-tput-$mock.jsonl" "$gw" '{}' -- \
        run --target "$(spec_of "$t" "$mock")" --concurrency "$conc" --duration "$DUR" --warmup 1
    peak=$(jget rps)
    log "  $t ($mock): closed loop c=$conc: $peak req/s, p99 $(jget p99_us) µs, errors $(jget errors), gateway CPU $(jget gw_cpu_us_per_call) µs/call"
    for f in $FACTORS; do
        rate=$(awk -v p="$peak" -v f="$f" 'BEGIN{r=p*f; if (r < 1) r = 1; printf "%.0f", r}')
        measure "tput-$mock-open" "$OUT/3-tput-$mock.jsonl.tmp" "$gw" "{\"factor\":$f}" -- \
            run --target "$(spec_of "$t" "$mock")" --rate "$rate" --connections "$conns" --duration "$DUR" --warmup 1
        p99=$(jget p99_us) er=$(jget error_rate)
        pass=$(awk -v p="$p99" -v l="$limit" -v e="$er" 'BEGIN{print (p < l && e < 0.001) ? "true" : "false"}')
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["passed"]=sys.argv[2]=="true"; r["p99_limit_us"]=int(sys.argv[3]); print(json.dumps(r))' \
            "$TMP/last.json" "$pass" "$limit" >>"$OUT/3-tput-$mock.jsonl"
        log "    open loop $rate req/s: p50 $(jget p50_us) µs, p99 $p99 µs (limit $limit µs), errors $(jget errors) → $([[ $pass == true ]] && echo pass || echo fail)"
        [[ $pass == true ]] && break
    done
    rm -f "$OUT/3-tput-$mock.jsonl.tmp"
}
log "scenario: throughput, zero-delay mock"
for t in "${TARGETS_ALL[@]}"; do tput m0 "$t" 64 256; done
for t in nginx chatcli-http; do
    wait_quiet
    case $t in nginx) url="http://127.0.0.1:$NGX/m0/v1/chat/completions" ;; *) url="http://127.0.0.1:$CC/v1/chat/completions" ;; esac
    measure "wrk-m0" "$OUT/3-wrk-m0.jsonl" "$(gw_of "$t")" '{}' -- wrk -t1 -c64 -d"${DUR}s" -s "$(wrk_lua "$t")" "$url"
    log "  $t (m0) with wrk, c=64: $(jget rps) req/s, gateway CPU $(jget gw_cpu_us_per_call) µs/call"
done
peak_rss() { # FILE GATEWAY: the highest RSS sampled while GATEWAY was under test in FILE's runs
    # (empty when it was in none of them)
    python3 -c '
import json,sys
v=[r.get("gw_rss_peak_kib") or 0 for r in map(json.loads, open(sys.argv[1])) if r.get("gateway")==sys.argv[2]]
print(max(v) if v else "")' "$1" "$2"
}
declare -A PEAK=()
for g in "${GATEWAYS[@]}"; do
    [[ -n ${PID[$g]:-} ]] && PEAK[$g]=$(peak_rss "$OUT/3-tput-m0.jsonl" "$g")
done
log "scenario: throughput, 20 ms mock"
# 2,048 calls in flight (25 ms each) allow up to ~80k req/s, above what core 1 can drive, so the
# gateway or the load core is the limit, not the concurrency. LiteLLM gets 512: it is saturated
# long before that, and thousands of connections only grow its queue.
for t in direct nginx chatcli-http chatcli-grpc; do tput m20 "$t" 2048 2048; done
[[ $LITELLM == 1 ]] && tput m20 litellm 512 1024

# 4. Streaming: added time to first token and added gap between chunks.
wait_quiet
log "scenario: streaming (64 deltas, 20 ms apart)"
args=()
for t in direct nginx chatcli-http chatcli-grpc $([[ $LITELLM == 1 ]] && echo litellm); do args+=(--target "$(spec_of "$t" ms)"); done
measure streaming "$OUT/4-streaming.jsonl" "" '{}' -- stream-rounds --rounds "$SROUNDS" --concurrency 4 --expect-deltas 64 "${args[@]}"
# Steady state: 32 streams always open per target (a new one starts when one ends; the first ones
# staggered over a stream's length, so deltas arrive evenly rather than in bursts of 32), so the
# cores never fall idle; TTFT and gaps of every stream that ends in the window.
steady=(direct nginx chatcli-http chatcli-grpc "${PLAIN_TARGETS[@]}")
[[ $LITELLM == 1 ]] && steady+=(litellm)
for t in "${steady[@]}"; do
    wait_quiet
    measure streaming-steady "$OUT/4-streaming-steady.jsonl" "$(gw_of "$t")" '{}' -- \
        run --stream --target "$(spec_of "$t" ms)" --concurrency 32 --duration "$DUR" --warmup 3 --stagger 1.3
    log "  $t: 32 streams: TTFT p50 $(jget ttft.p50_us) µs, gap p50 $(jget gap.p50_us) µs p99 $(jget gap.p99_us) µs, errors $(jget errors)"
done

# 5. Memory with 1,000 streams held open (HTTP, and gRPC for chatcli and chatcli-plain).
hold() { # TARGET: prints "RSS_KIB OPENED"
    local t=$1 g
    g=$(gw_of "$t")
    "${PIN_LOAD[@]}" "$LG" hold --target "$(spec_of "$t" mh)" --streams 1000 --secs "$HOLD_SECS" >"$TMP/hold.out" 2>"$TMP/hold.err" &
    local hp=$! opened="" i=0
    while (( i++ < 900 )); do
        opened=$(sed -n 's/^HELD //p' "$TMP/hold.out" 2>/dev/null)
        [[ -n $opened ]] && break
        kill -0 "$hp" 2>/dev/null || break
        sleep 0.1
    done
    sleep 1
    local rss
    rss=$(gw_rss "$g")
    wait "$hp" || true
    grep -v '^$' "$TMP/hold.err" >&2 || true
    echo "$rss ${opened:-0}"
    sleep 2 # let the gateway close the upstream streams
}
wait_quiet
log "scenario: memory with 1,000 open streams"
# What the throughput runs leave behind: the allocator keeps the memory of the 2,048-connection runs.
# (chatcli-auth: idle and peak only, below.)
HELD=(chatcli chatcli-plain nginx litellm)
declare -A AFTER=() PEAK20=()
for g in "${HELD[@]}"; do
    [[ -n ${PID[$g]:-} ]] || continue
    AFTER[$g]=$(gw_rss "$g")
    PEAK20[$g]=$(peak_rss "$OUT/3-tput-m20.jsonl" "$g")
done
restart_chatcli() { # NAME: a fresh process, so each hold measures only itself
    local n=$1
    if kill "${PID[$n]}"; then wait "${PID[$n]}" 2>/dev/null || true; fi
    start_chatcli "$n"
    sleep 2
}
for g in "${HELD[@]}"; do
    [[ -n ${PID[$g]:-} ]] || continue
    fresh="" gk="" go=""
    case $g in
        chatcli|chatcli-plain)
            restart_chatcli "$g"
            fresh=$(gw_rss "$g")
            read -r hk ho < <(hold "$g-http")
            restart_chatcli "$g"
            read -r gk go < <(hold "$g-grpc")
            ;;
        *) read -r hk ho < <(hold "$g") ;;
    esac
    log "  $g: idle ${IDLE[$g]} KiB, peak ${PEAK[$g]:-?}/${PEAK20[$g]:-?} KiB, after the load ${AFTER[$g]} KiB, 1000 HTTP streams $hk KiB ($ho opened)${gk:+, 1000 gRPC streams $gk KiB ($go opened)}"
    python3 -c '
import json,sys
a=sys.argv[1:]
v=lambda x: int(x) if x else None
print(json.dumps({"kind":"memory","target":a[0],"idle_kib":v(a[1]),"peak_kib":v(a[2]),"peak20_kib":v(a[3]),"after_kib":v(a[4]),
  "fresh_kib":v(a[5]),"hold_http_kib":v(a[6]),"hold_http_opened":v(a[7]),"hold_grpc_kib":v(a[8]),"hold_grpc_opened":v(a[9])}))' \
        "$g" "${IDLE[$g]}" "${PEAK[$g]:-}" "${PEAK20[$g]:-}" "${AFTER[$g]}" "$fresh" "$hk" "$ho" "$gk" "$go" >>"$OUT/5-memory.jsonl"
done
python3 -c '
import json,sys
print(json.dumps({"kind":"memory","target":"chatcli-auth","idle_kib":int(sys.argv[1]),"peak_kib":int(sys.argv[2] or 0) or None}))' \
    "${IDLE[chatcli-auth]}" "${PEAK[chatcli-auth]:-}" >>"$OUT/5-memory.jsonl"

# Audit records written (the auth+audit runs must have produced them).
AUDIT_LINES=$(cat "$TMP"/audit/audit.jsonl* 2>/dev/null | wc -l)
WALL=$(( $(date +%s) - START_TS ))
python3 - "$OUT/meta.json" "$WALL" "$UNDER_LOAD" "$AUDIT_LINES" <<'EOF'
import json, sys
p = sys.argv[1]
m = json.load(open(p))
m["wall_s"] = int(sys.argv[2]); m["under_load"] = sys.argv[3] == "1"; m["audit_lines"] = int(sys.argv[4])
m["loadavg_end"] = open("/proc/loadavg").read().split()[0]
json.dump(m, open(p, "w"), indent=1)
EOF
$LIB report "$OUT" >"$OUT/report.md"
ln -sfn "$(basename "$OUT")" "$BENCH/results/latest"
cat "$OUT/report.md"
log "done in ${WALL}s; results in $OUT (report.md)$([[ $UNDER_LOAD == 1 ]] && echo '; some points were measured while the machine was busy')"
