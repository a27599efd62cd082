"""``/v1/embeddings``: unit-length, mean-pooled final hidden states of any model family.

Decoders and encoders (BERT, T5) alike go through :func:`lmstack.engine.embed.embed_ids`. Batches run one
at a time in a worker thread next to the engine's stepping thread (same weights, read-only); callers
beyond the server's waiting bound get 429, and a batch past the request timeout gets 503. ``base64``
encoding is little-endian float32, which is what the openai client decodes.
"""

from __future__ import annotations

import asyncio
import base64
import struct

from lmstack.engine.embed import embed_ids
from lmstack.serve.protocol import APIError
from lmstack.serve.state import ServerState


async def embed_queued(state: ServerState, ids: list[list[int]]) -> list[list[float]]:
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
    pad_id = getattr(state.tokenizer, "pad_id", 0)
    return embed_ids(state.model, ids, pooling="mean", pad_id=int(pad_id)).tolist()


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
