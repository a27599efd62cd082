"""Human feedback from the web chat page: ``POST /v1/feedback`` appends preference data to ``--feedback FILE``.

    lmstack serve --model RUN/model --feedback feedback.jsonl    # the page shows its "Feedback" mode
    lmstack dpo --model RUN/model --data feedback.jsonl --out runs/dpo   # the pairs train DPO / a reward model

The page sends one judgement per call (:class:`FeedbackRequest`); the server checks it and writes one JSON
line in TRL's conversational formats, plus metadata:

* ``kind: "pair"``: two sampled replies side by side, the person picked one;
  ``kind: "edit"``: the person rewrote a reply (the edit is chosen, the original rejected). Both are
  preference pairs: ``{"prompt": [messages], "chosen": [{"role": "assistant", "content": ...}],
  "rejected": [{"role": "assistant", "content": ...}], ...}``.
* ``kind: "rating"``: thumbs up or down on one reply. One reply is not a pair, so it is stored in TRL's
  unpaired (KTO) form ``{"prompt": [messages], "completion": [{"role": "assistant", ...}], "label": true}``.
  ``lmstack dpo`` and ``lmstack reward`` train on pairs and skip these lines (counted in their summary);
  they are kept for unpaired objectives such as KTO.

Every line also has ``model`` (the served name that answered: the base or an adapter), ``sampling``
(``temperature``, ``top_p``, ``max_tokens``, ``seed``; for a pair sampled with n=2, reply i used seed + i as
the engine does), ``kind`` and ``time`` (UTC, ISO 8601).

Durability (:class:`FeedbackLog`): each line is encoded whole and written with one ``write`` on a file opened
with O_APPEND, under a thread lock and an exclusive ``flock`` (several servers may share a file), then
``fsync``'ed before the page hears "saved"; a failed write is cut back off. A line is never interleaved
with another writer's. A process killed in the middle of a write (SIGKILL stops a write of more than a page
at a page boundary) or a power loss can still leave a partial last line, and every line before it is
whole; when the server opens the file it checks the tail, and a last line without its newline is cut off
and kept in ``FILE.torn-<time>`` rather
than silently lost or left for a reader to choke on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmstack.errors import UserError

log = logging.getLogger("lmstack.serve")

KINDS = ("pair", "rating", "edit")
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_TEXT = 1 << 20  # characters in one message; the server's body cap is usually lower


class FeedbackMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class FeedbackSampling(BaseModel):
    """How the judged replies were sampled (what the page sent to /v1/chat/completions)."""

    model_config = STRICT
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=-2 ** 63, le=2 ** 63 - 1)


class FeedbackRequest(BaseModel):
    """One judgement. pair / edit: ``chosen`` and ``rejected`` (different texts); rating: ``completion`` and
    ``label``. ``prompt`` is the conversation the replies answer, ending with the user's turn."""

    model_config = STRICT
    kind: Literal["pair", "rating", "edit"]
    model: str
    prompt: list[FeedbackMessage] = Field(min_length=1)
    chosen: str | None = Field(default=None, max_length=MAX_TEXT)
    rejected: str | None = Field(default=None, max_length=MAX_TEXT)
    completion: str | None = Field(default=None, max_length=MAX_TEXT)
    label: bool | None = None
    sampling: FeedbackSampling = Field(default_factory=FeedbackSampling)

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> "FeedbackRequest":
        if self.prompt[-1].role != "user":
            raise ValueError("'prompt' must end with the user's turn that the replies answer")
        if self.kind == "rating":
            if self.completion is None or self.label is None or self.chosen is not None or self.rejected is not None:
                raise ValueError("a rating has 'completion' and 'label' (true = thumbs up), not chosen/rejected")
            if not self.completion.strip():
                raise ValueError("'completion' is empty: there is no reply to rate")
        else:
            if self.chosen is None or self.rejected is None or self.completion is not None or self.label is not None:
                raise ValueError(f"a {self.kind} has 'chosen' and 'rejected', not completion/label")
            if not self.chosen.strip() or not self.rejected.strip():
                raise ValueError("'chosen' and 'rejected' must both be non-empty replies")
            if self.chosen == self.rejected:
                raise ValueError("'chosen' and 'rejected' are the same text, which teaches nothing; "
                                 "pick between different replies or change the text when editing")
        return self


def feedback_record(req: FeedbackRequest, now: float | None = None) -> dict[str, Any]:
    """The JSON line for one judgement (TRL conversational preference or unpaired form, plus metadata)."""
    record: dict[str, Any] = {"prompt": [m.model_dump() for m in req.prompt]}
    if req.kind == "rating":
        record["completion"] = [{"role": "assistant", "content": req.completion}]
        record["label"] = req.label
    else:
        record["chosen"] = [{"role": "assistant", "content": req.chosen}]
        record["rejected"] = [{"role": "assistant", "content": req.rejected}]
    stamp = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    record.update(model=req.model, sampling=req.sampling.model_dump(), kind=req.kind,
                  time=stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
    return record


class FeedbackLog:
    """An append-only JSONL file of judgements; see the module docstring for the durability guarantees."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"--feedback {self.path} is a directory; give a file such as feedback.jsonl")
        if not self.path.parent.is_dir():
            raise UserError(f"--feedback {self.path}: the directory {self.path.parent} does not exist")
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"--feedback {self.path}: cannot open it for appending ({e.strerror})") from None
        self.lock = threading.Lock()
        self.written = 0
        with self._exclusive():
            self.torn_bytes = self._repair_tail()

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, durably (returns after fsync). A failed write (a full disk) is cut
        back off, so the file never keeps half a line; the OSError goes to the caller."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._exclusive():
            start = os.fstat(self.fd).st_size
            try:
                view = memoryview(line)
                while view:  # a regular file takes the whole line in one write; the loop is for short writes
                    view = view[os.write(self.fd, view):]
                os.fsync(self.fd)
            except OSError:
                os.ftruncate(self.fd, start)
                raise
            self.written += 1

    def close(self) -> None:
        os.close(self.fd)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's writers one at a time (the lock), and other processes' too (flock)."""
        with self.lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _repair_tail(self) -> int:
        """Cut a last line that lacks its newline (a write cut off by a kill or a power loss) into FILE.torn-<time>."""
        size = self.path.stat().st_size
        if size == 0:
            return 0
        with open(self.path, "rb") as f:
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n")
        if cut < 0 and size > len(tail):
            raise UserError(f"--feedback {self.path}: its last line is over 1 MiB without a newline; "
                            "this is not a feedback file (choose another path)")
        torn = tail[cut + 1:]
        aside = self.path.with_name(f"{self.path.name}.torn-{int(time.time())}")
        n = 1
        while aside.exists():  # two repairs within one second keep both pieces
            aside, n = self.path.with_name(f"{self.path.name}.torn-{int(time.time())}-{n}"), n + 1
        aside.write_bytes(torn)
        os.truncate(self.path, size - len(torn))
        os.fsync(self.fd)
        log.warning("feedback file %s ended in a partial line (%d bytes, a write cut off by a crash); moved it to %s",
                    self.path, len(torn), aside)
        return len(torn)
