"""Sampling parameters and the batched logits -> token step shared by the engine and ``generate``.

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=64, logprobs=3)

Order of operations for one row of logits (the model's raw next-token scores):

0. a grammar constraint (``params.constraint``, lmstack.engine.constraints) sets every token the
   grammar forbids to -inf; rows without one are untouched (the engine computes these masks during the
   forward and passes them in as ``masks``);
1. penalties (on the raw logits):
   - repetition penalty (CTRL, Keskar et al. 2019; the Hugging Face definition): every token already
     seen in the prompt or the output has its logit divided by the penalty when positive and
     multiplied by it when negative, so ``penalty > 1`` discourages repeats;
   - presence / frequency penalties (the OpenAI definition): over the *generated* tokens only,
     ``logit -= presence_penalty * [count > 0] + frequency_penalty * count``;
2. temperature (``temperature == 0`` means greedy: argmax of the penalised logits);
3. top-k, then top-p (nucleus: the smallest set of most likely tokens whose mass reaches top_p,
   always keeping the most likely one), then min-p (drop tokens whose probability is below
   ``min_p * p_max``);
4. a draw with the row's own ``torch.Generator``: ``argmax(p / q)`` with ``q ~ Exponential(1)``,
   which samples exactly from ``p`` (the exponential race) and needs one random vector per row, so
   a seeded request draws the same numbers whatever else shares the batch.

Log-probabilities returned to the user (``logprobs`` / ``prompt_logprobs``) are ``log_softmax`` of
the *raw* logits, before penalties, temperature and filtering: they score the model, not the
sampler, which is what evaluation wants.

Numerical safety: any value :meth:`SamplingParams.validate` accepts gives a well-defined token. A
temperature below ``GREEDY_BELOW_TEMPERATURE`` decodes greedily (dividing by 1e-300 would turn every
logit into +-inf and the softmax into NaN); penalised and tempered logits have NaN mapped to -inf and
+inf to the largest finite float (a tiny repetition penalty divides a logit into +inf), and a row
whose probabilities are still unusable takes its argmax. ``top_k`` larger than the vocabulary means
"off", ``logprobs`` larger than the vocabulary returns the whole vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lmstack.engine.constraints import Grammar, PendingMasks, TokenConstraint, apply_constraints
from lmstack.errors import UserError

# one logprob entry, per generated (or prompt) token:
#   {"token_id": int, "logprob": float, "rank": int, "top": [{"token_id": int, "logprob": float}, ...]}
LogprobEntry = dict

# below this temperature, sampling is greedy: the tempered distribution is already a point mass at the
# argmax for any logits a model produces, and dividing by a smaller number overflows float32
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_K = 2 ** 31 - 1  # fits the int64 tensors of the batched sampler with room to spare


@dataclass
class SamplingParams:
    """How one request is decoded. Validated by :meth:`validate` (the engine calls it)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from every token present in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    stop: list[str] = field(default_factory=list)  # stop strings; not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # end generation; kept in token_ids, not in text
    ignore_eos: bool = False  # do not stop on the tokenizer's end-of-text / end-of-turn tokens
    seed: int | None = None  # per-request generator: same output whatever shares the batch
    n: int = 1  # samples from one prefill; sample i uses seed + i
    logprobs: int | None = None  # per generated token: its logprob + this many top alternatives
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens (+ top alternatives); None = off
    adapter: str | int | None = None  # LoRA adapter of Engine(adapters=...) by name or slot; None / 0 = the base
    constraint: Grammar | None = None  # output must match this grammar (lmstack.engine.constraints); None = free

    def validate(self) -> None:
        """Raise :class:`~lmstack.errors.UserError` naming the first field the sampler cannot honour."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"SamplingParams: {msg}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("max_tokens", "top_k", "n"):
            need(is_int(getattr(self, name)), f"{name}={getattr(self, name)!r} must be an integer")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            need(is_number(getattr(self, name)), f"{name}={getattr(self, name)!r} must be a finite number")
        for name in ("seed", "logprobs", "prompt_logprobs"):
            need(getattr(self, name) is None or is_int(getattr(self, name)),
                 f"{name}={getattr(self, name)!r} must be an integer or None")
        need(self.max_tokens >= 0, f"max_tokens={self.max_tokens} must be >= 0")
        need(self.max_tokens > 0 or self.prompt_logprobs is not None,
             "max_tokens=0 only makes sense with prompt_logprobs (scoring a prompt)")
        need(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        need(0 <= self.top_k <= MAX_TOP_K, f"top_k={self.top_k} must be in [0, {MAX_TOP_K}] (0 = off)")
        need(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        need(0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]")
        need(self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        need(self.n >= 1, f"n={self.n} must be >= 1")
        need(self.logprobs is None or self.logprobs >= 0, f"logprobs={self.logprobs} must be >= 0 or None")
        need(self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs={self.prompt_logprobs} must be >= 0 or None")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids >= 0")
        need(self.adapter is None or (isinstance(self.adapter, str) and self.adapter != "")
             or (is_int(self.adapter) and self.adapter >= 0),
             f"adapter={self.adapter!r} must be an adapter name, a slot >= 0, or None (the base model)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_filtering(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence at one step."""

    params: SamplingParams
    generator: torch.Generator | None  # None only for greedy rows
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    constraint: TokenConstraint | None = None  # this sequence's grammar state; None = unconstrained


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


