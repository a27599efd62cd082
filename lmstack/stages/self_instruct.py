"""`lmstack self-instruct`: a model writes its own instruction data, filtered, as chat JSONL for `lmstack sft`.

    lmstack self-instruct --model runs/tiny-sft/model --out synthetic.jsonl --n 200 --seed 0
    lmstack sft --model runs/tiny/model --data synthetic.jsonl --out runs/tiny-self

    summary = self_instruct("runs/tiny-sft/model", "synthetic.jsonl", n=200, seed=0)

The loop follows Self-Instruct in a simple form. Each round:

1. builds ``batch_size`` prompts, each listing ``num_demos`` tasks drawn (seeded) from the pool (the seed
   tasks plus every task kept so far) as a numbered list, ending with the next number so the model writes
   a new instruction on one line;
2. asks the model, in one batched ``Engine.generate`` call over all of them, for those instructions;
3. asks it, in a second batched call, to complete each new instruction in the demonstrations' layout
   (``Instruction: ... / Input: ... / Output: ...`` blocks separated by ``###``): the model may write an
   ``Input:`` first and then the ``Output:``, or the output alone;
4. filters each candidate in order (so the tasks kept in this round count for the next candidate):
   ``empty`` (no instruction or no output), ``length`` (instruction words outside
   [``min_words``, ``max_words``] or an output over ``max_output_chars``), ``repetition`` (degenerate
   text: under half of its word 3-grams distinct, or one word over half of a long text), ``duplicate``
   (the same instruction as a pooled one, up to case and spacing) and ``similar`` (ROUGE-L F1 to some
   pooled instruction at or above ``max_rouge``, from the ``rouge-score`` package).

Rounds go on until ``n`` tasks are kept or ``max_rounds`` have run (a weak model may keep few: the summary
says so). Prompts are plain text, not the chat format, so base models work (as in the original method);
a prompt that would not leave ``max_tokens`` of room in the model's context loses demonstrations until it
does. Each request carries its own sampling seed derived from ``seed``, round and index, so a seeded run
is identical whatever the batch shares.

Output: one JSON object per kept task, ``{"messages": [user, assistant], "provenance": {...}}`` (the user
message is the instruction, plus a blank line and the input when there is one); ``provenance`` names the
generator, model, round, demonstration ids (``seed-I`` / ``gen-I``) and the highest ROUGE-L to the pool.
`lmstack sft` reads these records (extra keys are ignored). The file is written atomically at the end.

The summary (printed by the CLI, returned here): ``generated`` (candidates examined), ``kept``,
``rejected`` per filter (``generated == kept + sum(rejected)``), ``rounds``, and the kept instructions'
diversity: mean pairwise ROUGE-L (over at most 200 of them, seeded) and distinct-2 (distinct word bigrams
over all bigrams).

Caveats: the filters judge form, not truth: a kept answer may be wrong. ROUGE-L against the whole pool is
quadratic in the kept count, fine for thousands of tasks, slow for hundreds of thousands.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmstack.atomic import write_text_atomic
from lmstack.errors import DataError, UserError
from lmstack.progress import Progress

SEED_TASKS = Path(__file__).with_name("seed_tasks.jsonl")
FILTERS = ("empty", "length", "repetition", "duplicate", "similar")
_SEPARATOR = "###"
_DIVERSITY_SAMPLE = 200


@dataclass
class Task:
    instruction: str
    input: str
    output: str
    id: str = ""  # seed-I for a seed task, gen-I for a generated one (provenance of demonstrations)


@dataclass
class Limits:
    """The filters' thresholds (module docstring)."""

    max_rouge: float = 0.7
    min_words: int = 3
    max_words: int = 150
    max_output_chars: int = 2000


# ----------------------------------------------------------------------------- seed tasks


def load_seed_tasks(path: str | Path | None = None) -> list[Task]:
    """The ``{"instruction", "input", "output"}`` records of ``path`` (default: the shipped set)."""
    path = Path(path) if path is not None else SEED_TASKS
    tasks = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_no}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                    or not isinstance(record.get("output"), str) or not isinstance(record.get("input", ""), str):
                raise DataError(f"{path}:{line_no}: a seed task is {{\"instruction\": str, \"input\": str, "
                                "\"output\": str}} (input may be empty)")
            tasks.append(Task(record["instruction"].strip(), record.get("input", "").strip(),
                              record["output"].strip(), id=f"seed-{len(tasks)}"))
    if not tasks:
        raise DataError(f"{path}: no seed tasks; give a JSONL file of {{\"instruction\", \"input\", \"output\"}} "
                        "records (or leave --seed-tasks out for the shipped set)")
    return tasks


