"""The training loop: schedules, decay groups, exact resume, bad-batch handling, accumulation, DDP."""

import json
import math
import os
import socket

import pytest
import torch
from safetensors.torch import load_file

from lmstack.config import OptimConfig, build_run_config
from lmstack.models import build_model
from lmstack.train.dist import DistInfo
from lmstack.train.losses import Objective, causal_lm, real_tokens
from lmstack.train.loop import evaluate, train
from lmstack.train.optim import build_optimizer, lr_multiplier, param_groups
from loop_helpers import PatternLoader

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=2", "model.vocab_size=128",
        "model.block_size=32", "train.batch_size=4", "train.seq_len=16", "train.max_steps=24",
        "train.eval_every=8", "train.eval_batches=2", "train.ckpt_every=8", "train.log_every=4",
        "optim.warmup_steps=4", "optim.lr=3e-3", "train.tensorboard=false"]


def run(out, extra=(), resume=False, objective=causal_lm, world=(0, 1), loader_batch=None):
    cfg = build_run_config("tiny", overrides=TINY + list(extra))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    B = loader_batch or cfg.train.batch_size
    rank, ws = world
    tl = PatternLoader(B, cfg.train.seq_len, rank=rank, world_size=ws)
    vl = PatternLoader(B, cfg.train.seq_len, rank=rank, world_size=ws, split="val", n_windows=16)
    return train(model, cfg, tl, vl, objective, out, resume=resume, progress=False)


def weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def test_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.1)
    mids = [lr_multiplier(s, 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(mids, mids[1:]))  # cosine is monotone after warmup
    cfg.schedule = "wsd"
    cfg.decay_fraction = 0.2
    assert lr_multiplier(50, 100, cfg) == 1.0 and lr_multiplier(79, 100, cfg) == 1.0
    assert lr_multiplier(90, 100, cfg) == pytest.approx(0.55)
    cfg.schedule = "linear"
    assert lr_multiplier(55, 100, cfg) == pytest.approx(0.55)
    # warmup is capped at a fifth of the run: 20 steps warm up over 4, then still decay to the floor
    cfg.schedule = "cosine"
    assert lr_multiplier(3, 20, cfg) == pytest.approx(1.0) and lr_multiplier(20, 20, cfg) == pytest.approx(0.1)


class SlowLoader(PatternLoader):
    """PatternLoader that takes `delay(batch_index)` seconds per batch: a machine whose speed changes."""

    def __init__(self, *args, delay, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay, self.served = delay, 0

    def __iter__(self):
        import time

        for batch in super().__iter__():
            time.sleep(self.delay(self.served))
            self.served += 1
            yield batch


def test_wall_clock_budget_follows_the_machine_speed(tmp_path):
    """max_minutes becomes a step count from the measured speed, re-estimated while the run is in its first
    half: a machine that gets 4x faster after 10 steps gets more steps than the first estimate, and the
    schedule still ends at its floor when the budget runs out."""
    import time

    budget_s = 12.0
    cfg = build_run_config("tiny", overrides=TINY + [f"train.max_minutes={budget_s / 60}", "train.max_steps=100000",
                                                     "train.eval_every=100000", "train.ckpt_every=100000",
                                                     "train.log_every=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tl = SlowLoader(4, 16, delay=lambda i: 0.3 if i < 10 else 0.01)
    vl = PatternLoader(4, 16, split="val", n_windows=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier step times on a busy machine: the sleeps must dominate the compute
    try:
        start = time.time()
        r = train(model, cfg, tl, vl, causal_lm, tmp_path / "run", progress=False)
        wall = time.time() - start
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    plans = [row["max_steps"] for row in rows if row.get("event") == "budget"]
    assert len(plans) >= 2 and plans[-1] > 1.3 * plans[0]  # re-estimated upwards once the machine sped up
    assert r.steps == plans[-1] < 100000
    assert 0.5 * budget_s < wall < 2 * budget_s  # ends near the budget, not at max_steps
    last_lr = [row["lr"] for row in rows if "lr" in row][-1]
    assert last_lr < 0.15 * cfg.optim.lr  # cosine reached (close to) min_lr_ratio=0.1: the decay was planned


def test_a_budget_shorter_than_the_warm_up_steps_still_ends_on_time(tmp_path):
    """Steps so slow (0.6 s) that the ten warm-up steps before the first plan would take twice the 3-second
    budget: the run stops when the next step no longer fits instead of finishing the warm-up."""
    import time

    budget_s = 3.0
    cfg = build_run_config("tiny", overrides=TINY + [f"train.max_minutes={budget_s / 60}", "train.max_steps=100000",
                                                     "train.eval_every=100000", "train.ckpt_every=100000",
                                                     "train.log_every=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    start = time.time()
    r = train(model, cfg, SlowLoader(4, 16, delay=lambda i: 0.6), PatternLoader(4, 16, split="val", n_windows=16),
              causal_lm, tmp_path / "run", progress=False)
    wall = time.time() - start
    assert 1 <= r.steps < 10  # stopped before the warm-up would have ended
    assert wall < budget_s + 2.0  # the warm-up alone would take 6 s; setup, final validation and weights count
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["max_steps"] for row in rows if row.get("event") == "budget"] == [r.steps]


def test_fused_cpu_adamw_matches_the_per_tensor_loop():
    """The CPU optimizer is the fused kernel; ten steps of it stay within fp32 rounding of the per-tensor loop."""
    cfg = build_run_config("tiny", overrides=TINY)
    torch.manual_seed(0)
    fused_model = build_model(cfg.model)
    plain_model = build_model(cfg.model)
    plain_model.load_state_dict(fused_model.state_dict())
    before = [p.detach().clone() for p in fused_model.parameters()]
    fused = build_optimizer(fused_model, cfg.optim, "cpu")
    plain = torch.optim.AdamW(param_groups(plain_model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                              betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, foreach=False)
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0].get("fused")
    batch = next(iter(PatternLoader(4, 16)))
    for _ in range(10):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            causal_lm(model, batch)[0].backward()
            opt.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), name
    assert max((a - b0).abs().max().item() for a, b0 in zip(fused_model.parameters(), before)) > 1e-3  # it trained


def test_no_weight_decay_on_norms_biases_embeddings():
    cfg = build_run_config("tiny", overrides=TINY + ["model.bias=true"])
    model = build_model(cfg.model)
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.tok_emb.weight) not in decay_ids
    assert id(model.blocks[0].norm1.weight) not in decay_ids
    assert id(model.blocks[0].attn.q_proj.bias) not in decay_ids
    assert id(model.blocks[0].attn.q_proj.weight) in decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_training_writes_metrics_plot_and_checkpoints(tmp_path):
    r = run(tmp_path / "a")
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert any(r.get("val_bpb") for r in rows)
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step_0000016", "step_0000024"]  # keep_last=2
    assert (tmp_path / "a" / "model" / "config.json").is_file()
    assert r.steps == 24 and r.final_val_bpb == pytest.approx(r.final_val_loss / math.log(2) / 2.0)


def test_resume_is_bit_identical(tmp_path):
    run(tmp_path / "full")
    run(tmp_path / "part", extra=["train.max_steps=24"])
    # pretend the run died after step 16: drop the newer checkpoint and the final model
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_0000024")
    shutil.rmtree(tmp_path / "part" / "model")
    r = run(tmp_path / "part", resume=True)
    assert r.steps == 24
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated log lines after resume


def test_nan_and_spike_batches_are_skipped(tmp_path):
    calls = {"n": 0}

    def flaky(model, batch):
        loss, m = causal_lm(model, batch)
        calls["n"] += 1
        if calls["n"] == 6:
            return loss * float("nan"), m
        if calls["n"] == 15:
            return loss * 100.0, m  # a spike far above the running mean
        return loss, m

    r = run(tmp_path / "flaky", objective=flaky)
    assert r.steps == 24 and r.rollbacks == 2
    rows = [json.loads(x) for x in (tmp_path / "flaky" / "metrics.jsonl").read_text().splitlines()]
    reasons = [r["reason"] for r in rows if r.get("event") == "skipped_batch"]
    assert any("non-finite" in x for x in reasons) and any("spike" in x for x in reasons)
    w = weights(tmp_path / "flaky")
    assert all(torch.isfinite(t).all() for t in w.values())


def test_too_many_bad_batches_stop_the_run(tmp_path):
    def always_nan(model, batch):
        loss, m = causal_lm(model, batch)
        return loss * float("nan"), m

    with pytest.raises(RuntimeError, match="max_rollbacks"):
        run(tmp_path / "nan", objective=always_nan, extra=["train.max_rollbacks=3"])


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    run(tmp_path / "big", extra=["train.batch_size=8", "train.max_steps=6"])
    run(tmp_path / "acc", extra=["train.batch_size=4", "train.grad_accum=2", "train.max_steps=6"])
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _ddp_worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from lmstack.train.dist import cleanup_distributed, init_distributed

    init_distributed("cpu")
    try:
        run(out, extra=["train.max_steps=6", "train.device=cpu"], world=(rank, world_size))
    finally:
        cleanup_distributed()


def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, tmp_path / "ddp"), nprocs=2, join=True)
    # one process with batch 8 sees the union of both ranks' batches of 4 in the same order
    cfg_extra = ["train.batch_size=8", "train.max_steps=6"]
    run(tmp_path / "single", extra=cfg_extra)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _ddp_budget_worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from lmstack.train.dist import cleanup_distributed, init_distributed

    dist = init_distributed("cpu")
    try:
        cfg = build_run_config("tiny", overrides=TINY + ["train.max_minutes=0.1", "train.max_steps=100000",
                                                         "train.eval_every=10", "train.ckpt_every=10",
                                                         "train.device=cpu"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        tl = PatternLoader(4, 16, rank=rank, world_size=world_size)
        vl = PatternLoader(4, 16, rank=rank, world_size=world_size, split="val", n_windows=16)
        # rank 0 also writes the checkpoints: its timings differ from rank 1's, its plan must still rule
        r = train(model, cfg, tl, vl, causal_lm, out, tokenizer=SlowSavingTokenizer(0.3), info=dist, progress=False)
        (out / f"steps_{rank}").write_text(str(r.steps))
    finally:
        cleanup_distributed()


def test_ddp_ranks_agree_on_a_wall_clock_plan(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_budget_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    assert (tmp_path / "steps_0").read_text() == (tmp_path / "steps_1").read_text()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_paths_train(tmp_path, dtype):
    """bf16 autocast and fp16 autocast + GradScaler run through the same loop (on CPU here, CUDA on GPUs)."""
    r = run(tmp_path / dtype, extra=[f"train.dtype={dtype}", "train.max_steps=16"])
    rows = [json.loads(x) for x in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] and math.isfinite(r.final_val_loss)
    w = weights(tmp_path / dtype)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values())  # fp32 master weights


@pytest.mark.slow
def test_compiled_model_matches_eager(tmp_path):
    run(tmp_path / "eager", extra=["train.max_steps=4"])
    run(tmp_path / "compiled", extra=["train.max_steps=4", "train.compile=true"])
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_first_logged_loss_after_resume_equals_the_uninterrupted_run(tmp_path):
    """Checkpoints every 8 steps, log lines every 6: the line at step 18 averages steps 13-18, three of which
    ran before the checkpoint at 16 that the resumed run starts from. It must log what the full run logged."""
    extra = ["train.log_every=6", "train.ckpt_every=8", "train.keep_last=3"]
    run(tmp_path / "full", extra=extra)
    run(tmp_path / "part", extra=extra)
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_0000024")
    shutil.rmtree(tmp_path / "part" / "model")
    run(tmp_path / "part", extra=extra, resume=True)

    def logged(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows if "loss" in r or "val_loss" in r]

    assert 18 in [step for step, loss, _ in logged("full") if loss is not None]  # the window that spans the resume
    assert logged("part") == logged("full")


class SlowValLoader(PatternLoader):
    """Validation batches that take `delay` seconds each: a validation pass much slower than a step."""

    def __init__(self, *args, delay, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def __iter__(self):
        import time

        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


class SlowSavingTokenizer:
    """A stand-in tokenizer whose save (part of every checkpoint) takes `delay` seconds."""

    def __init__(self, delay):
        self.delay = delay

    def save(self, directory):
        import time

        time.sleep(self.delay)
        (directory / "tokenizer.json").write_text("{}")


def test_wall_clock_budget_counts_validation_and_checkpoint_time(tmp_path):
    """Validation passes (0.6 s) and checkpoints (0.5 s) dwarf the steps; the run, final validation and
    final weights included, must still end within its 12-second budget instead of overshooting by their cost."""
    import time

    budget_s = 12.0
    cfg = build_run_config("tiny", overrides=TINY + [f"train.max_minutes={budget_s / 60}", "train.max_steps=100000",
                                                     "train.eval_every=10", "train.ckpt_every=10", "train.log_every=5"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tl = PatternLoader(4, 16)
    vl = SlowValLoader(4, 16, split="val", n_windows=16, delay=0.3)  # eval_batches=2: 0.6 s a pass
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.time()
        r = train(model, cfg, tl, vl, causal_lm, tmp_path / "run", tokenizer=SlowSavingTokenizer(0.5), progress=False)
        wall = time.time() - start
    finally:
        torch.set_num_threads(threads)
    assert wall < budget_s * 1.05  # everything the run does counts against the budget
    assert wall > budget_s * 0.6  # ... and the budget is used, not left idle
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert r.steps == [row["max_steps"] for row in rows if row.get("event") == "budget"][-1]
    assert sum(1 for row in rows if "val_loss" in row) >= 3


class PaddedLoader(PatternLoader):
    """PatternLoader batches whose rows end in padding (labels -1), as a padded fine-tuning batch would.

    ``pad``: an int pads that many positions of every row; None pads each row by its first token mod 8,
    so batches hold different numbers of real tokens."""

    def __init__(self, *args, pad=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = pad

    def __iter__(self):
        for batch in super().__iter__():
            labels = batch["labels"].clone()
            T = labels.shape[1]
            for row, first in enumerate(batch["input_ids"][:, 0].tolist()):
                pad = first % 8 if self.pad is None else self.pad
                if pad:
                    labels[row, T - pad:] = -1
            yield {**batch, "labels": labels}


@Objective
def lm_with_label_mean(model, batch):
    """causal_lm plus a per-token metric the test can recompute: the mean of the real labels."""
    loss, metrics = causal_lm(model, batch)
    labels = batch["labels"]
    return loss, {**metrics, "label_mean": float(labels[labels != -1].float().mean())}


def test_padded_batches_count_only_real_tokens(tmp_path):
    """Half of every row is padding: the token total and tokens/s count the 8 real tokens per row, not 16.
    Each batch takes at least 0.1 s to load, so a step's tokens/s is at most its tokens / 0.1 s."""
    cfg = build_run_config("tiny", overrides=TINY + ["train.max_steps=8", "train.eval_every=4", "train.log_every=2"])
    torch.manual_seed(0)

    class SlowPaddedLoader(PaddedLoader):
        def __iter__(self):
            import time

            for batch in super().__iter__():
                time.sleep(0.1)
                yield batch

    tl = SlowPaddedLoader(4, 16, pad=8)
    vl = PaddedLoader(4, 16, split="val", n_windows=16, pad=8)
    r = train(build_model(cfg.model), cfg, tl, vl, lm_with_label_mean, tmp_path / "run", progress=False)
    real_per_step = 4 * 8
    assert r.tokens == 8 * real_per_step
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    assert [row["tokens"] for row in train_rows] == [row["step"] * real_per_step for row in train_rows]
    assert all(0 < row["tokens_per_second"] <= real_per_step / 0.1 for row in train_rows)
    val_rows = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in val_rows] == [4, 8]
    for row in val_rows:  # today's keys plus the objective's other metrics, averaged
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2) / 2.0)
        assert row["val_tokens"] == 2 * real_per_step  # eval_batches=2
        assert 0 <= row["val_label_mean"] < 128


def test_evaluate_returns_token_weighted_metrics():
    """Batches with different numbers of real tokens: every metric is weighted by them, so the loss equals
    the cross-entropy summed over all real tokens divided by their count."""
    cfg = build_run_config("tiny", overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    val = PaddedLoader(4, 16, split="val", n_windows=16)
    batches = list(val)
    counts = [real_tokens(b) for b in batches]
    assert len(set(counts)) > 1  # the weighting matters
    metrics = evaluate(model, val, lm_with_label_mean, torch.device("cpu"), "fp32", max_batches=100, dist=DistInfo())
    assert set(metrics) == {"loss", "tokens", "label_mean"}
    assert metrics["tokens"] == sum(counts)
    labels = torch.cat([b["labels"].flatten() for b in batches])
    assert metrics["label_mean"] == pytest.approx(float(labels[labels != -1].float().mean()))
    with torch.no_grad():
        total_nll = sum(float(torch.nn.functional.cross_entropy(model(b["input_ids"])[0].flatten(0, 1),
                                                                b["labels"].flatten(), ignore_index=-1,
                                                                reduction="sum")) for b in batches)
    assert metrics["loss"] == pytest.approx(total_nll / sum(counts), rel=1e-5)
    assert model.training  # evaluate hands the model back in train mode


def test_a_near_zero_loss_is_not_judged_by_its_ratio_alone(tmp_path):
    """A memorised fine-tune's loss (~0.01) that jumps tenfold is noise, not a spike: the limit is also at least
    train.spike_min_gap nats above the running mean. With the gap at 0 the same jumps are skipped."""
    calls = {"n": 0}

    def small(model, batch):
        loss, m = causal_lm(model, batch)
        calls["n"] += 1
        scale = 0.1 if calls["n"] % 7 == 0 else 0.01  # every 7th batch 10x the others, 0.1 x the real loss
        return loss * (scale / loss.detach()), m

    kept = run(tmp_path / "gap", objective=small)
    assert kept.rollbacks == 0 and kept.steps == 24
    calls["n"] = 0
    strict = run(tmp_path / "ratio", extra=["train.spike_min_gap=0", "train.max_rollbacks=100"], objective=small)
    rows = [json.loads(x) for x in (tmp_path / "ratio" / "metrics.jsonl").read_text().splitlines()]
    reasons = [r["reason"] for r in rows if r.get("event") == "skipped_batch"]
    assert strict.rollbacks == len(reasons) > 0 and all(x.startswith("loss spike 0.100 > limit") for x in reasons)


def test_an_objective_that_does_not_judge_spikes_is_never_skipped_for_one(tmp_path):
    """The same jump that test_nan_and_spike_batches_are_skipped skips passes when the objective says its loss
    is not for the spike guard to judge; a non-finite loss is still skipped."""
    calls = {"n": 0}

    def jumpy(model, batch):
        loss, m = causal_lm(model, batch)
        calls["n"] += 1
        if calls["n"] == 6:
            return loss * float("nan"), m
        if calls["n"] in (15, 16, 17):
            return loss * 100.0, m
        return loss, m

    r = run(tmp_path / "jumpy", objective=Objective(jumpy, judge_spikes=False))
    assert r.steps == 24 and r.rollbacks == 1
    rows = [json.loads(x) for x in (tmp_path / "jumpy" / "metrics.jsonl").read_text().splitlines()]
    reasons = [row["reason"] for row in rows if row.get("event") == "skipped_batch"]
    assert len(reasons) == 1 and "non-finite" in reasons[0]


def test_a_passed_in_optimizer_is_used_with_its_own_learning_rates(tmp_path):
    """A stage's own optimizer: a group at LR 0 stays put while the schedule drives the other group."""
    cfg = build_run_config("tiny", overrides=TINY + ["train.max_steps=6", "train.eval_every=0", "train.ckpt_every=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    frozen = model.blocks[0].attn.q_proj.weight
    before = frozen.detach().clone()
    others = [p for p in model.parameters() if p is not frozen]
    optimizer = torch.optim.AdamW([{"params": others, "lr": 2 * cfg.optim.lr}, {"params": [frozen], "lr": 0.0}],
                                  weight_decay=0.0)
    tl = PatternLoader(4, 16)
    vl = PatternLoader(4, 16, split="val", n_windows=16)
    train(model, cfg, tl, vl, causal_lm, tmp_path / "run", progress=False, optimizer=optimizer)
    assert torch.equal(frozen.detach(), before)
    assert len(optimizer.state) == len(list(model.parameters()))  # this optimizer took the steps
    final = lr_multiplier(5, 6, cfg.optim)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * cfg.optim.lr * final)
    assert optimizer.param_groups[1]["lr"] == 0.0
