"""Haystack's HuggingFaceTEIRanker, and TEI- and Cohere-shaped requests sent with `requests`."""

import base64
import struct

import pytest
import requests
from haystack import Document
from haystack.utils import Secret
from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker
from haystack_integrations.components.rankers.huggingface_api.ranker import TruncationDirection

from tests.clients.conftest import DOCUMENTS, EMBED_MODEL, QUERY, RANKED


def test_haystack_tei_ranker(shared_gateway):
    ranker = HuggingFaceTEIRanker(url=shared_gateway.url, token=Secret.from_token(shared_gateway.key), top_k=2,
                                  max_retries=1)
    out = ranker.run(query=QUERY, documents=[Document(content=d) for d in DOCUMENTS])["documents"]
    assert [d.content for d in out] == [DOCUMENTS[1], DOCUMENTS[2]]
    assert [d.score for d in out] == [s for _, s in RANKED[:2]]
    truncated = ranker.run(query=QUERY, documents=[Document(content=d) for d in DOCUMENTS], top_k=3,
                           truncation_direction=TruncationDirection.LEFT)["documents"]
    assert [d.content for d in truncated] == [DOCUMENTS[i] for i, _ in RANKED]


def post(gw, path, body):
    return requests.post(gw.url + path, json=body, headers=gw.auth(), timeout=10)


def test_tei_embed(shared_gateway, reference):
    r = post(shared_gateway, "/embed", {"inputs": ["hello world", "人工智能"], "truncate": True})
    assert r.status_code == 200, r.text
    assert r.json() == [reference.vector("hello world"), reference.vector("人工智能")]
    one = post(shared_gateway, "/embed", {"inputs": "hello world"}).json()
    assert len(one) == 1 and len(one[0]) == 384 and one[0] == reference.vector("hello world")


def test_tei_rerank(shared_gateway):
    r = post(shared_gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS, "return_text": True})
    assert r.status_code == 200, r.text
    assert r.json() == [{"index": i, "score": s, "text": DOCUMENTS[i]} for i, s in RANKED]
    bare = post(shared_gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS}).json()
    assert bare == [{"index": i, "score": s} for i, s in RANKED]


def test_cohere_embed_with_requests(shared_gateway, reference):
    r = post(shared_gateway, "/v2/embed", {"model": EMBED_MODEL, "texts": ["hello world"], "input_type": "search_document",
                                           "embedding_types": ["base64"], "truncate": "END"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc["embeddings"]) == {"base64"}
    raw = base64.b64decode(doc["embeddings"]["base64"][0])
    assert list(struct.unpack("<384f", raw)) == reference.vector("hello world")
    assert doc["texts"] == ["hello world"] and doc["meta"]["billed_units"]["input_tokens"] == 4


def test_single_service_rerank_clients_read_text(shared_gateway):
    r = post(shared_gateway, "/api/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_k": 2})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert [(h["index"], h["relevance_score"], h["text"]) for h in hits] == [
        (i, s, DOCUMENTS[i]) for i, s in RANKED[:2]]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_dify_score_threshold(shared_gateway, path):
    r = post(shared_gateway, path, {"model": "Qwen3-Reranker-0.6B", "query": QUERY, "documents": DOCUMENTS,
                                    "top_n": 3, "score_threshold": 0.6})
    assert r.status_code == 200, r.text
    assert [(x["index"], x["relevance_score"]) for x in r.json()["results"]] == RANKED[:2]


def test_haystack_tei_embedders_and_huggingface_hub_given_the_base_url(shared_gateway, reference, monkeypatch):
    """TEI clients post to the server's base URL (TEI's default route, `POST /`): Haystack's TEI embedders
    and huggingface_hub's InferenceClient, set up with the gateway's URL as with TEI's."""
    import huggingface_hub.constants

    # offline mode (conftest) refuses even the gateway's loopback URL; only that URL is called here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    from haystack_integrations.components.embedders.huggingface_api import (
        HuggingFaceAPIDocumentEmbedder,
        HuggingFaceAPITextEmbedder,
    )
    from huggingface_hub import InferenceClient

    params = {"api_type": "text_embeddings_inference", "api_params": {"url": shared_gateway.url},
              "token": Secret.from_token(shared_gateway.key)}
    vector = HuggingFaceAPITextEmbedder(**params).run(text="hello world")["embedding"]
    assert vector == reference.vector("hello world")
    docs = HuggingFaceAPIDocumentEmbedder(**params, batch_size=2).run(
        documents=[Document(content=t) for t in ("hello world", "人工智能", "AI helps humans")])["documents"]
    assert [len(d.embedding) for d in docs] == [384] * 3
    assert docs[1].embedding == reference.vector("人工智能")
    client = InferenceClient(model=shared_gateway.url, token=shared_gateway.key)
    assert client.feature_extraction("hello world")[0].tolist() == reference.vector("hello world")
