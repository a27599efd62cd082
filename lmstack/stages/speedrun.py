"""`lmstack speedrun`: the main job, end to end on the default corpus, ending in a chat model.

    lmstack speedrun --preset tiny --out runs/speedrun
    lmstack chat --model runs/speedrun/chat          # talk to the result (OUT/chat/model)
    lmstack speedrun --out runs/base-only --skip-chat

download corpus → clean (data pipeline) → train tokenizer → tokenize into shards → pretrain
(within a wall-clock budget) → sample → chat SFT (supervised fine-tuning on conversations, its own
budget) → report. Each stage writes into OUT and is skipped when its output is already there, so an
interrupted speedrun picks up where it stopped (pretraining and SFT continue from their newest intact
checkpoints).

The report compares validation bits-per-byte with a unigram baseline on the same validation tokens:
a model that only knows token frequencies (fitted on the training split, add-one smoothed). A model
that learned anything about context must beat it clearly. Bits-per-byte is tokenizer-independent:
nats per token / ln 2 × tokens per byte of UTF-8 text.

The chat stage (:func:`chat_stage`) fine-tunes the pretrained model with :func:`lmstack.stages.sft.sft`
(packed batches, loss on the assistant turns) on two sources mixed: generated tasks with exact answers
(:func:`lmstack.data.instruct.make_task_conversations`) and real human–human conversations
(:mod:`lmstack.data.chitchat`, a seeded sample, each cut to its first two exchanges so that a step
holds more turn ends). A base model trained on books never writes the
chat format's end-of-turn token ``<|end|>``; SFT teaches it the turn structure, so ``lmstack chat``
gets a reply that stops where the assistant's turn ends. Conversations of both sources are held out
before training (OUT/chat-data/heldout_*.jsonl); the report gives the loss on them before and after SFT,
the share of replies to held-out prompts that end at ``<|end|>`` before and after, and a few samples.
Caveat: a few-million-parameter model pretrained for minutes learns the format (turn ends, short
answers in the tasks' shape), not helpfulness; its answers to the tasks are mostly wrong.

Outputs: OUT/report.md (the report card of lmstack.evals.report plus a chat section), OUT/report.json
(val_bpb, unigram_bpb, wall_seconds, params, tokens, timings per stage, ``chat``: held-out losses, turn-end
rates, samples), OUT/loss.png, OUT/train/ (the pretraining run: checkpoints, metrics.jsonl, model/),
OUT/chat/ (the SFT run; OUT/chat/model is the chat model, with the tokenizer, for chat, serve, eval and
export), OUT/chat-data/, OUT/tokenizer/, OUT/data/.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.errors import UserError

# Stage budgets on a 2-core CPU (measured in the README run: the rest of the job takes about a minute and a
# half), so that the whole job stays under 10 minutes.
DEFAULT_MINUTES = 5.0  # pretraining
DEFAULT_CHAT_MINUTES = 1.5  # chat SFT
SAMPLE_PROMPTS = ["", "The king", "And God said", "Love is"]
CHAT_PROMPTS = ["Hi! How are you doing today?", "What did you do this weekend?", "What is 12 + 7?",
                "Reverse the word: stone"]


@dataclass
class ChatSettings:
    """The chat stage of a speedrun: what it trains on and for how long."""

    minutes: float = DEFAULT_CHAT_MINUTES  # SFT wall-clock budget (train.max_minutes of the SFT run)
    tasks: int = 3000  # generated task conversations (exact answers)
    chitchat: int = 1000  # Chit-Chat conversations (real multi-turn chat; 0 leaves the source out)
    chitchat_messages: int = 4  # each cut to its first exchanges: more turn ends per trained token
    held_out: int = 32  # conversations of each source held out for the before/after loss
    overrides: tuple[str, ...] = ()  # KEY=VALUE for the SFT run (train.*, optim.*, sft.*), after the defaults


# SFT defaults for the chat stage: packed windows of the preset's context, a smaller LR than pretraining.
DEFAULT_CHAT = ChatSettings()

# Small batches: more steps in the budget; one small validation at the end (the report measures the
# held-out files itself).
CHAT_SFT_DEFAULTS = ("sft.packing=true", "train.batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=10",
                     "train.eval_every=0", "train.eval_batches=2", "sft.val_fraction=0.01", "train.ckpt_every=100")
REPLY_PROMPTS = 16  # held-out opening messages per source that the model answers, before and after SFT


def _say(msg: str) -> None:
    print(f"[speedrun] {msg}", file=sys.stderr, flush=True)


def unigram_bpb(data_dir: Path) -> float:
    """Bits-per-byte of a unigram model fitted on the train split, scored on the val split."""
    import numpy as np

    from lmstack.data.loader import load_meta

    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    vocab = int(meta["vocab_size"])

    def counts(split: str) -> np.ndarray:
        c = np.zeros(vocab, dtype=np.int64)
        for name in meta["splits"][split]["shards"]:
            c += np.bincount(np.memmap(data_dir / name, dtype=dtype, mode="r"), minlength=vocab)[:vocab]
        return c

    train, val = counts("train"), counts("val")
    probs = (train + 1) / (train.sum() + vocab)  # add-one smoothing: unseen tokens are not infinitely costly
    bits = -(val * np.log2(probs)).sum()
    return float(bits / meta["splits"]["val"]["bytes"])


def sample_texts(model_dir: Path, prompts: list[str], max_tokens: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """A few samples from the trained model through the engine (temperature 0.8, top-k 50)."""
    from lmstack.engine.engine import Engine
    from lmstack.engine.sampling import SamplingParams

    engine = Engine.from_checkpoint(model_dir, device="cpu")
    tok = engine.tokenizer
    prompt_ids = [[tok.eot_id] + tok.encode(p) for p in prompts]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed + i)
              for i in range(len(prompts))]
    outs = engine.generate(prompt_ids, params)
    return [{"prompt": p, "completion": o.outputs[0].text} for p, o in zip(prompts, outs)]


# ----------------------------------------------------------------------------- the chat stage


def write_chat_data(out: Path, settings: ChatSettings, seed: int) -> dict[str, Path]:
    """OUT/{train,heldout}_{tasks,chitchat}.jsonl (sources with 0 conversations are left out); returns the
    files by name. The held-out conversations are drawn before training and never trained on."""
    from lmstack.atomic import write_text_atomic
    from lmstack.data.instruct import make_task_conversations

    sources: dict[str, list[dict[str, Any]]] = {}
    if settings.tasks:
        sources["tasks"] = make_task_conversations(settings.tasks + settings.held_out, seed=seed)
    if settings.chitchat:
        from lmstack.data.chitchat import chitchat_conversations

        keep = max(2, settings.chitchat_messages - settings.chitchat_messages % 2)  # end on an assistant turn
        conversations = [{"messages": m[:keep]} for m in chitchat_conversations(progress=False)]
        random.Random(seed).shuffle(conversations)
        sources["chitchat"] = conversations[:settings.chitchat + settings.held_out]
    files = {}
    for name, conversations in sources.items():
        for split, part in (("heldout", conversations[:settings.held_out]), ("train", conversations[settings.held_out:])):
            files[f"{split}_{name}"] = write_text_atomic(out / f"{split}_{name}.jsonl",
                                                         "".join(json.dumps(c) + "\n" for c in part))
    return files


def held_out_loss(model_dir: Path, data_file: Path, max_tokens: int) -> float:
    """Token-weighted loss of MODEL_DIR on the assistant turns of DATA_FILE's conversations (cut to max_tokens)."""
    import torch

    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.instruct import (
        Example,
        InstructLoader,
        iter_records,
        record_messages,
        render_example,
    )

    ckpt = load_checkpoint(model_dir)
    examples = []
    for _, record in iter_records(data_file):
        e = render_example(ckpt.tokenizer, record_messages(record), "assistant")
        examples.append(Example(e.ids[:max_tokens], e.mask[:max_tokens]))
    examples = [e for e in examples if any(e.mask[1:])]
    total, tokens = 0.0, 0
    ckpt.model.eval()
    with torch.no_grad():
        for batch in InstructLoader(examples, 16, pad_id=ckpt.tokenizer.pad_id, shuffle=False):
            n = int((batch["labels"] != -1).sum())
            total += float(ckpt.model(batch["input_ids"], batch["labels"])[1]) * n
            tokens += n
    return total / tokens


