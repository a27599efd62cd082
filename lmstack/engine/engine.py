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

Honest caveats: slots reserve ``max_model_len`` tokens per sequence (no paging), the engine is
single-process and single-device, and ``step`` is not thread-safe (AsyncEngine owns one thread
that calls it).
"""

from __future__ import annotations

import itertools
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence as Seq

import torch
import torch.nn as nn

from lmstack.engine.detok import TextStream
from lmstack.engine.kv_cache import SlotKVCache
from lmstack.engine.sampling import SamplingParams, SamplingRow, logprob_entries, make_generator, sample
from lmstack.engine.scheduler import Request, Scheduler, Sequence, Status


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
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[dict] | None
    new_token_ids: list[int]
    new_text: str


@dataclass
class RequestOutput:
    """prompt_logprobs (when requested): one entry per prompt token, ``None`` for the first (nothing
    predicts it), then dicts shaped like CompletionOutput.logprobs entries."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_logprobs: list | None
    outputs: list[CompletionOutput]
    finished: bool


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available here; use --device cpu (or auto)")
    return resolved


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any = None, *, max_num_seqs: int = 32,
                 max_model_len: int | None = None, kv_cache_tokens: int | None = None,
                 device: str | torch.device | None = None, max_num_batched_tokens: int = 512,
                 prefix_reuse: bool = True, cuda_graphs: bool | None = None, compile_decode: bool = False,
                 seed: int | None = None):
        """model: a decoder speaking the KV-cache protocol; tokenizer: optional (text, stop strings, EOS).

        max_model_len defaults to the model's context (block_size); kv_cache_tokens caps the KV pool
        (slots = min(max_num_seqs, kv_cache_tokens // max_model_len)); cuda_graphs defaults to on
        for CUDA devices (on CPU, True runs the same padded static-shape decode without capture);
        compile_decode adds torch.compile inside the graphs; seed seeds the generators of requests
        that do not bring their own.
        """
        if device is not None:
            model = model.to(resolve_device(device))
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.max_model_len = int(max_model_len or cfg.block_size)
        if self.max_model_len > cfg.block_size and cfg.position in ("rope", "learned"):
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context of {cfg.block_size}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} must be >= 1")
        num_slots = max_num_seqs
        if kv_cache_tokens is not None:
            num_slots = min(max_num_seqs, kv_cache_tokens // self.max_model_len)
            if num_slots < 1:
                raise ValueError(f"kv_cache_tokens={kv_cache_tokens} holds no sequence of max_model_len="
                                 f"{self.max_model_len}; raise it or lower max_model_len")
        if not hasattr(cfg, "kv_heads"):
            raise ValueError(f"the engine runs decoder-only models; model family {cfg.family!r} has no KV cache "
                             "(use lmstack.engine.embed for encoders)")
        self.device = next(model.parameters()).device
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

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        quantize: str | None = None, **kw: Any) -> "Engine":
        """Load a checkpoint directory (or run directory); bf16 on CUDA, fp32 on CPU unless dtype says."""
        from lmstack.checkpoint import load_checkpoint

        dev = resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, dev)
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
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, prompt, params)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        for i in range(params.n):
            generator = None if params.greedy else make_generator(base_seed + i, self.device)
            stream = TextStream(self.tokenizer, params.stop, prompt) if self.tokenizer is not None else None
            request.seqs.append(Sequence(request, i, generator, stream,
                                         logprobs=[] if params.logprobs is not None else None))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def check_request(self, prompt_token_ids: Seq[int], params: SamplingParams) -> list[int]:
        """Validate a request without queueing it (thread-safe); returns the prompt as a list of ints."""
        params.validate()
        if params.n > self.cache.num_slots:
            raise ValueError(f"n={params.n} exceeds the engine's {self.cache.num_slots} KV slots (max_num_seqs)")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("empty prompt: give at least one token (e.g. the tokenizer's end-of-text id)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        limit = self.max_model_len if params.max_tokens == 0 else self.max_model_len - 1
        if len(prompt) > limit:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate within "
                             f"max_model_len={self.max_model_len}; shorten it")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        return prompt

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
            self._decode(batch.decode)
        if batch.prefill:
            self._prefill(batch.prefill)
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
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        params_list = [sp or SamplingParams() for sp in params_list]
        for prompt, sp in zip(prompts, params_list):  # all or nothing: no half-submitted batch on bad input
            self.check_request(prompt, sp)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        bar = _ProgressBar(len(ids), self) if progress else None
        try:
            while self.has_unfinished():
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
                if bar is not None:
                    bar.update(len(final))
        finally:
            if bar is not None:
                bar.close()
        return [final[i] for i in ids]

    # ------------------------------------------------------------------ phases
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
        logits = self._forward(idx, positions, slots, max(end for _, _, end in chunks),
                               logits_to_keep=0 if want_all else 1)  # (B, T or 1, V)
        self._counters["prompt_tokens"] += sum(end - start for _, start, end in chunks)
        done_rows, done_requests = [], []
        for i, (request, start, end) in enumerate(chunks):
            request.prefill_seq.num_computed = end
            if request.params.prompt_logprobs is not None:
                self._add_prompt_logprobs(request, logits[i, T - (end - start):], start, end)
            if end == len(request.prompt_ids):
                done_rows.append(i)
                done_requests.append(request)
        if not done_requests:
            return
        last = logits[done_rows, -1]  # (R, V): next-token scores after each finished prompt
        rows, row_logits = [], []
        for request, scores in zip(done_requests, last):
            self._fork(request)
            self.scheduler.prefill_done(request)
            if request.params.max_tokens == 0:  # scoring only
                for seq in request.seqs:
                    self._finish(seq, "length")
                continue
            for seq in request.seqs:
                rows.append(seq)
                row_logits.append(scores)
        if rows:
            self._sample_and_append(rows, torch.stack(row_logits))

    def _decode(self, seqs: list[Sequence]) -> None:
        idx = torch.tensor([[s.last_token] for s in seqs])  # (B, 1)
        positions = torch.tensor([[s.num_computed] for s in seqs])  # (B, 1)
        kv_len = int(positions.max()) + 1
        slots = [s.slot for s in seqs]
        if self.graphs is not None:
            logits = self.graphs.decode(idx, positions, slots, kv_len)
        else:
            logits = self._forward(idx, positions, slots, kv_len, logits_to_keep=1)[:, -1]  # (B, V)
        for s in seqs:
            s.num_computed += 1
        self._sample_and_append(seqs, logits)

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
    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        rows = [SamplingRow(s.request.params, s.generator, s.request.prompt_ids, s.output_ids) for s in seqs]
        tokens = sample(logits, rows)
        entries = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
        if want:
            found = logprob_entries(logits[want], tokens[want], [seqs[i].request.params.logprobs for i in want])
            for i, entry in zip(want, found):
                entries[i] = entry
        for seq, token, entry in zip(seqs, tokens.tolist(), entries):
            self._append(seq, token, entry)

    def _append(self, seq: Sequence, token: int, logprob: dict | None) -> None:
        params = seq.request.params
        seq.output_ids.append(token)
        seq.new_ids.append(token)
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

    def _add_prompt_logprobs(self, request: Request, logits: torch.Tensor, start: int, end: int) -> None:
        """logits (end - start, V) at prompt positions start..end-1 score prompt tokens start+1..end."""
        targets = request.prompt_ids[start + 1:end + 1]  # the last position may predict past the prompt
        if not targets:
            return
        k = request.params.prompt_logprobs
        request.prompt_logprobs.extend(logprob_entries(logits[:len(targets)], torch.tensor(targets, device=logits.device),
                                                       [k] * len(targets)))

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
                finished=finished))
            for s in request.seqs:
                s.new_ids, s.new_text = [], ""
            if finished:
                self._requests.pop(request_id, None)
        self._touched = {}
        return outputs


