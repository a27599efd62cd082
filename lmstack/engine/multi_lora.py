"""Several LoRA adapters over one base model, in one batch: batched LoRA (the S-LoRA / Punica idea in plain torch).

    adapters = [LoRAWeights("support", {"blocks.0.attn.q_proj": (A, B), ...}, scaling=2.0), ...]
    engine = Engine(model, tokenizer, adapters=adapters)          # wraps the targeted linears in place
    engine.generate([ids, ids], [SamplingParams(adapter="support"), SamplingParams()])   # one batch, two models

Every linear layer that at least one adapter targets becomes a :class:`BatchedLoRALinear` holding the base
layer (unchanged, shared by everyone) and the adapters' factors stacked along a leading adapter axis:
``lora_A`` (n + 1, r, in) and ``lora_B`` (n + 1, out, r). Slot 0 is all zeros and stands for "no adapter";
slot i is the i-th adapter of the list. For each forward pass the engine says which slot each batch row
uses (:meth:`MultiLoRA.set_rows`), and the layer computes, per row b,

    y_b = base(x_b) + x_b A[s_b]^T B[s_b]^T          x (B, T, in), s (B,) slot per row

Rows of different adapters and of the base share one decode batch and one forward pass; the base weights
exist once. The scaling (alpha / r, or alpha / sqrt(r) for rsLoRA) is folded into ``B`` when the stack is
built. Two ways to compute the update, pinned equal by the tests:

* grouped: the rows are grouped by adapter on the host and each adapter present in the batch runs two
  small matmuls on its rows (``index_select`` / ``index_add_``), so the work follows the adapters in the
  batch, not the batch size (the "segment" form of S-LoRA / Punica's SGMV). Used for eager passes with at
  most ``GROUPED_MAX_ADAPTERS`` distinct adapters;
* gathered: every row gathers its own factors (``A[s]`` (B, r, in), ``B[s]`` (B, out, r)) and two batched
  matmuls apply them (Punica's BGMV form). Used for eager passes with more adapters (many tiny matmuls
  cost more than the gather then: on a 4x256 model, batch 16, rank 16, one CPU thread, grouped decoded
  590 vs 523 tokens/s with 4 adapters and 319 vs 420 with 16), and always for decode steps replayed from
  CUDA graphs, which cannot branch on the host; their slots come from a persistent buffer
  (:meth:`MultiLoRA.use_rows`).

Non-obvious choices:

* Ranks may differ between adapters: every adapter is padded to the largest rank with zero rows of A and
  zero columns of B, which add exactly zero. A module an adapter does not target holds zeros in its slot.
* An eager batch in which no row uses an adapter skips the low-rank path entirely, so base requests cost
  what they cost without adapters. Decode steps replayed from CUDA graphs always run it.
* Prefix reuse in the scheduler keys retained KV by adapter: keys and values computed with one adapter
  are never reused by a sequence of another adapter or of the base.
* Factors take the base weight's dtype (fp32 for a quantized base), as a single LoRA layer does in
  lmstack.models.peft, so outputs equal the merged model's up to rounding (the merge sums in fp32 and
  rounds once; here the update is a separate matmul). The parity tests pin this in fp32.

Caveats: every wrapped layer reads one row per sequence, so the layer's input must be (B, T, in); layers
that see routed tokens (MoE experts and routers) are refused. The gather copies each row's factors
(B x r x (in + out) values per layer per step), which Punica's fused kernels avoid; for tens of adapters
and ranks up to 64 this is small next to the base matmul. Adapters are fixed for the engine's lifetime.
A LoRA on a tied ``lm_head`` changes the head only, as during training (merging it would change the tied
embedding too). ``compile_decode`` with adapters is untested.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from lmstack.errors import UserError
from lmstack.models.quant import QUANTIZED_LINEARS


GROUPED_MAX_ADAPTERS = 4  # distinct adapters in an eager batch up to which the grouped form runs


@dataclass
class LoRAWeights:
    """One adapter: ``factors`` maps a module name to its (A (r, in), B (out, r)); ``scaling`` multiplies B A."""

    name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())


class BatchedLoRALinear(nn.Module):
    """A linear layer plus one low-rank update per batch row, picked from a stack of adapters by slot."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, router: "MultiLoRA"):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", lora_A, persistent=False)  # (n + 1, r, in), slot 0 zero
        self.register_buffer("lora_B", lora_B, persistent=False)  # (n + 1, out, r), scaling folded in
        self.router = router  # a plain object, not a submodule: it holds the rows of the current pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (B, T, out)
        groups, rows = self.router.groups, self.router.rows
        if groups is None and rows is None:  # no row of this batch uses an adapter
            return out
        if x.dim() != 3 or x.shape[0] != self.router.num_rows:
            raise RuntimeError(f"batched LoRA needs inputs (B, T, in) with one adapter slot per row; got "
                               f"{tuple(x.shape)} for {self.router.num_rows} rows")
        if groups is not None:
            for slot, index in groups:  # the rows of one adapter: (b,) indices, or None for the whole batch
                rows_x = x if index is None else x.index_select(0, index)  # (b, T, in)
                delta = (rows_x.to(self.lora_A.dtype) @ self.lora_A[slot].t()) @ self.lora_B[slot].t()  # (b, T, out)
                if index is None:
                    out += delta.to(out.dtype)
                else:
                    out.index_add_(0, index, delta.to(out.dtype))
            return out
        A = self.lora_A[rows]  # (B, r, in)
        B = self.lora_B[rows]  # (B, out, r)
        hidden = torch.bmm(x.to(A.dtype), A.transpose(1, 2))  # (B, T, r)
        return out + torch.bmm(hidden, B.transpose(1, 2)).to(out.dtype)  # (B, T, out)


