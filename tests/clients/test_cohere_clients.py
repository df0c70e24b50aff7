"""The cohere SDK (v1 and v2), langchain-cohere and llama-index's CohereRerank against the gateway."""

import base64
import struct

import cohere
import pytest
from langchain_cohere import CohereRerank as LangchainCohereRerank
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.postprocessor.cohere_rerank import CohereRerank as LlamaIndexCohereRerank

from tests.clients.conftest import DOCUMENTS, EMBED_MODEL, QUERY, RANKED, RERANK_MODEL

TEXTS = ["hello world", "人工智能", "The quick brown fox"]


@pytest.fixture
def v1(shared_gateway):
    return cohere.Client(api_key=shared_gateway.key, base_url=shared_gateway.url, timeout=10)


@pytest.fixture
def v2(shared_gateway):
    return cohere.ClientV2(api_key=shared_gateway.key, base_url=shared_gateway.url, timeout=10)


def test_cohere_v1_rerank(v1):
    res = v1.rerank(model=RERANK_MODEL, query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True)
    assert [(r.index, r.relevance_score) for r in res.results] == RANKED[:2]
    assert [r.document.text for r in res.results] == [DOCUMENTS[1], DOCUMENTS[2]]
    assert res.meta.api_version.version == "1"
    assert res.meta.billed_units.search_units == 1
    assert res.meta.tokens.input_tokens > 0


def test_cohere_v2_rerank(v2):
    res = v2.rerank(model=RERANK_MODEL, query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [(r.index, r.relevance_score) for r in res.results] == RANKED
    assert res.meta.api_version.version == "2"
    assert res.meta.billed_units.search_units == 1 and res.meta.tokens.input_tokens > 0


def test_cohere_v2_rerank_bills_a_search_unit_per_100_documents(v2):
    docs = [f"document number {i}" for i in range(201)]
    res = v2.rerank(model=RERANK_MODEL, query=QUERY, documents=docs, top_n=5)
    assert len(res.results) == 5
    scores = [r.relevance_score for r in res.results]
    assert scores == sorted(scores, reverse=True)
    assert res.meta.billed_units.search_units == 3


def test_cohere_v2_embed_float_and_base64(v2, reference):
    res = v2.embed(model=EMBED_MODEL, texts=TEXTS, input_type="search_document", embedding_types=["float", "base64"])
    assert res.response_type == "embeddings_by_type"
    assert res.embeddings.float_ == [reference.vector(t) for t in TEXTS]
    for b64, text in zip(res.embeddings.base64, TEXTS):
        raw = base64.b64decode(b64)
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == reference.vector(text)
    assert res.texts == TEXTS
    assert res.meta.billed_units.input_tokens > 0 and res.meta.api_version.version == "2"


def test_cohere_v2_embed_defaults_to_float(v2, reference):
    res = v2.embed(model=EMBED_MODEL, texts=["hello world"], input_type="search_query")
    assert res.embeddings.float_ == [reference.vector("hello world")]  # minilm: no Qwen3 instruction
    assert res.embeddings.base64 is None


def test_cohere_v1_embed(v1, reference):
    res = v1.embed(model=EMBED_MODEL, texts=TEXTS, input_type="search_document")
    assert res.response_type == "embeddings_floats"
    assert res.embeddings == [reference.vector(t) for t in TEXTS]
    typed = v1.embed(model=EMBED_MODEL, texts=TEXTS, embedding_types=["float"])
    assert typed.response_type == "embeddings_by_type"
    assert typed.embeddings.float_ == [reference.vector(t) for t in TEXTS]


def test_cohere_sdk_sees_the_gateways_400(v2):
    with pytest.raises(cohere.BadRequestError) as e:
        v2.embed(model=EMBED_MODEL, texts=["x"], input_type="search_query", embedding_types=["int8"])
    assert e.value.body["error"]["param"] == "embedding_types[0]"


def test_langchain_cohere_rerank(shared_gateway):
    rr = LangchainCohereRerank(model=RERANK_MODEL, cohere_api_key=shared_gateway.key, base_url=shared_gateway.url,
                               top_n=2)
    out = rr.compress_documents([Document(page_content=d) for d in DOCUMENTS], QUERY)
    assert [d.page_content for d in out] == [DOCUMENTS[1], DOCUMENTS[2]]
    assert [d.metadata["relevance_score"] for d in out] == [s for _, s in RANKED[:2]]
    assert rr.rerank(DOCUMENTS, QUERY, top_n=3) == [{"index": i, "relevance_score": s} for i, s in RANKED]


def test_llama_index_cohere_rerank(shared_gateway):
    rr = LlamaIndexCohereRerank(model=RERANK_MODEL, api_key=shared_gateway.key, base_url=shared_gateway.url, top_n=2)
    nodes = [NodeWithScore(node=TextNode(text=d)) for d in DOCUMENTS]
    out = rr.postprocess_nodes(nodes, QueryBundle(QUERY))
    assert [n.node.get_content() for n in out] == [DOCUMENTS[1], DOCUMENTS[2]]
    assert [n.score for n in out] == [s for _, s in RANKED[:2]]


def test_langchain_cohere_embeddings_with_their_defaults(shared_gateway, reference):
    """CohereEmbeddings sends `"truncate": null` (its own default): null is "not sent", as at Cohere."""
    from langchain_cohere import CohereEmbeddings

    lc = CohereEmbeddings(model=EMBED_MODEL, cohere_api_key=shared_gateway.key, base_url=shared_gateway.url,
                          max_retries=0)
    assert lc.embed_documents(TEXTS) == [reference.vector(t) for t in TEXTS]
    assert lc.embed_query("hello world") == reference.vector("hello world")


def test_cohere_v1_rerank_of_another_field_than_text_is_refused_not_ranked_on_the_text(v1):
    docs = [{"title": "AI is artificial intelligence", "text": "Bananas are yellow"},
            {"title": "Bananas are yellow", "text": "AI is artificial intelligence"}]
    with pytest.raises(cohere.BadRequestError) as e:
        v1.rerank(model=RERANK_MODEL, query=QUERY, documents=docs, rank_fields=["title"])
    assert "rank_fields" in str(e.value.body)
    same = v1.rerank(model=RERANK_MODEL, query=QUERY, documents=docs, rank_fields=["text"], return_documents=None)
    assert [r.index for r in same.results] == [1, 0]
