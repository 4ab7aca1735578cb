"""Question/context pairs -> overlapping model windows, for bulk QA and for fine-tuning.

The QA job and `splinter.train` both build their inputs here, so a model is trained on exactly the
window layout it later answers from. Every distinct text is tokenized once (QA batches repeat contexts),
and windows are assembled with numpy index arithmetic instead of per-window backend `Encoding` copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from tokenizers import Encoding

from splinter.encoding import check_text_list, run_backend
from splinter.tokenizer import PAIR_SPECIAL_TOKENS, SplinterTokenizer

__all__ = ["encode_qa_windows", "stride_error"]


def stride_error(max_length: int, stride: int, max_query_length: int) -> str | None:
    """Why these window settings are invalid, or None. A window holds the question (up to
    `max_query_length` tokens), the template's tokens and the context; each window after the first must
    bring at least one new context token. Training, the QA job and its stage all check this one rule."""
    room = max_length - max_query_length - PAIR_SPECIAL_TOKENS
    if 0 <= stride < room:
        return None
    return (f"stride must be in [0, {max(room, 0)}) for max_length {max_length} (a window holds up to "
            f"{max_query_length} question tokens and {PAIR_SPECIAL_TOKENS} template tokens, leaving {room} for "
            f"context), got {stride}")


def encode_qa_windows(
    tokenizer: SplinterTokenizer,
    questions: Sequence[str],
    contexts: Sequence[str],
    max_length: int = 384,
    stride: int = 128,
    max_query_length: int | None = 64,
    pad_to_max_length: bool = False,
) -> dict[str, np.ndarray]:
    """Question/context pairs -> overlapping windows as numpy arrays (run_qa.py style).

    Each pair gets the Splinter template and its context is split into windows of at most
    `max_length` tokens overlapping by `stride` context tokens: the same windows, in the same
    order, as `tokenizer(questions, contexts, truncation="only_second", max_length=...,
    stride=..., return_overflowing_tokens=True)` (and transformers), or, with
    padding_side="left", as `tokenizer(contexts, questions, truncation="only_first", ...)`.
    Questions longer than `max_query_length` tokens keep only their first `max_query_length`
    tokens, as the original Splinter fine-tuning code did (identical to cutting the question text
    after that token); None keeps them whole.

    How: every distinct question and context is tokenized once, without the template, in one
    `encode_batch`; the windows are then assembled with numpy index arithmetic. That skips the
    backend's per-window `Encoding` copies and re-tokenizing repeated contexts.

    Returns, with W windows over N pairs and L = longest window (or `max_length`):
      input_ids, token_type_ids, attention_mask: int32 [W, L], right-padded with [PAD] / 0 / 0;
      offsets: int32 [W, L, 2] character (start, end) in the context, -1 for every non-context
        token (question, template tokens, padding);
      lengths: int32 [W] real tokens per window;
      sample_index: int32 [W] index of the source pair (windows of a pair are consecutive);
      question_position: int32 [W] index of the [QUESTION] token;
      context_start, context_end: int32 [W] token range [start, end) of the context in the window;
      question_truncated: bool [N] whether the question was cut to max_query_length.
    """
    questions = check_text_list(questions, "questions")
    contexts = check_text_list(contexts, "contexts")
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    if max_length <= PAIR_SPECIAL_TOKENS:
        raise ValueError(f"max_length must exceed {PAIR_SPECIAL_TOKENS}, got {max_length}")
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    if max_query_length is not None and max_query_length < 1:
        raise ValueError(f"max_query_length must be >= 1 or None, got {max_query_length}")
    n = len(questions)
    if n == 0:
        return _empty_windows(max_length if pad_to_max_length else 0)

    # Tokenize each distinct text once (QA batches repeat contexts, and often questions).
    uq, q_of = _unique(questions)
    uc, c_of = _unique(contexts)
    encodings = run_backend(tokenizer.backend_for_call(), uq + uc, False)
    q_ids, q_base, q_len = _flatten_ids(encodings[: len(uq)])
    c_ids, c_base, c_len = _flatten_ids(encodings[len(uq) :])
    c_offsets = np.fromiter(
        itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encodings[len(uq) :])),
        dtype=np.int32,
        count=2 * len(c_ids),
    ).reshape(-1, 2)

    nq = q_len[q_of]  # (N,)
    truncated = np.zeros(n, dtype=bool)
    if max_query_length is not None:
        truncated = nq > max_query_length
        nq = np.minimum(nq, max_query_length)
    nc = c_len[c_of]
    room = max_length - nq - PAIR_SPECIAL_TOKENS  # context tokens per window, per pair
    worst = int(np.argmin(room))
    if stride >= room[worst]:
        raise ValueError(
            f"stride ({stride}) must be smaller than max_length ({max_length}) minus the question "
            f"({int(nq[worst])} tokens for pair {worst}) minus {PAIR_SPECIAL_TOKENS} special tokens "
            f"(= {int(room[worst])}); lower the stride, raise max_length, or set max_query_length"
        )

    # The backend's overflow rule: windows start at 0, step, 2*step, ... (step = room - stride)
    # and stop at the first one that reaches the end of the context.
    step = room - stride
    n_windows = 1 + (np.maximum(nc - room, 0) + step - 1) // step  # (N,)
    sample_index = np.repeat(np.arange(n, dtype=np.int32), n_windows)  # (W,)
    first_window = np.cumsum(n_windows) - n_windows
    k = np.arange(len(sample_index)) - first_window[sample_index]  # window number within its pair
    c_start = k * step[sample_index]  # (W,) first context token of the window
    c_count = np.minimum(c_start + room[sample_index], nc[sample_index]) - c_start
    wq = nq[sample_index]
    lengths = (wq + c_count + PAIR_SPECIAL_TOKENS).astype(np.int32)
    w = len(lengths)

    width = max_length if pad_to_max_length else int(lengths.max())
    pos = np.arange(width, dtype=np.int64)[None, :]  # (1, L)
    if tokenizer.padding_side == "right":
        # [CLS] q(nq) [QUESTION] . [SEP] context [SEP]
        question_start = np.ones(w, dtype=np.int64)
        question_position = wq + 1
        context_start = wq + 4
    else:
        # [CLS] context [SEP] q(nq) [QUESTION] . [SEP]
        context_start = np.ones(w, dtype=np.int64)
        question_start = c_count + 2
        question_position = lengths - 3
    context_end = context_start + c_count

    input_ids = np.full((w, width), tokenizer.pad_token_id, dtype=np.int32)
    rows = np.arange(w)
    input_ids[:, 0] = tokenizer.cls_token_id
    input_ids[rows, question_position] = tokenizer.question_token_id
    input_ids[rows, question_position + 1] = tokenizer.dot_token_id
    input_ids[rows, question_position + 2] = tokenizer.sep_token_id
    input_ids[rows, lengths - 1] = tokenizer.sep_token_id
    if tokenizer.padding_side == "left":
        input_ids[rows, context_end] = tokenizer.sep_token_id

    in_question = (pos >= question_start[:, None]) & (pos < (question_start + wq)[:, None])  # (W, L)
    r, col = np.nonzero(in_question)
    input_ids[r, col] = q_ids[q_base[q_of[sample_index[r]]] + col - question_start[r]]

    in_context = (pos >= context_start[:, None]) & (pos < context_end[:, None])  # (W, L)
    r, col = np.nonzero(in_context)
    src = c_base[c_of[sample_index[r]]] + c_start[r] + col - context_start[r]
    input_ids[r, col] = c_ids[src]
    offsets = np.full((w, width, 2), -1, dtype=np.int32)
    offsets[r, col] = c_offsets[src]

    real = pos < lengths[:, None]
    if tokenizer.padding_side == "right":
        type_ids = (pos >= context_start[:, None]) & real
    else:  # transformers' fast template: question 1, "[QUESTION] ." 0, final [SEP] 1
        type_ids = in_question | (pos == (lengths - 1)[:, None])
    return {
        "input_ids": input_ids,
        "token_type_ids": type_ids.astype(np.int32),
        "attention_mask": real.astype(np.int32),
        "offsets": offsets,
        "lengths": lengths,
        "sample_index": sample_index,
        "question_position": question_position.astype(np.int32),
        "context_start": context_start.astype(np.int32),
        "context_end": context_end.astype(np.int32),
        "question_truncated": truncated,
    }


def _unique(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts in first-seen order and, per input, the index of its distinct text."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
    return list(index), inverse


def _flatten_ids(encodings: list[Encoding]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of many encodings back to back, with each one's start and length."""
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    base = np.cumsum(lengths) - lengths
    ids = np.fromiter(
        itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum())
    )
    return ids, base, lengths


def _empty_windows(width: int) -> dict[str, np.ndarray]:
    i32 = np.int32
    return {
        "input_ids": np.zeros((0, width), dtype=i32),
        "token_type_ids": np.zeros((0, width), dtype=i32),
        "attention_mask": np.zeros((0, width), dtype=i32),
        "offsets": np.zeros((0, width, 2), dtype=i32),
        "lengths": np.zeros(0, dtype=i32),
        "sample_index": np.zeros(0, dtype=i32),
        "question_position": np.zeros(0, dtype=i32),
        "context_start": np.zeros(0, dtype=i32),
        "context_end": np.zeros(0, dtype=i32),
        "question_truncated": np.zeros(0, dtype=bool),
    }
