#!/usr/bin/env bash
# Load benchmark: the gateway against direct access, nginx and LiteLLM's proxy, on loopback.
#
#   bench/run.sh [--quick] [--duration S] [--connections 1,32,256,500] [--targets LIST]
#                [--vllm-url URL] [--no-install] [--help for all options]
#
# Installs what it needs (idempotently): Debian wrk, nginx, redis-server; the project's .venv
# (make setup); LiteLLM's proxy in its own venv under ~/.cache/erproxy/litellm-venv. Results go to
# bench/results/latest.{md,json} plus a timestamped copy in bench/results/runs/. Every process it
# starts is killed on exit, Ctrl-C or failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/erproxy"
LITELLM_VENV="${BENCH_LITELLM_VENV:-$CACHE/litellm-venv}"
# 1.107.0 was a compromised release; 1.106 is the version the targets were measured against.
LITELLM_SPEC="${BENCH_LITELLM_SPEC:-litellm[proxy]>=1.106,<1.107}"
INSTALL=1
ARGS=()
for a in "$@"; do
  case "$a" in
    --no-install) INSTALL=0 ;;
    -h|--help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      echo
      exec "${ROOT}/.venv/bin/python" "$ROOT/bench/bench.py" --help 2>/dev/null || exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done

say() { printf '[bench] %s\n' "$*"; }

install_system() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v nginx >/dev/null || missing+=(nginx)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v taskset >/dev/null || missing+=(util-linux)
  if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    local SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

install_python() {
  if [ ! -x "$ROOT/.venv/bin/python" ] || ! "$ROOT/.venv/bin/python" -c 'import aiohttp, uvicorn, uvloop, limits' 2>/dev/null; then
    say "creating the project venv (make setup)"
    make -C "$ROOT" setup
  fi
  if [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
    say "installing $LITELLM_SPEC into $LITELLM_VENV (first time only, a few minutes)"
    mkdir -p "$(dirname "$LITELLM_VENV")"
    python3 -m venv "$LITELLM_VENV"
    if ! "$LITELLM_VENV/bin/pip" install -q --disable-pip-version-check "$LITELLM_SPEC"; then
      say "LiteLLM could not be installed; its rows will record the failure"
      rm -rf "$LITELLM_VENV"
    fi
  fi
}

if ((INSTALL)); then
  install_system
  install_python
fi

# 500 client connections mean ~1,000 sockets in a proxy; raise the limit for everything started here.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export BENCH_PGID_FILE; BENCH_PGID_FILE="$(mktemp /tmp/erproxy-bench-pgids.XXXXXX)"
export BENCH_LITELLM_VENV="$LITELLM_VENV"
PY_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$PY_PID" ] && kill -0 "$PY_PID" 2>/dev/null; then
    kill -TERM "$PY_PID" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$PY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PY_PID" 2>/dev/null || true
  fi
  # whatever the Python driver could not stop (it was killed hard): each line is a process group
  if [ -s "$BENCH_PGID_FILE" ]; then
    while read -r pg; do [ -n "$pg" ] && kill -TERM -- "-$pg" 2>/dev/null || true; done < "$BENCH_PGID_FILE"
    sleep 1
    while read -r pg; do [ -n "$pg" ] && kill -KILL -- "-$pg" 2>/dev/null || true; done < "$BENCH_PGID_FILE"
  fi
  rm -f "$BENCH_PGID_FILE"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# The driver (and wrk) run on the load core; every server it starts is pinned to core 0 itself.
taskset -c "${BENCH_LOAD_CPU:-1}" "$ROOT/.venv/bin/python" "$ROOT/bench/bench.py" ${ARGS[@]+"${ARGS[@]}"} &
PY_PID=$!
wait "$PY_PID"
