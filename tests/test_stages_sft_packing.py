"""`lmstack sft ... sft.packing=true` (lmstack/stages/sft.py with the packed loader of lmstack/data/instruct.py):
a run trains end to end on packed windows and counts the trained tokens of those windows."""

from lmstack.checkpoint import load_checkpoint
from lmstack.data.instruct import InstructLoader, load_instruct
from lmstack.stages.sft import sft
from sft_helpers import make_sft_base


def test_sft_with_packing_trains_end_to_end(tmp_path):
    make_sft_base(tmp_path, conversations=200)
    tok = load_checkpoint(tmp_path / "model").tokenizer
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
