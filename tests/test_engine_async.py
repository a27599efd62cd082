"""AsyncEngine tests: streamed outputs equal the blocking engine's, concurrent requests, QueueFull,
closing or cancelling an iterator aborts the request and frees its KV slot, bad requests raise."""

from __future__ import annotations

import asyncio

import pytest

from lmstack.engine import Engine, SamplingParams
from lmstack.engine.async_engine import AsyncEngine, QueueFull

from engine_helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(block_size=128)


async def collect(engine: AsyncEngine, prompt, params):
    tokens, outs = [], []
    async for out in engine.generate(prompt, params):
        tokens += out.outputs[0].new_token_ids
        outs.append(out)
    return tokens, outs


def test_concurrent_streams_match_blocking_engine(model):
    prompts = [[1, 2, 3], [9] * 12, list(range(20, 45))]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in Engine(model).generate(prompts, params)]

    async def main():
        engine = AsyncEngine(Engine(model, max_num_seqs=2))
        try:
            return await asyncio.gather(*(collect(engine, p, params) for p in prompts))
        finally:
            engine.shutdown()

    results = asyncio.run(main())
    for (tokens, outs), want in zip(results, expected):
        assert tokens == want  # the deltas add up to the whole output
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == want
        assert not any(o.finished for o in outs[:-1])


def test_closing_the_iterator_aborts_and_frees_memory(model):
    async def main():
        engine = AsyncEngine(Engine(model, max_num_seqs=2))
        try:
            stream = engine.generate(list(range(40)), SamplingParams(max_tokens=100, temperature=0.0))
            async for out in stream:
                if len(out.outputs[0].token_ids) >= 3:
                    break
            await stream.aclose()
            for _ in range(200):  # the stepping thread handles the abort before its next step
                if engine.engine.stats()["kv_slots_free"] == 2 and not engine.engine.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            stats = engine.engine.stats()
            assert stats["kv_tokens_used"] == 0 and stats["kv_slots_free"] == 2

            task = asyncio.create_task(collect(engine, [1, 2], SamplingParams(max_tokens=100, temperature=0.0)))
            while engine.engine.stats()["running"] == 0:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if engine.engine.stats()["kv_slots_free"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert engine.engine.stats()["kv_slots_free"] == 2
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_queue_full_and_bad_requests(model):
    async def main():
        engine = AsyncEngine(Engine(model, max_num_seqs=1), max_waiting=1)
        try:
            long = SamplingParams(max_tokens=60, temperature=0.0)
            first = asyncio.create_task(collect(engine, [1], long))
            while engine.engine.stats()["running"] == 0:
                await asyncio.sleep(0.005)
            second = asyncio.create_task(collect(engine, [2], long))  # waits for the only slot
            while engine.num_waiting() == 0:
                await asyncio.sleep(0.005)
            with pytest.raises(QueueFull):
                async for _ in engine.generate([3], long):
                    pass
            with pytest.raises(ValueError, match="empty prompt"):
                await collect(engine, [], long)
            first.cancel()
            second.cancel()
            await asyncio.gather(first, second, return_exceptions=True)
        finally:
            engine.shutdown()

    asyncio.run(main())
