"""Where the model actors run and what they reserve: decided from the configuration, not a snapshot.

Pure decisions over a described cluster (`ClusterView`), so the GPU-cluster cases are checked here on
a CPU machine; tests/test_gpu.py runs the real thing on a GPU.
"""

from __future__ import annotations

import pytest
from conftest import DATA

from pipeline.corpus.extraction import ClusterView, extract_spec, plan_model
from pipeline.settings import ConfigError, ExtractConfig
from pipeline.stages.qa import QATokenize
from pipeline.stages.qa_model import QAModel
from pipeline.storage.model_files import ShippedModel, read_checkpoint

SQUAD = DATA / "squad_sample.json"
# A KubeRay cluster whose GPU group autoscales from 0: 8 CPUs on the head, GPU workers may add 4 GPUs.
AUTOSCALING_NO_GPU_YET = ClusterView(cpus=8, gpus=0, node_cpus=8, max_gpus=4, fixed=False)


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(input=[str(SQUAD)], output="out", model="m", **kw)


def test_device_cuda_asks_for_gpus_even_when_none_are_up_yet() -> None:
    plan = plan_model(_cfg(device="cuda"), AUTOSCALING_NO_GPU_YET)
    assert plan.device == "cuda"
    assert plan.resources.num_gpus == 1 and plan.resources.pool == (1, 4)  # grows as GPU workers join
    assert plan.resources.num_cpus == 1 and plan.num_threads == 1


def test_auto_uses_gpus_the_autoscaler_can_add() -> None:
    assert plan_model(_cfg(), AUTOSCALING_NO_GPU_YET).device == "cuda"
    # Without any sign of GPUs (none up, none in the autoscaling config) auto stays on CPU.
    cpu_only = ClusterView(cpus=8, gpus=0, node_cpus=8, max_gpus=0, fixed=False)
    assert plan_model(_cfg(), cpu_only).device == "cpu"


def test_fractional_gpus_and_default_pool_is_one_actor_per_gpu_share() -> None:
    two_gpus = ClusterView(cpus=16, gpus=2, node_cpus=8, max_gpus=2, fixed=False)
    plan = plan_model(_cfg(gpus_per_actor=0.5), two_gpus)
    assert plan.device == "cuda" and plan.resources.num_gpus == 0.5 and plan.resources.pool == (4, 4)
    assert plan_model(_cfg(device="cuda"), two_gpus).resources.pool == (2, 2)
    assert plan_model(_cfg(device="cuda", num_actors="1,3"), two_gpus).resources.pool == (1, 3)


def test_cpu_actor_threads_come_from_its_own_cpus_not_the_cluster() -> None:
    # 8 pods of 15 CPUs: one actor must not run 120 torch threads inside a 15-CPU pod.
    big = ClusterView(cpus=120, gpus=0, node_cpus=15, max_gpus=0, fixed=False)
    plan = plan_model(_cfg(device="cpu"), big)
    assert plan.resources.num_cpus == 14.5 and plan.num_threads == 15
    plan = plan_model(_cfg(device="cpu", num_actors=8), big)
    assert plan.resources.num_cpus == 14.5 and plan.resources.pool == (8, 8)
    plan = plan_model(_cfg(device="cpu", cpus_per_actor=4), big)
    assert plan.resources.num_cpus == 4 and plan.num_threads == 4
    # This 2-core machine: the actor's threads use both cores, half a CPU stays for the stream.
    laptop = ClusterView(cpus=2, gpus=0, node_cpus=2)
    plan = plan_model(_cfg(), laptop)
    assert (plan.device, plan.resources.num_cpus, plan.num_threads) == ("cpu", 1.5, 2)
    plan = plan_model(_cfg(num_actors=2), laptop)
    assert (plan.resources.num_cpus, plan.num_threads, plan.resources.pool) == (0.75, 1, (2, 2))


