"""Prompting strategies on top of the evaluation harness and the engine (layer 5: imports evals and engine).

* :mod:`lmstack.prompting.select` — demonstrations for in-context learning: random (seeded, per item or one
  fixed set), k-nearest by embedding, diverse (maximal marginal relevance), and their order; from the task's
  pool or a JSONL file.
* :mod:`lmstack.prompting.reasoning` — chain-of-thought with rationale demonstrations, zero-shot CoT in two
  stages, self-consistency (forked samples, majority vote, early stop), least-to-most, Auto-CoT.
* :mod:`lmstack.prompting.run` — ``lmstack eval --strategy ...``: :func:`evaluate_strategy`.
"""
