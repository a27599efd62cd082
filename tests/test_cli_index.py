"""`lmstack index build/search` and `lmstack chat --tools` from the command line: output, and one-line errors
(exit 2) for empty, binary and missing inputs."""

from __future__ import annotations

import json

import pytest

from lmstack.cli import build_parser, main
from lmstack.cli.generate import run_chat

pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_then_search(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "nile", "text": "The Nile flows north through Egypt."}) + "\n"
                                      + json.dumps({"id": "alps", "text": "The Alps are mountains in Europe."}) + "\n")
    assert main(["index", "build", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "idx")]) == 0
    assert "indexed 2 passages from 2 documents" in capsys.readouterr().out
    assert main(["index", "search", str(tmp_path / "idx"), "mountains of Europe", "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(" 1. ") and "alps#0-33" in out and "The Alps are mountains in Europe." in out
    assert main(["index", "search", str(tmp_path / "idx"), "Egypt", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out.splitlines()[0])
    assert hit["source_id"] == "nile#0-35" and hit["rank"] == 1


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.txt").write_bytes(bytes(range(32)) * 50)
    for argv, message in [
        (["index", "build", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "idx")], "no text to index"),
        (["index", "build", str(tmp_path / "blob.txt"), "--out", str(tmp_path / "idx")], "looks binary"),
        (["index", "search", str(tmp_path), "query"], "is not an index"),
        (["chat", "--model", str(tmp_path), "--tools", "calculator,abacus"], "unknown tool 'abacus'"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "idx").exists()


def test_chat_with_tools_runs_turns(tiny_checkpoint, capsys):
    args = build_parser().parse_args(["chat", "--model", str(tiny_checkpoint), "--tools", "calculator",
                                      "--temperature", "0", "--max-tokens", "8", "--device", "cpu"])
    lines = iter(["what is 2 + 2", "/reset", "again", "/exit", "never read"])
    run_chat(args, input_fn=lambda prompt: next(lines))
    out, err = capsys.readouterr()
    assert out.count("assistant> ") == 2 and "tools calculator" in err
    assert next(lines) == "never read"