def test_impossible_or_contradictory_resources_fail_in_one_line() -> None:
    laptop = ClusterView(cpus=2, gpus=0, node_cpus=2)
    with pytest.raises(ConfigError, match="asks for GPUs but this machine has none"):
        plan_model(_cfg(device="cuda"), laptop)
    with pytest.raises(ConfigError, match="more GPUs per actor than this machine's 1"):
        plan_model(_cfg(gpus_per_actor=2), ClusterView(cpus=8, gpus=1, node_cpus=8))
    with pytest.raises(ConfigError, match="more than this machine's 2 CPUs"):
        plan_model(_cfg(cpus_per_actor=3), laptop)
    for bad in ("0", "3,1", "two", "1,2,3"):
        with pytest.raises(ConfigError, match="--num-actors"):
            _cfg(num_actors=bad).actor_pool()
    bad_configs = {
        "--gpus-per-actor must be": dict(gpus_per_actor=1.5),
        "contradicts --device cpu": dict(gpus_per_actor=1, device="cpu"),
        "for CPU actors": dict(quantize="int8", device="cuda"),
        "replaces --dtype": dict(quantize="int8", dtype="bfloat16"),
        "--quantize must be": dict(quantize="int4"),
    }
    for message, kw in bad_configs.items():
        with pytest.raises(ConfigError, match=message):
            _cfg(**kw)._validate_resources()
    assert _cfg(num_actors="2,5").actor_pool() == (2, 5) and _cfg(num_actors=3).actor_pool() == (3, 3)


def test_int8_keeps_auto_on_cpu() -> None:
    plan = plan_model(_cfg(quantize="int8"), AUTOSCALING_NO_GPU_YET)
    assert plan.device == "cpu" and "int8" in plan.note


def test_the_job_ships_model_and_tokenizer_workers_never_get_the_path(tiny_qa_model) -> None:
    cfg = ExtractConfig(input=[str(SQUAD)], output="out", model=str(tiny_qa_model), local=True)
    spec = extract_spec(cfg, ClusterView(cpus=2, gpus=0, node_cpus=2))
    tokenize, model, _ = spec.stages
    assert tokenize.cls is QATokenize and model.cls is QAModel
    assert isinstance(model.shared["model"], ShippedModel)
    assert tokenize.shared["tokenizer"] is model.shared["model"].tokenizer
    for stage in spec.stages:
        assert str(tiny_qa_model) not in repr(stage.kwargs), stage.cls.__name__
    assert model.kwargs["device"] == "cpu" and model.kwargs["num_threads"] == 2
    # Tokenizing never shares the actor's resources (Ray Data would fuse it into the actor).
    for cpus in (0.25, 0.5):
        small = extract_spec(ExtractConfig(input=[str(SQUAD)], output="out", model=str(tiny_qa_model),
                                           cpus_per_actor=cpus), ClusterView(cpus=2, gpus=0, node_cpus=2),
                             model=spec.stages[1].shared["model"])
        assert small.stages[0].res.num_cpus != small.stages[1].res.num_cpus


def test_model_read_through_a_uri_equals_the_local_read(tiny_qa_model, tmp_path) -> None:
    import numpy as np

    local = read_checkpoint(str(tiny_qa_model))
    via_uri = read_checkpoint(f"file://{tiny_qa_model}")  # through pyarrow's filesystem, like s3://
    assert via_uri.source.startswith("file://") and set(via_uri.tensors) == set(local.tensors)
    for name, array in local.tensors.items():
        np.testing.assert_array_equal(via_uri.tensors[name], array)
    assert via_uri.tokenizer.get_vocab() == local.tokenizer.get_vocab()
    with pytest.raises(ConfigError, match="--model file://.*no config.json"):
        read_checkpoint(f"file://{tmp_path}")
    with pytest.raises(ConfigError, match="--model .*directory not found"):
        read_checkpoint(str(tmp_path / "missing"))


def test_cli_refuses_bad_resource_flags_in_one_line(tiny_qa_model, tmp_path) -> None:
    import torch
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    base = ["extract", str(SQUAD), str(tmp_path / "out"), "--model", str(tiny_qa_model), "--local", "-q"]
    cases = [(["--num-actors", "3,1"], "--num-actors must be"), (["--quantize", "int4"], "--quantize must be"),
             (["--model", f"file://{tmp_path}"], "no config.json")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "asks for GPUs but this machine has none"))
    for flags, message in cases:
        result = runner.invoke(app, base + flags)
        assert result.exit_code == 2, (flags, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (flags, result.output)
    assert not (tmp_path / "out").exists()  # nothing written for a refused job
