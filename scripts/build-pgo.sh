#!/usr/bin/env bash
# Builds chatcli's release binary with profile-guided optimization (PGO): an instrumented build
# serves a training load (the OpenAI-compatible HTTP route and gRPC, whole and streamed answers,
# without authentication and with JWT + audit, against the bench mock upstream), then the release
# build is compiled with the profile it recorded. On the 2-core VM this takes about a quarter of the instructions off every proxied call
# (bench/HISTORY.md, seventh round); the binary behaves exactly as a plain `cargo build --release`.
#
#   scripts/build-pgo.sh                  writes target/pgo/chatcli
#   scripts/build-pgo.sh --out PATH       writes PATH instead
#   scripts/build-pgo.sh --secs N         seconds of load per training scenario (default 3)
#   scripts/build-pgo.sh --static         link the optimized binary statically (crt-static), as
#                                         the image and the release tarball ship it
#   scripts/build-pgo.sh --train-only BIN runs the training load against BIN (any build, e.g.
#                                         target/debug/chatcli) and builds nothing of chatcli: the
#                                         test suite's check that the training still works
#
# Needs llvm-profdata of the LLVM version rustc is built with (`rustc -vV`): rustup's llvm-tools
# component, or Debian's llvm-<major> package (installed with apt-get when missing and possible).
# Environment: PGO_PORT_BASE (default 18600): ports BASE..BASE+3 are used by the training run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/target/pgo/chatcli
SECS=3
STATIC=0
TRAIN_ONLY=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --static) STATIC=1 ;;
        --train-only) TRAIN_ONLY=$2; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "scripts/build-pgo.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
[[ $SECS =~ ^[1-9][0-9]*$ ]] || { echo "scripts/build-pgo.sh: --secs wants a whole number of seconds, got '$SECS'" >&2; exit 64; }

log() { printf '[build-pgo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'scripts/build-pgo.sh: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

for tool in curl python3; do
    command -v "$tool" >/dev/null || die "$tool is needed for the training run (Debian: apt-get install $tool)"
done

if [[ -n $TRAIN_ONLY ]]; then
    [[ -x $TRAIN_ONLY ]] || die "--train-only wants a chatcli binary, got '$TRAIN_ONLY'"
    TRAIN_ONLY=$(cd "$(dirname "$TRAIN_ONLY")" && pwd)/$(basename "$TRAIN_ONLY")
fi

# --- llvm-profdata of rustc's LLVM ------------------------------------------------------------
HOST=$(rustc -vV | sed -n 's/^host: //p')
LLVM=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ -n $HOST && -n $LLVM ]] || die "cannot read the host triple and LLVM version from 'rustc -vV'"
major_of() { "$1" --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -1; }
find_profdata() {
    local c
    for c in "$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata" \
        "$(command -v "llvm-profdata-$LLVM" || true)" "/usr/lib/llvm-$LLVM/bin/llvm-profdata" \
        "$(command -v llvm-profdata || true)"; do
        [[ -n $c && -x $c && $(major_of "$c") == "$LLVM" ]] && { echo "$c"; return 0; }
    done
    return 1
}
if [[ -n $TRAIN_ONLY ]]; then
    PROFDATA=
elif ! PROFDATA=$(find_profdata); then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        log "installing llvm-$LLVM (apt) for llvm-profdata"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "llvm-$LLVM"; } >/dev/null ||
            die "apt-get install llvm-$LLVM failed; install llvm-profdata $LLVM (rustup component add llvm-tools, or Debian's llvm-$LLVM)"
    fi
    PROFDATA=$(find_profdata) ||
        die "no llvm-profdata for LLVM $LLVM (rustc's); install it: rustup component add llvm-tools, or apt-get install llvm-$LLVM"
fi
[[ -n $PROFDATA ]] && log "llvm-profdata: $PROFDATA"

bench_tmp chatcli-pgo

# --- the instrumented build and the tools of the training run ---------------------------------
cd "$ROOT"
if [[ -n $TRAIN_ONLY ]]; then
    log "cargo build --locked --example mock_upstream --example loadgen"
    cargo build --locked --example mock_upstream --example loadgen
    GEN=$TRAIN_ONLY
    MOCK=$ROOT/target/debug/examples/mock_upstream
    LG=$ROOT/target/debug/examples/loadgen
else
    log "cargo build --release --locked --example mock_upstream --example loadgen"
    cargo build --release --locked --example mock_upstream --example loadgen
    # `--target` keeps the flags off build scripts and proc macros (they would record profiles too).
    # The profiles' directory is fixed, so the flags are too and a rebuild reuses the dependencies.
    RAW=$ROOT/target/pgo/raw
    rm -rf "$RAW"
    log "instrumented build (target/pgo/gen)"
    RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$RAW" \
        cargo build --release --locked --bin chatcli --target "$HOST" --target-dir target/pgo/gen
    GEN=$ROOT/target/pgo/gen/$HOST/release/chatcli
    MOCK=$ROOT/target/release/examples/mock_upstream
    LG=$ROOT/target/release/examples/loadgen
fi

