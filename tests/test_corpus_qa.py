"""Corpus QA: `extract CORPUS --questions Q` over every corpus format, templates, abstention, top-k,
whole long documents, same answers as the paired mode, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA, ROOT

from pipeline.corpus.extraction import run_extract
from pipeline.corpus.questions import read_questions
from pipeline.settings import ConfigError, ExtractConfig
from pipeline.stages.corpus_qa import CorpusQATokenize
from pipeline.stages.qa import QAPostprocess
from pipeline.stages.qa_model import QAModel
from pipeline.storage.rundir import OutputExistsError

SQUAD = DATA / "squad_sample.json"
DOCS = [
    {"id": "d0", "title": "Splinter", "text": "Splinter was introduced in 2021 by Ori Ram at Tel Aviv University."},
    {"id": "d1", "title": "Ray", "text": "Ray is a framework for distributed computing, created at Berkeley in 2017."},
    {"id": "d2", "text": "A document without a title field, written in Paris in 1999 by nobody in particular."},
]


def _read(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("shard-*.parquet"))])


def _questions(tmp_path: Path) -> Path:
    path = tmp_path / "questions.txt"
    path.write_text("# asked of every document\nWho introduced {title}?\nWhen was it created?\n\nWhere?\n")
    return path


def _run(tmp_path: Path, model: Path, corpus: Path, name: str, **kw) -> tuple[dict, list[dict]]:
    cfg = ExtractConfig(input=[str(corpus)], output=str(tmp_path / name), model=str(model),
                        questions=str(kw.pop("questions", None) or _questions(tmp_path)), local=True, **kw)
    stats = run_extract(cfg)
    return stats, _read(tmp_path / name).to_pylist()


def _corpus_files(tmp_path: Path) -> dict[str, tuple[Path, dict]]:
    """The same three documents in every format `mine` reads (with the options each needs)."""
    files: dict[str, tuple[Path, dict]] = {}
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    files["jsonl"] = (jsonl, {})
    array = tmp_path / "docs.json"
    array.write_text(json.dumps(DOCS))
    files["json"] = (array, {})
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": d["id"], "title": d.get("title"), "body": d["text"]} for d in DOCS]),
                   parquet)
    files["parquet"] = (parquet, {"text_column": "body"})
    wiki = tmp_path / "wiki_00"
    wiki.write_text("".join(
        f'<doc id="{d["id"]}" url="u" title="{d["title"]}">\n{d["title"]}\n{d["text"]}\n</doc>\n'
        for d in DOCS if "title" in d) + f'<doc id="d2" url="u">\nx\n{DOCS[2]["text"]}\n</doc>\n')
    files["wikiextractor"] = (wiki, {})
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("\n\n".join(d["text"] for d in DOCS) + "\n")
    files["textblocks"] = (blocks, {"input_format": "textblocks"})
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for d in DOCS:
        (text_dir / f"{d['id']}.txt").write_text(d["text"])
    files["text"] = (text_dir, {})
    gz = tmp_path / "docs.jsonl.gz"
    import gzip

    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    files["jsonl.gz"] = (gz, {})
    return files


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "wikiextractor", "textblocks", "text", "jsonl.gz"])
def test_every_corpus_format_gives_documents_x_questions(tmp_path, tiny_qa_model, fmt):
    corpus, opts = _corpus_files(tmp_path)[fmt]
    stats, rows = _run(tmp_path, tiny_qa_model, corpus, "out", **opts)
    assert stats["rows_in"] == 3 and stats["rows_out"] == len(rows) == 3 * 3
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"] * 3
    texts = {d["text"] for d in DOCS}
    has_title = fmt in ("jsonl", "json", "parquet", "wikiextractor", "jsonl.gz")
    for r in rows:
        if r["question_id"] == "q0" and (not has_title or r["doc_id"] == ("d2" if fmt != "textblocks" else "")):
            # The template needs {title}: missing for plain text, and for d2 everywhere.
            assert r["error"] == "missing_field:title" and r["answer"] is None and r["has_answer"] is False
            continue
        assert r["error"] is None, r
        assert r["answer"] and r["has_answer"] and np.isfinite(r["score"]) and np.isfinite(r["null_score"])
        doc = next(t for t in texts if r["answer"] == t[r["start_char"]:r["end_char"]])
        assert doc
    if has_title:
        filled = [r["question"] for r in rows if r["question_id"] == "q0" and r["error"] is None]
        assert filled == ["Who introduced Splinter?", "Who introduced Ray?"]
        assert stats["pair_errors"] == {"missing_field:title": 1}
    else:
        assert stats["pair_errors"] == {"missing_field:title": 3}


def test_squad_contexts_are_documents_once(tmp_path, tiny_qa_model):
    gold = json.loads(SQUAD.read_text())
    paragraphs = [(a["title"], p["context"]) for a in gold["data"] for p in a["paragraphs"]]
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": "topic", "question": "What is {title} about?"}) + "\n")
    stats, rows = _run(tmp_path, tiny_qa_model, SQUAD, "out", questions=questions, shard_rows=64)
    assert stats["rows_in"] == len(paragraphs) == len(rows)
    assert [r["question"] for r in rows] == [f"What is {t} about?" for t, _ in paragraphs]


def test_same_answers_as_paired_mode(tmp_path, tiny_qa_model):
    corpus, _ = _corpus_files(tmp_path)["jsonl"]
    _, rows = _run(tmp_path, tiny_qa_model, corpus, "corpus", n_best=3)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"{r['doc_id']}/{r['question_id']}", "question": r["question"],
                                         "context": next(d["text"] for d in DOCS if d["id"] == r["doc_id"])}) + "\n"
                             for r in rows if r["error"] is None))
    run_extract(ExtractConfig(input=[str(pairs)], output=str(tmp_path / "paired"), model=str(tiny_qa_model),
                              n_best=3, local=True))
    paired = {r["id"]: r for r in _read(tmp_path / "paired").to_pylist()}
    assert len(paired) == 8
    for r in rows:
        if r["error"] is None:
            p = paired[f"{r['doc_id']}/{r['question_id']}"]
            for col in ("answer", "start_char", "end_char", "nbest_answers", "has_answer"):
                assert r[col] == p[col], col
            assert r["score"] == pytest.approx(p["score"], abs=1e-4)
            assert r["null_score"] == pytest.approx(p["null_score"], abs=1e-4)


def test_long_document_is_answered_whole(tiny_qa_model):
    """A 300,000-character document is windowed over its whole length, and spans found past the first
    window carry character offsets into the whole document (the tokens at those offsets are the span)."""
    from splinter.tokenizer import SplinterTokenizer

    tok = SplinterTokenizer.from_pretrained(str(tiny_qa_model))
    words = ["river", "mill", "field", "stone", "bridge", "harbour", "market", "tower", "garden", "valley"]
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, size=60_000)) + " The end."
    assert len(text) >= 300_000
    stage = CorpusQATokenize(tok, [("q0", "Where is the old mill?", ())], max_length=128, stride=32)
    rows = stage({"doc_id": np.array(["long"], dtype=object), "text": np.array([text], dtype=object)})
    assert rows["error"][0] == "" and rows["num_windows"][0] > 500  # no cut: the whole document
    offsets = np.asarray(rows["offsets"][0]).reshape(-1, 2)
    assert offsets[:, 1].max() == len(text)  # the last window reaches the document's end
    out = QAModel(str(tiny_qa_model), device="cpu", n_best=20, num_threads=1)(
        {k: v for k, v in rows.items() if k != "_source"})
    lengths = np.asarray(rows["window_lengths"][0])
    ids = np.asarray(rows["input_ids"][0])
    first_window_end = offsets[: lengths[0]][:, 1].max()
    assert out["error"][0] == "" and out["best_window"][0] > 0
    start, end = int(out["start_char"][0]), int(out["end_char"][0])
    assert start > first_window_end  # found beyond the first window, offsets into the whole document
    w, s_tok, e_tok = int(out["best_window"][0]), int(out["start_token"][0]), int(out["end_token"][0])
    w0 = int(lengths[:w].sum())
    assert tok(text[start:end], add_special_tokens=False)["input_ids"] == ids[w0 + s_tok: w0 + e_tok + 1].tolist()
    nbest_starts = np.asarray(out["nbest_start_char"][0])
    assert (nbest_starts > first_window_end).any()
    post = QAPostprocess(n_best=20, top_k=5)({**out, "context": rows["context"]})
    spans = list(zip(post["nbest_start_char"][0], post["nbest_end_char"][0], strict=True))
    assert len(spans) == 5 == len(set(spans))  # top-k: distinct character spans
    assert post["answer"][0] == text[start:end] and post["nbest_answers"][0][0] == text[start:end]


def test_abstention_min_score_and_null_margin(tmp_path, tiny_qa_model):
    """--null-margin answers only where score - null_score exceeds it; --min-score only where score reaches
    it; abstained rows keep their scores (to tune on), with answer null and has_answer false."""
    corpus, _ = _corpus_files(tmp_path)["jsonl"]
    _, base = _run(tmp_path, tiny_qa_model, corpus, "base")
    ok = [r for r in base if r["error"] is None]
    margins = sorted(r["score"] - r["null_score"] for r in ok)
    cut = (margins[3] + margins[4]) / 2  # half the pairs above, half below
    _, rows = _run(tmp_path, tiny_qa_model, corpus, "margin", null_margin=cut)
    for b, r in zip(base, rows, strict=True):
        if b["error"] is not None:
            continue
        keep = b["score"] - b["null_score"] > cut
        assert r["has_answer"] is keep and (r["answer"] == b["answer"] if keep else r["answer"] is None)
        assert r["score"] == b["score"] and r["null_score"] == b["null_score"]
        assert r["start_char"] == (b["start_char"] if keep else -1)
    assert sum(r["has_answer"] for r in rows) == 4
    scores = sorted(r["score"] for r in ok)
    _, rows = _run(tmp_path, tiny_qa_model, corpus, "min", min_score=scores[5])
    assert [r["has_answer"] for r in rows] == [r["error"] is None and r["score"] >= scores[5] for r in base]
    assert sum(r["has_answer"] for r in rows) == 3


def test_top_k_distinct_spans(tmp_path, tiny_qa_model):
    corpus, _ = _corpus_files(tmp_path)["jsonl"]
    _, rows = _run(tmp_path, tiny_qa_model, corpus, "out", top_k=4, max_length=48, stride=24, max_query_length=16)
    for r in rows:
        if r["error"] is None:
            spans = list(zip(r["nbest_start_char"], r["nbest_end_char"], strict=True))
            assert len(spans) == 4 == len(set(spans)), spans
            assert r["nbest_answers"][0] == r["answer"] and r["nbest_scores"] == sorted(r["nbest_scores"], reverse=True)
            assert sum(r["nbest_probabilities"]) == pytest.approx(1.0, abs=1e-5)


def test_questions_files_and_their_errors(tmp_path):
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"question_id": "founder", "question": "Who founded {title}?"}\n'
                     '{"question_id": "year", "question": "When?"}\n')
    assert [(q.question_id, q.fields) for q in read_questions(str(jsonl))] == [("founder", ("title",)), ("year", ())]
    csv = tmp_path / "q.csv"
    csv.write_text("question_id,question\na,\"Where is {city}, {country}?\"\n")
    assert read_questions(str(csv))[0].fields == ("city", "country")
    parquet = tmp_path / "q.parquet"
    pq.write_table(pa.table({"question_id": ["x"], "question": ["What?"]}), parquet)
    assert read_questions(str(parquet))[0].question_id == "x"
    for body, match in [('{"question_id": "a", "question": "A?"}\n{"question_id": "a", "question": "B?"}\n', "twice"),
                        ('{"question_id": "a", "question": "Who is {0}?"}\n', "plain field name"),
                        ('{"question_id": "a", "question": "Who {title?"}\n', "malformed"),
                        ("", "no questions")]:
        jsonl.write_text(body)
        with pytest.raises(ConfigError, match=match):
            read_questions(str(jsonl))


def test_resume_after_kill_is_identical(tmp_path, tiny_qa_model):
    """A corpus job killed mid-run and resumed writes exactly what an uninterrupted run writes."""
    docs = tmp_path / "docs.jsonl"
    src = (ROOT / "data" / "wiki_sample.jsonl").read_text().splitlines()[:240]
    docs.write_text("\n".join(src) + "\n")
    questions = tmp_path / "q.txt"
    questions.write_text("What is {title}?\nWhen did it start?\n")
    common = ["--model", str(tiny_qa_model), "--questions", str(questions), "--local", "--shard-rows", "64",
              "--max-length", "96", "--stride", "16", "--quiet"]
    splinter = [sys.executable, "-m", "pipeline.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([*splinter, "extract", str(docs), str(tmp_path / "whole"), *common], check=True, env=env,
                   capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*splinter, "extract", str(docs), str(out), *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shard-*.parquet")) and proc.poll() is None:
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the job finished before it could be killed: make the corpus bigger"
    done = len(list(out.glob("shard-*.parquet")))
    assert 1 <= done < len(list((tmp_path / "whole").glob("shard-*.parquet")))
    subprocess.run([*splinter, "extract", str(docs), str(out), *common, "--resume"], check=True, env=env,
                   capture_output=True, timeout=300)
    whole, resumed = _read(tmp_path / "whole"), _read(out)
    assert resumed.num_rows == whole.num_rows == 240 * 2
    assert resumed.to_pylist() == whole.to_pylist()


def test_resume_refuses_changed_questions(tmp_path, tiny_qa_model):
    corpus, _ = _corpus_files(tmp_path)["jsonl"]
    questions = _questions(tmp_path)
    _run(tmp_path, tiny_qa_model, corpus, "out", questions=questions)
    questions.write_text("Who introduced {title}?\nWhy?\n")
    with pytest.raises(OutputExistsError, match="question_list"):  # the questions, not only the file name
        _run(tmp_path, tiny_qa_model, corpus, "out", questions=questions, resume=True)
