"""`lmstack pretrain`: train a model from scratch on token shards. Thin wiring over train/stage.py.

    lmstack data tokenize classics --tokenizer TOK --out data/classics
    lmstack pretrain --data data/classics --out runs/tiny --preset tiny train.max_steps=500
    lmstack pretrain --data data/classics --out runs/tiny --resume            # continue a killed run
    torchrun --nproc_per_node 2 -m lmstack.cli pretrain --data ... --out ...   # DDP (gloo on CPU)

The model's vocabulary follows the tokenizer stored with the shards: ``model.vocab_size`` becomes
the tokenizer's size rounded up to a multiple of 64 (faster matmuls; the extra rows are never
produced by the tokenizer), unless it is set explicitly. The model is initialised from
``train.seed``, so two runs with the same config and data are identical.
The objective follows the model family (``lmstack.models.FAMILIES[...].objective``).

An --out directory that already holds a run is refused unless ``resume`` (continue it) or
``overwrite`` (replace its training outputs) says what to do with it; see train/stage.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.config import RunConfig
from lmstack.errors import ConfigError


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
             progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train on DATA_DIR (from `lmstack data tokenize`) into OUT_DIR; returns the run summary dict.

    ``resume`` continues the run in OUT_DIR from its newest intact checkpoint (with its config, plus
    ``config_file`` and ``overrides``); ``overwrite`` replaces a previous run's outputs in OUT_DIR.
    """
    from lmstack.data.loader import TokenLoader, load_meta
    from lmstack.models import build_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.losses import objective_for
    from lmstack.train.stage import StageParts, run_stage, stage_config

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    load_meta(data_dir)  # a clear error when DATA_DIR holds no shards, before anything else
    cfg, checkpoint = stage_config(out_dir, preset, config_file, overrides, resume, base=cfg)
    tokenizer = Tokenizer.load(data_dir)
    explicit_vocab = any(o.startswith("model.vocab_size=") for o in (overrides or []))
    _fit_vocab(cfg, tokenizer.vocab_size, explicit_vocab or checkpoint is not None)

    def build(cfg: RunConfig, dist) -> StageParts:
        tcfg = cfg.train
        train_loader, val_loader = (TokenLoader(data_dir, split, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed,
                                                rank=dist.dp_rank, world_size=dist.dp_size)
                                    for split in ("train", "val"))
        return StageParts(model=build_model(cfg.model), train_loader=train_loader, val_loader=val_loader,
                          objective=objective_for(cfg.model, tokenizer), tokenizer=tokenizer,
                          description=f"{train_loader.tokens:,} training tokens")

    return run_stage(cfg, out_dir, build, resume=resume, overwrite=overwrite, resume_from=checkpoint,
                     progress=progress, extra_config={"data": {"dir": str(data_dir)}})
