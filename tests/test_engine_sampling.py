"""Sampling tests: penalties and filters checked exactly against their definitions, draws checked
statistically against the distribution they claim to sample, and seeds."""

from __future__ import annotations

import pytest
import torch

from lmstack.engine.sampling import (SamplingParams, SamplingRow, apply_penalties, filter_logits, make_generator,
                                     sample)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -1.0, 3.0, -2.0, 0.5])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], output_ids=[1, 3])
    assert out.tolist() == [1.0, -2.0, 3.0, -4.0, 0.5]  # tokens 2 and 4 were never seen


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, prompt_ids=[4, 4, 4], output_ids=[1, 1, 1, 2])
    assert out.tolist() == pytest.approx([0.0, -(0.5 + 0.75), -(0.5 + 0.25), 0.0, 0.0])


def test_filters_keep_exactly_the_defined_sets():
    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    logits = probs.log()

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        out = filter_logits(logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
        return torch.isfinite(out[0]).nonzero().flatten().tolist()

    assert kept() == [0, 1, 2, 3, 4]
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.7) == [0, 1]  # 0.4 + 0.3 reaches 0.7
    assert kept(top_p=0.71) == [0, 1, 2]
    assert kept(top_p=0.01) == [0]  # the most likely token always survives
    assert kept(min_p=0.5) == [0, 1]  # p >= 0.5 * 0.4
    assert kept(top_k=3, top_p=0.9) == [0, 1, 2]


def test_sampling_follows_the_filtered_tempered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(8) * 2
    params = SamplingParams(temperature=0.7, top_k=5)
    generator = make_generator(123, "cpu")
    draws = 6000
    row = SamplingRow(params, generator, [], [])
    tokens = torch.cat([sample(logits.expand(100, 8), [row] * 100) for _ in range(draws // 100)])
    counts = torch.bincount(tokens, minlength=8).float()
    expected = filter_logits((logits / 0.7)[None], torch.tensor([5]), torch.tensor([1.0]),
                             torch.tensor([0.0])).softmax(-1)[0] * draws
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    nonzero = expected > 0
    chi2 = float(((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum())
    assert chi2 < 20.5  # 99.9th percentile of chi-square with 4 degrees of freedom


def test_greedy_and_seeded_rows_in_one_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    greedy = SamplingRow(SamplingParams(temperature=0.0), None, [], [])
    seeded = lambda: SamplingRow(SamplingParams(temperature=1.0, seed=5), make_generator(5, "cpu"), [], [])
    a = sample(logits, [greedy, seeded(), greedy])
    b = sample(logits[1:2], [seeded()])
    assert a[0] == logits[0].argmax() and a[2] == logits[2].argmax()
    assert a[1] == b[0]  # same seed, same draw, whatever else is in the batch


def test_repetition_penalty_lowers_repeats_in_generation():
    from lmstack.config import tiny
    from lmstack.engine.generate import generate
    from lmstack.models import build_model

    cfg = tiny().model
    cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size = 1, 32, 50, 128
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    plain = generate(model, [1, 2, 3], SamplingParams(max_tokens=60, temperature=0.0))
    penalised = generate(model, [1, 2, 3], SamplingParams(max_tokens=60, temperature=0.0, frequency_penalty=5.0))
    distinct = lambda ids: len(set(ids))
    assert distinct(penalised) > distinct(plain)
