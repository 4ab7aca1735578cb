"""The output directory: per-shard parts and atomic commits, resume state, stats and the completion marker.

Layout of OUT (one file per input shard, deterministic names, so reruns are idempotent), on top of the
run directory every job keeps (pipeline.storage.rundir: job record, lease, stats, _SUCCESS):
    OUT/shard-NNNNN.parquet                 a committed shard (temporary file, then rename)
    OUT/__splinter__/shards/shard-NNNNN.json   its stats, written last: the shard's completion marker
    OUT/__splinter__/staging/, .../tmp/     parts of shards split across batches, files being written

Only Parquet data sits at the top, so every Parquet reader opens OUT as a dataset: `pd.read_parquet(OUT)`,
`pyarrow.dataset.dataset(OUT)` and Spark skip `_`/`.` names, `datasets.load_dataset("parquet",
data_dir=OUT)` skips `__`-directories (it would try to read a top-level `_SUCCESS` as Parquet), duckdb
reads `OUT/*.parquet`.

Nothing is deleted that this tool did not write: `--overwrite` and `--resume` act only on a directory
holding `__splinter__/job.json` and nothing but our files; anything else is refused, naming what was found.
A resumed run keeps the committed shards and redoes the rest; the job record's fingerprint (settings and
every input file's size and modification time) must match.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.engine.batch import batch_len, to_table
from pipeline.engine.spec import Batch, JobSpec
from pipeline.engine.stats import merge_stats
from pipeline.storage.filesystems import filesystem, install_filesystems
from pipeline.storage.rundir import META, OutputExistsError, RunDir, delete_path, read_json, write_json
from pipeline.storage.sources import Shard

_MARKERS = f"{META}/shards"
_STAGING = f"{META}/staging"
_TMP = f"{META}/tmp"
_SHARD_FILE = re.compile(r"shard-(\d{5,})\.parquet")
_STAGED_ROW_GROUP = 128


def _reason_counts(reasons: np.ndarray, src: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason, s in zip(reasons.tolist(), src.tolist(), strict=True):
        if s and reason:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def write_parts(batch: Batch, spec: JobSpec, output: str, publish: bool = True) -> Batch:
    """Write one part per shard present in the batch; return receipts (tiny) for the driver.

    A batch that completes its shard is published on the spot unless `publish` is False: the caller
    wrote parts of that shard before, and rows that weigh nothing (a streamed stage's, see
    `pipeline.engine.batch.apply_stream`) may sit in them."""
    install_filesystems(spec.read.filesystems)
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
        complete = publish and consumed == int(part["_shard_rows"][0])
        if complete:
            _publish(fs, root, shard, table, spec.schema, stats)
        elif table.num_rows:
            first = int(np.argmin(data["_row"] * 10**12 + data["_sub"]))
            name = f"part-{int(data['_row'][first]):010d}-{int(data['_sub'][first]):012d}.parquet"
            staging = f"{root}/{_STAGING}/{_shard_name(shard)}"
            fs.create_dir(staging, recursive=True)
            # Small row groups: the writer holds a row group's pages in memory, and this file is only
            # read back by the commit (measured on mining's ~6 KB rows: 1,024-row groups cost ~40 MB of
            # resident memory per write, 128-row groups ~20 MB).
            pq.write_table(table, f"{staging}/{name}", filesystem=fs, row_group_size=_STAGED_ROW_GROUP)
        receipts["shard"].append(shard)
        receipts["consumed"].append(str(consumed))
        receipts["stats"].append(json.dumps(stats))
        receipts["committed"].append(complete)
    return {"shard": np.asarray(receipts["shard"], dtype=np.int64),
            "consumed": np.asarray(receipts["consumed"], dtype=object),
            "stats": np.asarray(receipts["stats"], dtype=object),
            "committed": np.asarray(receipts["committed"], dtype=bool)}


def _weight(den: np.ndarray) -> Fraction:
    """Exact sum of 1/den over rows (few distinct denominators, so this is cheap); den 0 weighs nothing."""
    values, counts = np.unique(np.asarray(den, dtype=np.int64), return_counts=True)
    return sum((Fraction(int(c), int(v)) for v, c in zip(values, counts, strict=True) if v), Fraction(0))


def _is_null(arr: np.ndarray) -> np.ndarray:
    return np.asarray([v is None or (isinstance(v, float) and v != v) for v in arr.tolist()], dtype=bool)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def commit_shard(output: str, shard: int, schema: pa.Schema, stats: dict[str, Any],
                 filesystems: dict[str, Any] | None = None) -> None:
    """Merge a finished shard's parts in row order and publish it atomically, marker last.

    Idempotent: a shard whose marker exists is done, so a retried commit changes nothing. A commit that
    expects rows and finds no parts is an error, never an empty shard. Parts whose rows follow each other
    (the usual case) are merged one at a time, so a shard of many parts never sits in memory whole."""
    install_filesystems(filesystems)
    fs, root = filesystem(output)
    name = _shard_name(shard)
    if _exists(fs, f"{root}/{_MARKERS}/{name}.json"):
        return
    staging = f"{root}/{_STAGING}/{name}"
    info = fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True))
    parts = sorted(i.path for i in info if i.path.endswith(".parquet"))
    expected = int(stats.get("rows_out", 0))
    keys = {p: _read_part(fs, p, ["_row", "_sub"]) for p in parts}
    staged = sum(k.num_rows for k in keys.values())
    if staged != expected:
        raise RuntimeError(f"cannot commit {name} of {output}: {expected} rows were written but "
                           f"{staged} are staged in {staging}; rerun with --resume")
    spans = sorted((_key_span(k), p) for p, k in keys.items())
    if parts and all(a[0][1] < b[0][0] for a, b in zip(spans, spans[1:], strict=False)):
        _publish_parts(fs, root, shard, [p for _, p in spans], schema, stats)
    elif parts:
        _publish(fs, root, shard, pa.concat_tables([_read_part(fs, p) for p in parts]), schema, stats)
    else:
        table = schema.empty_table().append_column("_row", pa.array([], pa.int64())).append_column(
            "_sub", pa.array([], pa.int64()))
        _publish(fs, root, shard, table, schema, stats)
    if parts:
        fs.delete_dir(staging)


def _read_part(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    # One file, read on this thread: pq.read_table's dataset reader (threads, read-ahead) held about twice
    # the memory for a part.
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read(columns=columns, use_threads=False)


def _key_span(keys: pa.Table) -> tuple[tuple[int, int], tuple[int, int]]:
    """The first and last (_row, _sub) of a part's rows."""
    row, sub = (keys[c].to_numpy() for c in ("_row", "_sub"))
    order = np.lexsort((sub, row))
    lo, hi = int(order[0]), int(order[-1])
    return (int(row[lo]), int(sub[lo])), (int(row[hi]), int(sub[hi]))


