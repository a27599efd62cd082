"""`lmstack speedrun` end to end on a small corpus: every stage runs, the report has what the README
promises, the model beats the unigram baseline, the chat stage makes a model whose replies end at the
end-of-turn token, and a second run reuses the finished stages."""

from __future__ import annotations

import json
import random

from lmstack.cli import main
from lmstack.engine.engine import Engine
from lmstack.engine.sampling import SamplingParams
from lmstack.tokenizer.special import END

SUBJECTS = ["The old sailor", "A quiet shepherd", "The young queen", "My brother", "The village baker"]
VERBS = ["walked to", "looked at", "sang about", "dreamed of", "wrote to"]
OBJECTS = ["the harbour at dawn", "the hills beyond the river", "a letter from the king", "the bread in the oven",
           "the stars over the sea"]


def _corpus(path, n_docs: int = 400) -> None:
    """Documents of templated English sentences: enough structure that a tiny model learns context fast."""
    rng = random.Random(0)
    lines = []
    for _ in range(n_docs):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(8)]
        lines.append(json.dumps({"text": " ".join(sentences)}))
    path.mkdir(parents=True)
    (path / "stories.jsonl").write_text("\n".join(lines) + "\n")


SMALL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_kv_head=2", "model.block_size=64",
         "train.batch_size=8", "train.seq_len=64", "train.eval_batches=2", "train.eval_every=100000",
         "train.ckpt_every=100000", "train.tensorboard=false", "train.max_steps=60", "optim.warmup_steps=5",
         "train.max_minutes=0"]  # no wall-clock budget: the step counts stay exact on a busy machine


# the chat stage: generated tasks only (no download), packed windows of the model's 64-token context
CHAT = ["--chitchat", "0", "--chat-tasks", "600", "--chat-held-out", "16", "--chat-minutes", "2",
        "--chat-set", "train.max_steps=150", "--chat-set", "train.max_minutes=0", "--chat-set", "train.batch_size=8", "--chat-set", "optim.lr=3e-3"]


def test_speedrun_end_to_end_and_rerun_reuses_stages(tmp_path, capsys):
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    _corpus(corpus)
    argv = ["speedrun", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "320", "--minutes", "2",
            "--workers", "1", *CHAT, *SMALL]
    assert main(argv) in (0, None)
    report = json.loads((out / "report.json").read_text())
    for key in ("val_bpb", "unigram_bpb", "wall_seconds", "params", "tokens"):
        assert key in report
    assert report["val_bpb"] < 0.7 * report["unigram_bpb"]  # learned context, not just token frequencies
    assert report["steps"] == 60 and report["tokens"] == 60 * 8 * 64  # the step cap, not the clock
    assert report["documents_kept"] < 400  # the cleaning pipeline ran (templated duplicates are removed)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "clean" / "report.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    md = (out / "report.md").read_text()
    assert "unigram" in md and str(round(report["val_bpb"], 3)) in md
    assert len(report["samples"]) >= 2 and all(isinstance(s["completion"], str) for s in report["samples"])

    # the chat stage: OUT/chat/model is a chat model; SFT lowered the held-out loss and taught the turn end
    chat = report["chat"]
    assert chat["steps"] == 150 and set(report["timings"]) >= {"pretrain", "chat"}
    assert chat["held_out_loss"]["tasks"]["after"] < 0.5 * chat["held_out_loss"]["tasks"]["before"]
    assert chat["ended_turn_before"] < 0.2 and chat["ended_turn_after"] >= 0.9
    assert "## Chat model (SFT)" in md and f"{chat['held_out_loss']['tasks']['after']:.3f}" in md
    engine = Engine.from_checkpoint(out / "chat", device="cpu")  # the run directory, as `lmstack chat --model OUT/chat`
    tok = engine.tokenizer
    prompt, _ = tok.render_chat([{"role": "user", "content": "Reverse the word: candle"}], add_generation_prompt=True)
    reply = engine.generate([prompt], [SamplingParams(max_tokens=40, temperature=0.0)])[0].outputs[0]
    assert reply.finish_reason == "stop" and reply.token_ids[-1] == tok.special_tokens[END]
    assert len(reply.token_ids) < 20  # a short answer, then the turn ends

    # a second run skips the finished tokenizer, shards and training
    capsys.readouterr()
    assert main(argv) in (0, None)
    err = capsys.readouterr().err
    assert "training a byte-level BPE" not in err and "tokenizing" not in err and "pretraining" not in err
    assert "chat SFT" not in err and "writing chat data" not in err
    again = json.loads((out / "report.json").read_text())
    assert again["val_bpb"] == report["val_bpb"] and again["steps"] == report["steps"]
    assert again["chat"]["held_out_loss"] == chat["held_out_loss"]


def test_speedrun_skip_chat_and_bad_chat_settings(tmp_path, capsys):
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    _corpus(corpus, n_docs=100)
    base = ["speedrun", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "320", "--workers", "1",
            "--no-clean", *SMALL, "train.max_steps=5", "optim.warmup_steps=1"]
    assert main([*base, "--skip-chat"]) in (0, None)
    assert json.loads((out / "report.json").read_text())["chat"] is None and not (out / "chat").exists()
    capsys.readouterr()
    assert main([*base, "--chitchat", "0", "--chat-tasks", "0"]) == 2  # no data for the chat stage: one clear line
    err = capsys.readouterr().err
    assert "--chat-tasks or --chitchat" in err and "Traceback" not in err
