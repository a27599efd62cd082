"""Shared-context scoring (``EvalLM(backend="shared")``, ``score_shared``) pinned to the plain scorer.

The fast path runs each distinct context once and only the continuations on top of its keys and values; these
tests check that it computes the plain path's numbers (float tolerance) and decisions (identical argmax) on
real benchmark items with and without demonstrations, with a fixed demonstration set (the common prefix runs
once for a whole batch), with contexts truncated to a short model context, and on choices whose tokens merge
with the context boundary; and that it really does less work than the plain path.
"""

from __future__ import annotations

import pytest
import torch
from eval_helpers import make_tiny_checkpoint

from lmstack.evals.lm import EvalLM, score_plain, score_shared
from lmstack.evals.run import evaluate
from lmstack.evals.tasks import get_task


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> EvalLM:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("shared") / "ckpt", block_size=1024)
    return EvalLM.from_checkpoint(str(path), device="cpu", backend="plain", batch_size=4)


def _task_requests(lm: EvalLM, task_name: str, items: int, shots: int, fixed: bool = False
                   ) -> list[tuple[list[int], list[int]]]:
    task = get_task(task_name)
    examples = task.examples()[:items]
    fixed_prefix = task.fewshot_prefix(task.examples()[items], shots)  # one demonstration set for every item
    pairs = [(r.context, r.continuation) for ex in examples
             for r in task.loglikelihood_requests(ex, fixed_prefix if fixed else task.fewshot_prefix(ex, shots))]
    return [lm.encode_pair(c, x) for c, x in pairs]


def _assert_same(plain, shared, tolerance: float = 1e-4) -> None:
    assert [r.num_tokens for r in plain] == [r.num_tokens for r in shared]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(plain, shared)) < tolerance
    assert [r.is_greedy for r in plain] == [r.is_greedy for r in shared]


@pytest.mark.parametrize("task_name,shots,fixed", [("arc_easy", 0, False), ("arc_easy", 2, False),
                                                   ("arc_easy", 3, True), ("hellaswag", 1, True),
                                                   ("boolq", 0, False), ("boolq", 1, True)])
def test_shared_scores_equal_plain_scores_on_real_items(lm, task_name, shots, fixed):
    requests = _task_requests(lm, task_name, items=5, shots=shots, fixed=fixed)
    plain = score_plain(lm.model, requests, lm.max_length, batch_size=4)
    shared = score_shared(lm.model, requests, lm.max_length, batch_size=3)
    _assert_same(plain, shared)
    task = get_task(task_name)
    per_item = [len(ex.choices) for ex in task.examples()[:5]]
    start = 0
    for n in per_item:  # identical decisions: the argmax choice of every item
        a = max(range(n), key=lambda j: plain[start + j].logprob)
        b = max(range(n), key=lambda j: shared[start + j].logprob)
        assert a == b
        start += n


def test_shared_path_keeps_the_plain_token_split_where_choices_merge_with_the_context(lm):
    tok = lm.tokenizer
    # contexts without a trailing space whose continuation glues onto the last word: the plain path's
    # encode_pair either splits whole-text tokens or falls back to separate encodings; both must be kept
    pairs = [("The answer is wat", "er"), ("The answer is wat", "ts"), ("The answer is wat", " vapor"),
             ("It is a", "n animal"), ("It is a", "nimal"), ("It is a", " plant"), ("Question: The pla", "nt")]
    requests = [lm.encode_pair(c, x) for c, x in pairs]
    merged = [c + x for c, x in pairs if tok.encode(c + x)[:len(tok.encode(c))] != tok.encode(c)]
    assert len(merged) >= 3, "the fixture should contain at least one context whose last token merges with the choice"
    plain = score_plain(lm.model, requests, lm.max_length)
    shared = score_shared(lm.model, requests, lm.max_length)
    _assert_same(plain, shared)
    # a merged choice is scored after the context's own tokens, so it shares them with the other choices
    assert requests[0][0] == requests[2][0] == lm.tokenizer.encode("The answer is wat")


def test_truncated_contexts_are_fitted_as_the_plain_path_fits_them(lm):
    requests = _task_requests(lm, "arc_easy", items=4, shots=3, fixed=True)
    assert max(len(c) + len(x) for c, x in requests) > 40
    _assert_same(score_plain(lm.model, requests, 40), score_shared(lm.model, requests, 40, batch_size=2))


class _CountingModel(torch.nn.Module):
    """Wraps a model and counts the tokens it is run on (non-padding positions)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner, self.config, self.tokens = model, model.config, 0

    def forward(self, idx, *args, positions=None, **kwargs):
        self.tokens += int((positions >= 0).sum()) if positions is not None else idx.numel()
        return self.inner(idx, *args, positions=positions, **kwargs)


def test_a_fixed_demonstration_set_is_computed_once_per_batch(lm):
    requests = _task_requests(lm, "arc_easy", items=8, shots=3, fixed=True)
    plain_model, shared_model = _CountingModel(lm.model), _CountingModel(lm.model)
    plain = score_plain(plain_model, requests, lm.max_length, batch_size=8)
    shared = score_shared(shared_model, requests, lm.max_length, batch_size=8)
    _assert_same(plain, shared)
    contexts = {tuple(c) for c, _ in requests}
    assert len(contexts) == 8
    # the plain path runs every context once per choice; the shared path runs the demonstrations once and each
    # question once, then the continuations
    lcp = min(next((j for j, (a, b) in enumerate(zip(c, requests[0][0])) if a != b), len(c)) for c in contexts)
    expected = lcp + sum(len(c) - lcp for c in contexts) + sum(len(x) - 1 for _, x in requests)
    assert shared_model.tokens == expected
    assert plain_model.tokens > 3 * shared_model.tokens


def test_evaluate_with_the_shared_backend_gives_the_plain_results(lm):
    shared = EvalLM(lm.model, lm.tokenizer, backend="shared", batch_size=4)
    a = evaluate(lm, ["arc_easy", "boolq"], limit=6, num_fewshot=1, show_progress=False)
    b = evaluate(shared, ["arc_easy", "boolq"], limit=6, num_fewshot=1, show_progress=False)
    for task in ("arc_easy", "boolq"):
        assert a["results"][task]["acc"] == b["results"][task]["acc"]
        assert [r["pred"] for r in a["records"][task]] == [r["pred"] for r in b["records"][task]]
    assert b["config"]["backend"] == "shared"
