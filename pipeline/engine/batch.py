"""Columnar batches (dicts of numpy arrays) and how a stage is applied to one.

Every row carries the internal accounting columns (`INTERNAL`, see `pipeline.engine.spec`); stages never see
them: `apply_stage` strips them and puts them back, following the `_source` column a row-count-changing
stage returns, so every source row stays accounted for however a stage splits or merges rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.engine.spec import INTERNAL, Batch
from pipeline.storage.sources import ReadOptions, Shard, read_shard


def rows_to_batch(rows: list[dict[str, Any]], columns: list[str]) -> Batch:
    out: Batch = {}
    for c in columns:
        values = [r.get(c) for r in rows]
        if c in ("_shard", "_row", "_sub", "_src", "_den", "_shard_rows"):
            out[c] = np.asarray(values, dtype=np.int64)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[c] = arr
    return out


def batch_len(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def _as_rows(col: np.ndarray) -> np.ndarray:
    """A column as a 1-D array of row values (Ray may hand a fixed-shape list column as 2-D)."""
    if col.ndim == 1:
        return col
    rows = np.empty(len(col), dtype=object)
    rows[:] = list(col)
    return rows


def concat_batches(batches: list[Batch]) -> Batch:
    batches = [b for b in batches if batch_len(b)]
    if not batches:
        return {}
    if len(batches) == 1:
        return batches[0]
    keys = list(batches[0])
    out: Batch = {}
    for k in keys:
        cols = [b[k] for b in batches]
        if all(c.ndim == 1 and c.dtype != object for c in cols) and len({c.dtype for c in cols}) == 1:
            out[k] = np.concatenate(cols)
        else:
            out[k] = np.concatenate([_as_rows(c).astype(object) for c in cols])
    return out


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}


def read_batch(shard_dicts: list[dict[str, Any]], opts: ReadOptions) -> Batch:
    """Rows of the given shards, tagged with the internal columns."""
    rows: list[dict[str, Any]] = []
    for d in shard_dicts:
        shard = Shard.from_dict(d)
        shard_rows = read_shard(shard, opts)
        for i, r in enumerate(shard_rows):
            r.update(_shard=shard.index, _row=i, _sub=0, _src=1, _den=1, _shard_rows=len(shard_rows))
        rows += shard_rows
    payload = ["doc_id", "text"] if opts.kind == "documents" else ["id", "question", "context"]
    if opts.kind == "documents" and "fields" in opts.extra:
        payload.append("fields")  # corpus QA's template fields (pipeline.storage.sources._document_row)
    return rows_to_batch(rows, payload + list(INTERNAL))


def apply_stage(stage: Callable[[Batch], Batch], batch: Batch) -> Batch:
    """Run a stage on the payload columns and carry the internal columns across.

    A stage that changes the number of rows must return `_source` (the input row index of each
    output row) and at least one row per input row (a skip row with a reason if nothing else), so
    every source row stays accounted for.
    """
    batch = dict(batch)
    internal = {k: np.asarray(batch.pop(k)) for k in INTERNAL if k in batch}
    n = len(internal["_row"])
    if n == 0:
        return {**batch, **internal}
    out = dict(stage(batch))
    if "_source" in out:
        src = np.asarray(out.pop("_source"), dtype=np.int64)
        if len(src) and (src.min() < 0 or src.max() >= n):
            raise RuntimeError(f"{type(stage).__name__} returned _source outside [0, {n})")
        if len(np.unique(src)) != n:
            raise RuntimeError(f"{type(stage).__name__} dropped input rows: every row needs an output or a skip row")
        # Position of each output row among those of the same source, in output order.
        order = np.argsort(src, kind="stable")
        sub = np.empty(len(src), dtype=np.int64)
        starts = np.r_[0, np.flatnonzero(np.diff(src[order])) + 1]
        counts = np.diff(np.r_[starts, len(src)])
        sub[order] = np.arange(len(src)) - np.repeat(starts, counts)
        carried = {k: v[src] for k, v in internal.items()}
        carried["_sub"] = carried["_sub"] * 1_000_000 + sub
        carried["_src"] = np.where(sub == 0, carried["_src"], 0)
        carried["_den"] = carried["_den"] * np.repeat(counts, counts)[np.argsort(order, kind="stable")]
    else:
        got = batch_len(out)
        if got != n:
            raise RuntimeError(f"{type(stage).__name__} returned {got} rows for {n} without a _source column")
        carried = internal
    return {**out, **carried}


def apply_chunked(stage: Callable[[Batch], Batch], batch: Batch, size: int) -> Batch:
    """apply_stage over consecutive slices of at most `size` rows, concatenated."""
    n = batch_len(batch)
    return concat_batches([apply_stage(stage, slice_batch(batch, i, i + size)) for i in range(0, n, size)])


def stream_chunked(stage: Callable[[Batch], Batch], batch: Batch, size: int) -> Iterator[Batch]:
    """apply_chunked's output batch by batch, as each is made: per slice of at most `size` rows, the stage's
    output, or for a stage with a `stream` method (its output in consecutive batches) each batch it yields."""
    stream = getattr(stage, "stream", None)
    for i in range(0, batch_len(batch), size):
        if stream is None:
            yield apply_stage(stage, slice_batch(batch, i, i + size))
        else:
            yield from apply_stream(stream, slice_batch(batch, i, i + size), type(stage).__name__)


def apply_stream(stream: Callable[[Batch], Iterable[Batch]], batch: Batch, name: str = "stage") -> Iterator[Batch]:
    """apply_stage for a stage whose output comes in consecutive batches (`stream(batch)` yields them).

    Every yielded batch carries `_source`, in ascending order; one source's rows may go on over the next
    batches. The internal columns are apply_stage's, numbered across batches, except for the weights:
    rows of a source whose output goes on in the next batch weigh nothing (`_den` 0), and its last batch
    carries its whole weight, so a shard's receipts add up to its row count only once its last rows are
    through. To know whether a source goes on, one output batch is held back until the next one comes.
    """
    batch = dict(batch)
    internal = {k: np.asarray(batch.pop(k)) for k in INTERNAL if k in batch}
    n = len(internal["_row"])
    if n == 0:
        yield {**batch, **internal}
        return
    made = np.zeros(n, dtype=np.int64)  # rows each source has had so far
    held: tuple[Batch, np.ndarray] | None = None
    for out in stream(batch):
        out = dict(out)
        src = np.asarray(out.pop("_source"), dtype=np.int64)
        if not len(src):
            continue
        if src.min() < 0 or src.max() >= n:
            raise RuntimeError(f"{name} returned _source outside [0, {n})")
        if (np.diff(src) < 0).any() or (held is not None and src[0] < held[1][-1]):
            raise RuntimeError(f"{name} streamed its rows out of _source order")
        if held is not None:
            yield _carry_streamed(*held, internal, made, goes_on=bool(src[0] == held[1][-1]))
        held = (out, src)
    if held is not None:
        yield _carry_streamed(*held, internal, made, goes_on=False)
    if (made == 0).any():
        raise RuntimeError(f"{name} dropped input rows: every row needs an output or a skip row")


def _carry_streamed(out: Batch, src: np.ndarray, internal: Batch, made: np.ndarray, goes_on: bool) -> Batch:
    """One streamed output batch with its internal columns (see apply_stream); `made` is updated."""
    starts = np.r_[0, np.flatnonzero(np.diff(src)) + 1]
    counts = np.diff(np.r_[starts, len(src)])
    sources = src[starts]
    sub = made[src] + np.arange(len(src)) - np.repeat(starts, counts)
    made[sources] += counts
    weight_rows = counts.copy()  # a source's rows here share its weight, unless it goes on
    if goes_on:
        weight_rows[-1] = 0
    carried = {k: v[src] for k, v in internal.items()}
    carried["_sub"] = carried["_sub"] * 1_000_000 + sub
    carried["_src"] = np.where(sub == 0, carried["_src"], 0)
    carried["_den"] = carried["_den"] * np.repeat(weight_rows, counts)
    return {**out, **carried}


def rebatch(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """The rows of `batches`, in order, in slices of `size` rows (the last may be shorter): the slices a
    whole concatenation would be cut into, made as the batches come."""
    buffer: list[Batch] = []
    held = 0
    for batch in batches:
        if not batch_len(batch):
            continue
        buffer.append(batch)
        held += batch_len(batch)
        if held >= size:
            merged = concat_batches(buffer)
            start = 0
            while held - start >= size:
                yield slice_batch(merged, start, start + size)
                start += size
            buffer = [slice_batch(merged, start, held)] if start < held else []
            held -= start
    if buffer:
        yield concat_batches(buffer)


def _to_arrow(col: np.ndarray, typ: pa.DataType, n: int) -> pa.Array:
    if col is None:
        return pa.nulls(n, typ)
    col = _as_rows(np.asarray(col)) if not isinstance(col, np.ndarray) or col.ndim > 1 else col
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        flat = _flat_list_column(col, typ)
        if flat is not None:
            return flat
        return pa.array([None if v is None else (v if isinstance(v, list | np.ndarray) else list(v))
                         for v in col], type=typ)
    if col.dtype == object:
        return pa.array(col.tolist(), type=typ)
    return pa.array(col, type=typ, from_pandas=True)


def _flat_list_column(col: np.ndarray, typ: pa.DataType) -> pa.Array | None:
    """A column of 1-D numeric numpy arrays (a stage's token ids) as a list array made from one
    concatenation and its offsets, mostly outside Arrow's allocator; None for any other column."""
    value_type = typ.value_type
    kinds = "iu" if pa.types.is_integer(value_type) else "f" if pa.types.is_floating(value_type) else ""
    if not kinds or not len(col) or not all(
            isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in kinds for v in col):
        return None
    offsets = np.zeros(len(col) + 1, dtype=np.int64)
    np.cumsum([len(v) for v in col], out=offsets[1:])
    large = pa.types.is_large_list(typ)
    if not large and offsets[-1] >= 2**31:
        return None
    values = pa.array(np.concatenate(list(col)), type=value_type)
    array_class = pa.LargeListArray if large else pa.ListArray
    return array_class.from_arrays(pa.array(offsets, type=pa.int64() if large else pa.int32()), values, type=typ)


def to_table(batch: Batch, schema: pa.Schema, extra: tuple[str, ...] = ()) -> pa.Table:
    n = batch_len(batch)
    arrays = [_to_arrow(batch.get(f.name), f.type, n) for f in schema]
    names = [f.name for f in schema]
    for k in extra:
        arrays.append(pa.array(np.asarray(batch[k], dtype=np.int64)))
        names.append(k)
    return pa.Table.from_arrays(arrays, names=names)
