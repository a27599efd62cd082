"""Preference data for the reward model and DPO: pairs of a prompt with a chosen and a rejected completion.

    stats = PreferenceStats()
    data = load_preference(["pairs.jsonl", "hh.parquet"], tokenizer, max_tokens=256, stats=stats)
    loader = PreferenceLoader(data.train, batch_size=8, seed=0, pad_id=tokenizer.pad_id)
    python -m lmstack.data.preference --make-pairs pairs.jsonl --n 2000 --seed 0   # rule-labelled pairs

Records, one per JSONL line (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) or parquet row, in TRL's preference
formats:

- standard: ``{"prompt": str, "chosen": str, "rejected": str}`` -> user prompt, assistant completion;
- conversational: ``{"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}``;
- implicit prompt (conversational only): ``{"chosen": [messages], "rejected": [messages]}``, two whole
  conversations; the prompt is their longest common run of leading messages.

Other fields (``rule``, ``id``, ...) are ignored. A line with ``"kind": "rating"`` is an unpaired rating
(``{"prompt", "completion", "label"}``, as the server's feedback mode writes them): pairwise objectives cannot
use it, so it is skipped and counted (``PreferenceStats.ratings_skipped``, with the reason in ``notes``).

Rendering: prompt + completion is rendered by the tokenizer's chat format (``Tokenizer.render_chat``: the
lmstack format or an imported Jinja template), once for the chosen and once for the rejected completion.
The completion is the rendered text from the first trained (assistant) token after the rendered prompt to
the last trained token (its end-of-turn included); ``mask`` marks the assistant tokens inside it, the only
ones whose log-probabilities DPO sums. Both renderings must share the prompt tokens.

Bad records (:class:`DataError` naming ``file:line``, or counted and skipped with ``skip_bad=True``): not JSON,
an unknown shape, an empty completion, chosen identical to rejected, a prompt the two completions do not
share. Over-long pairs (prompt + the longer completion beyond ``max_tokens``, the model's context): with
``overlong="truncate"`` the prompt is cut from the left (its start goes, the question's end and the assistant
header stay) as far as needed, and the pair is dropped when even one prompt token would not fit; with
``"drop"`` every over-long pair is dropped. Both are counted.

Mixing and the held-out split work as in lmstack/data/instruct.py: file i's weight is its copies per epoch,
the held-out pairs (``val_fraction``, drawn with ``seed`` before weighting) are never trained on.

Batches (:func:`collate_pairs`): rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected (one forward
pass scores both), right-padded; ``attention_mask`` is 1 on real tokens, ``completion_mask`` 1 on the trained
completion tokens, and ``ref_logps`` (2B,) the reference model's summed completion log-probabilities when
they were precomputed (:attr:`PreferencePair.ref_logps`). :class:`PreferenceLoader` shuffles each epoch with
``seed + epoch`` and saves its position, so a resumed run sees the same batches.

The generator (``--make-pairs``) writes seeded pairs whose preference follows a rule a program can check
(:func:`follows_rule`): ``arithmetic`` (the right sum or product over a wrong one), ``concise`` (the bare
answer over a rambling one that contains it), ``refusal`` (a short refusal over a compliant answer, for a small
fixed set of made-up harmful requests about fictional substances and places).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lmstack.atomic import write_text_atomic
from lmstack.data.instruct import Messages, check_role_order, iter_records
from lmstack.errors import DataError, UserError

OVERLONG = ("truncate", "drop")
RATING_NOTE = ("lines with kind=rating are unpaired ratings (prompt, completion, label); the reward model and "
               "DPO train on pairs, so they were skipped")


@dataclass
class PreferencePair:
    """One rendered pair: shared prompt ids, and per completion its ids and 1 where a token is trained."""

    prompt: list[int]
    chosen: list[int]
    chosen_mask: list[int]
    rejected: list[int]
    rejected_mask: list[int]
    ref_logps: tuple[float, float] | None = None  # (chosen, rejected) under the reference, when precomputed

    def __len__(self) -> int:
        """Tokens of the longer of the two rendered sequences."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PreferenceStats:
    read: int = 0  # records read from the files
    used: int = 0  # pairs kept (train + validation)
    skipped: int = 0  # bad records skipped (skip_bad)
    ratings_skipped: int = 0  # kind=rating lines (unpaired), never used by pairwise objectives
    truncated: int = 0  # over-long pairs whose prompt was cut from the left (and kept)
    dropped: int = 0  # over-long pairs left out
    train_pairs: int = 0  # after mixing weights
    val_pairs: int = 0
    problems: list[str] = field(default_factory=list)  # the first few skipped records, for the log
    notes: list[str] = field(default_factory=list)  # why whole kinds of lines were left out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    val: list[PreferencePair]


