"""Recurring-span selection pretraining in plain PyTorch: the step, its hyper-parameters and its state.

`PretrainStep` trains `SplinterForPreTraining` on collated mined rows (`splinter.collate`), either
layout (the original layout's `position_ids` go to the model as they are). One optimizer step runs
over `grad_accum` micro-batches, and the loss it minimises is the mean over every real question of
the whole step, exactly what transformers' `SplinterForPreTraining` computes on the same rows as one
batch: each micro-batch's mean loss is weighted by its share of the step's questions, and under
`torch.distributed` (DDP) the question count is summed over the workers first, so the averaged
gradients equal the one-big-batch gradient on any number of workers.

Nothing here knows about Ray: `pipeline.training.pretraining` runs this on Ray Train workers, a plain loop or a
benchmark can run it directly. Checkpoints are our checkpoint format (`splinter.checkpoint`:
safetensors + config.json, loadable by transformers) plus `trainer_state.pt` (optimizer and scheduler,
loaded with `weights_only=True`) and `trainer_state.json` (step, data position, settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splinter.checkpoint import save_pretrained
from splinter.model import SplinterForPreTraining, validate_inputs
from splinter.optim import adamw, linear_warmup_decay

__all__ = [
    "PRESETS",
    "PretrainHParams",
    "PretrainStep",
    "StepResult",
    "load_trainer_state",
    "micro_batches",
    "question_loss_sum",
    "save_checkpoint",
    "unwrap",
]

TRAINER_STATE_PT = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"


@dataclass(frozen=True)
class PretrainHParams:
    """What defines the optimisation. `batch_size` is sequences per optimizer step over all workers."""

    batch_size: int = 32
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    max_steps: int = 1000
    grad_accum: int = 1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("batch_size, grad_accum and max_steps must be >= 1")
        if not self.learning_rate > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0, warmup_steps and weight_decay >= 0")
        if self.max_grad_norm < 0 or not self.adam_eps > 0:
            raise ValueError("max_grad_norm must be >= 0 (0: no clipping) and adam_eps > 0")

    def micro_batch(self, num_workers: int) -> int:
        """Sequences per forward pass on each worker; batch_size must split evenly."""
        parts = num_workers * self.grad_accum
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into {num_workers} workers x "
                f"{self.grad_accum} accumulation steps; make it a multiple of {parts}"
            )
        return self.batch_size // parts


# The authors' recipe (Ram et al. 2021, `run_pretraining.py`, BERT's optimizer: AdamW with weight decay
# 0.01, eps 1e-6, gradient clipping at 1.0, linear warmup then linear decay to 0) and small values a
# laptop finishes in minutes. The authors trained on 512-token sequences with up to 30 questions
# (`splinter mine --max-seq-length 512 --max-questions 30 --dupe-factor 5`) on a TPU v3-8.
PRESETS: dict[str, PretrainHParams] = {
    "authors": PretrainHParams(batch_size=256, learning_rate=1e-4, warmup_steps=10_000, max_steps=2_400_000),
    "laptop": PretrainHParams(),
}


@dataclass
class StepResult:
    """One optimizer step, summed over this worker's micro-batches (and over workers for `loss`)."""

    loss: float  # the step's loss: mean over every real question of the step (all workers)
    lr: float  # the learning rate the step used
    grad_norm: float  # before clipping
    sequences: int  # this worker's
    questions: int
    tokens: int  # real (attended) tokens, padding excluded
    seconds: float


