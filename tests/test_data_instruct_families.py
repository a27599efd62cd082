"""Task families of the generated instruction data (lmstack.data.instruct): every kind's answer is right,
families restrict what is drawn, the draw is seeded, the shape check, and the --families command."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from lmstack.data.instruct import (
    TASK_FAMILIES,
    answer_shape,
    main,
    make_family_conversations,
    record_messages,
)
from lmstack.errors import UserError

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def solve(kind: str, prompt: str) -> str:
    """An independent solver per kind, reading only the instruction text."""
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    tail = prompt.split(": ", 1)[-1]
    words = tail.split()
    solvers = {
        "add": lambda: str(numbers[0] + numbers[1]), "multiply": lambda: str(numbers[0] * numbers[1]),
        "subtract": lambda: str(numbers[0] - numbers[1]), "double": lambda: str(2 * numbers[0]),
        "reverse": lambda: tail[::-1], "upper": lambda: tail.upper(), "first_letter": lambda: tail[0],
        "spell": lambda: "-".join(tail), "name": lambda: f"{words[1]}, {words[0]}",
        "date": lambda: f"{numbers[1]}-{MONTHS.index(prompt.split()[4]) + 1:02d}-{numbers[0]:02d}",
        "brackets": lambda: f"[{tail}]", "commas": lambda: ", ".join(words),
        "sort_numbers": lambda: " ".join(map(str, sorted(numbers))), "sort_words": lambda: " ".join(sorted(words)),
        "last": lambda: words[-1], "count": lambda: str(len(words)),
    }
    return solvers[kind]()


def test_every_kind_of_every_family_has_its_exact_answer():
    conversations = make_family_conversations(800, seed=3)
    seen = Counter((c["family"], c["kind"]) for c in conversations)
    assert set(seen) == {(f, k) for f, kinds in TASK_FAMILIES.items() for k in kinds}  # all 16 kinds drawn
    assert min(seen.values()) > 20  # uniform over kinds: 50 expected each
    for c in conversations:
        user, assistant = record_messages(c)
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == solve(c["kind"], user["content"]), c


def test_families_restrict_the_draw_and_the_seed_fixes_it():
    only = make_family_conversations(200, seed=1, families=["strings", "lists"])
    assert {c["family"] for c in only} == {"strings", "lists"}
    assert make_family_conversations(50, seed=7) == make_family_conversations(50, seed=7)
    assert make_family_conversations(50, seed=7) != make_family_conversations(50, seed=8)
    # instructions do not leak across families: no prompt opening is shared by two families
    openings = {}
    for c in make_family_conversations(800, seed=0):
        openings.setdefault(" ".join(c["messages"][0]["content"].split()[:3]), set()).add(c["family"])
    assert all(len(families) == 1 for families in openings.values())
    with pytest.raises(UserError, match="unknown task family poetry; choose from arithmetic"):
        make_family_conversations(5, families=["poetry"])


def test_answer_shape():
    assert answer_shape("Maple, Tiger") == "Aa, Aa"
    assert answer_shape("1955-06-16") == "9-9-9"
    assert answer_shape(" [stone] ") == "[a]"
    assert answer_shape("5 53 97") == "9 9 9"
    assert answer_shape("ELDNAC") == "A" and answer_shape("eldnac") == "a"
    assert answer_shape("12") != answer_shape("twelve")


def test_make_tasks_command_with_families(tmp_path, capsys):
    out = tmp_path / "fam.jsonl"
    main(["--make-tasks", str(out), "--n", "30", "--seed", "2", "--families", "arithmetic, formatting"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 30 and {r["family"] for r in records} == {"arithmetic", "formatting"}
    assert records == make_family_conversations(30, seed=2, families=["arithmetic", "formatting"])
    with pytest.raises(SystemExit):
        main(["--make-tasks", str(out), "--families", "nope"])
    assert "unknown task family nope" in capsys.readouterr().err

