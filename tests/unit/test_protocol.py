import orjson
import pytest

from erproxy.errors import ApiError
from erproxy.protocol import (
    apply_query_instruction,
    build_rerank_response,
    is_qwen3_embedding,
    parse_embeddings,
    parse_rerank,
)


def body(doc) -> bytes:
    return orjson.dumps(doc)


@pytest.mark.parametrize("inp,items", [
    ("hello", 1), (["a", "b"], 2), ([101, 102], 1), ([[1, 2], [3]], 2),
])
def test_embedding_inputs_accepted(inp, items):
    req = parse_embeddings(body({"input": inp, "model": "m"}))
    assert req.items == items and req.changed is False


@pytest.mark.parametrize("doc,param", [
    ({}, "input"), ({"input": []}, "input"), ({"input": 123}, "input"), ({"input": ["a", 1]}, "input[1]"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"), ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "model": ""}, "model"), ({"input": "x", "input_type": "poem"}, "input_type"),
])
def test_bad_embedding_requests_name_the_field(doc, param):
    with pytest.raises(ApiError) as e:
        parse_embeddings(body(doc))
    assert e.value.status == 400 and e.value.param == param


def test_not_json_is_a_400():
    with pytest.raises(ApiError) as e:
        parse_embeddings(b"{oops")
    assert e.value.status == 400 and e.value.code == "invalid_json"


def test_qwen3_query_gets_model_card_instruction_documents_stay():
    q = parse_embeddings(body({"input": ["What is AI?"], "input_type": "query", "model": "Qwen3-Embedding-0.6B"}))
    apply_query_instruction(q, qwen3=True, default_instruction="Given a web search query")
    assert q.doc == {"input": ["Instruct: Given a web search query\nQuery:What is AI?"], "model": "Qwen3-Embedding-0.6B"}
    d = parse_embeddings(body({"input": "AI is...", "input_type": "document"}))
    apply_query_instruction(d, qwen3=True, default_instruction="x")
    assert d.doc == {"input": "AI is..."}
    c = parse_embeddings(body({"input": "q", "input_type": "query", "instruction": "Find code"}))
    apply_query_instruction(c, qwen3=True, default_instruction="x")
    assert c.doc["input"] == "Instruct: Find code\nQuery:q"
    m = parse_embeddings(body({"input": "q", "input_type": "query"}))
    apply_query_instruction(m, qwen3=False, default_instruction="x")
    assert m.doc == {"input": "q"}  # MiniLM has no instruction format


def test_qwen3_detection():
    assert is_qwen3_embedding("Qwen3-Embedding-0.6B", None)
    assert is_qwen3_embedding("emb", "/models/Qwen/Qwen3-Embedding-8B")
    assert not is_qwen3_embedding("minilm", "/models/all-MiniLM-L6-v2")


def test_rerank_aliases_and_document_objects():
    r = parse_rerank(body({"query": "q", "documents": ["a", {"text": "b"}], "top_k": 1}))
    assert r.documents == ["a", "b"] and r.top_n == 1 and r.return_documents is True
    assert orjson.loads(r.upstream_body("m")) == {"query": "q", "documents": ["a", "b"], "model": "m", "top_n": 1}
    assert parse_rerank(body({"query": "q", "documents": ["a"], "top_n": 9})).top_n == 1


def test_rerank_forwards_fields_it_does_not_interpret():
    r = parse_rerank(body({"query": "q", "documents": ["a"], "truncate_prompt_tokens": 128, "instruction": "Find",
                           "chat_template_kwargs": {"x": 1}, "return_documents": False}))
    up = orjson.loads(r.upstream_body("m"))
    assert up["truncate_prompt_tokens"] == 128
    assert up["chat_template_kwargs"] == {"x": 1, "instruction": "Find"}
    assert "return_documents" not in up and "instruction" not in up and "top_k" not in up


@pytest.mark.parametrize("doc,param", [
    ({"documents": ["a"]}, "query"), ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": [1]}, "documents[0]"), ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": ["a"], "return_documents": "no"}, "return_documents"),
    ({"query": "q", "documents": ["a"], "top_n": 1, "top_k": 2}, "top_n"),
])
def test_bad_rerank_requests_name_the_field(doc, param):
    with pytest.raises(ApiError) as e:
        parse_rerank(body(doc))
    assert e.value.status == 400 and e.value.param == param


def test_rerank_response_sorted_without_vllm_only_fields():
    req = parse_rerank(body({"query": "q", "documents": ["a", "b", "c"], "return_documents": True}))
    upstream = body({"id": "score-1", "model": "m", "usage": {"prompt_tokens": 5, "total_tokens": 5},
                     "results": [{"index": 0, "document": {"text": "a", "multi_modal": None}, "relevance_score": 0.1},
                                 {"index": 2, "document": {"text": "c", "multi_modal": None}, "relevance_score": 0.9},
                                 {"index": 1, "document": {"text": "b", "multi_modal": None}, "relevance_score": 0.5}]})
    out, usage = build_rerank_response(req, upstream, "m")
    doc = orjson.loads(out)
    assert [r["index"] for r in doc["results"]] == [2, 1, 0]
    assert doc["results"][0] == {"index": 2, "relevance_score": 0.9, "document": {"text": "c"}}
    assert doc["usage"] == usage == {"prompt_tokens": 5, "total_tokens": 5}
    assert set(doc) == {"id", "model", "results", "usage"}
    req.return_documents = False
    doc = orjson.loads(build_rerank_response(req, upstream, "m")[0])
    assert all(set(r) == {"index", "relevance_score"} for r in doc["results"])


def test_rerank_response_rejects_malformed_upstream():
    req = parse_rerank(body({"query": "q", "documents": ["a"]}))
    for bad in (b'{"results": [{"index": 5, "relevance_score": 1}]}', b'{"results": "x"}', b"{}"):
        with pytest.raises((ValueError, KeyError, TypeError)):
            build_rerank_response(req, bad, "m")
