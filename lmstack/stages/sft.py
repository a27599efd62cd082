"""`lmstack sft`: supervised fine-tuning of a trained (or imported) decoder on conversations. Wiring over train/stage.py.

    python -m lmstack.data.instruct --make-tasks tasks.jsonl --n 2000
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-sft train.max_steps=200
    lmstack sft --model models/smollm2 --data a.jsonl --data b.parquet --out runs/s sft.weights=1,0.5 sft.loss_on=last_turn
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-sft --resume
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-lora --lora lora.r=16 lora.alpha=32

Full fine-tuning: every weight trains, starting from MODEL (a checkpoint lmstack wrote or imported, with its
tokenizer, whose chat format renders the conversations; see lmstack/data/instruct.py). The run config is
the model's own config, the preset's ``optim`` and ``train`` sections (pick a smaller ``optim.lr`` than
pretraining used), then the config file and the ``key=value`` overrides, including the ``sft`` section
(lmstack.config.SFTConfig). ``train.seq_len`` is the longest conversation trained on (plus one token);
batches are padded to their longest conversation, so tokens/s and MFU count real tokens only.

The objective is the model's causal LM loss on the trained tokens (the mixture-of-experts loss for a MoE
model). OUT/model is a normal checkpoint with the tokenizer (chat, serve, eval and export read it);
OUT/summary.json adds ``data``: conversations read, used, skipped, truncated and dropped, and the trainable
tokens of one epoch. Validation reports the loss on held-out conversations (``sft.val_fraction``).
``sft.packing=true`` packs the training conversations into windows of ``train.seq_len`` tokens instead of
padding each batch (lmstack/data/instruct.py); the model keeps attention and positions inside each
conversation, so the loss is the padded run's, on fewer rows. Validation batches stay padded.

With ``--lora`` the run has a ``lora`` section (lmstack.config.SFTLoRAConfig: ``lora.r``, ``lora.alpha``,
``lora.dropout``, ``lora.target_modules``, ``lora.use_rslora``; ``lora.*`` keys without ``--lora`` are refused)
and only low-rank adapters on the named linear layers train (lmstack.models.peft); the base weights stay
frozen. A resumed run keeps the kind it started as. The step checkpoints hold the base weights and the
adapter factors together, so a resume restores both exactly; they load back into a LoRA run, not as plain
models. At the end OUT/adapter is the adapter in peft's layout (lmstack.interop.peft_adapters, with
``base_model_name_or_path`` the source model) and OUT/model the merged model, a normal checkpoint.
summary.json adds ``lora``: trainable and total parameters and the adapted layers.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

from lmstack.atomic import write_json_atomic
from lmstack.checkpoint import load_checkpoint, load_model_state, model_state, read_config, save_checkpoint
from lmstack.config import (RunConfig, SFTConfig, SFTLoRAConfig, apply_overrides, get_preset, load_config_file,
                            model_config_from_dict)
from lmstack.errors import ConfigError, UserError
from lmstack.models import build_model, family_of, is_decoder
from lmstack.models.peft import LoRAConfig, apply_lora, merge_lora, trainable_parameters


def sft(model: str | Path, data: list[str] | None, out_dir: str | Path, preset: str = "tiny",
        config_file: str | None = None, overrides: list[str] | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = True, lora: bool = False) -> dict[str, Any]:
    """Fine-tune MODEL on the conversation files ``data`` into OUT_DIR; returns the run summary dict.

    ``data`` sets ``sft.data`` (None keeps the config's). ``resume`` continues the run in OUT_DIR with the
    config it started with plus ``config_file`` and ``overrides``; ``overwrite`` replaces its outputs. ``lora``
    trains a LoRA adapter instead of every weight (a resumed LoRA run stays one without it).
    """
    from lmstack.data.instruct import InstructLoader, InstructStats, load_instruct
    from lmstack.train.losses import causal_lm, moe_lm
    from lmstack.train.stage import StageParts, run_stage, stage_config

    source = load_checkpoint(model)
    if source.tokenizer is None:
        raise ConfigError(f"{model} has no tokenizer; fine-tune a checkpoint saved with its tokenizer")
    if not is_decoder(source.model.config):
        raise ConfigError(f"{model} is a {family_of(source.model.config).name} model; sft trains decoders "
                          "(gpt, moe, prefixlm, glm)")
    extra = [f"sft.data={','.join(map(str, data))}"] if data else []
    overrides = [*extra, *(overrides or [])]
    defaults = get_preset(preset)
    file_overrides = load_config_file(config_file) if config_file else {}

    def configure(cfg: RunConfig) -> None:
        if cfg.lora is None and _names_lora(file_overrides, overrides):
            raise ConfigError("lora.* settings apply to LoRA runs only: pass --lora (a run started without it "
                              "stays a full fine-tune)")
        apply_overrides(cfg, file_overrides)
        apply_overrides(cfg, overrides)

    base = RunConfig(model=model_config_from_dict(source.config["model"]), optim=defaults.optim,
                     train=defaults.train, sft=SFTConfig(), lora=SFTLoRAConfig() if lora else None)
    base.train.seq_len = min(base.train.seq_len, base.model.block_size)  # the preset's, where the model allows it
    configure(base)
    _, checkpoint = stage_config(out_dir, preset, config_file, overrides, resume, base=base)
    cfg = base
    if checkpoint is not None:  # a resumed run keeps its own config, with the file and overrides on top
        cfg = RunConfig.from_dict(read_config(checkpoint))
        if lora and cfg.lora is None:
            raise UserError(f"the run in {out_dir} is a full fine-tune; --lora cannot be added when resuming it "
                            "(start a new run in another --out)")
        configure(cfg)
    cfg.validate()
    scfg, tokenizer = cfg.sft, source.tokenizer
    stats = InstructStats()
    instruct = load_instruct(scfg.data, tokenizer, cfg.train.seq_len + 1, weights=scfg.weights,
                             loss_on=scfg.loss_on, overlong=scfg.overlong, skip_bad=scfg.skip_bad_records,
                             val_fraction=scfg.val_fraction, seed=scfg.seed, stats=stats)
    if int(os.environ.get("RANK", "0")) == 0:
        for problem in stats.problems:  # the first few, so a skipped record is not a silent loss of data
            print(f"skipped {problem}", file=sys.stderr)
    source_weights, source_path = model_state(source.model), source.path
    del source  # the weights stay (in source_weights) until build() has loaded them into the model it trains
    objective = moe_lm if family_of(cfg.model).objective == "moe_lm" else causal_lm  # both read packed layouts
    lora_cfg = LoRAConfig(**dataclasses.asdict(cfg.lora)) if cfg.lora is not None else None
    trained: dict[str, Any] = {}  # what build() made for this process, for the adapter written at the end

    def build(cfg: RunConfig, dist) -> StageParts:
        tcfg = cfg.train
        train_loader = InstructLoader(instruct.train, tcfg.batch_size, seed=tcfg.seed, pad_id=tokenizer.pad_id,
                                      rank=dist.rank, world_size=dist.world_size,
                                      pack_len=tcfg.seq_len if cfg.sft.packing else None)
        val_loader = InstructLoader(instruct.val, tcfg.batch_size, pad_id=tokenizer.pad_id, shuffle=False,
                                    rank=dist.rank, world_size=dist.world_size)
        skipped = f", {stats.skipped} skipped" if stats.skipped else ""
        model = build_model(cfg.model)  # the config may change what does not touch the weights (dropout)
        load_model_state(model, source_weights, source_path)
        source_weights.clear()  # the model holds its own copy now: do not keep the weights twice
        adapted = ""
        if lora_cfg is not None:  # before the loop restores a checkpoint: it holds the factors by these names
            modules = apply_lora(model, lora_cfg)
            trainable, total = trainable_parameters(model)
            trained["lora"] = {"trainable_params": trainable, "total_params": total, "modules": modules}
            adapted = (f"; LoRA r={lora_cfg.r} on {len(modules)} layers: {trainable:,} of {total:,} parameters "
                       f"train ({100 * trainable / total:.2f}%)")
        trained["model"] = model
        return StageParts(model=model, train_loader=train_loader, val_loader=val_loader,
                          objective=objective, tokenizer=tokenizer,
                          description=f"{stats.train_examples:,} training conversations ({stats.trainable_tokens:,} "
                                      f"trained tokens per epoch), {stats.val_examples:,} held out{skipped}{adapted}")

    summary = run_stage(cfg, out_dir, build, resume=resume, overwrite=overwrite, resume_from=checkpoint,
                        progress=progress, extra_config={"data": {"source_model": str(source_path)}})
    summary["data"] = stats.to_dict()
    if lora_cfg is not None:
        summary["lora"] = trained["lora"]
    if int(os.environ.get("RANK", "0")) == 0:
        if lora_cfg is not None:
            _write_adapter_and_merged(trained["model"], lora_cfg, Path(out_dir), source_path, tokenizer)
        write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def _names_lora(file_overrides: dict[str, Any], overrides: list[str]) -> bool:
    """Whether the config file (nested or dotted keys) or a ``key=value`` override sets a ``lora.*`` key."""
    keys = [str(key) for key in file_overrides] + [item.partition("=")[0].strip() for item in overrides]
    return any(key == "lora" or key.startswith("lora.") for key in keys)


def _write_adapter_and_merged(model: nn.Module, lora_cfg: LoRAConfig, out_dir: Path, source_path: Path,
                              tokenizer: Any) -> None:
    """OUT/adapter (peft layout) from the trained factors, then OUT/model rewritten as the merged model.

    The loop saved OUT/model from the wrapped model (base weights plus factors); the merged weights replace
    them under the same config, so chat, serve, eval and export read OUT/model as any other checkpoint."""
    from lmstack.interop.peft_adapters import save_adapter

    save_adapter(model, lora_cfg, out_dir / "adapter", base_model_name_or_path=str(source_path))
    merge_lora(model)
    save_checkpoint(out_dir / "model", model, read_config(out_dir / "model"), tokenizer)
