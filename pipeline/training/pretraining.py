"""`splinter pretrain`: recurring-span selection pretraining on Ray Train, fed by `splinter mine`.

The driver checks everything it can before Ray starts (the mined output is complete, its token ids
fit the model: vocabulary, [QUESTION] id, positions), then runs a Ray Train `TorchTrainer`:
Ray Data reads the mined Parquet, shuffles it (a seeded global shuffle, re-drawn every epoch, or a
large per-worker shuffle buffer) and splits it equally among the workers; each worker runs
`pipeline.training.pretrain_worker.train_worker`.

OUTPUT holds:
    __splinter__/                  the run directory's records (pipeline.storage.rundir): the settings of
                                   the run (a rerun with other settings is refused), the lease, the
                                   summary (stats.json: steps, tokens, loss, tokens/s, resumes, seconds)
                                   and _SUCCESS, written last: the run is complete
    trainer_log.jsonl              one line per step (loss, lr, questions/s, tokens/s) and events
    tensorboard/                   the same scalars as TensorBoard event files (rank 0)
    checkpoints/step-NNNNNNNN/     the last k checkpoints (Ray Train's storage): model + trainer state
    final/                         the model after the last step (our checkpoint format)
Rerunning the same command continues from the newest checkpoint (Ray Train V2 resumes a run from
the same storage path and name) and ends at the requested total steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any

import pyarrow.fs as pafs

from pipeline.paths import is_uri
from pipeline.progress import NullProgress, Progress
from pipeline.settings import ConfigError, PretrainConfig
from pipeline.signals import STOP, JobStopped, stop_at_safe_points
from pipeline.storage.filesystems import filesystem
from pipeline.storage.rundir import RunDir, read_json
from pipeline.training.pretrain_data import (
    MinedData,
    ModelSource,
    check_fit,
    inspect_mined,
    resolve_model,
)
from splinter.pretrain import PretrainHParams

RUN_NAME = "checkpoints"  # Ray Train's run name: its storage is OUTPUT/checkpoints
class PretrainError(RuntimeError):
    """Training failed on the cluster; the message is one line naming the cause."""


# ---------------------------------------------------------------------------------------- the output dir
# What this job writes at OUTPUT's top level (pipeline.storage.rundir keeps the rest under __splinter__/).
OURS = ("trainer_log.jsonl", RUN_NAME, "final", "_final.tmp", "tensorboard", "report.html")


def pretrain_output(output: str) -> RunDir:
    return RunDir(output, "pretrain", owns=lambda name: name in OURS)


def prepare_output(cfg: PretrainConfig, rundir: RunDir | None = None) -> tuple[str, dict[str, Any] | None]:
    """Check OUTPUT against this run and record it; returns (state, the finished run's summary if complete).

    state is "new", "resume" (the same settings: continue from the newest checkpoint) or "complete".
    An OUTPUT holding files we did not write is refused; a run with other settings too, unless
    --overwrite (which replaces our run, and only the files it wrote).
    """
    rundir = rundir or pretrain_output(cfg.output)
    settings = cfg.run_fields()
    with rundir.held():
        finished = None if cfg.overwrite else rundir.finished(settings)
        if finished is not None:
            return "complete", finished
        previous = rundir.begin(settings, overwrite=cfg.overwrite, continues=True)
    return ("resume" if previous is not None else "new"), None


# ---------------------------------------------------------------------------------------- running
class _ProgressSink:
    """A tiny actor between the workers and the driver: rank 0's log records in, drained by the driver's
    display; and the driver's request to stop (a signal), which every worker asks after each step."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def put(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def take(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return getattr(self, "stop", False)


def _cpus_per_worker(cfg: PretrainConfig) -> float:
    import ray

    if cfg.cpus_per_worker:
        return cfg.cpus_per_worker
    # Leave one CPU for Ray Data's reads and shuffles; without it their tasks wait forever.
    total = float(ray.cluster_resources().get("CPU", 1))
    share = math.floor((total - 1) / cfg.num_workers * 2) / 2
    if share < 0.5:
        raise ConfigError(
            f"{cfg.num_workers} workers on {total:g} CPUs leave none for reading the data; "
            "lower --num-workers or set --cpus-per-worker"
        )
    return share


def ray_attached(cfg: PretrainConfig) -> bool:
    """Does this run attach to a cluster (--address, RAY_ADDRESS) rather than start its own Ray?"""
    from pipeline.engine.runner import cluster_address

    return cluster_address(cfg.ray_address) is not None


def _start_ray(cfg: PretrainConfig) -> None:
    import ray

    from pipeline.engine.runner import init_ray

    attached = ray_attached(cfg)
    if not attached:
        # On one machine, Ray Train's preemption watcher (spot nodes being drained) and its state
        # actor (dashboard bookkeeping) have nothing to do; each is one more process to start (~3 s
        # apiece on 2 cores). The controller reads these from the driver's environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    if ray.is_initialized() or attached:
        init_ray(cfg.ray_address, None, worker_output=False)
        return
    # An embedded Ray: one logical CPU more than the machine has, so the workers can take every core
    # for torch while Ray Data's (light) reading tasks still get scheduled.
    cores = cfg.num_cpus or os.cpu_count() or 1
    # Ray Train's and Ray Data's workers print their own progress and warnings; ours is trainer_log.jsonl
    # and the driver's progress line, and a worker's failure is one line naming that log.
    init_ray(None, max(cores, math.ceil(cfg.num_workers * (cfg.cpus_per_worker or 1))) + 1, worker_output=False)


def _resume_epoch(cfg: PretrainConfig) -> int:
    """The epoch of the newest checkpoint Ray Train registered under OUTPUT (0 for a fresh run)."""
    fs, root = filesystem(cfg.output)
    path = f"{root}/{RUN_NAME}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return 0
    try:
        latest = read_json(fs, path).get("latest_checkpoint_result") or {}
        return int(latest.get("metrics", {}).get("epoch", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


def _dataset(cfg: PretrainConfig, data: MinedData) -> Any:
    import ray

    from pipeline.training.pretrain_worker import derive_seed

    ds = ray.data.read_parquet(data.files, columns=data.columns)
    # Ray Data combines the seed with its count of executions (one per epoch), which starts at 0 in
    # every driver: a resumed run seeds with its starting epoch so it does not replay the first
    # epochs' permutations.
    epoch = _resume_epoch(cfg)
    seed = cfg.seed if epoch == 0 else derive_seed(cfg.seed, "epoch", epoch)
    if cfg.shuffle == "global":
        return ds.random_shuffle(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.randomize_block_order(seed=seed)


def _worker_error(exc: BaseException) -> str:
    """The one line that says why the workers failed (the last 'SomeError: message' of the report)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception")) and ":" in ln]
    return causes[-1] if causes else (lines[-1] if lines else type(exc).__name__)


def plan_pretrain(cfg: PretrainConfig) -> tuple[MinedData, ModelSource, PretrainHParams]:
    """Every check that needs no Ray: settings, the mined data, the model, and that they fit."""
    cfg.validate()
    data = inspect_mined(cfg.mined)
    source = resolve_model(cfg.model, cfg.from_bert, cfg.model_config, data)
    check_fit(data, source, cfg.mined)
    hp = cfg.hparams()
    if data.rows // cfg.num_workers < hp.batch_size // cfg.num_workers:
        raise ConfigError(
            f"{cfg.mined} has {data.rows} sequences, fewer than one step of --batch-size {hp.batch_size} "
            f"over {cfg.num_workers} workers; mine more data or lower --batch-size"
        )
    return data, source, hp


def run_pretrain(cfg: PretrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Validate, check the data against the model, train on Ray Train; return the run's summary."""


    progress = progress or NullProgress()
    data, source, hp = plan_pretrain(cfg)
    rundir = pretrain_output(cfg.output)
    rundir.check()  # a refused OUTPUT fails before anything starts
    with rundir.held():
        state, finished = prepare_output(cfg, rundir)
        if finished is not None:
            progress.log(f"[pretrain] {cfg.output} is complete ({finished.get('steps')} steps); nothing to do")
            return {**finished, "already_complete": True}
        return _train(cfg, rundir, state, data, source, hp, progress)


def _train(cfg: PretrainConfig, rundir: RunDir, state: str, data: MinedData, source: ModelSource,
           hp: PretrainHParams, progress: Progress) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training.pretrain_worker import LOG_NAME, WorkerPlan, train_worker

    _start_ray(cfg)
    if cfg.use_gpu and not ray.cluster_resources().get("GPU") and not ray_attached(cfg):
        raise ConfigError("--use-gpu: this machine's Ray has no GPU; drop --use-gpu or run on a GPU cluster (--address)")
    cpus = _cpus_per_worker(cfg)
    root = filesystem(cfg.output)[1]
    storage = cfg.output if is_uri(cfg.output) else root  # Ray Train wants a URI or an absolute path
    # The driver polls the sink every half second: it lives on the driver's node, so losing a worker node
    # (which Ray Train survives by restarting the group) cannot take the driver's progress with it.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    sink = ray.remote(num_cpus=0, scheduling_strategy=here)(_ProgressSink).remote()
    plan = WorkerPlan(
        hparams=hp, source=source.plain(), tokenizer=source.tokenizer, seed=cfg.seed, shuffle=cfg.shuffle,
        shuffle_buffer=cfg.shuffle_buffer, checkpoint_every=cfg.checkpoint_every, output=storage,
        threads=max(1, int(cpus)), run_id=json.dumps(cfg.run_fields(), sort_keys=True), sink=sink,
    )  # fmt: skip
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Our progress and trainer_log.jsonl say what happens; Ray's per-report INFO lines are noise.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": _dataset(cfg, data)},
        dataset_config=DataConfig(enable_shard_locality=True),
    )
    started = time.perf_counter()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported on the driver thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="splinter-pretrain-fit", daemon=True)
    progress.start("pretrain", hp.max_steps, "steps")
    if state == "resume":
        progress.log(f"[pretrain] continuing the run in {cfg.output} from its newest checkpoint")
    thread.start()
    def show(records: list[dict[str, Any]]) -> None:
        for record in records:
            if "loss" in record:
                progress.update(record["step"], info=f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                                f"{record['tokens_per_s']:,.0f} tokens/s")
            elif record.get("event") == "resume":
                progress.log(f"[pretrain] resumed at step {record['step']} from {record.get('checkpoint')}")

    asked = False
    try:
        # A first SIGTERM/SIGINT asks the workers to finish their step and checkpoint it; a second one
        # stops at once (pipeline.signals).
        with stop_at_safe_points():
            while thread.is_alive():
                thread.join(timeout=0.5)
                if STOP.requested() and not asked:
                    asked = True
                    sink.request_stop.remote()
                show(ray.get(sink.take.remote()))
            show(ray.get(sink.take.remote()))  # whatever arrived while the last wait ended
    finally:
        progress.close()
    ray.kill(sink)
    if "error" in outcome:
        raise PretrainError(f"pretraining failed: {_worker_error(outcome['error'])} (log: {cfg.output}/{LOG_NAME})")
    result = outcome["result"]
    reached = int((result.metrics or {}).get("step", 0))
    if asked and reached < hp.max_steps:
        raise JobStopped(STOP.signum or signal.SIGTERM,
                         progress=f"{reached} of {hp.max_steps} steps done, checkpoint at step {reached}",
                         advice="rerun the same command to continue")
    return _finish(cfg, rundir, result, time.perf_counter() - started)


def _finish(cfg: PretrainConfig, rundir: RunDir, result: Any, seconds: float) -> dict[str, Any]:
    """Copy the last checkpoint to OUTPUT/final, then the summary and _SUCCESS (last)."""
    from pipeline.training.pretrain_worker import LOG_NAME

    fs, root = filesystem(cfg.output)
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise PretrainError(f"the run ended without a checkpoint; see {cfg.output}/{LOG_NAME}")
    tmp, final = f"{root}/_final.tmp", f"{root}/final"
    for path in (tmp, final):
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
    fs.create_dir(tmp, recursive=True)
    pafs.copy_files(checkpoint.path, tmp, source_filesystem=checkpoint.filesystem, destination_filesystem=fs)
    fs.move(tmp, final)
    with fs.open_input_stream(f"{root}/{LOG_NAME}") as f:
        lines = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    steps = {r["step"]: r for r in lines if "loss" in r}  # the last record of each step wins (reruns)
    ordered = [steps[k] for k in sorted(steps)]
    head, tail = ordered[: max(1, len(ordered) // 10)], ordered[-max(1, len(ordered) // 10) :]
    # Throughput leaves out the first step after each (re)start: it waits for Ray Data to start reading.
    timed, fresh = [], False
    for r in lines:
        if r.get("event") in ("start", "resume"):
            fresh = True
        elif "loss" in r:
            if not fresh:
                timed.append(r)
            fresh = False
    state = read_json(fs, f"{final}/trainer_state.json")
    summary = {
        "steps": state["step"],
        "epochs": state["epoch"],  # completed epochs
        "sequences_seen": state["rows_seen"],
        "first_loss": round(sum(r["loss"] for r in head) / len(head), 4) if ordered else None,
        "last_loss": round(sum(r["loss"] for r in tail) / len(tail), 4) if ordered else None,
        "tokens_per_s": round(sum(r["tokens"] for r in timed) / max(1e-9, sum(r["seconds"] for r in timed)), 1)
        if timed
        else None,
        "final_loss": ordered[-1]["loss"] if ordered else None,
        "tokens": sum(r["tokens"] for r in ordered),  # real tokens trained on, all workers
        "questions": sum(r["questions"] for r in ordered),
        "resumes": sum(1 for r in lines if r.get("event") == "resume"),
        "seconds": round(seconds, 1),
        "final": cfg.output.rstrip("/") + "/final",
        "checkpoints": cfg.output.rstrip("/") + "/" + RUN_NAME,
        "log": cfg.output.rstrip("/") + "/" + LOG_NAME,
    }
    rundir.complete(summary)
    return summary


def format_pretrain_summary(stats: dict[str, Any]) -> str:
    if stats.get("already_complete"):
        return f"already complete: {stats.get('steps')} steps; the model is in {stats.get('final')}"
    rows = [
        ("steps", f"{stats['steps']:,}"),
        ("epochs completed", f"{stats['epochs']:,}"),
        ("sequences trained on", f"{stats['sequences_seen']:,}"),
        ("loss (first / last 10%)", f"{stats['first_loss']} / {stats['last_loss']}"),
        ("tokens / second", f"{stats['tokens_per_s']:,}"),
        ("resumed", f"{stats['resumes']} time(s)"),
        ("seconds", f"{stats['seconds']:,}"),
        ("model", stats["final"]),
        ("log", stats["log"]),
    ]
    return "\n".join(f"{name:<28}{value}" for name, value in rows)