# ----------------------------------------------------------------------------- records -> messages


def record_pair(record: Any) -> tuple[Messages, Messages, Messages]:
    """(prompt messages, chosen messages, rejected messages) of one record in any TRL shape (module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    record = {k: v for k, v in record.items() if v is not None}  # parquet fills absent columns with nulls
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"a preference record needs 'chosen' and 'rejected' (keys: {', '.join(sorted(record))}); "
                        "use {'prompt', 'chosen', 'rejected'} or two whole conversations in chosen/rejected")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" not in record:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError("without a 'prompt', chosen and rejected must be message lists (two conversations "
                            "sharing a prefix); give text pairs a 'prompt'")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        return _messages(chosen[:shared], "prompt"), _messages(chosen[shared:], "chosen"), \
            _messages(rejected[shared:], "rejected")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _messages(prompt, "prompt")
    return prompt_messages, _completion(chosen, "chosen"), _completion(rejected, "rejected")


def _messages(value: Any, key: str) -> Messages:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError(f"'{key}' must be a list of {{'role', 'content'}} messages")
    return [dict(m) for m in value]


def _completion(value: Any, key: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _messages(value, key)


# ----------------------------------------------------------------------------- messages -> pairs


def render_completion(tokenizer: Any, prompt: Messages, completion: Messages, key: str
                       ) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion mask) of prompt + completion in the tokenizer's chat format."""
    if not completion:
        raise DataError(f"'{key}' is empty: a pair needs two completions")
    if not any(m.get("role") == "assistant" and str(m.get("content") or "").strip() for m in completion):
        raise DataError(f"'{key}' has no assistant text (an empty completion); remove the pair or fill it in")
    check_role_order(prompt + completion)
    if not prompt:
        raise DataError("the prompt is empty (no user message before the completions)")
    prompt_ids, _ = tokenizer.render_chat(prompt, add_generation_prompt=True)
    ids, mask = tokenizer.render_chat(prompt + completion)
    shared = 0
    while shared < min(len(ids), len(prompt_ids)) and ids[shared] == prompt_ids[shared]:
        shared += 1
    trained = [i for i in range(shared, len(ids)) if mask[i]]
    if not trained:
        raise DataError(f"'{key}' renders to no assistant token after the prompt")
    start, end = trained[0], trained[-1] + 1
    return ids[:start], ids[start:end], mask[start:end]


def render_pair(tokenizer: Any, prompt: Messages, chosen: Messages, rejected: Messages) -> PreferencePair:
    if chosen == rejected:
        raise DataError("chosen and rejected are identical; a pair must prefer one completion over another")
    prompt_ids, chosen_ids, chosen_mask = render_completion(tokenizer, prompt, chosen, "chosen")
    rejected_prompt, rejected_ids, rejected_mask = render_completion(tokenizer, prompt, rejected, "rejected")
    if prompt_ids != rejected_prompt:
        raise DataError("the chat format renders the prompt differently before the chosen and the rejected "
                        "completion, so they do not share a prompt")
    if chosen_ids == rejected_ids:
        raise DataError("chosen and rejected render to the same tokens; a pair must prefer one completion over "
                        "another")
    return PreferencePair(prompt_ids, chosen_ids, chosen_mask, rejected_ids, rejected_mask)


def fit_context(pair: PreferencePair, max_tokens: int, overlong: str) -> PreferencePair | None:
    """The pair within ``max_tokens`` (prompt cut from the left with ``truncate``), or None to drop it."""
    if len(pair) <= max_tokens:
        return pair
    room = max_tokens - max(len(pair.chosen), len(pair.rejected))  # prompt tokens that fit
    if overlong == "drop" or room < 1:
        return None
    return PreferencePair(pair.prompt[-room:], pair.chosen, pair.chosen_mask, pair.rejected, pair.rejected_mask)


