"""Grammar-constrained decoding: JSON (any object, or one JSON schema) enforced token by token.

    grammars = GrammarCompiler(tokenizer, vocab_size=model.config.vocab_size, stop_ids=engine.eos_token_ids)
    grammar = grammars.json_schema({"type": "object", "properties": {...}, "required": [...]})
    engine.generate([prompt], SamplingParams(max_tokens=128, constraint=grammar))

The grammar engine is ``llguidance`` (the Rust matcher several serving stacks use): a schema is turned
into its grammar, and per sequence an ``LLMatcher`` computes, before each sampling step, the bitmask of
tokens that keep the output a prefix of some string the grammar accepts, and is advanced with the token
that was picked. :class:`Grammar` is the compiled, shareable part (one per request);
:meth:`Grammar.start` gives each sample its own :class:`TokenConstraint` (the matcher state).

Sampling order (see lmstack.engine.sampling): the mask is applied to the raw logits first, so
penalties, temperature and top-k/p see only allowed tokens, and greedy takes the best allowed one.
Rows without a constraint are not touched. Once the grammar is complete, only the stop tokens are
allowed, so a constrained sequence ends with ``finish_reason="stop"`` unless ``max_tokens`` cuts it
first (then the text is a valid *prefix*, as with any length-limited answer).

Non-obvious choices:

* The llguidance tokenizer is built from our tokenizer's byte-level vocabulary (``token_bytes`` for
  every id); special tokens get llguidance's ``0xFF`` marker so that the grammar never emits them as
  text. Model rows beyond the tokenizer's vocabulary (padded embeddings) are empty and never allowed.
* Compilation errors (an unsupported schema keyword, a malformed schema) raise
  :class:`~lmstack.errors.UserError` with llguidance's message, which names the offending part.
* ``logprobs`` still report the raw model (as for every other sampling knob).

Two ways to compute the masks of a batch, giving bit-identical masks (a parity test pins them):

* the plain path, :func:`apply_constraints` without ``pending``: each constrained row's
  :meth:`TokenConstraint.allowed`, one after the other, after the forward;
* the fast path, :class:`ConstraintMasks`: the engine calls :meth:`ConstraintMasks.start` with the
  step's constraints right before the forward; one worker thread hands every constrained row to
  llguidance's parallel executor (``LLExecutor``, its own thread pool, the GIL released), which fills one
  (rows, V/32) int32 bitmask while the model runs, and unpacks it into the batch's (B, V) bool mask there
  too; :meth:`PendingMasks.apply` joins it after the forward and applies it with one ``torch.where``.

Honest caveats: the fast path hides the mask time behind the forward only while the forward is the
longer of the two and a core is free for the executor (on a 2-core CPU the forward's own threads
compete with it), and handing a single row to the worker costs more than computing its mask inline when
the forward takes a few ms (a tiny model at batch 1); ``bench/bench_structured.py`` measures both paths
against unconstrained decoding.
``llguidance.torch`` is not imported (it compiles a kernel with ``torch.compile`` at import time,
seconds); the executor is called directly.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Sequence

import torch

from lmstack.errors import UserError


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:  # an optional dependency: only structured output needs it
        raise UserError("structured output needs the grammar engine llguidance: pip install llguidance") from e
    return llguidance


class _VocabWrapper:
    """The object llguidance's TokenizerWrapper expects, backed by an lmstack Tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int):
        specials = {int(i) for i in getattr(tokenizer, "special_tokens", {}).values()}
        tokens: list[bytes] = []
        for token_id in range(vocab_size):
            data = tokenizer.token_bytes(token_id) if token_id < tokenizer.vocab_size else None
            if data is None:
                tokens.append(b"")
            elif token_id in specials:
                tokens.append(b"\xff" + data)  # llguidance's marker: never produced as grammar text
            else:
                tokens.append(data)
        self.tokens = tokens
        self.eos_token_id = eos_id
        self.bos_token_id = None
        self.special_token_ids = sorted(t for t in specials if t < vocab_size)
        self._tokenizer = tokenizer

    def __call__(self, data: bytes | str) -> list[int]:
        return self._tokenizer.encode_bytes(data if isinstance(data, bytes) else data.encode())


class GrammarCompiler:
    """Builds :class:`Grammar` objects for one tokenizer (the llguidance vocabulary is built once, ~ms)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]):
        if not stop_ids:
            raise UserError("constrained decoding needs a stop token (the tokenizer has no end-of-text token)")
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.stop_ids = sorted({int(t) for t in stop_ids})
        wrapper = llg.TokenizerWrapper(_VocabWrapper(tokenizer, vocab_size, self.stop_ids[0]))
        self.ll_tokenizer = llg.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=self.stop_ids)

    def json_schema(self, schema: dict[str, Any] | bool, what: str = "schema") -> Grammar:
        """A grammar for JSON documents valid under ``schema``; UserError naming the problem if it cannot compile."""
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise UserError(f"{what}: {e}") from e
        return self._compile(grammar, what)

    def json_object(self) -> Grammar:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return self.json_schema({"type": "object"}, "json_object")

    def _compile(self, grammar: str, what: str) -> Grammar:
        llg = _llguidance()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise UserError(f"{what} cannot be enforced: {messages[0]}")
        return Grammar(self, grammar)


class Grammar:
    """A compiled grammar for one tokenizer; shared by the samples of a request, each with its own state."""

    def __init__(self, compiler: GrammarCompiler, grammar: str):
        self.compiler, self.grammar = compiler, grammar

    def start(self) -> TokenConstraint:
        return TokenConstraint(self)

    def check_vocab_size(self, vocab_size: int) -> None:
        """UserError unless this grammar's masks cover a model with ``vocab_size`` logits."""
        if self.compiler.vocab_size != vocab_size:
            raise UserError(f"the constraint was compiled for a vocabulary of {self.compiler.vocab_size} but the "
                            f"model has {vocab_size}; build its GrammarCompiler with vocab_size={vocab_size}")


