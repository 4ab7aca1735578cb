"""The bulk QA extraction job: (context, question) rows -> best answer spans (Parquet)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from pipeline.corpus.preflight import preflight
from pipeline.corpus.questions import read_questions
from pipeline.corpus.schemas import qa_schema, summarize_corpus_qa, summarize_qa
from pipeline.engine.resources import Resources
from pipeline.engine.runner import cluster_address, run_config
from pipeline.engine.spec import JobSpec, StageSpec
from pipeline.paths import is_uri
from pipeline.progress import Progress
from pipeline.settings import ConfigError, ExtractConfig
from pipeline.stages.corpus_qa import CorpusQATokenize
from pipeline.stages.qa import QAPostprocess, QATokenize
from pipeline.stages.qa_model import QAModel
from pipeline.storage.model_files import ShippedModel, read_checkpoint
from pipeline.storage.sources import ReadOptions

log = logging.getLogger(__name__)


def _topk_candidates(cfg: ExtractConfig) -> int:
    """n-best entries to decode so that `top_k` distinct character spans survive: overlapping windows can
    hold the same span, at most ceil(room / step) windows share a token (room: context tokens per window,
    step: room - stride; the shortest room, i.e. the longest question, is the worst case)."""
    from splinter.tokenizer import PAIR_SPECIAL_TOKENS

    room = cfg.max_length - cfg.max_query_length - PAIR_SPECIAL_TOKENS
    return cfg.top_k * math.ceil(room / (room - cfg.stride))


@dataclass(frozen=True)
class ClusterView:
    """What the driver knows about where the job will run, when it starts."""

    cpus: float  # CPUs in the cluster now
    gpus: float  # GPUs in the cluster now
    node_cpus: float  # CPUs of the biggest node now: an actor cannot span nodes
    # GPUs the cluster can grow to by its autoscaling config (None: no autoscaler, or it does not say).
    max_gpus: float | None = None
    # True for an embedded local Ray or a run without Ray: what is here now is all there will ever be.
    fixed: bool = True


def cluster_view(cfg: ExtractConfig) -> ClusterView:
    """The attached Ray cluster's resources (plus its autoscaling ceiling), or this machine's without Ray."""
    if cfg.local:
        import torch

        cpus = float(os.cpu_count() or 1)
        return ClusterView(cpus=cpus, gpus=float(torch.cuda.device_count()), node_cpus=cpus)
    import ray

    res = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(n.get("CPU", 0)) for n in nodes), default=float(res.get("CPU", 1)))
    max_gpus = None
    try:  # the autoscaler's view of the cluster config; absent on clusters without one
        ceiling = ray._private.state.state.get_max_resources_from_cluster_config()
        if ceiling is not None:
            max_gpus = float(ceiling.get("GPU", 0))
    except Exception:  # a private API: never let it stop a job
        max_gpus = None
    attached = cluster_address(cfg.ray_address) is not None
    return ClusterView(cpus=float(res.get("CPU", 1)), gpus=float(res.get("GPU", 0)), node_cpus=node_cpus,
                       max_gpus=max_gpus, fixed=not attached)


@dataclass(frozen=True)
class ModelPlan:
    """How the model stage runs: on which device, with what Ray reserves per actor, and how many actors."""

    device: str  # "cuda" or "cpu": explicit, so an actor never picks a device on its own
    resources: Resources
    num_threads: int  # torch threads per actor: its own reserved CPUs, rounded up
    note: str  # one line for the log: what was decided and why


# An "unlimited" autoscaling ceiling (a node type with no max_workers) says nothing about how many
# actors to plan for; the pool then stays at its minimum unless --num-actors gives a maximum.
_UNBOUNDED = 1 << 20


def plan_model(cfg: ExtractConfig, cluster: ClusterView) -> ModelPlan:
    """Decide the model actors' device and resources from the configuration.

    GPU use comes from the configuration (`--device cuda`, `--gpus-per-actor`), never from how many
    GPUs happen to be up at start-up: on an autoscaling cluster whose GPU workers are still at zero,
    actors that ask for GPUs are what makes the autoscaler add them. `--device auto` uses GPUs when the
    cluster has some or its autoscaling config can add some.
    """
    pool = cfg.actor_pool()
    wants_gpu = cfg.device.startswith("cuda") or bool(cfg.gpus_per_actor)
    if cfg.device == "auto" and not wants_gpu and not cfg.quantize:
        wants_gpu = cluster.gpus > 0 or (cluster.max_gpus or 0) > 0
    if wants_gpu:
        per_actor = cfg.gpus_per_actor or 1.0
        known_max = cluster.max_gpus if cluster.max_gpus is not None else (cluster.gpus if cluster.fixed else None)
        flag = f"--gpus-per-actor {per_actor:g}" if cfg.gpus_per_actor else f"--device {cfg.device}"
        if cluster.gpus == 0 and known_max == 0:
            where = "this machine has" if cluster.fixed else "the cluster has no GPU now and its autoscaling config adds"
            raise ConfigError(f"{flag} asks for GPUs but {where} none; use --device cpu "
                              "(or attach to a cluster with GPU workers: --address / RAY_ADDRESS)")
        if cluster.fixed and per_actor > cluster.gpus:
            raise ConfigError(f"{flag} asks for more GPUs per actor than this machine's {cluster.gpus:g}: "
                              "the actor could never start")
        if pool is None:
            now = max(1, math.floor(cluster.gpus / per_actor))
            ceiling = now
            if known_max is not None and known_max < _UNBOUNDED:
                ceiling = max(now, math.floor(known_max / per_actor))
            pool = (now, ceiling)
        cpus = cfg.cpus_per_actor or 1.0
        res = Resources(num_cpus=cpus, num_gpus=per_actor, batch_size=cfg.batch_size or 256, actors=pool[0],
                        max_actors=pool[1])
        note = (f"model on GPU: {_pool_text(pool)} x {per_actor:g} GPU, {cpus:g} CPU each "
                f"(the cluster has {cluster.gpus:g} GPUs now)")
        if cluster.gpus < per_actor:
            # Not an error on a cluster that can grow: the pending actors are what makes it add GPUs.
            log.warning("no GPU free in the cluster yet: the model actors wait for GPU workers to join (%s)", note)
        return ModelPlan("cuda", res, max(1, math.ceil(cpus)), note)

    pool = pool or (1, 1)
    cpus = cfg.cpus_per_actor
    if cpus is None:
        # Each actor gets an equal share of the cluster, at most one node, minus half a CPU left to
        # reading, tokenizing and writing: actors holding every CPU stall the stream (ray#44687). No
        # floor above that share: on a one-CPU node two actors of half a CPU each left the reads
        # nothing, and the job (or its --resume after a node loss) waited forever.
        cpus = max(0.1, min(cluster.node_cpus - 0.5, (cluster.cpus - 0.5) / pool[1]))
    elif cluster.fixed and cpus > cluster.node_cpus:
        raise ConfigError(f"--cpus-per-actor {cpus:g} is more than this machine's {cluster.node_cpus:g} CPUs: "
                          "the actor could never start")
    threads = max(1, math.ceil(cpus))
    res = Resources(num_cpus=cpus, num_gpus=0, batch_size=cfg.batch_size or 64, actors=pool[0], max_actors=pool[1])
    precision = "int8" if cfg.quantize else "fp32"
    note = f"model on CPU ({precision}): {_pool_text(pool)} x {cpus:g} CPUs, {threads} torch threads each"
    if cfg.device == "auto" and not cluster.fixed and cluster.max_gpus is None and not cfg.quantize:
        note += "; the cluster has no GPU now: pass --device cuda to use GPU workers an autoscaler adds"
        log.warning(note)
    return ModelPlan("cpu", res, threads, note)


def _pool_text(pool: tuple[int, int]) -> str:
    return f"{pool[0]} actor{'s' if pool[0] > 1 else ''}" if pool[0] == pool[1] else f"{pool[0]}-{pool[1]} actors"


def extract_spec(cfg: ExtractConfig, cluster: ClusterView, model: ShippedModel | str | None = None) -> JobSpec:
    """The job's stages and resources. `model`: the checkpoint read once on the driver and shipped to the
    workers (default: read `cfg.model` now); a path string makes every worker read it itself."""
    plan = plan_model(cfg, cluster)
    log.info("%s", plan.note)
    shipped = read_checkpoint(cfg.model) if model is None else model
    tokenizer = shipped.tokenizer if isinstance(shipped, ShippedModel) else shipped
    # Tokenizing and writing take a quarter CPU each next to CPU actors (they are a small fraction of
    # the forward's work, and a bigger reservation would take cores from the actors). Feeding GPUs, the
    # tokenizers are the CPU-side bottleneck: a full core each.
    light = 1.0 if plan.device == "cuda" else 0.25
    if plan.resources.num_cpus == light and not plan.resources.num_gpus:
        # Equal resources would make Ray Data fuse tokenizing into the model actor (run in turn with the
        # forward, on the actor's cores); a hair less keeps them apart.
        light = 0.2
    batch_size = plan.resources.batch_size  # the model's, which tokenizing feeds slice by slice
    token_res = Resources(num_cpus=light, batch_size=batch_size)
    post_res = Resources(num_cpus=light, batch_size=batch_size)
    n_best = max(cfg.n_best, _topk_candidates(cfg)) if cfg.top_k else cfg.n_best
    window_args = {"max_length": cfg.max_length, "stride": cfg.stride, "max_query_length": cfg.max_query_length}
    config = cfg.output_fields()
    if cfg.questions:
        questions = read_questions(cfg.questions)
        # The questions themselves, not only their file's name, decide the output: --resume refuses a change.
        config["question_list"] = [[q.question_id, q.text] for q in questions]
        fields = sorted({name for q in questions for name in q.fields})
        read = ReadOptions(kind="documents", text_column=cfg.text_column, id_column=cfg.id_column,
                           extra={"fields": fields})
        # A batch of documents becomes documents x questions rows: keep it to about batch_size pairs.
        docs_per_batch = max(1, batch_size // len(questions))
        tokenize = StageSpec(CorpusQATokenize, {**window_args, "max_context_chars": cfg.max_context_chars,
                                                "questions": [(q.question_id, q.text, q.fields) for q in questions]},
                             Resources(num_cpus=light, batch_size=docs_per_batch), shared={"tokenizer": tokenizer})
    else:
        read = ReadOptions(kind="questions", id_column=cfg.id_column, question_column=cfg.question_column,
                           context_column=cfg.context_column)
        tokenize = StageSpec(QATokenize, {**window_args, "max_context_chars": cfg.max_context_chars or 100_000},
                             token_res, shared={"tokenizer": tokenizer})
    return JobSpec(
        name="extract",
        read=read,
        stages=[
            tokenize,
            StageSpec(QAModel, {"device": plan.device, "dtype": cfg.dtype, "quantize": cfg.quantize,
                                "max_answer_length": cfg.max_answer_length, "n_best": n_best,
                                "num_threads": plan.num_threads}, plan.resources,
                      shared={"model": shipped}),
            StageSpec(QAPostprocess, {"n_best": n_best, "min_score": cfg.min_score,
                                      "null_margin": cfg.null_margin, "top_k": cfg.top_k}, post_res),
        ],
        schema=qa_schema(n_best, corpus=bool(cfg.questions)),
        reason_column="error",
        drop_reason_rows=False,
        summarize=summarize_corpus_qa if cfg.questions else summarize_qa,
        config=config,
    )


def run_extract(cfg: ExtractConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Validate, plan shards, run on Ray (or locally with cfg.local), return the job's stats."""
    def checks() -> None:
        preflight(cfg)
        if cfg.questions:  # a bad questions file is one line before Ray starts, not a failure in the spec
            read_questions(cfg.questions)

    stats = run_config(cfg, lambda: extract_spec(cfg, cluster_view(cfg)), progress, checks)
    answered = stats.get("answered", 0)
    stats["mean_score"] = round(stats.pop("score_sum", 0.0) / answered, 4) if answered else None
    warning = _untrained_head_warning(cfg.model)
    if warning:
        stats["warning"] = warning
    return stats


