"""`splinter finetune` end to end: data formats, seeded sampling, skip reasons, the output directory, and the
"untrained QASS head" warning of `splinter extract`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.corpus.extraction import format_extract_summary, run_extract
from pipeline.settings import ConfigError, ExtractConfig, FinetuneJob
from pipeline.training.finetuning import (
    format_finetune_summary,
    read_qa_dataset,
    run_finetune,
    sample_examples,
)
from splinter.bert import bert_to_splinter
from splinter.checkpoint import load_pretrained, qass_head_state, save_pretrained
from splinter.model import SplinterForQuestionAnswering, SplinterModel
from splinter.tokenizer import SplinterTokenizer
from splinter.train import FinetuneConfig
from tests.conftest import DATA, ROOT
from tests.numerics import assert_close

SQUAD_TRAIN = DATA / "squad_sample.json"
SHORT = ["--max-length", "128", "--stride", "32", "--threads", "1"]


@pytest.fixture(scope="module")
def squad():
    return read_qa_dataset(str(SQUAD_TRAIN))


def _bad_rows(good: dict) -> list[dict]:
    long_answer = " ".join(["word"] * 200)
    return [
        {**good, "id": "mismatch", "answers": {"text": ["not in the context"], "answer_start": [0]}},
        {**good, "id": "empty-context", "context": ""},
        {"id": "too-long", "question": "What?", "context": long_answer,
         "answers": {"text": [long_answer], "answer_start": [0]}},
    ]


def test_reads_squad_json_parquet_jsonl_and_save_to_disk(tmp_path, squad):
    import datasets

    assert len(squad) == 403 and set(squad.column_names) >= {"id", "question", "context", "answers"}
    first = squad[0]
    assert first["answers"]["text"] and isinstance(first["answers"]["answer_start"][0], int)
    squad.to_parquet(str(tmp_path / "train.parquet"))
    squad.to_json(str(tmp_path / "train.jsonl"))
    datasets.DatasetDict({"train": squad, "validation": squad.select(range(5))}).save_to_disk(str(tmp_path / "disk"))
    for path in ("train.parquet", "train.jsonl", "disk"):
        ds = read_qa_dataset(str(tmp_path / path))
        assert ds["id"] == squad["id"] and ds[17]["answers"] == squad[17]["answers"], path
    assert len(read_qa_dataset(str(tmp_path / "disk"), split="validation")) == 5

    (tmp_path / "no-answers.jsonl").write_text(json.dumps({"id": "1", "question": "q", "context": "c"}) + "\n")
    with pytest.raises(ConfigError, match=r"no-answers\.jsonl lacks column\(s\) answers"):
        read_qa_dataset(str(tmp_path / "no-answers.jsonl"))
    (tmp_path / "broken.json").write_text('{"data": [{"paragraphs": ')
    with pytest.raises(ConfigError, match=r"cannot read .*broken\.json"):
        read_qa_dataset(str(tmp_path / "broken.json"), "squad")
    with pytest.raises(ConfigError, match="not found"):
        read_qa_dataset(str(tmp_path / "missing.json"))


def test_sampling_is_seeded_nested_and_skips_bad_rows(squad):
    import datasets

    tok = SplinterTokenizer.default()
    cfg = FinetuneConfig(max_length=64, stride=16, max_query_length=32)
    rows = squad.select(range(40)).to_list()
    ds = datasets.Dataset.from_list(_bad_rows(rows[0]) + rows)
    big = sample_examples(ds, 30, 42, tok, cfg)
    assert [e.id for e in big.examples] == [e.id for e in sample_examples(ds, 30, 42, tok, cfg).examples]
    small = sample_examples(ds, 8, 42, tok, cfg)
    assert [e.id for e in small.examples] == [e.id for e in big.examples[:8]]  # K=8 is a prefix of K=30
    assert [e.id for e in sample_examples(ds, 8, 43, tok, cfg).examples] != [e.id for e in small.examples]
    assert len(big.examples) == 30 and big.considered == 30 + sum(big.skipped.values())
    everything = sample_examples(ds, 100, 42, tok, cfg)  # more than there are: every usable row, bad ones counted
    assert len(everything.examples) == 40 and everything.considered == 43
    assert dict(everything.skipped) == {"answer_mismatch": 1, "empty_context": 1, "answer_not_in_any_window": 1}


def test_finetune_cli_writes_a_checkpoint_ours_and_transformers_load(tmp_path, tiny_qa_model):
    transformers = pytest.importorskip("transformers")
    runner = CliRunner()
    out = tmp_path / "tuned"
    args = ["finetune", str(SQUAD_TRAIN), str(out), "--model", str(tiny_qa_model), "--examples", "8",
            "--sample-seed", "7", "--max-steps", "3", "--reinit-qass", "-q", *SHORT]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for line in ("examples used", "training windows", "padding waste", "steps", "final loss", str(out)):
        assert line in result.output
    training_args = json.loads((out / "training_args.json").read_text())
    assert training_args["status"] == "complete" and training_args["qass_head"] == "reinitialized"
    assert len(training_args["example_ids"]) == 8 and training_args["sample_seed"] == 7
    assert training_args["training"]["max_steps"] == 3 and training_args["training"]["learning_rate"] == 3e-5
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all({"loss", "lr", "examples_per_s", "tokens_per_s"} <= set(r) for r in log)
    assert qass_head_state(out) == "trained"

    ours = load_pretrained(SplinterForQuestionAnswering, out)
    hf = transformers.SplinterForQuestionAnswering.from_pretrained(str(out)).eval()
    tok = SplinterTokenizer.from_pretrained(out)
    batch = tok(["Who wrote it?"], ["It was written by Ori Ram in Tel Aviv."], return_tensors="pt")
    with torch.no_grad():
        assert_close(ours(**batch).start_logits, hf(**batch).start_logits)
    base = load_pretrained(SplinterForQuestionAnswering, tiny_qa_model)
    assert not torch.equal(base.qass.start_bilinear.weight, ours.qass.start_bilinear.weight)

    # The same command again: the run is complete, so its summary, not a second training.
    written = (out / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output == result.output, again.output
    assert (out / "model.safetensors").stat().st_mtime_ns == written
    assert not (out / "checkpoint").exists()
    other = runner.invoke(app, [*args, "--learning-rate", "1e-3"])
    assert other.exit_code == 2 and len(other.output.strip().splitlines()) == 1
    assert "learning_rate: 3e-05 there, 0.001 now" in other.output and "--overwrite" in other.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    foreign = runner.invoke(app, [*args[:2], str(tmp_path / "foreign"), *args[3:], "--overwrite"])
    assert foreign.exit_code == 2 and "not written by" in foreign.output
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def _steps(log_path) -> list[int]:
    if not log_path.is_file():
        return []
    return [json.loads(line)["step"] for line in log_path.read_text().splitlines() if line.endswith("}")]


def _tensorboard_steps(out) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return sorted(e.step for e in events.Scalars("loss"))


def _signal_at_step(args: list[str], out, signum: int, step: int) -> tuple[int, str]:
    """Run the real command in a child process and send it `signum` once its log reaches `step`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while max(_steps(out / "trainer_log.jsonl"), default=0) < step:
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.01)
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=120)
    return child.returncode, stderr


