"""Batch mined pretraining rows into padded tensors for `SplinterForPreTraining`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["collate_pretraining"]

# Token-level and question-level columns; all are right-padded with 0. A padded question points at
# [CLS] with label 0, which the pretraining loss ignores (ignore_index 0).
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
QUESTION_COLUMNS = ("question_positions", "start_positions", "end_positions")


def _rows(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> list[Mapping[str, Any]]:
    if isinstance(rows, Mapping):
        names = list(rows)
        sizes = {len(rows[name]) for name in names}
        if len(sizes) > 1:
            raise ValueError(f"columns have different lengths: {sorted(sizes)}")
        size = sizes.pop() if sizes else 0
        return [{name: rows[name][i] for name in names} for i in range(size)]
    return list(rows)


def _pad(values: list[np.ndarray], multiple: int = 1) -> torch.Tensor:
    width = max((len(v) for v in values), default=0)
    width = -(-width // multiple) * multiple  # round up: tensor cores like multiples of 8
    out = np.zeros((len(values), width), dtype=np.int64)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return torch.from_numpy(out)


def collate_pretraining(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Mined rows (a list of dicts, or a dict of columns) -> int64 tensors padded to the batch max.

    Returns input_ids, attention_mask, token_type_ids (and position_ids when the rows carry them,
    i.e. layout "original"), all (B, S), and question_positions, start_positions, end_positions,
    all (B, Q), ready for `SplinterForPreTraining(**batch)`. Skip rows (no tokens) are refused:
    filter on `skip_reason == ""` first. `pad_to_multiple_of` rounds the token width up (the
    question width stays the batch max).
    """
    rows = _rows(rows)
    if not rows:
        raise ValueError("cannot collate an empty batch")
    columns: dict[str, list[np.ndarray]] = {}
    for name in TOKEN_COLUMNS + QUESTION_COLUMNS:
        present = [name in row and row[name] is not None for row in rows]
        if not any(present):
            if name == "position_ids":
                continue
            raise ValueError(f"rows have no {name!r} column")
        if not all(present):
            raise ValueError(f"only some rows carry {name!r}; do not mix mining layouts in one batch")
        columns[name] = [np.asarray(row[name], dtype=np.int64).reshape(-1) for row in rows]
    if any(len(v) == 0 for v in columns["input_ids"]):
        raise ValueError("a row has no tokens (a skip row?); keep only rows with skip_reason == ''")
    for lead, group in (("input_ids", TOKEN_COLUMNS), ("question_positions", QUESTION_COLUMNS)):
        sizes = [len(v) for v in columns[lead]]
        for name in group:
            if name in columns and [len(v) for v in columns[name]] != sizes:
                raise ValueError(f"{name} and {lead} differ in length in some row")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    return {
        name: _pad(values, pad_to_multiple_of if name in TOKEN_COLUMNS else 1) for name, values in columns.items()
    }
