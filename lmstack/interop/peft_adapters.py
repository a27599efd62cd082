"""Adapters in the ``peft`` library's file layout: LoRA (save ours, load ours or peft's), prompt tuning and
prefix tuning (save ours for peft, load ours or peft's).

    apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))  # lmstack.models.peft
    ... train ...
    save_adapter(model, lora_cfg, "adapters/mine", base_model_name_or_path="hf/base")
    # elsewhere, on the base exported with `lmstack export --format hf --out hf/base`:
    #   PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("hf/base"), "adapters/mine")
    load_adapter(fresh_model, "adapters/mine")  # wraps the adapter's modules and loads the factors

An adapter directory holds ``adapter_config.json`` (peft's LoraConfig fields) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), where ``<module>`` is the module's name in the Hugging Face model. For
a model that ``lmstack export --format hf`` can write as Llama (hf_export.check_llama_compatible) the
names are the export's: ``blocks.3.attn.q_proj`` is ``model.layers.3.self_attn.q_proj``,
``blocks.3.mlp.up_proj`` is ``model.layers.3.mlp.up_proj``, ``lm_head`` stays ``lm_head``. Any other
model (another family, or GPT options Llama cannot express) keeps lmstack's own module names: the
directory is in peft's layout and :func:`load_adapter` reads it back, but ``transformers`` has no
matching base model to put it on.

``target_modules`` in the written config is the list of the wrapped layers' last names (``["q_proj",
"v_proj"]``) when every linear layer with those names was wrapped, and otherwise one regular expression
naming exactly the wrapped modules, so peft wraps the same set. Loading wraps the modules the tensor
file names (not the config's patterns, which may be written for either naming).

Caveats: peft options this code does not implement are refused by name rather than loaded into a model
that would compute something else: DoRA, trainable biases (``bias`` other than "none"), per-module rank
or alpha (``rank_pattern`` / ``alpha_pattern``), ``modules_to_save``, ``fan_in_fan_out`` and adapters on
embeddings. Saving writes the factors in their training dtype.

Prompt and prefix tuning (lmstack.models.peft.PromptTuned / PrefixTuned):

    save_prompt_adapter(tuned, "adapters/soft", base_model_name_or_path="hf/base")
    #   PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("hf/base"), "adapters/soft")
    tuned = load_prompt_adapter(fresh_model, "adapters/soft")   # a PromptTuned or PrefixTuned wrapper
    adapter_type("adapters/soft")                                # "LORA" | "PROMPT_TUNING" | "PREFIX_TUNING"

peft stores both as one tensor named ``prompt_embeddings``. Prompt tuning: the virtual tokens, (N, C),
with ``token_dim`` C, ``num_layers`` and ``num_attention_heads`` of the model in the config. Prefix
tuning (no ``prefix_projection``): (N, L * 2 * H_kv * D), which peft views as (N, 2L, H_kv, D) and
reads layer i's keys at row 2i and its values at 2i + 1; ``token_dim`` is H_kv * D and
``num_attention_heads`` is H_kv (peft's convention for grouped-query attention). The keys are stored as
attention sees them, after the rotary encoding, which is also what peft puts in the cache. The
``prompt_tuning_init`` written (RANDOM, SAMPLE_VOCAB or TEXT) records how training started; peft does not
rerun an initialisation when it loads weights for inference. Refused when loading: a prefix adapter with
``prefix_projection`` (its MLP-reparameterised form), more than one transformer submodule
(encoder-decoders), and one whose sizes do not fit the model (another base).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmstack.errors import ConversionError
from lmstack.interop.common import read_json_object
from lmstack.interop.hf_export import check_llama_compatible
from lmstack.models.peft import (PROMPT_KEY, LoRAConfig, PrefixTuned, PrefixTuningConfig, PromptTuned,
                                 PromptTuningConfig, apply_lora, apply_prefix_tuning, apply_prompt_tuning,
                                 linear_layers, load_lora_state_dict, load_prefix_tuning_state_dict,
                                 load_prompt_tuning_state_dict, lora_modules, lora_state_dict)

ADAPTER_TYPES = ("LORA", "PROMPT_TUNING", "PREFIX_TUNING")
PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # lmstack's init names -> peft's
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the HF model as base_model (LoraModel), which holds it as model
FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

# lmstack GPT module paths <-> the Llama export's (hf_export.llama_hf_state)
OURS_TO_HF = [(re.compile(r"blocks\.(\d+)\.attn\.(\w+)"), r"model.layers.\1.self_attn.\2"),
              (re.compile(r"blocks\.(\d+)\.mlp\.(\w+)"), r"model.layers.\1.mlp.\2"),
              (re.compile(r"lm_head"), "lm_head")]
HF_TO_OURS = [(re.compile(r"model\.layers\.(\d+)\.self_attn\.(\w+)"), r"blocks.\1.attn.\2"),
              (re.compile(r"model\.layers\.(\d+)\.mlp\.(\w+)"), r"blocks.\1.mlp.\2"),
              (re.compile(r"lm_head"), "lm_head")]

# peft LoraConfig fields whose non-default values change the computation in ways not implemented here
UNSUPPORTED = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}


def uses_hf_names(model: nn.Module) -> bool:
    """True when the model exports as Llama, so its adapter is written with the export's module names."""
    try:
        check_llama_compatible(getattr(model, "config", None))
    except ConversionError:
        return False
    return True


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, replacement in table:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    return None


