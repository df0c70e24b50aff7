"""Stand-in for vLLM 0.32's OpenAI API server, against the simulated GPUs of the fake nvidia-smi.

Start-up does what vLLM does before it serves, with vLLM's messages (exit 1 on a refusal):
  - CUDA_VISIBLE_DEVICES naming no GPU the host has: RuntimeError: No CUDA GPUs are available
  - bfloat16 (asked for, or --dtype auto on a bfloat16 checkpoint such as Qwen3) on a GPU below
    compute capability 8.0: ValueError: Bfloat16 is only supported on GPUs with ...
  - --max-model-len above what the model's config allows: ValueError: User-specified max_model_len ...
  - free memory at start below ceil(utilization x total): ValueError: Free memory on device ...
    (total = memory.total - memory.reserved, as torch sees it; free = memory.free less this
    process's own CUDA context, CUDA_CONTEXT_MIB, as measured on the recorded H100)
then holds ceil(utilization x total) MiB on its GPU (FAKE_GPU_STATE/gpu-proc-<pid>.json, which the
fake nvidia-smi adds to memory.used and its process list), writes what it was started with to
FAKE_GPU_STATE/launch-<port>.json, and answers GET /health (200, empty) and GET /v1/models (as
tests/fixtures/vllm-0.32-cpu/embed_models.json) until SIGTERM, which releases the memory.

Without CUDA_VISIBLE_DEVICES and with VLLM_CPU_KVCACHE_SPACE set it is a CPU server (no GPU checks).
FAKE_VLLM_LOAD_SECONDS (default 0.3) is how long "loading the model" takes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CUDA_CONTEXT_MIB = 527   # nvidia-smi free 81079 MiB vs torch free at start 80552 MiB on the recorded H100
GPU_QUERY = "index,uuid,name,compute_cap,memory.total,memory.reserved,memory.used,memory.free"
STATE = os.environ.get("FAKE_GPU_STATE", "")
_held: list[str] = []


def log(msg: str) -> None:
    print(f"(APIServer pid={os.getpid()}) INFO {time.strftime('%m-%d %H:%M:%S')} [api_server.py] {msg}", flush=True)


def refuse(kind: str, msg: str) -> None:
    print("Traceback (most recent call last):\n"
          '  File "vllm/entrypoints/openai/api_server.py", line 1, in <module>\n'
          f"{kind}: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def simulated_gpus() -> list[dict]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.splitlines():
        p = [x.strip() for x in line.split(",")]
        gpus.append({"index": int(p[0]), "uuid": p[1], "name": p[2], "compute_cap": p[3], "total": int(p[4]),
                     "reserved": int(p[5]), "used": int(p[6]), "free": int(p[7])})
    return gpus


def visible_gpus(gpus: list[dict]) -> list[dict]:
    """CUDA's reading of CUDA_VISIBLE_DEVICES: indices or UUIDs, up to the first invalid entry."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return gpus
    chosen = []
    for item in spec.split(","):
        item = item.strip()
        match = [g for g in gpus if item == str(g["index"]) or (item and g["uuid"].startswith(item))]
        if not match:
            break
        chosen.append(match[0])
    return chosen


def model_config(model: str) -> tuple[str, int | None]:
    """(checkpoint dtype, max_position_embeddings) of a local folder, or guessed from a hub id."""
    cfg_path = os.path.join(model, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), cfg.get("max_position_embeddings")
    name = model.lower()
    if "qwen3-reranker" in name:
        return "bfloat16", 40960
    if "qwen3" in name:
        return "bfloat16", 32768
    if "minilm" in name:
        return "float32", 512
    return "float32", None


def resolve_dtype(asked: str, checkpoint: str, cc: float) -> str:
    asked = {"half": "float16", "float": "float32"}.get(asked, asked)
    if asked != "auto":
        return asked
    if checkpoint == "float32":  # vLLM serves float32 checkpoints in 16 bits on a GPU
        return "bfloat16" if cc >= 8.0 else "float16"
    return checkpoint


