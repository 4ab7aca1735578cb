"""Stopping a job on SIGTERM or SIGINT: one line, the conventional exit code, nothing lost.

SIGTERM is what Kubernetes, Slurm and `ray job stop` send; SIGINT is Ctrl-C. Both end a job the same way:
the driver stops within seconds, what was committed stays committed, and the command exits 128 + the
signal's number (143, 130) after one line saying how far the job got and how to finish it.

Two kinds of job stop differently:
- shard jobs (mine, extract) stop where they are: the handler raises `JobStopped` in the main thread;
  committed shards are complete by construction and `--resume` redoes the rest;
- training jobs stop at a safe point: inside `stop_at_safe_points()` the first signal only sets the
  flag, the training loop finishes its step, writes a checkpoint and raises `JobStopped` itself
  (`STOP.check()`); a second signal stops at once.

`install()` puts the handlers in place. Ray's core worker installs its own SIGTERM handler (a native stack
dump) when a driver connects, so `install()` is called again right after `ray.init`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["STOP", "JobStopped", "StopFlag", "install", "job_running", "reinstall", "stop_at_safe_points"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class JobStopped(BaseException):
    """A signal asked the job to stop. `str(exc)` says how far it got; `exit_code` is 128 + signum.

    A BaseException, as KeyboardInterrupt is: no `except Exception` on the way (ours or Ray's) swallows it
    or reports it as an error."""

    def __init__(self, signum: int, progress: str = "", advice: str = "rerun with --resume to finish") -> None:
        self.signum, self.progress, self.advice = signum, progress, advice
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def line(self) -> str:
        said = f"stopped by {self.signal_name}"
        return "; ".join(p for p in (said, self.progress, self.advice) if p)

    def with_progress(self, progress: str, advice: str | None = None) -> JobStopped:
        """The same stop, now saying how far the job got (the layer that knows adds it)."""
        return JobStopped(self.signum, progress, self.advice if advice is None else advice)


class StopFlag:
    """The signal a job was asked to stop by (None until one arrives)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.running = 0  # > 0 while a job runs: outside one (start-up, shutdown) a signal is only noted
        self.safe_points = 0  # > 0 while a job stops at its own safe points

    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """At a safe point: raise JobStopped if a stop was asked for."""
        if self.signum is not None:
            raise JobStopped(self.signum)

    def reset(self) -> None:
        self.signum = None


STOP = StopFlag()


def _handle(signum: int, frame: FrameType | None) -> None:
    first = STOP.signum is None
    if first:
        STOP.signum = signum
    if not STOP.running:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # no job to stop: Ctrl-C does what it always does
        # SIGTERM with no job to stop: the work is done (or not begun) and the process is on its way out;
        # raising here would only break Ray's shutdown halfway and leave its processes behind.
        return
    if first and STOP.safe_points:
        return  # the job stops at its next safe point
    raise JobStopped(signum)


_installed = False


def install() -> None:
    """Handle SIGINT and SIGTERM with `_handle` (main thread only: elsewhere Python cannot). Outside
    `job_running()` a signal is only noted, and the job that starts next stops at once.

    The `splinter` command installs them; a program using the jobs as a library keeps its own handlers
    (Ctrl-C is then Python's KeyboardInterrupt, which the jobs handle as well)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    STOP.reset()
    for signum in SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, _handle)
    _installed = True


def reinstall() -> None:
    """Put our handlers back where something else replaced them (Ray's core worker does, on connect),
    if `install()` put them there in the first place."""
    if not _installed or threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, _handle)


@contextlib.contextmanager
def job_running() -> Iterator[StopFlag]:
    """Within the block a signal stops the job (JobStopped); a signal already noted stops it at once."""
    STOP.running += 1
    try:
        STOP.check()
        yield STOP
    finally:
        STOP.running -= 1


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[StopFlag]:
    """Within the block, a first signal only sets `STOP`; the job polls `STOP.check()` between steps."""
    STOP.safe_points += 1
    try:
        yield STOP
    finally:
        STOP.safe_points -= 1
