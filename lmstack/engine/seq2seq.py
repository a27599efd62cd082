"""Conditional generation for encoder-decoder models (the ``t5`` family): encode once, then decode token by
token with a decoder KV cache and the engine's sampler.

    from lmstack.engine.sampling import SamplingParams
    from lmstack.engine.seq2seq import generate_seq2seq

    ids = generate_seq2seq(model, [[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=12),
                           decoder_start_id=tokenizer.eot_id, eos_id=tokenizer.eot_id)   # -> [[...], [...]]

The batched :class:`~lmstack.engine.engine.Engine` serves the decoder-only families (slotted KV cache,
continuous batching, CUDA graphs). An encoder-decoder also attends to its encoder's output, which that cache
does not hold, so it gets this plain loop instead: the model's ``encode`` runs once per batch,
``decoder_cache`` projects the cross-attention keys/values once, and each step feeds one new decoder token
(``use_cache=False`` reruns the whole decoder every step: the reference the cached path is tested against).

Sampling is :func:`lmstack.engine.sampling.sample`, the engine's: temperature, top-k / top-p / min-p and the
penalties behave exactly as there, and every row draws from its own generator seeded with ``params.seed``
(drawn from torch's global RNG when None), so a seeded row's output does not depend on what else shares the
batch. Penalties count the generated tokens only: the encoder input is not the decoder's prompt.

A row ends at ``eos_id`` (unless ``params.ignore_eos``) or at one of ``params.stop_token_ids``; the end token is
not returned. Caveats: token ids in, token ids out, so stop *strings*, ``n > 1`` and log-probabilities are
refused rather than ignored; the batch runs until its last row has finished (rows that ended earlier are
still computed, their tokens dropped).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from lmstack.engine.sampling import SamplingParams, SamplingRow, make_generator, sample
from lmstack.errors import UserError


def pad_encoder_inputs(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> right-padded ids (B, S) and the mask (B, S), True on real tokens."""
    rows = [list(r) for r in rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise UserError("encoder-decoder generation needs at least one non-empty encoder input per row")
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return ids, mask


def _check_params(params: SamplingParams) -> None:
    params.validate()
    if params.stop:
        raise UserError("encoder-decoder generation speaks token ids, so stop strings cannot be matched here; "
                        "pass stop_token_ids instead (or cut the decoded text yourself)")
    if params.n != 1:
        raise UserError(f"n={params.n}: encoder-decoder generation makes one sample per row; repeat the input "
                        "row with different seeds for more")
    if params.logprobs is not None or params.prompt_logprobs is not None:
        raise UserError("encoder-decoder generation does not return log-probabilities; leave logprobs and "
                        "prompt_logprobs unset")


@torch.no_grad()
def generate_seq2seq(model: nn.Module, encoder_ids: torch.Tensor | Sequence[Sequence[int]],
                     params: SamplingParams | Sequence[SamplingParams] | None = None, *, decoder_start_id: int,
                     eos_id: int | None = None, encoder_mask: torch.Tensor | None = None,
                     use_cache: bool = True) -> list[list[int]]:
    """Generated token ids per encoder row (greedy by default), each cut before its end token.

    ``encoder_ids``: a (B, S) tensor (with ``encoder_mask`` (B, S), True on real tokens, when padded) or a
    list of id lists (padded and masked here). ``params``: one SamplingParams for every row or one per row;
    ``max_tokens`` bounds each row. The decoder starts from ``decoder_start_id`` (the span-corruption
    objective trains it to start from the tokenizer's ``eot_id``).
    """
    if not (hasattr(model, "encode") and hasattr(model, "decoder_cache")):
        raise UserError(f"{type(model).__name__} is not an encoder-decoder model; decoder-only families "
                        "generate with lmstack.engine (Engine or generate)")
    if not torch.is_tensor(encoder_ids):
        encoder_ids, encoder_mask = pad_encoder_inputs(encoder_ids)
    B = encoder_ids.shape[0]
    params_list = list(params) if isinstance(params, (list, tuple)) else [params] * B
    if len(params_list) != B:
        raise UserError(f"{B} encoder rows but {len(params_list)} SamplingParams")
    params_list = [p or SamplingParams(temperature=0.0) for p in params_list]
    for p in params_list:
        _check_params(p)

    device = next(model.parameters()).device
    encoder_ids = encoder_ids.to(device)
    encoder_mask = encoder_mask.to(device) if encoder_mask is not None else None
    generators = [None if p.greedy else make_generator(
        p.seed if p.seed is not None else int(torch.randint(0, 2 ** 62, ())), device) for p in params_list]
    stops = [set(p.stop_token_ids) | ({eos_id} if eos_id is not None and not p.ignore_eos else set())
             for p in params_list]
    outputs: list[list[int]] = [[] for _ in range(B)]
    running = [p.max_tokens > 0 for p in params_list]

    was_training = model.training
    model.eval()
    try:
        encoder_hidden = model.encode(encoder_ids, encoder_mask)  # (B, S, C)
        cache = model.decoder_cache(encoder_hidden) if use_cache else None
        sequence = torch.full((B, 1), decoder_start_id, dtype=torch.long, device=device)  # (B, 1 + steps)
        while any(running):
            step_input = sequence[:, -1:] if use_cache else sequence
            hidden = model.decode(step_input, encoder_hidden, encoder_mask, cache)  # (B, T, C)
            logits = model.lm_head(hidden[:, -1])  # (B, V)
            rows = [SamplingRow(p, g, (), out) for p, g, out in zip(params_list, generators, outputs)]
            next_ids = sample(logits, rows)  # (B,)
            for i, token in enumerate(next_ids.tolist()):
                if not running[i]:
                    continue  # an ended row still decodes with the batch; its tokens are dropped
                if token in stops[i]:
                    running[i] = False
                    continue
                outputs[i].append(token)
                running[i] = len(outputs[i]) < params_list[i].max_tokens
            sequence = torch.cat([sequence, next_ids[:, None]], dim=1)
    finally:
        model.train(was_training)
    return outputs
