#!/usr/bin/env bash
# Instructions per proxied call, counted by callgrind: the stable measure on a noisy VM, for comparing two builds of chatcli step by step. Wall-clock numbers come from
# bench/run.sh; this counts only chatcli's own user-space instructions (no kernel, no wake-ups).
#
#   bench/callgrind.sh                      the release build in target/release
#   bench/callgrind.sh --bin PATH           another build (e.g. a copy of an older release binary, or
#                                           target/pgo/chatcli from scripts/build-pgo.sh)
#   bench/callgrind.sh --secs 5             seconds of load per scenario (default 5)
#   bench/callgrind.sh --keep DIR           keep the dumps (DIR/<scenario>.cg) for callgrind_annotate;
#                                           build with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
#                                           for function and line names
#
# Scenarios (OpenAI-compatible HTTP route, wrk -t1 -c4 on core 1, chatcli under valgrind on core 0):
#   unary        non-streamed call, zero-delay mock
#   stream-1     streamed call, one delta
#   stream-64    streamed call, 64 deltas 1 ms apart (about one delta per read)
#   burst-64     streamed call, 64 deltas at once (many deltas per read)
#   grpc-unary   gRPC SendPrompt, zero-delay mock (loadgen -c4 instead of wrk)
#   grpc-stream-1  gRPC StreamPrompt, one delta (loadgen --stream -c4)
# Counters are zeroed after a 2 s warm-up; Ir per call = instructions / calls wrk completed.
# Needs valgrind and wrk (Debian packages `valgrind`, `wrk`).
# Environment: BENCH_PORT_BASE (default 18000): ports BASE+500.. are used.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release/chatcli
SECS=5
KEEP=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) BIN=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --keep) KEEP=$2; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "bench/callgrind.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

die() { printf 'bench/callgrind.sh: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
for tool in valgrind callgrind_control wrk taskset curl; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install valgrind wrk util-linux curl)"
done
[[ -x $BIN ]] || die "no chatcli binary at $BIN (cargo build --release --locked, or --bin PATH)"
MOCK=$ROOT/target/release/examples/mock_upstream
[[ -x $MOCK ]] || die "no mock at $MOCK (cargo build --release --locked --example mock_upstream)"
LOADGEN=$ROOT/target/release/examples/loadgen
[[ -x $LOADGEN ]] || die "no load client at $LOADGEN (cargo build --release --locked --example loadgen)"

BASE=${BENCH_PORT_BASE:-18000}
CC=$((BASE + 500)) M0=$((BASE + 510)) M1=$((BASE + 511)) MP=$((BASE + 512)) MB=$((BASE + 513))
ports_free BENCH_PORT_BASE $CC $((CC + 1)) $M0 $M1 $MP $MB
bench_tmp chatcli-callgrind

# The mocks: plain answers, one delta, 64 deltas 1 ms apart, 64 deltas at once.
taskset -c 1 "$MOCK" --port "$M0" >/dev/null 2>&1 & PIDS+=($!)
taskset -c 1 "$MOCK" --port "$M1" --deltas 1 >/dev/null 2>&1 & PIDS+=($!)
taskset -c 1 "$MOCK" --port "$MP" --deltas 64 --interval 1ms >/dev/null 2>&1 & PIDS+=($!)
taskset -c 1 "$MOCK" --port "$MB" --deltas 64 >/dev/null 2>&1 & PIDS+=($!)

mkdir -p "$TMP/conf"
mock_config "$CC" "$((CC + 1))" "$TMP/data" "$(printf '[log]\nlevel = "warn"')" \
    "m0:$M0" "m1:$M1" "mp:$MP" "mb:$MB" >"$TMP/conf/chatcli.toml"

body() { # MODEL STREAM
    printf '{"model":"%s","messages":[{"role":"user","content":"Say hello to the benchmark."}],"stream":%s}' "$1" "$2"
}
lua() { # FILE BODYFILE
    printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n' >"$1"
    printf 'local f = io.open("%s"); wrk.body = f:read("*a"); f:close()\n' "$2" >>"$1"
}

taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.out" \
    "$BIN" server --config "$TMP/conf/chatcli.toml" >"$TMP/chatcli.log" 2>&1 & PIDS+=($!)
VG=$!
URL=http://127.0.0.1:$CC/v1/chat/completions
wait_health "$CC" "$VG" "$TMP/chatcli.log" 30

printf '| scenario | calls | instructions per call |\n|---|---|---|\n'
# One scenario: warm up, zero the counters, load for SECS, dump; prints the table row.
measure() { # NAME, then the load command (prints wrk's report, or loadgen's JSON line)
    local name=$1
    shift
    callgrind_control -z "$VG" >/dev/null 2>&1
    local out calls
    out=$("$@")
    callgrind_control --dump="$name" "$VG" >/dev/null 2>&1
    sleep 0.5
    if [[ $out == *"requests in"* ]]; then
        calls=$(awk '/requests in/{print $1}' <<<"$out")
        local errors
        errors=$(awk '/Non-2xx|Socket errors/' <<<"$out")
        [[ -z $errors ]] || die "$name: wrk saw errors: $errors"
    else
        calls=$(python3 -c 'import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); sys.exit("errors: " + str(d["first_error"])) if d["errors"] else print(d["ok"])' <<<"$out") ||
            die "$name: loadgen saw errors"
    fi
    local dump ir
    # shellcheck disable=SC2012 # names are cg.out.<pid>: no odd characters
    dump=$(ls -t "$TMP"/cg.out.* | head -1)
    if [[ -n $KEEP ]]; then mkdir -p "$KEEP" && cp "$dump" "$KEEP/$name.cg"; fi
    ir=$(awk '/^summary:|^totals:/{v=$2} END{print v}' "$dump")
    [[ -n $ir && $calls -gt 0 ]] || die "$name: no count (dump $dump, calls $calls)"
    printf '| %s | %s | %s |\n' "$name" "$calls" "$(python3 -c "print(f'{round($ir / $calls):,}')")"
}
for s in "unary:m0:false" "stream-1:m1:true" "stream-64:mp:true" "burst-64:mb:true"; do
    IFS=: read -r name model stream <<<"$s"
    body "$model" "$stream" >"$TMP/$name.json"
    lua "$TMP/$name.lua" "$TMP/$name.json"
    check=$(curl -sf "$URL" -H 'content-type: application/json' --data-binary "@$TMP/$name.json") ||
        die "$name: the check call failed"
    [[ $check == *mock-model* ]] || die "$name: unexpected answer: ${check:0:200}"
    taskset -c 1 wrk -t1 -c4 -d2s -s "$TMP/$name.lua" "$URL" >/dev/null
    measure "$name" taskset -c 1 wrk -t1 -c4 -d"${SECS}s" -s "$TMP/$name.lua" "$URL"
done
# gRPC SendPrompt (loadgen checks every answer; all calls of the window counted, no warm-up).
SPEC="name=grpc,proto=grpc,url=http://127.0.0.1:$CC,model=m0"
taskset -c 1 "$LOADGEN" run --target "$SPEC" --concurrency 4 --duration 2 --warmup 0 >/dev/null 2>&1 ||
    die "grpc-unary: the warm-up run failed"
measure grpc-unary taskset -c 1 "$LOADGEN" run --target "$SPEC" --concurrency 4 --duration "$SECS" --warmup 0
# gRPC StreamPrompt of one delta: each call a whole stream (its first message, then the closing one).
SPEC="name=grpc,proto=grpc,url=http://127.0.0.1:$CC,model=m1"
measure grpc-stream-1 taskset -c 1 "$LOADGEN" run --stream --target "$SPEC" --concurrency 4 --duration "$SECS" --warmup 0
