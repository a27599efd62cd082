"""`lmstack scaling sweep`: train a small grid of model sizes x token budgets for a scaling-law fit.

    lmstack scaling sweep --out runs/scaling          # 3 sizes x 3 budgets + 1 held-out run (~30 min, busy 2-core VM)
    lmstack scaling fit runs/scaling --flops 1e15     # the fit itself: lmstack.evals.scaling

Every (model size, token budget) pair of the grid is one ``lmstack.stages.pretrain`` run on the default
corpus (or ``--data DIR`` shards), plus one *held-out* larger run that the fit never sees. The sweep
writes RUN/points.jsonl (one line per run: non-embedding parameters N, tokens D, FLOPs, final validation
loss), which ``lmstack.evals.scaling.fit_report`` reads. Each run uses a cosine schedule sized to its own
token budget (Chinchilla's correction of Kaplan's fixed-schedule runs).

Finished runs (RUN/runs/NAME/summary.json) are reused and an interrupted one is continued (from its
newest checkpoint, or from scratch when it had none), so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from lmstack.atomic import write_text_atomic
from lmstack.errors import DataError
from lmstack.evals.scaling import ScalingPoint
from lmstack.train.loop import TrainingDiverged

# default grid: (n_layer, n_embd, n_head) per size, and token budgets; held-out = one size up (1.9x N), largest budget
DEFAULT_SIZES: list[tuple[int, int, int]] = [(2, 64, 2), (3, 96, 3), (4, 128, 4)]
DEFAULT_TOKENS: list[int] = [250_000, 600_000, 1_500_000]
DEFAULT_HELDOUT: tuple[tuple[int, int, int], int] = ((5, 160, 5), 1_500_000)


def default_data(out_dir: Path, vocab_size: int, max_mb: float) -> Path:
    """Shards of the default corpus (classics), with a small BPE tokenizer trained on it; cached in OUT."""
    data_dir = out_dir / "data"
    if (data_dir / "meta.json").is_file():
        return data_dir
    from lmstack.data.corpora import download_corpus
    from lmstack.data.readers import iter_documents
    from lmstack.data.shards import tokenize_to_shards
    from lmstack.tokenizer import Tokenizer

    corpus = download_corpus("classics")
    budget = int(max_mb * 1024 * 1024)
    # a fixed-size slice keeps tokenizing within the CPU budget; JSONL keeps the documents apart (a .txt file
    # would be one document, and the train/val split needs several)
    subset = out_dir / "corpus.jsonl"
    if not subset.is_file():
        lines, written = [], 0
        for doc in iter_documents([corpus]):
            text = doc.text.strip()
            if not text:
                continue
            lines.append(json.dumps({"text": text}) + "\n")
            written += len(text.encode("utf-8"))
            if written >= budget:
                break
        write_text_atomic(subset, "".join(lines))
    texts = [doc.text for doc in iter_documents([subset])]
    if len(texts) < 2:
        raise DataError(f"{subset} holds {len(texts)} document(s); the train/val split needs at least two "
                        "(raise the corpus slice or pass --data)")
    print(f"training a {vocab_size}-token BPE tokenizer on {subset} ({len(texts)} documents)", file=sys.stderr)
    tokenizer = Tokenizer.train(texts, vocab_size=vocab_size)
    tokenize_to_shards([subset], tokenizer, data_dir, workers=0, val_fraction=0.02, progress=True)
    return data_dir


def _non_embedding_params(summary: dict) -> int:
    from lmstack.config import model_config_from_dict
    from lmstack.models import build_model

    model = build_model(model_config_from_dict(summary["config"]["model"]))
    return int(model.num_params(non_embedding=True))


def sweep(out_dir: str | Path, data_dir: str | Path | None = None,
          sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES, token_budgets: Sequence[int] = DEFAULT_TOKENS,
          heldout: tuple[tuple[int, int, int], int] | None = DEFAULT_HELDOUT, seq_len: int = 128,
          batch_size: int = 16, lr: float = 2e-3, vocab_size: int = 2048, corpus_mb: float = 8.0,
          eval_batches: int = 40, extra_overrides: Sequence[str] = ()) -> list[ScalingPoint]:
    """Train the grid (and the held-out run); returns the points, also written to OUT/points.jsonl."""
    from lmstack.stages.pretrain import pretrain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir else default_data(out, vocab_size, corpus_mb)
    plan = [((L, C, H), D, False) for (L, C, H) in sizes for D in token_budgets]
    if heldout is not None:
        plan.append((heldout[0], heldout[1], True))
    points: list[ScalingPoint] = []
    for i, ((n_layer, n_embd, n_head), tokens, is_heldout) in enumerate(plan):
        name = f"L{n_layer}-C{n_embd}-D{tokens}"
        run_dir = out / "runs" / name
        steps = max(10, tokens // (batch_size * seq_len))
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
        else:
            print(f"[{i + 1}/{len(plan)}] {name}{' (held out)' if is_heldout else ''}: {steps} steps", file=sys.stderr)
            overrides = [f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", f"model.n_head={n_head}",
                         f"model.n_kv_head={n_head}", f"model.block_size={seq_len}", f"train.seq_len={seq_len}",
                         f"train.batch_size={batch_size}", f"train.max_steps={steps}", "train.max_minutes=0",
                         "train.eval_every=0", f"train.eval_batches={eval_batches}", "train.ckpt_every=0",
                         "train.tensorboard=false", f"train.log_every={max(1, steps // 20)}", f"optim.lr={lr}",
                         f"optim.warmup_steps={max(5, steps // 20)}", "optim.schedule=cosine",
                         *extra_overrides]
            summary = pretrain(data, run_dir, preset="tiny", overrides=overrides, progress=True,
                               resume=run_dir.exists())  # an interrupted run of this sweep is continued
        loss = summary.get("final_val_loss")
        if loss is None or not math.isfinite(loss):
            raise TrainingDiverged(f"run {name} produced no finite validation loss; see {run_dir}/metrics.jsonl "
                                   "and lower --lr")
        n = _non_embedding_params(summary)
        points.append(ScalingPoint(name=name, params=n, tokens=int(summary["tokens"]), loss=float(loss),
                                   flops=float(summary.get("flops_per_token") or 6 * n) * summary["tokens"],
                                   heldout=is_heldout))
    write_text_atomic(out / "points.jsonl", "".join(json.dumps(asdict(p)) + "\n" for p in points))
    return points
