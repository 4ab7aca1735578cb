"""TensorBoard event files for training runs: OUTPUT/tensorboard/, so `tensorboard --logdir OUTPUT` works.

Written by the process that writes trainer_log.jsonl (rank 0 on Ray Train), with torch's own writer
(`torch.utils.tensorboard`, which needs the `tensorboard` package: the `report` extra). Without it a run
still trains and logs to trainer_log.jsonl; `available()` says so once, up front.

On a local OUTPUT the writer appends to its event file in place (TensorBoard follows it live). On object
storage (no appends) events go to a local temporary directory and are copied to OUTPUT/tensorboard/ at
every flush (each checkpoint and the end), as trainer_log.jsonl is.

A resumed run passes `purge_step`: TensorBoard then drops the earlier file's events from that step on, so
the steps re-run after a resume appear once, as in the run that finished them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from typing import Any

from pipeline.paths import is_uri
from pipeline.storage.filesystems import filesystem

TENSORBOARD_DIR = "tensorboard"
# trainer_log.jsonl key -> TensorBoard tag; the tags group under train/ as transformers' and Ray's do.
SCALARS = {
    "loss": "loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "questions_per_s": "train/questions_per_s",
    "examples_per_s": "train/examples_per_s",
}


def available() -> bool:
    """Can event files be written here (torch's writer and the tensorboard package installed)?"""
    return importlib.util.find_spec("tensorboard") is not None


class EventLog:
    """Scalars per step into OUTPUT/tensorboard/; a no-op when the tensorboard package is missing."""

    def __init__(self, output: str, purge_step: int | None = None) -> None:
        self.writer: Any = None
        if not available():
            return
        from torch.utils.tensorboard import SummaryWriter

        self.remote = is_uri(output)
        self.fs, root = filesystem(output)
        self.target = f"{root}/{TENSORBOARD_DIR}"
        self.local_dir = tempfile.mkdtemp(prefix="splinter-tb-") if self.remote else self.target
        os.makedirs(self.local_dir, exist_ok=True)
        # flush_secs: a live run shows up in TensorBoard within seconds, without a flush per step.
        self.writer = SummaryWriter(log_dir=self.local_dir, purge_step=purge_step or None, flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        """One trainer_log.jsonl step record: every known scalar in it, at its step."""
        if self.writer is None or "step" not in record or "event" in record:
            return
        for key, tag in SCALARS.items():
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), global_step=int(record["step"]))

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.remote:
            self.fs.create_dir(self.target, recursive=True)
            for name in os.listdir(self.local_dir):
                with open(os.path.join(self.local_dir, name), "rb") as src, \
                        self.fs.open_output_stream(f"{self.target}/{name}") as dst:
                    dst.write(src.read())

    def close(self) -> None:
        if self.writer is None:
            return
        self.flush()
        self.writer.close()
        self.writer = None
        if self.remote:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.local_dir)


__all__ = ["SCALARS", "TENSORBOARD_DIR", "EventLog", "available"]
