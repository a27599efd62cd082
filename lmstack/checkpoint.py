"""The one checkpoint format: a directory that loads without unpickling anything.

    CKPT/config.json          {"format": "lmstack", "version": 1, "model": {...}, "optim": {...}, "train": {...}}
    CKPT/model.safetensors    weights (tied weights stored once)
    CKPT/tokenizer.json       Hugging Face tokenizers file (+ lmstack_tokenizer.json for special tokens / chat)
    CKPT/trainer_state/       only in resumable training checkpoints:
        optimizer.safetensors   AdamW moments, flattened as "state.<param index>.<name>"
        rng.safetensors         torch CPU / CUDA generator states, numpy state
        state.json              step, loader position, schedule, loss statistics, param-group hyperparameters
    CKPT/dcp/                 instead of model.safetensors and optimizer.safetensors in the training
                              checkpoints of sharded runs (FSDP2 / TP / PP, lmstack/train/parallel/):
                              torch.distributed.checkpoint files, each process's pieces of the weights
                              ("model.*") and optimizer state ("optim.*"), loadable into any other layout
    CKPT/manifest.json        {"files": {relative path: {"bytes": n, "sha256": hex}}} of every file above

Writes are atomic and durable (lmstack.atomic): everything goes to a sibling staging directory whose
files are fsync'ed and which is then renamed into place, so a killed process or a power cut leaves
either the old checkpoint or the new one, never half of one. A run directory keeps its training
checkpoints in RUN/checkpoints/step_NNNNNNN (keep-last-N) and its final weights in RUN/model;
:func:`resolve_checkpoint` accepts either kind of path.

Damage after the fact (a disk that filled up, a copy cut short, a file someone truncated) is caught by
the manifest: :func:`checkpoint_problem` compares sizes and SHA-256 sums, and :func:`latest_checkpoint`
skips a damaged checkpoint for the newest intact one, so a resumed run falls back instead of failing.
Loading for inference (:func:`load_checkpoint`) checks the weights file's size only (hashing every load
would read the weights twice), and any file that does not parse is a :class:`CheckpointError` naming
the file, never a safetensors or torch traceback. Checkpoints written before manifests existed are
checked by parsing their files. A sharded training checkpoint loads for inference too
(:func:`load_checkpoint` reads its ``dcp/`` weights into the one-process model); the final RUN/model of
every run is consolidated (one model.safetensors).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmstack.atomic import clean_staging, staged_directory
from lmstack.devices import unwrap_model
from lmstack.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
SHARDED = "dcp"  # the torch.distributed.checkpoint directory of a sharded training checkpoint


@dataclass
class Checkpoint:
    model: nn.Module
    config: dict[str, Any]  # the whole config.json
    tokenizer: Any | None  # lmstack.tokenizer.Tokenizer when tokenizer.json is present
    path: Path


# ----------------------------------------------------------------------------- weights

def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied parameters stored once (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in unwrap_model(model).state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str = "") -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists every tensor; the first line says enough
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model config ({detail})") from None
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


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file as CPU tensors; a missing, truncated, empty or foreign file is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: whatever the reason, the file cannot be used
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({_first_line(e)}); "
                              "use another checkpoint or re-create this one") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged or not valid JSON ({_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(path: str | Path, model: nn.Module | dict[str, torch.Tensor] | None, config: dict[str, Any],
                    tokenizer: Any | None = None, trainer_state: dict[str, Any] | None = None,
                    sharded: Path | None = None) -> Path:
    """Write a checkpoint directory atomically and durably. ``config`` must hold at least ``{"model": {...}}``.

    ``model``: a module, or its weights as a state dict (tied weights stored once), or None with ``sharded``.
    trainer_state (optional): {"optimizer": optim.state_dict(), "rng": {name: tensor}, "state": json-able};
    the optimizer is left out when ``sharded`` holds it. ``sharded``: a finished torch.distributed.checkpoint
    directory (written by every process of a sharded run), moved into the checkpoint as ``dcp/``.
    The manifest (sizes and SHA-256 of every file) is written last, inside the staging directory.
    """
    final = Path(path)
    with staged_directory(final) as tmp:
        if model is not None:
            weights = model_state(model) if isinstance(model, nn.Module) else model
            save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if sharded is not None:
            shutil.move(str(sharded), str(tmp / SHARDED))
        cfg = {"format": "lmstack", "version": FORMAT_VERSION, **config}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            state_dir = tmp / "trainer_state"
            state_dir.mkdir()
            groups = []
            if trainer_state.get("optimizer") is not None:
                tensors, groups = flatten_optimizer_state(trainer_state["optimizer"])
                save_file(tensors, str(state_dir / "optimizer.safetensors"))
            save_file({k: v.contiguous() for k, v in trainer_state.get("rng", {}).items()},
                      str(state_dir / "rng.safetensors"))
            (state_dir / "state.json").write_text(json.dumps({**trainer_state.get("state", {}),
                                                              "param_groups": groups}, indent=2))
        (tmp / MANIFEST).write_text(json.dumps({"files": _describe_files(tmp)}, indent=1))
    return final


def _describe_files(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under ROOT except the manifest."""
    files = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[file.relative_to(root).as_posix()] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    return files


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_problem(path: str | Path, check_hashes: bool = True) -> str | None:
    """What is wrong with checkpoint directory PATH, or None when it is intact.

    With a manifest: every listed file must exist with its size (and, with ``check_hashes``, its
    SHA-256). Without one (checkpoints from before manifests): config.json, the weights and any
    trainer_state files must parse.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    manifest_path = path / MANIFEST
    if manifest_path.exists():
        try:
            files = _read_json(manifest_path)["files"]
        except (CheckpointError, KeyError, TypeError) as e:
            return f"{manifest_path} is damaged ({e})"
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                return f"{file} is missing"
            size = file.stat().st_size
            if size != expected["bytes"]:
                return f"{file} has {size:,} bytes, the manifest says {expected['bytes']:,} (truncated or changed)"
            if check_hashes and _sha256(file) != expected["sha256"]:
                return f"{file} does not match its SHA-256 in the manifest (corrupted or changed)"
        return None
    try:
        _read_json(path / "config.json")
        for file in [path / WEIGHTS, *sorted((path / "trainer_state").glob("*.safetensors"))]:
            _check_safetensors(file)
        if (path / "trainer_state").is_dir():
            _read_json(path / "trainer_state" / "state.json")
    except CheckpointError as e:
        return str(e)
    return None


def _check_safetensors(path: Path) -> None:
    """Parse the header (which also checks the file covers every tensor) without reading the data."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({_first_line(e)})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, or from a run dir: RUN/model, else the newest intact RUN/checkpoints/step_*."""
    p = Path(path)
    if (p / "config.json").is_file() and ((p / WEIGHTS).is_file() or (p / SHARDED / ".metadata").is_file()):
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
    cfg = _read_json(p / "config.json")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{p / 'config.json'} has no 'model' section; is this an lmstack checkpoint?")
    return cfg


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    load_tokenizer: bool = True) -> Checkpoint:
    """Build the model from config.json and load its weights; the tokenizer too when present."""
    from lmstack.config import model_config_from_dict
    from lmstack.models import build_model

    p = resolve_checkpoint(path)
    cfg = read_config(p)
    _check_weights_size(p)
    model_cfg = model_config_from_dict(cfg["model"])
    model = build_model(model_cfg)  # built on CPU: buffers such as RoPE tables are computed, not stored
    sharded = not (p / WEIGHTS).is_file() and (p / SHARDED).is_dir()
    tensors = sharded_weights(model, p) if sharded else read_tensors(p / WEIGHTS)
    if cfg.get("head") is not None:  # a reward or value model: the backbone plus its head (models/heads.py)
        from lmstack.models.heads import attach_head

        model = attach_head(cfg["head"], model, tensors, p)
    load_model_state(model, tensors, p)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    tokenizer = None
    if load_tokenizer and (p / "tokenizer.json").is_file():
        from lmstack.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(p)
    return Checkpoint(model=model, config=cfg, tokenizer=tokenizer, path=p)


def sharded_weights(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The weights of a sharded training checkpoint (its ``dcp/`` directory) for a one-process ``model``."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {name: t.detach().clone() for name, t in model.state_dict().items()}}
    try:
        dcp.load(state, checkpoint_id=str(path / SHARDED), no_dist=True)
    except Exception as e:  # DCP reports missing keys and shape mismatches as deep exceptions
        raise CheckpointError(f"checkpoint {path}: the sharded weights do not fit the model config "
                              f"({_first_line(e)[:300]})") from None
    return state["model"]


def _check_weights_size(path: Path) -> None:
    """The weights file against the manifest's size: cheap, and it names a truncated file before parsing it.
    (Only the weights: a user may edit config.json or the tokenizer files of a checkpoint by hand.)"""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return
    try:
        expected = _read_json(manifest_path)["files"][WEIGHTS]["bytes"]
    except (CheckpointError, KeyError, TypeError):
        return  # the manifest itself is damaged: parsing the weights is the check that remains
    weights = path / WEIGHTS
    if weights.is_file() and weights.stat().st_size != expected:
        raise CheckpointError(f"{weights} has {weights.stat().st_size:,} bytes but was written with "
                              f"{expected:,} (truncated or changed); use another checkpoint or re-create this one")


def step_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """RUN/checkpoints/step_* directories, oldest first (names are zero-padded, so name order is step order)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_"))


def latest_checkpoint(ckpt_root: str | Path, skipped: list[str] | None = None) -> Path | None:
    """The newest intact step checkpoint under CKPT_ROOT (sizes and hashes checked), or None.

    Damaged newer checkpoints are passed over; each one's problem is appended to ``skipped`` when given,
    so the caller can say why it fell back.
    """
    for candidate in reversed(step_checkpoints(ckpt_root)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if skipped is not None:
            skipped.append(f"{candidate.name}: {problem}")
    return None


def set_aside_newer(ckpt_root: str | Path, resumed_from: Path | None) -> list[Path]:
    """Rename the step checkpoints newer than RESUMED_FROM (all of them when None) to ``damaged-step_*``.

    Called after resuming from the newest *intact* checkpoint, so every newer one is damaged (or there is
    no intact one, and all are). They stay for a look, but out of the way of
    keep-last-N pruning, which would otherwise count them as the newest and delete the good ones the
    resumed run writes. Returns the new paths.
    """
    moved = []
    for path in step_checkpoints(ckpt_root):
        if resumed_from is None or path.name > Path(resumed_from).name:
            target = path.with_name(f"damaged-{path.name}")
            if target.exists():
                shutil.rmtree(target)  # an older set-aside copy of the same step
            path.rename(target)
            moved.append(target)
    return moved


def prune_checkpoints(ckpt_root: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` step checkpoints; remove the staging leftovers of killed writers."""
    for d in step_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    clean_staging(ckpt_root)


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
    state_dir = Path(path) / "trainer_state"
    if not (state_dir / "state.json").exists():
        raise CheckpointError(f"{path} has no trainer_state/; it cannot be resumed (weights-only checkpoint)")
    state = _read_json(state_dir / "state.json")
    if not isinstance(state, dict) or "param_groups" not in state:
        raise CheckpointError(f"{state_dir / 'state.json'} is damaged (no param_groups); use another checkpoint")
    groups = state.pop("param_groups")
    if not (state_dir / "optimizer.safetensors").is_file() and (Path(path) / SHARDED).is_dir():
        optimizer = None  # a sharded checkpoint: the optimizer state is in dcp/ with the weights
    else:
        optimizer = unflatten_optimizer_state(read_tensors(state_dir / "optimizer.safetensors"), groups)
    return {"optimizer": optimizer,
            "rng": read_tensors(state_dir / "rng.safetensors"), "state": state}