class MultiLoRA:
    """The adapters an engine serves, wrapped into ``model`` in place; slot 0 is the base, slot i adapter i."""

    def __init__(self, model: nn.Module, adapters: Sequence[LoRAWeights]):
        names = [a.name for a in adapters]
        if not adapters or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise UserError(f"adapters need distinct non-empty names; got {names}")
        self.names = names
        self._local = threading.local()  # the rows of the pass about to run, per thread (see rows)
        self.row_slots: list[int] = []  # the slots of the engine thread's pass, on the host
        linears = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED_LINEARS))}
        targets = sorted({module for a in adapters for module in a.factors})
        for adapter in adapters:
            _check_fits(adapter, linears)
        rank = max(a.rank for a in adapters)
        self.num_parameters = 0
        for module_name in targets:
            base = linears[module_name]
            dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
            device = next(t for t in (*base.parameters(), *base.buffers())).device
            stack_A = torch.zeros(len(adapters) + 1, rank, base.in_features, dtype=dtype, device=device)
            stack_B = torch.zeros(len(adapters) + 1, base.out_features, rank, dtype=dtype, device=device)
            for slot, adapter in enumerate(adapters, start=1):
                if module_name in adapter.factors:
                    A, B = adapter.factors[module_name]
                    r = A.shape[0]
                    stack_A[slot, :r] = A.to(device=device, dtype=dtype)
                    stack_B[slot, :, :r] = (B.to(device=device, dtype=torch.float32) * adapter.scaling).to(dtype)
                    self.num_parameters += A.numel() + B.numel()
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, BatchedLoRALinear(base, stack_A, stack_B, self))
        self.stack_bytes = sum(m.lora_A.nbytes + m.lora_B.nbytes for m in model.modules()
                               if isinstance(m, BatchedLoRALinear))

    @property
    def rows(self) -> torch.Tensor | None:
        """(B,) slot per row for the gathered form (CUDA graphs), else None.

        The rows are per thread, because the server runs embeddings on the same (wrapped) model in a worker
        thread while the engine's thread steps: a forward pass only ever sees the rows its own thread set."""
        return getattr(self._local, "rows", None)

    @property
    def groups(self) -> list[tuple[int, torch.Tensor | None]] | None:
        """(slot, row indices or None for every row) per adapter of the batch for the grouped form, else None."""
        return getattr(self._local, "groups", None)

    @property
    def num_rows(self) -> int:
        return getattr(self._local, "num_rows", 0)

    def index(self, adapter: str | int | None) -> int:
        """The slot of an adapter given by name or index (None or 0 = the base); UserError when unknown."""
        if adapter is None:
            return 0
        if isinstance(adapter, str):
            if adapter not in self.names:
                raise UserError(f"unknown adapter {adapter!r}; this engine serves {', '.join(self.names)}")
            return self.names.index(adapter) + 1
        if not 0 <= adapter <= len(self.names):
            raise UserError(f"adapter index {adapter} is out of range: 0 (the base) to {len(self.names)}")
        return adapter

    def set_rows(self, slots: list[int], device: torch.device) -> None:
        """The slot of each row of the next (eager) forward pass; a batch of base rows skips the LoRA path."""
        self.row_slots = list(slots)
        present = sorted(set(slots) - {0})
        if len(present) > GROUPED_MAX_ADAPTERS:
            self.use_rows(torch.tensor(slots, device=device))
            return
        groups = []
        for slot in present:
            index = [i for i, s in enumerate(slots) if s == slot]
            groups.append((slot, None if len(index) == len(slots) else torch.tensor(index, device=device)))
        self._local.groups, self._local.rows, self._local.num_rows = groups or None, None, len(slots)

    def use_rows(self, rows: torch.Tensor) -> None:
        """Gathered form: read the slots from this (B,) tensor (a CUDA graph's persistent buffer, whose contents
        change between replays)."""
        self._local.groups, self._local.rows, self._local.num_rows = None, rows, rows.shape[0]


def _check_fits(adapter: LoRAWeights, linears: dict[str, nn.Module]) -> None:
    """UserError (one line) when the adapter names a module the model lacks or its shapes do not fit."""
    for module_name, (A, B) in adapter.factors.items():
        if module_name not in linears:
            raise UserError(f"adapter {adapter.name!r} targets {module_name!r}, which is not a linear layer of this "
                            "model; was it made for another base model?")
        if ".moe." in f".{module_name}.":
            raise UserError(f"adapter {adapter.name!r} targets {module_name!r} inside a mixture-of-experts layer, "
                            "whose tokens are routed; batched LoRA serves attention, dense MLP and lm_head layers")
        layer = linears[module_name]
        want_A, want_B = (A.shape[0], layer.in_features), (layer.out_features, A.shape[0])
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            raise UserError(f"adapter {adapter.name!r} does not fit this base model: {module_name} has A "
                            f"{tuple(A.shape)} and B {tuple(B.shape)}, the layer needs A (r, {layer.in_features}) "
                            f"and B ({layer.out_features}, r); was it trained on another base model?")
