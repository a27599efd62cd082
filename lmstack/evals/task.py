"""The one Task interface for evaluation and for rewards: a task yields examples and scores a response.

Every benchmark in ``lmstack/evals/tasks/`` is a subclass of one of four modes:

=====================  ==============================================  ===========================================
mode                   what the model is asked                          metrics
=====================  ==============================================  ===========================================
``MultipleChoiceTask`` log-likelihood of each choice after the context  ``acc`` (argmax of the summed log-prob),
                                                                        ``acc_norm`` (log-prob per byte of choice)
``PerplexityTask``     log-likelihood of whole texts (rolling windows)  ``perplexity`` (per token), ``bits_per_byte``
``TargetTask``         log-likelihood of one target after a context     ``acc`` (target is the greedy continuation),
                                                                        ``perplexity``, ``bits_per_byte``
``GenerativeTask``     greedy generation, then answer extraction        ``exact_match``, ``f1`` (SQuAD-style)
``CodeTask``           generation, then execution in the sandbox        ``pass@1`` (and ``pass@k`` with n samples)
=====================  ==============================================  ===========================================

The runner (run.py) turns a task's *requests* into model calls and hands the model's answer back as a
:class:`Response`; :meth:`Task.score` turns ``(example, response)`` into per-item metrics, and
:meth:`Task.aggregate` turns the items into task metrics. :meth:`Task.reward` is the RL hook: it scores a
generated text and returns the task's primary metric, so a GRPO reward is ``task.reward(example, text)``
unless a stage overrides it.

Few-shot demonstrations are sampled per example with ``random.Random(f"{seed}:{task}:{example.id}")``
(string seeds hash with SHA-512, so the choice is stable across processes and independent of --limit), from
the task's few-shot pool without the example itself.

Prompt formats follow lm-evaluation-harness conventions where one exists (e.g. ``"Question: …\\nAnswer:"`` with
choices scored as `` <choice>``), so numbers are comparable in spirit, not guaranteed identical.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from lmstack.errors import DataError
from lmstack.evals.metrics import normalize_answer

# ----------------------------------------------------------------------------- data types


@dataclass
class Example:
    """One benchmark item, already in the shape its mode needs."""

    id: str
    context: str                                          # what the model conditions on (no demonstrations)
    choices: list[str] = field(default_factory=list)      # multiple choice: candidate continuations
    gold: int | None = None                               # multiple choice: index of the right choice
    answers: list[str] = field(default_factory=list)      # generative / target: acceptable answers
    choice_contexts: list[str] | None = None              # Winogrande-style: one context per choice
    test: str = ""                                        # code: a program that raises unless the code is right
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Response:
    """What the model produced for one example (the fields its task's mode needs)."""

    text: str | None = None                     # generative: the (first) generated text
    samples: list[str] | None = None            # code / generative with n > 1: every sample
    loglikelihoods: list[float] | None = None   # multiple choice / target / perplexity: summed log-probs (nats)
    token_counts: list[int] | None = None       # tokens in each scored continuation
    is_greedy: list[bool] | None = None         # whether each continuation is the model's greedy continuation


@dataclass
class LoglikelihoodRequest:
    context: str
    continuation: str


@dataclass
class GenerationRequest:
    prompt: str
    stop: list[str]
    max_tokens: int
    n: int = 1
    temperature: float = 0.0
    seed: int | None = None   # sample i is seeded seed + i; None: the runner's seed + the request's index


# ----------------------------------------------------------------------------- text helpers (shared by tasks)

# ----------------------------------------------------------------------------- the interface


class Task:
    """Base class: yields examples, builds prompts with seeded few-shot demonstrations, scores responses."""

    name: str = ""
    mode: str = ""                       # multiple_choice | perplexity | target | generate | code
    primary_metric: str = "acc"
    description: str = ""                # a line of text put before the demonstrations ("The following are …")
    fewshot_separator: str = "\n\n"
    target_delimiter: str = " "
    random_baseline: float | None = None  # accuracy of guessing; None = computed from the items (CORE centering)

    # -- data ----------------------------------------------------------------
    def examples(self) -> list[Example]:
        """The evaluation items, in a fixed order (``--limit N`` takes the first N)."""
        raise NotImplementedError

    def fewshot_pool(self) -> list[Example]:
        """Items demonstrations are drawn from (default: the evaluation items, the current one excluded)."""
        return self.examples()

    # -- prompting -----------------------------------------------------------
    def doc_to_text(self, ex: Example) -> str:
        return ex.context

    def doc_to_target(self, ex: Example) -> str:
        if ex.gold is not None and ex.choices:
            return ex.choices[ex.gold]
        return ex.answers[0] if ex.answers else ""

    def demonstration(self, ex: Example) -> str:
        return self.doc_to_text(ex) + self.target_delimiter + self.doc_to_target(ex)

    def sample_fewshot(self, ex: Example, k: int, seed: int = 1234) -> list[Example]:
        if k <= 0:
            return []
        pool = [d for d in self.fewshot_pool() if d.id != ex.id]
        rng = random.Random(f"{seed}:{self.name}:{ex.id}")
        return rng.sample(pool, min(k, len(pool)))

    def fewshot_prefix(self, ex: Example, k: int, seed: int = 1234) -> str:
        """Description plus k demonstrations, each followed by the separator ('' when k == 0 and no description)."""
        demos = self.sample_fewshot(ex, k, seed)
        prefix = self.description
        for d in demos:
            prefix += self.demonstration(d) + self.fewshot_separator
        return prefix

    # -- scoring -------------------------------------------------------------
    def score(self, ex: Example, response: Response | str) -> dict[str, float]:
        raise NotImplementedError

    def aggregate(self, item_scores: Sequence[dict[str, float]]) -> dict[str, float]:
        """Mean of every per-item metric (modes with corpus-level metrics override this)."""
        if not item_scores:
            return {}
        keys = [k for k in item_scores[0] if not k.startswith("_")]
        return {k: sum(float(s[k]) for s in item_scores) / len(item_scores) for k in keys}

    def reward(self, ex: Example, response: Response | str) -> float:
        """RL reward: the task's primary metric for one response (a generated text for generative tasks)."""
        return float(self.score(ex, response)[self.primary_metric])

    def baseline(self, examples: Sequence[Example]) -> float:
        """Expected primary metric of random guessing, for CORE-style centering."""
        if self.random_baseline is not None:
            return self.random_baseline
        sizes = [len(e.choices) for e in examples if e.choices]
        return sum(1.0 / n for n in sizes) / len(sizes) if sizes else 0.0


def _as_response(response: Response | str) -> Response:
    return Response(text=response, samples=[response]) if isinstance(response, str) else response


class MultipleChoiceTask(Task):
    """Pick the choice with the highest log-likelihood after the (shared or per-choice) context."""

    mode = "multiple_choice"
    primary_metric = "acc"

    def loglikelihood_requests(self, ex: Example, prefix: str) -> list[LoglikelihoodRequest]:
        if ex.choice_contexts is not None:  # partial scoring: contexts differ, the continuation is shared
            return [LoglikelihoodRequest(prefix + c, self.target_delimiter + ex.choices[0])
                    for c in ex.choice_contexts]
        ctx = prefix + self.doc_to_text(ex)
        return [LoglikelihoodRequest(ctx, self.target_delimiter + c) for c in ex.choices]

    def score(self, ex: Example, response: Response | str) -> dict[str, float]:
        r = _as_response(response)
        if r.loglikelihoods is None:
            if r.text is None:
                raise ValueError(f"{self.name}: a multiple-choice response needs loglikelihoods or a text")
            # a generated answer (e.g. an RL policy's text): right when it names the gold choice
            said = normalize_answer(r.text)
            gold = normalize_answer(ex.choices[ex.gold]) if ex.gold is not None else ""
            hit = float(bool(gold) and (said == gold or said.startswith(gold + " ") or said.endswith(" " + gold)))
            return {"acc": hit, "acc_norm": hit}
        ll = r.loglikelihoods
        if ex.choice_contexts is not None:
            lengths = [len(ex.choices[0].encode("utf-8")) or 1] * len(ll)
        else:
            lengths = [len((self.target_delimiter + c).encode("utf-8")) or 1 for c in ex.choices]
        pred = max(range(len(ll)), key=lambda i: ll[i])
        pred_norm = max(range(len(ll)), key=lambda i: ll[i] / lengths[i])
        return {"acc": float(pred == ex.gold), "acc_norm": float(pred_norm == ex.gold),
                "_pred": pred, "_pred_norm": pred_norm}


class PerplexityTask(Task):
    """Language-model scoring of whole texts: token perplexity and bits per byte (corpus level)."""

    mode = "perplexity"
    primary_metric = "bits_per_byte"
    random_baseline = 0.0

    def documents(self) -> list[Example]:
        return self.examples()

    def score(self, ex: Example, response: Response | str) -> dict[str, float]:
        r = _as_response(response)
        if r.loglikelihoods is None or r.token_counts is None:
            raise ValueError(f"{self.name}: a perplexity response needs loglikelihoods and token_counts")
        nll = -sum(r.loglikelihoods)
        num_bytes = len(ex.context.encode("utf-8"))
        return {"nll": nll, "tokens": float(sum(r.token_counts)), "bytes": float(num_bytes),
                "bits_per_byte": nll / math.log(2) / max(num_bytes, 1)}

    def aggregate(self, item_scores: Sequence[dict[str, float]]) -> dict[str, float]:
        nll = sum(s["nll"] for s in item_scores)
        tokens = sum(s["tokens"] for s in item_scores)
        num_bytes = sum(s["bytes"] for s in item_scores)
        if tokens == 0:  # exp(0 / 1) would report a perfect perplexity of 1.0 for nothing scored
            raise DataError(f"{self.name}: there is no text to score; give a file or directory with non-empty "
                            "documents")
        return {"perplexity": math.exp(nll / max(tokens, 1)), "bits_per_byte": nll / math.log(2) / max(num_bytes, 1),
                "tokens": tokens, "bytes": num_bytes}


class TargetTask(Task):
    """Score one target continuation (LAMBADA): accuracy = the target is the greedy continuation."""

    mode = "target"
    primary_metric = "acc"
    random_baseline = 0.0

    def loglikelihood_requests(self, ex: Example, prefix: str) -> list[LoglikelihoodRequest]:
        return [LoglikelihoodRequest(prefix + self.doc_to_text(ex), self.target_delimiter + ex.answers[0])]

    def score(self, ex: Example, response: Response | str) -> dict[str, float]:
        r = _as_response(response)
        if r.loglikelihoods is None:
            said = (r.text or "").strip().split()
            hit = float(bool(said) and said[0].strip(".,;:!?\"'") == ex.answers[0])
            return {"acc": hit}
        num_bytes = len((self.target_delimiter + ex.answers[0]).encode("utf-8"))
        return {"acc": float(bool(r.is_greedy and r.is_greedy[0])), "_ll": r.loglikelihoods[0],
                "_bytes": float(num_bytes)}

    def aggregate(self, item_scores: Sequence[dict[str, float]]) -> dict[str, float]:
        out = {"acc": sum(s["acc"] for s in item_scores) / max(len(item_scores), 1)}
        if item_scores and "_ll" in item_scores[0]:
            lls = [s["_ll"] for s in item_scores]
            out["perplexity"] = math.exp(-sum(lls) / len(lls))  # lm-eval convention: per item, not per token
            out["bits_per_byte"] = -sum(lls) / math.log(2) / max(sum(s["_bytes"] for s in item_scores), 1)
        return out


class GenerativeTask(Task):
    """Greedy generation up to a stop string, answer extraction, exact match and F1 against the answers."""

    mode = "generate"
    primary_metric = "exact_match"
    random_baseline = 0.0
    stop: list[str] = ["\n\n", "\nQuestion:"]
    max_tokens: int = 64

    def generation_request(self, ex: Example, prefix: str, n: int = 1, temperature: float = 0.0) -> GenerationRequest:
        return GenerationRequest(prompt=prefix + self.doc_to_text(ex), stop=list(self.stop),
                                 max_tokens=self.max_tokens, n=n, temperature=temperature)

    def extract_answer(self, text: str) -> str:
        """The part of a generation that is compared with the answers (default: the first line)."""
        return text.strip().split("\n")[0].strip()

    def score(self, ex: Example, response: Response | str) -> dict[str, float]:
        from lmstack.evals.metrics import squad_exact_match, squad_f1

        r = _as_response(response)
        answer = self.extract_answer(r.text or "")
        return {"exact_match": squad_exact_match(answer, ex.answers), "f1": squad_f1(answer, ex.answers),
                "_answer": answer}


class CodeTask(GenerativeTask):
    """Generate a program, run it with the task's tests in the sandbox; pass@k over n samples."""

    mode = "code"
    primary_metric = "pass@1"
    max_tokens = 384
    timeout_s: float = 10.0
    allow_unsafe_sandbox: bool = False  # the user's opt-in to the escapable sandbox mode (see evals/sandbox.py)

    def program(self, ex: Example, completion: str) -> str:
        """The full program to execute: the code under test followed by its tests."""
        raise NotImplementedError

    def score(self, ex: Example, response: Response | str) -> dict[str, float]:
        from lmstack.evals.metrics import pass_at_k
        from lmstack.evals.sandbox import SandboxLimits, run_python

        r = _as_response(response)
        samples = r.samples if r.samples is not None else [r.text or ""]
        limits = SandboxLimits(timeout_s=self.timeout_s, allow_unsafe=self.allow_unsafe_sandbox)
        results = [run_python(self.program(ex, s), limits=limits) for s in samples]
        passed = sum(res.passed for res in results)
        out: dict[str, Any] = {f"pass@{k}": pass_at_k(len(samples), passed, k)
                               for k in (1, 10, 100) if k <= len(samples)}
        out["_statuses"] = [res.status for res in results]
        out["_isolation"] = ",".join(sorted({res.isolation for res in results}))  # the sandbox mode it ran in
        return out
