"""The one runner: maps a job's stages onto Ray Data, or runs them in a plain local loop.

Both engines share every piece that touches data (reading a shard, applying a stage, writing a
part, committing a shard), so they produce identical rows. Only scheduling differs.

Exactly-once output, shard by shard:
1. the reader tags each row with internal columns (`_shard`, `_row`, `_shard_rows`...);
2. stages never see those columns: `apply_stage` strips them and puts them back, following the
   `_source` column a row-count-changing stage returns;
3. the writer hands the driver only a tiny receipt per shard in its batch: how many source rows
   the batch accounts for. A batch holding a whole shard (the usual case: Ray fuses read, task
   stages and writer into one task per shard) is published on the spot; otherwise the batch goes
   to `OUT/_staging/<shard>/` as a part named by its first row;
4. when a shard's receipts add up to its row count, its parts are merged in row order; either way
   a shard lands as `OUT/<shard>.parquet` (temporary file, then rename) with
   `OUT/_stats/<shard>.json` written last as its completion marker;
5. when all shards are committed, `OUT/stats.json` and `OUT/_SUCCESS` are written.
A crash leaves committed shards intact and no `_SUCCESS`; `--resume` redoes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.resources import Resources
from pipeline.sources import ReadOptions, Shard, expand_inputs, filesystem, plan_shards, read_shard
from pipeline.stats import merge_stats

Batch = dict[str, np.ndarray]
# _src: 1 on one output row per source row (for counting sources in stats).
# _den: each row stands for 1/_den of its source row, so a shard is complete exactly when the
#       weights that reached the writer add up to its row count, however rows were split or reordered.
INTERNAL = ("_shard", "_row", "_sub", "_src", "_den", "_shard_rows", "_error")


@dataclass(frozen=True)
class StageSpec:
    """A stage class, the plain kwargs to build it with (on the worker), and what it needs."""

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: Resources | None = None

    @property
    def res(self) -> Resources:
        return self.resources or getattr(self.cls, "resources", Resources())

    def build(self) -> Callable[[Batch], Batch]:
        return self.cls(**self.kwargs)


@dataclass(frozen=True)
class JobSpec:
    """Everything the runner needs to know about a job; holds no logic of its own."""

    name: str
    read: ReadOptions
    stages: list[StageSpec]
    schema: pa.Schema
    reason_column: str  # where a row's skip/error reason lives
    drop_reason_rows: bool  # mining drops skipped docs (counted); QA keeps error rows (rows out = rows in)
    summarize: Callable[[pa.Table], dict[str, Any]] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    write_batch_size: int = 1024


class OutputExistsError(RuntimeError):
    pass


# ---------------------------------------------------------------- batches

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


# ---------------------------------------------------------------- the shared pieces

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


def _to_arrow(col: np.ndarray, typ: pa.DataType, n: int) -> pa.Array:
    if col is None:
        return pa.nulls(n, typ)
    col = _as_rows(np.asarray(col)) if not isinstance(col, np.ndarray) or col.ndim > 1 else col
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return pa.array([None if v is None else (v if isinstance(v, list | np.ndarray) else list(v))
                         for v in col], type=typ)
    if col.dtype == object:
        return pa.array(col.tolist(), type=typ)
    return pa.array(col, type=typ, from_pandas=True)


def to_table(batch: Batch, schema: pa.Schema, extra: tuple[str, ...] = ()) -> pa.Table:
    n = batch_len(batch)
    arrays = [_to_arrow(batch.get(f.name), f.type, n) for f in schema]
    names = [f.name for f in schema]
    for k in extra:
        arrays.append(pa.array(np.asarray(batch[k], dtype=np.int64)))
        names.append(k)
    return pa.Table.from_arrays(arrays, names=names)


def _reason_counts(reasons: np.ndarray, src: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason, s in zip(reasons.tolist(), src.tolist(), strict=True):
        if s and reason:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def write_parts(batch: Batch, spec: JobSpec, output: str) -> Batch:
    """Write one part per shard present in the batch; return receipts (tiny) for the driver."""
    n = batch_len(batch)
    receipts: dict[str, list[Any]] = {"shard": [], "consumed": [], "stats": [], "committed": []}
    if n == 0:
        return {k: np.asarray(v) for k, v in receipts.items()}
    reason = np.asarray(batch.get(spec.reason_column, np.full(n, "", dtype=object)), dtype=object)
    reason = np.where(_is_null(reason), "", reason)
    read_err = np.asarray(batch["_error"], dtype=object)
    reason = np.where(read_err != "", read_err, reason)  # a read failure is the real reason
    # Kept rows store "no reason" as null, not as an empty string.
    batch = {**batch, spec.reason_column: reason, "_reason_out": np.where(reason == "", None, reason)}
    fs, root = filesystem(output)
    for shard in np.unique(batch["_shard"]).tolist():
        mask = batch["_shard"] == shard
        part = {k: v[mask] for k, v in batch.items()}
        src = part["_src"]
        keep = part[spec.reason_column] == "" if spec.drop_reason_rows else np.ones(int(mask.sum()), dtype=bool)
        data = {k: v[keep] for k, v in part.items()}
        table = to_table({**data, spec.reason_column: data["_reason_out"]}, spec.schema, extra=("_row", "_sub"))
        stats: dict[str, Any] = {"rows_in": int(src.sum()), "rows_out": table.num_rows,
                                 "skipped" if spec.drop_reason_rows else "errors":
                                     _reason_counts(part[spec.reason_column], src)}
        if spec.summarize is not None and table.num_rows:
            stats = merge_stats(stats, spec.summarize(table))
        consumed = _weight(part["_den"])
        # The whole shard is in this batch (the usual case when Ray fuses read, stages and writer
        # into one task): publish it here and spare the driver a commit.
        complete = consumed == int(part["_shard_rows"][0])
        if complete:
            _publish(fs, root, shard, table, spec.schema, stats)
        elif table.num_rows:
            first = int(np.argmin(data["_row"] * 10**12 + data["_sub"]))
            name = f"part-{int(data['_row'][first]):010d}-{int(data['_sub'][first]):012d}.parquet"
            staging = f"{root}/_staging/{_shard_name(shard)}"
            fs.create_dir(staging, recursive=True)
            pq.write_table(table, f"{staging}/{name}", filesystem=fs)
        receipts["shard"].append(shard)
        receipts["consumed"].append(str(consumed))
        receipts["stats"].append(json.dumps(stats))
        receipts["committed"].append(complete)
    return {"shard": np.asarray(receipts["shard"], dtype=np.int64),
            "consumed": np.asarray(receipts["consumed"], dtype=object),
            "stats": np.asarray(receipts["stats"], dtype=object),
            "committed": np.asarray(receipts["committed"], dtype=bool)}


def _weight(den: np.ndarray) -> Fraction:
    """Exact sum of 1/den over rows (few distinct denominators, so this is cheap)."""
    values, counts = np.unique(np.asarray(den, dtype=np.int64), return_counts=True)
    return sum((Fraction(int(c), int(v)) for v, c in zip(values, counts, strict=True)), Fraction(0))


def _is_null(arr: np.ndarray) -> np.ndarray:
    return np.asarray([v is None or (isinstance(v, float) and v != v) for v in arr.tolist()], dtype=bool)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def commit_shard(output: str, shard: int, schema: pa.Schema, stats: dict[str, Any]) -> None:
    """Merge a finished shard's parts in row order and publish it atomically, marker last."""
    fs, root = filesystem(output)
    name = _shard_name(shard)
    staging = f"{root}/_staging/{name}"
    info = fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True))
    parts = sorted(i.path for i in info if i.path.endswith(".parquet"))
    if parts:
        table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in parts])
    else:
        table = schema.empty_table().append_column("_row", pa.array([], pa.int64())).append_column(
            "_sub", pa.array([], pa.int64()))
    _publish(fs, root, shard, table, schema, stats)
    if parts:
        fs.delete_dir(staging)


