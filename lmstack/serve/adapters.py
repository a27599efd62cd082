"""LoRA adapters served next to their base model: ``lmstack serve --model BASE --adapter NAME=DIR ...``.

    specs = [parse_adapter_spec("support=runs/sft-support/adapter"), parse_adapter_spec("runs/legal")]
    weights = [read_lora_weights(model, name, path) for name, path in specs]
    engine = Engine(model, tokenizer, adapters=weights)     # lmstack.engine.multi_lora: one batch, every adapter

Each adapter directory is in peft's layout (what ``lmstack sft --lora`` writes to RUN/adapter, or an adapter
peft saved for the exported base), read with lmstack.interop.peft_adapters. To reuse that reader's checks
and module renaming without a second copy of the base weights, the adapter is loaded onto the base model
itself, its factors copied out, and the wrapped layers put back exactly as they were (the same weight
objects; nothing is merged). An adapter for another base (module names or shapes that do not fit), or a
prompt- or prefix-tuning adapter, is refused at startup in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from lmstack.engine.multi_lora import LoRAWeights
from lmstack.errors import UserError


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` -> (NAME, DIR); a bare ``DIR`` (or one whose whole text is a directory) takes its own name."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).is_dir():
        name, path = Path(spec).resolve().name, spec
    if not name or not path:
        raise UserError(f"--adapter {spec!r}: give NAME=DIR or an adapter directory")
    return name, path


def read_lora_weights(model: nn.Module, name: str, adapter_dir: str | Path) -> LoRAWeights:
    """The factors and scaling of the LoRA adapter in ``adapter_dir``, checked against ``model``; the model is
    left as it was. UserError / ConversionError (one line) for what does not fit."""
    from lmstack.interop.peft_adapters import adapter_type, load_adapter
    from lmstack.models.peft import lora_modules

    if not Path(adapter_dir).is_dir():
        raise UserError(f"--adapter {name}={adapter_dir}: not a directory; pass an adapter directory such as "
                        "RUN/adapter from `lmstack sft --lora`")
    kind = adapter_type(adapter_dir)
    if kind != "LORA":
        raise UserError(f"--adapter {name}={adapter_dir} is a {kind} adapter; serve takes LoRA adapters only "
                        "(the engine has no input for virtual tokens)")
    grad = {id(p): p.requires_grad for p in model.parameters()}
    try:
        cfg = load_adapter(model, adapter_dir)
        factors = {module: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone())
                   for module, m in lora_modules(model).items()}
    finally:
        _unwrap(model)
        for p in model.parameters():
            p.requires_grad_(grad.get(id(p), False))
    return LoRAWeights(name, factors, cfg.scaling)


def _unwrap(model: nn.Module) -> None:
    """Put every LoRA-wrapped layer's own base layer back, unmerged (the same Parameter objects)."""
    from lmstack.models.peft import lora_modules

    for module, wrapper in lora_modules(model).items():
        if wrapper.base_layer is not None:  # a quantized base is kept whole
            original = wrapper.base_layer
        else:
            original = nn.Linear(wrapper.in_features, wrapper.out_features, bias=wrapper.bias is not None,
                                 device="meta")
            original.weight = wrapper.weight
            if wrapper.bias is not None:
                original.bias = wrapper.bias
        parent_name, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, original)
