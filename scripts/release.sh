#!/usr/bin/env bash
# The release command: builds the binary that ships once, the profile-guided, statically linked
# release build (scripts/build-pgo.sh --static, into target/pgo/chatcli), then runs on that binary
# every shipping check (scripts/check-shipping.sh --binary: config, systemd, the offline image,
# chart, nix and the self-test) and the benchmark harness's smoke run (bench/run.sh --smoke
# --chatcli), and packs the release tarball around it. The test command (scripts/test.sh) checks
# the same tooling without the optimized builds; run this before cutting a release or changing the
# build, the image or the benchmarks.
#
#   scripts/release.sh                 everything (about 20 minutes on 2 cores from a warm cache)
#   scripts/release.sh --secs N        seconds of PGO training per scenario (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
SECS=3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --secs) SECS=$2; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/release.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

step() { printf '\n==> %s\n' "$*" >&2; }
BIN=target/pgo/chatcli

step "the shipped binary: profile-guided, statically linked (scripts/build-pgo.sh --static --secs $SECS)"
./scripts/build-pgo.sh --static --secs "$SECS" --out "$BIN"

step "shipping checks on it, the offline image included (scripts/check-shipping.sh --binary $BIN)"
./scripts/check-shipping.sh --binary "$BIN"

step "benchmark harness smoke run on it (bench/run.sh --smoke --chatcli $BIN)"
bench/run.sh --smoke --chatcli "$BIN"

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
NAME=chatcli-$VERSION-$(uname -m)-linux
OUT=target/release-artifacts
step "release tarball $OUT/$NAME.tar.gz (the same binary, the example and demo configs, the systemd units, README)"
rm -rf "${OUT:?}/$NAME" && mkdir -p "$OUT/$NAME/config" "$OUT/$NAME/systemd"
install -m 0755 "$BIN" "$OUT/$NAME/chatcli"
install -m 0644 config/chatcli.example.toml config/demo.toml "$OUT/$NAME/config/"
install -m 0644 systemd/chatcli.service systemd/chatcli.socket "$OUT/$NAME/systemd/"
install -m 0644 README.md "$OUT/$NAME/"
tar -C "$OUT" --owner=0 --group=0 --sort=name -czf "$OUT/$NAME.tar.gz" "$NAME"
# What is packed is the binary that was checked, and it runs from the unpacked tree.
cmp "$BIN" "$OUT/$NAME/chatcli"
"$OUT/$NAME/chatcli" --version >/dev/null
"$OUT/$NAME/chatcli" config check --config "$OUT/$NAME/config/demo.toml"

echo >&2
echo "release checks passed in $(( $(date +%s) - start ))s; the binary: $BIN ($(du -h "$BIN" | cut -f1)), the tarball: $OUT/$NAME.tar.gz" >&2
