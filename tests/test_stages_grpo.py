"""lmstack grpo (lmstack/stages/grpo.py) and its losses (lmstack/train/rl_losses.py): group advantages and each
loss normalisation against direct formulas, the clip fraction, REINFORCE's gradient, reward errors naming the
sample, the verifiable reward, a tiny run that learns a learnable reward, exact resume after SIGKILL, and the
shared-prompt log-prob path (lmstack/train/shared_prompt.py) pinned to the full forward: log-probs, entropies,
loss, metrics and gradients."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rl_helpers import make_rl_base
from safetensors.torch import load_file

from lmstack.data.verifiable import make_prompts, score
from lmstack.errors import DataError
from lmstack.stages.grpo import grpo, resolve_reward, score_samples
from lmstack.train.rl_losses import (
    clipped_policy_loss,
    group_advantages,
    reinforce_loss,
)

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_rl_base(tmp_path_factory.mktemp("grpo"))


def test_group_advantages_match_the_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0])
    got = group_advantages(rewards, 4, scale_std=True)
    for g in range(3):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        for i, r in enumerate(group):
            assert got[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-6), abs=1e-5)
    centred = group_advantages(rewards, 4, scale_std=False)
    assert centred[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert centred[4:8].tolist() == [0.0] * 4  # a group that agrees teaches nothing


def _direct_loss(per_token, mask, norm, max_tokens):
    rows = [[per_token[i][t] for t in range(len(mask[i])) if mask[i][t]] for i in range(len(mask))]
    if norm == "sequence":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if norm == "token":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    return sum(sum(r) for r in rows) / (len(rows) * max_tokens)


@pytest.mark.parametrize("loss_norm", ["sequence", "token", "dr_grpo"])
def test_each_loss_normalisation_matches_a_direct_formula(loss_norm):
    torch.manual_seed(0)
    N, T = 4, 7
    logprobs, old = torch.randn(N, T) * 0.3 - 2, torch.randn(N, T) * 0.3 - 2
    advantages = torch.randn(N, 1)
    mask = torch.zeros(N, T)
    for i, (start, end) in enumerate([(1, 3), (2, 7), (0, 1), (3, 6)]):  # responses of different lengths
        mask[i, start:end] = 1
    loss, _ = clipped_policy_loss(logprobs, old, advantages, mask, 0.2, 0.28, loss_norm, max_tokens=8)
    per_token = [[-min(math.exp(logprobs[i, t] - old[i, t]) * advantages[i, 0].item(),
                       min(max(math.exp(logprobs[i, t] - old[i, t]), 0.8), 1.28) * advantages[i, 0].item())
                  for t in range(T)] for i in range(N)]
    assert loss.item() == pytest.approx(_direct_loss(per_token, mask.tolist(), loss_norm, 8), rel=1e-5)


def test_clip_fraction_counts_tokens_whose_gradient_the_clip_removed():
    logprobs = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.9]]))
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    _, up = clipped_policy_loss(logprobs, old, torch.ones(1, 1), mask, 0.2, 0.2, "token")
    _, down = clipped_policy_loss(logprobs, old, -torch.ones(1, 1), mask, 0.2, 0.2, "token")
    assert up.clip_fraction == 0.25  # A > 0: only ratio 1.5 is above 1.2
    assert down.clip_fraction == 0.25  # A < 0: only ratio 0.5 is below 0.8


def test_reinforce_gradient_equals_the_clipped_loss_gradient_on_the_first_pass():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, requires_grad=True)
    advantages, mask = torch.randn(3, 1), (torch.rand(3, 5) > 0.3).float()
    clipped, _ = clipped_policy_loss(logits, logits.detach(), advantages, mask, 0.2, 0.2, "sequence")
    (g1,) = torch.autograd.grad(clipped, logits)
    (g2,) = torch.autograd.grad(reinforce_loss(logits, advantages, mask, "sequence"), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_reward_errors_name_the_sample():
    records = [{"prompt": f"question {i}"} for i in range(10)]
    completions = [f"answer {i}" for i in range(10)]
    with pytest.raises(DataError, match=r"reward raised on sample 7 \(prompt 'question 7'.*ValueError: boom"):
        score_samples(resolve_reward("rl_helpers:raise_on_seven"), records, completions)
    with pytest.raises(DataError, match=r"reward of sample 2 is nan \(prompt 'question 2'"):
        score_samples(resolve_reward("rl_helpers:nan_on_third"), records, completions)
    with pytest.raises(DataError, match="returned 1 values for 2 samples"):
        score_samples(lambda r, c: [1.0], records[:2], completions[:2])


def test_verifiable_reward_checks_answers_exactly():
    arithmetic = make_prompts("arithmetic", 3, seed=2, digits=3, ops="+-*")
    for record in arithmetic:
        assert score(record["prompt"], record["answer"]) == 1.0
        assert score(record["prompt"], record["answer"] + ".") == 1.0
        assert score(record["prompt"], record["answer"] + "1") == 0.0
    for record in make_prompts("countdown", 20, seed=3):
        assert score(record["prompt"], record["answer"]) == 1.0
    countdown = [{"role": "user", "content": "Use 2, 3, 4 to make 14."}]
    assert score(countdown, "2 + 3 * 4") == 1.0 and score(countdown, "(4 - 2) * 7") == 0.0  # 7 is not given
    assert score(countdown, "__import__('os')") == 0.0 and score(countdown, "3 * 4 + 2 + 0") == 0.0


LEARN = ["train.max_steps=16", "grpo.group_size=8", "grpo.prompts_per_rollout=4", "grpo.max_tokens=8",
         "grpo.minibatches=1", "optim.lr=2e-2", "optim.schedule=constant", "train.eval_every=0", "train.log_every=1",
         "train.ckpt_every=0", "grpo.eval_prompts=4"]


@pytest.mark.parametrize("algorithm,seed", [("grpo", 0), ("reinforce", 1)])
def test_a_tiny_run_raises_a_learnable_reward(base, tmp_path, algorithm, seed):
    out = tmp_path / "run"
    grpo(base / "model", [str(base / "prompts.jsonl")], "rl_helpers:digit_share", out, progress=False,
         overrides=[*LEARN, f"grpo.algorithm={algorithm}", f"grpo.seed={seed}", f"train.seed={seed}"])
    rewards = [row["reward"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "reward" in row]
    assert len(rewards) == 16
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.15 and last > 0.4 and last > 4 * first, rewards  # digits go from ~6% of the text to most of it
    assert (out / "rl.png").is_file() and (out / "model" / "model.safetensors").is_file()


def test_lora_run_with_a_reference_logs_kl_and_writes_the_adapter(base, tmp_path):
    out = tmp_path / "lora"
    summary = grpo(base / "model", [str(base / "prompts.jsonl")], "lmstack.data.verifiable:reward", out, lora=True,
                   progress=False, overrides=["train.max_steps=2", "grpo.group_size=2", "grpo.prompts_per_rollout=2",
                                              "grpo.max_tokens=4", "grpo.beta=0.1", "lora.r=2", "grpo.eval_prompts=2",
                                              "train.log_every=1", "grpo.loss_norm=dr_grpo"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["kl_ref"] >= 0 for row in rows if "kl_ref" in row) and any("val_reward" in row for row in rows)
    assert (out / "adapter" / "adapter_config.json").is_file() and summary["lora"]["trainable_params"] > 0


@pytest.mark.slow
def test_grpo_cli_survives_sigkill_bit_identically(base, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    # 2 minibatches x 2 passes per rollout: the checkpoint at step 3 is in the middle of the second pass
    steps = ["train.max_steps=8", "train.ckpt_every=3", "grpo.group_size=4", "grpo.prompts_per_rollout=2",
             "grpo.max_tokens=6", "grpo.inner_steps=2", "optim.lr=1e-2", "grpo.eval_prompts=2", "train.eval_every=0"]

    def cmd(out, *extra):
        return [sys.executable, "-m", "lmstack.cli", "grpo", "--model", str(base / "model"), "--prompts",
                str(base / "prompts.jsonl"), "--reward", "rl_helpers:digit_share", "--out", str(out), *extra, *steps]

    full = subprocess.run(cmd(tmp_path / "full"), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "killed" / "checkpoints" / "step_0000003" / "model.safetensors").exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rewards = [[row["reward"] for row in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "reward" in row] for run in ("full", "killed")]
    assert rewards[0] == rewards[1]


def test_a_bad_reward_spec_is_one_clear_error(base, tmp_path):
    from lmstack.errors import UserError

    with pytest.raises(UserError, match="cannot import no_such_module"):
        grpo(base / "model", [str(base / "prompts.jsonl")], "no_such_module:f", tmp_path / "x", progress=False)


def test_one_update_per_rollout_skips_the_behaviour_pass_with_the_same_loss_and_gradient(base):
    """minibatches x inner_steps = 1: the batch carries no behaviour log-probs and the loss uses its own,
    detached; that must equal the loss and gradient against a separate behaviour pass over the same weights."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.config import GRPOConfig
    from lmstack.stages.grpo import grpo_objective
    from lmstack.train.rollout import pad_sequences, sequence_logprobs

    model = load_checkpoint(base / "model").model.train()
    torch.manual_seed(0)
    prompts = [torch.randint(5, 100, (n,)).tolist() for n in (4, 6, 5, 3)]
    responses = [torch.randint(5, 100, (n,)).tolist() for n in (3, 1, 4, 2)]
    input_ids, mask = pad_sequences(prompts, responses, pad_id=0)
    old, _ = sequence_logprobs(model, input_ids, temperature=0.8)
    batch = {"input_ids": input_ids, "response_mask": mask, "advantages": torch.tensor([1.0, -0.5, 0.3, -0.8])}
    objective = grpo_objective(GRPOConfig(temperature=0.8, loss_norm="token"))
    results = []
    for with_behaviour in (True, False):
        model.zero_grad()
        loss, metrics = objective.fn(model, {**batch, "old_logprobs": old * mask} if with_behaviour else batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], metrics))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and loss_a.abs() > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
    assert metrics_a["ratio"] == pytest.approx(1.0, abs=1e-5) and metrics_b["ratio"] == 1.0
    assert metrics_b["kl_old"] == 0.0