# --- the training run -------------------------------------------------------------------------
BASE=${PGO_PORT_BASE:-18600}
CC=$BASE M0=$((BASE + 1)) MS=$((BASE + 2)) CCM=$((BASE + 3))
ports_free PGO_PORT_BASE "$CC" "$M0" "$MS" "$CCM"
"$MOCK" --port "$M0" >"$TMP/m0.log" 2>&1 & PIDS+=("$!")
"$MOCK" --port "$MS" --deltas 16 --interval 1ms >"$TMP/ms.log" 2>&1 & PIDS+=("$!")

# A config in a directory of its own (chatcli watches its config's directory for hot reload):
# default settings (info logs, metrics on), limits lifted, EXTRA added.
write_config() { # NAME EXTRA
    mkdir -p "$TMP/conf-$1" "$TMP/data-$1"
    mock_config "$CC" "$CCM" "$TMP/data-$1" "$2" "m0:$M0" "ms:$MS" >"$TMP/conf-$1/chatcli.toml"
}
JWT_SECRET=pgo-training-secret-0123456789abcdefghijklmnopqrstuvwxyz
write_config plain ""
write_config auth "$(printf '[auth.jwt]\nsecret = "%s"\n[audit]\npath = "%s/audit.jsonl"' "$JWT_SECRET" "$TMP")"

serve() { # BINARY NAME: starts it on the NAME config and waits until it answers; sets SERVED
    "$1" server --config "$TMP/conf-$2/chatcli.toml" >"$TMP/chatcli-$2.log" 2>&1 &
    SERVED=$!
    PIDS+=("$SERVED")
    wait_health "$CC" "$SERVED" "$TMP/chatcli-$2.log" 10
}
stop() { # waits for it to exit: the instrumented binary writes its profile then
    kill -TERM "$SERVED"
    wait "$SERVED" 2>/dev/null || true
}

HTTP=http://127.0.0.1:$CC/v1/chat/completions GRPC=http://127.0.0.1:$CC
train() { # NAME AUTH(loadgen target suffix) SCENARIO...
    local conf=$1 auth=$2 s name proto url model stream out
    shift 2
    serve "$GEN" "$conf"
    for s in "$@"; do
        read -r name proto url model stream <<<"$s"
        log "training ($conf config): $name, ${SECS}s"
        # shellcheck disable=SC2086 # $stream is empty or one flag
        out=$("$LG" run $stream --target "name=$name,proto=$proto,url=$url,model=$model$auth" \
            --concurrency 16 --duration "$SECS" --warmup 0 | tail -1)
        python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit("%s: %s errors, first: %s" % (sys.argv[2], d["errors"], d["first_error"]) if d["errors"] or not d["ok"] else 0)' \
            "$out" "$name" || die "the training load failed (a profile of errors would mislead the build)"
    done
    stop
}
train plain "" "http-unary http $HTTP m0" "grpc-unary grpc $GRPC m0" \
    "http-stream http $HTTP ms --stream" "grpc-stream grpc $GRPC ms --stream"
train auth ",auth=jwt:$JWT_SECRET" "http-unary http $HTTP m0" "grpc-unary grpc $GRPC m0" \
    "http-stream http $HTTP ms --stream"
if [[ -n $TRAIN_ONLY ]]; then
    log "the training load ran clean against $TRAIN_ONLY (nothing built)"
    exit 0
fi
compgen -G "$RAW/*.profraw" >/dev/null || die "the instrumented chatcli wrote no profile (see $TMP/chatcli-*.log)"
"$PROFDATA" merge -o "$TMP/chatcli.profdata" "$RAW"

# --- the optimized build ----------------------------------------------------------------------
log "release build with the profile (target/pgo/use)"
# The static link (glibc's crt-static, as the shipped image's binary) changes no Rust code, so the
# profile of the dynamic instrumented build applies to it unchanged.
LINK=
[[ $STATIC == 1 ]] && LINK="-C target-feature=+crt-static"
RUSTFLAGS="${RUSTFLAGS:-} $LINK -Cprofile-use=$TMP/chatcli.profdata" \
    cargo build --release --locked --bin chatcli --target "$HOST" --target-dir target/pgo/use
USE=$ROOT/target/pgo/use/$HOST/release/chatcli
if [[ $STATIC == 1 ]]; then
    linked=$(ldd "$USE" 2>&1 || true)
    grep -qE 'statically linked|not a dynamic executable' <<<"$linked" || die "--static: $USE is not static: $linked"
fi

# The optimized binary answers a whole and a streamed call before it is handed out.
serve "$USE" plain
for model in m0 ms; do
    stream=false
    [[ $model == ms ]] && stream=true
    answer=$(curl -sf "$HTTP" -H 'content-type: application/json' \
        --data-binary "{\"model\":\"$model\",\"stream\":$stream,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}") ||
        die "the optimized chatcli failed a call (model $model): $(tail -5 "$TMP/chatcli-plain.log")"
    [[ $answer == *mock-model* ]] || die "the optimized chatcli answered unexpectedly: ${answer:0:200}"
done
stop

mkdir -p "$(dirname "$OUT")"
cp "$USE" "$OUT"
log "wrote $OUT"
