"""The runner: exactly-once shard commits, accounting, resume, and Ray == local."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_stages import StampedModel, StampedSlices, Upper, WordRows

from pipeline.engine.runner import run
from pipeline.engine.spec import JobSpec, StageSpec
from pipeline.storage.rundir import OutputExistsError, is_complete
from pipeline.storage.sources import ReadOptions, expand_inputs, plan_shards

SCHEMA = pa.schema([("doc_id", pa.string()), ("word", pa.string()), ("upper", pa.string())])


def _corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    lines = [json.dumps({"id": f"d{i}", "text": " ".join(f"w{i}_{j}" for j in range(i % 4))}) for i in range(40)]
    lines.insert(7, "{not json")
    lines.insert(13, json.dumps([1, 2]))
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    (d / "b.jsonl").write_text("")  # an empty file is an empty shard, not a hang
    (d / "c.jsonl").write_text(json.dumps({"id": "c0", "text": "alpha beta"}) + "\n" + json.dumps({"id": "c1"}) + "\n")
    return d


def _spec(stage_kwargs: dict | None = None) -> JobSpec:
    return JobSpec(name="words", read=ReadOptions(kind="documents"),
                   stages=[StageSpec(WordRows, stage_kwargs or {}), StageSpec(Upper)],
                   schema=SCHEMA, reason_column="skip_reason", drop_reason_rows=True,
                   config={"v": 1}, write_batch_size=5)


def _shards(corpus: Path):
    return plan_shards(expand_inputs([str(corpus)]), "auto", shard_rows=10, shard_bytes=1024)


def _read(out: Path) -> pa.Table:
    files = sorted(out.glob("shard-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_local_run_accounts_for_every_row(tmp_path):
    corpus = _corpus(tmp_path)
    shards = _shards(corpus)
    assert len(shards) >= 3  # a.jsonl spans several byte-range shards
    stats = run(_spec(), shards, str(tmp_path / "out"), engine="local")
    table = _read(tmp_path / "out")
    # 40 docs with i%4 words each, plus c0's two words.
    assert table.num_rows == sum(i % 4 for i in range(40)) + 2
    assert stats["rows_in"] == 40 + 2 + 2  # + invalid json + non-object line
    assert stats["skipped"] == {"empty": 10, "invalid_json": 1, "not_an_object": 1, "missing_text_column": 1}
    assert stats["rows_out"] == table.num_rows
    kept_docs = len(set(table["doc_id"].to_pylist()))
    assert kept_docs + sum(stats["skipped"].values()) == stats["rows_in"]
    assert table["upper"].to_pylist() == [w.upper() for w in table["word"].to_pylist()]
    assert is_complete(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "__splinter__" / "staging").exists()


def test_ray_equals_local(tmp_path, ray_session):
    corpus = _corpus(tmp_path)
    run(_spec(), _shards(corpus), str(tmp_path / "local"), engine="local")
    stats = run(_spec(), _shards(corpus), str(tmp_path / "ray"), engine="ray")
    assert _read(tmp_path / "ray").equals(_read(tmp_path / "local"))
    assert sorted(p.name for p in (tmp_path / "ray").glob("shard-*")) == sorted(
        p.name for p in (tmp_path / "local").glob("shard-*"))
    assert stats["rows_in"] == 44


def test_a_shard_reaches_the_model_while_it_is_still_being_tokenized(tmp_path, ray_session):
    # One shard of 64 rows, slices of 4 taking 0.5 s each in the task stage in front of the model: the
    # model's first call must come long before the task's last slice (8 s in), not after the whole shard.
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"t{i}"}) + "\n"
                                               for i in range(64)))
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    spec = JobSpec(name="streamed", read=ReadOptions(kind="documents"),
                   stages=[StageSpec(StampedSlices, {"stamps": str(stamps), "seconds": 0.5}),
                           StageSpec(StampedModel, {"stamps": str(stamps)})],
                   schema=SCHEMA, reason_column="skip_reason", drop_reason_rows=True)
    shards = plan_shards(expand_inputs([str(tmp_path / "in.jsonl")]), "auto", shard_rows=1000, shard_bytes=1 << 20)
    assert len(shards) == 1
    stats = run(spec, shards, str(tmp_path / "out"), engine="ray")
    assert stats["rows_out"] == 64
    assert _read(tmp_path / "out")["upper"].to_pylist() == [f"T{i}" for i in range(64)]
    slices = sorted(float(t) for t in (stamps / "slices").read_text().split())
    calls = sorted(float(t) for t in (stamps / "calls").read_text().split())
    assert len(slices) == 16 and len(calls) >= 2
    assert calls[0] < slices[-1] - 2.0, (calls[0] - slices[0], slices[-1] - slices[0])


def test_existing_output_needs_resume_or_overwrite(tmp_path):
    corpus = _corpus(tmp_path)
    out = str(tmp_path / "out")
    run(_spec(), _shards(corpus), out, engine="local")
    with pytest.raises(OutputExistsError, match="--resume"):
        run(_spec(), _shards(corpus), out, engine="local")
    with pytest.raises(OutputExistsError, match="other settings"):
        run(dataclasses.replace(_spec(), config={"v": 2}), _shards(corpus), out, engine="local", resume=True)
    run(_spec(), _shards(corpus), out, engine="local", overwrite=True)


def test_crash_then_resume_gives_the_uninterrupted_output(tmp_path, ray_session):
    corpus = _corpus(tmp_path)
    shards = _shards(corpus)
    clean = tmp_path / "clean"
    run(_spec(), shards, str(clean), engine="local")

    out = tmp_path / "out"
    flag = tmp_path / "fail-now"
    flag.write_text("x")
    # d30's words sit in a later shard of a.jsonl: earlier shards commit, then the job dies.
    with pytest.raises(Exception, match="injected failure"):
        run(_spec({"fail_on": "w30_", "fail_flag": str(flag)}), shards, str(out), engine="ray")
    assert not is_complete(str(out))
    committed = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert len(committed) < len(shards)
    flag.unlink()
    stats = run(_spec({"fail_on": "w30_", "fail_flag": str(flag)}), shards, str(out), engine="ray", resume=True)
    assert stats["resumed_shards"] == len(committed)
    assert _read(out).equals(_read(clean))
    assert is_complete(str(out))
