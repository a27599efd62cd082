"""Shared pieces of the RL tests (test_train_rollout.py, test_stages_grpo.py, test_stages_ppo.py): a tiny chat
checkpoint with verifiable arithmetic prompts, and rewards a tiny model can learn in a few dozen updates."""

from __future__ import annotations

import math
from pathlib import Path

from sft_helpers import make_sft_base

from lmstack.data.verifiable import make_prompts, write_records


def make_rl_base(root: Path) -> Path:
    """ROOT/model (an untrained 1-layer chat GPT, see sft_helpers) and ROOT/prompts.jsonl (40 arithmetic prompts)."""
    make_sft_base(root, conversations=100)
    write_records(root / "prompts.jsonl", make_prompts("arithmetic", 40, seed=0))
    return root


def digit_share(prompts: list, completions: list[str]) -> list[float]:
    """The share of a completion's characters that are digits: learnable by a random tiny model."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def raise_on_seven(prompts: list, completions: list[str]) -> list[float]:
    """Fails on the completion "answer 7": the error must name that sample."""
    if "answer 7" in completions:
        raise ValueError("boom")
    return [0.0] * len(completions)


def nan_on_third(prompts: list, completions: list[str]) -> list[float]:
    return [math.nan if i == 2 else 0.0 for i in range(len(completions))]
