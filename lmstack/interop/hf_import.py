"""Import a Hugging Face model directory (config.json + safetensors + tokenizer) into lmstack.

    lmstack import path/to/hf_dir --out models/mine

Supported ``model_type`` values (see registry.py): ``llama`` and ``gpt2`` become the decoder-only
``gpt`` family, ``bert`` becomes the ``bert`` encoder family. Each converter reads the HF config into
the lmstack config dataclass and renames tensors; the mapping is checked strictly when the weights
are loaded (common.write_imported_checkpoint), so a tensor the mapping forgot is an error.

Non-obvious details:

* GPT-2 stores its projections as ``Conv1D`` weights of shape (in, out), the transpose of
  ``nn.Linear``; its fused ``c_attn`` splits into q, k, v along the output dimension. Its GELU
  ("gelu_new") is the tanh approximation, lmstack's ``gelu``; an HF ``gelu`` is the exact erf form,
  lmstack's ``gelu_exact``.
* Llama's rotary embedding in HF checkpoints already uses the "rotate half" layout lmstack uses, so
  q/k need no permutation (GGUF files differ; see gguf_import.py).
* BERT: the pooler and next-sentence head are dropped (unused by sentence embeddings). A checkpoint
  without an MLM head (``BertModel``, e.g. all-MiniLM-L6-v2) gets a freshly initialised head so the
  model can still be fine-tuned with masked LM; embeddings do not use the head.
* Only safetensors are read: ``pytorch_model.bin`` would need unpickling, which lmstack never does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from lmstack.interop.common import (ConversionError, ImportedTokenizer, read_json_object, source_info,
                                    write_imported_checkpoint)
from lmstack.interop.registry import architecture_for_hf
from lmstack.models.bert import BertConfig
from lmstack.models.gpt import GPTConfig

Tensors = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- reading the directory

def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; a Hugging Face model directory holds config.json, "
                              "model.safetensors (or shards) and tokenizer files")
    return read_json_object(path, "model's config.json")


def load_safetensors(hf_dir: Path) -> Tensors:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index} has no weight_map of tensor names to shard files")
        tensors: Tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_safetensors_file(hf_dir / str(shard)))
        return tensors
    if (hf_dir / "model.safetensors").is_file():
        return _load_safetensors_file(hf_dir / "model.safetensors")
    if any(hf_dir.glob("*.bin")):
        raise ConversionError(f"{hf_dir} holds only PyTorch pickle weights (*.bin); lmstack reads safetensors "
                              "only (loading pickles can run arbitrary code). Convert once with transformers: "
                              "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise ConversionError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")


def _load_safetensors_file(path: Path) -> Tensors:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConversionError(f"{path} is missing; the weight index lists it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:  # truncated, empty or not safetensors at all
        raise ConversionError(f"{path} is not a readable safetensors file ({error}); download it again") from None


def strip_prefix(tensors: Tensors, prefixes: tuple[str, ...]) -> Tensors:
    """Drop a task wrapper's prefix ('model.', 'transformer.', 'bert.') when every backbone key has it."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in tensors):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    return tensors


def _take(tensors: Tensors, name: str) -> torch.Tensor:
    if name not in tensors:
        raise ConversionError(f"tensor {name!r} is missing from the checkpoint; it does not look like the "
                              "architecture its config.json claims")
    return tensors.pop(name)


def _leftovers(tensors: Tensors, ignorable: tuple[str, ...]) -> None:
    rest = sorted(k for k in tensors if not any(k.endswith(s) or k.startswith(s) for s in ignorable))
    if rest:
        raise ConversionError(f"the checkpoint has tensors this converter does not understand: {rest[:8]}; "
                              "the model uses an option lmstack does not implement")


def _take_lm_head(cfg: GPTConfig, tensors: Tensors, out: Tensors) -> None:
    """Move ``lm_head.weight`` into ``out`` when the head is untied; a tied model drops any saved copy
    (it is the token embedding)."""
    head = tensors.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise ConversionError("config says tie_word_embeddings=false but the checkpoint has no lm_head.weight")
        out["lm_head.weight"] = head


# ----------------------------------------------------------------------------- llama

