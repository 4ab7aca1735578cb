"""The Ray Train worker loop of `splinter pretrain` (what each TorchTrainer worker runs).

Every worker builds the model (from the last checkpoint when the run resumes), wraps it in DDP
(`ray.train.torch.prepare_model`: gloo on CPU, nccl on GPU), and trains on its shard of the mined
rows (`ray.train.get_dataset_shard`). The shard is an equal split (Ray Train splits with
`equal=True`), so every worker sees the same number of micro-batches per epoch and takes the same
optimizer steps: DDP never waits on a worker that ran out of data.

The math is `splinter.pretrain.PretrainStep`; this file only moves data, logs and checkpoints:
- every step, rank 0 appends a line to OUTPUT/trainer_log.jsonl (loss, lr, questions/s, tokens/s
  over all workers), writes the same scalars to OUTPUT/tensorboard/ and hands it to the driver's
  progress display;
- every `checkpoint_every` steps and at the end, rank 0 saves the model in our checkpoint format plus
  the optimizer, schedule and data position (`splinter.pretrain.save_checkpoint`) and reports it to
  Ray Train, which keeps the last k under OUTPUT/checkpoints/;
- on resume, the data position (epoch, steps taken in it) says how many micro-batches of the current
  epoch to pass over, so the run continues the epoch and ends at the requested total steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.paths import is_uri
from pipeline.storage.filesystems import filesystem
from pipeline.training.tensorboard_events import EventLog
from splinter import load_from_bert
from splinter.checkpoint import load_pretrained
from splinter.collate import collate_pretraining
from splinter.config import SplinterConfig
from splinter.model import SplinterForPreTraining
from splinter.pretrain import PretrainHParams, PretrainStep, load_trainer_state, save_checkpoint

LOG_NAME = "trainer_log.jsonl"


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any values, stable across processes (never Python's salted hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class TrainerLog:
    """trainer_log.jsonl: appended line by line on a local path; on object storage (no appends) the
    whole file is rewritten at every checkpoint and at the end."""

    def __init__(self, output: str) -> None:
        self.fs, root = filesystem(output)
        self.path = f"{root}/{LOG_NAME}"
        self.local = not is_uri(output)
        self.lines: list[str] = []
        if not self.local:
            with contextlib.suppress(FileNotFoundError, OSError), self.fs.open_input_stream(self.path) as f:
                self.lines = f.read().decode().splitlines(keepends=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        else:
            self.lines.append(line)

    def flush(self) -> None:
        if not self.local:
            with self.fs.open_output_stream(self.path) as f:
                f.write("".join(self.lines).encode())


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a Ray Train worker needs, built and checked once on the driver
    (`pipeline.training.pretraining`) and passed across the Ray Train boundary as this object."""

    hparams: PretrainHParams
    source: dict[str, Any]  # pretrain_data.ModelSource.plain(): what a fresh run starts from
    tokenizer: Any  # saved with every checkpoint, so a checkpoint is a complete model directory
    seed: int
    shuffle: str  # "global" (Ray Data shuffles every epoch) or "local" (a per-worker buffer)
    shuffle_buffer: int
    checkpoint_every: int
    output: str  # a URI or an absolute path: Ray Train's storage
    threads: int  # torch threads per worker
    run_id: str  # the run's settings, stamped into every checkpoint
    sink: Any = None  # the driver's progress/stop actor


def _initial_model(source: dict[str, Any], seed: int) -> SplinterForPreTraining:
    """The model a fresh run starts from: a Splinter checkpoint, a BERT checkpoint, or a config."""
    torch.manual_seed(seed)  # a fresh QASS head (or model) starts the same on every worker
    kind = source["kind"]
    if kind == "model":
        model = load_pretrained(SplinterForPreTraining, source["path"])
    elif kind == "bert":
        model = load_from_bert(SplinterForPreTraining, source["path"])
    else:
        model = SplinterForPreTraining(SplinterConfig.from_dict(source["config"]))
    if source.get("question_token_id") is not None:
        model.config.question_token_id = int(source["question_token_id"])
    return model


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


