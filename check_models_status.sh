#!/usr/bin/env bash
# Report whether the vLLM servers and the gateway are up.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./check_models_status.sh [--json] [embedding|reranker|all] [--no-gateway] [--help]

For each vLLM server (embedding on EMBEDDING_PORT, reranker on RERANKER_PORT): PID from
$LOG_DIR/<model>.pid and whether it is alive, whether the port listens, GET /health, the served
model id and max_model_len from /v1/models, and GPU memory when nvidia-smi exists (the GPU the
server was started on: what the server holds, and the card's used / total). Then the
gateway on PORT (default 2048): GET /health.

Exit status: 0 when everything checked is up, 1 when anything is down.
  --json        one JSON object instead of the table
  --no-gateway  skip the gateway check
USAGE
}

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"
parse_args "--json --no-gateway" "$@"
JSON="$OPT_JSON"
CHECK_GATEWAY=1; [[ "$OPT_NO_GATEWAY" == 1 ]] && CHECK_GATEWAY=0

HOST_FOR_CHECK="$(connect_host "$VLLM_HOST")"
GATEWAY_HOST="$(connect_host "${HOST:-127.0.0.1}")"
HAVE_SMI=0
command -v nvidia-smi >/dev/null 2>&1 && HAVE_SMI=1

# server_gpu_mib PID: GPU memory (MiB) held by the processes of the server's process group
# (the API server and the engine processes it forked), from nvidia-smi's compute processes.
server_gpu_mib() {
    local pgid; pgid="$(pgid_of "$1")"
    [[ -n "$pgid" ]] || return 0
    local pids; pids=" $(ps -eo pid=,pgid= 2>/dev/null | awk -v g="$pgid" '$2 == g {print $1}' | tr '\n' ' ')"
    smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null \
        | awk -F', *' -v pids="$pids" 'index(pids, " " $1 " ") && $2 ~ /^[0-9]+$/ {sum += $2; n++} END {if (n) print sum}' || true
}

# Collect facts as KEY=VALUE lines; python3 turns them into the table or JSON.
facts=""
add() { facts+="$1=$2"$'\n'; }

for m in $MODELS; do
    port="$(model_port "$m")"
    pid=""; alive=false
    if pid="$(read_pid "$m")"; then vllm_server "$pid" "$(pid_file "$m")" && alive=true; else pid=""; fi
    listening=false; port_listening "$HOST_FOR_CHECK" "$port" && listening=true
    health="$(http_status "http://$HOST_FOR_CHECK:$port/health" 3)"
    models_json=""
    [[ "$health" == 200 ]] && models_json="$(http_get "http://$HOST_FOR_CHECK:$port/v1/models" 5 | tr -d '\n')"
    gpu=""; server_mib=""
    if [[ "$HAVE_SMI" == 1 ]]; then
        # The GPU the server was started on (start_vllm_models.sh records it), else the configured one.
        idx="$(cat "$(gpu_file "$m")" 2>/dev/null || mget "$m" GPU)"
        if [[ -n "$idx" ]]; then
            rc=0; gpu="$(smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader,nounits -i "$idx" 2>/dev/null)" || rc=$?
            gpu="$(head -n1 <<<"$gpu")"
            if [[ $rc == 124 || $rc == 137 ]]; then  # hung: say so once, ask it nothing more
                HAVE_SMI=0; gpu=""; add smi.error "$(smi_hung_message)"
            fi
        fi
        if [[ -n "$gpu" && "$alive" == true ]]; then
            server_mib="$(server_gpu_mib "$pid")"
        fi
    fi
    add "$m.port" "$port"; add "$m.pid" "$pid"; add "$m.pid_alive" "$alive"
    add "$m.listening" "$listening"; add "$m.health" "$health"
    add "$m.models" "$models_json"; add "$m.gpu" "$gpu"; add "$m.server_gpu_mib" "$server_mib"
    add "$m.url" "http://$HOST_FOR_CHECK:$port"
