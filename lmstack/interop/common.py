"""Pieces every importer shares: the tokenizer description, dtype names, and writing the checkpoint.

An importer (gguf_import.py, hf_import.py) turns foreign weights into three things: an lmstack model
config dataclass, a state dict with lmstack parameter names, and an :class:`ImportedTokenizer`.
:func:`write_imported_checkpoint` builds the model from the config, loads the state dict *strictly*
(a name the mapping missed is an error, not a silently random weight) and saves an ordinary
lmstack checkpoint directory, so everything downstream (generate, chat, serve, eval, fine-tuning)
treats an imported model like one it trained itself.

The output directory is replaced atomically; a directory that exists but is not an lmstack
checkpoint is never replaced (``--out .`` must not wipe someone's work).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


from lmstack.errors import ConversionError  # noqa: E402,F401  (re-exported: interop.ConversionError)


@dataclass
class ImportedTokenizer:
    """A tokenizer read from foreign files, before it becomes an lmstack Tokenizer.

    ``hf_json`` is a Hugging Face ``tokenizers`` JSON document (tokenizer.json). Token fields hold
    token *strings*; ``stop_tokens`` end an assistant turn, the model's eos first. Pad, unknown and
    mask tokens need no field: they are special tokens of the vocabulary itself.
    """

    hf_json: str
    bos_token: str | None = None
    stop_tokens: list[str] = field(default_factory=list)
    chat_template: str | None = None

    def to_lmstack(self):
        """The lmstack Tokenizer carrying the vocabulary, special tokens and chat template."""
        from lmstack.tokenizer import Tokenizer, TokenizerMeta

        # the sidecar metadata (stop tokens, template, BOS) is what tokenizer.json cannot hold
        meta = TokenizerMeta(kind="imported", bos_token=self.bos_token, stop_tokens=list(self.stop_tokens),
                     chat_template=self.chat_template, source="lmstack import")
        return Tokenizer.from_hf_json(self.hf_json, meta=meta, where="imported tokenizer")


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the source, or a ConversionError naming the file when it does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); is the {what} complete?") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """:func:`read_json` for a file that must hold a JSON object (config.json, tokenizer_config.json, ...)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not an object; is the {what} intact?")
    return data


def check_output_dir(out: Path) -> None:
    """Refuse to replace a directory that holds something other than an lmstack checkpoint."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ConversionError(f"--out {out} exists and is not an lmstack checkpoint; choose a new directory "
                           "(an existing checkpoint directory is replaced, anything else is left alone)")
    if (out / "config.json").is_file():
        try:
            is_lmstack = json.loads((out / "config.json").read_text()).get("format") == "lmstack"
        except (json.JSONDecodeError, AttributeError):
            is_lmstack = False
        if not is_lmstack:
            raise ConversionError(f"--out {out} holds a config.json that is not an lmstack checkpoint's "
                               "(a Hugging Face model directory?); choose a new directory")


def write_imported_checkpoint(out: str | Path, model_config: Any, state: dict[str, torch.Tensor],
                              tokenizer: ImportedTokenizer | None, source: dict[str, Any],
                              dtype: str = "float32", init_missing: tuple[str, ...] = ()) -> Path:
    """Build the lmstack model, load ``state`` strictly, and save a checkpoint directory at ``out``.

    ``init_missing`` names parameters the source does not have (e.g. a BERT MLM head) that keep
    their fresh initialisation; every other parameter must come from ``state``, and every tensor in
    ``state`` must be used.
    """
    from lmstack.config import model_config_to_dict
    from lmstack.models import build_model
    from lmstack.checkpoint import save_checkpoint

    out = Path(out)
    check_output_dir(out)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model = build_model(model_config)
    load_state_strict(model, state, init_missing)
    model.to(DTYPES[dtype])
    config = {"model": model_config_to_dict(model_config), "source": source}
    lm_tokenizer = tokenizer.to_lmstack() if tokenizer is not None else None
    return save_checkpoint(out, model, config, tokenizer=lm_tokenizer)


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], init_missing: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``model``; any mismatch is a bug in the name mapping, reported in full."""
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {n for n in shapes if n not in state and _shares_storage_with_loaded(params, n, state)}
    missing = sorted(set(shapes) - set(state) - tied - set(init_missing))
    unexpected = sorted(set(state) - set(shapes))
    wrong_shape = sorted(f"{n}: got {tuple(state[n].shape)}, model wants {shapes[n]}"
                         for n in set(state) & set(shapes) if tuple(state[n].shape) != shapes[n])
    if missing or unexpected or wrong_shape:
        raise ConversionError("converted weights do not fit the model: "
                           + "; ".join(f"{what} {items[:6]}" for what, items in
                                       (("missing", missing), ("unexpected", unexpected),
                                        ("wrong shape", wrong_shape)) if items))
    with torch.no_grad():
        model.load_state_dict({n: t.float() for n, t in state.items()}, strict=False)


def _shares_storage_with_loaded(params: dict[str, torch.nn.Parameter], name: str,
                                state: dict[str, torch.Tensor]) -> bool:
    if name not in params:
        return False
    ptr = params[name].data_ptr()
    return any(other in state and p.data_ptr() == ptr for other, p in params.items() if other != name)


def source_info(kind: str, path: str | Path, architecture: str, **extra: Any) -> dict[str, Any]:
    """The ``source`` section of config.json: where an imported checkpoint came from."""
    return {"format": kind, "path": str(path), "architecture": architecture, **extra}

