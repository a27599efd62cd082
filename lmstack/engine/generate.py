"""Generation for people: the plain reference loop, and the `lmstack generate` / `lmstack chat` commands.

    lmstack generate --model runs/speedrun/model --prompt "Once upon a time" --max-tokens 64 --seed 1
    lmstack chat --model runs/sft/model --system "You are terse."

Two ways to generate:

* :func:`generate` / :func:`generate_tokens` — one sequence, one plain loop over the model, with a
  contiguous :class:`~lmstack.engine.kv_cache.KVCache` or (``use_kv_cache=False``) recomputing the
  whole sequence every step. This is the readable reference that the engine and the KV cache are
  tested against, and what a notebook wants for a quick sample.
* the commands, which run on the :class:`~lmstack.engine.engine.Engine` (same sampling code, batched,
  prefix reuse between chat turns) and stream text as it is decoded: multi-byte characters split
  across tokens are held back until complete, and stop strings are cut out even when they span
  tokens (see :mod:`lmstack.engine.detok`).

Chat renders the conversation with ``tokenizer.render_chat(messages, add_generation_prompt=True)``
and stops on ``tokenizer.stop_token_ids``. When the conversation no longer fits the context (prompt
+ ``--max-tokens``), the oldest turns are dropped (the system prompt stays) and the user is told
once. ``/reset`` starts over, ``/exit`` or end-of-input (Ctrl-D) quits.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from lmstack.engine.kv_cache import KVCache
from lmstack.engine.sampling import SamplingParams, SamplingRow, make_generator, sample


# ----------------------------------------------------------------------------- the plain loop

@torch.inference_mode()
def generate_tokens(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    use_kv_cache: bool = True, eos_token_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield generated token ids one by one (stop tokens included, then the loop ends).

    Stops after ``params.max_tokens`` tokens, on ``params.stop_token_ids`` / ``eos_token_ids``
    (unless ``ignore_eos``), or when the sequence reaches the model's context. Stop *strings* are
    a text-level concern handled by the callers that own a tokenizer.
    """
    params = params or SamplingParams(temperature=0.0)
    params.validate()
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("empty prompt: give at least one token (e.g. the tokenizer's end-of-text id)")
    context = model.config.block_size
    if len(prompt) >= context:
        raise ValueError(f"prompt of {len(prompt)} tokens fills the model's context of {context}; shorten it")
    device = next(model.parameters()).device
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    generator = None if params.greedy else make_generator(
        params.seed if params.seed is not None else torch.seed(), device)
    budget = min(params.max_tokens, context - len(prompt))
    cache = KVCache.for_model(model, 1, len(prompt) + budget) if use_kv_cache else None
    ids = list(prompt)
    step_input = torch.tensor([prompt], device=device)  # (1, T)
    for _ in range(budget):
        logits, _ = model(step_input, kv_cache=cache, logits_to_keep=1)  # (1, 1, V)
        token = int(sample(logits[:, -1], [SamplingRow(params, generator, prompt, ids[len(prompt):])])[0])
        ids.append(token)
        yield token
        if token in stops:
            return
        # with a cache only the new token goes in; without one the whole sequence is recomputed
        step_input = torch.tensor([[token]] if use_kv_cache else [ids], device=device)


def generate(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
             use_kv_cache: bool = True, eos_token_ids: Iterable[int] = ()) -> list[int]:
    """The generated token ids of :func:`generate_tokens` as a list (greedy by default)."""
    return list(generate_tokens(model, prompt_ids, params, use_kv_cache=use_kv_cache, eos_token_ids=eos_token_ids))


# ----------------------------------------------------------------------------- engine-backed text helpers

def _user_error(message: str) -> Exception:
    from lmstack.cli import UserError

    return UserError(message)


def load_engine(model_path: str, device: str = "auto", quantize: str | None = None, **engine_kw: Any):
    """Engine.from_checkpoint with command-line friendly errors (missing checkpoint, no tokenizer)."""
    from pathlib import Path

    from lmstack.engine.engine import Engine

    if not Path(model_path).exists():
        raise _user_error(f"checkpoint {model_path} does not exist; pass a checkpoint directory or a run "
                          "directory made by `lmstack pretrain` (or `lmstack import`)")
    try:
        engine = Engine.from_checkpoint(model_path, device=device, quantize=quantize, **engine_kw)
    except ValueError as e:  # bad device, KV pool too large, encoder checkpoint, ...
        raise _user_error(str(e)) from None
    if engine.tokenizer is None:
        raise _user_error(f"checkpoint {model_path} has no tokenizer.json, so text cannot be encoded; "
                          "copy the tokenizer used for training into it (`lmstack tokenizer` writes one)")
    return engine


