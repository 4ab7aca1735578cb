"""What a stage asks of the cluster. Only `pipeline.engine.runner` turns this into Ray arguments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    """Per-stage scheduling hints.

    `actors > 0` makes the stage an actor pool of that size: each actor builds the stage once
    (a model load) and then serves many batches. `actors == 0` runs the stage as stateless tasks.
    `max_actors > actors` lets the pool grow from `actors` up to `max_actors` while work is queued
    (on an autoscaling cluster Ray adds nodes for them). `num_gpus` may be fractional (several actors
    sharing one GPU).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 256
    actors: int = 0
    # For task stages: at most this many concurrent tasks (0 = as many as the CPUs allow).
    tasks: int = 0
    max_actors: int = 0  # 0: a fixed pool of `actors`

    @property
    def pool(self) -> tuple[int, int]:
        """(min, max) actors of an actor stage."""
        return self.actors, max(self.actors, self.max_actors)

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"resources must be non-negative, got cpus={self.num_cpus} gpus={self.num_gpus}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.actors < 0 or self.tasks < 0:
            raise ValueError(f"actors and tasks must be >= 0, got {self.actors} and {self.tasks}")
        if self.max_actors and self.max_actors < self.actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= actors ({self.actors})")
        if self.max_actors and not self.actors:
            raise ValueError("max_actors needs actors >= 1 (the pool's minimum)")
        if self.num_gpus > 0 and self.actors == 0:
            raise ValueError("a GPU stage must run as an actor pool (actors >= 1) so the model loads once")
