"""A real, token-protected `ray start --head` cluster for the cluster tests, and nothing else's.

Isolation from everything else on the machine:
- its own HOME (so Ray reads and writes no one's ~/.ray/auth_token) and its own token;
- its own --temp-dir and free ports (so it never meets the suite's embedded Ray or a colleague's);
- started from this venv, with the venv first on PATH, so a job's `python` is the project's Python;
- stopped by signalling the `ray start --block` process we started, never by `ray stop`: `ray stop`
  kills every Ray process on the machine by name, including the suite's own embedded Ray.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The environment running the tests (its `python`, `splinter` and `ray` executables).
VENV_BIN = Path(sys.executable).parent
MARKER = "SPLINTER_TEST_CLUSTER"  # every process of the cluster inherits it; teardown finds strays by it

# Variables that would point our cluster or its clients somewhere else.
_FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass
class LocalCluster:
    address: str  # the dashboard / Jobs API URL
    token: str
    home: Path  # HOME of the cluster (holds no token file: clients must be given the token)
    temp_dir: Path
    log: Path
    env: dict[str, str] = field(repr=False)  # environment the cluster runs in
    gcs_address: str = ""  # host:port a `ray start --address` worker node (or a driver) joins

    def client_env(self, *, token: str | None = None, address: str | None = None) -> dict[str, str]:
        """Environment for a client subprocess: a fresh HOME, RAY_ADDRESS set, and `token` if given."""
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN and k != MARKER}
        client_home = self.home.parent / "client-home"
        client_home.mkdir(exist_ok=True)
        env["HOME"] = str(client_home)
        env["RAY_ADDRESS"] = address or self.address
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        if token is not None:
            env["RAY_AUTH_TOKEN"] = token
        return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_status(url: str, token: str) -> int | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2, start_timeout_s: float = 90.0) -> Iterator[LocalCluster]:
    """Start the cluster, wait until its Jobs API answers, yield it, and always tear it down."""
    base = Path(tempfile.mkdtemp(prefix="splinter-cluster-"))
    # Ray's unix sockets live under --temp-dir and must stay under ~107 characters: keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    home = base / "home"
    home.mkdir()
    token = uuid.uuid4().hex
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env.update(
        HOME=str(home),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",  # with no token, `ray start` refuses to start rather than run open
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # A throwaway cluster: skip the up-to-30 s node drain that SIGTERM starts with.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        **{MARKER: marker},
    )
    dashboard_port = free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    gcs_port = free_port()
    args = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        f"--port={gcs_port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--ray-client-server-port={free_port()}",  # else 10001, shared with every other cluster
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={512 * 1024 * 1024}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = base / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    cluster = LocalCluster(address=address, token=token, home=home, temp_dir=temp_dir, log=log, env=env,
                           gcs_address=f"127.0.0.1:{gcs_port}")
    try:
        wait_until_up(proc, log, lambda: _http_status(f"{address}/api/version", token) == 200,
                      start_timeout_s, f"Ray dashboard at {address}")
        yield cluster
    finally:
        _stop(proc, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def wait_until_up(proc: subprocess.Popen, log: Path, ready: Callable[[], bool], timeout_s: float,
                  what: str) -> None:
    """Poll `ready` until it holds; fail with the log's tail if `ray start` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` for {what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not up after {timeout_s}s:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if pytest itself is killed (CI timeout), so no cluster outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM `ray start --block` (it stops its node's processes), then kill any stray of ours."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the session we created for it
            proc.wait(timeout=10)
    for pid in _pids_with_marker(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _pids_with_marker(marker: str) -> list[int]:
    """Processes whose environment carries this cluster's marker: only ever our own descendants."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids
