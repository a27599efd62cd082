"""Real multi-turn chat for supervised fine-tuning: the Chit-Chat Challenge conversations as OpenAI messages.

    from lmstack.data.chitchat import chitchat_conversations, write_chitchat
    for messages in chitchat_conversations():   # [{"role": "user", "content": ...}, {"role": "assistant", ...}]
        ...
    stats = write_chitchat("chitchat.jsonl", limit=2000, seed=0)   # then: lmstack sft --data chitchat.jsonl
    python -m lmstack.data.chitchat --out chitchat.jsonl [--limit N] [--seed S]
    python -m lmstack.data.chitchat --fetch           # only put the pinned archive into the cache

The source is the pinned package ``chitchat-dataset==0.9.0`` (MIT licence): 7,168 open-domain
conversations between two people, in ``chitchat_dataset/dataset.json`` inside the wheel as
``{id: {"messages": [[{"text", "sender", "timestamp"}, ...], ...], "prompt", "ratings", "start"}}``.
The wheel is downloaded with pip into ``CACHE/downloads`` and checked against its SHA-256 by
:func:`lmstack.data.corpora.fetch_package`; the JSON is read from the archive, nothing is installed or
imported. ``dataset=`` (``--dataset``) reads another copy instead: the wheel or the bare ``dataset.json``.

How a conversation becomes messages:
- Messages are taken in order; texts are stripped and empty ones dropped; consecutive messages of one
  sender are joined with newlines into one turn (the file's own grouping is not trusted, so a turn left
  empty by the dropping does not leave two turns of one speaker side by side).
- Whoever speaks first is the user and the other person the assistant, so roles alternate from the
  first turn; a conversation opened by the second participant (or whose opener only sent empty texts)
  simply has that participant as the user.
- A trailing user turn is dropped: nothing answers it, and every record then ends in a reply to train on.
- Left out and counted in :class:`ChitchatStats`: conversations without at least one user turn answered
  by an assistant turn (``skipped_short``; in this release 3,150 conversations have a single speaker
  who was never answered) and conversations with more than two senders (``skipped_speakers``).

Caveats: the participants were people chatting casually (typos, slang, small talk about the
conversation prompt), so this teaches a chat model turn-taking and register, not helpful answers. The
conversation ``prompt`` (a topic suggestion the participants saw) and ``ratings`` are not used.
``write_chitchat`` shuffles the conversations with ``seed`` before taking ``limit`` of them, so a limit
gives a random sample rather than the file's first conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmstack.atomic import write_atomic
from lmstack.data.corpora import Package, fetch_package
from lmstack.errors import DataError
from lmstack.paths import default_cache_dir
from lmstack.progress import Progress

__all__ = ["CHITCHAT_PACKAGE", "ChitchatStats", "chitchat_conversations", "conversation_messages",
           "fetch_chitchat", "read_dataset", "write_chitchat"]

CHITCHAT_PACKAGE = Package(name="chitchat-dataset", version="0.9.0",
                           filename="chitchat_dataset-0.9.0-py3-none-any.whl",
                           sha256="7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")
_MEMBER = "chitchat_dataset/dataset.json"  # the data file inside the wheel

Messages = list[dict[str, str]]


@dataclass
class ChitchatStats:
    """What reading the conversations produced and left out."""

    conversations: int = 0     # yielded
    turns: int = 0             # messages in the yielded conversations (user and assistant together)
    skipped_short: int = 0     # no user turn answered by an assistant turn
    skipped_speakers: int = 0  # more than two senders

    @property
    def mean_turns(self) -> float:
        return self.turns / self.conversations if self.conversations else 0.0


def fetch_chitchat(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The pinned wheel in CACHE/downloads, downloaded with pip when missing; always hash-checked."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    with Progress(progress) as bar:
        return fetch_package(CHITCHAT_PACKAGE, cache / "downloads", bar)


def read_dataset(path: str | os.PathLike) -> dict[str, Any]:
    """The ``{id: conversation}`` table from a chitchat wheel (zip) or a bare ``dataset.json``."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                raw = archive.read(_MEMBER)
        else:
            raw = path.read_bytes()
        table = json.loads(raw)
    except KeyError:
        raise DataError(f"{path} has no {_MEMBER}; give the chitchat-dataset wheel or its dataset.json") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path}: {e}; give the chitchat-dataset wheel or its dataset.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); "
                        "give the chitchat-dataset wheel or its dataset.json") from None
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected a JSON object of conversations by id, got {type(table).__name__}")
    return table


