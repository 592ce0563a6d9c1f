#!/usr/bin/env bash
# Held streams at full size: 1,000 concurrent StreamPrompt and 1,000 concurrent streamed
# /v1/chat/completions calls against a slow fake upstream, half cancelled by their client
# mid-stream, then the in-flight gauges, open descriptors and audit records checked as the test
# command checks them at 200 (tests/e2e/held_streams.rs). Prints the descriptor and RSS figures
# (server and clients share the test process, so RSS is an upper bound of the server's).
# Usage: bench/held-streams.sh [streams per transport, default 1000]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
# Each stream holds a client, a server and an upstream socket on both ends.
ulimit -n "$(( n * 8 + 1024 ))" 2>/dev/null || true
CHATCLI_HELD_STREAMS="$n" cargo test --locked --release --test e2e \
  held_streams::held_streams_end_with_gauges_and_descriptors_back_to_their_baseline \
  -- --exact --nocapture 2>&1 | grep -E '^held-streams:|test result|panicked'
