"""Prompting strategies: demonstration selection, the reasoning prompts' exact text, voting, and `eval --strategy`.

Selection and voting are checked as properties (determinism under a seed, MMR's diversity against k-nearest,
early-stopped votes equal to full votes over many random sequences); the multi-stage prompts are checked
word for word with a scripted generator that records what it was asked; self-consistency and the CLI run on
a tiny random checkpoint with seeds.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import torch
from eval_helpers import make_tiny_checkpoint

from lmstack.cli import main
from lmstack.errors import DataError, UserError
from lmstack.evals.lm import EvalLM
from lmstack.evals.tasks import get_task
from lmstack.prompting import reasoning
from lmstack.prompting.run import StrategyOptions, evaluate_strategy
from lmstack.prompting.select import (
    Demo,
    DemoSelector,
    file_pool,
    select_knn,
    select_mmr,
    task_pool,
)


def bag_of_words(texts) -> torch.Tensor:
    """A deterministic embedder: hashed word counts, unit length (similar wording -> similar vectors)."""
    out = torch.zeros(len(texts), 64)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z]+", text.lower()):
            out[i, sum(map(ord, word)) % 64] += 1.0
    return torch.nn.functional.normalize(out + 1e-6, dim=-1)


POOL = [Demo(f"d{i}", q, f"{q} -> {a}", a) for i, (q, a) in enumerate([
    ("the cat sat on the mat", "cat"), ("the cat sat on the mat again", "cat"), ("a cat on a mat", "cat"),
    ("dogs bark at night", "dog"), ("the stock market fell", "money"), ("rain falls in spring", "weather"),
    ("the cat chased a mouse", "cat"), ("interest rates rose", "money")])]


class Scripted:
    """Stands in for EvalLM.generate: records every request and answers with reply(prompt, index)."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def generate(self, requests, seed=1234, progress=None):
        self.requests.extend(requests)
        return [[self.reply(r.prompt, j) for j in range(r.n)] for r in requests]


# ----------------------------------------------------------------------------- selection

def test_random_selection_is_seeded_per_item_excludes_the_item_and_fixed_sets_are_shared():
    a = DemoSelector(POOL, k=3, seed=7)
    b = DemoSelector(POOL, k=3, seed=7)
    assert [d.id for d in a.select("d0", "")] == [d.id for d in b.select("d0", "")]
    assert all(d.id != "d0" for d in a.select("d0", ""))
    draws = {tuple(d.id for d in DemoSelector(POOL, k=3, seed=s).select("d0", "")) for s in range(20)}
    assert len(draws) > 5  # the seed matters
    fixed = DemoSelector(POOL, k=3, seed=7, fixed=True)
    sets = [tuple(d.id for d in fixed.select(item, "")) for item in ("x1", "x2", "x3")]
    assert len(set(sets)) == 1 and len(sets[0]) == 3
    inside = sets[0][0]  # an item that is itself in the fixed set gets another demonstration in its place
    replaced = [d.id for d in fixed.select(inside, "")]
    assert inside not in replaced and len(replaced) == 3 and set(replaced) & set(sets[0])


def test_knn_takes_the_most_similar_and_orders_them_as_asked():
    selector = DemoSelector(POOL, method="knn", k=3, embedder=bag_of_words)
    picked = [d.id for d in selector.select("q", "the cat sat on a mat")]
    assert set(picked) <= {"d0", "d1", "d2", "d6"} and picked[0] in {"d0", "d2"}
    last = DemoSelector(POOL, method="knn", k=3, embedder=bag_of_words, order="similar-last")
    assert [d.id for d in last.select("q", "the cat sat on a mat")] == picked[::-1]


