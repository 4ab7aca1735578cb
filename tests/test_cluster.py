"""`splinter submit` against a real, token-protected `ray start --head` cluster (see cluster_fixture).

One cluster serves the module. Jobs go through the real Jobs API over HTTP. The CLI runs as a
subprocess with its own HOME and environment, as a user's shell would run it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cluster_fixture import ROOT, VENV_BIN, LocalCluster, free_port, local_cluster

from pipeline.submit import EXIT_FAILED, EXIT_NOT_SUBMITTED, EXIT_SUCCEEDED, submit

pytestmark = pytest.mark.cluster

RUNTIME_ENV = ROOT / "infra" / "runtime_env.yaml"
SQUAD = ROOT / "tests" / "data" / "squad_sample.json"
WIKI = ROOT / "data" / "wiki_sample.jsonl"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if importlib.util.find_spec("aiohttp_cors") is None:
        pytest.fail(
            "the Ray dashboard (Jobs API) needs ray[default]: depend on `ray[data,default]` in pyproject.toml"
        )
    with local_cluster(num_cpus=2) as running:
        yield running


def splinter_submit(
    cluster: LocalCluster, *args: str, token: str | None = "cluster", **env: str
) -> tuple[int, str]:
    """Run the `splinter submit` executable; token "cluster" means the right one, None means none."""
    client_env = cluster.client_env(token=cluster.token if token == "cluster" else token)
    client_env.update(env)
    result = subprocess.run(
        [str(VENV_BIN / "splinter"), "submit", *args],
        env=client_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return result.returncode, result.stdout + result.stderr


def read_rows(out: Path) -> list[dict]:
    files = sorted(out.glob("*.parquet"))
    assert files, f"no Parquet files in {out}: {sorted(p.name for p in out.iterdir())}"
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_jobs_run_in_the_project_venv(cluster: LocalCluster) -> None:
    """The premise of the entrypoint: `python` on the cluster is this venv, with the project installed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})
    job = client.submit_job(
        entrypoint="python -c 'import sys, pipeline.cli, pipeline.submit; print(sys.prefix)'"
    )
    deadline = time.monotonic() + 120
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    assert sys.prefix in logs


def test_submit_function_streams_logs_and_succeeds(
    cluster: LocalCluster, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    # A working dir makes the client upload a package first: that request must carry the token too.
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("shipped with the job\n")
    lines: list[str] = []
    code = submit(["python", "-m", "pipeline.cli", "mine", "--help"], address=cluster.address, working_dir=str(workdir), log=lines.append)
    text = "\n".join(lines)
    assert code == EXIT_SUCCEEDED, text
    assert lines[0].startswith("submitted raysubmit_") and "python -m pipeline.cli mine --help" in lines[0]
    assert "Usage:" in text and "--max-span-length" in text  # the job's own output, streamed back
    assert lines[-1].endswith("SUCCEEDED")
    # The polling fallback (for proxies that block the websocket) shows the same log, line for line.
    from ray.job_submission import JobSubmissionClient

    from pipeline.submit import _Lines, _poll_logs

    job_id = lines[0].split()[1]
    polled: list[str] = []
    client = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})
    _poll_logs(client, job_id, collector := _Lines(polled.append))
    collector.flush()
    assert polled == lines[1:-1]
    # The working dir went up to the cluster as a package, under the same token.
    assert client.get_job_info(job_id).runtime_env["working_dir"].startswith("gcs://_ray_pkg_")


def test_mine_job(cluster: LocalCluster, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(WIKI.read_text().splitlines(keepends=True)[:40]))
    out = tmp_path / "mined"
    code, output = splinter_submit(
        cluster,
        "--runtime-env",
        str(RUNTIME_ENV),
        "--",
        "mine",
        str(corpus),
        str(out),
        "--seed",
        "1",
        "--quiet",
    )
    assert code == 0, output
    assert "SUCCEEDED" in output
    rows = read_rows(out)
    assert rows and (out / "__splinter__" / "_SUCCESS").is_file()


def test_extract_job(cluster: LocalCluster, tmp_path: Path, tiny_qa_model: Path) -> None:
    out = tmp_path / "answers"
    code, output = splinter_submit(
        cluster,
        "--",
        "extract",
        str(SQUAD),
        str(out),
        "--model",
        str(tiny_qa_model),
        "--batch-size",
        "128",
        "--quiet",
    )
    assert code == 0, output
    rows = read_rows(out)
    questions = [
        q["id"] for a in json.loads(SQUAD.read_text())["data"] for p in a["paragraphs"] for q in p["qas"]
    ]
    assert sorted(r["id"] for r in rows) == sorted(questions)
    assert all(r["error"] is None and r["answer"] for r in rows)


def test_failing_job_exits_nonzero(cluster: LocalCluster, tmp_path: Path) -> None:
    code, output = splinter_submit(
        cluster, "--", "mine", str(tmp_path / "no-such-corpus.jsonl"), str(tmp_path / "o")
    )
    assert code == EXIT_FAILED, output
    assert "FAILED" in output


@pytest.mark.parametrize(
    ("token", "says"),
    [(None, "requires a token and none was found"), ("not-the-token", "rejected the auth token")],
    ids=["no-token", "wrong-token"],
)
def test_refused_without_the_right_token(
    cluster: LocalCluster, tmp_path: Path, token: str | None, says: str
) -> None:
    code, output = splinter_submit(cluster, "--", "mine", "in.jsonl", str(tmp_path / "o"), token=token)
    assert code == EXIT_NOT_SUBMITTED, output
    error = [line for line in output.splitlines() if line.strip()]
    assert len(error) == 1, output  # one clear line, no traceback
    assert says in error[0] and "RAY_AUTH_TOKEN" in error[0] and "~/.ray/auth_token" in error[0]


def test_no_wait_bare_address_and_duplicate_id(cluster: LocalCluster) -> None:
    """--no-wait returns once accepted; RAY_ADDRESS may be bare host:port; --address beats it; a reused id is refused."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_id = f"splinter-test-{uuid.uuid4().hex[:8]}"
    bare = cluster.address.removeprefix("http://")
    args = ("--no-wait", "--submission-id", job_id, "--", "mine", "--help")
    code, output = splinter_submit(cluster, *args, RAY_ADDRESS=bare)
    assert code == EXIT_SUCCEEDED and f"submitted {job_id}" in output, output
    # Again, now with --address, which must win over a RAY_ADDRESS where nothing listens.
    flag = ("--address", cluster.address, *args)
    code, output = splinter_submit(cluster, *flag, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    assert code == EXIT_NOT_SUBMITTED and "refused the job" in output and "already exists" in output, output
    # The job went on without us: it is known to the cluster, and we end it (no need to wait).
    client = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})
    assert client.get_job_status(job_id) in {JobStatus.PENDING, JobStatus.RUNNING, JobStatus.SUCCEEDED}
    client.stop_job(job_id)
