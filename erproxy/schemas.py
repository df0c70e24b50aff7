"""Every wire type of the API, declared once as a pydantic model, with examples.

Requests are validated through these models on the hot path (protocol.py); responses are
declared for the OpenAPI document (openapi.py) and the schema checks of the test suite, not
validated at run time. A validation failure becomes one 400 in the OpenAI shape whose `param`
names the field exactly (`input[0]`, `documents[3]`) and whose message says what to change
(`request_error`).

Unknown fields: every request model keeps them (`extra="allow"`) and they are forwarded to vLLM,
which ignores what it does not know. The fields a model lists in `GATEWAY_FIELDS` are the
gateway's own: they are consumed here and never reach vLLM, which would reject or misread them.
Fields vLLM understands beyond OpenAI's (`truncate_prompt_tokens`, `priority`,
`max_tokens_per_doc`) are declared, so they are checked and documented, and forwarded as sent.
"""

from __future__ import annotations

import functools
from itertools import takewhile
from typing import Annotated, Any, ClassVar, Literal, Union

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ApiError, bad_request

# ---- building blocks ------------------------------------------------------------------------------
NonEmpty = Annotated[str, Field(min_length=1, pattern=r"\S")]
PositiveInt = Annotated[int, Field(ge=1)]
TokenIds = Annotated[list[int], Field(min_length=1, fail_fast=True)]

REQUEST_CONFIG = ConfigDict(extra="allow", strict=True)


class NullIsNotSent(BaseModel):
    """`null` for a field that has a default means "not sent", as the APIs imitated here read it (Cohere,
    TEI's Option fields): SDKs such as langchain-cohere send `"truncate": null` for their own None."""

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [k for k in _defaulted(cls) if k in data and data[k] is None]
            if nulls:
                data = {k: v for k, v in data.items() if k not in nulls}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        """The OpenAPI document says so: each such field also takes null."""
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        properties = target.get("properties", {})
        for name in _defaulted(cls):
            prop = properties.get(name)
            if prop is None or {"type": "null"} in prop.get("anyOf", ()):
                continue
            outer = {k: prop.pop(k) for k in ("title", "description", "default", "examples") if k in prop}
            properties[name] = {"anyOf": [prop, {"type": "null"}], **outer}
        return schema


@functools.cache
def _defaulted(cls: type[BaseModel]) -> tuple[str, ...]:
    """The fields of `cls` whose default is not None."""
    return tuple(f.alias or name for name, f in cls.model_fields.items() if f.default is not None
                 and not f.is_required())


class _Request(NullIsNotSent):
    """A request body: strict JSON types (no "1" for 1, no true for 1), unknown fields kept."""

    model_config = REQUEST_CONFIG
    GATEWAY_FIELDS: ClassVar[frozenset[str]] = frozenset()
    RULES: ClassVar[dict[str, str]] = {}  # field -> what it must be, for error messages


# ---- embeddings -------------------------------------------------------------------------------------
EmbeddingInput = Annotated[
    Union[
        str,
        Annotated[list[str], Field(min_length=1, fail_fast=True)],
        Annotated[list[TokenIds], Field(min_length=1, fail_fast=True)],
        TokenIds,
    ],
    Field(union_mode="left_to_right"),
]


