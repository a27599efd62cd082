"""The OpenAI-compatible HTTP server and the web chat page behind `lmstack serve`.

    lmstack serve --model runs/speedrun/model --port 8000      # then open http://127.0.0.1:8000/

    from lmstack.serve.app import create_app, serve_in_thread
    app = create_app("runs/speedrun/model", api_keys=["sk-local"])
    with serve_in_thread(app) as url:                           # uvicorn on a free loopback port
        openai.OpenAI(base_url=url + "/v1", api_key="sk-local").models.list()

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/embeddings``, ``GET /health`` (engine statistics, no key needed), ``GET /`` (the chat page
from static/; no key needed to load it, the page asks for one when the server wants it).
Schemas and the error mapping are documented in protocol.py.

How a request flows: the body is capped (413) and the key checked (401) by a plain ASGI middleware
before FastAPI parses anything; FastAPI validates it against protocol.py (400 on failure); the
handler turns it into prompt token ids and :class:`SamplingParams` and hands it to the
:class:`AsyncEngine`, whose bounded waiting queue answers 429 when full.

Cancellation is the part that needs care. Every generation is driven by a :class:`Generation`
(one engine iterator per prompt, each pumped by its own task into one queue). The iterators are
closed, which makes the engine abort the request and free its KV memory, whenever the HTTP
exchange ends early: the client disconnects while the request is queued, prefilling or streaming
(a listener task watches for ``http.disconnect`` for both plain and streamed responses, so it
does not depend on the ASGI server's flavour of disconnect reporting); the per-request timeout
fires; or the handler fails. A streamed response is started only after every prompt has produced
its first output, so a full queue is still a proper 429 rather than an error inside a 200 stream.

Embeddings are mean-pooled final hidden states (lmstack.engine.embed): of a decoder, or of an encoder
checkpoint (BERT, T5), which is then served for /v1/embeddings only (generation routes answer 404,
as OpenAI does for a model that does not support an endpoint).

Caveats: one model per server; embeddings run in a worker thread next to the engine's stepping
thread (same weights, read-only), one batch at a time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.serve.protocol import (APIError, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatDelta, ChatMessageOut, ChoiceLogprobs, Completion,
                                    CompletionChoice, CompletionLogprobs, CompletionRequest, EmbeddingData,
                                    EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, ModelCard, ModelList,
                                    TokenLogprob, TopLogprob, Usage, new_id, now)

log = logging.getLogger("lmstack.serve")
STATIC_DIR = Path(__file__).parent / "static"
T = TypeVar("T")

# content-security policy for the chat page: only our own script and styles, no inline code, so even
# a rendering bug could not execute model output
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


@dataclass
class ServerLimits:
    """What one request may ask for. ``None`` for a token limit means "the model's context length"."""

    max_request_bytes: int = 1 << 20  # request body size (413 above)
    max_prompt_tokens: int | None = None  # prompt length in tokens (400 above)
    max_tokens_limit: int = 4096  # max_tokens a request may ask for (400 above)
    max_waiting: int = 256  # requests waiting for a batch slot (429 above)
    request_timeout_s: float = 600.0  # whole request, queueing included (503 / error event after)
    max_embedding_inputs: int = 256  # inputs in one /v1/embeddings call


@dataclass
class ServerState:
    engine: Any  # lmstack.engine.engine.Engine; None for an encoder served for embeddings only
    model: Any
    tokenizer: Any
    model_name: str
    max_model_len: int
    limits: ServerLimits
    api_keys: tuple[str, ...]
    embed_frame: tuple[list[int], list[int]]  # ids the tokenizer wraps around one text ([CLS] ... [SEP] for BERT)
    async_engine: Any = None  # created at startup inside the event loop
    owns_async_engine: bool = True
    shutting_down: bool = False
    embed_lock: asyncio.Semaphore | None = None
    embed_waiting: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "disconnects": 0, "timeouts": 0,
                                                               "queue_full": 0})


# ----------------------------------------------------------------------------- app factory

def create_app(engine_or_checkpoint: Any, *, api_keys: list[str] | tuple[str, ...] | None = None,
               max_request_bytes: int = 1 << 20, max_prompt_tokens: int | None = None,
               max_tokens_limit: int = 4096, max_waiting: int = 256, request_timeout_s: float = 600.0,
               model_name: str | None = None, device: str = "auto", **engine_kwargs: Any) -> FastAPI:
    """The FastAPI app serving one model.

    ``engine_or_checkpoint``: a checkpoint / run directory, an ``Engine``, or an ``AsyncEngine``
    (then ``max_waiting`` is the engine's own). ``engine_kwargs`` (max_num_seqs, kv_cache_tokens, ...)
    go to ``Engine.from_checkpoint`` when a path is given. A checkpoint of an encoder family (BERT,
    T5) is served for /v1/embeddings only. ``api_keys``: accepted Bearer keys; empty or None = no
    authentication.
    """
    from lmstack.engine.async_engine import AsyncEngine
    from lmstack.engine.engine import Engine

    given_async, engine = None, None
    if isinstance(engine_or_checkpoint, AsyncEngine):
        given_async = engine_or_checkpoint
        engine = given_async.engine
        model, tokenizer = engine.model, engine.tokenizer
    elif isinstance(engine_or_checkpoint, Engine):
        engine = engine_or_checkpoint
        model, tokenizer = engine.model, engine.tokenizer
    elif isinstance(engine_or_checkpoint, (str, os.PathLike)):
        engine, model, tokenizer = _load(str(engine_or_checkpoint), device, engine_kwargs)
        model_name = model_name or default_model_name(engine_or_checkpoint)
    else:
        raise TypeError(f"create_app needs a checkpoint path, an Engine or an AsyncEngine, "
                        f"not {type(engine_or_checkpoint).__name__}")
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (no tokenizer.json in the checkpoint); the server needs one "
                         "to read text: save the checkpoint with its tokenizer")
    for name, value in (("max_request_bytes", max_request_bytes), ("max_tokens_limit", max_tokens_limit),
                        ("max_waiting", max_waiting)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if request_timeout_s <= 0:
        raise ValueError(f"request_timeout_s={request_timeout_s} must be > 0")
    max_model_len = int(getattr(engine, "max_model_len", None) or model.config.block_size)
    if max_prompt_tokens is not None and not 1 <= max_prompt_tokens <= max_model_len:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be in [1, {max_model_len}] "
                         "(the model's context length)")
    limits = ServerLimits(max_request_bytes=max_request_bytes, max_prompt_tokens=max_prompt_tokens,
                          max_tokens_limit=max_tokens_limit, max_waiting=max_waiting,
                          request_timeout_s=request_timeout_s)
    from lmstack.engine.embed import special_frame

    state = ServerState(engine=engine, model=model, tokenizer=tokenizer, model_name=model_name or "lmstack",
                        max_model_len=max_model_len, limits=limits,
                        api_keys=tuple(k for k in (api_keys or ()) if k), embed_frame=special_frame(tokenizer),
                        async_engine=given_async, owns_async_engine=given_async is None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.async_engine is None and state.engine is not None:
            state.async_engine = AsyncEngine(state.engine, max_waiting=limits.max_waiting)
        state.embed_lock = asyncio.Semaphore(1)
        state.shutting_down = False
        try:
            yield
        finally:
            state.shutting_down = True
            if state.owns_async_engine and state.async_engine is not None:
                state.async_engine.shutdown()
                state.async_engine = None

    # no /docs or /redoc: FastAPI's versions load their scripts from a CDN; /openapi.json describes the API
    app = FastAPI(title="lmstack", description="OpenAI-compatible API for an lmstack checkpoint",
                  version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lmstack = state
    _install_error_handlers(app)
    _add_routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(GatekeeperMiddleware, state=state)
    return app


def _load(path: str, device: str, engine_kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(engine or None, model, tokenizer): an Engine for decoder families, the bare model for encoders."""
    from lmstack.engine.engine import Engine, resolve_device
    from lmstack.models import DECODER_FAMILIES
    from lmstack.checkpoint import load_checkpoint, read_config

    family = read_config(path)["model"].get("family", "gpt")
    if family in DECODER_FAMILIES:
        engine = Engine.from_checkpoint(path, device=device, **engine_kwargs)
        return engine, engine.model, engine.tokenizer
    ckpt = load_checkpoint(path, device=resolve_device(device))
    log.info("model family %r is not a decoder: serving /v1/embeddings only", family)
    return None, ckpt.model, ckpt.tokenizer


def default_model_name(path: str | os.PathLike) -> str:
    """A readable model id for a checkpoint: the directory name, or RUN's name for RUN/model."""
    p = Path(path).resolve()
    if p.name in ("model", "final") or p.name.startswith("step_"):
        parent = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        return f"{parent.name}/{p.name}"
    return p.name


# ----------------------------------------------------------------------------- errors

def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            return error_response(APIError(404, f"Unknown request URL: {request.method} {request.url.path}. "
                                                "GET /openapi.json lists the routes this server has.",
                                           type="not_found_error", code="unknown_url"))
        if err.status_code == 405:
            return error_response(APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed", headers=dict(err.headers or {})))
        return error_response(APIError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):  # a bug, never the client's fault
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(err).__name__}); see the server log",
                                       type="server_error", code="internal_error"))


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic/FastAPI validation errors -> one OpenAI-style 400 naming the first offending field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: "
                             f"{first.get('ctx', {}).get('error', first.get('msg'))}. Send valid JSON "
                             "with Content-Type: application/json.", code="invalid_json")
    if first.get("type") in ("model_attributes_type", "dict_type", "model_type") and not loc:
        return APIError(400, "The request body must be a JSON object; send it with Content-Type: application/json.",
                        code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "The request body is missing; send a JSON object.", code="invalid_json")
    param = _dotted(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "Unrecognized request argument supplied"
    elif first.get("type") == "missing":
        msg = "Missing required parameter"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{msg}{more}", param=param or None,
                    code="missing_required_parameter" if first.get("type") == "missing" else "invalid_value")


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        # union branches show up as type names ("str", "list[int]"); they are not part of the path
        if part in ("str", "int", "float", "bool") or "[" in part or part.startswith("function-"):
            continue
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


