"""Atomic, durable writes: a reader sees the old complete file (or directory) or the new one, never half
of one, even after a crash or a power cut.

    write_json_atomic(run / "summary.json", summary)
    with staged_directory(run / "model") as tmp:   # fill tmp; on success it replaces run/model
        save_file(weights, str(tmp / "model.safetensors"))
    clean_staging(run)                              # at the next start: remove what a killed writer left

Files are written to a temporary sibling ``.NAME.tmp-XXXX`` and renamed over the target with
``os.replace`` (atomic on POSIX within one file system). Directories are built in a staging sibling
``.NAME.tmp-XXXX`` and swapped in: the old directory is renamed aside to ``.NAME.old-PID`` first and
removed after the swap.

Durability: a rename is only as good as the data under it. Before the rename that publishes a file or
a directory, its contents (every file, then every directory, bottom up) are fsync'ed, and after the
rename the parent directory is fsync'ed so the new name itself survives a power cut. Without this, a
crash soon after a checkpoint could leave a published ``model.safetensors`` of zeros or of length 0.

A process killed mid-write leaves its staging sibling behind (and, if it died between the two renames
of a swap, the old directory under ``.NAME.old-PID`` with nothing at NAME). :func:`clean_staging`
undoes both: it removes staging leftovers and puts an orphaned old directory back. Only call it on a
directory no live writer is using.

This module imports nothing heavy so the data tools can use it without pulling in torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

_STAGING = ".tmp-"  # .NAME.tmp-XXXX: a file or directory being written
_ASIDE = ".old-"    # .NAME.old-PID: the previous directory during a swap
_LEFTOVER = re.compile(r"^\.(?P<name>.+?)\.(?P<kind>tmp|old)-[^/]+$")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling of PATH, fsync it, then rename it over PATH.

    For writers that want a file name rather than bytes (``np.savez``, ``pq.write_table``,
    ``fig.savefig``). ``suffix`` ends the temporary name: give ".png" to a writer that picks its
    format from the extension. If ``write`` raises, the temporary file is removed and PATH is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{_STAGING}", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; match a plain open()
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
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
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{_STAGING}"))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def swap_directory(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the finished STAGING directory durable, then move it to FINAL, replacing whatever was there."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}{_ASIDE}{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends normally it replaces FINAL (durably),
    when it raises (or the process is interrupted) the staging directory is removed and FINAL is untouched."""
    staging = make_staging_dir(final)
    try:
        yield staging
        swap_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ROOT, then every directory bottom up (a directory's entries after its files)."""
    root = Path(root)
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def clean_staging(parent: str | os.PathLike) -> list[Path]:
    """Undo what killed writers left in PARENT; returns the paths removed or restored.

    Staging copies (``.NAME.tmp-*``, files or directories) are removed. An aside copy ``.NAME.old-*``
    whose NAME is missing is a swap cut between its two renames: the old directory is put back as NAME
    (it was complete; the new one never arrived). Other aside copies are removed.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    touched: list[Path] = []
    for entry in sorted(parent.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None:
            continue
        target = parent / match["name"]
        if match["kind"] == "old" and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        touched.append(entry)
    if touched:
        _fsync_path(parent)
    return touched


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory by name (a directory fsync makes its entries, i.e. renames, durable)."""
    is_dir = path.is_dir()
    fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if is_dir else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (or platforms) refuse fsync on a directory: nothing more to do there
        if not is_dir:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
