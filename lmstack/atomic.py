"""Atomic writes: a reader sees the old complete file (or directory) or the new one, never half of one.

Files are written to a temporary sibling and renamed over the target with ``os.replace`` (atomic on
POSIX within one file system). Directories are built in a staging sibling and swapped in; the old
directory is renamed aside first and removed after the swap. This module imports nothing heavy so the
data tools can use it without pulling in torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling of PATH, then rename it over PATH.

    For writers that want a file name rather than bytes (``np.savez``, ``pq.write_table``,
    ``fig.savefig``). ``suffix`` ends the temporary name: give ".png" to a writer that picks its
    format from the extension. If ``write`` raises, the temporary file is removed and PATH is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; match a plain open()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """``default`` converts what json cannot (e.g. ``float`` for numpy scalars)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + "\n")


def make_staging_dir(final: str | os.PathLike) -> Path:
    """An empty directory next to FINAL (same file system, so :func:`swap_directory` is a rename), with
    the permissions a plain mkdir would give (mkdtemp alone makes it private to the user)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def swap_directory(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished STAGING directory to FINAL, replacing whatever was there."""
    staging, final = Path(staging), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