# ----------------------------------------------------------------------------- gatekeeper middleware

class GatekeeperMiddleware:
    """Pure ASGI middleware: API-key check for /v1/*, then the body-size cap for every request with a body.

    It buffers the body (at most ``max_request_bytes``) and replays it to the app, so later
    ``receive()`` calls reach the server directly and can report a client disconnect.
    """

    DRAIN_LIMIT = 64 << 20  # read (and drop) at most this much of an oversized body before answering 413

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.state.api_keys and scope["path"].startswith("/v1"):
            err = self._check_key(headers.get("authorization"))
            if err is not None:
                return await _send_error(send, err)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.state.limits.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit()):
            return await _send_error(send, APIError(400, f"invalid Content-Length header {declared!r}",
                                                    code="invalid_request"))
        too_large = APIError(413, f"Request body too large: the limit is {limit} bytes", code="request_too_large")
        if declared is not None and int(declared) > max(limit, self.DRAIN_LIMIT):
            return await _send_error(send, too_large, close=True)
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
                return await _send_error(send, too_large, close=True)
            if not message.get("more_body", False):
                break
        if total > limit:
            return await _send_error(send, too_large)
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


async def _send_error(send, err: APIError, close: bool = False) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ----------------------------------------------------------------------------- disconnect handling

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


