"""The stall watchdog: the net under every distributed job, so a job never hangs silently.

A cluster that loses a node can leave a job waiting forever (a task Ray keeps resubmitting, an object
nobody can rebuild). Whatever the cause, the symptom is the same: no row, shard or step moves. The
watchdog is told about every bit of progress (`beat`), and when nothing moved for `timeout_s` it calls
`on_stall` once with one line naming the stage that stalled and what was committed. It holds no Ray:
the runner (or a training driver) wires it to its own progress and decides how to stop.

Stopping is asked of the main thread (`on_stall` typically interrupts it), and a main thread blocked in
native code (a Ray call waiting on an object that will never come) may never see the request. So the
net has a second strand: if the job has not stopped (`stop()`) within `grace_s` of firing, `on_hang` is
called from the watchdog's own thread with the same line; the runner's `on_hang` exits the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["StallError", "Watchdog", "grace_for"]


class StallError(RuntimeError):
    """A job made no progress for its stall timeout; its message is the one line the user sees."""


def grace_for(timeout_s: float) -> float:
    """How long a stopped job may take to unwind before it counts as hung: 10% of the timeout, 5-30 s."""
    return min(30.0, max(5.0, timeout_s / 10))


class Watchdog:
    """Calls `on_stall(message)` once when no `beat` arrived for `timeout_s` seconds, and `on_hang(message)`
    if `stop()` did not follow within `grace_s` (default `grace_for(timeout_s)`).

    `describe()` -> (stage that stalled, what was committed) is asked at stall time, so the message
    says where the job stood then, not when the watchdog was built.
    """

    def __init__(self, timeout_s: float, describe: Callable[[], tuple[str, str]],
                 on_stall: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
                 on_hang: Callable[[str], None] | None = None, grace_s: float | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"stall timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.describe, self.on_stall, self.clock = timeout_s, describe, on_stall, clock
        self.on_hang = on_hang
        self.grace_s = grace_for(timeout_s) if grace_s is None else grace_s
        self.last = clock()
        self.fired: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Something progressed (a row, a shard, a step): the clock starts again."""
        self.last = self.clock()

    def check(self) -> str | None:
        """The stall message if the job stalled (firing `on_stall` the first time), else None."""
        if self.fired is None and self.clock() - self.last >= self.timeout_s:
            stage, committed = self.describe()
            self.fired = (f"stalled: no progress in {stage} for {_span(self.timeout_s)} (--stall-timeout); "
                          f"{committed}; rerun with --resume to finish")
            self.on_stall(self.fired)
        return self.fired

    def start(self) -> Watchdog:
        self.last = self.clock()
        # Check often enough that a stall is caught within ~5% of the timeout, at most once a second.
        every = min(1.0, self.timeout_s / 20)

        def loop() -> None:
            while not self._stop.wait(every):
                if self.check() is not None:
                    break
            else:
                return  # stopped before any stall
            # Fired: the job now has `grace_s` to stop; waiting on the event, not the clock, so a real
            # stop ends this thread at once.
            if not self._stop.wait(self.grace_s) and self.on_hang is not None and self.fired is not None:
                self.on_hang(self.fired)

        self._thread = threading.Thread(target=loop, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def _span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
