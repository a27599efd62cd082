"""Rollouts for RL: the model being trained generates through lmstack's engine, and the one training loop
consumes the result as ordinary batches.

    sampler = PolicySampler(model, tokenizer, max_model_len=256, keep_kv=True)
    rollout = sampler.rollout([prompt_ids, ...], SamplingParams(n=8, max_tokens=64, temperature=1.0),
                              seeds=[11, 12, ...])
    rollout.input_ids        # (N, T) prompt + response, right-padded; N = prompts x n, samples of a prompt adjacent
    rollout.response_mask    # (N, T-1) action space: column t is 1 when token t+1 is a response token
    rollout.old_logprobs     # (N, T-1) log p(token t+1 | prefix) under the weights that sampled it

    loader = RolloutLoader(collector, minibatches=4, epochs=2, seed=0)   # the train loader of an RL stage

How it works:

* **Live weights.** :class:`PolicySampler` wraps an :class:`~lmstack.engine.Engine` around the training
  model itself: no copy, no save and reload. Each rollout runs under :meth:`Engine.live_weights`, which puts
  the model in eval mode (no dropout while sampling), forgets the KV the engine kept from older weights for
  prefix reuse, and hands the model back in the mode it found it. Generation runs under the engine's
  inference mode, so nothing of it reaches autograd. ``keep_kv=True`` keeps the engine and its KV pool
  between rollouts (no re-allocation, and on CUDA the captured decode graphs stay); ``keep_kv=False`` builds
  the engine for each rollout and drops it afterwards, so the KV memory is free while the optimizer works.
* **n samples from one prefill.** A prompt's ``n`` samples are one engine request with ``SamplingParams.n``:
  the prompt is prefilled once and its KV forked. Each request carries its own seed, so a rollout depends
  only on the weights, the prompts and the seeds (this is what makes an RL run resume exactly).
* **Behaviour log-probs** are recomputed by one batched forward of the training model over the sampled
  sequences (:func:`sequence_logprobs`, each distinct prompt run once and the head at response positions
  only: lmstack/train/shared_prompt.py), in eval mode and without gradients: the engine's own log-probs
  come from a KV-cached path and (with bf16) may differ in the last bits from the training forward, and
  the ratio in the loss must be exactly 1 on the first pass. They are log-probs of the *unfiltered*
  distribution at the sampling temperature (``softmax(logits / T)``), even when top-k or top-p filtered
  what the sampler drew from: the filtered distribution gives zero mass to tokens a later policy may
  sample, and an importance ratio against it is undefined there. A caller that makes exactly one update
  per rollout can skip this pass (``behaviour_logprobs=False``): its loss then uses its own log-probs,
  detached, as the behaviour ones, which is the same number (the weights have not moved since sampling) and
  the same gradient, for one forward fewer per rollout.
* **The loader** (:class:`RolloutLoader`) turns one rollout into ``epochs x minibatches`` batches (a
  seeded shuffle per epoch), then asks its collector for the next rollout from the *current* weights. So
  one loop step is one minibatch update, and an RL step (a rollout plus its inner updates) is
  ``epochs x minibatches`` loop steps. Its state (rollouts done, position in the buffer, the buffer
  itself, and the collector's own state such as a KL controller) is saved with every checkpoint as JSON
  (exact for float32), so a run killed mid-rollout resumes on the same minibatches.

Caveats: sequences are right-padded to the longest in the rollout (no packing); the behaviour pass costs a
forward per rollout; the engine is single-process, so under torchrun every rank samples its own prompts.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lmstack.engine import Engine, SamplingParams
from lmstack.errors import DataError, UserError
from lmstack.train.rl_losses import token_logprobs
from lmstack.train.shared_prompt import rollout_logprobs

Batch = dict[str, torch.Tensor]


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Prompt token ids: a list of chat messages is rendered with the tokenizer's chat format and the
    assistant header (TRL's conversational prompt); a string is encoded after the BOS token (standard)."""
    if isinstance(prompt, str):
        return [tokenizer.bos_id, *tokenizer.encode(prompt)]
    ids, _ = tokenizer.render_chat(prompt, add_generation_prompt=True)
    return list(ids)


