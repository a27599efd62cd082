"""HTTP transport of the server: the ASGI gatekeeper, disconnect detection and server-sent events.

* :class:`GatekeeperMiddleware` checks the API key (401) and caps the request body (413) before FastAPI
  parses anything, then replays the buffered body to the app, so later ``receive()`` calls reach the
  server directly and can report a client disconnect.
* :func:`until_disconnect` awaits work (queueing, prefill, a whole plain answer) and cancels it when the
  client hangs up first; :class:`EventStreamResponse` does the same for a stream and always calls its
  ``on_close`` (which closes the engine iterators) however the stream ends.
* :func:`sse` formats one event; :func:`error_response` / :func:`send_error` answer an
  :class:`~lmstack.serve.protocol.APIError` in OpenAI's JSON shape (from a route or from raw ASGI).

Both disconnect paths listen for ``http.disconnect`` themselves rather than relying on how a particular
ASGI server reports it (Starlette's StreamingResponse notices a disconnect only in some of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from lmstack.serve.protocol import APIError
from lmstack.serve.state import ServerState

log = logging.getLogger("lmstack.serve")
T = TypeVar("T")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ----------------------------------------------------------------------------- gatekeeper middleware

class GatekeeperMiddleware:
    """Pure ASGI middleware: API-key check for /v1/*, then the body-size cap for every request with a body.

    It buffers the body (at most ``max_request_bytes``) and replays it to the app, so later
    ``receive()`` calls reach the server directly and can report a client disconnect.
    """

    DRAIN_LIMIT = 64 << 20  # read (and drop) at most this much of an oversized body before answering 413

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.state.api_keys and scope["path"].startswith("/v1"):
            err = self._check_key(headers.get("authorization"))
            if err is not None:
                return await send_error(send, err)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.state.limits.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit()):
            return await send_error(send, APIError(400, f"invalid Content-Length header {declared!r}",
                                                    code="invalid_request"))
        too_large = APIError(413, f"Request body too large: the limit is {limit} bytes", code="request_too_large")
        if declared is not None and int(declared) > max(limit, self.DRAIN_LIMIT):
            return await send_error(send, too_large, close=True)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total <= limit:
                chunks.append(body)
            elif total > self.DRAIN_LIMIT:
                return await send_error(send, too_large, close=True)
            if not message.get("more_body", False):
                break
        if total > limit:
            return await send_error(send, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _check_key(self, authorization: str | None) -> APIError | None:
        if not authorization:
            return APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(key.encode(), k.encode())
                                                for k in self.state.api_keys)
        if not ok:
            shown = key[:3] + "***" + key[-2:] if len(key) > 8 else "***"
            return APIError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        return None


async def send_error(send: Send, err: APIError, close: bool = False) -> None:
    """Answer ``err`` from raw ASGI (before, or instead of, the app)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ----------------------------------------------------------------------------- disconnects and streams

class ClientGone(Exception):
    """The client closed the connection; nobody is left to answer."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (closing any engine iterators it holds)."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse(Response):
    """Server-sent events whose producer is cancelled, and then closed, as soon as the client leaves.

    Starlette's StreamingResponse only notices a disconnect when the ASGI server reports it in one
    particular way; this one always listens, and always calls ``on_close`` (which closes the
    engine iterators) however the stream ends.
    """

    media_type = "text/event-stream"

    MAX_WRITE = 1 << 16  # bytes of events gathered into one write while more are ready

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]],
                 on_disconnect: Callable[[], None] | None = None, more_ready: Callable[[], bool] | None = None):
        # no Response.__init__: it would render an empty body and declare Content-Length: 0
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_close, self.on_disconnect = events, on_close, on_disconnect
        self.more_ready = more_ready or (lambda: False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def produce():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pending: list[str] = []
            size = 0
            async for event in self.events:
                pending.append(event)
                size += len(event)
                # when the generation has fallen behind, several events go out in one write: each write
                # costs a system call and, under load, a wait for the GIL
                if not self.more_ready() or size >= self.MAX_WRITE:
                    await send({"type": "http.response.body", "body": "".join(pending).encode(), "more_body": True})
                    pending, size = [], 0
            body = "".join(pending).encode()
            await send({"type": "http.response.body", "body": body, "more_body": False})

        producer = asyncio.ensure_future(produce())
        listener = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
            if listener.done() and not producer.done() and self.on_disconnect is not None:
                self.on_disconnect()
        finally:
            for task in (producer, listener):
                task.cancel()
            await asyncio.gather(producer, listener, return_exceptions=True)
            if producer.done() and not producer.cancelled() and producer.exception() is not None:
                if not isinstance(producer.exception(), OSError):  # OSError: the client went away mid-send
                    log.error("streamed response failed", exc_info=producer.exception())
            with contextlib.suppress(BaseException):
                await self.events.aclose()  # type: ignore[attr-defined]
            await self.on_close()


def sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
