"""Generation for people: the plain reference loop, and the `lmstack generate` / `lmstack chat` commands.

    lmstack generate --model runs/speedrun/model --prompt "Once upon a time" --max-tokens 64 --seed 1
    lmstack chat --model runs/sft/model --system "You are terse."

Two ways to generate:

* :func:`generate` / :func:`generate_tokens` — one sequence, one plain loop over the model, with a
  contiguous :class:`~lmstack.engine.kv_cache.KVCache` or (``use_kv_cache=False``) recomputing the
  whole sequence every step. This is the readable reference that the engine and the KV cache are
  tested against, and what a notebook wants for a quick sample.
* the commands, which run on the :class:`~lmstack.engine.engine.Engine` (same sampling code, batched,
  prefix reuse between chat turns) and stream text as it is decoded: multi-byte characters split
  across tokens are held back until complete, and stop strings are cut out even when they span
  tokens (see :mod:`lmstack.engine.detok`).

Chat renders the conversation with ``tokenizer.render_chat(messages, add_generation_prompt=True)``
and stops on ``tokenizer.stop_token_ids``. When the conversation no longer fits the context (prompt
+ ``--max-tokens``), the oldest turns are dropped (the system prompt stays) and the user is told
once. ``/reset`` starts over, ``/exit`` or end-of-input (Ctrl-D) quits.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from lmstack.engine.kv_cache import KVCache
from lmstack.engine.sampling import SamplingParams, SamplingRow, make_generator, sample


# ----------------------------------------------------------------------------- the plain loop

@torch.inference_mode()
def generate_tokens(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    use_kv_cache: bool = True, eos_token_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield generated token ids one by one (stop tokens included, then the loop ends).

    Stops after ``params.max_tokens`` tokens, on ``params.stop_token_ids`` / ``eos_token_ids``
    (unless ``ignore_eos``), or when the sequence reaches the model's context. Stop *strings* are
    a text-level concern handled by the callers that own a tokenizer.
    """
    params = params or SamplingParams(temperature=0.0)
    params.validate()
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("empty prompt: give at least one token (e.g. the tokenizer's end-of-text id)")
    context = model.config.block_size
    if len(prompt) >= context:
        raise ValueError(f"prompt of {len(prompt)} tokens fills the model's context of {context}; shorten it")
    device = next(model.parameters()).device
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    generator = None if params.greedy else make_generator(
        params.seed if params.seed is not None else torch.seed(), device)
    budget = min(params.max_tokens, context - len(prompt))
    cache = KVCache.for_model(model, 1, len(prompt) + budget) if use_kv_cache else None
    ids = list(prompt)
    step_input = torch.tensor([prompt], device=device)  # (1, T)
    for _ in range(budget):
        logits, _ = model(step_input, kv_cache=cache, logits_to_keep=1)  # (1, 1, V)
        token = int(sample(logits[:, -1], [SamplingRow(params, generator, prompt, ids[len(prompt):])])[0])
        ids.append(token)
        yield token
        if token in stops:
            return
        # with a cache only the new token goes in; without one the whole sequence is recomputed
        step_input = torch.tensor([[token]] if use_kv_cache else [ids], device=device)


def generate(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
             use_kv_cache: bool = True, eos_token_ids: Iterable[int] = ()) -> list[int]:
    """The generated token ids of :func:`generate_tokens` as a list (greedy by default)."""
    return list(generate_tokens(model, prompt_ids, params, use_kv_cache=use_kv_cache, eos_token_ids=eos_token_ids))
