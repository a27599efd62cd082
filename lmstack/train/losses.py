"""Training objectives: ``objective(model, batch) -> (loss, metrics)``, each an :class:`Objective`.

The one training loop (train/loop.py) is family-agnostic: it draws batches (:data:`Batch`, a dict of
tensors; pretraining loaders yield ``{"input_ids": x, "labels": y}``, y = x shifted left by one, -1
where a position has no target) and hands them to the objective, here the one chosen for the model
family by :func:`objective_for`. ``metrics`` holds floats for logging, and always ``"tokens"``: the
number of real tokens in the batch (labels other than -1, :func:`real_tokens`). The loop sums it for
tokens/s and MFU, so padded or packed batches are not overcounted, and weights validation averages
by it. The pretraining objectives count the loader's labels even where they score other positions
(masked LM scores ~15% of them), so throughput compares across families.

An :class:`Objective` also says whether the loop's loss-spike guard may judge it
(``judge_spikes``): true for language-model losses, which are positive and move slowly; an
objective whose loss may be negative or noisy (preference or policy losses) sets it false, and is
then only skipped on a non-finite loss or gradient.

Every pretraining objective has a factory with one signature, ``make(tokenizer) -> Objective``: the
span and mask objectives read their special token ids from the tokenizer, the others ignore it. The
model registry (``lmstack.models.FAMILIES``) is the only list of families; each entry names its
objective, and :data:`FACTORIES` maps that name to the factory here. A new objective is a function
plus one line in ``FACTORIES``; it never copies the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.devices import unwrap_model
from lmstack.errors import ConfigError, DataError
from lmstack.models import family_of
from lmstack.models.moe import routing_metrics

Batch = dict[str, torch.Tensor]  # pretraining: {"input_ids": (B, T), "labels": (B, T)}
ObjectiveFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Objective:
    """A loss function ``fn(model, batch) -> (loss, metrics)`` plus what the loop needs to know about it.

    Use it as a decorator (``@Objective``) or call it (``Objective(fn, judge_spikes=False)``).
    ``judge_spikes``: the loop may skip a batch whose loss is far above its running mean (LM losses).
    """

    fn: ObjectiveFn
    judge_spikes: bool = True

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.fn(model, batch)


ObjectiveFactory = Callable[[Any], Objective]  # tokenizer (None where the objective needs none) -> objective


def real_tokens(batch: Batch) -> int:
    """Tokens with a target in the batch: labels other than -1 (padding and masked prompts are not counted)."""
    return int((batch["labels"] != -1).sum())



def packed_layout(batch: Batch) -> dict[str, torch.Tensor]:
    """The ``positions`` / ``document_ids`` of a packed batch (lmstack.data.instruct), empty otherwise."""
    return {key: batch[key] for key in ("positions", "document_ids") if key in batch}

@Objective
def causal_lm(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token prediction. input_ids, labels: (B, T), labels = input_ids shifted left by one; -1 is ignored.
    A packed batch also carries ``positions`` and ``document_ids`` (B, T), handed to the model so that no
    packed conversation attends to another."""
    _, loss = model(batch["input_ids"], batch["labels"], **packed_layout(batch))
    return loss, {"tokens": real_tokens(batch)}


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head (C -> V) to apply outside the model's forward, or None where that is not possible.

    Reaches through DDP / torch.compile (:func:`unwrap_model`) and the prompt- and prefix-tuning wrappers
    (``.base``). None when the model has no ``lm_head`` or its weight is a DTensor (FSDP2 shards it and
    tensor parallelism splits it: the head must then run inside the wrapped forward)."""
    inner = unwrap_model(model)
    inner = getattr(inner, "base", inner)  # PromptTuned / PrefixTuned hold the decoder as .base
    head = getattr(inner, "lm_head", None)
    weight = getattr(head, "weight", None)
    if head is None or weight is None or type(weight).__name__ == "DTensor":
        return None
    return head


@Objective
def causal_lm_at_labels(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`causal_lm` with the output head and the cross-entropy computed only where a label is set.

    Fine-tuning on assistant turns trains a fraction of the positions; the full path forms (and
    back-propagates through) logits (B, T, V) everywhere, most of them thrown away by ``ignore_index``. Here
    the decoder returns its final hidden states (B, T, C), the rows with a label are gathered (N, C), and the
    head and an fp32 cross-entropy run on those N rows only: the same mean loss and gradients (a test pins
    both to :func:`causal_lm` on padded and packed batches), about T*B/N times less head work. The N rows'
    logits (N, V) are formed at once: N is the batch's trained tokens, never more than the full path's B*T.
    A model whose head cannot run outside its forward (:func:`output_head` is None: FSDP2, tensor
    parallel) takes the full path."""
    head = output_head(model)
    if head is None:
        return causal_lm(model, batch)
    labels = batch["labels"]  # (B, T)
    hidden, _ = model(batch["input_ids"], return_hidden=True, **packed_layout(batch))  # (B, T, C)
    trained = labels != -1  # (B, T)
    logits = head(hidden[trained]).float()  # (N, V)
    loss = F.cross_entropy(logits, labels[trained])
    return loss, {"tokens": int(trained.sum())}