def hold(gpu: dict, mib: int) -> None:
    if not STATE:
        return
    path = os.path.join(STATE, f"gpu-proc-{os.getpid()}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "gpu_uuid": gpu["uuid"], "used_mib": mib, "name": "python3"}, f)
    os.replace(tmp, path)
    _held.append(path)


def release(*_: object) -> None:
    for path in _held:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    args, _ = ap.parse_known_args()
    served = args.served_model_name or args.model
    signal.signal(signal.SIGTERM, release)
    signal.signal(signal.SIGINT, release)
    log(f"vLLM API server version 0.32.0 (stand-in), args: {' '.join(sys.argv[1:])}")

    checkpoint_dtype, derived_len = model_config(args.model)
    record: dict = {"argv": sys.argv[1:], "pid": os.getpid(),
                    "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
                                                           "TOKENIZERS_PARALLELISM", "PYTORCH_CUDA_ALLOC_CONF",
                                                           "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE")}}
    cpu = os.environ.get("CUDA_VISIBLE_DEVICES") is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE") is not None
    gpu = None
    if not cpu:
        visible = visible_gpus(simulated_gpus())
        if not visible:
            refuse("RuntimeError", "No CUDA GPUs are available")
        gpu = visible[0]
        cc = float(gpu["compute_cap"])
        dtype = resolve_dtype(args.dtype, checkpoint_dtype, cc)
        if dtype == "bfloat16" and cc < 8.0:
            refuse("ValueError", f"Bfloat16 is only supported on GPUs with compute capability of at least 8.0. "
                                 f"Your {gpu['name']} GPU has compute capability {gpu['compute_cap']}. You can use "
                                 "float16 instead by explicitly setting the `dtype` flag in CLI, for example: --dtype=half.")
    else:
        dtype = resolve_dtype(args.dtype, checkpoint_dtype, 8.0)
    if args.max_model_len and derived_len and args.max_model_len > derived_len \
            and os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1":
        refuse("ValueError", f"User-specified max_model_len ({args.max_model_len}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={derived_len} or model_max_length=None in "
                             "model's config.json). To allow overriding this maximum, set the env var "
                             "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with "
                             "extreme caution.")
    max_len = args.max_model_len or derived_len or 8192
    if gpu is not None:
        total = gpu["total"] - gpu["reserved"]
        free = gpu["free"] - CUDA_CONTEXT_MIB
        requested = math.ceil(total * args.gpu_memory_utilization)
        if free < requested:
            refuse("ValueError", f"Free memory on device cuda:0 ({free / 1024:.2f}/{total / 1024:.2f} GiB) on startup "
                                 f"is less than desired GPU memory utilization ({args.gpu_memory_utilization}, "
                                 f"{requested / 1024:.2f} GiB). Decrease GPU memory utilization or reduce GPU memory "
                                 "used by other processes.")
        hold(gpu, requested)
        record.update(gpu_index=gpu["index"], gpu_uuid=gpu["uuid"], memory_mib=requested)
        log(f"Using {dtype} on cuda:0 ({gpu['name']}), holding {requested} MiB "
            f"({args.gpu_memory_utilization} x {total} MiB)")
    record.update(dtype=dtype, max_model_len=max_len, served_model_name=served,
                  gpu_memory_utilization=args.gpu_memory_utilization)
    if STATE:
        with open(os.path.join(STATE, f"launch-{args.port}.json"), "w") as f:
            json.dump(record, f, indent=1)
    time.sleep(float(os.environ.get("FAKE_VLLM_LOAD_SECONDS", "0.3")))

    models = {"object": "list", "data": [{
        "id": served, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": args.model,
        "parent": None, "max_model_len": max_len,
        "permission": [{"id": "modelperm-standin", "object": "model_permission", "created": int(time.time()),
                        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                        "organization": "*", "group": None, "is_blocking": False}]}]}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                body, ctype = b"", "text/plain"
            elif self.path == "/v1/models":
                body, ctype = json.dumps(models).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    log(f"Starting vLLM API server 0 on http://{args.host}:{args.port}")
    log("Application startup complete.")
    try:
        server.serve_forever()
    finally:
        release()


if __name__ == "__main__":
    main()
