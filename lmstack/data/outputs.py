"""Output directories of the data jobs: never delete the user's files, never hand out half a result.

Two guarantees, shared by ``lmstack data clean`` (lmstack.data.pipeline) and ``lmstack data tokenize``
(lmstack.data.shards):

1. **A job only replaces what an earlier job of the same kind wrote.** Before writing, a job calls
   :func:`claim_output_dir` with the names the previous run of that job recorded in the directory
   (clean: the record file ``.lmstack-output.json``; tokenize: the files ``meta.json`` lists). Any other
   entry makes it refuse with one :class:`DataError` that names the entries and ``--overwrite``
   (``overwrite=True`` in the library call). An output directory that is, contains or lies inside one of
   the job's inputs is refused even with ``overwrite=True``: writing there would destroy the inputs.
2. **A result is complete or visibly incomplete.** A job that writes into its output directory in place
   (clean) first creates ``DIR/_INCOMPLETE`` and removes it as its very last step, after the report.
   :func:`refuse_incomplete` (called by lmstack.data.readers for every directory it reads) turns such a
   directory into a one-line error instead of a silent partial read. Jobs that build their output in a
   staging directory and rename it into place (tokenize) are atomic and need no marker.

The record is a small JSON file ``{"job": "clean", "files": [...]}`` next to the outputs; names are added
(:func:`record_outputs`) *before* the files are written, so a killed run never leaves a file of its own
that the next run would take for the user's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from lmstack.atomic import write_json_atomic
from lmstack.errors import DataError

INCOMPLETE = "_INCOMPLETE"  # present while a job writes into the directory in place
RECORD = ".lmstack-output.json"  # {"job": kind, "files": [names this job wrote]}


def refuse_incomplete(directory: str | os.PathLike) -> None:
    """Raise DataError when DIRECTORY carries the ``_INCOMPLETE`` marker of an unfinished job."""
    marker = Path(directory) / INCOMPLETE
    if marker.is_file():
        try:
            job = json.loads(marker.read_text()).get("job", "data")
        except (OSError, ValueError, AttributeError):
            job = "data"
        raise DataError(f"{directory} is incomplete: the `lmstack {job}` writing it is still running or was "
                        f"stopped; re-run that command to finish it (or delete {marker} to read it anyway)")


def recorded_outputs(directory: str | os.PathLike, job: str) -> set[str] | None:
    """Names a previous JOB recorded in DIRECTORY, or None when DIRECTORY holds no record of that job."""
    try:
        record = json.loads((Path(directory) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("job") != job or not isinstance(record.get("files"), list):
        return None
    return {str(name) for name in record["files"]}


def record_outputs(directory: str | os.PathLike, job: str, names: Iterable[str]) -> None:
    """Add NAMES to DIRECTORY's record of what JOB wrote (call it before writing those files)."""
    known = recorded_outputs(directory, job) or set()
    write_json_atomic(Path(directory) / RECORD, {"job": job, "files": sorted(known | set(names))})


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def refuse_overlap(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], job: str) -> None:
    """DataError when OUT_DIR is, contains or lies inside one of INPUTS (no flag allows that)."""
    out = Path(out_dir).expanduser().resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if _within(out, source) or _within(source, out):
            where = "is" if out == source else ("is inside" if _within(out, source) else "contains")
            raise DataError(f"--out {out_dir} {where} the input {item}: `lmstack {job}` would overwrite its own "
                            "input; choose an output directory outside the inputs")


def claim_output_dir(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], job: str,
                     owned: set[str] | None, overwrite: bool = False) -> None:
    """Check that JOB may write into OUT_DIR; raise DataError (one line) when it may not.

    owned: the entry names the previous run of JOB wrote there (None: no such run), see the module
    docstring. Entries outside that set are the user's: refused unless ``overwrite``. The directory
    overlapping an input is refused always.
    """
    refuse_overlap(out_dir, inputs, job)
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; give a directory")
    allowed = owned | {RECORD, INCOMPLETE} if owned is not None else set()
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in allowed)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"--out {out} holds {shown}, not written by `lmstack {job}`; choose a new or empty "
                        "directory, or pass --overwrite to replace its contents")


def mark_incomplete(directory: str | os.PathLike, job: str) -> None:
    """Create DIRECTORY/_INCOMPLETE: readers refuse the directory until :func:`mark_complete`."""
    write_json_atomic(Path(directory) / INCOMPLETE, {"job": job, "pid": os.getpid()})


def mark_complete(directory: str | os.PathLike) -> None:
    (Path(directory) / INCOMPLETE).unlink(missing_ok=True)
