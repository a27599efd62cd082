"""lmstack/models/heads.py: a scalar head on gpt and moe backbones gives per-token values that do not depend
on padding (left or right, pad id equal to the end-of-text id), score_at_last reads the last real token from
the mask, the head survives a checkpoint round trip, and a checkpoint without a head is one line."""

import dataclasses

import pytest
import torch

from lmstack.checkpoint import load_checkpoint, save_checkpoint
from lmstack.errors import CheckpointError
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.heads import ScalarHeadModel, require_head, score_at_last
from lmstack.models.moe import MoE, MoEConfig
from lmstack.models.peft import LoRAConfig, apply_lora

EOT = 0  # the tests pad with id 0, which is also a real token id inside the sequences


def _backbone(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt":
        return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
    return MoE(MoEConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, n_expert=4,
                         capacity_factor=8.0))


def _with_random_head(backbone: torch.nn.Module) -> ScalarHeadModel:
    model = ScalarHeadModel(backbone)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    torch.nn.init.normal_(model.score.bias, std=0.5)
    return model.eval()


@pytest.mark.parametrize("family", ["gpt", "moe"])
def test_values_do_not_depend_on_left_or_right_padding(family):
    model = _with_random_head(_backbone(family))
    sequences = [[5, 9, 3, EOT], [7, 2, 11, 4, 6, 8, EOT], [EOT, 12]]  # EOT inside and at the end: pad == eos
    with torch.no_grad():
        alone = [model(torch.tensor([s]))[0] for s in sequences]  # (len,) each, no padding at all
        width = max(map(len, sequences))
        for side in ("left", "right"):
            ids = torch.full((len(sequences), width), EOT)
            mask = torch.zeros((len(sequences), width), dtype=torch.long)
            for row, s in enumerate(sequences):
                span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
                ids[row, span], mask[row, span] = torch.tensor(s), 1
            values = model(ids, mask)
            assert values.shape == (3, width) and values.dtype == torch.float32
            for row, s in enumerate(sequences):
                real = values[row][mask[row].bool()]
                torch.testing.assert_close(real, alone[row], rtol=1e-5, atol=1e-5)
            last = score_at_last(values, mask)
            torch.testing.assert_close(last, torch.stack([a[-1] for a in alone]), rtol=1e-5, atol=1e-5)


def test_score_at_last_reads_the_mask_not_the_token_ids():
    values = torch.arange(12, dtype=torch.float32).view(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0]])
    assert score_at_last(values, mask).tolist() == [1.0, 7.0, 9.0]
    with pytest.raises(ValueError, match="no real token"):
        score_at_last(values, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]))


def test_a_fresh_head_scores_zero_and_takes_gradients_into_the_backbone():
    model = ScalarHeadModel(_backbone("gpt"))
    ids = torch.randint(0, 64, (2, 8))
    values = model(ids)
    assert torch.equal(values, torch.zeros(2, 8))
    values.sum().backward()
    assert model.score.weight.grad is not None and float(model.score.weight.grad.abs().sum()) > 0
    # with the head at zero the backbone's gradient is zero, and flows once the head moves
    torch.nn.init.normal_(model.score.weight, std=0.1)
    model.zero_grad()
    model(ids).sum().backward()
    assert float(model.backbone.blocks[0].mlp.up_proj.weight.grad.abs().sum()) > 0


def test_lora_backbone_works_under_the_head():
    backbone = _backbone("gpt")
    apply_lora(backbone, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model = _with_random_head(backbone)
    ids, mask = torch.randint(1, 64, (2, 6)), torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert model(ids, mask).shape == (2, 6)


def test_checkpoint_round_trip_keeps_the_head_and_a_plain_checkpoint_is_refused_in_one_line(tmp_path):
    model = _with_random_head(_backbone("gpt"))
    config = {"model": dataclasses.asdict(model.config), "head": "scalar"}
    save_checkpoint(tmp_path / "rm", model, config)
    loaded = load_checkpoint(tmp_path / "rm").model
    ids = torch.randint(0, 64, (2, 8))
    assert isinstance(loaded, ScalarHeadModel)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert require_head(loaded, tmp_path / "rm") is loaded
    save_checkpoint(tmp_path / "lm", model.backbone, {"model": dataclasses.asdict(model.config)})
    with pytest.raises(CheckpointError, match="has no scalar head") as error:
        require_head(load_checkpoint(tmp_path / "lm").model, tmp_path / "lm")
    assert "\n" not in str(error.value) and "lmstack reward" in str(error.value)
    # a config that names a head over weights without one
    save_checkpoint(tmp_path / "broken", model.backbone, {"model": dataclasses.asdict(model.config), "head": "scalar"})
    with pytest.raises(CheckpointError, match="names a scalar head but the weights have none"):
        load_checkpoint(tmp_path / "broken")
    save_checkpoint(tmp_path / "odd", model, {"model": dataclasses.asdict(model.config), "head": "pairwise"})
    with pytest.raises(CheckpointError, match="head 'pairwise'"):
        load_checkpoint(tmp_path / "odd")
