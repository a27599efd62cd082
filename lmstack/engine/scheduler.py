"""Continuous batching: which sequences run in the next engine step.

A request moves WAITING -> PREFILLING -> DECODING -> FINISHED. Every step the scheduler returns

* ``decode``: every sequence that is DECODING (each contributes one token), and
* ``prefill``: prompt chunks ``(request, start, end)`` — first the requests already part-way
  through their prompt, then newly admitted ones — within a token budget of
  ``max_num_batched_tokens`` minus the decode tokens (chunked prefill: a long prompt is spread
  over several steps so running sequences keep decoding meanwhile).

A request is admitted when ``n`` KV-cache slots are free (one per sample; they are all reserved
at admission so a request never stalls half-forked), first come first served. Finished and
aborted sequences return their slot at once, so a waiting request can start in the very next step.
At admission the prompt's longest already-computed prefix is looked up (a free slot's retained
tokens, or a running sequence's, whose keys/values are then copied) and only the rest is prefilled.
Keys and values depend on the LoRA adapter a request decodes with, so reuse happens only between
requests of the same adapter (:func:`reuse_key`).

Requests and sequences are plain objects shared with the engine, which fills in tokens, text and
logprobs; the scheduler only moves them between its queues and owns slot bookkeeping.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lmstack.engine.kv_cache import SlotKVCache, common_prefix
from lmstack.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request: its slot, generated tokens, text stream and logprobs."""

    request: "Request"
    index: int  # which of the request's n samples
    generator: torch.Generator | None
    stream: Any | None  # detok.TextStream when the engine has a tokenizer
    slot: int = -1
    num_computed: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    new_ids: list[int] = field(default_factory=list)  # since the last RequestOutput
    new_text: str = ""
    constraint: Any | None = None  # constraints.TokenConstraint when the request has a grammar

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def total_len(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.request.prompt_ids[-1]

    def cached_tokens(self) -> list[int]:
        return (self.request.prompt_ids + self.output_ids)[:self.num_computed]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    status: Status = Status.WAITING
    prompt_logprobs: list | None = None
    reserved_slots: list[int] = field(default_factory=list)  # slots for samples 1..n-1 until the fork
    error: str | None = None  # why the engine stopped it, when a step failed for it alone
    adapter: int = 0  # LoRA slot it decodes with (lmstack.engine.multi_lora); 0 = the base model

    @property
    def prefill_seq(self) -> Sequence:
        return self.seqs[0]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


@dataclass
class ScheduledBatch:
    prefill: list[tuple[Request, int, int]]  # (request, start, end): prompt tokens [start, end) this step
    decode: list[Sequence]


class Scheduler:
    def __init__(self, cache: SlotKVCache, max_num_batched_tokens: int, prefix_reuse: bool = True):
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_reuse = prefix_reuse
        self.waiting: deque[Request] = deque()
        # sequences (sum of n) of the waiting requests: an int other threads may read without a lock
        self.waiting_seqs = 0
        self.prefilling: list[Request] = []
        self.decoding: list[Sequence] = []
        self.reused_tokens = 0  # prompt tokens whose KV came from another sequence instead of a forward pass

    # ------------------------------------------------------------------ queues
    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.waiting_seqs += request.params.n

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @property
    def num_running(self) -> int:
        return len(self.decoding) + sum(len(r.seqs) for r in self.prefilling)

    def schedule(self) -> ScheduledBatch:
        """The hot path: decode everything decoding; fill the rest of the budget with prompt chunks."""
        decode = list(self.decoding)
        budget = max(self.max_num_batched_tokens - len(decode), 1)
        prefill: list[tuple[Request, int, int]] = []
        widest = 0  # longest chunk: the prefill batch is padded to it
        for request in self.prefilling:
            if budget <= 0:
                break
            start = request.prefill_seq.num_computed
            chunk = self._fit(request, start, budget, len(prefill), widest)
            if chunk:
                prefill.append((request, start, start + chunk))
                budget, widest = budget - chunk, max(widest, chunk)
        while self.waiting and budget > 0 and self.cache.num_free >= self.waiting[0].params.n:
            request = self.waiting.popleft()
            self.waiting_seqs -= request.params.n
            self._admit(request)  # the reusable prefix is known once its slot is chosen
            start = request.prefill_seq.num_computed
            chunk = self._fit(request, start, budget, len(prefill), widest)
            if not chunk:
                break  # admitted; its prompt starts next step
            prefill.append((request, start, start + chunk))
            budget, widest = budget - chunk, max(widest, chunk)
        return ScheduledBatch(prefill=prefill, decode=decode)

    def _fit(self, request: Request, start: int, budget: int, rows: int, widest: int) -> int:
        """Tokens of this prompt to prefill now: within the budget, and without letting padding blow
        up the batch (rows * widest stays within twice the budget)."""
        chunk = min(len(request.prompt_ids) - start, budget)
        if rows and (rows + 1) * max(widest, chunk) > 2 * self.max_num_batched_tokens:
            return 0
        return chunk

    def _admit(self, request: Request) -> None:
        seq = request.prefill_seq
        reuse = self.prefix_reuse and request.params.prompt_logprobs is None
        seq.slot, reused = self.cache.allocate(reuse_key(request, request.prompt_ids) if reuse else None)
        reused = max(reused - (request.adapter != 0), 0)  # the adapter's marker is not a token
        if reuse:  # a running sequence may share a longer prefix: copy its keys/values instead of recomputing
            source, shared = self._running_prefix(request)
            if shared > reused:
                self.cache.copy_prefix(source, seq.slot, shared)
                reused = shared
        # keep at least the last prompt token to compute: its logits give the first sampled token
        seq.num_computed = min(reused, len(request.prompt_ids) - 1) if reuse else 0
        self.reused_tokens += seq.num_computed
        request.reserved_slots = [self.cache.allocate()[0] for _ in range(request.params.n - 1)]
        request.status = Status.PREFILLING
        self.prefilling.append(request)

    def _running_prefix(self, request: Request) -> tuple[int, int]:
        """(slot, length) of the longest computed prefix of the prompt held by a running sequence of its adapter."""
        best_slot, best, prompt = -1, 0, request.prompt_ids
        for seq in itertools.chain(self.decoding, (r.prefill_seq for r in self.prefilling)):
            if seq.num_computed > best and seq.slot >= 0 and seq.request.prompt_ids[0] == prompt[0] \
                    and seq.request.adapter == request.adapter:
                n = common_prefix(seq.cached_tokens(), prompt)
                if n > best:
                    best_slot, best = seq.slot, n
        return best_slot, best

    # ------------------------------------------------------------------ transitions
    def prefill_done(self, request: Request) -> None:
        """The whole prompt is cached: the request's samples start decoding."""
        self.prefilling.remove(request)
        request.status = Status.DECODING
        self.decoding.extend(s for s in request.seqs if not s.finished)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished and give its slot back now (keeping its tokens for prefix reuse)."""
        if seq.finished:
            return
        seq.finish_reason = reason
        if seq.slot >= 0:
            self.cache.free(seq.slot, reuse_key(seq.request, seq.cached_tokens()))
            seq.slot = -1
        if seq in self.decoding:
            self.decoding.remove(seq)
        request = seq.request
        if request.finished:
            request.status = Status.FINISHED
            for slot in request.reserved_slots:
                self.cache.free(slot)
            request.reserved_slots = []
            if request in self.prefilling:
                self.prefilling.remove(request)

    def abort(self, request: Request, reason: str = "abort") -> None:
        """Finish every sample of a request now ("abort" by the client, "error" when a step failed for it)."""
        if request in self.waiting:
            self.waiting.remove(request)
            self.waiting_seqs -= request.params.n
        for seq in request.seqs:
            self.finish(seq, reason)
        request.status = Status.FINISHED

    def kv_tokens_used(self) -> int:
        return sum(s.num_computed for s in self.decoding) + sum(r.prefill_seq.num_computed for r in self.prefilling)


def reuse_key(request: Request, tokens: list[int]) -> list[int]:
    """Tokens as prefix reuse compares them: an adapter's are preceded by the marker -slot, which no token id
    equals, so keys and values computed with one adapter never serve another adapter or the base."""
    return tokens if request.adapter == 0 else [-request.adapter, *tokens]