def _speaker_turns(conv_id: str, conversation: Any) -> list[tuple[str, str]]:
    """(sender, text) per turn: non-empty stripped texts in order, consecutive ones of a sender joined."""
    groups = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(groups, list):
        raise DataError(f"conversation {conv_id}: expected {{\"messages\": [[message, ...], ...]}}")
    turns: list[tuple[str, list[str]]] = []
    for group in groups:
        for message in group if isinstance(group, list) else [group]:
            text = message.get("text") if isinstance(message, dict) else None
            sender = message.get("sender") if isinstance(message, dict) else None
            if not isinstance(text, str) or not isinstance(sender, str):
                raise DataError(f"conversation {conv_id}: every message needs a string \"text\" and \"sender\", "
                                f"got {message!r:.120}")
            text = text.strip()
            if not text:
                continue
            if turns and turns[-1][0] == sender:
                turns[-1][1].append(text)
            else:
                turns.append((sender, [text]))
    return [(sender, "\n".join(texts)) for sender, texts in turns]


def conversation_messages(conv_id: str, conversation: Any, stats: ChitchatStats | None = None) -> Messages | None:
    """One conversation as alternating user/assistant messages (rules in the module docstring), or None
    when it is left out (counted in STATS). A conversation of the wrong shape is a DataError."""
    stats = stats if stats is not None else ChitchatStats()
    turns = _speaker_turns(conv_id, conversation)
    if len({sender for sender, _ in turns}) > 2:
        stats.skipped_speakers += 1
        return None
    if len(turns) % 2 == 1:  # the first speaker is the user, so an odd count ends in an unanswered user turn
        turns = turns[:-1]
    if not turns:
        stats.skipped_short += 1
        return None
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, (_, text) in enumerate(turns)]
    stats.conversations += 1
    stats.turns += len(messages)
    return messages


def chitchat_conversations(cache_dir: str | os.PathLike | None = None, progress: bool = True,
                           stats: ChitchatStats | None = None,
                           dataset: str | os.PathLike | None = None) -> Iterator[Messages]:
    """Every usable conversation, in the file's order, as an OpenAI-style message list.

    Reads the pinned wheel (fetched into CACHE/downloads on first use) unless DATASET names another copy;
    left-out conversations are counted in STATS.
    """
    table = read_dataset(dataset if dataset is not None else fetch_chitchat(cache_dir, progress))
    stats = stats if stats is not None else ChitchatStats()
    with Progress(progress) as bar:
        task = bar.add("chitchat conversations", total=len(table), unit="conversations")
        for conv_id, conversation in table.items():
            messages = conversation_messages(conv_id, conversation, stats)
            bar.advance(task)
            if messages is not None:
                yield messages


def write_chitchat(out_jsonl: str | os.PathLike, limit: int | None = None, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   dataset: str | os.PathLike | None = None) -> ChitchatStats:
    """Write ``{"messages": [...]}`` lines to OUT_JSONL (atomically) for ``lmstack sft --data``.

    The conversations are shuffled with SEED, then the first LIMIT are kept (all when None). The
    returned stats describe the written conversations; the skip counts cover the whole file.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1 conversation, got {limit}")
    read_stats = ChitchatStats()
    conversations = list(chitchat_conversations(cache_dir, progress, read_stats, dataset))
    random.Random(seed).shuffle(conversations)
    kept = conversations[:limit] if limit is not None else conversations
    written = ChitchatStats(conversations=len(kept), turns=sum(len(m) for m in kept),
                            skipped_short=read_stats.skipped_short, skipped_speakers=read_stats.skipped_speakers)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps({"messages": messages}, ensure_ascii=False) + "\n" for messages in kept)

    write_atomic(out_jsonl, write)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m lmstack.data.chitchat --out FILE`` writes the Chit-Chat conversations as SFT JSONL."""
    parser = argparse.ArgumentParser(
        prog="python -m lmstack.data.chitchat",
        description="Write the Chit-Chat Challenge conversations (chitchat-dataset 0.9.0, MIT) as "
                    "{\"messages\": [...]} JSONL for `lmstack sft --data`.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", type=Path, help="JSONL file to write")
    action.add_argument("--fetch", action="store_true", help="only download and check the pinned archive")
    parser.add_argument("--limit", type=int, default=None, help="keep this many conversations (a seeded sample)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="read this chitchat wheel or dataset.json instead of the pinned package")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache (default $LMSTACK_CACHE or ~/.cache/lmstack)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.fetch:
            print(fetch_chitchat(args.cache_dir, progress=not args.quiet))
            return 0
        stats = write_chitchat(args.out, args.limit, args.seed, args.cache_dir, not args.quiet, args.dataset)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **asdict(stats), "mean_turns": round(stats.mean_turns, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
