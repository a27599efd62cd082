"""Tests for lmstack/tokenizer/ and the `lmstack tokenizer` verbs (lmstack/data/tokenizer_training.py).

    python -m pytest tests/test_tokenizer.py -q -x

The training corpus is made here from Python's own standard-library sources and docstrings plus a few
lines of non-English text (a few hundred KB, trained in well under a second). GPT-2 and cl100k come
from the registry packages named in docs/DATA.md (installed by scripts/setup.sh).
"""

from __future__ import annotations

import base64
import inspect
import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack import tokenizer as tokmod
from lmstack.cli import main
from lmstack.data.tokenizer_training import train_from_files
from lmstack.errors import ConfigError, DataError
from lmstack.tokenizer import (ASSISTANT, END, EOT, LMSTACK_CHAT_TEMPLATE, MAX_VOCAB_SIZE, NUM_SPECIAL_TOKENS,
                               SYSTEM, TOOL_CALL, TOOL_RESULT, USER, Tokenizer)
from lmstack.tokenizer.chat import compile_template

UNICODE_LINES = [
    "Grüße aus Köln — naïve façade, coöperate.",
    "日本語のテキストと中文字符，还有한국어 문장.",
    "Ελληνικά και русский текст, עברית ועربية.",
    "emoji 👍🏽 🇫🇷 👨‍👩‍👧 🤖 and math ∑∫√∞ ≠ ≤",
    "tabs\tand  double  spaces   and trailing   \n\n\n",
]

PARITY_SAMPLES = [
    "Hello world!  \n\n  def f(x):\n\treturn x**2  # comment\n",
    "I'm he'll THEY'RE we'VE 12345678 3.14159 1,000,000",
    "   lots    of     spaces   ", " ", "\n", "", "end  \n ", "x \n\n", " \t\n \u00a0\u3000 x\u2028y",
    "\r\n\r\n\t\t x", "\x00\x01 control \x7f", "a<|endoftext|>b<|user|>", "$^{x}_1 \\$ ^",
    "    if (a && b) { return c->d[i++]; }  // C++\n", *UNICODE_LINES,
]


def _corpus() -> list[str]:
    import collections
    import json as json_module
    import textwrap as textwrap_module

    docs = [inspect.getsource(m) for m in (collections, json_module.decoder, json_module.encoder, textwrap_module,
                                           inspect)]
    docs += [inspect.getdoc(obj) or "" for obj in (str, list, dict, int, float, bytes, set, tuple)]
    docs += UNICODE_LINES * 20
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return Tokenizer.train(corpus, vocab_size=1024)


@pytest.fixture(scope="module")
def unigram(corpus) -> Tokenizer:
    return Tokenizer.train(corpus[:3] + UNICODE_LINES * 5, vocab_size=600, kind="unigram")


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.load("gpt2")


@pytest.fixture(scope="module")
def cl100k() -> Tokenizer:
    return Tokenizer.load("cl100k_base")


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_trained_vocab_has_exact_size_and_specials_on_top(kind, corpus):
    tok = Tokenizer.train(corpus[:3] + UNICODE_LINES, vocab_size=700, kind=kind)
    assert tok.vocab_size == 700
    assert len(tok.special_tokens) >= NUM_SPECIAL_TOKENS
    first_special = min(tok.special_tokens.values())
    assert sorted(tok.special_tokens.values()) == list(range(first_special, 700))  # a block at the top
    for name in (EOT, "<|pad|>", SYSTEM, USER, ASSISTANT, END, TOOL_CALL, TOOL_RESULT, "<|mask|>",
                 "<|sentinel_0|>", "<|sentinel_15|>", "<|reserved_0|>"):
        assert tok.token_to_id(name) == tok.special_tokens[name]
    assert tok.eot_id == tok.special_tokens[EOT]
    assert tok.pad_id == tok.special_tokens["<|pad|>"]
    assert tok.mask_id == tok.special_tokens["<|mask|>"]
    assert len(tok.sentinel_ids) == 16 and tok.sentinel_ids == sorted(tok.sentinel_ids)
    assert set(tok.stop_token_ids) == {tok.special_tokens[END], tok.eot_id}
    # no ordinary token ever encodes to a special id
    assert max(tok.encode(" ".join(corpus[:2]))) < first_special