def _publish(fs: pafs.FileSystem, root: str, shard: int, table: pa.Table, schema: pa.Schema,
             stats: dict[str, Any]) -> None:
    """Rows in source order to OUT/<shard>.parquet via a temporary file; the stats marker goes last."""
    name = _shard_name(shard)
    order = pa.compute.sort_indices(table, sort_keys=[("_row", "ascending"), ("_sub", "ascending")])
    table = table.take(order).select([f.name for f in schema]).cast(schema)
    tmp = f"{root}/_tmp/{name}.parquet"
    fs.create_dir(f"{root}/_tmp", recursive=True)
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{root}/{name}.parquet")
    _write_json(fs, f"{root}/_stats/{name}.json", stats)


def _write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
    fs.move(tmp, path)


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


# ---------------------------------------------------------------- output directory state

def plan_fingerprint(spec: JobSpec, shards: list[Shard]) -> str:
    blob = json.dumps({"job": spec.name, "config": spec.config, "shards": [s.to_dict() for s in shards]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_output(output: str, spec: JobSpec, shards: list[Shard], resume: bool, overwrite: bool) -> set[int]:
    """Check the output directory against this run; return the shards already committed."""
    fs, root = filesystem(output)
    info = fs.get_file_info(root)
    fingerprint = plan_fingerprint(spec, shards)
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)):
        if overwrite:
            fs.delete_dir_contents(root)
        elif not resume:
            raise OutputExistsError(
                f"output {output} is not empty: pass --resume to finish an earlier run, or --overwrite to replace it")
        else:
            job_file = f"{root}/_job.json"
            if fs.get_file_info(job_file).type == pafs.FileType.File:
                previous = _read_json(fs, job_file)
                if previous.get("fingerprint") != fingerprint:
                    raise OutputExistsError(
                        f"output {output} was written by a different job, input or configuration; "
                        "use a new output path or --overwrite")
    fs.create_dir(root, recursive=True)
    _write_json(fs, f"{root}/_job.json", {"job": spec.name, "fingerprint": fingerprint, "config": spec.config,
                                          "shards": len(shards)})
    done: set[int] = set()
    stats_dir = fs.get_file_info(pafs.FileSelector(f"{root}/_stats", allow_not_found=True))
    for i in stats_dir:
        base = os.path.basename(i.path)
        if base.startswith("shard-") and base.endswith(".json"):
            idx = int(base[6:11])
            if fs.get_file_info(f"{root}/{_shard_name(idx)}.parquet").type == pafs.FileType.File:
                done.add(idx)
    # Anything half-written by an earlier run is redone from scratch.
    for d in ("_staging", "_tmp"):
        if fs.get_file_info(f"{root}/{d}").type == pafs.FileType.Directory:
            fs.delete_dir(f"{root}/{d}")
    if fs.get_file_info(f"{root}/_SUCCESS").type == pafs.FileType.File:
        fs.delete_file(f"{root}/_SUCCESS")
    return done


