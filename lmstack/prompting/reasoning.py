"""Reasoning prompts: chain-of-thought, zero-shot CoT, self-consistency, least-to-most, Auto-CoT.

Each strategy takes questions (plain text) and a model that can ``generate(requests, seed=...) ->
[[text, ...], ...]`` (:class:`lmstack.evals.lm.EvalLM`), runs its stages batched over all questions (one
engine call per stage), and returns the final texts that a task's answer extraction reads.

* **Chain-of-thought** (Wei et al., 2022): demonstrations that show a worked rationale ending in "The answer
  is X." (:func:`cot_demonstration`), then ``Q: question\\nA:``; the model writes its own rationale.
* **Zero-shot CoT** (Kojima et al., 2022), two stages: ``Q: question\\nA: Let's think step by step.`` produces a
  rationale; the answer-extraction prompt appends it and ``\\nTherefore, the answer is`` (the paper's
  trigger; for numbers ``Therefore, the answer (arabic numerals) is``) and takes a short greedy answer.
* **Self-consistency** (Wang et al., 2023): k sampled rationales, an answer extracted from each, majority vote.
  Samples are drawn in rounds of ``round_size`` forks of one prefill (``SamplingParams(n=...)``); after each
  round an item stops once its leader cannot be overtaken by the samples left (:func:`majority_vote`), so the
  answer equals the full vote's and the saved samples are reported.
* **Least-to-most** (Zhou et al., 2023): a decomposition prompt lists sub-questions; they are answered in
  order, each with the earlier sub-answers in its prompt; the original question is answered last.
* **Auto-CoT** (Zhang et al., 2023): embed the questions, k-means them into k clusters (seeded), and from each
  cluster take the question nearest its centroid that passes the paper's filters (at most 60 tokens, a
  zero-shot-CoT rationale of at most 5 steps); its zero-shot-CoT rationale becomes a demonstration.

Caveat: the papers report these gains at ~100B parameters (and chain-of-thought hurting below ~10B); at
135M expect the prompts to run correctly and the accuracy to stay near the floor (see BENCHMARKS).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lmstack.evals.task import GenerationRequest

STEP_BY_STEP = "Let's think step by step."
ANSWER_TRIGGER = "Therefore, the answer is"
NUMERIC_ANSWER_TRIGGER = "Therefore, the answer (arabic numerals) is"
_THE_ANSWER_IS = re.compile(r"[Tt]he answer(?: \(arabic numerals\))? is:?\s*(.+)")


def qa_prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def cot_demonstration(question: str, rationale: str, answer: str) -> str:
    """One chain-of-thought demonstration: question, worked rationale, ``The answer is X.``"""
    rationale = rationale.strip()
    if _THE_ANSWER_IS.search(rationale):  # the rationale already ends with its answer (GSM8K's exemplars do)
        return f"{qa_prompt(question)} {rationale}"
    return f"{qa_prompt(question)} {rationale} The answer is {answer}."


def direct_demonstration(question: str, answer: str) -> str:
    """The same demonstration without a rationale (the 'direct' baseline CoT is compared with)."""
    return f"{qa_prompt(question)} The answer is {answer}."


def extract_final_answer(text: str) -> str:
    """The text after the last 'the answer is', up to the end of its sentence or line ('' when absent)."""
    matches = list(_THE_ANSWER_IS.finditer(text))
    if not matches:
        return ""
    answer = matches[-1].group(1).split("\n")[0].strip()
    return re.split(r"(?<=[^\d])\.(?:\s|$)|\.$", answer)[0].strip().rstrip(".")


def _one(lm: Any, prompts: Sequence[str], stop: list[str], max_tokens: int, seed: int) -> list[str]:
    requests = [GenerationRequest(p, list(stop), max_tokens) for p in prompts]
    return [texts[0] for texts in lm.generate(requests, seed=seed)] if requests else []


# ----------------------------------------------------------------------------- zero-shot CoT

@dataclass
class TwoStage:
    """The prompts and outputs of zero-shot CoT for one question."""

    reasoning_prompt: str
    rationale: str
    answer_prompt: str
    answer: str


def zero_shot_cot_prompts(question: str, rationale: str | None = None, trigger: str = ANSWER_TRIGGER,
                          prefix: str = "") -> tuple[str, str | None]:
    """(stage-1 prompt, stage-2 prompt once the rationale is known)."""
    first = f"{prefix}{qa_prompt(question)} {STEP_BY_STEP}"
    return first, (None if rationale is None else f"{first}{rationale}\n{trigger}")


def zero_shot_cot(lm: Any, questions: Sequence[str], *, trigger: str = ANSWER_TRIGGER, max_reasoning_tokens: int = 128,
                  max_answer_tokens: int = 16, seed: int = 1234, prefix: str = "") -> list[TwoStage]:
    """Stage 1: reason after "Let's think step by step."; stage 2: extract the answer with the trigger."""
    firsts = [zero_shot_cot_prompts(q, prefix=prefix)[0] for q in questions]
    rationales = _one(lm, firsts, ["\n\n", "\nQ:"], max_reasoning_tokens, seed)
    seconds = [zero_shot_cot_prompts(q, r, trigger, prefix)[1] for q, r in zip(questions, rationales)]
    answers = _one(lm, seconds, ["\n", "Q:"], max_answer_tokens, seed)  # type: ignore[arg-type]
    return [TwoStage(f, r, s, a.strip()) for f, r, s, a in zip(firsts, rationales, seconds, answers)]  # type: ignore


# ----------------------------------------------------------------------------- self-consistency

@dataclass
class Vote:
    answer: str                    # the majority answer ('' when no sample gave one)
    counts: dict[str, int]         # answers seen (empty extractions do not vote)
    used: int                      # samples drawn before the vote was decided
    budget: int                    # samples a full vote would draw


def vote_decided(counts: Counter, remaining: int) -> bool:
    """True once the leader cannot be caught, or tied, by the ``remaining`` samples."""
    top = counts.most_common(2)
    leader = top[0][1] if top else 0
    runner_up = top[1][1] if len(top) > 1 else 0
    return leader > runner_up + remaining


def majority_vote(answers: Sequence[str], budget: int | None = None, early_stop: bool = True) -> Vote:
    """Vote over answers in the order they were drawn; ties go to the answer that reached the count first.

    With ``early_stop`` the count stops at the first prefix after which the leader cannot be overtaken by the
    rest of the budget; the winner is then the full vote's winner (the leader is strictly ahead of every other
    answer even if all remaining samples went to one rival)."""
    budget = len(answers) if budget is None else budget
    counts: Counter = Counter()
    first_reached: dict[tuple[str, int], int] = {}
    used = 0
    for used, answer in enumerate(answers, 1):
        if answer:
            counts[answer] += 1
            first_reached.setdefault((answer, counts[answer]), used)
        if early_stop and vote_decided(counts, budget - used):
            break
    if not counts:
        return Vote("", {}, used, budget)
    best = max(counts.values())
    winner = min((a for a, c in counts.items() if c == best), key=lambda a: first_reached[(a, best)])
    return Vote(winner, dict(counts), used, budget)


def self_consistency(lm: Any, prompts: Sequence[str], extract: Callable[[str], str], *, samples: int = 8,
                     round_size: int = 4, temperature: float = 0.7, stop: Sequence[str] = ("\n\n", "\nQ:"),
                     max_tokens: int = 128, seed: int = 1234, early_stop: bool = True
                     ) -> tuple[list[Vote], list[list[str]]]:
    """Majority vote over up to ``samples`` sampled completions per prompt -> (votes, the texts drawn).

    Each round forks ``round_size`` samples from one prefill per undecided prompt; prompt i's sample j is
    seeded ``seed + 1000 * i + j`` whatever else is in the batch, so an early-stopped vote has seen exactly the
    first samples of the full one."""
    texts: list[list[str]] = [[] for _ in prompts]
    answers: list[list[str]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    while active:
        requests = []
        for i in active:
            n = min(round_size, samples - len(texts[i]))
            requests.append(GenerationRequest(prompts[i], list(stop), max_tokens, n=n, temperature=temperature,
                                              seed=seed + 1000 * i + len(texts[i])))
        for i, drawn in zip(active, lm.generate(requests, seed=seed)):
            texts[i] += drawn
            answers[i] += [extract(t) for t in drawn]
        active = [i for i in active if len(texts[i]) < samples
                  and not (early_stop and vote_decided(Counter(a for a in answers[i] if a), samples - len(texts[i])))]
    votes = [majority_vote(a, samples, early_stop) for a in answers]
    return votes, texts


# ----------------------------------------------------------------------------- least-to-most

DECOMPOSE = "To answer this, we first need to answer these simpler questions:\n1."


def decomposition_prompt(question: str, prefix: str = "") -> str:
    return f"{prefix}{qa_prompt(question)} {DECOMPOSE}"


def parse_subquestions(text: str, limit: int = 4) -> list[str]:
    """'1.' is part of the prompt: the text is sub-question 1, then lines '2. ...', '3. ...'."""
    lines = ("1." + text).split("\n")
    out = []
    for line in lines:
        match = re.match(r"\s*\d+[.)]\s*(.+)", line)
        if match and match.group(1).strip():
            out.append(match.group(1).strip())
    return out[:limit]


def solve_prompt(question: str, solved: Sequence[tuple[str, str]], current: str, prefix: str = "") -> str:
    """The sub-question prompt: the problem, then every earlier sub-question with its answer, then this one."""
    lines = [f"{prefix}Problem: {question}"]
    lines += [f"{qa_prompt(q)} {a}" for q, a in solved]
    lines.append(qa_prompt(current))
    return "\n".join(lines)


@dataclass
class LeastToMost:
    subquestions: list[str]
    subanswers: list[str] = field(default_factory=list)
    final_prompt: str = ""
    final: str = ""


def least_to_most(lm: Any, questions: Sequence[str], *, max_subquestions: int = 3, max_tokens: int = 64,
                  seed: int = 1234, prefix: str = "") -> list[LeastToMost]:
    """Decompose, then answer the sub-questions in order (each round batched over questions), then the question."""
    plans = _one(lm, [decomposition_prompt(q, prefix) for q in questions], ["\n\n", "\nQ:"], 96, seed)
    runs = [LeastToMost(parse_subquestions(p, max_subquestions)) for p in plans]
    for step in range(max_subquestions):
        todo = [i for i, r in enumerate(runs) if step < len(r.subquestions)]
        prompts = [solve_prompt(questions[i], list(zip(runs[i].subquestions, runs[i].subanswers)),
                                runs[i].subquestions[step], prefix) for i in todo]
        for i, answer in zip(todo, _one(lm, prompts, ["\n"], max_tokens, seed)):
            runs[i].subanswers.append(answer.strip())
    for run, question in zip(runs, questions):
        run.final_prompt = solve_prompt(question, list(zip(run.subquestions, run.subanswers)), question, prefix)
    for run, final in zip(runs, _one(lm, [r.final_prompt for r in runs], ["\n"], max_tokens, seed)):
        run.final = final.strip()
    return runs


# ----------------------------------------------------------------------------- Auto-CoT

def kmeans(vectors: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means++ then Lloyd iterations: vectors (N, C) -> (assignment (N,), centroids (k, C))."""
    generator = torch.Generator().manual_seed(seed)
    x = vectors.float()
    first = int(torch.randint(len(x), (1,), generator=generator))
    centroids = [x[first]]
    for _ in range(1, k):
        distance = torch.cdist(x, torch.stack(centroids)).min(dim=1).values ** 2  # (N,)
        centroids.append(x[int(torch.multinomial(distance + 1e-12, 1, generator=generator))])
    center = torch.stack(centroids)  # (k, C)
    for _ in range(iterations):
        assignment = torch.cdist(x, center).argmin(dim=1)  # (N,)
        updated = torch.stack([x[assignment == c].mean(dim=0) if (assignment == c).any() else center[c]
                               for c in range(k)])
        if torch.allclose(updated, center):
            break
        center = updated
    return torch.cdist(x, center).argmin(dim=1), center


