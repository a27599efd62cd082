"""Prompt and prefix tuning (lmstack.models.peft) and the ``prefix_embeddings`` hook of the gpt and moe forwards.

The strongest checks are equivalences: a prompt holding the token embeddings of some ids, and a fresh prefix
initialised from some ids, must give the real tokens the same logits as typing those ids first, for both
families."""

from __future__ import annotations

import pytest
import torch

from lmstack.engine.generate import generate
from lmstack.errors import ConfigError, ConversionError
from lmstack.models import build_model
from lmstack.models.bert import BertConfig
from lmstack.models.gpt import GPTConfig
from lmstack.models.moe import MoEConfig
from lmstack.models.peft import (PrefixTuned, PrefixTuningConfig, PromptTuned, PromptTuningConfig,
                                 apply_prefix_tuning, apply_prompt_tuning, load_prefix_tuning_state_dict,
                                 load_prompt_tuning_state_dict, prefix_tuning_state_dict, prompt_tuning_state_dict,
                                 trainable_parameters)
from lmstack.tokenizer import Tokenizer

SHAPE = {"vocab_size": 300, "block_size": 48, "n_layer": 2, "n_head": 4, "n_embd": 32}
IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def tiny(family: str = "gpt", seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = GPTConfig(**SHAPE, **overrides) if family == "gpt" else MoEConfig(**SHAPE, n_expert=4, **overrides)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.mark.parametrize("family, overrides", [("gpt", {}), ("gpt", {"position": "learned"}), ("moe", {})])
def test_a_prefix_of_token_embeddings_acts_like_those_tokens(family, overrides):
    model = tiny(family, **overrides)
    lead = torch.tensor([5, 17, 42])  # (P,)
    with torch.no_grad():
        typed = model(torch.cat([lead.expand(2, -1), IDS], dim=1))[0][:, len(lead):]  # (B, T, V)
        prefixed = model(IDS, prefix_embeddings=model.tok_emb(lead)[None])[0]  # (B, T, V)
    assert prefixed.shape == typed.shape
    torch.testing.assert_close(prefixed, typed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "moe"])
def test_no_prefix_and_an_empty_prefix_give_identical_outputs(family):
    model = tiny(family)
    targets = IDS.roll(-1, dims=1)
    with torch.no_grad():
        plain_logits, plain_loss = model(IDS, targets)
        none_logits, none_loss = model(IDS, targets, prefix_embeddings=None)
        empty_logits, empty_loss = model(IDS, targets, prefix_embeddings=torch.zeros(1, 0, SHAPE["n_embd"]))
    assert torch.equal(none_logits, plain_logits) and torch.equal(none_loss, plain_loss)
    assert torch.equal(empty_logits, plain_logits) and torch.equal(empty_loss, plain_loss)


def test_prefix_embeddings_refuse_a_cache_positions_and_a_wrong_width():
    model = tiny()
    prefix = torch.zeros(1, 2, SHAPE["n_embd"])
    with pytest.raises(ConfigError, match="whole sequence"):
        model(IDS, prefix_embeddings=prefix, positions=torch.arange(10).expand(2, -1))
    with pytest.raises(ConfigError, match="do not fit"):
        model(IDS, prefix_embeddings=torch.zeros(1, 2, 8))


def test_only_the_virtual_tokens_get_gradients():
    model = tiny()
    tuned = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=4))
    assert tuned.prompt.shape == (4, SHAPE["n_embd"])
    assert trainable_parameters(tuned)[0] == 4 * SHAPE["n_embd"]
    _, loss = tuned.train()(IDS, IDS.roll(-1, dims=1))
    loss.backward()
    assert tuned.prompt.grad is not None and tuned.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["gpt", "moe"])
def test_a_few_steps_on_a_fixed_task_lower_the_loss(family):
    # with init_std=0.02 a fresh model attends almost uniformly and a 4-token prefix barely moves its outputs;
    # larger weights make attention selective, as in a trained model, so the prefix can steer it
    tuned = apply_prompt_tuning(tiny(family, init_std=0.3), PromptTuningConfig(num_virtual_tokens=4, init="vocab"))
    # the task: after any token, predict token 7 (the frozen random model knows nothing of it)
    idx = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.full_like(idx, 7)
    optimizer = torch.optim.Adam([tuned.prompt], lr=0.3)
    losses = []
    for _ in range(20):
        _, loss = tuned(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_text_init_copies_the_texts_token_embeddings_repeated_to_size():
    tokenizer = Tokenizer.train(["the cat sat on the mat", "a quick brown fox"] * 30, vocab_size=300)
    model = tiny()
    text_ids = tokenizer.encode("the cat")
    n = 2 * len(text_ids) + 1
    tuned = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=n, init="text", init_text="the cat"),
                                tokenizer)
    expected_ids = (text_ids * 3)[:n]
    assert torch.equal(tuned.prompt.detach(), model.tok_emb.weight.detach()[expected_ids])


def test_random_and_vocab_inits_are_seeded_and_vocab_rows_come_from_the_table():
    model = tiny()
    table = model.tok_emb.weight.detach()
    vocab = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=5, init="vocab", seed=3)).prompt.detach()
    assert all((table == row).all(dim=1).any() for row in vocab)
    first = apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=5, seed=3)).prompt
    second = apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=5, seed=3)).prompt
    assert torch.equal(first, second)


