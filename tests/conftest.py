"""Fixtures shared by the whole suite. Plain helper functions live in tests/*_helpers.py and are imported
as ``from engine_helpers import tiny_model`` (pyproject puts tests/ on pytest's pythonpath).

    pytestmark = pytest.mark.usefixtures("one_thread")   # a module whose tiny models run single-threaded
    def test_x(tiny_checkpoint): ...                      # the session's tiny chat checkpoint
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_helpers import build_tiny_checkpoint


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning threads
    per test slow it down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer GPT with a BPE tokenizer and a 1024-token context (built once per session)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory) -> Path:
    """4 layers x 256 (3.3M parameters): slow enough that a long answer can be interrupted midway."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "wide-chat", n_layer=4, n_embd=256)