# ----------------------------------------------------------------------------- filters


class Similarity:
    """ROUGE-L F1 between instructions (rouge-score's tokenizer: lower-cased alphanumeric words)."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def __call__(self, a: str, b: str) -> float:
        return self._scorer.score(a, b)["rougeL"].fmeasure

    def max_to(self, text: str, pool: list[str]) -> float:
        return max((self(text, other) for other in pool), default=0.0)


def normalize(text: str) -> str:
    """Case and spacing folded: the key of the exact-duplicate filter."""
    return " ".join(text.lower().split())


def is_repetitive(text: str) -> bool:
    """Degenerate text: under half of its word 3-grams distinct, or one word over half of 8+ words."""
    words = text.lower().split()
    if len(words) >= 8 and max(words.count(w) for w in set(words)) > len(words) / 2:
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(trigrams) >= 4 and len(set(trigrams)) < len(trigrams) / 2


def rejection(instruction: str, output: str, pool: list[str], seen: set[str], similarity: Similarity,
              limits: Limits) -> tuple[str | None, float]:
    """(the first filter in :data:`FILTERS` that rejects this candidate or None, its max ROUGE-L to ``pool``)."""
    if not instruction.strip() or not output.strip():
        return "empty", 0.0
    words = len(instruction.split())
    if not limits.min_words <= words <= limits.max_words or len(output) > limits.max_output_chars:
        return "length", 0.0
    if is_repetitive(instruction) or is_repetitive(output):
        return "repetition", 0.0
    if normalize(instruction) in seen:
        return "duplicate", 1.0
    closest = similarity.max_to(instruction, pool)
    if closest >= limits.max_rouge:
        return "similar", closest
    return None, closest


# ----------------------------------------------------------------------------- prompts


def instruction_prompt(demos: list[Task]) -> str:
    """A numbered task list ending at the next number: the model continues with one new instruction."""
    lines = ["Come up with a series of diverse tasks. Each is one instruction on its own line."]
    lines += [f"{i}. {' '.join(d.instruction.split())}" for i, d in enumerate(demos, 1)]
    return "\n".join(lines) + f"\n{len(demos) + 1}."


def answer_prompt(demos: list[Task], instruction: str) -> str:
    """Demonstrations as Instruction/Input/Output blocks, then the new instruction awaiting its input or output."""
    blocks = []
    for d in demos:
        block = f"Instruction: {d.instruction}\n"
        if d.input:
            block += f"Input: {d.input}\n"
        blocks.append(block + f"Output: {d.output}\n")
    return f"\n{_SEPARATOR}\n".join(blocks + [f"Instruction: {instruction}\n"])


def parse_instance(text: str) -> tuple[str, str]:
    """(input, output) from the model's completion of :func:`answer_prompt`."""
    text = text.split(_SEPARATOR, 1)[0].strip()
    head, marker, tail = text.partition("Output:")
    if not marker:
        if text.startswith("Input:"):  # an input and no output: nothing answered
            return text[len("Input:"):].strip(), ""
        return "", text  # no labels: the whole text is the answer
    return re.sub(r"^Input:\s*", "", head.strip()).strip(), tail.strip()


