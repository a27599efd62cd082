"""Export an lmstack GPT-family checkpoint as a Llama-style Hugging Face directory.

    lmstack export models/smollm2 --format hf --out hf/smollm2
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf/smollm2')"

The directory holds what ``transformers`` (and through it vLLM or llama.cpp's converter) expects of a
``LlamaForCausalLM``: config.json, model.safetensors with HF tensor names, generation_config.json
(stop tokens), and the tokenizer as tokenizer.json + tokenizer_config.json (chat template, special
tokens) + special_tokens_map.json.

Only checkpoints whose options Llama can express are exported: family ``gpt`` with pre-RMSNorm,
SwiGLU, RoPE and no biases; any other option (LayerNorm, GELU, learned positions, sliding windows,
...) is refused by name rather than exported into a model that would compute something else. Every
GPTConfig field this exporter does not know must sit at its default, so options added to gpt.py
later are refused until someone maps them.

A checkpoint trained with lmstack's own chat format (``<|user|>`` ... ``<|end|>``) gets an equivalent
Jinja chat template, so ``tokenizer.apply_chat_template`` renders the same tokens as
``Tokenizer.render_chat`` (tool calls excepted). The output directory is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lmstack.interop.common import DTYPES, ConversionError
from lmstack.models.gpt import GPTConfig
from lmstack.tokenizer.chat import LMSTACK_CHAT_TEMPLATE

# GPTConfig fields that map onto LlamaConfig fields (or do not change the computation)
MAPPED_FIELDS = {"family", "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                 "mlp_hidden", "norm_eps", "rope_theta", "tie_embeddings", "dropout", "init_std"}
# fields Llama fixes to one value
LLAMA_VALUES = {"norm": "rmsnorm", "norm_placement": "pre", "activation": "swiglu", "position": "rope", "bias": False}


def check_llama_compatible(cfg: Any) -> None:
    """Raise ConversionError naming every option a LlamaForCausalLM cannot express."""
    if getattr(cfg, "family", None) != "gpt":
        raise ConversionError(f"model family {getattr(cfg, 'family', None)!r} cannot be exported as Llama; "
                              "only the decoder-only 'gpt' family can")
    problems = [f"{name}={getattr(cfg, name)!r} (Llama needs {value!r})" for name, value in LLAMA_VALUES.items()
                if getattr(cfg, name) != value]
    defaults = GPTConfig()
    for f in dataclasses.fields(cfg):
        if f.name not in MAPPED_FIELDS and f.name not in LLAMA_VALUES and getattr(cfg, f.name) != getattr(defaults, f.name):
            problems.append(f"{f.name}={getattr(cfg, f.name)!r} (Llama has no such option)")
    if problems:
        raise ConversionError("this checkpoint cannot be exported as a Llama model: model."
                              + "; model.".join(problems) + ". Supported: pre-RMSNorm, SwiGLU, RoPE, no bias")


def llama_hf_config(cfg: GPTConfig, tokenizer: Any, dtype: str) -> dict[str, Any]:
    bos, eos = _special_ids(tokenizer)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head, "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "bos_token_id": bos, "eos_token_id": eos[0] if eos else None,
        "pad_token_id": None, "torch_dtype": dtype, "use_cache": True,
    }


def llama_hf_state(model: torch.nn.Module, cfg: GPTConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """lmstack GPT names -> HF LlamaForCausalLM names (the inverse of hf_import.llama_state)."""
    ours = model.state_dict()
    out = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["norm_f.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = ours[src + "norm1.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "norm2.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{dst}self_attn.{proj}.weight"] = ours[f"{src}attn.{proj}.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{dst}mlp.{proj}.weight"] = ours[f"{src}mlp.{proj}.weight"]
    if not cfg.tie_embeddings:  # tied heads are re-tied by transformers from tie_word_embeddings
        out["lm_head.weight"] = ours["lm_head.weight"]
    return {name: t.detach().to(dtype).contiguous().cpu() for name, t in out.items()}


def _special_ids(tokenizer: Any) -> tuple[int | None, list[int]]:
    if tokenizer is None:
        return None, []
    try:
        bos = tokenizer.bos_id
    except ValueError:
        bos = None
    return bos, list(tokenizer.stop_token_ids)


def write_hf_tokenizer(tokenizer: Any, out: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json that transformers' AutoTokenizer reads."""
    (out / "tokenizer.json").write_text(tokenizer.hf_tokenizer().to_str(), encoding="utf-8")
    bos, stops = _special_ids(tokenizer)
    bos_token = tokenizer.id_to_token(bos) if bos is not None else None
    eos_token = tokenizer.id_to_token(stops[0]) if stops else None
    template = tokenizer.chat_template
    if template is None and tokenizer.chat_format == "lmstack":
        template = LMSTACK_CHAT_TEMPLATE
    specials = {"bos_token": bos_token, "eos_token": eos_token}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                  "clean_up_tokenization_spaces": False, **{k: v for k, v in specials.items() if v},
                  "pad_token": eos_token, "add_bos_token": False, "add_eos_token": False}
    if template:
        tok_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in specials.items() if v}, indent=2))


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write a LlamaForCausalLM directory for an lmstack checkpoint; returns the directory."""
    from safetensors.torch import save_file

    from lmstack.atomic import make_staging_dir, swap_directory
    from lmstack.checkpoint import load_checkpoint

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ConversionError(f"--out {out} exists and is not a model directory; choose a new directory")
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()).get("format") == "lmstack":
        raise ConversionError(f"--out {out} is an lmstack checkpoint; export into a different directory")
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.model.config
    check_llama_compatible(cfg)
    if ckpt.tokenizer is None:
        raise ConversionError(f"{ckpt.path} has no tokenizer.json; an HF export needs the tokenizer")
    tmp = make_staging_dir(out)
    try:
        save_file(llama_hf_state(ckpt.model, cfg, DTYPES[dtype]), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(llama_hf_config(cfg, ckpt.tokenizer, dtype), indent=2))
        bos, stops = _special_ids(ckpt.tokenizer)
        generation = {"bos_token_id": bos, "eos_token_id": stops if len(stops) != 1 else stops[0]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_hf_tokenizer(ckpt.tokenizer, tmp, cfg.block_size)
        swap_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
