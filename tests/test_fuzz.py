"""Unusual inputs a new user brings: every format, compressed or not, misnamed, broken, hidden, huge lines,
lone surrogates. Both jobs run over them with Ray and with --local: 0 crashes, the same rows, and every
input record accounted for (in the output or in a counted reason)."""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA, ROOT

from pipeline.corpus.extraction import run_extract
from pipeline.corpus.mining import run_mine
from pipeline.settings import ConfigError, ExtractConfig, MineConfig
from pipeline.storage import formats
from pipeline.storage.filesystems import glob_regex
from pipeline.storage.sources import ReadOptions, list_inputs, plan_shards, read_shard

WIKI = ROOT / "data" / "wiki_sample.jsonl"
CTX = "Splinter was introduced in 2021 by Ori Ram and colleagues at Tel Aviv University."


def _docs(n: int, skip: int = 0) -> list[dict]:
    with WIKI.open() as f:
        lines = [next(f) for _ in range(skip + n)][skip:]
    return [json.loads(line) for line in lines]


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as f:
        f.write(data)
    return sink.getvalue().to_pybytes()


COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".zst": _zstd}


def _questions(n: int) -> list[dict]:
    return [{"id": f"q{i}", "question": f"Who introduced Splinter {i}?", "context": CTX} for i in range(n)]


def _squad(records: list[dict]) -> dict:
    qas = [{"id": r["id"], "question": r["question"], "answers": [{"text": "Ori Ram", "answer_start": 35}]}
           for r in records]
    return {"version": "1.1", "data": [{"title": "Splinter", "paragraphs": [{"context": CTX, "qas": qas}]}]}


def _encode(fmt: str, records: list[dict]) -> tuple[str, bytes]:
    """(file name, content) of `records` written in `fmt`."""
    if fmt == "jsonl":
        return "rows.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode()
    if fmt == "jsonl-in-.json":  # JSON Lines under a .json name, first line well over 4 KB
        first = {**records[0], "context": CTX + " padding" * 1200}
        return "rows.json", "".join(json.dumps(r) + "\n" for r in [first, *records[1:]]).encode()
    if fmt == "json-array":
        return "rows.json", json.dumps(records, indent=1).encode()
    if fmt == "squad-one-line":
        return "squad.json", json.dumps(_squad(records)).encode()
    if fmt == "squad-pretty":
        return "squad.json", json.dumps(_squad(records), indent=2).encode()
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(records), sink)
        return "rows.parquet", sink.getvalue().to_pybytes()
    raise ValueError(fmt)


@pytest.mark.parametrize("codec", list(COMPRESS))
@pytest.mark.parametrize("fmt", ["jsonl", "jsonl-in-.json", "json-array", "squad-one-line", "squad-pretty",
                                 "parquet"])
def test_question_formats_compressed_or_not_are_read_whole(tmp_path, fmt, codec):
    records = _questions(150)
    name, data = _encode(fmt, records)
    path = tmp_path / (name + codec)
    path.write_bytes(COMPRESS[codec](data))
    entries = list_inputs([str(tmp_path)])
    shards = plan_shards(entries, "auto", shard_rows=40, shard_bytes=4096)
    expected = {"jsonl": "jsonl", "jsonl-in-.json": "jsonl", "json-array": "json", "squad-one-line": "squad",
                "squad-pretty": "squad", "parquet": "parquet"}[fmt]
    assert {s.format for s in shards} == {expected}
    if not codec and expected != "parquet":
        assert len(shards) > 1  # uncompressed files are cut into several shards
    rows = [r for s in shards for r in read_shard(s, ReadOptions(kind="questions"))]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(r["_error"] == "" and r["question"] and r["context"].startswith(CTX) for r in rows)


