"""`lmstack speedrun`: the main job, end to end on the default corpus.

    lmstack speedrun --preset tiny --out runs/speedrun

download corpus → clean (data pipeline) → train tokenizer → tokenize into shards → pretrain
(within a wall-clock budget) → sample → report. Each stage writes into OUT and is skipped when its
output is already there, so an interrupted speedrun picks up where it stopped (pretraining continues
from its newest intact checkpoint).

The report compares validation bits-per-byte with a unigram baseline on the same validation tokens:
a model that only knows token frequencies (fitted on the training split, add-one smoothed). A model
that learned anything about context must beat it clearly. Bits-per-byte is tokenizer-independent:
nats per token / ln 2 × tokens per byte of UTF-8 text.

Outputs: OUT/report.md (the report card of lmstack.evals.report), OUT/report.json (val_bpb, unigram_bpb,
wall_seconds, params, tokens, ...), OUT/loss.png, OUT/train/ (the run: checkpoints, metrics.jsonl, model/), OUT/tokenizer/, OUT/data/.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.config import build_run_config

DEFAULT_MINUTES = 6.0  # pretraining budget: the whole job stays under 10 minutes on 2 CPU cores
SAMPLE_PROMPTS = ["", "The king", "And God said", "Love is"]


def _say(msg: str) -> None:
    print(f"[speedrun] {msg}", file=sys.stderr, flush=True)


def unigram_bpb(data_dir: Path) -> float:
    """Bits-per-byte of a unigram model fitted on the train split, scored on the val split."""
    from lmstack.data.loader import load_meta

    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    vocab = int(meta["vocab_size"])

    def counts(split: str) -> np.ndarray:
        c = np.zeros(vocab, dtype=np.int64)
        for name in meta["splits"][split]["shards"]:
            c += np.bincount(np.memmap(data_dir / name, dtype=dtype, mode="r"), minlength=vocab)[:vocab]
        return c

    train, val = counts("train"), counts("val")
    probs = (train + 1) / (train.sum() + vocab)  # add-one smoothing: unseen tokens are not infinitely costly
    bits = -(val * np.log2(probs)).sum()
    return float(bits / meta["splits"]["val"]["bytes"])


def sample_texts(model_dir: Path, prompts: list[str], max_tokens: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """A few samples from the trained model through the engine (temperature 0.8, top-k 50)."""
    from lmstack.engine.engine import Engine
    from lmstack.engine.sampling import SamplingParams

    engine = Engine.from_checkpoint(model_dir, device="cpu")
    tok = engine.tokenizer
    prompt_ids = [[tok.eot_id] + tok.encode(p) for p in prompts]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed + i)
              for i in range(len(prompts))]
    outs = engine.generate(prompt_ids, params)
    return [{"prompt": p, "completion": o.outputs[0].text} for p, o in zip(prompts, outs)]


def speedrun(out_dir: str | Path = "runs/speedrun", corpus: str = "classics", preset: str = "tiny",
             config_file: str | None = None, overrides: list[str] | None = None, vocab_size: int | None = None,
             minutes: float | None = None, clean: bool = True, workers: int = 2) -> dict[str, Any]:
    from lmstack.data.shards import tokenize_to_shards
    from lmstack.data.corpora import download_corpus
    from lmstack.data.readers import iter_documents
    from lmstack.stages.pretrain import pretrain
    from lmstack.tokenizer import Tokenizer
    from lmstack.atomic import write_atomic, write_json_atomic

    run_began = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    cfg = build_run_config(preset, config_file, overrides)  # validate early, before any slow work
    timings: dict[str, float] = {}

    # 1. corpus
    began = time.time()
    corpus_path = Path(corpus)
    if not corpus_path.exists():
        _say(f"downloading corpus {corpus!r}")
        corpus_path = download_corpus(corpus)
    inputs = [corpus_path]
    timings["download"] = time.time() - began

    # 2. clean
    clean_report = None
    if clean:
        began = time.time()
        from lmstack.data.pipeline import clean_corpus

        _say("cleaning the corpus (normalize, filter, dedup, PII scrub, decontaminate)")
        clean_report = clean_corpus(inputs, out / "clean", workers=workers)
        inputs = [out / "clean"]
        timings["clean"] = time.time() - began

    # 3. tokenizer
    began = time.time()
    vocab = vocab_size or cfg.model.vocab_size
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() and Tokenizer.load(tok_dir).vocab_size == vocab:
        tokenizer = Tokenizer.load(tok_dir)
    else:
        _say(f"training a byte-level BPE tokenizer, vocabulary {vocab}")
        tokenizer = Tokenizer.train((d.text for d in iter_documents(inputs)), vocab_size=vocab)
        tokenizer.save(tok_dir)
    timings["tokenizer"] = time.time() - began

    # 4. shards
    began = time.time()
    data_dir = out / "data"
    if not (data_dir / "meta.json").is_file():
        _say("tokenizing into shards")
        tokenize_to_shards(inputs, tokenizer, data_dir, workers=workers)
    timings["tokenize"] = time.time() - began

    # 5. pretrain: reuse a finished run; continue an interrupted one (from its newest intact checkpoint,
    # or from scratch when it died before its first one)
    began = time.time()
    budget = minutes if minutes is not None else DEFAULT_MINUTES
    train_overrides = overrides + ([f"train.max_minutes={budget}"] if not any(
        o.startswith("train.max_minutes=") for o in overrides) else [])
    run_dir = out / "train"
    if (run_dir / "summary.json").is_file() and (run_dir / "model").is_dir():
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        _say(f"pretraining preset {preset!r} for up to {budget:g} minutes")
        summary = pretrain(data_dir, run_dir, preset=preset, config_file=config_file, overrides=train_overrides,
                           resume=run_dir.exists())
    timings["pretrain"] = time.time() - began
    if (run_dir / "loss.png").is_file():
        write_atomic(out / "loss.png", lambda tmp: shutil.copyfile(run_dir / "loss.png", tmp), suffix=".png")

    # 6. baseline + samples
    began = time.time()
    baseline = unigram_bpb(data_dir)
    samples = sample_texts(run_dir / "model", SAMPLE_PROMPTS, seed=cfg.train.seed)
    timings["sample"] = time.time() - began

    wall = time.time() - run_began
    report = {
        "val_bpb": summary["final_val_bpb"], "unigram_bpb": baseline, "val_loss": summary["final_val_loss"],
        "wall_seconds": wall, "params": summary["params"], "tokens": summary["tokens"],
        "steps": summary["steps"], "tokens_per_second": summary["tokens_per_second"],
        "preset": preset, "vocab_size": tokenizer.vocab_size, "timings": timings,
        "documents_kept": (clean_report or {}).get("documents_out"), "samples": samples,
        "model_dir": str(run_dir / "model"),
    }
    write_json_atomic(out / "report.json", report)
    from lmstack.evals.report import build_report

    build_report(out)  # OUT/report.md, the report card: training curves, samples and any evaluations of this run
    _print_summary(report)
    return report


def _print_summary(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="speedrun", show_header=False)
    table.add_row("parameters", f"{r['params'] / 1e6:.2f}M")
    table.add_row("tokens seen", f"{r['tokens']:,}")
    table.add_row("wall time", f"{r['wall_seconds'] / 60:.1f} min")
    table.add_row("val bits/byte", f"{r['val_bpb']:.3f}")
    table.add_row("unigram bits/byte", f"{r['unigram_bpb']:.3f}")
    console = Console(stderr=True)
    console.print(table)
    for s in r["samples"]:
        console.print(Text.assemble((s["prompt"] or "<doc>", "bold"), s["completion"]))  # no markup parsing
    if not (r["val_bpb"] < r["unigram_bpb"]) or math.isnan(r["val_bpb"]):
        console.print("[yellow]warning: the model did not beat the unigram baseline[/yellow]")