def _to_file_name(module: str, hf_names: bool) -> str:
    if not hf_names:
        return module
    renamed = _rename(module, OURS_TO_HF)
    if renamed is None:
        raise ConversionError(f"LoRA on {module!r} has no counterpart in the Hugging Face export; "
                              "target attention, MLP or lm_head projections")
    return renamed


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).is_file())):
        raise ConversionError(f"{out} exists and is not an adapter directory; choose a new directory")


def _target_modules(model: nn.Module, wrapped: list[str], file_names: list[str]) -> list[str] | str:
    """Last names when they select exactly the wrapped set, else a regex of the wrapped modules' full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    linears = linear_layers(model) + wrapped
    if sorted(n for n in linears if n.rsplit(".", 1)[-1] in leaves) == sorted(wrapped):
        return leaves
    return "|".join(re.escape(n) for n in sorted(file_names))


def save_adapter(model: nn.Module, lora_cfg: LoRAConfig, out_dir: str | Path,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA factors as a peft adapter directory (atomically); returns the directory."""
    from safetensors.torch import save_file

    from lmstack.atomic import staged_directory

    out = Path(out_dir)
    _check_out_dir(out)
    modules = lora_modules(model)
    if not modules:
        raise ConversionError("the model has no LoRA layers to save; call apply_lora(model, cfg) first")
    hf_names = uses_hf_names(model)
    wrapped = sorted(modules)
    file_names = [_to_file_name(name, hf_names) for name in wrapped]
    tensors = {}
    for key, tensor in lora_state_dict(model).items():
        module, suffix = key[: -len(FACTOR_SUFFIXES[0])], key[-len(FACTOR_SUFFIXES[0]):]
        tensors[PEFT_PREFIX + _to_file_name(module, hf_names) + suffix] = tensor.detach().contiguous().cpu()
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if hf_names else None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "r": lora_cfg.r, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.use_rslora, "target_modules": _target_modules(model, wrapped, file_names),
        "init_lora_weights": True, **UNSUPPORTED,
    }
    with staged_directory(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def read_adapter_config(adapter_dir: Path) -> LoRAConfig:
    """The LoRAConfig of a peft adapter directory; ConversionError for what is not a plain LoRA adapter."""
    path = Path(adapter_dir) / CONFIG_FILE
    cfg = _read_config(Path(adapter_dir))
    if cfg.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type {cfg.get('peft_type')!r} is not a LORA adapter")
    unsupported = [f"{k}={cfg[k]!r}" for k, default in UNSUPPORTED.items()
                   if k in cfg and cfg[k] not in (default, None, {}, [], False)]
    if unsupported:
        raise ConversionError(f"{path}: {', '.join(unsupported)} is not supported; only plain LoRA on linear "
                              "layers (no DoRA, biases, per-module ranks or saved modules) loads here")
    if not isinstance(cfg.get("r"), int) or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise ConversionError(f"{path}: 'r' (an integer) and 'lora_alpha' (a number) are required; "
                              "is the adapter config complete?")
    return LoRAConfig(r=cfg["r"], alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                      target_modules=cfg.get("target_modules") or [], use_rslora=bool(cfg.get("use_rslora")))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Wrap the modules a peft adapter names and load its factors; returns the adapter's LoRAConfig.

    ``model`` must not have LoRA layers yet. Module names in Hugging Face Llama form are mapped to
    lmstack's when the model exports as Llama; otherwise they are taken as lmstack's own."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    lora_cfg = read_adapter_config(adapter_dir)
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise ConversionError(f"{adapter_dir} has no {WEIGHTS_FILE}")
    hf_names = uses_hf_names(model)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(adapter_dir / WEIGHTS_FILE)).items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith(FACTOR_SUFFIXES):
            raise ConversionError(f"{adapter_dir / WEIGHTS_FILE}: tensor {key!r} is not a LoRA factor "
                                  f"({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        module, suffix = key[len(PEFT_PREFIX): -len(FACTOR_SUFFIXES[0])], key[-len(FACTOR_SUFFIXES[0]):]
        ours = (_rename(module, HF_TO_OURS) if hf_names else module) or module
        state[ours + suffix] = tensor
    names = sorted({key[: -len(FACTOR_SUFFIXES[0])] for key in state})
    known = set(linear_layers(model))
    foreign = [n for n in names if n not in known]
    if foreign:
        raise ConversionError(f"{adapter_dir}: the adapter targets modules this model does not have "
                              f"({', '.join(foreign[:3])}); was it made for another base model?")
    apply_lora(model, LoRAConfig(r=lora_cfg.r, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                                 target_modules=names, use_rslora=lora_cfg.use_rslora))
    load_lora_state_dict(model, state)
    return lora_cfg


# ---------------------------------------------------------------------------------- prompt and prefix tuning
def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{adapter_dir} has no {CONFIG_FILE}; is it a peft adapter directory?")
    cfg = read_json_object(path, "adapter config")
    if cfg.get("peft_type") not in ADAPTER_TYPES:
        raise ConversionError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; "
                              f"the supported adapters are {', '.join(ADAPTER_TYPES)}")
    return cfg


