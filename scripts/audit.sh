#!/usr/bin/env bash
# Checks Cargo.lock against the RustSec advisory database with cargo audit, using the reviewed
# ignore list in .cargo/audit.toml. Installs cargo-audit (pinned, from the crate registry) when it
# is missing. The advisory database is a git repository on GitHub: when it cannot be reached (an
# offline machine, or one that reaches only the crate registry), the check is skipped with a
# message saying so and the script exits 0; set CHATCLI_AUDIT_REQUIRED=1 to fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

AUDIT_VERSION=0.22.2
DB_URL=https://github.com/rustsec/advisory-db.git

skip() {
  echo "cargo audit SKIPPED: $*" >&2
  echo "  (run scripts/audit.sh where $DB_URL can be reached; see SECURITY.md)" >&2
  if [ "${CHATCLI_AUDIT_REQUIRED:-0}" = 1 ]; then exit 1; fi
  exit 0
}

# Checked before installing anything: without the database there is nothing to check against.
if ! timeout 20 git ls-remote --heads "$DB_URL" >/dev/null 2>&1; then
  skip "the RustSec advisory database ($DB_URL) cannot be fetched from this machine"
fi

if ! cargo audit --version 2>/dev/null | grep -q "$AUDIT_VERSION"; then
  echo "installing cargo-audit $AUDIT_VERSION" >&2
  cargo install --locked --quiet cargo-audit --version "$AUDIT_VERSION"
fi

cargo audit
