"""`lmstack sft --lora` and `--adapter`: only the adapter trains, held-out loss falls, OUT/adapter (peft layout)
plus the merged OUT/model whose logits equal base + adapter, `generate --adapter` equals `generate` on the
merged model, a resumed LoRA run matches an uninterrupted one exactly, and bad settings are one line, exit 2."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lmstack.checkpoint import load_checkpoint, save_checkpoint
from lmstack.cli import main
from lmstack.interop.peft_adapters import load_adapter
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.peft import merge_lora
from lmstack.stages.sft import sft
from sft_helpers import held_out_loss, make_sft_base

SMALL = ["train.batch_size=8", "train.seq_len=64", "train.eval_batches=4", "train.log_every=5",
         "train.tensorboard=false", "train.device=cpu", "optim.lr=3e-2", "optim.warmup_steps=0",
         "optim.schedule=constant", "sft.val_fraction=0.1", "train.eval_every=0",
         "lora.target_modules=q_proj,v_proj,o_proj,up_proj,down_proj,lm_head", "lora.r=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny untrained decoder with a chat tokenizer, and task conversations to adapt it to."""
    # an untied head: its adapter leaves the embedding alone
    return make_sft_base(tmp_path_factory.mktemp("lora"), tie_embeddings=False)


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run") / "run"
    summary = sft(base / "model", [str(base / "tasks.jsonl")], out, lora=True,
                  overrides=[*SMALL, "train.max_steps=40", "train.ckpt_every=20"], progress=False)
    return out, summary


def test_only_the_adapter_trains_and_the_loss_falls(base, run):
    out, summary = run
    lora = summary["lora"]
    n_embd, hidden = 32, GPT(GPTConfig(vocab_size=320, block_size=128, n_layer=1, n_head=2, n_kv_head=2,
                                       n_embd=32)).blocks[0].mlp.up_proj.out_features
    # r * (in + out) per adapted layer: q, v, o (32 -> 32), up (32 -> hidden), down (hidden -> 32), lm_head (32 -> 320)
    assert lora["trainable_params"] == 4 * (3 * 2 * n_embd + 2 * (n_embd + hidden) + n_embd + 320)
    assert sorted(m.rsplit(".", 1)[-1] for m in lora["modules"]) == ["down_proj", "lm_head", "o_proj", "q_proj",
                                                                       "up_proj", "v_proj"]
    source = load_file(str(base / "model" / "model.safetensors"))
    step = load_file(str(out / "checkpoints" / "step_0000040" / "model.safetensors"))
    assert all(torch.equal(source[k], step[k]) for k in source)  # the base weights did not move
    assert any(k.endswith("lora_B.weight") and step[k].abs().sum() > 0 for k in step)  # the adapter did
    before, after = held_out_loss(base / "model", base / "tasks.jsonl"), held_out_loss(out / "model",
                                                                                        base / "tasks.jsonl")
    assert after < 0.8 * before, (before, after)
    assert json.loads((out / "summary.json").read_text())["lora"]["total_params"] == lora["total_params"]


def test_adapter_is_peft_layout_and_the_merged_model_equals_base_plus_adapter(base, run):
    out, _ = run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(load_checkpoint(base / "model").path)
    assert all(k.startswith("base_model.model.") for k in load_file(str(out / "adapter" / "adapter_model.safetensors")))
    rebuilt = load_checkpoint(base / "model")
    load_adapter(rebuilt.model, out / "adapter")
    merge_lora(rebuilt.model)
    merged = load_checkpoint(out / "model")
    assert "lora" in merged.config and merged.tokenizer is not None
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(rebuilt.model(ids)[0], merged.model(ids)[0], atol=1e-5)


def test_generate_with_adapter_equals_generate_on_the_merged_model(base, run, capsys):
    out, _ = run
    common = ["--prompt", "What is 2 plus 3?", "--temperature", "0", "--max-tokens", "12", "--device", "cpu"]
    assert main(["generate", "--model", str(base / "model"), "--adapter", str(out / "adapter"), *common]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", "--model", str(out / "model"), *common]) == 0
    assert with_adapter == capsys.readouterr().out
    assert main(["generate", "--model", str(base / "model"), *common]) == 0
    assert capsys.readouterr().out != with_adapter  # the adapter changed what the model says


def test_lora_resume_matches_an_uninterrupted_run(base, run, tmp_path, capfd):
    out, _ = run
    data = [str(base / "tasks.jsonl")]
    sft(base / "model", data, tmp_path / "split", lora=True,
        overrides=[*SMALL, "train.max_steps=20", "train.ckpt_every=20"], progress=False)
    capfd.readouterr()
    summary = sft(base / "model", None, tmp_path / "split", overrides=["train.max_steps=40"], resume=True,
                  progress=False)
    assert "at step 20" in capfd.readouterr().err and summary["config"]["lora"]["r"] == 4
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_lora_settings_and_a_foreign_adapter_are_one_line_exit_2(base, run, tmp_path, capsys):
    out, _ = run
    sft_cmd = ["sft", "--model", str(base / "model"), "--data", str(base / "tasks.jsonl"), "--out",
               str(tmp_path / "o"), "train.device=cpu"]
    for extra, expected in ((["--lora", "lora.r=0"], "lora.r=0 must be an integer"),
                            (["--lora", "lora.dropout=1"], "lora.dropout=1.0"),
                            (["--lora", "lora.rank=4"], "unknown key 'lora.rank'"),
                            (["--lora", "lora.target_modules=nothing_here"], "matches no linear layer"),
                            (["lora.r=4"], "pass --lora")):
        code = main([*sft_cmd, *extra])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    torch.manual_seed(1)
    other_cfg = GPTConfig(vocab_size=320, block_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=48)
    save_checkpoint(tmp_path / "other", GPT(other_cfg), {"model": dataclasses.asdict(other_cfg)},
                    tokenizer=load_checkpoint(base / "model").tokenizer)
    code = main(["generate", "--model", str(tmp_path / "other"), "--adapter", str(out / "adapter"),
                 "--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "adapter" in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_eval_with_adapter_records_the_base_and_the_adapter(base, run, tmp_path):
    """``eval --adapter`` evaluates a merged temporary checkpoint; the results name what it was made of."""
    out, _ = run
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(base / "model"), "--adapter", str(out / "adapter"), "--tasks", "arithmetic",
                 "--limit", "2", "--device", "cpu", "--out", str(result)]) == 0
    assert json.loads(result.read_text())["model"] == f"{base / 'model'} + adapter {out / 'adapter'}"
