"""lmstack/data/preference.py: TRL's three preference shapes render to the same pairs (lmstack chat format and an
imported Jinja template), JSONL.gz and parquet read alike, rating lines are skipped and counted, bad records
are one line naming file:line (or counted with skip_bad), over-long prompts are cut from the left or dropped,
batches put chosen rows before rejected rows, the loader resumes, and the rule-labelled generator is exact."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmstack.data.instruct import make_task_conversations
from lmstack.data.preference import (REFUSAL, PreferenceLoader, PreferenceStats, collate_pairs, follows_rule,
                                     load_preference, main, make_preference_pairs)
from lmstack.errors import DataError
from lmstack.tokenizer import Tokenizer

STANDARD = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
CONVERSATIONAL = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
                  "chosen": [{"role": "assistant", "content": "5"}],
                  "rejected": [{"role": "assistant", "content": "6"}]}
IMPLICIT = {"chosen": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
            "rejected": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "6"}]}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [m["content"] for c in make_task_conversations(200, seed=1) for m in c["messages"]]
    return Tokenizer.train(texts * 3, vocab_size=320)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_three_trl_shapes_render_to_the_same_pair(tok, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [STANDARD, CONVERSATIONAL, IMPLICIT])
    pairs = load_preference([path], tok, 64, val_fraction=0).train
    assert len(pairs) == 3 and all(p == pairs[0] for p in pairs)
    pair = pairs[0]
    full, mask = tok.render_chat([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}])
    assert pair.prompt + pair.chosen == full and pair.chosen_mask == mask[len(pair.prompt):] == [1] * len(pair.chosen)
    assert pair.prompt == tok.render_chat([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)[0]
    assert tok.decode(pair.chosen) == "5<|end|>" and tok.decode(pair.rejected) == "6<|end|>"


def test_a_multi_turn_prompt_and_an_imported_jinja_template(tok, tmp_path):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    jinja = Tokenizer.from_hf_json(tok.hf_tokenizer().to_str(), chat_template=template, eot_token="<|end|>")
    record = {"prompt": [{"role": "user", "content": "Reverse: stone"}, {"role": "assistant", "content": "enots"},
                         {"role": "user", "content": "Upper: stone"}],
              "chosen": "STONE", "rejected": "stone"}
    pair = load_preference([_jsonl(tmp_path / "j.jsonl", [record])], jinja, 128, val_fraction=0).train[0]
    assert jinja.decode(pair.prompt) == "user: Reverse: stone\nassistant: enots<|end|>\nuser: Upper: stone\nassistant: "
    assert jinja.decode(pair.chosen) == "STONE<|end|>\n" and jinja.decode(pair.rejected) == "stone<|end|>\n"


def test_gzip_and_parquet_read_like_jsonl_and_ratings_are_skipped_and_counted(tok, tmp_path):
    rating = {"kind": "rating", "prompt": "hi", "completion": "hello", "label": True}
    records = [STANDARD, rating, {**STANDARD, "chosen": "five"}]
    plain = _jsonl(tmp_path / "p.jsonl", records)
    zipped = tmp_path / "p.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    table = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([STANDARD, {**STANDARD, "chosen": "five"}]), table)
    loaded = []
    for path in (plain, zipped, table):
        stats = PreferenceStats()
        loaded.append(load_preference([path], tok, 64, val_fraction=0, stats=stats).train)
        assert stats.used == 2
    assert loaded[0] == loaded[1] == loaded[2]
    stats = PreferenceStats()
    load_preference([plain], tok, 64, val_fraction=0, stats=stats)
    assert (stats.read, stats.ratings_skipped, stats.skipped) == (3, 1, 0)
    assert "kind=rating" in stats.notes[0] and "unpaired" in stats.notes[0]


@pytest.mark.parametrize("record, problem", [
    ({**STANDARD, "rejected": "5"}, "identical"),
    ({**STANDARD, "chosen": ""}, "empty completion"),
    ({**STANDARD, "chosen": "   "}, "empty completion"),
    ({"prompt": "hi", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "a b", "rejected": "a c"}, "must be message lists"),
    ({**CONVERSATIONAL, "prompt": [{"role": "assistant", "content": "hi"}]}, "role 'assistant' as the first message"),
    ([1, 2], "must be a JSON object"),
])
def test_a_bad_record_is_one_line_naming_file_and_line_or_is_counted(tok, tmp_path, record, problem):
    path = _jsonl(tmp_path / "p.jsonl", [STANDARD, record, STANDARD])
    with pytest.raises(DataError) as error:
        load_preference([path], tok, 64, val_fraction=0, skip_hint="dpo.skip_bad_records=true")
    message = str(error.value)
    assert f"{path}:2:" in message and problem in message and "dpo.skip_bad_records=true" in message
    assert "\n" not in message
    stats = PreferenceStats()
    assert len(load_preference([path], tok, 64, val_fraction=0, skip_bad=True, stats=stats).train) == 2
    assert stats.skipped == 1 and stats.problems[0].startswith(f"{path}:2:")


def test_not_json_and_an_empty_file_are_one_line(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(STANDARD) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load_preference([path], tok, 64)
    path.write_text("")
    with pytest.raises(DataError, match="no usable preference pair"):
        load_preference([path], tok, 64)


def test_over_long_prompts_are_cut_from_the_left_or_dropped_and_counted(tok, tmp_path):
    long_prompt = " ".join(["apple river stone"] * 20) + " What is 2 + 3?"
    path = _jsonl(tmp_path / "p.jsonl", [{**STANDARD, "prompt": long_prompt}, STANDARD])
    full = load_preference([path], tok, 1000, val_fraction=0).train[0]
    stats = PreferenceStats()
    cut = load_preference([path], tok, 30, val_fraction=0, stats=stats).train[0]
    assert (stats.truncated, stats.dropped) == (1, 0)
    assert len(cut) == 30 and cut.prompt == full.prompt[-(30 - len(full.chosen)):] and cut.chosen == full.chosen
    stats = PreferenceStats()
    assert len(load_preference([path], tok, 30, overlong="drop", val_fraction=0, stats=stats).train) == 1
    assert (stats.truncated, stats.dropped) == (0, 1)
    stats = PreferenceStats()  # a completion that leaves no room for a single prompt token: dropped either way
    with pytest.raises(DataError, match="no usable preference pair"):
        load_preference([path], tok, len(full.chosen), val_fraction=0, stats=stats)
    assert stats.dropped == 2


def test_batches_put_chosen_rows_first_and_the_loader_resumes(tok, tmp_path):
    records = [{"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": "no idea at all"} for a in range(10)]
    pairs = load_preference([_jsonl(tmp_path / "p.jsonl", records)], tok, 64, val_fraction=0).train
    batch = collate_pairs(pairs[:3], pad_id=tok.pad_id)
    assert batch["input_ids"].shape[0] == 6
    for i, pair in enumerate(pairs[:3]):
        for row, completion, mask in ((i, pair.chosen, pair.chosen_mask), (3 + i, pair.rejected, pair.rejected_mask)):
            n = len(pair.prompt) + len(completion)
            assert batch["input_ids"][row, :n].tolist() == pair.prompt + completion
            assert batch["attention_mask"][row].sum() == n and batch["completion_mask"][row, len(pair.prompt):n].tolist() == mask
            assert batch["completion_mask"][row, :len(pair.prompt)].sum() == 0
    assert "ref_logps" not in batch
    for pair in pairs:
        pair.ref_logps = (-1.0, -2.0)
    assert collate_pairs(pairs[:2], tok.pad_id)["ref_logps"].tolist() == [-1.0, -1.0, -2.0, -2.0]
    loader = PreferenceLoader(pairs, 3, seed=4, pad_id=tok.pad_id)
    stream = iter(loader)
    for _ in range(4):  # crosses into the second epoch (3 batches per epoch)
        next(stream)
    resumed = PreferenceLoader(pairs, 3, seed=4, pad_id=tok.pad_id)
    resumed.load_state_dict(json.loads(json.dumps({"epoch": 1, "position": 1})))
    assert torch.equal(next(iter(resumed))["input_ids"], next(stream)["input_ids"])
    with pytest.raises(DataError, match="fewer than one batch"):
        PreferenceLoader(pairs, 11)


def test_the_rule_labelled_generator_is_seeded_exact_and_checkable(tmp_path, capsys):
    pairs = make_preference_pairs(300, seed=3)
    assert pairs == make_preference_pairs(300, seed=3) and pairs != make_preference_pairs(300, seed=4)
    assert {p["rule"] for p in pairs} == {"arithmetic", "concise", "refusal"}
    for pair in pairs:
        assert follows_rule(pair, pair["chosen"]) and not follows_rule(pair, pair["rejected"])
        if pair["rule"] == "arithmetic":
            a, op, b = pair["prompt"].removeprefix("What is ").removesuffix("?").split()
            assert int(pair["chosen"]) == (int(a) + int(b) if op == "+" else int(a) * int(b))
            assert int(pair["rejected"]) != int(pair["chosen"])
        if pair["rule"] == "refusal":
            assert pair["chosen"] == REFUSAL
    main(["--make-pairs", str(tmp_path / "pairs.jsonl"), "--n", "300", "--seed", "3"])
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == pairs
    with pytest.raises(SystemExit):
        main(["--make-pairs", str(tmp_path / "x.jsonl"), "--n", "0"])
    assert "at least one pair" in capsys.readouterr().err
