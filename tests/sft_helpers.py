"""Shared pieces of the SFT stage tests (test_stages_sft*.py): a tiny chat-capable checkpoint with task
conversations to tune it on, and the held-out loss the tests compare before and after."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmstack.checkpoint import load_checkpoint, save_checkpoint
from lmstack.data.instruct import InstructLoader, load_instruct, make_task_conversations, write_tasks
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.tokenizer import Tokenizer


def make_sft_base(root: Path, conversations: int = 400, **model_overrides) -> Path:
    """ROOT/model (an untrained 1-layer GPT with a BPE tokenizer that has lmstack's chat format) and
    ROOT/tasks.jsonl (generated task conversations); returns ROOT."""
    texts = [m["content"] for c in make_task_conversations(conversations, seed=9) for m in c["messages"]]
    tok = Tokenizer.train(texts, vocab_size=320)
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(vocab_size=320, block_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=32),
                       **model_overrides})
    save_checkpoint(root / "model", GPT(cfg), {"model": dataclasses.asdict(cfg)}, tokenizer=tok)
    write_tasks(root / "tasks.jsonl", conversations, seed=1)
    return root


def held_out_loss(checkpoint: Path, data_file: Path) -> float:
    """Token-weighted causal LM loss of CHECKPOINT on the held-out conversations (val_fraction 0.1, seed 0)."""
    ckpt = load_checkpoint(checkpoint)
    data = load_instruct([data_file], ckpt.tokenizer, 65, val_fraction=0.1, seed=0)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in InstructLoader(data.val, 8, pad_id=ckpt.tokenizer.pad_id, shuffle=False):
            n = int((batch["labels"] != -1).sum())
            total += float(ckpt.model(batch["input_ids"], batch["labels"])[1]) * n
            tokens += n
    return total / tokens
