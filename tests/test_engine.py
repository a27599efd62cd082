"""Engine tests on tiny random models (CPU, seconds): greedy parity with the plain argmax loop at
batch 1, in mixed batches and under random arrivals; seeded sampling independent of the batch;
n > 1; logprobs and prompt logprobs against log_softmax of the plain forward; abort freeing memory;
chunked prefill; prefix reuse; request validation."""

from __future__ import annotations

import random

import pytest
import torch

from lmstack.engine import Engine, SamplingParams
from lmstack.engine.generate import generate

from engine_helpers import argmax_loop, tiny_model as _tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    return _tiny(seed, **{"n_kv_head": 2, **overrides})


GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_greedy_batch_one_matches_argmax_loop(model):
    engine = Engine(model, max_num_seqs=1)
    for prompt in ([3], [5, 6, 7, 8], list(range(1, 30))):
        [out] = engine.generate([prompt], GREEDY)
        assert out.outputs[0].token_ids == argmax_loop(model, prompt, 12)
        assert out.outputs[0].finish_reason == "length" and out.finished


@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal", "none"])
def test_greedy_mixed_batch_matches_solo_runs(position):
    model = tiny_model(position=position, norm="layernorm", activation="gelu", bias=True)
    rng = random.Random(0)
    prompts = [[rng.randrange(101) for _ in range(rng.randint(1, 40))] for _ in range(7)]
    # fewer slots than prompts and a small token budget: queueing, chunked prefill and slot reuse all happen
    engine = Engine(model, max_num_seqs=3, max_num_batched_tokens=16)
    outs = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == argmax_loop(model, prompt, 12)


@pytest.mark.parametrize("static_decode", [False, True])
def test_random_arrivals_stress_matches_solo_runs(model, static_decode):
    """static_decode runs the CUDA-graph decode path (padded batch and KV buckets) without capture."""
    rng = random.Random(1)
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=24, cuda_graphs=static_decode)
    assert (engine.graphs is not None) == static_decode
    header = [rng.randrange(101) for _ in range(30)]  # half the prompts share part of it: prefix reuse happens
    jobs = [((header[:rng.randint(5, 30)] if rng.random() < 0.5 else [])
             + [rng.randrange(101) for _ in range(rng.randint(1, 30))], rng.randint(1, 20)) for _ in range(16)]
    pending, submitted, done = list(enumerate(jobs)), {}, {}
    while pending or engine.has_unfinished():
        # requests arrive between steps at random moments
        while pending and rng.random() < 0.4:
            i, (prompt, n) = pending.pop(0)
            submitted[engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0))] = i
        for out in engine.step():
            if out.finished:
                done[submitted[out.request_id]] = out.outputs[0].token_ids
        assert engine.stats()["running"] <= 4
    assert len(done) == len(jobs)
    for i, (prompt, n) in enumerate(jobs):
        assert done[i] == argmax_loop(model, prompt, n), f"request {i} differs from its solo run"
    stats = engine.stats()
    assert stats["kv_tokens_used"] == 0 and stats["kv_slots_free"] == stats["kv_slots_total"]
    assert stats["prefix_reused_tokens"] > 0


def test_seeded_sampling_is_independent_of_batch(model):
    params = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    [solo] = Engine(model, max_num_seqs=4).generate([[1, 2, 3]], params)
    others = [[9] * 7, [4, 4, 4, 4], [50, 60]]
    crowd = Engine(model, max_num_seqs=4).generate(
        others + [[1, 2, 3]], [SamplingParams(max_tokens=20, temperature=1.3)] * 3 + [params])[-1]
    assert solo.outputs[0].token_ids == crowd.outputs[0].token_ids
    # the plain loop with the same seed draws the same tokens too
    assert generate(model, [1, 2, 3], params) == solo.outputs[0].token_ids
    [other_seed] = Engine(model).generate([[1, 2, 3]], SamplingParams(max_tokens=15, temperature=1.0, seed=99))
    assert other_seed.outputs[0].token_ids != solo.outputs[0].token_ids


def test_n_samples_share_one_prefill(model):
    engine = Engine(model, max_num_seqs=4)
    prompt = list(range(10, 40))
    [out] = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=5))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert engine.stats()["prompt_tokens"] == len(prompt)  # one prefill for three samples
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) > 1
    # sample i is the request with seed + i and n = 1
    for i, tokens in enumerate(samples):
        [single] = Engine(model).generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=5 + i))
        assert single.outputs[0].token_ids == tokens


