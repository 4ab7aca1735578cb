"""Bulk extractive QA: tokenize into windows -> model + exact span decoding -> answer text.

Every stage keeps ONE ROW PER QUESTION, in order: a question's windows travel inside its row as
flat 1-D arrays (Arrow list columns), never as extra rows, so nothing needs regrouping and no row
can be lost. Rows that cannot be answered keep their place and carry an `error` reason.

Columns (all stages also pass `id` and `question` through):

QATokenize  in : id, question, context (object; values may be None / not str / empty)
            out: id, question, context, error (str, "" if fine), num_windows (int32),
                 window_lengths (int32[num_windows]), input_ids (int32[sum of lengths]),
                 token_type_ids (int8[...]), offsets (int32[2 * sum of lengths]: char start/end
                 per token, -1 for tokens outside the context)
QAModel     in : the above
            out: id, question, context, error, best_window, start_token, end_token, start_char,
                 end_char (int32, -1 if none), score (float32, NaN if none); with n_best > 0 also
                 nbest_start_char, nbest_end_char (int32[k]), nbest_scores, nbest_probabilities (float32[k])
QAPostprocess in : the above
            out: id, question, answer (str | None), start_char, end_char (int32, -1 if none),
                 score (float32, NaN if none), error (str | None); with n_best > 0 also
                 nbest_answers (a list of k str: Arrow list<string>; a numpy object array of str
                 would be pickled by Ray), nbest_scores, nbest_probabilities (float32[k]),
                 nbest_start_char, nbest_end_char (int32[k])

Token -> character mapping happens inside QAModel, where the offsets are at hand, so the heavy
token columns (ids, types, offsets) are dropped there and only a few scalars per question move to
the postprocess stage, which turns character spans into text and the final schema.

QAModel lives in pipeline.stages.qa_model: it alone needs torch, and the workers that tokenize and write
import only this module. The layout above is the contract between the two files.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.engine.resources import Resources
from splinter.tokenizer import SplinterTokenizer
from splinter.windows import encode_qa_windows, stride_error

log = logging.getLogger(__name__)

__all__ = ["QATokenize", "QAPostprocess"]

# doc_id / question_id: corpus mode's pair keys (pipeline.stages.corpus_qa), passed through as they are.
_INPUT_COLUMNS = ("id", "question", "context", "doc_id", "question_id")


def _object_array(values: list[Any]) -> np.ndarray:
    """A 1-D object array, even when every element is itself an array of the same length."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):  # element-wise: slice assignment would broadcast equal-length lists
        out[i] = value
    return out


def _strings_or_none(values: np.ndarray) -> np.ndarray:
    return _object_array([v if isinstance(v, str) else None for v in values])


def _column(batch: dict[str, np.ndarray], name: str, stage: str) -> np.ndarray:
    if name not in batch:
        raise ValueError(
            f"{stage} needs a {name!r} column; the batch has {sorted(batch)}. "
            "Rename the input columns (ExtractConfig.id_column / question_column / context_column)."
        )
    return np.asarray(batch[name])


