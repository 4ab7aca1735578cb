"""What a job is made of: its stages and what they need, its input, output schema and stats.

Plain data, shared by the runner (which schedules it) and the output writer (which follows it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.engine.resources import Resources
from pipeline.storage.sources import ReadOptions

Batch = dict[str, np.ndarray]
# _src: 1 on one output row per source row (for counting sources in stats).
# _den: each row stands for 1/_den of its source row, so a shard is complete exactly when the
#       weights that reached the writer add up to its row count, however rows were split or reordered.
INTERNAL = ("_shard", "_row", "_sub", "_src", "_den", "_shard_rows", "_error")


@dataclass(frozen=True)
class StageSpec:
    """A stage class, the plain kwargs to build it with (on the worker), and what it needs.

    `shared` holds kwargs too big to travel with every task (model weights, a tokenizer): the Ray
    runner puts each into the object store once per job and workers fetch them by reference (actors on
    one node map the same memory); a local run passes them as they are.
    """

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: Resources | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def res(self) -> Resources:
        return self.resources or getattr(self.cls, "resources", Resources())

    def build(self, shared: dict[str, Any] | None = None) -> Callable[[Batch], Batch]:
        """The stage, with `shared` (resolved by the runner) in place of the spec's own shared values."""
        return self.cls(**self.kwargs, **(self.shared if shared is None else shared))


@dataclass(frozen=True)
class JobSpec:
    """Everything the runner needs to know about a job; holds no logic of its own."""

    name: str
    read: ReadOptions
    stages: list[StageSpec]
    schema: pa.Schema
    reason_column: str  # where a row's skip/error reason lives
    drop_reason_rows: bool  # mining drops skipped docs (counted); QA keeps error rows (rows out = rows in)
    summarize: Callable[[pa.Table], dict[str, Any]] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    write_batch_size: int = 1024
