"""The model side of evaluation: log-likelihoods of continuations, rolling log-likelihoods, generation.

    lm = EvalLM.from_checkpoint("runs/speedrun/model")              # backend="auto": the engine if present
    lm.loglikelihood([("The capital of France is", " Paris")])       # -> [LoglikelihoodResult(logprob, ...)]
    lm.generate([GenerationRequest("Q: 2+2?\\nA:", stop=["\\n"], max_tokens=8)])

Three interchangeable scorers compute the same numbers:

* ``plain`` (the reference): right-padded batches through ``model(x)``; the log-prob of a continuation is the
  sum of ``log_softmax(logits)`` at its tokens. Right padding is harmless under a causal mask: padding only
  ever sits *after* the positions that are read. Requests are sorted longest first so a batch wastes little.
* ``engine``: the inference engine's ``prompt_logprobs`` (``SamplingParams(max_tokens=0, prompt_logprobs=0)``),
  which batches with continuous batching and chunked prefill. A parity test pins it to ``plain``.
* ``shared``: the choices of a multiple-choice item share their context (demonstrations + question), and with a
  fixed demonstration set every item shares the demonstrations. :func:`score_shared` runs each distinct context
  once, keeps its keys and values, and then runs only the continuations on top of them (a continuation of one
  token needs no forward at all: the context's last logits score it). Within a batch of contexts the longest
  common token prefix (the demonstrations) is run once more for all of them. It uses the model's own KV-cache
  protocol (``models/layers.py``) through a small cache, :class:`StoredPrefix` / :class:`_RowsCache`, whose
  rows continue stored prefixes; masks come from positions, so padded rows and the left padding of contexts
  between the common prefix and each remainder are never attended. The token split is the plain path's
  (``encode_pair``, then the same left truncation), so a parity test pins it to ``plain`` within float noise.
  Generation with ``shared`` runs on the engine.

Tokenisation follows lm-evaluation-harness: the continuation's tokens are ``encode(context + continuation)``
minus the tokens of ``encode(context)`` (so a word is tokenised as it would be in running text), and an empty
context is replaced by the tokenizer's BOS / end-of-text token. Sequences longer than the model's context
keep their last ``max_length`` tokens (the continuation always survives whole unless it alone is too long).

Generation uses the engine (greedy by default, stop strings, n samples from one prefill). The ``plain``
backend runs the engine's reference loop (:func:`lmstack.engine.generate.generate_tokens`) without a KV cache,
recomputing the whole sequence each step, one sample after another. Both draw through the one sampler
(:mod:`lmstack.engine.sampling`) with sample i of a request seeded ``seed + i``, so they agree token for token
up to floating-point noise between a cached and an uncached forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from lmstack.checkpoint import load_checkpoint
from lmstack.devices import resolve_device, resolve_dtype
from lmstack.engine.engine import Engine
from lmstack.engine.generate import generate_tokens
from lmstack.engine.sampling import SamplingParams
from lmstack.errors import CheckpointError, DataError, UserError
from lmstack.evals.task import GenerationRequest

ProgressFn = Callable[[int], None]
BACKENDS = ("auto", "engine", "plain", "shared")


@dataclass
class LoglikelihoodResult:
    logprob: float        # sum over the continuation's tokens, natural log
    is_greedy: bool       # every continuation token is the argmax given what precedes it
    num_tokens: int


class EvalLM:
    """A checkpoint's model + tokenizer, wrapped for the evaluation harness."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, backend: str = "auto", batch_size: int = 16,
                 max_batch_tokens: int = 4096, max_length: int | None = None, name: str = "model"):
        if tokenizer is None:
            raise CheckpointError("evaluation needs a tokenizer, and this checkpoint has no tokenizer.json; copy the "
                                  "tokenizer used for training into the checkpoint directory")
        if backend not in BACKENDS:
            raise UserError(f"backend={backend!r}: choose {', '.join(BACKENDS)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        # long-context models (SmolLM2: 8192) would make the engine reserve KV memory for contexts no benchmark
        # needs; 2048 covers every built-in task (GSM8K 8-shot is ~1,000 tokens)
        self.max_length = int(max_length or min(model.config.block_size, 2048))
        self.name = name
        self._engine = None
        # requests whose prompt + continuation exceeded max_length and lost their start (reported by `eval`)
        self.truncated_requests = 0
        self.backend = "engine" if backend == "auto" else backend

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", backend: str = "auto", batch_size: int = 16,
                        dtype: str = "auto") -> "EvalLM":
        dev = resolve_device(device)
        ckpt = load_checkpoint(path, device=dev, dtype=resolve_dtype(dtype, dev))
        return cls(ckpt.model, ckpt.tokenizer, backend=backend, batch_size=batch_size, name=str(ckpt.path))

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_num_seqs=self.batch_size,
                                  max_model_len=self.max_length, max_num_batched_tokens=self.max_batch_tokens)
        return self._engine

    # ------------------------------------------------------------------ tokenisation
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing spaces belong to the continuation (" Paris", not "capital is " + "Paris")
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        context = stripped
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context) if context else []
        if whole[:len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encodings
            return (ctx or [self.tokenizer.bos_id]), self.tokenizer.encode(continuation)
        return (ctx or [self.tokenizer.bos_id]), whole[len(ctx):]

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: ProgressFn | None = None
                      ) -> list[LoglikelihoodResult]:
        """Log-probability of each continuation given its context (natural log, summed over tokens)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], progress)

    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]],
                             progress: ProgressFn | None = None) -> list[LoglikelihoodResult]:
        for ctx, cont in requests:
            if not cont:
                raise DataError("empty continuation: nothing to score; every scored request needs a continuation "
                                "of at least one token")
            if len(cont) >= self.max_length:
                raise DataError(f"a continuation of {len(cont)} tokens does not fit the model's context of "
                                f"{self.max_length}; shorten the continuation or use a model with a longer context")
        self.truncated_requests += sum(len(ctx) + len(cont) > self.max_length for ctx, cont in requests)
        if self.backend == "engine":
            return score_with_engine(self.engine, requests, self.max_length, progress)
        if self.backend == "shared":
            return score_shared(self.model, requests, self.max_length, self.batch_size, self.max_batch_tokens,
                                progress)
        return score_plain(self.model, requests, self.max_length, self.batch_size, self.max_batch_tokens, progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: ProgressFn | None = None
                              ) -> list[LoglikelihoodResult]:
        """Log-likelihood of whole texts (every token, the first predicted from BOS), in disjoint windows.

        Each window predicts up to ``max_length - 1`` new tokens conditioned on the one token before it, so
        long texts are scored with short context at window starts (lm-eval's default uses the same layout).
        """
        requests: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        step = self.max_length - 1
        for i, text in enumerate(texts):
            tokens = [self.tokenizer.bos_id] + self.tokenizer.encode(text)
            for start in range(1, len(tokens), step):
                requests.append((tokens[start - 1:start], tokens[start:start + step]))
                owners.append(i)
        results = self.loglikelihood_tokens(requests, progress)
        totals = [LoglikelihoodResult(0.0, True, 0) for _ in texts]
        for i, r in zip(owners, results):
            t = totals[i]
            totals[i] = LoglikelihoodResult(t.logprob + r.logprob, t.is_greedy and r.is_greedy,
                                            t.num_tokens + r.num_tokens)
        return totals

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest], seed: int = 1234,
                 progress: ProgressFn | None = None) -> list[list[str]]:
        """Texts generated for each request (``n`` samples each), cut at the first stop string."""
        outputs: list[list[str]] = []
        # chunks keep the engine's queue short so the progress bar moves and memory stays bounded
        chunk = max(1, self.batch_size)
        for start in range(0, len(requests), chunk):
            part = [self._fit_request(r) for r in requests[start:start + chunk]]
            prompts = [self._prompt_ids(r) for r in part]
            if self.backend in ("engine", "shared"):
                texts = self._generate_engine(part, prompts, seed + start)
            else:
                texts = [generate_plain(self.model, self.tokenizer, p, r,
                                        seed + start + i if r.seed is None else r.seed)
                         for i, (p, r) in enumerate(zip(prompts, part))]
            outputs.extend([_cut_at_stop(t, r.stop) for t in ts] for ts, r in zip(texts, part))
            if progress:
                progress(len(part))
        return outputs

    def _fit_request(self, r: GenerationRequest) -> GenerationRequest:
        """Small-context models: at most half the context is spent on new tokens."""
        limit = max(1, self.max_length // 2)
        if r.max_tokens <= limit:
            return r
        return GenerationRequest(r.prompt, list(r.stop), limit, r.n, r.temperature, r.seed)

    def _prompt_ids(self, r: GenerationRequest) -> list[int]:
        ids = self.tokenizer.encode(r.prompt) or [self.tokenizer.bos_id]
        keep = self.max_length - r.max_tokens
        self.truncated_requests += len(ids) > keep
        return ids[-keep:]  # keep the end of a long prompt (the question itself)

    def _generate_engine(self, part: Sequence[GenerationRequest], prompts: list[list[int]], seed: int
                         ) -> list[list[str]]:
        params = [SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, stop=list(r.stop), n=r.n,
                                 seed=seed + i if r.seed is None else r.seed) for i, r in enumerate(part)]
        results = self.engine.generate(prompts, params)
        return [[o.text for o in sorted(res.outputs, key=lambda o: o.index)] for res in results]


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _fit(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], int]:
    """The tokens fed to the model (context+continuation, left-truncated) and how many are continuation."""
    full = (ctx + cont)[-max_length:]
    return full, len(cont)


def score_plain(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                batch_size: int = 16, max_batch_tokens: int = 4096, progress: ProgressFn | None = None
                ) -> list[LoglikelihoodResult]:
    """Reference scorer: right-padded batches through ``model(x)``, longest first."""
    device = next(model.parameters()).device
    fitted = [_fit(ctx, cont, max_length) for ctx, cont in requests]
    order = sorted(range(len(fitted)), key=lambda i: -len(fitted[i][0]))
    results: list[LoglikelihoodResult | None] = [None] * len(fitted)
    pos = 0
    while pos < len(order):
        longest = len(fitted[order[pos]][0]) - 1
        rows = max(1, min(batch_size, max_batch_tokens // max(longest, 1)))
        batch = order[pos:pos + rows]
        pos += len(batch)
        x = torch.zeros(len(batch), longest, dtype=torch.long)  # (B, T) right-padded with token 0
        for b, i in enumerate(batch):
            tokens = fitted[i][0][:-1]
            x[b, :len(tokens)] = torch.tensor(tokens)
        with torch.no_grad():
            logits, _ = model(x.to(device))  # (B, T, V)
        for b, i in enumerate(batch):
            full, n_cont = fitted[i]
            T = len(full) - 1
            logp = F.log_softmax(logits[b, T - n_cont:T].float(), dim=-1)  # (n_cont, V)
            target = torch.tensor(full[-n_cont:], device=logp.device)
            chosen = logp.gather(1, target[:, None])[:, 0]  # (n_cont,)
            greedy = bool((chosen >= logp.max(dim=-1).values).all())
            results[i] = LoglikelihoodResult(float(chosen.sum()), greedy, n_cont)
        if progress:
            progress(len(batch))
    return results  # type: ignore[return-value]


def score_with_engine(engine: Any, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                      progress: ProgressFn | None = None, chunk: int = 64) -> list[LoglikelihoodResult]:
    """The same numbers from the engine's prompt_logprobs (rank 1 = the greedy token)."""
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    max_length = min(max_length, engine.max_model_len)
    results: list[LoglikelihoodResult] = []
    for start in range(0, len(requests), chunk):
        part = [_fit(ctx, cont, max_length) for ctx, cont in requests[start:start + chunk]]
        outs = engine.generate([full for full, _ in part], params)
        for (full, n_cont), out in zip(part, outs):
            entries = out.prompt_logprobs[-n_cont:]
            logprob = math.fsum(e["logprob"] for e in entries)
            results.append(LoglikelihoodResult(logprob, all(e["rank"] == 1 for e in entries), n_cont))
        if progress:
            progress(len(part))
    return results


# ----------------------------------------------------------------------------- shared-context scoring

@dataclass
class StoredPrefix:
    """Keys and values of N token sequences, kept to be continued: per layer (N, H_kv, S, D), positions (N, S).

    Key position -1 marks a padding column, which attention never reads."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_positions: torch.Tensor


class _RowsCache:
    """The KV-cache protocol for one forward whose row r continues stored prefix ``owners[r]`` (or nothing).

    After the forward, :meth:`stored` is every row's whole sequence so far (prefix + new tokens), the prefix of
    the next level."""

    def __init__(self, prefix: StoredPrefix | None, owners: torch.Tensor, n_layer: int, keep: bool = True):
        self.prefix, self.owners, self.keep = prefix, owners, keep
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.key_positions: torch.Tensor | None = None

    def next_position(self) -> int:
        raise RuntimeError("score_shared always passes explicit positions")

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (R, T) of the new tokens -> key positions (R, S + T)."""
        if self.prefix is None:
            self.key_positions = positions
        else:
            self.key_positions = torch.cat([self.prefix.key_positions[self.owners], positions], dim=1)
        return self.key_positions

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (R, H_kv, T, D) -> (R, H_kv, S + T, D)."""
        if self.prefix is not None:
            k = torch.cat([self.prefix.keys[layer_idx][self.owners], k], dim=2)
            v = torch.cat([self.prefix.values[layer_idx][self.owners], v], dim=2)
        if self.keep:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def stored(self) -> StoredPrefix:
        return StoredPrefix(self.keys, self.values, self.key_positions)  # type: ignore[arg-type]


def _forward_rows(model: torch.nn.Module, rows: Sequence[list[int]], starts: Sequence[int], prefix: StoredPrefix | None,
                  owners: Sequence[int], *, left_pad: bool, last_only: bool, keep: bool = True
                  ) -> tuple[torch.Tensor, StoredPrefix]:
    """Run token rows (row r at positions starts[r]..) on top of stored prefixes -> (logits, stored sequences).

    Left padding puts every row's last token in the last column (``last_only`` then computes the head there
    only: (R, 1, V)); right padding keeps row r's token j in column j ((R, T, V)). ``keep=False`` stores nothing
    (the last level), so its keys and values are freed layer by layer."""
    device = next(model.parameters()).device
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)  # (R, T); padding is token 0 at position -1
    positions = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (tokens, start) in enumerate(zip(rows, starts)):
        cols = slice(T - len(tokens), T) if left_pad else slice(0, len(tokens))
        idx[r, cols] = torch.tensor(tokens)
        positions[r, cols] = torch.arange(start, start + len(tokens))
    cache = _RowsCache(prefix, torch.tensor(list(owners), device=device), model.config.n_layer, keep)
    logits, _ = model(idx.to(device), positions=positions.to(device), kv_cache=cache,
                      logits_to_keep=1 if last_only else 0)
    return logits, cache.stored()


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for other in rows[1:]:
        n = next((j for j in range(n) if other[j] != first[j]), n)
    return n


def score_shared(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                 batch_size: int = 16, max_batch_tokens: int = 4096, progress: ProgressFn | None = None
                 ) -> list[LoglikelihoodResult]:
    """The plain scorer's numbers, each distinct context computed once (see the module docstring).

    Requests are fitted exactly as :func:`score_plain` fits them, then grouped by their context tokens. A batch
    of up to ``batch_size`` contexts (longest first, ``max_batch_tokens`` padded tokens at most) runs in up to
    three forwards: the batch's common token prefix once (B = 1), each context's remainder on top of it (its
    last logits score every continuation's first token), then every continuation of more than one token on top
    of its context, ``max_batch_tokens`` at a time."""
    fitted = [_fit(ctx, cont, max_length) for ctx, cont in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (full, n_cont) in enumerate(fitted):
        groups.setdefault(tuple(full[:-n_cont]), []).append(i)
    contexts = sorted(groups, key=len, reverse=True)
    results: list[LoglikelihoodResult | None] = [None] * len(fitted)
    pos = 0
    with torch.no_grad():
        while pos < len(contexts):
            rows = max(1, min(batch_size, max_batch_tokens // len(contexts[pos])))
            batch = contexts[pos:pos + rows]
            pos += len(batch)
            _score_context_batch(model, batch, [groups[c] for c in batch], fitted, max_batch_tokens, results)
            if progress:
                progress(sum(len(groups[c]) for c in batch))
    return results  # type: ignore[return-value]


def _score_context_batch(model: torch.nn.Module, contexts: list[tuple[int, ...]], members: list[list[int]],
                         fitted: list[tuple[list[int], int]], max_batch_tokens: int,
                         results: list[LoglikelihoodResult | None]) -> None:
    # the common prefix leaves every context at least one token, whose logits score the first continuation token
    common = min(_common_prefix_length(contexts), min(len(c) for c in contexts) - 1) if len(contexts) > 1 else 0
    shared = None
    if common > 0:
        _, shared = _forward_rows(model, [list(contexts[0][:common])], [0], None, [0], left_pad=True, last_only=True)
    last_logits, stored = _forward_rows(model, [list(c[common:]) for c in contexts], [common] * len(contexts),
                                        shared, [0] * len(contexts), left_pad=True, last_only=True)
    first_logp = F.log_softmax(last_logits[:, 0].float(), dim=-1)  # (G, V): the first continuation token
    longer: list[tuple[int, int]] = []  # (request, context row) of continuations with more than one token
    for g, group in enumerate(members):
        for i in group:
            full, n_cont = fitted[i]
            if n_cont == 1:
                token = full[-1]
                chosen = first_logp[g, token]
                results[i] = LoglikelihoodResult(float(chosen), bool(chosen >= first_logp[g].max()), 1)
            else:
                longer.append((i, g))
    longer.sort(key=lambda pair: -fitted[pair[0]][1])
    width = stored.key_positions.shape[1]
    start = 0
    while start < len(longer):
        longest = fitted[longer[start][0]][1] - 1
        # a row reads width + longest keys; the bound keeps the gathered keys and values near the plain batch's size
        part = longer[start:start + max(1, min(max_batch_tokens // longest, 4 * max_batch_tokens // (width + longest)))]
        start += len(part)
        feeds = [fitted[i][0][-fitted[i][1]:-1] for i, _ in part]  # every continuation token but the last
        logits, _ = _forward_rows(model, feeds, [len(contexts[g]) for _, g in part], stored, [g for _, g in part],
                                  left_pad=False, last_only=False, keep=False)  # (R, T, V)
        for r, (i, g) in enumerate(part):
            full, n_cont = fitted[i]
            logp = torch.cat([first_logp[g][None], F.log_softmax(logits[r, :n_cont - 1].float(), dim=-1)])  # (n, V)
            target = torch.tensor(full[-n_cont:], device=logp.device)
            chosen = logp.gather(1, target[:, None])[:, 0]  # (n_cont,)
            results[i] = LoglikelihoodResult(float(chosen.sum()), bool((chosen >= logp.max(dim=-1).values).all()),
                                             n_cont)


def generate_plain(model: torch.nn.Module, tokenizer: Any, prompt: list[int], request: GenerationRequest,
                   seed: int) -> list[str]:
    """The engine-free reference: ``request.n`` samples of the plain loop without a KV cache (slow, simple).

    Sample i is seeded ``seed + i``, as the engine seeds the samples of one request; generation ends on the
    tokenizer's stop tokens (not included) or once the text contains a stop string (cut by the caller).
    """
    stops = {int(t) for t in (getattr(tokenizer, "stop_token_ids", None) or [])} | {int(tokenizer.eot_id)}
    texts = []
    for i in range(request.n):
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, seed=seed + i)
        ids: list[int] = []
        for token in generate_tokens(model, prompt, params, use_kv_cache=False, eos_token_ids=stops):
            if token in stops:
                break
            ids.append(token)
            if request.stop and any(s in tokenizer.decode(ids) for s in request.stop):
                break
        texts.append(tokenizer.decode(ids))
    return texts
