"""Choosing in-context demonstrations: random (seeded), k-nearest by embedding, diverse (MMR), and their order.

    pool = task_pool(task)                                   # or file_pool("demos.jsonl", task)
    selector = DemoSelector(pool, method="knn", k=4, embedder=model_embedder(lm.model, lm.tokenizer))
    prefix = selector.prefix(example, query=task.doc_to_text(example))   # description + demos, each + "\\n\\n"

Methods:

* ``random`` draws k demonstrations with ``random.Random(f"{seed}:{item id}")`` (string seeds hash with SHA-512,
  so a draw is the same in every process), or once for every item with ``fixed=True`` (then the shared-context
  scorer runs the demonstrations once per batch);
* ``knn`` takes the k pool items whose embedding is most similar (cosine) to the item's (Liu et al., 2022,
  "What makes good in-context examples for GPT-3?");
* ``mmr`` is maximal marginal relevance (Carbonell & Goldstein, 1998): it adds, one at a time, the item that
  maximises ``lam * sim(query, d) - (1 - lam) * max sim(d, chosen)``, trading relevance for diversity.
  ``lam = 1`` is ``knn``; smaller values spread the set out.

Orders: ``as-selected`` (selection order; knn/mmr: most similar first), ``similar-last`` (most similar right
before the question, Liu et al.'s best order) and ``random`` (seeded per item).

Pools: the task's few-shot pool (its train split where it has one; otherwise its evaluation items, the current
item always excluded, so a demonstration never leaks the answer), or a JSONL file of ``{"context": ...,
"target": ...}`` records (``"question"``/``"answer"`` also accepted; an optional ``"rationale"`` is used by
chain-of-thought). Embeddings come from any checkpoint through :func:`lmstack.engine.embed.embed`: the evaluated
model itself (mean pooling) or a sentence encoder such as an imported all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lmstack.errors import DataError, UserError
from lmstack.evals.task import Example, Task

Embedder = Callable[[Sequence[str]], torch.Tensor]  # texts -> (N, C) unit vectors
METHODS = ("random", "knn", "mmr")
ORDERS = ("as-selected", "similar-last", "random")


@dataclass
class Demo:
    """One candidate demonstration: what similarity is measured on, and the text put in the prompt."""

    id: str
    query: str                 # the question part (embedded for knn / mmr)
    text: str                  # the rendered demonstration (question + answer)
    answer: str = ""           # the bare answer (chain-of-thought builds "The answer is ...")
    rationale: str = ""        # a worked solution, when the pool has one


def task_pool(task: Task) -> list[Demo]:
    """The task's own few-shot pool rendered with its demonstration format."""
    return [Demo(ex.id, task.doc_to_text(ex), task.demonstration(ex), task.doc_to_target(ex),
                 str(ex.meta.get("rationale", ""))) for ex in task.fewshot_pool()]


def file_pool(path: str | Path, task: Task) -> list[Demo]:
    """Demonstrations from a JSONL file: ``context``/``question`` and ``target``/``answer`` per line."""
    source = Path(path)
    if not source.is_file():
        raise DataError(f"demonstration file {path} does not exist; give a JSONL file with one "
                        '{"context": ..., "target": ...} record per line')
    demos = []
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not JSON ({err.msg}); each line must be one JSON object") from None
        context = record.get("context", record.get("question")) if isinstance(record, dict) else None
        target = record.get("target", record.get("answer")) if isinstance(record, dict) else None
        if not isinstance(context, str) or not isinstance(target, str):
            raise DataError(f'{path}:{n}: needs string fields "context" (or "question") and "target" (or "answer")')
        demos.append(Demo(f"file/{n}", context, context + task.target_delimiter + target, target,
                          str(record.get("rationale", ""))))
    if not demos:
        raise DataError(f"{path} holds no demonstrations; add JSONL records with context and target")
    return demos


def model_embedder(model: torch.nn.Module, tokenizer: Any, pooling: str = "mean", batch_size: int = 32) -> Embedder:
    """Texts -> unit embeddings with any checkpoint's model (the evaluated one, or a sentence encoder)."""
    from lmstack.engine.embed import embed

    return lambda texts: embed(model, tokenizer, list(texts), pooling=pooling, batch_size=batch_size)


def checkpoint_embedder(path: str, device: str = "cpu") -> Embedder:
    """An embedder from a checkpoint directory (e.g. ``lmstack import all-minilm-l6-v2``)."""
    from lmstack.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, device=device)
    if ckpt.tokenizer is None:
        raise DataError(f"{path} has no tokenizer.json, so it cannot embed text; give a checkpoint with one")
    return model_embedder(ckpt.model.eval(), ckpt.tokenizer)


# ----------------------------------------------------------------------------- selection (pure functions)

def select_knn(query: torch.Tensor, candidates: torch.Tensor, k: int) -> list[int]:
    """Indices of the k candidates (N, C) most similar to query (C,), most similar first (unit vectors)."""
    sims = candidates @ query  # (N,)
    return torch.argsort(sims, descending=True, stable=True)[:k].tolist()


