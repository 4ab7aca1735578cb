"""One config story: every command takes --config FILE (YAML/TOML/JSON), flags override it, unknown keys are
named in one line, and pretrain's model shape has its own flag (--model-config)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.settings import ConfigError, FewshotJob, FinetuneJob, PretrainConfig, build_settings
from splinter.train import FinetuneConfig

COMMANDS = ("mine", "extract", "pretrain", "finetune", "fewshot")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_config(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--config" in result.output


def test_pretrain_model_shape_has_its_own_flag():
    result = CliRunner().invoke(app, ["pretrain", "--help"], terminal_width=200)
    assert "--model-config" in result.output


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "model_config: base\nmax_steps: 7\npreset: authors\nuse_gpu: true\n"),
    (".toml", 'model_config = "base"\nmax_steps = 7\npreset = "authors"\nuse_gpu = true\n'),
    (".json", '{"model_config": "base", "max_steps": 7, "preset": "authors", "use_gpu": true}'),
])
def test_pretrain_settings_from_file_flags_override(tmp_path, suffix, text):
    path = tmp_path / f"pretrain{suffix}"
    path.write_text(text)
    cfg = build_settings(PretrainConfig, path, {"mined": "m", "output": "o", "max_steps": 9, "use_gpu": False,
                                                "seed": None})
    assert isinstance(cfg, PretrainConfig)
    assert (cfg.model_config, cfg.preset, cfg.max_steps, cfg.use_gpu, cfg.seed) == ("base", "authors", 9, False, 0)


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "examples: 16\nlearning_rate: 0.0001\nlength_grouping: false\n"),
    (".toml", "examples = 16\nlearning_rate = 0.0001\nlength_grouping = false\n"),
])
def test_finetune_settings_are_flat_in_the_file(tmp_path, suffix, text):
    path = tmp_path / f"ft{suffix}"
    path.write_text(text)
    job = build_settings(FinetuneJob, path, {"train": "t", "output": "o", "model": "m", "batch_size": 4},
                         nested={"training": FinetuneConfig})
    assert job.examples == 16 and isinstance(job.training, FinetuneConfig)
    assert (job.training.learning_rate, job.training.length_grouping, job.training.batch_size) == (1e-4, False, 4)
    grid = build_settings(FewshotJob, path, {"train": "t", "dev": "d", "output": "o", "model": "m",
                                             "examples": [32]}, nested={"training": FinetuneConfig})
    assert grid.examples == [32] and grid.training.learning_rate == 1e-4


def test_finetune_checkpoint_every_from_file_and_flag(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("checkpoint_every: 10\nmax_steps: 30\n")
    job = build_settings(FinetuneJob, path, {"train": "t", "output": "o", "model": "m"}, nested={"training": FinetuneConfig})
    assert (job.checkpoint_every, job.training.max_steps) == (10, 30)
    assert build_settings(FinetuneJob, path, {"train": "t", "output": "o", "model": "m", "checkpoint_every": 0},
                          nested={"training": FinetuneConfig}).checkpoint_every == 0
    assert FinetuneJob(train="t", output="o", model="m").checkpoint_every == 50
    result = CliRunner().invoke(app, ["finetune", "--help"], terminal_width=200)
    assert "--checkpoint-every" in result.output


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 3\nlearnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learnig_rate'"):
        build_settings(PretrainConfig, path, {})


@pytest.mark.parametrize("command, args", [
    ("pretrain", ["mined", "out"]),
    ("finetune", ["train.json", "out"]),
    ("fewshot", ["train.json", "dev.json", "out"]),
    ("mine", ["in.jsonl", "out"]),
    ("extract", ["in.jsonl", "out"]),
])
def test_unknown_key_exits_2_in_one_line(tmp_path, command, args):
    path = tmp_path / "bad.toml"
    path.write_text("bogus_knob = 1\n")
    result = CliRunner().invoke(app, [command, *args, "--config", str(path)])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "bogus_knob" in lines[0]


def test_boolean_from_file_turned_off_by_flag(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("reinit_qass: true\noverwrite: true\n")
    job = build_settings(FinetuneJob, path, {"train": "t", "output": "o", "model": "m", "reinit_qass": False,
                                             "overwrite": False}, nested={"training": FinetuneConfig})
    assert job.training.reinit_qass is False and job.overwrite is False
