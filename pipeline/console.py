"""The `splinter` command's console shows the tool's own lines: known Ray notices are dropped from stderr.

Ray's core worker is C++ and writes some notices straight to file descriptor 2, where no Python logging
filter reaches them. One is printed by every Ray Data job with a model actor pool, and asks nothing of the
user: Ray Data hands each pool actor its function through the object store and makes the actor restartable
(that is how a job survives losing a node), and the core worker warns that this combination exists
(ray#53727). `filter_stderr()` puts a pipe in place of fd 2 and a small child process in front of the real
stderr, which copies every line except those in NOISE.

Why a child process and not a thread: a driver that dies hard (a native abort, os._exit) would take a
thread, and the last lines it wrote (the ones that say why) with it. The child reads until every writer is
gone, so it sees those lines and passes them on. It runs in a session of its own and ignores SIGINT,
SIGTERM and SIGHUP: Ctrl-C reaches the terminal's whole process group, and the driver's own stop line must
still get through.

Only the console entry point filters (`python -m pipeline.cli`, the `splinter` script); a library caller's
stderr is its own. SPLINTER_RAY_NOTICES=1 turns the filter off.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import time

__all__ = ["NOISE", "filter_stderr", "restore_stderr"]

# Regular expressions (bytes) for lines never shown. Each is one specific notice, never a whole source.
NOISE = (
    rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store and "
    rb"max_restarts > 0",
)

# The child: line by line from stdin to stderr, dropping NOISE. A partial line is passed on at once unless
# it may still become a Ray log line ("[2026-..."): progress lines ending in "\r" must show as they come.
_CHILD = r"""
import os, re, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
noise = re.compile(b"|".join(b"(?:" + p + b")" for p in eval(sys.argv[1])))
held = b""
def put(data):
    while data:
        data = data[os.write(2, data):]
def maybe_ray(rest):
    return rest[:1] == b"[" and (len(rest) == 1 or rest[1:2].isdigit())
while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    lines = (held + chunk).split(b"\n")
    held = lines.pop()
    out = b"".join(line + b"\n" for line in lines if not noise.search(line))
    if held and not maybe_ray(held):
        out, held = out + held, b""
    put(out)
if held and not noise.search(held):
    put(held)
"""

_state: dict[str, object] = {}


def filter_stderr() -> None:
    """Route this process's fd 2 through the filter (once per process; a no-op when turned off)."""
    if _state or os.environ.get("SPLINTER_RAY_NOTICES") == "1":
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        child = subprocess.Popen([sys.executable, "-S", "-c", _CHILD, repr(NOISE)], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=real, close_fds=True, start_new_session=True)
    except OSError:  # no filter is better than no console
        return
    assert child.stdin is not None
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()  # fd 2 is now the pipe's only write end in this process
    _state.update(real=real, child=child)
    atexit.register(restore_stderr)


def restore_stderr(wait_s: float = 2.0) -> None:
    """Give fd 2 back to the real stderr and let the filter pass on what it holds (called at exit, and by
    the stall watchdog before it ends a hung process)."""
    real, child = _state.get("real"), _state.get("child")
    if not isinstance(real, int) or not isinstance(child, subprocess.Popen):
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(real, 2)  # closes our write end: the child sees the end of its input once Ray's are gone too
    _state.clear()
    deadline = time.monotonic() + wait_s
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
