"""Mixture-of-experts decoder (models/moe.py) and its objective: one expert equals a dense MLP,
capacity drops exactly the overflow and counts it, the auxiliary losses hit their known values,
top-2 gates mix two experts, KV-cache / engine parity, active-parameter FLOPs, and a few training
steps with routing metrics."""

from __future__ import annotations

import math

import pytest
import torch
from family_helpers import argmax_loop, cached_greedy, train_steps

from lmstack.config import ConfigError, build_run_config
from lmstack.engine import Engine, SamplingParams
from lmstack.models import build_model
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.moe import MoE, MoEConfig, MoEFeedForward, routing_metrics
from lmstack.train.losses import objective_for

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(vocab_size=400, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def tiny_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    return MoE(MoEConfig(**{**SHAPE, "n_expert": 4, "top_k": 2, **overrides})).eval()


def test_single_expert_equals_dense_model():
    moe = tiny_moe(n_expert=1, top_k=1, capacity_factor=1.0).train()  # capacity = every token
    dense = GPT(GPTConfig(**SHAPE)).train()
    state = {k.replace("moe.experts.0.", "mlp."): v for k, v in moe.state_dict().items() if "router" not in k}
    dense.load_state_dict(state)
    ids = torch.randint(0, 400, (3, 20))
    logits_moe, loss_moe, aux = moe(ids, ids, return_aux=True)
    logits_dense, loss_dense = dense(ids, ids)
    assert torch.allclose(logits_moe, logits_dense, atol=1e-5) and torch.allclose(loss_moe, loss_dense, atol=1e-6)
    metrics = routing_metrics(aux["stats"])
    assert metrics["moe_dropped_tokens"] == 0 and metrics["moe_expert_0"] == 1.0
    assert metrics["moe_balance_loss"] == pytest.approx(1.0)


def routed_layer(top_k: int, capacity_factor: float, n_expert: int = 4) -> MoEFeedForward:
    torch.manual_seed(0)
    layer = MoEFeedForward(MoEConfig(**{**SHAPE, "n_expert": n_expert, "top_k": top_k,
                                        "capacity_factor": capacity_factor}))
    return layer.train()


def test_capacity_drops_and_counts_the_overflow():
    layer = routed_layer(top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # tokens with x[..., 0] > 0 all prefer expert 2
    x = torch.randn(2, 16, 32)
    x[..., 0] = x[..., 0].abs() + 2.0  # every one of the 32 tokens picks expert 2, with probability ~1
    y, stats = layer(x)
    capacity = math.ceil(1.0 * 1 * 32 / 4)
    assert layer.capacity(32) == capacity == 8
    rows = y.view(32, 32).abs().sum(-1) > 0
    assert rows.nonzero().flatten().tolist() == list(range(capacity))  # the first 8 tokens, in order
    metrics = routing_metrics(stats)
    assert metrics["moe_dropped_tokens"] == 32 - capacity and metrics["moe_dropped_frac"] == pytest.approx(0.75)
    assert metrics["moe_expert_2"] == 1.0
    assert metrics["moe_balance_loss"] == pytest.approx(4.0, rel=1e-3)  # all tokens and all probability on one expert
    # in eval mode the default eval capacity is unlimited: nothing is dropped
    y_eval, stats_eval = layer.eval()(x)
    assert routing_metrics(stats_eval)["moe_dropped_tokens"] == 0 and (y_eval.view(32, 32).abs().sum(-1) > 0).all()


def test_uniform_router_has_unit_balance_and_log_e_squared_z_loss():
    layer = routed_layer(top_k=2, capacity_factor=0.0)
    with torch.no_grad():
        layer.router.weight.zero_()
    _, stats = layer(torch.randn(1, 10, 32))
    metrics = routing_metrics(stats)
    assert metrics["moe_balance_loss"] == pytest.approx(1.0)
    assert metrics["moe_z_loss"] == pytest.approx(math.log(4) ** 2)


def test_top2_mixes_two_experts_with_renormalised_gates():
    layer = routed_layer(top_k=2, capacity_factor=0.0, n_expert=3)
    x = torch.randn(1, 5, 32)
    y, _ = layer(x)
    tokens = x.view(5, 32)
    probs = (tokens @ layer.router.weight.t()).softmax(-1)
    gates, experts = probs.topk(2, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    expected = torch.stack([sum(gates[t, j] * layer.experts[int(experts[t, j])](tokens[t]) for j in range(2))
                            for t in range(5)])
    assert torch.allclose(y.view(5, 32), expected, atol=1e-6)


def test_first_choices_win_capacity_over_second_choices():
    layer = routed_layer(top_k=2, capacity_factor=0.5, n_expert=2)  # capacity = ceil(0.5 * 2 * N / 2) = N / 2
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0  # expert 0 first, expert 1 second for every token
    x = torch.randn(1, 8, 32)
    x[..., 0] = x[..., 0].abs() + 0.1
    _, stats = layer(x)
    # 8 first choices for expert 0 (4 kept), 8 second choices for expert 1 (4 kept)
    metrics = routing_metrics(stats)
    assert metrics["moe_dropped_tokens"] == 8 and metrics["moe_expert_0"] == metrics["moe_expert_1"] == 0.5


@pytest.mark.parametrize("overrides", [{"top_k": 1}, {"top_k": 2, "moe_every": 2}])
def test_greedy_kv_cache_and_engine_match_full_forward(overrides):
    model = tiny_moe(**overrides)
    for prompt in ([5], list(range(1, 15))):
        assert cached_greedy(model, prompt, 8) == argmax_loop(model, prompt, 8)
    prompts = [[3, 4, 5], list(range(10, 30)), [7]]
    outs = Engine(model, max_num_seqs=2, max_num_batched_tokens=16).generate(
        prompts, SamplingParams(max_tokens=6, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == argmax_loop(model, prompt, 6)


def test_flops_count_active_parameters():
    top1 = tiny_moe(n_expert=4, top_k=1)
    dense = GPT(GPTConfig(**SHAPE))
    router_params = SHAPE["n_layer"] * SHAPE["n_embd"] * 4
    assert top1.flops_per_token(32) - dense.flops_per_token(32) == 6 * router_params
    expert = sum(p.numel() for p in top1.blocks[0].moe.experts[0].parameters())
    assert top1.num_params() - top1.num_active_params() == 3 * expert * SHAPE["n_layer"]
    half = tiny_moe(n_expert=4, top_k=2, moe_every=2)
    assert half.num_params() - half.num_active_params() == 2 * expert * 1  # one MoE layer of two


def test_moe_objective_trains_and_logs_routing():
    cfg = build_run_config("tiny-moe", overrides=[f"model.{k}={v}" for k, v in SHAPE.items()] +
                           ["model.n_expert=4", "train.seq_len=32"])
    assert cfg.model.family == "moe"
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = objective_for(cfg.model)
    losses = train_steps(model, objective, steps=20)
    assert losses[-1] < 0.7 * losses[0]
    x = torch.randint(0, 400, (4, 32))
    batch = {"input_ids": x, "labels": x}
    loss, metrics = objective(model.train(), batch)
    assert set(metrics) >= {"lm_loss", "moe_balance_loss", "moe_z_loss", "moe_dropped_tokens", "moe_dropped_frac"}
    assert sum(metrics[f"moe_expert_{e}"] for e in range(4)) == pytest.approx(1.0)
    assert float(loss.detach()) > metrics["lm_loss"]  # the auxiliary losses are added while training
    with torch.no_grad():
        val_loss, val_metrics = objective(model.eval(), batch)
    assert float(val_loss) == pytest.approx(val_metrics["lm_loss"])  # validation reports the plain LM loss


def test_moe_config_errors():
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(top_k=3).validate()
    with pytest.raises(ConfigError, match="moe_every"):
        MoEConfig(n_layer=2, moe_every=3).validate()
