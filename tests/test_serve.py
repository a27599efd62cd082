"""The OpenAI-compatible server, driven over real HTTP with the official `openai` client.

A tiny random checkpoint is served in-process (uvicorn in a thread on a loopback port); outputs are
checked against the engine run directly on the same weights, so these tests fail if the server
mistranslates a parameter, drops a token, or mangles the stream. Run: python -m pytest tests/test_serve.py
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from lmstack.engine.embed import embed
from lmstack.engine.engine import Engine
from lmstack.engine.sampling import SamplingParams
from lmstack.serve.app import create_app, default_model_name
from lmstack.serve.run import serve_in_thread
from serve_helpers import API_KEY, health, wait_for, wait_idle

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about cats."}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    app = create_app(tiny_checkpoint, api_keys=[API_KEY], max_request_bytes=64 * 1024, max_prompt_tokens=512,
                     max_tokens_limit=1000, max_num_seqs=8, device="cpu")
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def model_name(tiny_checkpoint) -> str:
    return default_model_name(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> Engine:
    """The same weights run directly, for parity checks."""
    return Engine.from_checkpoint(str(tiny_checkpoint), device="cpu", max_num_seqs=4)


def chat_prompt_ids(engine: Engine, messages) -> list[int]:
    ids, _ = engine.tokenizer.render_chat(messages, add_generation_prompt=True)
    return list(ids)


def greedy(engine: Engine, prompt_ids: list[int], max_tokens: int, **kw) -> str:
    [out] = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))
    return out.outputs[0].text


def sse_lines(url: str, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{url}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


# ----------------------------------------------------------------------------- models

def test_models_list_and_retrieve(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


# ----------------------------------------------------------------------------- chat

def test_chat_matches_engine_and_counts_usage(client, model_name, reference):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=24, temperature=0,
                                       extra_body=NO_EOS)
    prompt_ids = chat_prompt_ids(reference, MESSAGES)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy(reference, prompt_ids, 24, ignore_eos=True)
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == len(prompt_ids) + 24


def test_chat_default_max_tokens_fills_the_context(client, model_name, reference):
    """Without max_tokens, generation may run to the end of the context (or the server's limit)."""
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, extra_body=NO_EOS)
    prompt_ids = chat_prompt_ids(reference, MESSAGES)
    assert r.usage.completion_tokens == min(1000, reference.max_model_len - len(prompt_ids))
    assert r.choices[0].finish_reason == "length"


def test_chat_stream_equals_plain_answer_and_ends_with_done(server, client, model_name):
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=20, temperature=0,
                                           extra_body=NO_EOS).choices[0].message.content
    stream = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=NO_EOS)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1, "the answer should arrive in several pieces"
    assert "".join(content) == plain
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    # on the wire: every event is "data: ...", the last one is [DONE]
    lines = sse_lines(server, "/v1/chat/completions", {"model": model_name, "messages": MESSAGES, "max_tokens": 5,
                                                       "stream": True})
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[1][6:])  # include_usage not asked for


def test_async_client_concurrent_requests(server, model_name, reference):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        questions = [f"Question number {i} about rivers?" for i in range(6)]
        tasks = [client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": q}],
                                                max_tokens=12, temperature=0, extra_body=NO_EOS)
                 for q in questions]
        stream = await client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8,
                                                      stream=True, extra_body=NO_EOS)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        results = await asyncio.gather(*tasks)
        await client.close()
        return questions, results, streamed

    questions, results, streamed = asyncio.run(main())
    for q, r in zip(questions, results):  # batching with other requests does not change greedy output
        ids = chat_prompt_ids(reference, [{"role": "user", "content": q}])
        assert r.choices[0].message.content == greedy(reference, ids, 12, ignore_eos=True)
    assert streamed


def test_n_choices_seeded_and_streamed(client, model_name):
    kw = dict(model=model_name, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7, n=3, extra_body=NO_EOS)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # the samples differ from each other
    assert a.usage.completion_tokens == 30
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = {i: "" for i in range(3)}
    finishes = {i: [] for i in range(3)}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index].append(ch.finish_reason)
    assert [text[i] for i in range(3)] == [c.message.content for c in a.choices]
    assert all(f == ["length"] for f in finishes.values())


