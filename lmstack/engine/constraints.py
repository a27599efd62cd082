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

Honest caveats: the mask is computed on the CPU one row at a time (llguidance drops the GIL; a
batch-parallel executor exists but is not used here), so a constrained row costs a few tenths of a
millisecond per token on top of the forward; ``bench/bench_structured.py`` measures it.
"""

from __future__ import annotations

import json
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
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output inside the grammar (only stop tokens once it is done)."""
        if self.matcher.is_error():  # never happens for tokens this mask allowed; stop rather than drift
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[self.stop_ids] = True
            return mask
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._words * 4)
        bits = (self._bitmask[:, None] >> self._bits) & 1  # (words, 32)
        return bits.reshape(-1)[:self.vocab_size].bool()

    def advance(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))


def apply_constraints(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None]) -> torch.Tensor:
    """logits (B, V) -> copy with disallowed tokens of constrained rows at -inf; other rows unchanged."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    masks = torch.stack([constraints[i].allowed() for i in rows]).to(logits.device)  # (R, V)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~masks, float("-inf"))
    return logits
