#!/usr/bin/env bash
# The server under the gateway, A/B: uvicorn against Granian, on the bare floor and the gateway
# (medians of shuffled rounds, so a busy shared machine loads every target alike).
#
#   bench/server_ab.sh [--rounds 5] [--duration 3] [--connections 1,32,256] [--targets LIST] [--no-install]
#
# Results: bench/results/runs/server-ab-STAMP.{md,json}.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

bench_main "$0" 7 "$BENCH_ROOT/bench/server_ab.py" : "$@"
