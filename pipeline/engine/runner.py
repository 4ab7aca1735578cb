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

The pieces live beside this file: `pipeline.engine.spec` (what a job is), `pipeline.engine.batch` (batches and
applying a stage), `pipeline.engine.commit` (parts, commits, the output directory's state).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.console import restore_stderr
from pipeline.engine.batch import (
    apply_chunked,
    apply_stage,
    batch_len,
    read_batch,
    rebatch,
    slice_batch,
    stream_chunked,
)
from pipeline.engine.commit import (
    check_output,
    commit_shard,
    committed_shards,
    finish_output,
    prepare_output,
    shard_output,
    write_parts,
)
from pipeline.engine.resources import Resources
from pipeline.engine.spec import Batch, JobSpec, StageSpec
from pipeline.engine.stats import merge_stats
from pipeline.engine.watchdog import StallError, Watchdog
from pipeline.progress import NullProgress, Progress
from pipeline.signals import STOP, JobStopped
from pipeline.signals import reinstall as reinstall_signal_handlers
from pipeline.storage.filesystems import export_filesystems
from pipeline.storage.rundir import RunDir
from pipeline.storage.sources import ReadOptions, Shard, list_inputs, plan_shards, read_shard

__all__ = ["init_ray", "run", "run_config"]

log = logging.getLogger(__name__)


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
        # Rows through the job's model (actor) stage so far, as its actors report them: the work as it
        # happens, ahead of commits. None when the job has no actor stage (then rows = rows written).
        self.model_rows: int | None = None
        self.first_output_at: float | None = None  # wall clock of the first rows written (the first answers)
        self.lock = threading.Lock()  # feed() runs in the driver loop, report() also from the ticker
        progress.start(spec.name, already_done + len(shards), "shards")

    def feed(self, receipts: Batch) -> None:
        with self.lock:
            self._feed(receipts)

    def _feed(self, receipts: Batch) -> None:
        for i in range(batch_len(receipts)):
            shard, rows = int(receipts["shard"][i]), int(receipts["shard_rows"][i])
            consumed = Fraction(str(receipts["consumed"][i]))
            self.consumed[shard] += consumed
            self.rows_seen += consumed
            if self.first_output_at is None and consumed:
                self.first_output_at = time.time()
            self.stats[shard] = merge_stats(self.stats[shard], json.loads(str(receipts["stats"][i])))
            if self.consumed[shard] > rows:
                raise RuntimeError(f"shard {shard} accounted {self.consumed[shard]} of {rows} rows: duplicated rows")
            if self.consumed[shard] == rows:
                self._complete(shard, already_committed=bool(receipts["committed"][i]))

    def _complete(self, shard: int, already_committed: bool) -> None:
        if not already_committed:
            self.committer(shard, self.stats[shard])
        self.done.add(shard)

    def report(self, model_rows: int | None = None) -> None:
        # Rows through the model as its actors finish batches, and rows as they reach the writer, not
        # only shard commits, so a big shard shows movement long before it lands.
        with self.lock:
            if model_rows is not None:
                self.model_rows = max(model_rows, self.model_rows or 0)
            written = int(self.rows_seen)
            if self.model_rows is not None:
                # Every written row went through the model. After a node loss the actors' own counts
                # can fall behind (a restarted actor's batches, counts lost with the node), and a
                # progress line saying fewer rows went through the model than were written is a lie.
                self.model_rows = max(self.model_rows, written)
            if self.model_rows is None:
                self.progress.update(self.already_done + len(self.done), rows=written)
            else:
                self.progress.update(self.already_done + len(self.done), rows=self.model_rows,
                                     info=f"{written:,} rows written")

    def settle(self) -> None:
        """The job finished: its final line says the rows written went through the model, once each. The
        actors' own counts are a live estimate only: a batch retried after a node loss is counted twice,
        a count sent from a node as it died is lost, and neither belongs in the final figures."""
        with self.lock:
            if self.model_rows is not None:
                self.model_rows = int(self.rows_seen)
        self.report()

    def finish(self) -> None:
        """Shards no receipt ever named must be empty; anything else means rows were lost."""
        for idx in sorted(set(self.shards) - self.done):
            if self.consumed[idx]:
                raise RuntimeError(f"shard {idx} is incomplete: only {self.consumed[idx]} rows accounted for")
            if read_shard(self.shards[idx], self.spec.read):
                raise RuntimeError(f"shard {idx} produced rows that never reached the writer")
            self.stats[idx] = {"rows_in": 0, "rows_out": 0}
            self._complete(idx, already_committed=False)


def writer_spec(spec: JobSpec) -> JobSpec:
    """The spec as the writing workers get it: without the stages. Unpickling a model stage's class would
    import torch in a process that never runs it (~1 CPU-second at the job's start, on the cores the
    starting model actor needs)."""
    return dataclasses.replace(spec, stages=[])


def _write(batch: Batch, spec: JobSpec, output: str, publish: bool = True) -> Batch:
    """write_parts plus each shard's row count, so receipts alone tell the driver when it is done."""
    receipts = write_parts(batch, spec, output, publish)
    rows = [int(batch["_shard_rows"][batch["_shard"] == s][0]) for s in receipts["shard"].tolist()]
    receipts["shard_rows"] = np.asarray(rows, dtype=np.int64)
    return receipts


def run_local(spec: JobSpec, shards: list[Shard], output: str, progress: Progress,
              already_done: int = 0) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """A plain loop over shards and stages: no Ray, same pieces, same rows.

    Returns each shard's stats and what the model stages said about themselves (`models`)."""
    stages = [(s.build(), s.res.batch_size, bool(s.res.actors)) for s in spec.stages]
    labels = sorted(stage.describe() for stage, _, is_model in stages if is_model and hasattr(stage, "describe"))

    def commit(shard: int, stats: dict[str, Any]) -> None:
        commit_shard(output, shard, spec.schema, stats, spec.read.filesystems)

    tracker = _Tracker(spec, shards, commit, progress, already_done)
    model_rows = 0

    def counted(stage: Callable[[Batch], Batch]) -> Callable[[Batch], Batch]:
        def call(batch: Batch) -> Batch:
            nonlocal model_rows
            out = stage(batch)
            model_rows += batch_len(batch)
            tracker.report(model_rows)
            return out
        return call

    for shard in shards:
        batch = read_batch([shard.to_dict()], spec.read)
        for stage, size, is_model in stages[:-1]:
            batch = apply_chunked(counted(stage) if is_model else stage, batch, size)
        # The last stage's output is written as it comes, in the slices a whole shard's output is cut
        # into: a streaming stage (the miner) never has a huge document's rows in memory at once. Only
        # the first slice may be published as the whole shard (see write_parts).
        outputs: Iterable[Batch] = [batch]
        if stages:
            stage, size, is_model = stages[-1]
            outputs = stream_chunked(counted(stage) if is_model else stage, batch, size)
        del batch  # the stream holds the input while it needs it: a huge document's text goes before the commit
        for i, part in enumerate(rebatch(outputs, spec.write_batch_size)):
            tracker.feed(_write(part, spec, output, publish=i == 0))
            tracker.report()
    tracker.finish()
    return {i: tracker.stats[i] for i in tracker.done}, ({"models": labels} if labels else {})


# Stage construction is cached per worker process so a task-pool stage builds its tokenizer once.
_STAGE_CACHE: dict[tuple[type, str], Callable[[Batch], Batch]] = {}


def _worker_setup() -> None:
    # A Ray worker owns the CPUs Ray gave it: tokenizers' own thread pool would oversubscribe them
    # (and make one worker look like two in scaling measurements).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _resolve_shared(refs: dict[str, Any]) -> dict[str, Any]:
    """A stage's shared kwargs out of the object store (numpy arrays come back as views of shared memory)."""
    import ray

    return {name: ray.get(ref) for name, ref in refs.items()}


def _cached_stage(spec: StageSpec, shared: dict[str, Any]) -> Callable[[Batch], Batch]:
    _worker_setup()
    refs = sorted((name, ref.hex()) for name, ref in shared.items())
    key = (spec.cls, json.dumps(spec.kwargs, sort_keys=True, default=str), tuple(refs))
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = spec.build(_resolve_shared(shared))
    return _STAGE_CACHE[key]


def _task_stage(batch: Batch, stage: StageSpec, batch_size: int, shared: dict[str, Any]) -> Batch:
    # Ray hands task stages whole blocks (batch_size=None, see run_ray); the stage's batch size
    # is applied here.
    return apply_chunked(_cached_stage(stage, shared), batch, batch_size)


def _streamed_stage(batch: Batch, stage: StageSpec, batch_size: int, shared: dict[str, Any]) -> Iterator[Batch]:
    """_task_stage for a stage that feeds a model: each slice leaves as soon as it is done (a Ray streaming
    generator), so the model's first batch waits for `batch_size` rows of a shard, not for all of them."""
    built = _cached_stage(stage, shared)
    n = batch_len(batch)
    for i in range(0, n, batch_size):
        yield apply_stage(built, slice_batch(batch, i, i + batch_size))


class _ActorStage:
    """Ray actor wrapper: builds the stage once (e.g. a model load), then serves batches and tells the
    job's monitor how many rows it finished (fire and forget), so progress follows the model."""

    def __init__(self, stage: StageSpec, shared: dict[str, Any], monitor: Any):
        _worker_setup()
        self.stage = stage.build(_resolve_shared(shared))
        self.monitor = monitor
        describe = getattr(self.stage, "describe", None)
        self.label = describe() if callable(describe) else type(self.stage).__name__
        self.monitor.count.remote(0, self.label)

    def __call__(self, batch: Batch) -> Batch:
        out = apply_stage(self.stage, batch)
        self.monitor.count.remote(batch_len(batch), self.label)
        return out


def _ray_read(batch: Batch, opts: ReadOptions) -> Batch:
    return read_batch([json.loads(s) for s in batch["shard"]], opts)


class _Monitor:
    """One long-lived process per job for the driver's errands: shard commits (a task per commit would
    start a worker process and import pyarrow per shard; only shards split across batches need one) and
    the model actors' row counts. Threaded (see run_ray), so a count never waits behind a commit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows = 0
        self.labels: set[str] = set()
        self.first_ready: float | None = None  # wall clock when the first actor finished building

    def commit(self, output: str, shard: int, schema: pa.Schema, stats: dict[str, Any],
               filesystems: dict[str, Any]) -> int:
        commit_shard(output, shard, schema, stats, filesystems)
        return shard

    def count(self, rows: int, label: str) -> None:
        with self.lock:
            self.rows += rows
            self.labels.add(label)
            self.first_ready = self.first_ready or time.time()

    def counts(self) -> tuple[int, list[str]]:
        with self.lock:
            return self.rows, sorted(self.labels)

    def ready_at(self) -> float | None:
        return self.first_ready


# Blocks out of a streamed stage are passed on once they hold this much: tokenized SQuAD questions take
# ~3.6 KB a row, so a 64-row slice goes on as it is yielded (~230 KB). Blocks past 1.5x this are cut, which
# is harmless in front of a model stage (Ray Data batches its input rows again). A model's output rows
# (~1 KB each) stay one block per call.
_STREAM_BLOCK_BYTES = 256 << 10


def run_ray(spec: JobSpec, shards: list[Shard], output: str, progress: Progress, already_done: int = 0,
            stage_overrides: dict[int, Resources] | None = None, stall_timeout_s: float | None = None
            ) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Stream shards through Ray Data: read tasks -> stage tasks/actor pools -> part writers.

    With `stall_timeout_s`, a job in which no row or shard moved for that long stops with StallError
    (committed shards kept, --resume finishes): a lost node must never leave the driver waiting forever.

    Returns each shard's stats and what the job's actors reported about themselves (`models`: e.g.
    "cuda:0 bfloat16") with `model_ready_s`, how long after the start the first one was built, and
    `first_output_s`, when the first rows out of the model were written (staged or committed).
    """
    import ray

    started = time.time()

    ds = ray.data.from_items([{"shard": json.dumps(s.to_dict())} for s in shards],
                             override_num_blocks=max(1, len(shards)))
    resources = [(stage_overrides or {}).get(i, stage.res) for i, stage in enumerate(spec.stages)]
    # Task stages right before a model stage stream their output slice by slice. Ray Data would glue the
    # slices back into blocks of up to 128 MB (a whole shard) before passing them on; a small block size
    # passes each on as it is yielded. Jobs without a model keep whole shards per block: their writer
    # publishes a shard at once only when it gets the whole shard in one batch.
    streamed = {i for i in range(len(resources) - 1) if not resources[i].actors and resources[i + 1].actors}
    if streamed:
        ds.context.target_max_block_size = _STREAM_BLOCK_BYTES
        # Ray Data reserves a share of the CPUs for each operator. Next to a model actor that holds most
        # of a node's CPUs, the shares left to tokenizing and writing are smaller than one of their tasks
        # asks for, so Ray ran them one at a time, with pauses, and the model's first outputs waited
        # behind tokenizing. Without the reservation the tasks use whatever the actors leave; Ray Data's
        # object store limit still bounds how far tokenizing runs ahead. Measured on 2 cores: qa.py's
        # steady rows per second up 13-15%, the first answer ~0.5 s sooner; scale.py's extract at 16x
        # added no more memory than at 1x.
        ds.context.op_resource_reservation_enabled = False
    # Big stage arguments (weights, tokenizer) go into the object store once per job, not into every
    # task's arguments; the same object given to several stages is put once.
    refs_by_object: dict[int, Any] = {}
    shared: list[dict[str, Any]] = []
    for stage in spec.stages:
        for value in stage.shared.values():
            if id(value) not in refs_by_object:
                refs_by_object[id(value)] = ray.put(value)
        shared.append({name: refs_by_object[id(value)] for name, value in stage.shared.items()})
    # What the workers are sent leaves the shared values out (they get the references above): in the
    # stages' and writer's arguments, the weights would be serialized with every task, and Ray Data
    # renders every array in them when it exports the job's plan (~1 s of the driver's start-up).
    spec = dataclasses.replace(spec, stages=[dataclasses.replace(s, shared={}) for s in spec.stages])
    # The monitor lives on the driver's node: a worker node that dies must not take the job's commits
    # and counts with it. Retries are bounded: an errand that cannot be delivered after a restart or
    # two is an error the driver reports, never a resubmission loop that waits forever.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    monitor = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3, max_concurrency=4,
                         scheduling_strategy=here)(_Monitor).remote()
    # Reading a shard is cheap: give it the first stage's CPU share and task pool so Ray fuses the
    # two into one task. As a separate operator, read tasks would queue for CPUs the stage holds.
    first = resources[0] if resources else Resources()
    read_args: dict[str, Any] = {"num_cpus": first.num_cpus}
    if not first.actors and first.tasks:
        read_args["compute"] = ray.data.TaskPoolStrategy(size=first.tasks)
    ds = ds.map_batches(_ray_read, fn_kwargs={"opts": spec.read}, batch_size=1, batch_format="numpy", **read_args)
    for index, (stage, res, refs) in enumerate(zip(spec.stages, resources, shared, strict=True)):
        common = {"batch_size": res.batch_size, "batch_format": "numpy", "num_cpus": res.num_cpus}
        if res.actors:
            low, high = res.pool
            pool = (ray.data.ActorPoolStrategy(size=low) if low == high
                    else ray.data.ActorPoolStrategy(min_size=low, max_size=high))
            # NB: Ray Data fuses a task stage into the actor stage after it when their resources are
            # equal, and then runs it inside the actor, in turn with the model: jobs keep them different.
            ds = ds.map_batches(_ActorStage, fn_constructor_kwargs={"stage": stage, "shared": refs, "monitor": monitor},
                                compute=pool, num_gpus=res.num_gpus, **common)
        else:
            # Whole blocks, chunked inside the task: with a row batch size, Ray would bundle many
            # one-row shard descriptors into a single fused read+stage task and serialise the job.
            common["batch_size"] = None
            if res.tasks:
                common["compute"] = ray.data.TaskPoolStrategy(size=res.tasks)
            ds = ds.map_batches(_streamed_stage if index in streamed else _task_stage,
                                fn_kwargs={"stage": stage, "batch_size": res.batch_size, "shared": refs}, **common)
    # batch_size=None: write each block as it arrives. A fixed size would make the writer wait for
    # that many rows, holding back commits (and progress) until the end of small jobs.
    # After a task stage, the writer takes its CPU share and pool so Ray fuses them: the stage's
    # output then goes straight to Parquet instead of through Ray's Arrow conversion and back.
    last = resources[-1] if resources else first
    write_args: dict[str, Any] = {"num_cpus": 0.25}
    if not last.actors:
        write_args = {"num_cpus": last.num_cpus}
        if last.tasks:
            write_args["compute"] = ray.data.TaskPoolStrategy(size=last.tasks)
    ds = ds.map_batches(_write, fn_kwargs={"spec": writer_spec(spec), "output": output},
                        batch_size=None, batch_format="numpy", **write_args)

    pending: list[Any] = []

    def commit(shard: int, stats: dict[str, Any]) -> None:
        pending.append(monitor.commit.remote(output, shard, spec.schema, stats, spec.read.filesystems))

    tracker = _Tracker(spec, shards, commit, progress, already_done)
    has_actors = any(r.actors for r in resources)
    labels: list[str] = []
    stop = threading.Event()
    stalled: list[str] = []
    watchdog = None
    if stall_timeout_s:
        watchdog = stall_watchdog(stall_timeout_s, lambda: _stall_report(spec, tracker, resources), stalled)
    moved: list[Any] = [None]

    def beat() -> None:
        # Any row through the model, row written or shard committed counts as progress.
        now = (tracker.model_rows, tracker.rows_seen, len(tracker.done))
        if watchdog is not None and now != moved[0]:
            moved[0] = now
            watchdog.beat()

    def tick() -> None:
        # Receipts only arrive when a shard's rows reach the writer; between them, poll the model
        # actors' counts so progress moves with the work (and a quiet log still gets its line on time).
        while not stop.wait(1.0):
            rows = None
            # A slow or restarting monitor must never stop the job: skip this tick instead.
            with contextlib.suppress(Exception):
                if has_actors:
                    rows, labels[:] = ray.get(monitor.counts.remote(), timeout=10)
            tracker.report(rows)
            beat()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    if watchdog is not None:
        watchdog.start()
    # A stop (signal or stall) raised while the driver waits inside Ray Data passes through its error
    # wrapper, which logs it as "an exception in Ray Data internal code" with a page of stack: the job's
    # own one line says all there is to say.
    quiet_stop = _DropWhileStopping(stalled)
    ray_data_errors = logging.getLogger("ray.data.exceptions")
    ray_data_errors.addFilter(quiet_stop)
    try:
        # prefetch_batches=0: with Ray's default of 1, iter_batches holds every block back until the
        # next one exists, so each receipt (and the commit it completes) reached the driver one block
        # late: the first shards of a job showed up only at its end.
        for receipts in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            tracker.feed(receipts)
            tracker.report()
            beat()
            if pending:
                ready, pending[:] = ray.wait(pending, num_returns=len(pending), timeout=0)
                ray.get(ready)  # surface commit failures early
        stop.set()
        ticker.join()
        tracker.finish()
        ray.get(pending)
        if log.isEnabledFor(logging.DEBUG):  # where the time went, per operator, for whoever asks
            log.debug("Ray Data stats of the %s job:\n%s", spec.name, ds.stats())
        extra: dict[str, Any] = {}
        if has_actors:
            rows, labels[:] = ray.get(monitor.counts.remote())
            tracker.report(rows)
            tracker.settle()
            ready = ray.get(monitor.ready_at.remote())
            first = tracker.first_output_at
            extra = {"models": labels, "model_ready_s": round(ready - started, 2) if ready else None,
                     "first_output_s": round(first - started, 2) if first else None,
                     "first_output_at": round(first, 3) if first else None}
    except (_Stalled, KeyboardInterrupt, JobStopped):
        if stalled:  # the watchdog interrupted the driver: say why, in its one line
            raise StallError(stalled[0]) from None
        raise
    finally:
        stop.set()
        if watchdog is not None:
            watchdog.stop()
            if stalled:
                _raise_in(threading.get_ident(), None)  # the job ended as the watchdog fired: nothing to stop
        ray_data_errors.removeFilter(quiet_stop)
        ray.kill(monitor)
        # ray.kill returns at once. A monitor still dying when the driver then shuts Ray down was seen to
        # abort with a native stack on the console; a call to it fails once it is gone.
        with contextlib.suppress(Exception):
            ray.get(monitor.ready_at.options(max_task_retries=0).remote(), timeout=5)
    return {i: tracker.stats[i] for i in tracker.done}, extra


