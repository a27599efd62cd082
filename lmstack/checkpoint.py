"""The one checkpoint format: a directory that loads without unpickling anything.

    CKPT/config.json          {"format": "lmstack", "version": 1, "model": {...}, "optim": {...}, "train": {...}}
    CKPT/model.safetensors    weights (tied weights stored once)
    CKPT/tokenizer.json       Hugging Face tokenizers file (+ lmstack_tokenizer.json for special tokens / chat)
    CKPT/trainer_state/       only in resumable training checkpoints:
        optimizer.safetensors   AdamW moments, flattened as "state.<param index>.<name>"
        rng.safetensors         torch CPU / CUDA generator states, numpy state
        state.json              step, loader position, schedule, loss statistics, param-group hyperparameters

Writes are atomic: everything goes to a sibling temporary directory that is renamed into place, so
a killed process leaves either the old checkpoint or the new one, never half of one. A run directory
keeps its training checkpoints in RUN/checkpoints/step_NNNNNNN (keep-last-N) and its final weights
in RUN/model; :func:`resolve_checkpoint` accepts either kind of path.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lmstack.atomic import make_staging_dir, swap_directory
from lmstack.errors import CheckpointError

FORMAT_VERSION = 1




@dataclass
class Checkpoint:
    model: nn.Module
    config: dict[str, Any]  # the whole config.json
    tokenizer: Any | None  # lmstack.tokenizer.Tokenizer when tokenizer.json is present
    path: Path


# ----------------------------------------------------------------------------- weights

def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied parameters stored once (safetensors refuses shared storage)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str = "") -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights appear once in the file: a missing key is fine when it shares storage with a loaded one
    tied = {n for n in missing if _is_tied(model, n, state)}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: weights do not match the model config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _is_tied(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    ptr = params[name].data_ptr()
    return any(n in state and p.data_ptr() == ptr for n, p in params.items() if n != name)


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(path: str | Path, model: nn.Module, config: dict[str, Any], tokenizer: Any | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically. ``config`` must hold at least ``{"model": {...}}``.

    trainer_state (optional): {"optimizer": optim.state_dict(), "rng": {name: tensor}, "state": json-able}.
    """
    final = Path(path)
    tmp = make_staging_dir(final)
    try:
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = {"format": "lmstack", "version": FORMAT_VERSION, **config}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            ts = tmp / "trainer_state"
            ts.mkdir()
            tensors, groups = flatten_optimizer_state(trainer_state["optimizer"])
            save_file(tensors, str(ts / "optimizer.safetensors"))
            save_file({k: v.contiguous() for k, v in trainer_state.get("rng", {}).items()}, str(ts / "rng.safetensors"))
            (ts / "state.json").write_text(json.dumps({**trainer_state.get("state", {}), "param_groups": groups},
                                                      indent=2))
        swap_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, or from a run dir: RUN/model, else the newest RUN/checkpoints/step_*."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    latest = latest_checkpoint(p / "checkpoints")
    if latest is not None:
        return latest
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    raise CheckpointError(f"{p} is not an lmstack checkpoint (no config.json + model.safetensors); "
                          "pass a checkpoint directory or a run directory made by `lmstack pretrain`, "
                          "or convert real weights with `lmstack import`")


def read_config(path: str | Path) -> dict[str, Any]:
    p = resolve_checkpoint(path)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / 'config.json'} is not valid JSON: {e}") from None
    if "model" not in cfg:
        raise CheckpointError(f"{p / 'config.json'} has no 'model' section; is this an lmstack checkpoint?")
    return cfg


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    load_tokenizer: bool = True) -> Checkpoint:
    """Build the model from config.json and load its weights; the tokenizer too when present."""
    from lmstack.config import model_config_from_dict
    from lmstack.models import build_model

    p = resolve_checkpoint(path)
    cfg = read_config(p)
    model_cfg = model_config_from_dict(cfg["model"])
    model = build_model(model_cfg)  # built on CPU: buffers such as RoPE tables are computed, not stored
    state = load_file(str(p / "model.safetensors"))
    load_model_state(model, state, p)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    tokenizer = None
    if load_tokenizer and (p / "tokenizer.json").is_file():
        from lmstack.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(p)
    return Checkpoint(model=model, config=cfg, tokenizer=tokenizer, path=p)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    steps = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_")
                   and (d / "model.safetensors").is_file())
    return steps[-1] if steps else None


def prune_checkpoints(ckpt_root: str | Path, keep_last: int) -> None:
    root = Path(ckpt_root)
    steps = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_"))
    for d in steps[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for junk in root.glob(".step_*.tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(junk, ignore_errors=True)


# ----------------------------------------------------------------------------- optimizer state

def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().contiguous().cpu()
    return tensors, [dict(g) for g in sd["param_groups"]]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": groups}


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    ts = Path(path) / "trainer_state"
    if not (ts / "state.json").is_file():
        raise CheckpointError(f"{path} has no trainer_state/; it cannot be resumed (weights-only checkpoint)")
    state = json.loads((ts / "state.json").read_text())
    groups = state.pop("param_groups")
    return {"optimizer": unflatten_optimizer_state(load_file(str(ts / "optimizer.safetensors")), groups),
            "rng": load_file(str(ts / "rng.safetensors")), "state": state}