@pytest.mark.parametrize("codec", list(COMPRESS))
@pytest.mark.parametrize("fmt", ["text", "textblocks", "wikiextractor"])
def test_document_formats_compressed_or_not(tmp_path, fmt, codec):
    docs = _docs(5)
    if fmt == "text":
        for i, d in enumerate(docs):
            (tmp_path / f"{i}.txt{codec}").write_bytes(COMPRESS[codec](d["text"].encode()))
    elif fmt == "textblocks":
        (tmp_path / f"corpus.txt{codec}").write_bytes(COMPRESS[codec]("\n\n".join(d["text"] for d in docs).encode()))
    else:
        body = "".join(f'<doc id="{i}" title="t">\nt\n{d["text"]}\n</doc>\n' for i, d in enumerate(docs))
        (tmp_path / f"wiki_00{codec}").write_bytes(COMPRESS[codec](body.encode()))
    shards = plan_shards(list_inputs([str(tmp_path)]), "textblocks" if fmt == "textblocks" else "auto", 100, 1 << 20)
    assert {s.format for s in shards} == {fmt}
    rows = [r for s in shards for r in read_shard(s, ReadOptions(kind="documents"))]
    assert sorted(r["text"].strip() for r in rows) == sorted(d["text"].strip() for d in docs)


def test_undecidable_json_stops_with_an_error_naming_the_format_flag(tmp_path):
    (tmp_path / "notes.json").write_text('"just a string"\n')
    with pytest.raises(ConfigError, match="--format"):
        plan_shards(list_inputs([str(tmp_path)]), "auto", 100, 1 << 20)
    (tmp_path / "notes.json").write_text('{"a": 1,\n "b": 2}\n')  # one pretty-printed object, not SQuAD
    with pytest.raises(ConfigError, match="--format"):
        plan_shards(list_inputs([str(tmp_path)]), "auto", 100, 1 << 20)
    (tmp_path / "notes.json").write_text('{broken\n{"id": 1, "text": "fine"}\n')  # JSONL, first line broken
    shards = plan_shards(list_inputs([str(tmp_path)]), "auto", 100, 1 << 20)
    rows = [r for s in shards for r in read_shard(s, ReadOptions(kind="documents"))]
    assert [r["_error"] for r in rows] == ["invalid_json", ""]


def test_walks_skip_hidden_and_underscore_names_at_every_depth_and_never_read_the_output(tmp_path):
    corpus = tmp_path / "corpus"
    for rel in ("a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl", ".hidden.jsonl", "sub/.cache/d.jsonl",
                "sub/_stats/e.jsonl", "sub/deeper/_SUCCESS", "_tmp/f.jsonl", "out/shard-00000.parquet"):
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_text('{"id": "x", "text": "y"}\n')
    found = [Path(e.uri).relative_to(corpus).as_posix() for e in list_inputs([str(corpus)], exclude=str(corpus / "out"))]
    assert found == ["a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl"]


def test_globs_stay_within_one_path_component(tmp_path):
    for rel in ("a.jsonl", "b.jsonl", "sub/c.jsonl", "sub/deep/d.jsonl", ".e.jsonl", "_f.jsonl", "x/a.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}\n")

    def names(pattern: str) -> list[str]:
        return [Path(e.uri).relative_to(tmp_path).as_posix() for e in list_inputs([str(tmp_path / pattern)])]

    assert names("*.jsonl") == ["a.jsonl", "b.jsonl"]  # neither sub/ nor hidden/underscore names
    assert names("*/*.jsonl") == ["sub/c.jsonl", "x/a.jsonl"]
    assert names("**/*.jsonl") == ["a.jsonl", "b.jsonl", "sub/c.jsonl", "sub/deep/d.jsonl", "x/a.jsonl"]
    assert names("[ab].jsonl") == ["a.jsonl", "b.jsonl"]
    assert names("?.jsonl") == ["a.jsonl", "b.jsonl"]
    # Python's glob agrees wherever it has no opinion on `_` names.
    for pattern in ("*.jsonl", "*/*.jsonl", "**/*.jsonl", "?.jsonl"):
        ours = sorted(names(pattern))
        theirs = sorted(Path(p).relative_to(tmp_path).as_posix()
                        for p in glob.glob(str(tmp_path / pattern), recursive=True) if "/_" not in "/" + p)
        assert ours == [p for p in theirs if not Path(p).name.startswith("_")], pattern
    assert glob_regex("s3://b/*.jsonl").fullmatch("s3://b/x.jsonl")
    assert not glob_regex("s3://b/*.jsonl").fullmatch("s3://b/d/x.jsonl")


