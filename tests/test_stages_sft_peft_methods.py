"""`lmstack sft --lora --quantize`, `--prompt-tuning` and `--prefix-tuning` (lmstack/stages/sft.py): QLoRA-style
training keeps the base quantized (no gradient or optimizer state for it, backward through the dequantized
weight), lowers the held-out loss, reports memory and parameter counts, and merges into the dequantized base;
prompt and prefix tuning lower the loss and write adapters that peft loads onto the exported model with our
logits; every kind resumes bit-identically after SIGKILL; bad combinations are one line, exit 2, nothing written."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmstack.checkpoint import load_checkpoint, save_checkpoint
from lmstack.cli import main
from lmstack.interop.hf_export import export_hf
from lmstack.interop.peft_adapters import load_adapter, load_prompt_adapter
from lmstack.models import build_model
from lmstack.models.bert import BertConfig
from lmstack.data.instruct import InstructLoader, load_instruct
from lmstack.models.peft import (LoRAConfig, PrefixTuningConfig, PromptTuningConfig, apply_lora, apply_prefix_tuning,
                                 apply_prompt_tuning, lora_state_dict, merge_lora, trainable_parameters)
from lmstack.models.quant import Int4Linear, Int8Linear, dequantize_model, quantize_model
from lmstack.stages.sft import sft
from sft_helpers import held_out_loss, make_sft_base

SMALL = ["train.batch_size=8", "train.seq_len=64", "train.eval_batches=4", "train.log_every=5",
         "train.tensorboard=false", "train.device=cpu", "optim.lr=3e-2", "optim.warmup_steps=0",
         "optim.schedule=constant", "sft.val_fraction=0.1", "train.eval_every=0"]
TARGETS = "lora.target_modules=q_proj,v_proj,o_proj,up_proj,down_proj,lm_head"
IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny untrained Llama-style decoder (untied head) with a chat tokenizer, and task conversations."""
    return make_sft_base(tmp_path_factory.mktemp("peft-methods"), tie_embeddings=False)


