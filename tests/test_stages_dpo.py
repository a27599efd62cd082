"""`lmstack dpo` (lmstack/stages/dpo.py, lmstack/train/preference_losses.py): the loss is ln 2 at step 0; loss and
gradient equal a direct implementation of each variant's formula on the same batch (the RPO chosen-NLL term
included); the head-only-on-completions
log-probabilities equal the full-logits sum; training raises the held-out implicit-reward accuracy; LoRA's
reference is the base with the adapters off; a SIGKILLed run resumes bit-identically; bad input, unknown keys
and a reference with another tokenizer are one line."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmstack.checkpoint import load_checkpoint
from lmstack.cli import main
from lmstack.data.preference import collate_pairs, load_preference, write_pairs
from lmstack.errors import ConfigError
from lmstack.models.peft import LoRAConfig, apply_lora
from lmstack.stages.dpo import dpo
from lmstack.tokenizer import Tokenizer
from lmstack.train.preference_losses import (DPOLoss, adapters_off, adapters_off_reference, completion_logps,
                                             dpo_objective, frozen_reference, precomputed_reference)
from sft_helpers import make_sft_base

SMALL = ["train.batch_size=8", "train.seq_len=128", "train.eval_batches=2", "train.log_every=5",
         "train.tensorboard=false", "train.device=cpu", "optim.lr=3e-3", "optim.warmup_steps=0",
         "optim.schedule=constant", "train.eval_every=0", "dpo.val_fraction=0.1", "dpo.overlong=drop"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny (untrained) chat checkpoint and 300 rule-labelled pairs that fit its context."""
    root = make_sft_base(tmp_path_factory.mktemp("dpo"), conversations=200, block_size=128)
    write_pairs(root / "pairs.jsonl", 300, seed=0)
    return root


@pytest.fixture(scope="module")
def batch_and_model(base):
    ckpt = load_checkpoint(base / "model")
    pairs = load_preference([base / "pairs.jsonl"], ckpt.tokenizer, 128, overlong="drop", val_fraction=0).train
    torch.manual_seed(0)
    for p in ckpt.model.parameters():  # a non-trivial model, so that log-probabilities differ between rows
        p.data.add_(0.05 * torch.randn_like(p))
    return collate_pairs(pairs[:6], ckpt.tokenizer.pad_id), ckpt.model.train()


