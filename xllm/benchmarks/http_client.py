"""A minimal asyncio HTTP/1.1 client for one streamed POST, with no dependency.

The serving benchmark times every server-sent event as it leaves the socket; a small client
of its own keeps library buffering out of the numbers and works against any
OpenAI-compatible server (xllm, vLLM, llama.cpp, SGLang). One connection per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HTTPError", "get_json", "get_text", "post_sse"]


class HTTPError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, str]:
    u = urlsplit(url)
    if u.scheme != "http":
        raise ValueError(f"only http:// base URLs are supported, got {url!r}")
    host, port = u.hostname or "127.0.0.1", u.port or 80
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    return reader, writer, f"{host}:{port}", u.path or "/"


async def _request(url: str, method: str, body: bytes | None,
                   headers: dict[str, str]) -> tuple[int, dict[str, str], asyncio.StreamReader,
                                                     asyncio.StreamWriter]:
    reader, writer, host, path = await _open(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        writer.close()
        raise ConnectionError("the server closed the connection without answering")
    status = int(status_line.split()[1])
    response_headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        response_headers[key.strip().lower()] = value.strip()
    return status, response_headers, reader, writer


async def _body_chunks(reader: asyncio.StreamReader,
                       headers: dict[str, str]) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readline()  # the CRLF after each chunk
            yield data
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await reader.read(min(remaining, 1 << 16))
            if not data:
                return
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(1 << 16):
            yield data


async def get_text(url: str, headers: dict[str, str] | None = None) -> str:
    """The body of a GET (a Prometheus /metrics page, say). HTTPError for a non-200 answer."""
    status, h, reader, writer = await _request(url, "GET", None, headers or {})
    try:
        body = b"".join([c async for c in _body_chunks(reader, h)]).decode()
    finally:
        writer.close()
    if status != 200:
        raise HTTPError(status, body)
    return body


async def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    return json.loads(await get_text(url, headers))


async def post_sse(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None,
                   on_accept: Callable[[float], None] | None = None,
                   ) -> AsyncIterator[tuple[float, str]]:
    """(perf_counter time of arrival, data) for each server-sent event of a streamed POST.
    HTTPError for a non-200 answer. ``on_accept(time)`` is called once the server has
    answered 200 (it has taken the request), before any event."""
    hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream", **(headers or {})}
    status, h, reader, writer = await _request(url, "POST", json.dumps(payload).encode(), hdrs)
    try:
        if status == 200 and on_accept is not None:
            on_accept(time.perf_counter())
        if status != 200:
            body = b"".join([c async for c in _body_chunks(reader, h)]).decode(errors="replace")
            raise HTTPError(status, body)
        buffer = b""
        async for chunk in _body_chunks(reader, h):
            now = time.perf_counter()
            buffer += chunk.replace(b"\r\n", b"\n")  # some servers end lines with CRLF
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.splitlines():
                    if line.startswith(b"data:"):
                        yield now, line[5:].strip().decode()
    finally:
        writer.close()
