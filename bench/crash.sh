#!/usr/bin/env bash
# kill -9 during session saves, 1,000 times (the test command runs 12): each round starts the
# binary on the same data dir, saves sessions from three clients in a loop, kills the process at
# a random moment, and checks that every session file is whole (an old or a new version) and that
# the audit log has no torn line but possibly its last (tests/e2e/crash.rs).
# Usage: bench/crash.sh [rounds, default 1000]
set -euo pipefail
cd "$(dirname "$0")/.."
CHATCLI_CRASH_ROUNDS="${1:-1000}" cargo test --locked --test e2e \
  crash::kill_9_during_session_saves_leaves_old_or_new_versions_and_no_torn_audit_line \
  -- --exact --nocapture