@dataclass
class Rollout:
    """Sampled sequences and what the losses need about them; rows of one prompt are adjacent."""

    input_ids: torch.Tensor  # (N, T) long, prompt + response, right-padded with pad_id
    response_mask: torch.Tensor  # (N, T-1) float, action space: 1 where token t+1 is a response token
    old_logprobs: torch.Tensor | None  # (N, T-1) float32, behaviour log-probs (0 outside the response); None
    # when the caller asked for none (one update per rollout: the loss uses its own detached log-probs)
    prompt_index: torch.Tensor  # (N,) long, which prompt of the call each row answers
    completions: list[str]  # (N,) the response texts (stop strings and end tokens left out)
    response_lengths: list[int]  # (N,) response tokens, end token included
    truncated: list[bool]  # (N,) stopped by max_tokens (or the context) instead of an end token


def pad_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, response) pairs -> input_ids (N, T) right-padded, response_mask (N, T-1) in action space."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    response_mask = torch.zeros(len(prompts), T - 1)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(prompt) + len(response)] = torch.tensor([*prompt, *response], dtype=torch.long)
        response_mask[i, len(prompt) - 1:len(prompt) + len(response) - 1] = 1  # column t predicts token t+1
    return input_ids, response_mask


@torch.no_grad()
def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, temperature: float = 1.0,
                      micro_batch: int = 16, response_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token t+1 | prefix) and the entropy at each position under ``model``, each (N, T-1), in eval
    mode (restored afterwards), ``micro_batch`` rows per forward. With ``response_mask`` (N, T-1) only the
    response positions are scored (0 elsewhere), each distinct prompt of a micro-batch run once
    (lmstack/train/shared_prompt.py)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = input_ids.split(micro_batch)
    masks = response_mask.split(micro_batch) if response_mask is not None else (None,) * len(chunks)
    try:
        parts = [token_logprobs(model(chunk.to(device))[0], chunk.to(device), temperature) if mask is None
                 else rollout_logprobs(model, chunk.to(device), mask.to(device), temperature)
                 for chunk, mask in zip(chunks, masks)]
    finally:
        model.train(training)
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


class PolicySampler:
    """Samples from the live training model through the engine (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_model_len: int, max_num_seqs: int = 64,
                 keep_kv: bool = True, logprob_micro_batch: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len, self.max_num_seqs, self.keep_kv = max_model_len, max_num_seqs, keep_kv
        self.logprob_micro_batch = logprob_micro_batch
        self._engine: Engine | None = None

    def _get_engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        training = self.model.training  # the engine puts its model in eval mode; this one keeps training
        engine = Engine(self.model, self.tokenizer, max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len)
        self.model.train(training)
        if self.keep_kv:
            self._engine = engine
        return engine

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
                 ) -> list[list[tuple[list[int], str, str]]]:
        """Per prompt, ``params.n`` samples as (response token ids, text, finish_reason)."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        engine = self._get_engine()
        requests = [dataclasses.replace(params, seed=int(seed)) for seed in seeds]
        with engine.live_weights():
            outputs = engine.generate(prompts, requests)
        if not self.keep_kv:
            del engine  # the KV pool goes with it
        samples = []
        for request in outputs:
            if request.error:
                raise UserError(f"the engine failed on a rollout prompt: {request.error}")
            samples.append([(list(out.token_ids), out.text, out.finish_reason or "") for out in request.outputs])
        return samples

    def rollout(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int],
                pad_id: int, behaviour_logprobs: bool = True) -> Rollout:
        """Sample ``params.n`` responses per prompt and compute their behaviour log-probs (skipped when
        ``behaviour_logprobs`` is false: ``old_logprobs`` is then None)."""
        samples = self.generate(prompts, params, seeds)
        rows_prompt, rows_response, index, texts, truncated = [], [], [], [], []
        for i, (prompt, group) in enumerate(zip(prompts, samples)):
            for token_ids, text, finish_reason in group:
                if not token_ids:
                    raise DataError(f"rollout prompt {i} produced an empty response; raise max_tokens")
                rows_prompt.append(list(prompt))
                rows_response.append(token_ids)
                index.append(i)
                texts.append(text)
                truncated.append(finish_reason == "length")
        input_ids, response_mask = pad_sequences(rows_prompt, rows_response, pad_id)
        old_logprobs = None
        if behaviour_logprobs:
            old_logprobs, _ = sequence_logprobs(self.model, input_ids, params.temperature or 1.0,
                                                self.logprob_micro_batch, response_mask)
            old_logprobs = old_logprobs * response_mask
        return Rollout(input_ids=input_ids, response_mask=response_mask, old_logprobs=old_logprobs,
                       prompt_index=torch.tensor(index), completions=texts,
                       response_lengths=[len(r) for r in rows_response], truncated=truncated)