def test_bpe_uses_fast_path_and_learns_merges(bpe, corpus):
    assert bpe.backend == "tiktoken" and bpe.kind == "bpe"
    text = corpus[0]
    ids = bpe.encode(text)
    assert len(text.encode()) / len(ids) > 2.0  # merges were learned: well over one byte per token


def test_tiny_corpus_fills_vocabulary_with_reserved_tokens():
    tok = Tokenizer.train(["ab ab ab"], vocab_size=400)
    assert tok.vocab_size == 400
    assert len(tok.special_tokens) == 400 - (256 + 2)  # only a couple of merges exist in "ab ab ab"
    assert tok.decode(tok.encode("ab ab")) == "ab ab"


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=287), "at least 288"),
    (dict(vocab_size=1000, kind="wordpiece"), "kind must be"),
    (dict(vocab_size=MAX_VOCAB_SIZE + 1), "at most 1,048,576"),
    (dict(vocab_size=1_000_000_000), "at most 1,048,576"),
])
def test_train_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Tokenizer.train(["some text"], **kwargs)


def test_train_rejects_empty_input_and_non_strings():
    with pytest.raises(DataError, match="no training text"):
        Tokenizer.train([], vocab_size=300)
    with pytest.raises(TypeError, match="must be str"):
        Tokenizer.train([b"bytes"], vocab_size=300)
    with pytest.raises(TypeError, match="iterable of documents"):
        Tokenizer.train("one string", vocab_size=300)


def test_training_that_cannot_fit_in_memory_is_refused_before_reading(tmp_path):
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(1 << 43)  # 8 TiB of text on paper (a sparse file: no disk is used)
    out = tmp_path / "tok"
    with pytest.raises(ConfigError, match=r"8796\.1 GB of text needs about \d+\.\d GB of memory.*--max-bytes") as raised:
        train_from_files([huge], out, vocab_size=1000, progress=False)
    assert "\n" not in str(raised.value)
    assert not out.exists()  # refused before anything was read or written
    with pytest.raises(ConfigError, match="at most 1,048,576"):  # the vocabulary is checked before the inputs
        train_from_files(["/no/such/file.txt"], out, vocab_size=1_000_000_000, progress=False)


def test_a_vocabulary_of_mostly_reserved_tokens_stays_small_in_memory():
    import subprocess
    import sys

    # a vocabulary far larger than its corpus is topped up with <|reserved_N|> tokens; they must stay
    # cheap (tiktoken's own special-token tables cost about 6 KB per token, 1.6 GB here)
    # peak memory from VmHWM, which belongs to the new process image: getrusage's ru_maxrss survives
    # execve and would report the (large) pytest parent that forked this child
    script = ("import re; from lmstack.tokenizer import Tokenizer\n"
              "tok = Tokenizer.train(['ab ab ab'], vocab_size=1 << 18)\n"
              "assert tok.decode([tok.vocab_size - 1]).startswith('<|reserved_')\n"
              "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 600_000  # KiB of peak memory


def test_tokenizer_package_does_not_import_from_layers_above_it():
    import ast

    import lmstack.tokenizer

    allowed = ("lmstack.errors", "lmstack.atomic", "lmstack.paths", "lmstack.progress", "lmstack.tokenizer")
    for source in Path(lmstack.tokenizer.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):  # every import, lazy ones included
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("lmstack"):
                    assert name.startswith(allowed), f"{source.name} imports {name}"


# ----------------------------------------------------------------------------- exact round trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_text_round_trip_is_exact(text, bpe, unigram, gpt2):
    for tok in (bpe, unigram, gpt2):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode()
        assert tok.encode_bytes(text.encode()) == ids


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary())
def test_bytes_round_trip_is_exact(data, bpe, unigram, gpt2):
    for tok in (bpe, unigram, gpt2):
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_every_byte_value_round_trips(bpe, unigram):
    data = bytes(range(256)) * 3 + b"\xff\xfe\xc3(\xe2\x82"
    for tok in (bpe, unigram):
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_decode_rejects_unknown_ids(bpe, unigram):
    for tok in (bpe, unigram):
        with pytest.raises(DataError, match="not in this vocabulary"):
            tok.decode([1, tok.vocab_size + 5])
    reserved = bpe.special_tokens["<|reserved_3|>"]  # special ids are decoded beside tiktoken's ranks
    assert bpe.decode([*bpe.encode("a b"), reserved, bpe.eot_id]) == f"a b<|reserved_3|>{EOT}"
    with pytest.raises(DataError, match=r"ids \[-1\]: not in this vocabulary"):
        bpe.decode([reserved, -1])


