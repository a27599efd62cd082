"""Training objectives as pure functions: ``objective(model, x, y) -> (loss, metrics)``.

The one training loop (train/loop.py) is family-agnostic: it draws (x, y) token windows from the
loader and hands them to the objective chosen for the model family by :func:`objective_for`. A new
pretraining objective (masked LM, span corruption, blank infilling, ...) is a function here plus a
line in ``OBJECTIVES``; it never copies the loop. ``metrics`` holds floats for logging only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def causal_lm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token prediction. x, y: (B, T) with y = x shifted left by one; -1 in y is ignored."""
    _, loss = model(x, y)
    return loss, {}


# family name -> objective used by `lmstack pretrain`
OBJECTIVES: dict[str, Objective] = {
    "gpt": causal_lm,
}


def objective_for(model_config: Any, tokenizer: Any = None) -> Objective:
    """The pretraining objective for a model family.

    Registry entries are either objectives themselves or factories marked with
    ``needs_tokenizer = True`` that take the tokenizer (for mask / sentinel token ids) and return one.
    """
    family = getattr(model_config, "family", "gpt")
    if family not in OBJECTIVES:
        raise ValueError(f"no pretraining objective registered for model family {family!r}")
    entry = OBJECTIVES[family]
    if getattr(entry, "needs_tokenizer", False):
        if tokenizer is None:
            raise ValueError(f"the {family!r} objective needs the tokenizer (for its special tokens)")
        return entry(tokenizer)
    return entry
