"""The output directory: per-shard parts and atomic commits, resume state, stats and `_SUCCESS`.

Layout of OUT (one file per input shard, deterministic names, so reruns are idempotent):
    OUT/shard-NNNNN.parquet   a committed shard (temporary file, then rename)
    OUT/_stats/shard-NNNNN.json  its stats, written last: the shard's completion marker
    OUT/_staging/, OUT/_tmp/  parts of shards split across batches, files being written
    OUT/_job.json             what wrote this directory (job, plan fingerprint): resume checks it
    OUT/stats.json, OUT/_SUCCESS  written once every shard is committed
"""

from __future__ import annotations

import hashlib
import json
import os
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.batch import batch_len, to_table
from pipeline.sources import Shard, filesystem
from pipeline.spec import Batch, JobSpec
from pipeline.stats import merge_stats


class OutputExistsError(RuntimeError):
    pass


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