def select_mmr(query: torch.Tensor, candidates: torch.Tensor, k: int, lam: float = 0.5) -> list[int]:
    """Maximal marginal relevance: greedily maximise lam * sim(q, d) - (1 - lam) * max_{c chosen} sim(d, c)."""
    relevance = candidates @ query  # (N,)
    pairwise = candidates @ candidates.T  # (N, N)
    chosen: list[int] = []
    redundancy = torch.full_like(relevance, float("-inf"))  # max similarity to anything chosen so far
    available = torch.ones_like(relevance, dtype=torch.bool)
    for _ in range(min(k, len(relevance))):
        penalty = redundancy.clamp(min=-1.0) if chosen else torch.zeros_like(relevance)
        score = (lam * relevance - (1 - lam) * penalty).masked_fill(~available, float("-inf"))
        best = int(torch.argmax(score))  # first maximum on ties: deterministic
        chosen.append(best)
        available[best] = False
        redundancy = torch.maximum(redundancy, pairwise[best])
    return chosen


def order_demos(indices: list[int], similarities: list[float] | None, order: str, rng: random.Random) -> list[int]:
    """Arrange selected demonstrations: as selected, most similar last, or shuffled (seeded)."""
    if order == "as-selected":
        return list(indices)
    if order == "similar-last":
        if similarities is None:
            return list(indices)  # random selection has no similarity to sort by
        return [i for _, i in sorted(zip(similarities, indices), key=lambda pair: pair[0])]
    shuffled = list(indices)
    rng.shuffle(shuffled)
    return shuffled


class DemoSelector:
    """Builds each item's few-shot prefix: the task's description, then k demonstrations, each + separator."""

    def __init__(self, pool: Sequence[Demo], *, method: str = "random", k: int = 4, seed: int = 1234,
                 embedder: Embedder | None = None, lam: float = 0.5, order: str = "as-selected",
                 fixed: bool = False, description: str = "", separator: str = "\n\n"):
        if method not in METHODS:
            raise UserError(f"demonstration selection {method!r}: choose one of {', '.join(METHODS)}")
        if order not in ORDERS:
            raise UserError(f"demonstration order {order!r}: choose one of {', '.join(ORDERS)}")
        if method != "random" and embedder is None:
            raise UserError(f"selection {method} needs an embedder (the model itself or a sentence encoder)")
        if not 0.0 <= lam <= 1.0:
            raise UserError(f"mmr lambda {lam} must lie in [0, 1] (1 = pure relevance, 0 = pure diversity)")
        if fixed and method != "random":
            raise UserError("a fixed demonstration set is drawn at random; use --demo-select random with it")
        self.pool, self.method, self.k, self.seed = list(pool), method, k, seed
        self.lam, self.order, self.fixed = lam, order, fixed
        self.description, self.separator = description, separator
        self.embedder = embedder
        self._pool_vectors = embedder([d.query for d in self.pool]) if embedder is not None and method != "random" \
            else None  # (N, C)
        self._query_cache: dict[str, torch.Tensor] = {}

    def embed_queries(self, queries: Sequence[str]) -> None:
        """Embed many item questions in one batched call (optional; ``select`` embeds one at a time otherwise)."""
        todo = [q for q in dict.fromkeys(queries) if q not in self._query_cache]
        if todo and self.embedder is not None:
            for q, v in zip(todo, self.embedder(todo)):
                self._query_cache[q] = v

    def select(self, item_id: str, query: str) -> list[Demo]:
        """The demonstrations for one item, in prompt order (the item itself is never among them)."""
        if self.k <= 0:
            return []
        rng = random.Random(f"{self.seed}:fixed" if self.fixed else f"{self.seed}:{item_id}")
        allowed = [i for i, d in enumerate(self.pool) if d.id != item_id]
        if self.fixed:
            # one seeded permutation for every item: all items get its first k, except an item that is itself
            # among them, which gets the next one in its place (a demonstration never shows the item's answer)
            permutation = list(range(len(self.pool)))
            rng.shuffle(permutation)
            picked = [i for i in permutation if self.pool[i].id != item_id][:self.k]
            return [self.pool[i] for i in order_demos(picked, None, self.order, rng)]
        if self.method == "random":
            picked = rng.sample(allowed, min(self.k, len(allowed)))
            return [self.pool[i] for i in order_demos(picked, None, self.order, rng)]
        self.embed_queries([query])
        q = self._query_cache[query]
        candidates = self._pool_vectors[allowed]  # type: ignore[index]  # (N', C)
        local = select_knn(q, candidates, self.k) if self.method == "knn" else \
            select_mmr(q, candidates, self.k, self.lam)
        sims = (candidates[local] @ q).tolist()
        arranged = order_demos(local, sims, self.order, rng)
        return [self.pool[allowed[i]] for i in arranged]

    def prefix(self, ex: Example, query: str) -> str:
        """The description and the selected demonstrations, each followed by the separator."""
        return self.description + "".join(d.text + self.separator for d in self.select(ex.id, query))