def chat_replies(model_dir: Path, conversations: list[list[dict[str, str]]], max_tokens: int = 48,
                 seed: int = 0) -> list[dict[str, Any]]:
    """The model's reply to each conversation (sampled at temperature 0.7, top-k 50, seeded) through the
    engine and the tokenizer's chat format; ``ended_turn``: the reply stopped at the end-of-turn token."""
    from lmstack.engine.engine import Engine
    from lmstack.engine.sampling import SamplingParams
    from lmstack.tokenizer.special import END

    engine = Engine.from_checkpoint(model_dir, device="cpu")
    tok = engine.tokenizer
    end_id = tok.special_tokens[END]
    prompts = [tok.render_chat(messages, add_generation_prompt=True)[0] for messages in conversations]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.7, top_k=50, seed=seed + i)
              for i in range(len(prompts))]
    outs = engine.generate(prompts, params)
    return [{"user": messages[-1]["content"], "reply": o.outputs[0].text,
             "ended_turn": bool(o.outputs[0].token_ids) and o.outputs[0].token_ids[-1] == end_id}
            for messages, o in zip(conversations, outs)]


def chat_stage(out: Path, base_model: Path, preset: str, settings: ChatSettings, seed: int) -> dict[str, Any]:
    """Fine-tune BASE_MODEL into OUT/chat (reused when finished) and measure it against the base."""
    from lmstack.stages.sft import sft

    data_dir = out / "chat-data"
    if not all((data_dir / f"{split}_{name}.jsonl").is_file() for split in ("train", "heldout")
               for name, n in (("tasks", settings.tasks), ("chitchat", settings.chitchat)) if n):
        _say(f"writing chat data: {settings.tasks} task and {settings.chitchat} Chit-Chat conversations, "
             f"{settings.held_out} of each held out")
        write_chat_data(data_dir, settings, seed)
    sources = [name for name, n in (("tasks", settings.tasks), ("chitchat", settings.chitchat)) if n]
    if not sources:
        raise UserError("the chat stage needs data: set --chat-tasks or --chitchat above 0, or pass --skip-chat")
    run_dir = out / "chat"
    overrides = [*CHAT_SFT_DEFAULTS, f"train.max_minutes={settings.minutes}", *settings.overrides]
    if (run_dir / "summary.json").is_file() and (run_dir / "model").is_dir():
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        _say(f"chat SFT on {' + '.join(sources)} for up to {settings.minutes:g} minutes")
        summary = sft(base_model, [str(data_dir / f"train_{name}.jsonl") for name in sources], run_dir,
                      preset=preset, overrides=overrides, resume=run_dir.exists())
    max_tokens = int(summary["config"]["train"]["seq_len"]) + 1 if "config" in summary else 257
    losses = {name: {"before": held_out_loss(base_model, data_dir / f"heldout_{name}.jsonl", max_tokens),
                     "after": held_out_loss(run_dir / "model", data_dir / f"heldout_{name}.jsonl", max_tokens)}
              for name in sources}
    first_turns = []  # the opening user message of the first held-out conversations of each source
    for name in sources:
        with open(data_dir / f"heldout_{name}.jsonl", encoding="utf-8") as f:
            first_turns += [json.loads(line)["messages"] for line in f][:REPLY_PROMPTS]
    first_turns = [[next(m for m in messages if m["role"] == "user")] for messages in first_turns]
    before = chat_replies(base_model, first_turns, seed=seed)
    after = chat_replies(run_dir / "model", first_turns, seed=seed)
    samples = chat_replies(run_dir / "model", [[{"role": "user", "content": p}] for p in CHAT_PROMPTS], seed=seed)
    return {"model_dir": str(run_dir / "model"), "sources": sources, "steps": summary.get("steps"),
            "tokens": summary.get("tokens"), "held_out_loss": losses,
            "ended_turn_before": sum(r["ended_turn"] for r in before) / len(before),
            "ended_turn_after": sum(r["ended_turn"] for r in after) / len(after),
            "held_out_prompts": len(first_turns), "samples": samples}


