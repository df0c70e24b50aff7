"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

Every failure a client can see is an ApiError; the message says what to change.
"""

from __future__ import annotations

import orjson


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


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


def not_found(message: str, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, type="invalid_request_error", code=code, param=param)


def unauthorized(message: str, code: str = "invalid_api_key") -> ApiError:
    return ApiError(
        401, message, type="authentication_error", code=code,
        headers=[(b"www-authenticate", b'Bearer realm="embedding-reranker-gateway"')],
    )


def forbidden(message: str, code: str = "model_not_allowed") -> ApiError:
    return ApiError(403, message, type="permission_error", code=code)


def too_many(message: str, code: str, retry_after: int) -> ApiError:
    return ApiError(
        429, message, type="rate_limit_error", code=code,
        headers=[(b"retry-after", str(max(1, retry_after)).encode())],
    )


def bad_gateway(message: str) -> ApiError:
    return ApiError(502, message, type="upstream_error", code="bad_upstream_response")


def unavailable(message: str, code: str = "upstream_unavailable", retry_after: int | None = None) -> ApiError:
    headers = [(b"retry-after", str(retry_after).encode())] if retry_after else None
    return ApiError(503, message, type="service_unavailable_error", code=code, headers=headers)


def gateway_timeout(message: str) -> ApiError:
    return ApiError(504, message, type="timeout_error", code="upstream_timeout")