def test_stop_strings_cut_the_answer(client, model_name):
    full = client.completions.create(model=model_name, prompt="The cats and the dogs", max_tokens=40,
                                     temperature=0, extra_body=NO_EOS).choices[0].text
    assert len(full) > 8
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.completions.create(model=model_name, prompt="The cats and the dogs", max_tokens=40,
                                    temperature=0, stop=[stop, "\x00never"], extra_body=NO_EOS).choices[0]
    assert cut.text == full[:full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = client.completions.create(model=model_name, prompt="The cats and the dogs", max_tokens=40,
                                         temperature=0, stop=stop, stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_chat_logprobs(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs), abs=1e-5)  # greedy = the top
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) <= 1.0 + 1e-5


def test_completion_token_prompt_echo_and_logprobs_match_the_model(client, model_name, reference):
    ids = reference.tokenizer.encode("Dogs and rivers and code")
    r = client.completions.create(model=model_name, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == reference.tokenizer.decode(ids)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    with torch.no_grad():
        logits, _ = reference.model(torch.tensor([ids]))
    expected = torch.log_softmax(logits[0, :-1].float(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    # echo with generation: prompt tokens then generated tokens, in one list
    r = client.completions.create(model=model_name, prompt=ids, max_tokens=4, echo=True, logprobs=2,
                                  temperature=0, extra_body=NO_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 4 and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert r.choices[0].text.startswith(reference.tokenizer.decode(ids))


def test_empty_prompt_starts_a_document(client, model_name, reference):
    r = client.completions.create(model=model_name, prompt="", max_tokens=5, temperature=0, extra_body=NO_EOS)
    assert r.usage.prompt_tokens == 1
    assert r.choices[0].text == greedy(reference, [reference.tokenizer.eot_id], 5, ignore_eos=True)


def test_completion_several_prompts_times_n(client, model_name, reference):
    prompts = ["Numbers and time", "A question about code"]
    r = client.completions.create(model=model_name, prompt=prompts, max_tokens=5, n=2, temperature=0,
                                  extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        expected = greedy(reference, reference.tokenizer.encode(p), 5, ignore_eos=True)
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == expected  # greedy: both samples agree
    assert r.usage.prompt_tokens == sum(len(reference.tokenizer.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 20
    chunks = list(client.completions.create(model=model_name, prompt=prompts, max_tokens=5, n=2, temperature=0,
                                            stream=True, extra_body=NO_EOS))
    text = {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + ch.text
    assert [text[i] for i in range(4)] == [c.text for c in r.choices]


# ----------------------------------------------------------------------------- embeddings

def test_embeddings_float_and_base64(client, server, model_name, reference):
    texts = ["cats and dogs", "the server streams code", "numbers"]
    batch = client.embeddings.create(model=model_name, input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in batch.data] == [0, 1, 2]
    vectors = [d.embedding for d in batch.data]
    assert all(len(v) == reference.model.config.n_embd for v in vectors)
    assert all(sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4) for v in vectors)
    single = client.embeddings.create(model=model_name, input=texts[1], encoding_format="float").data[0].embedding
    assert single == pytest.approx(vectors[1], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    direct = embed(reference.model, reference.tokenizer, texts)  # mean-pooled decoder states
    assert torch.tensor(vectors) == pytest.approx(direct, abs=1e-5)
    assert batch.usage.prompt_tokens == sum(len(reference.tokenizer.encode(t)) for t in texts)
    # the raw base64 is little-endian float32
    raw = httpx.post(f"{server}/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": model_name, "input": texts[1], "encoding_format": "base64"}).json()
    blob = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(blob) // 4}f", blob)) == pytest.approx(single, abs=1e-6)
    ids = reference.tokenizer.encode(texts[2])
    by_ids = client.embeddings.create(model=model_name, input=[ids], encoding_format="float").data[0].embedding
    assert by_ids == pytest.approx(vectors[2], abs=1e-5)


def test_encoder_checkpoint_serves_embeddings_only(tiny_checkpoint, tmp_path):
    from lmstack.models import build_model
    from lmstack.models.bert import BertConfig
    from lmstack.tokenizer import Tokenizer
    from lmstack.checkpoint import save_checkpoint

    tokenizer = Tokenizer.load(tiny_checkpoint)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "tiny-encoder", model, {"model": cfg.__dict__}, tokenizer=tokenizer)
    with serve_in_thread(create_app(path, device="cpu")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-encoder"]
        texts = ["cats and dogs", "numbers and time"]
        got = client.embeddings.create(model="tiny-encoder", input=texts, encoding_format="float")
        assert torch.tensor([d.embedding for d in got.data]) == pytest.approx(embed(model, tokenizer, texts), abs=1e-5)
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="tiny-encoder", messages=MESSAGES)
        assert _error(e)["code"] == "model_not_supported"
        assert health(url)["status"] == "ok"


# ----------------------------------------------------------------------------- errors

def _error(exc_info) -> dict:
    body = exc_info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the client unwraps {"error": ...}
    assert body["message"]
    return body


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 3.0}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 3}, None),  # without logprobs=True
    ({"max_tokens": 5000}, "max_tokens"),  # over the server's max_tokens_limit
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"extra_body": {"frobnicate": True}}, "frobnicate"),
])
def test_bad_requests_are_400(client, model_name, kwargs, param):
    args = {"model": model_name, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    body = _error(e)
    assert body["type"] == "invalid_request_error"
    if param:
        assert body["param"] == param


def test_too_long_prompts_and_token_ids_are_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:  # prompt over max_prompt_tokens=512
        client.completions.create(model=model_name, prompt=[1] * 600, max_tokens=1)
    assert _error(e)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the 1024-token context
        client.completions.create(model=model_name, prompt=[1] * 500, max_tokens=600)
    assert _error(e)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt=[1, 2, 10 ** 6], max_tokens=1)
    assert "vocabulary" in _error(e)["message"]