def finish_output(output: str, shards: list[Shard], extra: dict[str, Any]) -> dict[str, Any]:
    fs, root = filesystem(output)
    total: dict[str, Any] = {}
    for s in shards:
        total = merge_stats(total, _read_json(fs, f"{root}/_stats/{s.name}.json"))
    total = {**total, **extra, "shards": len(shards), "output": output}
    if extra.get("seconds"):
        total["rows_per_second"] = round(total.get("rows_in", 0) / extra["seconds"], 2)
    for d in ("_staging", "_tmp"):  # empty by now: every part was merged into its shard
        if fs.get_file_info(f"{root}/{d}").type == pafs.FileType.Directory:
            fs.delete_dir(f"{root}/{d}")
    _write_json(fs, f"{root}/stats.json", total)
    _write_json(fs, f"{root}/_SUCCESS", {"shards": len(shards), "rows_out": total.get("rows_out", 0)})
    return total


# ---------------------------------------------------------------- engines

class _Tracker:
    """Adds up receipts per shard and commits each shard the moment it is complete."""

    def __init__(self, spec: JobSpec, shards: list[Shard], committer: Callable[[int, dict[str, Any]], Any],
                 progress: Callable[[str], None] | None):
        self.spec, self.committer, self.progress = spec, committer, progress
        self.shards = {s.index: s for s in shards}
        self.consumed = {i: Fraction(0) for i in self.shards}
        self.stats: dict[int, dict[str, Any]] = {i: {} for i in self.shards}
        self.done: set[int] = set()
        self.rows_done = 0
        self.start = time.perf_counter()

    def feed(self, receipts: Batch) -> None:
        for i in range(batch_len(receipts)):
            shard, rows = int(receipts["shard"][i]), int(receipts["shard_rows"][i])
            self.consumed[shard] += Fraction(str(receipts["consumed"][i]))
            self.stats[shard] = merge_stats(self.stats[shard], json.loads(str(receipts["stats"][i])))
            if self.consumed[shard] > rows:
                raise RuntimeError(f"shard {shard} accounted {self.consumed[shard]} of {rows} rows: duplicated rows")
            if self.consumed[shard] == rows:
                self._complete(shard, already_committed=bool(receipts["committed"][i]))

    def _complete(self, shard: int, already_committed: bool) -> None:
        if not already_committed:
            self.committer(shard, self.stats[shard])
        self.done.add(shard)
        self.rows_done += self.stats[shard].get("rows_in", 0)
        if self.progress:
            rate = self.rows_done / max(time.perf_counter() - self.start, 1e-9)
            self.progress(f"[{self.spec.name}] {len(self.done)}/{len(self.shards)} shards committed, "
                          f"{self.rows_done} rows in ({rate:,.0f} rows/s)")

    def finish(self) -> None:
        """Shards no receipt ever named must be empty; anything else means rows were lost."""
        for idx in sorted(set(self.shards) - self.done):
            if self.consumed[idx]:
                raise RuntimeError(f"shard {idx} is incomplete: only {self.consumed[idx]} rows accounted for")
            if read_shard(self.shards[idx], self.spec.read):
                raise RuntimeError(f"shard {idx} produced rows that never reached the writer")
            self.stats[idx] = {"rows_in": 0, "rows_out": 0}
            self._complete(idx, already_committed=False)