def test_parquet_is_cut_inside_row_groups_and_checked_at_planning(tmp_path):
    docs = _docs(300)
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "one-group.parquet", row_group_size=10_000)
    shards = plan_shards(list_inputs([str(tmp_path)]), "auto", 5000, 4 << 20, {"text": "--text-column"})
    assert len(shards) > 2  # one row group, still several shards (at most 5,000 rows, at least 64 each)
    rows = [r for s in shards for r in read_shard(s, ReadOptions(kind="documents"))]
    assert [r["doc_id"] for r in rows] == [d["id"] for d in docs]
    with pytest.raises(ConfigError, match="no column 'body'.*--text-column"):
        plan_shards(list_inputs([str(tmp_path)]), "auto", 5000, 4 << 20, {"body": "--text-column"})
    # Other writers may store invalid UTF-8 in a string column: that row is an error, not a crash.
    raw = pa.array([b"ok text", b"caf\xe9 bad", None], pa.binary())
    bad = pa.Table.from_arrays([raw.view(pa.string()), pa.array(["1", "2", "3"])], names=["text", "id"])
    pq.write_table(bad, tmp_path / "one-group.parquet")
    shards = plan_shards(list_inputs([str(tmp_path)]), "parquet", 5000, 4 << 20, {"text": "--text-column"})
    rows = [r for s in shards for r in read_shard(s, ReadOptions(kind="documents"))]
    assert [r["_error"] for r in rows] == ["", "invalid_unicode", ""]


def test_jsonl_byte_ranges_cover_every_line_exactly_once(tmp_path):
    rng = random.Random(0)
    lines = []
    for i in range(400):
        size = rng.choice([0, 1, 30, 500, 70_000]) if i != 123 else 1_300_000  # one line spans chunks
        lines.append(json.dumps({"id": f"d{i}", "text": "x" * size}))
    data = "\n".join(lines).replace('"d7"', '"d7"\r')  # a CRLF line, and no newline at the end
    path = tmp_path / "c.jsonl"
    path.write_text(data)
    for shard_bytes in (1024, 65_536, 1 << 20, 64 << 20):
        shards = plan_shards(list_inputs([str(path)]), "auto", 5000, shard_bytes)
        rows = [r for s in shards for r in read_shard(s, ReadOptions(kind="documents"))]
        assert [r["doc_id"] for r in rows] == [f"d{i}" for i in range(400)], shard_bytes
        assert all(r["_error"] == "" for r in rows)


def test_squad_file_is_parsed_once_per_process(tmp_path, monkeypatch):
    path = tmp_path / "squad.json"
    path.write_bytes((DATA / "squad_sample.json").read_bytes())
    reads: list[str] = []
    real = formats.read_bytes
    monkeypatch.setattr(formats, "read_bytes", lambda p: reads.append(p) or real(p))
    shards = plan_shards(list_inputs([str(path)]), "auto", 64, 1 << 20)
    assert len(shards) > 2
    rows = [r for s in shards for r in read_shard(s, ReadOptions(kind="questions"))]
    assert len(reads) == 1  # planning parsed it; every shard reuses that parse
    assert len(rows) == sum(len(p["qas"]) for a in json.loads(path.read_text())["data"] for p in a["paragraphs"])
    path.write_bytes(path.read_bytes().replace(b'"version"', b'"Version"'))  # changed (size kept): parsed again
    os.utime(path, ns=(1, 1))
    plan_shards(list_inputs([str(path)]), "auto", 64, 1 << 20)
    assert len(reads) == 2


