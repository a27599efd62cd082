"""Shared helpers for the server tests (test_serve*.py): the tiny checkpoint builder, health polling.

A tiny random checkpoint is built once per session (a BPE tokenizer trained on a few hundred generated
sentences, a 2-layer GPT with a 1024-token context so that long generations take long enough to be
interrupted), and servers are started in-process with uvicorn on a free loopback port through
:func:`lmstack.serve.run.serve_in_thread`. The fixtures built from it (``tiny_checkpoint``, ``wide_checkpoint``) are in tests/conftest.py.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import torch

from lmstack.checkpoint import save_checkpoint
from lmstack.config import model_config_to_dict, tiny
from lmstack.models import build_model
from lmstack.tokenizer import Tokenizer

API_KEY = "sk-test-key-123456"
CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser download is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
WORDS = ("the model reads a token and writes the next one while the server streams every piece "
         "of text to the client who asked a question about cats dogs rivers code numbers and time").split()


def random_words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def build_tiny_checkpoint(path: Path, block_size: int = 1024, n_layer: int = 2, n_embd: int = 64,
                          seed: int = 0) -> Path:
    """A random-weight GPT with a BPE tokenizer trained on generated sentences (seconds on a CPU)."""
    rng = random.Random(seed)
    lines = [random_words(rng, 4, 14).capitalize() + rng.choice(".?!:") + f" {i % 10}" for i in range(400)]
    tokenizer = Tokenizer.train(lines, vocab_size=384)
    cfg = tiny().model
    cfg.vocab_size, cfg.block_size = tokenizer.vocab_size, block_size
    cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd = n_layer, 2, 2, n_embd
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(cfg), {"model": model_config_to_dict(cfg)}, tokenizer=tokenizer)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Poll /health until nothing runs or waits and the KV cache is empty; returns the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = health(url)["engine"]
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_tokens_used"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine did not become idle within {timeout} s: {stats}")
        time.sleep(0.05)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