def llama_config(cfg: dict[str, Any]) -> GPTConfig:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"llama hidden_act={cfg['hidden_act']!r} is not supported (only silu / SwiGLU)")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(f"llama rope scaling {rope_type!r} is not supported; supported: default (unscaled) RoPE")
    if cfg.get("attention_bias", False) != cfg.get("mlp_bias", False):
        raise ConversionError("llama with attention_bias != mlp_bias is not supported (lmstack has one `bias` flag)")
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    return GPTConfig(
        vocab_size=cfg["vocab_size"], block_size=cfg.get("max_position_embeddings", 2048),
        n_layer=cfg["num_hidden_layers"], n_head=n_head, n_kv_head=cfg.get("num_key_value_heads") or n_head,
        n_embd=cfg["hidden_size"], head_dim=head_dim if head_dim * n_head != cfg["hidden_size"] else None,
        mlp_hidden=cfg["intermediate_size"], norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation="swiglu", position="rope", rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), bias=bool(cfg.get("attention_bias", False)),
    )


def llama_state(cfg: GPTConfig, tensors: Tensors) -> Tensors:
    """HF LlamaForCausalLM names -> lmstack GPT names (same layout, different names)."""
    t = strip_prefix(dict(tensors), ("model.",))
    out: Tensors = {"tok_emb.weight": _take(t, "embed_tokens.weight"), "norm_f.weight": _take(t, "norm.weight")}
    suffixes = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        out[dst + "norm1.weight"] = _take(t, src + "input_layernorm.weight")
        out[dst + "norm2.weight"] = _take(t, src + "post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for s in suffixes:
                out[f"{dst}attn.{proj}.{s}"] = _take(t, f"{src}self_attn.{proj}.{s}")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for s in suffixes:
                out[f"{dst}mlp.{proj}.{s}"] = _take(t, f"{src}mlp.{proj}.{s}")
    _take_lm_head(cfg, t, out)
    _leftovers(t, ("rotary_emb.inv_freq",))
    return out


# ----------------------------------------------------------------------------- gpt-2

GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "gelu": "gelu_exact",
                    "relu": "relu"}


def gpt2_config(cfg: dict[str, Any]) -> GPTConfig:
    act = cfg.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ConversionError(f"gpt2 activation_function={act!r} is not supported; supported: {sorted(GPT2_ACTIVATIONS)}")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("add_cross_attention"):
        raise ConversionError("gpt2 with scale_attn_by_inverse_layer_idx or add_cross_attention is not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise ConversionError("gpt2 with scale_attn_weights=false is not supported (lmstack scales by 1/sqrt(d))")
    n_embd = cfg["n_embd"]
    return GPTConfig(
        vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        n_kv_head=cfg["n_head"], n_embd=n_embd, mlp_hidden=cfg.get("n_inner") or 4 * n_embd,
        norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), activation=GPT2_ACTIVATIONS[act],
        position="learned", tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), bias=True,
    )


def gpt2_state(cfg: GPTConfig, tensors: Tensors) -> Tensors:
    """HF GPT2LMHeadModel names -> lmstack GPT names; Conv1D (in, out) weights are transposed."""
    t = strip_prefix(dict(tensors), ("transformer.",))
    out: Tensors = {"tok_emb.weight": _take(t, "wte.weight"), "pos_emb.weight": _take(t, "wpe.weight"),
                    "norm_f.weight": _take(t, "ln_f.weight"), "norm_f.bias": _take(t, "ln_f.bias")}
    C = cfg.n_embd
    for i in range(cfg.n_layer):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for hf_norm, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[f"{dst}{ours}.weight"] = _take(t, f"{src}{hf_norm}.weight")
            out[f"{dst}{ours}.bias"] = _take(t, f"{src}{hf_norm}.bias")
        qkv_w = _take(t, src + "attn.c_attn.weight").t()  # (3C, C): rows are q | k | v outputs
        qkv_b = _take(t, src + "attn.c_attn.bias")  # (3C,)
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}attn.{proj}.weight"] = qkv_w[j * C:(j + 1) * C].contiguous()
            out[f"{dst}attn.{proj}.bias"] = qkv_b[j * C:(j + 1) * C].contiguous()
        for hf_name, ours in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                              ("mlp.c_proj", "mlp.down_proj")):
            out[f"{dst}{ours}.weight"] = _take(t, f"{src}{hf_name}.weight").t().contiguous()
            out[f"{dst}{ours}.bias"] = _take(t, f"{src}{hf_name}.bias")
    _take_lm_head(cfg, t, out)
    _leftovers(t, (".attn.bias", ".attn.masked_bias"))  # old causal-mask buffers
    return out


