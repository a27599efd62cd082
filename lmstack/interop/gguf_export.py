"""Export an lmstack checkpoint as a GGUF file that llama.cpp (``llama-server``, ``llama-cli``) loads.

    lmstack export models/smollm2 --format gguf --out smollm2.gguf                # float32
    lmstack export models/smollm2 --format gguf --out smollm2.q8.gguf --dtype q8_0
    llama-server -m smollm2.q8.gguf --jinja                                       # OpenAI-compatible server

The file is written with the ``gguf`` package's ``GGUFWriter`` (the writer llama.cpp's own converters
use) as architecture ``llama``:

- **Hyper-parameters**: ``llama.block_count``, ``embedding_length``, ``feed_forward_length``,
  ``attention.head_count`` / ``head_count_kv`` (grouped-query attention), ``key_length`` /
  ``value_length``, ``rope.dimension_count``, ``rope.freq_base``, ``layer_norm_rms_epsilon``,
  ``context_length`` (the checkpoint's ``block_size``), ``vocab_size``.
- **Tensors** under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``, and
  ``output`` only when the embeddings are untied: llama.cpp re-uses ``token_embd`` when ``output`` is
  absent). Q and K rows are permuted per head (:func:`permute_rope_rows`): lmstack, like Hugging Face,
  rotates the two *halves* of a head with RoPE, llama.cpp's ``llama`` graph rotates *adjacent* pairs,
  so the converter has to interleave the rows. Forgetting it loads fine and gives wrong logits.
- **Types**: ``float32``, ``float16``, ``bfloat16`` or ``q8_0`` for the matrices (``gguf.quants`` does
  the quantization: one float16 scale per block of 32 weights, int8 values). One-dimensional tensors
  (the RMSNorm weights) always stay float32, as llama.cpp's converters keep them; a matrix whose row
  length is not a multiple of 32 cannot be Q8_0 and is written float16 instead.
- **Tokenizer**: byte-level BPE as ``tokenizer.ggml.model = gpt2`` with every token string, its type
  (control for special tokens, user-defined for added plain tokens, unused for padding rows), the merges,
  bos / eos / eot / pad ids, and ``tokenizer.chat_template`` (lmstack's own chat format gets its
  equivalent Jinja template, as the Hugging Face export does). ``tokenizer.ggml.pre`` names the
  pre-tokenizer llama.cpp should split with: ``llama-bpe`` for lmstack's trained tokenizers and cl100k
  (the GPT-4 split regex, which Llama 3 also uses), ``gpt-2`` for GPT-2's regex, ``smollm`` for
  SmolLM's digit-splitting one. A tokenizer llama.cpp cannot reproduce (unigram, WordPiece, any other
  split regex) is refused rather than exported to tokenize differently.

Only checkpoints that llama.cpp's ``llama`` architecture computes exactly are exported: the same check
as the Hugging Face export (family ``gpt`` with pre-RMSNorm, SwiGLU, RoPE without scaling, no biases,
dense attention). GPT-2-style models (LayerNorm, learned positions, biases) are refused with one line;
llama.cpp's separate ``gpt2`` architecture is not mapped.

The file appears at ``--out`` only when complete (written to a temporary sibling, then renamed).
Caveat: Q8_0 quantization in ``gguf.quants`` is numpy code, a few seconds per 100M parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmstack.errors import DataError
from lmstack.interop.common import ConversionError
from lmstack.interop.hf_export import check_llama_compatible
from lmstack.models.gpt import GPTConfig

# --dtype value -> (GGML tensor type name, llama.cpp general.file_type name)
GGUF_DTYPES: dict[str, tuple[str, str]] = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"),
                                           "bfloat16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}

# lmstack GPT parameter names -> llama.cpp tensor names (the inverse of gguf_import.LAYER_NAMES)
LAYER_TENSORS = {"norm1": "attn_norm", "norm2": "ffn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
                 "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}

# llama_token_type values (gguf.TokenType)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


# ----------------------------------------------------------------------------- tensors

def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleave Q/K rows the way llama.cpp's rope expects: per head, (2, half) halves -> (half, 2) pairs.

    w: (n_heads * head_dim, in_features). The inverse of ``gguf_import.unpermute_rope_rows``.
    """
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, head_dim // 2, -1)  # (H, 2, D/2, in): first halves, then second halves
            .swapaxes(1, 2)  # (H, D/2, 2, in): row i of the first half next to row i of the second
            .reshape(w.shape))


