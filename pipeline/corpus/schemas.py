"""Output schemas, written once and passed explicitly to every Parquet write, and the QA jobs' per-shard
summaries of them.

The summaries run in the workers that write (JobSpec.summarize): they live here, not with the jobs that
name them, so those workers import pyarrow and not the model (pipeline.corpus.extraction imports torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_I32_LIST = pa.list_(pa.int32())


def mining_schema(layout: str = "collapsed") -> pa.Schema:
    """One row per pretraining sequence; feeds SplinterForPreTraining after padding (splinter.collate)."""
    fields = [
        pa.field("doc_id", pa.string(), nullable=False),
        # A document's rows in order, 0, 1, ... across all its duplication passes (so == 0 once per document).
        pa.field("seq_index", pa.int32(), nullable=False),
        # The duplication pass (--dupe-factor N: 0..N-1) that produced the row.
        pa.field("dupe_index", pa.int32(), nullable=False),
        pa.field("input_ids", _I32_LIST, nullable=False),
        pa.field("attention_mask", _I32_LIST, nullable=False),
        pa.field("token_type_ids", _I32_LIST, nullable=False),
        pa.field("question_positions", _I32_LIST, nullable=False),
        pa.field("start_positions", _I32_LIST, nullable=False),
        pa.field("end_positions", _I32_LIST, nullable=False),
        # The n-gram each [QUESTION] replaced, aligned with question_positions: for audit.
        pa.field("masked_spans", pa.list_(pa.string()), nullable=False),
    ]
    if layout == "original":
        # The authors' layout keeps span length with [PAD]s; positions skip them (exclusive cumsum of the mask).
        fields.append(pa.field("position_ids", _I32_LIST, nullable=False))
    return pa.schema(fields)


def qa_schema(n_best: int = 0, corpus: bool = False) -> pa.Schema:
    """One row per input question (corpus mode: per document and question); bad rows carry `error` and no
    answer. `score` is the best span's start + end logit, `null_score` the [CLS] start + end (lowest over
    the windows); `has_answer` is false where the model found no span or the job's abstention rule said no."""
    keys = [pa.field("doc_id", pa.string()), pa.field("question_id", pa.string())] if corpus else [
        pa.field("id", pa.string())]
    fields = [
        *keys,
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("start_char", pa.int32()),
        pa.field("end_char", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("null_score", pa.float32()),
        pa.field("has_answer", pa.bool_()),
        pa.field("error", pa.string()),
    ]
    if n_best:
        fields += [
            pa.field("nbest_answers", pa.list_(pa.string())),
            pa.field("nbest_start_char", _I32_LIST),
            pa.field("nbest_end_char", _I32_LIST),
            pa.field("nbest_scores", pa.list_(pa.float32())),
            pa.field("nbest_probabilities", pa.list_(pa.float32())),
        ]
    return pa.schema(fields)


def summarize_qa(table: pa.Table) -> dict[str, Any]:
    answered = pc.invert(pc.is_null(table["answer"]))
    scores = pc.filter(table["score"], answered).to_numpy(zero_copy_only=False)
    return {
        "answered": int(pc.sum(answered).as_py() or 0),
        "score_sum": float(np.sum(scores, dtype=np.float64)) if len(scores) else 0.0,
    }


def summarize_corpus_qa(table: pa.Table) -> dict[str, Any]:
    """As summarize_qa, plus every pair's error reason: the runner's `errors` count source rows
    (documents), and one document holds many pairs."""
    stats = summarize_qa(table)
    reasons = pc.value_counts(pc.drop_null(table["error"])).to_pylist()
    stats["pair_errors"] = {r["values"]: int(r["counts"]) for r in reasons}
    return stats
