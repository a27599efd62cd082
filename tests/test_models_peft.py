"""LoRA (lmstack.models.peft) and peft-layout adapters (lmstack.interop.peft_adapters), with the ``peft``
library as the reference: a tiny Llama-style GPT is exported with hf_export, its adapter is saved here and
loaded by peft onto transformers' model (and the reverse), and the logits must agree within 1e-4 in fp32."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import transformers

from lmstack.checkpoint import save_checkpoint
from lmstack.errors import ConfigError, ConversionError
from lmstack.interop.hf_export import export_hf
from lmstack.interop.peft_adapters import load_adapter, save_adapter
from lmstack.models import build_model
from lmstack.models.bert import BertConfig
from lmstack.models.gpt import GPTConfig
from lmstack.models.peft import (LoRAConfig, LoRALinear, apply_lora, load_lora_state_dict, lora_state_dict,
                                 merge_lora, trainable_parameters)
from lmstack.tokenizer import Tokenizer

TOL = 1e-4
TEXT = ["the cat sat on the mat", "hello world, hello moon", "numbers 123 and 4567 too", "a quick brown fox"]


def tiny_gpt(seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = GPTConfig(**{"vocab_size": 320, "block_size": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                       "tie_embeddings": False, **overrides})
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def randomize_adapter(model: torch.nn.Module, seed: int = 1) -> None:
    """Nonzero B too, so the adapter actually changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_leaves_outputs_unchanged_and_freezes_the_base():
    model = tiny_gpt()
    before = logits(model, IDS)
    wrapped = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert wrapped == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q_proj", "attn.v_proj", "mlp.down_proj")]
    assert torch.equal(logits(model, IDS), before)
    trainable, total = trainable_parameters(model)
    expected = sum(4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    assert trainable == expected and total == sum(p.numel() for p in model.parameters())


def test_only_lora_factors_get_gradients_and_training_changes_outputs():
    model = tiny_gpt().train()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    before = logits(model, IDS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _, loss = model(IDS[:, :-1], IDS[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert not torch.allclose(logits(model, IDS), before)


def test_merge_matches_the_unmerged_adapter_and_restores_plain_layers():
    model = tiny_gpt()
    base_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "up_proj", "lm_head"]))
    randomize_adapter(model)
    adapted = logits(model, IDS)
    merged = merge_lora(model)
    assert len(merged) == 7
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    assert (logits(model, IDS) - adapted).abs().max().item() < TOL


def test_rslora_scales_by_alpha_over_sqrt_r():
    x = torch.randn(3, 64)
    for use_rslora, scaling in ((False, 16 / 4), (True, 16 / math.sqrt(4))):
        model = tiny_gpt()
        apply_lora(model, LoRAConfig(r=4, alpha=16, target_modules=["blocks.0.attn.q_proj"], use_rslora=use_rslora))
        layer = model.blocks[0].attn.q_proj
        randomize_adapter(model)
        expected = x @ layer.weight.T + scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_other_families_and_regex_targets():
    model = build_model(BertConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=32, block_size=32))
    wrapped = apply_lora(model, LoRAConfig(r=2, target_modules=r"blocks\.1\..*_proj"))
    assert wrapped and all(name.startswith("blocks.1.") for name in wrapped)


