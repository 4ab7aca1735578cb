"""Charts as inline SVG, drawn with matplotlib (object API only: no pyplot state, no GUI backend).

Why matplotlib to SVG: the page must open anywhere without a network, and a static SVG needs no
JavaScript at all (plotly or vega-lite would inline megabytes of it into every report and can fail in
the console); SVG text stays text (`svg.fonttype: none`), so the page's font renders it and the numbers
are searchable; matplotlib is the plotting library ML users already have, and it is imported only here,
when a report is drawn, never by a job's hot path.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

PALETTE = ["#3b6fd4", "#e07b39", "#2c9c6a", "#b8457b", "#7a5cc7", "#c7a23a"]
INK, GRID, MUTED = "#1f2933", "#e4e7eb", "#7b8794"

_STYLE = {
    "axes.axisbelow": True,
    "svg.fonttype": "none",  # text as text: the page's fonts, selectable numbers
    "font.family": "sans-serif",
    "font.size": 10,
    "axes.edgecolor": GRID,
    "axes.labelcolor": INK,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlecolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": GRID,
    "grid.linewidth": 0.8,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "legend.frameon": False,
    "legend.fontsize": 9,
}


def _figure(width: float = 6.4, height: float = 3.0) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.set_layout_engine("constrained")
    return fig


def _svg(fig: Any, chart_id: str, title: str) -> str:
    """The figure as an `<svg>` element sized by its container; ids are salted by chart so that several
    charts in one page never share a clip path."""
    import matplotlib

    with matplotlib.rc_context({**_STYLE, "svg.hashsalt": chart_id, "svg.id": chart_id}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Title": title})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: this is an element of the page
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 role="img" class="chart"', svg, count=1)
    return svg


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not
    pulled toward zero."""
    out = np.empty(len(values))
    last, norm = 0.0, 0.0
    for i, v in enumerate(values):
        last = last * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out[i] = last / norm
    return out


def series_chart(chart_id: str, title: str, steps: Sequence[int], values: Sequence[float], ylabel: str,
                 marks: Sequence[tuple[int, str]] = (), log_y: bool = False, smoothed: bool = True) -> str:
    """A metric over steps: the raw values (thin, light) and their smoothed curve, with vertical marks
    (resume points) labelled."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig = _figure()
        ax = fig.add_subplot()
        x, y = np.asarray(steps), np.asarray(values, dtype=float)
        if not smoothed:
            ax.plot(x, y, color=PALETTE[0], linewidth=2)
        else:
            ax.plot(x, y, color=PALETTE[0], alpha=0.3, linewidth=1, label="raw")
        if smoothed and len(y) > 2:
            ax.plot(x, smooth(y), color=PALETTE[0], linewidth=2, label="smoothed (EMA 0.9)")
        for step, label in marks:
            ax.axvline(step, color=PALETTE[1], linestyle="--", linewidth=1.2)
            ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", va="top", fontsize=8, color=PALETTE[1])
        if log_y and np.all(y > 0):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if smoothed:
            ax.legend(loc="best")
        return _svg(fig, chart_id, title)


def histogram(chart_id: str, title: str, values: np.ndarray, xlabel: str, bins: int | str = "auto",
              integer: bool = False, color: str = PALETTE[0], note: str = "") -> str:
    """Counts of values: one bar per value for small integers, else binned."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig = _figure()
        ax = fig.add_subplot()
        values = np.asarray(values)
        if integer and values.size and values.max() - values.min() <= 60:
            keys, counts = np.unique(values, return_counts=True)
            ax.bar(keys, counts, width=0.8, color=color)
            ax.set_xticks(keys if len(keys) <= 20 else keys[:: max(1, len(keys) // 15)])
        elif values.size:
            ax.hist(values, bins=bins, color=color, edgecolor="white", linewidth=0.5)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        ax.grid(axis="x", visible=False)
        if note:
            ax.annotate(note, (1, 1), xycoords="axes fraction", ha="right", va="bottom", fontsize=8, color=MUTED)
        return _svg(fig, chart_id, title)


def count_bars(chart_id: str, title: str, counts: dict[Any, int], xlabel: str, horizontal: bool = False,
               color: str = PALETTE[0]) -> str:
    """Given counts (a value's count, e.g. questions per sequence from the job's stats) as bars."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        labels = [str(k) for k in counts]
        heights = list(counts.values())
        # A horizontal chart spans the page's width: drawn wider so its text keeps the other charts' size.
        fig = _figure(width=12.0, height=max(3.0, 0.2 * len(labels) + 0.9)) if horizontal else _figure()
        ax = fig.add_subplot()
        if horizontal:
            pos = np.arange(len(labels))[::-1]
            ax.barh(pos, heights, color=color)
            ax.set_yticks(pos, labels)
            ax.set_xlabel(xlabel)
            ax.grid(axis="y", visible=False)
            ax.tick_params(axis="y", colors=INK)
        else:
            pos = np.arange(len(labels))
            ax.bar(pos, heights, color=color, width=0.8)
            every = max(1, -(-len(labels) // 16))  # at most ~16 labels: a readable axis
            ax.set_xticks(pos[::every], labels[::every])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("count")
            ax.grid(axis="x", visible=False)
        ax.set_title(title)
        return _svg(fig, chart_id, title)


def seeds_chart(chart_id: str, title: str, results: list[dict[str, Any]], table: list[dict[str, Any]],
                metric: str, table_key: str, ylabel: str) -> str:
    """The paper's few-shot plot: each seed's score per K (points) and the mean ± std (line, band)."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig = _figure()
        ax = fig.add_subplot()
        ks = [t["examples"] for t in table]
        mean = np.array([t[f"{table_key}_mean"] for t in table])
        std = np.array([t[f"{table_key}_std"] for t in table])
        rng = np.random.default_rng(0)  # a fixed jitter: seeds with equal scores stay visible
        xs = np.array([r["examples"] for r in results], dtype=float)
        ax.scatter(xs * np.exp(rng.uniform(-0.06, 0.06, len(xs))), [r[metric] for r in results],
                   s=22, color=PALETTE[0], alpha=0.55, label="one seed", zorder=3)
        ax.errorbar(ks, mean, yerr=std, color=PALETTE[1], linewidth=2, capsize=4, marker="o",
                    label="mean ± std", zorder=4)
        ax.fill_between(ks, mean - std, mean + std, color=PALETTE[1], alpha=0.12, linewidth=0)
        if len(ks) > 1 and max(ks) / max(min(ks), 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("training examples (K)")
        ax.set_ylabel(ylabel)
        ax.legend(loc="best")
        return _svg(fig, chart_id, title)


__all__ = ["count_bars", "histogram", "seeds_chart", "series_chart", "smooth"]
