"""OpenAI-format errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

``APIError`` is raised anywhere in a handler; ``install_error_handlers`` maps it, request
validation failures (malformed JSON, wrong types or ranges: 400, not FastAPI's 422), HTTP
errors (unknown route 404, wrong method 405) and unexpected exceptions (500) onto that body.
Shared with the cluster master.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_body", "error_response", "install_error_handlers",
           "validation_message"]

logger = logging.getLogger("xllm.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str | None = None,  # noqa: A002
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def bad_request(cls, message: str, param: str | None = None,
                    code: str | None = None) -> APIError:
        return cls(400, message, param=param, code=code)


def error_body(status: int, message: str, type: str | None = None,  # noqa: A002
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.type, err.param, err.code),
                        status_code=err.status, headers=err.headers)


def _loc_param(loc: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; None for the body itself."""
    parts = [p for p in loc if p != "body"]
    # Pydantic names the union member it tried ("str", "list[int]", ...); not a field.
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "constrained-str", "function-after"}


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """A short message and the offending parameter, from pydantic's error list."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    param = _loc_param(first.get("loc", ()))
    if kind == "extra_forbidden":
        return f"unknown or unsupported field {param!r}; this server does not accept it", param
    if kind == "missing":
        return f"{param} is required", param
    if param is None and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path!r}; see /openapi.json"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"),
                            status_code=500)