def test_mmr_with_lambda_one_is_knn_and_smaller_lambda_is_more_diverse():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    # each base vector with three near-duplicates: k-nearest fills up on duplicates of the best one
    pool = torch.nn.functional.normalize(base.repeat_interleave(4, 0) + 0.01 * torch.randn(24, 16), dim=-1)
    query = torch.nn.functional.normalize(base[0] + 0.3 * base[1], dim=-1)
    knn = select_knn(query, pool, 4)
    assert select_mmr(query, pool, 4, lam=1.0) == knn
    mmr = select_mmr(query, pool, 4, lam=0.3)
    assert mmr[0] == knn[0]  # the first pick is the most relevant either way

    def max_pairwise(indices):
        sims = pool[indices] @ pool[indices].T
        return float((sims - 2 * torch.eye(len(indices))).max())

    assert max_pairwise(knn) > 0.99 and max_pairwise(mmr) < 0.9
    assert len({i // 4 for i in knn}) == 1 and len({i // 4 for i in mmr}) == 4  # one group of duplicates vs four


def test_demonstration_files_and_bad_options_give_one_clear_error(tmp_path):
    task = get_task("arc_easy")
    good = tmp_path / "demos.jsonl"
    good.write_text(json.dumps({"question": "Question: 2+2?\nAnswer:", "answer": "4"}) + "\n\n")
    [demo] = file_pool(good, task)
    assert demo.text == "Question: 2+2?\nAnswer: 4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        file_pool(bad, task)
    with pytest.raises(UserError, match="embedder"):
        DemoSelector(POOL, method="knn")
    with pytest.raises(UserError, match="lambda"):
        DemoSelector(POOL, method="mmr", embedder=bag_of_words, lam=1.5)


# ----------------------------------------------------------------------------- voting

def test_early_stopped_votes_equal_full_votes_on_random_sequences():
    rng = random.Random(0)
    saved = 0
    for trial in range(2000):
        budget = rng.randint(1, 12)
        answers = [rng.choice(["7", "7", "8", "9", ""]) for _ in range(budget)]
        full = reasoning.majority_vote(answers, early_stop=False)
        early = reasoning.majority_vote(answers)
        assert early.answer == full.answer, (answers, early, full)
        assert early.used <= budget and full.used == budget
        counts = Counter(a for a in answers[:early.used] if a)
        assert early.counts == dict(counts)
        saved += budget - early.used
    assert saved > 1000  # the early stop saves samples on lopsided votes
    assert reasoning.majority_vote(["5", "5", "5", "1", "2"]).used == 3
    assert reasoning.majority_vote(["1", "2", "2", "1"], early_stop=False).answer == "2"  # reached 2 first


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> EvalLM:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("prompting") / "ckpt", block_size=512)
    return EvalLM.from_checkpoint(str(path), device="cpu", backend="engine", batch_size=8)


def test_self_consistency_early_stop_sees_the_first_samples_of_the_full_vote(tiny_lm):
    prompts = [f"Q: what is {i} plus {i}?\nA:" for i in range(4)]
    extract = lambda text: (re.findall(r"[a-z]", text.lower()) or [""])[0]
    full, full_texts = reasoning.self_consistency(tiny_lm, prompts, extract, samples=8, round_size=2,
                                                  temperature=1.0, max_tokens=4, seed=3, early_stop=False)
    early, early_texts = reasoning.self_consistency(tiny_lm, prompts, extract, samples=8, round_size=2,
                                                    temperature=1.0, max_tokens=4, seed=3)
    for f, e, ft, et in zip(full, early, full_texts, early_texts):
        assert e.answer == f.answer
        assert et == ft[:len(et)] and e.used == len(et)
    assert all(f.used == 8 for f in full)


# ----------------------------------------------------------------------------- multi-stage prompts (exact text)

def test_zero_shot_cot_two_stage_prompts():
    lm = Scripted(lambda prompt, j: " 3 apples plus 4 apples is 7." if prompt.endswith("step.") else " 7.")
    [run] = reasoning.zero_shot_cot(lm, ["Tom has 3 apples and gets 4 more. How many?"],
                                    trigger=reasoning.NUMERIC_ANSWER_TRIGGER)
    assert run.reasoning_prompt == "Q: Tom has 3 apples and gets 4 more. How many?\nA: Let's think step by step."
    assert run.answer_prompt == ("Q: Tom has 3 apples and gets 4 more. How many?\nA: Let's think step by step."
                                 " 3 apples plus 4 apples is 7.\nTherefore, the answer (arabic numerals) is")
    assert run.answer == "7."
    assert [r.prompt for r in lm.requests] == [run.reasoning_prompt, run.answer_prompt]
    assert lm.requests[0].temperature == 0.0 and lm.requests[1].stop == ["\n", "Q:"]


def test_least_to_most_answers_sub_questions_in_order_with_earlier_answers():
    def reply(prompt, j):
        if prompt.endswith(reasoning.DECOMPOSE):
            return " How many apples does Tom start with?\n2. How many does he get?\n\nignored"
        return {"Q: How many apples does Tom start with?\nA:": " 3",
                "Q: How many does he get?\nA:": " 4"}.get(prompt.split("\n")[-2] + "\n" + prompt.split("\n")[-1], " 7")

    lm = Scripted(reply)
    [run] = reasoning.least_to_most(lm, ["Tom has 3 apples and gets 4 more. How many?"])
    assert run.subquestions == ["How many apples does Tom start with?", "How many does he get?"]
    assert run.subanswers == ["3", "4"] and run.final == "7"
    prompts = [r.prompt for r in lm.requests]
    assert prompts[1] == ("Problem: Tom has 3 apples and gets 4 more. How many?\n"
                          "Q: How many apples does Tom start with?\nA:")
    assert prompts[2] == ("Problem: Tom has 3 apples and gets 4 more. How many?\n"
                          "Q: How many apples does Tom start with?\nA: 3\nQ: How many does he get?\nA:")
    assert prompts[3] == run.final_prompt and run.final_prompt.endswith(
        "Q: How many does he get?\nA: 4\nQ: Tom has 3 apples and gets 4 more. How many?\nA:")


def test_auto_cot_clusters_and_applies_the_question_and_step_filters():
    questions = ["cats purr softly", "cats purr loudly at night", "cats purr " + "very " * 70,
                 "stocks fell today", "stocks fell sharply", "stocks rose"]
    long_rationale = "One. Two. Three. Four. Five. Six."

    def reply(prompt, j):
        if prompt.endswith("step."):
            return f" {long_rationale}" if "softly" in prompt else " They do. So yes."
        return " yes."

    lm = Scripted(reply)
    # two topics; within each, the first listed question is nearest its centroid
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.98, 0.02], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    demos = reasoning.auto_cot_demos(lm, questions, embeddings, 2, count_tokens=lambda q: len(q.split()), seed=0)
    assert len(demos) == 2
    chosen = {d.question for d in demos}
    assert questions[2] not in chosen  # over 60 tokens: never tried
    asked = [r.prompt for r in lm.requests if r.prompt.endswith("step.")]
    assert all("very very" not in p for p in asked)
    assert "cats purr softly" not in chosen  # its rationale has 6 steps > 5
    assert all(d.text == f"Q: {d.question}\nA: Let's think step by step. They do. So yes. The answer is yes."
               for d in demos)
    assert reasoning.count_steps(long_rationale) == 6 and reasoning.count_steps("a\nb\n\nc") == 3


