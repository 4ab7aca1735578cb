"""The question list of a corpus QA job: read once on the driver, shipped to every tokenizing worker.

A questions file is plain text (one question per line; ids q0, q1, ...), or JSON Lines / CSV / Parquet
with `question_id` and `question` columns. A question may be a template: `{field}` slots are filled
from each document's fields (`Who founded {title}?`); `{{` and `}}` are literal braces.
"""

from __future__ import annotations

import csv
import io
import json
import string
from dataclasses import dataclass

from pipeline.settings import ConfigError
from pipeline.storage.filesystems import read_bytes, strip_codec_suffix

__all__ = ["Question", "read_questions", "template_fields"]


@dataclass(frozen=True)
class Question:
    question_id: str
    text: str  # the question, or a template with {field} slots
    fields: tuple[str, ...] = ()  # the document fields the template needs, in order of appearance


def template_fields(text: str, where: str) -> tuple[str, ...]:
    """The `{field}` names of a template; a malformed template is the user's to fix (ConfigError)."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"{where}: malformed question template {text!r} ({exc}); write literal braces as "
                          "{{ and }}") from None
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ConfigError(f"{where}: template slot {{{name}}} in {text!r} must be a plain field name "
                              "like {title} (no format spec, index or attribute)")
        if name not in names:
            names.append(name)
    return tuple(names)


def _rows(path: str, raw: bytes) -> list[tuple[object, object]]:
    """(question_id, question) per record of a structured questions file."""
    name = strip_codec_suffix(path).lower()
    if name.endswith((".parquet", ".pq")) or raw.startswith(b"PAR1"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(pa.BufferReader(raw))
        missing = [c for c in ("question_id", "question") if c not in table.column_names]
        if missing:
            raise ConfigError(f"--questions {path}: no column {missing[0]!r} (columns: "
                              f"{', '.join(table.column_names)}); a questions table needs question_id, question")
        return list(zip(table.column("question_id").to_pylist(), table.column("question").to_pylist(), strict=True))
    text = raw.decode("utf-8-sig", errors="strict")
    if name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "question" not in reader.fieldnames or "question_id" not in reader.fieldnames:
            raise ConfigError(f"--questions {path}: a CSV needs a header with question_id and question, got "
                              f"{reader.fieldnames}")
        return [(r["question_id"], r["question"]) for r in reader]
    if name.endswith((".jsonl", ".ndjson", ".json")):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise ConfigError(f"--questions {path}:{n} is not valid JSON; one object per line with "
                                  "question_id and question") from None
            if not isinstance(rec, dict) or "question" not in rec:
                raise ConfigError(f"--questions {path}:{n} needs an object with question_id and question")
            out.append((rec.get("question_id"), rec["question"]))
        return out
    # Plain text: one question per line; blank lines and lines starting with '#' are skipped.
    lines = [line.strip() for line in text.splitlines()]
    questions = [line for line in lines if line and not line.startswith("#")]
    return [(f"q{i}", q) for i, q in enumerate(questions)]


def read_questions(path: str) -> list[Question]:
    """The questions of a file (local path or URI), checked: non-empty strings, unique ids, valid templates."""
    try:
        raw = read_bytes(path)
    except (OSError, FileNotFoundError) as exc:
        raise ConfigError(f"--questions {path}: cannot read it ({str(exc).strip().splitlines()[0]})") from None
    try:
        rows = _rows(path, raw)
    except UnicodeDecodeError:
        raise ConfigError(f"--questions {path} is not UTF-8 text; save it as UTF-8") from None
    out: list[Question] = []
    seen: set[str] = set()
    for i, (qid, text) in enumerate(rows):
        where = f"--questions {path} (question {i + 1})"
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: the question is empty or not a string")
        qid = f"q{i}" if qid is None or (isinstance(qid, str) and not qid.strip()) else str(qid)
        if qid in seen:
            raise ConfigError(f"{where}: question_id {qid!r} appears twice; ids must be unique")
        seen.add(qid)
        out.append(Question(qid, text.strip(), template_fields(text, where)))
    if not out:
        raise ConfigError(f"--questions {path} holds no questions")
    return out
