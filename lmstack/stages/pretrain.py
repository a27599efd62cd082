"""`lmstack pretrain`: train a model from scratch on token shards. Thin wiring over train/loop.py.

    lmstack data tokenize classics --tokenizer TOK --out data/classics
    lmstack pretrain --data data/classics --out runs/tiny --preset tiny train.max_steps=500
    torchrun --nproc_per_node 2 -m lmstack.cli pretrain --data ... --out ...   # DDP (gloo on CPU)

The model's vocabulary follows the tokenizer stored with the shards: ``model.vocab_size`` becomes
the tokenizer's size rounded up to a multiple of 64 (faster matmuls; the extra rows are never
produced by the tokenizer), unless it is set explicitly. The model is initialised from
``train.seed``, so two runs with the same config and data are identical.
The objective follows the model family (train/losses.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lmstack.config import ConfigError, RunConfig, apply_overrides, build_run_config, load_config_file


def _fit_vocab(cfg: RunConfig, tokenizer_vocab: int, explicit: bool) -> None:
    """The model's vocabulary follows the tokenizer (rounded up to 64) unless set explicitly."""
    if explicit:
        if cfg.model.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({tokenizer_vocab}); raise it or drop the override")
        return
    cfg.model.vocab_size = 64 * ((tokenizer_vocab + 63) // 64)


def pretrain(data_dir: str | Path, out_dir: str | Path, preset: str = "tiny", config_file: str | None = None,
             overrides: list[str] | None = None, resume: bool = False, cfg: RunConfig | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Train on DATA_DIR (from `lmstack data tokenize`) into OUT_DIR; returns the run summary dict."""
    from lmstack.data.loader import TokenLoader
    from lmstack.models import build_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.dist import cleanup_distributed, init_distributed
    from lmstack.train.losses import objective_for
    from lmstack.train.loop import train

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    explicit_vocab = any(o.startswith("model.vocab_size=") for o in (overrides or []))
    if resume and cfg is None and (out_dir / "checkpoints").is_dir():
        cfg = _config_of_run(out_dir)  # resume with the config the run started with (+ new overrides)
        if config_file:
            apply_overrides(cfg, load_config_file(config_file))
        apply_overrides(cfg, overrides or [])
    cfg = cfg or build_run_config(preset, config_file, overrides)
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir} holds no meta.json; make token shards with "
                                "`lmstack data tokenize INPUT --tokenizer TOK --out DIR` first")
    tokenizer = Tokenizer.load(data_dir)
    _fit_vocab(cfg, tokenizer.vocab_size, explicit_vocab)
    cfg.validate()

    info = init_distributed(cfg.train.device)
    try:
        t = cfg.train
        train_loader = TokenLoader(data_dir, "train", t.batch_size, t.seq_len, seed=t.seed,
                                   rank=info.rank, world_size=info.world_size)
        val_loader = TokenLoader(data_dir, "val", t.batch_size, t.seq_len, seed=t.seed,
                                 rank=info.rank, world_size=info.world_size)
        from lmstack.train.loop import seed_everything

        seed_everything(cfg.train.seed)  # same seed on every rank: DDP replicas start identical
        model = build_model(cfg.model)
        if info.is_main and progress:
            print(f"model: {cfg.model.family}, {model.num_params() / 1e6:.2f}M parameters; "
                  f"{train_loader.tokens:,} training tokens; device {info.device}", file=sys.stderr)
        result = train(model, cfg, train_loader, val_loader, objective_for(cfg.model, tokenizer), out_dir,
                       tokenizer=tokenizer, resume=resume, info=info,
                       extra_config={"data": {"dir": str(data_dir)}}, progress=progress)
    finally:
        cleanup_distributed()
    summary = {**result.to_dict(), "flops_per_token": model.flops_per_token(cfg.train.seq_len),
               "config": cfg.to_dict()}
    if info.is_main:
        from lmstack.atomic import write_json_atomic

        write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _config_of_run(out_dir: Path) -> RunConfig:
    from lmstack.checkpoint import latest_checkpoint

    latest = latest_checkpoint(out_dir / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"{out_dir}/checkpoints holds no checkpoint to resume from")
    d = json.loads((latest / "config.json").read_text())
    return RunConfig.from_dict({k: d[k] for k in ("model", "optim", "train") if k in d})