def test_a_stopped_or_killed_run_continues_to_the_uninterrupted_weights(tmp_path, tiny_qa_model):
    """SIGTERM mid-run stops the real command after its step with a checkpoint (one line, exit 143);
    SIGKILL leaves the last periodic checkpoint and log lines after it. Either way the same command then
    continues to the weights of an uninterrupted run, with each step once in the log and in TensorBoard."""
    def args(out) -> list[str]:
        return ["finetune", str(SQUAD_TRAIN), str(out), "--model", str(tiny_qa_model), "--examples", "8",
                "--max-steps", "8", "--checkpoint-every", "2", "--learning-rate", "1e-3", "-q", *SHORT]

    runner = CliRunner()
    whole = runner.invoke(app, args(tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "trainer_log.jsonl").read_text().splitlines()]

    stopped = tmp_path / "stopped"
    code, stderr = _signal_at_step(args(stopped), stopped, signal.SIGTERM, 3)
    lines = stderr.strip().splitlines()
    assert code == 143 and len(lines) == 1 and lines[0].startswith("stopped by SIGTERM"), stderr
    at = max(_steps(stopped / "trainer_log.jsonl"))
    assert 3 <= at < 8 and f"{at} of 8 steps done, checkpoint at step {at}; rerun the same command" in lines[0]
    assert (stopped / "checkpoint" / "trainer_state.pt").is_file() and not (stopped / "model.safetensors").exists()
    assert json.loads((stopped / "training_args.json").read_text())["status"] == "running"

    changed = runner.invoke(app, [*args(stopped), "--seed", "7"])
    assert changed.exit_code == 2 and len(changed.output.strip().splitlines()) == 1, changed.output
    assert "seed: 42 there, 7 now" in changed.output

    killed = tmp_path / "killed"
    code, _ = _signal_at_step(args(killed), killed, signal.SIGKILL, 3)
    assert code == -signal.SIGKILL and (killed / "checkpoint" / "trainer_state.pt").is_file()

    for out, checkpoints in ((stopped, {at}), (killed, {2, 4, 6})):
        resumed = runner.invoke(app, args(out))
        assert resumed.exit_code == 0, resumed.output
        assert _steps(out / "trainer_log.jsonl") == list(range(1, 9)) == _tensorboard_steps(out)
        assert [json.loads(x)["loss"] for x in (out / "trainer_log.jsonl").read_text().splitlines()] == losses
        training_args = json.loads((out / "training_args.json").read_text())
        assert training_args["status"] == "complete" and training_args["resumed_from_step"] in checkpoints
        assert not (out / "checkpoint").exists()
        ours = load_file(out / "model.safetensors")
        assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in expected)


