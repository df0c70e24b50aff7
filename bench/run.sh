#!/usr/bin/env bash
# Load benchmark: the gateway against direct access, nginx and LiteLLM's proxy, on loopback.
#
#   bench/run.sh [--quick] [--duration S] [--connections 1,32,256,500] [--targets LIST]
#                [--vllm-url URL] [--no-install]        (--help lists every option)
#
# Installs what it needs (idempotently): Debian wrk, nginx, redis-server; the project's .venv
# (make setup); LiteLLM's proxy in its own venv under ~/.cache/erproxy/litellm-venv. Results go to
# bench/results/latest.{md,json} plus a timestamped copy in bench/results/runs/. Every process it
# starts is killed on exit, Ctrl-C or failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

INSTALL=1
ARGS=()
for a in "$@"; do
  case "$a" in
    --no-install) INSTALL=0 ;;
    -h|--help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      echo
      [ -x "$BENCH_ROOT/.venv/bin/python" ] && "$BENCH_ROOT/.venv/bin/python" "$BENCH_ROOT/bench/bench.py" --help
      exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done

if ((INSTALL)); then
  install_system
  install_project
  install_litellm
fi
run_driver "$BENCH_ROOT/bench/bench.py" ${ARGS[@]+"${ARGS[@]}"}
