"""Shared pieces of the engine / generation tests: tiny random decoders and a one-thread fixture.

    from engine_helpers import argmax_loop, one_thread, tiny_model   # noqa: F401  (the fixture is autouse)
"""

from __future__ import annotations

import pytest
import torch

from lmstack.config import tiny
from lmstack.models import build_model


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer decoder from the tiny preset with small defaults; any GPTConfig field can be overridden."""
    cfg = tiny().model
    for key, value in {**dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=4, vocab_size=101, block_size=96),
                       **overrides}.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and the CI machine is small and shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def argmax_loop(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """The plainest possible greedy reference: full forward over the whole sequence, argmax, repeat."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]
