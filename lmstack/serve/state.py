"""What one running server knows: its limits, its model and engine, and its counters.

:class:`ServerState` is built once by :func:`lmstack.serve.app.create_app` and shared by the routes, the
gatekeeper middleware (keys, body cap) and the generation driver. Nothing in it is locked: every reader
and writer runs on the server's event loop, except the engine, which only its own stepping thread
(:class:`~lmstack.engine.async_engine.AsyncEngine`) touches.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch.nn as nn

from lmstack.engine.async_engine import AsyncEngine
from lmstack.engine.constraints import GrammarCompiler
from lmstack.engine.engine import Engine
from lmstack.serve.feedback import FeedbackLog
from lmstack.tokenizer import Tokenizer
from lmstack.tools.base import Tool


@dataclass
class ServerLimits:
    """What one request may ask for. ``None`` for a token limit means "the model's context length"."""

    max_request_bytes: int = 1 << 20  # request body size (413 above)
    max_prompt_tokens: int | None = None  # prompt length in tokens (400 above)
    max_tokens_limit: int = 4096  # max_tokens a request may ask for (400 above)
    max_waiting: int = 256  # sequences (prompts x n) waiting for a batch slot (429 above)
    request_timeout_s: float = 600.0  # whole request, queueing included (503 / error event after)
    max_embedding_inputs: int = 256  # inputs in one /v1/embeddings call


@dataclass
class ServerState:
    engine: Engine | None  # None for an encoder served for embeddings only
    model: nn.Module
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    limits: ServerLimits
    api_keys: tuple[str, ...]
    embed_frame: tuple[list[int], list[int]]  # ids the tokenizer wraps around one text ([CLS] ... [SEP] for BERT)
    adapter_names: tuple[str, ...] = ()  # LoRA adapters served over the base, each under its own model name
    feedback: FeedbackLog | None = None  # where POST /v1/feedback appends judgements (None = not collected)
    async_engine: AsyncEngine | None = None  # created at startup inside the event loop
    owns_async_engine: bool = True
    shutting_down: bool = False
    embed_lock: asyncio.Semaphore | None = None
    embed_waiting: int = 0
    grammars: GrammarCompiler | None = None  # built on the first structured-output request
    tools: dict[str, Tool] = field(default_factory=dict)  # built-in tools the page may run (serve --tools)
    # malformed_tool_calls: replies whose attempted tool call did not read (answered as plain content);
    # tool_runs: built-in tool calls run through POST /v1/tools/{name}
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "disconnects": 0, "timeouts": 0,
                                                               "queue_full": 0, "engine_errors": 0,
                                                               "malformed_tool_calls": 0, "tool_runs": 0})
