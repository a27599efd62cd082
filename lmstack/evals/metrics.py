"""Evaluation metrics: BLEU and chrF (sacrebleu), ROUGE (rouge-score), SQuAD exact match / F1, pass@k, CORE.

* ``bleu`` / ``chrf``: corpus-level sacrebleu scores (0-100) over hypotheses and one or more reference streams.
* ``rouge``: mean ROUGE-1/2/L F-measures over pairs (rouge-score with the Porter stemmer).
* ``squad_exact_match`` / ``squad_f1``: SQuAD v1.1 definitions (normalised text; F1 over bag of tokens),
  maximised over the acceptable answers.
* ``pass_at_k``: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), computed as a
  stable product instead of huge binomials.
* ``core_score``: CORE-style centered accuracy (DCLM, Li et al. 2024): each task's accuracy rescaled so that
  random guessing is 0 and perfect is 1, ``(acc - baseline) / (1 - baseline)``, then averaged over tasks.

Run ``python -m pytest tests/test_evals_metrics.py`` for the checks against hand-computed values.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and English articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch.isspace())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 of the prediction against the best-matching answer."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn from n, of which c are correct) passes."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i)
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def _reference_streams(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants one list per reference *stream*; accept one reference per item or a list per item."""
    if references and isinstance(references[0], str):
        return [list(references)]  # type: ignore[arg-type]
    per_item = [list(r) for r in references]  # type: ignore[union-attr]
    width = max(len(r) for r in per_item)
    return [[r[i] if i < len(r) else r[0] for r in per_item] for i in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(references)).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus chrF (character n-gram F-score, beta=2), 0-100."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"chrf: {len(hypotheses)} hypotheses but {len(references)} references")
    return float(sacrebleu.corpus_chrf(list(hypotheses), _reference_streams(references)).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-1) over hypothesis/reference pairs."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"rouge: {len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(len(hypotheses), 1)
    return {k: v / n for k, v in totals.items()}


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1 (can be negative below chance)."""
    if baseline >= 1.0:
        raise ValueError(f"a random baseline of {baseline} leaves nothing to measure")
    return (accuracy - baseline) / (1.0 - baseline)


def core_score(accuracies: Mapping[str, float], baselines: Mapping[str, float]) -> dict[str, float]:
    """CORE-style aggregate: mean centered accuracy over tasks, plus each task's centered value."""
    if not accuracies:
        return {}
    centered = {t: centered_accuracy(a, baselines.get(t, 0.0)) for t, a in accuracies.items()}
    return {"core": sum(centered.values()) / len(centered), **{f"centered/{t}": v for t, v in centered.items()}}
