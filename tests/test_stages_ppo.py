"""lmstack ppo (lmstack/stages/ppo.py) and its pieces in lmstack/train/rl_losses.py: GAE against a direct loop,
the KL estimators against the exact KL, the adaptive KL controller, the clipped value loss, and a run that
resumes exactly (rollout buffer, KL controller, optimizer) and writes the policy as a plain checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from rl_helpers import make_rl_base
from safetensors.torch import load_file

from lmstack.checkpoint import load_checkpoint
from lmstack.stages.ppo import last_token_index, ppo
from lmstack.train.rl_losses import (
    KLController,
    clipped_value_loss,
    gae,
    kl_estimate,
    whiten,
)


def test_gae_matches_a_direct_loop_over_each_response():
    torch.manual_seed(0)
    N, T, gamma, lam = 3, 8, 0.9, 0.8
    rewards, values = torch.randn(N, T), torch.randn(N, T)
    mask = torch.zeros(N, T)
    spans = [(2, 6), (0, 8), (5, 6)]
    for i, (start, end) in enumerate(spans):
        mask[i, start:end] = 1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for i, (start, end) in enumerate(spans):
        running = 0.0
        for t in reversed(range(start, end)):
            next_value = values[i, t + 1].item() if t + 1 < end else 0.0
            delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
            running = delta + gamma * lam * running
            assert advantages[i, t].item() == pytest.approx(running, abs=1e-5)
            assert returns[i, t].item() == pytest.approx(running + values[i, t].item(), abs=1e-5)
    assert (advantages[mask == 0] == 0).all()
    assert last_token_index(mask).tolist() == [5, 7, 5]


def test_kl_estimators_are_unbiased_and_k3_is_never_negative():
    torch.manual_seed(1)
    p, q = torch.softmax(torch.randn(6), 0), torch.softmax(torch.randn(6), 0)
    exact = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(2))
    logp, logq = p.log()[samples], q.log()[samples]
    for estimator in ("k1", "k3"):
        assert float(kl_estimate(logp, logq, estimator).mean()) == pytest.approx(exact, rel=0.03)
    assert (kl_estimate(logp, logq, "k3") >= 0).all()


def test_kl_controller_moves_beta_toward_the_target_and_a_fixed_one_stays():
    adaptive = KLController(0.1, target=6.0, horizon=100)
    adaptive.update(12.0, 10)  # KL above the target: beta grows by the clipped error x n / horizon
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    adaptive.update(3.0, 10)
    assert adaptive.beta == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))
    fixed = KLController(0.1)
    fixed.update(50.0, 10)
    assert fixed.beta == 0.1
    restored = KLController(0.5, target=6.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.beta == adaptive.beta


def test_clipped_value_loss_and_whitening_match_their_formulas():
    values, old, returns = torch.tensor([[1.0, 0.0, 3.0]]), torch.tensor([[0.5, 0.0, 1.0]]), torch.tensor([[0.0, 1.0, 3.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, fraction = clipped_value_loss(values, old, returns, mask, clip=0.2)
    clipped = [0.7, 0.0, 1.2]
    direct = [max((v - r) ** 2, (c - r) ** 2) for v, c, r in zip([1.0, 0.0, 3.0], clipped, [0.0, 1.0, 3.5])]
    assert loss.item() == pytest.approx(0.5 * sum(direct) / 3)
    assert fraction == pytest.approx(1 / 3)  # only the last token's clipped error is the larger
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4) and w[0, 3] == 0


SMALL = ["optim.schedule=constant", "ppo.prompts_per_rollout=4", "ppo.minibatches=2", "ppo.epochs=2", "ppo.max_tokens=6", "optim.lr=1e-2",
         "ppo.kl_target=0.5", "ppo.kl_coef=0.2", "ppo.eval_prompts=2", "train.eval_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_rl_base(tmp_path_factory.mktemp("ppo"))


def test_ppo_resumes_exactly_and_writes_the_policy_as_a_plain_checkpoint(base, tmp_path, capfd):
    prompts, reward = [str(base / "prompts.jsonl")], "rl_helpers:digit_share"
    ppo(base / "model", prompts, reward, tmp_path / "full", progress=False,
        overrides=[*SMALL, "train.max_steps=6", "train.ckpt_every=3"])
    ppo(base / "model", prompts, reward, tmp_path / "split", progress=False,
        overrides=[*SMALL, "train.max_steps=3", "train.ckpt_every=3"])  # stops mid-rollout (4 updates each)
    capfd.readouterr()
    ppo(base / "model", None, None, tmp_path / "split", overrides=["train.max_steps=6"], resume=True, progress=False)
    assert "at step 3" in capfd.readouterr().err
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith(("policy.", "value.")) for k in a)  # the policy alone
    policy = load_checkpoint(tmp_path / "full" / "model")
    assert type(policy.model).__name__ == "GPT" and policy.tokenizer is not None
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("full", "split")]
    betas = [[row["beta"] for row in run if "beta" in row] for run in rows]
    assert betas[0] == betas[1] and betas[0][-1] != 0.2  # the adaptive controller moved, and resumed its state
    assert all({"reward", "kl", "entropy", "clip_fraction", "value_loss", "response_length"} <= row.keys()
               for row in rows[0] if "loss" in row)
    assert (tmp_path / "full" / "rl.png").is_file()
