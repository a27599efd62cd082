"""Shared fixtures for the evaluation tests: a tiny random-weight checkpoint with a real BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from lmstack.data.benchmarks import benchmark_texts


def make_tiny_checkpoint(path: Path, n_layer: int = 2, n_embd: int = 64, block_size: int = 256, seed: int = 0) -> Path:
    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.tokenizer import Tokenizer
    from lmstack.checkpoint import save_checkpoint
    import dataclasses

    texts = [t for _, t in zip(range(3000), benchmark_texts("arc_easy"))]
    tokenizer = Tokenizer.train(texts, vocab_size=512)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=4,
                    n_embd=n_embd)
    model = GPT(cfg).eval()
    with torch.no_grad():  # make the logits non-trivial so scorers disagree if either is wrong
        model.lm_head.weight.mul_(20)
    save_checkpoint(path, model, {"model": dataclasses.asdict(cfg)}, tokenizer=tokenizer)
    return path