def adapter_type(adapter_dir: str | Path) -> str:
    """The ``peft_type`` of an adapter directory: LORA, PROMPT_TUNING or PREFIX_TUNING (ConversionError otherwise)."""
    return _read_config(Path(adapter_dir))["peft_type"]


def _prefix_rows(model: PrefixTuned) -> torch.Tensor:
    """(L, H_kv, N, D) keys and values -> peft's (N, L * 2 * H_kv * D): per layer its keys, then its values."""
    kv = torch.stack([model.prefix_keys.detach(), model.prefix_values.detach()], dim=1)  # (L, 2, H_kv, N, D)
    L, _, H, N, D = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(N, L * 2 * H * D)  # (N, L, 2, H_kv, D) flattened


def save_prompt_adapter(model: PromptTuned | PrefixTuned, out_dir: str | Path, init: str = "random",
                        init_text: str | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write a prompt- or prefix-tuned wrapper's vectors as a peft adapter directory (atomically).

    ``init`` / ``init_text`` record how training started (lmstack's names: random, vocab, text)."""
    from safetensors.torch import save_file

    from lmstack.atomic import staged_directory

    out = Path(out_dir)
    _check_out_dir(out)
    base_cfg = model.base.config
    n = model.num_virtual_tokens
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
              "num_virtual_tokens": n, "num_transformer_submodules": 1, "num_layers": base_cfg.n_layer,
              "modules_to_save": None, "revision": None, "auto_mapping": None}
    if isinstance(model, PromptTuned):
        tensor = model.prompt.detach()  # (N, C)
        config = {"peft_type": "PROMPT_TUNING", **common, "token_dim": tensor.shape[1],
                  "num_attention_heads": base_cfg.n_head, "prompt_tuning_init": PEFT_INITS[init],
                  "prompt_tuning_init_text": init_text if init == "text" else None,
                  "tokenizer_name_or_path": base_model_name_or_path if init == "text" else None,
                  "tokenizer_kwargs": None}
    elif isinstance(model, PrefixTuned):
        L, H, _, D = model.prefix_keys.shape
        tensor = _prefix_rows(model)
        config = {"peft_type": "PREFIX_TUNING", **common, "token_dim": H * D, "num_attention_heads": H,
                  "encoder_hidden_size": H * D, "prefix_projection": False, "init_weights": None}
    else:
        raise ConversionError(f"{type(model).__name__} is not a prompt- or prefix-tuned model; wrap it with "
                              "apply_prompt_tuning or apply_prefix_tuning first")
    with staged_directory(out) as tmp:
        save_file({PROMPT_KEY: tensor.float().contiguous().cpu()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def load_prompt_adapter(model: nn.Module, adapter_dir: str | Path) -> PromptTuned | PrefixTuned:
    """Wrap ``model`` (a plain gpt / moe decoder) with a peft PROMPT_TUNING or PREFIX_TUNING adapter's vectors.

    ConversionError (one line) for another kind of adapter, a form not implemented here, or sizes that do
    not fit the model (an adapter made for another base)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = _read_config(adapter_dir)
    kind, path = cfg["peft_type"], adapter_dir / CONFIG_FILE
    if kind == "LORA":
        raise ConversionError(f"{adapter_dir} is a LORA adapter; load it with load_adapter")
    if cfg.get("num_transformer_submodules", 1) != 1 or cfg.get("prefix_projection"):
        raise ConversionError(f"{path}: num_transformer_submodules={cfg.get('num_transformer_submodules')} / "
                              f"prefix_projection={cfg.get('prefix_projection')} is not supported; only "
                              "decoder adapters without a prefix MLP load here")
    n = cfg.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise ConversionError(f"{path}: num_virtual_tokens must be an integer >= 1, not {n!r}")
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise ConversionError(f"{adapter_dir} has no {WEIGHTS_FILE}")
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    if set(tensors) != {PROMPT_KEY}:
        raise ConversionError(f"{adapter_dir / WEIGHTS_FILE} holds {sorted(tensors)[:3]}; a {kind} adapter holds "
                              f"one tensor, {PROMPT_KEY!r}")
    rows = tensors[PROMPT_KEY].float()
    base_cfg = getattr(model, "config", None)
    n_layer = getattr(base_cfg, "n_layer", None)
    if cfg.get("num_layers") not in (None, n_layer):
        raise ConversionError(f"{adapter_dir}: the adapter was made for a model with {cfg['num_layers']} layers, "
                              f"this one has {n_layer}; use the base model it was trained on")
    if kind == "PROMPT_TUNING":
        tuned = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=n, init="random"))
        expected = tuple(tuned.prompt.shape)
        if tuple(rows.shape) != expected:
            raise ConversionError(f"{adapter_dir}: prompt_embeddings is {tuple(rows.shape)} but this model takes "
                                  f"{expected} (virtual tokens, embedding width); was it made for another base?")
        load_prompt_tuning_state_dict(tuned, {PROMPT_KEY: rows})
        return tuned
    tuned = apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=n, init="vocab"))
    L, H, _, D = tuned.prefix_keys.shape
    if tuple(rows.shape) != (n, L * 2 * H * D):
        raise ConversionError(f"{adapter_dir}: prompt_embeddings is {tuple(rows.shape)} but this model's prefixes "
                              f"are {(n, L * 2 * H * D)} (virtual tokens, layers x 2 x kv heads x head dim); "
                              "was it made for another base?")
    kv = rows.view(n, L, 2, H, D).permute(1, 2, 3, 0, 4)  # (L, 2, H_kv, N, D)
    load_prefix_tuning_state_dict(tuned, {"prefix_keys": kv[:, 0], "prefix_values": kv[:, 1]})
    return tuned
