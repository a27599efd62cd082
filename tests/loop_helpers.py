"""A small in-memory loader with the TokenLoader interface, so loop tests do not need shards on disk."""

from __future__ import annotations

import torch


class PatternLoader:
    """Windows of a learnable sequence (next = prev * 5 + 1 mod V), rank-sharded and resumable."""

    def __init__(self, batch_size: int, seq_len: int, vocab: int = 128, n_windows: int = 64, seed: int = 0,
                 rank: int = 0, world_size: int = 1, split: str = "train"):
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 999))
        start = torch.randint(0, vocab, (n_windows, 1), generator=g)
        seq = [start]
        for _ in range(seq_len):
            seq.append((seq[-1] * 5 + 1) % vocab)
        self.windows = torch.cat(seq, dim=1)  # (n_windows, seq_len + 1)
        self.batch_size, self.rank, self.world_size, self.split = batch_size, rank, world_size, split
        self.position = 0
        self.bytes_per_token = 2.0

    def __iter__(self):
        B, W = self.batch_size, self.world_size
        n_batches = len(self.windows) // (B * W)
        if self.split == "val":
            for pos in range(n_batches):
                chunk = self.windows[(pos * W + self.rank) * B:][:B]
                yield {"input_ids": chunk[:, :-1].clone(), "labels": chunk[:, 1:].clone()}
            return
        while True:  # train: epochs roll over
            if self.position >= n_batches:
                self.position = 0
            first = (self.position * W + self.rank) * B
            chunk = self.windows[first:first + B]
            self.position += 1
            yield {"input_ids": chunk[:, :-1].clone(), "labels": chunk[:, 1:].clone()}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]
