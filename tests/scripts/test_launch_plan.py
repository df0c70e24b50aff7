"""The launch planner on the recorded and derived GPU layouts (scripts/launch_plan.py, no processes)."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from tests.scripts.conftest import ROOT, fake_smi

_spec = importlib.util.spec_from_file_location("launch_plan", ROOT / "scripts/launch_plan.py")
lp = importlib.util.module_from_spec(_spec)
sys.modules["launch_plan"] = lp
_spec.loader.exec_module(lp)

BOTH = ["embedding", "reranker"]
NAMES = {"EMBEDDING_MODEL_NAME": "Qwen3-Embedding-0.6B", "RERANKER_MODEL_NAME": "Qwen3-Reranker-0.6B",
         "EMBEDDING_PORT": "8000", "RERANKER_PORT": "8001"}


def gpus(layout: str) -> list:
    out = fake_smi(layout, f"--query-gpu={lp.QUERY}", "--format=csv,noheader,nounits")
    assert out.returncode == 0
    return lp.parse_gpus(out.stdout)


def plan(layout: str, start=None, running=None, **env: str):
    return lp.make_plan({**NAMES, **env}, gpus(layout), BOTH, start, running)


def refusal(layout: str, **env: str) -> str:
    with pytest.raises(lp.Refusal) as e:
        plan(layout, **env)
    return str(e.value)


def fits_vllm_check(p) -> None:
    """Each server started on a GPU, one after another, passes vLLM's free-memory check."""
    for g in p.gpus:
        free = g.free
        for mp in (m for m in p.models if m.gpu is g):
            assert free - lp.CUDA_CONTEXT_MIB >= math.ceil(mp.fraction * g.vllm_total)
            free -= math.ceil(mp.fraction * g.vllm_total)


def test_one_h100_puts_both_models_on_gpu_0_with_shares_that_fit_together() -> None:
    p = plan("h100x1")
    emb, rer = p.get("embedding"), p.get("reranker")
    assert emb.gpu.index == rer.gpu.index == 0
    assert emb.fraction == rer.fraction == 0.45          # 90 % of the card, split in two
    assert (emb.stage, rer.stage) == (1, 2)              # the second starts after the first is up
    assert emb.dtype == rer.dtype == "bfloat16"          # compute capability 9.0
    fits_vllm_check(p)


@pytest.mark.parametrize("layout", ["h100x2", "h100x4"])
def test_two_or_more_gpus_keep_the_seed_layout(layout) -> None:
    p = plan(layout)
    emb, rer = p.get("embedding"), p.get("reranker")
    assert (emb.gpu.index, emb.fraction) == (1, 0.90)
    assert (rer.gpu.index, rer.fraction) == (0, 0.97)
    assert emb.stage == rer.stage == 1                   # different GPUs: started together
    fits_vllm_check(p)


def test_four_gpus_take_any_configured_index() -> None:
    p = plan("h100x4", EMBEDDING_GPU="3", RERANKER_GPU="2")
    assert (p.get("embedding").gpu.index, p.get("reranker").gpu.index) == (3, 2)


def test_two_models_placed_on_one_gpu_of_a_multi_gpu_host_share_it() -> None:
    p = plan("h100x2", EMBEDDING_GPU="0")
    assert [(m.gpu.index, m.fraction, m.stage) for m in p.models] == [(0, 0.45, 1), (0, 0.45, 2)]
    fits_vllm_check(p)


def test_t4_gets_float16_for_auto_precision_and_fits_both_models() -> None:
    p = plan("t4")
    assert [m.dtype for m in p.models] == ["float16", "float16"]
    assert [m.fraction for m in p.models] == [0.45, 0.45]
    fits_vllm_check(p)


def test_memory_used_by_other_processes_shrinks_the_shares() -> None:
    p = plan("h100-busy")
    # (90 % of 81080 MiB - 31771 MiB used) / 2 = 20600 MiB each -> 0.25 of the card
    assert [m.fraction for m in p.models] == [0.25, 0.25]
    fits_vllm_check(p)


def test_max_memory_percentage_sets_the_budget() -> None:
    assert [m.fraction for m in plan("h100x1", MAX_MEMORY_PERCENTAGE="50").models] == [0.25, 0.25]
    # set on a multi-GPU host, it replaces the seed defaults
    assert [m.fraction for m in plan("h100x2", MAX_MEMORY_PERCENTAGE="50").models] == [0.5, 0.5]


def test_explicit_fractions_win_and_the_other_model_gets_the_rest_of_the_budget() -> None:
    p = plan("h100x1", EMBEDDING_GPU_MEMORY="0.3")
    assert p.get("embedding").fraction == 0.3
    assert p.get("reranker").fraction == 0.59             # 90 % - 30 %, rounded down
    p = plan("h100x1", EMBEDDING_GPU_MEMORY="0.2", RERANKER_GPU_MEMORY="0.7")
    assert [m.fraction for m in p.models] == [0.2, 0.7]
    fits_vllm_check(p)