def test_malformed_bodies_are_400_never_500(server, model_name):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for body in [b"{not json", b"[]", b"", b'"text"', b'{"model": 5, "messages": "x"}',
                 json.dumps({"model": model_name, "prompt": [], "max_tokens": 1}).encode(),
                 json.dumps({"model": model_name, "prompt": "hi", "max_tokens": 10 ** 30}).encode()]:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            r = httpx.post(f"{server}{path}", content=body, headers=headers)
            assert r.status_code == 400, (path, body, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"


def test_auth_401(server, model_name):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert _error(e)["code"] == "invalid_api_key"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": model_name, "messages": MESSAGES})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/health").status_code == 200  # health and the page need no key
    assert httpx.get(f"{server}/").status_code == 200


def test_not_found_404_and_wrong_method_405(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert _error(e)["param"] == "model"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.get(f"{server}/v1/nope", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(f"{server}/v1/chat/completions", headers=headers)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    routes = httpx.get(f"{server}/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"} <= set(routes)
    assert httpx.get(f"{server}/docs").status_code == 404  # its page would load scripts from a CDN


def test_body_too_large_413(server, client, model_name):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x" * 100_000}])
    assert e.value.status_code == 413 and _error(e)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the cap is enforced while reading
        for _ in range(40):
            yield b"x" * 4096

    r = httpx.post(f"{server}/v1/completions", content=chunks(), headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 413


@pytest.mark.parametrize("kwargs, param", [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"response_format": {"type": "regex"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
])
def test_unsupported_features_are_422(client, model_name, kwargs, param):
    args = {"model": model_name, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(**args)
    body = _error(e)
    assert body["param"] == param and body["code"] == "unsupported_parameter"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=model_name, prompt="hi", suffix="end")
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model=model_name, input="hi", dimensions=8)


def test_text_content_parts_are_accepted(client, model_name):
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "about cats."}]
    a = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": parts}],
                                       max_tokens=5, temperature=0)
    b = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Tell me about cats."}],
                                       max_tokens=5, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


# ----------------------------------------------------------------------------- queue, timeout, engine down

@pytest.fixture()
def one_slot_server(wide_checkpoint):
    """One sequence at a time and one waiting place: easy to fill; the wider model keeps a long request
    running long enough to watch another one queue and leave."""
    app = create_app(wide_checkpoint, max_num_seqs=1, max_waiting=1, device="cpu", model_name="m")
    with serve_in_thread(app) as url:
        yield url


def test_full_queue_is_429_and_the_rest_complete(one_slot_server):
    url = one_slot_server

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

        async def ask(i):
            try:
                r = await client.completions.create(model="m", prompt=f"Request {i}", max_tokens=600,
                                                    temperature=0, extra_body=NO_EOS)
                return r.choices[0].finish_reason
            except openai.RateLimitError as e:
                return e

        results = await asyncio.gather(*[ask(i) for i in range(6)])
        await client.close()
        return results

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert refused, "six simultaneous long requests must overflow one slot + one waiting place"
    assert all(r.status_code == 429 and r.body["code"] == "queue_full" for r in refused)
    assert refused[0].response.headers["retry-after"] == "1"
    assert [r for r in results if not isinstance(r, openai.RateLimitError)] == ["length"] * (6 - len(refused))
    assert health(url)["counters"]["queue_full"] == len(refused)
    wait_idle(url)


