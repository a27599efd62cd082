"""Model-based quality filters: a hashed n-gram logistic-regression classifier, and a perplexity filter.

Quality classifier (the GPT-3 / fastText recipe, small enough to train on a laptop in seconds)::

    lmstack data train-classifier --positive good/ --negative web.jsonl --out quality.npz
    # then in the clean config:  quality.classifier: quality.npz, quality.min_score: 0.5

Features are lower-cased word unigrams and bigrams hashed into ``n_features`` buckets (the hashing
trick: no vocabulary to store), with sublinear ``1 + log(count)`` weights and unit L2 norm per document.
The model is plain logistic regression with L2 regularization, trained full-batch with Adam in numpy
(the gradient is one ``np.bincount``). It is saved as an ``.npz`` with the weights and a JSON header,
and loaded without unpickling. ``train_classifier`` holds out a validation split and reports accuracy
and ROC AUC, so you can see whether the classifier learned anything before you filter with it.

Perplexity filter: score each document with an lmstack checkpoint (its first ``max_tokens`` tokens,
in batches of ``batch_size``), then drop the tails of the perplexity distribution -- the lowest
``low_quantile`` (boilerplate, repeated text) and the highest ``high_quantile`` (garbage, other
languages, tables) -- or documents outside absolute bounds. Scoring is per document and runs in the
workers; the quantile cut needs every score, so it is decided once after all shards are scored
(:func:`perplexity_cutoffs`). Caveat: a tiny model trained for minutes is a weak judge; the filter
is meant for a checkpoint trained on data you trust (e.g. a first speedrun on curated text).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lmstack.atomic import write_atomic
from lmstack.config import ConfigError
from lmstack.data.clean import Doc, Stage, StageStats
from lmstack.data.dedup import ngram_hashes, text_word_hashes

CLASSIFIER_FORMAT = "lmstack-quality-classifier"


# ----------------------------------------------------------------------------- features


def hashed_features(texts: Sequence[str], n_features: int, ngram_orders: Sequence[int] = (1, 2)
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR matrix (indptr (N+1,), indices (nnz,), values (nnz,)) of L2-normalized hashed n-gram counts."""
    indptr = [0]
    all_idx: list[np.ndarray] = []
    all_val: list[np.ndarray] = []
    mod = np.uint64(n_features)
    for text in texts:
        h = text_word_hashes(text)
        grams = [ngram_hashes(h, n) for n in ngram_orders]
        buckets = (np.concatenate(grams) % mod).astype(np.int64) if grams else np.zeros(0, np.int64)
        idx, counts = np.unique(buckets, return_counts=True)
        val = 1.0 + np.log(counts.astype(np.float32))
        norm = float(np.sqrt((val * val).sum())) or 1.0
        all_idx.append(idx)
        all_val.append((val / norm).astype(np.float32))
        indptr.append(indptr[-1] + len(idx))
    indices = np.concatenate(all_idx) if all_idx else np.zeros(0, np.int64)
    values = np.concatenate(all_val) if all_val else np.zeros(0, np.float32)
    return np.array(indptr, dtype=np.int64), indices, values


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def _logits(weights: np.ndarray, bias: float, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray
            ) -> np.ndarray:
    rows = _row_ids(indptr)
    return np.bincount(rows, weights=weights[indices] * values, minlength=len(indptr) - 1) + bias


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) formula; ties get average ranks."""
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ----------------------------------------------------------------------------- classifier


@dataclass
class QualityClassifier:
    weights: np.ndarray  # (n_features,) float32
    bias: float
    n_features: int
    ngram_orders: tuple[int, ...] = (1, 2)
    metrics: dict | None = None

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive = high quality) per text."""
        indptr, indices, values = hashed_features(texts, self.n_features, self.ngram_orders)
        return _sigmoid(_logits(self.weights, self.bias, indptr, indices, values))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"format": CLASSIFIER_FORMAT, "version": 1, "n_features": self.n_features,
                             "ngram_orders": list(self.ngram_orders), "bias": self.bias,
                             "metrics": self.metrics or {}})
        write_atomic(path, lambda tmp: np.savez(tmp, weights=self.weights.astype(np.float32),
                                                header=np.array(header)), suffix=".npz")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QualityClassifier":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"quality.classifier: {path} does not exist; train one with "
                              "`lmstack data train-classifier --positive ... --negative ... --out FILE`")
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                weights = z["weights"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"quality.classifier: {path} is not an lmstack quality classifier ({e})") from None
        if header.get("format") != CLASSIFIER_FORMAT:
            raise ConfigError(f"quality.classifier: {path} is not an lmstack quality classifier")
        return cls(weights=weights, bias=float(header["bias"]), n_features=int(header["n_features"]),
                   ngram_orders=tuple(header["ngram_orders"]), metrics=header.get("metrics"))