async def _wait_for_disconnect(receive) -> None:
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

    async def __call__(self, scope, receive, send) -> None:
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


# ----------------------------------------------------------------------------- generation driver

_END = object()


class Generation:
    """Runs one engine request per prompt concurrently and merges their outputs into one stream.

    ``await start()`` returns once every prompt has produced its first output (so errors such as a
    full queue surface before a response is begun); ``events()`` then yields ``(prompt_index,
    RequestOutput)`` in arrival order; ``aclose()`` cancels whatever still runs, which makes the
    engine abort those requests and free their memory. Always used with ``try/finally: aclose()``.
    """

    def __init__(self, state: ServerState, prompts: list[list[int]], params: Any, request_id: str, deadline: float):
        self.state, self.prompts, self.params = state, prompts, params
        self.request_id, self.deadline = request_id, deadline
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.buffer: list[tuple[int, Any]] = []
        self.open = len(prompts)

    async def start(self) -> None:
        ids = [self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}" for i in range(len(self.prompts))]
        self.tasks = [asyncio.ensure_future(self._pump(i, p, rid)) for i, (p, rid) in enumerate(zip(self.prompts, ids))]
        started: set[int] = set()
        while len(started) < len(self.prompts):
            index, item = await self._next()
            started.add(index)
            if item is not _END:
                self.buffer.append((index, item))

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        while self.buffer:
            yield self.buffer.pop(0)
        while self.open:
            index, item = await self._next()
            if item is not _END:
                yield index, item

    def has_ready(self) -> bool:
        """Whether the next output is already here (events() would not wait)."""
        return bool(self.buffer) or not self.queue.empty()

    async def _next(self) -> tuple[int, Any]:
        remaining = self.deadline - time.monotonic()
        try:
            if not self.queue.empty() and remaining > 0:  # the common case while streaming: no timer needed
                index, item, error = self.queue.get_nowait()
            else:
                index, item, error = await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            self.state.counters["timeouts"] += 1
            raise APIError(503, f"The request did not finish within the server's limit of "
                                f"{self.state.limits.request_timeout_s:g} s; try fewer tokens or try again later.",
                           type="server_error", code="timeout") from None
        if error is not None:
            raise error
        if item is _END:
            self.open -= 1
        return index, item

    async def _pump(self, index: int, prompt_ids: list[int], request_id: str) -> None:
        from lmstack.engine.async_engine import QueueFull

        error: BaseException | None = None
        outputs = None
        try:
            outputs = self.state.async_engine.generate(prompt_ids, self.params, request_id=request_id)
            async for out in outputs:
                self.queue.put_nowait((index, out, None))
        except QueueFull:
            self.state.counters["queue_full"] += 1
            error = APIError(429, "The server is at capacity: its request queue is full. Retry shortly.",
                             type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except ValueError as e:  # the engine refused the request (e.g. too long for its KV budget)
            error = APIError(400, str(e), code="invalid_request")
        except RuntimeError as e:  # the engine is shut down / its thread died
            error = APIError(503, f"The engine is not available: {e}", type="server_error",
                             code="engine_unavailable")
        except Exception as e:  # a bug: report it rather than leave the request waiting for its timeout
            log.exception("generation %s failed", request_id)
            error = APIError(500, f"internal server error ({type(e).__name__}); see the server log",
                             type="server_error", code="internal_error")
        finally:
            if outputs is not None:
                await outputs.aclose()  # aborts the request in the engine if it is still running
        self.queue.put_nowait((index, None, error) if error else (index, _END, None))

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# ----------------------------------------------------------------------------- request preparation

def _check_ready(state: ServerState, generate: bool = True) -> None:
    if state.shutting_down:
        raise APIError(503, "The server is shutting down; retry on another instance.", type="server_error",
                       code="shutting_down")
    if generate and state.engine is None:  # OpenAI answers 404 when a model does not do an endpoint
        raise APIError(404, f"The model '{state.model_name}' is an encoder: it serves /v1/embeddings only, "
                            "not text generation.", param="model", code="model_not_supported")
    if generate and state.async_engine is None:
        raise APIError(503, "The engine is not running.", type="server_error", code="engine_unavailable")


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{state.model_name}' "
                            "(see GET /v1/models).", type="not_found_error", param="model", code="model_not_found")