# ----------------------------------------------------------------------------- bert

BERT_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
BERT_HEAD = ("mlm_dense.weight", "mlm_dense.bias", "mlm_norm.weight", "mlm_norm.bias", "lm_head.bias")


def bert_config(cfg: dict[str, Any]) -> BertConfig:
    act = cfg.get("hidden_act", "gelu")
    if act not in BERT_ACTIVATIONS:
        raise ConversionError(f"bert hidden_act={act!r} is not supported; supported: {sorted(BERT_ACTIVATIONS)}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"bert position_embedding_type={cfg['position_embedding_type']!r} is not supported "
                              "(only absolute)")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ConversionError("bert configured as a decoder / with cross-attention is not supported")
    return BertConfig(
        vocab_size=cfg["vocab_size"], block_size=cfg.get("max_position_embeddings", 512),
        n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"], n_embd=cfg["hidden_size"],
        mlp_hidden=cfg.get("intermediate_size"), type_vocab_size=cfg.get("type_vocab_size", 2),
        norm_eps=cfg.get("layer_norm_eps", 1e-12), activation=BERT_ACTIVATIONS[act],
    )


def bert_state(cfg: BertConfig, tensors: Tensors) -> tuple[Tensors, tuple[str, ...]]:
    """HF BertModel / BertForMaskedLM names -> lmstack Bert names; returns (state, params left at init)."""
    # very old checkpoints call LayerNorm parameters gamma / beta
    t = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
         for k, v in strip_prefix(dict(tensors), ("bert.",)).items()}
    out: Tensors = {"tok_emb.weight": _take(t, "embeddings.word_embeddings.weight"),
                    "pos_emb.weight": _take(t, "embeddings.position_embeddings.weight"),
                    "emb_norm.weight": _take(t, "embeddings.LayerNorm.weight"),
                    "emb_norm.bias": _take(t, "embeddings.LayerNorm.bias")}
    if cfg.type_vocab_size > 0:
        out["type_emb.weight"] = _take(t, "embeddings.token_type_embeddings.weight")
    names = {"attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
             "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.o_proj",
             "attention.output.LayerNorm": "norm1", "intermediate.dense": "mlp.up_proj",
             "output.dense": "mlp.down_proj", "output.LayerNorm": "norm2"}
    for i in range(cfg.n_layer):
        for hf_name, ours in names.items():
            for s in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{s}"] = _take(t, f"encoder.layer.{i}.{hf_name}.{s}")
    init_missing: tuple[str, ...] = ()
    if "cls.predictions.transform.dense.weight" in t:
        head = {"mlm_dense": "cls.predictions.transform.dense", "mlm_norm": "cls.predictions.transform.LayerNorm"}
        for ours, hf_name in head.items():
            for s in ("weight", "bias"):
                out[f"{ours}.{s}"] = _take(t, f"{hf_name}.{s}")
        out["lm_head.bias"] = _take(t, "cls.predictions.bias")
        decoder = t.pop("cls.predictions.decoder.weight", None)
        if decoder is not None and not torch.equal(decoder, out["tok_emb.weight"]):
            raise ConversionError("this BERT's MLM decoder is not tied to its word embeddings; lmstack ties them")
        t.pop("cls.predictions.decoder.bias", None)  # the same tensor as cls.predictions.bias
    else:
        init_missing = BERT_HEAD
    _leftovers(t, ("pooler.", "cls.seq_relationship.", "embeddings.position_ids"))
    return out, init_missing


# ----------------------------------------------------------------------------- tokenizer

def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(hf_dir: Path, tok_cfg: dict[str, Any]) -> str | None:
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (hf_dir / "chat_template.json").is_file():
        template = read_json_object(hf_dir / "chat_template.json", "chat template").get("chat_template")
    return template