class EmbeddingsRequest(_Request):
    """OpenAI embeddings request, plus the gateway's Qwen3 query fields and vLLM's extras."""

    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra={"examples": [
        {"input": ["hello world", "人工智能"]},
        {"model": "Qwen3-Embedding-0.6B", "input": "What is AI?", "input_type": "query", "encoding_format": "float"},
    ]})
    GATEWAY_FIELDS: ClassVar[frozenset[str]] = frozenset({"input_type", "instruction"})
    RULES: ClassVar[dict[str, str]] = {
        "input": "a string, a list of strings, or token ids (a list of token-id lists)",
        "model": "a non-empty string",
        "encoding_format": '"float" or "base64"',
        "dimensions": "a positive integer",
        "user": "a string",
        "input_type": '"query" or "document"',
        "instruction": "a non-empty string",
        "truncate_prompt_tokens": "-1 (the model's limit) or a positive integer",
        "priority": "an integer",
    }

    input: EmbeddingInput = Field(description=(
        "Text to embed: a string or a list of strings. Token-id arrays (a list of token-id lists) are "
        "refused with 400 `token_ids_not_accepted` unless the gateway runs with ACCEPT_TOKEN_IDS=true: "
        "the ids must come from the served model's own tokenizer."))
    model: NonEmpty | None = Field(None, description="Served model id; default EMBEDDING_MODEL or the first served.")
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="`float` (JSON numbers) or `base64` (little-endian float32), as vLLM answers.")
    dimensions: PositiveInt | None = Field(None, description="Matryoshka output size, where the model supports it.")
    user: str | None = Field(None, description="End-user id (accepted, not used).")
    input_type: Literal["query", "document", "search_query", "search_document"] | None = Field(
        None, description="Gateway field: `query` formats Qwen3 queries with an instruction; `document` as sent.")
    instruction: NonEmpty | None = Field(
        None, description="Gateway field: the query instruction (default EMBEDDING_QUERY_INSTRUCTION).")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="vLLM: truncate each input to this many tokens (-1: the model's limit).")
    priority: int | None = Field(None, description="vLLM: scheduling priority (needs vLLM's priority scheduling).")


class EmbeddingObject(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(description="The vector; a base64 string for `encoding_format: base64`.")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """vLLM's answer, passed through byte for byte."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "embd-a23d609298de58d1", "object": "list", "created": 1795428071, "model": "Qwen3-Embedding-0.6B",
        "data": [{"index": 0, "object": "embedding", "embedding": [-0.0345, 0.0311, 0.0068]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }]})

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingObject]
    usage: Usage


# ---- rerank -----------------------------------------------------------------------------------------
class RerankDocument(BaseModel):
    model_config = REQUEST_CONFIG
    text: str


def _texts(docs: list[str | RerankDocument]) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in docs]


# A list of strings (the common case, validated in one pass), else strings and {"text": ...} objects
# mixed; either way the model holds the texts.
Documents = Annotated[
    Union[
        Annotated[list[str], Field(min_length=1, fail_fast=True)],
        # fail_fast here too: without it a 2 MB body of a million numbers made a million errors (15 s and
        # 3 GB on the event loop) for a 400 that names the first
        Annotated[list[Annotated[Union[str, RerankDocument], Field(union_mode="left_to_right")]],
                  Field(min_length=1, fail_fast=True), AfterValidator(_texts)],
    ],
    Field(union_mode="left_to_right"),
]


class RerankRequest(_Request):
    """Cohere/Jina-style rerank request."""

    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra={"examples": [
        {"query": "What is AI?", "documents": ["AI is artificial intelligence", "Bananas are yellow"], "top_n": 1},
    ]})
    GATEWAY_FIELDS: ClassVar[frozenset[str]] = frozenset({"top_k", "return_documents", "instruction"})
    RULES: ClassVar[dict[str, str]] = {
        "query": "a non-empty string",
        "documents": 'a non-empty list of strings or {"text": ...} objects',
        "model": "a non-empty string",
        "top_n": "a positive integer",
        "top_k": "a positive integer",
        "return_documents": "true or false",
        "instruction": "a non-empty string",
        "truncate_prompt_tokens": "-1 (the model's limit) or a positive integer",
        "max_tokens_per_doc": "a positive integer",
        "priority": "an integer",
    }

    query: str = Field(min_length=1, description="The query the documents are ranked against.")
    documents: Documents = Field(description='Documents to rank: strings or {"text": ...} objects.')
    model: NonEmpty | None = Field(None, description="Served model id; default RERANKER_MODEL or the first served.")
    top_n: PositiveInt | None = Field(None, description="Return only the best n results (default: all).")
    top_k: PositiveInt | None = Field(None, description="Alias of `top_n` (Jina).")
    return_documents: bool = Field(True, description="Include each result's document text.")
    instruction: NonEmpty | None = Field(None, description="Gateway field: the Qwen3 reranker's task instruction.")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="vLLM: truncate each query-document pair to this many tokens.")
    max_tokens_per_doc: PositiveInt | None = Field(None, description="Cohere v2: forwarded to vLLM as sent.")
    priority: int | None = Field(None, description="vLLM: scheduling priority (needs vLLM's priority scheduling).")


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float
    document: RerankResultDocument | None = Field(None, description="Absent when `return_documents` is false.")


class RerankUsage(BaseModel):
    prompt_tokens: int | None = None
    total_tokens: int | None = None


class RerankResponse(BaseModel):
    """Results sorted by `relevance_score`, best first, cut to `top_n`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "score-9b1c999a0f241fb5", "model": "Qwen3-Reranker-0.6B",
        "results": [{"index": 0, "relevance_score": 0.98, "document": {"text": "AI is artificial intelligence"}}],
        "usage": {"prompt_tokens": 32, "total_tokens": 32},
    }]})

    id: str | None
    model: str | None
    results: list[RerankResult]
    usage: RerankUsage