class _DropWhileStopping(logging.Filter):
    """Drops log records once the job is being stopped (a signal arrived, or the watchdog fired)."""

    def __init__(self, stalled: list[str]) -> None:
        super().__init__()
        self.stalled = stalled

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.stalled or STOP.requested())


class _Stalled(BaseException):
    """Raised by the watchdog in the thread running the job; `run_ray` turns it into StallError. A
    BaseException, so that no `except Exception` on the way (Ray Data has some) takes it for an error."""


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    # An asynchronous exception, delivered at the thread's next Python instruction. Unlike a simulated
    # SIGINT it does not depend on which signal handlers the process has (a program of its own, a test
    # runner); None withdraws one not delivered yet.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


def stall_watchdog(timeout_s: float, describe: Callable[[], tuple[str, str]], stalled: list[str]) -> Watchdog:
    """The driver's watchdog: on a stall, note the line in `stalled` and interrupt the thread running the
    job (which `run_ray` turns into StallError); if that does not stop it within the grace period, exit 1."""
    job_thread = threading.get_ident()

    def interrupt(message: str) -> None:
        stalled.append(message)
        _raise_in(job_thread, _Stalled)

    return Watchdog(timeout_s, describe, interrupt, on_hang=_exit_hung)


def _exit_hung(message: str) -> None:
    """The watchdog's last resort, from its own thread: the main thread was asked to stop and is still
    blocked (inside Ray's native code, where no Python signal handler runs). Say the stall line the CLI
    would have said and end the process with exit 1: a job must never hang. Nothing here may touch Ray
    (`ray.shutdown()` would wait on the same stuck core worker); the cluster frees the job's actors and
    tasks when the driver's connection drops, and committed shards are complete on disk already."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"error: the job {message}\n")
        sys.stderr.flush()
    restore_stderr()  # the console filter passes the line on before this process is gone
    os._exit(1)


def _stall_report(spec: JobSpec, tracker: _Tracker, resources: list[Resources]) -> tuple[str, str]:
    """(the stage that stalled, what was committed) for the watchdog's line."""
    names = [s.cls.__name__ for s in spec.stages]
    actors = [n for n, r in zip(names, resources, strict=True) if r.actors]
    written = int(tracker.rows_seen)
    if actors and (tracker.model_rows or 0) <= written:
        stage = f"the {spec.name} job's {actors[0]} stage"  # nothing new came out of the model
    elif actors:
        stage = f"the {spec.name} job's writer"  # the model moved, nothing reached the output
    else:
        stage = f"the {spec.name} job's {' -> '.join(['read', *names])} stages"
    total = tracker.already_done + len(tracker.shards)
    return stage, (f"{tracker.already_done + len(tracker.done)} of {total} shards committed "
                   f"({written:,} rows written) and kept")


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster a job attaches to: `address` (--address), else RAY_ADDRESS; None: an embedded Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None = None, num_cpus: int | None = None, worker_output: bool = True) -> None:
    """Attach to the cluster named by `address` or RAY_ADDRESS; otherwise start an embedded local Ray.

    `worker_output=False` keeps Ray's workers' own prints off the driver's console, for jobs whose workers
    report through records of their own (pretrain's trainer_log.jsonl)."""
    import ray

    # Our driver reports progress itself; Ray Data's own progress log would drown it.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we know
    if ray.is_initialized():
        return
    address = cluster_address(address)
    kwargs: dict[str, Any] = {"log_to_driver": worker_output, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Our own private instance: its token is generated and used by Ray itself, so Ray's notice that
        # token auth is on says nothing the user must act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # An explicit "local" so a laptop with a stray `ray start` does not silently get used.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=_local_object_store_bytes(),
                 _system_config={"num_workers_soft_limit": _worker_limit(num_cpus)}, **kwargs)
    # Connecting put Ray's own SIGTERM handler (a native stack dump, exit 15) in place of ours.
    reinstall_signal_handlers()