def _check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"'{param}' holds token id {bad[0]}, outside this model's vocabulary [0, {vocab})",
                       param=param, code="invalid_value")


def _check_lengths(state: ServerState, prompt_len: int, max_tokens: int | None, param: str) -> int:
    """Validate prompt and generation lengths; returns the max_tokens to use."""
    lim = state.limits
    max_prompt = lim.max_prompt_tokens or state.max_model_len
    if prompt_len > max_prompt:
        raise APIError(400, f"The prompt is {prompt_len} tokens long; this server accepts at most {max_prompt}.",
                       param=param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > lim.max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {lim.max_tokens_limit}.",
                       param="max_tokens", code="invalid_value")
    room = state.max_model_len - prompt_len
    if max_tokens is None:
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens and the "
                                f"prompt already uses {prompt_len}; shorten it.", param=param,
                           code="context_length_exceeded")
        return min(room, lim.max_tokens_limit)
    if max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                            "for the completion). Shorten the prompt or lower max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, *,
                     logprobs: int | None, prompt_logprobs: int | None = None) -> Any:
    from lmstack.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_k=max(req.top_k, 0), top_p=1.0 if req.top_p is None else req.top_p, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, stop=req.stop_list(),
        ignore_eos=req.ignore_eos, seed=req.seed, n=req.n, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _deadline(state: ServerState) -> float:
    return time.monotonic() + state.limits.request_timeout_s


