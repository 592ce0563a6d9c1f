#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need (a Python venv with grpcio
# and grpcio-tools for the non-Rust peer, shellcheck), then runs the format check, clippy, the docs
# and every test, and checks the release tooling with the debug build (the scripts lint clean, the
# PGO training load runs, the shipping checks that need no optimized build). The optimized builds
# and the checks that need them are scripts/release.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

step() { printf '\n==> %s\n' "$*" >&2; }

step "Python venv for the grpcio peer (.venv)"
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  # Debian's python3 ships venv/ensurepip separately.
  if command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "python3 with the venv module is needed (Debian: apt-get install python3-venv)" >&2; exit 69
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
export CHATCLI_TEST_PYTHON="$PWD/.venv/bin/python"

step "shellcheck of the scripts (installs Debian's shellcheck when missing)"
if ! command -v shellcheck >/dev/null; then
  if command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
  else
    echo "shellcheck is needed (Debian: apt-get install shellcheck)" >&2; exit 69
  fi
fi
shellcheck -x scripts/*.sh bench/*.sh .ci/run

step "cargo fmt --check"
cargo fmt --all -- --check

step "no import cycle between the top-level modules of src/ (scripts/check-module-cycles.py)"
python3 scripts/check-module-cycles.py

step "one crypto backend (ring): no openssl, native-tls or aws-lc in the tree"
if cargo tree --locked -e normal,build --prefix none | grep -E '^(openssl-sys|openssl|native-tls|aws-lc-sys|aws-lc-rs) '; then
  echo "a forbidden TLS/crypto crate is in the dependency tree (see DEPENDENCIES.md)" >&2; exit 1
fi

step "cargo audit: known vulnerabilities in Cargo.lock (reviewed ignores in .cargo/audit.toml; skipped with a message when the advisory database cannot be fetched)"
scripts/audit.sh

step "cargo clippy --all-targets --locked -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo doc --no-deps --locked, warnings denied (broken or private intra-doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked

step "cargo test --locked (unit, integration, end-to-end with the real binary and the Python peer)"
cargo test --locked --all-targets
cargo test --locked --doc

step "benchmark harness smoke run: mock + chatcli, 600 calls and 6 streams, zero errors (bench/run.sh --smoke --debug)"
bench/run.sh --smoke --debug

step "the PGO training load against the debug build (scripts/build-pgo.sh --train-only; the optimized build is scripts/release.sh)"
./scripts/build-pgo.sh --train-only target/debug/chatcli --secs 1

step "shipping artifacts with the debug build: example configs, systemd units, Dockerfile lint, compose, Helm chart, flake, self-test (the offline image: scripts/release.sh)"
./scripts/check-shipping.sh --binary target/debug/chatcli config systemd dockerfile chart nix selftest

echo >&2
echo "all checks passed in $(( $(date +%s) - start ))s" >&2
