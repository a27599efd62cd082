"""No request can hurt another, at the engine level: a step that fails for one request fails that request
alone (logged with its id) while the rest of the batch produces exactly what it produces alone; every
value SamplingParams accepts is one the sampler can honour; extreme but valid values sample safely; and
the AsyncEngine's waiting bound counts sequences (n), not requests.

A request is made to fail inside a step by changing its parameters after validation (the engine keeps a
reference to them), the way a value the checks missed would reach the sampler.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from lmstack.engine import Engine, SamplingParams
from lmstack.engine.async_engine import AsyncEngine, QueueFull, RequestFailed
from lmstack.engine.sampling import SamplingRow, make_generator, sample
from lmstack.errors import UserError
from lmstack.models import MODEL_CONFIGS, build_model

from engine_helpers import argmax_loop, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

OVERFLOW = 2 ** 63  # does not fit the int64 tensor the batched sampler builds


@pytest.fixture(scope="module")
def model():
    return tiny_model(block_size=128)


def run_all(engine: Engine) -> dict:
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    return final


def solo(model, prompt, params: SamplingParams) -> list[int]:
    [out] = Engine(model, max_num_seqs=2).generate([prompt], params)
    return out.outputs[0].token_ids


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_request_failing_inside_a_step_fails_alone(model, when, caplog):
    engine = Engine(model, max_num_seqs=4)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=3, n=2)
    poisoned = SamplingParams(max_tokens=10, temperature=0.8, top_k=5)
    a = engine.add_request([1, 2, 3], greedy)
    b = engine.add_request([4, 5], seeded)
    bad = engine.add_request([7, 8, 9], poisoned, request_id="poisoned-request")
    final = {}
    if when == "decode":  # let every request start decoding first
        for _ in range(2):
            final.update({o.request_id: o for o in engine.step() if o.finished})
    poisoned.top_k = OVERFLOW
    with caplog.at_level(logging.ERROR, logger="lmstack.engine"):
        final.update(run_all(engine))
    assert final[bad].error is not None and "Overflow" in final[bad].error
    assert [c.finish_reason for c in final[bad].outputs] == ["error"]
    assert any("poisoned-request" in r.getMessage() for r in caplog.records)
    # the others are exactly what they are without the failing request, seeded samples included
    assert final[a].error is None and final[a].outputs[0].token_ids == argmax_loop(model, [1, 2, 3], 10)
    expected = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=3, n=2)
    [alone] = Engine(model, max_num_seqs=4).generate([[4, 5]], expected)
    assert [c.token_ids for c in final[b].outputs] == [c.token_ids for c in alone.outputs]
    stats = engine.stats()
    assert stats["kv_tokens_used"] == 0 and stats["kv_slots_free"] == 4 and stats["running"] == 0


def test_async_engine_fails_the_request_and_keeps_serving(model):
    async def main():
        engine = AsyncEngine(Engine(model, max_num_seqs=4))
        try:
            poisoned = SamplingParams(max_tokens=30, temperature=0.8)

            async def bad():
                with pytest.raises(RequestFailed, match="failed inside the engine"):
                    async for _ in engine.generate([5, 6], poisoned):
                        poisoned.top_k = OVERFLOW

            async def good(prompt):
                tokens = []
                async for out in engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0)):
                    tokens += out.outputs[0].new_token_ids
                return tokens

            results = await asyncio.gather(good([1, 2]), bad(), good([3, 4, 5]))
            assert results[0] == argmax_loop(model, [1, 2], 30) and results[2] == argmax_loop(model, [3, 4, 5], 30)
            assert await good([9]) == argmax_loop(model, [9], 30)  # the engine thread is still stepping
        finally:
            engine.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("field, value", [
    ("top_k", OVERFLOW), ("top_k", -1), ("top_k", 2.5), ("n", True), ("max_tokens", 1.0),
    ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", float("nan")),
    ("presence_penalty", float("inf")), ("frequency_penalty", float("-inf")), ("repetition_penalty", 0.0),
    ("min_p", "0.1"), ("seed", 1.5), ("logprobs", -1), ("logprobs", True),
])
def test_sampling_params_refuse_what_the_sampler_cannot_honour(model, field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(UserError, match=field):
        params.validate()
    with pytest.raises(UserError, match=field):
        Engine(model, max_num_seqs=1).add_request([1], params)


def test_extreme_valid_values_sample_safely(model):
    prompt = [3, 1, 4, 1, 5]
    greedy = solo(model, prompt, SamplingParams(max_tokens=12, temperature=0.0))
    # a temperature far below any meaningful one decodes greedily (it once gave NaN and token 0)
    assert solo(model, prompt, SamplingParams(max_tokens=12, temperature=1e-300, seed=1)) == greedy
    tiny = dict(presence_penalty=1e-300, frequency_penalty=-1e-300, repetition_penalty=1 + 1e-15)
    assert solo(model, prompt, SamplingParams(max_tokens=12, temperature=1e-300, **tiny)) == greedy
    # logprobs beyond the vocabulary return all of it; top_k beyond it means "off"
    [out] = Engine(model).generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, logprobs=10 ** 6,
                                                            top_k=2 ** 31 - 1))
    assert out.outputs[0].token_ids == greedy[:2] and len(out.outputs[0].logprobs[0]["top"]) == 101


def test_overflowing_logits_never_give_nan_or_a_padding_token():
    # a tiny repetition penalty divides the seen positive logits into +inf: they must win, without NaN
    logits = torch.tensor([[0.5, 3.0, 2.0, -1.0, 1.0]])
    params = SamplingParams(temperature=0.5, repetition_penalty=1e-300, seed=0)
    for seed in range(20):
        row = SamplingRow(params, make_generator(seed, "cpu"), prompt_ids=[2, 4], output_ids=[])
        assert int(sample(logits, [row])[0]) in (2, 4)
    greedy_row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1e-300), None, [2, 4], [])
    assert int(sample(logits, [greedy_row])[0]) in (2, 4)
    # a row whose logits are all NaN or -inf takes its argmax instead of a NaN draw
    broken = torch.tensor([[float("nan"), float("-inf"), float("nan"), float("-inf"), float("nan")]])
    row = SamplingRow(SamplingParams(temperature=1.0), make_generator(0, "cpu"), [], [])
    assert int(sample(broken, [row])[0]) in range(5)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_engine_refuses_encoders_in_one_line(family):
    cfg = MODEL_CONFIGS[family](vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(UserError, match="decoder-only") as e:
        Engine(build_model(cfg))
    assert "\n" not in str(e.value)


def test_moe_without_a_position_field_is_checked_not_crashed():
    cfg = MODEL_CONFIGS["moe"](vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    assert not hasattr(cfg, "position")
    model = build_model(cfg).eval()
    with pytest.raises(UserError, match="exceeds the model's context"):
        Engine(model, max_model_len=32)
    [out] = Engine(model).generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0))
    assert out.outputs[0].token_ids == argmax_loop(model, [1, 2, 3], 4)


def test_waiting_bound_counts_sequences_not_requests(model):
    async def main():
        engine = AsyncEngine(Engine(model, max_num_seqs=3), max_waiting=2)
        long = dict(max_tokens=100, temperature=0.0, ignore_eos=True)
        try:
            running = asyncio.create_task(_drain(engine.generate([1], SamplingParams(**long, n=2))))
            await _until(lambda: engine.engine.stats()["running"] == 2)
            # needs 2 free slots, 1 is free: waits, counting as two sequences
            waiting = asyncio.create_task(_drain(engine.generate([2], SamplingParams(**long, n=2))))
            await _until(lambda: engine.num_waiting() == 2)
            with pytest.raises(QueueFull):  # 2 + 1 > 2 although only one request waits
                await _drain(engine.generate([3], SamplingParams(**long, n=1)))
            with pytest.raises(UserError, match="max_waiting"):  # could never fit: refused, not "retry later"
                await _drain(engine.generate([3], SamplingParams(**long, n=3)))
            for task in (running, waiting):
                task.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
        finally:
            engine.shutdown()

    asyncio.run(main())


async def _until(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def _drain(outputs) -> None:
    async for _ in outputs:
        pass
