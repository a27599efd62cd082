"""`lmstack reward` and `lmstack reward-score` (lmstack/stages/reward.py): the Bradley–Terry loss (with the centring
term) equals its formula and is ln 2 for a fresh head; training raises held-out pair accuracy; the checkpoint
carries the head and reloads; score() and reward-score agree; a model without a head is one line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmstack.checkpoint import load_checkpoint
from lmstack.cli import main
from lmstack.data.preference import collate_pairs, load_preference, make_preference_pairs, write_pairs
from lmstack.models.heads import ScalarHeadModel, score_at_last
from lmstack.stages.reward import reward, score
from lmstack.train.preference_losses import reward_objective
from sft_helpers import make_sft_base

SMALL = ["train.batch_size=8", "train.seq_len=128", "train.eval_batches=2", "train.log_every=5",
         "train.tensorboard=false", "train.device=cpu", "optim.lr=3e-3", "optim.warmup_steps=0",
         "optim.schedule=constant", "train.eval_every=0", "reward.val_fraction=0.1", "reward.overlong=drop"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = make_sft_base(tmp_path_factory.mktemp("reward"), conversations=200, block_size=128)
    write_pairs(root / "pairs.jsonl", 300, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    summary = reward(base / "model", [str(base / "pairs.jsonl")], out,
                     overrides=[*SMALL, "train.max_steps=40", "reward.center_coef=0.01"], progress=False)
    return out, summary


def test_bradley_terry_loss_with_centring_equals_its_formula(base):
    ckpt = load_checkpoint(base / "model")
    pairs = load_preference([base / "pairs.jsonl"], ckpt.tokenizer, 128, overlong="drop", val_fraction=0).train
    batch = collate_pairs(pairs[:4], ckpt.tokenizer.pad_id)
    rm = ScalarHeadModel(ckpt.model)
    loss, metrics = reward_objective(0.5)(rm, batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)  # a fresh head scores 0 everywhere
    assert metrics["accuracy"] == 0.0 and metrics["tokens"] == int(batch["attention_mask"].sum())
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    torch.nn.init.constant_(rm.score.bias, 0.7)
    loss, _ = reward_objective(0.5)(rm, batch)
    with torch.no_grad():
        r = score_at_last(rm(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    expected = -torch.log(torch.sigmoid(r[:4] - r[4:])).mean() + 0.5 * ((r[:4] + r[4:]) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss.detach()) != pytest.approx(float(-F.logsigmoid(r[:4] - r[4:]).mean()), rel=1e-3)


def test_training_raises_held_out_accuracy_and_the_checkpoint_carries_the_head(base, trained):
    out, summary = trained
    assert summary["heldout_accuracy"] >= 0.8, summary
    assert summary["data"]["read"] == 300 and summary["data"]["val_pairs"] > 0
    rm = load_checkpoint(out / "model")
    assert rm.config["head"] == "scalar" and rm.config["reward"]["center_coef"] == 0.01
    assert isinstance(rm.model, ScalarHeadModel) and rm.tokenizer is not None
    pairs = make_preference_pairs(40, seed=99)  # fresh pairs, short enough for the context
    pairs = [p for p in pairs if p["rule"] != "concise"]
    chosen = score(rm.model, rm.tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = score(rm.model, rm.tokenizer, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    right = [c > r for c, r in zip(chosen, rejected)]
    assert sum(right) / len(pairs) >= 0.65  # chance is 0.5; 40 steps on an untrained 1-layer model
    assert all(ok for ok, p in zip(right, pairs) if p["rule"] == "refusal")  # the easiest rule is learnt fully
    one = score(rm.model, rm.tokenizer, [pairs[0]["prompt"]], [pairs[0]["chosen"]], batch_size=1)
    assert one[0] == pytest.approx(chosen[0], abs=1e-5)  # batching and padding do not change a score


def test_reward_score_cli_on_pairs_and_completions(base, trained, tmp_path, capsys):
    out, _ = trained
    pairs = [p for p in make_preference_pairs(30, seed=5) if p["rule"] != "concise"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert main(["reward-score", "--model", str(out), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert summary["pairs"] == len(pairs) and summary["accuracy"] >= 0.65
    assert summary["accuracy"] == sum(s["score_chosen"] > s["score_rejected"] for s in scored) / len(pairs)
    singles = tmp_path / "answers.jsonl"
    singles.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in pairs))
    assert main(["reward-score", "--model", str(out / "model"), "--data", str(singles)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completions"] == len(pairs)
    assert summary["mean_score"] == pytest.approx(sum(s["score_chosen"] for s in scored) / len(pairs), abs=1e-4)


def test_a_model_without_a_head_and_bad_input_are_one_line(base, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "completion": "2"}) + "\n")
    code = main(["reward-score", "--model", str(base / "model"), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no scalar head" in err and "lmstack reward" in err
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    code = main(["reward", "--model", str(base / "model"), "--data", str(data), "--out", str(tmp_path / "o"),
                 "train.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{data}:1:" in err and "reward.skip_bad_records=true" in err
    code = main(["reward", "--model", str(base / "model"), "--data", str(data), "--out", str(tmp_path / "o"),
                 "reward.center_coef=-1"])
    err = capsys.readouterr().err
    assert code == 2 and "reward.center_coef" in err and err.count("\n") == 1
