"""Model registry: the only place model family names are listed.

``build_model(config)`` builds the module for ``config.family``. Each family lives in its own file
(gpt.py, ...) with its config dataclass first; every config has ``family``, ``vocab_size``,
``block_size`` and a ``validate()`` that raises lmstack.config.ConfigError.
"""

from __future__ import annotations

from typing import Any, Union

import torch.nn as nn

from lmstack.models.bert import Bert, BertConfig
from lmstack.models.gpt import GPT, GLMConfig, GPTConfig, PrefixLMConfig
from lmstack.models.moe import MoE, MoEConfig
from lmstack.models.t5 import T5, T5Config

# family name -> (config class, model class)
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "prefix_lm": (PrefixLMConfig, GPT),  # same architecture, prefix-LM objective
    "glm": (GLMConfig, GPT),  # same architecture, blank-infilling objective
    "moe": (MoEConfig, MoE),
    "t5": (T5Config, T5),
    "bert": (BertConfig, Bert),
}
MODEL_CONFIGS: dict[str, type] = {name: cfg for name, (cfg, _) in FAMILIES.items()}
# families that speak the decoder forward / KV-cache contract (docs/CONTRACTS.md), i.e. the engine can serve them
DECODER_FAMILIES = frozenset({"gpt", "prefix_lm", "glm", "moe"})
ModelConfig = Union[GPTConfig, BertConfig, Any]  # any registered family's config dataclass


def build_model(config: Any) -> nn.Module:
    family = getattr(config, "family", None)
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is not supported; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family][1](config)