def test_cot_demonstrations_and_answer_extraction():
    assert reasoning.cot_demonstration("2+3?", "2 plus 3 is 5.", "5") == "Q: 2+3?\nA: 2 plus 3 is 5. The answer is 5."
    assert reasoning.cot_demonstration("2+3?", "2 plus 3 is 5. The answer is 5.", "5").count("The answer is") == 1
    assert reasoning.direct_demonstration("2+3?", "5") == "Q: 2+3?\nA: The answer is 5."
    assert reasoning.extract_final_answer("so 2.5 apples. The answer is 2.5.\nQ: next") == "2.5"
    assert reasoning.extract_final_answer("no conclusion") == ""


# ----------------------------------------------------------------------------- end to end

def test_fewshot_strategy_runs_knn_selection_through_the_runner(tiny_lm):
    options = StrategyOptions(strategy="fewshot", select="knn", k=2, order="similar-last")
    results = evaluate_strategy(tiny_lm, ["arc_easy"], options, limit=3, show_progress=False)
    records = results["records"]["arc_easy"]
    task = get_task("arc_easy")
    pool = {d.text for d in task_pool(task)}
    for rec, ex in zip(records, task.examples()[:3]):
        demos = rec["prompt"][:-len(ex.context)].split("\n\n")[:-1]
        assert len(demos) == 2 and all(d in pool for d in demos)
        assert task.demonstration(ex) not in demos
    assert results["strategy"]["select"] == "knn" and results["results"]["arc_easy"]["n"] == 3


def test_reasoning_strategies_refuse_multiple_choice_tasks(tiny_lm):
    with pytest.raises(UserError, match="not a generative task"):
        evaluate_strategy(tiny_lm, ["arc_easy"], StrategyOptions(strategy="zero-shot-cot"), limit=1)


def test_cli_eval_strategy_self_consistency_on_arithmetic(tmp_path, tiny_lm):
    out = tmp_path / "sc.json"
    main(["eval", "--model", tiny_lm.name, "--tasks", "arithmetic", "--limit", "2", "--strategy",
          "self-consistency", "--sc-samples", "4", "--sc-round", "2", "--max-reasoning-tokens", "6",
          "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    metrics = results["results"]["arithmetic"]
    assert metrics["n"] == 2 and metrics["samples_used"] + metrics["samples_saved"] == 8
    assert results["strategy"]["strategy"] == "self-consistency"
    assert all(len(r["samples"]) == r["used"] for r in results["records"]["arithmetic"])
