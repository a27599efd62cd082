"""What every verb module of the command line shares: the parser class, option helpers and validators.

A verb module registers itself with ``add_<verb>(sub)``, which calls :func:`verb_parser` to get its parser
and sets ``func`` to a handler taking the parsed ``args``. Handlers call the library and print; they never
catch library errors, because :func:`lmstack.cli.main` turns every :class:`~lmstack.errors.LmstackError`
into one line.

The ``type=`` validators below check option values while the command line is parsed, so
``--num-samples 0`` or ``--port 99999`` is one line (``lmstack generate: error: argument --num-samples:
0 must be an integer >= 1 ...``) before any model is loaded. :class:`ArgumentParser` reports such a
usage error as a :class:`UsageError` instead of printing the usage block and exiting, so that ``main``
prints every error the same way.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, NoReturn, Sequence

from lmstack.errors import UserError


class UsageError(UserError):
    """A command line argparse rejected; ``prog`` is the verb's program name (``lmstack data tokenize``)."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are raised as :class:`UsageError` (one line, printed by ``main``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; descriptions keep their line breaks."""


def verb_parser(sub: argparse._SubParsersAction, name: str, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """The parser of one verb (or subcommand); ``args.command`` names it in error messages."""
    parser = sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    parser.set_defaults(command=parser.prog)
    return parser


def add_group(sub: argparse._SubParsersAction, name: str, help: str, description: str,
              registrars: Sequence[Callable[[argparse._SubParsersAction], None]], metavar: str = "SUBCOMMAND") -> None:
    """A verb made of subcommands (``lmstack data tokenize``); without one it prints its help (exit 2)."""
    parser = verb_parser(sub, name, help, description)
    group_sub = parser.add_subparsers(dest=f"{name}_verb", metavar=metavar)
    for add in registrars:
        add(group_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def add_run_config_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    """--preset, --config and trailing KEY=VALUE overrides (the run configuration of lmstack.config)."""
    from lmstack.config import PRESETS

    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS), help="named configuration")
    parser.add_argument("--config", default=None, help="YAML/TOML/JSON file of overrides (same dotted keys)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides such as model.n_layer=4 optim.lr=1e-3 train.max_steps=200")


# ----------------------------------------------------------------------------- option validators

def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, token budgets)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (where 0 means off / in this process)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be an integer >= 0")
    return value


def port(text: str) -> int:
    """A TCP port: 1..65535, or 0 for any free port."""
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port: use 1..65535 (or 0 = any free port)")
    return value


def finite_float(text: str) -> float:
    """Any finite number (not nan or inf)."""
    return _finite(text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1]."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


def open_unit_interval(text: str) -> float:
    """A number in (0, 1] (a probability mass that must keep something)."""
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1) (a held-out split that leaves something to train on)."""
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def device(text: str) -> str:
    """A device name lmstack.devices accepts here (``auto`` is checked without importing torch)."""
    if text == "auto":
        return text
    from lmstack.devices import resolve_device

    try:
        resolve_device(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
