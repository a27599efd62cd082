"""Shared fixtures and helpers for the server tests (test_serve*.py, test_webui.py).

A tiny random checkpoint is built once per session by bench/bench_serve.py's builder (a BPE
tokenizer trained on a few hundred generated sentences, a 2-layer GPT with a 1024-token context so
that long generations take long enough to be interrupted), and servers are started in-process with
uvicorn on a free loopback port through :func:`lmstack.serve.app.serve_in_thread`. Test modules import the fixtures they use:

    from serve_helpers import tiny_checkpoint, API_KEY, wait_idle   # noqa: F401
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-test-key-123456"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _load_bench_serve():
    """bench/bench_serve.py (the load test) as a module: the tests share its tiny checkpoint and load driver."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


bench_serve = _load_bench_serve()
build_tiny_checkpoint = bench_serve.build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory) -> Path:
    """4 layers x 256 (3.3M parameters): slow enough that a long answer can be interrupted midway."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "wide-chat", n_layer=4, n_embd=256)


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
