"""ASGI middleware that answers before any route runs: the bearer-token check and the request body's size cap.

Both are plain ASGI (not Starlette's ``BaseHTTPMiddleware``), so a route still sees the client's disconnect on its
``receive`` channel (see :meth:`dscoder.serve.generation.Generation.wait`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

from dscoder.serve.errors import error_body

# paths that need no bearer token (the playground page asks for the key itself; the routes it calls need it)
OPEN_PATHS = frozenset({"/health", "/"})


# Ollama's API answers errors as {"error": "message"} (see dscoder.serve.ollama): its clients read a string there
OLLAMA_PATHS = "/api/"


async def _send_error(send, status: int, body: dict, scope=None) -> None:
    if scope is not None and scope.get("path", "").startswith(OLLAMA_PATHS):
        body = {"error": body["error"]["message"]}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BearerAuth:
    """``Authorization: Bearer <api_key>`` on every path but :data:`OPEN_PATHS`, else 401 (before the body is read)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode("latin-1"),
                                                                        self.api_key.encode()):
                await _send_error(send, 401, error_body("missing or invalid API key (send 'Authorization: Bearer "
                                                        "<key>')", "authentication_error", code="invalid_api_key"),
                                  scope)
                return
        await self.app(scope, receive, send)


# A refused body is still read (and dropped) up to this many bytes before the 413 goes out: a client that sends
# ``Connection: close`` (urllib does) would otherwise see the connection reset under its upload instead of the answer.
DRAIN_BYTES = 256 << 20


class BodyLimit:
    """Refuse a request body over ``limit()`` bytes with 413, before it is parsed: when ``Content-Length`` says so,
    else as soon as the bytes received pass it (chunked uploads). The body is read here, at most ``limit()`` bytes
    kept, and handed to the app in one message; later ``receive`` calls (the disconnect) pass through."""

    def __init__(self, app, limit: Callable[[], int], explain: Callable[[int], str]):
        self.app, self.limit, self.explain = app, limit, explain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(send, 400, error_body("Content-Length is not a number"), scope)
                return
            if size > limit:
                await _drain(receive, size > 0)
                await self._refuse(scope, send, f"has {size} bytes", limit)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _drain(receive, message.get("more_body", False))
                await self._refuse(scope, send, "is longer", limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)

    async def _refuse(self, scope, send, what: str, limit: int) -> None:
        await _send_error(send, 413, error_body(f"the request body {what}; this server accepts at most {limit} bytes "
                                                f"({self.explain(limit)})", code="request_too_large"), scope)


async def _drain(receive, more: bool) -> None:
    left = DRAIN_BYTES
    while more and left > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        left -= len(message.get("body", b""))
        more = message.get("more_body", False)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()
    return replayed
