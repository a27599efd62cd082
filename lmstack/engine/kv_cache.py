"""KV caches that speak the model's cache protocol (see lmstack/models/layers.py).

Two implementations:

* :class:`KVCache` — one contiguous buffer per layer for a fixed batch, appended to on every
  forward. Used by the plain :func:`lmstack.engine.generate.generate` loop. Positions may hold -1
  (left padding), which the model's position-derived masks never attend.

* :class:`SlotKVCache` — the engine's pre-allocated pool shared by many concurrent sequences. It
  holds ``num_slots`` rows of ``max_len`` tokens per layer; a running sequence owns one slot and
  stores the token at position ``p`` in column ``p``. A forward pass over any subset of slots goes
  through a :class:`SlotBatch` view (``cache.batch(slot_ids, kv_len)``), which writes the new keys
  and values with one ``index_put_`` per layer and hands attention the first ``kv_len`` columns of
  those slots (a slice when the slots are consecutive, a gather otherwise).

  Because column == position, a slot needs no per-slot position table: every key column ``c``
  holds position ``c``. Columns past a sequence's length hold stale data from an earlier
  occupant, but causal masking (key position <= query position) never lets a query see a column
  it has not written itself, so a freed slot is reusable at once without being cleared. Two
  scratch areas keep shapes static (for CUDA graphs): column ``max_len`` receives the writes of
  padding tokens (position -1), and slot ``num_slots`` is a dummy row for padded batch rows.

  Slots versus paged blocks: a slot reserves ``max_len`` tokens for its sequence whether or not
  it uses them, so memory is ``num_slots * max_len`` tokens however short the requests are; paged
  blocks (vLLM) would pack more short sequences into the same memory. In exchange the attention
  kernel reads plain strided tensors and no block table exists. A freed slot keeps its contents,
  which the engine uses for prefix reuse: a new prompt that starts like the last occupant of a
  free slot skips recomputing the shared part (and one that starts like a running sequence gets
  that sequence's computed prefix copied into its slot).
"""

from __future__ import annotations

import torch


class KVCache:
    """Contiguous cache for a fixed batch: k, v (n_layer, B, H_kv, max_len, D), appended in order."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_positions = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # columns filled so far
        self._start = 0  # first column written by the forward in progress

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.kv_heads, cfg.dim_per_head, max_len, dtype=p.dtype, device=p.device)

    def next_position(self) -> int:
        return self.length

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        """Reserve columns for T new tokens; positions (B, T) -> key positions (B, S = length + T)."""
        T = positions.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens exceed its {self.max_len} columns")
        self._start = self.length
        self.length += T
        self.key_positions[:, self._start:self.length] = positions
        return self.key_positions[:, :self.length]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H_kv, T, D) -> everything cached for this layer (B, H_kv, S, D)."""
        self.k[layer_idx, :, :, self._start:self.length] = k
        self.v[layer_idx, :, :, self._start:self.length] = v
        return self.k[layer_idx, :, :, :self.length], self.v[layer_idx, :, :, :self.length]


class SlotKVCache:
    """Pre-allocated pool: k, v (n_layer, num_slots + 1, H_kv, max_len + 1, D); see the module docstring."""

    def __init__(self, n_layer: int, num_slots: int, n_kv_head: int, head_dim: int, max_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"SlotKVCache needs num_slots >= 1 and max_len >= 1 (got {num_slots}, {max_len})")
        shape = (n_layer, num_slots + 1, n_kv_head, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len
        self.scratch_slot, self.scratch_column = num_slots, max_len
        self.device = self.k.device
        self._columns = torch.arange(max_len, device=self.device)
        self._free: set[int] = set(range(num_slots))
        # tokens whose keys/values a free slot still holds (its last occupant's), for prefix reuse
        self.retained: dict[int, list[int]] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_slots: int, max_len: int) -> "SlotKVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layer, num_slots, cfg.kv_heads, cfg.dim_per_head, max_len, dtype=p.dtype, device=p.device)

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, prompt: list[int] | None = None) -> tuple[int, int]:
        """Take a free slot -> (slot, reusable prefix length).

        With a prompt, prefer the free slot whose retained tokens share the longest prefix with it;
        otherwise (and on ties) the lowest free slot, which keeps busy slots consecutive.
        """
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        best, best_len = min(self._free), 0
        if prompt:
            for slot in sorted(self._free):
                kept = self.retained.get(slot)
                if not kept or kept[0] != prompt[0]:
                    continue
                n = common_prefix(kept, prompt)
                if n > best_len:
                    best, best_len = slot, n
        self._free.discard(best)
        self.retained.pop(best, None)
        return best, best_len

    def free(self, slot: int, tokens: list[int] | None = None) -> None:
        """Return a slot at once; ``tokens`` are those whose KV it holds (kept for prefix reuse)."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise RuntimeError(f"slot {slot} is not in use")
        self._free.add(slot)
        if tokens:
            self.retained[slot] = list(tokens)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of every layer from slot src to slot dst (forking for n > 1)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def batch(self, slot_ids: torch.Tensor, kv_len: int, consecutive_from: int | None = None) -> "SlotBatch":
        """A forward-pass view over these slots (B,), attending to their first kv_len columns."""
        return SlotBatch(self, slot_ids, kv_len, consecutive_from)


class SlotBatch:
    """The model-facing view of a :class:`SlotKVCache` for one forward pass (the cache protocol)."""

    def __init__(self, cache: SlotKVCache, slot_ids: torch.Tensor, kv_len: int, consecutive_from: int | None):
        if kv_len > cache.max_len:
            raise ValueError(f"kv_len={kv_len} exceeds the cache's {cache.max_len} columns")
        self.cache, self.slot_ids, self.kv_len = cache, slot_ids, kv_len
        self.consecutive_from = consecutive_from  # slots are consecutive_from + arange(B): slice, no gather
        self._rows = self._cols = None

    def next_position(self) -> int:
        raise RuntimeError("SlotBatch needs explicit positions (the engine always passes them)")

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        B, T = positions.shape
        self._rows = self.slot_ids[:, None].expand(B, T)  # (B, T)
        self._cols = torch.where(positions >= 0, positions, self.cache.scratch_column)  # (B, T)
        return self.cache._columns[:self.kv_len].expand(B, self.kv_len)  # column c holds position c

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_layer, v_layer = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (N+1, H_kv, L+1, D)
        # advanced indices around a slice: the indexed result is (B, T, H_kv, D)
        k_layer[self._rows, :, self._cols] = k.transpose(1, 2).to(k_layer.dtype)
        v_layer[self._rows, :, self._cols] = v.transpose(1, 2).to(v_layer.dtype)
        S = self.kv_len
        if self.consecutive_from is not None:
            start, B = self.consecutive_from, k.shape[0]
            return k_layer[start:start + B, :, :S], v_layer[start:start + B, :, :S]  # (B, H_kv, S, D) views
        # index_select copies whole (H_kv, S, D) blocks; advanced indexing (k_layer[ids, :, :S]) computes an offset
        # per element and was 2-5x slower on CPU, a quarter of a GRPO rollout's time
        return (k_layer[:, :, :S].index_select(0, self.slot_ids),
                v_layer[:, :, :S].index_select(0, self.slot_ids))  # (B, H_kv, S, D) gathered


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
