#!/usr/bin/env bash
# Profile the gateway with py-spy under wrk load (32 connections), pinned like bench/run.sh.
#
#   bench/profile.sh [--seconds N] [--connections C] [--workers 1|2] [--rate HZ] [--no-install]
#
# Writes bench/results/profiles/profile-<stamp>.svg (flame graph), .collapsed (raw stacks) and .txt
# (a `py-spy top`-like summary: own and total share of samples per function), and profile-latest.*.
# That folder is git-ignored: py-spy's stacks carry the machine's absolute paths.
# py-spy is installed into its own venv under ~/.cache/erproxy/bench-tools-venv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export BENCH_PY_SPY="${BENCH_PY_SPY:-$TOOLS_VENV/bin/py-spy}"
bench_main "$0" 8 "$BENCH_ROOT/bench/profile_gateway.py" install_py_spy "$@"
