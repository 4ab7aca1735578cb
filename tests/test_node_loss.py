"""Losing a node mid-job on a real two-node cluster (a `ray start --head` plus a `ray start --address`
worker on this machine): the job finishes with the uninterrupted output, or stops in one line within
its stall timeout and --resume finishes it identically. Never a hang."""

from __future__ import annotations

import json
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
    # One minute: on two busy cores a model actor alone can take half of that to start.
    args = [*args, "--address", cluster.gcs_address, "--stall-timeout", "1"]
    with worker_node(cluster) as node:
        proc = subprocess.Popen([str(VENV_BIN / "splinter"), *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # Mid-job: after the first shard is committed, while others are in flight on both nodes.
        deadline = time.monotonic() + 90
        while not list(out.glob("shard-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before the node could be killed:\n"
                        f"{proc.communicate()[1][-3000:]}")
        assert node.kill() > 0
        killed = time.monotonic()
        try:
            # 60 s of stall timeout, the watchdog's 6 s grace, Ray noticing the dead node: never a hang.
            _, stderr = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            pytest.fail(f"the job hung after losing a node:\n{stderr[-3000:]}")
        took = time.monotonic() - killed
    if proc.returncode == 0:
        return "finished"
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "--resume" in lines[0], stderr[-2000:]
    assert took < 100, (took, lines[0])  # stopped within its stall timeout and grace
    resumed = _splinter([*args, "--resume"], env, 240)
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


# The extract job on this cluster: two model actors of half a CPU each, one per node. Losing the worker node
# can leave both actors on the head's one CPU with nothing left for reading (the job stops on its stall
# timeout) or finish there; either way --resume plans for the cluster that is left and finishes it.
@pytest.mark.slow
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


PRETRAIN_STEPS, PRETRAIN_EVERY = 30, 5


def _registered_step(out: Path) -> int:
    """The newest checkpoint Ray Train has registered (what a restarted group resumes from), 0 if none."""
    try:
        snapshot = json.loads((out / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return int((snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("step", 0))


@pytest.mark.slow
def test_pretrain_survives_losing_the_node_of_its_workers(cluster: LocalCluster, tmp_path: Path) -> None:
    """Two DDP workers of one CPU each; the head keeps one CPU for Ray Data and two 2-CPU worker nodes can
    each hold the whole group (Ray Train packs it onto one of them). Killing that node after the first
    checkpoint fails the group; Ray Train (FailureConfig max_failures) places it again on the other node,
    resumes from the newest checkpoint and reaches --max-steps."""
    from pipeline.corpus.mining import run_mine
    from pipeline.settings import MineConfig
    from splinter.config import SplinterConfig
    from tests.pretrain_data import write_mined_leads

    docs = write_mined_leads(tmp_path / "docs.jsonl", 500)
    mined = tmp_path / "mined"
    assert run_mine(MineConfig(input=[str(docs)], output=str(mined), local=True, max_seq_length=128))["sequences"]
    tiny = tmp_path / "tiny.json"
    tiny.write_text(SplinterConfig.tiny(vocab_size=28996, max_position_embeddings=128).to_json_string())
    out = tmp_path / "run"
    env = {**cluster.client_env(token=cluster.token, address=cluster.gcs_address), "RAY_AUTH_MODE": "token"}
    args = ["pretrain", str(mined), str(out), "--model-config", str(tiny), "--num-workers", "2",
            "--cpus-per-worker", "1", "--max-steps", str(PRETRAIN_STEPS), "--batch-size", "8",
            "--checkpoint-every", str(PRETRAIN_EVERY), "--learning-rate", "3e-3", "--warmup-steps", "5",
            "--seed", "1", "--max-failures", "2", "--address", cluster.gcs_address, "-q"]  # fmt: skip
    with worker_node(cluster, num_cpus=2) as first, worker_node(cluster, num_cpus=2) as second:
        proc = subprocess.Popen([str(VENV_BIN / "splinter"), *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300  # Ray Train's start-up: minutes on two busy cores
        while _registered_step(out) < PRETRAIN_EVERY:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"no checkpoint within 5 minutes:\n{proc.communicate()[1][-3000:]}")
            time.sleep(0.1)
        (holder,) = [n for n in (first, second) if n.runs("RayTrainWorker")]
        assert holder.kill() > 0
        killed_at = _registered_step(out)
        try:
            _, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"pretraining hung after losing a node:\n{proc.communicate()[1][-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert killed_at < PRETRAIN_STEPS, "the run must lose its node mid-run"
    assert (out / "__splinter__" / "_SUCCESS").is_file()
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == PRETRAIN_STEPS
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    resumes = [r for r in log if r.get("event") == "resume"]
    assert resumes and resumes[-1]["step"] >= PRETRAIN_EVERY and resumes[-1]["step"] % PRETRAIN_EVERY == 0
    # After the last restart, every step to the end, once.
    after = log[log.index(resumes[-1]) + 1:]
    assert [r["step"] for r in after if "loss" in r] == list(range(resumes[-1]["step"] + 1, PRETRAIN_STEPS + 1))