def test_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"matches no linear layer.*q_proj") as info:
        apply_lora(tiny_gpt(), LoRAConfig(target_modules=["query"]))
    assert "\n" not in str(info.value)
    for bad in (LoRAConfig(r=0), LoRAConfig(dropout=1.0), LoRAConfig(target_modules="(")):
        with pytest.raises(ConfigError):
            apply_lora(tiny_gpt(), bad)
    source = tiny_gpt()
    apply_lora(source, LoRAConfig(r=4, target_modules=["q_proj"]))
    other_rank = tiny_gpt()
    apply_lora(other_rank, LoRAConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ConversionError, match="shapes do not fit") as info:
        load_lora_state_dict(other_rank, lora_state_dict(source))
    assert "\n" not in str(info.value)
    other_targets = tiny_gpt()
    apply_lora(other_targets, LoRAConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(ConversionError, match="does not fit this model"):
        load_lora_state_dict(other_targets, lora_state_dict(source))


# ----------------------------------------------------------------------------- peft parity

@pytest.fixture(scope="module")
def exported_base(tmp_path_factory):
    """A tiny lmstack Llama-style model, saved as a checkpoint and exported as a transformers directory."""
    root = tmp_path_factory.mktemp("peft")
    save_checkpoint(root / "ours", tiny_gpt(), {"model": tiny_gpt().config.__dict__},
                    tokenizer=Tokenizer.train(TEXT * 50, vocab_size=320))
    return root, export_hf(root / "ours", root / "hf")


def hf_base(hf_dir) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def peft_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "gate_proj", "down_proj"], ["blocks.1.attn.o_proj"]])
def test_our_adapter_loads_in_peft_with_equal_logits(exported_base, targets, tmp_path):
    _, hf_dir = exported_base
    model = tiny_gpt()
    lora_cfg = LoRAConfig(r=4, alpha=8, target_modules=targets, use_rslora=True)
    apply_lora(model, lora_cfg)
    randomize_adapter(model)
    out = save_adapter(model, lora_cfg, tmp_path / "adapter", base_model_name_or_path=str(hf_dir))
    reference = peft.PeftModel.from_pretrained(hf_base(hf_dir), out).eval()
    assert (peft_logits(reference, IDS) - logits(model, IDS)).abs().max().item() < TOL
    ours_again = tiny_gpt()
    load_adapter(ours_again, out)
    assert torch.equal(logits(ours_again, IDS), logits(model, IDS))


def test_peft_adapter_loads_here_with_equal_logits(exported_base, tmp_path):
    _, hf_dir = exported_base
    torch.manual_seed(3)
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "up_proj", "o_proj"],
                               init_lora_weights=False)  # peft's own nonzero random B
    reference = peft.get_peft_model(hf_base(hf_dir), peft_cfg).eval()
    reference.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = tiny_gpt()
    loaded = load_adapter(model, tmp_path / "adapter")
    assert loaded.r == 4 and loaded.alpha == 12
    assert (peft_logits(reference, IDS) - logits(model, IDS)).abs().max().item() < TOL
    assert (logits(model, IDS) - logits(tiny_gpt(), IDS)).abs().max().item() > 1e-3  # the adapter mattered


def test_adapter_for_another_base_is_refused(exported_base, tmp_path):
    model = tiny_gpt()
    cfg = LoRAConfig(r=4, target_modules=["q_proj"])
    apply_lora(model, cfg)
    out = save_adapter(model, cfg, tmp_path / "adapter")
    with pytest.raises(ConversionError, match="does not have|shapes do not fit"):
        load_adapter(tiny_gpt(n_layer=1), out)
    with pytest.raises(ConversionError, match="shapes do not fit"):
        load_adapter(tiny_gpt(n_embd=128), out)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not an adapter directory"):
        save_adapter(model, cfg, tmp_path / "junk")
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_incomplete_or_unsupported_adapter_configs_are_refused(tmp_path):
    model = tiny_gpt()
    cfg = LoRAConfig(r=4, target_modules=["q_proj"])
    apply_lora(model, cfg)
    out = save_adapter(model, cfg, tmp_path / "adapter")
    config_path = out / "adapter_config.json"
    written = json.loads(config_path.read_text())
    for change, message in (({"use_dora": True}, "use_dora=True is not supported"),
                            ({"r": None}, "'r' .* required"), ({"peft_type": "IA3"}, "supported adapters are LORA")):
        config_path.write_text(json.dumps({**written, **change}))
        with pytest.raises(ConversionError, match=message):
            load_adapter(tiny_gpt(), out)
