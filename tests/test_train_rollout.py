"""Rollouts from the live training model (lmstack/train/rollout.py, Engine.live_weights): mode handed back,
in-place weight updates seen, n samples from one prefill, behaviour log-probs from the unfiltered
distribution, the response mask layout, and the rollout loader's exact state round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rl_helpers import make_rl_base

from lmstack.checkpoint import load_checkpoint
from lmstack.engine import SamplingParams
from lmstack.train.rollout import (
    PolicySampler,
    RolloutLoader,
    pad_sequences,
    render_prompt,
    sequence_logprobs,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_rl_base(tmp_path_factory.mktemp("rl"))


@pytest.fixture
def policy(base):
    loaded = load_checkpoint(base / "model")
    return loaded.model, loaded.tokenizer


def prompts_of(tokenizer, n=3):
    questions = ["What is 12 + 30?", "What is 7 + 5?", "What is 40 + 41?"][:n]
    return [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def test_live_weights_hands_the_model_back_training_and_sees_in_place_updates(policy):
    model, tokenizer = policy
    model.train()
    sampler = PolicySampler(model, tokenizer, max_model_len=64, keep_kv=True)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    prompts = prompts_of(tokenizer)
    first = sampler.generate(prompts, greedy, [0, 0, 0])
    assert model.training  # the engine ran it in eval mode and handed it back in training mode
    favourite, digit = first[0][0][0][0], tokenizer.encode("5")[0]
    with torch.no_grad():  # an update in place: the next rollout must see it without a copy or a reload
        model.lm_head.weight[digit] = 10 * model.lm_head.weight[favourite]
    second = sampler.generate(prompts, greedy, [0, 0, 0])
    fresh = PolicySampler(model, tokenizer, max_model_len=64, keep_kv=False).generate(prompts, greedy, [0, 0, 0])
    assert second == fresh and second != first and second[0][0][0][0] == digit
    assert sampler._engine is not None and sampler._engine.cache.retained  # kept, and forgotten on the next entry
    with sampler._engine.live_weights():
        assert not sampler._engine.cache.retained and not model.training
    assert model.training


def test_keep_kv_false_builds_and_drops_the_engine_per_rollout(policy):
    model, tokenizer = policy
    sampler = PolicySampler(model, tokenizer, max_model_len=64, keep_kv=False)
    sampler.generate(prompts_of(tokenizer, 1), SamplingParams(max_tokens=3), [1])
    assert sampler._engine is None


def test_n_samples_share_one_prefill_and_rows_of_a_prompt_are_adjacent(policy):
    model, tokenizer = policy
    sampler = PolicySampler(model, tokenizer, max_model_len=64, keep_kv=True)
    prompts = prompts_of(tokenizer)
    rollout = sampler.rollout(prompts, SamplingParams(n=4, max_tokens=6, temperature=1.0), [1, 2, 3],
                              tokenizer.pad_id)
    assert rollout.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # each prompt was prefilled once for its four samples
    assert sampler._engine._counters["prompt_tokens"] == sum(len(p) for p in prompts)
    # the seeds make a rollout reproducible
    again = sampler.rollout(prompts, SamplingParams(n=4, max_tokens=6, temperature=1.0), [1, 2, 3], tokenizer.pad_id)
    assert torch.equal(rollout.input_ids, again.input_ids)
    assert len({tuple(row.tolist()) for row in rollout.input_ids[:4]}) > 1  # the samples differ


def test_behaviour_logprobs_come_from_the_unfiltered_tempered_distribution(policy):
    model, tokenizer = policy
    # an untrained model spreads its mass over the vocabulary: top-3 keeps a small share of it
    sampler = PolicySampler(model, tokenizer, max_model_len=64)
    temperature = 0.7
    rollout = sampler.rollout(prompts_of(tokenizer), SamplingParams(n=2, max_tokens=6, temperature=temperature, top_k=3),
                              [5, 6, 7], tokenizer.pad_id)
    with torch.no_grad():
        logits = model.eval()(rollout.input_ids)[0][:, :-1] / temperature  # (N, T-1, V)
    full = F.log_softmax(logits, -1).gather(-1, rollout.input_ids[:, 1:, None]).squeeze(-1)
    top = logits.topk(3, dim=-1)
    filtered = (F.log_softmax(top.values, -1) * (top.indices == rollout.input_ids[:, 1:, None])).sum(-1)
    mask = rollout.response_mask.bool()
    assert torch.allclose(rollout.old_logprobs[mask], full[mask], atol=1e-5)
    assert (filtered[mask] - full[mask]).max() > 0.01  # the renormalised top-k log-probs would have differed
    assert (rollout.old_logprobs[~mask] == 0).all()


def test_behaviour_logprobs_line_up_with_what_the_engine_sampled_and_score_the_end_token(policy):
    """At temperature 1 the engine's own log-prob of each sampled token (raw logits) is the behaviour log-prob
    of the same column: a one-position shift, or an end token left out of the mask, breaks this."""
    model, tokenizer = policy
    sampler = PolicySampler(model, tokenizer, max_model_len=64)
    prompts = prompts_of(tokenizer)
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, logprobs=0)
    seeds = [21, 22, 23]
    engine_samples = [o for request in sampler._get_engine().generate(
        prompts, [SamplingParams(n=3, max_tokens=8, temperature=1.0, logprobs=0, seed=s) for s in seeds])
        for o in request.outputs]
    rollout = sampler.rollout(prompts, params, seeds, tokenizer.pad_id)
    stops = set(tokenizer.stop_token_ids or []) | {tokenizer.eot_id}
    ended = 0
    for row, sample in enumerate(engine_samples):
        columns = rollout.response_mask[row].nonzero().squeeze(1)
        assert rollout.input_ids[row, columns + 1].tolist() == sample.token_ids
        assert torch.allclose(rollout.old_logprobs[row, columns],
                              torch.tensor([lp["logprob"] for lp in sample.logprobs]), atol=1e-4)
        if sample.finish_reason == "stop":
            ended += 1
            assert sample.token_ids[-1] in stops  # the end token is an action the loss trains on
    assert ended > 0 or all(s.finish_reason == "length" for s in engine_samples)


def test_sampling_and_behaviour_logprobs_use_the_same_temperature(policy):
    """E_{x ~ sampler}[log p_T(x)] = -H(p_T) only when the sampler draws from p_T, the distribution the
    behaviour log-probs score: a sampler at another temperature shifts the mean by many standard errors."""
    model, tokenizer = policy
    with torch.no_grad():
        model.norm_f.weight.mul_(4)  # an untrained model is near uniform, where temperature barely matters
    sampler = PolicySampler(model, tokenizer, max_model_len=64, max_num_seqs=256)
    temperature = 0.6
    rollout = sampler.rollout(prompts_of(tokenizer, 1) * 3, SamplingParams(n=200, max_tokens=1, temperature=temperature),
                              [3, 4, 5], tokenizer.pad_id)  # one prompt, 600 samples
    column = int(rollout.response_mask[0].nonzero()[0])
    first = rollout.old_logprobs[:, column]  # (600,) log p_T of each sample's first token
    _, entropy = sequence_logprobs(model, rollout.input_ids[:1], temperature)
    standard_error = float(first.std()) / len(first) ** 0.5
    assert abs(float(first.mean()) + float(entropy[0, column])) < 4 * standard_error
    at_one, _ = sequence_logprobs(model, rollout.input_ids, 1.0)  # the same samples scored at the wrong temperature
    _, entropy_at_one = sequence_logprobs(model, rollout.input_ids[:1], 1.0)
    gap = abs(float(at_one[:, column].mean()) + float(entropy_at_one[0, column]))
    assert gap > 4 * float(at_one[:, column].std()) / len(first) ** 0.5  # the check has the power to see it

def test_pad_sequences_marks_the_response_in_action_space():
    input_ids, mask = pad_sequences([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    # column t predicts token t+1: the first row's response tokens sit at 3 and 4, predicted from columns 2, 3
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


class CountingCollector:
    """Rollouts of 6 rows whose values name the rollout; its state counts the collects."""

    def __init__(self):
        self.collected = 0

    def collect(self, index):
        self.collected += 1
        return {"x": torch.arange(6, dtype=torch.float32) + 100 * index + torch.rand(6, generator=torch.Generator().manual_seed(index)), "stat_index": torch.tensor(index)}

    def state_dict(self):
        return {"collected": self.collected}

    def load_state_dict(self, state):
        self.collected = state["collected"]


def test_rollout_loader_hands_out_epochs_of_minibatches_and_resumes_exactly():
    loader = RolloutLoader(CountingCollector(), minibatches=3, epochs=2, seed=4)
    stream = iter(loader)
    batches = [next(stream) for _ in range(5)]
    assert [int(b["stat_index"]) for b in batches] == [0] * 5
    first_epoch = torch.cat([b["x"] for b in batches[:3]])
    assert sorted(first_epoch.tolist()) == sorted(loader.buffer["x"].tolist())  # each epoch covers every row once
    state = loader.state_dict()
    resumed = RolloutLoader(CountingCollector(), minibatches=3, epochs=2, seed=4)
    resumed.load_state_dict(state)
    expected = [next(stream) for _ in range(4)]
    got = [b for _, b in zip(range(4), resumed)]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(expected, got))
    assert [int(b["stat_index"]) for b in got] == [0, 1, 1, 1]
    assert resumed.collector.collected == loader.collector.collected == 2
