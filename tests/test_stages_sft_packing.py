"""`lmstack sft ... sft.packing=true` (lmstack/stages/sft.py with the packed loader of lmstack/data/instruct.py):
a run trains end to end on packed windows and counts the trained tokens of those windows."""

import dataclasses

import torch

from lmstack.checkpoint import save_checkpoint
from lmstack.data.instruct import InstructLoader, load_instruct, make_task_conversations, write_tasks
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.stages.sft import sft
from lmstack.tokenizer import Tokenizer


def test_sft_with_packing_trains_end_to_end(tmp_path):
    texts = [m["content"] for c in make_task_conversations(200, seed=9) for m in c["messages"]]
    tok = Tokenizer.train(texts, vocab_size=320)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=320, block_size=128, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(tmp_path / "model", GPT(cfg), {"model": dataclasses.asdict(cfg)}, tokenizer=tok)
    write_tasks(tmp_path / "tasks.jsonl", 200, seed=1)
    summary = sft(tmp_path / "model", [str(tmp_path / "tasks.jsonl")], tmp_path / "run", progress=False,
                  overrides=["train.batch_size=2", "train.seq_len=64", "train.max_steps=6", "train.log_every=2",
                             "train.eval_every=3", "train.eval_batches=2", "train.tensorboard=false",
                             "train.device=cpu", "optim.warmup_steps=0", "sft.packing=true"])
    assert summary["config"]["sft"]["packing"] is True and summary["steps"] == 6
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    # the trained tokens counted are the labels of the packed windows the run drew, not padded slots
    data = load_instruct([tmp_path / "tasks.jsonl"], tok, 65, val_fraction=0.05, seed=0)
    loader = iter(InstructLoader(data.train, 2, seed=summary["config"]["train"]["seed"], pad_id=tok.pad_id,
                                 pack_len=64))
    batches = [next(loader) for _ in range(6)]
    assert all(int(b["document_ids"].max()) >= 1 for b in batches)  # several conversations per window
    assert summary["tokens"] == sum(int((b["labels"] != -1).sum()) for b in batches)
