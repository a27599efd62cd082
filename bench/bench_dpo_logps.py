"""The DPO log-probability pass alone: lmstack's completion_logps (head only at completion positions) against the
plain Hugging Face way (full logits, log_softmax, gather), forward + backward, same weights and batch, interleaved.

    python bench/bench_dpo_logps.py        # needs runs/bench_dpo_trl (python bench/bench_dpo_trl.py prepares it)

Both sides are SmolLM2-135M-Instruct (lmstack's import and its HF export), batch = the first 4 pairs (8 rows) of
bench_dpo_trl's pairs, fp32, 2 threads; one untimed call each, then two timed rounds alternating the sides so a
changing machine load hits both alike. Prints the seconds per call. Caveat: this is the policy's log-probability
pass only, not a whole optimizer step (no reference pass, no optimizer update).
"""

import time

import torch
torch.set_num_threads(2)
from lmstack.checkpoint import load_checkpoint
from lmstack.data.preference import load_preference, collate_pairs
from lmstack.train.preference_losses import completion_logps
from transformers import AutoModelForCausalLM
ck = load_checkpoint("runs/bench-sft-peft/smollm2")
pairs = load_preference(["runs/bench_dpo_trl/pairs.jsonl"], ck.tokenizer, 128, overlong="drop", val_fraction=0).train
batch = collate_pairs(pairs[:4], ck.tokenizer.pad_id)
ours = ck.model.train()
hf = AutoModelForCausalLM.from_pretrained("runs/bench_dpo_trl/hf", dtype=torch.float32, attn_implementation="sdpa").train()
def step_ours():
    completion_logps(ours, batch).sum().backward()
def step_hf():
    logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    (lp * batch["completion_mask"][:, 1:]).sum().backward()
for f in (step_ours, step_hf): f()
t = {"ours": [], "hf": []}
for _ in range(2):
    for name, f in (("ours", step_ours), ("hf", step_hf)):
        s = time.perf_counter(); f(); t[name].append(time.perf_counter() - s)
print(t, batch["input_ids"].shape)
