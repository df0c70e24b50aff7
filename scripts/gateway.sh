#!/usr/bin/env bash
# The gateway as `make run` and `make stop` start and stop it (with PY, the venv's python, and LOG_DIR):
#   gateway.sh run    the models (unless up), the key file, the gateway (unless running), where to reach it
#   gateway.sh stop   the gateway named in LOG_DIR/gateway.pid, if that process is the gateway
# One shell, so that the gateway's settings are read as the gateway reads them (environment, variables
# given to make on its command line, then .env or ENV_FILE) and paths with spaces stay whole.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${PY:?}" "${LOG_DIR:?}"
PID_FILE="$LOG_DIR/gateway.pid"

# running_pid: the PID in PID_FILE if that process is alive and is the gateway, else nothing. A PID file
# outlives a crash or a reboot and its PID can be reused by an unrelated process: never signal that one
# (the same guard as vllm_server in scripts/common.sh, on /proc/PID/cmdline).
running_pid() {
    local pid
    pid="$(tr -dc 0-9 2>/dev/null < "$PID_FILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
        && { tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || ps -o args= -p "$pid" 2>/dev/null; } \
           | grep -q embedding_reranker_proxy && echo "$pid"
}

# drop_stale: a PID file whose process is gone or is not the gateway: say so and remove it.
drop_stale() {
    if [[ -f "$PID_FILE" ]]; then
        echo "gateway not running (stale $PID_FILE removed)"
        rm -f "$PID_FILE"
    fi
}

if [[ "${1:-}" == stop ]]; then
    if pid="$(running_pid)"; then
        kill "$pid" 2>/dev/null && echo "gateway stopped"
        rm -f "$PID_FILE"
    else
        drop_stale
    fi
    exit 0
fi
[[ "${1:-}" == run ]] || { echo "usage: gateway.sh run|stop" >&2; exit 2; }

where="$("$PY" embedding_reranker_proxy.py where)" || exit 2  # a configuration error, already printed
eval "$where"  # GATEWAY_URL, API_KEYS_FILE, GATEWAY_LOG

# the models alone: a gateway that is down (crashed, killed) must not make it start models already up
if ./check_models_status.sh --no-gateway >/dev/null 2>&1; then
    echo "models already up (./check_models_status.sh)"
else
    ./start_vllm_models.sh all || exit 1
fi
mkdir -p "$LOG_DIR"
"$PY" embedding_reranker_proxy.py keys init || exit 1

if pid="$(running_pid)"; then
    echo "gateway already running (pid $pid)"
else
    drop_stale
    setsid nohup "$PY" embedding_reranker_proxy.py >> "$LOG_DIR/gateway.out" 2>&1 < /dev/null &
    echo $! > "$PID_FILE"
    for _ in $(seq 1 60); do curl -skf "$GATEWAY_URL/health" >/dev/null && break; sleep 0.5; done
fi
if ! curl -skf "$GATEWAY_URL/health" >/dev/null; then
    echo "gateway did not become healthy at $GATEWAY_URL; see $LOG_DIR/gateway.out"
    tail -20 "$LOG_DIR/gateway.out"
    exit 1
fi

echo
echo "Gateway: $GATEWAY_URL  (logs: $GATEWAY_LOG)"
echo "Models:  $(curl -sk "$GATEWAY_URL/health" | "$PY" -c 'import json, sys; d = json.load(sys.stdin); print(", ".join(sorted({m for k in d["upstreams"].values() for r in k["replicas"] for m in r["models"]})))')"
if [[ -f "$API_KEYS_FILE.new-key" ]]; then
    echo "The first key is in $API_KEYS_FILE.new-key (no terminal to show it on): KEY=\$(cat '$API_KEYS_FILE.new-key'), save it, delete the file."
fi
echo "Try it (KEY is the key shown above on first start, or one from: $PY embedding_reranker_proxy.py keys create --name NAME):"
echo "  curl $GATEWAY_URL/v1/embeddings -H \"Authorization: Bearer \$KEY\" -H 'Content-Type: application/json' -d '{\"input\": \"hello world\"}'"
echo "  curl $GATEWAY_URL/v1/rerank -H \"Authorization: Bearer \$KEY\" -H 'Content-Type: application/json' -d '{\"query\": \"What is AI?\", \"documents\": [\"AI is artificial intelligence\", \"Bananas are yellow\"]}'"
echo "Stop everything with: make stop"
