"""The one progress bar: rich.progress on stderr, with throughput and ETA, and an off switch.

Every long job in lmstack (downloads, cleaning, tokenizing, training, imports, evaluation, batch
generation) shows its progress through :class:`Progress`. A task counts bytes (shown as MB and MB/s) or
named items (shown as done/total and items/s): ``Progress(bytes_mode=True)`` makes bytes the default,
and ``add(description, total, unit="shards")`` makes one task count shards, steps or tokens. Extra
per-task text (a loss, a learning rate) goes through ``update(task, status="...")``.

With ``enabled=False`` every method is a no-op, so library code calls it unconditionally.

Used as a context manager, the bar's last frame stays on the screen when the job finishes and is erased
when the job raises, so a failing command's error message is not buried under a half-finished bar.
"""

from __future__ import annotations


class Progress:
    """A thin wrapper over rich.progress (on stderr) that can be switched off.

    Each task counts bytes (shown as MB and MB/s) or items (shown as done/total and items/s): the bar's
    ``bytes_mode`` is the default, and ``add(..., unit="shards")`` makes one task count items."""

    def __init__(self, enabled: bool = True, bytes_mode: bool = False):
        self.enabled = enabled
        self.bytes_mode = bytes_mode
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, ProgressColumn,
                                       Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)
            from rich.text import Text

            class Amount(ProgressColumn):
                """Bytes and bytes/s for byte tasks, done/total and items/s for counted ones."""

                def __init__(self):
                    super().__init__()
                    self.size, self.speed, self.count = DownloadColumn(), TransferSpeedColumn(), MofNCompleteColumn()

                def render(self, task):
                    unit = task.fields.get("unit")
                    if unit is None:
                        return Text.assemble(self.size.render(task), " ", self.speed.render(task))
                    rate = f"{task.speed:,.1f} {unit}/s" if task.speed else ""
                    return Text.assemble(self.count.render(task), f" {unit} {rate}")

            self._bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), Amount(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[status]}"),
                                     console=Console(stderr=True))

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._bar is not None:
            if exc_type is None:
                self._bar.stop()
            else:  # a failed job's bar vanishes, so its error is the one line left
                self._bar.live.transient = True
                self._bar.live.stop()  # rich's Progress.stop would add a blank line off a terminal

    def add(self, description: str, total: float | None, unit: str | None = None) -> int:
        """A new task; ``unit`` names what it counts (unset: bytes on a bytes_mode bar, else items)."""
        if self._bar is None:
            return 0
        unit = unit or (None if self.bytes_mode else "items")
        return self._bar.add_task(description, total=total, unit=unit, status="")

    def advance(self, task: int, amount: float = 1) -> None:
        if self._bar is not None:
            self._bar.advance(task, amount)

    def update(self, task: int, **kw) -> None:
        if self._bar is not None:
            self._bar.update(task, **kw)

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message)
