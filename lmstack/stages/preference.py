"""The setup `lmstack reward` and `lmstack dpo` share: the starting checkpoint, the run config with the
stage's section, and the preference pairs. Wiring over lmstack/stages/sft.py's conventions.

    run = prepare_preference_run("dpo", DPOConfig, model, data, out_dir, preset, config_file, overrides, resume,
                                 lora=False)
    run.cfg, run.checkpoint (None: a fresh start), run.source (the loaded starting model), run.pairs, run.stats

The config is the model's own, the preset's ``optim`` and ``train`` sections (``train.seq_len`` capped at the
model's context), the stage's section (``reward.*`` or ``dpo.*``; ``--data`` sets its ``data``) and, with
``lora``, the ``lora`` section; then the config file and the ``key=value`` overrides. A resumed run keeps its
own config with the file and overrides on top. ``train.seq_len`` is the longest pair (prompt plus the longer
completion) trained on; see lmstack/data/preference.py for what happens to longer ones.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmstack.checkpoint import Checkpoint, load_checkpoint, read_config, save_checkpoint
from lmstack.config import RunConfig, SFTLoRAConfig, apply_overrides, get_preset, load_config_file, \
    model_config_from_dict
from lmstack.data.preference import PreferenceData, PreferenceStats, load_preference
from lmstack.errors import ConfigError, UserError
from lmstack.models import family_of, is_decoder
from lmstack.models.heads import ScalarHeadModel
from lmstack.models.peft import LoRAConfig, merge_lora
from lmstack.train.stage import stage_config


@dataclass
class PreferenceRun:
    cfg: RunConfig
    checkpoint: Path | None  # the step checkpoint to resume from
    source: Checkpoint  # the starting model (a backbone: a head is taken off)
    pairs: PreferenceData
    stats: PreferenceStats


def load_source(model: str | Path, verb: str) -> Checkpoint:
    """The starting checkpoint of a preference stage: a decoder with its tokenizer (a reward model's head is
    dropped, its backbone kept)."""
    source = load_checkpoint(model)
    if source.tokenizer is None:
        raise ConfigError(f"{model} has no tokenizer; {verb} needs a checkpoint saved with its tokenizer")
    if isinstance(source.model, ScalarHeadModel):
        source.model = source.model.backbone
    if not is_decoder(source.model.config):
        raise ConfigError(f"{model} is a {family_of(source.model.config).name} model; {verb} trains decoders "
                          "(gpt, moe, prefixlm, glm)")
    return source


def prepare_preference_run(section: str, section_cls: type, model: str | Path, data: list[str] | None,
                           out_dir: str | Path, preset: str, config_file: str | None, overrides: list[str] | None,
                           resume: bool, lora: bool = False) -> PreferenceRun:
    """Load the starting model, settle the run config and read the pairs (module docstring)."""
    source = load_source(model, f"lmstack {section}")
    overrides = [*([f"{section}.data={','.join(map(str, data))}"] if data else []), *(overrides or [])]
    defaults = get_preset(preset)
    file_overrides = load_config_file(config_file) if config_file else {}

    def configure(cfg: RunConfig) -> None:
        if cfg.lora is None and _names_lora(file_overrides, overrides):
            raise ConfigError(f"lora.* settings apply to LoRA runs only: pass --lora (a run started without it "
                              f"stays a full {section} run)")
        apply_overrides(cfg, file_overrides)
        apply_overrides(cfg, overrides)

    base = RunConfig(model=model_config_from_dict(source.config["model"]), optim=defaults.optim,
                     train=defaults.train, lora=SFTLoRAConfig() if lora else None, **{section: section_cls()})
    base.train.seq_len = min(base.train.seq_len, base.model.block_size)
    configure(base)
    _, checkpoint = stage_config(out_dir, preset, config_file, overrides, resume, base=base)
    cfg = base
    if checkpoint is not None:  # a resumed run keeps its own config, with the file and overrides on top
        cfg = RunConfig.from_dict(read_config(checkpoint))
        if lora and cfg.lora is None:
            raise UserError(f"the run in {out_dir} trains every weight; --lora cannot be added when resuming it "
                            "(start a new run in another --out)")
        configure(cfg)
    cfg.validate()
    scfg = getattr(cfg, section)
    stats = PreferenceStats()
    pairs = load_preference(scfg.data, source.tokenizer, cfg.train.seq_len, weights=scfg.weights,
                            overlong=scfg.overlong, skip_bad=scfg.skip_bad_records, val_fraction=scfg.val_fraction,
                            seed=scfg.seed, stats=stats, skip_hint=f"{section}.skip_bad_records=true")
    if int(os.environ.get("RANK", "0")) == 0:
        for problem in stats.problems:  # the first few, so a skipped record is not a silent loss of data
            print(f"skipped {problem}", file=sys.stderr)
        for note in stats.notes:
            print(f"{stats.ratings_skipped} {note}", file=sys.stderr)
    return PreferenceRun(cfg, checkpoint, source, pairs, stats)


def _names_lora(file_overrides: dict[str, Any], overrides: list[str]) -> bool:
    """Whether the config file (nested or dotted keys) or a ``key=value`` override sets a ``lora.*`` key."""
    keys = [str(key) for key in file_overrides] + [item.partition("=")[0].strip() for item in overrides]
    return any(key == "lora" or key.startswith("lora.") for key in keys)


def write_adapter_and_merged(model: nn.Module, lora_cfg: LoRAConfig, out_dir: Path, source_path: Path,
                             tokenizer: Any) -> None:
    """OUT/adapter (peft's layout) from the trained factors, then OUT/model rewritten as the merged model, a
    normal checkpoint under the run's config (the loop saved it with the factors unmerged)."""
    from lmstack.interop.peft_adapters import save_adapter

    save_adapter(model, lora_cfg, out_dir / "adapter", base_model_name_or_path=str(source_path))
    merge_lora(model)
    save_checkpoint(out_dir / "model", model, read_config(out_dir / "model"), tokenizer)


def describe(stats: PreferenceStats) -> str:
    """The data part of the startup line."""
    left_out = [f"{n} {what}" for n, what in ((stats.skipped, "skipped"), (stats.ratings_skipped, "ratings skipped"),
                                              (stats.truncated, "prompts cut"), (stats.dropped, "over-long dropped"))
                if n]
    return f"{stats.train_pairs:,} training pairs, {stats.val_pairs:,} held out" + \
        (f" ({', '.join(left_out)})" if left_out else "")


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every id to the same bytes and have the same special tokens."""
    if a.vocab_size != b.vocab_size or a.special_tokens != b.special_tokens:
        return False
    special = set(a.special_tokens.values())
    return all(a.token_bytes(i) == b.token_bytes(i) for i in range(a.vocab_size) if i not in special)


def batches_on(device: torch.device, loader) -> Any:
    """The loader's batches with every tensor on ``device``."""
    for batch in loader:
        yield {k: v.to(device) for k, v in batch.items()}
