"""Instruction data (lmstack/data/instruct.py): the three record shapes in JSONL, gzip and parquet, loss masks
(lmstack and imported Jinja chat formats), bad records, over-long conversations, mixing weights, padding
that never reaches the loss, and a loader that resumes exactly."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmstack.data.instruct import (Example, InstructLoader, InstructStats, collate, load_instruct,
                                   make_task_conversations, record_messages)
from lmstack.errors import ConfigError, DataError
from lmstack.models.gpt import GPTConfig, GPT
from lmstack.tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: stone"},
        {"role": "assistant", "content": "enots"}, {"role": "user", "content": "Upper: stone"},
        {"role": "assistant", "content": "STONE"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [m["content"] for c in make_task_conversations(200, seed=1) for m in c["messages"]]
    return Tokenizer.train(texts * 3, vocab_size=320)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_three_shapes_give_the_same_messages():
    pair = [{"role": "user", "content": "Say hi\n\nto Ann"}, {"role": "assistant", "content": "Hi Ann"}]
    assert record_messages({"messages": pair}) == pair
    assert record_messages({"prompt": "Say hi\n\nto Ann", "completion": "Hi Ann"}) == pair
    assert record_messages({"instruction": "Say hi", "input": "to Ann", "output": "Hi Ann"}) == pair
    assert record_messages({"instruction": "Say hi", "input": "", "output": "x"})[0]["content"] == "Say hi"
    with pytest.raises(DataError, match="unknown record shape"):
        record_messages({"text": "hello"})


def test_files_of_every_format_read_to_the_same_examples(tok, tmp_path):
    records = [{"messages": CHAT}, {"prompt": "What is 2 + 3?", "completion": "5"},
               {"instruction": "Reverse the word", "input": "maple", "output": "elpam"}]
    plain = _jsonl(tmp_path / "a.jsonl", records)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    for i, record in enumerate(records):
        pq.write_table(pa.Table.from_pylist([record]), tmp_path / f"{i}.parquet")
    read = {}
    for name in (["a.jsonl"], ["a.jsonl.gz"], ["0.parquet", "1.parquet", "2.parquet"]):
        data = load_instruct([tmp_path / n for n in name], tok, 512, val_fraction=0)
        read[name[0]] = sorted((e.ids, e.mask) for e in data.train)
    assert read["a.jsonl"] == read["a.jsonl.gz"] == read["0.parquet"]
    assert len(read["a.jsonl"]) == 3


def test_loss_on_assistant_all_and_last_turn(tok, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    masks = {how: load_instruct([path], tok, 512, loss_on=how, val_fraction=0).train[0] for how in
             ("assistant", "all", "last_turn")}
    ids = masks["all"].ids
    end = tok.special_tokens["<|end|>"]

    def trained(example):
        return tok.decode([i for i, m in zip(example.ids, example.mask) if m and i != end])

    assert trained(masks["assistant"]) == "enotsSTONE"
    assert trained(masks["last_turn"]) == "STONE"
    assert all(masks["all"].mask)
    # assistant turns are trained with their end-of-turn token, and the last token closes the last turn
    assert masks["assistant"].mask[-1] == 1 and ids[-1] == end
    assert sum(masks["assistant"].mask) == len(tok.encode("enots")) + len(tok.encode("STONE")) + 2


def test_no_trainable_token_is_an_error_naming_file_and_line_or_skipped(tok, tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT},
                                            {"messages": [{"role": "user", "content": "only a question"}]},
                                            {"messages": CHAT}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no token to train on.*skip_bad_records"):
        load_instruct([path], tok, 512)
    stats = InstructStats()
    data = load_instruct([path], tok, 512, skip_bad=True, val_fraction=0, stats=stats)
    assert (stats.read, stats.used, stats.skipped, len(data.train)) == (3, 2, 1, 2)
    assert "bad.jsonl:2" in stats.problems[0]


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "assistant", "content": "hi"}], "role 'assistant' as the first message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "role 'user' after a user"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "role 'tool' after a user"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "role 'robot'"),
])
def test_bad_roles_and_order_name_the_record(tok, tmp_path, messages, problem):
    path = _jsonl(tmp_path / "roles.jsonl", [{"messages": CHAT}, {"messages": messages}])
    with pytest.raises(DataError, match=rf"roles\.jsonl:2: message \d: {problem}"):
        load_instruct([path], tok, 512)


def test_tool_calls_are_trained_inside_the_assistant_turn(tok, tmp_path):
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    chat = [{"role": "user", "content": "add"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]
    example = load_instruct([_jsonl(tmp_path / "t.jsonl", [{"messages": chat}])], tok, 512, val_fraction=0).train[0]
    trained = tok.decode([i for i, m in zip(example.ids, example.mask) if m])
    assert '{"name": "add", "arguments": {"a": 2}}' in trained


def test_a_tokenizer_without_chat_format_is_one_clear_error(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.train_from_iterator(["some plain text to learn from"] * 20,
                           trainers.WordPieceTrainer(vocab_size=100, show_progress=False, special_tokens=["[UNK]", "[SEP]"]))
    PreTrainedTokenizerFast(tokenizer_object=hf, unk_token="[UNK]", sep_token="[SEP]").save_pretrained(tmp_path / "tok")
    plain = Tokenizer.load(tmp_path / "tok")
    with pytest.raises(ConfigError, match="no chat format"):
        load_instruct([_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])], plain, 512)


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tok, tmp_path):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    late = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine " * 200}]
    path = _jsonl(tmp_path / "long.jsonl", [{"messages": CHAT}, {"messages": long}, {"messages": late}])
    stats = InstructStats()
    data = load_instruct([path], tok, 64, overlong="truncate", val_fraction=0, stats=stats)
    # the first prompt is cut before its answer: nothing left to train on, so it is dropped
    assert (stats.truncated, stats.dropped, len(data.train)) == (1, 1, 2)
    assert max(len(e.ids) for e in data.train) == 64
    stats = InstructStats()
    data = load_instruct([path], tok, 64, overlong="drop", val_fraction=0, stats=stats)
    assert (stats.truncated, stats.dropped, len(data.train)) == (0, 2, 1)


def test_empty_and_missing_files_are_one_line_errors(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable conversation"):
        load_instruct([tmp_path / "empty.jsonl"], tok, 64)
    with pytest.raises(DataError, match="does not exist"):
        load_instruct([tmp_path / "missing.jsonl"], tok, 64)
    (tmp_path / "broken.jsonl").write_text('{"messages": [\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:1: not valid JSON"):
        load_instruct([tmp_path / "broken.jsonl"], tok, 64)


def test_weights_repeat_files_and_validation_is_held_out(tok, tmp_path):
    def unique(name, n):
        return _jsonl(tmp_path / name, [{"prompt": f"{name} item {i}", "completion": f"answer {i}"} for i in range(n)])

    a, b = unique("a.jsonl", 40), unique("b.jsonl", 40)
    stats = InstructStats()
    data = load_instruct([a, b], tok, 512, weights=[2.0, 0.5], val_fraction=0.1, seed=3, stats=stats)
    assert (stats.val_examples, stats.train_examples) == (8, 36 * 2 + 18)
    train_ids = [tuple(e.ids) for e in data.train]
    assert not {tuple(e.ids) for e in data.val} & set(train_ids)
    from_a = [ids for ids in train_ids if tok.decode(list(ids)).count("a.jsonl item")]
    assert len(from_a) == 72 and len(set(from_a)) == 36  # every kept conversation of a.jsonl twice
    assert len(set(train_ids) - set(from_a)) == 18  # half of b.jsonl's
    again = load_instruct([a, b], tok, 512, weights=[2.0, 0.5], val_fraction=0.1, seed=3)
    assert [e.ids for e in again.train] == [e.ids for e in data.train]


def test_padding_never_reaches_the_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)).eval()
    examples = [Example(list(range(3, 3 + n)), [0] * 3 + [1] * (n - 3)) for n in (6, 11, 20)]
    with torch.no_grad():
        padded = collate(examples, pad_id=0)
        assert padded["input_ids"].shape == (3, 19)
        _, batch_loss = model(padded["input_ids"], padded["labels"])
        losses, counts = [], []
        for e in examples:
            one = collate([e], pad_id=0)
            losses.append(float(model(one["input_ids"], one["labels"])[1]))
            counts.append(int((one["labels"] != -1).sum()))
    expected = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    assert abs(float(batch_loss) - expected) < 1e-5


def test_loader_order_is_seeded_and_resumes_exactly():
    examples = [Example([1, 2, 3 + i, 4], [0, 0, 1, 1]) for i in range(10)]
    loader = InstructLoader(examples, batch_size=3, seed=5)
    it = iter(loader)
    first = [next(it)["input_ids"] for _ in range(4)]  # crosses the epoch boundary (3 batches per epoch)
    state = loader.state_dict()
    rest = [next(it)["input_ids"] for _ in range(5)]
    resumed = InstructLoader(examples, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert all(torch.equal(a, next(it2)["input_ids"]) for a in rest)
    again = iter(InstructLoader(examples, batch_size=3, seed=5))
    assert all(torch.equal(a, next(again)["input_ids"]) for a in first)
    other = iter(InstructLoader(examples, batch_size=3, seed=6))
    assert not all(torch.equal(a, next(other)["input_ids"]) for a in first)
    with pytest.raises(DataError, match="fewer than one batch"):
        InstructLoader(examples[:2], batch_size=3)
    with pytest.raises(DataError, match="raise sft.val_fraction"):
        InstructLoader([], batch_size=3, shuffle=False)


def test_make_tasks_command_writes_exact_answers(tmp_path):
    from lmstack.data.instruct import main

    main(["--make-tasks", str(tmp_path / "t.jsonl"), "--n", "30", "--seed", "4"])
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    for row in rows:
        user, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        if user.startswith("What is") and "+" in user:
            a, b = user[len("What is "):-1].split(" + ")
            assert int(answer) == int(a) + int(b)
        if user.startswith("Reverse the word: "):
            assert answer == user.split(": ")[1][::-1]


def test_an_imported_jinja_chat_template_sets_the_mask(tok, tmp_path):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    jinja = Tokenizer.from_hf_json(tok.hf_tokenizer().to_str(), chat_template=template, eot_token="<|end|>")
    assert jinja.chat_format == "jinja"
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    for loss_on, expected in (("assistant", "enots<|end|>\nSTONE<|end|>\n"),
                              ("last_turn", "STONE<|end|>\n")):
        example = load_instruct([path], jinja, 512, loss_on=loss_on, val_fraction=0).train[0]
        assert jinja.decode([i for i, m in zip(example.ids, example.mask) if m]) == expected
        assert jinja.decode(example.ids).startswith("system: Be brief.\nuser: Reverse: stone\nassistant: ")