def _rows_with_shared_prompts():
    """Rollout-like rows: three prompts of different lengths, each sampled several times, rows shuffled (as a
    minibatch is), responses of different lengths, right-padded."""
    from lmstack.train.rollout import pad_sequences

    torch.manual_seed(1)
    prompts = [torch.randint(5, 100, (n,)).tolist() for n in (5, 3, 7)]
    which = [0, 1, 0, 2, 1, 0, 2, 2]
    responses = [torch.randint(5, 100, (n,)).tolist() for n in (3, 1, 6, 2, 4, 5, 1, 3)]
    return pad_sequences([prompts[w] for w in which], responses, pad_id=0), len(prompts)


class _Opaque(torch.nn.Module):
    """The same decoder behind a wrapper the fast path does not recognise: the plain full forward runs."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, idx, *args, **kwargs):
        return self.inner(idx, *args, **kwargs)


def test_shared_prompt_logprobs_equal_the_full_forward_and_run_each_prompt_once(base):
    """response_logprobs: every distinct prompt runs once, and the response log-probs, entropies and their
    gradients equal the plain full forward's (token_logprobs over model(input_ids)); 0 outside the response."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.train.rl_losses import token_logprobs
    from lmstack.train.shared_prompt import response_logprobs, supports_shared_prompt

    model = load_checkpoint(base / "model").model.train()
    (input_ids, mask), distinct = _rows_with_shared_prompts()
    assert supports_shared_prompt(model) and not supports_shared_prompt(_Opaque(model))
    rows_seen = []
    hook = model.tok_emb.register_forward_hook(lambda module, args, out: rows_seen.append(tuple(args[0].shape)))
    fast, fast_entropy = response_logprobs(model, input_ids, mask, temperature=0.8)
    hook.remove()
    assert [shape[0] for shape in rows_seen] == [distinct, input_ids.shape[0]]  # prompts once, then responses
    assert rows_seen[0][1] == 7 and rows_seen[1][1] == 6  # the longest prompt, the longest response
    plain, plain_entropy = token_logprobs(model(input_ids)[0], input_ids, temperature=0.8)
    assert torch.allclose(fast, plain * mask, atol=1e-5) and bool((fast[mask == 0] == 0).all())
    assert torch.allclose(fast_entropy, plain_entropy * mask, atol=1e-5)
    weights = torch.randn(mask.shape)  # a loss that weighs every response token differently
    grads = []
    for logprobs in (fast, plain):
        model.zero_grad()
        (logprobs * mask * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize("loss_norm,beta,algorithm", [("token", 0.0, "grpo"), ("sequence", 0.1, "grpo"),
                                                      ("dr_grpo", 0.0, "reinforce")])
def test_grpo_objective_on_the_shared_prompt_path_equals_the_plain_path(base, loss_norm, beta, algorithm):
    """The stage's objective takes the shared-prompt path for an lmstack GPT; the same objective on the same
    weights behind an unrecognised wrapper takes the full forward. Loss, metrics and gradients agree."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.config import GRPOConfig
    from lmstack.stages.grpo import grpo_objective
    from lmstack.train.rollout import sequence_logprobs

    model = load_checkpoint(base / "model").model.train()
    (input_ids, mask), _ = _rows_with_shared_prompts()
    old, _ = sequence_logprobs(model, input_ids, temperature=0.9)  # the plain behaviour pass
    ref = old * mask - 0.05 * mask  # a reference that differs a little
    batch = {"input_ids": input_ids, "response_mask": mask, "advantages": torch.randn(input_ids.shape[0]),
             "old_logprobs": old * mask, "ref_logprobs": ref}
    objective = grpo_objective(GRPOConfig(temperature=0.9, loss_norm=loss_norm, beta=beta, algorithm=algorithm))
    results = []
    for runner in (model, _Opaque(model)):
        model.zero_grad()
        loss, metrics = objective.fn(runner, batch)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]))
    (fast_loss, fast_metrics, fast_grads), (plain_loss, plain_metrics, plain_grads) = results
    assert torch.allclose(fast_loss, plain_loss, atol=1e-6) and plain_loss.abs() > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_grads, plain_grads))
    for key in ("entropy", "ratio", "kl_old", "tokens"):
        assert fast_metrics[key] == pytest.approx(plain_metrics[key], abs=1e-5)
    shared, _ = sequence_logprobs(model, input_ids, temperature=0.9, response_mask=mask)  # behaviour pass, shared
    assert torch.allclose(shared, old * mask, atol=1e-5)