# ----------------------------------------------------------------------------- logits processing

def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int]) -> torch.Tensor:
    """logits (V,) float -> penalised copy. See the module docstring for the definitions."""
    V = logits.shape[-1]
    logits = logits.clone()
    device = logits.device
    out = torch.as_tensor(list(output_ids), dtype=torch.long, device=device)
    if params.repetition_penalty != 1.0:
        seen = torch.as_tensor(list(prompt_ids) + list(output_ids), dtype=torch.long, device=device).unique()
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and out.numel():
        counts = torch.bincount(out, minlength=V).to(logits.dtype)  # (V,)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Batched top-k / top-p / min-p on temperature-scaled logits (B, V); filtered entries become -inf.

    top_k (B,) long with 0 = off; top_p (B,) float with 1 = off; min_p (B,) float with 0 = off.
    """
    B, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(V, device=logits.device).expand(B, V)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(max=V)
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # nucleus: drop a token when the mass of the tokens strictly before it already reaches top_p
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], masks: PendingMasks | None = None) -> torch.Tensor:
    """One token per row. logits (B, V) raw scores (any float dtype) -> token ids (B,) long.

    ``masks``: the grammar masks of the constrained rows, already being computed
    (:class:`~lmstack.engine.constraints.ConstraintMasks`, the engine's fast path); None computes
    them here row by row. Both give the same tokens.
    Greedy rows without penalties take the argmax straight away; a batch of only those never
    touches the random generators.
    """
    logits = apply_constraints(logits.float(), [r.constraint for r in rows], masks)
    if all(r.params.greedy and not r.params.needs_penalties for r in rows):
        return logits.argmax(dim=-1)
    if any(r.params.needs_penalties for r in rows):
        logits = _finite(torch.stack([apply_penalties(logits[i], r.params, r.prompt_ids, r.output_ids)
                                      if r.params.needs_penalties else logits[i] for i, r in enumerate(rows)]))
    best = logits.argmax(dim=-1)  # (B,) what greedy rows take, and the fallback of unusable rows
    greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
    if bool(greedy.all()):
        return best
    temperature = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows],
                               device=logits.device)
    scaled = _finite(logits / temperature[:, None])  # (B, V)
    if any(r.params.needs_filtering and not r.params.greedy for r in rows):
        top_k = torch.tensor([r.params.top_k for r in rows], device=logits.device)
        top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
        min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)
        scaled = filter_logits(scaled, top_k, top_p, min_p)
    probs = scaled.softmax(dim=-1)  # (B, V)
    # exponential race: argmax(p / q), q ~ Exp(1) drawn from each row's own generator
    race = torch.ones_like(probs)
    for i, r in enumerate(rows):
        if not r.params.greedy:
            race[i].exponential_(generator=r.generator)
    sampled = (probs / race).argmax(dim=-1)
    usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)  # False only when every logit was -inf/NaN
    return torch.where(greedy | ~usable, best, sampled)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen), +inf -> the largest finite float (chosen, without NaN from inf - inf)."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


# ----------------------------------------------------------------------------- logprobs

def logprob_entries(logits: torch.Tensor, chosen: torch.Tensor, num_top: Sequence[int]) -> list[LogprobEntry]:
    """Raw-model logprobs for each row: logits (B, V), chosen (B,) -> B entries.

    Each entry: {"token_id", "logprob", "rank" (1 = most likely), "top": [{"token_id", "logprob"}, ...]}
    with ``num_top[i]`` alternatives, most likely first.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen_lp = logp.gather(1, chosen[:, None])  # (B, 1)
    ranks = (logp > chosen_lp).sum(dim=-1) + 1  # (B,)
    k = min(max(num_top), logp.shape[-1]) if len(num_top) else 0  # asking for more than the vocabulary gets all of it
    top_lp, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], chosen[:, None][:, :0])
    chosen_l, chosen_lp_l, ranks_l = chosen.tolist(), chosen_lp[:, 0].tolist(), ranks.tolist()
    top_ids_l, top_lp_l = top_ids.tolist(), top_lp.tolist()
    return [{"token_id": chosen_l[i], "logprob": chosen_lp_l[i], "rank": ranks_l[i],
             "top": [{"token_id": t, "logprob": lp} for t, lp in zip(top_ids_l[i][:num_top[i]], top_lp_l[i][:num_top[i]])]}
            for i in range(len(chosen_l))]