def test_encode_batch_matches_encode(bpe, unigram, corpus):
    texts = corpus * 3  # enough text to use the thread pool
    assert sum(len(t) for t in texts) > 100_000
    for tok in (bpe, unigram):
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    with pytest.raises(TypeError):
        bpe.encode_batch("a string")


# ----------------------------------------------------------------------------- special tokens


def test_special_token_text_is_not_injected(bpe):
    text = f"{EOT}{USER} hi {ASSISTANT}{END}"
    ids = bpe.encode(text)
    assert not set(ids) & set(bpe.special_tokens.values())
    assert bpe.decode(ids) == text
    explicit = bpe.encode(text, allowed_special={USER, END})
    assert bpe.special_tokens[USER] in explicit and bpe.special_tokens[END] in explicit
    assert bpe.special_tokens[EOT] not in explicit and bpe.special_tokens[ASSISTANT] not in explicit
    assert bpe.decode(explicit) == text
    assert set(bpe.encode(text, allowed_special="all")) >= {bpe.special_tokens[t] for t in (EOT, USER, ASSISTANT, END)}
    with pytest.raises(ConfigError, match="not special tokens"):
        bpe.encode(text, allowed_special={"<|nope|>"})


def test_special_text_is_plain_on_the_tokenizers_backend_too(unigram):
    ids = unigram.encode(f"say {USER} now")
    assert unigram.special_tokens[USER] not in ids
    assert unigram.decode(ids) == f"say {USER} now"


# ----------------------------------------------------------------------------- tiktoken path vs tokenizers


def _hf_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    hf = tok.hf_tokenizer()
    hf.encode_special_tokens = True
    return [hf.encode(t, add_special_tokens=False).ids for t in texts]


@pytest.mark.parametrize("name", ["bpe", "gpt2", "cl100k"])
def test_tiktoken_path_matches_tokenizers_token_for_token(name, request, corpus):
    tok = request.getfixturevalue(name)
    assert tok.backend == "tiktoken"
    texts = PARITY_SAMPLES + [corpus[0][:20_000], corpus[-1]]
    assert [tok.encode(t) for t in texts] == _hf_ids(tok, texts)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list(" \t\n\r\u00a0aZz09'’é日👍.,;:!?-_{}()\"$^\\")), max_size=60))
def test_tiktoken_path_matches_tokenizers_on_random_text(text, bpe):
    assert bpe.encode(text) == _hf_ids(bpe, [text])[0]


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(bpe, tmp_path, corpus):
    bpe.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["lmstack_tokenizer.json", "tokenizer.json"]
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.backend == "tiktoken" and loaded.fast_path_reason == ""
    assert (loaded.vocab_size, loaded.special_tokens, loaded.kind) == (bpe.vocab_size, bpe.special_tokens, "bpe")
    assert loaded.stop_token_ids == bpe.stop_token_ids and loaded.chat_format == "lmstack"
    for text in PARITY_SAMPLES + corpus[:2]:
        assert loaded.encode(text) == bpe.encode(text)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert loaded.render_chat(messages) == bpe.render_chat(messages)
    # the file alone (no sidecar) still loads with the same specials and chat format
    alone = Tokenizer.load(tmp_path / "tok" / "tokenizer.json")
    assert alone.encode(corpus[0]) == bpe.encode(corpus[0]) and alone.chat_format == "lmstack"
    # saving again over the directory works and leaves no temporary files
    loaded.save(tmp_path / "tok")
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.startswith(".")]