def read_hf_tokenizer(hf_dir: Path, model_cfg: dict[str, Any]) -> ImportedTokenizer:
    """tokenizer.json (or GPT-2 vocab.json + merges.txt, or BERT vocab.txt) + tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer

    tok_cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        if (hf_dir / name).is_file():
            tok_cfg.update(read_json_object(hf_dir / name, "tokenizer config"))
    if (hf_dir / "tokenizer.json").is_file():
        doc = read_json_object(hf_dir / "tokenizer.json", "tokenizer")
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        doc = _byte_level_bpe_doc(hf_dir / "vocab.json", hf_dir / "merges.txt")
    elif (hf_dir / "vocab.txt").is_file():
        doc = _wordpiece_doc(hf_dir / "vocab.txt", lowercase=bool(tok_cfg.get("do_lower_case", True)))
    else:
        raise ConversionError(f"{hf_dir} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or vocab.txt)")
    # the engine pads and truncates itself; fixed padding baked into the file would corrupt every encode
    doc["padding"] = None
    doc["truncation"] = None
    hf_json = json.dumps(doc, ensure_ascii=False)
    backend = HFTokenizer.from_str(hf_json)
    bos = _token_str(tok_cfg.get("bos_token"))
    if bos is None and model_cfg.get("bos_token_id") is not None:
        bos = backend.id_to_token(model_cfg["bos_token_id"])
    stops = [_token_str(tok_cfg.get("eos_token"))] + [backend.id_to_token(i) for i in _eos_ids(hf_dir, model_cfg)]
    return ImportedTokenizer(hf_json=hf_json, bos_token=bos, chat_template=_chat_template(hf_dir, tok_cfg),
                             stop_tokens=[t for i, t in enumerate(stops) if t is not None and t not in stops[:i]])


def _eos_ids(hf_dir: Path, model_cfg: dict[str, Any]) -> list[int]:
    ids: Any = model_cfg.get("eos_token_id")
    if (hf_dir / "generation_config.json").is_file():
        ids = read_json_object(hf_dir / "generation_config.json", "generation config").get("eos_token_id", ids)
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


def _byte_level_bpe_doc(vocab_path: Path, merges_path: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = read_json_object(vocab_path, "vocabulary")
    merges = [tuple(line.split(" ", 1)) for line in merges_path.read_text().splitlines()
              if line and not line.startswith("#version")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if "<|endoftext|>" in vocab:
        tk.add_special_tokens(["<|endoftext|>"])
    return json.loads(tk.to_str())


def _wordpiece_doc(vocab_path: Path, lowercase: bool) -> dict[str, Any]:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {line: i for i, line in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
    tk.add_special_tokens(specials)
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return json.loads(tk.to_str())


# ----------------------------------------------------------------------------- entry point

Converter = Callable[[dict[str, Any], Tensors], tuple[Any, Tensors, tuple[str, ...]]]


def _convert_llama(cfg: dict[str, Any], tensors: Tensors):
    model_cfg = llama_config(cfg)
    return model_cfg, llama_state(model_cfg, tensors), ()


def _convert_gpt2(cfg: dict[str, Any], tensors: Tensors):
    model_cfg = gpt2_config(cfg)
    return model_cfg, gpt2_state(model_cfg, tensors), ()


def _convert_bert(cfg: dict[str, Any], tensors: Tensors):
    model_cfg = bert_config(cfg)
    state, init_missing = bert_state(model_cfg, tensors)
    return model_cfg, state, init_missing


CONVERTERS: dict[str, Converter] = {"llama": _convert_llama, "gpt2": _convert_gpt2, "bert": _convert_bert}


def convert_hf(hf_dir: str | Path) -> tuple[Any, Tensors, tuple[str, ...], ImportedTokenizer, dict[str, Any]]:
    """Read an HF directory: (lmstack model config, state dict, params left at init, tokenizer, source info)."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    arch = architecture_for_hf(cfg.get("model_type"), cfg.get("architectures"))
    tokenizer = read_hf_tokenizer(hf_dir, cfg)
    model_cfg, state, init_missing = CONVERTERS[arch.name](cfg, load_safetensors(hf_dir))
    info = source_info("hf", hf_dir.resolve(), arch.name, hf_architectures=cfg.get("architectures"),
                       initialised=list(init_missing))
    return model_cfg, state, init_missing, tokenizer, info


def import_hf(hf_dir: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Convert an HF directory into an lmstack checkpoint at ``out``."""
    model_cfg, state, init_missing, tokenizer, info = convert_hf(hf_dir)
    return write_imported_checkpoint(out, model_cfg, state, tokenizer, info, dtype=dtype, init_missing=init_missing)
