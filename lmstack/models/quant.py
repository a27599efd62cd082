"""Weight-only quantization: int8 per output channel, int4 in groups along the input.

    from lmstack.models.quant import quantize_model   # also importable as lmstack.engine.quant
    model = quantize_model(model, "int8")            # or "int4" (group_size=32); in place, returns model
    lmstack generate --model CKPT --quantize int8     # the same from the command line (also `chat`)
    lmstack sft --lora --quantize int4 ...            # LoRA over a frozen quantized base (QLoRA-style)

Decoding a small batch is memory-bound: every step streams every weight once, so storing weights
in 8 or 4 bits instead of 16/32 cuts the bytes per token. Activations stay in floating point.

* int8: ``w ≈ q * s`` with one scale per output row, ``s = max|w_row| / 127`` (symmetric).
* int4: ``w ≈ (q - 8) * s + z`` per group of ``group_size`` input columns with ``q`` in 0..15,
  ``s = (max - min) / 15`` and ``z = min + 8 s`` (asymmetric, the layout torch's int4 kernels take).
  The output head stays int8 under int4 (the logits are the most sensitive matmul).

Kernels: on CPU, torch's ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` with bf16
activations (their fp32 paths are many times slower), so a quantized model computes its linear
layers with bf16 inputs; on CUDA, int8 uses ``_weight_int8pack_mm`` when the build has it and
otherwise dequantizes to the activation dtype inside the call (torch.compile fuses that), and int4
dequantizes per call. Quality is measured, not assumed: ``bench/bench_quant.py`` reports the
perplexity delta on held-out text and decode speed; the test pins int8 logits close to fp32.

Training through a quantized layer (QLoRA-style, lmstack.models.peft): the quantized weights are buffers,
never parameters, so they get no gradient and no optimizer state. When the input needs a gradient the
layer runs through :class:`_FrozenQuantizedMatmul`, whose backward is ``grad_x = grad_y @ dequant(W)``
(the weight dequantized in the gradient's dtype for that one product, then dropped), so gradients reach
the layers below. ``dequantize_model`` turns every quantized layer back into an ``nn.Linear`` holding the
dequantized weight in the dtype the layer was quantized from (``weight_dtype``).

Caveat: quantized weights are made at load time from a float checkpoint; they are not saved as such (a
LoRA run over a quantized base keeps them in its step checkpoints, for an exact resume, and nowhere else).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import UserError

MODES = ("int8", "int4")


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = layer(x) with the quantized weight frozen: backward gives the input's gradient only,
    ``grad_x = grad_y @ dequant(W)`` (M, N) @ (N, K) -> (M, K); the weight and bias get none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # x (M, K) -> (M, N)
        ctx.layer = layer
        return layer._quantized_forward(x).to(x.dtype)  # so grad_y arrives in x's dtype, not the kernel's bf16

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return grad_y @ ctx.layer.dequantized(grad_y.dtype), None


class _QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: the call (through the frozen-weight autograd Function when the
    input needs a gradient), the bias, and the shape bookkeeping. Subclasses give ``_quantized_forward``
    (x (M, K) -> (M, N), bias excluded) and ``dequantized(dtype)`` (N, K)."""

    in_features: int
    out_features: int
    weight_dtype: torch.dtype  # the dtype of the float weight this layer was made from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _FrozenQuantizedMatmul.apply(x2, self)
        else:
            y = self._quantized_forward(x2)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _quantized_forward(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(_QuantizedLinear):
    """y = x @ (q * s)^T + b with q int8 (N, K) and s (N,) — a drop-in for nn.Linear with a frozen weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = linear.weight.dtype

    def _quantized_forward(self, x2: torch.Tensor) -> torch.Tensor:  # (M, K) -> (M, N)
        if x2.device.type == "cpu":
            return torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale.to(torch.bfloat16))
        if _cuda_int8pack_ok(x2):
            return torch._weight_int8pack_mm(x2, self.qweight, self.scale.to(x2.dtype))
        return F.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """q * s, (N, K), formed in fp32 and cast to ``dtype``."""
        return (self.qweight.float() * self.scale.float()[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(_QuantizedLinear):
    """Group-wise asymmetric int4 weights; see the module docstring for the formula."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        N, K = linear.weight.shape
        if K % group_size:
            raise ValueError(f"int4 needs in_features ({K}) divisible by group_size ({group_size})")
        w = linear.weight.detach().float().view(N, K // group_size, group_size)  # (N, G, gs)
        low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15.0).clamp(min=1e-12)  # (N, G, 1)
        q = ((w - low) / scale).round().clamp(0, 15).to(torch.uint8).view(N, K)
        zero = low + 8 * scale
        # (G, N, 2): per group and output row, [scale, zero] — the layout torch's int4 kernels take
        self.register_buffer("scales_and_zeros", torch.stack([scale[..., 0], zero[..., 0]], dim=-1)
                             .transpose(0, 1).contiguous().to(torch.bfloat16))
        self.register_buffer("qweight", q[:, ::2] << 4 | q[:, 1::2])  # (N, K/2): two 4-bit values per byte
        self._cpu_packed: torch.Tensor | None = None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.group_size, self.in_features, self.out_features = group_size, K, N
        self.weight_dtype = linear.weight.dtype

    def _unpacked(self) -> torch.Tensor:
        q = torch.stack([self.qweight >> 4, self.qweight & 0xF], dim=-1)  # (N, K/2, 2)
        return q.view(self.out_features, self.in_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        N, K, gs = self.out_features, self.in_features, self.group_size
        sz = self.scales_and_zeros.float().transpose(0, 1)  # (N, G, 2)
        q = self._unpacked().float().view(N, K // gs, gs)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(N, K).to(dtype)

    def _quantized_forward(self, x2: torch.Tensor) -> torch.Tensor:  # (M, K) -> (M, N)
        if x2.device.type == "cpu":
            if self._cpu_packed is None:
                self._cpu_packed = torch._convert_weight_to_int4pack_for_cpu(self._unpacked().to(torch.int32), 1)
            return torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self._cpu_packed, self.group_size,
                                                     self.scales_and_zeros)
        return F.linear(x2, self.dequantized(x2.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}"


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def quantize_model(model: nn.Module, mode: str, group_size: int = 32, keep_shared: bool = False) -> nn.Module:
    """Replace every nn.Linear by its quantized version (in place). Embedding tables stay as they are
    (a lookup reads one row per token); a tied output head gets its own quantized copy, or, with
    ``keep_shared``, stays the float matrix it shares (so a later merge writes one matrix, not two)."""
    if mode not in MODES:
        raise UserError(f"quantize={mode!r}: choose one of {MODES}")
    shared = _shared_weights(model) if keep_shared else set()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and id(module.weight) not in shared]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        head = child == "lm_head"
        if mode == "int8" or head or linear.in_features % group_size:
            replacement = Int8Linear(linear)
        else:
            replacement = Int4Linear(linear, group_size)
        setattr(parent, child, replacement.to(linear.weight.device))
    model.quantization = mode
    return model


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters that appear under more than one name (tied matrices)."""
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    return {pid for pid, count in names.items() if count > 1}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by an nn.Linear holding its dequantized weight in ``weight_dtype``
    (in place, frozen like the layer it replaces); returns the model."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, float_linear(layer.dequantized(layer.weight_dtype), layer.bias))
    if targets and hasattr(model, "quantization"):
        del model.quantization
    return model


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around ``weight`` (out, in) and ``bias``, both frozen."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers a forward pass reads (quantized weights at their real width)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


_CUDA_INT8PACK: dict[str, bool] = {}


def _cuda_int8pack_ok(x: torch.Tensor) -> bool:
    """Whether this build has a CUDA kernel for _weight_int8pack_mm with this activation dtype (probed once)."""
    key = str(x.dtype)
    if key not in _CUDA_INT8PACK:
        try:
            torch._weight_int8pack_mm(torch.zeros(1, 64, device=x.device, dtype=x.dtype),
                                      torch.zeros(64, 64, device=x.device, dtype=torch.int8),
                                      torch.ones(64, device=x.device, dtype=x.dtype))
            _CUDA_INT8PACK[key] = True
        except (RuntimeError, NotImplementedError):
            _CUDA_INT8PACK[key] = False
    return _CUDA_INT8PACK[key]