def test_unigram_save_load_round_trip(unigram, tmp_path):
    unigram.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.backend == "tokenizers" and loaded.kind == "unigram"
    assert loaded.special_tokens == unigram.special_tokens
    for text in PARITY_SAMPLES:
        assert loaded.encode(text) == unigram.encode(text)


def test_saved_file_loads_in_tokenizers_and_transformers(bpe, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    bpe.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "Hello there, général Kenobi! 12345 👍"
    assert hf.encode(text).ids == bpe.encode(text) == fast.encode(text)
    assert fast.decode(bpe.encode(text)) == text
    assert fast.convert_tokens_to_ids(USER) == bpe.special_tokens[USER]


def test_loads_transformers_saved_byte_level_tokenizer_with_chat_template(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast

    template = textwrap.dedent("""\
        {% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}
        {% if add_generation_prompt %}<|assistant|>{% endif %}""")
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe.hf_tokenizer(), eos_token=END, bos_token=EOT,
                                   chat_template=template)
    fast.save_pretrained(tmp_path)
    (tmp_path / "lmstack_tokenizer.json").unlink(missing_ok=True)
    tok = Tokenizer.load(tmp_path)
    assert tok.backend == "tiktoken" and tok.chat_format == "jinja" and tok.chat_template == fast.chat_template
    text = "Some text, with numbers 12345 and ünïcode."
    assert tok.encode(text) == fast.encode(text, add_special_tokens=False)
    injected = "<|user|>"  # transformers turns special-token text into the token; lmstack keeps it text
    assert fast.encode(injected, add_special_tokens=False) == [bpe.special_tokens[USER]]
    assert bpe.special_tokens[USER] not in tok.encode(injected)
    assert tok.stop_token_ids[0] == bpe.special_tokens[END]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "6"}]
    ids, mask = tok.render_chat(messages)
    reference = fast.apply_chat_template(messages, tokenize=True)
    reference = reference["input_ids"] if isinstance(reference, dict) or hasattr(reference, "keys") else reference
    assert ids == reference  # the same ids transformers renders
    # the template renders our own format, so masks agree with the built-in renderer (minus its BOS)
    own_ids, own_mask = bpe.render_chat(messages)
    assert (ids, mask) == (own_ids[1:], own_mask[1:])
    gen_ids, gen_mask = tok.render_chat(messages[:2], add_generation_prompt=True)
    assert gen_ids[-1] == bpe.special_tokens[ASSISTANT] and sum(gen_mask) == 0


