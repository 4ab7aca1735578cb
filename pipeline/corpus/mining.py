"""The recurring-span mining job: corpus -> Splinter pretraining examples (Parquet)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.corpus.preflight import preflight
from pipeline.corpus.schemas import mining_schema
from pipeline.engine.resources import Resources
from pipeline.engine.runner import run_config
from pipeline.engine.spec import JobSpec, StageSpec
from pipeline.engine.stats import top_k
from pipeline.progress import Progress
from pipeline.settings import MineConfig
from pipeline.stages.recurring_spans import RecurringSpanMiner
from pipeline.storage.sources import ReadOptions

TOP_NGRAMS = 200  # kept per shard; the merged top list is exact for n-grams frequent in every shard


def summarize_mining(table: pa.Table) -> dict[str, Any]:
    """Per-part statistics of written sequences (they add up across parts and shards)."""
    nq = pc.list_value_length(table["question_positions"]).to_numpy(zero_copy_only=False)
    ntok = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    hist = Counter(int(q) for q in nq)
    spans = Counter(pc.list_flatten(table["masked_spans"]).to_pylist())
    return {
        "sequences": table.num_rows,
        # Counting first sequences (not distinct ids) stays exact when a document spans two parts.
        "documents_used": int(pc.sum(pc.equal(table["seq_index"], 0)).as_py() or 0),
        "questions": int(nq.sum()),
        "tokens": int(ntok.sum()),
        "questions_per_sequence": {str(k): v for k, v in sorted(hist.items())},
        "top_ngrams": top_k(dict(spans), TOP_NGRAMS),
    }


def mining_spec(cfg: MineConfig) -> JobSpec:
    stage_kwargs = {
        "tokenizer": cfg.tokenizer,
        "seed": cfg.seed,
        "max_seq_length": cfg.max_seq_length,
        "max_span_length": cfg.max_span_length,
        "max_questions": cfg.max_questions,
        "layout": cfg.layout,
        "dupe_factor": cfg.dupe_factor,
    }
    base = RecurringSpanMiner.resources
    res = Resources(num_cpus=base.num_cpus, batch_size=cfg.batch_size, tasks=cfg.num_workers or 0)
    return JobSpec(
        name="mine",
        read=ReadOptions(kind="documents", text_column=cfg.text_column, id_column=cfg.id_column),
        stages=[StageSpec(RecurringSpanMiner, stage_kwargs, res)],
        schema=mining_schema(cfg.layout),
        reason_column="skip_reason",
        drop_reason_rows=True,
        summarize=summarize_mining,
        config=cfg.output_fields(),
    )


def run_mine(cfg: MineConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Validate, plan shards, run on Ray (or locally with cfg.local), return the job's stats."""
    stats = run_config(cfg, lambda: mining_spec(cfg), progress, lambda: preflight(cfg))
    stats["top_ngrams"] = top_k(stats.get("top_ngrams", {}), 50)
    stats["dupe_factor"] = cfg.dupe_factor
    return stats


def format_mining_summary(stats: dict[str, Any]) -> str:
    seqs = stats.get("sequences", 0)
    lines = [
        f"{'documents read':<28}{stats.get('rows_in', 0):>12,}",
        f"{'documents used':<28}{stats.get('documents_used', 0):>12,}",
    ]
    for reason, n in sorted(stats.get("skipped", {}).items()):
        lines.append(f"{'  skipped: ' + reason:<28}{n:>12,}")
    lines += [
        f"{'duplication passes':<28}{stats.get('dupe_factor', 1):>12,}",
        f"{'sequences (rows out)':<28}{seqs:>12,}",
        f"{'tokens':<28}{stats.get('tokens', 0):>12,}",
        f"{'questions':<28}{stats.get('questions', 0):>12,}",
        f"{'questions per sequence':<28}{stats.get('questions', 0) / max(seqs, 1):>12.2f}",
        f"{'seconds':<28}{stats.get('seconds', 0):>12.1f}",
        f"{'documents / second':<28}{stats.get('rows_per_second', 0):>12,.1f}",
        f"{'output':<28}{stats.get('output', '')}",
        "top recurring n-grams: " + ", ".join(f"{k!r} ({v})" for k, v in list(stats.get("top_ngrams", {}).items())[:15]),
    ]
    skipped = stats.get("skipped", {})
    if stats.get("rows_in", 0) and skipped.get("missing_text_column", 0) == stats.get("rows_in"):
        # Every record lacked the text column: a configuration mistake, not a property of the corpus.
        lines.append("WARNING: no document had the text column, so nothing was mined; pass --text-column NAME "
                     "(the field that holds each document's text)")
    return "\n".join(lines)
