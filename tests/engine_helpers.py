"""Shared pieces of the engine / generation tests: tiny random decoders and the plain greedy reference.

    from engine_helpers import argmax_loop, tiny_model
"""

from __future__ import annotations

import torch

from lmstack.config import tiny
from lmstack.models import build_model

from family_helpers import argmax_loop  # noqa: F401  (re-exported: the one greedy reference)


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer decoder from the tiny preset with small defaults; any GPTConfig field can be overridden."""
    cfg = tiny().model
    for key, value in {**dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=4, vocab_size=101, block_size=96),
                       **overrides}.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return build_model(cfg).eval()
