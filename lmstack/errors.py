"""The one error base for everything a user can fix.

Every error whose cause is the user's input (a config key or value, a data file, a checkpoint, a
conversion, a request) derives from :class:`LmstackError`. The command line catches that base once, in
``lmstack.cli.main``, and prints the message as one line with exit status 2: a handler never wraps
library calls in its own try/except. A message names the problem and the fix ("optim.lr=nan must be a
finite number > 0"), because it is all the user will see.

``LmstackError`` is a ``ValueError`` so that library callers who already catch ``ValueError`` keep
working. Errors that are also a missing file (:class:`CheckpointError`, :class:`BenchmarkDataMissing`)
are ``FileNotFoundError`` as well.

This module imports nothing from lmstack: it sits at the bottom of the layering (docs/ARCHITECTURE.md).
"""

from __future__ import annotations


class LmstackError(ValueError):
    """An error the user can fix; the CLI prints its message as one line and exits with status 2."""


class UserError(LmstackError):
    """A bad command-line argument or combination of arguments."""


class ConfigError(LmstackError):
    """A configuration key or value is wrong; the message says which and how to fix it."""


class DataError(LmstackError):
    """Bad or unreadable input data; the message names the file and the fix."""


class ConversionError(LmstackError):
    """Weights or a tokenizer that cannot be converted; the message names what is supported."""


class CheckpointError(LmstackError, FileNotFoundError):
    """A checkpoint is missing or malformed; the message names the path and what is wrong."""


class BenchmarkDataMissing(LmstackError, FileNotFoundError):
    """The package holding a benchmark's data is not installed (the message names the pip command)."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok: the one-line checks of every config's validate()."""
    if not ok:
        raise ConfigError(message)