def _flat(values: np.ndarray, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate a column of 1-D arrays; also return each row's length."""
    parts = [np.asarray(v, dtype=dtype).reshape(-1) for v in values]
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return flat.astype(dtype, copy=False), lengths


# ------------------------------------------------------------------------------------------------ tokenize
class QATokenize:
    """CPU task stage: (question, context) rows -> the question's overlapping windows, flattened into the row."""

    resources = Resources(num_cpus=1, batch_size=256)

    def __init__(
        self,
        tokenizer: str | SplinterTokenizer,
        max_length: int = 384,
        stride: int = 128,
        max_query_length: int = 64,
        max_context_chars: int | None = 100_000,
    ) -> None:
        # None: no limit (corpus mode windows whole documents, however long).
        if max_context_chars is not None and max_context_chars < 1:
            raise ValueError(f"max_context_chars must be >= 1, got {max_context_chars}")
        if max_query_length < 1:
            raise ValueError(f"max_query_length must be >= 1, got {max_query_length}")
        # Checked once here so that no question in a batch can make the tokenizer reject the whole batch.
        if error := stride_error(max_length, stride, max_query_length):
            raise ValueError(error)
        # A job ships the tokenizer itself (read once on the driver); a path is for direct use.
        if not isinstance(tokenizer, SplinterTokenizer):
            tokenizer = SplinterTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.stride = stride
        self.max_query_length = max_query_length
        self.max_context_chars = max_context_chars

    def _row_error(self, question: Any, context: Any) -> str:
        if question is None:
            return "missing_question"
        if not isinstance(question, str):
            return "question_not_string"
        if not question.strip():
            return "empty_question"
        if context is None:
            return "missing_context"
        if not isinstance(context, str):
            return "context_not_string"
        if not context.strip():
            return "empty_context"
        if self.max_context_chars is not None and len(context) > self.max_context_chars:
            return "context_too_long"
        return ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = _column(batch, "id", "QATokenize")
        questions = _column(batch, "question", "QATokenize")
        contexts = _column(batch, "context", "QATokenize")
        n = len(questions)
        errors = [self._row_error(q, c) for q, c in zip(questions, contexts, strict=True)]
        good = [i for i in range(n) if not errors[i]]
        enc = encode_qa_windows(
            self.tokenizer,
            [questions[i] for i in good],
            [contexts[i] for i in good],
            max_length=self.max_length,
            stride=self.stride,
            max_query_length=self.max_query_length,
        )
        per_row = _split_windows(enc, len(good))
        empty_i32 = np.zeros(0, dtype=np.int32)
        cols: dict[str, list[Any]] = {k: [empty_i32] * n for k in ("window_lengths", "input_ids", "offsets")}
        cols["token_type_ids"] = [np.zeros(0, dtype=np.int8)] * n
        num_windows = np.zeros(n, dtype=np.int32)
        for j, i in enumerate(good):
            lengths, input_ids, type_ids, offsets = per_row[j]
            if lengths.size == 0:  # e.g. a context that tokenizes to nothing (only control characters)
                errors[i] = "no_context_tokens"
                continue
            num_windows[i] = lengths.size
            cols["window_lengths"][i] = lengths
            cols["input_ids"][i] = input_ids
            cols["token_type_ids"][i] = type_ids
            cols["offsets"][i] = offsets
        # Non-string values are replaced by None (their `error` says what they were) so these columns
        # stay plain Arrow strings instead of pickled Python objects.
        out = {"id": ids, "question": _strings_or_none(questions), "context": _strings_or_none(contexts)}
        out["error"] = _object_array(errors)
        out["num_windows"] = num_windows
        for name, values in cols.items():
            out[name] = _object_array(values)
        return out


def _split_windows(enc: dict[str, np.ndarray], num_rows: int) -> list[tuple[np.ndarray, ...]]:
    """Group the tokenizer's padded (W, L) window arrays by question: (lengths, ids, types, offsets) per row."""
    lengths = np.asarray(enc["lengths"], dtype=np.int32)
    sample = np.asarray(enc["sample_index"], dtype=np.int64)
    if np.any(np.diff(sample) < 0):
        raise RuntimeError("tokenizer returned windows out of question order")
    # Row-major boolean indexing strips the padding and concatenates the windows in order.
    real = np.arange(enc["input_ids"].shape[1])[None, :] < lengths[:, None]  # (W, L)
    ids = enc["input_ids"][real].astype(np.int32, copy=False)
    types = enc["token_type_ids"][real].astype(np.int8)
    offsets = enc["offsets"][real].astype(np.int32, copy=False).reshape(-1)  # (T * 2,)
    # Window w spans flat tokens [tok_bounds[w], tok_bounds[w + 1]).
    tok_bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    win_bounds = np.searchsorted(sample, np.arange(num_rows + 1), side="left")
    rows = []
    for r in range(num_rows):
        w0, w1 = win_bounds[r], win_bounds[r + 1]
        t0, t1 = tok_bounds[w0], tok_bounds[w1]
        rows.append((lengths[w0:w1], ids[t0:t1], types[t0:t1], offsets[2 * t0 : 2 * t1]))
    return rows


# ---------------------------------------------------------------------------------------------- postprocess
class QAPostprocess:
    """CPU task stage: character spans -> answer text and the final output columns."""

    resources = Resources(num_cpus=1, batch_size=256)

    def __init__(
        self,
        n_best: int = 0,
        min_score: float | None = None,
        null_margin: float | None = None,
        top_k: int = 0,
    ) -> None:
        """Abstention: with `min_score` an answer needs `score >= min_score`; with `null_margin` it needs
        `score - null_score > null_margin`; otherwise `answer` is null and `has_answer` false (the span
        stays in the n-best lists). `top_k`: keep the k best *distinct character spans* of the n-best
        list (overlapping windows find the same span twice; QAModel must be asked for enough of them)."""
        if n_best < 0:
            raise ValueError(f"n_best must be >= 0, got {n_best}")
        if top_k < 0 or (top_k and n_best < top_k):
            raise ValueError(f"top_k must be in [0, n_best={n_best}], got {top_k}")
        self.n_best = n_best
        self.min_score = min_score
        self.null_margin = null_margin
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in ("context", "error", "start_char", "end_char", "score"):
            _column(batch, name, "QAPostprocess")
        contexts = batch["context"]
        start = np.asarray(batch["start_char"], dtype=np.int32)
        end = np.asarray(batch["end_char"], dtype=np.int32)
        n = len(contexts)
        answers: list[str | None] = [None] * n
        errors: list[str | None] = [str(e) if e else None for e in batch["error"]]
        score = np.asarray(batch["score"], dtype=np.float32)
        null = np.asarray(batch["null_score"], dtype=np.float32) if "null_score" in batch else np.full(n, np.nan)
        confident = np.ones(n, dtype=bool)
        with np.errstate(invalid="ignore"):  # NaN scores (no span) compare False: no answer either way
            if self.min_score is not None:
                confident &= score >= self.min_score
            if self.null_margin is not None:
                confident &= (score - null) > self.null_margin
        for i in range(n):
            if errors[i] is None and start[i] >= 0 and confident[i]:
                answers[i] = contexts[i][start[i] : end[i]]
        found = np.array([a is not None for a in answers], dtype=bool)
        scored = np.array([errors[i] is None and start[i] >= 0 for i in range(n)], dtype=bool)
        out: dict[str, np.ndarray] = {}
        for name in ("id", "doc_id", "question_id", "question"):
            if name in batch:
                out[name] = batch[name]
        out["answer"] = _object_array(answers)
        out["start_char"] = np.where(found, start, -1).astype(np.int32)
        out["end_char"] = np.where(found, end, -1).astype(np.int32)
        # Scores stay on abstained rows: they are what a user tunes --min-score / --null-margin on.
        out["score"] = np.where(scored, score, np.nan).astype(np.float32)
        out["null_score"] = np.where(scored, null, np.nan).astype(np.float32)
        out["has_answer"] = found
        out["error"] = _object_array(errors)
        if self.n_best:
            for name in ("nbest_start_char", "nbest_end_char", "nbest_scores", "nbest_probabilities"):
                _column(batch, name, "QAPostprocess (n_best > 0 needs QAModel(n_best > 0))")
            texts = []
            for i in range(n):
                ctx = contexts[i]
                pairs = zip(batch["nbest_start_char"][i], batch["nbest_end_char"][i], strict=True)
                texts.append([ctx[s:e] for s, e in pairs])
            out["nbest_answers"] = _object_array(texts)
            out["nbest_scores"] = _object_array(
                [np.asarray(v, dtype=np.float32) for v in batch["nbest_scores"]]
            )
            out["nbest_probabilities"] = _object_array(
                [np.asarray(v, dtype=np.float32) for v in batch["nbest_probabilities"]]
            )
            out["nbest_start_char"] = _object_array(
                [np.asarray(v, dtype=np.int32) for v in batch["nbest_start_char"]]
            )
            out["nbest_end_char"] = _object_array(
                [np.asarray(v, dtype=np.int32) for v in batch["nbest_end_char"]]
            )
            if self.top_k:
                _keep_distinct(out, self.top_k)
        return out


def _keep_distinct(out: dict[str, np.ndarray], k: int) -> None:
    """Cut each row's n-best lists to its k best distinct (start_char, end_char) spans, best first; the
    probabilities are a softmax over what is kept."""
    names = ("nbest_answers", "nbest_scores", "nbest_start_char", "nbest_end_char")
    kept: dict[str, list[Any]] = {name: [] for name in (*names, "nbest_probabilities")}
    for i in range(len(out["nbest_scores"])):
        seen: set[tuple[int, int]] = set()
        rows = []
        for j, span in enumerate(zip(out["nbest_start_char"][i], out["nbest_end_char"][i], strict=True)):
            key = (int(span[0]), int(span[1]))
            if key not in seen:
                seen.add(key)
                rows.append(j)
            if len(rows) == k:
                break
        for name in names:
            values = out[name][i]
            kept[name].append([values[j] for j in rows] if name == "nbest_answers" else np.asarray(values)[rows])
        scores = np.asarray(out["nbest_scores"][i], dtype=np.float64)[rows]
        probs = np.exp(scores - scores.max()) if len(rows) else scores
        kept["nbest_probabilities"].append((probs / probs.sum() if len(rows) else probs).astype(np.float32))
    for name, values in kept.items():
        out[name] = _object_array(values)
