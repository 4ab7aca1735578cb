"""Progress a person can read at a glance: a live bar on a terminal, plain timed log lines elsewhere.

Jobs and training loops report through one small interface (`Progress`), so they never care where the
output goes: `make_progress()` picks a rich bar (done/total, rate, ETA) when stderr is a terminal, and
one plain line every few seconds when it is not (CI, `ray job logs`, a file), where a redrawn bar would
be noise.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Protocol


class Progress(Protocol):
    """What long work reports. `done` and `total` count `unit`s; `rows` is the work's own row count."""

    def start(self, description: str, total: int | None, unit: str) -> None: ...

    def update(self, done: int, *, rows: int | None = None, info: str = "") -> None: ...

    def log(self, message: str) -> None: ...

    def close(self) -> None: ...


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class NullProgress:
    """Reports nothing (`--quiet`, library callers that pass no progress)."""

    def start(self, description: str, total: int | None, unit: str) -> None:
        pass

    def update(self, done: int, *, rows: int | None = None, info: str = "") -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class LogProgress:
    """One line per `every_s` seconds (and a last one at the end): for logs, CI and Ray job output."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.description, self.total, self.unit = "", None, ""
        self.done, self.rows, self.info = 0, None, ""
        self.t0 = self.last = time.perf_counter()
        self.pending = False

    def start(self, description: str, total: int | None, unit: str) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.done, self.rows, self.info, self.pending = 0, None, "", False
        self.t0 = self.last = time.perf_counter()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        parts = [f"{self.done:,}/{self.total:,} {self.unit}" if self.total else f"{self.done:,} {self.unit}"]
        if self.rows is not None:
            parts.append(f"{self.rows:,} rows ({self.rows / elapsed:,.1f}/s)")
        elif self.done:
            parts.append(f"{self.done / elapsed:,.2f} {self.unit}/s")
        if self.total and 0 < self.done < self.total:
            parts.append(f"ETA {_duration(elapsed * (self.total - self.done) / self.done)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.info:
            parts.append(self.info)
        return f"[{self.description}] " + ", ".join(parts)

    def update(self, done: int, *, rows: int | None = None, info: str = "") -> None:
        self.done, self.rows, self.info = done, rows if rows is not None else self.rows, info or self.info
        self.pending = True
        now = time.perf_counter()
        if now - self.last >= self.every_s or (self.total and done >= self.total):
            self._emit(now)

    def _emit(self, now: float) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last, self.pending = now, False

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.pending:
            self._emit(time.perf_counter())


class RichProgress:
    """A live bar on a terminal: description, bar, done/total, rows and rate, elapsed, ETA."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=stream or sys.stderr)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.task: Any = None
        self.t0 = time.perf_counter()

    def start(self, description: str, total: int | None, unit: str) -> None:
        if self.task is None:
            self.bar.start()
        else:
            self.bar.remove_task(self.task)
        self.t0 = time.perf_counter()
        self.task = self.bar.add_task(description, total=total, unit=unit, rate="", info="")

    def update(self, done: int, *, rows: int | None = None, info: str = "") -> None:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = f"{rows:,} rows, {rows / elapsed:,.1f}/s" if rows is not None else ""
        fields: dict[str, Any] = {"info": info} if info else {}
        if rate:
            fields["rate"] = rate
        self.bar.update(self.task, completed=done, **fields)

    def log(self, message: str) -> None:
        self.bar.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()
            self.task = None


def make_progress(quiet: bool = False, stream: IO[str] | None = None) -> Progress:
    """A bar when `stream` (default stderr) is a terminal, timed log lines otherwise, nothing when quiet."""
    stream = stream or sys.stderr
    if quiet:
        return NullProgress()
    if stream.isatty():
        return RichProgress(stream)
    return LogProgress(stream)