# ----------------------------------------------------------------------------- logprob formatting

def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in ids]


def _chat_logprobs(tokenizer: Any, entries: list[dict]) -> ChoiceLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.decode([token_id]), logprob=logprob,
                          bytes=list(tokenizer.decode_bytes([token_id])))

    return ChoiceLogprobs(content=[
        TokenLogprob(**top(e["token_id"], e["logprob"]).model_dump(),
                     top_logprobs=[top(t["token_id"], t["logprob"]) for t in e.get("top", [])])
        for e in entries])


def _completion_logprobs(tokenizer: Any, entries: list[dict | None], token_ids: list[int],
                         start_offset: int) -> CompletionLogprobs:
    """Legacy format; ``entries[i]`` is None where no logprob exists (the first prompt token)."""
    tokens = _token_strings(tokenizer, token_ids)
    offsets, offset = [], start_offset
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e["logprob"] for e in entries],
        top_logprobs=[None if e is None else {tokenizer.decode([t["token_id"]]): t["logprob"] for t in e.get("top", [])}
                      for e in entries],
        text_offset=offsets)


# ----------------------------------------------------------------------------- routes

def _add_routes(app: FastAPI, state: ServerState) -> None:
    tokenizer = state.tokenizer

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                                "X-Content-Type-Options": "nosniff",
                                                                "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        # the AsyncEngine's snapshot: the Engine itself is only touched by its stepping thread
        stats = state.async_engine.stats() if state.async_engine is not None else \
            (state.engine.stats() if state.engine is not None else None)
        status = "shutting_down" if state.shutting_down else "ok"
        return JSONResponse({"status": status, "model": state.model_name, "engine": stats,
                             "counters": dict(state.counters),
                             "auth": bool(state.api_keys)}, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=state.model_name, max_model_len=state.max_model_len)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str):
        _check_model(state, model_id)
        return ModelCard(id=state.model_name, max_model_len=state.max_model_len)

    # ---------------------------------------------------------------- /v1/completions
    @app.post("/v1/completions", response_model=Completion)
    async def completions(req: CompletionRequest, request: Request):
        _check_ready(state)
        _check_model(state, req.model)
        req.check_supported()
        state.counters["requests"] += 1
        # an empty text prompt starts a fresh document, as OpenAI's default prompt "<|endoftext|>" does
        prompts = [(tokenizer.encode(p) or [tokenizer.eot_id]) if isinstance(p, str) else p for p in req.prompts()]
        for p in prompts:
            _check_token_ids(state, p, "prompt")
        max_tokens = min(_check_lengths(state, len(p), req.max_tokens, "prompt") for p in prompts)
        params = _sampling_params(req, max_tokens, logprobs=req.logprobs,
                                  prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else
                                  (0 if req.max_tokens == 0 else None))
        gen = Generation(state, prompts, params, new_id("cmpl"), _deadline(state))
        return await _respond(request, gen, req.stream,
                              lambda: _completion_stream(state, req, gen, prompts),
                              lambda: _completion_result(state, req, gen, prompts))

    # ---------------------------------------------------------------- /v1/chat/completions
    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _check_ready(state)
        _check_model(state, req.model)
        req.check_supported()
        state.counters["requests"] += 1
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt_ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, f"The messages cannot be rendered with this model's chat template: {e}",
                           param="messages", code="invalid_value") from None
        max_tokens = _check_lengths(state, len(prompt_ids), req.max_new_tokens(), "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # the end-of-turn tokens (tokenizer.stop_token_ids) end the answer through the engine's EOS set,
        # so the ignore_eos extension can switch them off
        params = _sampling_params(req, max_tokens, logprobs=logprobs)
        gen = Generation(state, [list(prompt_ids)], params, new_id("chatcmpl"), _deadline(state))
        return await _respond(request, gen, req.stream,
                              lambda: _chat_stream(state, req, gen, len(prompt_ids)),
                              lambda: _chat_result(state, req, gen, len(prompt_ids)))

    # ---------------------------------------------------------------- /v1/embeddings
    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(req: EmbeddingRequest, request: Request):
        _check_ready(state, generate=False)
        _check_model(state, req.model)
        req.check_supported()
        state.counters["requests"] += 1
        inputs = req.inputs()
        if len(inputs) > state.limits.max_embedding_inputs:
            raise APIError(400, f"{len(inputs)} inputs in one request; the limit is "
                                f"{state.limits.max_embedding_inputs}.", param="input", code="invalid_value")
        prefix, suffix = state.embed_frame  # texts are framed as the tokenizer frames one sequence; ids as given
        ids = [prefix + tokenizer.encode(x) + suffix if isinstance(x, str) else x for x in inputs]
        max_len = state.limits.max_prompt_tokens or state.max_model_len
        for i, x in enumerate(ids):
            _check_token_ids(state, x, "input")
            if not x:
                raise APIError(400, f"input[{i}] is empty after tokenization", param="input", code="invalid_value")
            if len(x) > max_len:
                raise APIError(400, f"input[{i}] is {len(x)} tokens long; the limit is {max_len}.",
                               param="input", code="context_length_exceeded")
        vectors = await until_disconnect(request, _embed_queued(state, ids))
        data = [EmbeddingData(index=i, embedding=_encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors)]
        n_tokens = sum(len(x) for x in ids)
        return EmbeddingResponse(data=data, model=state.model_name,
                                 usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens))


