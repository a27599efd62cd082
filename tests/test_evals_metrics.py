"""Metrics against their definitions: pass@k, SQuAD EM/F1, BLEU/chrF/ROUGE basics, CORE centering."""

from __future__ import annotations

import itertools
import math

import pytest

from lmstack.evals.metrics import (bleu, centered_accuracy, chrf, core_score, pass_at_k, rouge, squad_exact_match,
                                   squad_f1)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (4, 4, 2), (7, 1, 7), (8, 5, 4)])
def test_pass_at_k_is_the_probability_that_some_draw_passes(n, c, k):
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in d) for d in draws) / len(draws)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_rejects_bad_input():
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_squad_exact_match_and_f1():
    assert squad_exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert squad_exact_match("Eiffel", ["eiffel tower"]) == 0.0
    # prediction "eiffel" vs "eiffel tower": precision 1, recall 1/2 -> F1 2/3
    assert squad_f1("Eiffel", ["eiffel tower", "paris"]) == pytest.approx(2 / 3)
    assert squad_f1("in Paris, France", ["Paris"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert squad_f1("", ["x"]) == 0.0 and squad_f1("", [""]) == 1.0


def test_bleu_chrf_and_rouge_basics():
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert chrf(refs, refs) == pytest.approx(100.0)
    worse = ["the dog sat on a rug", "a slow red fox walks"]
    assert 0 <= bleu(worse, refs) < 50 and chrf(worse, refs) < chrf(refs, refs)
    assert bleu(worse, [[r, w] for r, w in zip(refs, worse)]) == pytest.approx(100.0)  # multi-reference
    scores = rouge(["the cat sat"], ["the cat ran"])
    assert scores["rouge1"] == pytest.approx(2 / 3) and scores["rougeL"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError):
        bleu(["a"], ["a", "b"])


def test_core_centering():
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.4, 0.5) == pytest.approx(-0.2)
    core = core_score({"a": 0.625, "b": 0.75}, {"a": 0.25, "b": 0.5})
    assert core["core"] == pytest.approx((0.5 + 0.5) / 2)
    assert core["centered/a"] == pytest.approx(0.5)
