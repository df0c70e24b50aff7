"""openai, langchain-openai and llama-index's OpenAILikeEmbedding against the gateway."""

import pytest
from langchain_openai import OpenAIEmbeddings
from llama_index.embeddings.openai_like import OpenAILikeEmbedding
from openai import OpenAI

from tests.clients.conftest import EMBED_MODEL, RERANK_MODEL

TEXTS = ["hello world", "人工智能", "The quick brown fox"]


def test_openai_embeddings_float_and_base64(shared_gateway, reference):
    client = OpenAI(base_url=shared_gateway.url + "/v1", api_key=shared_gateway.key, max_retries=0)
    as_float = client.embeddings.create(model=EMBED_MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in as_float.data] == [0, 1, 2]
    assert [d.embedding for d in as_float.data] == [reference.vector(t) for t in TEXTS]
    assert all(len(d.embedding) == 384 for d in as_float.data)
    as_b64 = client.embeddings.create(model=EMBED_MODEL, input=TEXTS)  # the SDK's default: base64
    for d, text in zip(as_b64.data, TEXTS):
        assert d.embedding == pytest.approx(reference.vector(text), abs=1e-7)
    assert as_b64.usage.prompt_tokens > 0


def test_openai_models(shared_gateway):
    client = OpenAI(base_url=shared_gateway.url + "/v1", api_key=shared_gateway.key, max_retries=0)
    ids = {m.id for m in client.models.list()}
    assert ids == {EMBED_MODEL, RERANK_MODEL}


def test_langchain_openai_embeddings(shared_gateway, reference):
    emb = OpenAIEmbeddings(model=EMBED_MODEL, base_url=shared_gateway.url + "/v1", api_key=shared_gateway.key,
                           check_embedding_ctx_length=False, max_retries=0)
    docs = emb.embed_documents(TEXTS)
    assert len(docs) == 3 and all(len(v) == 384 for v in docs)
    for v, text in zip(docs, TEXTS):
        assert v == pytest.approx(reference.vector(text), abs=1e-7)
    assert emb.embed_query("hello world") == pytest.approx(reference.vector("hello world"), abs=1e-7)


def test_llama_index_openai_like_embedding(shared_gateway, reference):
    emb = OpenAILikeEmbedding(model_name=EMBED_MODEL, api_base=shared_gateway.url + "/v1", api_key=shared_gateway.key,
                              embed_batch_size=2, max_retries=0)
    vectors = emb.get_text_embedding_batch(TEXTS)  # two batches of at most 2
    assert len(vectors) == 3
    for v, text in zip(vectors, TEXTS):
        assert len(v) == 384 and v == pytest.approx(reference.vector(text), abs=1e-7)
    assert emb.get_query_embedding("hello world") == pytest.approx(reference.vector("hello world"), abs=1e-7)
