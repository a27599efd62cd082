"""The SFT objective's fast path (lmstack.train.losses.causal_lm_at_labels: the output head and the
cross-entropy only at positions with a label) pinned to the plain full-logits path (causal_lm): the same loss
and the same gradients within 1e-5 in fp32, on padded and packed batches, for full fine-tuning, LoRA (also
on the head itself) and prompt tuning; and it really forms logits only at the trained positions."""

import pytest
import torch

from lmstack.checkpoint import load_checkpoint
from lmstack.data.instruct import InstructLoader, load_instruct
from lmstack.models.peft import LoRAConfig, PromptTuningConfig, apply_lora, apply_prompt_tuning
from lmstack.train.losses import causal_lm, causal_lm_at_labels, output_head
from sft_helpers import make_sft_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_sft_base(tmp_path_factory.mktemp("sft-head"), conversations=120)


def batches(base, packed: bool) -> list[dict[str, torch.Tensor]]:
    tok = load_checkpoint(base / "model").tokenizer
    data = load_instruct([base / "tasks.jsonl"], tok, 65, val_fraction=0.05, seed=0)
    loader = iter(InstructLoader(data.train, 3, seed=4, pad_id=tok.pad_id, pack_len=64 if packed else None))
    return [next(loader) for _ in range(2)]


def fresh_model(base, method: str) -> torch.nn.Module:
    ckpt = load_checkpoint(base / "model")
    model = ckpt.model.float()
    torch.manual_seed(3)
    if method == "lora":
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]))
        for module in model.modules():  # B starts at zero; give it values so the factors shape the output
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B.weight, std=0.05)
    elif method == "prompt":
        model = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=3, init="random"), ckpt.tokenizer)
    model.train()
    return model


def loss_and_grads(model: torch.nn.Module, objective, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    loss, metrics = objective(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, metrics["tokens"]


# prompt tuning takes no packed batches (its virtual tokens go before one conversation per row)
@pytest.mark.parametrize("method, packed", [("full", False), ("full", True), ("lora", False), ("lora", True),
                                            ("prompt", False)])
def test_head_at_labels_matches_the_full_logits_loss_and_gradients(base, method, packed):
    model = fresh_model(base, method)
    for batch in batches(base, packed):
        assert (batch["labels"] == -1).any()  # prompts and padding: positions the fast path skips
        plain_loss, plain_grads, plain_tokens = loss_and_grads(model, causal_lm, batch)
        fast_loss, fast_grads, fast_tokens = loss_and_grads(model, causal_lm_at_labels, batch)
        assert fast_tokens == plain_tokens == int((batch["labels"] != -1).sum())
        torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
        assert plain_grads.keys() == fast_grads.keys() and plain_grads
        for name, grad in plain_grads.items():
            torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_the_head_runs_only_on_the_labelled_rows(base):
    model = fresh_model(base, "lora")
    head = output_head(model)
    assert head is model.lm_head  # the LoRA-wrapped head, reached through the model
    rows_seen = []
    hook = head.register_forward_hook(lambda module, args, out: rows_seen.append(tuple(args[0].shape)))
    batch = batches(base, packed=True)[0]
    causal_lm_at_labels(model, batch)
    hook.remove()
    assert rows_seen == [(int((batch["labels"] != -1).sum()), model.config.n_embd)]
    assert rows_seen[0][0] < batch["labels"].numel()  # fewer rows than the full path's B * T
