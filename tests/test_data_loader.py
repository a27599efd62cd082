"""lmstack.data.loader: windows, determinism, DDP rank disjointness, exact mid-epoch resume, errors.

Most tests use hand-written shards whose token at stream position i is i, so every window names itself.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.data.loader import TokenLoader
from lmstack.errors import ConfigError, DataError
from lmstack.data.shards import tokenize_to_shards

SEQ = 16  # windows of SEQ + 1 = 17 tokens
SHARDS = (1000, 500, 1234)  # 2734 tokens -> 160 windows, some straddling shard files


def _write_shards(out: Path, splits: dict[str, tuple[int, ...]], text_bytes: int = 3) -> Path:
    """Shards in the `lmstack data tokenize` layout; split tokens count 0, 1, 2, ... across its shards."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "lmstack-shards", "version": 1, "vocab_size": 65_536, "dtype": "uint16", "eot_id": 0,
            "tokenizer": "tokenizer.json", "splits": {}}
    for split, sizes in splits.items():
        names, start = [], 0
        for i, size in enumerate(sizes):
            names.append(f"{split}_{i:05d}.bin")
            np.arange(start, start + size, dtype="<u2").tofile(out / names[-1])
            start += size
        meta["splits"][split] = {"shards": names, "shard_tokens": list(sizes), "tokens": start,
                                 "bytes": start * text_bytes, "documents": 1}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture
def data(tmp_path) -> Path:
    return _write_shards(tmp_path / "data", {"train": SHARDS, "val": (300, 200)})


