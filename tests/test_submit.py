"""pipeline.submit without a cluster: address resolution, entrypoints, runtime envs, tokens, refusals.

Submissions to a real cluster (jobs that run, fail, or are refused for their token) are in
tests/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.submit import (
    AUTH_HINT,
    EXIT_NOT_SUBMITTED,
    SubmitError,
    auth_error_message,
    build_entrypoint,
    find_auth_token,
    load_runtime_env,
    resolve_address,
    submit,
)

ROOT = Path(__file__).resolve().parent.parent
# The environment running the tests (its `python`, `splinter` and `ray` executables).
VENV_BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------------- address
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://10.0.0.5:8265", "http://10.0.0.5:8265"),
        ("http://10.0.0.5:8265/", "http://10.0.0.5:8265"),
        ("https://ray.example.com", "https://ray.example.com"),
        ("https://ray.example.com/proxy/ray/", "https://ray.example.com/proxy/ray"),
        # Ray Client and GCS addresses name the head; its dashboard is on 8265.
        ("ray://head.svc:10001", "http://head.svc:8265"),
        ("ray://head.svc", "http://head.svc:8265"),
        ("10.0.0.5:6379", "http://10.0.0.5:8265"),
        ("10.0.0.5:10001", "http://10.0.0.5:8265"),
        # A bare host:port is the dashboard itself, as for `ray job submit --address`.
        ("127.0.0.1:8266", "http://127.0.0.1:8266"),
        ("head.svc", "http://head.svc:8265"),
        ("[::1]:6379", "http://[::1]:8265"),
        ("auto", "http://127.0.0.1:8265"),
        ("  http://h:1  ", "http://h:1"),
    ],
)
def test_resolve_address(given: str, expected: str) -> None:
    assert resolve_address(given, env={}) == expected


def test_address_precedence() -> None:
    env = {"RAY_ADDRESS": "ray://from-env:10001"}
    assert resolve_address(None, env=env) == "http://from-env:8265"
    assert resolve_address("http://flag:8265", env=env) == "http://flag:8265"
    # Ray's own name for the Jobs API address, as `ray start` prints it, beats RAY_ADDRESS.
    env["RAY_API_SERVER_ADDRESS"] = "http://api:8265"
    assert resolve_address(None, env=env) == "http://api:8265"
    assert resolve_address("http://flag:8265", env=env) == "http://flag:8265"


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (None, "RAY_ADDRESS"),
        ("", "--address"),
        ("local", "embedded Ray"),
        ("ftp://host:21", "http(s)://"),
        ("host:notaport", "bad Ray address"),
        ("http://", "no host"),
    ],
)
def test_resolve_address_refuses(given: str | None, says: str) -> None:
    with pytest.raises(SubmitError) as err:
        resolve_address(given, env={})
    assert says in str(err.value)


# -------------------------------------------------------------------------------------- entrypoint
CLI = ["python", "-m", "pipeline.cli"]


def test_entrypoint_is_quoted() -> None:
    command = [*CLI, "mine", "my corpus/part 1.jsonl", "out;rm -rf ~", "--seed", "$HOME", "it's"]
    entrypoint = build_entrypoint(command)
    assert entrypoint.startswith("python -m pipeline.cli mine ")
    # The job supervisor runs it through a shell: it must come back as exactly these arguments.
    assert shlex.split(entrypoint) == command


def test_entrypoint_runs_in_a_real_shell(tmp_path: Path) -> None:
    """The built string, run by a shell as Ray's job supervisor runs it (not from the checkout), reaches our CLI."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        build_entrypoint([*CLI, "mine", "--help"]),
        shell=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "mine" in result.stdout


def test_cli_rejects_unknown_command_with_suggestion() -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["submit", "--", "mien", "in.jsonl", "out"])
    assert result.exit_code == 2 and "did you mean 'mine'" in result.output
    result = CliRunner().invoke(app, ["submit"])
    assert result.exit_code == 2 and "give the command to run after `--`" in result.output


def test_entrypoint_rejects_nothing() -> None:
    with pytest.raises(SubmitError, match="nothing to submit"):
        build_entrypoint([])


