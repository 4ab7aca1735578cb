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
   to `OUT/__splinter__/staging/<shard>/` as a part named by its first row;
4. when a shard's receipts add up to its row count, its parts are merged in row order; either way
   a shard lands as `OUT/<shard>.parquet` (temporary file, then rename) with
   `OUT/__splinter__/shards/<shard>.json` written last as its completion marker;
5. when all shards are committed, `OUT/__splinter__/stats.json` and `OUT/__splinter__/_SUCCESS` are
   written, from the per-shard stats the driver collected.
A crash leaves committed shards intact and no `_SUCCESS`; `--resume` redoes only the rest.

The pieces live beside this file: `pipeline.spec` (what a job is), `pipeline.batch` (batches and
applying a stage), `pipeline.output` (parts, commits, the output directory's state).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.batch import apply_chunked, apply_stage, batch_len, read_batch, slice_batch
from pipeline.output import (
    OutputExistsError,
    check_output,
    commit_shard,
    finish_output,
    prepare_output,
    write_parts,
)
from pipeline.preflight import preflight
from pipeline.progress import NullProgress, Progress
from pipeline.resources import Resources
from pipeline.sources import ReadOptions, Shard, list_inputs, plan_shards, read_shard
from pipeline.spec import Batch, JobSpec, StageSpec
from pipeline.stats import merge_stats
from pipeline.storage import export_filesystems

__all__ = ["JobSpec", "OutputExistsError", "StageSpec", "init_ray", "run", "run_config"]


class _Tracker:
    """Adds up receipts per shard, commits each shard the moment it is complete, reports progress."""

    def __init__(self, spec: JobSpec, shards: list[Shard], committer: Callable[[int, dict[str, Any]], Any],
                 progress: Progress, already_done: int = 0):
        self.spec, self.committer, self.progress = spec, committer, progress
        self.shards = {s.index: s for s in shards}
        self.consumed = {i: Fraction(0) for i in self.shards}
        self.stats: dict[int, dict[str, Any]] = {i: {} for i in self.shards}
        self.done: set[int] = set()
        self.already_done = already_done
        self.rows_seen = Fraction(0)  # source rows that reached the writer, committed or not
        progress.start(spec.name, already_done + len(shards), "shards")

    def feed(self, receipts: Batch) -> None:
        for i in range(batch_len(receipts)):
            shard, rows = int(receipts["shard"][i]), int(receipts["shard_rows"][i])
            consumed = Fraction(str(receipts["consumed"][i]))
            self.consumed[shard] += consumed
            self.rows_seen += consumed
            self.stats[shard] = merge_stats(self.stats[shard], json.loads(str(receipts["stats"][i])))
            if self.consumed[shard] > rows:
                raise RuntimeError(f"shard {shard} accounted {self.consumed[shard]} of {rows} rows: duplicated rows")
            if self.consumed[shard] == rows:
                self._complete(shard, already_committed=bool(receipts["committed"][i]))

    def _complete(self, shard: int, already_committed: bool) -> None:
        if not already_committed:
            self.committer(shard, self.stats[shard])
        self.done.add(shard)

    def report(self) -> None:
        # Rows as they reach the writer, not only at shard commits, so a big shard shows movement.
        self.progress.update(self.already_done + len(self.done), rows=int(self.rows_seen))

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


def run_local(spec: JobSpec, shards: list[Shard], output: str, progress: Progress,
              already_done: int = 0) -> dict[int, dict[str, Any]]:
    """A plain loop over shards and stages: no Ray, same pieces, same rows. Returns each shard's stats."""
    stages = [(s.build(), s.res.batch_size) for s in spec.stages]

    def commit(shard: int, stats: dict[str, Any]) -> None:
        commit_shard(output, shard, spec.schema, stats, spec.read.filesystems)

    tracker = _Tracker(spec, shards, commit, progress, already_done)
    for shard in shards:
        batch = read_batch([shard.to_dict()], spec.read)
        for stage, size in stages:
            batch = apply_chunked(stage, batch, size)
        n = batch_len(batch)
        for i in range(0, n, spec.write_batch_size):
            tracker.feed(_write(slice_batch(batch, i, i + spec.write_batch_size), spec, output))
            tracker.report()
    tracker.finish()
    return {i: tracker.stats[i] for i in tracker.done}


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

    def commit(self, output: str, shard: int, schema: pa.Schema, stats: dict[str, Any],
               filesystems: dict[str, Any]) -> int:
        commit_shard(output, shard, schema, stats, filesystems)
        return shard


def run_ray(spec: JobSpec, shards: list[Shard], output: str, progress: Progress, already_done: int = 0,
            stage_overrides: dict[int, Resources] | None = None) -> dict[int, dict[str, Any]]:
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
        pending.append(committer.commit.remote(output, shard, spec.schema, stats, spec.read.filesystems))

    tracker = _Tracker(spec, shards, commit, progress, already_done)
    for receipts in ds.iter_batches(batch_size=None, batch_format="numpy"):
        tracker.feed(receipts)
        tracker.report()
        if pending:
            ready, pending[:] = ray.wait(pending, num_returns=len(pending), timeout=0)
            ray.get(ready)  # surface commit failures early
    tracker.finish()
    ray.get(pending)
    ray.kill(committer)
    return {i: tracker.stats[i] for i in tracker.done}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to the cluster named by `address` or RAY_ADDRESS; otherwise start an embedded local Ray."""
    import ray

    # Our driver reports progress itself; Ray Data's own progress log would drown it.
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
        overwrite: bool = False, progress: Progress | None = None,
        stage_overrides: dict[int, Resources] | None = None) -> dict[str, Any]:
    """Run a job to completion; return the merged stats (also written to OUT/__splinter__/stats.json)."""
    start = time.perf_counter()
    # The driver's storage clients travel with the job: workers reuse them instead of building their own.
    paths = [output, *(p for s in shards for p in s.paths[:1])]
    spec = dataclasses.replace(spec, read=dataclasses.replace(spec.read, filesystems=export_filesystems(paths)))
    done = prepare_output(output, spec, shards, resume, overwrite)
    todo = [s for s in shards if s.index not in done]
    progress = progress or NullProgress()
    if done:
        progress.log(f"[{spec.name}] resuming: {len(done)} of {len(shards)} shards already committed")
    held = dict(done)
    try:
        if todo and engine == "local":
            held.update(run_local(spec, todo, output, progress, len(done)))
        elif todo and engine == "ray":
            held.update(run_ray(spec, todo, output, progress, len(done), stage_overrides))
        elif todo:
            raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    return finish_output(output, shards, {"seconds": round(seconds, 3), "resumed_shards": len(done)}, held)


def run_config(cfg: Any, make_spec: Callable[[], JobSpec], progress: Progress | None = None) -> dict[str, Any]:
    """The common path of every job: validate, plan shards, check the model and output, attach Ray
    (unless local), run. Every mistake a user can fix surfaces before Ray starts and before OUT is touched."""
    cfg.validate()
    preflight(cfg)
    check_output(cfg.output, cfg.resume, cfg.overwrite)
    inputs = list_inputs(cfg.input, exclude=cfg.output)
    shards = plan_shards(inputs, cfg.input_format, cfg.shard_rows, cfg.shard_bytes, cfg.required_columns())
    if not cfg.local:
        init_ray(cfg.ray_address, cfg.num_cpus)
    # The spec is built after Ray is up: it may size stages by the cluster's resources.
    return run(make_spec(), shards, cfg.output, engine="local" if cfg.local else "ray", resume=cfg.resume,
               overwrite=cfg.overwrite, progress=progress)
