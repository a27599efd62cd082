"""Load test of the server: concurrent streaming clients that hang up at random, before the first byte or midway
(bench/bench_serve.py is the larger, measured version of the same idea, against a server subprocess).

Checks: no 5xx, every stream that was not abandoned ends with [DONE] and no error event, the KV cache
back to 0 after every round, and the process RSS flat after the warm-up round. The server runs
in-process, so the RSS measured is this test process (server + clients). The 64-client version is the
slow-marked test (python -m pytest tests/test_serve_load.py -m slow).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass

import httpx
import psutil
import pytest

from lmstack.serve.app import create_app
from lmstack.serve.run import serve_in_thread
from serve_helpers import health, random_words, wait_idle


@dataclass
class Load:
    clients: int
    rounds: int
    requests: int  # per client per round
    max_tokens: int
    disconnect_prob: float
    seed: int


def request_body(rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    common = {"model": "m", "max_tokens": rng.randint(max(1, max_tokens // 4), max_tokens), "stream": True,
              "stream_options": {"include_usage": True}, "temperature": rng.choice([0.0, 0.7, 1.0]),
              "ignore_eos": rng.random() < 0.5}
    words = random_words(rng, 3, 30)
    if rng.random() < 0.7:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": words}]}
    return "/v1/completions", {**common, "prompt": words}


async def stream_once(client: httpx.AsyncClient, path: str, body: dict, hang_up_after: int | None) -> tuple[str, str]:
    """(outcome, problem): read a stream to [DONE], or leave after ``hang_up_after`` events."""
    async with client.stream("POST", path, json=body) as response:
        if response.status_code == 429:
            return "refused", ""
        if response.status_code != 200:
            return "failed", f"status {response.status_code}: {(await response.aread())[:200]!r}"
        events, last = 0, None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line[6:]
            if last == "[DONE]":
                return "done", ""
            if "error" in json.loads(last):
                return "failed", f"error event: {last}"
            events += 1
            if hang_up_after is not None and events >= hang_up_after:
                return "abandoned_mid", ""  # leaving the block closes the connection mid-stream
        return "failed", f"stream ended without [DONE] (last event: {last!r})"


async def one_request(client: httpx.AsyncClient, rng: random.Random, load: Load) -> tuple[str, str]:
    path, body = request_body(rng, load.max_tokens)
    mode = rng.choice(["early", "mid"]) if rng.random() < load.disconnect_prob else "full"
    task = asyncio.ensure_future(stream_once(client, path, body, rng.randint(1, 6) if mode == "mid" else None))
    if mode == "early":  # give up after a moment, most likely while queued or prefilling
        await asyncio.wait({task}, timeout=rng.uniform(0.0, 0.05))
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return "abandoned_early", ""
    return await task


async def one_round(url: str, load: Load, round_index: int) -> list[tuple[str, str]]:
    limits = httpx.Limits(max_connections=load.clients * 2, max_keepalive_connections=load.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        async def client_loop(index: int) -> list[tuple[str, str]]:
            rng = random.Random(load.seed * 1_000_003 + round_index * 1009 + index)
            return [await one_request(client, rng, load) for _ in range(load.requests)]

        per_client = await asyncio.gather(*[client_loop(i) for i in range(load.clients)])
    return [outcome for outcomes in per_client for outcome in outcomes]


def run(checkpoint, load: Load) -> Counter:
    app = create_app(checkpoint, max_num_seqs=8, max_waiting=256, device="cpu", model_name="m")
    totals, rss_mb = Counter(), []
    with serve_in_thread(app) as url:
        for r in range(load.rounds):
            outcomes = asyncio.run(one_round(url, load, r))
            totals.update(kind for kind, _ in outcomes)
            problems = [problem for _, problem in outcomes if problem]
            assert not problems, f"round {r}: {problems[:5]}"  # no 5xx, no error event, every stream ends
            wait_idle(url, timeout=60)  # KV cache back to 0 tokens, nothing running or waiting
            rss_mb.append(psutil.Process().memory_info().rss / 2 ** 20)
        counters = health(url)["counters"]
    assert max(rss_mb[1:]) - rss_mb[1] <= 32, f"RSS grew across rounds after the warm-up one: {rss_mb} MB"
    assert totals["done"] > 0 and totals["abandoned_mid"] > 0, totals
    assert counters["disconnects"] > 0, "the server should have seen clients leave (and aborted their requests)"
    return totals


def test_sixteen_streaming_clients_with_random_disconnects(tiny_checkpoint):
    totals = run(tiny_checkpoint, Load(clients=16, rounds=3, requests=2, max_tokens=24, disconnect_prob=0.35, seed=1))
    assert totals["refused"] == 0  # 256 waiting places: nobody is refused


@pytest.mark.slow
def test_sixty_four_streaming_clients_with_random_disconnects(tiny_checkpoint):
    run(tiny_checkpoint, Load(clients=64, rounds=3, requests=3, max_tokens=48, disconnect_prob=0.25, seed=2))
