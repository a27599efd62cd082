"""Text embeddings from any model family: pooled final hidden states.

    from lmstack.engine.embed import embed
    vectors = embed(model, tokenizer, ["a cat", "a dog"])          # (2, C), unit length
    similarity = cosine_similarity(vectors)                         # (2, 2)
    vectors = embed_ids(model, [[5, 6, 7], [8]], pooling="last")   # token ids in (the server's path)

Every family returns its final hidden states with ``model(idx, positions=..., return_hidden=True)``;
inputs are batched (longest first) with right padding marked by position -1, which encoders
(BERT) mask out of attention and decoders never see (causal attention only looks left). Pooling:

* ``mean`` — masked mean over the real tokens (the sentence-transformers recipe, the default);
* ``last`` — the last real token (what a decoder has read the whole text at);
* ``first`` — the first token (BERT's [CLS]).

Texts are framed the way the tokenizer's own template frames one sequence (:func:`special_frame`:
``[CLS] … [SEP]`` for BERT vocabularies, nothing for lmstack's), so an imported sentence encoder sees
what it was trained on; ``embed_ids`` takes ids as given.

Caveat: an untrained or purely generative decoder gives embeddings that are only as good as its
hidden states; use an encoder trained for similarity (e.g. an imported all-MiniLM) for search.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import UserError

POOLINGS = ("mean", "last", "first")


@torch.inference_mode()
def embed_ids(model: nn.Module, ids: Sequence[Sequence[int]], pooling: str = "mean", normalize: bool = True,
              batch_size: int = 32, pad_id: int = 0) -> torch.Tensor:
    """Token-id inputs -> (N, C) float32 embeddings, in input order. Inputs longer than the model's
    context are truncated to their first ``block_size`` tokens."""
    if pooling not in POOLINGS:
        raise UserError(f"pooling={pooling!r}: choose one of {POOLINGS}")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    context = model.config.block_size
    rows = [list(map(int, x))[:context] for x in ids]
    for i, row in enumerate(rows):
        if not row:
            raise UserError(f"input {i} is empty: there is nothing to embed")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
    out = torch.empty(len(rows), 0)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = len(rows[chunk[0]])
        idx = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        positions = torch.full((len(chunk), T), -1, dtype=torch.long)
        for r, i in enumerate(chunk):
            idx[r, :len(rows[i])] = torch.tensor(rows[i])
            positions[r, :len(rows[i])] = torch.arange(len(rows[i]))
        hidden, _ = model(idx.to(device), positions=positions.to(device), return_hidden=True)  # (B, T, C)
        pooled = pool(hidden.float(), positions.to(device) >= 0, pooling)  # (B, C)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        if out.shape[1] == 0:
            out = torch.empty(len(rows), pooled.shape[1])
        out[chunk] = pooled.cpu()
    return out


def pool(hidden: torch.Tensor, real: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden (B, T, C), real (B, T) True on real tokens (right padding) -> (B, C)."""
    if pooling == "mean":
        weights = real.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if pooling == "last":
        last = real.sum(dim=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return hidden[:, 0]


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the tokenizer's own template wraps around one text: BERT's [CLS] … [SEP]
    (an imported encoder was trained with it and its embeddings depend on it), none for lmstack's
    tokenizers. Read from the tokenizer.json post-processor by encoding a probe with and without it."""
    backend = tokenizer.hf_tokenizer() if hasattr(tokenizer, "hf_tokenizer") else None
    if backend is None or backend.post_processor is None:
        return [], []
    plain = backend.encode("a", add_special_tokens=False).ids
    framed = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain):]
    return [], []


def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], pooling: str = "mean", normalize: bool = True,
          batch_size: int = 32) -> torch.Tensor:
    """Texts -> (N, C) embeddings; see :func:`embed_ids`."""
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of texts; wrap a single text in a list")
    prefix, suffix = special_frame(tokenizer)
    ids = [prefix + row + suffix for row in tokenizer.encode_batch(list(texts))]
    try:
        pad_id = int(tokenizer.pad_id)  # any id works (padding is masked); this one is in every vocabulary
    except (AttributeError, ValueError, TypeError):
        pad_id = 0
    return embed_ids(model, ids, pooling=pooling, normalize=normalize, batch_size=batch_size, pad_id=pad_id)


def cosine_similarity(vectors: torch.Tensor) -> torch.Tensor:
    """(N, C) embeddings -> (N, N) cosine similarities (a zero vector is similar to nothing)."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, C)
    return unit @ unit.T