def test_loads_non_byte_level_tokenizer_on_tokenizers_backend(tmp_path, corpus):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.train_from_iterator(corpus[:3], trainers.WordPieceTrainer(vocab_size=500, show_progress=False,
                                                                 special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    PreTrainedTokenizerFast(tokenizer_object=hf, unk_token="[UNK]", sep_token="[SEP]").save_pretrained(tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert tok.backend == "tokenizers" and "WordPiece" in tok.fast_path_reason
    assert tok.eot_id == hf.token_to_id("[SEP]")
    text = "the return value of a function"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(text)) == text.encode()
    with pytest.raises(ConfigError, match="not byte-level"):
        tok.encode_bytes(b"\xff")
    with pytest.raises(ConfigError, match="no chat format"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_rank_inconsistent_bpe_file_falls_back_to_tokenizers(bpe, tmp_path):
    spec = json.loads(bpe.hf_tokenizer().to_str())
    merges = spec["model"]["merges"]
    merges[5], merges[6] = merges[6], merges[5]  # merge order no longer follows token ids
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.backend == "tokenizers" and "merge order" in tok.fast_path_reason
    assert tok.decode(tok.encode("round trip still works")) == "round trip still works"


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        Tokenizer.load(tmp_path)
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(DataError, match="not a tiktoken file"):
        Tokenizer.load(tmp_path / "bad.tiktoken")


def _garbage_tokenizer_files(bpe: Tokenizer) -> dict[str, bytes]:
    """tokenizer.json contents a user may hand us by mistake: damaged, truncated, or JSON of another kind."""
    import random

    saved = bpe.hf_tokenizer().to_str()
    spec = json.loads(saved)
    bad_regex = json.loads(saved)
    bad_regex["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = 5
    bad_merge = json.loads(saved)
    bad_merge["model"]["merges"][0] = 7
    huge_id = {"model": {"type": "WordPiece", "vocab": {"[UNK]": 4_000_000_000}, "unk_token": "[UNK]"}}
    return {
        "random bytes": random.Random(0).randbytes(4096),
        "empty": b"",
        "truncated": saved.encode()[:len(saved) // 2],
        "a list": b"[1, 2, 3]",
        "a string": b'"tokenizer"',
        "model is a list": json.dumps({"model": []}).encode(),
        "vocab is a list": json.dumps({"model": {"type": "BPE", "vocab": [1, 2], "merges": {}}}).encode(),
        "empty vocab": json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}).encode(),
        "added_tokens is a number": json.dumps({**spec, "added_tokens": 5}).encode(),
        "split regex is a number": json.dumps(bad_regex).encode(),
        "merge is a number": json.dumps(bad_merge).encode(),
        "id beyond any vocabulary": json.dumps(huge_id).encode(),
    }


def test_garbage_tokenizer_json_is_one_data_error_naming_the_file(bpe, tmp_path):
    for case, content in _garbage_tokenizer_files(bpe).items():
        path = tmp_path / case.replace(" ", "_") / "tokenizer.json"
        path.parent.mkdir()
        path.write_bytes(content)
        for source in (path, path.parent):
            with pytest.raises(DataError) as raised:
                Tokenizer.load(source)
            message = str(raised.value)
            assert str(path) in message and "\n" not in message, (case, message)


def test_garbage_sidecar_and_tiktoken_files_are_data_errors(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    sidecar = tmp_path / "tok" / "lmstack_tokenizer.json"
    for content, problem in ((b"[]", "JSON object"), (b'{"stop_tokens": "<|end|>"}', "stop_tokens"),
                             (b'{"chat_format": "chatml"}', "chat_format"), (b"\xff\xfe\x00", "not a text file")):
        sidecar.write_bytes(content)
        with pytest.raises(DataError, match=problem) as raised:
            Tokenizer.load(tmp_path / "tok")
        assert str(sidecar) in str(raised.value)
    sidecar.unlink()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('"not an object"')
    with pytest.raises(DataError, match="tokenizer_config.json must hold a JSON object"):
        Tokenizer.load(tmp_path / "tok")
    ranks = tmp_path / "r.tiktoken"
    for content, problem in ((b"", "lacks some of the 256"), (bytes(range(256)) * 4, "not a tiktoken file"),
                             (b"".join(b"%s 0\n" % base64.b64encode(bytes([b])) for b in range(256)), "distinct")):
        ranks.write_bytes(content)
        with pytest.raises(DataError, match=problem):
            Tokenizer.load(ranks)


# ----------------------------------------------------------------------------- GPT-2 / cl100k files


def test_gpt2_and_cl100k_match_tiktoken_reference_definitions(gpt2, cl100k):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    for tok, name in ((gpt2, "gpt2"), (cl100k, "cl100k_base")):
        path = str(tokmod._find_registry_file(name))
        pat = r50k_pat_str if name == "gpt2" else tokmod.REGISTRY[name].pattern
        reference = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=load_tiktoken_bpe(path),
                                      special_tokens=tokmod.REGISTRY[name].special_tokens)
        for text in PARITY_SAMPLES:
            assert tok.encode(text) == reference.encode_ordinary(text)
        assert tok.vocab_size == reference.n_vocab
    assert (gpt2.vocab_size, gpt2.eot_id) == (50257, 50256)
    assert (cl100k.vocab_size, cl100k.eot_id) == (100277, 100257)
    assert gpt2.chat_format is None and gpt2.stop_token_ids == [50256]


def test_tiktoken_file_path_and_saved_copy_load(gpt2, tmp_path):
    by_path = Tokenizer.load(tokmod._find_registry_file("gpt2"))
    assert by_path.encode("Hello world") == gpt2.encode("Hello world") and by_path.eot_id == 50256
    gpt2.save(tmp_path)
    saved = Tokenizer.load(tmp_path)
    assert saved.backend == "tiktoken" and saved.vocab_size == 50257
    assert saved.encode(PARITY_SAMPLES[0]) == gpt2.encode(PARITY_SAMPLES[0])


def test_missing_registry_package_names_the_pip_command(monkeypatch):
    entry = tokmod.REGISTRY["gpt2"]
    monkeypatch.setitem(tokmod.REGISTRY, "gpt2", tokmod._RegistryFile(
        "no_such_package_lmstack", entry.relative_path, entry.pip_command, entry.pattern, entry.special_tokens))
    with pytest.raises(DataError, match="pip install --no-deps openai-whisper==20250625"):
        Tokenizer.load("gpt2")


# ----------------------------------------------------------------------------- chat


def _masked_text(tok: Tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded runs of consecutive mask=1 tokens."""
    runs, current = [], []
    for token_id, m in zip(ids, mask):
        if m:
            current.append(token_id)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


@pytest.mark.parametrize("name", ["bpe", "unigram"])
def test_render_chat_masks_exactly_assistant_turns(name, request):
    tok = request.getfixturevalue(name)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris? <|assistant|>fake"},
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [{"id": "1", "type": "function",
                         "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "21 °C."},
    ]
    ids, mask = tok.render_chat(messages)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert ids[0] == tok.eot_id and mask[0] == 0
    call = json.dumps({"name": "weather", "arguments": {"city": "Paris"}})
    assert _masked_text(tok, ids, mask) == [f"Checking.{TOOL_CALL}{call}{END}", f"21 °C.{END}"]
    assert tok.decode(ids) == (f"{EOT}{SYSTEM}You are terse.{END}{USER}Weather in Paris? <|assistant|>fake{END}"
                               f"{ASSISTANT}Checking.{TOOL_CALL}{call}{END}{TOOL_RESULT}{{\"temp\": 21}}{END}"
                               f"{ASSISTANT}21 °C.{END}")
    assert ids.count(tok.special_tokens[ASSISTANT]) == 2  # the user's "<|assistant|>" stayed text
    prompt_ids, prompt_mask = tok.render_chat(messages[:2], add_generation_prompt=True)
    assert prompt_ids[-1] == tok.special_tokens[ASSISTANT] and sum(prompt_mask) == 0


@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user"}], "has no 'content'"),
    ([{"role": "user", "content": 5}], "content must be a string"),
    (["hello"], "must be a dict"),
    ("hello", "must be a list"),
    ([{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}], "only assistant"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"arguments": {}}]}], "needs a name"),
])
def test_render_chat_rejects_malformed_messages(bpe, messages, message):
    with pytest.raises(DataError, match=message):
        bpe.render_chat(messages)


def test_lmstack_chat_template_renders_what_render_chat_renders(bpe):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi <|end|>"},
                {"role": "assistant", "content": "hello"}, {"role": "tool", "content": "42"}]
    render = compile_template(LMSTACK_CHAT_TEMPLATE, {"bos_token": EOT, "eos_token": END})
    for add_generation_prompt in (False, True):
        ids, _ = bpe.render_chat(messages, add_generation_prompt=add_generation_prompt)
        assert render(messages, add_generation_prompt) == bpe.decode(ids)
    # the same template as an imported tokenizer's chat_template gives the same mask on the same turns
    plain = messages[:1] + [{"role": "user", "content": "hi"}] + messages[2:]
    jinja = Tokenizer.from_hf_json(bpe.hf_tokenizer().to_str(), chat_template=LMSTACK_CHAT_TEMPLATE,
                                   eot_token=EOT, bos_token=EOT)
    assert jinja.chat_format == "jinja" and jinja.render_chat(plain) == bpe.render_chat(plain)


def test_render_chat_accepts_openai_content_parts(bpe):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert bpe.render_chat(parts) == bpe.render_chat([{"role": "user", "content": "ab"}])


def test_jinja_template_that_is_not_incremental_is_reported(bpe, tmp_path):
    bpe.save(tmp_path)
    meta = json.loads((tmp_path / "lmstack_tokenizer.json").read_text())
    meta.update(chat_format="jinja", chat_template="{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}")
    (tmp_path / "lmstack_tokenizer.json").write_text(json.dumps(meta))
    tok = Tokenizer.load(tmp_path)
    with pytest.raises(DataError, match="incrementally"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    meta["chat_template"] = "{{ raise_exception('only user turns') }}"
    (tmp_path / "lmstack_tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="only user turns"):
        Tokenizer.load(tmp_path).render_chat([{"role": "user", "content": "a"}])
    meta["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"  # the sandbox refuses this
    (tmp_path / "lmstack_tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="unsafe"):
        Tokenizer.load(tmp_path).render_chat([{"role": "user", "content": "a"}])


# ----------------------------------------------------------------------------- CLI


def test_cli_train_encode_info(tmp_path, capsys, corpus):
    (tmp_path / "a.txt").write_text(corpus[0])
    with open(tmp_path / "b.jsonl", "w") as f:
        for doc in corpus[1:]:
            f.write(json.dumps({"body": doc}) + "\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                 "--text-field", "body", "--vocab-size", "512", "--out", str(out), "--no-progress"]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 512 and tok.kind == "bpe"
    assert "saved" in capsys.readouterr().out

    assert main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--kind", "unigram",
                 "--vocab-size", "400", "--max-bytes", "20000", "--out", str(tmp_path / "uni"), "--no-progress"]) == 0
    assert Tokenizer.load(tmp_path / "uni").kind == "unigram"
    assert "(0.0 MB of text)" in capsys.readouterr().out  # 20 KB were read, not the whole file

    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "Hello <|user|>"]) == 0
    printed = capsys.readouterr().out
    ids = tok.encode("Hello <|user|>")
    assert "ids: " + " ".join(map(str, ids)) in printed
    assert printed.count("\n") == len(ids) + 2

    assert main(["tokenizer", "info", "--tokenizer", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiktoken" in printed and "512" in printed and "<|endoftext|>=480" in printed


@pytest.mark.parametrize("argv, message", [
    (["train", "--input", "/no/such/file.txt", "--out", "X", "--no-progress"], "/no/such/file.txt"),
    (["train", "--input", "A_TXT", "--vocab-size", "100", "--out", "X", "--no-progress"], "too small"),
    (["train", "--input", "A_JSONL", "--out", "X", "--no-progress"], "text"),
    (["encode", "--tokenizer", "/no/such/dir", "--text", "x"], "does not exist"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    argv = [a.replace("A_TXT", str(tmp_path / "a.txt")).replace("A_JSONL", str(tmp_path / "a.jsonl"))
            .replace("X", str(tmp_path / "out")) for a in argv]
    assert main(["tokenizer", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not Path(tmp_path / "out").exists()  # nothing half-written
