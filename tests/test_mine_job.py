"""The mining job end to end on real Wikipedia text: formats, determinism, bad input, training on it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from typer.testing import CliRunner

from pipeline.corpus.mining import run_mine
from pipeline.settings import ConfigError, MineConfig
from pipeline.storage.rundir import is_complete, read_stats

WIKI = ROOT / "data" / "wiki_sample.jsonl"


def _docs(n: int) -> list[dict]:
    with WIKI.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def _read(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("shard-*.parquet"))])


def _canonical(table: pa.Table) -> list[tuple]:
    rows = table.to_pylist()
    return sorted((r["doc_id"], r["seq_index"], tuple(r["input_ids"]), tuple(r["question_positions"]),
                   tuple(r["start_positions"]), tuple(r["end_positions"]), tuple(r["masked_spans"])) for r in rows)


def test_same_output_whatever_the_files_shards_and_workers(tmp_path, ray_session):
    docs = _docs(120)
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps(d) + "\n" for d in docs))
    split = tmp_path / "split"
    split.mkdir()
    (split / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:50]))
    pq.write_table(pa.Table.from_pylist(docs[50:]), split / "b.parquet", row_group_size=16)

    local = run_mine(MineConfig(input=[str(one)], output=str(tmp_path / "local"), local=True))
    ray_run = run_mine(MineConfig(input=[str(split)], output=str(tmp_path / "ray"), shard_rows=20,
                                  shard_bytes=20_000, num_workers=2, batch_size=7))
    assert ray_run["shards"] > 3
    assert _canonical(_read(tmp_path / "ray")) == _canonical(_read(tmp_path / "local"))
    assert local["rows_in"] == ray_run["rows_in"] == 120
    assert local["documents_used"] + sum(local.get("skipped", {}).values()) == 120
    assert local["sequences"] == _read(tmp_path / "local").num_rows > 100
    assert is_complete(str(tmp_path / "ray"))
    stats = read_stats(str(tmp_path / "ray"))
    assert stats["questions"] == sum(len(q) for q in _read(tmp_path / "ray")["question_positions"].to_pylist())
    # A different seed masks differently.
    other = run_mine(MineConfig(input=[str(one)], output=str(tmp_path / "seed"), seed=7, local=True))
    assert other["rows_in"] == 120
    assert _canonical(_read(tmp_path / "seed")) != _canonical(_read(tmp_path / "local"))


def test_bad_documents_are_counted_never_lost(tmp_path):
    good = _docs(3)
    lines = [json.dumps(d) for d in good]
    lines += [
        json.dumps({"id": "empty", "text": ""}),
        json.dumps({"id": "null", "text": None}),
        json.dumps({"id": "blank", "text": " \n\t "}),
        json.dumps({"id": "junk", "text": "".join(chr(c) for c in range(0, 32)) * 20}),
        json.dumps({"id": "emoji", "text": "🙂🚀 " * 200}),
        json.dumps({"id": "chinese", "text": "北京是中华人民共和国的首都。北京是一座历史悠久的城市。" * 20}),
        json.dumps({"id": "number", "text": 12345}),
        "{oops",
    ]
    path = tmp_path / "bad.jsonl"
    data = ("\n".join(lines) + "\n").encode()
    # Invalid UTF-8 inside a record and a 10 MB single line.
    data += b'{"id": "latin1", "text": "caf\xe9 caf\xe9 cr\xe8me br\xfbl\xe9e caf\xe9"}\n'
    huge = "the quick brown fox jumps over the lazy dog " * 57_000  # 2.5 MB on one line
    data += json.dumps({"id": "huge", "text": huge}).encode() + b"\n"
    path.write_bytes(data)
    stats = run_mine(MineConfig(input=[str(path)], output=str(tmp_path / "out"), local=True))
    assert stats["rows_in"] == len(lines) + 2
    assert stats["documents_used"] + sum(stats["skipped"].values()) == stats["rows_in"]
    assert stats["skipped"]["invalid_json"] == 1
    table = _read(tmp_path / "out")
    used = set(table["doc_id"].to_pylist())
    assert {d["id"] for d in good} <= used
    # A 2.5 MB line is mined whole (in 1M-character pieces), not cut: its 510-token chunks cover it.
    from splinter.tokenizer import SplinterTokenizer

    tokens = len(SplinterTokenizer.default().encode(huge, add_special_tokens=False))
    assert table["doc_id"].to_pylist().count("huge") >= tokens // 510


@pytest.mark.parametrize("fmt", ["textblocks", "wikiextractor", "text", "parquet"])
def test_input_formats(tmp_path, fmt):
    docs = _docs(6)
    src = tmp_path / "in"
    src.mkdir()
    if fmt == "textblocks":
        (src / "corpus.txt").write_text("\n\n".join(d["text"] for d in docs))
    elif fmt == "wikiextractor":
        (src / "wiki_00").write_text("".join(
            f'<doc id="{i}" url="x" title="{d["title"]}">\n{d["title"]}\n{d["text"]}\n</doc>\n'
            for i, d in enumerate(docs)))
    elif fmt == "text":
        for i, d in enumerate(docs):
            (src / f"{i}.txt").write_text(d["text"])
    else:
        pq.write_table(pa.Table.from_pylist([{"body": d["text"], "id": d["id"]} for d in docs]), src / "c.parquet")
    cfg = MineConfig(input=[f"file://{src}"], output=f"file://{tmp_path / 'out'}", local=True,
                     input_format="auto" if fmt != "textblocks" else fmt,
                     text_column="body" if fmt == "parquet" else "text")
    stats = run_mine(cfg)
    assert stats["rows_in"] == 6
    assert stats["sequences"] >= 5
    if fmt == "wikiextractor":
        assert set(_read(tmp_path / "out")["doc_id"].to_pylist()) <= {str(i) for i in range(6)}


def test_output_trains_splinter_for_pretraining(tmp_path):
    import datasets
    import torch

    from splinter import SplinterConfig, SplinterForPreTraining
    from splinter.collate import collate_pretraining

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _docs(20)))
    for layout in ("collapsed", "original"):
        out = tmp_path / layout
        run_mine(MineConfig(input=[str(path)], output=str(out), layout=layout, max_seq_length=128, local=True))
        ds = datasets.load_dataset("parquet", data_files=str(out / "shard-*.parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
        assert ("position_ids" in ds.column_names) == (layout == "original")
        batch = collate_pretraining(ds[:4])
        torch.manual_seed(0)
        model = SplinterForPreTraining(SplinterConfig.tiny(vocab_size=28996, max_position_embeddings=128)).train()
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 0
        assert model.qass.start_bilinear.weight.grad.abs().sum() > 0


def test_cli_prints_summary_and_refuses_existing_output(tmp_path):
    from pipeline.cli import app

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _docs(10)))
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["mine", str(path), str(out), "--local", "--max-seq-length", "256", "-q"])
    assert result.exit_code == 0, result.output
    assert "documents read" in result.output and "top recurring n-grams" in result.output
    again = runner.invoke(app, ["mine", str(path), str(out), "--local"])
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, ["mine", str(path), str(out), "--local", "--max-seq-length", "256", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    bad = runner.invoke(app, ["mine", str(path), str(tmp_path / "o2"), "--layout", "weird"])
    assert bad.exit_code == 2 and "layout must be" in bad.output


def test_config_file_and_validation(tmp_path):
    cfg_file = tmp_path / "mine.toml"
    cfg_file.write_text(f'input = ["{WIKI}"]\noutput = "{tmp_path / "o"}"\nseed = 3\nmax_questions = 5\n')
    cfg = MineConfig.from_file(cfg_file, seed=9)
    assert (cfg.seed, cfg.max_questions) == (9, 5)
    cfg.validate()
    (tmp_path / "bad.yaml").write_text("seeds: 3\n")
    with pytest.raises(ConfigError, match="unknown MineConfig field"):
        MineConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="input not found"):
        MineConfig(input=["/nope/x.jsonl"], output="o").validate()


def test_a_long_document_is_written_as_it_is_mined(tmp_path, monkeypatch):
    """One record longer than the stage's piece size, read as a huge line (scaled down here): its rows go to
    the writer piece by piece, never all held at once, and the shard is committed once, whole, with
    exactly the rows the stage gives the document in one call."""
    import dataclasses

    import numpy as np

    from pipeline.corpus.mining import mining_spec
    from pipeline.engine import runner
    from pipeline.stages.recurring_spans import RecurringSpanMiner
    from pipeline.storage import formats, sources
    from pipeline.storage.sources import list_inputs, plan_shards

    text = "\n".join(d["text"] for d in _docs(300))
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"id": "long", "text": text}, ensure_ascii=False) + "\n")
    # The reader's huge-line path: the line spans read chunks, its string is decoded in pieces.
    monkeypatch.setattr(sources, "_CHUNK", 4096)
    monkeypatch.setattr(formats, "_BIG_STRING", 4096)
    cfg = MineConfig(input=[str(src)], output=str(tmp_path / "out"), local=True, max_seq_length=128)
    spec = mining_spec(cfg)
    stage = dataclasses.replace(spec.stages[0], kwargs={**spec.stages[0].kwargs, "max_doc_chars": 20_000})
    spec = dataclasses.replace(spec, stages=[stage], write_batch_size=64)

    events: list[tuple[str, int]] = []
    tokenize, write = RecurringSpanMiner.tokenize_lines, runner.write_parts
    monkeypatch.setattr(RecurringSpanMiner, "tokenize_lines",
                        lambda self, texts: events.append(("tokenize", len(texts))) or tokenize(self, texts))
    monkeypatch.setattr(runner, "write_parts",
                        lambda batch, *a, **k: events.append(("write", len(batch["_row"]))) or write(batch, *a, **k))
    shards = plan_shards(list_inputs([str(src)]), "auto", cfg.shard_rows, cfg.shard_bytes)
    stats = runner.run(spec, shards, cfg.output, engine="local")

    expected = stage.build()({"doc_id": np.array(["long"], dtype=object), "text": np.array([text], dtype=object)})
    writes = [i for i, (kind, _) in enumerate(events) if kind == "write" and _]
    pieces = [i for i, (kind, _) in enumerate(events) if kind == "tokenize"]
    assert len(pieces) > 5 and len(writes) > 3
    assert writes[0] < pieces[-1]  # rows went out before the last piece was mined
    assert max(n for kind, n in events if kind == "write") <= 64
    table = _read(tmp_path / "out")
    assert table["input_ids"].to_pylist() == [ids.tolist() for ids in expected["input_ids"]]
    assert table["question_positions"].to_pylist() == [q.tolist() for q in expected["question_positions"]]
    assert table["seq_index"].to_pylist() == list(range(len(expected["input_ids"])))
    assert stats["rows_in"] == 1 and stats["sequences"] == table.num_rows == len(expected["input_ids"])
    assert stats["documents_used"] == 1
    assert not list((tmp_path / "out" / "__splinter__").glob("staging/*"))