def _window_ids(x: torch.Tensor) -> list[int]:
    return [int(row[0]) // (SEQ + 1) for row in x]


def _pairs(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) of each batch dict, checking the dict holds exactly those two fields."""
    pairs = []
    for batch in batches:
        assert set(batch) == {"input_ids", "labels"}
        pairs.append((batch["input_ids"], batch["labels"]))
    return pairs


def _take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return _pairs(itertools.islice(iter(loader), n))


def test_batches_are_shifted_windows_of_the_stream(data):
    loader = TokenLoader(data, "train", batch_size=4, seq_len=SEQ, seed=3)
    assert loader.tokens == sum(SHARDS) and loader.num_windows == sum(SHARDS) // (SEQ + 1) == 160
    assert len(loader) == 40 and loader.bytes_per_token == 3.0
    seen = []
    for x, y in _take(loader, len(loader)):
        assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
        for row_x, row_y, w in zip(x, y, _window_ids(x)):
            window = torch.arange(w * (SEQ + 1), (w + 1) * (SEQ + 1))  # token i of the stream is i
            assert torch.equal(row_x, window[:-1]) and torch.equal(row_y, window[1:])
        seen += _window_ids(x)
    assert sorted(seen) == list(range(160))  # one epoch visits every window once
    assert seen != sorted(seen)  # shuffled
    assert 58 in seen  # the window over tokens 986..1002 crosses from the first shard file into the second


def test_deterministic_for_a_seed_with_new_order_each_epoch(data):
    def run(seed: int) -> list[list[int]]:
        return [_window_ids(x) for x, _ in _take(TokenLoader(data, "train", 4, SEQ, seed=seed), 100)]

    first = run(0)
    assert first == run(0)
    assert first != run(1)
    epoch0, epoch1 = sum(first[:40], []), sum(first[40:80], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(160)) and epoch0 != epoch1  # infinite, reshuffled


def test_ddp_ranks_get_disjoint_windows_and_equal_batch_counts(data):
    world = 3
    loaders = [TokenLoader(data, "train", 4, SEQ, seed=5, rank=r, world_size=world) for r in range(world)]
    assert [len(ld) for ld in loaders] == [13, 13, 13]  # 160 // (4 * 3) = 13 global steps
    per_rank = [sum((_window_ids(x) for x, _ in _take(ld, len(ld))), []) for ld in loaders]
    all_windows = sum(per_rank, [])
    assert len(all_windows) == len(set(all_windows)) == 13 * 4 * world  # no window on two ranks
    single = sum((_window_ids(x) for x, _ in _take(TokenLoader(data, "train", 4, SEQ, seed=5), 39)), [])
    assert sorted(all_windows) == sorted(single)  # together the ranks see what one process would
    assert per_rank[1][:4] == single[4:8]  # rank r takes global batches r, r + world, ...


def test_val_is_ordered_finite_and_restarts_each_pass(data):
    val = TokenLoader(data, "val", batch_size=4, seq_len=SEQ)
    assert val.num_windows == 500 // (SEQ + 1) == 29 and len(val) == 8  # last batch is partial
    batches = [_window_ids(x) for x, _ in _pairs(val)]
    assert sum(batches, []) == list(range(29)) and len(batches[-1]) == 1
    assert [_window_ids(x) for x, _ in _pairs(val)] == batches  # a second pass is identical
    next(iter(val))  # an evaluation that stops early ...
    assert [_window_ids(x) for x, _ in _pairs(val)] == batches  # ... does not shift the next one

    ranks = [[_window_ids(x) for x, _ in _pairs(TokenLoader(data, "val", 4, SEQ, rank=r, world_size=2))]
             for r in range(2)]
    assert sorted(sum(sum(ranks, []), [])) == list(range(29))  # val under DDP: every window exactly once
    assert TokenLoader(data, "val", 4, SEQ, shuffle=True).shuffle


@pytest.mark.parametrize("stop_after", [0, 7, 39, 40, 41, 57])  # incl. the last batch of an epoch and the first of the next
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(data, stop_after):
    reference = [x for x, _ in _take(TokenLoader(data, "train", 4, SEQ, seed=11), stop_after + 30)]

    first = TokenLoader(data, "train", 4, SEQ, seed=11)
    it = iter(first)
    consumed = [next(it)["input_ids"] for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores

    resumed = TokenLoader(data, "train", 4, SEQ, seed=11)
    resumed.load_state_dict(state)
    continued = [x for x, _ in _take(resumed, 30)]
    assert all(torch.equal(a, b) for a, b in zip(consumed + continued, reference))
    assert len(consumed + continued) == len(reference)


def test_resume_under_ddp_and_with_a_new_world_size(data):
    def rank_batches(rank: int, world: int, n: int, state: dict | None = None) -> tuple[list, dict]:
        loader = TokenLoader(data, "train", 2, SEQ, seed=2, rank=rank, world_size=world)
        if state:
            loader.load_state_dict(state)
        batches = [_window_ids(x) for x, _ in _take(loader, n)]
        return batches, loader.state_dict()

    for rank in range(2):
        full, _ = rank_batches(rank, 2, 50)  # crosses the epoch boundary (40 batches per rank)
        head, state = rank_batches(rank, 2, 17)
        tail, _ = rank_batches(rank, 2, 33, state)
        assert head + tail == full

    _, state = rank_batches(0, 2, 5)  # 2 ranks x 5 steps = 10 global batches consumed
    single, _ = rank_batches(0, 1, 14)
    after, _ = rank_batches(0, 1, 4, state)
    assert after == single[10:14]  # one process continues with global batch 10


def test_load_state_dict_refuses_other_settings(data):
    state = TokenLoader(data, "train", 4, SEQ, seed=1).state_dict()
    for changed in (dict(seq_len=8), dict(batch_size=2), dict(seed=2)):
        kwargs = dict(batch_size=4, seq_len=SEQ, seed=1) | changed
        with pytest.raises(ConfigError, match=f"{next(iter(changed))}="):
            TokenLoader(data, "train", **kwargs).load_state_dict(state)


def test_clear_errors(tmp_path, data):
    with pytest.raises(DataError, match="no meta.json.*lmstack data tokenize"):
        TokenLoader(tmp_path, "train", 2, 8)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenLoader(data, "test", 2, 8)
    with pytest.raises(DataError, match="seq_len 5000 needs 5001 tokens"):
        TokenLoader(data, "train", 2, 5000)
    with pytest.raises(DataError, match="too few for 8 rank"):
        TokenLoader(data, "train", 32, SEQ, rank=0, world_size=8)  # 160 windows < 32 x 8
    with pytest.raises(ConfigError, match="rank must be"):
        TokenLoader(data, "train", 2, 8, rank=2, world_size=2)
    empty = _write_shards(tmp_path / "empty", {"train": (100,), "val": ()})
    with pytest.raises(DataError, match="split 'val' .* is empty"):
        TokenLoader(empty, "val", 2, 8)
    with open(data / "train_00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train_00001.bin has 10 bytes, expected 1,000.*lmstack data tokenize"):
        TokenLoader(data, "train", 2, 8)
    (data / "train_00001.bin").unlink()
    with pytest.raises(DataError, match="train_00001.bin is missing.*lmstack data tokenize"):
        TokenLoader(data, "train", 2, 8)


@pytest.mark.parametrize("content, problem", [
    ("", "not JSON"),
    ("{not json", "not JSON"),
    ("[1, 2]", "not an lmstack token-shard meta file"),
    (json.dumps({"format": "something-else"}), "format 'something-else'"),
    (json.dumps({"format": "lmstack-shards", "splits": {}}), "lacks vocab_size, eot_id, dtype"),
    (json.dumps({"format": "lmstack-shards", "vocab_size": 9, "eot_id": 0, "dtype": "uint16",
                 "splits": {"train": {"shards": []}}}), "lacks splits.train.shard_tokens"),
])
def test_a_damaged_meta_json_is_one_data_error_naming_the_file(data, content, problem):
    (data / "meta.json").write_text(content)
    with pytest.raises(DataError, match=problem) as caught:
        TokenLoader(data, "train", 2, 8)
    message = str(caught.value)
    assert str(data / "meta.json") in message and "lmstack data tokenize" in message and "\n" not in message


def test_loader_reads_real_tokenized_shards(tmp_path):
    from lmstack.tokenizer import Tokenizer

    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 80))) for _ in range(200)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    meta = tokenize_to_shards([corpus], tokenizer, tmp_path / "out", val_fraction=0.1, workers=0, progress=False)

    train = TokenLoader(tmp_path / "out", "train", 4, 32)
    assert train.tokens == meta["splits"]["train"]["tokens"]
    assert train.bytes_per_token == meta["splits"]["train"]["bytes"] / meta["splits"]["train"]["tokens"]
    (x, y), = _pairs(itertools.islice(iter(train), 1))
    assert int(x.max()) < tokenizer.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
    val = TokenLoader(tmp_path / "out", "val", 4, 32)
    windows = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in _pairs(val)])  # (num_windows, 33)
    raw = np.fromfile(tmp_path / "out" / meta["splits"]["val"]["shards"][0], dtype="<u2").astype(np.int64)
    assert torch.equal(windows.flatten(), torch.from_numpy(raw[:val.num_windows * 33]))
    assert int(windows[0, 0]) == tokenizer.eot_id  # the stream starts with a document boundary
