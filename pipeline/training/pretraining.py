"""`splinter pretrain`: recurring-span selection pretraining on Ray Train, fed by `splinter mine`.

The driver checks everything it can before Ray starts (the mined output is complete, its token ids
fit the model: vocabulary, [QUESTION] id, positions), then runs a Ray Train `TorchTrainer`:
Ray Data reads the mined Parquet, shuffles it (a seeded global shuffle, re-drawn every epoch, or a
large per-worker shuffle buffer) and splits it equally among the workers; each worker runs
`pipeline.training.pretrain_worker.train_worker`.

OUTPUT holds:
    run.json                       the settings of the run (a rerun with other settings is refused)
    trainer_log.jsonl              one line per step (loss, lr, questions/s, tokens/s) and events
    tensorboard/                   the same scalars as TensorBoard event files (rank 0)
    checkpoints/step-NNNNNNNN/     the last k checkpoints (Ray Train's storage): model + trainer state
    final/                         the model after the last step (our checkpoint format)
    pretrain_stats.json            the run's summary: steps, tokens, loss, tokens/s, resumes, seconds
    _SUCCESS                       written last: the run is complete
Rerunning the same command continues from the newest checkpoint (Ray Train V2 resumes a run from
the same storage path and name) and ends at the requested total steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.progress import NullProgress, Progress
from pipeline.settings import ConfigError
from pipeline.storage.filesystems import filesystem
from pipeline.training.pretrain_data import (
    MODEL_SIZES,
    MinedData,
    ModelSource,
    check_fit,
    inspect_mined,
    resolve_model,
)
from splinter.pretrain import PRESETS, PretrainHParams

RUN_NAME = "checkpoints"  # Ray Train's run name: its storage is OUTPUT/checkpoints
SHUFFLES = ("global", "local")
# Fields that decide what is trained: a rerun into the same OUTPUT must not change them.
RUN_FIELDS = (
    "mined", "model", "from_bert", "model_config", "preset", "batch_size", "learning_rate", "warmup_steps",
    "max_steps", "grad_accum", "weight_decay", "max_grad_norm", "seed", "shuffle", "shuffle_buffer",
)  # fmt: skip


class PretrainError(RuntimeError):
    """Training failed on the cluster; the message is one line naming the cause."""


@dataclass
class PretrainConfig:
    """`splinter pretrain MINED OUTPUT`; None fields take the preset's value."""

    mined: str = ""
    output: str = ""
    model: str | None = None  # a Splinter checkpoint directory
    from_bert: str | None = None  # a BERT-family checkpoint directory (fresh QASS head)
    model_config: str | None = None  # "base", "large" or a config.json: a freshly initialised model
    preset: str = "laptop"
    batch_size: int | None = None  # sequences per optimizer step, all workers together
    learning_rate: float | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    grad_accum: int = 1
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default: the cluster's CPUs less one for data, shared out
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    shuffle: str = "global"
    shuffle_buffer: int = 10_000  # rows per worker, for --shuffle local
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    overwrite: bool = False
    ray_address: str | None = None
    num_cpus: int | None = None

    def hparams(self) -> PretrainHParams:
        base = PRESETS[self.preset]
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(PretrainHParams) if hasattr(self, f.name)}
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})

    def validate(self) -> None:
        if not self.mined or not self.output:
            raise ConfigError("give the mined data (a `splinter mine` output) and an output directory")
        sources = [name for name in ("model", "from_bert", "model_config") if getattr(self, name)]
        if len(sources) != 1:
            raise ConfigError("give exactly one of --model DIR, --from-bert DIR or --model-config base|large|FILE")
        for name in ("model", "from_bert"):
            path = getattr(self, name)
            if path and not (Path(path) / "config.json").is_file():
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {path}: no config.json there; pass a checkpoint directory")
        if self.model_config and self.model_config not in MODEL_SIZES and not Path(self.model_config).is_file():
            raise ConfigError(f"--model-config {self.model_config}: neither base, large nor a config.json file")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.shuffle not in SHUFFLES:
            raise ConfigError(f"--shuffle must be global or local, got {self.shuffle!r}")
        if self.num_workers < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.shuffle_buffer < 1:
            raise ConfigError("--num-workers, --checkpoint-every, --keep-checkpoints and --shuffle-buffer must be >= 1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be >= 0, got {self.max_failures}")
        try:
            self.hparams().micro_batch(self.num_workers)
        except ValueError as exc:
            raise ConfigError(f"--batch-size: {exc}") from None

    def run_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_FIELDS} | {"hparams": dataclasses.asdict(self.hparams())}


# ---------------------------------------------------------------------------------------- the output dir
STATS_NAME = "pretrain_stats.json"
OURS = ("run.json", "trainer_log.jsonl", RUN_NAME, "final", STATS_NAME, "_SUCCESS", "_final.tmp", "tensorboard",
        "report.html")


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
    fs.move(f"{path}.tmp", path)


