"""Instruction data for supervised fine-tuning: conversation files in, padded or packed batches out.

    stats = InstructStats()
    data = load_instruct(["chat.jsonl", "alpaca.parquet"], tokenizer, max_tokens=257, stats=stats)
    train = InstructLoader(data.train, batch_size=8, seed=0, pad_id=tokenizer.pad_id)
    packed = InstructLoader(data.train, batch_size=8, seed=0, pad_id=tokenizer.pad_id, pack_len=256)
    python -m lmstack.data.instruct --make-tasks tasks.jsonl --n 2000 --seed 0   # task data with exact answers
    python -m lmstack.data.instruct --make-tasks t.jsonl --families arithmetic,strings   # named task families

Records, one per JSONL line (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) or parquet row, in any of three shapes,
all read into the same messages:

- OpenAI chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}``;
- prompt/completion: ``{"prompt": P, "completion": C}`` -> user P, assistant C;
- Alpaca: ``{"instruction": I, "input": X, "output": O}`` -> user ``I`` (plus a blank line and ``X`` when
  X is not empty), assistant O.

Each conversation is rendered by the tokenizer's own chat format (``Tokenizer.render_chat``: the lmstack
format or an imported model's Jinja template) into token ids and a mask of the tokens to train on, then
``loss_on`` picks them: ``assistant`` (every assistant turn, with its end-of-turn token), ``all`` (every
token), ``last_turn`` (the last assistant turn only: the last run of assistant tokens in the mask).
Tool calls follow the chat format: the lmstack format writes an assistant's ``tool_calls`` as
``<|tool_call|>{"name", "arguments"}`` inside the trained assistant turn; a Jinja template renders them as
it chooses (many ignore them).

Role order is checked: an optional system message first, then a user message; a user is answered by an
assistant; a tool message follows an assistant with ``tool_calls`` or another tool message. A record that
breaks a rule, does not parse, or has no token to train on is a :class:`DataError` naming file and line,
or is counted and skipped (``skip_bad=True``). A conversation longer than ``max_tokens`` is cut
(``overlong="truncate"``; left out when no trainable token survives the cut) or left out (``"drop"``);
both are counted in :class:`InstructStats`.

Mixing: file i's weight is its copies per epoch (2.0: every conversation twice; 0.5: a seeded half).
The held-out conversations (``val_fraction``, drawn with ``seed`` before weighting) are never trained on.

Batches: :func:`collate` pads to the longest example of the batch on the right; ``labels`` is the next
token where that token is trained and -1 elsewhere (prompts, padding), so padding never reaches the
loss. :class:`InstructLoader` shuffles each epoch with ``seed + epoch`` and saves its position
(``state_dict``), so a resumed run sees the same batches; the data is held in memory (fine-tuning sets
are small), which is the caveat for very large ones.

Packing (``pack_len`` = ``train.seq_len``): each conversation is shifted on its own first (its ``len - 1``
input tokens and their labels, exactly the padded row), then the conversations are packed best-fit
decreasing into windows of ``pack_len`` input tokens (:func:`pack_best_fit`), so no label ever crosses a
conversation boundary. :func:`collate_packed` adds ``positions`` (restarting at 0 in each conversation, -1
on padding) and ``document_ids`` (0, 1, ... per conversation in the row, -1 on padding); the model keeps
attention inside each conversation with them, so a packed conversation's logits equal its logits alone.
Each epoch packs the ``seed + epoch`` shuffle (equal lengths tie in that order) and shuffles the windows
with the same seed: deterministic, and resumable from (epoch, windows drawn). The window shapes depend
only on the multiset of lengths, so every epoch has the same number of windows. The last partial batch
of windows of an epoch is left for the next epoch's shuffle, as unpacked examples are.

Generated task data: :func:`make_task_conversations` (five kinds, its output fixed by its seed so that
recorded benchmarks stay reproducible) and :func:`make_family_conversations`, tasks grouped into the
named families of :data:`TASK_FAMILIES` (arithmetic, strings, formatting, lists; four kinds each, with
instructions worded differently across families) for held-out-family studies: each record carries
``family`` and ``kind`` next to its messages. :func:`answer_shape` maps an answer to its shape (digits to
``9``, letters to ``a``, punctuation kept), a format-compliance check softer than exact match.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmstack.atomic import write_text_atomic
from lmstack.data.readers import decode_utf8, format_of, open_binary
from lmstack.errors import DataError, UserError

Messages = list[dict[str, Any]]


@dataclass
class Example:
    """One rendered conversation: token ids and 1 where the token is trained (same length)."""

    ids: list[int]
    mask: list[int]


@dataclass
class InstructStats:
    read: int = 0  # records read from the files
    used: int = 0  # conversations kept (train + validation)
    skipped: int = 0  # bad records skipped (skip_bad)
    truncated: int = 0  # over-long conversations cut to max_tokens (and kept)
    dropped: int = 0  # over-long conversations left out (overlong="drop", or nothing trained left after the cut)
    train_examples: int = 0  # after mixing weights
    val_examples: int = 0
    trainable_tokens: int = 0  # trained tokens in one epoch of the training examples
    problems: list[str] = field(default_factory=list)  # the first few skipped records, for the log

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InstructData:
    train: list[Example]
    val: list[Example]


# ----------------------------------------------------------------------------- records -> messages


def record_messages(record: Any) -> Messages:
    """The messages of one record in any of the three shapes (see the module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    record = {k: v for k, v in record.items() if v is not None}  # parquet fills absent columns with nulls
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError("'messages' must be a non-empty list of {'role', 'content'} objects")
        return [dict(m) if isinstance(m, dict) else m for m in messages]
    if "prompt" in record and "completion" in record:
        return [{"role": "user", "content": _text(record, "prompt")},
                {"role": "assistant", "content": _text(record, "completion")}]
    if "instruction" in record and "output" in record:
        extra = record.get("input") or ""
        prompt = _text(record, "instruction") + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    raise DataError(f"unknown record shape (keys {', '.join(sorted(map(str, record))) or 'none'}); use "
                    "{'messages': [...]}, {'prompt', 'completion'} or {'instruction', 'input', 'output'}")


def _text(record: dict[str, Any], key: str) -> str:
    if not isinstance(record[key], str):
        raise DataError(f"'{key}' must be a string, got {type(record[key]).__name__}")
    return record[key]


_NEXT_ROLES = {"system": ("user",), "user": ("assistant",), "assistant": ("user",), "tool": ("tool", "assistant")}


def check_role_order(messages: Messages) -> None:
    """DataError naming the first message out of order (rules in the module docstring)."""
    previous, previous_calls = None, False
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if previous is None:
            allowed: tuple[str, ...] = ("system", "user")
        else:
            allowed = _NEXT_ROLES[previous] + (("tool",) if previous == "assistant" and previous_calls else ())
        if role not in allowed:
            after = f"after a {previous} message" if previous else "as the first message"
            raise DataError(f"message {i}: role {role!r} {after}; expected {' or '.join(allowed)} "
                            "(system first, then user and assistant turns; tool results after an assistant "
                            "tool call)")
        previous, previous_calls = role, bool(message.get("tool_calls"))


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number from 1, parsed record) of a JSONL (.gz/.zst) or parquet file; unparsable
    JSON lines come back as the DataError to raise."""
    fmt = format_of(path)
    if fmt is None or fmt[0] == "txt":
        raise DataError(f"{path}: conversation files are .jsonl (optionally .gz / .zst) or .parquet")
    if not path.is_file():
        raise DataError(f"{path} does not exist; name an existing conversation file")
    if fmt[0] == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, record
        return
    with open_binary(path, fmt[1]) as f:
        for number, raw in enumerate(f, 1):
            text, _ = decode_utf8(raw)
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as e:
                yield number, DataError(f"not valid JSON ({e.msg})")


# ----------------------------------------------------------------------------- messages -> examples


def select_loss(mask: list[int], loss_on: str) -> list[int]:
    """The loss mask for ``loss_on`` from the chat format's assistant mask."""
    if loss_on == "all":
        return [1] * len(mask)
    if loss_on == "last_turn":
        end = max((i + 1 for i, m in enumerate(mask) if m), default=0)
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        return [1 if start <= i < end else 0 for i in range(len(mask))]
    return list(mask)