def _write(batch: Batch, spec: JobSpec, output: str) -> Batch:
    """write_parts plus each shard's row count, so receipts alone tell the driver when it is done."""
    receipts = write_parts(batch, spec, output)
    rows = [int(batch["_shard_rows"][batch["_shard"] == s][0]) for s in receipts["shard"].tolist()]
    receipts["shard_rows"] = np.asarray(rows, dtype=np.int64)
    return receipts


def run_local(spec: JobSpec, shards: list[Shard], output: str, progress: Callable[[str], None] | None) -> None:
    """A plain loop over shards and stages: no Ray, same pieces, same rows."""
    stages = [(s.build(), s.res.batch_size) for s in spec.stages]

    def commit(shard: int, stats: dict[str, Any]) -> None:
        commit_shard(output, shard, spec.schema, stats)

    tracker = _Tracker(spec, shards, commit, progress)
    for shard in shards:
        batch = read_batch([shard.to_dict()], spec.read)
        for stage, size in stages:
            batch = apply_chunked(stage, batch, size)
        n = batch_len(batch)
        for i in range(0, n, spec.write_batch_size):
            tracker.feed(_write(slice_batch(batch, i, i + spec.write_batch_size), spec, output))
    tracker.finish()


# Stage construction is cached per worker process so a task-pool stage builds its tokenizer once.
_STAGE_CACHE: dict[tuple[type, str], Callable[[Batch], Batch]] = {}


def _worker_setup() -> None:
    # A Ray worker owns the CPUs Ray gave it: tokenizers' own thread pool would oversubscribe them
    # (and make one worker look like two in scaling measurements).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cached_stage(spec: StageSpec) -> Callable[[Batch], Batch]:
    _worker_setup()
    key = (spec.cls, json.dumps(spec.kwargs, sort_keys=True, default=str))
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = spec.build()
    return _STAGE_CACHE[key]


def _task_stage(batch: Batch, stage: StageSpec, batch_size: int) -> Batch:
    # Ray hands task stages whole blocks (batch_size=None, see run_ray); the stage's batch size
    # is applied here.
    return apply_chunked(_cached_stage(stage), batch, batch_size)


class _ActorStage:
    """Ray actor wrapper: builds the stage once (e.g. a model load), then serves batches."""

    def __init__(self, stage: StageSpec):
        _worker_setup()
        self.stage = stage.build()

    def __call__(self, batch: Batch) -> Batch:
        return apply_stage(self.stage, batch)


def _ray_read(batch: Batch, opts: ReadOptions) -> Batch:
    return read_batch([json.loads(s) for s in batch["shard"]], opts)


class _Committer:
    """One long-lived process for shard commits: a task per commit would start a worker process
    (and import pyarrow) per shard. Only shards split across batches need it."""

    def commit(self, output: str, shard: int, schema: pa.Schema, stats: dict[str, Any]) -> int:
        commit_shard(output, shard, schema, stats)
        return shard


