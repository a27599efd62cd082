"""Model-based filters: the hashed n-gram quality classifier (train, save/load, filter, CLI) and the
perplexity filter on a tiny randomly initialised lmstack checkpoint."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from lmstack.cli import main
from lmstack.config import ConfigError
from lmstack.data.clean import CleanDoc, StageStats
from lmstack.data.quality import (PerplexityScorer, QualityClassifier, QualityConfig, QualityFilter,
                                  perplexity_cutoffs, roc_auc, train_classifier)

SUBJECTS = ["the farmer", "a young scholar", "the old captain", "her sister", "the village priest", "a traveller"]
VERBS = ["walked slowly to", "wrote a long letter about", "remembered", "argued at supper about", "painted"]
OBJECTS = ["the harbour in winter", "the fields after the harvest", "the quarrel with his brother",
           "the library of the abbey", "a journey across the mountains"]
SPAM = ["buy", "cheap", "free", "click", "deal", "best", "price", "viagra", "casino", "win", "offer", "now",
        "discount", "sale", "bonus", "cash", "prize", "limited", "hot", "xxx"]


def prose(rng: random.Random) -> str:
    return " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                    for _ in range(rng.randint(3, 8)))


def spam(rng: random.Random) -> str:
    return " ".join(rng.choice(SPAM) for _ in range(rng.randint(15, 40))) + " !!!"


@pytest.fixture(scope="module")
def example_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    rng = random.Random(0)
    pos = d / "good.jsonl"
    pos.write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(150)))
    (d / "bad").mkdir()
    for i in range(150):
        (d / "bad" / f"{i:03d}.txt").write_text(spam(rng))
    return pos, d / "bad"


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.integers(0, 2, size=60)
    pairs = [(1.0 if s1 > s0 else 0.5 if s1 == s0 else 0.0) for s1, l1 in zip(scores, labels) if l1
             for s0, l0 in zip(scores, labels) if not l0]
    assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))


def test_train_save_load_and_filter(example_files, tmp_path):
    pos, neg = example_files
    out = tmp_path / "clf.npz"
    metrics = train_classifier([pos], [neg], out, n_features=1 << 14, epochs=60, val_fraction=0.2)
    assert metrics["val_accuracy"] >= 0.95 and metrics["val_auc"] >= 0.95
    assert metrics["train_docs"] + metrics["val_docs"] == 300
    clf = QualityClassifier.load(out)
    assert clf.metrics == metrics and clf.n_features == 1 << 14
    rng = random.Random(5)
    good, bad = prose(rng), spam(rng)
    p_good, p_bad = clf.predict_proba([good, bad])
    assert p_good > 0.5 > p_bad
    stats = StageStats("quality")
    kept = QualityFilter(QualityConfig(classifier=str(out)))([CleanDoc("g", good, "s"), CleanDoc("b", bad, "s")], stats)
    assert [d.id for d in kept] == ["g"] and 0.5 < kept[0].meta["quality_score"] <= 1
    assert stats.removed["quality_classifier"] == 1


def test_training_lowers_the_loss_and_learns_from_features():
    from lmstack.data.quality import fit_logistic, hashed_features

    rng = random.Random(1)
    texts = [prose(rng) for _ in range(40)] + [spam(rng) for _ in range(40)]
    labels = np.array([1] * 40 + [0] * 40)
    indptr, indices, values = hashed_features(texts, 4096)
    assert np.allclose(np.add.reduceat(values ** 2, indptr[:-1]), 1.0, atol=1e-5)  # unit L2 norm per row
    _, _, losses = fit_logistic(indptr, indices, values, labels, 4096, epochs=40)
    assert losses[0] == pytest.approx(math.log(2)) and losses[-1] < 0.2


def test_classifier_errors(tmp_path, example_files):
    with pytest.raises(ConfigError, match="does not exist"):
        QualityClassifier.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    np.savez(junk, other=np.zeros(3))
    with pytest.raises(ConfigError, match="not an lmstack quality classifier"):
        QualityClassifier.load(junk)
    pos, _ = example_files
    with pytest.raises(ConfigError, match="at least 2 documents per class"):
        one = tmp_path / "one.txt"
        one.write_text("just one document")
        train_classifier([pos], [one], tmp_path / "x.npz")


def test_cli_train_classifier(example_files, tmp_path, capsys):
    pos, neg = example_files
    out = tmp_path / "cli_clf.npz"
    assert main(["data", "train-classifier", "--positive", str(pos), "--negative", str(neg), "--out", str(out),
                 "--features", "8192", "--epochs", "40"]) == 0
    printed = capsys.readouterr().out
    assert "validation accuracy" in printed and out.is_file()
    assert main(["data", "train-classifier", "--positive", str(pos), "--negative", str(tmp_path / "nope"),
                 "--out", str(out)]) == 2


# ----------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from lmstack.config import apply_overrides, tiny
    from lmstack.models import build_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.checkpoint import save_checkpoint

    rng = random.Random(0)
    tokenizer = Tokenizer.train([prose(rng) for _ in range(200)] + [spam(rng) for _ in range(50)], vocab_size=300)
    cfg = apply_overrides(tiny(), ["model.n_layer=1", "model.n_head=2", "model.n_kv_head=2", "model.n_embd=32",
                                   f"model.vocab_size={tokenizer.vocab_size}", "model.block_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # a fresh model's logits are near-uniform; sharpen them so perplexities differ
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model, cfg.to_dict(), tokenizer=tokenizer)
    return path


def test_perplexity_scores_match_the_models_own_loss(tiny_checkpoint):
    from lmstack.checkpoint import load_checkpoint

    rng = random.Random(3)
    texts = [prose(rng) for _ in range(5)] + [spam(rng), "a"]
    scorer = PerplexityScorer(tiny_checkpoint, max_tokens=40, batch_size=3)
    batched = scorer.score(texts)
    ckpt = load_checkpoint(tiny_checkpoint)
    for text, ppl in zip(texts, batched):
        ids = ckpt.tokenizer.encode(text)[:40]
        if len(ids) < 2:
            assert math.isnan(ppl)
            continue
        x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
        with torch.no_grad():
            _, loss = ckpt.model(x, y)
        assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-4)


def test_perplexity_cutoffs_drop_the_tails():
    scores = list(range(1, 101)) + [None, float("nan")]
    low, high = perplexity_cutoffs(scores, QualityConfig(perplexity_low_quantile=0.1, perplexity_high_quantile=0.1))
    assert low == pytest.approx(10.9) and high == pytest.approx(90.1)
    kept = [s for s in range(1, 101) if low <= s <= high]
    assert len(kept) == 80
    low, high = perplexity_cutoffs(scores, QualityConfig(perplexity_high_quantile=0.0, perplexity_max=50.0))
    assert low == -math.inf and high == 50.0
    with pytest.raises(ConfigError, match="sum to less than 1"):
        QualityConfig(perplexity_low_quantile=0.6, perplexity_high_quantile=0.5).validate()