def render_example(tokenizer: Any, messages: Messages, loss_on: str) -> Example:
    check_role_order(messages)
    ids, mask = tokenizer.render_chat(messages)
    return Example(ids, select_loss(mask, loss_on))


def load_instruct(paths: Sequence[str | Path], tokenizer: Any, max_tokens: int, *, weights: Sequence[float] = (),
                  loss_on: str = "assistant", overlong: str = "truncate", skip_bad: bool = False,
                  val_fraction: float = 0.05, seed: int = 0, stats: InstructStats | None = None) -> InstructData:
    """Read, render and split the conversation files (see the module docstring); ``stats`` gets the counts."""
    stats = stats if stats is not None else InstructStats()
    per_file: list[list[Example]] = []
    for path in map(Path, paths):
        examples = []
        for line, record in iter_records(path):
            stats.read += 1
            try:
                if isinstance(record, DataError):
                    raise record
                example = render_example(tokenizer, record_messages(record), loss_on)
                if len(example.ids) > max_tokens:
                    if overlong == "drop":
                        stats.dropped += 1
                        continue
                    example = Example(example.ids[:max_tokens], example.mask[:max_tokens])
                    if not any(example.mask[1:]):  # the cut removed every trained token
                        stats.dropped += 1
                        continue
                    stats.truncated += 1
                if not any(example.mask[1:]):  # the first token is never a target
                    raise DataError(f"no token to train on (sft.loss_on={loss_on}): the conversation needs an "
                                    "assistant message")
            except DataError as e:
                problem = f"{path}:{line}: {e}"
                if not skip_bad:
                    raise DataError(f"{problem} (fix the record, or set sft.skip_bad_records=true to skip "
                                    "bad records)") from None
                stats.skipped += 1
                if len(stats.problems) < 5:
                    stats.problems.append(problem)
                continue
            examples.append(example)
        per_file.append(examples)
    stats.used = sum(map(len, per_file))
    if stats.used == 0:
        raise DataError(f"no usable conversation in {', '.join(map(str, paths))} ({stats.read} read, "
                        f"{stats.skipped} skipped, {stats.dropped} over-long); check the files and train.seq_len")
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    for examples, weight in zip(per_file, list(weights) or [1.0] * len(per_file)):
        order = list(range(len(examples)))
        rng.shuffle(order)
        n_val = round(len(examples) * val_fraction)
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(examples) - 1) if len(examples) > 1 else 0
        val += [examples[i] for i in sorted(order[:n_val])]
        kept = [examples[i] for i in sorted(order[n_val:])]
        copies, fraction = divmod(weight, 1.0)
        train += kept * int(copies) + rng.sample(kept, round(fraction * len(kept)))
    stats.train_examples, stats.val_examples = len(train), len(val)
    stats.trainable_tokens = sum(sum(e.mask[1:]) for e in train)
    return InstructData(train, val)


