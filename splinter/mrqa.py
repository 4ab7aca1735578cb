"""MRQA shared-task files (the format of the Splinter authors' few-shot splits), read into SQuAD-like rows.

A file is JSON Lines, plain or gzip: a first line `{"header": {...}}`, then one paragraph per line with
`context` and `qas`; each question has `qid` (or `id`), `question`, `detected_answers` (each with
`text` and `char_spans`, whose end is INCLUSIVE: the answer is `context[start:end + 1]`) and `answers`
(the gold strings the authors score against).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

__all__ = ["is_mrqa", "load_mrqa", "mrqa_rows"]


def is_mrqa(first_line: bytes | str) -> bool:
    """Whether a file's first line is an MRQA header."""
    text = first_line.decode("utf-8", errors="replace") if isinstance(first_line, bytes) else first_line
    text = text.lstrip("\ufeff \t\r\n")
    if not text.startswith("{"):
        return False
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == {"header"}


def mrqa_rows(lines: list[str], where: str = "MRQA file") -> list[dict[str, Any]]:
    """One row per question: `{id, question, context, answers, answer_starts, gold_answers, title,
    question_index}`. `answers`/`answer_starts` are the detected answers' first character spans (what
    the authors train on: `answers[0]`), `gold_answers` the strings they score against."""
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"{where}: line {n} is not valid JSON") from None
        if not isinstance(rec, dict) or "header" in rec:
            continue
        context = rec.get("context")
        if not isinstance(context, str) or not isinstance(rec.get("qas"), list):
            raise ValueError(f"{where}: line {n} has no context string and qas list; is it an MRQA file?")
        for k, qa in enumerate(rec["qas"]):
            texts, starts = [], []
            for detected in qa.get("detected_answers") or []:
                spans = detected.get("char_spans") or []
                if spans:
                    start, end = int(spans[0][0]), int(spans[0][1])
                    texts.append(context[start : end + 1])  # inclusive end
                    starts.append(start)
            qid = qa.get("qid", qa.get("id"))
            gold = qa.get("answers") or [d.get("text") for d in qa.get("detected_answers") or []]
            rows.append({
                "id": str(qid) if qid is not None else f"line{n}#{k}",
                "question": qa.get("question"),
                "context": context,
                "answers": texts,
                "answer_starts": starts,
                "gold_answers": [g for g in gold if isinstance(g, str)],
                "title": "",
                "question_index": k,
            })
    return rows


def _text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def load_mrqa(path: str | Path) -> list[dict[str, Any]]:
    """The rows (see `mrqa_rows`) of an MRQA file, plain or gzip."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"MRQA file not found: {path}")
    lines = _text(path).splitlines()
    if not lines or not is_mrqa(lines[0]):
        raise ValueError(f"{path} does not start with an MRQA header line ({{\"header\": ...}})")
    return mrqa_rows(lines[1:], str(path))