def speedrun(out_dir: str | Path = "runs/speedrun", corpus: str = "classics", preset: str = "tiny",
             config_file: str | None = None, overrides: list[str] | None = None, vocab_size: int | None = None,
             minutes: float | None = None, clean: bool = True, workers: int = 2,
             chat: ChatSettings | None = DEFAULT_CHAT) -> dict[str, Any]:
    """Run every stage into OUT_DIR (reusing finished ones) and return the report dict; ``chat=None`` stops
    after pretraining and its samples (no OUT/chat)."""
    from lmstack.atomic import write_atomic, write_json_atomic, write_text_atomic
    from lmstack.config import build_run_config
    from lmstack.data.corpora import download_corpus
    from lmstack.data.readers import iter_documents
    from lmstack.data.shards import tokenize_to_shards
    from lmstack.stages.pretrain import pretrain
    from lmstack.tokenizer import Tokenizer

    run_began = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    cfg = build_run_config(preset, config_file, overrides)  # validate early, before any slow work
    timings: dict[str, float] = {}

    # 1. corpus
    began = time.time()
    corpus_path = Path(corpus)
    if not corpus_path.exists():
        _say(f"downloading corpus {corpus!r}")
        corpus_path = download_corpus(corpus)
    inputs = [corpus_path]
    timings["download"] = time.time() - began

    # 2. clean
    clean_report = None
    if clean:
        began = time.time()
        from lmstack.data.pipeline import clean_corpus

        _say("cleaning the corpus (normalize, filter, dedup, PII scrub, decontaminate)")
        clean_report = clean_corpus(inputs, out / "clean", workers=workers)
        inputs = [out / "clean"]
        timings["clean"] = time.time() - began

    # 3. tokenizer
    began = time.time()
    vocab = vocab_size or cfg.model.vocab_size
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() and Tokenizer.load(tok_dir).vocab_size == vocab:
        tokenizer = Tokenizer.load(tok_dir)
    else:
        _say(f"training a byte-level BPE tokenizer, vocabulary {vocab}")
        tokenizer = Tokenizer.train((d.text for d in iter_documents(inputs)), vocab_size=vocab)
        tokenizer.save(tok_dir)
    timings["tokenizer"] = time.time() - began

    # 4. shards
    began = time.time()
    data_dir = out / "data"
    if not (data_dir / "meta.json").is_file():
        _say("tokenizing into shards")
        tokenize_to_shards(inputs, tokenizer, data_dir, workers=workers)
    timings["tokenize"] = time.time() - began

    # 5. pretrain: reuse a finished run; continue an interrupted one (from its newest intact checkpoint,
    # or from scratch when it died before its first one)
    began = time.time()
    budget = minutes if minutes is not None else DEFAULT_MINUTES
    train_overrides = overrides + ([f"train.max_minutes={budget}"] if not any(
        o.startswith("train.max_minutes=") for o in overrides) else [])
    run_dir = out / "train"
    if (run_dir / "summary.json").is_file() and (run_dir / "model").is_dir():
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        _say(f"pretraining preset {preset!r} for up to {budget:g} minutes")
        summary = pretrain(data_dir, run_dir, preset=preset, config_file=config_file, overrides=train_overrides,
                           resume=run_dir.exists())
    timings["pretrain"] = time.time() - began
    if (run_dir / "loss.png").is_file():
        write_atomic(out / "loss.png", lambda tmp: shutil.copyfile(run_dir / "loss.png", tmp), suffix=".png")

    # 6. baseline + samples
    began = time.time()
    baseline = unigram_bpb(data_dir)
    samples = sample_texts(run_dir / "model", SAMPLE_PROMPTS, seed=cfg.train.seed)
    timings["sample"] = time.time() - began

    # 7. chat SFT: the pretrained model learns the chat format's turns
    chat_report = None
    if chat is not None:
        began = time.time()
        chat_report = chat_stage(out, run_dir / "model", preset, chat, seed=cfg.train.seed)
        timings["chat"] = time.time() - began

    wall = time.time() - run_began
    report = {
        "val_bpb": summary["final_val_bpb"], "unigram_bpb": baseline, "val_loss": summary["final_val_loss"],
        "wall_seconds": wall, "params": summary["params"], "tokens": summary["tokens"],
        "steps": summary["steps"], "tokens_per_second": summary["tokens_per_second"],
        "preset": preset, "vocab_size": tokenizer.vocab_size, "timings": timings,
        "documents_kept": (clean_report or {}).get("documents_out"), "samples": samples,
        "model_dir": str(run_dir / "model"), "chat": chat_report,
    }
    write_json_atomic(out / "report.json", report)
    from lmstack.evals.report import build_report

    card = build_report(out)  # OUT/report.md, the report card: training curves, samples and any evaluations of this run
    if chat_report is not None:
        write_text_atomic(card, card.read_text() + "\n" + "\n".join(chat_report_lines(chat_report)) + "\n")
    _print_summary(report)
    return report


