# shellcheck shell=bash
# Shell helpers shared by bench/run.sh, bench/callgrind.sh and scripts/build-pgo.sh (sourced, not
# run): they start the bench's mock upstreams and a chatcli on ports of their own, load them, and
# must leave nothing running behind them. The sourcing script defines `die MESSAGE` first.

# A temporary directory in $TMP and the background processes in PIDS, both cleaned up on exit.
bench_tmp() { # PREFIX
    TMP=$(mktemp -d "/tmp/$1.XXXXXX")
    PIDS=()
    trap bench_cleanup EXIT
}
bench_cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}

# Stops with a clear message when one of the ports already answers (another run, another server).
ports_free() { # ENV_VAR_THAT_MOVES_THEM PORT...
    local var=$1 p
    shift
    for p in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            die "port $p is in use (another run?); stop it or set $var"
        fi
    done
}

# A chatcli config for the mocks on stdout: rate limits lifted, EXTRA (TOML) added, one
# OpenAI-compatible provider per NAME:PORT (the first is the default).
mock_config() { # PORT METRICS_PORT DATA_DIR EXTRA NAME:PORT...
    local port=$1 metrics=$2 data=$3 extra=$4 pair
    shift 4
    printf '[server]\nbind_address = "127.0.0.1"\nport = %s\n' "$port"
    printf '[metrics]\nbind_address = "127.0.0.1"\nport = %s\n' "$metrics"
    printf '[state]\ndata_dir = "%s"\n' "$data"
    printf '[limits]\nrate_limit_rps = 1000000.0\nrate_limit_burst = 1000000\nmax_streams_per_principal = 0\n'
    if [[ -n $extra ]]; then printf '%s\n' "$extra"; fi
    printf '[llm]\ndefault = "%s"\n' "${1%%:*}"
    for pair in "$@"; do
        printf '[[llm.providers]]\nname = "%s"\nkind = "openai-compatible"\nbase_url = "http://127.0.0.1:%s/v1"\nmodel = "mock-model"\n' \
            "${pair%%:*}" "${pair##*:}"
    done
}

# Waits until chatcli answers /health on PORT; stops with the end of LOG if PID exits first or
# TIMEOUT_S pass.
wait_health() { # PORT PID LOG TIMEOUT_S
    local i
    for ((i = 0; i < $4 * 10; i++)); do
        curl -sf -o /dev/null "http://127.0.0.1:$1/health" && return 0
        kill -0 "$2" 2>/dev/null || die "chatcli exited: $(tail -5 "$3")"
        sleep 0.1
    done
    die "chatcli did not answer /health within $4 s (log: $(tail -3 "$3"))"
}
