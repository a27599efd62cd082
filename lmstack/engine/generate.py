"""Generation as a library: the plain reference loop, streaming one request on an engine, and chat sessions.

    from lmstack.engine.generate import generate
    ids = generate(model, prompt_ids, SamplingParams(max_tokens=32, temperature=0))

* :func:`generate` / :func:`generate_tokens` — one sequence, one plain loop over the model, with a
  contiguous :class:`~lmstack.engine.kv_cache.KVCache` or (``use_kv_cache=False``) recomputing the
  whole sequence every step. This is the readable reference that the engine and the KV cache are
  tested against, and what a notebook wants for a quick sample.
* :func:`stream_request` — one request on an :class:`~lmstack.engine.engine.Engine` (same sampling code,
  batched, prefix reuse), yielding text as it is decoded: multi-byte characters split across tokens are
  held back until complete, and stop strings are cut out even when they span tokens
  (:mod:`lmstack.engine.detok`).
* :class:`ChatSession` — a multi-turn conversation on an engine. It renders the history with
  ``tokenizer.render_chat(messages, add_generation_prompt=True)`` and stops on
  ``tokenizer.stop_token_ids``. When the conversation no longer fits the context (prompt + ``max_tokens``),
  the oldest turns are dropped (the system prompt stays) and ``notify`` is told once.

The ``lmstack generate`` / ``lmstack chat`` commands built on these live in :mod:`lmstack.cli.generate`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from lmstack.engine.kv_cache import KVCache
from lmstack.engine.sampling import SamplingParams, SamplingRow, make_generator, sample
from lmstack.errors import UserError


# ----------------------------------------------------------------------------- the plain loop

@torch.inference_mode()
def generate_tokens(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    use_kv_cache: bool = True, eos_token_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield generated token ids one by one (stop tokens included, then the loop ends).

    Stops after ``params.max_tokens`` tokens, on ``params.stop_token_ids`` / ``eos_token_ids``
    (unless ``ignore_eos``), or when the sequence reaches the model's context. Stop *strings* are
    a text-level concern handled by the callers that own a tokenizer. ``params.constraint`` (a grammar)
    is honoured as the engine honours it: the mask before each draw, the matcher advanced after it
    (pass the grammar's stop tokens as ``eos_token_ids`` so that the loop ends where the grammar does).
    """
    params = params or SamplingParams(temperature=0.0)
    params.validate()
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise UserError("empty prompt: give at least one token (e.g. the tokenizer's end-of-text id)")
    context = model.config.block_size
    if len(prompt) >= context:
        raise UserError(f"prompt of {len(prompt)} tokens fills the model's context of {context}; shorten it")
    device = next(model.parameters()).device
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    generator = None if params.greedy else make_generator(
        params.seed if params.seed is not None else torch.seed(), device)
    budget = min(params.max_tokens, context - len(prompt))
    constraint = None
    if params.constraint is not None:
        params.constraint.check_vocab_size(model.config.vocab_size)
        constraint = params.constraint.start()
    cache = KVCache.for_model(model, 1, len(prompt) + budget) if use_kv_cache else None
    ids = list(prompt)
    step_input = torch.tensor([prompt], device=device)  # (1, T)
    for _ in range(budget):
        logits, _ = model(step_input, kv_cache=cache, logits_to_keep=1)  # (1, 1, V)
        token = int(sample(logits[:, -1], [SamplingRow(params, generator, prompt, ids[len(prompt):], constraint)])[0])
        ids.append(token)
        if constraint is not None:
            constraint.advance(token)
        yield token
        if token in stops:
            return
        # with a cache only the new token goes in; without one the whole sequence is recomputed
        step_input = torch.tensor([[token]] if use_kv_cache else [ids], device=device)


def generate(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
             use_kv_cache: bool = True, eos_token_ids: Iterable[int] = ()) -> list[int]:
    """The generated token ids of :func:`generate_tokens` as a list (greedy by default)."""
    return list(generate_tokens(model, prompt_ids, params, use_kv_cache=use_kv_cache, eos_token_ids=eos_token_ids))


# ----------------------------------------------------------------------------- one request on an engine

def stream_request(engine: Any, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[tuple[int, str, Any]]:
    """Run one request on an (otherwise idle) engine; yield ``(sample index, new text, output)`` per step."""
    request_id = engine.add_request(prompt_ids, params)
    try:
        while True:
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                for completion in out.outputs:
                    if completion.new_text or completion.finish_reason:
                        yield completion.index, completion.new_text, out
                if out.finished:
                    return
    finally:
        engine.abort(request_id)  # no-op when finished; frees the slot on Ctrl-C or an early close


class ChatSession:
    """A multi-turn conversation on an engine: history, context sliding, streamed replies.

    ``send(text)`` yields the reply's text as it is decoded and then records it in the history.
    When prompt + reply budget no longer fit the context, the oldest turns go first (the system
    prompt stays); ``notify`` is called once the first time that happens.
    """

    def __init__(self, engine: Any, params: SamplingParams, system: str | None = None,
                 notify: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
        self.engine, self.tokenizer = engine, engine.tokenizer
        if self.tokenizer is None or self.tokenizer.chat_format is None:
            raise UserError("this model's tokenizer has no chat format (no <|user|>/<|assistant|>/<|end|> tokens "
                            "and no chat template); use `lmstack generate` for plain continuation")
        self.params = params
        self.system = system
        self.notify = notify
        self.messages: list[dict[str, str]] = []
        self._told_about_sliding = False
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """The token ids the model reads before replying to ``messages`` (default: the current history)."""
        ids, _ = self.tokenizer.render_chat(self.messages if messages is None else messages,
                                            add_generation_prompt=True)
        return ids

    def _fit(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[int], int]:
        """(kept messages, prompt ids, reply budget): old turns dropped until prompt + reply fit the context."""
        context = self.engine.max_model_len
        reserve = max(1, min(self.params.max_tokens, context // 2))
        first = 1 if messages and messages[0]["role"] == "system" else 0
        messages = list(messages)
        ids = self.prompt_ids(messages)
        while len(ids) + reserve > context and len(messages) - first > 1:
            del messages[first]  # the oldest turn; a reply whose question is gone goes with it
            while len(messages) - first > 1 and messages[first]["role"] != "user":
                del messages[first]
            ids = self.prompt_ids(messages)
        if len(ids) >= context:
            raise UserError(f"this message alone takes {len(ids)} tokens, more than the model's context of "
                             f"{context}; send something shorter")
        return messages, ids, min(self.params.max_tokens, context - len(ids))

    def send(self, text: str) -> Iterator[str]:
        if not text.strip():
            raise UserError("empty message")
        wanted = self.messages + [{"role": "user", "content": text}]
        kept, ids, max_tokens = self._fit(wanted)  # raises before touching the history
        if len(kept) < len(wanted) and not self._told_about_sliding:
            self._told_about_sliding = True
            self.notify(f"[the conversation outgrew the model's context of {self.engine.max_model_len} tokens; "
                        "the oldest turns are dropped from now on]")
        self.messages = kept
        params = dataclasses.replace(self.params, max_tokens=max_tokens, n=1,
                          stop_token_ids=sorted(set(self.params.stop_token_ids) | set(self.tokenizer.stop_token_ids)))
        reply = ""
        for _, delta, _ in stream_request(self.engine, ids, params):
            reply += delta
            yield delta
        self.messages.append({"role": "assistant", "content": reply})