def direct_logps(model, batch):
    """log pi(completion | prompt) the plain way: full logits, log_softmax, gather, mask, sum."""
    logits = model(batch["input_ids"])[0][:, :-1].float()  # (2B, T-1, V)
    logp = torch.log_softmax(logits, dim=-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    return (logp * batch["completion_mask"][:, 1:]).sum(dim=1)


def paper_loss(pi_w, pi_l, ref_w, ref_l, beta, kind, eps, alpha=0.0, n_w=None):
    """The formulas as the papers write them, per pair; ``alpha`` adds RPO's NLL of the chosen completion
    (Pang et al., 2024), per token (``n_w`` completion tokens, as TRL's rpo_alpha)."""
    h = (pi_w - ref_w) - (pi_l - ref_l)
    nll = alpha * -pi_w / n_w if alpha else 0.0
    if kind == "ipo":  # Azar et al. (2023), eq. 17
        return (h - 1 / (2 * beta)) ** 2 + nll
    p_chosen = torch.sigmoid(beta * h)
    if kind == "robust":  # Chowdhury et al. (2024): the unbiased loss under flip rate eps
        return ((1 - eps) * -torch.log(p_chosen) - eps * -torch.log(1 - p_chosen)) / (1 - 2 * eps) + nll
    return -(1 - eps) * torch.log(p_chosen) - eps * torch.log(1 - p_chosen) + nll  # DPO / cDPO (+ RPO)


def test_loss_is_ln2_at_step_zero(batch_and_model):
    batch, model = batch_and_model
    loss, metrics = dpo_objective(DPOLoss(beta=0.1), frozen_reference(copy.deepcopy(model)))(model, batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["reward_chosen"] == metrics["reward_rejected"] == metrics["reward_margin"] == 0.0
    assert metrics["tokens"] == int(batch["attention_mask"].sum())
    with torch.no_grad():  # precomputed in another pass: equal up to float rounding
        reference = completion_logps(model, batch)
    loss, _ = dpo_objective(DPOLoss(beta=0.1), precomputed_reference)(model, {**batch, "ref_logps": reference})
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)


def test_completion_logps_equal_the_full_logits_sum(batch_and_model):
    batch, model = batch_and_model
    torch.testing.assert_close(completion_logps(model, batch), direct_logps(model, batch), rtol=1e-5, atol=1e-4)


def test_a_pairs_prompt_runs_once_with_the_plain_paths_gradients(batch_and_model):
    """The shared-prompt path: one row per distinct prompt in the prompt pass, then the 2B completions;
    the log-probs and every gradient equal the plain path's (each row in full)."""
    batch, model = batch_and_model
    rows = []
    original = type(model).forward

    def spy(self, idx, *args, **kwargs):
        rows.append(idx.shape[0])
        return original(self, idx, *args, **kwargs)

    grads = {}
    for shared in (True, False):
        twin = copy.deepcopy(model)
        rows.clear()
        type(model).forward = spy
        try:
            logps = completion_logps(twin, batch, shared_prompt=shared)
        finally:
            type(model).forward = original
        (logps * torch.linspace(-1, 1, logps.shape[0])).sum().backward()
        grads[shared] = (logps.detach(), {n: p.grad for n, p in twin.named_parameters() if p.grad is not None},
                         list(rows))
    (shared_logps, shared_grads, shared_rows), (plain_logps, plain_grads, plain_rows) = grads[True], grads[False]
    pairs = batch["input_ids"].shape[0] // 2
    assert plain_rows == [2 * pairs]
    assert len(shared_rows) == 2 and shared_rows[0] <= pairs and shared_rows[1] == 2 * pairs  # prompts once
    torch.testing.assert_close(shared_logps, plain_logps, rtol=1e-5, atol=1e-4)
    assert shared_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, eps, alpha", [("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.0), ("robust", 0.1, 0.0),
                                              ("ipo", 0.0, 0.0), ("sigmoid", 0.0, 1.0), ("ipo", 0.0, 0.5)])
def test_loss_and_gradient_equal_the_papers_formula(batch_and_model, kind, eps, alpha):
    batch, model = batch_and_model
    beta = 0.5
    with torch.no_grad():  # a reference a few nats from the policy on every completion, so beta * h is moderate
        reference = direct_logps(model, batch) + 3 * torch.randn(12, generator=torch.Generator().manual_seed(1))
    ours = copy.deepcopy(model)
    loss, _ = dpo_objective(DPOLoss(beta, kind, eps, sft_weight=alpha), precomputed_reference)(
        ours, {**batch, "ref_logps": reference})
    loss.backward()
    theirs = copy.deepcopy(model)
    logps = direct_logps(theirs, batch)
    chosen_tokens = batch["completion_mask"][:6].sum(dim=1).float()  # counted plainly, over the whole row
    expected = paper_loss(logps[:6], logps[6:], reference[:6], reference[6:], beta, kind, eps, alpha,
                          chosen_tokens).mean()
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(loss.detach()) != pytest.approx(math.log(2), abs=1e-3)  # the batch is not the trivial point
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * float(b.grad.abs().max()), msg=lambda m: f"{name}: {m}")


