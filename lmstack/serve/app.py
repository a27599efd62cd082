"""The OpenAI-compatible HTTP app behind `lmstack serve`: the factory and the routes.

    lmstack serve --model runs/speedrun/model --port 8000      # then open http://127.0.0.1:8000/

    from lmstack.serve.app import create_app
    from lmstack.serve.run import serve_in_thread
    app = create_app("runs/speedrun/model", api_keys=["sk-local"])
    with serve_in_thread(app) as url:                           # uvicorn on a free loopback port
        openai.OpenAI(base_url=url + "/v1", api_key="sk-local").models.list()

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/embeddings``, ``GET|POST /v1/feedback`` (human judgements, feedback.py; 404 unless the server
was given a feedback file), ``GET /v1/tools`` and ``POST /v1/tools/{name}`` (the server's built-in tools,
below), ``GET /health`` (engine statistics and counters, no key needed), ``GET /`` (the chat page from
static/; no key needed to load it, the page asks for one when the server wants it).

Tool calling on /v1/chat/completions (``tools``, ``tool_choice``, ``parallel_tool_calls``, ``tool_calls``
back and forth) is OpenAI's protocol, described in tool_protocol.py; the client runs its own functions.
Built-in tools (``tools="calculator,python,search=IDX"``, what ``lmstack serve --tools`` and ``lmstack chat
--tools`` take; lmstack.tools) are for clients without functions of their own, the chat page first:
``GET /v1/tools`` lists them as OpenAI function definitions (an empty list without --tools), and ``POST
/v1/tools/{name}`` with the arguments as a JSON object runs one in a worker thread, answering
``{"content": text}``; a failing, misused or timed-out tool answers its ``error: ...`` text (Tool.call),
never an HTTP error, since the text goes back to the model as the tool's result.

LoRA adapters (``adapters=[(name, dir), ...]``, adapters.py) are served over the one base model: each is a
model of its own in /v1/models (with ``parent`` = the base), a request whose ``model`` names one is decoded
with it, and requests for different adapters and for the base share the engine's batches
(lmstack.engine.multi_lora). Embeddings always come from the base model.

How a request flows, and where each step lives:

* transport.py: the body is capped (413) and the key checked (401) by a plain ASGI middleware before
  FastAPI parses anything;
* protocol.py: FastAPI validates the body against the schemas (strict types, ranges: 400 on failure);
* validation.py: the handler checks what depends on the server (model, vocabulary, lengths, sequences
  against the waiting bound) and turns the request into prompt token ids and SamplingParams;
* generation.py: a Generation runs it on the AsyncEngine (429 when its waiting queue is full) and is
  closed, aborting the engine requests, whenever the exchange ends early (disconnect, timeout, failure);
* openai_format.py: the outputs become OpenAI bodies or server-sent events.

Embeddings (embeddings.py) are mean-pooled final hidden states: of a decoder, or of an encoder checkpoint
(BERT, T5), which is then served for /v1/embeddings only (generation routes answer 404, as OpenAI does
for a model that does not support an endpoint).

Caveats: one base model per server; embeddings run in a worker thread next to the engine's stepping thread
(same weights, read-only), one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import torch.nn as nn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.checkpoint import load_checkpoint, read_config
from lmstack.devices import resolve_device, resolve_dtype
from lmstack.engine.async_engine import AsyncEngine
from lmstack.engine.embed import special_frame
from lmstack.engine.engine import Engine
from lmstack.errors import UserError
from lmstack.models import is_decoder
from lmstack.serve import openai_format
from lmstack.serve.adapters import read_lora_weights
from lmstack.serve.embeddings import embed_queued, encode_vector
from lmstack.serve.feedback import KINDS, FeedbackLog, FeedbackRequest, feedback_record
from lmstack.serve.generation import Generation, respond
from lmstack.serve.protocol import (APIError, ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                                    EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, ModelCard,
                                    ModelList, new_id, validation_error)
from lmstack.serve.state import ServerLimits, ServerState
from lmstack.serve.tool_protocol import chat_messages, tool_plan
from lmstack.serve.transport import GatekeeperMiddleware, error_response, until_disconnect
from lmstack.serve.validation import (check_feedback, check_lengths, check_model, check_ready, check_sequences,
                                      check_token_ids, deadline, response_constraint,
                                      sampling_params, tool_call_constraint)
from lmstack.tokenizer import Tokenizer
from lmstack.tools.base import Tool

log = logging.getLogger("lmstack.serve")
STATIC_DIR = Path(__file__).parent / "static"

# content-security policy for the chat page: only our own script and styles, no inline code, so even
# a rendering bug could not execute model output
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


# ----------------------------------------------------------------------------- app factory

def create_app(engine_or_checkpoint: str | os.PathLike | Engine | AsyncEngine, *,
               api_keys: list[str] | tuple[str, ...] | None = None, max_request_bytes: int = 1 << 20,
               max_prompt_tokens: int | None = None, max_tokens_limit: int = 4096, max_waiting: int = 256,
               request_timeout_s: float = 600.0, model_name: str | None = None, device: str = "auto",
               adapters: Sequence[tuple[str, str | os.PathLike]] = (), feedback: str | os.PathLike | None = None,
               tools: str | Sequence[Tool] | None = None, allow_unsafe_sandbox: bool = False,
               **engine_kwargs: Any) -> FastAPI:
    """The FastAPI app serving one model.

    ``engine_or_checkpoint``: a checkpoint / run directory, an ``Engine``, or an ``AsyncEngine``
    (then ``max_waiting`` is the engine's own). ``engine_kwargs`` (max_num_seqs, kv_cache_tokens, ...)
    go to ``Engine.from_checkpoint`` when a path is given. A checkpoint of an encoder family (BERT,
    T5) is served for /v1/embeddings only. ``api_keys``: accepted Bearer keys; empty or None = no
    authentication. ``adapters``: (name, peft adapter directory) pairs served over a checkpoint (an Engine
    brings its own, ``Engine(adapters=...)``). ``feedback``: the JSONL file /v1/feedback appends to.
    ``tools``: built-in tools served at /v1/tools, a spec such as ``"calculator,search=IDX"`` (lmstack.tools.
    build_tools; ``allow_unsafe_sandbox`` as there) or Tool objects.
    """
    if isinstance(tools, str):  # before the model loads: a misspelt tool fails at once
        from lmstack.tools import build_tools
        tools = build_tools(tools, allow_unsafe_sandbox=allow_unsafe_sandbox)
    served_tools = {tool.name: tool for tool in tools or ()}
    if adapters and not isinstance(engine_or_checkpoint, (str, os.PathLike)):
        raise UserError("adapters are read together with a checkpoint path; an Engine brings its own "
                        "(Engine(model, tokenizer, adapters=[LoRAWeights...]))")
    given_async, engine = None, None
    if isinstance(engine_or_checkpoint, AsyncEngine):
        given_async = engine_or_checkpoint
        engine = given_async.engine
        model, tokenizer = engine.model, engine.tokenizer
    elif isinstance(engine_or_checkpoint, Engine):
        engine = engine_or_checkpoint
        model, tokenizer = engine.model, engine.tokenizer
    elif isinstance(engine_or_checkpoint, (str, os.PathLike)):
        model_name = model_name or default_model_name(engine_or_checkpoint)
        clash = [name for name, _ in adapters if name == model_name]
        if clash:
            raise UserError(f"--adapter {clash[0]}=... has the base model's name; name the adapter differently "
                            "(--adapter NAME=DIR)")
        engine, model, tokenizer = _load(str(engine_or_checkpoint), device, engine_kwargs, adapters)
    else:
        raise TypeError(f"create_app needs a checkpoint path, an Engine or an AsyncEngine, "
                        f"not {type(engine_or_checkpoint).__name__}")
    if tokenizer is None:
        raise UserError("the model has no tokenizer (no tokenizer.json in the checkpoint); the server needs one "
                        "to read text: save the checkpoint with its tokenizer")
    for name, value in (("max_request_bytes", max_request_bytes), ("max_tokens_limit", max_tokens_limit),
                        ("max_waiting", max_waiting)):
        if value < 1:
            raise UserError(f"{name}={value} must be >= 1")
    if request_timeout_s <= 0:
        raise UserError(f"request_timeout_s={request_timeout_s} must be > 0")
    max_model_len = int(getattr(engine, "max_model_len", None) or model.config.block_size)
    if max_prompt_tokens is not None and not 1 <= max_prompt_tokens <= max_model_len:
        raise UserError(f"max_prompt_tokens={max_prompt_tokens} must be in [1, {max_model_len}] "
                        "(the model's context length)")
    limits = ServerLimits(max_request_bytes=max_request_bytes, max_prompt_tokens=max_prompt_tokens,
                          max_tokens_limit=max_tokens_limit, max_waiting=max_waiting,
                          request_timeout_s=request_timeout_s)
    lora = getattr(engine, "lora", None)
    state = ServerState(engine=engine, model=model, tokenizer=tokenizer, model_name=model_name or "lmstack",
                        max_model_len=max_model_len, limits=limits,
                        api_keys=tuple(k for k in (api_keys or ()) if k), embed_frame=special_frame(tokenizer),
                        adapter_names=tuple(lora.names) if lora is not None else (),
                        feedback=FeedbackLog(feedback) if feedback is not None else None,
                        async_engine=given_async, owns_async_engine=given_async is None, tools=served_tools)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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


def _load(path: str, device: str, engine_kwargs: dict[str, Any], adapters: Sequence[tuple[str, str | os.PathLike]]
          ) -> tuple[Engine | None, nn.Module, Tokenizer]:
    """(engine or None, model, tokenizer): an Engine for decoder families, the bare model for encoders."""
    family = read_config(path)["model"].get("family", "gpt")
    if adapters and not is_decoder(family):
        raise UserError(f"--adapter needs a decoder to generate with; model family {family!r} is served for "
                        "embeddings only")
    if adapters:  # the adapters are checked against the loaded base before the engine wraps its layers
        dev = resolve_device(device)
        ckpt = load_checkpoint(path, device=dev, dtype=resolve_dtype("auto", dev))
        weights = [read_lora_weights(ckpt.model, name, adapter_dir) for name, adapter_dir in adapters]
        engine = Engine(ckpt.model, ckpt.tokenizer, adapters=weights, **engine_kwargs)
        return engine, engine.model, engine.tokenizer
    if is_decoder(family):
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

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            return error_response(APIError(404, f"Unknown request URL: {request.method} {request.url.path}. "
                                                "GET /openapi.json lists the routes this server has.",
                                           type="not_found_error", code="unknown_url"))
        if err.status_code == 405:
            return error_response(APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed", headers=dict(err.headers or {})))
        return error_response(APIError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:  # a bug, never the client's fault
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(err).__name__}); see the server log",
                                       type="server_error", code="internal_error"))



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
                             "adapters": list(state.adapter_names), "feedback": state.feedback is not None,
                             "auth": bool(state.api_keys)}, status_code=200 if status == "ok" else 503)

    def card(adapter: str | None) -> ModelCard:
        return ModelCard(id=adapter or state.model_name, max_model_len=state.max_model_len,
                         parent=state.model_name if adapter else None)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[card(None), *[card(name) for name in state.adapter_names]])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str):
        return card(check_model(state, model_id))

    # ---------------------------------------------------------------- /v1/feedback
    @app.get("/v1/feedback")
    async def feedback_info():
        check_feedback(state)
        return {"object": "feedback", "enabled": True, "kinds": list(KINDS)}

    @app.post("/v1/feedback", openapi_extra={"requestBody": {"content": {"application/json": {
        "schema": FeedbackRequest.model_json_schema()}}}})
    async def save_feedback(request: Request):
        check_feedback(state)  # before the body is read: without --feedback every call is the same clear 404
        try:
            req = FeedbackRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e.errors()) from None
        check_model(state, req.model)
        try:  # fsync in a worker thread: the event loop keeps streaming meanwhile
            await asyncio.to_thread(state.feedback.append, feedback_record(req))
        except OSError as e:
            log.error("could not append to the feedback file %s: %s", state.feedback.path, e)
            raise APIError(500, f"The server could not save the feedback ({e.strerror}); nothing was written.",
                           type="server_error", code="feedback_not_saved") from None
        return {"object": "feedback", "saved": True, "kind": req.kind}

    # ---------------------------------------------------------------- /v1/tools
    @app.get("/v1/tools")
    async def list_tools():
        return {"object": "list", "data": [tool.spec() for tool in state.tools.values()]}

    @app.post("/v1/tools/{name}")
    async def run_tool(name: str, request: Request):
        tool = state.tools.get(name)
        if tool is None:
            served = ", ".join(state.tools) or "none (start the server with --tools)"
            raise APIError(404, f"There is no built-in tool {name!r}; this server has: {served}.",
                           type="not_found_error", param="name", code="tool_not_found")
        try:
            arguments = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The body must be the tool's arguments as a JSON object: {e}",
                           code="invalid_json") from None
        if not isinstance(arguments, dict):
            raise APIError(400, f"The body must be the tool's arguments as a JSON object, not "
                                f"{type(arguments).__name__}.", code="invalid_json")
        state.counters["tool_runs"] += 1
        # Tool.call enforces the tool's timeout and turns every failure into its "error: ..." text
        content = await until_disconnect(request, asyncio.to_thread(tool.call, arguments))
        return {"object": "tool.result", "name": name, "content": content}

    # ---------------------------------------------------------------- /v1/completions
    @app.post("/v1/completions", response_model=Completion)
    async def completions(req: CompletionRequest, request: Request):
        check_ready(state)
        adapter = check_model(state, req.model)
        req.check_supported()
        state.counters["requests"] += 1
        # an empty text prompt starts a fresh document, as OpenAI's default prompt "<|endoftext|>" does
        prompts = [(tokenizer.encode(p) or [tokenizer.eot_id]) if isinstance(p, str) else p for p in req.prompts()]
        for p in prompts:
            check_token_ids(state, p, "prompt")
        max_tokens = min(check_lengths(state, len(p), req.max_tokens, "prompt") for p in prompts)
        check_sequences(state, len(prompts), req.n)
        params = sampling_params(req, max_tokens, logprobs=req.logprobs,
                                  prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else
                                  (0 if req.max_tokens == 0 else None), adapter=adapter)
        gen = Generation(state, prompts, params, new_id("cmpl"), deadline(state))
        return await respond(request, gen, req.stream,
                              lambda: openai_format.completion_stream(state, req, gen, prompts),
                              lambda: openai_format.completion_result(state, req, gen, prompts))

    # ---------------------------------------------------------------- /v1/chat/completions
    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_ready(state)
        adapter = check_model(state, req.model)
        req.check_supported()
        state.counters["requests"] += 1
        plan = tool_plan(req)
        messages, template_tools = chat_messages(req, plan, tokenizer)
        try:
            prompt_ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True, tools=template_tools)
        except ValueError as e:
            raise APIError(400, f"The messages cannot be rendered with this model's chat template: {e}",
                           param="messages", code="invalid_value") from None
        max_tokens = check_lengths(state, len(prompt_ids), req.max_new_tokens(), "messages")
        check_sequences(state, 1, req.n)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # the end-of-turn tokens (tokenizer.stop_token_ids) end the answer through the engine's EOS set,
        # so the ignore_eos extension can switch them off
        params = sampling_params(req, max_tokens, logprobs=logprobs, adapter=adapter,
                                 constraint=tool_call_constraint(state, plan) or response_constraint(state, req))
        gen = Generation(state, [list(prompt_ids)], params, new_id("chatcmpl"), deadline(state))
        return await respond(request, gen, req.stream,
                              lambda: openai_format.chat_stream(state, req, gen, len(prompt_ids), plan),
                              lambda: openai_format.chat_result(state, req, gen, len(prompt_ids), plan))

    # ---------------------------------------------------------------- /v1/embeddings
    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(req: EmbeddingRequest, request: Request):
        check_ready(state, generate=False)
        if check_model(state, req.model) is not None:
            raise APIError(404, f"The model '{req.model}' is a LoRA adapter; embeddings come from the base model "
                                f"'{state.model_name}'.", param="model", code="model_not_supported")
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
            check_token_ids(state, x, "input")
            if not x:
                raise APIError(400, f"input[{i}] is empty after tokenization", param="input", code="invalid_value")
            if len(x) > max_len:
                raise APIError(400, f"input[{i}] is {len(x)} tokens long; the limit is {max_len}.",
                               param="input", code="context_length_exceeded")
        vectors = await until_disconnect(request, embed_queued(state, ids))
        data = [EmbeddingData(index=i, embedding=encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors)]
        n_tokens = sum(len(x) for x in ids)
        return EmbeddingResponse(data=data, model=state.model_name,
                                 usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens))