def _in_row_order(table: pa.Table, schema: pa.Schema) -> pa.Table:
    row, sub = (table[c].to_numpy() for c in ("_row", "_sub"))
    if len(row) > 1 and not np.all((row[1:] > row[:-1]) | ((row[1:] == row[:-1]) & (sub[1:] > sub[:-1]))):
        table = table.take(pc.sort_indices(table, sort_keys=[("_row", "ascending"), ("_sub", "ascending")]))
    return table.select([f.name for f in schema]).cast(schema)


def _publish(fs: pafs.FileSystem, root: str, shard: int, table: pa.Table, schema: pa.Schema,
             stats: dict[str, Any]) -> None:
    """Rows in source order to OUT/<shard>.parquet via a temporary file; the stats marker goes last."""
    name = _shard_name(shard)
    tmp = f"{root}/{_TMP}/{name}.parquet"
    fs.create_dir(f"{root}/{_TMP}", recursive=True)
    pq.write_table(_in_row_order(table, schema), tmp, filesystem=fs)
    fs.move(tmp, f"{root}/{name}.parquet")
    write_json(fs, f"{root}/{_MARKERS}/{name}.json", stats)


def _publish_parts(fs: pafs.FileSystem, root: str, shard: int, parts: list[str], schema: pa.Schema,
                   stats: dict[str, Any]) -> None:
    """_publish for staged parts whose rows follow each other in this order: each part is read, sorted and
    appended in turn (a row group or more per part)."""
    name = _shard_name(shard)
    tmp = f"{root}/{_TMP}/{name}.parquet"
    fs.create_dir(f"{root}/{_TMP}", recursive=True)
    with pq.ParquetWriter(tmp, schema, filesystem=fs) as writer:
        for path in parts:
            writer.write_table(_in_row_order(_read_part(fs, path), schema))
    fs.move(tmp, f"{root}/{name}.parquet")
    write_json(fs, f"{root}/{_MARKERS}/{name}.json", stats)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def plan_fingerprint(spec: JobSpec, shards: list[Shard]) -> str:
    """What decides the output: the job, its settings and the shard plan, including each input file's
    size and modification time (an input rewritten in place changes it)."""
    return _digest({"job": spec.name, "config": spec.config, "shards": [s.to_dict() for s in shards]})


