"""What every model family shares: the registry is the one family list (each family builds, names an
objective that exists, counts parameters one way), and the shared pieces of models/layers.py: the loss, the
position check with its CUDA-graph capture guard (which GPT and MoE both go through), and the MLP width rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_helpers import tiny_tokenizer, token_windows

from lmstack.errors import ConfigError, UserError
from lmstack.models import FAMILIES, build_model, family_of
from lmstack.models.bert import Bert, BertConfig
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.layers import check_positions, count_params, lm_loss
from lmstack.models.moe import MoE, MoEConfig
from lmstack.train.losses import FACTORIES, objective_for

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(vocab_size=400, block_size=64, n_layer=2, n_head=4, n_embd=32)


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(FAMILIES[family].config(**SHAPE))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_and_trains_one_step_with_its_objective(family):
    assert FAMILIES[family].objective in FACTORIES
    model = tiny(family).train()
    objective = objective_for(model.config, tiny_tokenizer())
    batch = token_windows(2, 32)
    loss, metrics = objective(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["tokens"] == batch["labels"].numel()  # dense windows: every label is a real token
    assert model.num_params(non_embedding=True) == count_params(model, non_embedding=True) < model.num_params()


def test_unknown_family_is_a_config_error_naming_the_families():
    class Odd:
        family = "rnn"

    with pytest.raises(ConfigError, match="'gpt'"):
        objective_for(Odd())
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        objective_for(FAMILIES["t5"].config())
    assert family_of("moe").model is MoE and family_of(GPTConfig()).decodes


def test_lm_loss_is_mean_cross_entropy_over_counted_targets():
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    targets = torch.tensor([[1, -1, 3, 4, -1], [0, 6, -1, 2, 5]])
    kept = targets >= 0
    expected = F.cross_entropy(logits.float()[kept], targets[kept])
    assert lm_loss(logits, targets).dtype == torch.float32
    torch.testing.assert_close(lm_loss(logits, targets), expected)


class NoReadback(torch.Tensor):
    """Positions that fail the test if anyone reads their values back to the host (as ``int(t.max())``
    does), which a CUDA graph capture forbids."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.max, torch.max, torch.Tensor.item, torch.Tensor.tolist):
            raise AssertionError(f"{func.__name__} reads positions back during a CUDA graph capture")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.fixture
def capturing(monkeypatch):
    """Pretend the current CUDA stream is being captured into a graph (the state the engine's
    CudaGraphDecoder puts the model in); only the query functions are replaced."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_position_check_names_the_fix_and_is_skipped_during_capture(monkeypatch):
    beyond = torch.tensor([[62, 63, 64]])
    with pytest.raises(UserError, match="beyond the model's context of 64 tokens.*shorten"):
        check_positions(beyond, 64)
    check_positions(beyond - 1, 64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    check_positions(beyond.as_subclass(NoReadback), 64)  # no read-back, no error: the engine checked lengths


@pytest.mark.parametrize("model_type", [GPT, MoE])
def test_decoders_do_not_read_positions_back_while_captured(model_type, capturing):
    """GPT and MoE both go through layers.check_positions: without its guard, a decode step under CUDA graph
    capture would read positions back and the engine would fall back to eager decoding."""
    torch.manual_seed(0)
    config = GPTConfig(**SHAPE) if model_type is GPT else MoEConfig(**SHAPE, n_expert=2, top_k=1)
    model = model_type(config).eval()
    idx = torch.randint(0, 400, (2, 5))
    positions = torch.arange(5).expand(2, 5).clone()
    with torch.no_grad():
        reference, _ = model(idx, positions=positions)
        captured, _ = model(idx, positions=positions.as_subclass(NoReadback))
    torch.testing.assert_close(captured.as_subclass(torch.Tensor), reference)


def test_the_position_check_reads_back_outside_capture():
    """The counterpart of the test above: outside a capture the same forward does check (and so reads)."""
    model = GPT(GPTConfig(**SHAPE)).eval()
    with pytest.raises(AssertionError, match="reads positions back"):
        model(torch.zeros(1, 3, dtype=torch.long), positions=torch.arange(3)[None].as_subclass(NoReadback))


def test_bert_shares_the_shape_mixin_and_honours_logits_to_keep():
    cfg = BertConfig(**SHAPE)
    assert (cfg.head_dim, cfg.dim_per_head, cfg.kv_heads, cfg.hidden_dim) == (None, 8, 4, 128)
    assert BertConfig(**{**SHAPE, "n_embd": 36}).hidden_dim == 144  # exactly 4 * n_embd, as BERT checkpoints have
    assert GPTConfig(**{**SHAPE, "n_embd": 36}, activation="gelu").hidden_dim == 192  # rounded to 64
    wide = Bert(BertConfig(**SHAPE, head_dim=16))  # the override means the same as in GPT / MoE / T5
    assert wide.blocks[0].attn.q_proj.weight.shape == (4 * 16, 32)
    model = tiny("bert").eval()
    x = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        full, _ = model(x)
        last, _ = model(x, logits_to_keep=2)
    torch.testing.assert_close(last, full[:, -2:])
    with pytest.raises(TypeError):
        model(x, prefix_len=torch.tensor([3, 3]))  # a keyword BERT does not know is refused, not swallowed
