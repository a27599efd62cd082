"""Shared pieces of the model-family tests (tests/test_models_*.py): a tiny real tokenizer and corpus,
a few-step training loop, and the greedy references the KV-cache parity tests compare against."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from lmstack.engine.kv_cache import KVCache

TEXT = (
    "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
    "all that glitters is not gold. to be or not to be, that is the question. "
    "the early bird catches the worm. actions speak louder than words. "
) * 20


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A real byte-level BPE tokenizer (with the reserved sentinel and mask tokens) on a tiny text."""
    from lmstack.tokenizer import Tokenizer

    return Tokenizer.train([TEXT], vocab_size=400)


def token_windows(batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"input_ids": x, "labels": y} windows of the tiny corpus, y = x shifted left by one, as the loader yields them."""
    ids = torch.tensor(tiny_tokenizer().encode(TEXT))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
    window = torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])  # (B, T + 1)
    return {"input_ids": window[:, :-1], "labels": window[:, 1:]}


def train_steps(model: nn.Module, objective, steps: int = 30, batch: int = 8, seq_len: int = 32,
                lr: float = 3e-3) -> list[float]:
    """Train on fixed windows of the tiny corpus with AdamW; returns the loss at every step."""
    torch.manual_seed(0)
    batch = token_windows(batch, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss, _ = objective(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def argmax_loop(model: nn.Module, prompt: list[int], n: int, **forward_kw) -> list[int]:
    """Reference greedy decoding: a full forward over the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), **forward_kw)[0]
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def cached_greedy(model: nn.Module, prompt: list[int], n: int, **prefill_kw) -> list[int]:
    """Greedy decoding through the engine's contiguous KV cache: one prefill, then one token per call."""
    cache = KVCache.for_model(model, batch_size=1, max_len=len(prompt) + n)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), kv_cache=cache, **prefill_kw)[0]
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[0]
    return out
