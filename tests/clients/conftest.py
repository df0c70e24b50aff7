"""Real client libraries against a gateway process in front of the fake vLLM servers.

The clients are the unmodified packages users install (requirements-dev.txt); none may reach the
internet, so their telemetry is switched off before any of them is imported.
"""

from __future__ import annotations

import os

for _var, _value in {
    "HAYSTACK_TELEMETRY_ENABLED": "False",  # Haystack posts usage events to PostHog otherwise
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
    "ANONYMIZED_TELEMETRY": "False",
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ[_var] = _value

import httpx  # noqa: E402
import pytest  # noqa: E402

from tests.procs import Proc  # noqa: E402

EMBED_MODEL = "minilm"  # what the fake embedding server serves
RERANK_MODEL = "Qwen3-Reranker-0.6B"
QUERY = "What is AI?"
DOCUMENTS = ["Bananas are yellow", "AI is artificial intelligence", "AI helps humans"]
# the fake's recorded scores for QUERY (tests/fixtures/vllm-0.32-cpu/rerank_basic.json), best first
RANKED = [(1, 0.7618554830551147), (2, 0.6572144627571106), (0, 0.5548709034919739)]


class Reference:
    """What the fake vLLM answers directly, to compare the clients' results with."""

    def __init__(self, fake_embed: Proc) -> None:
        self.url = fake_embed.url
        self._vectors: dict[str, list[float]] = {}

    def vector(self, text: str) -> list[float]:
        if text not in self._vectors:
            r = httpx.post(self.url + "/v1/embeddings", timeout=10,
                           json={"model": EMBED_MODEL, "input": [text], "encoding_format": "float"})
            r.raise_for_status()
            self._vectors[text] = r.json()["data"][0]["embedding"]
        return self._vectors[text]


@pytest.fixture(scope="session")
def reference(fake_embed: Proc) -> Reference:
    return Reference(fake_embed)