def chat_report_lines(chat: dict[str, Any]) -> list[str]:
    """The report card's chat section (Markdown lines)."""
    lines = ["## Chat model (SFT)", "",
             (f"`{chat['model_dir']}`: the pretrained model fine-tuned for {chat['steps']} steps "
              f"({chat['tokens']:,} trained tokens) on {' + '.join(chat['sources'])} conversations. "
              f"Talk to it with `lmstack chat --model {Path(chat['model_dir']).parent}`."), "",
             "| held-out conversations | loss before SFT | loss after SFT |", "|---|---:|---:|"]
    for name, loss in chat["held_out_loss"].items():
        lines.append(f"| {name} | {loss['before']:.3f} | {loss['after']:.3f} |")
    lines += ["", (f"Replies to the {chat['held_out_prompts']} held-out opening messages that end at the "
                   f"end-of-turn token: {chat['ended_turn_before']:.0%} before SFT, {chat['ended_turn_after']:.0%} "
                   "after."), "",
              "| user | chat model's reply | ended its turn |", "|---|---|---|"]
    for s in chat["samples"]:
        cell = " ".join(s["reply"].split()).replace("|", "\\|")
        lines.append(f"| {s['user']} | {cell} | {'yes' if s['ended_turn'] else 'no'} |")
    return lines


