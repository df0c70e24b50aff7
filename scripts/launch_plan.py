#!/usr/bin/env python3
"""Launch plan for start_vllm_models.sh: which GPU, dtype and memory share each vLLM server gets.

Stdlib only (runs under the system python3). It reads the GPUs from

    nvidia-smi --query-gpu=index,name,compute_cap,memory.total,memory.used,memory.free \
               --format=csv,noheader,nounits

and the scripts' settings from the environment, and either prints the plan as shell assignments
for start_vllm_models.sh to `eval` (exit 0), or a refusal that names the setting to change and the
numbers that do not fit (PLAN_REFUSED=..., exit 3), before anything is launched.

Placement
  2+ GPUs  embedding on EMBEDDING_GPU (default 1), reranker on RERANKER_GPU (default 0);
  1 GPU    both on GPU 0 (unless EMBEDDING_GPU / RERANKER_GPU say otherwise).
  A configured index the host does not have is refused.
Memory (--gpu-memory-utilization, a fraction of the whole card as vLLM means it)
  EMBEDDING_GPU_MEMORY / RERANKER_GPU_MEMORY when set. Otherwise:
  - a model alone on its GPU of a multi-GPU host, MAX_MEMORY_PERCENTAGE unset: the seed defaults
    0.90 (embedding) / 0.97 (reranker);
  - else (one GPU, a shared GPU, or MAX_MEMORY_PERCENTAGE set): the budget is
    MAX_MEMORY_PERCENTAGE (default 90) % of the card less what other processes already use (and
    less the explicit fractions placed there), capped at what vLLM's start-up check allows, split
    in equal parts between the models planned there that are not running yet. A model already
    running is one of the "other processes" (its memory is in memory.used).
  Every fraction is then checked as vLLM checks it at start-up: the servers sharing a GPU start one
  after another, and the k-th needs  free - (what the ones before it took) - CUDA context  to be at
  least  ceil(fraction x total).
Precision
  MODEL_PRECISION=auto: bfloat16 on compute capability 8.0 and above, float16 below. Explicit values
  are passed as they are; bfloat16 below 8.0 is refused (vLLM refuses it).

    python3 scripts/launch_plan.py --models "embedding reranker" [--start M...] [--running M...]
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Mapping

MODELS = ("embedding", "reranker")
PREFIX = {"embedding": "EMBEDDING", "reranker": "RERANKER"}
SEED_GPU = {"embedding": 1, "reranker": 0}            # the seed layout on 2+ GPUs
SEED_MEMORY = {"embedding": 0.90, "reranker": 0.97}   # its --gpu-memory-utilization defaults
DEFAULT_MAX_MEMORY_PERCENTAGE = 90.0
# Memory a starting vLLM process needs outside its share before vLLM's check runs: its CUDA context
# (527 MiB measured on the H100: nvidia-smi free 81079 MiB, torch free at start 80552 MiB) plus headroom.
CUDA_CONTEXT_MIB = 1024
MIN_SHARE_MIB = 2048      # less than this cannot hold a model and a KV cache
QUERY = "index,name,compute_cap,memory.total,memory.used,memory.free"
PRECISIONS = ("auto", "bfloat16", "float16", "float32", "half", "float")


class Refusal(Exception):
    """The plan cannot work; the message says which setting to change and why."""


@dataclass
class Gpu:
    index: int
    name: str
    compute_cap: float | None
    total: int      # MiB, nvidia-smi memory.total
    used: int       # MiB used by processes
    free: int       # MiB

    @property
    def reserved(self) -> int:
        return max(self.total - self.used - self.free, 0)

    @property
    def vllm_total(self) -> int:
        """What vLLM (torch) calls the total: memory.total less what the driver reserves."""
        return self.total - self.reserved

    def label(self) -> str:
        return f"GPU {self.index} ({self.name})"


@dataclass
class ModelPlan:
    model: str
    path: str
    served_name: str
    port: str
    dtype: str
    max_len: str = ""
    gpu: Gpu | None = None
    fraction: float | None = None
    memory_source: str = ""     # the setting the fraction came from (for messages)
    memory_setting: str = ""    # how messages show it: "RERANKER_GPU_MEMORY=0.97 (its default)"
    stage: int = 1
    start: bool = True
    running: bool = False

    @property
    def mib(self) -> int:
        assert self.gpu is not None and self.fraction is not None
        return math.ceil(self.fraction * self.gpu.vllm_total)


@dataclass
class Plan:
    device: str
    models: list[ModelPlan]
    gpus: list[Gpu] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kv_cache_gib: str = ""

    def get(self, model: str) -> ModelPlan:
        return next(p for p in self.models if p.model == model)


# ---- nvidia-smi --------------------------------------------------------------------------------

def parse_gpus(text: str) -> list[Gpu]:
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            raise Refusal(f"cannot read this nvidia-smi answer: {line!r}")
        index, cap, total, used, free = parts[0], parts[-4], parts[-3], parts[-2], parts[-1]
        name = ", ".join(parts[1:-4])
        try:
            gpus.append(Gpu(int(index), name, float(cap) if re.fullmatch(r"\d+(\.\d+)?", cap) else None,
                            int(total), int(used), int(free)))
        except ValueError:
            raise Refusal(f"nvidia-smi reports no usable memory figures for GPU {index} ({name}): {line!r} "
                          "(MIG instances and vGPUs are not planned here; set VLLM_DEVICE=cpu or run vLLM by hand)") from None
    return gpus


def query_gpus(nvidia_smi: str = "nvidia-smi") -> list[Gpu]:
    raw = os.environ.get("NVIDIA_SMI_TIMEOUT") or "20"  # as scripts/common.sh's smi (which checked it)
    try:
        limit = float(raw)
    except ValueError:
        raise Refusal(f"NVIDIA_SMI_TIMEOUT must be a number of seconds such as 20, got {raw!r}") from None
    try:
        out = subprocess.run([nvidia_smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=limit)
    except FileNotFoundError:
        return []
    except subprocess.TimeoutExpired:
        raise Refusal(f"nvidia-smi did not answer within {limit:g} s (NVIDIA_SMI_TIMEOUT): the NVIDIA driver "
                      "may be wedged; see dmesg for Xid errors") from None
    if out.returncode != 0:
        if "No devices were found" in out.stdout + out.stderr:
            return []
        raise Refusal(f"nvidia-smi failed (exit {out.returncode}): {(out.stdout + out.stderr).strip()[:300]}")
    return parse_gpus(out.stdout)


# ---- settings ----------------------------------------------------------------------------------

def _fraction(env: Mapping[str, str], var: str) -> float | None:
    raw = env.get(var, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise Refusal(f"{var} must be a fraction of the GPU's memory such as 0.45 (got '{raw}')") from None
    if not 0 < value <= 1:
        raise Refusal(f"{var} must be greater than 0 and at most 1 (a fraction of the whole GPU), got {raw}")
    return value


def _percentage(env: Mapping[str, str]) -> tuple[float, bool]:
    raw = env.get("MAX_MEMORY_PERCENTAGE", "").strip().rstrip("%").strip()
    if not raw:
        return DEFAULT_MAX_MEMORY_PERCENTAGE, False
    try:
        value = float(raw)
    except ValueError:
        raise Refusal(f"MAX_MEMORY_PERCENTAGE must be a percentage such as 90 (got '{raw}')") from None
    if not 0 < value <= 100:
        raise Refusal(f"MAX_MEMORY_PERCENTAGE must be greater than 0 and at most 100, got {raw}")
    return value, True


def _gpu_index(env: Mapping[str, str], model: str, gpus: list[Gpu]) -> int:
    var = f"{PREFIX[model]}_GPU"
    raw = env.get(var, "").strip()
    if not raw:
        return SEED_GPU[model] if len(gpus) >= 2 else 0
    if not raw.isdigit():
        raise Refusal(f"{var} must be a GPU index as nvidia-smi numbers them (0 to {len(gpus) - 1}), got '{raw}'")
    index = int(raw)
    if index >= len(gpus):
        have = "; ".join(f"{g.index}: {g.name}" for g in gpus)
        plural = "GPU" if len(gpus) == 1 else "GPUs"
        raise Refusal(f"{var}={index}, but this host has {len(gpus)} {plural} ({have}); vLLM would stop with "
                      f"'RuntimeError: No CUDA GPUs are available'. Set {var} to "
                      f"{'0' if len(gpus) == 1 else f'0 to {len(gpus) - 1}'} (or leave it unset to let the plan place it).")
    return index


def _dtype(precision: str, gpu: Gpu) -> str:
    if precision == "auto":
        if gpu.compute_cap is None:
            raise Refusal(f"nvidia-smi does not report the compute capability of {gpu.label()}; set MODEL_PRECISION "
                          "to bfloat16 (compute capability 8.0 or newer) or float16")
        return "bfloat16" if gpu.compute_cap >= 8.0 else "float16"
    if precision == "bfloat16" and gpu.compute_cap is not None and gpu.compute_cap < 8.0:
        raise Refusal(f"MODEL_PRECISION=bfloat16, but {gpu.label()} has compute capability {gpu.compute_cap:.1f}; "
                      "bfloat16 needs 8.0 or newer and vLLM refuses it there. Set MODEL_PRECISION=float16 "
                      "(or auto, which picks float16 on this GPU).")
    return precision


def _max_len(env: Mapping[str, str], model: str) -> str:
    for var in (f"{PREFIX[model]}_MAX_SEQ_LENGTH", "MAX_SEQ_LENGTH"):
        raw = env.get(var, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise Refusal(f"{var} must be a positive number of tokens, got '{raw}'")
            return raw
    return ""


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB"


# ---- planning ----------------------------------------------------------------------------------

def make_plan(env: Mapping[str, str], gpus: list[Gpu], models: list[str], start: list[str] | None = None,
              running: list[str] | None = None) -> Plan:
    """The plan for `models` (those the layout holds), starting `start` now; `running` are up already."""
    start = list(models if start is None else start)
    running = list(running or [])
    device = env.get("VLLM_RESOLVED_DEVICE", "cuda") or "cuda"
    precision = (env.get("MODEL_PRECISION", "") or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise Refusal(f"MODEL_PRECISION must be auto, bfloat16, float16 or float32 (got '{precision}')")
    plans = []
    for m in models:
        p = PREFIX[m]
        plans.append(ModelPlan(model=m, path=env.get(f"{p}_MODEL_PATH", ""), served_name=env.get(f"{p}_MODEL_NAME", ""),
                               port=env.get(f"{p}_PORT", ""), dtype=precision, max_len=_max_len(env, m),
                               start=m in start, running=m in running))
    plan = Plan(device=device, models=plans)
    if device != "cuda":
        plan.kv_cache_gib = env.get("VLLM_CPU_KVCACHE_SPACE", "") or "1"
        return plan
    if not gpus:
        raise Refusal("VLLM_DEVICE=cuda (MODEL_DEVICE=cuda in a single-service .env), but nvidia-smi lists no GPU. "
                      "Check the NVIDIA driver (nvidia-smi), or set VLLM_DEVICE=cpu / MODEL_DEVICE=cpu.")
    plan.gpus = gpus
    by_index = {g.index: g for g in gpus}
    for mp in plans:
        mp.gpu = by_index[_gpu_index(env, mp.model, gpus)]
        mp.dtype = _dtype(precision, mp.gpu)
    percent, percent_set = _percentage(env)
    for gpu in gpus:
        _plan_memory(env, plan, gpu, [mp for mp in plans if mp.gpu is gpu], percent, percent_set)
    return plan


def _plan_memory(env: Mapping[str, str], plan: Plan, gpu: Gpu, here: list[ModelPlan], percent: float,
                 percent_set: bool) -> None:
    if not here:
        return
    pending = [mp for mp in here if not mp.running]
    explicit = []
    for mp in here:
        var = f"{PREFIX[mp.model]}_GPU_MEMORY"
        value = _fraction(env, var)
        if value is not None:
            mp.fraction, mp.memory_source, mp.memory_setting = value, var, f"{var}={value:g}"
            explicit.append(mp)
    auto = [mp for mp in pending if mp.fraction is None]
    total = gpu.vllm_total
    if auto and len(plan.gpus) >= 2 and len(here) == 1 and not percent_set:
        mp = auto[0]
        mp.fraction, mp.memory_source = SEED_MEMORY[mp.model], f"{PREFIX[mp.model]}_GPU_MEMORY"
        mp.memory_setting = f"{mp.memory_source}={mp.fraction:g} (its default)"
        plan.notes.append(f"{gpu.label()}: {mp.model} alone, --gpu-memory-utilization {mp.fraction:.2f} "
                          f"(the default of {mp.memory_source}; MAX_MEMORY_PERCENTAGE sets a budget instead)")
    elif auto:
        taken = sum(math.ceil(mp.fraction * total) for mp in explicit if not mp.running)
        budget = percent / 100 * total - gpu.used - taken
        cap = gpu.free - CUDA_CONTEXT_MIB - taken
        share = min(budget, cap) / len(auto)
        names = " and ".join(mp.model for mp in auto)
        what = (f"MAX_MEMORY_PERCENTAGE={percent:g} allows {_gib(percent / 100 * total)} of GPU {gpu.index} "
                f"({gpu.name}, {total} MiB usable); other processes already use {gpu.used} MiB")
        if taken:
            what += " and " + ", ".join(f"{mp.memory_source}={mp.fraction:g} takes {math.ceil(mp.fraction * total)} MiB"
                                        for mp in explicit if not mp.running)
        if share < MIN_SHARE_MIB and taken and cap < MIN_SHARE_MIB * len(auto):
            given = ", ".join(f"{mp.memory_source}={mp.fraction:g} ({math.ceil(mp.fraction * total)} MiB)"
                              for mp in explicit if not mp.running)
            raise Refusal(f"{given} leave{'s' if len(explicit) == 1 else ''} {max(cap, 0)} MiB of the {gpu.free} MiB free "
                          f"on {gpu.label()} for the {names} server (after {CUDA_CONTEXT_MIB} MiB for a CUDA context; "
                          f"each needs at least {MIN_SHARE_MIB} MiB). Lower "
                          f"{' / '.join(mp.memory_source for mp in explicit if not mp.running)}, or set "
                          f"{' / '.join(PREFIX[mp.model] + '_GPU_MEMORY' for mp in auto)} too.")
        if share < MIN_SHARE_MIB:
            explicit_vars = " / ".join(f"{PREFIX[mp.model]}_GPU_MEMORY" for mp in auto)
            raise Refusal(f"{what}: {max(share, 0):.0f} MiB left for the {names} server"
                          f"{'s' if len(auto) > 1 else ''} (each needs at least {MIN_SHARE_MIB} MiB). Raise "
                          f"MAX_MEMORY_PERCENTAGE, free memory on GPU {gpu.index}, place a model on another GPU, "
                          f"or set {explicit_vars}.")
        fraction = math.floor(share / total * 100) / 100
        for mp in auto:
            mp.fraction, mp.memory_source = fraction, "MAX_MEMORY_PERCENTAGE"
            mp.memory_setting = f"its share of MAX_MEMORY_PERCENTAGE={percent:g} ({fraction:.2f})"
        capped = " (capped at what vLLM's start-up check allows)" if cap < budget else ""
        plan.notes.append(f"{what}; {names} get{'s' if len(auto) == 1 else ''} {fraction:.2f} of the card "
                          f"({_gib(fraction * total)}) each{capped}")
    # vLLM's start-up check, for the servers started now on this GPU, one after another.
    before = 0
    stage = 0
    for mp in here:
        if not mp.start:
            continue
        stage += 1
        mp.stage = stage
        requested = mp.mib
        available = gpu.free - before - CUDA_CONTEXT_MIB
        if requested > available:
            fits = math.floor(max(available, 0) / total * 100) / 100
            earlier = f" - {before} MiB for the server started before it" if before else ""
            if mp.memory_source == "MAX_MEMORY_PERCENTAGE":
                change = f"Lower MAX_MEMORY_PERCENTAGE or set {PREFIX[mp.model]}_GPU_MEMORY to at most {fits:.2f}"
            else:
                change = f"Set {mp.memory_source} to at most {fits:.2f}"
            raise Refusal(f"{mp.model} on {gpu.label()}: {mp.memory_setting} asks vLLM for {mp.fraction:.2f} x {total} MiB = {requested} MiB, but only {max(available, 0)} MiB "
                          f"will be free when it starts ({gpu.free} MiB free now{earlier} - {CUDA_CONTEXT_MIB} MiB for "
                          f"its CUDA context). {change}, or free memory on GPU {gpu.index}.")
        before += requested


# ---- output ------------------------------------------------------------------------------------

def render_table(plan: Plan, only: list[str] | None = None) -> str:
    rows = [("model", "GPU", "compute cap", "dtype", "memory", "port", "served name")]
    for mp in plan.models:
        if only is not None and mp.model not in only:
            continue
        if plan.device == "cuda":
            assert mp.gpu is not None and mp.fraction is not None
            cap = f"{mp.gpu.compute_cap:.1f}" if mp.gpu.compute_cap is not None else "?"
            rows.append((mp.model, f"{mp.gpu.index} {mp.gpu.name}", cap, mp.dtype,
                         f"{mp.fraction:.2f} = {mp.mib / 1024:.1f} GiB", mp.port, mp.served_name))
        else:
            rows.append((mp.model, "cpu", "-", mp.dtype, f"{plan.kv_cache_gib} GiB KV cache", mp.port, mp.served_name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def shell_assignments(plan: Plan) -> str:
    q = shlex.quote
    out = [f"PLAN_DEVICE={q(plan.device)}"]
    for mp in plan.models:
        m = mp.model
        out.append(f"PLAN_DTYPE[{m}]={q(mp.dtype)}")
        out.append(f"PLAN_MAX_LEN[{m}]={q(mp.max_len)}")
        out.append(f"PLAN_STAGE[{m}]={mp.stage}")
        if mp.gpu is not None:
            out.append(f"PLAN_GPU[{m}]={mp.gpu.index}")
            out.append(f"PLAN_GPU_NAME[{m}]={q(mp.gpu.name)}")
        if mp.gpu is not None and mp.fraction is not None:   # none for a model running already
            out.append(f"PLAN_MEMORY[{m}]={mp.fraction:.2f}")
            out.append(f"PLAN_MEMORY_MIB[{m}]={mp.mib}")
    shown = [mp.model for mp in plan.models if mp.start]
    out.append(f"PLAN_TABLE={q(render_table(plan, shown))}")
    out.append(f"PLAN_NOTES={q(chr(10).join(plan.notes))}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="embedding reranker", help="models the layout holds")
    ap.add_argument("--start", default=None, help="models started now (default: --models)")
    ap.add_argument("--running", default="", help="models already running")
    ap.add_argument("--table", action="store_true", help="print the table instead of shell assignments")
    args = ap.parse_args(argv)
    models = [m for m in MODELS if m in args.models.split()]
    start = None if args.start is None else args.start.split()
    env = os.environ
    try:
        gpus = query_gpus() if env.get("VLLM_RESOLVED_DEVICE", "cuda") == "cuda" else []
        plan = make_plan(env, gpus, models, start, args.running.split())
    except Refusal as e:
        if args.table:
            print(f"refused: {e}", file=sys.stderr)
        else:
            print(f"PLAN_REFUSED={shlex.quote(str(e))}")
        return 3
    sys.stdout.write(render_table(plan) if args.table else shell_assignments(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