# ---------------------------------------------------------------- the directory before and after a run

def shard_output(output: str, job: str) -> RunDir:
    """OUTPUT of a shard job: Parquet shards at the top, nothing else (every Parquet reader opens it)."""
    return RunDir(output, job, owns=lambda name: bool(_SHARD_FILE.fullmatch(name)), exclusive=True)


def _committed(fs: pafs.FileSystem, root: str) -> list[int]:
    """Shards whose file and marker both exist."""
    shard_files = {int(m.group(1)) for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                   if (m := _SHARD_FILE.fullmatch(i.base_name)) and i.type == pafs.FileType.File}
    markers = {int(m.group(1)) for i in fs.get_file_info(pafs.FileSelector(f"{root}/{_MARKERS}", allow_not_found=True))
               if (m := re.fullmatch(r"shard-(\d{5,})\.json", i.base_name))}
    return sorted(shard_files & markers)


def committed_shards(output: str) -> int:
    """How many shards of `output` are committed (their file and marker both exist)."""
    fs, root = filesystem(output)
    return len(_committed(fs, root))


def check_output(rundir: RunDir, resume: bool, overwrite: bool) -> list[int]:
    """Refuse an output this run may not write into; return the shards an earlier run committed there.

    Reads only (no Ray, nothing written) so a refusal costs the user nothing."""
    if rundir.check() is None:
        return []
    committed = _committed(rundir.fs, rundir.root)
    if committed and not overwrite and not resume:
        raise OutputExistsError(
            f"output {rundir.output} holds {len(committed)} committed shards of an earlier run: pass --resume "
            "to finish it, or --overwrite to replace it")
    return committed


def prepare_output(rundir: RunDir, spec: JobSpec, shards: list[Shard], resume: bool,
                   overwrite: bool) -> dict[int, dict[str, Any]]:
    """Check OUTPUT against this run and record it (under the lease); return the stats of shards already
    committed, which this run keeps."""
    committed = check_output(rundir, resume, overwrite)
    fingerprint = plan_fingerprint(spec, shards)
    previous = rundir.begin(spec.config, overwrite=overwrite, continues=bool(committed), fingerprint=fingerprint,
                            extra={"shards": len(shards)}, describe=lambda old: _describe_change(old, spec))
    if previous is None:
        return {}
    fs, root = rundir.fs, rundir.root
    for d in (_STAGING, _TMP):  # anything half-written by the earlier run is redone from scratch
        delete_path(fs, f"{root}/{d}")
    return _read_markers(fs, root, committed)


def _describe_change(previous: dict[str, Any], spec: JobSpec) -> str:
    old = previous.get("settings") or {}
    changed = sorted(k for k in set(old) | set(spec.config) if old.get(k) != spec.config.get(k))
    if changed:
        return "settings differ: " + ", ".join(f"{k} {old.get(k)!r} -> {spec.config.get(k)!r}" for k in changed[:4])
    return "the input files differ (names, sizes or modification times)"


def _read_markers(fs: pafs.FileSystem, root: str, indices: list[int]) -> dict[int, dict[str, Any]]:
    # Concurrent reads: on object stores each is a round trip.
    with ThreadPoolExecutor(16) as pool:
        stats = pool.map(lambda i: read_json(fs, f"{root}/{_MARKERS}/{_shard_name(i)}.json"), indices)
        return dict(zip(indices, stats, strict=True))


def finish_output(rundir: RunDir, shards: list[Shard], extra: dict[str, Any],
                  shard_stats: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the job's stats and its completion marker from the per-shard stats the driver holds
    (shards it does not hold are read from their markers)."""
    fs, root = rundir.fs, rundir.root
    held = dict(shard_stats or {})
    missing = [s.index for s in shards if s.index not in held]
    held.update(_read_markers(fs, root, missing))
    total: dict[str, Any] = {}
    for s in shards:
        total = merge_stats(total, held[s.index])
    total = {**total, **extra, "shards": len(shards), "output": rundir.output}
    if extra.get("seconds"):
        total["rows_per_second"] = round(total.get("rows_in", 0) / extra["seconds"], 2)
    for d in (_STAGING, _TMP):  # empty by now: every part was merged into its shard
        delete_path(fs, f"{root}/{d}")
    rundir.complete(total)
    return total
