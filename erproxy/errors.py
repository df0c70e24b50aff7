"""Every error a client can see, in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

Each is an ApiError whose message says what to change. The helpers take the message first and
everything else by keyword, in one order: code, param, then what the status needs (retry_after,
allow). The end of the file turns an upstream's own error answer into the error the client gets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .upstreams import UpstreamResponse


class ApiError(Exception):
    """An error answered to the client with `status` and an OpenAI-shaped JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str | int | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | int | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


# ---- by status -------------------------------------------------------------------------------------
def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


def unauthorized(message: str, *, code: str = "invalid_api_key") -> ApiError:
    return ApiError(
        401, message, type="authentication_error", code=code,
        headers=[(b"www-authenticate", b'Bearer realm="embedding-reranker-gateway"')],
    )


def forbidden(message: str, *, code: str = "model_not_allowed") -> ApiError:
    return ApiError(403, message, type="permission_error", code=code)


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, type="invalid_request_error", code=code, param=param)


def method_not_allowed(message: str, *, code: str = "method_not_allowed", allow: str) -> ApiError:
    return ApiError(405, message, type="invalid_request_error", code=code, headers=[(b"allow", allow.encode())])


# 408 and 413 end the connection (RFC 9110 15.5.9): the rest of an unread body is not worth reading,
# and a client that stalled must not keep the socket. app.Gateway closes it after a short, bounded read.
CLOSE = (b"connection", b"close")


def request_timeout(message: str, *, code: str = "request_timeout") -> ApiError:
    return ApiError(408, message, type="invalid_request_error", code=code, headers=[CLOSE])


def too_large(message: str, *, code: str = "request_too_large") -> ApiError:
    return ApiError(413, message, type="invalid_request_error", code=code, headers=[CLOSE])


def too_many(message: str, *, code: str, retry_after: int) -> ApiError:
    return ApiError(
        429, message, type="rate_limit_error", code=code,
        headers=[(b"retry-after", str(max(1, retry_after)).encode())],
    )


def internal_error(message: str, *, code: str = "internal_error") -> ApiError:
    return ApiError(500, message, type="server_error", code=code)


def bad_gateway(message: str, *, code: str = "bad_upstream_response") -> ApiError:
    return ApiError(502, message, type="upstream_error", code=code)


def unavailable(message: str, *, code: str = "upstream_unavailable", retry_after: int | None = None) -> ApiError:
    headers = [(b"retry-after", str(retry_after).encode())] if retry_after else None
    return ApiError(503, message, type="service_unavailable_error", code=code, headers=headers)


def gateway_timeout(message: str, *, code: str = "upstream_timeout") -> ApiError:
    return ApiError(504, message, type="timeout_error", code=code)


# ---- the gateway's own refusals ----------------------------------------------------------------------
def no_route(path: str) -> ApiError:
    return not_found(f"No route {path}. Routes: /v1/embeddings, /v1/rerank, /v1/models, /health.")


def wrong_method(method: str, path: str, allowed: str) -> ApiError:
    return method_not_allowed(f"{method} is not allowed on {path}; use {allowed}.", allow=allowed)


def body_too_large(limit: int) -> ApiError:
    return too_large(f"The request body is larger than MAX_BODY_BYTES={limit} bytes; split the input "
                     "into smaller batches.")


def body_too_slow(seconds: float) -> ApiError:
    return request_timeout(f"The request body did not arrive within BODY_TIMEOUT={seconds:g} s.")


def rate_limited(limit: object, retry_after: int) -> ApiError:
    return too_many(
        f"Rate limit of {limit} exceeded for this API key; retry after {retry_after} s "
        "or ask the operator for a higher limit.",
        code="rate_limit_exceeded", retry_after=retry_after,
    )


def concurrency_exceeded(limit: int) -> ApiError:
    return too_many(
        f"The gateway is already serving its maximum of {limit} concurrent requests; retry shortly.",
        code="concurrency_limit_exceeded", retry_after=1,
    )


def limits_unavailable() -> ApiError:
    return unavailable("The gateway cannot reach Redis, which holds the shared rate limits; retry shortly.",
                       code="limits_unavailable", retry_after=1)


def token_ids_not_accepted() -> ApiError:
    return bad_request(
        "`input` holds token ids, which this gateway refuses: vLLM embeds them as the served model's own "
        "tokens, so ids from another tokenizer (OpenAI's tiktoken) give meaningless vectors. Send text instead; "
        "with LangChain's OpenAIEmbeddings set `check_embedding_ctx_length=False`. An operator whose clients "
        "tokenize with the served model's own tokenizer can set ACCEPT_TOKEN_IDS=true.",
        code="token_ids_not_accepted", param="input")


def shutting_down() -> ApiError:
    return ApiError(503, "The gateway is shutting down and SHUTDOWN_GRACE ran out before this request was "
                    "answered; send it again (to another instance, or once the gateway is back).",
                    type="service_unavailable_error", code="shutting_down",
                    headers=[(b"retry-after", b"1"), CLOSE])


def unexpected() -> ApiError:
    return internal_error("Internal gateway error; see the gateway log.")


# ---- an upstream's own error answer ----------------------------------------------------------------
def upstream_error(resp: UpstreamResponse, kind: str) -> ApiError:
    """Translate a non-200 upstream answer into the error the client gets."""
    message, etype, param = _error_fields(resp.body)
    if resp.status in (401, 403, 407, 429):
        # vLLM's own auth or limits (e.g. started with --api-key): the client's gateway key is fine
        return bad_gateway(f"The {kind} upstream {resp.replica.url} refused the gateway with HTTP {resp.status}"
                           f"{': ' + message if message else ''}. Check the vLLM server's --api-key and limits.")
    if resp.status >= 500:
        detail = f": {message}" if message else ""
        return bad_gateway(f"The {kind} upstream {resp.replica.url} failed with HTTP {resp.status}{detail}")
    if resp.status < 400:  # a redirect, 204, 304...: not an answer, and never a status to pass on as one
        return bad_gateway(f"The {kind} upstream {resp.replica.url} answered HTTP {resp.status} instead of an "
                           "answer. Check that EMBEDDING_UPSTREAMS / RERANKER_UPSTREAMS point at vLLM itself.")
    if message is None:
        message = f"The {kind} upstream answered HTTP {resp.status}."
    if resp.status == 404 and message == "Not Found":
        message = (f"The {kind} upstream {resp.replica.url} does not offer this endpoint for the requested model "
                   "(upstream said: Not Found). Check that the model is served for this task.")
    return ApiError(resp.status, message, type=etype or "invalid_request_error", code=resp.status, param=param)


def _error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or None, None, None)
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
            return (str(msg) if msg is not None else None, _openai_type(err.get("type")), err.get("param"))
        if isinstance(err, str):
            return (err, None, None)
        detail = doc.get("detail") if "detail" in doc else doc.get("message")
        if detail is not None:
            return (detail if isinstance(detail, str) else orjson.dumps(detail).decode(), None, None)
    return (None, None, None)


def _openai_type(vllm_type: Any) -> str | None:
    """vLLM names error types after exceptions (BadRequestError); clients expect OpenAI's names."""
    mapping = {"BadRequestError": "invalid_request_error", "NotFoundError": "invalid_request_error"}
    if isinstance(vllm_type, str):
        return mapping.get(vllm_type, vllm_type)
    return None
