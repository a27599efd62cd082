"""`lmstack index build` and `lmstack index search`: a local document index for retrieval (lmstack.tools.index).

    lmstack index build docs/ notes.jsonl --out runs/idx --embed-model models/minilm
    lmstack index search runs/idx "who wrote hamlet" --k 5 --mode hybrid
    lmstack chat --model models/smollm2 --tools search=runs/idx

build reads txt / jsonl / parquet files and directories, cuts them into overlapping passages with source ids
and character offsets, and writes passages, a BM25 index and (with --embed-model) dense vectors, with a
manifest, atomically. search prints the top passages, best first: rank, score, source id and a snippet.
"""

from __future__ import annotations

import argparse

from lmstack.cli.common import add_group, non_negative_int, positive_int, verb_parser


def add_index_build(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "build", "documents -> passages + BM25 (+ dense vectors) index directory",
                         "Cut txt / jsonl / parquet files (or directories of them) into passages of about\n"
                         "--passage-words words and index them with BM25 (bm25s); with --embed-model also embed\n"
                         "each passage (mean-pooled, unit length) for dense and hybrid search. OUT holds\n"
                         "manifest.json, passages.jsonl, bm25/ and dense.npy, and is replaced atomically.\n"
                         "Example: lmstack import all-minilm-l6-v2 --out models/minilm &&\n"
                         "         lmstack index build docs/ --out runs/idx --embed-model models/minilm")
    parser.add_argument("inputs", nargs="+", metavar="DOCS", help="file or directory to index (repeatable)")
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument("--embed-model", default=None, metavar="DIR",
                        help="checkpoint whose embeddings give dense search (e.g. an imported all-minilm-l6-v2)")
    parser.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    parser.add_argument("--passage-words", type=positive_int, default=120, help="words per passage")
    parser.add_argument("--overlap-words", type=non_negative_int, default=20, help="words shared by consecutive passages")

    def run(args: argparse.Namespace) -> None:
        from lmstack.tools.index import build_index

        manifest = build_index(args.inputs, args.out, embed_model=args.embed_model, text_field=args.text_field,
                               passage_words=args.passage_words, overlap_words=args.overlap_words)
        print(f"indexed {manifest['passages']:,} passages from {manifest['documents']:,} documents into "
              f"{args.out} (modes: {', '.join(manifest['modes'])})")

    parser.set_defaults(func=run)


def add_index_search(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "search", "the passages of an index that best match a query",
                         "Rank the passages of IDX for QUERY: bm25 (bm25s), dense (cosine of embeddings from the\n"
                         "model the index was built with) or hybrid (reciprocal rank fusion of the two).\n"
                         "Prints rank, score, source id (DOC_ID#start-end) and a snippet per passage.")
    parser.add_argument("index", metavar="IDX", help="index directory (from `lmstack index build`)")
    parser.add_argument("query", help="what to look for")
    parser.add_argument("--k", type=positive_int, default=5, help="passages to return")
    parser.add_argument("--mode", default="bm25", choices=["bm25", "dense", "hybrid"], help="ranking")
    parser.add_argument("--json", action="store_true", help="one JSON object per passage instead of text")

    def run(args: argparse.Namespace) -> None:
        import dataclasses
        import json

        from lmstack.tools.index import load_index

        hits = load_index(args.index).search(args.query, k=args.k, mode=args.mode)
        for hit in hits:
            if args.json:
                print(json.dumps(dataclasses.asdict(hit), ensure_ascii=False))
            else:
                print(f"{hit.rank:>2}. {hit.score:8.4f}  {hit.source_id}\n    {hit.snippet}")
        if not hits:
            print("no passage matches the query")

    parser.set_defaults(func=run)


def add_index(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "index", "build and search a local document index (BM25, dense, hybrid)",
              "Retrieval over your own documents: `lmstack index build DOCS... --out IDX`, then\n"
              "`lmstack index search IDX \"query\"`, or `lmstack chat --tools search=IDX`.",
              [add_index_build, add_index_search])
