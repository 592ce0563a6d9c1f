#!/usr/bin/env bash
# Runs the property-based fuzz suite (src/fuzz/) for a number of minutes: rounds of
# `cargo test --lib fuzz` with PROPTEST_CASES cases per property, each round with fresh random
# seeds, until the time is up or a round fails (the failing input is printed by proptest; add it
# to src/fuzz/corpus/<target>/ once fixed).
#
#   bench/fuzz.sh [MINUTES] [CASES]     defaults: 10 minutes, 2000 cases per property
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
cases=${2:-2000}
cargo test --locked --lib --no-run -q
end=$(( $(date +%s) + minutes * 60 ))
round=0
while [ "$(date +%s)" -lt "$end" ]; do
    round=$((round + 1))
    echo "fuzz round $round: PROPTEST_CASES=$cases" >&2
    PROPTEST_CASES=$cases cargo test --locked --lib -q fuzz:: -- --test-threads=2
done
echo "fuzz: $round rounds of $cases cases per property, no failure" >&2