def _eval_generator(model: nn.Module) -> torch.Generator | None:
    """Training draws masks from the global RNG (seeded and checkpointed by the loop); validation
    uses a fixed generator so every validation pass scores the same corruption pattern."""
    return None if model.training else torch.Generator().manual_seed(0)


@Objective
def prefix_lm(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Prefix LM (T5 / U-PaLM): per sequence a split point L uniform in [1, T-1]; positions < L attend
    bidirectionally, the loss covers the predictions of tokens L..T only (position L-1 onwards),
    since inside the prefix the next token is visible."""
    x, y = batch["input_ids"], batch["labels"]
    B, T = x.shape
    if T < 2:
        raise ConfigError(f"the prefix-LM objective needs windows of at least 2 tokens (train.seq_len={T}); "
                          "raise train.seq_len")
    prefix_len = torch.randint(1, T, (B,), generator=_eval_generator(model))  # (B,)
    hidden = torch.arange(T)[None, :] < (prefix_len[:, None] - 1)  # (B, T) targets inside the prefix
    targets = y.masked_fill(hidden.to(y.device), -1)
    _, loss = model(x, targets, prefix_len=prefix_len.to(x.device))
    return loss, {"prefix_frac": float(prefix_len.float().mean()) / T, "tokens": real_tokens(batch)}


@Objective
def moe_lm(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token prediction for mixture-of-experts models plus their auxiliary router losses
    (load balancing, z-loss) while training; validation returns the plain LM loss so it compares
    with dense models. Metrics: lm_loss and the routing statistics of models/moe.py."""
    _, lm_loss, aux = model(batch["input_ids"], batch["labels"], return_aux=True, **packed_layout(batch))
    metrics = {"lm_loss": float(lm_loss.detach()), **routing_metrics(aux["stats"]), "tokens": real_tokens(batch)}
    return (lm_loss + aux["loss"] if model.training else lm_loss), metrics


# ----------------------------------------------------------------------------- span corruption / infilling

SENTINELS = [f"<|sentinel_{i}|>" for i in range(16)]
MASK_TOKEN = "<|mask|>"


def special_token_ids(tokenizer: Any, names: list[str], purpose: str) -> list[int]:
    """Ids of the tokenizer's special tokens ``names``; a clear error when there is no tokenizer or one is missing."""
    if tokenizer is None:
        raise ConfigError(f"the {purpose} objective needs the tokenizer (for its special tokens); pass the "
                          "tokenizer the data was tokenized with")
    table = getattr(tokenizer, "special_tokens", None) or {}
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"{purpose} needs the special token(s) {', '.join(missing)}, which this tokenizer lacks; "
                         "train a tokenizer with `lmstack tokenizer train` (it reserves <|sentinel_0..15|> and "
                         "<|mask|>) and re-tokenize the data")
    return [int(table[n]) for n in names]