# ------------------------------------------------------------------------------------- runtime env
def test_project_runtime_env_is_valid() -> None:
    env = load_runtime_env(ROOT / "infra" / "runtime_env.yaml")
    assert env is not None and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def test_runtime_env_json_and_working_dir_merge(tmp_path: Path) -> None:
    file = tmp_path / "env.json"
    file.write_text(json.dumps({"env_vars": {"A": "1"}, "working_dir": "s3://bucket/code.zip"}))
    env = load_runtime_env(file, working_dir=str(tmp_path))
    # The flag wins over the file's own working_dir.
    assert env == {"env_vars": {"A": "1"}, "working_dir": str(tmp_path)}
    assert load_runtime_env(None, working_dir=str(tmp_path)) == {"working_dir": str(tmp_path)}
    assert load_runtime_env(None, None) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("- env_vars\n- pip\n", "must hold a mapping"),
        ("just a string\n", "must hold a mapping"),
        ("env_var:\n  A: '1'\n", "did you mean 'env_vars'"),
        ("env_vars:\n  THREADS: 4\n", "quote THREADS"),
        ("env_vars: [A, B]\n", "must be a mapping"),
        ("pip: [numpy]\nconda: base\n", "cannot be specified at the same time"),
        ("working_dir: /definitely/not/here\n", "is not a directory"),
        ("env_vars: {A: '1'\n", "not valid YAML"),
    ],
)
def test_runtime_env_refuses(tmp_path: Path, text: str, says: str) -> None:
    file = tmp_path / "env.yaml"
    file.write_text(text)
    with pytest.raises(SubmitError) as err:
        load_runtime_env(file)
    assert says in str(err.value)


def test_runtime_env_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SubmitError, match="does not exist"):
        load_runtime_env(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------- token
def test_token_lookup_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    token_file = tmp_path / "token"
    token_file.write_text("  from-path  \n")
    assert find_auth_token({}, home=home) == "from-home"
    assert find_auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home=home) == "from-path"
    both = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert find_auth_token(both, home=home) == "from-env"
    assert find_auth_token({**both, "RAY_AUTH_MODE": "disabled"}, home=home) is None
    assert find_auth_token({}, home=tmp_path / "empty-home") is None


def test_token_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)


def test_auth_messages_say_what_to_do() -> None:
    missing = auth_error_message("http://h:8265", 401, None)
    wrong = auth_error_message("http://h:8265", 403, "abc")
    assert "none was found" in missing and "rejected" in wrong
    for message in (missing, wrong):
        assert "\n" not in message and AUTH_HINT in message and "RAY_AUTH_TOKEN" in message


def test_log_chunks_become_whole_lines() -> None:
    from pipeline.submit import _Lines

    got: list[str] = []
    lines = _Lines(got.append)
    for chunk in ("a\nb", "c\n", "", "d\n\ne"):
        lines.feed(chunk)
    assert got == ["a", "bc", "d", ""] and lines.seen == 9
    lines.flush()
    assert got[-1] == "e"


# ----------------------------------------------------------------------------- refusals, no cluster
def test_submit_to_nothing_listening_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real HTTP to a port nobody listens on: exit 2 and one line naming the address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HOME", str(tmp_path))
    lines: list[str] = []
    code = submit([*CLI, "mine", "in.jsonl", "out"], address=f"127.0.0.1:{port}", log=lines.append)
    assert code == EXIT_NOT_SUBMITTED
    assert len(lines) == 1 and f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in lines[0]


def test_submit_checks_everything_before_contacting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "env.yaml"
    bad.write_text("envvars: {}\n")
    lines: list[str] = []
    # No cluster at this address: a bad runtime env must be reported first, without a connection.
    code = submit([*CLI, "mine", "a", "b"], address="http://127.0.0.1:9", runtime_env=str(bad), log=lines.append)
    assert (
        code == EXIT_NOT_SUBMITTED and lines == [lines[0]] and "unknown runtime env key 'envvars'" in lines[0]
    )
    lines.clear()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit([*CLI, "mine", "a", "b"], log=lines.append) == EXIT_NOT_SUBMITTED
    assert len(lines) == 1 and "no Ray cluster address" in lines[0]
