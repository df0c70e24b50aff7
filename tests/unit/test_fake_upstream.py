"""The fake vLLM must answer exactly like the recorded vLLM 0.32 CPU responses."""

import json
from pathlib import Path

import httpx
import pytest

from tests.fakes.fake_vllm import FIXTURES, FakeVLLM, RecordingsMissing, load_fixtures, shape

FIXTURE_DOCS = load_fixtures()


def role_for(name: str, fx: dict) -> str:
    model = (fx["request"]["json"] or {}).get("model") if isinstance(fx["request"]["json"], dict) else None
    if name.startswith("rerank_") and model != "minilm" or name.startswith("score") or name == "embed_on_rerank_model":
        return "rerank"
    return "embed"


@pytest.mark.parametrize("name", sorted(FIXTURE_DOCS))
def test_fake_replays_every_recording_byte_for_byte(name, fake_embed, fake_rerank):
    fx = FIXTURE_DOCS[name]
    fake = fake_rerank if role_for(name, fx) == "rerank" else fake_embed
    req = fx["request"]
    r = httpx.request(req["method"], fake.url + req["path"], json=req["json"], timeout=10)
    assert r.status_code == fx["status"]
    if fx["content_type"] == "application/json":
        assert r.headers["content-type"].startswith("application/json")
        # vLLM's JSONResponse is compact JSON: same bytes as the recording re-serialised that way
        assert r.content == json.dumps(fx["response"], ensure_ascii=False, separators=(",", ":")).encode()
    else:
        assert r.content == b""


@pytest.mark.parametrize("fixture,path,doc,role", [
    ("embed_float_batch", "/v1/embeddings", {"model": "minilm", "input": ["new text", "another one"]}, "embed"),
    ("embed_base64", "/v1/embeddings", {"model": "minilm", "input": ["new"], "encoding_format": "base64"}, "embed"),
    ("embed_wrong_model", "/v1/embeddings", {"model": "other", "input": "x"}, "embed"),
    ("embed_empty_list", "/v1/embeddings", {"model": "minilm", "input": []}, "embed"),
    ("rerank_basic", "/v1/rerank", {"model": "Qwen3-Reranker-0.6B", "query": "new q", "documents": ["x", "y"]}, "rerank"),
    ("rerank_empty_documents", "/v1/rerank", {"model": "Qwen3-Reranker-0.6B", "query": "q2", "documents": []}, "rerank"),
])
def test_generated_answers_have_the_recorded_shape(fixture, path, doc, role, fake_embed, fake_rerank):
    fake = fake_rerank if role == "rerank" else fake_embed
    r = httpx.post(fake.url + path, json=doc, timeout=10)
    fx = FIXTURE_DOCS[fixture]
    assert r.status_code == fx["status"]
    assert shape(r.json()) == shape(fx["response"])
    if fixture == "embed_empty_list":
        assert r.json() == fx["response"]


def test_recordings_live_inside_the_repository():
    root = Path(__file__).resolve().parents[2]
    assert FIXTURES.resolve().is_relative_to(root)
    assert (FIXTURES / "embed_models.json").is_file()


def test_missing_recordings_are_named_not_a_key_error(tmp_path):
    (tmp_path / "embed_models.json").write_text((FIXTURES / "embed_models.json").read_text())
    with pytest.raises(RecordingsMissing) as e:
        FakeVLLM("embed", fixtures=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "embed_float_single.json" in msg and "rerank_models.json" in msg
    assert "record_vllm_fixtures.py" in msg