def prepare_output(cfg: PretrainConfig) -> tuple[str, dict[str, Any] | None]:
    """Check OUTPUT against this run; returns (state, the finished run's summary if complete).

    state is "new" or "resume". An OUTPUT holding files we did not write, or a run with other
    settings, is refused (--overwrite replaces a run of ours, and only the files it wrote).
    """
    fs, root = filesystem(cfg.output)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output {cfg.output} is a file; pass a directory")
    entries = fs.get_file_info(pafs.FileSelector(root)) if info.type == pafs.FileType.Directory else []
    if entries:
        names = {e.base_name for e in entries}
        if "run.json" not in names:
            raise ConfigError(
                f"output {cfg.output} is not empty and holds no pretraining run (found {sorted(names)[:5]}); "
                "use a new or empty directory"
            )
        previous = _read_json(fs, f"{root}/run.json")
        if cfg.overwrite:
            for entry in entries:
                if entry.base_name in OURS:
                    (fs.delete_dir if entry.type == pafs.FileType.Directory else fs.delete_file)(entry.path)
        else:
            changed = [k for k in RUN_FIELDS if previous.get(k) != cfg.run_fields()[k]]
            if changed:
                k = changed[0]
                raise ConfigError(
                    f"output {cfg.output} holds a run with other settings ({k}: {previous.get(k)!r} there, "
                    f"{getattr(cfg, k)!r} now); rerun with the same settings to resume, or use --overwrite or a new output"
                )
            if "_SUCCESS" in names:
                return "resume", _read_json(fs, f"{root}/_SUCCESS")
            return "resume", None
    fs.create_dir(root, recursive=True)
    _write_json(fs, f"{root}/run.json", cfg.run_fields())
    return "new", None


# ---------------------------------------------------------------------------------------- running
class _ProgressSink:
    """A tiny actor between rank 0 and the driver: log records in, drained by the driver's display."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def put(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def take(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out


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


def _start_ray(cfg: PretrainConfig) -> None:
    import ray

    from pipeline.engine.runner import init_ray

    if not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        # On one machine, Ray Train's preemption watcher (spot nodes being drained) and its state
        # actor (dashboard bookkeeping) have nothing to do; each is one more process to start (~3 s
        # apiece on 2 cores). The controller reads these from the driver's environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    if ray.is_initialized() or cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        init_ray(cfg.ray_address, None)
        return
    # An embedded Ray: one logical CPU more than the machine has, so the workers can take every core
    # for torch while Ray Data's (light) reading tasks still get scheduled.
    cores = cfg.num_cpus or os.cpu_count() or 1
    init_ray(None, max(cores, math.ceil(cfg.num_workers * (cfg.cpus_per_worker or 1))) + 1)


def _resume_epoch(cfg: PretrainConfig) -> int:
    """The epoch of the newest checkpoint Ray Train registered under OUTPUT (0 for a fresh run)."""
    fs, root = filesystem(cfg.output)
    path = f"{root}/{RUN_NAME}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return 0
    try:
        latest = _read_json(fs, path).get("latest_checkpoint_result") or {}
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
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training.pretrain_worker import LOG_NAME, train_worker

    progress = progress or NullProgress()
    data, source, hp = plan_pretrain(cfg)
    state, finished = prepare_output(cfg)
    if finished is not None:
        progress.log(f"[pretrain] {cfg.output} is complete ({finished.get('steps')} steps); nothing to do")
        return {**finished, "already_complete": True}

    _start_ray(cfg)
    if cfg.use_gpu and not ray.cluster_resources().get("GPU") and not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError("--use-gpu: this machine's Ray has no GPU; drop --use-gpu or run on a GPU cluster (--address)")
    cpus = _cpus_per_worker(cfg)
    root = filesystem(cfg.output)[1]
    storage = cfg.output if "://" in cfg.output else root  # Ray Train wants a URI or an absolute path
    # The driver polls the sink every half second: it lives on the driver's node, so losing a worker node
    # (which Ray Train survives by restarting the group) cannot take the driver's progress with it.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    sink = ray.remote(num_cpus=0, scheduling_strategy=here)(_ProgressSink).remote()
    loop_config = {
        "hparams": dataclasses.asdict(hp),
        "source": source.plain(),
        "tokenizer": source.tokenizer,
        "seed": cfg.seed,
        "shuffle": cfg.shuffle,
        "shuffle_buffer": cfg.shuffle_buffer,
        "checkpoint_every": cfg.checkpoint_every,
        "output": storage,
        "threads": max(1, int(cpus)),
        "run_id": json.dumps(cfg.run_fields(), sort_keys=True),
        "sink": sink,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
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

    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            show(ray.get(sink.take.remote()))
        show(ray.get(sink.take.remote()))  # whatever arrived while the last wait ended
    finally:
        progress.close()
    ray.kill(sink)
    if "error" in outcome:
        raise PretrainError(f"pretraining failed: {_worker_error(outcome['error'])} (log: {cfg.output}/{LOG_NAME})")
    result = outcome["result"]
    return _finish(cfg, result, time.perf_counter() - started)


def _finish(cfg: PretrainConfig, result: Any, seconds: float) -> dict[str, Any]:
    """Copy the last checkpoint to OUTPUT/final, write the summary, then _SUCCESS (last)."""
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
    state = _read_json(fs, f"{final}/trainer_state.json")
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
    _write_json(fs, f"{root}/{STATS_NAME}", summary)
    _write_json(fs, f"{root}/_SUCCESS", summary)
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
