"""Prompt- and prefix-tuning adapters in peft's layout (lmstack.interop.peft_adapters), with the ``peft``
library as the reference: a tiny Llama-style GPT (grouped-query attention) is exported with hf_export, a
trained-looking wrapper is saved here, peft loads it onto transformers' model, and the logits of the real
tokens must agree within 1e-4 in fp32; the reverse direction (peft saves, we load) too; an adapter made for
another base is one ConversionError line."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmstack.checkpoint import save_checkpoint
from lmstack.errors import ConversionError
from lmstack.interop.hf_export import export_hf
from lmstack.interop.peft_adapters import adapter_type, load_prompt_adapter, save_prompt_adapter
from lmstack.models import build_model
from lmstack.models.gpt import GPTConfig
from lmstack.models.peft import (PrefixTuningConfig, PromptTuningConfig, apply_prefix_tuning,
                                 apply_prompt_tuning)
from lmstack.tokenizer import Tokenizer

TOL = 1e-4
TEXT = ["the cat sat on the mat", "hello world, hello moon", "numbers 123 and 4567 too", "a quick brown fox"]
IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
N = 5


def tiny_gpt(**overrides) -> torch.nn.Module:
    cfg = GPTConfig(**{"vocab_size": 320, "block_size": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                       "tie_embeddings": False, **overrides})
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-prompt")
    save_checkpoint(root / "ours", tiny_gpt(), {"model": tiny_gpt().config.__dict__},
                    tokenizer=Tokenizer.train(TEXT * 50, vocab_size=320))
    return export_hf(root / "ours", root / "hf")


def hf_peft(hf_dir, adapter) -> torch.nn.Module:
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def perturbed(tuned: torch.nn.Module) -> torch.nn.Module:
    """Move every trainable vector off its initialisation, as training would."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return tuned


def ours(tuned: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return tuned(IDS)[0]  # (B, T, V): the real tokens only


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_our_adapter_loads_in_peft_with_equal_logits(exported, kind, tmp_path):
    if kind == "prompt":
        tuned = perturbed(apply_prompt_tuning(tiny_gpt(), PromptTuningConfig(num_virtual_tokens=N, init="vocab")))
    else:
        tuned = perturbed(apply_prefix_tuning(tiny_gpt(), PrefixTuningConfig(num_virtual_tokens=N)))
    out = save_prompt_adapter(tuned, tmp_path / "adapter", init="vocab", base_model_name_or_path=str(exported))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == adapter_type(out) == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[kind]
    assert config["num_virtual_tokens"] == N and config["num_layers"] == 2
    shape = (N, 64) if kind == "prompt" else (N, 2 * 2 * 2 * 16)  # prefix: layers x (k, v) x kv heads x head dim
    assert tuple(load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"].shape) == shape
    reference = hf_peft(exported, out)
    with torch.no_grad():
        theirs = reference(input_ids=IDS).logits
    theirs = theirs[:, N:] if kind == "prompt" else theirs  # peft's prompt tuning returns the virtual positions too
    assert (theirs - ours(tuned)).abs().max().item() < TOL
    assert (ours(tuned) - ours(tiny_gpt())).abs().max().item() > 1e-2  # the adapter mattered
    again = load_prompt_adapter(tiny_gpt(), out)
    assert type(again) is type(tuned) and torch.equal(ours(again), ours(tuned))


def test_peft_prompt_and_prefix_adapters_load_here_with_equal_logits(exported, tmp_path):
    for name, peft_cfg in (("prompt", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
                           ("prefix", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))):
        torch.manual_seed(3)
        base = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        reference = peft.get_peft_model(base, peft_cfg).eval()
        reference.save_pretrained(tmp_path / name)
        with torch.no_grad():
            theirs = reference(input_ids=IDS).logits
        theirs = theirs[:, N:] if name == "prompt" else theirs
        assert (theirs - ours(load_prompt_adapter(tiny_gpt(), tmp_path / name))).abs().max().item() < TOL, name


def test_an_adapter_for_another_base_or_kind_is_one_line(exported, tmp_path):
    tuned = apply_prompt_tuning(tiny_gpt(), PromptTuningConfig(num_virtual_tokens=N))
    prompt_dir = save_prompt_adapter(tuned, tmp_path / "prompt")
    prefix_dir = save_prompt_adapter(apply_prefix_tuning(tiny_gpt(), PrefixTuningConfig(num_virtual_tokens=N)),
                                     tmp_path / "prefix")
    for model, adapter, message in ((tiny_gpt(n_embd=32), prompt_dir, "another base"),
                                    (tiny_gpt(n_layer=3), prompt_dir, "made for a model with 2 layers"),
                                    (tiny_gpt(n_kv_head=4), prefix_dir, "another base")):
        with pytest.raises(ConversionError, match=message) as info:
            load_prompt_adapter(model, adapter)
        assert "\n" not in str(info.value)
    config = json.loads((prefix_dir / "adapter_config.json").read_text())
    (prefix_dir / "adapter_config.json").write_text(json.dumps({**config, "prefix_projection": True}))
    with pytest.raises(ConversionError, match="prefix_projection=True is not supported"):
        load_prompt_adapter(tiny_gpt(), prefix_dir)
    (prefix_dir / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ConversionError, match="peft_type 'IA3' is not supported"):
        load_prompt_adapter(tiny_gpt(), prefix_dir)