def gguf_tensors(model: torch.nn.Module, cfg: GPTConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array in PyTorch (out, in) order), Q/K rows permuted for llama.cpp's rope."""
    state = model.state_dict()

    def array(name: str) -> np.ndarray:
        return state[name].detach().to(torch.float32).cpu().numpy()

    yield "token_embd.weight", array("tok_emb.weight")
    for i in range(cfg.n_layer):
        for ours, theirs in LAYER_TENSORS.items():
            w = array(f"blocks.{i}.{ours}.weight")
            if theirs == "attn_q":
                w = permute_rope_rows(w, cfg.n_head)
            elif theirs == "attn_k":
                w = permute_rope_rows(w, cfg.kv_heads)
            yield f"blk.{i}.{theirs}.weight", w
    yield "output_norm.weight", array("norm_f.weight")
    if not cfg.tie_embeddings:  # without output.weight llama.cpp multiplies by token_embd itself
        yield "output.weight", array("lm_head.weight")


def tensor_type(w: np.ndarray, requested: str) -> str:
    """The GGML type a tensor is stored as: 1-D tensors stay F32, Q8_0 needs rows in blocks of 32."""
    if w.ndim == 1:
        return "F32"
    if requested == "Q8_0" and w.shape[-1] % 32 != 0:
        return "F16"
    return requested


def encode_tensor(w: np.ndarray, kind: str) -> np.ndarray:
    """Bytes (or a float array) for GGUFWriter.add_tensor; quantized types come back as uint8 rows."""
    from gguf import GGMLQuantizationType, quants

    if kind == "F32":
        return np.ascontiguousarray(w, dtype=np.float32)
    if kind == "F16":
        return w.astype(np.float16)
    return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), GGMLQuantizationType[kind])


# ----------------------------------------------------------------------------- tokenizer

def gguf_pre_tokenizer(tokenizer: Any) -> str:
    """The ``tokenizer.ggml.pre`` value whose split llama.cpp reproduces for this byte-level BPE tokenizer."""
    from lmstack.tokenizer import CL100K_PATTERN, GPT2_PATTERN, SPLIT_PATTERN

    spec = json.loads(tokenizer.hf_tokenizer().to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or (spec.get("normalizer") or None) is not None:
        raise ConversionError(f"the tokenizer is a {model.get('type')} model"
                              f"{' with a normalizer' if spec.get('normalizer') else ''}; GGUF export supports "
                              "byte-level BPE tokenizers (lmstack's own, GPT-2, cl100k, SmolLM)")
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True)
            and not parts[1].get("add_prefix_space")):
        return "smollm"
    if tokenizer.split_pattern in (SPLIT_PATTERN, CL100K_PATTERN):  # the GPT-4 regex, which Llama 3 also uses
        return "llama-bpe"
    if tokenizer.split_pattern == GPT2_PATTERN:
        return "gpt-2"
    raise ConversionError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp "
                          "equivalent; GGUF export supports the GPT-2, GPT-4/Llama-3 and SmolLM split rules")


