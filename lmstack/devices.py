"""Devices and dtypes: the one place that turns a user's ``--device`` / ``dtype`` string into torch objects,
and the one helper that reaches the model under DDP / FSDP / torch.compile wrappers.

``resolve_device("auto")`` picks CUDA when it is available, else the CPU; ``local_rank`` selects the GPU of
a torchrun worker. An unknown or unavailable device is a :class:`~lmstack.errors.UserError` that names the
valid choices, so ``--device tpu`` is one line, not a traceback from ``torch.device``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmstack.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:local_rank`` when a GPU is present, else ``cpu``; anything else is checked."""
    if isinstance(device, torch.device):
        resolved = device
    elif device is None or str(device) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            resolved = torch.device(str(device))
        except (RuntimeError, ValueError):
            raise UserError(f"device={device!r} is not a device; choose one of {', '.join(DEVICE_CHOICES)}") from None
    if resolved.type not in ("cpu", "cuda", "mps", "meta"):
        raise UserError(f"device={device!r} is not supported; choose one of {', '.join(DEVICE_CHOICES)}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but no CUDA GPU is available here; use --device cpu (or auto)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={device!r} but MPS is not available here; use --device cpu (or auto)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; ``bf16|fp16|fp32`` (or the long names) as named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"dtype={dtype!r}: choose auto, bf16, fp16 or fp32")
    return _DTYPES[dtype]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under any stack of DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