def test_lora_reference_is_the_base_with_adapters_off(batch_and_model):
    batch, model = batch_and_model
    base = copy.deepcopy(model)
    tuned = copy.deepcopy(model)
    apply_lora(tuned, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the outputs
    with torch.no_grad():
        assert not torch.allclose(completion_logps(tuned, batch), completion_logps(base, batch))
        assert torch.equal(adapters_off_reference(tuned, batch), completion_logps(base, batch))
    assert tuned.training  # restored after the reference pass
    with adapters_off(tuned):
        assert all(m.scaling == 0 for m in tuned.modules() if hasattr(m, "lora_A"))
    assert all(m.scaling > 0 for m in tuned.modules() if hasattr(m, "lora_A"))
    with pytest.raises(ConfigError, match="needs a model with LoRA adapters"):
        adapters_off_reference(base, batch)


def test_dpo_raises_held_out_accuracy_and_writes_a_normal_checkpoint(base, tmp_path):
    summary = dpo(base / "model", [str(base / "pairs.jsonl")], tmp_path / "run",
                  overrides=[*SMALL, "train.max_steps=30", "dpo.beta=0.5"], progress=False)
    assert summary["heldout"]["accuracy"] >= 0.8, summary["heldout"]
    assert summary["heldout"]["margin"] > 0
    data = summary["data"]
    assert data["read"] == 300 and data["used"] + data["dropped"] == 300 and data["val_pairs"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if "loss" in m and "val_loss" not in m)
    assert first["reward_accuracy"] is not None
    tuned = load_checkpoint(tmp_path / "run" / "model")
    assert tuned.tokenizer is not None and tuned.config["dpo"]["beta"] == 0.5 and "head" not in tuned.config
    assert tuned.config["dpo"]["sft_weight"] == 1.0  # the default: DPO with the chosen-NLL term (RPO)


def test_dpo_lora_trains_only_adapters_and_writes_adapter_and_merged_model(base, tmp_path):
    summary = dpo(base / "model", [str(base / "pairs.jsonl")], tmp_path / "lora", lora=True,
                  overrides=[*SMALL, "train.max_steps=6", "dpo.reference=copy", "lora.r=4"], progress=False)
    assert summary["lora"]["trainable_params"] < summary["lora"]["total_params"] / 5
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    assert load_checkpoint(tmp_path / "lora" / "model").config["lora"]["r"] == 4


def test_dpo_cli_survives_sigkill_bit_identically(base, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = [*SMALL, "train.max_steps=16", "train.ckpt_every=8"]

    def cmd(out, *extra):
        return [sys.executable, "-m", "lmstack.cli", "dpo", "--model", str(base / "model"), "--data",
                str(base / "pairs.jsonl"), "--out", str(out), *extra, *steps]

    full = subprocess.run(cmd(tmp_path / "full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "killed" / "checkpoints" / "step_0000008" / "model.safetensors").exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_line_error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_input_unknown_keys_and_another_tokenizer_are_one_line(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}) + "\n"
                   + json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "2"}) + "\n")
    run = ["dpo", "--model", str(base / "model"), "--out", str(tmp_path / "o"), "train.device=cpu"]
    err = _one_line_error([*run, "--data", str(bad)], capsys)
    assert f"{bad}:2:" in err and "identical" in err and "dpo.skip_bad_records=true" in err
    assert not (tmp_path / "o").exists()
    assert "unknown key 'dpo.betta'" in _one_line_error([*run, "--data", str(bad), "dpo.betta=1"], capsys)
    assert "dpo.loss='kto'" in _one_line_error([*run, "--data", str(bad), "dpo.loss=kto"], capsys)
    assert "dpo.sft_weight" in _one_line_error([*run, "--data", str(bad), "dpo.sft_weight=-1"], capsys)
    assert "lora.* settings apply to LoRA runs" in _one_line_error([*run, "--data", str(bad), "lora.r=4"], capsys)
    other = make_sft_base(tmp_path / "other", conversations=50, block_size=128)  # a tokenizer trained on other text
    assert Tokenizer.load(other / "model").vocab_size == Tokenizer.load(base / "model").vocab_size
    err = _one_line_error([*run, "--data", str(base / "pairs.jsonl"), "--reference", str(other / "model")], capsys)
    assert "another tokenizer" in err
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    help_text = capsys.readouterr().out
    assert "dpo.beta" in help_text and "dpo.sft_weight" in help_text