@pytest.fixture(scope="module")
def qlora(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "run"
    summary = sft(base / "model", [str(base / "tasks.jsonl")], out, lora=True, quantize="int8",
                  overrides=[*SMALL, TARGETS, "lora.r=4", "train.max_steps=40"], progress=False)
    return out, summary


def wrapper_loss(model, data_file) -> float:
    """Token-weighted held-out loss (val_fraction 0.1, seed 0, as the runs hold out) of any model or wrapper."""
    tokenizer = load_checkpoint(data_file.parent / "model").tokenizer
    data = load_instruct([data_file], tokenizer, 65, val_fraction=0.1, seed=0)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in InstructLoader(data.val, 8, pad_id=tokenizer.pad_id, shuffle=False):
            n = int((batch["labels"] != -1).sum())
            total += float(model(batch["input_ids"], batch["labels"])[1]) * n
            tokens += n
    return total / tokens


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("layer_type", [Int8Linear, Int4Linear])
def test_backward_through_a_quantized_layer_is_the_dequantized_float_layers(layer_type):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quantized = layer_type(linear)
    plain = torch.nn.Linear(64, 48)  # the float layer with the dequantized weight: the reference
    with torch.no_grad():
        plain.weight.copy_(quantized.dequantized(torch.float32))
        plain.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    grad_y = torch.randn(3, 5, 48)
    (quantized(x) * grad_y).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (plain(x) * grad_y).sum().backward()
    assert torch.allclose(ours, x.grad, atol=1e-5)  # grad_x = grad_y @ dequant(W), exactly the float layer's
    assert not list(quantized.parameters()) or all(p.grad is None for p in quantized.parameters())


def test_a_fresh_adapter_over_an_int8_base_is_the_int8_model_and_only_factors_get_gradients(base):
    float_model = load_checkpoint(base / "model").model.eval()
    int8_model = quantize_model(load_checkpoint(base / "model").model.eval(), "int8", keep_shared=True)
    adapted = quantize_model(load_checkpoint(base / "model").model.eval(), "int8", keep_shared=True)
    apply_lora(adapted, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    assert torch.equal(logits(adapted), logits(int8_model))
    assert (logits(adapted) - logits(float_model)).abs().max() < 0.05 * logits(float_model).abs().max()
    _, loss = adapted(IDS, IDS)
    loss.backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert with_grad == set(lora_state_dict(adapted)) and all(".lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if ".lora_" not in n)
    # the first layer's factors got a gradient only through the layers above it: backward crossed int8 weights
    assert adapted.blocks[0].attn.q_proj.lora_B.weight.grad.abs().sum() > 0
    assert trainable_parameters(adapted)[0] == sum(t.numel() for t in lora_state_dict(adapted).values())


def test_qlora_run_trains_only_the_adapter_and_reports_memory(base, qlora):
    out, summary = qlora
    info = json.loads((out / "summary.json").read_text())["lora"]
    assert info == summary["lora"] and info["quantize"] == "int8"
    assert info["trainable_params"] == 4 * (3 * 2 * 32 + 2 * (32 + 128) + 32 + 320)  # r * (in + out) per layer
    assert info["optimizer_state_bytes"] == 8 * info["trainable_params"]  # AdamW: two fp32 moments
    linears = [m for m in load_checkpoint(base / "model").model.modules() if isinstance(m, torch.nn.Linear)]
    # each fp32 matrix (4 bytes a weight) became int8 (1 byte) plus one fp32 scale per output row
    saved = sum(3 * m.in_features * m.out_features - 4 * m.out_features for m in linears)
    assert info["float_base_weight_bytes"] - info["base_weight_bytes"] == saved
    step = load_file(str(out / "checkpoints" / "step_0000040" / "model.safetensors"))
    assert step["blocks.0.attn.k_proj.qweight"].dtype == torch.int8  # the base stayed quantized while training
    assert not any(k.endswith("q_proj.weight") for k in step)  # no float copy of an adapted layer
    before, after = held_out_loss(base / "model", base / "tasks.jsonl"), held_out_loss(out / "model",
                                                                                        base / "tasks.jsonl")
    assert after < 0.8 * before, (before, after)


def test_qlora_model_is_the_adapter_merged_into_the_dequantized_base(base, qlora):
    out, _ = qlora
    rebuilt = quantize_model(load_checkpoint(base / "model").model, "int8", keep_shared=True)
    load_adapter(rebuilt, out / "adapter")  # the peft-layout adapter over the same int8 base
    merge_lora(rebuilt)
    dequantize_model(rebuilt)
    merged = load_checkpoint(out / "model").model
    assert all(type(m) is not Int8Linear for m in merged.modules())
    assert torch.allclose(logits(rebuilt), logits(merged), atol=1e-5)
    source_k = load_checkpoint(base / "model").model.blocks[0].attn.k_proj
    assert torch.equal(merged.blocks[0].attn.k_proj.weight, Int8Linear(source_k).dequantized(torch.float32))
    assert not torch.equal(merged.blocks[0].attn.k_proj.weight, source_k.weight)  # not the original float weights


@pytest.mark.parametrize("flag,section", [("prompt_tuning", "prompt_tuning"), ("prefix_tuning", "prefix_tuning")])
def test_prompt_and_prefix_tuning_lower_the_loss_and_peft_reads_the_adapter(base, flag, section, tmp_path):
    out = tmp_path / "run"
    summary = sft(base / "model", [str(base / "tasks.jsonl")], out, overrides=[
        *SMALL, f"{section}.num_virtual_tokens=6", "train.max_steps=30", "optim.lr=1e-1"], progress=False,
        **{flag: True})
    assert not (out / "model").exists() and (out / "adapter" / "adapter_config.json").is_file()
    info = summary[section]
    per_token = 32 if section == "prompt_tuning" else 1 * 2 * 2 * 16  # C, or layers x (k, v) x kv heads x head dim
    assert info["trainable_params"] == 6 * per_token and info["num_virtual_tokens"] == 6
    ours = load_prompt_adapter(load_checkpoint(base / "model").model.eval(), out / "adapter")
    start = (apply_prompt_tuning if flag == "prompt_tuning" else apply_prefix_tuning)(
        load_checkpoint(base / "model").model.eval(), PromptTuningConfig(num_virtual_tokens=6)
        if flag == "prompt_tuning" else PrefixTuningConfig(num_virtual_tokens=6))  # the run's initialisation
    # an untrained 1-layer base leaves a soft prompt little to steer (bench_peft_methods.py measures a real one):
    # the held-out loss must still fall
    assert wrapper_loss(ours, base / "tasks.jsonl") < wrapper_loss(start, base / "tasks.jsonl") - 0.005
    hf_dir = export_hf(base / "model", tmp_path / "hf")
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), out / "adapter").eval()
    with torch.no_grad():
        theirs = reference(input_ids=IDS).logits
    theirs = theirs[:, 6:] if section == "prompt_tuning" else theirs  # peft returns the virtual positions too
    assert (theirs - logits(ours)).abs().max().item() < 1e-4


@pytest.mark.parametrize("extra", [  # ~40 s each on a busy 2-core CPU: one kind by default, all with -m slow
    pytest.param(["--lora", "--quantize", "int8", TARGETS, "lora.r=4"], id="qlora"),
    pytest.param(["--prompt-tuning", "prompt_tuning.num_virtual_tokens=6"], id="prompt", marks=pytest.mark.slow),
    pytest.param(["--prefix-tuning", "prefix_tuning.num_virtual_tokens=6"], id="prefix", marks=pytest.mark.slow)])
def test_sigkill_and_resume_is_bit_identical(base, extra, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = [*SMALL, "train.max_steps=30", "train.ckpt_every=10"]

    def cmd(out, *more):
        return [sys.executable, "-m", "lmstack.cli", "sft", "--model", str(base / "model"), "--data",
                str(base / "tasks.jsonl"), "--out", str(out), *extra, *more, *steps]

    full = subprocess.run(cmd(tmp_path / "full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "killed" / "checkpoints" / "step_0000010" / "model.safetensors").exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_combinations_are_one_line_exit_2_and_write_nothing(base, tmp_path, capsys):
    out = tmp_path / "o"
    sft_cmd = ["sft", "--model", str(base / "model"), "--data", str(base / "tasks.jsonl"), "--out", str(out),
               *SMALL, "train.max_steps=2"]
    encoder_cfg = BertConfig(vocab_size=320, block_size=128, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(tmp_path / "bert", build_model(encoder_cfg), {"model": dataclasses.asdict(encoder_cfg)},
                    tokenizer=load_checkpoint(base / "model").tokenizer)
    encoder_cmd = [*sft_cmd[:2], str(tmp_path / "bert"), *sft_cmd[3:]]
    for command, expected in (([*sft_cmd, "--quantize", "int8"], "pass --lora with it"),
                              ([*sft_cmd, "--lora", "--quantize", "int3"], "lora.quantize='int3': choose one of"),
                              ([*sft_cmd, "--lora", "--prompt-tuning"], "--lora and --prompt-tuning are alternatives"),
                              ([*sft_cmd, "prompt_tuning.num_virtual_tokens=4"], "pass --prompt-tuning"),
                              ([*sft_cmd, "--prefix-tuning", "prefix_tuning.init=random"],
                               "prefix_tuning.init='random': choose one of"),
                              ([*sft_cmd, "--prompt-tuning", "prompt_tuning.init=text"], "needs prompt_tuning.init_text"),
                              ([*sft_cmd, "--prompt-tuning", "sft.packing=true"], "sft.packing=true cannot be used"),
                              ([*sft_cmd, "--prefix-tuning", "prefix_tuning.num_virtual_tokens=100"],
                               "lower train.seq_len to 28"),
                              ([*sft_cmd, "--lora", "--quantize", "int4", "lora.target_modules=query"],
                               "matches no linear layer"),
                              ([*encoder_cmd, "--prompt-tuning"], "is a bert model; sft trains decoders")):
        code = main(command)
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, (command, err)
        assert not out.exists(), command  # nothing written


def test_generate_refuses_a_prompt_adapter_in_one_line(base, tmp_path, capsys):
    out = tmp_path / "run"
    sft(base / "model", [str(base / "tasks.jsonl")], out, prompt_tuning=True,
        overrides=[*SMALL, "prompt_tuning.num_virtual_tokens=4", "train.max_steps=2"], progress=False)
    code = main(["generate", "--model", str(base / "model"), "--adapter", str(out / "adapter"), "--prompt", "hi",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "is a PROMPT_TUNING adapter" in err and err.count("\n") == 1, err