async def _respond(request: Request, gen: Generation, stream: bool,
                   make_stream: Callable[[], AsyncIterator[str]], make_result: Callable[[], Awaitable[Any]]):
    """Run a generation for a plain or a streamed response, cancelling it if the client goes away."""
    counters = request.app.state.lmstack.counters

    def count_disconnect() -> None:
        counters["disconnects"] += 1

    handed_over = False
    try:
        if not stream:
            return await until_disconnect(request, make_result())
        await until_disconnect(request, gen.start())
        handed_over = True  # from here the response closes the generation when the stream ends
        return EventStreamResponse(make_stream(), on_close=gen.aclose, on_disconnect=count_disconnect,
                                   more_ready=gen.has_ready)
    except ClientGone:
        count_disconnect()
        return Response(status_code=499)  # nobody is left to read it
    finally:
        if not handed_over:
            await gen.aclose()


# ----------------------------------------------------------------------------- completions bodies

async def _collect(gen: Generation, n_prompts: int) -> list[Any]:
    """Final RequestOutput per prompt (outputs are cumulative, so the last one holds everything)."""
    await gen.start()
    last: list[Any] = [None] * n_prompts
    async for index, out in gen.events():
        last[index] = out
    return last


async def _completion_result(state: ServerState, req: CompletionRequest, gen: Generation,
                             prompts: list[list[int]]) -> Completion:
    tok = state.tokenizer
    finals = await _collect(gen, len(prompts))
    choices, completion_tokens = [], 0
    for p_index, out in enumerate(finals):
        prompt_text = tok.decode(prompts[p_index]) if req.echo else ""
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if req.logprobs is not None:
                entries, ids = list(c.logprobs or []), list(c.token_ids[:len(c.logprobs or [])])
                if req.echo:
                    entries = list(out.prompt_logprobs or [None] * len(prompts[p_index])) + entries
                    ids = list(prompts[p_index]) + ids
                logprobs = _completion_logprobs(tok, entries, ids, 0)
            choices.append(CompletionChoice(index=p_index * req.n + c.index, text=prompt_text + c.text,
                                            logprobs=logprobs, finish_reason=c.finish_reason))
    prompt_tokens = sum(len(p) for p in prompts)
    return Completion(id=gen.request_id, model=state.model_name, choices=choices,
                      usage=Usage.of(prompt_tokens, completion_tokens))


