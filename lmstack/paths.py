"""Where lmstack keeps files it fetches or builds: one cache directory, overridable by the user."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Where downloads and corpora live: $LMSTACK_CACHE, else ~/.cache/lmstack."""
    return Path(os.environ.get("LMSTACK_CACHE") or "~/.cache/lmstack").expanduser()
