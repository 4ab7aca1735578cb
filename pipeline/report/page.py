"""`splinter report OUT`: one self-contained HTML page (inline CSS and SVG, no script, no network).

Where it goes: a training output (pretrain, finetune, fewshot) gets OUT/report.html. A Ray Data output
(mine, extract) gets OUT/__splinter__/report.html, beside the job's other records: the top of such an
OUT holds only Parquet, so every Parquet reader still opens it as one dataset.
"""

from __future__ import annotations

import datetime as _dt
from html import escape

from pipeline.report.readers import Run, read_run
from pipeline.report.sections import BODIES, Body
from pipeline.storage.filesystems import filesystem
from pipeline.storage.rundir import META

REPORT_NAME = "report.html"
TITLES = {"mine": "Mining", "extract": "Answer extraction", "pretrain": "Pretraining", "finetune": "Fine-tuning",
          "fewshot": "Few-shot grid"}

_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff; --accent:#3b6fd4;
        --ok:#2c9c6a; --warn:#c26b12; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); line-height:1.45;
       font:15px/1.45 -apple-system, BlinkMacSystemFont, "Segoe UI", "Helvetica Neue", Arial, "Liberation Sans",
       "DejaVu Sans", sans-serif; }
header { background:#fff; border-bottom:1px solid var(--line); padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:650; letter-spacing:-0.01em; }
header .meta { color:var(--muted); font-size:13px; word-break:break-all; }
.badge { display:inline-block; font-size:12px; font-weight:600; padding:2px 9px; border-radius:999px;
         vertical-align:middle; margin-left:10px; letter-spacing:0.02em; text-transform:uppercase; }
.badge.complete { background:#e3f4ec; color:var(--ok); }
.badge.partial { background:#fdf0e1; color:var(--warn); }
.partial-note { margin:12px 0 0; padding:8px 12px; border-left:3px solid var(--warn); background:#fffaf3;
                font-size:14px; }
main { max-width:1180px; margin:0 auto; padding:22px 32px 48px; }
.cards { display:grid; grid-template-columns:repeat(auto-fill, minmax(160px, 1fr)); gap:12px; margin-bottom:8px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card .label { font-size:12px; color:var(--muted); text-transform:uppercase; letter-spacing:0.04em; }
.card .value { font-size:24px; font-weight:650; font-variant-numeric:tabular-nums; margin-top:2px; }
.card .hint { font-size:12px; color:var(--muted); }
section { margin-top:26px; }
section h2 { font-size:16px; font-weight:650; margin:0 0 10px; padding-bottom:6px; border-bottom:1px solid var(--line); }
/* auto-fill: a lone chart keeps a column's width (its text the size of the others'); .wide spans the row */
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(440px, 1fr)); gap:14px; align-items:start; }
.chart-box.wide { grid-column:1 / -1; }
.chart-box { margin:0; background:var(--card); border:1px solid var(--line); border-radius:10px; padding:8px; }
svg.chart { width:100%; height:auto; display:block; }
table { border-collapse:collapse; background:var(--card); border:1px solid var(--line); border-radius:10px;
        font-size:13px; font-variant-numeric:tabular-nums; overflow:hidden; width:100%; }
th, td { text-align:left; padding:6px 12px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#fafbfc; color:var(--muted); font-weight:600; font-size:12px; }
tr:last-child td { border-bottom:none; }
table.kv td:first-child { color:var(--muted); white-space:nowrap; width:1%; }
td { word-break:break-word; }
details.settings { margin-top:12px; }
details.settings summary { cursor:pointer; color:var(--accent); font-size:14px; margin-bottom:8px; }
.note { color:var(--muted); font-size:13px; margin:6px 0; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:0 0 28px; }
"""


def report_path(run: Run) -> str:
    """Where the report of `run` is written (see the module docstring)."""
    base = run.output.rstrip("/")
    return f"{base}/{META}/{REPORT_NAME}" if run.kind in ("mine", "extract") else f"{base}/{REPORT_NAME}"


def render(run: Run, body: Body | None = None) -> str:
    """The page of `run` as one HTML string."""
    body = body or BODIES[run.kind](run)
    status = "complete" if run.complete else "partial"
    partial = ""
    if not run.complete:
        partial = (f'<p class="partial-note"><strong>Partial output.</strong> The job has not finished (still '
                   f"running, stopped or failed): this report shows what exists{': ' + escape(run.progress) if run.progress else ''}."
                   " Numbers cover only that part.</p>")
    cards = "".join(
        f'<div class="card" data-key="{escape(key)}"><div class="label">{escape(label)}</div>'
        f'<div class="value">{escape(value)}</div>' + (f'<div class="hint">{escape(hint)}</div>' if hint else "")
        + "</div>"
        for key, label, value, hint in body.cards
    )
    sections = []
    for heading, blocks in body.sections:
        charts_ = [b for b in blocks if b.startswith('<figure class="chart-box')]
        rest = [b for b in blocks if not b.startswith('<figure class="chart-box')]
        inner = (f'<div class="grid">{"".join(charts_)}</div>' if charts_ else "") + "".join(rest)
        sections.append(f"<section><h2>{escape(heading)}</h2>{inner}</section>")
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"splinter {run.kind} · {TITLES[run.kind]}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} — {escape(run.output)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>{escape(TITLES[run.kind])} report<span class="badge {status}" id="status">{status}</span></h1>'
        f'<div class="meta">splinter {escape(run.kind)} · {escape(run.output)} · report made {now}</div>{partial}'
        f'</header><main><div class="cards">{cards}</div>{"".join(sections)}</main>'
        "<footer>Made by <code>splinter report</code> from the run's own records; nothing was recomputed.</footer>"
        "</body></html>\n"
    )


def write_report(output: str) -> str:
    """Read OUTPUT's records, write its report page, return the page's path."""
    run = read_run(output)
    html = render(run)
    fs, path = filesystem(report_path(run))
    tmp = f"{path}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(html.encode("utf-8"))
    fs.move(tmp, path)  # a reader never sees half a page
    return report_path(run)


__all__ = ["REPORT_NAME", "render", "report_path", "write_report"]