def test_logprobs_equal_log_softmax_of_plain_forward(model):
    engine = Engine(model)
    prompt = [7, 3, 9, 1, 4]
    [out] = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, prompt_logprobs=2))
    tokens = out.outputs[0].token_ids
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + tokens]))
    logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
    # prompt: first entry None, entry t scores prompt[t] from position t-1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        entry = out.prompt_logprobs[t]
        assert entry["token_id"] == prompt[t]
        assert entry["logprob"] == pytest.approx(float(logp[t - 1, prompt[t]]), abs=1e-4)
        assert [e["token_id"] for e in entry["top"]] == logp[t - 1].topk(2).indices.tolist()
    for j, entry in enumerate(out.outputs[0].logprobs):
        row = logp[len(prompt) - 1 + j]
        assert entry["token_id"] == tokens[j]
        assert entry["logprob"] == pytest.approx(float(row[tokens[j]]), abs=1e-4)
        assert entry["rank"] == 1  # greedy picks the top token
        assert len(entry["top"]) == 3
        assert entry["top"][0]["logprob"] == pytest.approx(float(row.max()), abs=1e-4)


def test_generate_with_progress_bar(model, capsys):
    outs = Engine(model).generate([[1, 2], [3]], GREEDY, progress=True)
    assert [o.outputs[0].token_ids for o in outs] == [argmax_loop(model, [1, 2], 12), argmax_loop(model, [3], 12)]


def test_scoring_with_max_tokens_zero_and_chunked_prefill(model):
    prompt = list(range(1, 60))
    engine = Engine(model, max_num_batched_tokens=16)  # the prompt is scored over four chunks
    [out] = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt]))[0][0], dim=-1)
    expected = sum(float(logp[t - 1, prompt[t]]) for t in range(1, len(prompt)))
    assert sum(e["logprob"] for e in out.prompt_logprobs[1:]) == pytest.approx(expected, abs=1e-3)


def test_abort_frees_kv_memory_at_once(model):
    engine = Engine(model, max_num_seqs=2)
    a = engine.add_request(list(range(30)), SamplingParams(max_tokens=50, temperature=0.0))
    b = engine.add_request([1, 2], SamplingParams(max_tokens=50, temperature=0.0, n=1))
    c = engine.add_request([3, 4], SamplingParams(max_tokens=3, temperature=0.0))
    for _ in range(3):
        engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1
    used = engine.stats()["kv_tokens_used"]
    engine.abort(a)
    stats = engine.stats()
    assert stats["kv_tokens_used"] < used - 30 and stats["kv_slots_free"] == 1
    outs = {o.request_id: o for o in engine.step()}
    assert outs[a].finished and outs[a].outputs[0].finish_reason == "abort"
    assert c in outs  # the waiting request took the freed slot in the very same step
    engine.abort(b)
    while engine.has_unfinished():
        engine.step()
    assert engine.stats()["kv_tokens_used"] == 0 and engine.stats()["kv_slots_free"] == 2


def test_stop_token_ids_and_context_limit(model):
    prompt = [5, 6, 7]
    reference = argmax_loop(model, prompt, 12)
    stop = reference[4]
    [out] = Engine(model).generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop]))
    first = reference.index(stop)
    assert out.outputs[0].token_ids == reference[:first + 1] and out.outputs[0].finish_reason == "stop"
    engine = Engine(model, max_model_len=20)
    [out] = engine.generate([list(range(15))], SamplingParams(max_tokens=100, temperature=0.0))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_prefix_reuse_skips_shared_prompt_and_keeps_output(model):
    engine = Engine(model, max_num_seqs=2)
    header = list(range(40, 80))
    first = engine.generate([header + [1, 2]], GREEDY)[0]
    before = engine.stats()["prompt_tokens"]
    second = engine.generate([header + [3]], GREEDY)[0]
    assert engine.stats()["prompt_tokens"] - before == 1  # only the new token was computed
    assert engine.stats()["prefix_reused_tokens"] == len(header)
    assert second.outputs[0].token_ids == argmax_loop(model, header + [3], 12)
    assert first.outputs[0].token_ids == argmax_loop(model, header + [1, 2], 12)


def test_prefix_of_a_running_sequence_is_copied(model):
    engine = Engine(model, max_num_seqs=3)
    header = list(range(20, 70))
    first = engine.add_request(header + [1], SamplingParams(max_tokens=20, temperature=0.0))
    engine.step()  # the first request's prompt is now cached and it is decoding
    before = engine.stats()["prompt_tokens"]
    second = engine.add_request(header + [2, 3], SamplingParams(max_tokens=12, temperature=0.0))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.stats()["prompt_tokens"] - before == 2  # the shared header was copied, not recomputed
    assert done[second].outputs[0].token_ids == argmax_loop(model, header + [2, 3], 12)
    assert done[first].outputs[0].token_ids == argmax_loop(model, header + [1], 20)


def test_bad_requests_fail_clearly(model):
    engine = Engine(model, max_model_len=32)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 1000], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request([1], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request([1], SamplingParams(stop=["\n"]))
    rid = engine.add_request([1], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], GREEDY, request_id=rid)
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        Engine(model, kv_cache_tokens=10)
    with pytest.raises(ValueError, match="max_num_seqs, max_model_len"):
        Engine(model, max_num_seqs=10**8)  # refused before allocating, with the knobs to turn

