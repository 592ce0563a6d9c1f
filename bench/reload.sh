#!/usr/bin/env bash
# Hot-reload numbers for BENCHMARKS.md, measured against the in-process server with an
# echo provider (no upstream latency), so what is measured is chatcli itself:
#   - time from a config file write (temp file + rename) to the new state serving, polled with
#     GetServerInfo until the new provider is listed: p50/p99 over 50 reloads;
#   - unary SendPrompt latency (p50/p99) and error count from 8 concurrent clients for 30 s in
#     steady state, during a storm of file writes (one every 100 ms), and during a storm of forced
#     reloads (`/reload` command every 100 ms).
# The numbers are printed and written to bench/results/reload.txt.
#
# Usage: bench/reload.sh            (release build)
#        PROFILE=debug bench/reload.sh
#        RELOAD_BENCH_STORM_SECS=10 bench/reload.sh   (shorter storms)
set -euo pipefail
cd "$(dirname "$0")/.."
args=(--locked --test e2e)
if [ "${PROFILE:-release}" = release ]; then
    args+=(--release)
fi
cargo test "${args[@]}" -- --ignored --exact reload::bench_reload --nocapture
echo
cat bench/results/reload.txt
