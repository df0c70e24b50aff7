#!/usr/bin/env bash
# Profile the gateway with py-spy under wrk load (32 connections), pinned like bench/run.sh.
#
#   bench/profile.sh [--seconds N] [--connections C] [--workers 1|2] [--rate HZ] [--no-install]
#
# Writes bench/results/profile-<stamp>.svg (flame graph), .collapsed (raw stacks) and .txt (a
# `py-spy top`-like summary: own and total share of samples per function), and profile-latest.*.
# py-spy is installed into its own venv under ~/.cache/erproxy/bench-tools-venv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

INSTALL=1
ARGS=()
for a in "$@"; do
  case "$a" in
    --no-install) INSTALL=0 ;;
    -h|--help)
      sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
      echo
      [ -x "$BENCH_ROOT/.venv/bin/python" ] && "$BENCH_ROOT/.venv/bin/python" "$BENCH_ROOT/bench/profile_gateway.py" --help
      exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done

if ((INSTALL)); then
  install_system
  install_project
  install_py_spy
fi
export BENCH_PY_SPY="${BENCH_PY_SPY:-$TOOLS_VENV/bin/py-spy}"
run_driver "$BENCH_ROOT/bench/profile_gateway.py" ${ARGS[@]+"${ARGS[@]}"}
