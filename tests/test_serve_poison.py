"""No request can hurt another, over real HTTP: poison values in every request field while other streams
run leave those streams untouched and the server healthy; strict types; prompts x n against the waiting
bound; extreme but valid sampling values give greedy text.

The server is the tiny random checkpoint served in-process (serve_helpers). A poison value is anything a
client can put in a JSON field: integers past 64 bits, huge and non-finite floats (Python's json writes
NaN and Infinity, and the server's parser reads them), strings, booleans, lists, objects and null.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from lmstack.serve.app import create_app
from lmstack.serve.protocol import ChatCompletionRequest, CompletionRequest
from lmstack.serve.run import serve_in_thread
from serve_helpers import health, wait_for, wait_idle

POISON = [2 ** 63, -2 ** 63 - 1, 10 ** 30, 1e308, -1e308, 1e-300, float("nan"), float("inf"), -1, 0, 1.5, True,
          "yes", "1", "", [], [10 ** 20], [[]], {}, {"a": 1}, None]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 3}
COMPLETION = {"model": "m", "prompt": "The cats and the dogs", "max_tokens": 3}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    app = create_app(tiny_checkpoint, max_num_seqs=8, max_tokens_limit=1000, device="cpu", model_name="m")
    with serve_in_thread(app) as url:
        yield url


def poisoned_bodies() -> list[tuple[str, dict]]:
    """Every field of both generation schemas (and of their nested objects) set to every poison value."""
    bodies = []
    for path, base, schema in (("/v1/chat/completions", CHAT, ChatCompletionRequest),
                               ("/v1/completions", COMPLETION, CompletionRequest)):
        for field in schema.model_fields:
            bodies += [(path, {**base, field: value}) for value in POISON]
        for value in POISON:
            bodies.append((path, {**base, "stream": True, "stream_options": {"include_usage": value}}))
            if path == "/v1/chat/completions":
                for key in ("role", "content", "name"):
                    bodies.append((path, {**base, "messages": [{"role": "user", "content": "hi", key: value}]}))
            else:
                bodies.append((path, {**base, "prompt": [1, 2, value]}))
    # the value that once overflowed the batched sampler and failed every client's request goes first
    return sorted(bodies, key=lambda b: "top_k" not in b[1])


async def send_all(url: str, bodies: list[tuple[str, dict]]) -> list[tuple[int, str, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        gate = asyncio.Semaphore(8)

        async def send(path: str, body: dict) -> tuple[int, str, float]:
            async with gate:
                r = await client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
                return r.status_code, f"{path} {json.dumps(body)[:160]} -> {r.text[:200]}", time.monotonic()

        return await asyncio.gather(*[send(path, body) for path, body in bodies])


def stream_text(url: str, body: dict, out: dict, key: str) -> None:
    text, events = "", []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if line[6:] != "[DONE]":
                    text += "".join(c["text"] for c in json.loads(line[6:]).get("choices", []))
    out[key] = (r.status_code, text, events, time.monotonic())


def test_poison_in_every_field_leaves_other_streams_untouched(server):
    prompts = ["Rivers and time", "A question about code", "Numbers"]
    healthy = [{"model": "m", "prompt": p, "max_tokens": 900, "temperature": 0, "ignore_eos": True} for p in prompts]
    alone = httpx.post(f"{server}/v1/completions", json={**healthy[0], "prompt": prompts}, timeout=300).json()
    expected = [c["text"] for c in alone["choices"]]
    results: dict = {}
    threads = [threading.Thread(target=stream_text, args=(server, b, results, i)) for i, b in enumerate(healthy)]
    for t in threads:
        t.start()
    wait_for(lambda: health(server)["engine"]["running"] == len(healthy), what="the healthy streams to run")

    answers = asyncio.run(send_all(server, poisoned_bodies()))
    for t in threads:
        t.join(timeout=300)

    first_stream_end = min(results[i][3] for i in range(len(healthy)))
    assert sum(at < first_stream_end for _, _, at in answers) >= 100, "the poison must arrive while the streams run"
    server_errors = [text for status, text, _ in answers if status >= 500]
    assert not server_errors, server_errors[:5]
    assert {status for status, _, _ in answers} <= {200, 400, 404, 422}
    assert sum(status == 400 for status, _, _ in answers) > len(answers) // 2
    for i in range(len(healthy)):
        status, text, events, _ = results[i]
        assert status == 200 and events[-1] == "[DONE]"
        assert not any('"error"' in e for e in events)
        assert text == expected[i]  # greedy: exactly what it is without the poison
    stats = wait_idle(server)
    assert health(server)["status"] == "ok" and health(server)["counters"]["engine_errors"] == 0
    assert stats["kv_tokens_used"] == 0
    after = httpx.post(f"{server}/v1/completions", json={**healthy[2], "max_tokens": 20}, timeout=300).json()
    assert expected[2].startswith(after["choices"][0]["text"])


@pytest.mark.parametrize("field, value", [
    ("stream", "yes"), ("stream", 1), ("n", "2"), ("n", 2.0), ("n", True), ("max_tokens", 3.0),
    ("temperature", "0.5"), ("temperature", float("nan")), ("seed", 1.5), ("echo", "false"),
    ("top_k", 2 ** 63), ("top_k", 10 ** 30), ("seed", 2 ** 64), ("max_tokens", 2 ** 63), ("logprobs", True),
])
def test_strict_types_and_ranges_name_the_field(server, field, value):
    r = httpx.post(f"{server}/v1/completions", content=json.dumps({**COMPLETION, field: value}),
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field, error


def test_prompts_times_n_count_against_the_waiting_bound(tiny_checkpoint):
    app = create_app(tiny_checkpoint, max_num_seqs=8, max_waiting=16, device="cpu", model_name="m")
    with serve_in_thread(app) as url:
        body = {"model": "m", "prompt": ["cats"] * 5, "n": 4, "max_tokens": 2}  # 20 sequences > 16
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences", r.text
        chat = {**CHAT, "n": 8}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        ok = httpx.post(f"{url}/v1/completions", json={**body, "prompt": ["cats"] * 4}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 16
        wait_idle(url)


def test_extreme_but_valid_sampling_values_give_greedy_text(server):
    base = {**COMPLETION, "max_tokens": 16, "ignore_eos": True}
    greedy = httpx.post(f"{server}/v1/completions", json={**base, "temperature": 0}, timeout=60).json()
    for extreme in ({"temperature": 1e-300}, {"temperature": 1e-300, "presence_penalty": 1e-300,
                                              "frequency_penalty": -1e-300, "repetition_penalty": 1 + 1e-15}):
        r = httpx.post(f"{server}/v1/completions", json={**base, **extreme}, timeout=60).json()
        assert r["choices"][0]["text"] == greedy["choices"][0]["text"]
        assert "\x00" not in r["choices"][0]["text"]
