"""The inference engine: token ids in, token ids (and text) out, many requests at once.

    engine = Engine.from_checkpoint("runs/speedrun/model")
    [out] = engine.generate([prompt_ids], SamplingParams(max_tokens=64, temperature=0))
    out.outputs[0].token_ids, out.outputs[0].text

    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=32, stop=["\\n\\n"]))
    while engine.has_unfinished():
        for out in engine.step():          # one scheduler iteration; deltas in new_token_ids / new_text
            ...

Design (one forward per phase per step):

* KV memory is one pre-allocated :class:`~lmstack.engine.kv_cache.SlotKVCache` with
  ``max_num_seqs`` slots of ``max_model_len`` tokens (fewer slots if ``kv_cache_tokens`` caps the
  pool). A sequence owns a slot from admission to its last token and returns it at once.
* Continuous batching (:mod:`lmstack.engine.scheduler`): requests join between decode steps, each
  step decodes one token for every running sequence and prefills prompt chunks within a token
  budget (chunked prefill). Prefill batches are left-padded (padding has position -1), so the
  last column holds every row's newest token and the head runs on one position per row.
* ``n > 1`` prefills once and forks: the prompt's KV is copied into the other samples' slots.
* Prefix reuse: a freed slot keeps its last occupant's KV; a new prompt that starts the same way
  (a chat's next turn, a shared few-shot header) takes that slot and skips the shared part, or
  copies the computed prefix of a running sequence that shares it.
* Sampling happens per request (:mod:`lmstack.engine.sampling`), each sampled request with its own
  ``torch.Generator``, so a seeded request's output does not depend on the rest of the batch.
* On CUDA, decode steps replay CUDA graphs captured per (batch bucket, KV-length bucket)
  (:class:`CudaGraphDecoder`); prefill and CPU runs are eager. Greedy output is tested against
  the plain full-recompute argmax loop at batch 1, in mixed batches and under random arrivals.

* No request can hurt another: each phase of a step (decode, prefill) computes everything that can
  fail (the forward, sampling, logprobs) before it changes any state, and the model's KV writes are
  idempotent (column == position). So when a phase raises, :meth:`Engine._isolated` runs it again once
  per request and fails only the request that still raises: its output ends with ``finish_reason
  "error"`` and ``RequestOutput.error``, the event is logged with its request id, and the rest of the
  batch goes on. Per-request bookkeeping after that point (appending tokens, detokenizing, forking)
  is guarded the same way.

Honest caveats: slots reserve ``max_model_len`` tokens per sequence (no paging), the engine is
single-process and single-device, and ``step`` is not thread-safe (AsyncEngine owns one thread
that calls it). In a step that isolated a failure, the retried requests draw their random numbers
again, so a seeded request's sample at that step may differ from a run without the failing request.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence as Seq, TypeVar

import torch
import torch.nn as nn

from lmstack.devices import resolve_device, resolve_dtype
from lmstack.engine.constraints import ConstraintMasks, PendingMasks
from lmstack.engine.detok import TextStream
from lmstack.engine.kv_cache import SlotKVCache
from lmstack.engine.multi_lora import LoRAWeights, MultiLoRA
from lmstack.engine.sampling import SamplingParams, SamplingRow, logprob_entries, make_generator, sample
from lmstack.engine.scheduler import Request, Scheduler, Sequence, Status
from lmstack.errors import UserError
from lmstack.models import is_decoder
from lmstack.progress import Progress

log = logging.getLogger("lmstack.engine")
Item = TypeVar("Item", Sequence, tuple)  # what a phase runs over: decoding sequences or prefill chunks


@dataclass
class CompletionOutput:
    """One sample of a request. ``token_ids`` / ``text`` / ``logprobs`` are cumulative;
    ``new_token_ids`` / ``new_text`` are what arrived since the previous RequestOutput for it.

    logprobs (when requested) has one entry per token of ``token_ids``:
    ``{"token_id": int, "logprob": float, "rank": int, "top": [{"token_id": int, "logprob": float}, ...]}``
    (raw model log-probabilities, before penalties and temperature).
    """

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: list[dict] | None
    new_token_ids: list[int]
    new_text: str


@dataclass
class RequestOutput:
    """prompt_logprobs (when requested): one entry per prompt token, ``None`` for the first (nothing
    predicts it), then dicts shaped like CompletionOutput.logprobs entries. ``error`` is set (and every
    sample's finish_reason is "error") when the request failed inside a step and was stopped alone."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_logprobs: list | None
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any = None, *, max_num_seqs: int = 32,
                 max_model_len: int | None = None, kv_cache_tokens: int | None = None,
                 device: str | torch.device | None = None, max_num_batched_tokens: int = 512,
                 prefix_reuse: bool = True, cuda_graphs: bool | None = None, compile_decode: bool = False,
                 seed: int | None = None, adapters: Seq[LoRAWeights] = (), parallel_masks: bool = True):
        """model: a decoder speaking the KV-cache protocol; tokenizer: optional (text, stop strings, EOS).

        max_model_len defaults to the model's context (block_size); kv_cache_tokens caps the KV pool
        (slots = min(max_num_seqs, kv_cache_tokens // max_model_len)); cuda_graphs defaults to on
        for CUDA devices (on CPU, True runs the same padded static-shape decode without capture);
        compile_decode adds torch.compile inside the graphs; seed seeds the generators of requests
        that do not bring their own. adapters: LoRA adapters served over this base in the same batches
        (lmstack.engine.multi_lora; a request picks one with ``SamplingParams.adapter``).
        parallel_masks: grammar masks of constrained rows are computed in parallel during the forward
        (lmstack.engine.constraints.ConstraintMasks); False computes them row by row after it (the plain path).
        """
        cfg = model.config
        if not is_decoder(cfg):
            raise UserError(f"the engine runs decoder-only models; model family {cfg.family!r} is not one "
                            "(use lmstack.engine.embed for embeddings, lmstack.engine.seq2seq for T5)")
        if device is not None:
            model = model.to(resolve_device(device))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        self.max_model_len = int(max_model_len or cfg.block_size)
        # rope and learned positions have no meaning past the trained context; the other schemes extrapolate
        if self.max_model_len > cfg.block_size and getattr(cfg, "position", "rope") in ("rope", "learned"):
            raise UserError(f"max_model_len={self.max_model_len} exceeds the model's context of {cfg.block_size}")
        if max_num_seqs < 1:
            raise UserError(f"max_num_seqs={max_num_seqs} must be >= 1")
        num_slots = max_num_seqs
        if kv_cache_tokens is not None:
            num_slots = min(max_num_seqs, kv_cache_tokens // self.max_model_len)
            if num_slots < 1:
                raise UserError(f"kv_cache_tokens={kv_cache_tokens} holds no sequence of max_model_len="
                                f"{self.max_model_len}; raise it or lower max_model_len")
        self.device = next(model.parameters()).device
        self.lora = MultiLoRA(self.model, adapters) if adapters else None
        _check_kv_memory(model, num_slots, self.max_model_len, self.device)
        self.cache = SlotKVCache.for_model(model, num_slots, self.max_model_len)
        self.scheduler = Scheduler(self.cache, max(max_num_batched_tokens, num_slots), prefix_reuse)
        self.eos_token_ids: set[int] = set()
        if tokenizer is not None:
            self.eos_token_ids = set(tokenizer_stop_ids(tokenizer))
        self._rng = random.Random(seed)
        self._requests: dict[str, Request] = {}
        self._touched: dict[str, Request] = {}  # requests with news for the next step()'s outputs
        self._ids = itertools.count()
        self._counters = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0}
        use_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.graphs = CudaGraphDecoder(self, capture=self.device.type == "cuda", compile=compile_decode) \
            if use_graphs else None
        self.constraint_masks = ConstraintMasks() if parallel_masks else None

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        quantize: str | None = None, **kw: Any) -> "Engine":
        """Load a checkpoint directory (or run directory); bf16 on CUDA, fp32 on CPU unless dtype says."""
        from lmstack.checkpoint import load_checkpoint

        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        ckpt = load_checkpoint(path, device=dev, dtype=torch_dtype)
        model = ckpt.model
        if quantize:
            from lmstack.engine.quant import quantize_model

            model = quantize_model(model, quantize)
        return cls(model, ckpt.tokenizer, **kw)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt = self.check_request(prompt_token_ids, params)
        request_id = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise UserError(f"request id {request_id!r} is already in use")
        request = Request(request_id, prompt, params, adapter=self.adapter_slot(params))
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        for i in range(params.n):
            generator = None if params.greedy else make_generator(base_seed + i, self.device)
            stream = TextStream(self.tokenizer, params.stop, prompt) if self.tokenizer is not None else None
            request.seqs.append(Sequence(request, i, generator, stream,
                                         logprobs=[] if params.logprobs is not None else None,
                                         constraint=params.constraint.start() if params.constraint else None))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def check_request(self, prompt_token_ids: Seq[int], params: SamplingParams) -> list[int]:
        """Validate a request without queueing it (thread-safe); returns the prompt as a list of ints.

        Raises :class:`~lmstack.errors.UserError` naming what the engine cannot honour."""
        params.validate()
        if params.n > self.cache.num_slots:
            raise UserError(f"n={params.n} exceeds the engine's {self.cache.num_slots} KV slots (max_num_seqs)")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise UserError("empty prompt: give at least one token (e.g. the tokenizer's end-of-text id)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        limit = self.max_model_len if params.max_tokens == 0 else self.max_model_len - 1
        if len(prompt) > limit:
            raise UserError(f"prompt of {len(prompt)} tokens leaves no room to generate within "
                            f"max_model_len={self.max_model_len}; shorten it")
        if params.constraint is not None:
            params.constraint.check_vocab_size(self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        self.adapter_slot(params)
        return prompt

    def adapter_slot(self, params: SamplingParams) -> int:
        """The LoRA slot a request decodes with (0 = the base); UserError for an adapter this engine lacks."""
        if self.lora is None:
            if params.adapter not in (None, 0):
                raise UserError(f"adapter {params.adapter!r} requested but this engine serves no adapters")
            return 0
        return self.lora.index(params.adapter)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV slots; the next step() reports it with finish_reason "abort"."""
        request = self._requests.get(request_id)
        if request is None or request.status == Status.FINISHED:
            return
        self.scheduler.abort(request)  # text stays what was already released
        self._touched[request_id] = request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._touched)

    def stats(self) -> dict[str, Any]:
        return {"running": self.scheduler.num_running, "waiting": len(self.scheduler.waiting),
                "kv_tokens_used": self.scheduler.kv_tokens_used(),
                "kv_tokens_total": self.cache.num_slots * self.max_model_len,
                "kv_slots_free": self.cache.num_free, "kv_slots_total": self.cache.num_slots,
                "kv_cache_bytes": self.cache.bytes, "prefix_reused_tokens": self.scheduler.reused_tokens,
                "cuda_graphs": self.graphs is not None and self.graphs.capture, **self._counters}

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.decode:
            self._isolated(self._decode, batch.decode)
        if batch.prefill:
            self._isolated(self._prefill, batch.prefill)
        self._counters["steps"] += 1
        return self._collect_outputs()

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Blocking: run these prompts to completion and return their final outputs in order.

        Steps the engine until everything it holds is done (outputs of requests added elsewhere
        are consumed and dropped). ``progress`` shows a bar with requests done and tokens/s.
        """
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        params_list = [sp or SamplingParams() for sp in params_list]
        for prompt, sp in zip(prompts, params_list):  # all or nothing: no half-submitted batch on bad input
            self.check_request(prompt, sp)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        start, tokens_before = time.perf_counter(), self._counters["generated_tokens"]
        with Progress(enabled=progress) as bar:
            task = bar.add("generate", total=len(ids), unit="requests")
            while self.has_unfinished():
                for out in self.step():
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
                        bar.advance(task)
                tokens = self._counters["generated_tokens"] - tokens_before
                bar.update(task, status=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s")
        return [final[i] for i in ids]

    @contextlib.contextmanager
    def live_weights(self) -> Iterator["Engine"]:
        """Generate from a model that is being trained (RL rollouts, lmstack/train/rollout.py).

        The engine runs the model's own tensors (no copy), so an optimizer step between two rollouts is
        seen by the next one. Inside, the model is in eval mode; on exit it is back in the mode it was in.
        On entry the KV that free slots kept for prefix reuse is forgotten: older weights computed it."""
        training = self.model.training
        self.cache.retained.clear()
        self.model.eval()
        try:
            yield self
        finally:
            self.model.train(training)

    # ------------------------------------------------------------------ phases
    def _isolated(self, phase: Callable[[list[Item]], None], items: list[Item]) -> None:
        """Run a phase over the batch; if it raises, run it once per request so only the one at fault fails.

        Safe because a phase computes everything fallible before it changes any state (module docstring).
        """
        try:
            phase(items)
            return
        except Exception as error:
            if len({id(_request_of(item)) for item in items}) == 1:
                self._fail(_request_of(items[0]), error)
                return
        for request, group in _group_by_request(items):
            if request.finished:
                continue
            try:
                phase(group)
            except Exception as error:
                self._fail(request, error)

    @contextlib.contextmanager
    def _guard(self, request: Request) -> Iterator[None]:
        """Per-request bookkeeping: an error fails this request alone instead of the step."""
        try:
            yield
        except Exception as error:
            self._fail(request, error)

    def _fail(self, request: Request, error: Exception) -> None:
        log.error("request %s failed inside an engine step and was stopped alone (the batch goes on): %s: %s",
                  request.request_id, type(error).__name__, error, exc_info=error)
        request.error = f"{type(error).__name__}: {error}"
        self.scheduler.abort(request, reason="error")
        self._touched[request.request_id] = request

    def _prefill(self, chunks: list[tuple[Request, int, int]]) -> None:
        B = len(chunks)
        T = max(end - start for _, start, end in chunks)
        idx = torch.zeros(B, T, dtype=torch.long)
        positions = torch.full((B, T), -1, dtype=torch.long)
        for i, (request, start, end) in enumerate(chunks):  # left-padded: newest token in the last column
            idx[i, T - (end - start):] = torch.tensor(request.prompt_ids[start:end])
            positions[i, T - (end - start):] = torch.arange(start, end)
        slots = [r.prefill_seq.slot for r, _, _ in chunks]
        want_all = any(r.params.prompt_logprobs is not None for r, _, _ in chunks)
        if self.lora is not None:
            self.lora.set_rows([r.adapter for r, _, _ in chunks], self.device)
        # every sample of a request whose prompt is now complete draws its first token from the last column
        done = [i for i, (request, _, end) in enumerate(chunks)
                if end == len(request.prompt_ids) and request.params.max_tokens > 0]
        rows = [(i, seq) for i in done for seq in chunks[i][0].seqs]
        masks = self._start_masks([seq for _, seq in rows])
        logits = self._forward(idx, positions, slots, max(end for _, _, end in chunks),
                               logits_to_keep=0 if want_all else 1)  # (B, T or 1, V)
        prompt_entries = [self._prompt_logprobs(request, logits[i, T - (end - start):], start, end)
                          for i, (request, start, end) in enumerate(chunks)]
        picked = self._pick_tokens([seq for _, seq in rows], logits[[i for i, _ in rows], -1], masks) if rows else []
        # nothing above changed any state; from here on each request's bookkeeping is guarded on its own
        self._counters["prompt_tokens"] += sum(end - start for _, start, end in chunks)
        by_seq = {id(seq): pick for (_, seq), pick in zip(rows, picked)}
        for (request, start, end), entries in zip(chunks, prompt_entries):
            with self._guard(request):
                request.prefill_seq.num_computed = end
                if entries:
                    request.prompt_logprobs.extend(entries)
                if end < len(request.prompt_ids):
                    continue
                self._fork(request)
                self.scheduler.prefill_done(request)
                for seq in request.seqs:
                    if request.params.max_tokens == 0:  # scoring only
                        self._finish(seq, "length")
                    else:
                        self._append(seq, *by_seq[id(seq)])

    def _decode(self, seqs: list[Sequence]) -> None:
        idx = torch.tensor([[s.last_token] for s in seqs])  # (B, 1)
        positions = torch.tensor([[s.num_computed] for s in seqs])  # (B, 1)
        kv_len = int(positions.max()) + 1
        slots = [s.slot for s in seqs]
        if self.lora is not None:
            self.lora.set_rows([s.request.adapter for s in seqs], self.device)
        masks = self._start_masks(seqs)  # grammar masks fill on a worker thread while the model runs
        if self.graphs is not None:
            logits = self.graphs.decode(idx, positions, slots, kv_len)
        else:
            logits = self._forward(idx, positions, slots, kv_len, logits_to_keep=1)[:, -1]  # (B, V)
        picked = self._pick_tokens(seqs, logits, masks)
        for seq, (token, entry) in zip(seqs, picked):
            if seq.finished:  # another sample of its request failed a moment ago
                continue
            with self._guard(seq.request):
                seq.num_computed += 1
                self._append(seq, token, entry)

    def _forward(self, idx: torch.Tensor, positions: torch.Tensor, slots: list[int], kv_len: int,
                 logits_to_keep: int) -> torch.Tensor:
        consecutive = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
        slot_ids = torch.tensor(slots, device=self.device)
        view = self.cache.batch(slot_ids, kv_len, consecutive)
        logits, _ = self.model(idx.to(self.device), positions=positions.to(self.device), kv_cache=view,
                               logits_to_keep=logits_to_keep)
        return logits

    def _fork(self, request: Request) -> None:
        """After the prompt is cached in sample 0's slot, give samples 1..n-1 a copy of it."""
        parent = request.prefill_seq
        for seq, slot in zip(request.seqs[1:], request.reserved_slots):
            self.cache.copy_prefix(parent.slot, slot, parent.num_computed)
            seq.slot, seq.num_computed = slot, parent.num_computed
        request.reserved_slots = []

    # ------------------------------------------------------------------ tokens, stops, outputs
    def _start_masks(self, seqs: list[Sequence]) -> PendingMasks | None:
        """Start the grammar masks of these sequences (fast path); None: the plain path computes them inline.

        A single constrained row stays inline: handing one mask to the worker and llguidance's executor cost
        more than computing it, when the forward is short (BENCHMARKS.md, "Structured output: the cost")."""
        constraints = [s.constraint for s in seqs]
        if self.constraint_masks is None or sum(c is not None for c in constraints) < 2:
            return None
        return self.constraint_masks.start(constraints)

    def _pick_tokens(self, seqs: list[Sequence], logits: torch.Tensor,
                     masks: PendingMasks | None = None) -> list[tuple[int, dict | None]]:
        """logits (B, V) -> (token, logprob entry or None) per sequence; changes no state."""
        rows = [SamplingRow(s.request.params, s.generator, s.request.prompt_ids, s.output_ids, s.constraint)
                for s in seqs]
        tokens = sample(logits, rows, masks)
        entries: list[dict | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
        if want:
            found = logprob_entries(logits[want], tokens[want], [seqs[i].request.params.logprobs for i in want])
            for i, entry in zip(want, found):
                entries[i] = entry
        return list(zip(tokens.tolist(), entries))

    def _append(self, seq: Sequence, token: int, logprob: dict | None) -> None:
        params = seq.request.params
        seq.output_ids.append(token)
        seq.new_ids.append(token)
        if seq.constraint is not None:
            seq.constraint.advance(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        self._counters["generated_tokens"] += 1
        self._touched[seq.request.request_id] = seq.request
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            self._finish(seq, "stop")
            return
        if seq.stream is not None:
            delta, stopped = seq.stream.add(token)
            seq.new_text += delta
            if stopped:
                self._finish(seq, "stop")
                return
        if len(seq.output_ids) >= params.max_tokens or seq.total_len >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.stream is not None and reason != "abort":
            seq.new_text += seq.stream.finish()
        self.scheduler.finish(seq, reason)
        self._touched[seq.request.request_id] = seq.request

    def _prompt_logprobs(self, request: Request, logits: torch.Tensor, start: int, end: int) -> list[dict]:
        """logits (end - start, V) at prompt positions start..end-1 score prompt tokens start+1..end."""
        targets = request.prompt_ids[start + 1:end + 1]  # the last position may predict past the prompt
        k = request.params.prompt_logprobs
        if k is None or not targets:
            return []
        return logprob_entries(logits[:len(targets)], torch.tensor(targets, device=logits.device), [k] * len(targets))

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        for request_id, request in self._touched.items():
            finished = request.finished
            outputs.append(RequestOutput(
                request_id=request_id, prompt_token_ids=request.prompt_ids,
                prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
                outputs=[CompletionOutput(index=s.index, token_ids=list(s.output_ids),
                                          text=s.stream.text if s.stream is not None else "",
                                          finish_reason=s.finish_reason,
                                          logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                          new_token_ids=s.new_ids, new_text=s.new_text) for s in request.seqs],
                finished=finished, error=request.error))
            for s in request.seqs:
                s.new_ids, s.new_text = [], ""
            if finished:
                self._requests.pop(request_id, None)
        self._touched = {}
        return outputs


def _check_kv_memory(model: nn.Module, num_slots: int, max_len: int, device: torch.device) -> None:
    """Refuse a KV pool that cannot fit, with the knobs that shrink it, instead of an allocator error."""
    cfg = model.config
    p = next(model.parameters())
    need = 2 * cfg.n_layer * (num_slots + 1) * cfg.kv_heads * (max_len + 1) * cfg.dim_per_head * p.element_size()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if need > 0.9 * free:
        raise UserError(f"the KV cache needs {need / 2**30:.1f} GiB ({num_slots} slots x {max_len} tokens) but only "
                         f"{free / 2**30:.1f} GiB is free; lower max_num_seqs, max_model_len or kv_cache_tokens")


def _request_of(item: Sequence | tuple[Request, int, int]) -> Request:
    return item.request if isinstance(item, Sequence) else item[0]


def _group_by_request(items: list[Item]) -> list[tuple[Request, list[Item]]]:
    """The items of each request together (a request's n samples decode as one unit), in first-seen order."""
    groups: dict[int, tuple[Request, list[Item]]] = {}
    for item in items:
        request = _request_of(item)
        groups.setdefault(id(request), (request, []))[1].append(item)
    return list(groups.values())


def tokenizer_stop_ids(tokenizer: Any) -> list[int]:
    """The document boundary and end-of-turn tokens of a tokenizer (whichever it has)."""
    ids = []
    try:
        ids.append(int(tokenizer.eot_id))
    except (AttributeError, ValueError, TypeError):  # a tokenizer without a document-boundary token
        pass
    ids += [int(t) for t in (getattr(tokenizer, "stop_token_ids", None) or []) if t is not None]
    return sorted(set(ids))


class CudaGraphDecoder:
    """Decode steps replayed from CUDA graphs, one graph per (batch bucket, KV-length bucket).

    A decode step of a small model is dominated by kernel-launch overhead (hundreds of small
    kernels per token), which a CUDA graph replays with one launch. Graphs need static shapes and
    addresses, so the step's inputs are copied into persistent buffers padded to a bucket: the
    batch to the next power of two (padding rows use the cache's scratch slot and position -1, so
    they write only the scratch column and are discarded), the attended KV length to the next power
    of two (columns past a row's length are masked by causality). Graphs are captured lazily on the
    first step that needs them (one eager warm-up run each), sharing one memory pool.

    ``capture=False`` runs the same padded static-shape step eagerly; on CPU this is how the tests
    check the bucketing logic against the plain decode path. ``compile=True`` additionally runs
    the model under ``torch.compile`` (fewer, fused kernels inside each graph; slower start-up).
    """

    def __init__(self, engine: Engine, capture: bool = True, compile: bool = False, min_kv_bucket: int = 64):
        self.engine, self.capture = engine, capture
        cache = engine.cache
        self.max_batch = cache.num_slots
        self.min_kv_bucket = min(min_kv_bucket, engine.max_model_len)
        device = engine.device
        self.idx = torch.zeros(self.max_batch, 1, dtype=torch.long, device=device)
        self.positions = torch.full((self.max_batch, 1), -1, dtype=torch.long, device=device)
        self.slot_ids = torch.full((self.max_batch,), cache.scratch_slot, dtype=torch.long, device=device)
        self.adapter_slots = torch.zeros(self.max_batch, dtype=torch.long, device=device)  # LoRA slot per row
        self.model = torch.compile(engine.model, dynamic=False) if compile else engine.model
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, n: int, cap: int, floor: int = 1) -> int:
        size = max(floor, 1 << (max(n, 1) - 1).bit_length())
        return min(size, cap)

    def decode(self, idx: torch.Tensor, positions: torch.Tensor, slots: list[int], kv_len: int) -> torch.Tensor:
        B = len(slots)
        batch = self.bucket(B, self.max_batch)
        kv_bucket = max(self.bucket(kv_len, self.engine.max_model_len, self.min_kv_bucket), kv_len)
        scratch = self.engine.cache.scratch_slot
        pad = batch - B
        self.idx[:batch].copy_(torch.cat([idx, idx.new_zeros(pad, 1)]), non_blocking=True)
        self.positions[:batch].copy_(torch.cat([positions, positions.new_full((pad, 1), -1)]), non_blocking=True)
        self.slot_ids[:batch].copy_(torch.tensor(slots + [scratch] * pad), non_blocking=True)
        lora = self.engine.lora
        if lora is not None:  # graphs always run the LoRA path, reading the slots from the persistent buffer
            self.adapter_slots[:batch].copy_(torch.tensor(lora.row_slots + [0] * pad), non_blocking=True)
            lora.use_rows(self.adapter_slots[:batch])
        if not self.capture:
            return self._run(batch, kv_bucket)[:B]
        key = (batch, kv_bucket)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(batch, kv_bucket)
            except Exception as e:  # never lose a request to a capture problem: decode eagerly from now on
                warnings.warn(f"CUDA graph capture failed ({e!r}); decoding without CUDA graphs")
                self.capture = False
                return self._run(batch, kv_bucket)[:B]
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:B]

    def _run(self, batch: int, kv_len: int) -> torch.Tensor:
        view = self.engine.cache.batch(self.slot_ids[:batch], kv_len)
        logits, _ = self.model(self.idx[:batch], positions=self.positions[:batch], kv_cache=view, logits_to_keep=1)
        return logits[:, -1]  # (batch, V)

    def _capture(self, batch: int, kv_len: int) -> tuple[Any, torch.Tensor]:
        # warm up on a side stream (lazy initialisations must not happen during capture); the
        # warm-up writes the same keys/values the real step writes, so it is harmless
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(batch, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._run(batch, kv_len)
        return graph, logits