class _ProgressBar:
    """rich progress for Engine.generate: requests finished, generated tokens/s, ETA."""

    def __init__(self, total: int, engine: Engine):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.engine, self.start = engine, time.perf_counter()
        self.tokens0 = engine._counters["generated_tokens"]
        self.progress = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), transient=True)
        self.task = self.progress.add_task("generate", total=total, speed="")
        self.progress.start()

    def update(self, done: int) -> None:
        tokens = self.engine._counters["generated_tokens"] - self.tokens0
        speed = tokens / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, completed=done, speed=f"{speed:,.0f} tokens/s")

    def close(self) -> None:
        self.progress.stop()


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
        raise ValueError(f"the KV cache needs {need / 2**30:.1f} GiB ({num_slots} slots x {max_len} tokens) but only "
                         f"{free / 2**30:.1f} GiB is free; lower max_num_seqs, max_model_len or kv_cache_tokens")


def tokenizer_stop_ids(tokenizer: Any) -> list[int]:
    """The document boundary and end-of-turn tokens of a tokenizer (whichever it has)."""
    ids = []
    try:
        ids.append(int(tokenizer.eot_id))
    except (AttributeError, ValueError, TypeError):  # a tokenizer without a document-boundary token
        pass
    ids += [int(t) for t in (getattr(tokenizer, "stop_token_ids", None) or []) if t is not None]
    return sorted(set(ids))


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: choose auto, bf16, fp16 or fp32")
    return table[dtype]


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
