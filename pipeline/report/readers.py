"""What a report shows, read from the run's own records: never recomputed, never written to.

Every job writes the same run directory records (pipeline.storage.rundir): `__splinter__/job.json` names
the job and its settings, `__splinter__/stats.json` and `__splinter__/_SUCCESS` come when it completes.
Next to them, each kind's own records:
    mine, extract     per-shard markers under __splinter__/shards/ as shards commit
    pretrain          trainer_log.jsonl, checkpoints/
    finetune          training_args.json ("status": "complete" once finished), trainer_log.jsonl
    fewshot           runs/*/result.json, results.parquet
A run without its completion record is read as it stands and marked partial.

Parquet is read column by column (only what a chart needs) and, past `SAMPLE_ROWS` rows, from the first
shards only: the chart then says how many rows it shows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.engine.stats import merge_stats
from pipeline.paths import is_uri
from pipeline.storage.filesystems import filesystem
from pipeline.storage.rundir import JOB_FILE, META, STATS_FILE, SUCCESS_FILE
from pipeline.training.fewshot_grid import summary_table

SAMPLE_ROWS = 200_000
_MARKER = re.compile(r"shard-(\d{5,})\.json")
KINDS = ("mine", "extract", "pretrain", "finetune", "fewshot")


class ReportError(ValueError):
    """OUT is not something a report can be made of (missing, or not written by this tool)."""


@dataclass
class Run:
    """One output directory as a report sees it."""

    kind: str  # mine | extract | pretrain | finetune | fewshot
    output: str
    complete: bool
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    progress: str = ""  # what exists of a partial run, e.g. "3 of 8 shards committed"
    data: dict[str, Any] = field(default_factory=dict)  # what the kind's charts need


class _Dir:
    """Read-only access to OUT on any filesystem pyarrow knows (local, s3://, gs://)."""

    def __init__(self, output: str) -> None:
        self.fs, self.root = filesystem(output)

    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode("utf-8")

    def json(self, rel: str) -> Any:
        return json.loads(self.text(rel))

    def json_or_none(self, rel: str) -> Any:
        try:
            return self.json(rel)
        except (FileNotFoundError, OSError, ValueError):
            return None

    def names(self, rel: str = "") -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos)


def detect_kind(out: _Dir, output: str) -> str:
    if not out.is_dir():
        raise ReportError(f"{output}: no such output directory; give the OUTPUT of a splinter job")
    if out.exists(JOB_FILE):
        job = (out.json_or_none(JOB_FILE) or {}).get("job")
        if job in KINDS:
            return job
        raise ReportError(f"{output}: {JOB_FILE} names a job {job!r} the report does not know")
    raise ReportError(
        f"{output}: not an output of a splinter job (no {JOB_FILE}); give the OUTPUT directory of mine, extract, "
        "pretrain, finetune or fewshot"
    )


def read_run(output: str) -> Run:
    """Everything the report of OUTPUT shows, from the records the job wrote."""
    out = _Dir(output)
    kind = detect_kind(out, output)
    return {"mine": _read_mine, "extract": _read_extract, "pretrain": _read_pretrain,
            "finetune": _read_finetune, "fewshot": _read_fewshot}[kind](out, output)  # fmt: skip


# ------------------------------------------------------------------------------- the Ray Data jobs
def _committed_shards(out: _Dir) -> list[int]:
    markers = {int(m.group(1)) for n in out.names(f"{META}/shards") if (m := _MARKER.fullmatch(n))}
    return sorted(i for i in markers if out.exists(f"shard-{i:05d}.parquet"))


def _data_job(out: _Dir, output: str, kind: str) -> Run:
    job = out.json(JOB_FILE)
    shards = _committed_shards(out)
    complete = out.exists(SUCCESS_FILE) and out.exists(STATS_FILE)
    if complete:
        stats = out.json(STATS_FILE)
        progress = ""
    else:  # what the committed shards' markers say: the stats a finished run would add up to so far
        stats = {}
        for i in shards:
            stats = merge_stats(stats, out.json(f"{META}/shards/shard-{i:05d}.json"))
        progress = f"{len(shards)} of {job.get('shards', '?')} shards committed"
    run = Run(kind, output, complete, settings=job.get("settings") or {}, stats=stats, progress=progress)
    run.data["shards"] = shards
    run.data["planned_shards"] = job.get("shards")
    return run


def read_columns(out: _Dir, shards: list[int], wanted: list[str], limit: int = SAMPLE_ROWS) -> tuple[pa.Table, int]:
    """The `wanted` columns that exist, from committed shards in order, up to `limit` rows; and the
    number of rows all those shards hold (from their footers, nothing else read)."""
    tables: list[pa.Table] = []
    taken = total = 0
    for i in shards:
        with out.fs.open_input_file(out.path(f"shard-{i:05d}.parquet")) as f:
            pf = pq.ParquetFile(f)
            total += pf.metadata.num_rows
            if taken >= limit:
                continue
            columns = [c for c in wanted if c in pf.schema_arrow.names]
            table = pf.read(columns=columns)
        tables.append(table.slice(0, limit - taken))
        taken += min(table.num_rows, limit - taken)
    if not tables:
        return pa.table({}), 0
    return pa.concat_tables(tables, promote_options="default"), total


