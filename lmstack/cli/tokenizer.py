"""`lmstack tokenizer SUBCOMMAND`: train a tokenizer, show how text encodes, describe a tokenizer.

Each subcommand is an ``add_tokenizer_<name>(sub)`` function listed in ``TOKENIZER_REGISTRARS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from lmstack.cli.common import add_group, positive_int, verb_parser

_TOKENIZER_SOURCES = "tokenizer directory, checkpoint, tokenizer.json, *.tiktoken file, gpt2 or cl100k_base"


def add_tokenizer_train(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "train", "train a byte-level BPE (or unigram) tokenizer on text files / corpora",
                         "Train a vocabulary of --vocab-size ids (32 of them special tokens, at the top: <|endoftext|>,\n"
                         "<|pad|>, chat turns, tool calls, <|mask|>, 16 sentinels, reserved) and save OUT/tokenizer.json\n"
                         "(Hugging Face format) + OUT/lmstack_tokenizer.json. BPE trains with rustbpe and encodes with\n"
                         "tiktoken; unigram uses Hugging Face tokenizers. Inputs: .txt, .jsonl(.gz/.zst), .parquet,\n"
                         "directories, or a corpus name (classics, pystdlib: built first if missing).")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or corpus names")
    parser.add_argument("--vocab-size", type=positive_int, default=8192, help="vocabulary size, special tokens included")
    parser.add_argument("--kind", choices=["bpe", "unigram"], default="bpe", help="tokenization model")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    parser.add_argument("--max-bytes", type=positive_int, default=None,
                        help="train on at most this many bytes of text (unset = all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> None:
        from lmstack.data.tokenizer_training import train_from_files

        train_from_files(args.input, args.out, args.vocab_size, kind=args.kind, text_field=args.text_field,
                         max_bytes=args.max_bytes, progress=not args.no_progress)

    parser.set_defaults(func=run)


def add_tokenizer_encode(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "encode", "show the token ids and pieces of some text",
                         "Encode --text (or standard input) and print the ids, then one line per token with the text it\n"
                         "stands for. Special-token text is encoded as plain text, as everywhere in lmstack.")
    parser.add_argument("--tokenizer", required=True, help=_TOKENIZER_SOURCES)
    parser.add_argument("--text", default=None, help="text to encode (unset = read standard input)")

    def run(args: argparse.Namespace) -> None:
        from lmstack.data.tokenizer_training import describe_encoding
        from lmstack.tokenizer import Tokenizer

        text = args.text if args.text is not None else sys.stdin.read()
        print(describe_encoding(Tokenizer.load(args.tokenizer), text))

    parser.set_defaults(func=run)


def add_tokenizer_info(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "info", "vocabulary size, backend, special tokens and chat format of a tokenizer")
    parser.add_argument("--tokenizer", required=True, help=_TOKENIZER_SOURCES)

    def run(args: argparse.Namespace) -> None:
        from lmstack.data.tokenizer_training import describe
        from lmstack.tokenizer import Tokenizer

        print(describe(Tokenizer.load(args.tokenizer)))

    parser.set_defaults(func=run)


TOKENIZER_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_tokenizer_train,
    add_tokenizer_encode,
    add_tokenizer_info,
]


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "tokenizer", "tokenizer: train, encode, info",
              "Tokenizer subcommands; `lmstack tokenizer SUBCOMMAND --help` shows each one's options.",
              TOKENIZER_REGISTRARS)