def _print_summary(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="speedrun", show_header=False)
    table.add_row("parameters", f"{r['params'] / 1e6:.2f}M")
    table.add_row("tokens seen", f"{r['tokens']:,}")
    table.add_row("wall time", f"{r['wall_seconds'] / 60:.1f} min")
    table.add_row("val bits/byte", f"{r['val_bpb']:.3f}")
    table.add_row("unigram bits/byte", f"{r['unigram_bpb']:.3f}")
    console = Console(stderr=True)
    console.print(table)
    for s in r["samples"]:
        console.print(Text.assemble((s["prompt"] or "<doc>", "bold"), s["completion"]))  # no markup parsing
    chat = r.get("chat")
    if chat:
        for name, loss in chat["held_out_loss"].items():
            console.print(f"held-out {name} loss: {loss['before']:.3f} before SFT, {loss['after']:.3f} after")
        console.print(f"replies that end their turn: {chat['ended_turn_before']:.0%} before SFT, "
                      f"{chat['ended_turn_after']:.0%} after")
        for s in chat["samples"]:
            console.print(Text.assemble(("you> ", "bold"), s["user"], "\n", ("chat> ", "bold"), s["reply"]))
    if not (r["val_bpb"] < r["unigram_bpb"]) or math.isnan(r["val_bpb"]):
        console.print("[yellow]warning: the model did not beat the unigram baseline[/yellow]")
