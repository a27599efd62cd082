"""Generation in the evaluation harness goes through the one sampler: the engine-free ``plain`` backend and the
engine draw the same samples from the same seeds (sample i of a request seeded ``seed + i``), honour
stop strings, and errors the user can fix are lmstack errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import make_tiny_checkpoint

from lmstack.errors import CheckpointError, UserError  # noqa: E402
from lmstack.evals.lm import EvalLM  # noqa: E402
from lmstack.evals.task import GenerationRequest  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("eval_sampling") / "ckpt", block_size=64)


def test_sampled_generation_is_the_same_on_both_backends(ckpt):
    plain = EvalLM.from_checkpoint(str(ckpt), device="cpu", backend="plain", batch_size=2)
    engine = EvalLM.from_checkpoint(str(ckpt), device="cpu", backend="engine", batch_size=2)
    requests = [GenerationRequest(prompt="Once upon a time", stop=[], max_tokens=8, n=2, temperature=20.0),
                GenerationRequest(prompt="The answer is", stop=[], max_tokens=6, n=1, temperature=10.0)]
    sampled = plain.generate(requests, seed=5)
    assert sampled == engine.generate(requests, seed=5)
    assert sampled == plain.generate(requests, seed=5)  # seeded: reproducible
    assert sampled[0][0] != sampled[0][1]  # the two samples of one request use different seeds
    greedy = plain.generate([GenerationRequest(prompt="Once upon a time", stop=[], max_tokens=8)], seed=5)
    assert sampled[0][0] != greedy[0][0]


def test_plain_generation_stops_at_the_stop_string(ckpt):
    plain = EvalLM.from_checkpoint(str(ckpt), device="cpu", backend="plain")
    request = GenerationRequest(prompt="Once upon a time", stop=[], max_tokens=12, temperature=20.0)
    [[free]] = plain.generate([request], seed=1)
    stop = free[4:6]  # a piece of what this seed writes anyway, not at the start
    [[cut]] = plain.generate([GenerationRequest(request.prompt, [stop], 12, 1, 20.0)], seed=1)
    assert cut == free[:free.index(stop)] and len(cut) >= 1


def test_bad_inputs_are_lmstack_errors(ckpt):
    plain = EvalLM.from_checkpoint(str(ckpt), device="cpu", backend="plain")
    with pytest.raises(UserError, match="backend"):
        EvalLM(plain.model, plain.tokenizer, backend="fast")
    with pytest.raises(CheckpointError, match="tokenizer"):
        EvalLM(plain.model, None)
    with pytest.raises(UserError, match="dtype"):
        EvalLM.from_checkpoint(str(ckpt), device="cpu", dtype="fp8")
    assert EvalLM.from_checkpoint(str(ckpt), device="cpu", dtype="bf16").model.lm_head.weight.dtype == torch.bfloat16
