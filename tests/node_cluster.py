"""A second node for the cluster of tests/cluster_fixture.py: a worker raylet on this machine that a
test can kill with SIGKILL mid-job, as a cloud would take a node away."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster_fixture import (
    MARKER,
    VENV_BIN,
    LocalCluster,
    _die_with_parent,
    _pids_with_marker,
    free_port,
    wait_until_up,
)


@dataclass
class WorkerNode:
    proc: subprocess.Popen
    marker: str
    log: Path

    def runs(self, name: str) -> bool:
        """Whether a process of this node has `name` in its command line (Ray titles a worker process
        `ray::ClassName.method`): which node holds a Ray Train worker, say."""
        for pid in _pids_with_marker(self.marker):
            with contextlib.suppress(OSError):
                if name.encode() in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                    return True
        return False

    def kill(self) -> int:
        """SIGKILL the node: its raylet, its object store and every worker process on it. -> count."""
        pids = _pids_with_marker(self.marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)


@contextlib.contextmanager
def worker_node(cluster: LocalCluster, num_cpus: int = 1, start_timeout_s: float = 60.0,
                attempts: int = 3) -> Iterator[WorkerNode]:
    """Join a worker node to `cluster`; wait until the cluster sees it; always tear it down. A `ray start`
    that gives up on a busy machine ("the current node timed out during startup": the GCS answered too
    late) is tried again, up to `attempts` times."""
    for attempt in range(attempts):
        node = _start_worker(cluster, num_cpus)
        try:
            # `ray start` says so only once the node registered with the head's GCS.
            wait_until_up(node.proc, node.log, lambda n=node: b"Ray runtime started" in n.log.read_bytes(),
                          start_timeout_s, "worker node")
        except (RuntimeError, TimeoutError):
            _stop_worker(node)
            if attempt + 1 == attempts:
                raise
            continue
        try:
            yield node
        finally:
            _stop_worker(node)
        return


def _start_worker(cluster: LocalCluster, num_cpus: int) -> WorkerNode:
    marker = uuid.uuid4().hex
    env = {**cluster.env, MARKER: marker}
    args = [
        str(VENV_BIN / "ray"), "start", "--block", f"--address={cluster.gcs_address}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--object-store-memory={256 * 1024 * 1024}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = cluster.log.parent / f"worker-{marker[:8]}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
    return WorkerNode(proc, marker, log)


def _stop_worker(node: WorkerNode) -> None:
    node.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.proc.wait(timeout=10)
