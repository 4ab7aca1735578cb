"""The stall watchdog: the net under every distributed job, so a job never hangs silently.

A cluster that loses a node can leave a job waiting forever (a task Ray keeps resubmitting, an object
nobody can rebuild). Whatever the cause, the symptom is the same: no row, shard or step moves. The
watchdog is told about every bit of progress (`beat`), and when nothing moved for `timeout_s` it calls
`on_stall` once with one line naming the stage that stalled and what was committed. It holds no Ray:
the runner (or a training driver) wires it to its own progress and decides how to stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["StallError", "Watchdog"]


class StallError(RuntimeError):
    """A job made no progress for its stall timeout; its message is the one line the user sees."""


class Watchdog:
    """Calls `on_stall(message)` once when no `beat` arrived for `timeout_s` seconds.

    `describe()` -> (stage that stalled, what was committed) is asked at stall time, so the message
    says where the job stood then, not when the watchdog was built.
    """

    def __init__(self, timeout_s: float, describe: Callable[[], tuple[str, str]],
                 on_stall: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"stall timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.describe, self.on_stall, self.clock = timeout_s, describe, on_stall, clock
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
                    return

        self._thread = threading.Thread(target=loop, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def _span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
