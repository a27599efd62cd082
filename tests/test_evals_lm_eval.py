"""lm-evaluation-harness adapter: lm-eval runs local custom tasks (all three request types) on an lmstack model.

lm-eval's hub datasets are unreachable here, so the tasks are YAML files with local JSONL data written by the
test; the numbers are checked against lmstack's own EvalLM on the same requests.
"""

from __future__ import annotations

import json
import os

import pytest

from eval_helpers import make_tiny_checkpoint

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra: pip install -e '.[dev]'")

from lm_eval.tasks import TaskManager  # noqa: E402

from lmstack.evals.lm import EvalLM  # noqa: E402
from lmstack.evals.task import GenerationRequest  # noqa: E402
from lmstack.evals.lm_eval_adapter import LmstackLM  # noqa: E402

TASKS = {
    "lmstack_local_mc": """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "lmstack_local_ppl": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "lmstack_local_gen": """
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices[gold]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    rows = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "seven"], "gold": i % 3,
             "text": f"Document {i}: the numbers grow and the words repeat. " * 2} for i in range(5)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (tasks / f"{name}.yaml").write_text(header + body)
    return ckpt, tasks, rows


def test_lm_eval_runs_local_tasks_with_lmstack_numbers(setup):
    ckpt, tasks, rows = setup
    ours = EvalLM.from_checkpoint(str(ckpt), device="cpu", backend="plain")
    model = LmstackLM(lm=ours)
    out = lm_eval.simple_evaluate(model=model, tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks)),
                                  log_samples=True)
    res, samples = out["results"], out["samples"]
    assert set(TASKS) <= set(res)

    mc = samples["lmstack_local_mc"]
    assert len(mc) == len(rows)
    for s in mc:
        pairs = [tuple(a) for a in s["arguments"]]
        expected = [r.logprob for r in ours.loglikelihood(pairs)]
        got = [resp[0][0] for resp in s["resps"]]
        assert got == pytest.approx(expected, abs=1e-5)
    acc = sum(max(range(3), key=lambda i: s["resps"][i][0][0]) == s["doc"]["gold"] for s in mc) / len(mc)
    assert res["lmstack_local_mc"]["acc,none"] == pytest.approx(acc)

    rolling = samples["lmstack_local_ppl"]
    for s in rolling:
        [expected] = ours.loglikelihood_rolling([s["doc"]["text"]])
        assert s["resps"][0][0] == pytest.approx(expected.logprob, abs=1e-4)
    assert res["lmstack_local_ppl"]["bits_per_byte,none"] > 0

    gen = samples["lmstack_local_gen"]
    for s in gen:
        prompt = f"Question: {s['doc']['question']}\nAnswer:"
        [[expected]] = ours.generate([GenerationRequest(prompt=prompt, stop=["\n"], max_tokens=6)])
        assert s["resps"][0][0] == expected
    assert 0.0 <= res["lmstack_local_gen"]["exact_match,none"] <= 1.0


def test_adapter_is_registered_and_builds_from_a_path(setup):
    from lm_eval.api.registry import get_model

    ckpt, _, _ = setup
    cls = get_model("lmstack")
    assert cls is LmstackLM
    lm = cls.create_from_arg_string(f"pretrained={ckpt},batch_size=4,backend=plain,device=cpu")
    assert lm.lm.batch_size == 4 and lm.lm.backend == "plain"
    with pytest.raises(ValueError, match="pretrained"):
        LmstackLM()