def _untrained_head_warning(model: str) -> str | None:
    """The driver's one look at the checkpoint's QASS head history (headers only); never fails the job."""
    from splinter.checkpoint import untrained_qass_warning

    if is_uri(model):
        return None
    try:
        return untrained_qass_warning(model)
    except (OSError, ValueError):
        return None


def format_extract_summary(stats: dict[str, Any]) -> str:
    lines = [f"WARNING: {stats['warning']}"] if stats.get("warning") else []
    corpus = "pair_errors" in stats
    lines += [
        f"{'documents in' if corpus else 'questions in':<28}{stats.get('rows_in', 0):>12,}",
        f"{'rows out':<28}{stats.get('rows_out', 0):>12,}",
        f"{'answered':<28}{stats.get('answered', 0):>12,}",
    ]
    for reason, n in sorted(stats.get("pair_errors" if corpus else "errors", {}).items()):
        lines.append(f"{'  error: ' + reason:<28}{n:>12,}")
    lines += [
        *([f"{'model':<28}{', '.join(stats['models'])}"] if stats.get("models") else []),
        f"{'seconds':<28}{stats.get('seconds', 0):>12.1f}",
        f"{'questions / second':<28}{stats.get('rows_per_second', 0):>12,.1f}",
        f"{'output':<28}{stats.get('output', '')}",
    ]
    return "\n".join(lines)