# ----------------------------------------------------------------------------- batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids (B, T) and labels (B, T), T = longest - 1, labels -1 where
    the next token is not trained or is padding."""
    width = max(len(e.ids) for e in examples) - 1
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -1, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        input_ids[row, :n] = torch.tensor(e.ids[:-1])
        targets = torch.tensor(e.ids[1:])
        labels[row, :n] = torch.where(torch.tensor(e.mask[1:], dtype=torch.bool), targets, -1)
    return {"input_ids": input_ids, "labels": labels}


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into windows of at most ``capacity``, best-fit decreasing: longest
    first, each into the fullest window it still fits (a new window when none does). Equal lengths keep
    their order in ``lengths``; within a window the indices are in packing order (longest first)."""
    windows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, window index), sorted: the best fit is the first with room
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise DataError(f"a conversation of {n + 1} tokens does not fit a packed window of {capacity} + 1; "
                            "load the data with max_tokens = train.seq_len + 1")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            windows.append([i])
            room, window = capacity - n, len(windows) - 1
        else:
            room, window = free.pop(at)
            windows[window].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, window))
    return windows


def collate_packed(windows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per window of conversations: input_ids, labels, positions, document_ids, each (B, T) with T the
    fullest window's input tokens. Each conversation contributes its own shifted row (see :func:`collate`);
    positions restart at 0 per conversation, document_ids count the conversations of the row; padding is
    pad_id / -1 / -1 / -1."""
    width = max(sum(len(e.ids) - 1 for e in window) for window in windows)
    shape = (len(windows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, -1, dtype=torch.long)
    positions = torch.full(shape, -1, dtype=torch.long)
    document_ids = torch.full(shape, -1, dtype=torch.long)
    for row, window in enumerate(windows):
        start = 0
        for document, e in enumerate(window):
            n = len(e.ids) - 1
            span = slice(start, start + n)
            input_ids[row, span] = torch.tensor(e.ids[:-1])
            labels[row, span] = torch.where(torch.tensor(e.mask[1:], dtype=torch.bool), torch.tensor(e.ids[1:]), -1)
            positions[row, span] = torch.arange(n)
            document_ids[row, span] = document
            start += n
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "document_ids": document_ids}


class InstructLoader:
    """Padded batches of examples, or with ``pack_len`` batches of packed windows of that many input tokens,
    or with ``padding_free`` the padded batches' examples each laid out as one packed row (1, their tokens).
    ``shuffle``: endless, reshuffled each epoch (``seed + epoch``), resumable; otherwise one pass in order
    per ``iter()`` (validation). Under DDP each rank takes its own slice."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int = 0, pad_id: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, pack_len: int | None = None,
                 padding_free: bool = False):
        if pack_len and padding_free:
            raise ValueError("pack_len and padding_free are two layouts of a batch; give one")
        self.examples, self.batch_size, self.seed, self.pad_id = list(examples), batch_size, seed, pad_id
        self.shuffle, self.rank, self.world_size, self.pack_len = shuffle, rank, world_size, pack_len
        self.padding_free = padding_free
        self.epoch, self.position = 0, 0  # position: batches of this epoch already drawn
        self._packed: tuple[int, list[list[int]]] | None = None  # (epoch, its windows), packed once per epoch
        rows = len(self._units(0)) if shuffle else 0
        if shuffle and rows < batch_size * world_size:
            what = "packed windows" if pack_len else "training conversations"
            raise DataError(f"{rows} {what} is fewer than one batch "
                            f"(train.batch_size={batch_size} x {world_size} process(es)); add data or lower "
                            "train.batch_size")
        if not shuffle and len(examples) < world_size:
            raise DataError(f"{len(examples)} held-out conversation(s) for {world_size} process(es): every process "
                            "needs one to validate on; raise sft.val_fraction or add data")

    def _units(self, epoch: int) -> list[list[int]]:
        """The epoch's rows in draw order, each a list of example indices (one index when not packing)."""
        order = list(range(len(self.examples)))
        random.Random(self.seed + epoch).shuffle(order)
        if not self.pack_len:
            return [[i] for i in order]
        if self._packed is None or self._packed[0] != epoch:
            lengths = [len(self.examples[i].ids) - 1 for i in order]
            windows = [[order[j] for j in window] for window in pack_best_fit(lengths, self.pack_len)]
            random.Random(self.seed + epoch).shuffle(windows)
            self._packed = (epoch, windows)
        return self._packed[1]

    def _collate(self, rows: Sequence[Sequence[Example]]) -> dict[str, torch.Tensor]:
        if self.pack_len:
            return collate_packed(rows, self.pad_id)
        if self.padding_free:  # (1, total tokens): the batch's conversations back to back
            return collate_packed([[row[0] for row in rows]], self.pad_id)
        return collate([row[0] for row in rows], self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B, W = self.batch_size, self.world_size
        if not self.shuffle:
            mine = self.examples[self.rank::W]
            rows = [[mine[i] for i in window] for window in pack_best_fit([len(e.ids) - 1 for e in mine],
                                                                          self.pack_len)] \
                if self.pack_len else [[e] for e in mine]
            for start in range(0, len(rows), B):
                yield self._collate(rows[start:start + B])
            return
        while True:
            units = self._units(self.epoch)
            while self.position < len(units) // (B * W):
                first = (self.position * W + self.rank) * B
                self.position += 1
                yield self._collate([[self.examples[i] for i in unit] for unit in units[first:first + B]])
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ----------------------------------------------------------------------------- task data with exact answers


def make_task_conversations(n: int, seed: int = 0) -> list[dict[str, Messages]]:
    """``n`` conversations of small tasks with one exact answer each: addition, multiplication, reversing
    and upper-casing a word, and formatting a name; some carry a system message."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "ocean", "candle",
             "garden", "rocket", "silver", "window", "forest", "pepper"]

    def task() -> tuple[str, str]:
        kind = rng.randrange(5)
        a, b, word = rng.randrange(100), rng.randrange(100), rng.choice(words)
        if kind == 0:
            return f"What is {a} + {b}?", str(a + b)
        if kind == 1:
            return f"What is {a % 13} * {b % 13}?", str((a % 13) * (b % 13))
        if kind == 2:
            return f"Reverse the word: {word}", word[::-1]
        if kind == 3:
            return f"Write in capital letters: {word}", word.upper()
        first, last = rng.choice(words).title(), rng.choice(words).title()
        return f"Format as 'Last, First': {first} {last}", f"{last}, {first}"

    conversations = []
    for _ in range(n):
        prompt, answer = task()
        messages = [{"role": "system", "content": "Answer with the result only."}] if rng.random() < 0.3 else []
        conversations.append({"messages": [*messages, {"role": "user", "content": prompt},
                                           {"role": "assistant", "content": answer}]})
    return conversations


TaskKind = Callable[[random.Random], tuple[str, str]]  # rng -> (instruction, exact answer)
_WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "ocean", "candle",
          "garden", "rocket", "silver", "window", "forest", "pepper"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"What is {a} + {b}?", str(a + b)


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(13), rng.randrange(13)
    return f"What is {a} * {b}?", str(a * b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def _double(rng: random.Random) -> tuple[str, str]:
    a = rng.randrange(50)
    return f"What is twice {a}?", str(2 * a)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Reverse the word: {word}", word[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Write in capital letters: {word}", word.upper()


def _first_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Give the first letter of: {word}", word[0]


def _spell(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Spell out with dashes: {word}", "-".join(word)


def _name(rng: random.Random) -> tuple[str, str]:
    first, last = (w.title() for w in rng.sample(_WORDS, 2))
    return f"Format as 'Last, First': {first} {last}", f"{last}, {first}"


def _date(rng: random.Random) -> tuple[str, str]:
    day, month, year = rng.randrange(1, 29), rng.randrange(12), rng.randrange(1900, 2030)
    return f"Write the date {day} {_MONTHS[month]} {year} as YYYY-MM-DD", f"{year}-{month + 1:02d}-{day:02d}"


def _brackets(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Put the word in square brackets: {word}", f"[{word}]"


def _commas(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return f"Join with commas: {' '.join(words)}", ", ".join(words)


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), 3)
    return f"Sort these numbers: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def _sort_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return f"Sort these words: {' '.join(words)}", " ".join(sorted(words))


def _last(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 4)
    return f"Which word comes last in the list: {' '.join(words)}", words[-1]


def _count(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randrange(2, 7))
    return f"How many words are in the list: {' '.join(words)}", str(len(words))


TASK_FAMILIES: dict[str, dict[str, TaskKind]] = {
    "arithmetic": {"add": _add, "multiply": _multiply, "subtract": _subtract, "double": _double},
    "strings": {"reverse": _reverse, "upper": _upper, "first_letter": _first_letter, "spell": _spell},
    "formatting": {"name": _name, "date": _date, "brackets": _brackets, "commas": _commas},
    "lists": {"sort_numbers": _sort_numbers, "sort_words": _sort_words, "last": _last, "count": _count},
}


def make_family_conversations(n: int, seed: int = 0, families: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``n`` task conversations ``{"messages", "family", "kind"}`` drawn uniformly over the kinds of
    ``families`` (default: every family in :data:`TASK_FAMILIES`), each with one exact answer."""
    names = list(families) if families is not None else list(TASK_FAMILIES)
    unknown = [name for name in names if name not in TASK_FAMILIES]
    if unknown or not names:
        raise UserError(f"unknown task famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown) or '(none)'}; "
                        f"choose from {', '.join(TASK_FAMILIES)}")
    kinds = [(family, kind, make) for family in names for kind, make in TASK_FAMILIES[family].items()]
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        family, kind, make = kinds[rng.randrange(len(kinds))]
        prompt, answer = make(rng)
        conversations.append({"messages": [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": answer}],
                              "family": family, "kind": kind})
    return conversations


def answer_shape(text: str) -> str:
    """The shape of an answer: runs of digits become ``9``, runs of letters ``a`` (case kept as ``A`` for
    an upper-case run), other characters stay; "Maple, Tiger" -> "Aa, Aa", "2001-03-09" -> "9-9-9"."""
    return re.sub(r"[a-z]+", "a", re.sub(r"[A-Z]+", "A", re.sub(r"[0-9]+", "9", text.strip())))


def write_tasks(out: str | Path, n: int, seed: int = 0, families: Sequence[str] | None = None) -> Path:
    """Write :func:`make_task_conversations` (or, given ``families``, :func:`make_family_conversations`) as
    messages JSONL (atomically)."""
    if n < 1:
        raise UserError(f"--n {n}: write at least one conversation")
    conversations = make_family_conversations(n, seed, families) if families is not None \
        else make_task_conversations(n, seed)
    lines = "".join(json.dumps(c) + "\n" for c in conversations)
    write_text_atomic(Path(out), lines)
    return Path(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmstack.data.instruct",
                                     description="Write task conversations with exact answers as messages JSONL.")
    parser.add_argument("--make-tasks", required=True, metavar="OUT.jsonl", help="file to write")
    parser.add_argument("--n", type=int, default=1000, help="number of conversations")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--families", default=None,
                        help=f"comma-separated task families ({', '.join(TASK_FAMILIES)}) instead of the five "
                             "default kinds; records then carry 'family' and 'kind'")
    args = parser.parse_args(argv)
    try:
        families = [f.strip() for f in args.families.split(",")] if args.families is not None else None
        print(write_tasks(args.make_tasks, args.n, args.seed, families))
    except UserError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
