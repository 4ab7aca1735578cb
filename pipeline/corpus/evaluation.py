"""`splinter evaluate`: SQuAD v1.1 EM/F1 of an extraction output against gold answers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads

from pipeline.storage.filesystems import filesystem
from pipeline.storage.rundir import is_complete
from splinter.mrqa import is_mrqa, load_mrqa
from splinter.squad import evaluate, load_squad


def _is_mrqa_file(path: str) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    opener = gzip.open if p.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(p, "rb") as f:
        return is_mrqa(f.readline())


def _read_table(path: str) -> list[dict[str, Any]]:
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type.name == "NotFound":
        raise FileNotFoundError(f"not found: {path}")
    if inner.endswith((".jsonl", ".ndjson")):
        with fs.open_input_stream(inner) as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    dataset = pads.dataset(inner, filesystem=fs, format="parquet",
                           exclude_invalid_files=True, ignore_prefixes=["_", "."])
    return dataset.to_table().to_pylist()


def load_predictions(path: str) -> tuple[dict[str, str | None], bool]:
    """(id -> answer, complete?) from an extraction output directory or Parquet file."""
    fs, inner = filesystem(path)
    complete = True
    if fs.get_file_info(inner).type.name == "Directory":
        complete = is_complete(path)
    rows = _read_table(path)
    if rows and "answer" not in rows[0]:
        raise ValueError(f"{path} has no 'answer' column: is it the output of `splinter extract`?")
    return {str(r["id"]): r.get("answer") for r in rows}, complete


def load_gold(path: str) -> dict[str, list[str]]:
    if path.endswith(".json") and Path(path).is_file():
        return {r["id"]: r["answers"] for r in load_squad(path)}
    if _is_mrqa_file(path):  # the authors' split files: scored against `answers`, as they did
        return {r["id"]: r["gold_answers"] for r in load_mrqa(path)}
    rows = _read_table(path)
    if rows and "answers" not in rows[0]:
        raise ValueError(f"{path} needs 'id' and 'answers' (list of strings) columns, or be SQuAD JSON")
    out: dict[str, list[str]] = {}
    for r in rows:
        answers = r["answers"]
        # SQuAD-style parquet (HF datasets) nests texts under answers.text.
        out[str(r["id"])] = list(answers["text"]) if isinstance(answers, dict) else list(answers)
    return out


def evaluate_files(predictions: str, gold: str, only_predicted: bool = False) -> dict[str, Any]:
    """SQuAD EM/F1 over every gold question (a question without an answer scores 0), or with
    `only_predicted` over the gold questions that have an answer. Coverage is always reported, and a
    partial run or a low coverage comes with a warning."""
    preds, complete = load_predictions(predictions)
    gold_answers = load_gold(gold)
    answered = {k for k, v in preds.items() if v is not None}
    predicted = answered & set(gold_answers)
    unknown = len(set(preds) - set(gold_answers))
    scored = {k: gold_answers[k] for k in gold_answers if k in predicted} if only_predicted else gold_answers
    result: dict[str, Any] = dict(evaluate(preds, scored))
    result.update(gold_questions=len(gold_answers), predicted=len(predicted),
                  coverage=round(len(predicted) / len(gold_answers), 4) if gold_answers else 0.0,
                  scored_on="predicted" if only_predicted else "all")
    warnings = []
    if not complete:
        # Never let a partial run pass for a finished one.
        warnings.append("predictions are incomplete (no _SUCCESS marker): the run did not finish")
    if len(predicted) < len(gold_answers) and not only_predicted:
        warnings.append(f"only {len(predicted):,} of {len(gold_answers):,} gold questions have an answer "
                        f"({100 * result['coverage']:.1f}%); the others score 0: pass --only-predicted to "
                        "score the answered ones alone")
    if unknown:
        warnings.append(f"{unknown:,} predictions have ids that are not in {gold}: is it the right gold file?")
    if warnings:
        result["warning"] = "; ".join(warnings)
    return result