done
if [[ "$CHECK_GATEWAY" == 1 ]]; then
    add gateway.url "http://$GATEWAY_HOST:$PORT"
    add gateway.listening "$(port_listening "$GATEWAY_HOST" "$PORT" && echo true || echo false)"
    add gateway.health "$(http_status "http://$GATEWAY_HOST:$PORT/health" 5)"
fi

FACTS="$facts" JSON="$JSON" TARGETS="$MODELS" CHECK_GATEWAY="$CHECK_GATEWAY" python3 - <<'PY'
import json, os, sys

facts = {}
for line in os.environ["FACTS"].splitlines():
    key, _, value = line.partition("=")
    facts[key] = value

report = {"models": {}, "up": True}
if facts.get("smi.error"):
    report["gpu_error"] = facts["smi.error"]
for m in os.environ["TARGETS"].split():
    def f(k):
        return facts.get(f"{m}.{k}", "")
    served, max_len = None, None
    try:
        data = json.loads(f("models"))["data"]
        served = [d["id"] for d in data]
        max_len = data[0].get("max_model_len") if data else None
    except Exception:
        pass
    gpu = None
    parts = [p.strip() for p in f("gpu").split(",")] if f("gpu") else []
    if len(parts) >= 4 and parts[-1].isdigit() and parts[-2].isdigit():
        gpu = {"index": parts[0], "name": ", ".join(parts[1:-2]), "memory_used_mib": int(parts[-2]),
               "memory_total_mib": int(parts[-1]),
               "server_memory_mib": int(f("server_gpu_mib")) if f("server_gpu_mib") else None}
    health = int(f("health") or 0)
    report["models"][m] = {
        "url": f("url"),
        "port": int(f("port")),
        "pid": int(f("pid")) if f("pid") else None,
        "pid_alive": f("pid_alive") == "true",
        "listening": f("listening") == "true",
        "health": health,
        "served_models": served,
        "max_model_len": max_len,
        "gpu": gpu,
        "up": health == 200,
    }
    report["up"] = report["up"] and health == 200
if os.environ["CHECK_GATEWAY"] == "1":
    health = int(facts.get("gateway.health") or 0)
    report["gateway"] = {
        "url": facts["gateway.url"],
        "listening": facts.get("gateway.listening") == "true",
        "health": health,
        "up": health == 200,
    }
    report["up"] = report["up"] and health == 200

if os.environ["JSON"] == "1":
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["up"] else 1)


def yn(b):
    return "yes" if b else "no"


def health_text(code):
    return "200 OK" if code == 200 else ("no answer" if code == 0 else f"HTTP {code}")


for m, r in report["models"].items():
    if r["pid"]:
        pid = f"{r['pid']} ({'alive' if r['pid_alive'] else 'dead'})"
    else:
        pid = "none (no PID file)"
    print(f"{m:<10} {'UP' if r['up'] else 'DOWN':<5} {r['url']}")
    print(f"           pid {pid}, port listening: {yn(r['listening'])}, /health: {health_text(r['health'])}")
    if r["served_models"]:
        print(f"           serves {', '.join(r['served_models'])}, max_model_len {r['max_model_len']}")
    if r["gpu"]:
        g = r["gpu"]
        mine = f"this server {g['server_memory_mib']} MiB, " if g["server_memory_mib"] is not None else ""
        print(f"           GPU {g['index']} ({g['name']}): {mine}{g['memory_used_mib']} / {g['memory_total_mib']} MiB used in all")
if "gpu_error" in report:
    print(f"GPU memory not shown: {report['gpu_error']}")
if "gateway" in report:
    g = report["gateway"]
    print(f"{'gateway':<10} {'UP' if g['up'] else 'DOWN':<5} {g['url']}")
    print(f"           port listening: {yn(g['listening'])}, /health: {health_text(g['health'])}")
print("all up" if report["up"] else "something is DOWN")
sys.exit(0 if report["up"] else 1)
PY
