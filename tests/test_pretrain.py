"""`splinter pretrain` on Ray Train: real mined Wikipedia text, a tiny model, 2 CPU workers (DDP).

One run is started as a real `splinter pretrain` process with its own embedded Ray and stopped with
SIGTERM (what Kubernetes and Slurm send) once a checkpoint is registered: the workers finish their step,
checkpoint it, and the driver exits 143 in one line, leaving no process behind. The same command is then
rerun (here, on the test session's Ray): it resumes from that checkpoint, says so in the log, finishes with
the requested total steps, the loss falls, and the final model loads in transformers with outputs equal
to ours. (A driver killed outright resumes the same way: tests/test_node_loss.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from cluster_fixture import MARKER, _pids_with_marker
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.corpus.mining import run_mine
from pipeline.report.page import write_report
from pipeline.settings import MineConfig, PretrainConfig
from pipeline.training.pretraining import run_pretrain
from splinter.checkpoint import load_pretrained
from splinter.collate import collate_pretraining
from splinter.config import SplinterConfig
from splinter.model import SplinterForPreTraining
from tests.conftest import ROOT
from tests.hf_oracle import load_hf_model
from tests.numerics import assert_close
from tests.pretrain_data import mined_rows, write_mined_leads

STEPS, EVERY = 40, 10


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    """~600 mined sequences of 128 tokens from 700 real Wikipedia leads (no Ray: the local engine)."""
    root = tmp_path_factory.mktemp("mined")
    docs = write_mined_leads(root / "docs.jsonl", 700)
    stats = run_mine(MineConfig(input=[str(docs)], output=str(root / "out"), local=True, max_seq_length=128))
    assert stats["sequences"] > STEPS * 8 // 2  # one epoch covers most of the run
    return root / "out"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny model config over the bundled cased vocabulary the data was mined with."""
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(SplinterConfig.tiny(vocab_size=28996, max_position_embeddings=128).to_json_string())
    return path


def _args(mined: Path, out: Path, tiny: Path) -> list[str]:
    return [
        "pretrain", str(mined), str(out), "--model-config", str(tiny), "--num-workers", "2", "--max-steps", str(STEPS),
        "--batch-size", "8", "--checkpoint-every", str(EVERY), "--learning-rate", "3e-3", "--warmup-steps", "5",
        "--seed", "1",
    ]  # fmt: skip


