"""Generation tests: KV-cache parity for every position encoding, left-padded cache batches, streaming
text (UTF-8 split across tokens, stop strings across token boundaries), and the `generate` / `chat`
commands on a tiny checkpoint (streamed output, errors, history sliding)."""

from __future__ import annotations

import types

import pytest
import torch

from lmstack.cli import main as cli_main
from lmstack.engine import Engine, SamplingParams
from lmstack.engine.detok import IncrementalDetokenizer, TextStream
from lmstack.cli.generate import run_chat
from lmstack.engine.generate import ChatSession, generate
from lmstack.engine.kv_cache import KVCache
from lmstack.models.layers import POSITIONS
from lmstack.tokenizer import Tokenizer
from lmstack.checkpoint import save_checkpoint

from engine_helpers import tiny_model as _tiny

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["héllo wörld, naïve café — 日本語のテキスト and emoji 😀🚀 here.\n",
         "The quick brown fox jumps over the lazy dog. " * 3, "def f(x):\n    return x * 2\n"] * 30


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    return _tiny(seed, **{"vocab_size": 300, "block_size": 128, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.mark.parametrize("position", POSITIONS)  # every position option the model offers
@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_greedy_with_kv_cache_equals_without(position, n_kv_head):
    model = tiny_model(position=position, n_kv_head=n_kv_head)
    for prompt in ([7], [3, 1, 4, 1, 5, 9, 2, 6]):
        params = SamplingParams(max_tokens=24, temperature=0.0)
        cached = generate(model, prompt, params, use_kv_cache=True)
        plain = generate(model, prompt, params, use_kv_cache=False)
        assert len(cached) == 24 and cached == plain


def test_sliding_window_attention_with_kv_cache_equals_without():
    model = tiny_model(attn_window=6, sparse_every=2)  # GPT-3 style: every second layer is banded
    params = SamplingParams(max_tokens=30, temperature=0.0)
    prompt = list(range(3, 20))  # longer than the window
    assert generate(model, prompt, params) == generate(model, prompt, params, use_kv_cache=False)
    [out] = Engine(model, max_num_batched_tokens=8).generate([prompt], params)
    assert out.outputs[0].token_ids == generate(model, prompt, params, use_kv_cache=False)


def test_seeded_sampling_with_kv_cache_equals_without():
    model = tiny_model()
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, repetition_penalty=1.3, seed=7)
    assert generate(model, [1, 2, 3], params) == generate(model, [1, 2, 3], params, use_kv_cache=False)


def test_left_padded_kv_cache_batch_matches_solo():
    """Padding positions (-1) in a batched cache are never attended: each row decodes as if alone."""
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    positions = torch.tensor([[-1] * (T - len(p)) + list(range(len(p))) for p in prompts])
    cache = KVCache.for_model(model, batch_size=2, max_len=T + 8)
    with torch.no_grad():
        logits, _ = model(idx, positions=positions, kv_cache=cache, logits_to_keep=1)
        tokens = [[int(t)] for t in logits[:, -1].argmax(-1)]
        for _ in range(7):
            step_positions = torch.tensor([[len(p) + len(t) - 1] for p, t in zip(prompts, tokens)])
            logits, _ = model(torch.tensor([[t[-1]] for t in tokens]), positions=step_positions, kv_cache=cache)
            for row, t in zip(tokens, logits[:, -1].argmax(-1)):
                row.append(int(t))
    for prompt, row in zip(prompts, tokens):
        assert row == generate(model, prompt, SamplingParams(max_tokens=8, temperature=0.0))


# ----------------------------------------------------------------------------- streaming text

def test_incremental_detokenizer_holds_back_split_characters(tokenizer):
    text = "日本語 😀🚀 naïve"
    ids = tokenizer.encode(text)
    assert any(not _valid_utf8(tokenizer.decode_bytes([i])) for i in ids)  # some tokens split a character
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_detokenizer_with_sentencepiece_byte_fallback():
    """Tokenizers that decode through text show half a character as U+FFFD; it must not leak."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}, "\u2581hello": 257, "\u2581world": 258}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tokenizer = Tokenizer.from_hf_json(hf.to_str())
    ids = [257] + [b + 1 for b in "日本".encode()] + [258]
    assert "\ufffd" in tokenizer.decode(ids[:2])
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids) == "hello日本 world"
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_cuts_stop_strings_across_tokens(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, stop=["fox jumps", "never"])
    released, stopped = "", False
    for i in ids:
        delta, stopped = stream.add(i)
        released += delta
        assert "fox" not in released  # not even the start of the stop string leaks while it may still match
        if stopped:
            break
    assert stopped and released == "The quick brown " == stream.text
    # a partial match that never completes is released at the end
    stream = TextStream(tokenizer, stop=["dog!"])
    released = "".join(stream.add(i)[0] for i in ids) + stream.finish()
    assert released == text


def test_engine_stop_strings_end_text_without_leaking(tokenizer):
    model = tiny_model()
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The quick")
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    [full] = engine.generate([prompt], params)
    text = full.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]  # some substring of the greedy output (it may span tokens)
    params.stop = [stop]
    request_id = engine.add_request(prompt, params)
    streamed = ""
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.outputs[0].new_text
            final = out
    assert final.request_id == request_id and final.outputs[0].finish_reason == "stop"
    assert streamed == final.outputs[0].text == text[:text.index(stop)]


# ----------------------------------------------------------------------------- commands

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    model = tiny_model(block_size=64, vocab_size=tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, model, {"model": vars(model.config)}, tokenizer=tokenizer)
    return path


def test_generate_command_streams_the_engine_output(checkpoint, tokenizer, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "The quick", "--max-tokens", "12",
            "--temperature", "0", "--device", "cpu"]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    engine = Engine.from_checkpoint(checkpoint, device="cpu")
    [expected] = engine.generate([tokenizer.encode("The quick")], SamplingParams(max_tokens=12, temperature=0.0))
    assert out == expected.outputs[0].text + "\n"
    assert "tokens/s" in err
    assert cli_main(args[:-4] + ["--seed", "3", "--num-samples", "2", "--temperature", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2


def test_generate_command_errors(tmp_path, checkpoint, capsys):
    assert cli_main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    # an empty prompt starts a fresh document (from <|endoftext|>) rather than failing
    assert cli_main(["generate", "--model", str(checkpoint), "--prompt", "", "--max-tokens", "3",
                     "--device", "cpu"]) == 0


def test_chat_slides_history_and_keeps_system_prompt(checkpoint, capsys):
    engine = Engine.from_checkpoint(checkpoint, device="cpu", max_num_seqs=1)
    notices = []
    session = ChatSession(engine, SamplingParams(max_tokens=8, temperature=0.0), system="Be brief.",
                          notify=notices.append)
    for turn in range(6):
        reply = "".join(session.send(f"Tell me about the quick brown fox, part {turn}."))
        assert session.messages[-1] == {"role": "assistant", "content": reply}
    assert session.messages[0] == {"role": "system", "content": "Be brief."}
    assert len(notices) == 1 and "context" in notices[0]
    assert len(session.messages) < 1 + 2 * 6  # old turns were dropped
    assert engine.stats()["prefix_reused_tokens"] > 0  # later turns reuse the cached conversation
    with pytest.raises(ValueError, match="context"):
        list(session.send("fox " * 80))
    assert session.messages[-1]["role"] == "assistant"  # the rejected message is not kept


def test_chat_command_reads_turns_until_eof(checkpoint, capsys):
    lines = iter(["Hello there", "", "/reset", "Again", "/exit", "never read"])
    args = types.SimpleNamespace(model=str(checkpoint), system="Be brief.", max_tokens=6, temperature=0.0,
                                 top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                                 frequency_penalty=0.0, stop=[], stop_token_id=[], seed=None, device="cpu",
                                 quantize=None)
    run_chat(args, input_fn=lambda prompt: next(lines))
    out, err = capsys.readouterr()
    assert out.count("assistant> ") == 2 and "history cleared" in err
    assert next(lines) == "never read"
    assert cli_main(["chat", "--model", "/nonexistent/ckpt"]) == 2


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
