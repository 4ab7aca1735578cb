"""Submit a command to a Ray cluster through the Jobs API and follow it to the end.

The caller says what the cluster runs (the CLI sends `python -m pipeline.cli <command...>`, run by
the cluster's own Python: the image or venv the cluster was started from, never this machine's
`sys.executable`). Everything that can be checked before talking to the cluster (address, runtime
env, auth token) is checked here first, so mistakes cost no round trip.

Token auth (Ray >= 2.52, on by default for new local clusters from 2.59): the dashboard answers
401 without an `Authorization: Bearer <token>` header and 403 with a wrong one. Ray's own client
only sends the token when *this* process runs with RAY_AUTH_MODE=token, and that mode is read once
into Ray's C++ config, so we look the token up ourselves (same places, same order as Ray) and pass
the header explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import os
import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipeline.paths import is_uri

DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_ADDRESS = f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}"
# Ports that name other Ray services, never the dashboard: a GCS address (what `ray start` prints,
# what RAY_ADDRESS often holds) and the Ray Client server. Their head serves the dashboard on 8265.
_NON_DASHBOARD_PORTS = {6379, 10001}

# Exit codes of `submit`: the job's own outcome, or that it never got to run.
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_NOT_SUBMITTED = 2
EXIT_INTERRUPTED = 130

AUTH_HINT = (
    "set RAY_AUTH_TOKEN to the cluster's token, or copy ~/.ray/auth_token from the head node "
    "(`ray get-auth-token` there prints it)"
)


class SubmitError(RuntimeError):
    """A submission that cannot go ahead; the message is one line that says what to do."""


def resolve_address(address: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The dashboard (Jobs API) URL from `address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS.

    http(s)://host[:port] is used as given; ray://host[:port] and bare host:6379 (GCS) name the
    same head, whose dashboard listens on 8265; bare host:port is taken as the dashboard, as
    `ray job submit --address` does; "auto" is the local head's dashboard.
    """
    env = os.environ if env is None else env
    raw = (address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or "").strip()
    if not raw:
        raise SubmitError(
            "no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
            "(for a local `ray start --head`, use http://127.0.0.1:8265)"
        )
    if raw == "local":
        raise SubmitError(
            "RAY_ADDRESS=local means an embedded Ray, which has no Jobs API to submit to; "
            "run `splinter mine|extract` directly, or point --address at a cluster's dashboard"
        )
    if raw == "auto":
        return DEFAULT_ADDRESS
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "", raw
    scheme = scheme.lower()
    if scheme not in {"", "http", "https", "ray"}:
        raise SubmitError(f"cannot submit to {raw!r}: use an http(s):// dashboard URL or ray://host")
    parts = urlsplit(f"//{rest}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as err:  # a non-numeric or out-of-range port
        raise SubmitError(f"bad Ray address {raw!r}: {err}") from None
    if not host:
        raise SubmitError(f"bad Ray address {raw!r}: no host")
    if scheme in {"http", "https"}:
        return raw.rstrip("/")
    if scheme == "ray" or port is None or port in _NON_DASHBOARD_PORTS:
        port = DEFAULT_DASHBOARD_PORT
    host = f"[{host}]" if ":" in host else host  # IPv6 literals need their brackets back
    return f"http://{host}:{port}"


def build_entrypoint(command: list[str]) -> str:
    """The shell command the cluster runs, from its argv, safely quoted.

    The job supervisor runs the entrypoint through a shell, so every argument is quoted (paths
    with spaces, globs, `$` survive).
    """
    if not command:
        raise SubmitError("nothing to submit: give the command the cluster should run")
    if not all(isinstance(arg, str) for arg in command):
        raise SubmitError(f"command arguments must be strings, got {command!r}")
    return shlex.join(command)


def load_runtime_env(
    path: str | os.PathLike[str] | None = None, working_dir: str | None = None
) -> dict | None:
    """Read a runtime env from a YAML or JSON file, validate it, and merge `working_dir` into it.

    `working_dir` (the --working-dir flag) wins over the file's own. Local paths are checked
    here, because Ray would otherwise fail only after contacting the cluster.
    """
    runtime_env: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise SubmitError(f"runtime env file {str(file)!r} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text())  # JSON is valid YAML
        except yaml.YAMLError as err:
            raise SubmitError(f"runtime env file {str(file)!r} is not valid YAML/JSON: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SubmitError(
                f"runtime env file {str(file)!r} must hold a mapping such as "
                f"`env_vars: {{KEY: value}}`, got {type(loaded).__name__}"
            )
        runtime_env = loaded
    if working_dir is not None:
        runtime_env["working_dir"] = working_dir
    if not runtime_env:
        return None
    return validate_runtime_env(runtime_env)


def validate_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Check keys against the installed Ray's runtime-env fields and the value types we can check."""
    from ray.runtime_env import RuntimeEnv

    known = set(RuntimeEnv.known_fields)
    for key in runtime_env:
        if key not in known:
            public = sorted(k for k in known if not k.startswith("_"))
            near = difflib.get_close_matches(str(key), public, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SubmitError(f"unknown runtime env key {key!r}{hint}; known keys: {', '.join(public)}")
    env_vars = runtime_env.get("env_vars")
    if env_vars is not None:
        if not isinstance(env_vars, dict):
            raise SubmitError(f"runtime env `env_vars` must be a mapping, got {type(env_vars).__name__}")
        for key, value in env_vars.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise SubmitError(
                    f"runtime env `env_vars` needs string keys and values; quote {key}: {value!r} in the file"
                )
    working_dir = runtime_env.get("working_dir")
    if working_dir is not None:
        if not isinstance(working_dir, str):
            raise SubmitError(f"`working_dir` must be a path or URI, got {working_dir!r}")
        if not is_uri(working_dir) and not Path(working_dir).is_dir():
            raise SubmitError(f"working_dir {working_dir!r} is not a directory")
    try:
        RuntimeEnv(**runtime_env)  # Ray's own checks: pip/conda/uv conflicts, field types
    except (TypeError, ValueError) as err:
        raise SubmitError(f"invalid runtime env: {err}") from None
    return runtime_env


def find_auth_token(env: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """The cluster token, looked up where Ray's own loader looks, in the same order.

    RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.
    RAY_AUTH_MODE=disabled means the user wants no token sent.
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        path = Path(token_path).expanduser()
        if not path.is_file():
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={token_path} does not exist; {AUTH_HINT}")
        return path.read_text().strip() or None
    path = (home if home is not None else Path.home()) / ".ray" / "auth_token"
    if path.is_file():
        return path.read_text().strip() or None
    return None


def auth_error_message(address: str, status: int | None, token: str | None) -> str:
    """One line for a refused request: which way it was refused and how to fix it."""
    if status == 401 or token is None:
        what = f"the Ray cluster at {address} requires a token and none was found"
    else:
        what = f"the Ray cluster at {address} rejected the auth token (wrong token for this cluster)"
    return f"{what}: {AUTH_HINT}"


def submit(
    command: list[str],
    *,
    address: str | None = None,
    working_dir: str | None = None,
    runtime_env: str | None = None,
    wait: bool = True,
    submission_id: str | None = None,
    entrypoint_num_gpus: float = 0,
    log: Callable[[str], Any] = print,
) -> int:
    """Submit `command` (an argv, e.g. `["python", "-m", "pipeline.cli", "mine", ...]`) as a Ray job
    via the Jobs API; stream logs; return the exit code.

    Returns 0 when the job SUCCEEDED (or, without `wait`, once it is accepted), 1 when it FAILED
    or was STOPPED, 2 when it could not be submitted (bad address/runtime env/command, missing or
    wrong token, unreachable cluster), 130 when interrupted while following (the job goes on).
    """
    try:
        url = resolve_address(address)
        entrypoint = build_entrypoint(command)
        env = load_runtime_env(runtime_env, working_dir)
        if entrypoint_num_gpus < 0:
            raise SubmitError(f"entrypoint_num_gpus must be >= 0, got {entrypoint_num_gpus}")
        token = find_auth_token()
        client = _connect(url, token)
        job_id = _submit_job(client, url, token, entrypoint, env, submission_id, entrypoint_num_gpus)
    except SubmitError as err:
        log(f"error: {err}")
        return EXIT_NOT_SUBMITTED
    log(f"submitted {job_id} to {url}: {entrypoint}")
    if not wait:
        log(f"not waiting; follow with `ray job logs --follow --address {url} {job_id}`")
        return EXIT_SUCCEEDED
    try:
        status = _follow(client, job_id, log)
    except KeyboardInterrupt:
        log(f"stopped following; {job_id} keeps running (`ray job stop --address {url} {job_id}` ends it)")
        return EXIT_INTERRUPTED
    info = client.get_job_info(job_id)
    detail = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    log(f"job {job_id} {status}{detail}")
    return EXIT_SUCCEEDED if status == "SUCCEEDED" else EXIT_FAILED


def _connect(url: str, token: str | None) -> Any:
    """A JobSubmissionClient with the token header; its constructor already calls the cluster."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's client adds its own header only when this process runs in token mode, and never
    # overrides one we pass, so passing ours works whatever RAY_AUTH_MODE says here.
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its `address` argument, and
        # reads a bare RAY_ADDRESS as a GCS address to dial over gRPC: pin it to the URL we resolved.
        with _environ(RAY_API_SERVER_ADDRESS=url):
            return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as err:
        raise SubmitError(auth_error_message(url, _status_of(err), token)) from None
    except ConnectionError:
        raise SubmitError(
            f"cannot reach the Ray dashboard at {url}: is the cluster up and the port reachable "
            "(e.g. `kubectl port-forward svc/<cluster>-head-svc 8265`)?"
        ) from None
    except RuntimeError as err:
        raise SubmitError(f"the Ray dashboard at {url} refused the connection check: {err}") from None


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _submit_job(
    client: Any,
    url: str,
    token: str | None,
    entrypoint: str,
    runtime_env: dict | None,
    submission_id: str | None,
    entrypoint_num_gpus: float,
) -> str:
    from ray.exceptions import AuthenticationError

    try:
        return client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=submission_id,
            entrypoint_num_gpus=entrypoint_num_gpus or None,
        )
    except AuthenticationError as err:
        raise SubmitError(auth_error_message(url, _status_of(err), token)) from None
    except RuntimeError as err:
        # e.g. a reused submission id, or a working_dir upload that the cluster refused.
        raise SubmitError(f"the cluster at {url} refused the job: {err}") from None


def _status_of(err: Exception) -> int | None:
    """Ray folds the HTTP status into the message ("Authentication required" is its 401 text)."""
    text = str(err)
    if text.startswith("Authentication required"):
        return 401
    if text.startswith("Authentication failed"):
        return 403
    return None


def _follow(client: Any, job_id: str, log: Callable[[str], Any]) -> str:
    """Stream the job's logs until it ends, then return its terminal status."""
    lines = _Lines(log)
    try:
        asyncio.run(_tail(client, job_id, lines))
    except Exception as err:  # the websocket is a convenience (proxies may block it); polling is the truth
        log(f"(log stream interrupted: {err}; polling instead)")
        _poll_logs(client, job_id, lines)
    lines.flush()
    # The stream closes when the driver exits; the status may lag it by a moment.
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(0.5)
    return str(status)


class _Lines:
    """Turns log text arriving in arbitrary chunks into whole lines, and counts what it has seen."""

    def __init__(self, log: Callable[[str], Any]) -> None:
        self.log, self.pending, self.seen = log, "", 0

    def feed(self, text: str) -> None:
        self.seen += len(text)
        *whole, self.pending = (self.pending + text).split("\n")
        for line in whole:
            self.log(line)

    def flush(self) -> None:
        if self.pending:
            self.log(self.pending)
            self.pending = ""


async def _tail(client: Any, job_id: str, lines: _Lines) -> None:
    async for chunk in client.tail_job_logs(job_id):
        lines.feed(chunk)


def _poll_logs(client: Any, job_id: str, lines: _Lines, every_s: float = 1.0) -> None:
    """Fallback when the websocket fails (some proxies block it): fetch the log, show what is new."""
    while True:
        done = client.get_job_status(job_id).is_terminal()
        text = client.get_job_logs(job_id)
        lines.feed(text[lines.seen :])  # resumes where the stream stopped: nothing shown twice
        if done:
            return
        time.sleep(every_s)
