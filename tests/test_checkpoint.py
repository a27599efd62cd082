"""The checkpoint format under damage, and the atomic writes under it: a truncated, empty or random weights
file is one CheckpointError naming the file; the manifest catches changed bytes; the newest intact checkpoint
wins; files are fsync'ed before the rename that publishes them; killed writers' leftovers are undone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmstack import atomic
from lmstack.checkpoint import (MANIFEST, WEIGHTS, checkpoint_problem, latest_checkpoint, load_checkpoint,
                                load_trainer_state, resolve_checkpoint, save_checkpoint)
from lmstack.config import build_run_config
from lmstack.errors import CheckpointError
from lmstack.models import build_model

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=2", "model.vocab_size=64",
        "model.block_size=16", "train.seq_len=16"]


def _save(path: Path, trainer_state: bool = False) -> Path:
    cfg = build_run_config("tiny", overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = None
    if trainer_state:
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
        optimizer.step()
        state = {"optimizer": optimizer.state_dict(), "rng": {"torch_cpu": torch.get_rng_state()},
                 "state": {"step": 3}}
    return save_checkpoint(path, model, cfg.to_dict(), trainer_state=state)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _empty(data: bytes) -> bytes:
    return b""


def _random_same_size(data: bytes) -> bytes:
    return os.urandom(len(data))  # passes the size check: parsing is what catches it


@pytest.mark.parametrize("damage", [_truncated, _empty, _random_same_size])
def test_a_damaged_weights_file_is_one_checkpoint_error_naming_it(tmp_path, damage):
    ckpt = _save(tmp_path / "ckpt")
    weights = ckpt / WEIGHTS
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(ckpt)
    message = str(error.value)
    assert str(weights) in message and "\n" not in message
    assert checkpoint_problem(ckpt) is not None


def test_checkpoints_without_a_manifest_still_load_and_are_checked_by_parsing(tmp_path):
    ckpt = _save(tmp_path / "ckpt", trainer_state=True)
    (ckpt / MANIFEST).unlink()  # as written before manifests existed
    assert checkpoint_problem(ckpt) is None
    assert load_checkpoint(ckpt).model is not None
    (ckpt / WEIGHTS).write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)
    assert "model.safetensors" in checkpoint_problem(ckpt)


def test_the_manifest_catches_changed_bytes_and_resume_picks_the_newest_intact_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _save(root / f"step_{step:07d}", trainer_state=True)
    assert latest_checkpoint(root) == root / "step_0000030"
    moments = root / "step_0000030" / "trainer_state" / "optimizer.safetensors"
    data = bytearray(moments.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: same size, still parses
    moments.write_bytes(bytes(data))
    (root / "step_0000020" / "trainer_state" / "state.json").write_text("")
    skipped: list[str] = []
    assert latest_checkpoint(root, skipped) == root / "step_0000010"
    assert "SHA-256" in skipped[0] and "step_0000030" in skipped[0] and "state.json" in skipped[1]
    assert resolve_checkpoint(tmp_path) == root / "step_0000010"  # a run dir without model/ resolves the same way
    assert load_trainer_state(root / "step_0000010")["state"]["step"] == 3


def test_an_empty_trainer_state_is_a_checkpoint_error(tmp_path):
    ckpt = _save(tmp_path / "ckpt", trainer_state=True)
    (ckpt / "trainer_state" / "state.json").write_text("")
    with pytest.raises(CheckpointError, match="state.json"):
        load_trainer_state(ckpt)


def test_weights_of_another_shape_are_a_checkpoint_error(tmp_path):
    ckpt = _save(tmp_path / "ckpt")
    config = (ckpt / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 64')
    (ckpt / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="do not fit the model config"):
        load_checkpoint(ckpt)


def test_files_and_directories_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.write_text_atomic(tmp_path / "a.txt", "hello")
    rename = events.index(("rename", str(tmp_path / "a.txt")))
    assert events[rename - 1][0] == "fsync" and ".a.txt.tmp-" in events[rename - 1][1]  # the data first
    assert events[rename + 1] == ("fsync", str(tmp_path))  # then the new name

    events.clear()
    with atomic.staged_directory(tmp_path / "ckpt") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "w.bin").write_bytes(b"x" * 10)
    synced = [path for kind, path in events if kind == "fsync"]
    rename = events.index(("rename", str(tmp_path / "ckpt")))
    assert {str(staging / "sub" / "w.bin"), str(staging / "sub"), str(staging)} <= set(synced[:rename])
    assert events[rename + 1] == ("fsync", str(tmp_path))
    assert (tmp_path / "ckpt" / "sub" / "w.bin").read_bytes() == b"x" * 10


def test_clean_staging_removes_leftovers_and_puts_back_a_directory_cut_off_mid_swap(tmp_path):
    (tmp_path / ".step_0000010.tmp-abc").mkdir()  # a checkpoint being written when the process died
    (tmp_path / ".summary.json.tmp-xyz.tmp").write_text("{")  # a file being written
    old = tmp_path / ".model.old-123"  # a swap killed between its two renames: model/ is missing
    old.mkdir()
    (old / "weights").write_text("complete")
    (tmp_path / "keep.txt").write_text("not ours")
    atomic.clean_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "model"]
    assert (tmp_path / "model" / "weights").read_text() == "complete"


def test_a_failed_staged_write_leaves_the_old_directory_untouched(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "w").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.staged_directory(final) as staging:
            (staging / "w").write_text("half")
            raise RuntimeError("killed")
    assert (final / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
