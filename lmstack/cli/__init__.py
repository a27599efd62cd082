"""`lmstack <verb>`: the command line. Every verb parses its options and calls one library function that
tests can call directly; heavy imports happen inside the handlers so `lmstack --help` is instant.

One module per verb group (``train``, ``data``, ``tokenizer``, ``generate``, ``serve``, ``interop``,
``evals``); each registers its verbs with an ``add_<verb>(sub)`` function listed in :data:`REGISTRARS`, in
the order ``lmstack --help`` shows them. Options show their defaults in ``--help``.

Errors the user can fix are one line on stderr, ``lmstack VERB: error: <message>``, with exit status 2,
never a traceback: option values are checked while parsing (:mod:`lmstack.cli.common`), and :func:`main`
catches :class:`~lmstack.errors.LmstackError` (and a plain missing / unreadable file) once, so handlers
never wrap library calls in their own try/except.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from lmstack.cli.common import ArgumentParser, HelpFormatter, UsageError
from lmstack.cli.align import add_dpo, add_reward, add_reward_score
from lmstack.cli.data import add_data
from lmstack.cli.evals import add_eval, add_report, add_scaling
from lmstack.cli.generate import add_chat, add_embed, add_generate
from lmstack.cli.index import add_index
from lmstack.cli.interop import add_export, add_import, add_models
from lmstack.cli.serve import add_serve
from lmstack.cli.tokenizer import add_tokenizer
from lmstack.cli.rl import add_grpo, add_ppo
from lmstack.cli.train import add_pretrain, add_self_instruct, add_sft, add_speedrun
from lmstack.errors import LmstackError, UserError

__all__ = ["main", "build_parser", "REGISTRARS", "UserError"]

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_speedrun,
    add_data,
    add_tokenizer,
    add_pretrain,
    add_sft,
    add_self_instruct,
    add_reward,
    add_reward_score,
    add_dpo,
    add_grpo,
    add_ppo,
    add_generate,
    add_chat,
    add_serve,
    add_import,
    add_export,
    add_models,
    add_embed,
    add_index,
    add_eval,
    add_report,
    add_scaling,
]

# plain OS errors on a path the user gave (the library's own missing-file errors are LmstackErrors)
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lmstack", formatter_class=HelpFormatter,
                            description="lmstack: the whole LLM lifecycle in one package.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in REGISTRARS:
        add(sub)
    return parser


def _one_line(message: str) -> str:
    """A multi-line message joined into one line (the contract: one line per error)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _describe_os_error(error: OSError) -> str:
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    # KEY=VALUE overrides may come before or after flags (argparse alone accepts one contiguous run)
    args, rest = parser.parse_known_args(argv)
    if rest:
        stray = [arg for arg in rest if arg.startswith("-") or "=" not in arg]
        if stray or not hasattr(args, "overrides"):
            parser.parse_args(argv)  # reports the unrecognized arguments the standard way
        args.overrides = list(args.overrides or []) + rest
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for every error the user can fix)."""
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except UsageError as error:
        print(f"{error.prog}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = getattr(args, "command", f"lmstack {args.verb}")
    try:
        result = args.func(args)
    except LmstackError as error:
        print(f"{command}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except _USER_OS_ERRORS as error:
        print(f"{command}: error: {_one_line(_describe_os_error(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
