"""Batches of token windows from token shards, deterministic, rank-sharded and resumable.

    loader = TokenLoader("data/classics", "train", batch_size=16, seq_len=256, seed=0)
    for batch in loader:         # {"input_ids": x, "labels": y}: int64 (B, T) CPU tensors, y = x shifted left
        ...
    state = loader.state_dict()  # save it with the checkpoint
    loader.load_state_dict(state)  # a fresh loader continues with exactly the next batch

How batches are made (``data_dir`` comes from ``lmstack data tokenize``):
- The split's shards are memory-mapped and read as one token stream, which is cut into non-overlapping
  windows of ``seq_len + 1`` tokens (a window gives x = w[:-1], y = w[1:]); the last partial window is
  unused. Windows cross document boundaries; the eot token between documents tells the model. A batch
  is a dict (the training loop's ``Batch``) with the field names other libraries use for the same tensors.
- Each epoch visits the windows in an order fixed by (seed, epoch): a permutation for the train split,
  file order for val. Global batch g of an epoch is windows order[g*B:(g+1)*B].
- Under DDP, rank r takes global batches r, r + world_size, ... so ranks never share a window. For the
  train split every rank gets the same number of batches per epoch (the remainder is dropped; shuffling
  moves it around from epoch to epoch), so no rank waits on a collective the others never reach.
- Train iterates forever, rolling over to the next epoch; val ends after one pass and every new
  ``iter()`` starts that pass from the beginning, so each evaluation sees the same batches.
- The state is (epoch, position): position counts the global batches the ranks together have
  consumed in that epoch. It is updated before each batch is handed out, so ``state_dict()`` taken
  after any batch resumes at the batch an uninterrupted run would have produced next. Resuming with
  another world size is allowed (the position is global); other shape changes are refused.

Caveat: one live iterator per loader; two iterators over one loader share (and fight over) its state.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmstack.errors import ConfigError, DataError

__all__ = ["TokenLoader", "load_meta"]


_REBUILD = "re-run `lmstack data tokenize INPUT --tokenizer TOK --out DIR` to rebuild it"
_SPLIT_KEYS = ("shards", "shard_tokens", "tokens", "bytes")


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """DATA_DIR/meta.json, checked: a DataError naming the file and the fix when DATA_DIR is not a complete
    token-shard directory (no, empty or garbled meta.json, missing keys)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{data_dir} holds no meta.json; make token shards with "
                        "`lmstack data tokenize INPUT --tokenizer TOK --out DIR` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is unreadable or not JSON ({e}); {_REBUILD}") from None
    if not isinstance(meta, dict) or meta.get("format") != "lmstack-shards":
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path} is not an lmstack token-shard meta file (format {found!r}); {_REBUILD}")
    missing = [key for key in ("vocab_size", "eot_id", "dtype", "splits") if key not in meta]
    splits = meta.get("splits")
    if not missing and isinstance(splits, dict):
        missing = [f"splits.{name}.{key}" for name, info in splits.items() for key in _SPLIT_KEYS
                   if not isinstance(info, dict) or key not in info]
    elif not missing:
        missing = ["splits (a mapping)"]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; {_REBUILD}")
    return meta


class TokenLoader:
    """Yields {"input_ids": x, "labels": y}, int64 tensors of shape (batch_size, seq_len), from split SPLIT of DATA_DIR.

    shuffle: None = shuffle the train split only. Train iterates forever; other splits end after one pass.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.infinite = split == "train"
        self.meta = load_meta(data_dir)
        splits = self.meta["splits"]
        if split not in splits:
            raise DataError(f"{data_dir} has no split {split!r}; it has {', '.join(splits)}")
        info = splits[split]
        if not info["tokens"]:
            raise DataError(f"split {split!r} of {data_dir} is empty; re-tokenize with more documents")
        self.vocab_size: int = self.meta["vocab_size"]
        self.eot_id: int = self.meta["eot_id"]
        self.tokens: int = info["tokens"]
        self._bytes: int = info["bytes"]
        self._shards = [self._open_shard(name, count) for name, count in zip(info["shards"], info["shard_tokens"])]
        self._shard_starts = np.cumsum([0] + [len(s) for s in self._shards])  # stream offset of each shard

        window = seq_len + 1
        self.num_windows: int = self.tokens // window
        if self.num_windows == 0:
            raise DataError(f"seq_len {seq_len} needs {window} tokens per window but split {split!r} of {data_dir} "
                             f"has only {self.tokens:,} tokens; lower seq_len or add data")
        self.global_batches: int = (self.num_windows // (batch_size * world_size) * world_size if self.infinite
                                    else math.ceil(self.num_windows / batch_size))
        if self.global_batches < world_size:
            raise DataError(f"split {split!r} has {self.num_windows:,} windows of {window} tokens, too few for "
                             f"{world_size} rank(s) x batch size {batch_size}; lower batch_size or seq_len, or add data")
        self.epoch = 0
        self.position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _open_shard(self, name: str, count: int) -> np.memmap:
        path = self.data_dir / name
        try:
            dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        except TypeError:
            raise DataError(f"{self.data_dir / 'meta.json'}: unknown dtype {self.meta['dtype']!r}; {_REBUILD}") from None
        expected = count * dtype.itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            problem = "is missing" if size < 0 else f"has {size:,} bytes, expected {expected:,} (truncated or replaced)"
            raise DataError(f"shard {path} {problem}; {_REBUILD}")
        return np.memmap(path, dtype=dtype, mode="r")

    # ------------------------------------------------------------------ properties

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 text bytes per token in this split: bits-per-byte = loss / ln 2 / bytes_per_token."""
        return self._bytes / self.tokens

    split_bytes_per_token = bytes_per_token  # the name docs/CONTRACTS.md first used

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return len(range(self.rank, self.global_batches, self.world_size))

    # ------------------------------------------------------------------ iteration

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_windows) if self.shuffle
                     else np.arange(self.num_windows))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _window(self, index: int) -> np.ndarray:
        start = index * (self.seq_len + 1)
        stop = start + self.seq_len + 1
        shard = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        pieces = []
        while start < stop:  # a window may span shards
            offset = start - self._shard_starts[shard]
            take = min(stop - start, len(self._shards[shard]) - offset)
            pieces.append(self._shards[shard][offset:offset + take])
            start += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(np.stack([self._window(int(w)) for w in windows]).astype(np.int64))  # (B, T+1)
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}  # (B, T) each

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.infinite:
            self.epoch, self.position = 0, 0
        while True:
            order = self._order(self.epoch)
            while self.position + self.rank < self.global_batches:
                g = self.position + self.rank
                self.position += self.world_size  # before yielding: state_dict() now points past this batch
                yield self._batch(order[g * self.batch_size:(g + 1) * self.batch_size])
            if not self.infinite:
                return
            self.epoch, self.position = self.epoch + 1, 0

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position plus the settings a resume must share (checked by load_state_dict)."""
        return {"epoch": self.epoch, "position": self.position, "split": self.split, "seed": self.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "shuffle": self.shuffle,
                "num_windows": self.num_windows, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("split", "seed", "batch_size", "seq_len", "shuffle", "num_windows"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"cannot resume: the saved loader state has {key}={state[key]!r} but this loader "
                                 f"has {key}={getattr(self, key)!r} (same data and settings are needed to resume)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