def test_disconnect_while_queued_frees_the_place_without_disturbing_the_running_request(one_slot_server):
    url = one_slot_server
    long_body = {"model": "m", "prompt": "A long one", "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    result = {}

    def run_long():
        r = httpx.post(f"{url}/v1/completions", json=long_body, timeout=120)
        result["status"], result["body"] = r.status_code, r.json()

    runner = threading.Thread(target=run_long)
    runner.start()
    wait_for(lambda: health(url)["engine"]["running"] == 1, what="the long request to start")

    queued = threading.Thread(target=lambda: _post_and_hang_up(url, {**long_body, "prompt": "queued"}, 0.15))
    queued.start()
    wait_for(lambda: health(url)["engine"]["waiting"] == 1, what="the second request to queue")
    queued.join()
    # the client gave up: its place in the queue is released while the first request still runs
    stats = wait_for(lambda: (s := health(url))["engine"]["waiting"] == 0 and s, what="the queued request to go")
    assert stats["engine"]["running"] == 1, "the running request must not be disturbed"
    runner.join(timeout=120)
    assert result["status"] == 200
    assert result["body"]["choices"][0]["finish_reason"] == "length"
    assert result["body"]["usage"]["completion_tokens"] == 900
    wait_idle(url)
    assert health(url)["counters"]["disconnects"] >= 1


def _post_and_hang_up(url: str, body: dict, after_s: float) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=after_s))


def test_stream_disconnect_aborts_generation_and_frees_kv(wide_checkpoint):
    # the wide model (not the tiny one, which can write 900 tokens in well under a second on an idle CPU)
    # leaves the server time to notice the disconnect on a loaded machine too
    app = create_app(wide_checkpoint, device="cpu", model_name="m")
    body = {"model": "m", "prompt": "Streaming and then leaving", "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    with serve_in_thread(app) as url:
        before = health(url)["engine"]["generated_tokens"]
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        stats = wait_idle(url, timeout=60)
        generated = stats["generated_tokens"] - before
        assert generated < 900, f"generation went on after the client left ({generated} tokens)"
        assert stats["kv_tokens_used"] == 0


def test_request_timeout_is_503(tiny_checkpoint):
    app = create_app(tiny_checkpoint, request_timeout_s=1e-4, device="cpu", model_name="m")
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model="m", prompt="slow", max_tokens=50, stream=stream)
            assert e.value.status_code == 503 and _error(e)["code"] == "timeout"
        wait_idle(url)


def test_engine_shut_down_is_503(tiny_checkpoint):
    from lmstack.engine.async_engine import AsyncEngine

    async_engine = AsyncEngine(Engine.from_checkpoint(str(tiny_checkpoint), device="cpu"))
    app = create_app(async_engine, model_name="m")
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="m", prompt="hi", max_tokens=2).choices
        async_engine.shutdown()
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="m", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and _error(e)["code"] == "engine_unavailable"


def test_requests_after_shutdown_began_are_503(tiny_checkpoint):
    """The lifespan's shutdown marks the server as leaving; a request still reaching the app gets 503."""
    app = create_app(tiny_checkpoint, device="cpu", model_name="m")

    async def main():
        async with app.router.lifespan_context(app):
            pass  # started, then shut down (the engine thread is stopped)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert (await client.get("/health")).status_code == 503

    asyncio.run(main())


def test_ignored_openai_fields_are_accepted(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, user="someone",
                                       service_tier="auto", parallel_tool_calls=False)
    assert r.choices[0].message.content is not None


# ----------------------------------------------------------------------------- the CLI verb

def test_cli_serve_subprocess(tiny_checkpoint):
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--model", str(tiny_checkpoint), "--port", "0",
           "--api-key", API_KEY, "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("web chat page:" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        url = lines[-1].split("web chat page:")[1].strip().rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "lmstack chat" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        name = default_model_name(tiny_checkpoint)
        r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3)
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode in (0, -15)


def test_cli_serve_bad_model_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "serve", "--model", str(tmp_path / "missing"),
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
