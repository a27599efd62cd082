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
from typing import Callable, NoReturn, Sequence, TypeVar

from lmstack.errors import UserError

Number = TypeVar("Number", int, float)


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


def finite_float(text: str) -> float:
    """Any finite number (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def _checked(name: str, parse: Callable[[str], Number], ok: Callable[[Number], bool],
             requirement: str, doc: str) -> Callable[[str], Number]:
    """A ``type=`` validator: ``parse`` the text, then refuse a value ``ok`` rejects with "VALUE requirement"."""

    def check(text: str) -> Number:
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} {requirement}")
        return value

    check.__name__ = check.__qualname__ = name  # argparse names the type by it in some messages
    check.__doc__ = doc
    return check


positive_int = _checked("positive_int", _integer, lambda v: v >= 1, "must be an integer >= 1",
                        "An integer >= 1 (counts, sizes, token budgets).")
non_negative_int = _checked("non_negative_int", _integer, lambda v: v >= 0, "must be an integer >= 0",
                            "An integer >= 0 (where 0 means off / in this process).")
port = _checked("port", _integer, lambda v: 0 <= v <= 65535,
                "is not a TCP port: use 1..65535 (or 0 = any free port)", "A TCP port: 1..65535, or 0 for any free port.")
positive_float = _checked("positive_float", finite_float, lambda v: v > 0, "must be a finite number > 0",
                          "A finite number > 0.")
non_negative_float = _checked("non_negative_float", finite_float, lambda v: v >= 0, "must be a finite number >= 0",
                              "A finite number >= 0.")
unit_interval = _checked("unit_interval", finite_float, lambda v: 0 <= v <= 1, "must be in [0, 1]", "A number in [0, 1].")
open_unit_interval = _checked("open_unit_interval", finite_float, lambda v: 0 < v <= 1, "must be in (0, 1]",
                              "A number in (0, 1] (a probability mass that must keep something).")
fraction = _checked("fraction", finite_float, lambda v: 0 <= v < 1, "must be in [0, 1)",
                    "A share in [0, 1) (a held-out split that leaves something to train on).")


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
