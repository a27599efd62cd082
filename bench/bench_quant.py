"""Quality and speed cost of weight-only quantization: perplexity on held-out text and decode tokens/s
for fp32, int8 and int4 copies of the same trained model, measured in the same run.

    python bench/bench_quant.py                          # trains a small model on Python stdlib source first
    python bench/bench_quant.py --model runs/speedrun/model --text held_out.txt

Without --model the script trains its own subject, because quantization error is only meaningful on
weights that learned something: a byte-level BPE tokenizer and a small Llama-style model trained for
--steps on half of the Python standard library's source (present on every machine), evaluated on
files from the other half. Perplexity is exp(mean next-token loss) over non-overlapping windows of
the model's context. Decode speed is the Engine at batch 1 (greedy, EOS ignored).
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch

from lmstack.config import tiny
from lmstack.engine import Engine, SamplingParams
from lmstack.engine.quant import quantize_model, weight_bytes
from lmstack.models import build_model


def stdlib_texts(limit_bytes: int) -> tuple[list[str], list[str]]:
    """(train, held-out) Python source files, split by file name so no file is in both."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    train, held = [], []
    for i, path in enumerate(files):
        (held if i % 5 == 0 else train).append(path.read_text(errors="replace"))
    def cap(texts: list[str], budget: int) -> list[str]:
        out, total = [], 0
        for t in texts:
            if total >= budget:
                break
            out.append(t)
            total += len(t)
        return out
    return cap(train, limit_bytes), cap(held, limit_bytes // 4)


def train_subject(args: argparse.Namespace):
    from lmstack.tokenizer import Tokenizer

    train_texts, held_texts = stdlib_texts(args.train_bytes)
    tokenizer = Tokenizer.train(train_texts, vocab_size=args.vocab_size)
    cfg = tiny().model
    cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head = \
        tokenizer.vocab_size, 128, 4, args.n_embd, 4, 4
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.tensor([t for text in train_texts for t in [tokenizer.eot_id] + tokenizer.encode(text)])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    T, B = cfg.block_size, args.batch_size
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(args.steps):
        lr = 2e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(ids) - T - 1, (B,), generator=g)
        x = torch.stack([ids[o:o + T] for o in offsets])
        y = torch.stack([ids[o + 1:o + T + 1] for o in offsets])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"train step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    held = [t for text in held_texts for t in [tokenizer.eot_id] + tokenizer.encode(text)]
    return model.eval(), tokenizer, held


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: list[int], max_windows: int) -> float:
    T = model.config.block_size
    windows = [ids[i:i + T + 1] for i in range(0, len(ids) - T - 1, T)][:max_windows]
    x = torch.tensor([w[:-1] for w in windows])
    y = torch.tensor([w[1:] for w in windows])
    total = 0.0
    for i in range(0, len(windows), 16):
        _, loss = model(x[i:i + 16], y[i:i + 16])
        total += loss.item() * len(x[i:i + 16])
    return math.exp(total / len(windows))


def decode_speed(model: torch.nn.Module, new: int) -> float:
    engine = Engine(model, max_num_seqs=1)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    prompt = [[1, 2, 3, 4]]
    engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        engine.generate(prompt, params)
        best = min(best, time.perf_counter() - start)
    return new / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint to quantize (default: train a small one)")
    p.add_argument("--text", default=None, help="held-out text file (with --model)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=128, help="width of the model trained as the subject")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--train-bytes", type=int, default=3_000_000)
    p.add_argument("--max-windows", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from lmstack.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.model)
        if not args.text or ckpt.tokenizer is None:
            raise SystemExit("--model needs --text (held-out text) and a checkpoint with a tokenizer")
        held = ckpt.tokenizer.encode(Path(args.text).read_text())
        state = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
        make = lambda: _reload(ckpt.model, state)
    else:
        model, _, held = train_subject(args)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        make = lambda: _reload(model, state)
    print(f"\nheld-out: {len(held):,} tokens (first {args.max_windows} windows)\n")
    rows = []
    for mode in ("fp32", "int8", "int4"):
        model = make()
        if mode != "fp32":
            quantize_model(model, mode)
        ppl = perplexity(model, held, args.max_windows)
        speed = decode_speed(model, args.new_tokens)
        rows.append((mode, ppl, weight_bytes(model), speed))
    base = rows[0][1]
    print("| weights | perplexity | delta | weight MB | decode tokens/s (batch 1) |")
    print("|---|---:|---:|---:|---:|")
    for mode, ppl, size, speed in rows:
        print(f"| {mode} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {size / 1e6:.1f} | {speed:.1f} |")


def _reload(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """A fresh float copy of the subject (quantization replaces modules in place)."""
    fresh = build_model(model.config)
    fresh.load_state_dict(state)
    return fresh.eval()


if __name__ == "__main__":
    main()