def rollout_seed(seed: int, rollout_index: int, prompt_index: int) -> int:
    """The sampling seed of one prompt of one rollout: stable across processes and resumes."""
    return random.Random(f"{seed}:{rollout_index}:{prompt_index}").getrandbits(62)


class Collector(Protocol):
    """Makes the rows of one rollout (an RL stage's own): ``collect(index)`` returns a dict of tensors whose
    first dimension is the rollout's rows, plus 0-d tensors named ``stat_*`` (logged with every minibatch)."""

    def collect(self, index: int) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RolloutLoader:
    """The train loader of an RL stage: minibatches of rollouts from the current weights (module docstring)."""

    def __init__(self, collector: Collector, minibatches: int, epochs: int, seed: int = 0):
        if minibatches < 1 or epochs < 1:
            raise ValueError(f"minibatches={minibatches} and epochs={epochs} must be >= 1")
        self.collector, self.minibatches, self.epochs, self.seed = collector, minibatches, epochs, seed
        self.rollouts = 0  # rollouts collected so far
        self.position = 0  # minibatches of the current buffer already handed out
        self.buffer: Batch | None = None

    @property
    def batches_per_rollout(self) -> int:
        return self.minibatches * self.epochs

    def __iter__(self) -> Iterator[Batch]:
        while True:
            if self.buffer is None or self.position >= self.batches_per_rollout:
                self.buffer = self.collector.collect(self.rollouts)
                self.rollouts += 1
                self.position = 0
                rows = self._rows(self.buffer)
                if rows < self.minibatches:
                    raise DataError(f"a rollout of {rows} sequences cannot make {self.minibatches} minibatches; "
                                    "lower the minibatch count or sample more prompts per rollout")
            batch = self._minibatch(self.position)
            self.position += 1
            yield batch

    @staticmethod
    def _rows(buffer: Batch) -> int:
        return next(v.shape[0] for k, v in buffer.items() if not k.startswith("stat_"))

    def _minibatch(self, position: int) -> Batch:
        epoch, part = divmod(position, self.minibatches)
        generator = torch.Generator().manual_seed(rollout_seed(self.seed, self.rollouts - 1, epoch))
        order = torch.randperm(self._rows(self.buffer), generator=generator)
        rows = order.tensor_split(self.minibatches)[part]
        return {k: v if k.startswith("stat_") else v[rows] for k, v in self.buffer.items()}

    def state_dict(self) -> dict[str, Any]:
        buffer = None if self.buffer is None else {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "values": v.flatten().tolist()}
            for k, v in self.buffer.items()}
        return {"rollouts": self.rollouts, "position": self.position, "buffer": buffer,
                "collector": self.collector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts, self.position = int(state["rollouts"]), int(state["position"])
        self.buffer = None if state["buffer"] is None else {
            k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
            for k, v in state["buffer"].items()}
        self.collector.load_state_dict(state["collector"])


class EvaluationLoader:
    """The validation loader of an RL stage: each pass yields the collector's evaluation batches
    (``collector.evaluate()``, e.g. greedy answers to held-out prompts) from the current weights."""

    def __init__(self, collector: Any):
        self.collector = collector

    def __iter__(self) -> Iterator[Batch]:
        yield from self.collector.evaluate()