def stream_request(engine: Any, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[tuple[int, str, Any]]:
    """Run one request on an (otherwise idle) engine; yield ``(sample index, new text, output)`` per step."""
    request_id = engine.add_request(prompt_ids, params)
    try:
        while True:
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                for completion in out.outputs:
                    if completion.new_text or completion.finish_reason:
                        yield completion.index, completion.new_text, out
                if out.finished:
                    return
    finally:
        engine.abort(request_id)  # no-op when finished; frees the slot on Ctrl-C or an early close


class ChatSession:
    """A multi-turn conversation on an engine: history, context sliding, streamed replies.

    ``send(text)`` yields the reply's text as it is decoded and then records it in the history.
    When prompt + reply budget no longer fit the context, the oldest turns go first (the system
    prompt stays); ``notify`` is called once the first time that happens.
    """

    def __init__(self, engine: Any, params: SamplingParams, system: str | None = None,
                 notify: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.params = params
        self.system = system
        self.notify = notify
        self.messages: list[dict[str, str]] = []
        self._told_about_sliding = False
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        return ids

    def _fit(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[int], int]:
        """(kept messages, prompt ids, reply budget): old turns dropped until prompt + reply fit the context."""
        context = self.engine.max_model_len
        reserve = max(1, min(self.params.max_tokens, context // 2))
        first = 1 if messages and messages[0]["role"] == "system" else 0
        messages = list(messages)
        ids = self._render(messages)
        while len(ids) + reserve > context and len(messages) - first > 1:
            del messages[first]  # the oldest turn; a reply whose question is gone goes with it
            while len(messages) - first > 1 and messages[first]["role"] != "user":
                del messages[first]
            ids = self._render(messages)
        if len(ids) >= context:
            raise ValueError(f"this message alone takes {len(ids)} tokens, more than the model's context of "
                             f"{context}; send something shorter")
        return messages, ids, min(self.params.max_tokens, context - len(ids))

    def send(self, text: str) -> Iterator[str]:
        if not text.strip():
            raise ValueError("empty message")
        wanted = self.messages + [{"role": "user", "content": text}]
        kept, ids, max_tokens = self._fit(wanted)  # raises before touching the history
        if len(kept) < len(wanted) and not self._told_about_sliding:
            self._told_about_sliding = True
            self.notify(f"[the conversation outgrew the model's context of {self.engine.max_model_len} tokens; "
                        "the oldest turns are dropped from now on]")
        self.messages = kept
        params = _replace(self.params, max_tokens=max_tokens, n=1,
                          stop_token_ids=sorted(set(self.params.stop_token_ids) | set(self.tokenizer.stop_token_ids)))
        reply = ""
        for _, delta, _ in stream_request(self.engine, ids, params):
            reply += delta
            yield delta
        self.messages.append({"role": "assistant", "content": reply})


def _replace(params: SamplingParams, **changes: Any) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def params_from_args(args: Any, **extra: Any) -> SamplingParams:
    """SamplingParams from the shared sampling options of `generate` / `chat` (see cli._add_sampling_args)."""
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=getattr(args, "min_p", 0.0), repetition_penalty=args.repetition_penalty,
        presence_penalty=getattr(args, "presence_penalty", 0.0),
        frequency_penalty=getattr(args, "frequency_penalty", 0.0),
        stop=list(args.stop or []), stop_token_ids=list(getattr(args, "stop_token_id", None) or []),
        seed=args.seed, **extra)
    try:
        params.validate()
    except ValueError as e:
        raise _user_error(str(e)) from None
    return params


# ----------------------------------------------------------------------------- commands

def generate_cli(args: Any) -> None:
    """`lmstack generate`: continue a prompt, streaming the text to stdout."""
    import time

    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    n = max(1, args.num_samples)
    params = params_from_args(args, n=n)
    engine = load_engine(args.model, args.device, getattr(args, "quantize", None), max_num_seqs=n)
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        try:
            ids = [tokenizer.eot_id]  # an empty prompt starts a fresh document
        except ValueError:
            raise _user_error("empty prompt and the tokenizer has no document-boundary token to start "
                              "from; pass --prompt TEXT") from None
    if len(ids) >= engine.max_model_len:
        raise _user_error(f"the prompt is {len(ids)} tokens; the model's context is {engine.max_model_len}. "
                          "Shorten it")
    stream = n == 1 and not args.no_stream
    start, generated = time.perf_counter(), 0
    final = None
    for index, delta, out in stream_request(engine, ids, params):
        if stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        final = out
    if stream:
        sys.stdout.write("\n")
    else:
        for completion in final.outputs:
            if n > 1:
                sys.stdout.write(f"--- sample {completion.index + 1} ---\n")
            sys.stdout.write(completion.text + "\n")
    generated = sum(len(c.token_ids) for c in final.outputs)
    elapsed = time.perf_counter() - start
    reasons = ", ".join(sorted({c.finish_reason for c in final.outputs}))
    print(f"[{generated} tokens in {elapsed:.2f}s, {generated / max(elapsed, 1e-9):.1f} tokens/s; "
          f"finished: {reasons}]", file=sys.stderr)


def chat_cli(args: Any, input_fn: Callable[[str], str] = input) -> None:
    """`lmstack chat`: an interactive conversation; /reset starts over, /exit or Ctrl-D quits."""
    params = params_from_args(args)
    engine = load_engine(args.model, args.device, getattr(args, "quantize", None), max_num_seqs=1)
    session = ChatSession(engine, params, system=args.system)
    try:
        session._render(session.messages)
    except ValueError as e:
        raise _user_error(f"{args.model}: {e}") from None
    print(f"[chatting with {args.model}; context {engine.max_model_len} tokens. /reset to start over, "
          "/exit or Ctrl-D to quit]", file=sys.stderr)
    while True:
        try:
            line = input_fn("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("[history cleared]", file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        try:
            for delta in session.send(line):
                sys.stdout.write(delta)
                sys.stdout.flush()
        except ValueError as e:
            print(f"\n[{e}]", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