def span_layout(length: int, noise_density: float, mean_span: float, max_spans: int) -> tuple[int, int]:
    """(noise tokens, spans) for a window of ``length`` tokens: round(length * density) noise tokens
    in round(noise / mean_span) spans, at most ``max_spans`` (one sentinel each); when capped the
    spans get longer rather than the noise smaller."""
    if length < 2:
        raise ConfigError(f"span corruption needs windows of at least 2 tokens (train.seq_len={length}); "
                          "raise train.seq_len")
    n_noise = min(max(1, round(length * noise_density)), length - 1)
    n_spans = max(1, min(round(n_noise / mean_span), max_spans, n_noise, length - n_noise))
    return n_noise, n_spans


def _random_partition(total: int, parts: int, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """(batch, parts) positive integers, each row summing to ``total``, uniformly over compositions."""
    if parts == 1:
        return torch.full((batch, 1), total, dtype=torch.long)
    cuts = torch.rand(batch, total - 1, generator=generator).argsort(dim=1)[:, :parts - 1] + 1  # distinct, 1..total-1
    bounds = torch.cat([torch.zeros(batch, 1, dtype=torch.long), cuts.sort(dim=1).values,
                        torch.full((batch, 1), total, dtype=torch.long)], dim=1)  # (batch, parts + 1)
    return bounds.diff(dim=1)


def random_span_mask(batch: int, length: int, n_noise: int, n_spans: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, length) bool, True on noise: n_spans noise spans totalling n_noise tokens, separated by
    (and starting after) kept runs, all span and run lengths random (T5's random_spans_noise_mask)."""
    noise_lengths = _random_partition(n_noise, n_spans, batch, generator)  # (B, n)
    keep_lengths = _random_partition(length - n_noise, n_spans, batch, generator)  # (B, n)
    lengths = torch.stack([keep_lengths, noise_lengths], dim=2).view(batch * 2 * n_spans)  # keep, noise, keep, ...
    pattern = torch.tensor([False, True]).repeat(batch * n_spans)  # (B * 2n,)
    return pattern.repeat_interleave(lengths).view(batch, length)


def split_spans(tokens: torch.Tensor, noise_mask: torch.Tensor, n_spans: int, input_markers: torch.Tensor,
                span_markers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the noise spans out of ``tokens`` (B, L).

    Returns ``corrupted`` (B, L - noise + n_spans): the tokens with span i collapsed to
    input_markers[i], and ``spans`` (B, noise + n_spans): span_markers[i] followed by span i's tokens,
    for every span in order. Every row must have the same noise count and span count; the marker
    tensors hold at least n_spans ids.
    """
    B, L = tokens.shape
    n_noise = int(noise_mask[0].sum())
    span_start = noise_mask & ~F.pad(noise_mask[:, :-1], (1, 0))  # (B, L) first token of each span
    span_index = (span_start.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L) span of each noise token
    with_markers = torch.where(span_start, input_markers[span_index], tokens)
    corrupted = with_markers[~noise_mask | span_start].view(B, L - n_noise + n_spans)
    noise_tokens = tokens[noise_mask].view(B, n_noise)
    starts = span_start[noise_mask].view(B, n_noise)
    # noise token j lands after the markers of its own and every earlier span
    dest = torch.arange(n_noise, device=tokens.device) + starts.long().cumsum(dim=1)  # (B, noise)
    spans = torch.empty(B, n_noise + n_spans, dtype=tokens.dtype, device=tokens.device)
    spans.scatter_(1, dest, noise_tokens)
    spans.scatter_(1, (dest[starts] - 1).view(B, n_spans), span_markers[:n_spans].expand(B, n_spans))
    return corrupted, spans


def span_corruption(tokenizer: Any) -> Objective:
    """T5's denoising objective for the ``t5`` family (noise density and mean span from the model config).

    Encoder: the window with each noise span replaced by ``<|sentinel_i|>``. Decoder target:
    ``<|sentinel_0|> span_0 <|sentinel_1|> span_1 ... <|endoftext|>``, decoder input the same shifted
    right behind ``<|endoftext|>`` (the decoder start token to give ``engine.seq2seq.generate_seq2seq``).
    """
    sentinels = torch.tensor(special_token_ids(tokenizer, SENTINELS, "span corruption"))
    eot = int(tokenizer.eot_id)

    @Objective
    def objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["input_ids"]
        cfg = unwrap_model(model).config
        B, L = x.shape
        n_noise, n_spans = span_layout(L, cfg.noise_density, cfg.mean_span, len(sentinels))
        noise_mask = random_span_mask(B, L, n_noise, n_spans, _eval_generator(model)).to(x.device)
        markers = sentinels.to(x.device)
        encoder_input, spans = split_spans(x, noise_mask, n_spans, markers, markers)
        boundary = torch.full((B, 1), eot, dtype=x.dtype, device=x.device)
        decoder_input = torch.cat([boundary, spans], dim=1)  # (B, noise + n_spans + 1)
        targets = torch.cat([spans, boundary], dim=1)
        _, loss = model(encoder_input, decoder_input, targets)
        return loss, {"tokens": real_tokens(batch)}

    return objective


def glm_layout(window: int, noise_density: float, mean_span: float, max_spans: int) -> tuple[int, int, int]:
    """(source tokens, noise tokens, spans) so that blank infilling's part A + part B fits ``window``:
    a source of L tokens with n spans becomes L + 2n tokens (one mask and one start token per span)."""
    for length in range(window, 1, -1):
        n_noise, n_spans = span_layout(length, noise_density, mean_span, max_spans)
        if length + 2 * n_spans <= window:
            return length, n_noise, n_spans
    raise ConfigError(f"blank infilling needs windows of at least 4 tokens (train.seq_len={window}); "
                      "raise train.seq_len")


def blank_infilling(tokenizer: Any, noise_density: float = 0.15, mean_span: float = 3.0) -> Objective:
    """GLM's autoregressive blank infilling for the ``glm`` family.

    Part A: the source with each sampled span replaced by one ``<|mask|>``, attended bidirectionally
    (prefix-LM mask). Part B: for each span in order, ``<|sentinel_i|>`` (its start token) followed
    by the span, generated causally; after the last span the model predicts ``<|endoftext|>``. The
    loss covers part B only. The source is the window's first L tokens, L chosen so A + B fits the
    window. Unlike GLM, spans keep their text order and the start token names the blank: GLM shuffles
    spans and identifies them with 2-D positions, which 1-D position-based masks cannot express.
    """
    mask_id, = special_token_ids(tokenizer, [MASK_TOKEN], "blank infilling")
    starts = torch.tensor(special_token_ids(tokenizer, SENTINELS, "blank infilling"))
    eot = int(tokenizer.eot_id)

    @Objective
    def objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["input_ids"]
        B, T = x.shape
        length, n_noise, n_spans = glm_layout(T, noise_density, mean_span, len(starts))
        noise_mask = random_span_mask(B, length, n_noise, n_spans, _eval_generator(model)).to(x.device)
        part_a, part_b = split_spans(x[:, :length], noise_mask, n_spans,
                                     torch.full((n_spans,), mask_id, device=x.device), starts.to(x.device))
        inputs = torch.cat([part_a, part_b], dim=1)  # (B, length + 2n)
        ignore = torch.full_like(part_a, -1)
        boundary = torch.full((B, 1), eot, dtype=x.dtype, device=x.device)
        # position t predicts input t+1: nothing inside part A (nor its first start token), then
        # part B's span tokens and next start tokens, then the end
        targets = torch.cat([ignore, part_b[:, 1:], boundary], dim=1)
        prefix_len = torch.full((B,), part_a.shape[1], device=x.device)
        _, loss = model(inputs, targets, prefix_len=prefix_len)
        return loss, {"tokens": real_tokens(batch)}

    return objective


# ----------------------------------------------------------------------------- masked LM

def mlm_mask(x: torch.Tensor, special: torch.Tensor, mask_id: int, mask_prob: float = 0.15,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of a batch x (B, T) -> (inputs, targets), both (B, T).

    Each token that is not special (``special``: (V,) bool over the vocabulary) is chosen with
    probability ``mask_prob``, at least one per batch. A chosen token becomes ``mask_id`` 80% of the
    time, a random non-special token 10%, and stays 10%. targets hold the original token at chosen
    positions and -1 elsewhere. Draws come from ``generator`` (CPU) or the global RNG.
    """
    special = special.to(x.device)
    regular_ids = (~special).nonzero().squeeze(1)  # random replacements never inject special tokens
    draws = torch.rand(3, *x.shape, generator=generator).to(x.device)  # choose?, how?, which random token
    maskable = ~special[x.clamp(max=special.numel() - 1)]  # (B, T)
    chosen = (draws[0] < mask_prob) & maskable
    if not bool(chosen.any()):  # a batch without targets has no loss; force the likeliest maskable position
        chosen.view(-1)[int((draws[0] + 2.0 * ~maskable).argmin())] = True
    to_mask = chosen & (draws[1] < 0.8)
    to_random = chosen & (draws[1] >= 0.8) & (draws[1] < 0.9)
    random_tokens = regular_ids[(draws[2] * len(regular_ids)).long().clamp(max=len(regular_ids) - 1)]  # (B, T)
    inputs = torch.where(to_mask, torch.full_like(x, mask_id), x)
    inputs = torch.where(to_random, random_tokens, inputs)
    return inputs, x.masked_fill(~chosen, -1)


def masked_lm(tokenizer: Any, mask_prob: float = 0.15) -> Objective:
    """BERT's masked-LM objective for the ``bert`` family (the corruption is :func:`mlm_mask`).

    The loss is the cross-entropy of the original token at the chosen positions only. The loader's
    next-token labels are ignored: the window ``input_ids`` is its own target. Imported BERT
    tokenizers call the mask token ``[MASK]``; it is used when ``<|mask|>`` is absent.
    Metrics: ``mlm_acc`` (accuracy at chosen positions) and ``masked_frac``.
    """
    specials = getattr(tokenizer, "special_tokens", None) or {}
    mask_name = MASK_TOKEN if MASK_TOKEN in specials or "[MASK]" not in specials else "[MASK]"
    mask_id, = special_token_ids(tokenizer, [mask_name], "masked LM")
    special = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    special[list(specials.values())] = True

    @Objective
    def objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["input_ids"]
        inputs, targets = mlm_mask(x, special, mask_id, mask_prob, _eval_generator(model))
        logits, loss = model(inputs, targets)
        chosen = targets >= 0
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == x)[chosen].float().mean()
        return loss, {"mlm_acc": float(accuracy), "masked_frac": float(chosen.float().mean()),
                      "tokens": real_tokens(batch)}

    return objective


def _ignoring_tokenizer(objective: Objective) -> ObjectiveFactory:
    """The factory of an objective that needs nothing from the tokenizer."""
    def make(tokenizer: Any) -> Objective:
        return objective

    return make


# objective name (``Family.objective`` in lmstack.models) -> its factory
FACTORIES: dict[str, ObjectiveFactory] = {
    "causal_lm": _ignoring_tokenizer(causal_lm),
    "prefix_lm": _ignoring_tokenizer(prefix_lm),
    "moe_lm": _ignoring_tokenizer(moe_lm),
    "span_corruption": span_corruption,
    "blank_infilling": blank_infilling,
    "masked_lm": masked_lm,
}


def objective_for(model_config: Any, tokenizer: Any = None) -> Objective:
    """The pretraining objective of a model config's family (``FAMILIES[family].objective``).

    ``tokenizer`` supplies the special tokens of the span and mask objectives; without it they raise a
    ConfigError that says so. An unknown family is a ConfigError naming the registered ones.
    """
    return FACTORIES[family_of(model_config).objective](tokenizer)