# ---- models and health -------------------------------------------------------------------------------
class ReplicaState(BaseModel):
    url: str
    healthy: bool
    in_flight: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    max_model_len: int | None = None
    type: str = Field(description="What the model serves: `embedding` or `reranker`.")
    replicas: list[ReplicaState]


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [{
        "id": "Qwen3-Embedding-0.6B", "object": "model", "created": 1795428071, "owned_by": "vllm",
        "root": "Qwen/Qwen3-Embedding-0.6B", "max_model_len": 32768, "type": "embedding",
        "replicas": [{"url": "http://127.0.0.1:8000", "healthy": True, "in_flight": 0}]}]}]})

    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthKind(BaseModel):
    healthy: int = Field(description="Reachable replicas of this kind.")
    replicas: list[dict[str, Any]]


class KeyFileState(BaseModel):
    file: str
    last_good_load: str | None = Field(description="When the key file was last read fine (UTC, ISO 8601).")
    error: str | None = Field(description="Null unless the file is missing or unreadable (the last good keys serve).")


class Health(BaseModel):
    """Gateway and replica state; HTTP 503 with `status: degraded` when a kind has no reachable replica."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ok", "version": "1.0.0",
        "upstreams": {"embedding": {"healthy": 1, "replicas": [{"url": "http://127.0.0.1:8000", "healthy": True}]},
                      "reranker": {"healthy": 1, "replicas": [{"url": "http://127.0.0.1:8001", "healthy": True}]}},
        "keys": {"file": "er_api_keys.json", "last_good_load": "2026-11-26T11:50:36Z", "error": None}}]})

    status: Literal["ok", "degraded"]
    version: str | None = None
    upstreams: dict[str, HealthKind]
    keys: KeyFileState | None = None
    cache: dict[str, Any] | None = Field(None, description="The item cache: enabled, items, bytes, max_bytes, "
                                         "redis (null without REDIS_URL, ok or unavailable).")
    unavailable: list[str] | None = Field(None, description="The model kinds without a reachable replica.")


# ---- errors ---------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to change.")
    type: str
    param: str | None = Field(description="The request field at fault, e.g. `input[0]`, `documents[3]`.")
    code: str | int | None


class Error(BaseModel):
    """Every error, in the OpenAI shape (openapi.py shows a real one for each status)."""

    error: ErrorDetail


# ---- a ValidationError as the client's 400 --------------------------------------------------------------
def _kind(x: Any) -> str:
    """What the client sent, as it reads in a message: a JSON scalar as written, else its kind."""
    if x is None or isinstance(x, (bool, int, float)):
        return orjson.dumps(x).decode()
    if isinstance(x, str):
        return orjson.dumps(x if len(x) <= 40 else x[:40] + "…").decode()
    return {list: "an array", dict: "an object"}.get(type(x), type(x).__name__)


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def request_error(model: type[_Request], e: ValidationError, doc: Any) -> ApiError:
    """The 400 for the first field at fault: `param` is its exact path, the message what it must be."""
    errors = e.errors(include_url=False, include_input=False)
    first = errors[0]
    loc = first["loc"]
    if not loc:  # the body itself is not an object
        return bad_request(f"The request body must be a JSON object; got {_kind(doc)}.", code="invalid_json")
    field = str(loc[0])
    if field == "input" and model is EmbeddingsRequest:
        return _input_error(doc)
    if field == "documents" and model is RerankRequest:
        return _documents_error(doc)
    index = tuple(takewhile(lambda x: isinstance(x, int), loc[1:]))
    param = field + "".join(f"[{i}]" for i in index)
    rule = model.RULES.get(field)
    if first["type"] == "missing":
        return bad_request(f"`{param}` is required" + (f": {rule}." if rule else "."), param=param)
    try:
        got = _kind(_at(doc, (field, *index)))
    except (KeyError, IndexError, TypeError):
        got = None
    what = rule if rule and not index else None
    message = f"`{param}` must be {what}" if what else f"`{param}`: {first['msg']}"
    return bad_request(message + (f"; got {got}." if got else "."), param=param)


def _input_error(doc: dict[str, Any]) -> ApiError:
    """`input` is a union: say which item breaks the shape its first item chose."""
    inp = doc.get("input")
    rule = EmbeddingsRequest.RULES["input"]
    if "input" not in doc:
        return bad_request(f"`input` is required: {rule}.", param="input")
    if not isinstance(inp, list):
        return bad_request(f"`input` must be {rule}; got {_kind(inp)}.", param="input")
    if not inp:
        return bad_request("`input` must not be an empty list: send at least one string.", param="input")
    first = inp[0]
    if isinstance(first, list):
        for i, x in enumerate(inp):
            if not isinstance(x, list) or not x:
                return bad_request(f"`input[{i}]` must be a non-empty list of token ids like `input[0]`; "
                                   f"got {'an empty list' if x == [] else _kind(x)}.", param=f"input[{i}]")
            for j, t in enumerate(x):
                if not isinstance(t, int) or isinstance(t, bool):
                    return bad_request(f"`input[{i}][{j}]` must be an integer token id; got {_kind(t)}.",
                                       param=f"input[{i}][{j}]")
    want, name = ((str, "a string") if isinstance(first, str) else (int, "an integer token id")
                  if isinstance(first, int) and not isinstance(first, bool) else (None, None))
    if want is None:
        return bad_request(f"`input[0]` must be a string; got {_kind(first)}.", param="input[0]")
    for i, x in enumerate(inp):
        if not isinstance(x, want) or isinstance(x, bool):
            return bad_request(f"`input[{i}]` must be {name} like `input[0]` (no mixing); got {_kind(x)}.",
                               param=f"input[{i}]")
    return bad_request(f"`input` must be {rule}.", param="input")


def _documents_error(doc: dict[str, Any]) -> ApiError:
    docs = doc.get("documents")
    rule = RerankRequest.RULES["documents"]
    if "documents" not in doc:
        return bad_request(f"`documents` is required: {rule}.", param="documents")
    if not isinstance(docs, list) or not docs:
        got = "an empty list" if docs == [] else _kind(docs)
        return bad_request(f"`documents` must be {rule}; got {got}.", param="documents")
    for i, d in enumerate(docs):
        if not (isinstance(d, str) or (isinstance(d, dict) and isinstance(d.get("text"), str))):
            got = "an object without a string `text`" if isinstance(d, dict) else _kind(d)
            return bad_request(f"`documents[{i}]` must be a string or an object with a string `text`; got {got}.",
                               param=f"documents[{i}]")
    return bad_request(f"`documents` must be {rule}.", param="documents")