async def _completion_stream(state: ServerState, req: CompletionRequest, gen: Generation,
                             prompts: list[list[int]]) -> AsyncIterator[str]:
    tok = state.tokenizer
    created, completion_tokens = now(), 0
    echoed: set[int] = set()
    finished: set[int] = set()
    text_len: dict[int, int] = {}
    base = {"id": gen.request_id, "object": "text_completion", "created": created, "model": state.model_name}
    try:
        async for p_index, out in gen.events():
            for c in out.outputs:
                index = p_index * req.n + c.index
                if index in finished:  # finished samples of an n > 1 request are repeated in later outputs
                    continue
                if c.finish_reason is not None:
                    finished.add(index)
                text = c.new_text
                logprobs = None
                new_ids = list(c.new_token_ids)
                entries: list[dict | None] = list((c.logprobs or [])[len(c.token_ids) - len(new_ids):]) \
                    if req.logprobs is not None else []
                if req.echo and index not in echoed:
                    echoed.add(index)
                    text = tok.decode(prompts[p_index]) + text
                    if req.logprobs is not None:
                        entries = list(out.prompt_logprobs or [None] * len(prompts[p_index])) + entries
                        new_ids = list(prompts[p_index]) + new_ids
                completion_tokens += len(c.new_token_ids)
                if req.logprobs is not None:
                    logprobs = _completion_logprobs(tok, entries, new_ids[:len(entries)], text_len.get(index, 0))
                text_len[index] = text_len.get(index, 0) + len(text)
                if not text and c.finish_reason is None and not new_ids:
                    continue
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=c.finish_reason)
                chunk = {**base, "choices": [choice.model_dump()]}
                if req.include_usage():
                    chunk["usage"] = None
                yield sse(chunk)
        if req.include_usage():
            prompt_tokens = sum(len(p) for p in prompts)
            yield sse({**base, "choices": [], "usage": Usage.of(prompt_tokens, completion_tokens).model_dump()})
        yield sse("[DONE]")
    except APIError as err:  # the response has begun: report in-band, as OpenAI does
        yield sse(err.body())
        yield sse("[DONE]")


# ----------------------------------------------------------------------------- chat bodies

async def _chat_result(state: ServerState, req: ChatCompletionRequest, gen: Generation,
                       prompt_tokens: int) -> ChatCompletion:
    (out,) = await _collect(gen, 1)
    choices, completion_tokens = [], 0
    for c in out.outputs:
        completion_tokens += len(c.token_ids)
        logprobs = _chat_logprobs(state.tokenizer, list(c.logprobs or [])) if req.logprobs else None
        choices.append(ChatChoice(index=c.index, message=ChatMessageOut(content=c.text), logprobs=logprobs,
                                  finish_reason=c.finish_reason))
    return ChatCompletion(id=gen.request_id, model=state.model_name, choices=choices,
                          usage=Usage.of(prompt_tokens, completion_tokens))