def count_steps(rationale: str) -> int:
    """Reasoning steps: non-empty lines, or sentences when the rationale is one line."""
    lines = [line for line in rationale.strip().split("\n") if line.strip()]
    if len(lines) > 1:
        return len(lines)
    return len([s for s in re.split(r"(?<=[.!?])\s+", rationale.strip()) if s])


@dataclass
class AutoCoTDemo:
    cluster: int
    question: str
    rationale: str
    answer: str
    text: str


def auto_cot_demos(lm: Any, questions: Sequence[str], embeddings: torch.Tensor, k: int, *, count_tokens:
                   Callable[[str], int], max_question_tokens: int = 60, max_steps: int = 5, tries: int = 3,
                   trigger: str = ANSWER_TRIGGER, seed: int = 1234) -> list[AutoCoTDemo]:
    """One zero-shot-CoT demonstration per cluster of questions (see the module docstring).

    Per cluster, candidates are taken nearest-to-centroid first; a candidate over ``max_question_tokens`` is
    skipped before generating, one whose rationale has more than ``max_steps`` steps (or no answer) after;
    ``tries`` candidates per cluster at most (a cluster with none passing gives no demonstration)."""
    assignment, centroids = kmeans(embeddings, k, seed)
    queues = []
    for c in range(k):
        members = (assignment == c).nonzero()[:, 0]
        distance = (embeddings[members].float() - centroids[c]).norm(dim=1)
        ranked = [int(members[j]) for j in torch.argsort(distance, stable=True)]
        queues.append([i for i in ranked if count_tokens(questions[i]) <= max_question_tokens][:tries])
    demos: dict[int, AutoCoTDemo] = {}
    for attempt in range(tries):
        todo = [c for c in range(k) if c not in demos and attempt < len(queues[c])]
        if not todo:
            break
        runs = zero_shot_cot(lm, [questions[queues[c][attempt]] for c in todo], trigger=trigger, seed=seed)
        for c, run in zip(todo, runs):
            rationale, answer = run.rationale.strip(), run.answer.strip().rstrip(".")
            if answer and rationale and count_steps(rationale) <= max_steps:
                q = questions[queues[c][attempt]]
                text = f"{qa_prompt(q)} {STEP_BY_STEP} {rationale} The answer is {answer}."
                demos[c] = AutoCoTDemo(c, q, rationale, answer, text)
    return [demos[c] for c in sorted(demos)]

