"""Chit-Chat conversations as SFT messages: turn merging, role mapping, skipping, the JSONL writer, errors,
and the real pinned package (scripts/setup.sh puts its 8 MB wheel in the cache)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from lmstack.data.chitchat import (
    CHITCHAT_PACKAGE,
    ChitchatStats,
    chitchat_conversations,
    conversation_messages,
    main,
    read_dataset,
    write_chitchat,
)
from lmstack.data.instruct import check_role_order
from lmstack.errors import DataError

A, B, C = "sender-a", "sender-b", "sender-c"


def _msg(sender: str, text: str) -> dict:
    return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}


# The file's shape: turns are lists of messages; ids map to conversations.
DATASET = {
    "c-merge": {"messages": [[_msg(A, "Hello"), _msg(A, " How are you? ")],
                             [_msg(B, "good"), _msg(B, "")],
                             [_msg(B, "and you?")],          # same sender in a new group: joins the last turn
                             [_msg(A, "fine")],
                             [_msg(B, "bye")]],
                "ratings": {"witty": 3}, "prompt": "Talk about naps", "start": "2018-05-02T19:38:00Z"},
    "c-second-speaker": {"messages": [[_msg(B, "  ")],      # the first speaker only sent blanks
                                      [_msg(A, "hi")], [_msg(B, "hey")], [_msg(A, "unanswered")]]},
    "c-alone": {"messages": [[_msg(A, "hi there"), _msg(A, "are you there?")]]},
    "c-crowd": {"messages": [[_msg(A, "hi")], [_msg(B, "hey")], [_msg(C, "me too")]]},
    "c-empty": {"messages": []},
}


def _write_wheel(path: Path, table: dict) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("chitchat_dataset/dataset.json", json.dumps(table))
    return path


def test_turns_are_merged_and_roles_alternate_from_the_first_speaker():
    stats = ChitchatStats()
    messages = conversation_messages("c-merge", DATASET["c-merge"], stats)
    assert messages == [
        {"role": "user", "content": "Hello\nHow are you?"},
        {"role": "assistant", "content": "good\nand you?"},
        {"role": "user", "content": "fine"},
        {"role": "assistant", "content": "bye"},
    ]
    assert (stats.conversations, stats.turns) == (1, 4)
    # The opener who only sent blanks vanishes, the other participant becomes the user, and the last
    # unanswered user turn is dropped.
    assert conversation_messages("c-second-speaker", DATASET["c-second-speaker"], stats) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    check_role_order(messages)


def test_conversations_without_an_exchange_or_with_three_senders_are_skipped_and_counted(tmp_path):
    stats = ChitchatStats()
    got = list(chitchat_conversations(progress=False, stats=stats, dataset=_write_wheel(tmp_path / "w.whl", DATASET)))
    assert [m[0]["content"] for m in got] == ["Hello\nHow are you?", "hi"]
    assert (stats.conversations, stats.turns, stats.skipped_short, stats.skipped_speakers) == (2, 6, 2, 1)
    assert stats.mean_turns == 3.0
    # A bare dataset.json reads the same as the wheel.
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET))
    assert list(chitchat_conversations(progress=False, dataset=tmp_path / "dataset.json")) == got


def test_write_chitchat_writes_sft_jsonl_with_a_seeded_limit(tmp_path):
    table = {f"c{i}": {"messages": [[_msg(A, f"question {i}")], [_msg(B, f"answer {i}")]]} for i in range(20)}
    source = _write_wheel(tmp_path / "w.whl", table)
    out = tmp_path / "out" / "chat.jsonl"
    stats = write_chitchat(out, limit=5, seed=3, progress=False, dataset=source)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert (stats.conversations, stats.turns, len(records)) == (5, 10, 5)
    for record in records:
        assert list(record) == ["messages"]
        check_role_order(record["messages"])
        user, assistant = record["messages"]
        assert user["content"].split()[1] == assistant["content"].split()[1]  # pairs stay together
    # Same seed, same sample; another seed, another sample; no limit, everything.
    again = write_chitchat(tmp_path / "again.jsonl", limit=5, seed=3, progress=False, dataset=source)
    assert (tmp_path / "again.jsonl").read_text() == out.read_text() and again == stats
    write_chitchat(tmp_path / "other.jsonl", limit=5, seed=4, progress=False, dataset=source)
    assert (tmp_path / "other.jsonl").read_text() != out.read_text()
    assert write_chitchat(tmp_path / "all.jsonl", progress=False, dataset=source).conversations == 20
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chat.jsonl"]  # no staging file left


def test_bad_inputs_are_one_line_data_errors(tmp_path):
    (tmp_path / "garbage.json").write_text("{not json")
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as archive:
        archive.writestr("other/data.json", "{}")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "bad_message.json").write_text(json.dumps({"x": {"messages": [[{"text": 3, "sender": A}]]}}))
    for name, words in [("garbage.json", "not valid JSON"), ("other.whl", "has no chitchat_dataset/dataset.json"),
                        ("list.json", "expected a JSON object"), ("missing.json", "cannot read")]:
        with pytest.raises(DataError, match=words):
            read_dataset(tmp_path / name)
    with pytest.raises(DataError, match="conversation x: every message needs"):
        list(chitchat_conversations(progress=False, dataset=tmp_path / "bad_message.json"))
    with pytest.raises(DataError, match="limit must be at least 1"):
        write_chitchat(tmp_path / "o.jsonl", limit=0, progress=False, dataset=tmp_path / "list.json")


def test_offline_without_a_cached_archive_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as with no registry reachable
    with pytest.raises(DataError, match="pip download chitchat-dataset==0.9.0"):
        next(chitchat_conversations(cache_dir=tmp_path, progress=False))
    assert not (tmp_path / "downloads" / CHITCHAT_PACKAGE.filename).exists()


def test_command_line_writes_the_file_and_reports_errors(tmp_path, capsys):
    source = _write_wheel(tmp_path / "w.whl", DATASET)
    assert main(["--out", str(tmp_path / "o.jsonl"), "--dataset", str(source), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["conversations"], report["skipped_short"], report["skipped_speakers"]) == (2, 2, 1)
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    assert main(["--out", str(tmp_path / "o2.jsonl"), "--dataset", str(tmp_path / "nope.json"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read")
    assert not (tmp_path / "o2.jsonl").exists()


def test_the_real_package_yields_thousands_of_multi_turn_conversations(tmp_path):
    stats = ChitchatStats()
    conversations = list(chitchat_conversations(progress=False, stats=stats))
    assert stats.conversations == len(conversations) > 4000
    assert stats.skipped_short > 3000 and stats.skipped_speakers == 0  # the single-speaker stubs
    assert stats.mean_turns > 20
    for messages in conversations:
        check_role_order(messages)
        assert messages[-1]["role"] == "assistant" and all(m["content"].strip() for m in messages)
    written = write_chitchat(tmp_path / "chitchat.jsonl", limit=100, progress=False)
    assert written.conversations == len((tmp_path / "chitchat.jsonl").read_text().splitlines()) == 100
