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

bench_main "$0" 10 "$BENCH_ROOT/bench/bench.py" install_litellm "$@"