async def _chat_stream(state: ServerState, req: ChatCompletionRequest, gen: Generation,
                       prompt_tokens: int) -> AsyncIterator[str]:
    created, completion_tokens = now(), 0
    include_usage = req.include_usage()

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(id=gen.request_id, created=created, model=state.model_name, choices=choices,
                                   usage=usage)
        return sse(body.model_dump(exclude=None if include_usage else {"usage"}))

    started: set[int] = set()
    finished: set[int] = set()
    try:
        async for _, out in gen.events():
            for c in out.outputs:
                if c.index in finished:  # finished samples of an n > 1 request are repeated in later outputs
                    continue
                if c.finish_reason is not None:
                    finished.add(c.index)
                if c.index not in started:
                    started.add(c.index)
                    yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))])
                completion_tokens += len(c.new_token_ids)
                if not c.new_text and c.finish_reason is None:
                    continue
                logprobs = None
                if req.logprobs and c.new_token_ids:
                    fresh = list((c.logprobs or [])[len(c.token_ids) - len(c.new_token_ids):])
                    logprobs = _chat_logprobs(state.tokenizer, fresh)
                delta = ChatDelta(content=c.new_text) if c.new_text else ChatDelta()
                yield chunk([ChatChunkChoice(index=c.index, delta=delta, logprobs=logprobs,
                                             finish_reason=c.finish_reason)])
        if include_usage:
            yield chunk([], Usage.of(prompt_tokens, completion_tokens))
        yield sse("[DONE]")
    except APIError as err:
        yield sse(err.body())
        yield sse("[DONE]")


# ----------------------------------------------------------------------------- embeddings

async def _embed_queued(state: ServerState, ids: list[list[int]]) -> list[list[float]]:
    """One embedding batch at a time in a worker thread; callers beyond ``max_waiting`` get 429."""
    if state.embed_waiting >= state.limits.max_waiting:
        state.counters["queue_full"] += 1
        raise APIError(429, "The server is at capacity: too many embedding requests are waiting. Retry shortly.",
                       type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    state.embed_waiting += 1
    try:
        async with state.embed_lock:
            return await asyncio.wait_for(asyncio.to_thread(_embed, state, ids),
                                          timeout=state.limits.request_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(503, "The embedding request ran past the server's timeout.", type="server_error",
                       code="timeout") from None
    finally:
        state.embed_waiting -= 1


def _embed(state: ServerState, ids: list[list[int]]) -> list[list[float]]:
    """Unit-length, mean-pooled final hidden states (lmstack.engine.embed), for any model family."""
    from lmstack.engine.embed import embed_ids

    pad_id = getattr(state.tokenizer, "pad_id", 0)
    return embed_ids(state.model, ids, pooling="mean", pad_id=int(pad_id)).tolist()


def _encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, what the openai client decodes
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


# ----------------------------------------------------------------------------- running the server

def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with ``sock.getsockname()[1]``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def _uvicorn_server(app: FastAPI, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_graceful_shutdown=5,
                            lifespan="on", ws="none")
    return uvicorn.Server(config)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields the base URL; stops it on exit."""
    sock = bind_socket(host, port)
    server = _uvicorn_server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmstack-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.02)
        yield url_for(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_keys: list[str] | None = None,
          log_level: str = "info", **app_kwargs: Any) -> None:
    """Load ``model`` and serve it until interrupted (the `lmstack serve` verb)."""
    from lmstack.cli import UserError

    try:
        sock = bind_socket(host, port)  # bind first: a busy port fails before the model is loaded
    except OSError as e:
        raise UserError(str(e)) from None
    try:
        app = create_app(model, api_keys=api_keys, **app_kwargs)
    except ValueError as e:
        sock.close()
        raise UserError(str(e)) from None
    except BaseException:
        sock.close()
        raise
    state: ServerState = app.state.lmstack
    url = url_for(sock)
    print(f"lmstack serve: model '{state.model_name}' ({state.max_model_len}-token context) on {url}", flush=True)
    print(f"  web chat page:  {url}/", flush=True)
    print(f"  OpenAI API:     {url}/v1  (API key {'required' if state.api_keys else 'not required'})", flush=True)
    server = _uvicorn_server(app, log_level)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