def fit_logistic(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, labels: np.ndarray,
                 n_features: int, epochs: int = 200, lr: float = 0.1, l2: float = 1e-4
                 ) -> tuple[np.ndarray, float, list[float]]:
    """Full-batch Adam on the mean logistic loss + l2/2 |w|^2; returns (weights, bias, loss per epoch)."""
    n = len(labels)
    rows = _row_ids(indptr)
    w = np.zeros(n_features, dtype=np.float64)
    b = 0.0
    m_w, v_w = np.zeros_like(w), np.zeros_like(w)
    m_b = v_b = 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    y = labels.astype(np.float64)
    losses = []
    for t in range(1, epochs + 1):
        z = np.bincount(rows, weights=w[indices] * values, minlength=n) + b
        p = _sigmoid(z)
        losses.append(float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * float(w @ w)))
        residual = (p - y) / n
        grad_w = np.bincount(indices, weights=values * residual[rows], minlength=n_features) + l2 * w
        grad_b = float(residual.sum())
        m_w = beta1 * m_w + (1 - beta1) * grad_w
        v_w = beta2 * v_w + (1 - beta2) * grad_w * grad_w
        m_b = beta1 * m_b + (1 - beta1) * grad_b
        v_b = beta2 * v_b + (1 - beta2) * grad_b * grad_b
        step = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        w -= step * m_w / (np.sqrt(v_w) + eps)
        b -= step * m_b / (math.sqrt(v_b) + eps)
    return w.astype(np.float32), float(b), losses


