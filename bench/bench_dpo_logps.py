"""The DPO log-probability pass alone: lmstack's completion_logps (head only at completion positions, each pair's
prompt run once) against the same without the shared prompt (every row in full) and the plain Hugging Face way
(full logits, log_softmax, gather), forward + backward, same weights and batch, interleaved.

    python bench/bench_dpo_logps.py        # needs runs/bench_dpo_trl (python bench/bench_dpo_trl.py prepares it)
    python bench/bench_dpo_logps.py --pairs 8 --rounds 5 --threads 2

Both sides are bench_dpo_trl's model: the lmstack checkpoint WORK/model and its HF export WORK/hf (the same
numbers), batch = the first ``--pairs`` pairs of WORK/pairs.jsonl (2 x pairs rows), fp32, ``--threads`` threads;
one untimed call each, then ``--rounds`` rounds alternating the sides so a changing machine load hits both
alike. Prints the median seconds per call and the ratio, and checks that both sides' summed log-probabilities
agree. Caveat: the policy's log-probability pass only, not a whole optimizer step (no reference pass, no
optimizer update).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", default="runs/bench_dpo_trl", help="bench_dpo_trl's work directory")
    ap.add_argument("--pairs", type=int, default=4, help="pairs in the batch")
    ap.add_argument("--max-length", type=int, default=128, help="longest pair in tokens")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per side, alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.preference import collate_pairs, load_preference
    from lmstack.train.preference_losses import completion_logps

    work = Path(args.work)
    checkpoint = load_checkpoint(work / "model")
    pairs = load_preference([work / "pairs.jsonl"], checkpoint.tokenizer, args.max_length, overlong="drop",
                            val_fraction=0).train
    batch = collate_pairs(pairs[:args.pairs], checkpoint.tokenizer.pad_id)
    ours = checkpoint.model.train()
    hf = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa").train()

    def step_ours() -> torch.Tensor:
        logps = completion_logps(ours, batch)  # (2B,)
        logps.sum().backward()
        return logps.detach()

    def step_ours_full_rows() -> torch.Tensor:
        logps = completion_logps(ours, batch, shared_prompt=False)  # (2B,)
        logps.sum().backward()
        return logps.detach()

    def step_hf() -> torch.Tensor:
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False).logits[:, :-1]  # (2B, T-1, V)
        token_logps = torch.log_softmax(logits.float(), -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
        logps = (token_logps * batch["completion_mask"][:, 1:]).sum(1)  # (2B,)
        logps.sum().backward()
        return logps.detach()

    sides = {"lmstack completion_logps": step_ours, "lmstack, every row in full": step_ours_full_rows,
             "HF full logits": step_hf}
    values = {name: step() for name, step in sides.items()}  # untimed first call
    first, *others = values.values()
    print(f"summed log-probs agree: max |diff| {max(float((first - o).abs().max()) for o in others):.2e} "
          f"over {len(first)} rows")
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, step in sides.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    for name, times in seconds.items():
        print(f"{name}: median {statistics.median(times):.3f} s per call ({', '.join(f'{t:.3f}' for t in times)})")
    ours_median = statistics.median(seconds["lmstack completion_logps"])
    ratio = statistics.median(seconds["HF full logits"]) / ours_median
    shared = statistics.median(seconds["lmstack, every row in full"]) / ours_median
    print(f"batch {tuple(batch['input_ids'].shape)}, {int(batch['completion_mask'].sum())} completion tokens; "
          f"lmstack {ratio:.2f}x faster than HF; the shared prompt {shared:.2f}x")


if __name__ == "__main__":
    main()
