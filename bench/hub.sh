#!/usr/bin/env bash
# Conversation hub numbers: acknowledged appends per second across 100 conversations, the p99 of a
# live event reaching 1,000 subscribers of one conversation, and the server's RSS with those 1,000
# subscribers. The server (the real binary, demo config, a fresh data dir) runs pinned to one core
# (CPU 0) when `taskset` exists; the client, examples/hubbench.rs, runs on the others.
#
# Usage: bench/hub.sh                 (release build)
#        PROFILE=debug bench/hub.sh
#        bench/hub.sh --duration 5    (extra arguments go to hubbench)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
args=(--locked --bin chatcli --example hubbench)
if [ "$PROFILE" = release ]; then
    args+=(--release)
fi
cargo build "${args[@]}"
BIN=target/$PROFILE/chatcli
HB=target/$PROFILE/examples/hubbench
TMP=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$TMP"' EXIT
PIN=()
CLIENT_PIN=()
if command -v taskset >/dev/null && [ "$(nproc)" -gt 1 ]; then
    PIN=(taskset -c 0)
    CLIENT_PIN=(taskset -c 1-$(($(nproc) - 1)))
fi
CHATCLI_DATA_DIR=$TMP/data \
    CHATCLI_RATE_LIMIT_RPS=10000000 CHATCLI_RATE_LIMIT_BURST=10000000 \
    CHATCLI_LIMITS__MAX_STREAMS_PER_PRINCIPAL=0 \
    "${PIN[@]}" "$BIN" server --config config/demo.toml --port 0 --metrics-port 0 \
    2>"$TMP/server.log" &
PID=$!
for _ in $(seq 1 200); do
    ADDR=$(grep -o 'listening on [0-9.:]*' "$TMP/server.log" | head -1 | cut -d' ' -f3 || true)
    [ -n "$ADDR" ] && break
    sleep 0.1
done
if [ -z "${ADDR:-}" ]; then
    echo "the server did not start:" >&2
    cat "$TMP/server.log" >&2
    exit 1
fi
"${CLIENT_PIN[@]}" "$HB" --addr "$ADDR" --pid "$PID" "$@"
