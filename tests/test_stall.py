"""The stall watchdog: a job that stops moving is stopped in one line, and --resume finishes it."""

from __future__ import annotations

import time

import pytest
from runner_stages import StallWhile, Upper, WordRows
from test_runner import SCHEMA, _corpus, _read, _shards

from pipeline.engine.runner import run
from pipeline.engine.spec import JobSpec, StageSpec
from pipeline.engine.watchdog import StallError, Watchdog
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
