# Shared by bench/run.sh and bench/profile.sh: idempotent installs and a driver that never leaks
# processes. Source it; do not run it.

BENCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/erproxy"
LITELLM_VENV="${BENCH_LITELLM_VENV:-$BENCH_CACHE/litellm-venv}"
TOOLS_VENV="${BENCH_TOOLS_VENV:-$BENCH_CACHE/bench-tools-venv}"
# 1.107.0 was a compromised release; 1.106 is the version the targets were measured against.
LITELLM_SPEC="${BENCH_LITELLM_SPEC:-litellm[proxy]>=1.106,<1.107}"

say() { printf '[bench] %s\n' "$*"; }

install_system() {  # Debian packages: wrk, nginx, redis-server (and taskset)
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

install_project() {  # the gateway's own .venv
  if [ ! -x "$BENCH_ROOT/.venv/bin/python" ] || \
     ! "$BENCH_ROOT/.venv/bin/python" -c 'import aiohttp, uvicorn, uvloop, limits' 2>/dev/null; then
    say "creating the project venv (make setup)"
    make -C "$BENCH_ROOT" setup
  fi
}

install_litellm() {  # LiteLLM's proxy in its own venv, outside the repo
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

install_py_spy() {  # py-spy in a bench-only venv, outside the repo
  if [ ! -x "$TOOLS_VENV/bin/py-spy" ]; then
    say "installing py-spy into $TOOLS_VENV"
    mkdir -p "$(dirname "$TOOLS_VENV")"
    python3 -m venv "$TOOLS_VENV"
    "$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check py-spy
  fi
}

# run_driver SCRIPT ARGS...: runs a bench Python script on the load core and, whatever happens
# (normal end, error, Ctrl-C, SIGTERM), stops it and every process group it recorded.
run_driver() {
  # 500 client connections mean ~1,000 sockets in a proxy; raise the limit for everything started here
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  export BENCH_PGID_FILE; BENCH_PGID_FILE="$(mktemp /tmp/erproxy-bench-pgids.XXXXXX)"
  export BENCH_LITELLM_VENV="$LITELLM_VENV"
  BENCH_PY_PID=""
  trap _bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
  # The driver (and wrk) run on the load core; every server it starts pins itself to core 0.
  taskset -c "${BENCH_LOAD_CPU:-1}" "$BENCH_ROOT/.venv/bin/python" "$@" 9>&- &
  BENCH_PY_PID=$!
  wait "$BENCH_PY_PID"
}

_bench_cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "${BENCH_PY_PID:-}" ] && kill -0 "$BENCH_PY_PID" 2>/dev/null; then
    kill -TERM "$BENCH_PY_PID" 2>/dev/null || true  # it stops what it started and writes partial results
    for _ in $(seq 1 200); do kill -0 "$BENCH_PY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BENCH_PY_PID" 2>/dev/null || true
  fi
  # whatever the driver could not stop (it was killed hard): each line is a process group
  if [ -s "${BENCH_PGID_FILE:-}" ]; then
    while read -r pg; do [ -n "$pg" ] && kill -TERM -- "-$pg" 2>/dev/null || true; done < "$BENCH_PGID_FILE"
    sleep 1
    while read -r pg; do [ -n "$pg" ] && kill -KILL -- "-$pg" 2>/dev/null || true; done < "$BENCH_PGID_FILE"
  fi
  rm -f "${BENCH_PGID_FILE:-}"
  exit "$rc"
}

# The shared command line of run.sh and profile.sh:
#   bench_main SCRIPT HELP_LAST_LINE DRIVER EXTRA_INSTALLER [args...]
# --no-install skips the installs, --help prints SCRIPT's header comment and the driver's --help,
# everything else goes to the driver.
bench_main() {
  local script=$1 help_last=$2 driver=$3 extra_install=$4 install=1
  shift 4
  local args=()
  for a in "$@"; do
    case "$a" in
      --no-install) install=0 ;;
      -h|--help)
        sed -n "2,${help_last}p" "$script" | sed 's/^# \{0,1\}//'
        echo
        [ -x "$BENCH_ROOT/.venv/bin/python" ] && "$BENCH_ROOT/.venv/bin/python" "$driver" --help
        exit 0 ;;
      *) args+=("$a") ;;
    esac
  done
  if ((install)); then
    install_system
    install_project
    "$extra_install"
  fi
  # One benchmark at a time per machine: two runs pinned to the same cores measure each other.
  local lock="${BENCH_LOCK:-${TMPDIR:-/tmp}/erproxy-bench.lock}"
  exec 9>"$lock"
  if ! flock -n 9; then
    echo "[bench] another benchmark holds $lock; waiting for it to finish" >&2
    flock 9
  fi
  run_driver "$driver" ${args[@]+"${args[@]}"}
}
