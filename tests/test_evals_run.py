"""The evaluation harness on a tiny random checkpoint: scorer correctness and parity, prompts, runner, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval_helpers import make_tiny_checkpoint

from lmstack.cli import main  # noqa: E402
from lmstack.errors import DataError  # noqa: E402
from lmstack.evals.lm import EvalLM, score_plain  # noqa: E402
from lmstack.evals.run import evaluate, results_table  # noqa: E402
from lmstack.evals.task import (CodeTask, Example, GenerationRequest, MultipleChoiceTask, PerplexityTask,  # noqa: E402
                                Response)
from lmstack.evals.tasks import get_task  # noqa: E402

PAIRS = [("Question: Which is a gas?\nAnswer:", " oxygen"), ("The cat sat on the", " mat"),
         ("", "A whole document with no context."), ("Numbers: 1 2 3", " 4 5 6 7 8"), ("x", " y")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt")


@pytest.fixture(scope="module")
def plain(ckpt) -> EvalLM:
    return EvalLM.from_checkpoint(str(ckpt), device="cpu", backend="plain", batch_size=3)


@pytest.fixture(scope="module")
def engine(ckpt) -> EvalLM:
    return EvalLM.from_checkpoint(str(ckpt), device="cpu", backend="engine", batch_size=4)


def _one_at_a_time(lm: EvalLM, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = lm.encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits, _ = lm.model(ids[:, :-1])
    logp = F.log_softmax(logits[0, -len(cont):].float(), dim=-1)
    target = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())


def test_plain_scorer_equals_one_sequence_at_a_time(plain):
    batched = plain.loglikelihood(PAIRS)
    for (c, x), r in zip(PAIRS, batched):
        ref, greedy = _one_at_a_time(plain, c, x)
        assert r.logprob == pytest.approx(ref, abs=1e-4)
        assert r.is_greedy == greedy
        assert r.num_tokens == len(plain.encode_pair(c, x)[1])


def test_engine_scorer_matches_plain_scorer(plain, engine):
    task = get_task("hellaswag")
    pairs = [(r.context, r.continuation) for ex in task.examples()[:3]
             for r in task.loglikelihood_requests(ex, task.fewshot_prefix(ex, 1))] + PAIRS
    a, b = plain.loglikelihood(pairs), engine.loglikelihood(pairs)
    assert [r.num_tokens for r in a] == [r.num_tokens for r in b]
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) < 1e-3
    assert [r.is_greedy for r in a] == [r.is_greedy for r in b]


def test_encode_pair_moves_trailing_space_and_uses_bos_for_empty_context(plain):
    ctx, cont = plain.encode_pair("The cat sat on the ", "mat")
    assert (ctx, cont) == plain.encode_pair("The cat sat on the", " mat")
    ctx, cont = plain.encode_pair("", "hello")
    assert ctx == [plain.tokenizer.bos_id] and plain.tokenizer.decode(cont) == "hello"


def test_rolling_loglikelihood_covers_every_token_in_windows(ckpt):
    lm = EvalLM.from_checkpoint(str(ckpt), device="cpu", backend="plain", batch_size=4)
    short_text = "A short document about science."
    [rolled] = lm.loglikelihood_rolling([short_text])
    [direct] = lm.loglikelihood([("", short_text)])
    assert rolled.logprob == pytest.approx(direct.logprob, abs=1e-4)
    lm.max_length = 16  # force several windows: each later window conditions on one token
    text = "The quick brown fox jumps over the lazy dog. " * 4
    tokens = [lm.tokenizer.bos_id] + lm.tokenizer.encode(text)
    [r] = lm.loglikelihood_rolling([text])
    assert r.num_tokens == len(tokens) - 1
    manual = 0.0
    for start in range(1, len(tokens), 15):
        manual += score_plain(lm.model, [(tokens[start - 1:start], tokens[start:start + 15])], 16)[0].logprob
    assert r.logprob == pytest.approx(manual, abs=1e-3)


def test_multiple_choice_acc_and_length_normalised_acc():
    task = MultipleChoiceTask()
    ex = Example(id="0", context="Q:", choices=["a", "much longer right answer"], gold=1)
    # total log-prob favours the short wrong answer; per byte the long right answer wins
    s = task.score(ex, Response(loglikelihoods=[-5.0, -8.0]))
    assert s["acc"] == 0.0 and s["acc_norm"] == 1.0
    assert task.reward(ex, Response(loglikelihoods=[-9.0, -1.0])) == 1.0
    assert task.reward(ex, "much longer right answer") == 1.0  # a generated text naming the gold choice


def test_fewshot_demonstrations_are_seeded_and_exclude_the_item():
    task = get_task("arc_easy")
    ex = task.examples()[7]
    a = task.sample_fewshot(ex, 5, seed=1)
    assert [d.id for d in a] == [d.id for d in task.sample_fewshot(ex, 5, seed=1)]
    assert [d.id for d in a] != [d.id for d in task.sample_fewshot(ex, 5, seed=2)]
    assert ex.id not in {d.id for d in a} and len({d.id for d in a}) == 5
    prefix = task.fewshot_prefix(ex, 2, seed=1)
    assert prefix.count("Question:") == 2 and prefix.endswith("\n\n")
    first = task.sample_fewshot(ex, 2, seed=1)[0]
    assert first.choices[first.gold] in prefix  # demonstrations carry their right answers


def test_prompt_formats_of_real_benchmarks():
    wino = get_task("winogrande").examples()[0]
    assert wino.choice_contexts and all(c.endswith(o) for c, o in zip(wino.choice_contexts, ["Sarah", "Maria"]))
    mmlu = get_task("mmlu")
    ex = mmlu.examples()[0]
    assert ex.context.endswith("\nAnswer:") and "\nA. " in ex.context and ex.choices == ["A", "B", "C", "D"]
    assert mmlu.fewshot_prefix(ex, 5).count("Answer: ") == 5
    gsm = get_task("gsm8k")
    assert len(gsm.fewshot_pool()) == 8 and "The answer is" not in gsm.examples()[0].context
    assert gsm.score(gsm.examples()[0], "She sells 9 eggs for $2 each. The answer is 18.")["exact_match"] == 1.0
    assert gsm.reward(gsm.examples()[0], "I think 17.") == 0.0


def test_code_tasks_pass_reference_solutions_and_fail_wrong_code():
    for name in ("humaneval", "mbpp"):
        task = get_task(name)
        ex = task.examples()[2]
        assert task.reward(ex, ex.answers[0]) == 1.0
        assert task.reward(ex, "    return None\n" if name == "humaneval" else "def f():\n    pass\n") == 0.0
    task = get_task("humaneval")
    ex = task.examples()[0]
    scores = task.score(ex, Response(samples=[ex.answers[0], "    return 0\n", "    while True: pass\n"]))
    assert scores["pass@1"] == pytest.approx(1 / 3)


def test_evaluate_end_to_end(plain, tmp_path):
    text_file = tmp_path / "doc.txt"
    text_file.write_text("Some text to score for perplexity. " * 5)
    results = evaluate(plain, ["arc_easy", "winogrande", "lambada", "triviaqa", f"ppl:{text_file}"], limit=3,
                       num_fewshot=1, show_progress=False)
    r = results["results"]
    assert set(r) == {"arc_easy", "winogrande", "lambada", "triviaqa", "ppl:doc.txt"}
    assert all(r[t]["n"] == 3 for t in ("arc_easy", "winogrande", "lambada", "triviaqa"))
    assert 0.0 <= r["arc_easy"]["acc"] <= 1.0 and r["arc_easy"]["baseline"] == pytest.approx(0.25, abs=0.1)
    ppl = r["ppl:doc.txt"]
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["bits_per_byte"] * math.log(2) * ppl["bytes"]
                                                       / ppl["tokens"]), rel=1e-6)
    records = results["records"]["arc_easy"]
    assert len(records) == 3 and records[0]["prompt"].count("Question:") == 2
    assert records[0]["acc"] == float(records[0]["pred"] == records[0]["gold"])
    centered = [(r[t]["acc"] - r[t]["baseline"]) / (1 - r[t]["baseline"]) for t in ("arc_easy", "winogrande", "lambada")]
    assert results["core"]["core"] == pytest.approx(sum(centered) / 3)
    table = results_table(results)
    assert "arc_easy" in table and "CORE" in table


def test_greedy_generation_plain_matches_engine(plain, engine):
    reqs = [GenerationRequest(prompt="Question: What is the capital of France?\nAnswer:", stop=["\n"], max_tokens=6),
            GenerationRequest(prompt="Once upon a time", stop=[], max_tokens=5)]
    assert plain.generate(reqs) == engine.generate(reqs)


def test_cli_eval_writes_json_and_rejects_unknown_tasks(ckpt, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", str(ckpt), "--tasks", "arc_easy,hhh_alignment", "--limit", "2", "--out", str(out),
               "--backend", "plain", "--device", "cpu"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["results"]["arc_easy"]["n"] == 2 and len(data["records"]["hhh_alignment"]) == 2
    assert "acc/harmless" in data["results"]["hhh_alignment"]
    assert "arc_easy" in capsys.readouterr().out
    assert main(["eval", "--model", str(ckpt), "--tasks", "no_such_task"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_requests_longer_than_the_context_are_counted_and_reported(plain):
    short = EvalLM(plain.model, plain.tokenizer, backend="plain", max_length=48)
    results = evaluate(short, ["arc_easy"], limit=4, num_fewshot=3, show_progress=False)
    records = results["records"]["arc_easy"]
    lengths = [sum(len(part) for part in short.encode_pair(rec["prompt"], choice))
               for rec in records for choice in rec["choices"]]
    expected = sum(n > 48 for n in lengths)
    assert expected > 0 and results["results"]["arc_easy"]["truncated"] == expected
    table = results_table(results)
    assert f"arc_easy: {expected} request(s) were longer than the model's 48-token context" in table
    assert "truncated" not in table.split("note:")[0]  # a count, not a metric row
    roomy = evaluate(plain, ["arc_easy"], limit=2, num_fewshot=0, show_progress=False)
    assert roomy["results"]["arc_easy"]["truncated"] == 0 and "note:" not in results_table(roomy)


class _TinyCode(CodeTask):
    """One item whose test passes only for code defining ``answer() == 42``; a few tokens of generation."""

    name = "tiny_code"
    max_tokens = 4

    def examples(self) -> list[Example]:
        return [Example(id="0", context="def answer():\n    return", answers=[" 42\n"], test="assert answer() == 42")]

    def program(self, ex: Example, completion: str) -> str:
        return f"{ex.context}{completion}\n{ex.test}\n"


def test_code_tasks_record_and_show_the_sandbox_isolation(plain):
    task = _TinyCode()
    assert task.reward(task.examples()[0], " 42\n") == 1.0
    results = evaluate(plain, [task], show_progress=False)
    assert results["sandbox"] == {"tiny_code": "namespaces"}  # this machine provides the contained mode
    assert results["records"]["tiny_code"][0]["isolation"] == "namespaces"
    assert results["config"]["unsafe_sandbox"] is False
    assert "sandbox: tiny_code ran in namespaces isolation (contained:" in results_table(results)
    opted_in = evaluate(plain, [task], unsafe_sandbox=True, show_progress=False)
    assert opted_in["sandbox"] == {"tiny_code": "namespaces"}  # the opt-in never weakens a capable machine
    assert "sandbox" not in evaluate(plain, ["arc_easy"], limit=1, show_progress=False)


def test_perplexity_over_no_text_is_refused_not_perfect(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["eval", "--model", str(ckpt), "--tasks", f"ppl:{empty}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no text to score" in err and len(err.splitlines()) == 1
    assert main(["eval", "--model", str(ckpt), "--tasks", "ppl:EMPTY", "--device", "cpu"]) == 2
    assert "EMPTY does not exist" in capsys.readouterr().err
    with pytest.raises(DataError, match="no text to score"):
        PerplexityTask().aggregate([])  # a perplexity of exp(0) = 1.0 is never reported for nothing