def gguf_vocab(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..n_vocab-1; ids the tokenizer lacks become unused ``[PAD<id>]`` rows."""
    spec = json.loads(tokenizer.hf_tokenizer().to_str())
    added = {t["content"]: bool(t.get("special")) for t in spec.get("added_tokens", [])}
    if tokenizer.vocab_size > n_vocab:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {n_vocab} "
                              "embedding rows; the checkpoint's tokenizer does not belong to its model")
    tokens, types = [], []
    for i in range(n_vocab):
        token = tokenizer.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(token)
            types.append(TOKEN_NORMAL if token not in added else TOKEN_CONTROL if added[token] else TOKEN_USER_DEFINED)
    return tokens, types


def gguf_merges(tokenizer: Any) -> list[str]:
    """BPE merges as llama.cpp stores them: "left right" strings in priority order."""
    merges = json.loads(tokenizer.hf_tokenizer().to_str())["model"].get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def special_ids(tokenizer: Any) -> dict[str, int]:
    """bos / eos / eot / pad ids: eos is the first stop token (as in the HF export), eot the second."""
    ids: dict[str, int] = {}
    try:
        ids["bos"] = tokenizer.bos_id
    except DataError:  # no BOS and no document boundary: the file then names none either
        pass
    stops = list(tokenizer.stop_token_ids)
    if stops:
        ids["eos"] = stops[0]
    if len(stops) > 1:
        ids["eot"] = stops[1]
    try:
        ids["pad"] = tokenizer.pad_id
    except DataError:
        pass
    return ids


def chat_template(tokenizer: Any) -> str | None:
    from lmstack.tokenizer.chat import LMSTACK_CHAT_TEMPLATE

    if tokenizer.chat_template:
        return tokenizer.chat_template
    return LMSTACK_CHAT_TEMPLATE if tokenizer.chat_format == "lmstack" else None


# ----------------------------------------------------------------------------- writer

def write_gguf(path: Path, model: torch.nn.Module, cfg: GPTConfig, tokenizer: Any, dtype: str, name: str,
               progress: bool = True) -> dict[str, str]:
    """Write the GGUF file at ``path`` (not atomically: :func:`export_gguf` hands a temporary name).

    Returns {tensor name: GGML type} as written.
    """
    import gguf

    from lmstack.progress import Progress

    requested, file_type = GGUF_DTYPES[dtype]
    pre = gguf_pre_tokenizer(tokenizer)  # refuse before any work
    tokens, types = gguf_vocab(tokenizer, cfg.vocab_size)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    if requested == "Q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.dim_per_head)
    writer.add_value_length(cfg.dim_per_head)
    writer.add_rope_dimension_count(cfg.dim_per_head)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(gguf_merges(tokenizer))
    ids = special_ids(tokenizer)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("eot", writer.add_eot_token_id), ("pad", writer.add_pad_token_id)):
        if key in ids:
            add(ids[key])
    writer.add_add_bos_token(False)  # lmstack never prepends BOS to a prompt; a chat template writes it itself
    writer.add_add_eos_token(False)
    template = chat_template(tokenizer)
    if template:
        writer.add_chat_template(template)

    written: dict[str, str] = {}
    n_tensors = 2 + 9 * cfg.n_layer + (0 if cfg.tie_embeddings else 1)
    with Progress(enabled=progress) as bar:
        task = bar.add(f"writing {path.name}", total=n_tensors, unit="tensors")
        for tensor_name, w in gguf_tensors(model, cfg):
            kind = tensor_type(w, requested)
            data = encode_tensor(w, kind)
            if kind in ("F32", "F16"):
                writer.add_tensor(tensor_name, data)
            else:
                writer.add_tensor(tensor_name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[kind])
            written[tensor_name] = kind
            bar.advance(task)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Write ``out`` (a .gguf file) for an lmstack checkpoint; returns the path."""
    from lmstack.atomic import write_atomic
    from lmstack.checkpoint import load_checkpoint

    if dtype not in GGUF_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} for GGUF: choose one of {', '.join(GGUF_DTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise ConversionError(f"--out {out} is a directory; a GGUF export writes one file, e.g. --out model.gguf")
    if out.suffix != ".gguf":
        raise ConversionError(f"--out {out} should end in .gguf (llama.cpp finds models by that extension)")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.config.get("head") is not None:
        raise ConversionError(f"{ckpt.path} is a {ckpt.config['head']}-head model (a backbone with a scoring "
                              "head), not a language model; GGUF export needs a causal LM checkpoint")
    cfg = ckpt.model.config
    check_llama_compatible(cfg)
    if ckpt.tokenizer is None:
        raise ConversionError(f"{ckpt.path} has no tokenizer.json; a GGUF file carries its tokenizer")
    name = str(ckpt.config.get("source", {}).get("name") or ckpt.path.name)
    return write_atomic(out, lambda tmp: write_gguf(tmp, ckpt.model, cfg, ckpt.tokenizer, dtype, name, progress),
                        suffix=".gguf")
