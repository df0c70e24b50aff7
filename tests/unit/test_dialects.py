"""The dialects' pure parts: field translations, encodings, billing, validation messages, routes."""

import base64
import struct

import pytest
from pydantic import BaseModel

from erproxy import dialects as d
from erproxy.errors import ApiError
from erproxy.handlers import route_table
from erproxy.protocol import parse_rerank


def test_tei_truncation():
    assert d.tei_truncation(False, "Left") == {}
    assert d.tei_truncation(True, "Left") == {"truncate_prompt_tokens": -1, "truncation_side": "left"}
    assert d.tei_truncation(True, "Right") == {"truncate_prompt_tokens": -1}  # the tokenizer's side: keeps [SEP]


def test_cohere_truncation():
    assert d.cohere_truncation("NONE", None) == {}
    assert d.cohere_truncation("START", None) == {"truncate_prompt_tokens": -1, "truncation_side": "left"}
    assert d.cohere_truncation("END", 32) == {"truncate_prompt_tokens": 32}
    with pytest.raises(ApiError) as e:
        d.cohere_truncation("NONE", 32)
    assert e.value.status == 400 and e.value.param == "max_tokens"


def test_base64_is_float32_little_endian():
    v = [0.5, -1.25, 3.0e-8, 1.0]
    raw = base64.b64decode(d.float32_base64(v))
    assert len(raw) == 16 and list(struct.unpack("<4f", raw)) == pytest.approx(v, rel=1e-7)


@pytest.mark.parametrize("documents, units", [(1, 1), (100, 1), (101, 2), (250, 3), (1000, 10)])
def test_search_units_one_per_100_documents(documents, units):
    assert d.search_units(documents) == units
    assert d.rerank_meta("2", documents, 12) == {"api_version": {"version": "2"},
                                                 "billed_units": {"search_units": units},
                                                 "tokens": {"input_tokens": 12}}


def test_score_threshold_leaves_what_goes_to_vllm():
    rr = parse_rerank(b'{"query": "q", "documents": ["a"], "score_threshold": 0.25, "truncate_prompt_tokens": 9}')
    assert d.score_threshold(rr) == 0.25
    assert rr.extra == {"truncate_prompt_tokens": 9}
    for bad in (b'"x"', b"true"):
        rr = parse_rerank(b'{"query": "q", "documents": ["a"], "score_threshold": ' + bad + b"}")
        with pytest.raises(ApiError):
            d.score_threshold(rr)


def test_validate_names_list_items_and_says_what_a_union_takes():
    with pytest.raises(ApiError) as e:
        d.validate(d.TEIEmbedRequest, {"inputs": 5})
    assert e.value.param == "inputs" and "valid string or" in e.value.message
    with pytest.raises(ApiError) as e:
        d.validate(d.CohereEmbedRequest, {"texts": ["a", None]})
    assert e.value.param == "texts[1]"


def test_request_and_response_models_have_examples_that_validate():
    for model in (d.TEIEmbedRequest, d.TEIRerankRequest, d.CohereEmbedRequest, d.CohereRerankRequest):
        examples = model.model_json_schema()["examples"]
        assert examples
        for example in examples:
            model.model_validate(example)
    for model in (d.TEIEmbedResponse, d.TEIRerankResponse, d.CohereEmbedByTypeResponse, d.CohereRerankResponse,
                  d.SingleServiceRerankResponse):
        for example in model.model_json_schema()["examples"]:
            model.model_validate(example)


class _Stub:
    def __getattr__(self, name):
        return lambda req: None


def test_every_dialect_route_is_documented():
    table = route_table(_Stub())
    by_path = {r.path: r for r in table.routes}
    for path in ("/embed", "/v1/embed", "/v2/embed", "/rerank", "/v1/rerank", "/v2/rerank", "/api/v1/rerank"):
        route = by_path[path]
        assert route.methods == ("POST",) and route.summary
        assert issubclass(route.request_model, BaseModel) and issubclass(route.response_model, BaseModel)
    assert by_path["/rerank"].request_model.model_validate({"query": "q", "texts": ["a"]}).root.texts == ["a"]
    assert by_path["/rerank"].request_model.model_validate({"query": "q", "documents": ["a"]}).root.documents == ["a"]