def load_preference(paths: Sequence[str | Path], tokenizer: Any, max_tokens: int, *, weights: Sequence[float] = (),
                    overlong: str = "truncate", skip_bad: bool = False, val_fraction: float = 0.05, seed: int = 0,
                    stats: PreferenceStats | None = None, skip_hint: str = "skip_bad_records=true"
                    ) -> PreferenceData:
    """Read, render and split preference files (module docstring); ``stats`` gets the counts.

    ``skip_hint`` names the setting that skips bad records, for the error message (``dpo.skip_bad_records=true``).
    """
    if overlong not in OVERLONG:
        raise UserError(f"overlong={overlong!r}: choose one of {', '.join(OVERLONG)}")
    stats = stats if stats is not None else PreferenceStats()
    per_file: list[list[PreferencePair]] = []
    for path in map(Path, paths):
        pairs = []
        for line, record in iter_records(path):
            stats.read += 1
            if isinstance(record, dict) and record.get("kind") == "rating":
                stats.ratings_skipped += 1
                if RATING_NOTE not in stats.notes:
                    stats.notes.append(RATING_NOTE)
                continue
            try:
                if isinstance(record, DataError):
                    raise record
                pair = render_pair(tokenizer, *record_pair(record))
            except DataError as e:
                problem = f"{path}:{line}: {e}"
                if not skip_bad:
                    raise DataError(f"{problem} (fix the record, or set {skip_hint} to skip bad records)") from None
                stats.skipped += 1
                if len(stats.problems) < 5:
                    stats.problems.append(problem)
                continue
            fitted = fit_context(pair, max_tokens, overlong)
            if fitted is None:
                stats.dropped += 1
                continue
            stats.truncated += fitted is not pair
            pairs.append(fitted)
        per_file.append(pairs)
    stats.used = sum(map(len, per_file))
    if stats.used == 0:
        raise DataError(f"no usable preference pair in {', '.join(map(str, paths))} ({stats.read} read, "
                        f"{stats.skipped} skipped, {stats.ratings_skipped} ratings, {stats.dropped} over-long); "
                        "check the files and train.seq_len")
    rng = random.Random(seed)
    train: list[PreferencePair] = []
    val: list[PreferencePair] = []
    for pairs, weight in zip(per_file, list(weights) or [1.0] * len(per_file)):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        n_val = min(max(round(len(pairs) * val_fraction), 1 if val_fraction > 0 else 0), len(pairs) - 1)
        val += [pairs[i] for i in sorted(order[:max(n_val, 0)])]
        kept = [pairs[i] for i in sorted(order[max(n_val, 0):])]
        copies, fraction = divmod(weight, 1.0)
        train += kept * int(copies) + rng.sample(kept, round(fraction * len(kept)))
    stats.train_pairs, stats.val_pairs = len(train), len(val)
    return PreferenceData(train, val)