class TokenConstraint:
    """One sequence's matcher: ``allowed()`` before each step, ``advance(token)`` after it."""

    def __init__(self, grammar: Grammar):
        llg = _llguidance()
        compiler = grammar.compiler
        self.matcher = llg.LLMatcher(compiler.ll_tokenizer, grammar.grammar, log_level=0)
        if self.matcher.is_error():
            raise UserError(f"grammar cannot be enforced: {self.matcher.get_error()}")
        self.vocab_size = compiler.vocab_size
        self.stop_ids = compiler.stop_ids
        self._words = (self.vocab_size + 31) // 32
        self._bitmask = torch.empty(self._words, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output inside the grammar (only stop tokens once it is done)."""
        if self.matcher.is_error():  # never happens for tokens this mask allowed; stop rather than drift
            return self.stop_only()
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._words * 4)
        return bitmask_to_allowed(self._bitmask[None], self.vocab_size)[0]

    def stop_only(self) -> torch.Tensor:
        """(V,) bool: only the stop tokens (the mask of a matcher in an error state)."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.stop_ids] = True
        return mask

    def advance(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))


_BITS = torch.arange(32, dtype=torch.int32)


def bitmask_to_allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask (R, ceil(V/32)) int32, bit j of word w = token 32 w + j -> allowed (R, V) bool."""
    bits = (bitmask[:, :, None] >> _BITS) & 1  # (R, words, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_constraints(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None],
                      pending: PendingMasks | None = None) -> torch.Tensor:
    """logits (B, V) -> copy with disallowed tokens of constrained rows at -inf; other rows unchanged.

    ``pending``: the masks :meth:`ConstraintMasks.start` is computing for these constraints (the fast
    path); None computes them here, row by row (the plain path)."""
    if pending is not None:
        return pending.apply(logits)
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    masks = torch.stack([constraints[i].allowed() for i in rows]).to(logits.device)  # (R, V)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~masks, float("-inf"))
    return logits


class PendingMasks:
    """The masks of one step's constrained rows, being filled on the worker thread.

    ``rows``: the constrained rows of the batch; the job returns ``keep`` (B, V) bool for the whole batch
    (all True on unconstrained rows), so applying it after the forward is one ``torch.where``."""

    def __init__(self, rows: list[int], job: Future):
        self.rows, self.job = rows, job

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Join the fill, then logits (B, V) -> copy with every disallowed token at -inf."""
        keep = self.job.result()  # (B, V) bool; re-raises what the fill raised
        return torch.where(keep.to(logits.device), logits, float("-inf"))


class ConstraintMasks:
    """Computes a batch's masks on a worker thread with llguidance's parallel executor (the fast path).

    One per engine. :meth:`start` right before the forward, :meth:`PendingMasks.apply` after it. The
    worker fills the (rows, V/32) bitmask through the executor (GIL released) and also unpacks it into
    the batch's (B, V) bool mask (torch releases the GIL too), so all that is left after the forward is
    one vectorised select. At most one fill runs at a time: :meth:`start` first waits for the previous one
    (which a failed step may have left unjoined), so a matcher is never read by two fills at once. The
    worker thread and the executor are created on first use: an engine that never sees a grammar never
    starts them.
    """

    def __init__(self) -> None:
        self._worker: ThreadPoolExecutor | None = None
        self._executor: Any = None  # llguidance.LLExecutor
        self._last: Future | None = None

    def start(self, constraints: Sequence[TokenConstraint | None]) -> PendingMasks | None:
        """Begin filling the masks of the constrained rows; None when no row is constrained."""
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:
            return None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmstack-grammar-masks")
            self._executor = _llguidance().LLExecutor()
        if self._last is not None:
            wait([self._last])  # its outcome was reported by the step that started it
        active = [constraints[i] for i in rows]
        errored = [j for j, c in enumerate(active) if c.matcher.is_error()]  # checked before the fill, as allowed()
        matchers = [(c.matcher, j) for j, c in enumerate(active) if j not in errored]
        batch, vocab_size, words = len(constraints), active[0].vocab_size, active[0]._words

        def fill() -> torch.Tensor:
            bitmask = torch.empty(len(rows), words, dtype=torch.int32)  # (R, ceil(V/32))
            self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, len(rows))
            allowed = bitmask_to_allowed(bitmask, vocab_size)  # (R, V)
            for j in errored:  # as the plain path: stop rather than drift
                allowed[j] = active[j].stop_only()
            if len(rows) == batch:
                return allowed
            keep = torch.ones(batch, vocab_size, dtype=torch.bool)  # (B, V)
            keep[rows] = allowed
            return keep

        self._last = self._worker.submit(fill)
        return PendingMasks(rows, self._last)