def train_classifier(positive: Sequence[str | Path], negative: Sequence[str | Path], out: str | Path,
                     text_field: str = "text", n_features: int = 1 << 18, ngram_orders: Sequence[int] = (1, 2),
                     epochs: int = 200, lr: float = 0.1, l2: float = 1e-4, val_fraction: float = 0.1,
                     max_docs: int = 200_000, seed: int = 0) -> dict:
    """Train a quality classifier from positive (keep) and negative (drop) example files; returns metrics.

    Inputs are anything :func:`lmstack.data.readers.iter_documents` reads. At most ``max_docs`` per class
    are used. The classes are balanced by weighting nothing: give similar amounts of each.
    """
    from lmstack.data.readers import iter_documents

    if not positive or not negative:
        raise ConfigError("train-classifier needs both --positive and --negative examples")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if n_features < 2 or any(n < 1 for n in ngram_orders):
        raise ConfigError("--features must be >= 2 and n-gram orders >= 1")

    def read(paths: Sequence[str | Path]) -> list[str]:
        texts = []
        for doc in iter_documents(list(paths), text_field=text_field):
            texts.append(doc.text)
            if len(texts) >= max_docs:
                break
        return texts

    pos_texts, neg_texts = read(positive), read(negative)
    if len(pos_texts) < 2 or len(neg_texts) < 2:
        raise ConfigError(f"train-classifier needs at least 2 documents per class; got {len(pos_texts)} positive "
                          f"and {len(neg_texts)} negative")
    texts = pos_texts + neg_texts
    labels = np.array([1] * len(pos_texts) + [0] * len(neg_texts), dtype=np.int8)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    n_val = int(round(val_fraction * len(texts)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    indptr, indices, values = hashed_features([texts[i] for i in train_idx], n_features, ngram_orders)
    w, b, losses = fit_logistic(indptr, indices, values, labels[train_idx], n_features, epochs, lr, l2)
    clf = QualityClassifier(weights=w, bias=b, n_features=n_features, ngram_orders=tuple(ngram_orders))
    metrics: dict = {"train_docs": int(len(train_idx)), "val_docs": int(n_val), "positive": len(pos_texts),
                     "negative": len(neg_texts), "final_train_loss": round(losses[-1], 5)}
    train_p = clf.predict_proba([texts[i] for i in train_idx])
    metrics["train_accuracy"] = round(float(np.mean((train_p >= 0.5) == labels[train_idx])), 4)
    if n_val:
        val_p = clf.predict_proba([texts[i] for i in val_idx])
        metrics["val_accuracy"] = round(float(np.mean((val_p >= 0.5) == labels[val_idx])), 4)
        metrics["val_auc"] = round(roc_auc(val_p, labels[val_idx]), 4)
    clf.metrics = metrics
    clf.save(out)
    return metrics


# ----------------------------------------------------------------------------- config + stages


@dataclass
class QualityConfig:
    """Model-based filters; both are off until you point them at a model."""

    classifier: str | None = None  # .npz from `lmstack data train-classifier`
    min_score: float = 0.5  # [quality_classifier] keep documents with P(high quality) >= this
    perplexity_model: str | None = None  # lmstack checkpoint (or run) directory
    perplexity_low_quantile: float = 0.0  # [perplexity_low] drop this share of the lowest perplexities
    perplexity_high_quantile: float = 0.05  # [perplexity_high] drop this share of the highest
    perplexity_min: float | None = None  # [perplexity_low] absolute bounds, applied as well when set
    perplexity_max: float | None = None  # [perplexity_high]
    perplexity_max_tokens: int = 256  # tokens scored per document (the model's context at most)
    perplexity_batch_size: int = 16
    perplexity_device: str = "cpu"

    def validate(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"quality.min_score={self.min_score} must be in [0, 1]")
        if self.classifier and not Path(self.classifier).is_file():
            raise ConfigError(f"quality.classifier={self.classifier!r} does not exist; train one with "
                              "`lmstack data train-classifier`")
        if self.perplexity_model and not Path(self.perplexity_model).exists():
            raise ConfigError(f"quality.perplexity_model={self.perplexity_model!r} does not exist")
        lo, hi = self.perplexity_low_quantile, self.perplexity_high_quantile
        if not (0.0 <= lo < 1.0 and 0.0 <= hi < 1.0 and lo + hi < 1.0):
            raise ConfigError(f"quality.perplexity_low_quantile={lo} and perplexity_high_quantile={hi} must be in "
                              "[0, 1) and sum to less than 1")
        if self.perplexity_max_tokens < 2 or self.perplexity_batch_size < 1:
            raise ConfigError("quality.perplexity_max_tokens must be >= 2 and perplexity_batch_size >= 1")


class QualityFilter(Stage):
    """Remove documents the classifier scores below ``min_score``; kept ones carry ``quality_score``."""

    name = "quality"

    def __init__(self, cfg: QualityConfig, classifier: QualityClassifier | None = None):
        self.cfg = cfg
        self.classifier = classifier or QualityClassifier.load(cfg.classifier)  # type: ignore[arg-type]

    def process(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        import dataclasses

        if not docs:
            return []
        scores = self.classifier.predict_proba([d.text for d in docs])
        kept = []
        for doc, score in zip(docs, scores.tolist()):
            if score >= self.cfg.min_score:
                meta = {**getattr(doc, "meta", {}), "quality_score": round(score, 4)}
                kept.append(dataclasses.replace(doc, meta=meta) if hasattr(doc, "meta") else doc)
            else:
                stats.remove(doc, "quality_classifier", self.max_examples, detail=f"p={score:.3f}")
        return kept


class PerplexityScorer:
    """Per-document perplexity under an lmstack checkpoint (first ``max_tokens`` tokens, batched)."""

    def __init__(self, checkpoint: str | Path, max_tokens: int = 256, batch_size: int = 16, device: str = "cpu"):
        import torch

        from lmstack.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, device=device)
        if ckpt.tokenizer is None:
            raise ConfigError(f"quality.perplexity_model={checkpoint}: the checkpoint has no tokenizer.json, "
                              "so documents cannot be tokenized for it")
        self.model, self.tokenizer, self.device = ckpt.model, ckpt.tokenizer, device
        self.max_tokens = min(max_tokens, int(self.model.config.block_size) + 1)
        self.batch_size = batch_size
        self.torch = torch

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Perplexity per text (NaN for a text with fewer than 2 tokens)."""
        torch = self.torch
        F = torch.nn.functional
        ids = self.tokenizer.encode_batch(list(texts))
        out = np.full(len(texts), np.nan, dtype=np.float64)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            batch = [i for i in order[start:start + self.batch_size] if len(ids[i]) >= 2]
            if not batch:
                continue
            seqs = [ids[i][: self.max_tokens] for i in batch]
            T = max(len(s) for s in seqs) - 1
            x = torch.zeros((len(seqs), T), dtype=torch.long)
            y = torch.full((len(seqs), T), -1, dtype=torch.long)
            for r, s in enumerate(seqs):
                x[r, : len(s) - 1] = torch.tensor(s[:-1])
                y[r, : len(s) - 1] = torch.tensor(s[1:])
            x, y = x.to(self.device), y.to(self.device)
            with torch.no_grad():
                logits, _ = self.model(x)  # (B, T, V)
                nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                      reduction="none").view(len(seqs), T)  # (B, T)
            counted = (y >= 0).sum(dim=1).clamp(min=1)
            mean_nll = (nll.sum(dim=1) / counted).cpu().numpy()
            out[batch] = np.exp(mean_nll)
        return out


class PerplexityScore(Stage):
    """Score every document (stored as ``perplexity`` in its meta); the cut happens after all shards."""

    name = "perplexity_score"

    def __init__(self, cfg: QualityConfig, scorer: PerplexityScorer | None = None):
        self.cfg = cfg
        self.scorer = scorer or PerplexityScorer(cfg.perplexity_model,  # type: ignore[arg-type]
                                                 cfg.perplexity_max_tokens, cfg.perplexity_batch_size,
                                                 cfg.perplexity_device)

    def process(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        import dataclasses

        scores = self.scorer.score([d.text for d in docs]) if docs else np.zeros(0)
        stats.counters["scored"] += int(np.isfinite(scores).sum())
        return [dataclasses.replace(d, meta={**d.meta, "perplexity": None if not math.isfinite(s) else round(s, 3)})
                for d, s in zip(docs, scores.tolist())]


def perplexity_cutoffs(scores: Iterable[float], cfg: QualityConfig) -> tuple[float, float]:
    """(low, high): documents with perplexity < low or > high are dropped (quantiles and absolute bounds)."""
    values = np.array([s for s in scores if s is not None and math.isfinite(s)], dtype=np.float64)
    low, high = -math.inf, math.inf
    if len(values):
        if cfg.perplexity_low_quantile > 0:
            low = float(np.quantile(values, cfg.perplexity_low_quantile))
        if cfg.perplexity_high_quantile > 0:
            high = float(np.quantile(values, 1.0 - cfg.perplexity_high_quantile))
    if cfg.perplexity_min is not None:
        low = max(low, cfg.perplexity_min)
    if cfg.perplexity_max is not None:
        high = min(high, cfg.perplexity_max)
    return low, high