def _read_mine(out: _Dir, output: str) -> Run:
    run = _data_job(out, output, "mine")
    table, total = read_columns(out, run.data["shards"], ["dupe_index", "start_positions", "end_positions"])
    run.data["rows_read"], run.data["rows_total"] = table.num_rows, total
    if table.num_rows:
        starts = table["start_positions"].combine_chunks().flatten().to_numpy()
        ends = table["end_positions"].combine_chunks().flatten().to_numpy()
        run.data["span_lengths"] = (ends - starts + 1).astype(np.int64)
        passes, counts = np.unique(table["dupe_index"].to_numpy(), return_counts=True)
        run.data["passes"] = {int(p): int(c) for p, c in zip(passes, counts, strict=True)}
    return run


def _read_extract(out: _Dir, output: str) -> Run:
    run = _data_job(out, output, "extract")
    wanted = ["answer", "score", "error", "null_score", "has_answer", "nbest_answers"]
    table, total = read_columns(out, run.data["shards"], wanted)
    run.data["rows_read"], run.data["rows_total"] = table.num_rows, total
    names = set(table.column_names)
    if "score" in names:
        scores = table["score"].to_numpy(zero_copy_only=False)
        run.data["scores"] = scores[~np.isnan(scores.astype(float))] if scores.size else scores
    if "null_score" in names:
        nulls = table["null_score"].to_numpy(zero_copy_only=False).astype(float)
        run.data["null_scores"] = nulls[~np.isnan(nulls)]
    if "has_answer" in names:
        has = table["has_answer"].to_pylist()
        run.data["has_answer"] = {"yes": sum(1 for h in has if h), "no": sum(1 for h in has if h is False)}
    if "answer" in names:
        answers = [a for a in table["answer"].to_pylist() if a]
        run.data["answer_words"] = np.array([len(a.split()) for a in answers], dtype=np.int64)
        if "nbest_answers" in names:
            per_question = [len([x for x in (lst or []) if x]) for lst in table["nbest_answers"].to_pylist()]
        else:  # one answer at most per question: answered or not
            per_question = [1 if a else 0 for a in table["answer"].to_pylist()]
        run.data["answers_per_question"] = np.array(per_question, dtype=np.int64)
    model = run.settings.get("model")
    if isinstance(model, str):
        run.data["model_config"] = _Dir(model).json_or_none("config.json") if not is_uri(model) else None
    return run


# ------------------------------------------------------------------------------- the training jobs
def read_log(out: _Dir, name: str = "trainer_log.jsonl") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, events) of a trainer log. A step re-run after a resume replaces its earlier record,
    so every step appears once, as the run that carried on from it saw it. A torn last line is skipped."""
    try:
        lines = out.text(name).splitlines()
    except (FileNotFoundError, OSError):
        return [], []
    steps: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written when the job stopped
        if "event" in record:
            events.append(record)
        elif "step" in record and "loss" in record:
            steps[int(record["step"])] = record
    return [steps[s] for s in sorted(steps)], events


def _read_pretrain(out: _Dir, output: str) -> Run:
    settings = out.json(JOB_FILE).get("settings") or {}
    steps, events = read_log(out)
    complete = out.exists(SUCCESS_FILE)
    stats = (out.json_or_none(STATS_FILE) or {}) if complete else {}
    planned = (settings.get("hparams") or {}).get("max_steps")
    run = Run("pretrain", output, complete, settings=settings, stats=stats)
    if not complete:
        run.progress = f"{steps[-1]['step'] if steps else 0:,} of {planned or '?':,} steps logged"
    run.data.update(steps=steps, events=events, planned_steps=planned,
                    checkpoints=[n for n in out.names("checkpoints") if n.startswith("step-")])
    return run


def _read_finetune(out: _Dir, output: str) -> Run:
    args = out.json("training_args.json")
    steps, events = read_log(out)
    complete = out.exists(SUCCESS_FILE)
    run = Run("finetune", output, complete, settings=args, stats=args.get("result") or {})
    if not complete:
        run.progress = f"{steps[-1]['step'] if steps else 0:,} steps logged, training not finished"
    run.data.update(steps=steps, events=events)
    return run


def _read_fewshot(out: _Dir, output: str) -> Run:
    record = out.json(JOB_FILE)
    grid = [(int(k), int(s)) for k in record.get("examples", []) for s in record.get("seeds", [])]
    results: dict[tuple[int, int], dict[str, Any]] = {}
    if out.exists("results.parquet"):
        with out.fs.open_input_file(out.path("results.parquet")) as f:
            for row in pq.read_table(f).to_pylist():
                results[(int(row["examples"]), int(row["seed"]))] = row
    for name in out.names("runs"):  # finished runs not yet in the table (a grid still running)
        m = re.fullmatch(r"k(\d+)-seed(-?\d+)", name)
        if m and (int(m.group(1)), int(m.group(2))) not in results:
            result = out.json_or_none(f"runs/{name}/result.json")
            if result:
                results[(int(result["examples"]), int(result["seed"]))] = result
    complete = out.exists(SUCCESS_FILE)
    run = Run("fewshot", output, complete, settings=record.get("settings", {}))
    missing = [f"k{k}-seed{s}" for k, s in grid if (k, s) not in results]
    if not complete:
        run.progress = f"{len(grid) - len(missing)} of {len(grid)} runs finished"
    run.data.update(results=[results[key] for key in sorted(results)], grid=grid, missing=missing)
    run.stats = {"runs": len(results), "table": summary_table(run.data["results"])}
    return run


__all__ = ["SAMPLE_ROWS", "ReportError", "Run", "detect_kind", "read_columns", "read_log", "read_run"]
