#!/usr/bin/env bash
# Stop the vLLM servers started by start_vllm_models.sh (only the ones in its PID files).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./stop_vllm_models.sh [embedding|reranker|all] [--help]

Stops the vLLM servers recorded in $LOG_DIR/embedding.pid and $LOG_DIR/reranker.pid:
SIGTERM to the server's process group (the API server and the engine processes it forked),
wait up to VLLM_STOP_TIMEOUT seconds (default 30), then SIGKILL. Removes the PID files.
Processes not started by start_vllm_models.sh are never touched.
USAGE
}

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"
parse_args "" "$@"

# group_alive PGID: any process left in the group (zombies waiting to be reaped do not count)?
group_alive() {
    [[ -n "$1" ]] && kill -0 -- "-$1" 2>/dev/null || return 1
    ps -eo pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

# signal_target SIG PID PGID: the whole group when the server leads its own group, else the PID
# and its direct children.
signal_target() {
    local sig="$1" pid="$2" pgid="$3"
    if [[ -n "$pgid" && "$pgid" == "$pid" ]]; then
        kill "-$sig" -- "-$pgid" 2>/dev/null || true
    else
        local -a kids
        mapfile -t kids < <(pgrep -P "$pid" 2>/dev/null || true)
        kill "-$sig" "$pid" "${kids[@]}" 2>/dev/null || true
    fi
}

RC=0
stop_one() {
    local m="$1" pf pid pgid
    pf="$(pid_file "$m")"
    if [[ ! -f "$pf" ]]; then
        log "$m: not running (no PID file $pf)"
        return 0
    fi
    if ! pid="$(read_pid "$m")"; then
        log "$m: removing unreadable PID file $pf"
        rm -f "$pf" "$(gpu_file "$m")"; return 0
    fi
    pgid="$(pgid_of "$pid")"
    if ! pid_alive "$pid"; then
        # The leader is gone; engine processes of its group may still linger.
        if group_alive "$pid" && vllm_group "$pid" "$pf"; then
            log "$m: PID $pid is gone but vLLM processes of its group remain; killing them"
            kill -KILL -- "-$pid" 2>/dev/null || true
        elif group_alive "$pid"; then
            warn "$m: PID $pid is gone and process group $pid now holds other programs (PID reused?); leaving them alone"
        else
            log "$m: not running (stale PID file for PID $pid removed)"
        fi
        rm -f "$pf" "$(gpu_file "$m")"; return 0
    fi
    if ! vllm_server "$pid" "$pf"; then
        warn "$m: PID $pid from $pf is not a vLLM process (PID reused?); leaving it alone and removing the PID file"
        rm -f "$pf" "$(gpu_file "$m")"; return 0
    fi
    local leader_group=""; [[ "$pgid" == "$pid" ]] && leader_group="$pid"
    log "$m: sending SIGTERM to PID $pid${leader_group:+ (process group $pgid)}"
    signal_target TERM "$pid" "$pgid"
    local waited=0
    while (( waited < VLLM_STOP_TIMEOUT * 2 )); do
        if ! pid_alive "$pid" && ! group_alive "$leader_group"; then break; fi
        sleep 0.5; waited=$(( waited + 1 ))
    done
    if pid_alive "$pid" || group_alive "$leader_group"; then
        warn "$m: still running after ${VLLM_STOP_TIMEOUT}s; sending SIGKILL"
        signal_target KILL "$pid" "$pgid"
        if [[ -n "$leader_group" ]]; then kill -KILL -- "-$leader_group" 2>/dev/null || true; fi
        sleep 1
        if pid_alive "$pid" || group_alive "$leader_group"; then
            warn "$m: PID $pid survived SIGKILL"; RC=1; return 0
        fi
        log "$m: killed (PID $pid)"
    else
        log "$m: stopped (PID $pid) after $(( (waited + 1) / 2 ))s"
    fi
    rm -f "$pf" "$(gpu_file "$m")"
}

for m in $MODELS; do stop_one "$m"; done
exit "$RC"
