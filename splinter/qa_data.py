"""Training data for extractive QA: examples, labelled windows, length-grouped batches, dynamic padding.

`QAExample.parse` turns a SQuAD / `datasets`-schema record into one example (its first gold answer, as the
authors' fine-tuning uses) or a skip reason. `build_training_windows` cuts every example into the windows the
QA job answers from (`splinter.windows.encode_qa_windows`, the very same function, so training and inference
see identical layouts) and labels each window's answer span from character offsets:

- a window whose context covers the whole answer is labelled with the first context token that ends after
  the answer's first character and the last one that starts before the answer's end (so whitespace, or
  characters the tokenizer drops, never pull a label outside the answer; an answer boundary inside a word
  labels the word piece holding it);
- a window that does not contain the whole answer is labelled (0, 0), the [CLS] token, as transformers'
  run_qa.py and the authors' fine-tuning code (transformers 2.9's SQuAD features) do: the model learns to
  point at [CLS] where the answer is not;
- an example whose answer lies in no window at all is skipped with a reason, never trained on.

`length_grouped_batches` draws an epoch of seeded batches of similar lengths; `collate_windows` pads a batch
only to its own longest window.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from splinter.tokenizer import SplinterTokenizer
from splinter.windows import encode_qa_windows

__all__ = [
    "PAD_MULTIPLE",
    "QAExample",
    "TrainingWindows",
    "build_training_windows",
    "collate_windows",
    "length_grouped_batches",
    "padding_waste",
]

# Batches are padded to a multiple of 8 tokens (what tensor cores and oneDNN kernels like), as the QA job does.
PAD_MULTIPLE = 8
# Examples tokenized per encode_qa_windows call: bounds the (W, L, 2) offsets array on big training sets.
_CHUNK = 512


# ------------------------------------------------------------------------------------------------ examples
@dataclass(frozen=True)
class QAExample:
    """One training question with its first gold answer (character offsets into `context`); an
    unanswerable one (a negative pair) has answer_text "" and answer_start -1."""

    id: str
    question: str
    context: str
    answer_text: str
    answer_start: int

    @property
    def answer_end(self) -> int:
        return self.answer_start + len(self.answer_text)

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> QAExample | str:
        """A record in the SQuAD / `datasets` schema -> an example, or the reason it cannot be one.

        `answers` is `{"text": [...], "answer_start": [...]}` (datasets) or `[{"text", "answer_start"}, ...]`
        (SQuAD JSON); only the first answer is used, as in the authors' fine-tuning. Whitespace around the
        answer text is trimmed (offsets moved with it). Reasons: missing_question, empty_question,
        missing_context, empty_context, no_answer, answer_mismatch (the text is not at answer_start).
        """
        question, context = record.get("question"), record.get("context")
        if not isinstance(question, str):
            return "missing_question"
        if not question.strip():
            return "empty_question"
        if not isinstance(context, str):
            return "missing_context"
        if not context.strip():
            return "empty_context"
        first = _first_answer(record.get("answers"))
        if first is None:
            return "no_answer"
        text, start = first
        stripped = text.strip()
        if not stripped:
            return "no_answer"
        start += len(text) - len(text.lstrip())
        if start < 0 or context[start : start + len(stripped)] != stripped:
            return "answer_mismatch"
        # Questions are left-stripped as run_qa.py does: leading spaces only waste query tokens.
        return cls(str(record.get("id", "")), question.lstrip(), context, stripped, start)


def _first_answer(answers: Any) -> tuple[str, int] | None:
    """(text, answer_start) of the first gold answer in either answers layout, None when there is none."""
    try:
        if isinstance(answers, Mapping):
            texts, starts = answers.get("text"), answers.get("answer_start")
            if texts is None or starts is None or len(texts) == 0 or len(starts) == 0:
                return None
            text, start = texts[0], starts[0]
        elif isinstance(answers, Sequence) and not isinstance(answers, str) and len(answers) > 0:
            text, start = answers[0]["text"], answers[0]["answer_start"]
        else:
            return None
        if not isinstance(text, str):
            return None
        return text, int(start)
    except (KeyError, TypeError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------------- windows
@dataclass
class TrainingWindows:
    """Labelled training windows, stored ragged (no padding) until a batch is collated.

    Window w's tokens are `input_ids[starts[w] : starts[w] + lengths[w]]` (token types likewise).
    `example_index[w]` points into `examples`; `has_answer[w]` is False for [CLS]-labelled windows.
    """

    input_ids: np.ndarray  # int32 (T,), all windows back to back
    token_type_ids: np.ndarray  # int8 (T,)
    starts: np.ndarray  # int64 (W,)
    lengths: np.ndarray  # int32 (W,)
    start_positions: np.ndarray  # int64 (W,)
    end_positions: np.ndarray  # int64 (W,)
    example_index: np.ndarray  # int32 (W,)
    has_answer: np.ndarray  # bool (W,)
    examples: list[QAExample]
    skipped: Counter = field(default_factory=Counter)  # reason -> examples skipped
    skipped_ids: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)

    def __len__(self) -> int:
        return int(self.lengths.size)


def build_training_windows(
    tokenizer: SplinterTokenizer,
    records: Sequence[Mapping[str, Any] | QAExample],
    max_length: int = 384,
    stride: int = 128,
    max_query_length: int | None = 64,
) -> TrainingWindows:
    """Records -> labelled windows (see the module docstring for the labels), skipping bad examples.

    Skip reasons besides `QAExample.parse`'s: answer_not_in_any_window (the answer is cut by every window,
    e.g. longer than a window's context) and answer_has_no_tokens (only characters the tokenizer drops).
    """
    skipped: Counter = Counter()
    skipped_ids: list[tuple[str, str]] = []
    examples: list[QAExample] = []
    for i, record in enumerate(records):
        parsed = record if isinstance(record, QAExample) else QAExample.parse(record)
        if isinstance(parsed, str):
            skipped[parsed] += 1
            skipped_ids.append((_record_id(record, i), parsed))
        else:
            examples.append(parsed)

    parts: list[dict[str, np.ndarray]] = []
    kept: list[QAExample] = []
    for lo in range(0, len(examples), _CHUNK):
        chunk = examples[lo : lo + _CHUNK]
        part = _label_chunk(tokenizer, chunk, max_length, stride, max_query_length)
        ok = part.pop("usable")
        reasons = part.pop("reason")
        for j, example in enumerate(chunk):
            if reasons[j]:
                skipped[reasons[j]] += 1
                skipped_ids.append((example.id, reasons[j]))
        # Renumber the kept examples of this chunk into the running `kept` list.
        new_index = np.cumsum(ok) - 1 + len(kept)
        keep_windows = ok[part["example_index"]]
        keep_tokens = np.repeat(keep_windows, part["lengths"])
        part = {k: v[keep_tokens if k in ("tokens", "types") else keep_windows] for k, v in part.items()}
        part["example_index"] = new_index[part["example_index"]].astype(np.int32)
        kept.extend(e for e, good in zip(chunk, ok, strict=True) if good)
        parts.append(part)

    def cat(name: str, dtype: Any) -> np.ndarray:
        arrays = [p[name] for p in parts if p[name].size]
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)

    lengths = cat("lengths", np.int32)
    return TrainingWindows(
        input_ids=cat("tokens", np.int32),
        token_type_ids=cat("types", np.int8),
        starts=(np.cumsum(lengths, dtype=np.int64) - lengths),
        lengths=lengths,
        start_positions=cat("start", np.int64),
        end_positions=cat("end", np.int64),
        example_index=cat("example_index", np.int32),
        has_answer=cat("has_answer", bool),
        examples=kept,
        skipped=skipped,
        skipped_ids=skipped_ids,
    )


def _record_id(record: Any, index: int) -> str:
    value = record.get("id") if isinstance(record, Mapping) else None
    return str(value) if value is not None else f"#{index}"


def _label_chunk(
    tokenizer: SplinterTokenizer,
    examples: list[QAExample],
    max_length: int,
    stride: int,
    max_query_length: int | None,
) -> dict[str, np.ndarray]:
    """Windows of a few examples with span labels, ragged; plus per example: usable? / skip reason."""
    enc = encode_qa_windows(
        tokenizer,
        [e.question for e in examples],
        [e.context for e in examples],
        max_length=max_length,
        stride=stride,
        max_query_length=max_query_length,
    )
    sample = enc["sample_index"].astype(np.int64)  # (W,)
    a = np.array([e.answer_start for e in examples], dtype=np.int64)[sample]  # (W,) answer chars [a, b)
    b = np.array([e.answer_end for e in examples], dtype=np.int64)[sample]
    lengths = enc["lengths"].astype(np.int64)
    cs, ce = enc["context_start"].astype(np.int64), enc["context_end"].astype(np.int64)
    w = np.arange(sample.size)
    pos = np.arange(enc["input_ids"].shape[1])[None, :]  # (1, L)
    in_ctx = (pos >= cs[:, None]) & (pos < ce[:, None])  # (W, L)
    off_start, off_end = enc["offsets"][..., 0], enc["offsets"][..., 1]  # (W, L), -1 outside the context
    has_ctx = ce > cs
    # The window's context covers the answer when its first token starts at or before the answer and
    # its last token ends at or after the answer's end.
    first_char = off_start[w, np.minimum(cs, off_start.shape[1] - 1)]
    last_char = off_end[w, np.maximum(ce - 1, 0)]
    covers = has_ctx & (first_char <= a) & (last_char >= b)
    # Offsets rise along the context, so counting tokens finds the label positions without a loop.
    start = cs + (in_ctx & (off_end <= a[:, None])).sum(axis=1)  # first token ending after a
    end = cs + (in_ctx & (off_start < b[:, None])).sum(axis=1) - 1  # last token starting before b
    has_answer = covers & (start <= end)
    start = np.where(has_answer, start, 0)
    end = np.where(has_answer, end, 0)

    n = len(examples)
    # An unanswerable example (answer_start < 0, e.g. `finetune --negatives`) is labelled [CLS] in every
    # window, as SQuAD 2.0 training does, and is usable as such.
    impossible = np.array([e.answer_start < 0 for e in examples], dtype=bool)
    any_answer = (np.bincount(sample, weights=has_answer, minlength=n) > 0) | impossible
    any_cover = np.bincount(sample, weights=covers, minlength=n) > 0
    reason = np.where(any_answer, "", np.where(any_cover, "answer_has_no_tokens", "answer_not_in_any_window"))
    real = pos < lengths[:, None]  # row-major boolean indexing strips the padding, windows in order
    return {
        "tokens": enc["input_ids"][real],
        "types": enc["token_type_ids"][real],
        "lengths": lengths,
        "start": start,
        "end": end,
        "example_index": sample,
        "has_answer": has_answer,
        "usable": any_answer,
        "reason": reason,
    }


# ------------------------------------------------------------------------------------------------ batching
def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group_size: int = 50, grouped: bool = True
) -> list[np.ndarray]:
    """One epoch of batches (window indices): shuffled, and with `grouped`, of similar lengths.

    Windows are shuffled, cut into mega-batches of `group_size * batch_size`, sorted by length inside each,
    cut into batches, and the batch order is shuffled again (the scheme of transformers' length-grouped
    sampler): batches hold windows of similar length, so dynamic padding wastes little, while which windows
    meet still changes every epoch on data bigger than one mega-batch.
    """
    order = rng.permutation(lengths.size)
    if grouped:
        mega = batch_size * group_size
        chunks = [order[i : i + mega] for i in range(0, order.size, mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order
    batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))] if grouped else batches


def _padded_width(max_len: int, limit: int) -> int:
    return min(limit, -(-max_len // PAD_MULTIPLE) * PAD_MULTIPLE)


def collate_windows(
    windows: TrainingWindows, index: np.ndarray, width_limit: int = 1 << 30
) -> dict[str, torch.Tensor]:
    """int64 tensors for `SplinterForQuestionAnswering(**batch)`, padded to the batch's longest window
    (rounded up to a multiple of 8, at most `width_limit`): input_ids, attention_mask, token_type_ids,
    start_positions, end_positions."""
    lengths = windows.lengths[index].astype(np.int64)
    b, width = index.size, _padded_width(int(lengths.max()), width_limit)
    row = np.repeat(np.arange(b), lengths)
    col = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    src = np.repeat(windows.starts[index], lengths) + col
    ids = np.zeros((b, width), dtype=np.int64)
    types = np.zeros((b, width), dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    ids[row, col] = windows.input_ids[src]
    types[row, col] = windows.token_type_ids[src]
    mask[row, col] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "token_type_ids": torch.from_numpy(types),
        "start_positions": torch.from_numpy(windows.start_positions[index].copy()),
        "end_positions": torch.from_numpy(windows.end_positions[index].copy()),
    }


def padding_waste(lengths: np.ndarray, batch_size: int, max_length: int, seed: int = 0, group_size: int = 50) -> dict:
    """Share of padded tokens in one epoch under three batching schemes (0 = no padding at all).

    fixed: every window padded to max_length (run_qa.py's default); random: shuffled batches padded to their
    longest window; grouped: our length-grouped batches padded to their longest window (multiple of 8).
    """
    real = float(lengths.sum())
    if not real:
        return {"fixed": 0.0, "random": 0.0, "grouped": 0.0}

    def waste(grouped: bool) -> float:
        batches = length_grouped_batches(lengths, batch_size, np.random.default_rng(seed), group_size, grouped)
        padded = sum(b.size * _padded_width(int(lengths[b].max()), max_length) for b in batches)
        return 1.0 - real / padded

    return {"fixed": 1.0 - real / (lengths.size * max_length), "random": waste(False), "grouped": waste(True)}
