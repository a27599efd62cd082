"""Run lm-evaluation-harness tasks on lmstack checkpoints: an ``lm_eval`` LM subclass named ``lmstack``.

    pip install "lm-eval>=0.4,<0.5"          # optional; not an lmstack dependency (it is in the dev extra)

    import lm_eval
    from lmstack.evals.lm_eval_adapter import LmstackLM
    lm = LmstackLM(pretrained="runs/speedrun/model", batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(
        include_path="my_tasks/"))

    # or from lm-eval's own CLI, once this module is imported (it registers the model name):
    python -c "import lmstack.evals.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()" \\
        --model lmstack --model_args pretrained=runs/speedrun/model --tasks my_task --include_path my_tasks/

The three request types map onto :class:`lmstack.evals.lm.EvalLM`, the same code ``lmstack eval`` uses, so the
numbers agree with lmstack's own harness on the same prompts:

* ``loglikelihood`` -> ``EvalLM.loglikelihood`` (sum of log-probs, and whether the continuation is greedy);
* ``loglikelihood_rolling`` -> ``EvalLM.loglikelihood_rolling`` (whole-document log-likelihood);
* ``generate_until`` -> ``EvalLM.generate`` with the request's ``until`` stop strings, ``max_gen_toks`` and
  temperature (``do_sample=False`` or temperature 0 is greedy).

Caveat: lm-eval downloads most of its built-in tasks' data from a hub at run time; offline, use your own
task YAML with local data files (``dataset_path: json`` + ``data_files``), as tests/test_evals_lm_eval.py does.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'lm-eval>=0.4,<0.5'") from e

from lmstack.errors import UserError
from lmstack.evals.lm import EvalLM
from lmstack.evals.task import GenerationRequest


@register_model("lmstack")
class LmstackLM(LM):
    """lm-eval model backed by an lmstack checkpoint (or an already built :class:`EvalLM`)."""

    def __init__(self, pretrained: str | None = None, batch_size: int | str = 16, device: str = "auto",
                 backend: str = "auto", max_gen_toks: int = 256, seed: int = 1234, lm: EvalLM | None = None,
                 **_: Any):
        super().__init__()
        if lm is None:
            if not pretrained:
                raise UserError("LmstackLM needs pretrained=CHECKPOINT_DIR (or lm=EvalLM(...))")
            size = 16 if str(batch_size) == "auto" else int(batch_size)
            lm = EvalLM.from_checkpoint(str(pretrained), device=device, backend=backend, batch_size=size)
        self.lm = lm
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(req.args[0], req.args[1]) for req in requests]
        return [(r.logprob, r.is_greedy) for r in self.lm.loglikelihood(pairs)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        return [r.logprob for r in self.lm.loglikelihood_rolling([req.args[0] for req in requests])]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        gen: list[GenerationRequest] = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            gen.append(GenerationRequest(prompt=context, stop=until, max_tokens=max_tokens, temperature=temperature))
        return [texts[0] for texts in self.lm.generate(gen, seed=self.seed)]
