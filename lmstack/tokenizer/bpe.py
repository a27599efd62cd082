"""Byte-level BPE maths and its Hugging Face tokenizer.json form: split regexes, the GPT-2 byte alphabet,
ranks ↔ merges, and the inspection that decides whether a tokenizer.json can run on tiktoken.

    from lmstack.tokenizer.bpe import hf_bpe_spec, tiktoken_ranks_from_hf
    spec = hf_bpe_spec(ranks, {"<|endoftext|>": 50256}, GPT2_PATTERN)   # a tokenizer.json, as a dict
    tiktoken_ranks_from_hf(spec)     # (ranks, specials, pattern), or the reason tiktoken cannot run it

tiktoken describes BPE by *ranks* (token bytes → id, where the id is also the merge priority); a
tokenizer.json describes it by a vocabulary (tokens spelled in GPT-2's byte-to-unicode alphabet) plus an
ordered merge list. The two are the same tokenizer when the vocabulary is *rank-consistent*: merges come
in id order and every merge is the pair BPE itself forms for its token. :func:`tiktoken_ranks_from_hf`
checks exactly that, by re-deriving every merge (tens of ms for our vocabularies, about a second for 100k
merges).

Caveat: the tiktoken path also needs Hugging Face's regex engine (Oniguruma) and tiktoken's (fancy-regex)
to split text the same way; split patterns with anchors (``$``, ``^``) or ``{n,m}+`` are refused here
because the engines read them differently.
"""

from __future__ import annotations

import re
from typing import Any

from lmstack.errors import ConversionError

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
BYTE_CHAR_TABLE: list[str] = [BYTE_TO_CHAR[b] for b in range(256)]  # index = byte value


def bytes_to_token_string(data: bytes) -> str:
    """Bytes in the GPT-2 alphabet, the way tokenizer.json spells byte-level tokens (b" hi" -> "Ġhi")."""
    return "".join([BYTE_CHAR_TABLE[b] for b in data])


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
            raise ConversionError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens; "
                                  "these ranks cannot be written as BPE merges in a tokenizer.json")
        merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------- tokenizer.json inspection


def is_byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json decodes with a ByteLevel decoder (alone or inside a Sequence)."""
    decoder = spec.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in decoders)


def split_pattern_of(pre_tokenizer: dict | None) -> str | None:
    """The regex a byte-level pre-tokenizer splits with, when it is one tiktoken can reproduce."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        use_gpt2_regex = pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space")
        return GPT2_PATTERN if use_gpt2_regex else None
    if pre_tokenizer.get("type") != "Sequence" or len(pre_tokenizer.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre_tokenizer["pretokenizers"]
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in split.get("pattern", {})):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return split["pattern"]["Regex"]


def tiktoken_ranks_from_hf(spec: dict) -> tuple[dict[bytes, int], dict[str, int], str] | str:
    """(ranks, special tokens, split pattern) when this tokenizer.json can run on tiktoken, else the reason.

    Expects the shape of a tokenizer.json (objects where objects belong); a file of another shape may
    raise AttributeError/TypeError/KeyError, which the loader turns into "take the general path".
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"model is {model.get('type')}, not BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return "BPE uses dropout, subword prefixes/suffixes or byte fallback"
    if spec.get("normalizer") is not None:
        return "has a normalizer"
    if not is_byte_level(spec):
        return "decoder is not ByteLevel"
    pattern = split_pattern_of(spec.get("pre_tokenizer"))
    if not isinstance(pattern, str):
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


def hf_bpe_spec(ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str) -> dict[str, Any]:
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