# Worker processes that Ray's helper actors hold: Ray Data's stats, autoscaling and actor-location actors
# and the job's monitor, with room to spare. They count towards Ray's worker limit but take no CPU.
_HELPER_WORKERS = 6


def _worker_limit(num_cpus: int | None) -> int:
    """How many worker processes an embedded Ray keeps before it kills idle ones.

    Ray's default is the CPU count, and it kills an idle worker above it after a second. The helper actors
    hold processes of their own, so on a small machine a task worker was killed every time it went idle,
    and the next task (one per model batch after the model) paid for a new process importing pyarrow and
    torch: 3-4 CPU-s each. Measured on 2 cores, that task took 0.6-0.8 of a core away from the model.
    """
    return int(num_cpus if num_cpus is not None else (os.cpu_count() or 1)) + _HELPER_WORKERS


def _local_object_store_bytes() -> int:
    # Ray's default (30% of RAM) starves torch on small machines; 2 GiB streams comfortably.
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(2 << 30, max(256 << 20, total * 0.15)))


def run(spec: JobSpec, shards: list[Shard], output: str, *, engine: str = "ray", resume: bool = False,
        overwrite: bool = False, progress: Progress | None = None,
        stage_overrides: dict[int, Resources] | None = None,
        stall_timeout_s: float | None = None, rundir: RunDir | None = None) -> dict[str, Any]:
    """Run a job to completion; return the merged stats (also written to OUT/__splinter__/stats.json).

    `rundir` is OUTPUT with its lease already held (run_config takes it before Ray starts); without one,
    the lease is taken here and let go at the end."""
    rundir = rundir or shard_output(output, spec.name)
    with rundir.held():
        return _run(spec, shards, rundir, engine, resume, overwrite, progress, stage_overrides, stall_timeout_s)