def test_starting_one_model_keeps_room_for_the_other_and_a_running_one_is_counted_as_used() -> None:
    first = plan("h100x1", start=["embedding"])
    assert first.get("embedding").fraction == 0.45
    assert not first.get("reranker").start
    # the embedding server now holds its share: the reranker gets what is left of the budget
    g = gpus("h100x1")[0]
    held = math.ceil(0.45 * g.vllm_total) + 15
    busy = lp.Gpu(0, g.name, g.compute_cap, g.total, held, g.total - held - g.reserved)
    later = lp.make_plan(NAMES, [busy], BOTH, ["reranker"], ["embedding"])
    assert later.get("reranker").fraction == 0.44
    assert later.get("reranker").stage == 1


def test_explicit_precision_is_passed_as_given() -> None:
    assert [m.dtype for m in plan("t4", MODEL_PRECISION="float32").models] == ["float32", "float32"]
    assert [m.dtype for m in plan("h100x1", MODEL_PRECISION="half").models] == ["half", "half"]


def test_per_model_max_seq_length_overrides_the_shared_one() -> None:
    p = plan("h100x1", MAX_SEQ_LENGTH="8192", EMBEDDING_MAX_SEQ_LENGTH="512")
    assert (p.get("embedding").max_len, p.get("reranker").max_len) == ("512", "8192")


def test_a_gpu_index_the_host_lacks_is_refused_naming_the_variable() -> None:
    msg = refusal("h100x1", EMBEDDING_GPU="1")
    assert "EMBEDDING_GPU=1" in msg and "1 GPU" in msg and "No CUDA GPUs are available" in msg
    assert "Set EMBEDDING_GPU to 0" in msg
    msg = refusal("h100x2", RERANKER_GPU="2")
    assert "RERANKER_GPU=2" in msg and "2 GPUs" in msg and "0 to 1" in msg


def test_bfloat16_below_compute_capability_8_is_refused_naming_model_precision() -> None:
    msg = refusal("t4", MODEL_PRECISION="bfloat16")
    assert "MODEL_PRECISION=bfloat16" in msg and "Tesla T4" in msg and "7.5" in msg and "float16" in msg


def test_fractions_that_cannot_fit_are_refused_with_the_numbers() -> None:
    # the seed's 0.90 + 0.97 on one card: the second cannot start
    msg = refusal("h100x1", EMBEDDING_GPU_MEMORY="0.90", RERANKER_GPU_MEMORY="0.97")
    assert "RERANKER_GPU_MEMORY=0.97" in msg and "78647 MiB" in msg and "81079 MiB free now" in msg
    assert "72972 MiB for the server started before it" in msg and "at most 0.08" in msg
    # a GPU with 31 GiB in use: 0.9 does not fit even alone
    msg = refusal("h100-busy", EMBEDDING_GPU_MEMORY="0.9", RERANKER_GPU="0", RERANKER_GPU_MEMORY="0.05")
    assert "EMBEDDING_GPU_MEMORY=0.9" in msg and "49309 MiB free now" in msg and "at most 0.59" in msg


def test_a_seed_default_that_does_not_fit_a_busy_gpu_is_refused_saying_it_is_the_default() -> None:
    idle, busy = gpus("h100x2")[1], gpus("h100-busy")[0]
    busy.index = 0
    with pytest.raises(lp.Refusal) as e:
        lp.make_plan(NAMES, [busy, idle], BOTH)
    msg = str(e.value)
    assert "reranker on GPU 0" in msg and "RERANKER_GPU_MEMORY=0.97 (its default)" in msg
    assert "49309 MiB free now" in msg and "Set RERANKER_GPU_MEMORY to at most 0.59" in msg


def test_a_budget_left_too_small_by_other_processes_is_refused_naming_max_memory_percentage() -> None:
    msg = refusal("h100-busy", MAX_MEMORY_PERCENTAGE="40")
    assert "MAX_MEMORY_PERCENTAGE=40" in msg and "31771 MiB" in msg and "Raise MAX_MEMORY_PERCENTAGE" in msg


@pytest.mark.parametrize("env,var", [
    ({"EMBEDDING_GPU_MEMORY": "90"}, "EMBEDDING_GPU_MEMORY"),
    ({"RERANKER_GPU": "first"}, "RERANKER_GPU"),
    ({"MAX_MEMORY_PERCENTAGE": "150"}, "MAX_MEMORY_PERCENTAGE"),
    ({"MODEL_PRECISION": "fp8"}, "MODEL_PRECISION"),
    ({"RERANKER_MAX_SEQ_LENGTH": "long"}, "RERANKER_MAX_SEQ_LENGTH"),
])
def test_malformed_settings_are_refused_naming_the_variable(env, var) -> None:
    assert var in refusal("h100x1", **env)


def test_cuda_requested_without_any_gpu_is_refused() -> None:
    with pytest.raises(lp.Refusal, match="nvidia-smi lists no GPU"):
        lp.make_plan({**NAMES, "VLLM_RESOLVED_DEVICE": "cuda"}, [], BOTH)


def test_table_lists_model_gpu_capability_dtype_memory_port_and_served_name() -> None:
    table = lp.render_table(plan("h100x1")).splitlines()
    assert table[0].split() == ["model", "GPU", "compute", "cap", "dtype", "memory", "port", "served", "name"]
    assert table[1].split() == ["embedding", "0", "NVIDIA", "H100", "80GB", "HBM3", "9.0", "bfloat16", "0.45", "=",
                                "35.6", "GiB", "8000", "Qwen3-Embedding-0.6B"]
    assert table[2].split()[-2:] == ["8001", "Qwen3-Reranker-0.6B"]
