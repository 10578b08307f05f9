"""The FastAPI application: routes, the API-key and body-size guard, OpenAPI description.

``build_app(engine, settings)`` serves an ``EngineClient`` (xllm.engine.protocol): an
AsyncEngine the caller started (loading may still be under way: ``/health`` answers 503
until it is ready), or the master's ClusterEngine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import xllm
from xllm.api.chat import create_chat_completion
from xllm.api.completions import create_completion
from xllm.api.embeddings import create_embedding
from xllm.api.errors import error_body, install_error_handlers
from xllm.api.metrics import CONTENT_TYPE, ServerMetrics
from xllm.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    VersionResponse,
)
from xllm.api.serving import OpenAIServing
from xllm.api.settings import ServerSettings
from xllm.engine.async_engine import READY
from xllm.engine.protocol import EngineClient
from xllm.structured.grammar import preload_grammar_engine

__all__ = ["build_app"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what} for status, what in (
        (400, "malformed JSON, a wrong type or range, a prompt longer than the context"),
        (401, "missing or wrong API key (when the server has one)"),
        (404, "unknown model"),
        (413, "request body over the server's limit"),
        (503, "overloaded, still loading, or the engine failed"))}


def _generation_responses(model: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    # OpenAPI 3.1 without itemSchema: the event-stream schema describes one event.
    event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"},
        "data": {"anyOf": [
            {"const": "[DONE]", "description": "the last event"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"oneOf": [
                 {"$ref": f"#/components/schemas/{chunk.__name__}"},
                 {"$ref": "#/components/schemas/ErrorResponse"}]},
             "description": f"a {chunk.__name__} (an ErrorResponse if the engine fails "
             "mid-stream)"}]}}}
    return {200: {"model": model, "description": "the completion, or with stream: true "
                  "server-sent events",
                  "content": {"text/event-stream": {"schema": event}}},
            **_ERRORS}


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way a JSON body decodes to a
# string Python cannot encode back to UTF-8 (raw bytes that are not UTF-8 fail the parse).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# An oversize body is read to its end (and dropped) before the 413, up to this much and this
# long (and no longer than a pause in the client's sending): a server that answers and
# closes while the client still sends makes the client's socket reset, and the client never
# sees the answer.
_DRAIN_BYTES = 256 << 20
_DRAIN_SECONDS = 10.0
_DRAIN_PAUSE_SECONDS = 1.0


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The JSON path of the first string in ``value`` holding a lone UTF-16 surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return path or "body"
        inner = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        found = _lone_surrogate(item, inner)
        if found is not None:
            return found
    return None


class _Guard:
    """Pure ASGI middleware: API key on /v1/* (and on a master's POST /cluster/* actions),
    body-size limit (413) before any parsing, and JSON text no model can read: a lone UTF-16
    surrogate (a 400 naming where, for every field alike).

    The body is read here (counting) and replayed to the app; later receive() calls go to
    the server, so handlers still see the client's disconnect.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        guarded = scope["path"].startswith("/v1/") or (
            scope["path"].startswith("/cluster/") and scope["method"] == "POST")
        if self.key is not None and guarded:
            auth = headers.get(b"authorization", b"")
            if not auth.startswith(b"Bearer ") or not hmac.compare_digest(auth[7:], self.key):
                await _send_error(send, 401, "missing or wrong API key: send the header "
                                  "'Authorization: Bearer <key>'", code="invalid_api_key")
                return
        limit = self.settings.max_request_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive, int(length))  # (with 100-continue nothing was sent)
            await _send_error(send, 413, f"the request body has {int(length)} bytes; this "
                              f"server accepts at most {limit}", code="request_too_large")
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, _DRAIN_BYTES)
                await _send_error(send, 413, f"the request body is over {limit} bytes, this "
                                  "server's limit", code="request_too_large")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _SURROGATE_ESCAPE.search(body):
            try:
                where = _lone_surrogate(json.loads(body))
            except ValueError:
                where = None  # not JSON: the app's own parse answers that
            if where is not None:
                await _send_error(send, 400, f"{where}: the text holds a lone UTF-16 surrogate "
                                  "(an unpaired \\ud800-\\udfff escape), which is not "
                                  "Unicode text; send valid UTF-16 pairs or UTF-8",
                                  code="invalid_unicode")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _drain(receive: Receive, most: int) -> None:
    """Reads and drops what is left of a request body: at most ``most`` bytes (capped by
    _DRAIN_BYTES), _DRAIN_SECONDS, and until the client pauses for _DRAIN_PAUSE_SECONDS."""
    left = min(most, _DRAIN_BYTES)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DRAIN_SECONDS
    while left > 0:
        wait = min(_DRAIN_PAUSE_SECONDS, deadline - loop.time())
        if wait <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        left -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def build_app(engine: EngineClient, settings: ServerSettings, *,
              shutdown_engine: bool = True) -> FastAPI:
    """The app serving ``engine``; with ``shutdown_engine`` its lifespan end stops it."""
    if not settings.served_model_names:
        settings.served_model_names = [engine.model_path]
    metrics = ServerMetrics(engine.stats)
    serving = OpenAIServing(engine, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        preload_grammar_engine()  # its first import takes a second: not in a request
        yield
        if shutdown_engine:
            engine.shutdown()

    app = FastAPI(title="xllm", version=xllm.__version__, lifespan=lifespan,
                  summary="OpenAI-compatible LLM server", docs_url=None, redoc_url=None)
    app.state.serving = serving
    install_error_handlers(app)
    app.add_middleware(_Guard, settings=settings)  # type: ignore[arg-type]

    @app.get("/health", response_model=HealthResponse,
             responses={503: {"model": ErrorResponse, "description": "loading or failed"}})
    async def health() -> Response:
        if engine.state != READY:
            message = engine.error or "the model is still loading"
            return JSONResponse(error_body(503, message, code="engine_unavailable"),
                                status_code=503)
        return JSONResponse(HealthResponse().model_dump())

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=xllm.__version__)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
    async def models() -> ModelList:
        max_len = engine.max_model_len if engine.state == READY else None
        return ModelList(data=[ModelCard(id=name, max_model_len=max_len)
                               for name in settings.served_model_names])

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses=_generation_responses(CompletionResponse,
                                               CompletionStreamResponse))
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(serving, body, raw)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk))
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(serving, body, raw)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse,
              responses={code: _ERRORS[code] for code in (400, 401, 404, 413, 503)})
    async def embeddings(body: EmbeddingRequest, raw: Request) -> Response:
        return await create_embedding(serving, body, raw)

    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, settings: ServerSettings) -> dict[str, Any]:
    """FastAPI's schema, plus what the models cannot know: the served model names, the
    server's caps on max_tokens and n, the API key, and error bodies in place of FastAPI's 422."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                         routes=app.routes)
    components = schema.setdefault("components", {})
    for path in schema["paths"].values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for chunk in (CompletionStreamResponse, ChatCompletionChunk):  # named by the SSE events
        body = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas.setdefault(chunk.__name__, body)
    limit = settings.max_tokens_limit
    for model in ("CompletionRequest", "ChatCompletionRequest", "EmbeddingRequest"):
        props = components["schemas"][model]["properties"]
        # Only the served names are accepted (any other is a 404).
        props["model"]["enum"] = list(settings.served_model_names)
        if "n" in props:
            props["n"]["maximum"] = settings.max_n
        for field in ("max_tokens", "max_completion_tokens"):
            if limit is not None and field in props:
                for branch in props[field].get("anyOf", [props[field]]):
                    if branch.get("type") == "integer":
                        branch["maximum"] = limit
    if settings.api_key is not None:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for route, path in schema["paths"].items():
            if route.startswith("/v1/"):
                for op in path.values():
                    op["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema

