"""The decoder's attention / norm variants and prefix-LM support (models/gpt.py): sliding-window and
alternating dense / banded layers, ALiBi, DeepNorm, a bidirectional prefix.

Masks are checked by perturbing tokens and watching which outputs move; every variant decodes the
same greedy tokens through the engine's KV cache as through full forwards; each trains a few steps
on CPU and its loss falls."""

from __future__ import annotations

import math

import pytest
import torch
from family_helpers import argmax_loop, cached_greedy, tiny_tokenizer, token_windows, train_steps

from lmstack.config import ConfigError, apply_overrides, build_run_config
from lmstack.engine import Engine, SamplingParams
from lmstack.models import build_model
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.layers import alibi_slopes, attention_mask
from lmstack.train.losses import objective_for

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "dense": {},
    "window": {"attn_window": 4},
    "alternating": {"attn_window": 4, "sparse_every": 2},
    "alibi": {"position": "alibi"},
    "alibi_window": {"position": "alibi", "attn_window": 5, "n_kv_head": 1},
    "deepnorm": {"deepnorm": True, "norm_placement": "post", "norm": "layernorm"},
}


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    cfg = GPTConfig(vocab_size=400, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def logits_of(model: GPT, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw)[0]


# ----------------------------------------------------------------------------- masks

def test_attention_mask_window_and_prefix_rules():
    positions = torch.arange(6)[None]  # (1, 6)
    banded = attention_mask(positions, positions, window=2)[0, 0]
    for q in range(6):
        assert banded[q].nonzero().flatten().tolist() == [k for k in (q - 1, q) if k >= 0]
    prefixed = attention_mask(positions, positions, prefix_len=torch.tensor([3]))[0, 0]
    for q in range(6):
        expected = list(range(3)) if q < 3 else list(range(q + 1))
        assert prefixed[q].nonzero().flatten().tolist() == expected


def test_sliding_window_sees_exactly_the_last_window_tokens():
    model = tiny_gpt(n_layer=1, attn_window=4)
    ids = torch.randint(0, 400, (1, 12))
    base = logits_of(model, ids)
    for changed in range(12):
        other = ids.clone()
        other[0, changed] = (other[0, changed] + 1) % 400
        moved = (logits_of(model, other) - base).abs().amax(-1)[0] > 1e-6  # (T,)
        # with one layer, position q depends on positions q-3..q only
        assert moved.nonzero().flatten().tolist() == [q for q in range(12) if 0 <= q - changed < 4]


def test_stacked_windows_widen_the_receptive_field():
    # two banded layers of width 4 reach 3 + 3 tokens back; alternating with a dense layer reaches everything
    ids = torch.randint(0, 400, (1, 16))
    for overrides, reach in (({"attn_window": 4, "n_layer": 2}, 6), ({"attn_window": 4, "sparse_every": 2}, 15)):
        model = tiny_gpt(**overrides)
        other = ids.clone()
        other[0, 0] = (other[0, 0] + 1) % 400
        moved = (logits_of(model, other) - logits_of(model, ids)).abs().amax(-1)[0] > 1e-6
        assert moved.nonzero().flatten().max().item() == reach


def test_alternating_pattern_is_dense_then_banded():
    cfg = GPTConfig(n_layer=4, attn_window=8, sparse_every=2)
    assert [cfg.layer_window(i) for i in range(4)] == [0, 8, 0, 8]
    cfg.sparse_every = 0
    assert [cfg.layer_window(i) for i in range(4)] == [8, 8, 8, 8]


@pytest.mark.parametrize("variant", ["dense", "window", "alibi", "deepnorm"])
def test_prefix_is_bidirectional_and_the_rest_causal(variant):
    model = tiny_gpt(**VARIANTS[variant])
    T, prefix = 12, 5
    ids = torch.randint(0, 400, (2, T))
    prefix_len = torch.tensor([prefix, prefix])
    base = logits_of(model, ids, prefix_len=prefix_len)
    # a change inside the prefix reaches earlier prefix positions (and every later one)
    other = ids.clone()
    other[:, prefix - 1] = (other[:, prefix - 1] + 1) % 400
    moved = (logits_of(model, other, prefix_len=prefix_len) - base).abs().amax(-1)[0] > 1e-6
    assert moved[:prefix - 1].any() and moved[prefix - 1:].all()
    # a change after the prefix never reaches anything before it
    for changed in range(prefix, T):
        other = ids.clone()
        other[:, changed] = (other[:, changed] + 1) % 400
        moved = (logits_of(model, other, prefix_len=prefix_len) - base).abs().amax(-1)[0] > 1e-6
        assert not moved[:changed].any()
    # without prefix_len the model is causal everywhere
    causal = logits_of(model, ids)
    other = ids.clone()
    other[:, prefix - 1] += 1
    assert torch.allclose(logits_of(model, other)[:, :prefix - 1], causal[:, :prefix - 1], atol=1e-6)


def test_alibi_bias_penalises_distance_per_head():
    slopes = alibi_slopes(8)
    assert torch.allclose(slopes, torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    six = alibi_slopes(6)  # not a power of two: 4 slopes of n=4, then odd-indexed ones of n=8
    assert torch.allclose(six, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    model = tiny_gpt(position="alibi")
    assert not hasattr(model, "rope_cos") and not hasattr(model, "pos_emb")
    # ALiBi has no position table: inputs longer than block_size still run
    long_ids = torch.randint(0, 400, (1, model.config.block_size + 8))
    assert torch.isfinite(logits_of(model, long_ids)).all()


# ----------------------------------------------------------------------------- KV cache parity

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_kv_cache_matches_full_forward(variant):
    model = tiny_gpt(**VARIANTS[variant])
    for prompt in ([7], list(range(1, 14))):
        assert cached_greedy(model, prompt, 10) == argmax_loop(model, prompt, 10)


@pytest.mark.parametrize("variant", ["dense", "window", "alibi"])
def test_prefix_lm_decodes_the_same_with_and_without_cache(variant):
    model = tiny_gpt(**VARIANTS[variant])
    prompt = list(range(3, 12))
    prefix = torch.tensor([len(prompt)])
    # the prompt is a bidirectional prefix in the prefill; the reference recomputes it every step
    assert cached_greedy(model, prompt, 8, prefix_len=prefix) == argmax_loop(model, prompt, 8, prefix_len=prefix)
    # and the prefix really changes the computation (the last prompt position sees different states)
    ids = torch.tensor([prompt])
    assert not torch.allclose(logits_of(model, ids, prefix_len=prefix)[0, -1], logits_of(model, ids)[0, -1])


@pytest.mark.parametrize("variant", ["alternating", "alibi_window", "deepnorm"])
def test_engine_batches_variants_like_the_plain_loop(variant):
    model = tiny_gpt(**VARIANTS[variant])
    torch.manual_seed(1)
    prompts = [torch.randint(0, 400, (n,)).tolist() for n in (1, 9, 23, 4)]
    engine = Engine(model, max_num_seqs=3, max_num_batched_tokens=16)  # queueing + chunked prefill
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == argmax_loop(model, prompt, 8)


# ----------------------------------------------------------------------------- DeepNorm, config, accounting

def test_deepnorm_scales_residual_and_init():
    model = tiny_gpt(**VARIANTS["deepnorm"])
    n = model.config.n_layer
    assert model.blocks[0].alpha == pytest.approx((2 * n) ** 0.25)
    beta = (8 * n) ** -0.25
    fan = model.config.n_embd + model.blocks[0].mlp.up_proj.weight.shape[0]
    up = model.blocks[0].mlp.up_proj.weight
    assert up.std().item() == pytest.approx(beta * math.sqrt(2 / fan), rel=0.15)
    q = model.blocks[0].attn.q_proj.weight
    assert q.std().item() == pytest.approx(math.sqrt(2 / (2 * model.config.n_embd)), rel=0.15)


def test_variant_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="norm_placement=post"):
        GPTConfig(deepnorm=True).validate()
    with pytest.raises(ConfigError, match="attn_window"):
        GPTConfig(sparse_every=2).validate()
    with pytest.raises(ConfigError, match="alibi"):
        GPTConfig(position="alibbi").validate()
    cfg = build_run_config("tiny", overrides=["model.position=alibi", "model.attn_window=64", "model.sparse_every=2"])
    assert (cfg.model.position, cfg.model.attn_window, cfg.model.sparse_every) == ("alibi", 64, 2)


def test_window_lowers_attention_flops():
    dense, banded = tiny_gpt(), tiny_gpt(attn_window=8)
    per_layer_key = 12 * dense.config.n_head * dense.config.dim_per_head
    assert dense.flops_per_token(64) - banded.flops_per_token(64) == per_layer_key * 4 * (64 - 8)
    alternating = tiny_gpt(attn_window=8, sparse_every=2)
    assert dense.flops_per_token(64) - alternating.flops_per_token(64) == per_layer_key * 2 * (64 - 8)


def test_prefix_families_share_the_architecture():
    cfg = build_run_config("tiny", overrides=["model.family=glm", "model.n_layer=2"])
    assert cfg.model.family == "glm" and cfg.model.n_layer == 2 and isinstance(build_model(cfg.model), GPT)
    assert apply_overrides(cfg, ["model.family=prefix_lm"]).model.family == "prefix_lm"


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("variant", ["window", "alternating", "alibi", "deepnorm"])
def test_variant_trains(variant):
    model = tiny_gpt(**{"n_layer": 2, **VARIANTS[variant]})
    losses = train_steps(model, objective_for(model.config), steps=20)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("family", ["prefix_lm", "glm"])
def test_prefix_families_train_with_their_objective(family):
    cfg = build_run_config("tiny", overrides=[f"model.family={family}", "model.n_layer=2", "model.n_embd=32",
                                              "model.vocab_size=400", "model.block_size=64",
                                              "train.seq_len=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    losses = train_steps(model, objective_for(cfg.model, tiny_tokenizer()), steps=20)
    assert losses[-1] < 0.7 * losses[0]
    # validation scores a fixed corruption / split, so two passes agree
    model.eval()
    batch = token_windows(4, 32, seed=1)
    objective = objective_for(cfg.model, tiny_tokenizer())
    with torch.no_grad():
        assert float(objective(model, batch)[0]) == float(objective(model, batch)[0])
