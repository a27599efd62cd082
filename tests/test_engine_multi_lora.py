"""Batched LoRA (lmstack/engine/multi_lora.py): a mixed batch over several adapters equals each adapter merged.

For every adapter, the rows that use it in one batch shared with the base and the other adapters give the
greedy tokens, the logprobs and the full logits of the base model with that adapter merged
(lmstack.models.peft.merge_lora) run alone; base rows give the base model's. Ranks and target modules
differ between the adapters (padding to the largest rank must add nothing). The padded static-shape decode
that CUDA graphs replay is checked the same way, and prefix reuse never crosses adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine_helpers import tiny_model
from lmstack.engine.engine import Engine
from lmstack.engine.multi_lora import GROUPED_MAX_ADAPTERS, LoRAWeights, MultiLoRA
from lmstack.engine.sampling import SamplingParams
from lmstack.errors import UserError
from lmstack.models.peft import LoRAConfig, apply_lora, load_lora_state_dict, merge_lora

pytestmark = pytest.mark.usefixtures("one_thread")

# (name, rank, alpha, targets): different ranks and different modules, so padding and empty slots are exercised
ADAPTERS = [("terse", 4, 8.0, ["q_proj", "v_proj"]),
            ("chatty", 8, 16.0, ["k_proj", "o_proj", "up_proj", "down_proj"]),
            ("odd", 2, 2.0, ["blocks.1.attn.q_proj", "blocks.0.mlp.down_proj"])]
PROMPTS = [[5, 17, 3, 9, 40], [1, 2, 3], [60, 61, 62, 63, 64, 65, 66, 67], [7]]


def random_adapter(model: torch.nn.Module, name: str, rank: int, alpha: float, targets: list[str],
                   seed: int) -> tuple[LoRAWeights, LoRAConfig, dict[str, torch.Tensor]]:
    """Random factors big enough to change the model's greedy output (a fresh adapter's B is zero)."""
    cfg = LoRAConfig(r=rank, alpha=alpha, target_modules=targets)
    g = torch.Generator().manual_seed(seed)
    probe = copy.deepcopy(model)
    wrapped = apply_lora(probe, cfg)
    factors, state = {}, {}
    for module in wrapped:
        layer = probe.get_submodule(module)
        A = torch.randn(rank, layer.in_features, generator=g) * 0.3
        B = torch.randn(layer.out_features, rank, generator=g) * 0.3
        factors[module] = (A, B)
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A, B
    return LoRAWeights(name, factors, cfg.scaling), cfg, state


def merged_model(model: torch.nn.Module, cfg: LoRAConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    merged = copy.deepcopy(model)
    apply_lora(merged, cfg)
    load_lora_state_dict(merged, state)
    merge_lora(merged)
    return merged.eval()


@pytest.fixture(scope="module")
def setup():
    base = tiny_model(seed=3, tie_embeddings=False)
    adapters, references = [], {None: base}
    for i, (name, rank, alpha, targets) in enumerate(ADAPTERS):
        weights, cfg, state = random_adapter(base, name, rank, alpha, targets, seed=10 + i)
        adapters.append(weights)
        references[name] = merged_model(base, cfg, state)
    return base, adapters, references


def run_alone(model: torch.nn.Module, params: list[SamplingParams]) -> list:
    engine = Engine(copy.deepcopy(model), max_num_seqs=8, max_model_len=64)
    return engine.generate(PROMPTS[:len(params)], params)


def greedy(adapter=None, seed=None, temperature=0.0) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=temperature, seed=seed, logprobs=3, ignore_eos=True,
                          adapter=adapter)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "padded-static-decode"])
def test_mixed_batch_equals_each_adapter_merged_alone(setup, cuda_graphs):
    base, adapters, references = setup
    engine = Engine(copy.deepcopy(base), max_num_seqs=8, max_model_len=64, adapters=adapters,
                    cuda_graphs=cuda_graphs)
    names = [None, *[a.name for a in adapters]]
    # every prompt under every model, all in one batch: rows of four models decode side by side
    jobs = [(name, p) for p in range(len(PROMPTS)) for name in names]
    outs = engine.generate([PROMPTS[p] for _, p in jobs], [greedy(name) for name, _ in jobs])
    texts = {}
    for name in names:
        alone = run_alone(references[name], [greedy() for _ in PROMPTS])
        for (job_name, p), out in zip(jobs, outs):
            if job_name != name:
                continue
            got, want = out.outputs[0], alone[p].outputs[0]
            assert got.token_ids == want.token_ids, f"adapter {name}, prompt {p}"
            got_lp = torch.tensor([e["logprob"] for e in got.logprobs])
            want_lp = torch.tensor([e["logprob"] for e in want.logprobs])
            torch.testing.assert_close(got_lp, want_lp, atol=1e-4, rtol=0)
            texts[(name, p)] = tuple(got.token_ids)
    # the test has power: every adapter changes the greedy output of at least one prompt
    for name in names[1:]:
        assert any(texts[(name, p)] != texts[(None, p)] for p in range(len(PROMPTS))), name


def test_logits_of_a_mixed_forward_equal_the_merged_models(setup):
    base, adapters, references = setup
    model = copy.deepcopy(base)
    lora = MultiLoRA(model, adapters)
    idx = torch.randint(0, 101, (4, 9), generator=torch.Generator().manual_seed(0))
    lora.set_rows([0, 1, 2, 3], torch.device("cpu"))
    with torch.no_grad():
        mixed, _ = model(idx)  # (4, 9, V)
        for row, name in enumerate([None, *[a.name for a in adapters]]):
            alone, _ = references[name](idx[row:row + 1])
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)
        lora.use_rows(torch.tensor([3, 2, 1, 0]))  # the gathered form (CUDA graphs) gives the same logits
        gathered, _ = model(idx.flip(0))
        torch.testing.assert_close(gathered.flip(0), mixed, atol=1e-5, rtol=1e-5)
        lora.set_rows([0, 0, 0, 0], torch.device("cpu"))  # base rows only: the LoRA path is skipped
        assert lora.groups is None and lora.rows is None
        torch.testing.assert_close(model(idx)[0], base(idx)[0], atol=0, rtol=0)
        lora.set_rows([2, 2, 2, 2], torch.device("cpu"))  # one adapter for the whole batch: no index ops
        torch.testing.assert_close(model(idx)[0], references["chatty"](idx)[0], atol=1e-5, rtol=1e-5)
    # the wrapped layers' stacks are padded to the largest rank, one zero slot for the base
    layer = model.get_submodule("blocks.0.attn.q_proj")
    assert layer.lora_A.shape == (4, 8, 64) and layer.lora_B.shape == (4, 64, 8)
    assert not layer.lora_A[0].any() and not layer.lora_A[2].any()  # base slot; "chatty" does not target q_proj


def test_seeded_sampling_with_an_adapter_is_unchanged_by_its_batch(setup):
    base, adapters, references = setup
    engine = Engine(copy.deepcopy(base), max_num_seqs=8, max_model_len=64, adapters=adapters)
    params = [greedy("chatty", seed=7, temperature=1.0), greedy("terse"), greedy(None, seed=1, temperature=1.0)]
    mixed = engine.generate(PROMPTS[:3], params)
    alone = run_alone(references["chatty"], [greedy(seed=7, temperature=1.0)])
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_prefix_reuse_never_crosses_adapters(setup):
    base, adapters, references = setup
    engine = Engine(copy.deepcopy(base), max_num_seqs=2, max_model_len=64, adapters=adapters)
    prompt = list(range(10, 40))
    [first] = engine.generate([prompt], greedy("terse"))
    assert engine.stats()["prefix_reused_tokens"] == 0
    [again] = engine.generate([prompt], greedy("terse"))  # same adapter, same prompt: its keys are reused
    reused = len(prompt) - 1
    assert engine.stats()["prefix_reused_tokens"] == reused
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    [as_base] = engine.generate([prompt], greedy(None))  # the free slot holds "terse"'s keys: not for the base
    assert engine.stats()["prefix_reused_tokens"] == reused
    [as_base_again] = engine.generate([prompt], greedy(None))  # the base's own keys are
    assert engine.stats()["prefix_reused_tokens"] == 2 * reused
    [as_other] = engine.generate([prompt], greedy("chatty"))
    assert engine.stats()["prefix_reused_tokens"] == 2 * reused
    [ref_base] = Engine(copy.deepcopy(base), max_model_len=64).generate([prompt], greedy())
    [ref_other] = Engine(copy.deepcopy(references["chatty"]), max_model_len=64).generate([prompt], greedy())
    assert as_base.outputs[0].token_ids == as_base_again.outputs[0].token_ids == ref_base.outputs[0].token_ids
    assert as_other.outputs[0].token_ids == ref_other.outputs[0].token_ids


def test_bad_adapters_and_requests_are_one_line(setup):
    base, adapters, _ = setup
    other_base = tiny_model(seed=3, n_embd=32, tie_embeddings=False)
    with pytest.raises(UserError, match=r"does not fit this base model: blocks\.0\.attn\.q_proj"):
        Engine(other_base, max_model_len=64, adapters=adapters)
    missing = LoRAWeights("ghost", {"blocks.9.attn.q_proj": adapters[0].factors["blocks.0.attn.q_proj"]}, 1.0)
    with pytest.raises(UserError, match="not a linear layer of this model"):
        Engine(copy.deepcopy(base), max_model_len=64, adapters=[missing])
    with pytest.raises(UserError, match="distinct"):
        Engine(copy.deepcopy(base), max_model_len=64, adapters=[adapters[0], adapters[0]])
    engine = Engine(copy.deepcopy(base), max_model_len=64, adapters=adapters)
    with pytest.raises(UserError, match="unknown adapter 'nope'; this engine serves terse, chatty, odd"):
        engine.add_request([1, 2], greedy("nope"))
    with pytest.raises(UserError, match="out of range"):
        engine.add_request([1, 2], greedy(4))
    with pytest.raises(UserError, match="serves no adapters"):
        Engine(copy.deepcopy(base), max_model_len=64).add_request([1, 2], greedy("terse"))
    with pytest.raises(UserError, match="adapter=-1"):
        greedy(-1).validate()
    assert engine.generate([[1, 2]], greedy(2))[0].outputs[0].token_ids == \
        engine.generate([[1, 2]], greedy("chatty"))[0].outputs[0].token_ids


def test_many_adapters_in_one_eager_batch_take_the_gathered_form_and_agree(setup):
    base, _, _ = setup
    specs = [(f"a{i}", 2 + i % 3, 4.0, ["q_proj", "down_proj"]) for i in range(GROUPED_MAX_ADAPTERS + 2)]
    made = [random_adapter(base, *spec, seed=50 + i) for i, spec in enumerate(specs)]
    model = copy.deepcopy(base)
    lora = MultiLoRA(model, [weights for weights, _, _ in made])
    idx = torch.randint(0, 101, (len(made), 7), generator=torch.Generator().manual_seed(1))
    lora.set_rows(list(range(1, len(made) + 1)), torch.device("cpu"))
    assert lora.rows is not None and lora.groups is None
    with torch.no_grad():
        mixed, _ = model(idx)
        for row, (_, cfg, state) in enumerate(made):
            alone, _ = merged_model(base, cfg, state)(idx[row:row + 1])
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)