def test_state_dict_round_trip_and_a_size_mismatch_is_one_line():
    source = apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=6))
    with torch.no_grad():
        source.prompt.add_(1.0)
    state = prompt_tuning_state_dict(source)
    target = apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=6, seed=9))
    load_prompt_tuning_state_dict(target, state)
    assert torch.equal(target.prompt, source.prompt)
    with torch.no_grad():
        assert torch.equal(target(IDS)[0], source(IDS)[0])
    smaller = apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ConversionError) as err:
        load_prompt_tuning_state_dict(smaller, state)
    assert "\n" not in str(err.value) and "(6, 32)" in str(err.value)


def test_greedy_generation_goes_through_the_plain_loop_without_a_cache():
    model = tiny()
    tuned = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=3, init="vocab"))
    assert tuned.config.block_size == SHAPE["block_size"] - 3
    prompt_ids = [4, 8, 15]
    out = generate(tuned, prompt_ids, use_kv_cache=False)
    # the same greedy loop written out against the base model and the prefix
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in out:
            logits, _ = model(torch.tensor([ids]), prefix_embeddings=tuned.prompt[None])
            ids.append(int(logits[0, -1].argmax()))
    assert out == ids[len(prompt_ids):]
    assert len(prompt_ids) + len(out) <= tuned.config.block_size
    with pytest.raises(ConfigError, match="use_kv_cache=False"):
        generate(tuned, prompt_ids)


def test_refusals_are_one_line_config_errors():
    bert = build_model(BertConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ConfigError, match="prefix_embeddings"):
        apply_prompt_tuning(bert, PromptTuningConfig(num_virtual_tokens=2))
    tuned = apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=2))
    assert isinstance(tuned, PromptTuned)
    with pytest.raises(ConfigError, match="already wrapped by PromptTuned"):
        apply_prompt_tuning(tuned, PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="no room"):
        apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=48))
    with pytest.raises(ConfigError, match="init_text"):
        apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=2, init="text"))
    with pytest.raises(ConfigError, match="tokenizer"):
        apply_prompt_tuning(tiny(), PromptTuningConfig(num_virtual_tokens=2, init="text", init_text="hi"))


# ---------------------------------------------------------------------------------------------- prefix tuning
@pytest.mark.parametrize("family, overrides", [("gpt", {}), ("gpt", {"position": "learned", "n_kv_head": 2}),
                                               ("moe", {})])
def test_a_fresh_prefix_acts_like_typing_its_init_tokens(family, overrides):
    model = tiny(family, **overrides)
    tuned = apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=3, seed=2))
    lead = torch.randint(0, 300, (3,), generator=torch.Generator().manual_seed(2))  # the ids "vocab" init draws
    with torch.no_grad():
        typed = model(torch.cat([lead.expand(2, -1), IDS], dim=1))[0][:, 3:]  # (B, T, V)
        prefixed = tuned(IDS)[0]
    torch.testing.assert_close(prefixed, typed, rtol=1e-5, atol=1e-5)


def test_prefix_tuning_trains_only_the_prefixes_and_lowers_the_loss():
    model = tiny(init_std=0.3)
    tuned = apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=4))
    cfg = model.config
    assert tuned.prefix_keys.shape == (cfg.n_layer, cfg.kv_heads, 4, cfg.dim_per_head)
    assert trainable_parameters(tuned)[0] == 2 * tuned.prefix_keys.numel()
    idx = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.full_like(idx, 7)
    optimizer = torch.optim.Adam([tuned.prefix_keys, tuned.prefix_values], lr=0.1)
    losses = []
    for _ in range(20):
        _, loss = tuned.train()(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in model.parameters())
    assert losses[-1] < 0.75 * losses[0]


def test_prefix_text_init_state_round_trip_generation_and_refusals():
    tokenizer = Tokenizer.train(["the cat sat on the mat", "a quick brown fox"] * 30, vocab_size=300)
    cfg = PrefixTuningConfig(num_virtual_tokens=4, init="text", init_text="the cat")
    source = apply_prefix_tuning(tiny(), cfg, tokenizer)
    assert isinstance(source, PrefixTuned)
    with torch.no_grad():
        source.prefix_values.mul_(2.0)
    target = apply_prefix_tuning(tiny(), PrefixTuningConfig(num_virtual_tokens=4))
    load_prefix_tuning_state_dict(target, prefix_tuning_state_dict(source))
    with torch.no_grad():
        assert torch.equal(target(IDS)[0], source(IDS)[0])
    out = generate(target, [4, 8, 15], use_kv_cache=False)
    assert 0 < len(out) <= target.config.block_size - 3 and target.config.block_size == SHAPE["block_size"] - 4
    with pytest.raises(ConversionError) as err:
        load_prefix_tuning_state_dict(apply_prefix_tuning(tiny(), PrefixTuningConfig(num_virtual_tokens=2)),
                                      prefix_tuning_state_dict(source))
    assert "\n" not in str(err.value) and "prefix_keys" in str(err.value)
    with pytest.raises(ConfigError, match="use_kv_cache=False"):
        generate(target, [4, 8, 15])
    with pytest.raises(ConfigError, match="positions"):
        target(IDS, positions=torch.arange(10).expand(2, -1))
    with pytest.raises(ConfigError, match="prefix_tuning.init"):
        apply_prefix_tuning(tiny(), PrefixTuningConfig(num_virtual_tokens=2, init="random"))
    with pytest.raises(ConfigError, match="already wrapped"):
        apply_prefix_tuning(target, PrefixTuningConfig(num_virtual_tokens=2))
