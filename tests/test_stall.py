"""The stall watchdog: a job that stops moving is stopped in one line, and --resume finishes it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from runner_stages import StallWhile, Upper, WordRows
from test_runner import SCHEMA, _corpus, _read, _shards

from pipeline.engine.runner import run
from pipeline.engine.spec import JobSpec, StageSpec
from pipeline.engine.watchdog import StallError, Watchdog, grace_for
from pipeline.storage.rundir import is_complete
from pipeline.storage.sources import ReadOptions


def _spec(flag: str) -> JobSpec:
    return JobSpec(name="words", read=ReadOptions(kind="documents"),
                   stages=[StageSpec(WordRows), StageSpec(StallWhile, {"flag": flag}), StageSpec(Upper)],
                   schema=SCHEMA, reason_column="skip_reason", drop_reason_rows=True,
                   config={"v": 1}, write_batch_size=5)


def test_watchdog_fires_once_after_the_timeout_and_not_while_beating():
    now = [0.0]
    fired: list[str] = []
    dog = Watchdog(10, lambda: ("the X stage", "3 of 8 shards committed"), fired.append, clock=lambda: now[0])
    for _ in range(5):
        now[0] += 9
        dog.beat()
        assert dog.check() is None
    now[0] += 10
    message = dog.check()
    assert message and "the X stage" in message and "3 of 8 shards committed" in message and "--resume" in message
    now[0] += 100
    dog.check()
    assert fired == [message]
    with pytest.raises(ValueError):
        Watchdog(0, lambda: ("", ""), fired.append)


def test_stalled_ray_job_stops_in_one_line_and_resume_finishes_it(tmp_path, ray_session):
    corpus = _corpus(tmp_path)
    shards = _shards(corpus)
    clean = tmp_path / "clean"
    flag = tmp_path / "stall"
    run(_spec(str(flag)), shards, str(clean), engine="local")

    out = tmp_path / "out"
    flag.write_text("x")
    started = time.monotonic()
    with pytest.raises(StallError) as err:
        run(_spec(str(flag)), shards, str(out), engine="ray", stall_timeout_s=4)
    took = time.monotonic() - started
    message = str(err.value)
    assert "\n" not in message and "--resume" in message and "shards committed" in message
    assert "Upper" in message  # nothing came out of the model (actor) stage: it is the one named
    assert took < 30, took  # stopped by the watchdog, not by the stage giving up (60 s)
    assert not is_complete(str(out))
    flag.unlink()
    run(_spec(str(flag)), shards, str(out), engine="ray", resume=True, stall_timeout_s=60)
    assert is_complete(str(out))
    assert _read(out).equals(_read(clean))


# A driver whose main thread is stuck where no Python signal handler runs: `interrupt_main` only sets a
# flag the interpreter checks between bytecodes, and a lock acquire that never returns (as a Ray call
# waiting in C++ for an object nobody can rebuild) never gets there.
_HUNG_DRIVER = """
import threading
from pipeline.engine.runner import stall_watchdog
from pipeline.signals import install, job_running

install()
with job_running():
    stalled = []
    stall_watchdog(2, lambda: ("the extract job's QAModel stage", "3 of 8 shards committed"), stalled).start()
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()  # blocks forever: nothing in this process releases it
"""


def test_a_driver_blocked_past_the_grace_period_exits_1_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _HUNG_DRIVER], env=env, capture_output=True, text=True,
                          timeout=60)
    took = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: the job stalled: "), done.stderr
    assert "QAModel" in lines[0] and "3 of 8 shards committed" in lines[0] and "--resume" in lines[0]
    # 2 s timeout + 5 s grace (the floor), plus the interpreter's start-up on a busy machine.
    assert 7 <= took < 7 + 20, took
    assert grace_for(2) == 5 and grace_for(120) == 12 and grace_for(3600) == 30


def test_a_job_that_stops_in_time_is_not_exited():
    hung: list[str] = []
    dog = Watchdog(0.2, lambda: ("the X stage", "0 of 1 shards committed"), lambda _: None,
                   on_hang=hung.append, grace_s=1.0).start()
    time.sleep(0.6)
    assert dog.fired is not None
    dog.stop()  # the main thread unwound within the grace period
    time.sleep(1.0)
    assert hung == []