def _log(out: Path) -> list[dict]:
    path = out / "trainer_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _registered_step(out: Path) -> int:
    """The newest checkpoint Ray Train has registered (what a rerun resumes from), 0 if none."""
    path = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        snapshot = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("step", 0))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the run (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigterm_checkpoints_the_step_reached_and_the_rerun_finishes(mined, tiny, tmp_path, ray_session):
    out = tmp_path / "run"
    marker = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), MARKER: marker}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *_args(mined, out, tiny), "--num-cpus", "2", "-q"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while _registered_step(out) < EVERY:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 143 and len(lines) == 1, err
    stopped_at = int(re.fullmatch(rf"stopped by SIGTERM; (\d+) of {STEPS} steps done, checkpoint at step \1; "
                                  "rerun the same command to continue", lines[0]).group(1))
    assert EVERY <= stopped_at < STEPS and _registered_step(out) == stopped_at  # the step reached, checkpointed
    assert [r for r in _log(out) if r.get("event") == "stopped"][0]["step"] == stopped_at
    deadline = time.monotonic() + 30
    while _pids_with_marker(marker):  # the run's raylet, GCS and workers went with it
        assert time.monotonic() < deadline, f"left running: {_pids_with_marker(marker)}"
        time.sleep(0.2)
    assert not (out / "__splinter__" / "_SUCCESS").exists() and not (out / "final").exists()
    # The stopped run's report: what its log holds so far, marked partial.
    stopped = CliRunner().invoke(app, ["report", str(out)])
    assert stopped.exit_code == 0, stopped.output
    page = (out / "report.html").read_text()
    logged = re.search(rf"(\d+) of {STEPS} steps logged", page)  # workers may log a step more as they die
    assert 'id="status">partial<' in page and logged and int(logged.group(1)) == stopped_at

    # The same command again (on this session's Ray): it continues from the registered checkpoint.
    cfg = PretrainConfig(
        mined=str(mined), output=str(out), model_config=str(tiny), num_workers=2, max_steps=STEPS, batch_size=8,
        checkpoint_every=EVERY, learning_rate=3e-3, warmup_steps=5, seed=1,
    )  # fmt: skip
    summary = run_pretrain(cfg)
    log = _log(out)
    (resume,) = [r for r in log if r.get("event") == "resume"]
    assert resume["step"] == stopped_at
    assert resume["checkpoint"].endswith(f"step-{resume['step']:08d}")
    after = log[log.index(resume) + 1 :]
    assert [r["step"] for r in after if "loss" in r] == list(range(resume["step"] + 1, STEPS + 1))
    assert summary["steps"] == STEPS and summary["resumes"] == 1
    assert (out / "__splinter__" / "_SUCCESS").is_file()
    stats = json.loads((out / "__splinter__" / "stats.json").read_text())
    assert stats["steps"] == STEPS and stats["tokens"] > STEPS * 8 * 40 and stats["final_loss"] > 0
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["hparams"]["batch_size"] == 8
    # The schedule continued: warmup then a straight decay to 0 at STEPS, whatever the restart.
    lr = {r["step"]: r["lr"] for r in log if "loss" in r}
    assert lr[1] == 0.0 and lr[5] == pytest.approx(2.4e-3) and lr[STEPS] == pytest.approx(3e-3 / (STEPS - 5))
    # The report marks the resume and shows the run's own numbers; TensorBoard's reader has the loss of
    # every step once: the steps re-run after the resume replace the killed run's.
    page = Path(write_report(str(out))).read_text()
    assert 'id="status">complete<' in page and 'id="chart-loss"' in page and ">resumed<" in page
    assert f"<tr><td>{resume['step']}</td><td>{resume['epoch']}</td>" in page
    assert f'data-key="tokens"><div class="label">tokens</div><div class="value">{stats["tokens"]:,}<' in page
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(tb) == list(range(1, STEPS + 1))
    assert all(tb[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in after if "loss" in r)
    assert sorted(e.step for e in events.Scalars("train/grad_norm")) == list(range(1, STEPS + 1))

    # Ray Train keeps the newest two checkpoints only: of every EVERY steps and the stop's own (which is
    # among them when the stop came after step STEPS - EVERY: on a fast machine the run gets that far).
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    written = sorted({*range(EVERY, STEPS + 1, EVERY), stopped_at})
    assert kept == [f"step-{step:08d}" for step in written[-2:]]

    # The loss falls: the last steps against the first ones (every step's last record counts).
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    first = sum(losses[s] for s in range(1, 9)) / 8
    last = sum(losses[s] for s in range(STEPS - 7, STEPS + 1)) / 8
    assert last < first - 0.3, (first, last)
    assert all(r["tokens_per_s"] > 0 and r["questions"] > 0 for r in log if "loss" in r)

    # The final model is an ordinary checkpoint: transformers loads it and agrees with ours.
    rows = mined_rows("collapsed", count=4, max_seq_length=128, start=300)
    batch = collate_pretraining(rows)
    ours = load_pretrained(SplinterForPreTraining, out / "final")
    hf = load_hf_model("pretraining", out / "final")
    with torch.no_grad():
        a, b = ours(**batch), hf(**batch)
    assert_close(a.start_logits, b.start_logits, tol=1e-5)
    assert_close(a.end_logits, b.end_logits, tol=1e-5)
    assert_close(a.loss, b.loss, tol=1e-5)

    # A third run of the same command has nothing to do; other settings are refused in one line.
    again = CliRunner().invoke(app, _args(mined, out, tiny))
    assert again.exit_code == 0 and "already complete" in again.output
    other = CliRunner().invoke(app, [*_args(mined, out, tiny)[:-2], "--seed", "2"])
    assert other.exit_code == 2 and "other settings (seed: 1 there, 2 now)" in other.output
