"""Learning a vocabulary: argument checks, a memory check before any work, and the two trainers.

    from lmstack.tokenizer.training import check_train_args, check_training_memory
    check_train_args(8192, "bpe")                      # ConfigError for a kind or size that cannot be trained
    check_training_memory(2_000_000_000, 8192, "bpe")  # ConfigError when it clearly cannot fit in memory

``Tokenizer.train`` calls these; ``lmstack.data.tokenizer_training.train_from_files`` (the CLI path) calls
the memory check with the size of the input files first, so a job that cannot fit is refused in one line
instead of being killed by the kernel hours later.

- BPE trains with ``rustbpe`` (nanochat's trainer, a GPT-4-style split regex); its ranks become a
  tiktoken-backed tokenizer with the special tokens on top.
- Unigram trains with Hugging Face ``tokenizers`` on the same split regex and a ``ByteLevel`` alphabet, so
  arbitrary text and bytes round-trip exactly.

Honest caveat on the memory estimate: it is deliberately on the low side, so that it refuses only what
clearly cannot fit. The per-byte constants sit below the marginal costs measured on 1-20 MB of text (the
trainers keep each distinct pre-token once, so cost per byte falls as a corpus repeats itself), and the
input size is the size on disk, which undercounts compressed files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from lmstack.errors import ConfigError, DataError
from lmstack.tokenizer.bpe import BYTE_CHAR_TABLE, SPLIT_PATTERN
from lmstack.tokenizer.special import MAX_VOCAB_SIZE, NUM_SPECIAL_TOKENS, special_token_list

TrainKind = Literal["bpe", "unigram"]

# Memory the trainers need per byte of input text (the table of distinct pre-tokens and their pair counts);
# measured marginal costs on 1-20 MB of source code: rustbpe 3.4, tokenizers' unigram 7.
_BYTES_PER_TEXT_BYTE = {"bpe": 1, "unigram": 4}
# Per vocabulary id: the token, its merge, the id tables of both directions and its tokenizer.json entry
# (measured: 2^20 ids, nearly all reserved, take 0.4 GB to train and 1.9 GB at the peak of saving).
_BYTES_PER_VOCAB_ID = 1024
# the trainers' fixed tables before any text
_BASE_BYTES = 64 << 20


def check_train_args(vocab_size: int, kind: str) -> None:
    """Raise ConfigError for a vocabulary that cannot be trained (before any text is read)."""
    if kind not in ("bpe", "unigram"):
        raise ConfigError(f"kind must be 'bpe' or 'unigram', got {kind!r}")
    least = 256 + NUM_SPECIAL_TOKENS + (1 if kind == "unigram" else 0)
    if not isinstance(vocab_size, int) or vocab_size < least:
        raise ConfigError(f"vocab_size={vocab_size} is too small: a {kind} vocabulary needs the 256 byte "
                          f"tokens plus {NUM_SPECIAL_TOKENS} special tokens, so at least {least}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ConfigError(f"vocab_size={vocab_size:,} is too large: lmstack trains vocabularies of at most "
                          f"{MAX_VOCAB_SIZE:,} (2^20) ids; published ones stay under a million, most under 300k")


def estimate_training_memory(text_bytes: int, vocab_size: int, kind: TrainKind) -> int:
    """Bytes of memory training ``vocab_size`` ids on ``text_bytes`` of text needs, on the low side."""
    return _BASE_BYTES + _BYTES_PER_TEXT_BYTE[kind] * text_bytes + _BYTES_PER_VOCAB_ID * vocab_size


def available_memory() -> int:
    """Bytes this process can still allocate: free memory, or the container's limit when that is lower."""
    import psutil

    available = psutil.virtual_memory().available
    try:  # cgroup v2: a container sees the host's memory in /proc/meminfo but is killed at memory.max
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass  # no cgroup v2 files (not Linux, or cgroup v1): the machine's figure stands
    return available


def check_training_memory(text_bytes: int, vocab_size: int, kind: TrainKind) -> None:
    """Raise ConfigError when training clearly cannot fit in the memory available now."""
    needed = estimate_training_memory(text_bytes, vocab_size, kind)
    available = available_memory()
    if needed > available:
        raise ConfigError(f"training a {kind} vocabulary of {vocab_size:,} ids on {text_bytes / 1e9:.1f} GB of text "
                          f"needs about {needed / 1e9:.1f} GB of memory, but {available / 1e9:.1f} GB is "
                          "available; train on less text (--max-bytes) or a smaller vocabulary (--vocab-size)")


class CountingIterator:
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
            raise DataError("no training text: the input yielded no documents")


def train_bpe_ranks(texts: CountingIterator, learned: int) -> dict[bytes, int]:
    """Byte-level BPE ranks (token bytes -> id = merge priority) with at most ``learned`` entries."""
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts, learned, pattern=SPLIT_PATTERN)
    texts.check_nonempty()
    return dict(trainer.get_mergeable_ranks())


def train_unigram(texts: CountingIterator, learned: int, vocab_size: int) -> Any:
    """A unigram ``tokenizers.Tokenizer`` over the byte alphabet (every text is representable), specials
    appended at the top so that it holds exactly ``vocab_size`` ids."""
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
    missing = [c for c in BYTE_CHAR_TABLE if c not in vocab]
    if missing:  # the trainer may drop alphabet symbols it never saw; put them back so every byte encodes
        model = json.loads(hf.to_str())
        model["model"]["vocab"] += [[c, -20.0] for c in missing]
        hf = HFTokenizer.from_str(json.dumps(model))
    specials = special_token_list(vocab_size - hf.get_vocab_size())
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    # Rebuilt from its own JSON, the object a later ``Tokenizer.load`` makes: the trainer's in-memory model
    # was seen to break a tie between equal-score segmentations differently from the loaded one.
    return HFTokenizer.from_str(hf.to_str())
