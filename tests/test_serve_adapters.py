"""`lmstack serve --adapter NAME=DIR`: several LoRA adapters over one base, picked by the request's model name.

Adapters are written in peft's layout (lmstack.interop.peft_adapters.save_adapter, what `lmstack sft --lora`
writes) with random factors, served by a real uvicorn server, and called with the official `openai` client.
Each adapter's answers must equal the base checkpoint with that adapter merged (merge_lora) run alone, also
when two clients ask two different adapters at the same time (their streams overlap, so they decode in
the same batches). Run: python -m pytest tests/test_serve_adapters.py
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import torch

from lmstack.checkpoint import load_checkpoint
from lmstack.cli import main
from lmstack.engine.engine import Engine
from lmstack.engine.sampling import SamplingParams
from lmstack.interop.peft_adapters import load_adapter, save_adapter
from lmstack.models.peft import LoRAConfig, apply_lora, lora_modules, merge_lora
from lmstack.serve.app import create_app, default_model_name
from lmstack.serve.run import serve_in_thread
from serve_helpers import API_KEY, build_tiny_checkpoint, health

pytestmark = pytest.mark.usefixtures("one_thread")
MESSAGES = [{"role": "user", "content": "Tell me about rivers and cats."}]
NO_EOS = {"ignore_eos": True}


def write_adapter(checkpoint, out, rank: int, targets: list[str], seed: int):
    """A LoRA adapter with random factors (a fresh adapter's B is zero and would change nothing)."""
    model = load_checkpoint(checkpoint).model
    cfg = LoRAConfig(r=rank, alpha=2.0 * rank, target_modules=targets)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.5)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.5)
    return save_adapter(model, cfg, out)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"terse": write_adapter(tiny_checkpoint, root / "terse", 4, ["q_proj", "v_proj"], seed=1),
            "chatty": write_adapter(tiny_checkpoint, root / "chatty", 8, ["o_proj", "up_proj", "down_proj"], seed=2)}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, adapters):
    app = create_app(tiny_checkpoint, api_keys=[API_KEY], device="cpu", max_num_seqs=8,
                     adapters=[(name, str(path)) for name, path in adapters.items()])
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def references(tiny_checkpoint, adapters) -> dict:
    """The base, and the base with each adapter merged, each run alone by its own engine."""
    out = {None: Engine.from_checkpoint(str(tiny_checkpoint), device="cpu", max_num_seqs=2)}
    for name, path in adapters.items():
        ckpt = load_checkpoint(tiny_checkpoint)
        load_adapter(ckpt.model, path)
        merge_lora(ckpt.model)
        out[name] = Engine(ckpt.model, ckpt.tokenizer, max_num_seqs=2)
    return out


def reference_answer(engine: Engine, max_tokens: int) -> str:
    ids, _ = engine.tokenizer.render_chat(MESSAGES, add_generation_prompt=True)
    [out] = engine.generate([list(ids)], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return out.outputs[0].text


def test_models_lists_the_base_and_every_adapter(client, tiny_checkpoint, server):
    base = default_model_name(tiny_checkpoint)
    cards = client.models.list().data
    assert [m.id for m in cards] == [base, "terse", "chatty"]
    assert [getattr(m, "parent", None) for m in cards] == [None, base, base]
    assert client.models.retrieve("chatty").id == "chatty"
    assert health(server)["adapters"] == ["terse", "chatty"]


def test_each_adapter_answers_as_its_merged_model(client, tiny_checkpoint, references):
    answers = {}
    for name in (None, "terse", "chatty"):
        model = name or default_model_name(tiny_checkpoint)
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0,
                                           extra_body=NO_EOS)
        assert r.model == model
        answers[name] = r.choices[0].message.content
        assert answers[name] == reference_answer(references[name], 16), name
    assert len(set(answers.values())) == 3, "each adapter should change the greedy answer"
    # the legacy completions route picks adapters the same way
    text = client.completions.create(model="terse", prompt="the river", max_tokens=8, temperature=0,
                                     extra_body=NO_EOS).choices[0].text
    engine = references["terse"]
    [out] = engine.generate([engine.tokenizer.encode("the river")],
                            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert text == out.outputs[0].text


def test_two_concurrent_requests_to_different_adapters_share_the_batches(server, references):
    async def stream(client, model):
        chunks, times = [], []
        response = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=200,
                                                        temperature=0, stream=True, extra_body=NO_EOS)
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks.append(chunk.choices[0].delta.content)
                times.append(time.monotonic())
        return "".join(chunks), times

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        return await asyncio.gather(stream(client, "terse"), stream(client, "chatty"))

    (terse, terse_times), (chatty, chatty_times) = asyncio.run(run())
    assert terse == reference_answer(references["terse"], 200)
    assert chatty == reference_answer(references["chatty"], 200)
    # both were decoding at the same time: each stream's pieces arrive before the other one ended
    assert terse_times[0] < chatty_times[-1] and chatty_times[0] < terse_times[-1]


def test_unknown_model_and_adapter_embeddings_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "'terse'" in e.value.body["message"] and "'chatty'" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="terse", input="a river")
    assert e.value.body["code"] == "model_not_supported"


def test_embeddings_stay_the_base_models_while_adapters_decode(client, tiny_checkpoint, references):
    base = default_model_name(tiny_checkpoint)
    before = client.embeddings.create(model=base, input="cats and rivers").data[0].embedding
    # a decode with an adapter in between must not leak its rows into the embedding pass
    client.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=4, temperature=0)
    after = client.embeddings.create(model=base, input="cats and rivers").data[0].embedding
    assert after == pytest.approx(before, abs=1e-6)


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_adapter_for_another_base_is_refused_at_startup_in_one_line(tiny_checkpoint, adapters, tmp_path,
                                                                        capsys):
    other = build_tiny_checkpoint(tmp_path / "other", n_embd=32)
    foreign = write_adapter(other, tmp_path / "foreign", 4, ["q_proj"], seed=3)
    base = ["serve", "--model", str(tiny_checkpoint), "--port", "0", "--device", "cpu"]
    err = _one_line_error([*base, "--adapter", f"terse={adapters['terse']}", "--adapter", f"alien={foreign}"],
                          capsys)
    assert "do not fit" in err and "another base model" in err
    err = _one_line_error([*base, "--adapter", f"x={tmp_path / 'missing'}"], capsys)
    assert "is not a directory" in err
    err = _one_line_error([*base, "--adapter", f"{default_model_name(tiny_checkpoint)}={adapters['terse']}"], capsys)
    assert "base model's name" in err
