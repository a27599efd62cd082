"""lmstack.engine: KV caches, sampling, the continuous-batching Engine and its asyncio wrapper.

    from lmstack.engine import Engine, SamplingParams
    engine = Engine.from_checkpoint("runs/speedrun/model")
    out = engine.generate([prompt_ids], SamplingParams(max_tokens=32))[0]

Contracts (fields and semantics) are in docs/CONTRACTS.md ("Engine").
"""

from lmstack.engine.engine import CompletionOutput, Engine, RequestOutput
from lmstack.engine.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "CompletionOutput", "RequestOutput"]