def test_bad_rows_are_skipped_and_counted_in_the_summary(tmp_path, tiny_qa_model, squad):
    rows = squad.select(range(4)).to_list()
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + _bad_rows(rows[0])))
    job = FinetuneJob(train=str(path), output=str(tmp_path / "out"), model=str(tiny_qa_model), num_threads=1,
                      training=FinetuneConfig(max_steps=1, max_length=64, stride=16, max_query_length=32))
    stats = run_finetune(job)
    assert stats["examples_used"] == 4 and stats["steps"] == 1
    assert stats["skipped"] == {"answer_mismatch": 1, "empty_context": 1, "answer_not_in_any_window": 1}
    summary = format_finetune_summary(stats)
    assert "skipped: answer_mismatch" in summary and "skipped: answer_not_in_any_window" in summary
    bad = FinetuneJob(train=str(path), output=str(tmp_path / "out2"), model=str(tiny_qa_model),
                      training=FinetuneConfig(learning_rate=-1))
    with pytest.raises(ConfigError, match="--learning-rate must be > 0"):
        run_finetune(bad)


def test_extract_warns_once_when_the_qass_head_was_never_trained(tmp_path, tiny_qa_model):
    transformers = pytest.importorskip("transformers")
    tok = SplinterTokenizer.default()
    # A tiny BERT through `from-bert`: its head is marked untrained.
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                                          num_hidden_layers=1, num_attention_heads=4,
                                                          intermediate_size=37))
    bert.save_pretrained(str(tmp_path / "bert"))
    tok.save_pretrained(str(tmp_path / "bert"))
    fresh = bert_to_splinter(tmp_path / "bert", tmp_path / "fresh")
    assert qass_head_state(fresh) == "untrained"
    model = load_pretrained(SplinterForQuestionAnswering, tiny_qa_model)
    assert qass_head_state(tiny_qa_model) == "unknown"  # saved without a record, like a hub -qass checkpoint
    save_pretrained(model, tmp_path / "trained", tokenizer=tok, qass_state="trained")
    save_pretrained(load_pretrained(SplinterModel, tiny_qa_model), tmp_path / "headless", tokenizer=tok)
    assert qass_head_state(tmp_path / "headless") == "missing"

    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"id": "1", "question": "Who?", "context": "Ori Ram wrote Splinter."}) + "\n")

    def extract(model_dir) -> dict:
        return run_extract(ExtractConfig(input=[str(rows)], output=str(tmp_path / f"ans-{model_dir.name}"),
                                         model=str(model_dir), local=True))

    stats = extract(fresh)
    assert "untrained" in stats["warning"] and "splinter finetune" in stats["warning"]
    summary = format_extract_summary(stats).splitlines()
    assert summary[0].startswith("WARNING: ") and sum("WARNING" in line for line in summary) == 1
    assert "warning" not in extract(tmp_path / "trained")
