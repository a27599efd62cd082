"""Shared pieces of the tool tests: a tiny GPT that has memorised a few tool-using conversations, so the
tool loop runs on real generation (greedy decoding reproduces what it memorised)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmstack.checkpoint import save_checkpoint
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.tokenizer import Tokenizer


def _call(expression: str) -> dict:
    return {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}


# Each conversation starts with a distinct user message, which is what the model keys on.
CONVERSATIONS = {
    "add": [{"role": "user", "content": "add two and three"},
            {"role": "assistant", "content": "", "tool_calls": [_call("2 + 3")]},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "the sum is 5"}],
    "hello": [{"role": "user", "content": "say hello"},
              {"role": "assistant", "content": "hello there, my friend, how are you today"}],
    "again": [{"role": "user", "content": "keep going"},
              {"role": "assistant", "content": "", "tool_calls": [_call("1 + 1")]},
              {"role": "tool", "content": "2"},
              {"role": "assistant", "content": "", "tool_calls": [_call("1 + 1")]},
              {"role": "tool", "content": "2"},
              {"role": "assistant", "content": "", "tool_calls": [_call("1 + 1")]},
              {"role": "tool", "content": "2"},
              {"role": "assistant", "content": "", "tool_calls": [_call("1 + 1")]}],
}


def build_tool_model(root: Path, max_steps: int = 600, target_loss: float = 0.012) -> Path:
    """ROOT/model: a 2-layer GPT trained until greedy decoding replays CONVERSATIONS; returns the path.

    Training stops at ``target_loss`` (about the floor: "keep going" repeats one call, so a few positions stay
    uncertain) rather than after a fixed step count: a fixed count at a high learning rate ended inside a loss
    spike on one CPU and not on another, and the model then replayed garbage."""
    texts = [str(m.get("content", "")) + str(m.get("tool_calls", "")) for c in CONVERSATIONS.values() for m in c]
    tok = Tokenizer.train(texts * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, block_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(cfg)
    rows = [tok.render_chat(c)[0] for c in CONVERSATIONS.values()]
    T = max(map(len, rows))
    idx = torch.full((len(rows), T), tok.pad_id)
    targets = torch.full((len(rows), T), -1)
    for r, row in enumerate(rows):
        idx[r, :len(row)] = torch.tensor(row)
        targets[r, :len(row) - 1] = torch.tensor(row[1:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model only loses time to intra-op threads on a busy machine
    try:
        for _ in range(max_steps):
            _, loss = model(idx, targets)
            if loss.item() < target_loss:
                break
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        else:
            raise AssertionError(f"the tool model did not memorise its conversations (loss {loss.item():.4f})")
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(root / "model", model, {"model": dataclasses.asdict(cfg)}, tokenizer=tok)
    return root / "model"
