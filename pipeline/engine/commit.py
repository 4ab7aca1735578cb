"""The output directory: per-shard parts and atomic commits, resume state, stats and the completion marker.

Layout of OUT (one file per input shard, deterministic names, so reruns are idempotent):
    OUT/shard-NNNNN.parquet                 a committed shard (temporary file, then rename)
    OUT/__splinter__/job.json               what wrote this directory (job, settings, input versions)
    OUT/__splinter__/shards/shard-NNNNN.json   its stats, written last: the shard's completion marker
    OUT/__splinter__/staging/, .../tmp/     parts of shards split across batches, files being written
    OUT/__splinter__/stats.json, .../_SUCCESS  written once every shard is committed

Only Parquet data sits at the top, so every Parquet reader opens OUT as a dataset: `pd.read_parquet(OUT)`,
`pyarrow.dataset.dataset(OUT)` and Spark skip `_`/`.` names, `datasets.load_dataset("parquet",
data_dir=OUT)` skips `__`-directories (it would try to read a top-level `_SUCCESS` as Parquet), duckdb
reads `OUT/*.parquet`.

Nothing is deleted that this tool did not write: `--overwrite` and `--resume` act only on a directory
holding `__splinter__/job.json` and nothing but our files; anything else is refused, naming what was found.
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
from pipeline.settings import ConfigError
from pipeline.storage.filesystems import filesystem, install_filesystems
from pipeline.storage.sources import Shard

META = "__splinter__"
JOB_FILE = f"{META}/job.json"
SUCCESS_FILE = f"{META}/_SUCCESS"
STATS_FILE = f"{META}/stats.json"
_MARKERS = f"{META}/shards"
_STAGING = f"{META}/staging"
_TMP = f"{META}/tmp"
_SHARD_FILE = re.compile(r"shard-(\d{5,})\.parquet")


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
        complete = consumed == int(part["_shard_rows"][0])
        if complete:
            _publish(fs, root, shard, table, spec.schema, stats)
        elif table.num_rows:
            first = int(np.argmin(data["_row"] * 10**12 + data["_sub"]))
            name = f"part-{int(data['_row'][first]):010d}-{int(data['_sub'][first]):012d}.parquet"
            staging = f"{root}/{_STAGING}/{_shard_name(shard)}"
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


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def commit_shard(output: str, shard: int, schema: pa.Schema, stats: dict[str, Any],
                 filesystems: dict[str, Any] | None = None) -> None:
    """Merge a finished shard's parts in row order and publish it atomically, marker last.

    Idempotent: a shard whose marker exists is done, so a retried commit changes nothing. A commit that
    expects rows and finds no parts is an error, never an empty shard."""
    install_filesystems(filesystems)
    fs, root = filesystem(output)
    name = _shard_name(shard)
    if _exists(fs, f"{root}/{_MARKERS}/{name}.json"):
        return
    staging = f"{root}/{_STAGING}/{name}"
    info = fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True))
    parts = sorted(i.path for i in info if i.path.endswith(".parquet"))
    expected = int(stats.get("rows_out", 0))
    if parts:
        table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in parts])
    else:
        table = schema.empty_table().append_column("_row", pa.array([], pa.int64())).append_column(
            "_sub", pa.array([], pa.int64()))
    if table.num_rows != expected:
        raise RuntimeError(f"cannot commit {name} of {output}: {expected} rows were written but "
                           f"{table.num_rows} are staged in {staging}; rerun with --resume")
    _publish(fs, root, shard, table, schema, stats)
    if parts:
        fs.delete_dir(staging)


def _publish(fs: pafs.FileSystem, root: str, shard: int, table: pa.Table, schema: pa.Schema,
             stats: dict[str, Any]) -> None:
    """Rows in source order to OUT/<shard>.parquet via a temporary file; the stats marker goes last."""
    name = _shard_name(shard)
    order = pc.sort_indices(table, sort_keys=[("_row", "ascending"), ("_sub", "ascending")])
    table = table.take(order).select([f.name for f in schema]).cast(schema)
    tmp = f"{root}/{_TMP}/{name}.parquet"
    fs.create_dir(f"{root}/{_TMP}", recursive=True)
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{root}/{name}.parquet")
    _write_json(fs, f"{root}/{_MARKERS}/{name}.json", stats)


def _write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp"
    with fs.open_output_stream(tmp, compression=None) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
    fs.move(tmp, path)


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path, compression=None) as f:
        return json.loads(f.read())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def plan_fingerprint(spec: JobSpec, shards: list[Shard]) -> str:
    """What decides the output: the job, its settings and the shard plan, including each input file's
    size and modification time (an input rewritten in place changes it)."""
    return _digest({"job": spec.name, "config": spec.config, "shards": [s.to_dict() for s in shards]})


# ---------------------------------------------------------------- the directory before and after a run

def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _survey(fs: pafs.FileSystem, root: str) -> tuple[bool, list[str], dict[int, bool], set[int]]:
    """One listing of OUT: (is it ours?, top-level names we did not write, shard files, markers)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    foreign: set[str] = set()
    shard_files: dict[int, bool] = {}
    markers: set[int] = set()
    ours = False
    prefix = len(root.rstrip("/")) + 1
    for info in infos:
        rel = info.path[prefix:]
        top = rel.split("/", 1)[0]
        if top == META:
            ours |= rel == JOB_FILE
            m = re.fullmatch(rf"{_MARKERS}/shard-(\d{{5,}})\.json", rel)
            if m:
                markers.add(int(m.group(1)))
        elif (m := _SHARD_FILE.fullmatch(rel)) and info.type == pafs.FileType.File:
            shard_files[int(m.group(1))] = True
        else:
            foreign.add(top + ("/" if info.type == pafs.FileType.Directory or "/" in rel else ""))
    return ours, sorted(foreign), shard_files, markers


def _describe_change(previous: dict[str, Any], spec: JobSpec) -> str:
    if previous.get("job") != spec.name:
        return f"it holds a {previous.get('job')!r} job, not {spec.name!r}"
    old = previous.get("config", {})
    changed = sorted(k for k in set(old) | set(spec.config) if old.get(k) != spec.config.get(k))
    if changed:
        return "settings differ: " + ", ".join(f"{k} {old.get(k)!r} -> {spec.config.get(k)!r}" for k in changed[:4])
    return "the input files differ (names, sizes or modification times)"


def check_output(output: str, resume: bool, overwrite: bool) -> list[int]:
    """Refuse an output this run may not write into; return the shards an earlier run committed there.

    Runs before anything starts (no Ray, nothing written) so a refusal costs the user nothing."""
    fs, root = filesystem(output)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise OutputExistsError(f"output {output} is a file: name a directory (new or empty) for the output")
    if info.type != pafs.FileType.Directory:
        return []
    ours, foreign, shard_files, markers = _survey(fs, root)
    if not ours and (foreign or shard_files or markers):
        found = _names(foreign + [_shard_name(i) + ".parquet" for i in sorted(shard_files)])
        raise OutputExistsError(
            f"output {output} is not empty and was not written by this tool (found: {found}); "
            "name a new or empty directory (--overwrite and --resume only touch this tool's own outputs)")
    if foreign:
        raise OutputExistsError(
            f"output {output} holds files this tool did not write ({_names(foreign)}); move them "
            "elsewhere or name another output directory")
    committed = sorted(i for i in markers if i in shard_files)
    if committed and not overwrite and not resume:
        raise OutputExistsError(
            f"output {output} holds {len(committed)} committed shards of an earlier run: pass --resume "
            "to finish it, or --overwrite to replace it")
    return committed


def prepare_output(output: str, spec: JobSpec, shards: list[Shard], resume: bool,
                   overwrite: bool) -> dict[int, dict[str, Any]]:
    """Check the output directory against this run; return the stats of shards already committed."""
    committed = check_output(output, resume, overwrite)
    fs, root = filesystem(output)
    fingerprint = plan_fingerprint(spec, shards)
    done: dict[int, dict[str, Any]] = {}
    if committed and not overwrite:
        previous = _read_json(fs, f"{root}/{JOB_FILE}")
        if previous.get("fingerprint") != fingerprint:
            raise OutputExistsError(
                f"cannot resume into {output}: it was written by a different job, input or configuration "
                f"({_describe_change(previous, spec)}); use a new output path, or --overwrite to replace it")
        done = _read_markers(fs, root, committed)
        # Anything half-written by the earlier run is redone from scratch.
        for d in (_STAGING, _TMP, SUCCESS_FILE, STATS_FILE):
            _delete(fs, f"{root}/{d}")
    elif fs.get_file_info(root).type == pafs.FileType.Directory:
        # --overwrite, or an earlier run that committed nothing (a failed start must not block the
        # rerun): only our own files are here (check_output made sure), so they all go.
        fs.delete_dir_contents(root)
    try:
        fs.create_dir(root, recursive=True)
    except OSError as exc:  # e.g. a parent that is a file, or not writable: the user's to fix
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ConfigError(f"cannot create the output directory {output}: {reason}; choose another output "
                          "path") from None
    _write_json(fs, f"{root}/{JOB_FILE}", {"job": spec.name, "fingerprint": fingerprint, "config": spec.config,
                                           "shards": len(shards)})
    return done


def _delete(fs: pafs.FileSystem, path: str) -> None:
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def _read_markers(fs: pafs.FileSystem, root: str, indices: list[int]) -> dict[int, dict[str, Any]]:
    # Concurrent reads: on object stores each is a round trip.
    with ThreadPoolExecutor(16) as pool:
        stats = pool.map(lambda i: _read_json(fs, f"{root}/{_MARKERS}/{_shard_name(i)}.json"), indices)
        return dict(zip(indices, stats, strict=True))


def finish_output(output: str, shards: list[Shard], extra: dict[str, Any],
                  shard_stats: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the job's stats and its completion marker from the per-shard stats the driver holds
    (shards it does not hold are read from their markers)."""
    fs, root = filesystem(output)
    held = dict(shard_stats or {})
    missing = [s.index for s in shards if s.index not in held]
    held.update(_read_markers(fs, root, missing))
    total: dict[str, Any] = {}
    for s in shards:
        total = merge_stats(total, held[s.index])
    total = {**total, **extra, "shards": len(shards), "output": output}
    if extra.get("seconds"):
        total["rows_per_second"] = round(total.get("rows_in", 0) / extra["seconds"], 2)
    for d in (_STAGING, _TMP):  # empty by now: every part was merged into its shard
        _delete(fs, f"{root}/{d}")
    _write_json(fs, f"{root}/{STATS_FILE}", total)
    _write_json(fs, f"{root}/{SUCCESS_FILE}", {"shards": len(shards), "rows_out": total.get("rows_out", 0)})
    return total


def committed_shards(output: str) -> int:
    """How many shards of `output` are committed (their file and marker both exist)."""
    fs, root = filesystem(output)
    _, _, shard_files, markers = _survey(fs, root)
    return len(markers & set(shard_files))


def is_complete(output: str) -> bool:
    """Did a job finish writing `output` (every shard committed, stats written)?"""
    fs, root = filesystem(output)
    return _exists(fs, f"{root}/{SUCCESS_FILE}")


def read_stats(output: str) -> dict[str, Any]:
    """The stats a finished job wrote (what its summary printed)."""
    fs, root = filesystem(output)
    return _read_json(fs, f"{root}/{STATS_FILE}")