def question_loss_sum(
    start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor, ignore_index: int = 0
) -> Tensor:
    """Sum over real questions of (start CE + end CE) / 2, in fp32.

    transformers' SplinterForPreTraining loss is this divided by the number of real questions (labels
    clamped to [0, S-1], label `ignore_index` marking padded questions); summing instead lets
    micro-batches and workers be combined exactly, and a micro-batch without questions adds 0, not NaN.
    """
    s = start_logits.shape[-1]
    total = start_logits.new_zeros((), dtype=torch.float32)
    for logits, labels in ((start_logits, start_positions), (end_logits, end_positions)):
        labels = labels.clamp(0, s - 1).reshape(-1)
        total = total + F.cross_entropy(
            logits.float().reshape(-1, s), labels, ignore_index=ignore_index, reduction="sum"
        )
    return total / 2


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class PretrainStep:
    """Owns the optimizer and schedule of one model; `__call__` runs one optimizer step.

    `model` may be wrapped in DDP (gradients of all but the last micro-batch skip the all-reduce);
    under torch.distributed it must be, since the loss scaling counts on DDP averaging gradients.
    `autocast` (e.g. torch.bfloat16 on a GPU) runs forward passes under autocast; parameters,
    gradients and optimizer state stay fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        hparams: PretrainHParams,
        device: torch.device | str = "cpu",
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.hp = hparams
        self.device = torch.device(device)
        self.autocast = autocast
        net = unwrap(model)
        if not isinstance(net, SplinterForPreTraining):
            raise TypeError(f"expected a SplinterForPreTraining, got {type(net).__name__}")
        self.config = net.config
        # Inputs are checked once per micro-batch on the host (check_batch); the in-model check would
        # cost a device sync per forward.
        net.splinter.check_inputs = False
        self.optimizer = adamw(net, hparams.learning_rate, hparams.weight_decay, eps=hparams.adam_eps)
        self.scheduler = linear_warmup_decay(self.optimizer, hparams.warmup_steps, hparams.max_steps)
        self.step = 0  # optimizer steps taken

    # ------------------------------------------------------------------------------------ one step
    def check_batch(self, batch: Mapping[str, Tensor]) -> None:
        """Shapes and id ranges against the model (vocabulary, positions): a clear ValueError."""
        validate_inputs(
            self.config,
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("token_type_ids"),
            batch.get("position_ids"),
            batch["question_positions"],
        )

    def accumulate(self, micro_batches: Sequence[Mapping[str, Tensor]]) -> tuple[float, int, int, int]:
        """Forward and backward over the micro-batches (no optimizer step).

        Returns (loss over the step's questions on all workers, sequences, questions, tokens) of this worker.
        """
        if not micro_batches:
            raise ValueError("an optimizer step needs at least one micro-batch")
        for batch in micro_batches:
            self.check_batch(batch)
        counts = [int((b["start_positions"] != self.config.pad_token_id).sum()) for b in micro_batches]
        local = sum(counts)
        total = torch.tensor([float(local)], device=self.device)
        world = 1
        if _distributed():
            torch.distributed.all_reduce(total)
            world = torch.distributed.get_world_size()
        # DDP averages gradients over workers: scale so the average is the gradient of
        # (sum of all question losses) / (all questions).
        scale = world / max(float(total.item()), 1.0)
        loss_sum = torch.zeros((), device=self.device)
        sequences = tokens = 0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            starts, ends = batch.pop("start_positions"), batch.pop("end_positions")
            with sync:
                with self._autocast():
                    out = self.model(**batch)
                summed = question_loss_sum(out.start_logits, out.end_logits, starts, ends, self.config.pad_token_id)
                (summed * scale).backward()
            loss_sum += summed.detach()
            sequences += int(batch["input_ids"].shape[0])
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        if _distributed():
            torch.distributed.all_reduce(loss_sum)
        return float(loss_sum.item()) / max(float(total.item()), 1.0), sequences, local, tokens

    def _autocast(self) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def apply(self) -> tuple[float, float]:
        """Clip, step the optimizer and the schedule, clear gradients; returns (grad norm, lr used)."""
        params = [p for p in unwrap(self.model).parameters() if p.grad is not None]
        max_norm = self.hp.max_grad_norm if self.hp.max_grad_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return norm, lr

    def __call__(self, micro_batches: Sequence[Mapping[str, Tensor]]) -> StepResult:
        started = time.perf_counter()
        self.model.train()
        loss, sequences, questions, tokens = self.accumulate(micro_batches)
        norm, lr = self.apply()
        return StepResult(loss, lr, norm, sequences, questions, tokens, time.perf_counter() - started)

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


def save_checkpoint(
    directory: str | Path,
    trainer: PretrainStep,
    state: Mapping[str, Any],
    tokenizer: Any = None,
) -> Path:
    """The model in our checkpoint format (loads in ours and transformers) + the trainer's state.

    `state` is JSON-able: the data position and whatever a resumed run must know (written to
    trainer_state.json next to the weights; the step is added).
    """
    directory = Path(directory)
    save_pretrained(unwrap(trainer.model), directory, tokenizer=tokenizer)
    torch.save(trainer.state_dict(), directory / TRAINER_STATE_PT)
    record = {**state, "step": trainer.step, "hparams": dataclasses.asdict(trainer.hp)}
    (directory / TRAINER_STATE_JSON).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return directory


def load_trainer_state(directory: str | Path, trainer: PretrainStep | None = None) -> dict[str, Any]:
    """trainer_state.json of a checkpoint; with `trainer`, also restore its optimizer and schedule."""
    directory = Path(directory)
    path = directory / TRAINER_STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a pretraining checkpoint: it has no {TRAINER_STATE_JSON}")
    record = json.loads(path.read_text())
    if trainer is not None:
        state = torch.load(directory / TRAINER_STATE_PT, map_location="cpu", weights_only=True)
        trainer.load_state_dict(state)
        if trainer.step != record["step"]:
            raise ValueError(f"{directory}: {TRAINER_STATE_PT} and {TRAINER_STATE_JSON} disagree on the step")
    return record


def micro_batches(batches: Iterable[Any], grad_accum: int) -> Iterable[list[Any]]:
    """Group consecutive micro-batches into optimizer steps (the last group may be shorter)."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group