class _NoTracebackEcho(logging.Filter):
    """Ray Train prints a failing worker's traceback on the driver's console; ours goes to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Error in training function")


def train_worker(config: dict[str, WorkerPlan]) -> None:
    """The TorchTrainer `train_loop_per_worker`; `config["plan"]` is the WorkerPlan the driver built.

    A failure is recorded in trainer_log.jsonl (one line and the traceback) before it propagates:
    the driver then prints one line naming the log, and Ray Train restarts the workers from the newest
    checkpoint while --max-failures allows.
    """
    import ray.train

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray Train logs every report at INFO ("Reporting training result ...", through a logger named
    # after its source file); trainer_log.jsonl says more, so keep the console for warnings.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.util").addFilter(_NoTracebackEcho())
    cfg = config["plan"]
    try:
        _train(cfg)
    except BaseException as exc:
        if not is_uri(cfg.output):
            rank = ray.train.get_context().get_world_rank()
            with open(f"{cfg.output}/{LOG_NAME}", "a", encoding="utf-8") as f:
                f.write(json.dumps({"event": "error", "rank": rank, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc(), "time": time.time()}) + "\n")
        raise


def _train(cfg: WorkerPlan) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    hp = cfg.hparams
    micro = hp.micro_batch(world)
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None

    with checkpoint.as_directory() if resumed else contextlib.nullcontext(None) as ckpt_dir:
        model = (
            load_pretrained(SplinterForPreTraining, ckpt_dir) if resumed else _initial_model(cfg.source, cfg.seed)
        )
        model = ray.train.torch.prepare_model(model)
        bf16 = on_gpu and torch.cuda.is_bf16_supported()
        trainer = PretrainStep(model, hp, device=device, autocast=torch.bfloat16 if bf16 else None)
        record = load_trainer_state(ckpt_dir, trainer) if resumed else {"epoch": 0, "step_in_epoch": 0, "rows_seen": 0}
    # Dropout differs per worker and per resume point, reproducibly.
    torch.manual_seed(derive_seed(cfg.seed, "dropout", rank, trainer.step))

    log = TrainerLog(cfg.output) if rank == 0 else None
    # TensorBoard's copy of the step records (rank 0 only); a resume drops the earlier file's steps after it.
    events = EventLog(cfg.output, purge_step=trainer.step + 1 if resumed else None) if rank == 0 else None
    sink = cfg.sink
    if log is not None:
        event = {
            "event": "resume" if resumed else "start",
            "step": trainer.step,
            "epoch": record["epoch"],
            "step_in_epoch": record["step_in_epoch"],
            "num_workers": world,
            "micro_batch": micro,
            "time": time.time(),
        }
        if resumed:
            event["checkpoint"] = checkpoint.path
        log.write(event)
        if sink is not None:
            sink.put.remote(event)

    def save(pos: dict[str, int], metrics: dict[str, Any]) -> None:
        state = {**pos, "run": cfg.run_id}
        name = f"step-{trainer.step:08d}"
        if rank == 0:
            assert log is not None
            log.write({"event": "checkpoint", "step": trainer.step, "name": name, "time": time.time()})
            log.flush()
            assert events is not None
            events.flush()
            tmp = tempfile.mkdtemp(prefix="splinter-ckpt-")
            try:
                save_checkpoint(tmp, trainer, state, tokenizer=cfg.tokenizer)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(metrics, checkpoint_dir_name=name)

    pos = {"epoch": record["epoch"], "step_in_epoch": record["step_in_epoch"], "rows_seen": record["rows_seen"]}
    metrics: dict[str, Any] = {"step": trainer.step}
    saved_at = trainer.step if resumed else -1
    stopped = False
    tick = time.perf_counter()

    def stop_asked() -> bool:
        """Did the driver get SIGTERM/SIGINT? Every worker asks and all agree (any one counts), so they
        checkpoint at the same step and leave together."""
        asked = 0.0
        if sink is not None:
            with contextlib.suppress(Exception):  # a slow sink must not stop training: ask again next step
                asked = float(ray.get(sink.stop_requested.remote(), timeout=10))
        return _all_sum([asked], device)[0] > 0

    def take_step(group: list[dict[str, torch.Tensor]]) -> bool:
        """One optimizer step and its bookkeeping; True when the run has all its steps or must stop."""
        nonlocal metrics, saved_at, tick, stopped
        result = trainer(group)
        pos["step_in_epoch"] += 1
        metrics = _step_metrics(trainer, result, pos["epoch"], tick, device)
        pos["rows_seen"] += metrics["sequences"]
        if log is not None and events is not None:
            log.write(metrics)
            events.write(metrics)
            if sink is not None:
                sink.put.remote(metrics)
        stopped = trainer.step < hp.max_steps and stop_asked()
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step >= hp.max_steps or stopped:
            save(pos, metrics)
            saved_at = trainer.step
        tick = time.perf_counter()
        return trainer.step >= hp.max_steps or stopped

    shard = ray.train.get_dataset_shard("train")
    done = trainer.step >= hp.max_steps
    while not done:
        local_shuffle = cfg.shuffle == "local"
        batches = shard.iter_batches(
            batch_size=micro,
            batch_format="numpy",
            prefetch_batches=2,
            local_shuffle_buffer_size=cfg.shuffle_buffer if local_shuffle else None,
            local_shuffle_seed=derive_seed(cfg.seed, "local-shuffle", pos["epoch"], rank) if local_shuffle else None,
        )
        skip = pos["step_in_epoch"] * hp.grad_accum  # micro-batches trained on before a resume
        seen, group = 0, []
        for raw in batches:
            seen += 1
            if seen <= skip:
                continue
            group.append(collate_pretraining(raw, pad_to_multiple_of=8 if on_gpu else 1))
            if len(group) == hp.grad_accum:
                done, group = take_step(group), []
                if done:
                    break
        else:
            if group:  # the epoch's last, shorter step: the same on every worker (equal shards)
                done = take_step(group)
            if seen == 0:
                raise RuntimeError(f"worker {rank} got no mined rows in epoch {pos['epoch']}")
            pos.update(epoch=pos["epoch"] + 1, step_in_epoch=0)
    if saved_at != trainer.step:  # a rerun of a finished run: its final state is reported once more
        save(pos, metrics)
    if log is not None:
        log.write({"event": "stopped" if stopped else "done", "step": trainer.step, "time": time.time()})
        log.flush()
        if events is not None:
            events.close()
        if sink is not None:  # waiting on the last record means the driver has every earlier one
            ray.get(sink.put.remote({"event": "stopped" if stopped else "done", "step": trainer.step}))


def _step_metrics(
    trainer: PretrainStep, result: Any, epoch: int, tick: float, device: torch.device
) -> dict[str, Any]:
    """One log line: the step's loss and rates over all workers (wall time includes data loading)."""
    seconds = time.perf_counter() - tick
    sequences, questions, tokens = _all_sum([result.sequences, result.questions, result.tokens], device)
    return {
        "step": trainer.step,
        "epoch": epoch,
        "loss": round(result.loss, 6),
        "lr": result.lr,
        "grad_norm": round(result.grad_norm, 6),
        "sequences": int(sequences),
        "questions": int(questions),
        "tokens": int(tokens),
        "seconds": round(seconds, 4),
        "questions_per_s": round(questions / max(seconds, 1e-9), 2),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "time": time.time(),
    }


__all__ = ["LOG_NAME", "TrainerLog", "WorkerPlan", "derive_seed", "train_worker"]