def _run(spec: JobSpec, shards: list[Shard], rundir: RunDir, engine: str, resume: bool, overwrite: bool,
         progress: Progress | None, stage_overrides: dict[int, Resources] | None,
         stall_timeout_s: float | None) -> dict[str, Any]:
    start = time.perf_counter()
    output = rundir.output
    # The driver's storage clients travel with the job: workers reuse them instead of building their own.
    paths = [output, *(p for s in shards for p in s.paths[:1])]
    spec = dataclasses.replace(spec, read=dataclasses.replace(spec.read, filesystems=export_filesystems(paths)))
    done = prepare_output(rundir, spec, shards, resume, overwrite)
    todo = [s for s in shards if s.index not in done]
    progress = progress or NullProgress()
    if done:
        progress.log(f"[{spec.name}] resuming: {len(done)} of {len(shards)} shards already committed")
    held = dict(done)
    try:
        extra: dict[str, Any] = {}
        if todo and engine == "local":
            stats, extra = run_local(spec, todo, output, progress, len(done))
            held.update(stats)
        elif todo and engine == "ray":
            stats, extra = run_ray(spec, todo, output, progress, len(done), stage_overrides, stall_timeout_s)
            held.update(stats)
        elif todo:
            raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
    except (JobStopped, KeyboardInterrupt) as exc:
        stop = exc if isinstance(exc, JobStopped) else JobStopped(signal.SIGINT)
        raise stop.with_progress(f"{committed_shards(output)} of {len(shards)} shards committed and kept") from None
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    return finish_output(rundir, shards, {"seconds": round(seconds, 3), "resumed_shards": len(done), **extra},
                         held)


def run_config(cfg: Any, make_spec: Callable[[], JobSpec], progress: Progress | None = None,
               preflight: Callable[[], None] | None = None) -> dict[str, Any]:
    """The common path of every job: validate, run the job's own `preflight` (its model or tokenizer),
    check the output and take its lease, plan shards, attach Ray (unless local), run. Every mistake a
    user can fix surfaces before Ray starts; a second run into the same OUTPUT is refused at once."""
    cfg.validate()
    if preflight is not None:
        preflight()
    rundir = shard_output(cfg.output, cfg.job)
    check_output(rundir, cfg.resume, cfg.overwrite)
    with rundir.held():
        inputs = list_inputs(cfg.input, exclude=cfg.output)
        shards = plan_shards(inputs, cfg.input_format, cfg.shard_rows, cfg.shard_bytes, cfg.required_columns())
        if not cfg.local:
            init_ray(cfg.ray_address, cfg.num_cpus)
        # The spec is built after Ray is up: it may size stages by the cluster's resources.
        return run(make_spec(), shards, cfg.output, engine="local" if cfg.local else "ray", resume=cfg.resume,
                   overwrite=cfg.overwrite, progress=progress, stall_timeout_s=cfg.stall_timeout * 60, rundir=rundir)