def run_ray(spec: JobSpec, shards: list[Shard], output: str, progress: Callable[[str], None] | None,
            stage_overrides: dict[int, Resources] | None = None) -> None:
    """Stream shards through Ray Data: read tasks -> stage tasks/actor pools -> part writers."""
    import ray

    ds = ray.data.from_items([{"shard": json.dumps(s.to_dict())} for s in shards],
                             override_num_blocks=max(1, len(shards)))
    resources = [(stage_overrides or {}).get(i, stage.res) for i, stage in enumerate(spec.stages)]
    # Reading a shard is cheap: give it the first stage's CPU share and task pool so Ray fuses the
    # two into one task. As a separate operator, read tasks would queue for CPUs the stage holds.
    first = resources[0] if resources else Resources()
    read_args: dict[str, Any] = {"num_cpus": first.num_cpus}
    if not first.actors and first.tasks:
        read_args["compute"] = ray.data.TaskPoolStrategy(size=first.tasks)
    ds = ds.map_batches(_ray_read, fn_kwargs={"opts": spec.read}, batch_size=1, batch_format="numpy", **read_args)
    for stage, res in zip(spec.stages, resources, strict=True):
        common = {"batch_size": res.batch_size, "batch_format": "numpy", "num_cpus": res.num_cpus}
        if res.actors:
            ds = ds.map_batches(_ActorStage, fn_constructor_kwargs={"stage": stage},
                                compute=ray.data.ActorPoolStrategy(size=res.actors), num_gpus=res.num_gpus,
                                **common)
        else:
            # Whole blocks, chunked inside the task: with a row batch size, Ray would bundle many
            # one-row shard descriptors into a single fused read+stage task and serialise the job.
            common["batch_size"] = None
            if res.tasks:
                common["compute"] = ray.data.TaskPoolStrategy(size=res.tasks)
            ds = ds.map_batches(_task_stage, fn_kwargs={"stage": stage, "batch_size": res.batch_size}, **common)
    # batch_size=None: write each block as it arrives. A fixed size would make the writer wait for
    # that many rows, holding back commits (and progress) until the end of small jobs.
    # After a task stage, the writer takes its CPU share and pool so Ray fuses them: the stage's
    # output then goes straight to Parquet instead of through Ray's Arrow conversion and back.
    last = resources[-1] if resources else first
    write_args: dict[str, Any] = {"num_cpus": 0.5}
    if not last.actors:
        write_args = {"num_cpus": last.num_cpus}
        if last.tasks:
            write_args["compute"] = ray.data.TaskPoolStrategy(size=last.tasks)
    ds = ds.map_batches(_write, fn_kwargs={"spec": spec, "output": output},
                        batch_size=None, batch_format="numpy", **write_args)

    committer = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_Committer).remote()
    pending: list[Any] = []

    def commit(shard: int, stats: dict[str, Any]) -> None:
        pending.append(committer.commit.remote(output, shard, spec.schema, stats))

    tracker = _Tracker(spec, shards, commit, progress)
    for receipts in ds.iter_batches(batch_size=None, batch_format="numpy"):
        tracker.feed(receipts)
        if pending:
            ready, pending[:] = ray.wait(pending, num_returns=len(pending), timeout=0)
            ray.get(ready)  # surface commit failures early
    tracker.finish()
    ray.get(pending)
    ray.kill(committer)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to the cluster named by `address` or RAY_ADDRESS; otherwise start an embedded local Ray."""
    import ray

    # Our driver prints one line per committed shard; Ray Data's own progress log would drown it.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we know
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # An explicit "local" so a laptop with a stray `ray start` does not silently get used.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=_local_object_store_bytes(), **kwargs)


def _local_object_store_bytes() -> int:
    # Ray's default (30% of RAM) starves torch on small machines; 2 GiB streams comfortably.
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(2 << 30, max(256 << 20, total * 0.15)))


def run(spec: JobSpec, shards: list[Shard], output: str, *, engine: str = "ray", resume: bool = False,
        overwrite: bool = False, progress: Callable[[str], None] | None = None,
        stage_overrides: dict[int, Resources] | None = None) -> dict[str, Any]:
    """Run a job to completion; return the merged stats (also written to OUT/stats.json)."""
    start = time.perf_counter()
    done = prepare_output(output, spec, shards, resume, overwrite)
    todo = [s for s in shards if s.index not in done]
    if done and progress:
        progress(f"[{spec.name}] resuming: {len(done)} of {len(shards)} shards already committed")
    if todo:
        if engine == "local":
            run_local(spec, todo, output, progress)
        elif engine == "ray":
            run_ray(spec, todo, output, progress, stage_overrides)
        else:
            raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
    seconds = time.perf_counter() - start
    return finish_output(output, shards, {"seconds": round(seconds, 3), "resumed_shards": len(done)})


def run_config(cfg: Any, make_spec: Callable[[], JobSpec], progress: Callable[[str], None] | None = None
               ) -> dict[str, Any]:
    """The common path of every job: validate, plan shards, attach Ray (unless local), run."""
    cfg.validate()
    shards = plan_shards(expand_inputs(cfg.input), cfg.input_format, cfg.shard_rows, cfg.shard_bytes)
    if not cfg.local:
        init_ray(cfg.ray_address, cfg.num_cpus)
    # The spec is built after Ray is up: it may size stages by the cluster's resources.
    return run(make_spec(), shards, cfg.output, engine="local" if cfg.local else "ray", resume=cfg.resume,
               overwrite=cfg.overwrite, progress=progress)