def test_readme_mining_example_spreads_over_two_workers():
    shards = plan_shards(list_inputs([str(WIKI)]), "auto", MineConfig.shard_rows, MineConfig.shard_bytes)
    assert len(shards) >= 4  # the 1.1 MB sample is several shards with the default settings


# ---------------------------------------------------------------- both jobs, Ray == local

SURROGATE_LINES = [
    r'{"id": "bad-text", "text": "Paris is the capital of France. Paris \ud800 is large."}',
    r'{"id": "bad\udfffid", "text": "Rome is the capital of Italy. Rome is old."}',
]


def _mining_corpus(root: Path) -> int:
    """A directory of everything unusual; returns how many records it holds (what must be accounted for)."""
    docs = _docs(90, skip=100)
    (root / "sub" / ".git").mkdir(parents=True)
    (root / "sub" / "_stats").mkdir()
    (root / "sub" / ".git" / "x.jsonl").write_text(json.dumps(docs[0]) + "\n")  # skipped: hidden
    (root / "sub" / "_stats" / "y.json").write_text("{}")  # skipped: metadata name
    lines = [json.dumps(d) for d in docs[:10]] + SURROGATE_LINES + ["{oops", "[1, 2]"]
    (root / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    long_first = {**docs[10], "text": docs[10]["text"] + " More." * 1500}
    (root / "lines.json").write_text("\n".join(json.dumps(d) for d in [long_first, *docs[11:20]]) + "\n")
    (root / "array.json").write_text(json.dumps(docs[20:30]))
    (root / "sub" / "packed.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in docs[30:40]).encode()))
    (root / "sub" / "misnamed.jsonl").write_bytes(bz2.compress("".join(json.dumps(d) + "\n" for d in docs[40:45]).encode()))
    (root / "sub" / "doc.txt.zst").write_bytes(_zstd(docs[45]["text"].encode()))
    wiki = "".join(f'<doc id="w{i}" title="t">\nt\n{d["text"]}\n</doc>\n' for i, d in enumerate(docs[46:50]))
    (root / "sub" / "wiki_00.bz2").write_bytes(bz2.compress(wiki.encode()))
    pq.write_table(pa.Table.from_pylist(docs[50:90]), root / "one-group.parquet", row_group_size=1000)
    return 10 + len(SURROGATE_LINES) + 2 + 10 + 10 + 10 + 5 + 1 + 4 + 40


def _rows(out: Path) -> list[dict]:
    tables = [pq.read_table(f) for f in sorted(out.glob("shard-*.parquet"))]
    return pa.concat_tables(tables).to_pylist()


def test_mining_fuzz_ray_equals_local(tmp_path, ray_session):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = _mining_corpus(corpus)
    common = dict(input=[str(corpus)], max_seq_length=128, shard_rows=64, shard_bytes=64 << 10)
    local = run_mine(MineConfig(output=str(tmp_path / "local"), local=True, **common))
    ray_stats = run_mine(MineConfig(output=str(tmp_path / "ray"), num_workers=2, **common))
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    for stats in (local, ray_stats):
        assert stats["rows_in"] == records
        assert stats["documents_used"] + sum(stats["skipped"].values()) == records
        assert stats["skipped"]["invalid_unicode"] == 2
        assert stats["skipped"]["invalid_json"] == 1 and stats["skipped"]["not_an_object"] == 1
    assert ray_stats["shards"] >= 6
    used = {r["doc_id"] for r in _rows(tmp_path / "ray")}
    assert "bad-text" not in used and not any("\ufffd" in d for d in used)


def _qa_corpus(root: Path) -> int:
    qs = _questions(24)
    lines = [json.dumps(q) for q in qs[:6]] + [
        r'{"id": "bad\ud800id", "question": "Who?", "context": "Ori Ram wrote it."}',
        r'{"id": "bad-question", "question": "Who \udc00?", "context": "Ori Ram wrote it."}',
        r'{"id": "bad-context", "question": "Who?", "context": "Ori \ud83d Ram wrote it."}',
        r'{"id": "bad-list", "question": ["Who?", "When \ud800?"], "context": "Ori Ram wrote it in 2021."}',
        "not json at all",
    ]
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (root / "array.json").write_text(json.dumps(qs[6:10]))
    (root / "squad.json.gz").write_bytes(gzip.compress(json.dumps(_squad(qs[10:16]), indent=2).encode()))
    (root / "rows.jsonl.zst").write_bytes(_zstd("".join(json.dumps(q) + "\n" for q in qs[16:20]).encode()))
    pq.write_table(pa.Table.from_pylist(qs[20:24]), root / "rows.parquet")
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")
    return 6 + 3 + 2 + 1 + 4 + 6 + 4 + 4  # bad-list is two question rows


def _extract_ray_equals_local(corpus, tmp_path, model):
    """Extract CORPUS with --local and on Ray; the rows must agree. Returns (local stats, Ray stats, Ray rows)."""
    common = dict(input=[str(corpus)], model=str(model), shard_rows=4, batch_size=8)
    local = run_extract(ExtractConfig(output=str(tmp_path / "local"), local=True, **common))
    ray_stats = run_extract(ExtractConfig(output=str(tmp_path / "ray"), **common))
    ray_rows, local_rows = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert [(r["id"], r["answer"], r["error"]) for r in ray_rows] == [
        (r["id"], r["answer"], r["error"]) for r in local_rows]
    return local, ray_stats, ray_rows


def test_extract_fuzz_ray_equals_local(tmp_path, tiny_qa_model, ray_session):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows_expected = _qa_corpus(corpus)
    local, ray_stats, ray_rows = _extract_ray_equals_local(corpus, tmp_path, tiny_qa_model)
    assert local["rows_in"] == local["rows_out"] == ray_stats["rows_in"] == ray_stats["rows_out"] == rows_expected
    by_id = {r["id"]: r for r in ray_rows}
    for rid in ("bad\ufffdid", "bad-question", "bad-context", "bad-list#1"):
        assert by_id[rid]["error"] == "invalid_unicode" and by_id[rid]["answer"] is None
    assert by_id["bad-list#0"]["answer"] and by_id["bad-list#0"]["error"] is None
    assert ray_stats["errors"] == {"invalid_unicode": 4, "invalid_json": 1}
    assert ray_stats["answered"] == rows_expected - 5


def test_walks_never_follow_directory_links_nor_leave_the_root_and_read_each_file_once(tmp_path):
    (tmp_path / "parent.jsonl").write_text('{"text": "outside"}\n')
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jsonl").write_text('{"text": "inside"}\n')
    os.symlink("..", root / "sub" / "back")  # a loop
    os.symlink("../sub", root / "sub" / "again")  # another loop
    os.symlink("..", root / "up")  # out of the root
    os.symlink("../parent.jsonl", root / "out.jsonl")  # a file out of the root
    os.symlink("sub/a.jsonl", root / "0-link.jsonl")  # a second name, met first
    assert [e.uri for e in list_inputs([str(root)])] == [str(root / "sub" / "a.jsonl")]


def _bad_corpus(root: Path) -> int:
    docs = _docs(6, skip=300)
    root.mkdir()
    deep = "[" * 10000 + "]" * 10000
    (root / "deep.jsonl").write_text("\n".join([json.dumps(docs[0]), deep, json.dumps(docs[1])]) + "\n")
    (root / "deep.json").write_text(deep)
    (root / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(d) + "\n" for d in docs[2:6]).encode())
    return 3 + 1 + 4


def test_too_deep_json_is_one_counted_record_and_a_bom_is_stripped_ray_equals_local(tmp_path, ray_session):
    records = _bad_corpus(tmp_path / "corpus")
    common = dict(input=[str(tmp_path / "corpus")], max_seq_length=128, shard_rows=64, shard_bytes=64 << 10)
    local = run_mine(MineConfig(output=str(tmp_path / "local"), local=True, **common))
    ray_stats = run_mine(MineConfig(output=str(tmp_path / "ray"), num_workers=2, **common))
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    for stats in (local, ray_stats):
        assert stats["rows_in"] == records
        assert stats["skipped"] == {"too_deep": 2}
        assert stats["documents_used"] == records - 2


def test_utf16_is_refused_naming_the_file_and_a_truncated_gz_is_named(tmp_path):
    (tmp_path / "u16.jsonl").write_bytes('{"text": "a b c"}\n'.encode("utf-16"))
    with pytest.raises(ConfigError, match="u16.jsonl is UTF-16"):
        plan_shards(list_inputs([str(tmp_path / "u16.jsonl")]), "auto", 64, 1 << 20)
    data = "".join(json.dumps(d) + "\n" for d in _docs(200)).encode()
    packed = gzip.compress(data)
    (tmp_path / "t.jsonl.gz").write_bytes(packed[: len(packed) * 2 // 3])
    with pytest.raises(ConfigError, match=r"t\.jsonl\.gz"):
        for shard in plan_shards(list_inputs([str(tmp_path / "t.jsonl.gz")]), "auto", 64, 1 << 20):
            read_shard(shard, ReadOptions(kind="documents"))


@pytest.mark.parametrize("text_column", ["text", "context"])
def test_squad_is_mined_once_per_paragraph_with_a_stable_id_ray_equals_local(tmp_path, ray_session, text_column):
    docs = _docs(3, skip=400)
    paragraphs = [{"context": d["text"], "qas": [{"id": f"p{j}q{k}", "question": "Who?", "answers": []}
                                                 for k in range(4)]} for j, d in enumerate(docs)]
    squad = {"version": "1.1", "data": [{"title": "A", "paragraphs": paragraphs[:2]},
                                        {"title": "B", "paragraphs": paragraphs[2:]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    common = dict(input=[str(tmp_path / "squad.json")], max_seq_length=128, shard_rows=5, text_column=text_column)
    local = run_mine(MineConfig(output=str(tmp_path / "local"), local=True, **common))
    ray_stats = run_mine(MineConfig(output=str(tmp_path / "ray"), num_workers=2, **common))
    rows = _rows(tmp_path / "ray")
    assert rows == _rows(tmp_path / "local") and rows
    assert {r["doc_id"] for r in rows} <= {"A#0", "A#1", "B#0"}
    for stats in (local, ray_stats):  # three paragraphs, each read once (not once per question)
        assert stats["rows_in"] == stats["documents_used"] + sum(stats["skipped"].values()) == 3
        assert not {"missing_text_column", "invalid_json"} & set(stats["skipped"]), stats["skipped"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def test_truncated_gz_in_a_ray_job_exits_2_naming_it_and_an_uncreatable_output_too(tmp_path):
    data = "".join(json.dumps(d) + "\n" for d in _docs(200)).encode()
    packed = gzip.compress(data)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.jsonl.gz").write_bytes(packed[: len(packed) * 2 // 3])
    proc = _cli("mine", str(tmp_path / "in"), str(tmp_path / "out"), "-q")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read ") and "t.jsonl.gz" in last and "Traceback" not in proc.stderr
    (tmp_path / "ok.jsonl").write_text(data.decode())
    (tmp_path / "a-file").write_text("")  # creating a directory under a file fails, even as root
    proc = _cli("mine", str(tmp_path / "ok.jsonl"), str(tmp_path / "a-file" / "out"), "--local", "-q")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert "cannot create the output directory" in proc.stderr and "--resume" not in proc.stderr


def test_a_ray_extract_console_shows_the_tools_lines_only(tmp_path, tiny_qa_model):
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in _questions(12)))
    proc = _cli("extract", str(tmp_path / "q.jsonl"), str(tmp_path / "out"), "--model", str(tiny_qa_model),
                "--shard-rows", "4", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("core_worker.cc", "max_restarts", "SIGABRT", "Traceback", "*** "):
        assert noise not in proc.stderr, proc.stderr[-3000:]


def test_extract_counts_too_deep_json_and_reads_a_bom_ray_equals_local(tmp_path, tiny_qa_model, ray_session):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    qs = _questions(6)
    deep = "[" * 10000 + "]" * 10000
    (corpus / "deep.jsonl").write_text("\n".join([json.dumps(qs[0]), deep, json.dumps(qs[1])]) + "\n")
    (corpus / "deep.json").write_text(deep)
    (corpus / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(q) + "\n" for q in qs[2:6]).encode())
    local, ray_stats, ray_rows = _extract_ray_equals_local(corpus, tmp_path, tiny_qa_model)
    for stats in (local, ray_stats):
        assert stats["rows_in"] == stats["rows_out"] == 8
        assert stats["errors"] == {"too_deep": 2} and stats["answered"] == 6


def test_a_mine_that_skips_every_record_for_a_missing_text_column_says_so(tmp_path):
    from pipeline.corpus.mining import format_mining_summary

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d["text"]}) + "\n" for d in _docs(5)))
    stats = run_mine(MineConfig(input=[str(tmp_path / "d.jsonl")], output=str(tmp_path / "out"), local=True))
    assert stats["skipped"] == {"missing_text_column": 5}
    assert "WARNING: no document had the text column" in format_mining_summary(stats)


def test_a_huge_json_string_is_decoded_in_pieces_to_the_same_value(tmp_path, monkeypatch):
    """A line holding a huge string (scaled down here) is decoded without its decoded copy beside the text:
    the value is `loads`' exactly, whatever the escapes, surrogates, invalid UTF-8 or invalid JSON."""
    monkeypatch.setattr(formats, "_BIG_STRING", 40)
    monkeypatch.setattr(formats, "_STRING_PIECE", 7)
    pieced: list[int] = []
    real = formats._string_utf8
    monkeypatch.setattr(formats, "_string_utf8", lambda raw, a, b: pieced.append(b - a) or real(raw, a, b))
    rng = random.Random(5)
    atoms = ["a", " ", "é", "中", "😀", "\\n", '\\"', "\\\\", "\\/", "\\u00e9", "\\ud83d\\ude00", "\\ud800", "\\udc00",
             "\\t", "z", ".", "u", "f", "1"]
    broken = ["\\x", "\t", "\\u12", "\\"]

    def string(n: int) -> str:
        parts = [rng.choice(atoms) for _ in range(n)]
        if rng.random() < 0.1:
            parts.insert(rng.randrange(n + 1), rng.choice(broken))
        return '"' + "".join(parts) + '"'

    for i in range(600):
        big, small = string(rng.randrange(20, 80)), string(3)
        text = rng.choice([f'{{"id": {small}, "text": {big}}}', f"[{small}, {{{big}: [{big}, 1]}}]", big,
                           f'{{"text": {big}, "text": {big}, "n": [1.5, null, true]}}', f"\ufeff{{{small}: {big}}}"])
        raw = text.encode("utf-8", "surrogatepass")
        if i % 7 == 0:  # invalid UTF-8 somewhere
            b = bytearray(raw)
            b[rng.randrange(len(b))] = rng.choice([0xFF, 0xE2, 0x80])
            raw = bytes(b)
        expected = formats.loads(raw)
        assert repr(formats.loads_taken([raw])) == repr(expected), raw
        assert repr(formats.loads_taken([bytearray(raw)])) == repr(expected), raw
    assert len(pieced) > 500
    # Planning does not read a long first line whole to see that it is not an MRQA header.
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"id": "x", "text": "y" * 100_000}) + "\n")
    monkeypatch.setattr(formats, "_first_line", None)
    assert formats.detect_format(str(path)) == "jsonl"
