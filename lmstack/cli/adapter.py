"""``--adapter DIR`` for generate, chat and eval: a base checkpoint with a LoRA adapter merged into it.

    with checkpoint_with_adapter(args.model, args.adapter) as model_path:
        ...run the verb on model_path as on any checkpoint...

The base checkpoint is loaded on the CPU in its stored precision, the adapter (peft's layout, as
``lmstack sft --lora`` writes to OUT/adapter; lmstack.interop.peft_adapters) is applied and merged
(lmstack.models.peft.merge_lora), and the merged model is written with the base's config and tokenizer
to a temporary checkpoint that lives as long as the ``with`` block. Going through a checkpoint keeps
every verb's own loading path (device, dtype, quantization, the eval backends) unchanged, at the price
of one write of the weights. An adapter that does not fit the base (other module names or shapes) is a
ConversionError: one line, exit status 2. Caveat: an adapter made for another base of the same shapes
cannot be told apart and loads.

Prompt- and prefix-tuning adapters (``lmstack sft --prompt-tuning`` / ``--prefix-tuning``) are refused here
with one line: they cannot be merged into weights, and the engine behind these verbs takes token ids and a
paged KV cache, not input vectors or fixed per-layer prefixes. Such an adapter is used from Python
(lmstack.interop.peft_adapters.load_prompt_adapter, then lmstack.engine.generate.generate with
``use_kv_cache=False``, which recomputes the sequence each step) or with peft on the exported model.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmstack.errors import UserError


@contextmanager
def checkpoint_with_adapter(model_path: str, adapter_dir: str | None) -> Iterator[str]:
    """``model_path`` itself without an adapter; otherwise a temporary checkpoint of base + adapter, merged."""
    if adapter_dir is None:
        yield model_path
        return
    from lmstack.checkpoint import load_checkpoint, save_checkpoint
    from lmstack.interop.peft_adapters import adapter_type, load_adapter
    from lmstack.models.peft import merge_lora

    if not Path(adapter_dir).is_dir():
        raise UserError(f"--adapter {adapter_dir} is not a directory; pass an adapter directory such as "
                        "RUN/adapter from `lmstack sft --lora`")
    kind = adapter_type(adapter_dir)
    if kind != "LORA":
        raise UserError(f"--adapter {adapter_dir} is a {kind} adapter; generate, chat and eval take LoRA adapters "
                        "(merged into the weights) only, since the engine has no input for virtual tokens: use it "
                        "from Python (lmstack.interop.peft_adapters.load_prompt_adapter) or with peft on the "
                        "`lmstack export` model")
    base = load_checkpoint(model_path)
    load_adapter(base.model, adapter_dir)
    merge_lora(base.model)
    with tempfile.TemporaryDirectory(prefix="lmstack-adapter-") as tmp:
        merged = Path(tmp) / "model"
        save_checkpoint(merged, base.model, base.config, base.tokenizer)
        del base  # the verb loads its own copy from the merged checkpoint
        yield str(merged)