def first_line(text: str) -> str:
    """The instruction the model wrote: its first line, without a list number it may have repeated."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"^\d+\.\s*", "", line).strip()


# ----------------------------------------------------------------------------- the loop


def diversity(instructions: list[str], similarity: Similarity, seed: int = 0) -> dict[str, float]:
    """Mean pairwise ROUGE-L (over a seeded sample of at most 200) and distinct-2 of the instructions."""
    sample = list(instructions)
    if len(sample) > _DIVERSITY_SAMPLE:
        sample = random.Random(seed).sample(sample, _DIVERSITY_SAMPLE)
    pairs = list(itertools.combinations(sample, 2))
    mean_rouge = sum(similarity(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0
    bigrams = [b for text in instructions for b in zip(text.lower().split(), text.lower().split()[1:])]
    distinct_2 = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    return {"mean_pairwise_rouge_l": round(mean_rouge, 4), "distinct_2": round(distinct_2, 4)}


def self_instruct(model: str, out: str | Path, n: int, *, seed_tasks: str | Path | None = None, seed: int = 0,
                  batch_size: int = 16, max_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                  num_demos: int = 8, max_rounds: int | None = None, limits: Limits | None = None,
                  device: str = "auto", progress: bool = True, engine: Any = None) -> dict[str, Any]:
    """Generate ``n`` filtered instruction tasks with ``model`` (a checkpoint) into ``out``; returns the summary.

    ``max_rounds`` defaults to ten times the rounds ``n`` needs if every candidate were kept. ``engine``
    (an :class:`lmstack.engine.Engine`) replaces loading ``model``, for callers that hold one."""
    if n < 1:
        raise UserError(f"--n {n}: ask for at least one task")
    if batch_size < 1 or max_tokens < 1 or num_demos < 1:
        raise UserError("batch size, max tokens and demonstrations must each be >= 1")
    limits = limits or Limits()
    seeds = load_seed_tasks(seed_tasks)
    if engine is None:
        from lmstack.engine import Engine

        engine = Engine.from_checkpoint(model, device=device, max_num_seqs=batch_size)
    from lmstack.engine import SamplingParams

    max_rounds = max_rounds or 10 * math.ceil(n / batch_size)
    rng, similarity = random.Random(seed), Similarity()
    pool: list[Task] = list(seeds)
    seen = {normalize(t.instruction) for t in pool}
    kept: list[dict[str, Any]] = []
    rejected = dict.fromkeys(FILTERS, 0)
    generated = rounds = 0

    def fit(build, demos: list[Task]) -> list[int]:
        # drop demonstrations until the prompt leaves max_tokens of room (keep the last tokens if none fit)
        room = engine.max_model_len - max_tokens - 1
        while True:
            ids = engine.tokenizer.encode(build(demos))
            if len(ids) <= room or len(demos) <= 1:
                return ids[-max(room, 1):]
            demos = demos[:-1]

    def params(round_: int, index: int, stop: list[str]) -> SamplingParams:
        request_seed = (seed * 1_000_003 + round_ * 2 * batch_size + index) % 2**63
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                              seed=request_seed)

    with Progress(enabled=progress) as bar:
        task = bar.add("self-instruct", total=n, unit="kept")
        while len(kept) < n and rounds < max_rounds:
            demos = [rng.sample(pool, min(num_demos, len(pool))) for _ in range(batch_size)]
            outs = engine.generate([fit(instruction_prompt, d) for d in demos],
                                   [params(rounds, i, ["\n"]) for i in range(batch_size)])
            instructions = [first_line(o.outputs[0].text) for o in outs]
            asked = [i for i, text in enumerate(instructions) if text]
            answers = engine.generate(
                [fit(lambda ds, text=instructions[i]: answer_prompt(ds, text), demos[i]) for i in asked],
                [params(rounds, batch_size + i, [_SEPARATOR]) for i in asked]) if asked else []
            instances = dict(zip(asked, (parse_instance(a.outputs[0].text) for a in answers)))
            for i, instruction in enumerate(instructions):
                if len(kept) >= n:
                    break
                task_input, output = instances.get(i, ("", ""))
                generated += 1
                reason, closest = rejection(instruction, output, [t.instruction for t in pool], seen, similarity,
                                            limits)
                if reason is not None:
                    rejected[reason] += 1
                    continue
                new = Task(instruction, task_input, output, id=f"gen-{len(kept)}")
                pool.append(new)
                seen.add(normalize(instruction))
                user = instruction + (f"\n\n{task_input}" if task_input else "")
                kept.append({"messages": [{"role": "user", "content": user},
                                          {"role": "assistant", "content": output}],
                             "provenance": {"generator": "lmstack self-instruct", "model": str(model),
                                            "id": new.id, "round": rounds, "seed": seed,
                                            "demonstrations": [d.id for d in demos[i]],
                                            "max_rouge_l": round(closest, 4)}})
                bar.advance(task)
            rounds += 1
            bar.update(task, status=f"{len(kept)} kept / {generated} generated")

    write_text_atomic(out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in kept))
    summary = {"out": str(out), "generated": generated, "kept": len(kept), "rejected": rejected, "rounds": rounds,
               "complete": len(kept) >= n, "limits": asdict(limits),
               "diversity": diversity([t.instruction for t in pool[len(seeds):]], similarity, seed)}
    return summary
