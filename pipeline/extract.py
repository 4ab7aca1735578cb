"""The bulk QA extraction job: (context, question) rows -> best answer spans (Parquet)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ExtractConfig
from pipeline.progress import Progress
from pipeline.resources import Resources
from pipeline.runner import JobSpec, StageSpec, run_config
from pipeline.schema import qa_schema
from pipeline.sources import ReadOptions
from pipeline.stages.qa import QAModel, QAPostprocess, QATokenize


def summarize_qa(table: pa.Table) -> dict[str, Any]:
    answered = pc.invert(pc.is_null(table["answer"]))
    scores = pc.filter(table["score"], answered).to_numpy(zero_copy_only=False)
    return {
        "answered": int(pc.sum(answered).as_py() or 0),
        "score_sum": float(np.sum(scores, dtype=np.float64)) if len(scores) else 0.0,
    }


def _cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the attached Ray cluster, or of this machine when running without Ray."""
    try:
        import ray

        if ray.is_initialized():
            res = ray.cluster_resources()
            return float(res.get("CPU", 1)), float(res.get("GPU", 0))
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    import torch

    return float(os.cpu_count() or 1), float(torch.cuda.device_count())


def extract_spec(cfg: ExtractConfig, cpus: float, gpus: float) -> JobSpec:
    use_gpu = gpus >= 1 and cfg.device != "cpu"
    # On CPU, each model actor gets an equal share of the machine as torch threads; tokenizing
    # and post-processing are light next to the forward pass.
    threads = max(1, math.floor(cpus / cfg.num_actors))
    # Ray's CPU reservation for CPU actors is capped so reads and writers always find a free slot:
    # actors holding every CPU stall the stream (ray#44687).
    actor_cpus = 1.0 if use_gpu else max(0.25, min(1.0, (cpus - 1) / cfg.num_actors)) if cpus > 1 else 0.5
    model_res = Resources(num_cpus=actor_cpus, num_gpus=1 if use_gpu else 0, batch_size=cfg.batch_size,
                          actors=cfg.num_actors)
    token_res = Resources(num_cpus=0.5, batch_size=cfg.batch_size)
    post_res = Resources(num_cpus=QAPostprocess.resources.num_cpus, batch_size=cfg.batch_size)
    return JobSpec(
        name="extract",
        read=ReadOptions(kind="questions", id_column=cfg.id_column, question_column=cfg.question_column,
                         context_column=cfg.context_column),
        stages=[
            StageSpec(QATokenize, {"tokenizer": cfg.model, "max_length": cfg.max_length, "stride": cfg.stride,
                                   "max_query_length": cfg.max_query_length,
                                   "max_context_chars": cfg.max_context_chars}, token_res),
            StageSpec(QAModel, {"model": cfg.model, "device": "cuda" if use_gpu else cfg.device,
                                "dtype": cfg.dtype, "max_answer_length": cfg.max_answer_length,
                                "n_best": cfg.n_best, "num_threads": None if use_gpu else threads}, model_res),
            StageSpec(QAPostprocess, {"n_best": cfg.n_best}, post_res),
        ],
        schema=qa_schema(cfg.n_best),
        reason_column="error",
        drop_reason_rows=False,
        summarize=summarize_qa,
        config=cfg.output_fields(),
    )


def run_extract(cfg: ExtractConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Validate, plan shards, run on Ray (or locally with cfg.local), return the job's stats."""
    stats = run_config(cfg, lambda: extract_spec(cfg, *_cluster_resources()), progress)
    answered = stats.get("answered", 0)
    stats["mean_score"] = round(stats.pop("score_sum", 0.0) / answered, 4) if answered else None
    warning = _untrained_head_warning(cfg.model)
    if warning:
        stats["warning"] = warning
    return stats


def _untrained_head_warning(model: str) -> str | None:
    """The driver's one look at the checkpoint's QASS head history (headers only); never fails the job."""
    from splinter.checkpoint import untrained_qass_warning

    if "://" in model:
        return None
    try:
        return untrained_qass_warning(model)
    except (OSError, ValueError):
        return None


def format_extract_summary(stats: dict[str, Any]) -> str:
    lines = [f"WARNING: {stats['warning']}"] if stats.get("warning") else []
    lines += [
        f"{'questions in':<28}{stats.get('rows_in', 0):>12,}",
        f"{'rows out':<28}{stats.get('rows_out', 0):>12,}",
        f"{'answered':<28}{stats.get('answered', 0):>12,}",
    ]
    for reason, n in sorted(stats.get("errors", {}).items()):
        lines.append(f"{'  error: ' + reason:<28}{n:>12,}")
    lines += [
        f"{'seconds':<28}{stats.get('seconds', 0):>12.1f}",
        f"{'questions / second':<28}{stats.get('rows_per_second', 0):>12,.1f}",
        f"{'output':<28}{stats.get('output', '')}",
    ]
    return "\n".join(lines)
