"""Corpus QA: every question of a list asked of every document -> QATokenize's window rows, one per pair.

In : doc_id, text, fields (JSON object of the document's template fields, or absent)
Out: QATokenize's columns (see pipeline.stages.qa) for one row per (document, question), documents in
     order and each document's questions in list order, plus doc_id, question_id and `_source` (the
     document's row), so the runner keeps every pair accounted to its document.

A document is tokenized once per batch for all its questions: the pairs of a batch go to
`encode_qa_windows` together, which tokenizes each distinct text once and builds every pair's windows
from the document's tokens and offsets by index arithmetic (the windows of two questions differ only in
the question prefix, and in where they cut the document when the questions differ in length). The
windows are exactly those of the paired mode, so the same pair gets the same answer either way.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.engine.resources import Resources
from pipeline.stages.qa import QATokenize
from splinter.tokenizer import SplinterTokenizer

__all__ = ["CorpusQATokenize", "fill_template"]


def fill_template(text: str, fields: tuple[str, ...], values: dict[str, Any]) -> tuple[str | None, str]:
    """(the filled question, "") or (None, why): a missing or empty field is that pair's error."""
    if not fields:
        return text.replace("{{", "{").replace("}}", "}"), ""
    filled: dict[str, str] = {}
    for name in fields:
        value = values.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None, f"missing_field:{name}"
        filled[name] = str(value).strip()
    return text.format_map(filled), ""


class CorpusQATokenize:
    """CPU task stage: document rows x the job's questions -> one window row per (document, question)."""

    resources = Resources(num_cpus=1, batch_size=16)

    def __init__(
        self,
        tokenizer: str | SplinterTokenizer,
        questions: list[tuple[str, str, tuple[str, ...]]],
        max_length: int = 384,
        stride: int = 128,
        max_query_length: int = 64,
        max_context_chars: int | None = None,
    ) -> None:
        if not questions:
            raise ValueError("CorpusQATokenize needs at least one question")
        self.questions = [(str(qid), str(text), tuple(fields)) for qid, text, fields in questions]
        # Whole documents by default: a long document gets more windows, never a silent cut.
        self.pairs = QATokenize(tokenizer, max_length=max_length, stride=stride,
                                max_query_length=max_query_length, max_context_chars=max_context_chars)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        doc_ids = np.asarray(batch["doc_id"])
        texts = np.asarray(batch["text"])
        raw_fields = batch.get("fields")
        ids: list[str] = []
        qids: list[str] = []
        questions: list[str | None] = []
        contexts: list[Any] = []
        pair_errors: list[str] = []
        source: list[int] = []
        for d in range(len(doc_ids)):
            values: dict[str, Any] = {}
            if raw_fields is not None and isinstance(raw_fields[d], str) and raw_fields[d]:
                values = json.loads(raw_fields[d])
            for qid, text, names in self.questions:
                question, error = fill_template(text, names, values)
                ids.append(str(doc_ids[d]))
                qids.append(qid)
                questions.append(question)
                # A pair with an unfillable template carries its reason and no context, so it costs no windows.
                contexts.append(texts[d] if not error else None)
                pair_errors.append(error)
                source.append(d)
        pairs = {"id": _objects(ids), "question": _objects(questions), "context": _objects(contexts)}
        out = self.pairs(pairs)
        errors = [pe or str(e) for pe, e in zip(pair_errors, out["error"], strict=True)]
        # Keep the document's text on every row (the postprocess cuts answers from it), also on error rows.
        out["context"] = _objects([texts[s] if isinstance(texts[s], str) else None for s in source])
        out["error"] = _objects(errors)
        out["doc_id"] = out.pop("id")
        out["question_id"] = _objects(qids)
        out["_source"] = np.asarray(source, dtype=np.int64)
        return out


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out
