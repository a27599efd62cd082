"""`lmstack sft`: supervised fine-tuning of a trained (or imported) decoder on conversations. Wiring over train/stage.py.

    python -m lmstack.data.instruct --make-tasks tasks.jsonl --n 2000
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-sft train.max_steps=200
    lmstack sft --model models/smollm2 --data a.jsonl --data b.parquet --out runs/s sft.weights=1,0.5 sft.loss_on=last_turn
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-sft --resume
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-lora --lora lora.r=16 lora.alpha=32
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-qlora --lora --quantize int4
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-pt --prompt-tuning prompt_tuning.init=vocab
    lmstack sft --model runs/tiny/model --data tasks.jsonl --out runs/tiny-px --prefix-tuning prefix_tuning.num_virtual_tokens=8

Full fine-tuning: every weight trains, starting from MODEL (a checkpoint lmstack wrote or imported, with its
tokenizer, whose chat format renders the conversations; see lmstack/data/instruct.py). The run config is
the model's own config, the preset's ``optim`` and ``train`` sections (pick a smaller ``optim.lr`` than
pretraining used), then the config file and the ``key=value`` overrides, including the ``sft`` section
(lmstack.config.SFTConfig). ``train.seq_len`` is the longest conversation trained on (plus one token);
batches are padded to their longest conversation, so tokens/s and MFU count real tokens only.

The objective is the model's causal LM loss on the trained tokens (the mixture-of-experts loss for a MoE
model). For the dense families the output head and the cross-entropy run only at the positions that have a
label (lmstack.train.losses.causal_lm_at_labels: the same loss and gradients as the full logits, without the
prompt's and the padding's logits); a MoE model still forms logits everywhere. OUT/model is a normal
checkpoint with the tokenizer (chat, serve, eval and export read it);
OUT/summary.json adds ``data``: conversations read, used, skipped, truncated and dropped, and the trainable
tokens of one epoch. Validation reports the loss on held-out conversations (``sft.val_fraction``).
``sft.packing=true`` packs the training conversations into windows of ``train.seq_len`` tokens instead of
padding each batch (lmstack/data/instruct.py); the model keeps attention and positions inside each
conversation, so the loss is the padded run's, on fewer rows. ``sft.padding_free=true`` keeps the padded
run's batches (the same ``train.batch_size`` conversations per step, in the same order) but lays each batch
out as one row of its conversations back to back, without padding: the same loss and gradients, computed
on the real tokens only (each conversation still sees only itself; the model runs SDPA's causal kernel per
conversation, lmstack.models.layers.DocumentSpans). Validation batches stay padded.

With ``--lora`` the run has a ``lora`` section (lmstack.config.SFTLoRAConfig: ``lora.r``, ``lora.alpha``,
``lora.dropout``, ``lora.target_modules``, ``lora.use_rslora``; ``lora.*`` keys without ``--lora`` are refused)
and only low-rank adapters on the named linear layers train (lmstack.models.peft); the base weights stay
frozen. A resumed run keeps the kind it started as. The step checkpoints hold the base weights and the
adapter factors together, so a resume restores both exactly; they load back into a LoRA run, not as plain
models. At the end OUT/adapter is the adapter in peft's layout (lmstack.interop.peft_adapters, with
``base_model_name_or_path`` the source model) and OUT/model the merged model, a normal checkpoint.
summary.json adds ``lora``: trainable and total parameters and the adapted layers.

``--quantize int8|int4`` (with ``--lora`` only; the ``lora.quantize`` key) trains LoRA over a quantized base,
QLoRA-style: before the adapter is applied every linear layer of the base becomes an int8 (per output
channel) or int4 (groups of 32 inputs; the output head int8) layer of lmstack.models.quant, whose weights
are buffers (no gradient, no optimizer state) and whose backward passes the gradient to the input through
the dequantized weight; a tied output head stays the float matrix it shares with the embedding. The
factors train in fp32. OUT/model is the adapter merged into the *dequantized* base (the weights the adapter
was trained against, in the source's dtype), not into the original float weights: it computes what the
trained model computed, minus the quantized kernels' rounding. OUT/adapter is the same adapter in peft's
layout; put on the original float base (``--adapter``, or peft) it gives W + BA rather than dequant(W) + BA.
summary.json's ``lora`` adds ``quantize``, ``base_weight_bytes`` (the frozen base as stored: quantized
layers at their real width), ``float_base_weight_bytes`` (the same base in float) and
``optimizer_state_bytes`` (AdamW's two fp32 moments of the trainable parameters).

``--prompt-tuning`` and ``--prefix-tuning`` (alternatives to ``--lora``; a ``prompt_tuning`` or
``prefix_tuning`` section, lmstack.config.SFTPromptTuningConfig: ``num_virtual_tokens``, ``init``,
``init_text``, ``seed``) freeze the whole model and train N virtual input vectors, or N keys and values per
attention layer (lmstack.models.peft; gpt and moe families). The virtual tokens use up context:
``train.seq_len`` + N must fit ``model.block_size``, and packing is refused (the wrappers take no positions).
The step checkpoints hold the frozen base with the vectors, so a resume is exact. At the end OUT/adapter is
the trained vectors in peft's PROMPT_TUNING / PREFIX_TUNING layout (lmstack.interop.peft_adapters; peft
loads it onto the ``lmstack export --format hf`` model), and there is no OUT/model: the vectors cannot be
folded into the weights, so the loop's final save of the wrapped model is removed and the adapter goes with
the source model. summary.json adds the section's name with trainable and total parameters.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

from lmstack.atomic import write_json_atomic
from lmstack.checkpoint import load_checkpoint, load_model_state, model_state, read_config, save_checkpoint
from lmstack.config import (RunConfig, SFTConfig, SFTLoRAConfig, SFTPrefixTuningConfig, SFTPromptTuningConfig,
                            apply_overrides, get_preset, load_config_file, model_config_from_dict)
from lmstack.errors import ConfigError, UserError
from lmstack.models import build_model, family_of, is_decoder
from lmstack.models.peft import (LoRAConfig, PrefixTuningConfig, PromptTuningConfig, apply_lora, apply_prefix_tuning,
                                 apply_prompt_tuning, merge_lora, trainable_parameters)
from lmstack.models.quant import QUANTIZED_LINEARS, dequantize_model, quantize_model, weight_bytes

# the parameter-efficient methods: the config section each one adds, and its flag
METHOD_FLAGS = {"lora": "--lora", "prompt_tuning": "--prompt-tuning", "prefix_tuning": "--prefix-tuning"}


def sft(model: str | Path, data: list[str] | None, out_dir: str | Path, preset: str = "tiny",
        config_file: str | None = None, overrides: list[str] | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = True, lora: bool = False, quantize: str | None = None,
        prompt_tuning: bool = False, prefix_tuning: bool = False) -> dict[str, Any]:
    """Fine-tune MODEL on the conversation files ``data`` into OUT_DIR; returns the run summary dict.

    ``data`` sets ``sft.data`` (None keeps the config's). ``resume`` continues the run in OUT_DIR with the
    config it started with plus ``config_file`` and ``overrides``; ``overwrite`` replaces its outputs. ``lora``
    trains a LoRA adapter instead of every weight (a resumed LoRA run stays one without it); ``quantize``
    ("int8" / "int4", with ``lora`` only) quantizes its frozen base. ``prompt_tuning`` / ``prefix_tuning``
    train virtual tokens or per-layer prefixes instead (one method per run; see the module docstring).
    """
    from lmstack.data.instruct import InstructLoader, InstructStats, load_instruct
    from lmstack.train.losses import causal_lm_at_labels, moe_lm
    from lmstack.train.stage import StageParts, run_stage, stage_config

    chosen = [name for name, on in (("lora", lora), ("prompt_tuning", prompt_tuning), ("prefix_tuning", prefix_tuning))
              if on]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(METHOD_FLAGS[c] for c in chosen)} are alternatives; pass one of "
                        f"{', '.join(METHOD_FLAGS.values())}")
    if quantize is not None and not lora:
        raise UserError("--quantize quantizes the frozen base of a LoRA run; pass --lora with it")
    source = load_checkpoint(model)
    if source.tokenizer is None:
        raise ConfigError(f"{model} has no tokenizer; fine-tune a checkpoint saved with its tokenizer")
    if not is_decoder(source.model.config):
        raise ConfigError(f"{model} is a {family_of(source.model.config).name} model; sft trains decoders "
                          "(gpt, moe, prefixlm, glm)")
    extra = [f"sft.data={','.join(map(str, data))}"] if data else []
    extra += [f"lora.quantize={quantize}"] if quantize is not None else []
    overrides = [*extra, *(overrides or [])]
    defaults = get_preset(preset)
    file_overrides = load_config_file(config_file) if config_file else {}

    def configure(cfg: RunConfig) -> None:
        for name, flag in METHOD_FLAGS.items():
            if getattr(cfg, name) is None and _names_section(file_overrides, overrides, name):
                raise ConfigError(f"{name}.* settings apply to {flag} runs only: pass {flag} (a run keeps the "
                                  "kind it started as)")
        apply_overrides(cfg, file_overrides)
        apply_overrides(cfg, overrides)

    base = RunConfig(model=model_config_from_dict(source.config["model"]), optim=defaults.optim,
                     train=defaults.train, sft=SFTConfig(), lora=SFTLoRAConfig() if lora else None,
                     prompt_tuning=SFTPromptTuningConfig() if prompt_tuning else None,
                     prefix_tuning=SFTPrefixTuningConfig() if prefix_tuning else None)
    base.train.seq_len = min(base.train.seq_len, base.model.block_size)  # the preset's, where the model allows it
    configure(base)
    virtual_section = base.prompt_tuning or base.prefix_tuning
    if virtual_section is not None and not _names_section(file_overrides, overrides, "train.seq_len"):
        # the virtual tokens take part of the context: shorten the preset's conversations to leave them room
        base.train.seq_len = max(1, min(base.train.seq_len, base.model.block_size - virtual_section.num_virtual_tokens))
    _, checkpoint = stage_config(out_dir, preset, config_file, overrides, resume, base=base)
    cfg = base
    if checkpoint is not None:  # a resumed run keeps its own config, with the file and overrides on top
        cfg = RunConfig.from_dict(read_config(checkpoint))
        for name in chosen:
            if getattr(cfg, name) is None:
                raise UserError(f"the run in {out_dir} is {_kind(cfg)}; {METHOD_FLAGS[name]} cannot be added when "
                                "resuming it (start a new run in another --out)")
        configure(cfg)
    cfg.validate()
    scfg, tokenizer = cfg.sft, source.tokenizer
    method = next((name for name in METHOD_FLAGS if getattr(cfg, name) is not None), None)
    lora_cfg = LoRAConfig(**{k: v for k, v in dataclasses.asdict(cfg.lora).items() if k != "quantize"}) \
        if cfg.lora is not None else None
    virtual = _virtual_config(cfg)
    stats = InstructStats()
    instruct = load_instruct(scfg.data, tokenizer, cfg.train.seq_len + 1, weights=scfg.weights,
                             loss_on=scfg.loss_on, overlong=scfg.overlong, skip_bad=scfg.skip_bad_records,
                             val_fraction=scfg.val_fraction, seed=scfg.seed, stats=stats)
    if int(os.environ.get("RANK", "0")) == 0:
        for problem in stats.problems:  # the first few, so a skipped record is not a silent loss of data
            print(f"skipped {problem}", file=sys.stderr)
    source_weights, source_path = model_state(source.model), source.path
    _check_method(source.model, cfg, lora_cfg, virtual, tokenizer)  # before the run directory is touched
    del source  # the weights stay (in source_weights) until build() has loaded them into the model it trains
    # both read packed layouts; the dense one forms logits only at the trained positions (losses.py)
    objective = moe_lm if family_of(cfg.model).objective == "moe_lm" else causal_lm_at_labels
    trained: dict[str, Any] = {}  # what build() made for this process, for the adapter written at the end

    def build(cfg: RunConfig, dist) -> StageParts:
        tcfg = cfg.train
        train_loader = InstructLoader(instruct.train, tcfg.batch_size, seed=tcfg.seed, pad_id=tokenizer.pad_id,
                                      rank=dist.dp_rank, world_size=dist.dp_size,
                                      pack_len=tcfg.seq_len if cfg.sft.packing else None,
                                      padding_free=cfg.sft.padding_free)
        val_loader = InstructLoader(instruct.val, tcfg.batch_size, pad_id=tokenizer.pad_id, shuffle=False,
                                    rank=dist.dp_rank, world_size=dist.dp_size)
        skipped = f", {stats.skipped} skipped" if stats.skipped else ""
        model = build_model(cfg.model)  # the config may change what does not touch the weights (dropout)
        load_model_state(model, source_weights, source_path)
        source_weights.clear()  # the model holds its own copy now: do not keep the weights twice
        adapted = ""
        if lora_cfg is not None:  # before the loop restores a checkpoint: it holds the factors by these names
            model, trained["lora"] = _apply_lora(model, lora_cfg, cfg.lora.quantize)
            info = trained["lora"]
            adapted = (f"; LoRA r={lora_cfg.r} on {len(info['modules'])} layers"
                       f"{'' if cfg.lora.quantize == 'none' else ' over an ' + cfg.lora.quantize + ' base'}: "
                       f"{info['trainable_params']:,} of {info['total_params']:,} parameters train "
                       f"({100 * info['trainable_params'] / info['total_params']:.2f}%)")
        elif virtual is not None:
            wrap = apply_prompt_tuning if method == "prompt_tuning" else apply_prefix_tuning
            model = wrap(model, virtual, tokenizer)
            trainable, total = trainable_parameters(model)
            trained[method] = {"trainable_params": trainable, "total_params": total,
                               "num_virtual_tokens": virtual.num_virtual_tokens}
            adapted = (f"; {method.replace('_', ' ')} with {virtual.num_virtual_tokens} virtual tokens: "
                       f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")
        trained["model"] = model
        return StageParts(model=model, train_loader=train_loader, val_loader=val_loader,
                          objective=objective, tokenizer=tokenizer,
                          description=f"{stats.train_examples:,} training conversations ({stats.trainable_tokens:,} "
                                      f"trained tokens per epoch), {stats.val_examples:,} held out{skipped}{adapted}")

    summary = run_stage(cfg, out_dir, build, resume=resume, overwrite=overwrite, resume_from=checkpoint,
                        progress=progress, extra_config={"data": {"source_model": str(source_path)}})
    summary["data"] = stats.to_dict()
    if method is not None:
        summary[method] = trained[method]
    if int(os.environ.get("RANK", "0")) == 0:
        if lora_cfg is not None:
            _write_adapter_and_merged(trained["model"], lora_cfg, Path(out_dir), source_path, tokenizer)
        elif virtual is not None:
            _write_prompt_adapter(trained["model"], virtual, Path(out_dir), source_path)
        write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def _names_section(file_overrides: dict[str, Any], overrides: list[str], section: str) -> bool:
    """Whether the config file (nested or dotted keys) or a ``key=value`` override sets a ``SECTION.*`` key."""
    keys = [str(key) for key in file_overrides] + [item.partition("=")[0].strip() for item in overrides]
    return any(key == section or key.startswith(section + ".") for key in keys)


def _kind(cfg: RunConfig) -> str:
    method = next((name for name in METHOD_FLAGS if getattr(cfg, name) is not None), None)
    return "a full fine-tune" if method is None else f"a {METHOD_FLAGS[method][2:]} run"


def _virtual_config(cfg: RunConfig) -> PromptTuningConfig | None:
    """The library config of a prompt- or prefix-tuning run (None for other runs)."""
    section = cfg.prompt_tuning if cfg.prompt_tuning is not None else cfg.prefix_tuning
    if section is None:
        return None
    kind = PromptTuningConfig if cfg.prompt_tuning is not None else PrefixTuningConfig
    return kind(num_virtual_tokens=section.num_virtual_tokens, init=section.init,
                init_text=section.init_text or None, seed=section.seed)


def _check_method(model: nn.Module, cfg: RunConfig, lora_cfg: LoRAConfig | None,
                  virtual: PromptTuningConfig | None, tokenizer: Any) -> None:
    """ConfigError (one line) now, before the run directory is touched, for a method that cannot wrap this
    model: LoRA targets that match no layer, prompt or prefix tuning on a family without prefix support, or
    virtual tokens that leave no room for ``train.seq_len``. Wraps ``model`` (the source, about to be dropped)."""
    if lora_cfg is not None:
        apply_lora(model, lora_cfg)
    if virtual is None:
        return
    section = "prompt_tuning" if cfg.prompt_tuning is not None else "prefix_tuning"
    for layout in ("packing", "padding_free"):
        if getattr(cfg.sft, layout):
            raise ConfigError(f"sft.{layout}=true cannot be used with --{section.replace('_', '-')}: the virtual "
                              f"tokens go before one conversation per row; set sft.{layout}=false")
    n, block = virtual.num_virtual_tokens, cfg.model.block_size
    if cfg.train.seq_len + n > block:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} plus {section}.num_virtual_tokens={n} exceeds "
                          f"model.block_size={block}; lower train.seq_len to {block - n} or use fewer virtual tokens")
    (apply_prompt_tuning if section == "prompt_tuning" else apply_prefix_tuning)(model, virtual, tokenizer)


def _apply_lora(model: nn.Module, lora_cfg: LoRAConfig, quantize: str) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize the base (unless ``quantize`` is "none") and wrap the target layers; returns the model and the
    summary's ``lora`` entry (parameter counts, and for a quantized base its bytes as stored and in float)."""
    info: dict[str, Any] = {}
    if quantize != "none":
        info["float_base_weight_bytes"] = weight_bytes(model)
        quantize_model(model, quantize, keep_shared=True)
    info["modules"] = apply_lora(model, lora_cfg)
    trainable, total = trainable_parameters(model)
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QUANTIZED_LINEARS))
    info |= {"trainable_params": trainable, "total_params": total + quantized, "quantize": quantize,
             "optimizer_state_bytes": 2 * 4 * trainable}
    if quantize != "none":
        info["base_weight_bytes"] = weight_bytes(model) - sum(
            p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return model, info


def _write_adapter_and_merged(model: nn.Module, lora_cfg: LoRAConfig, out_dir: Path, source_path: Path,
                              tokenizer: Any) -> None:
    """OUT/adapter (peft layout) from the trained factors, then OUT/model rewritten as the merged model.

    The loop saved OUT/model from the wrapped model (base weights plus factors); the merged weights replace
    them under the same config, so chat, serve, eval and export read OUT/model as any other checkpoint."""
    from lmstack.interop.peft_adapters import save_adapter

    save_adapter(model, lora_cfg, out_dir / "adapter", base_model_name_or_path=str(source_path))
    merge_lora(model)
    dequantize_model(model)  # a quantized base: every layer back to float, the adapted ones already merged
    save_checkpoint(out_dir / "model", model, read_config(out_dir / "model"), tokenizer)


def _write_prompt_adapter(model: nn.Module, virtual: PromptTuningConfig, out_dir: Path, source_path: Path) -> None:
    """OUT/adapter (peft's PROMPT_TUNING / PREFIX_TUNING layout), then OUT/model removed: the loop saved the
    wrapped model there, which is no plain checkpoint, and the vectors cannot be merged into weights."""
    from lmstack.interop.peft_adapters import save_prompt_adapter

    save_prompt_adapter(model, out_dir / "adapter", init=virtual.init, init_text=virtual.init_text,
                        base_model_name_or_path=str(source_path))
    shutil.rmtree(out_dir / "model", ignore_errors=True)