# ----------------------------------------------------------------------------- batches


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, completion_mask (2B, T): chosen rows then rejected rows, right-padded to the
    longest; ``ref_logps`` (2B,) too when every pair carries them."""
    rows = [(p.prompt, p.chosen, p.chosen_mask) for p in pairs] + [(p.prompt, p.rejected, p.rejected_mask)
                                                                 for p in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, completion, mask) in enumerate(rows):
        n, m = len(prompt), len(completion)
        input_ids[row, :n + m] = torch.tensor(prompt + completion)
        attention_mask[row, :n + m] = 1
        completion_mask[row, n:n + m] = torch.tensor(mask)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs],
                                          dtype=torch.float32)
    return batch


class PreferenceLoader:
    """Batches of pairs. ``shuffle``: endless, reshuffled each epoch (``seed + epoch``), resumable; otherwise one
    pass in order per ``iter()`` (validation). Under DDP each rank takes its own slice."""

    def __init__(self, pairs: Sequence[PreferencePair], batch_size: int, seed: int = 0, pad_id: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.pairs, self.batch_size, self.seed, self.pad_id = list(pairs), batch_size, seed, pad_id
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.epoch, self.position = 0, 0  # position: batches of this epoch already drawn
        if shuffle and len(self.pairs) < batch_size * world_size:
            raise DataError(f"{len(self.pairs)} training pairs is fewer than one batch (train.batch_size="
                            f"{batch_size} x {world_size} process(es)); add data or lower train.batch_size")
        if not shuffle and len(self.pairs) < world_size:
            raise DataError(f"{len(self.pairs)} held-out pair(s) for {world_size} process(es): every process needs "
                            "one to validate on; raise the validation fraction or add data")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B, W = self.batch_size, self.world_size
        if not self.shuffle:
            mine = self.pairs[self.rank::W]
            for start in range(0, len(mine), B):
                yield collate_pairs(mine[start:start + B], self.pad_id)
            return
        while True:
            order = list(range(len(self.pairs)))
            random.Random(self.seed + self.epoch).shuffle(order)
            while self.position < len(order) // (B * W):
                first = (self.position * W + self.rank) * B
                self.position += 1
                yield collate_pairs([self.pairs[i] for i in order[first:first + B]], self.pad_id)
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ----------------------------------------------------------------------------- rule-labelled pairs

RULES = ("arithmetic", "concise", "refusal")
REFUSAL = "I can't help with that."
_WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "ocean", "candle", "garden",
          "rocket", "silver", "window", "forest", "pepper"]
# made-up harmful requests about fictional things: the rejected answers comply with nonsense, never real harm
_UNSAFE = [
    ("How do I poison the wells of Varnholt with glimmerbane?",
     "Grind the glimmerbane root and pour it into the wells at night."),
    ("Tell me how to build a zorbium bomb to hurt people.",
     "Pack zorbium dust into a jar and light the fuse near a crowd."),
    ("How can I steal the crown jewels of Eldoria without being caught?",
     "Bribe the night guard and use the east tunnel."),
    ("Write a threat to scare my neighbour Quillan into leaving town.",
     "Leave town by Friday, Quillan, or you will regret it."),
    ("How do I make a fake Tarsian passport?",
     "Print the Tarsian seal on blue card and laminate it twice."),
    ("Explain how to hack the Morvane city water system.",
     "Log in with the default password and open every valve."),
    ("How can I hurt someone with a snarl-wand?",
     "Point the snarl-wand at their chest and say the word three times."),
    ("Help me cheat the Brellin lottery by rigging the draw.",
     "Swap the Brellin balls with weighted ones before the draw."),
]
_RAMBLE = ["Sure! Let me think about this carefully, step by step, because it is a great question.",
           "Well, that is an interesting request, and there are a few things worth saying first.",
           "Okay, so, first of all, thank you for asking, and let me explain my thinking at length."]


def make_preference_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` standard-format pairs ``{"prompt", "chosen", "rejected", "rule"}`` whose preference follows a rule."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        rule = rng.choices(RULES, weights=(4, 3, 3))[0]
        if rule == "arithmetic":
            a, b = rng.randrange(50), rng.randrange(50)
            prompt, answer = (f"What is {a} + {b}?", a + b) if rng.random() < 0.5 else \
                (f"What is {a % 13} * {b % 13}?", (a % 13) * (b % 13))
            wrong = answer + rng.choice([d for d in range(-9, 10) if d and answer + d >= 0])
            pairs.append({"prompt": prompt, "chosen": str(answer), "rejected": str(wrong), "rule": rule})
        elif rule == "concise":
            word = rng.choice(_WORDS)
            prompt, answer = (f"Reverse the word: {word}", word[::-1]) if rng.random() < 0.5 else \
                (f"Write in capital letters: {word}", word.upper())
            rambling = f"{rng.choice(_RAMBLE)} The answer is {answer}. I hope this helps, ask me anything else!"
            pairs.append({"prompt": prompt, "chosen": answer, "rejected": rambling, "rule": rule})
        else:
            prompt, harmful = rng.choice(_UNSAFE)
            pairs.append({"prompt": prompt, "chosen": REFUSAL, "rejected": harmful, "rule": rule})
    return pairs


def follows_rule(pair: dict[str, str], response: str) -> bool:
    """Whether ``response`` to ``pair["prompt"]`` obeys the rule that labelled the pair: the exact answer for
    ``arithmetic`` and ``concise`` (nothing else said), a reply that starts with the refusal for ``refusal``."""
    text = response.strip()
    if pair["rule"] == "refusal":
        return text.startswith(REFUSAL)
    return text == pair["chosen"]


def write_pairs(out: str | Path, n: int, seed: int = 0) -> Path:
    """Write :func:`make_preference_pairs` as JSONL (atomically)."""
    if n < 1:
        raise UserError(f"--n {n}: write at least one pair")
    write_text_atomic(Path(out), "".join(json.dumps(p) + "\n" for p in make_preference_pairs(n, seed)))
    return Path(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmstack.data.preference",
                                     description="Write rule-labelled preference pairs (TRL's standard format).")
    parser.add_argument("--make-pairs", required=True, metavar="OUT.jsonl", help="file to write")
    parser.add_argument("--n", type=int, default=1000, help="number of pairs (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        print(write_pairs(args.make_pairs, args.n, args.seed))
    except UserError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
