"""Fine-tuning a Splinter QA model on (question, context, answer) examples: the authors' few-shot recipe.

Plain PyTorch. `finetune(model, tokenizer, examples, config)` does it all in one call; its two halves are
`splinter.qa_data.build_training_windows` (examples -> labelled windows, the same layout the QA job answers
from; see that module for the labels, including [CLS] for windows without the answer) and
`train_on_windows` (the loop: length-grouped, dynamically padded batches; AdamW with linear warmup and decay;
gradient clipping and accumulation; bf16 autocast on CUDA with fp32 weights), whose every optimizer step is
`train_step` (public for callers with a loop of their own).

Length, as in the authors' scripts: `epochs` (10) passes over the windows, but at least `min_steps` (200)
optimizer steps; `max_steps` fixes the number of steps outright. The schedule (10% linear warmup, then linear
decay to 0) spans exactly the steps that run (the authors' loop ran the last partial epoch to its end, a
step or two at learning rate 0).

Resuming: `train_on_windows(..., checkpoint_every=N, on_checkpoint=save)` hands a `TrainState` (the step, the
model, optimizer and schedule states, the RNG states and the log so far) to `save` every N steps;
`train_on_windows(..., resume=state)` continues from it and ends with the weights an uninterrupted run would
have (bit for bit on CPU with the same threads): the batch order is replayed, not stored, since the seeded
schedule only yields index arrays. `should_stop` is polled after every step; when it says so the loop hands
the state to `on_checkpoint` and raises `TrainingStopped`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from splinter.model import init_weights, question_answering_loss
from splinter.optim import adamw, linear_warmup_decay
from splinter.qa_data import (
    QAExample,
    TrainingWindows,
    build_training_windows,
    collate_windows,
    length_grouped_batches,
    padding_waste,
)
from splinter.tokenizer import SplinterTokenizer
from splinter.windows import stride_error

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "QAExample",
    "TrainState",
    "TrainingStopped",
    "TrainingWindows",
    "batch_schedule",
    "build_training_windows",
    "collate_windows",
    "finetune",
    "resolve_device",
    "total_steps",
    "train_on_windows",
    "train_step",
]


@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters; the defaults are the authors' few-shot recipe (Ram et al., 2021)."""

    learning_rate: float = 3e-5
    batch_size: int = 12  # windows per forward pass (per micro-batch with grad_accum > 1)
    epochs: float = 10.0
    min_steps: int = 200
    max_steps: int | None = None  # when set: exactly this many optimizer steps, epochs/min_steps ignored
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 turns clipping off
    max_length: int = 384
    stride: int = 128
    max_query_length: int = 64
    seed: int = 42
    reinit_qass: bool = False  # the authors re-initialise the QASS head; we keep the checkpoint's by default
    length_grouping: bool = True  # sort windows by length inside mega-batches of `group_size` batches
    group_size: int = 50
    device: str = "auto"  # auto: CUDA when present (bf16 autocast, fp32 weights), else CPU fp32

    def validate(self) -> None:
        """Raise ValueError naming the field and what to do."""
        positive = ("learning_rate", "batch_size", "grad_accum", "max_length", "max_query_length", "group_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.epochs < 0 or self.min_steps < 0:
            raise ValueError(f"epochs and min_steps must be >= 0, got {self.epochs} and {self.min_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or unset), got {self.max_steps}")
        if self.max_steps is None and self.epochs == 0 and self.min_steps == 0:
            raise ValueError("epochs, min_steps and max_steps are all 0: nothing to train")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.adam_eps <= 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0, adam_eps > 0")
        # The QA job's rule too, so a run that trains can also be answered with its own settings.
        if error := stride_error(self.max_length, self.stride, self.max_query_length):
            raise ValueError(f"{error}: lower --stride or raise --max-length")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ training
@dataclass
class FinetuneResult:
    """What a fine-tuning run did; `log` holds one record per optimizer step."""

    model: nn.Module
    steps: int
    epochs: float
    windows: int
    windows_with_answer: int
    examples: int
    skipped: dict[str, int]
    final_loss: float | None
    seconds: float
    device: str
    qass_head: str
    padding: dict[str, float]
    log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything `train_on_windows` needs to continue a run after `step` optimizer steps.

    The tensors handed to `on_checkpoint` are the live ones of the running loop: save them (`torch.save`
    of `to_dict()`) or copy them before the callback returns. `to_dict`/`from_dict` round-trip through
    `torch.save`/`torch.load(weights_only=True)`: only tensors, numbers, strings, lists and dicts.
    """

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: torch.Tensor  # torch's CPU generator: dropout on CPU
    cuda_rng: torch.Tensor | None = None  # the training device's generator when it is CUDA
    log: list[dict[str, Any]] = field(default_factory=list)  # the step records 1..step

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it would deep-copy every tensor of the model and the optimizer.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class TrainingStopped(Exception):
    """`should_stop()` said so after `step` of `total` steps; `checkpointed` when `on_checkpoint` got that step."""

    def __init__(self, step: int, total: int, checkpointed: bool) -> None:
        self.step, self.total, self.checkpointed = step, total, checkpointed
        super().__init__(f"training stopped after {step} of {total} steps")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use auto or cpu")
    return resolved


def total_steps(num_windows: int, config: FinetuneConfig) -> int:
    """Optimizer steps of a run: max_steps, else max(min_steps, epochs over the windows)."""
    if config.max_steps is not None:
        return config.max_steps
    micro_per_epoch = math.ceil(num_windows / config.batch_size)
    return max(config.min_steps, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))


def _check_model(model: nn.Module, windows: TrainingWindows, config: FinetuneConfig, question_id: int) -> None:
    mc = model.config
    if question_id != mc.question_token_id:
        raise ValueError(
            f"the tokenizer's [QUESTION] id {question_id} differs from the model's question_token_id "
            f"{mc.question_token_id}: use the checkpoint's own tokenizer"
        )
    if windows.input_ids.size and int(windows.input_ids.max()) >= mc.vocab_size:
        raise ValueError(
            f"token ids reach {int(windows.input_ids.max())} but the model's vocab_size is {mc.vocab_size}: "
            "use the checkpoint's own tokenizer"
        )
    if config.max_length > mc.max_position_embeddings:
        raise ValueError(
            f"max_length {config.max_length} exceeds the model's max_position_embeddings "
            f"{mc.max_position_embeddings}; lower max_length"
        )


def train_on_windows(
    model: nn.Module,
    windows: TrainingWindows,
    config: FinetuneConfig,
    question_token_id: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    *,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    resume: TrainState | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Train `model` (a SplinterForQuestionAnswering) on labelled windows; returns it in eval mode.

    Deterministic for a seed on CPU (same threads): the seed drives dropout, the QASS re-initialisation and
    the batch order. On CUDA the forward pass runs under bf16 autocast while weights, gradients and AdamW
    state stay fp32. `on_step` gets each step's log record (step, epoch, loss, lr, grad_norm,
    examples_per_s, tokens_per_s, padded_tokens, seconds) as it happens.

    `on_checkpoint` gets the `TrainState` after every `checkpoint_every`-th step (0: never; not after the
    last step, whose weights are the result). `resume` continues a run from such a state with the same
    windows and config: the model's weights come from it (no QASS re-initialisation) and the result is
    the uninterrupted run's. `should_stop()` is asked before the first step and after every step but the
    last; when true the state of the step reached goes to `on_checkpoint` (unless it just got it, or no
    step ran) and `TrainingStopped` is raised.
    """
    config.validate()
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if len(windows) == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(windows.skipped.items())) or "no examples given"
        raise ValueError(f"no usable training examples ({reasons})")
    _check_model(model, windows, config, model.config.question_token_id if question_token_id is None else question_token_id)
    device = resolve_device(config.device)
    steps = total_steps(len(windows), config)
    start = resume.step if resume is not None else 0
    if not 0 <= start <= steps:
        raise ValueError(f"the state to resume from is at step {start}, but this run has {steps} steps")
    torch.manual_seed(config.seed)
    qass_head = "reinitialized" if config.reinit_qass else "checkpoint"
    if config.reinit_qass and resume is None:  # a resumed run's head is in the state's weights
        init_weights(model.qass, model.config.initializer_range)
    model.to(device=device, dtype=torch.float32)  # fp32 master weights, also under bf16 autocast
    if resume is not None:
        model.load_state_dict(resume.model)
    model.train()
    checks = model.splinter.check_inputs
    model.splinter.check_inputs = False  # ids were checked once above; per-step checks cost a host sync

    optimizer = adamw(model, config.learning_rate, weight_decay=config.weight_decay, eps=config.adam_eps)
    scheduler = linear_warmup_decay(optimizer, int(config.warmup_ratio * steps), steps)
    limit = model.config.max_position_embeddings
    micro = batch_schedule(windows, config)
    log: list[dict[str, Any]] = []
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        # The order is a pure function of the seed: replaying it costs index arrays, not batches.
        next(itertools.islice(micro, start * config.grad_accum, start * config.grad_accum), None)
        torch.set_rng_state(resume.rng)
        if device.type == "cuda" and resume.cuda_rng is not None:
            torch.cuda.set_rng_state(resume.cuda_rng, device)
        log = list(resume.log[:start])

    def state(step: int) -> TrainState:
        return TrainState(
            step=step,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            log=list(log),
        )

    # `seconds` in the records counts training time over every session of a resumed run.
    t0 = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)
    t_session = time.perf_counter()
    try:
        if start < steps and should_stop is not None and should_stop():
            raise TrainingStopped(start, steps, checkpointed=False)
        for step in range(start + 1, steps + 1):
            t_step = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            picked = [next(micro) for _ in range(config.grad_accum)]
            batches = [collate_windows(windows, index, limit) for index, _ in picked]
            step_loss, norm = train_step(model, batches, optimizer, scheduler, config.max_grad_norm)
            seconds = max(time.perf_counter() - t_step, 1e-9)
            record = {
                "step": step,
                "epoch": round(picked[-1][1], 4),
                "loss": step_loss,
                "lr": lr,
                "grad_norm": norm,
                "examples_per_s": sum(index.size for index, _ in picked) / seconds,
                "tokens_per_s": sum(int(windows.lengths[index].sum()) for index, _ in picked) / seconds,
                "padded_tokens": sum(b["input_ids"].numel() for b in batches),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            log.append(record)
            if on_step is not None:
                on_step(record)
            if step == steps:
                break
            saved = False
            if on_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                on_checkpoint(state(step))
                saved = True
            if should_stop is not None and should_stop():
                if on_checkpoint is not None and not saved:
                    on_checkpoint(state(step))
                raise TrainingStopped(step, steps, checkpointed=on_checkpoint is not None)
    finally:
        model.splinter.check_inputs = checks
    model.eval()
    tail = [r["loss"] for r in log[-10:]]
    return FinetuneResult(
        model=model,
        steps=steps,
        epochs=round(log[-1]["epoch"], 4),
        windows=len(windows),
        windows_with_answer=int(windows.has_answer.sum()),
        examples=len(windows.examples),
        skipped=dict(windows.skipped),
        final_loss=float(np.mean(tail)) if tail else None,
        seconds=round(time.perf_counter() - t_session, 3),
        device=str(device),
        qass_head=qass_head,
        padding=padding_waste(windows.lengths, config.batch_size, config.max_length, config.seed, config.group_size),
        log=log,
    )


def train_step(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float = 1.0,
) -> tuple[float, float]:
    """One optimizer step over `len(batches)` accumulated micro-batches (from `collate_windows`); returns
    (mean micro-batch loss, gradient norm before clipping). Runs on the model's device: bf16 autocast on CUDA,
    fp32 weights and loss."""
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        # The loss in fp32 whatever autocast did to the logits.
        loss = question_answering_loss(
            out.start_logits.float(), out.end_logits.float(), batch["start_positions"], batch["end_positions"]
        )
        (loss / len(batches)).backward()
        losses.append(loss.detach())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    return float(torch.stack(losses).mean()), float(norm)  # one host sync per step


def batch_schedule(windows: TrainingWindows, config: FinetuneConfig) -> Iterator[tuple[np.ndarray, float]]:
    """Endless (window indices, fractional epoch) micro-batches: the order `train_on_windows` trains in.

    A numpy generator seeded with `config.seed` reshuffles every epoch, so a seed fixes the whole order.
    """
    rng = np.random.default_rng(config.seed)
    epoch = 0
    while True:
        batches = length_grouped_batches(
            windows.lengths, config.batch_size, rng, config.group_size, config.length_grouping
        )
        for i, index in enumerate(batches):
            yield index, epoch + (i + 1) / len(batches)
        epoch += 1


def finetune(
    model: nn.Module,
    tokenizer: SplinterTokenizer,
    examples: Sequence[Mapping[str, Any] | QAExample],
    config: FinetuneConfig | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> nn.Module:
    """Fine-tune a SplinterForQuestionAnswering on SQuAD-schema records; returns the model (eval mode).

    `examples` are records with `question`, `context` and `answers` (`{"text": [...], "answer_start":
    [...]}` or a list of `{"text", "answer_start"}`), or `QAExample`s. Bad records are skipped (see
    `build_training_windows`); use `build_training_windows` + `train_on_windows` for the counts and the log.
    """
    config = config or FinetuneConfig()
    config.validate()
    windows = build_training_windows(tokenizer, examples, config.max_length, config.stride, config.max_query_length)
    return train_on_windows(model, windows, config, tokenizer.question_token_id, on_step).model
