"""Model registry: the only place model family names are listed.

``build_model(config)`` builds the module for ``config.family``. Each family lives in its own file
(gpt.py, ...) with its config dataclass first; every config has ``family``, ``vocab_size``,
``block_size`` and a ``validate()`` that raises lmstack.errors.ConfigError.

``FAMILIES`` says what a family is: its config, its module, the name of its pretraining objective (the
factory lives in ``lmstack.train.losses.FACTORIES``) and whether the engine can decode with it. Every other
module asks this registry (``family_of``, ``is_decoder``, ``DECODER_FAMILIES``) instead of listing names.
Adding a family is a file here, one line in ``FAMILIES`` and, for a new objective, one factory in losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lmstack.errors import ConfigError

from lmstack.models.bert import Bert, BertConfig
from lmstack.models.gpt import GPT, GLMConfig, GPTConfig, PrefixLMConfig
from lmstack.models.moe import MoE, MoEConfig
from lmstack.models.t5 import T5, T5Config


@dataclass(frozen=True)
class Family:
    """What a model family is, in one place.

    ``objective`` names the pretraining objective factory in :mod:`lmstack.train.losses` (a name, not the
    function, because models sit below train in the layering); ``decodes`` says whether the family speaks
    the decoder forward / KV-cache contract (docs/CONTRACTS.md), i.e. whether the engine can generate
    with it.
    """

    name: str
    config: type
    model: type[nn.Module]
    objective: str
    decodes: bool


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt", GPTConfig, GPT, objective="causal_lm", decodes=True),
    Family("prefix_lm", PrefixLMConfig, GPT, objective="prefix_lm", decodes=True),  # GPT + prefix-LM objective
    Family("glm", GLMConfig, GPT, objective="blank_infilling", decodes=True),  # GPT + blank infilling
    Family("moe", MoEConfig, MoE, objective="moe_lm", decodes=True),
    Family("t5", T5Config, T5, objective="span_corruption", decodes=False),  # encoder-decoder: engine.seq2seq
    Family("bert", BertConfig, Bert, objective="masked_lm", decodes=False),  # encoder only
)}
MODEL_CONFIGS: dict[str, type] = {name: f.config for name, f in FAMILIES.items()}
DECODER_FAMILIES = frozenset(name for name, f in FAMILIES.items() if f.decodes)
ModelConfig = Any  # any registered family's config dataclass (MODEL_CONFIGS)


def family_of(config: Any) -> Family:
    """The registry entry for a model config (or a family name); ConfigError names the valid families."""
    name = config if isinstance(config, str) else getattr(config, "family", None)
    if name not in FAMILIES:
        raise ConfigError(f"model family {name!r} is not supported; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def is_decoder(config: Any) -> bool:
    """True when the engine can generate with this family (decoder forward with a KV cache)."""
    return family_of(config).decodes


def build_model(config: Any) -> nn.Module:
    """The module of ``config``'s family, freshly initialised (the config is validated first)."""
    return family_of(config).model(config)
