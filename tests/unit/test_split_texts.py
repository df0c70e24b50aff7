"""How split.py passes vLLM's vectors on without printing them again: each vector's JSON text cut out of
vLLM's answer as a view (float or base64), decoded to float32 bytes only for the cache, the usage kept
in vLLM's shape; and a cached vector printed exactly as the recorded vLLM printed the same values."""

import base64
import json
from pathlib import Path

from erproxy.split import (VLLM_USAGE, Embedded, embeddings_answer, floats_json, text_bytes, usage_of,
                           vector_texts)
from tests.fakes.fake_vllm import vllm_json

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32-cpu"


def recorded(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def test_the_recorded_base64_vector_prints_as_the_recorded_float_one():
    """vLLM 0.32 answered 'hello world' both ways: the float32 bytes of its base64 answer, printed by the
    gateway, are the text of its float answer (repr of each float32 widened to a double)."""
    b64 = recorded("embed_base64")
    flt = recorded("embed_float_single")
    assert b64["request"]["json"]["input"] == ["hello world"] and flt["request"]["json"]["input"] == "hello world"
    raw = base64.b64decode(b64["response"]["data"][0]["embedding"])
    assert floats_json(raw) == vllm_json(flt["response"]["data"][0]["embedding"])
    assert text_bytes(vllm_json(flt["response"]["data"][0]["embedding"])) == raw
    assert text_bytes(b'"' + b64["response"]["data"][0]["embedding"].encode() + b'"') == raw


def test_vector_texts_are_views_of_vllms_answer_in_either_format():
    for name in ("embed_base64", "embed_float_batch"):
        doc = recorded(name)["response"]
        body = vllm_json(doc)
        n = len(doc["data"])
        fmt = "base64" if name == "embed_base64" else "float"
        texts, tokens, rid, created, model = vector_texts(body, n, fmt)
        assert all(isinstance(t, memoryview) and t.obj is body for t in texts)  # no copy
        assert [bytes(t) for t in texts] == [vllm_json(d["embedding"]) for d in doc["data"]]
        assert (tokens, rid, created, model) == (doc["usage"]["prompt_tokens"], doc["id"], doc["created"],
                                                 doc["model"])
        assert usage_of(body) == doc["usage"]
        assert vector_texts(body, n, "base64" if fmt == "float" else "float") is None  # not the format asked


def test_an_escaped_base64_string_is_parsed_not_cut():
    body = b'{"id":"e","object":"list","created":1,"model":"m","data":[{"index":0,"object":"embedding",' \
           b'"embedding":"AAAAAA\\/AAAA"}],"usage":{"prompt_tokens":1}}'
    assert vector_texts(body, 1, "base64") is None


def test_the_merged_answer_keeps_vllms_usage_shape_and_sums_its_counts():
    doc = recorded("embed_float_batch")["response"]
    texts = [vllm_json(d["embedding"]) for d in doc["data"]]
    e = Embedded([None, None], 22, doc["id"], doc["created"], doc["model"], texts, dict(doc["usage"]))
    assert embeddings_answer(e, None, "minilm") == vllm_json(doc)
    cached = Embedded([base64.b64decode(recorded("embed_base64")["response"]["data"][0]["embedding"])], 0,
                      "embd-1", 1, "minilm")
    answer = json.loads(embeddings_answer(cached, "float", "minilm"))
    assert answer["usage"] == {**VLLM_USAGE, "prompt_tokens": 0, "total_tokens": 0}
    assert list(answer["usage"]) == list(doc["usage"])  # vLLM 0.32's keys, in its order
