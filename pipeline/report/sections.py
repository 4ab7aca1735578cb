"""The body of a report, per job kind: key-number cards, charts and tables from a `Run`.

Each function returns HTML fragments; page.py lays them out. Numbers on cards are the job's own
(its stats or logs), formatted the way its console summary prints them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np

from pipeline.report import charts
from pipeline.report.readers import Run


@dataclass
class Body:
    cards: list[tuple[str, str, str, str]] = field(default_factory=list)  # (key, label, value, hint)
    sections: list[tuple[str, list[str]]] = field(default_factory=list)  # (heading, HTML blocks)

    def card(self, key: str, label: str, value: Any, hint: str = "") -> None:
        self.cards.append((key, label, fmt(value), hint))

    def section(self, heading: str, *blocks: str) -> None:
        blocks_ = [b for b in blocks if b]
        if blocks_:
            self.sections.append((heading, blocks_))


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def settings_table(settings: dict[str, Any]) -> str:
    rows = []
    for key, value in sorted(settings.items()):
        if isinstance(value, dict | list):
            text = json.dumps(value, sort_keys=True)
            value = text if len(text) <= 160 else text[:157] + "…"
        rows.append([key, value])
    return '<details class="settings"><summary>Settings</summary>' + table(["setting", "value"], rows, "kv") + "</details>"


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _chart(svg: str, wide: bool = False) -> str:
    return f'<figure class="chart-box{" wide" if wide else ""}">{svg}</figure>'


def _sampled(run: Run) -> str:
    read, total = run.data.get("rows_read", 0), run.data.get("rows_total", 0)
    return f"from the first {read:,} of {total:,} rows" if total and read < total else ""


# ----------------------------------------------------------------------------------------------- mine
def mine_body(run: Run) -> Body:
    s, b = run.stats, Body()
    b.card("rows_in", "documents read", s.get("rows_in", 0))
    b.card("documents_used", "documents mined", s.get("documents_used", 0))
    b.card("sequences", "sequences", s.get("sequences", 0))
    b.card("questions", "questions", s.get("questions", 0),
           f"{s['questions'] / s['sequences']:.2f} per sequence" if s.get("sequences") else "")
    b.card("tokens", "tokens", s.get("tokens", 0))
    b.card("skipped", "documents skipped", sum((s.get("skipped") or {}).values()))
    if s.get("seconds"):
        b.card("seconds", "seconds", s["seconds"], f"{s.get('rows_per_second', 0):,} docs/s")

    per_seq = {int(k): int(v) for k, v in (s.get("questions_per_sequence") or {}).items()}
    charts_ = []
    if per_seq:
        charts_.append(_chart(charts.count_bars("chart-questions-per-sequence", "Questions per sequence",
                                                dict(sorted(per_seq.items())), "[QUESTION] tokens in a sequence")))
    if run.data.get("span_lengths") is not None and len(run.data["span_lengths"]):
        charts_.append(_chart(charts.histogram("chart-span-lengths", "Masked span length", run.data["span_lengths"],
                                               "word pieces per masked span", integer=True, color=charts.PALETTE[2],
                                               note=_sampled(run))))
    b.section("Questions", *charts_)

    top = s.get("top_ngrams") or {}
    spans = []
    if top:
        shown = dict(sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))[:25])
        spans.append(_chart(charts.count_bars("chart-top-spans", "Most frequent recurring spans", shown,
                                              "times masked", horizontal=True, color=charts.PALETTE[4]), wide=True))
        if not run.complete:
            spans.append(note("Partial run: summed over the committed shards' own top lists."))
    b.section("Recurring spans", *spans)

    skipped = s.get("skipped") or {}
    passes = run.data.get("passes") or {}
    rows = [[reason, n] for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1])]
    blocks = [table(["skip reason", "documents"], rows) if rows else note("No document was skipped.")]
    if passes:
        blocks.append(table(["dupe_index pass", "sequences"], [[p, n] for p, n in sorted(passes.items())]))
        if _sampled(run):
            blocks.append(note(f"Passes counted {_sampled(run)}."))
    b.section("Skips and passes", *blocks)
    b.section("Run", settings_table(run.settings))
    return b


# -------------------------------------------------------------------------------------------- extract
def extract_body(run: Run) -> Body:
    s, d, b = run.stats, run.data, Body()
    errors = s.get("errors") or {}
    b.card("rows_out", "rows", s.get("rows_out", 0), f"{s.get('rows_in', 0):,} in")
    b.card("answered", "answered", s.get("answered", 0))
    b.card("errors", "errors", sum(errors.values()))
    if s.get("answered") and "score_sum" in s:
        b.card("mean_score", "mean score", round(s["score_sum"] / s["answered"], 4), "start + end logit")
    if s.get("seconds"):
        b.card("seconds", "seconds", s["seconds"], f"{s.get('rows_per_second', 0):,} rows/s")

    blocks = []
    if d.get("scores") is not None and len(d["scores"]):
        blocks.append(_chart(charts.histogram("chart-scores", "Answer score", d["scores"], "score (start + end logit)",
                                              bins=40, note=_sampled(run))))
    if d.get("null_scores") is not None and len(d["null_scores"]):
        blocks.append(_chart(charts.histogram("chart-null-scores", "Null score", d["null_scores"],
                                              "score of no answer", bins=40, color=charts.PALETTE[1],
                                              note=_sampled(run))))
    if d.get("has_answer"):
        blocks.append(table(["has answer", "rows"], [[k, v] for k, v in d["has_answer"].items()]))
    b.section("Confidence", *blocks)

    blocks = []
    if d.get("answer_words") is not None and len(d["answer_words"]):
        blocks.append(_chart(charts.histogram("chart-answer-length", "Answer length", d["answer_words"], "words",
                                              integer=True, color=charts.PALETTE[2], note=_sampled(run))))
    if d.get("answers_per_question") is not None and len(d["answers_per_question"]):
        keys, counts = np.unique(d["answers_per_question"], return_counts=True)
        blocks.append(_chart(charts.count_bars("chart-answers-per-question", "Answers per question",
                                               {int(k): int(c) for k, c in zip(keys, counts, strict=True)},
                                               "answers (n-best entries, or answered: 1)", color=charts.PALETTE[4])))
    b.section("Answers", *blocks)

    rows = [[reason, n] for reason, n in sorted(errors.items(), key=lambda kv: -kv[1])]
    b.section("Errors by reason", table(["error", "rows"], rows) if rows else note("No row had an error."))

    model_rows: list[list[Any]] = [["model", run.settings.get("model", "—")]]
    model_rows += [["ran on", m] for m in s.get("models") or []]
    if run.settings.get("quantize"):
        model_rows.append(["quantize", run.settings["quantize"]])
    cfg = d.get("model_config") or {}
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings"):
        if key in cfg:
            model_rows.append([key, cfg[key]])
    b.section("Model and settings", table(["", ""], model_rows, "kv"), settings_table(run.settings))
    return b


# ------------------------------------------------------------------------------- pretrain / finetune
_SERIES = [
    ("loss", "Loss", "loss", True),
    ("lr", "Learning rate (the schedule, not smoothed)", "learning rate", False),
    ("grad_norm", "Gradient norm", "gradient norm (before clipping)", False),
    ("tokens_per_s", "Throughput", "tokens / s (all workers)", False),
]


def training_charts(steps: list[dict[str, Any]], marks: list[tuple[int, str]]) -> list[str]:
    out = []
    for key, title, ylabel, log_y in _SERIES:
        points = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), int | float)]
        if points:
            xs, ys = zip(*points, strict=True)
            out.append(_chart(charts.series_chart(f"chart-{key.replace('_', '-')}", title, xs, ys, ylabel, marks,
                                                  log_y=log_y and max(ys) / max(min(ys), 1e-12) > 20,
                                                  smoothed=key != "lr")))
    return out


def pretrain_body(run: Run) -> Body:
    s, d, b = run.stats, run.data, Body()
    steps = d["steps"]
    resumes = [e for e in d["events"] if e.get("event") == "resume"]
    last = s.get("steps", steps[-1]["step"] if steps else 0)
    b.card("steps", "steps", last, f"of {d['planned_steps']:,}" if d.get("planned_steps") else "")
    if s:  # the run's own summary (pretrain_stats.json)
        b.card("first_loss", "first loss", s.get("first_loss"), "mean of the first 10% of steps")
        b.card("last_loss", "last loss", s.get("last_loss"), "mean of the last 10% of steps")
        b.card("final_loss", "final loss", s.get("final_loss"), "the last step")
        b.card("tokens", "tokens", s.get("tokens"))
        b.card("tokens_per_s", "tokens/s", s.get("tokens_per_s"), "all workers")
        b.card("seconds", "seconds", s.get("seconds"))
    elif steps:  # a partial run has no summary yet: what its log says so far
        b.card("first_loss", "first logged loss", steps[0]["loss"])
        b.card("last_loss", "last logged loss", steps[-1]["loss"], f"step {steps[-1]['step']:,}")
        b.card("tokens", "tokens so far", sum(int(r.get("tokens", 0)) for r in steps))
    b.card("resumes", "resumes", s.get("resumes", len(resumes)))
    workers = next((e.get("num_workers") for e in reversed(d["events"]) if "num_workers" in e), None)
    if workers:
        b.card("workers", "workers", workers)
    marks = [(int(e["step"]), "resumed") for e in resumes]
    b.section("Training curves", *training_charts(steps, marks) or [note("No step has been logged yet.")])
    if resumes:
        b.section("Resume points", table(["resumed at step", "epoch", "from checkpoint"],
                                         [[e["step"], e.get("epoch"), e.get("checkpoint", "")] for e in resumes]))
    errors = [e for e in d["events"] if e.get("event") == "error"]
    if errors:
        b.section("Errors logged (a resumed run keeps its earlier attempts' errors)", table(["step", "rank", "error"], [[e.get("step", "—"), e.get("rank"), e.get("error")]
                                                             for e in errors]))
    info = [["checkpoints kept", ", ".join(d.get("checkpoints") or []) or "—"]]
    info += [[k, s[k]] for k in ("epochs", "sequences_seen", "questions", "final", "log") if k in s]
    b.section("Run", table(["", ""], info, "kv"), settings_table(run.settings))
    return b


def finetune_body(run: Run) -> Body:
    s, d, b = run.stats, run.data, Body()
    args = run.settings
    steps = d["steps"]
    b.card("examples_used", "examples", args.get("examples_used", 0), f"seed {args.get('sample_seed')}")
    b.card("steps", "steps", steps[-1]["step"] if steps else 0,
           f"{s['epochs']:.2f} epochs" if isinstance(s.get("epochs"), int | float) else "")
    if steps:
        b.card("first_loss", "first loss", steps[0]["loss"])
        b.card("last_loss", "last loss", steps[-1]["loss"])
    if "final_loss" in s:
        b.card("final_loss", "final loss", s["final_loss"], "mean of the last 10 steps")
    if "windows" in s:
        b.card("windows", "training windows", s["windows"])
    b.section("Training curves", *training_charts(steps, []) or [note("No step has been logged yet.")])
    skipped = args.get("skipped") or {}
    if skipped:
        b.section("Skipped examples", table(["reason", "examples"], sorted(skipped.items(), key=lambda kv: -kv[1])))
    shown = {k: v for k, v in args.items() if k not in ("example_ids", "skipped_ids", "result", "skipped")}
    b.section("Run", settings_table(shown))
    return b


# -------------------------------------------------------------------------------------------- fewshot
def fewshot_body(run: Run) -> Body:
    d, b = run.data, Body()
    table_ = run.stats["table"]
    results = d["results"]
    b.card("runs", "runs finished", len(results), f"of {len(d['grid'])}")
    for t in table_:
        b.card(f"f1_k{t['examples']}", f"F1 at K={t['examples']}", round(t["f1_mean"], 1), f"± {t['f1_std']:.1f}")
    if results:
        b.section("Scores per K", _chart(charts.seeds_chart("chart-f1", "F1", results, table_, "f1", "f1", "F1")),
                  _chart(charts.seeds_chart("chart-em", "Exact match", results, table_, "exact_match", "em", "EM")))
        rows = [[t["examples"], t["runs"], f"{t['em_mean']:.1f} ± {t['em_std']:.1f}",
                 f"{t['f1_mean']:.1f} ± {t['f1_std']:.1f}"] for t in table_]
        b.section("Mean ± std over seeds", table(["K", "runs", "EM", "F1"], rows))
        b.section("Every run", table(["K", "seed", "EM", "F1", "steps", "final loss", "seconds"],
                                     [[r["examples"], r["seed"], r["exact_match"], r["f1"], r.get("steps"),
                                       r.get("final_loss"), r.get("seconds")] for r in results]))
    if d["missing"]:
        b.section("Not finished", note("No result yet (still running, failed or not started): "
                                       + ", ".join(d["missing"])))
    b.section("Run", settings_table(run.settings))
    return b


BODIES = {"mine": mine_body, "extract": extract_body, "pretrain": pretrain_body, "finetune": finetune_body,
          "fewshot": fewshot_body}

__all__ = ["BODIES", "Body", "fmt", "table"]
