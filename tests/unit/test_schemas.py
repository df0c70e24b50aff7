"""The wire models (erproxy/schemas.py) as the hot path uses them: strict JSON types, `param` naming the
field exactly with a message that says what to change, unknown fields kept for vLLM, the gateway's
own fields never forwarded."""

import orjson
import pytest
from pydantic import ValidationError

from erproxy.errors import ApiError
from erproxy.protocol import parse_embeddings, parse_rerank
from erproxy.schemas import EmbeddingsRequest, Error, RerankRequest


def fails(parse, doc) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(orjson.dumps(doc))
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


@pytest.mark.parametrize("doc,param,says", [
    ({"input": ["a", 1]}, "input[1]", "must be a string like `input[0]` (no mixing); got 1."),
    ({"input": ["a", "b", None]}, "input[2]", "must be a string like `input[0]` (no mixing); got null."),
    ({"input": [[1, 2], []]}, "input[1]", "must be a non-empty list of token ids"),
    ({"input": [[1, "x"]]}, "input[0][1]", "must be an integer token id; got \"x\"."),
    ({"input": [True]}, "input[0]", "must be a string; got true."),
    ({"input": []}, "input", "must not be an empty list"),
    ({"input": {"text": "a"}}, "input", "got an object"),
    ({}, "input", "`input` is required"),
    ({"input": "x", "dimensions": "3"}, "dimensions", "must be a positive integer; got \"3\"."),
    ({"input": "x", "dimensions": True}, "dimensions", "must be a positive integer; got true."),
    ({"input": "x", "model": "  "}, "model", "must be a non-empty string"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", 'must be "float" or "base64"; got "hex".'),
    ({"input": "x", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens", "-1 (the model's limit) or a positive"),
    ({"input": "x", "priority": "high"}, "priority", "must be an integer"),
])
def test_embeddings_errors_name_the_exact_field_and_what_to_send(doc, param, says):
    e = fails(parse_embeddings, doc)
    assert e.param == param and says in e.message and e.message.startswith(f"`{param}`")


@pytest.mark.parametrize("doc,param,says", [
    ({"query": "q", "documents": ["a", "b", "c", 4]}, "documents[3]",
     "`documents[3]` must be a string or an object with a string `text`; got 4."),
    ({"query": "q", "documents": ["a", {"txt": "b"}]}, "documents[1]", "got an object without a string `text`"),
    ({"query": "q", "documents": "a"}, "documents", "got \"a\""),
    ({"query": "q"}, "documents", "`documents` is required"),
    ({"query": 3, "documents": ["a"]}, "query", "must be a non-empty string; got 3."),
    ({"query": "q", "documents": ["a"], "top_n": 1.5}, "top_n", "must be a positive integer; got 1.5."),
    ({"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, "max_tokens_per_doc", "positive integer"),
])
def test_rerank_errors_name_the_exact_field_and_what_to_send(doc, param, says):
    e = fails(parse_rerank, doc)
    assert e.param == param and says in e.message


def test_a_body_that_is_not_an_object_is_invalid_json():
    for body in (b"[1]", b'"x"', b"", b"{"):
        with pytest.raises(ApiError) as e:
            parse_embeddings(body)
        assert e.value.code == "invalid_json" and e.value.param is None


def test_embeddings_unknown_and_vllm_fields_stay_in_the_forwarded_body():
    body = orjson.dumps({"model": "m", "input": "x", "truncate_prompt_tokens": 8, "priority": 1, "extra_x": [1]})
    req = parse_embeddings(body)
    assert req.changed is False  # the client's own bytes go to vLLM, every field included
    assert req.doc == orjson.loads(body) and req.token_ids is False


def test_rerank_forwards_vllm_and_unknown_fields_but_never_the_gateways_own():
    r = parse_rerank(orjson.dumps({"query": "q", "documents": ["a", {"text": "b"}], "top_k": 1, "instruction": "Find",
                                   "return_documents": False, "max_tokens_per_doc": 64, "priority": -1,
                                   "truncate_prompt_tokens": 32, "rank_fields": ["text"]}))
    up = orjson.loads(r.upstream_body("m"))
    assert up["max_tokens_per_doc"] == 64 and up["priority"] == -1 and up["truncate_prompt_tokens"] == 32
    assert up["rank_fields"] == ["text"] and up["documents"] == ["a", "b"] and up["top_n"] == 1
    assert not set(up) & RerankRequest.GATEWAY_FIELDS
    assert EmbeddingsRequest.GATEWAY_FIELDS == {"input_type", "instruction"}


@pytest.mark.parametrize("inp,items,token_ids", [
    ("a", 1, False), (["a", "b"], 2, False), ([1, 2, 3], 1, True), ([[1], [2, 3]], 2, True),
])
def test_input_shapes_count_items_and_say_whether_they_are_token_ids(inp, items, token_ids):
    req = parse_embeddings(orjson.dumps({"input": inp, "model": "m"}))
    assert (req.items, req.token_ids) == (items, token_ids)


def test_the_error_model_is_the_shape_every_error_has():
    e = fails(parse_embeddings, {"input": [1, "a"]})
    assert Error.model_validate_json(e.body()).error.param == "input[1]"


@pytest.mark.parametrize("model,doc", [
    ("schemas.RerankRequest", {"query": "q", "documents": [1] * 100_000}),
    ("schemas.EmbeddingsRequest", {"input": [1.5] * 100_000}),
    ("dialects.TEIEmbedRequest", {"inputs": [1] * 100_000}),
    ("dialects.TEIRerankRequest", {"query": "q", "texts": [1] * 100_000}),
    ("dialects.CohereEmbedRequest", {"texts": [1] * 100_000}),
])
def test_a_long_list_of_wrong_items_stops_at_the_first_error(model, doc):
    """A 2 MB body of a million numbers made a million validation errors (15 s and 3 GB on the event loop,
    every client waiting) for a 400 that names the first: every list of items fails fast."""
    from erproxy import dialects, schemas

    cls = {"schemas": schemas, "dialects": dialects}[model.split(".")[0]].__dict__[model.split(".")[1]]
    with pytest.raises(ValidationError) as e:
        cls.model_validate(doc)
    assert e.value.error_count() <= 5


def test_a_gzip_compressed_body_is_told_to_be_sent_uncompressed():
    import gzip

    from erproxy.protocol import parse_json_object

    with pytest.raises(ApiError) as e:
        parse_json_object(gzip.compress(b'{"input": "hello"}'))
    assert e.value.status == 400 and "gzip-compressed" in e.value.message and "uncompressed" in e.value.message
