"""When a job's shards were committed, from its output directory: start-up vs steady-state figures.

Each committed shard's completion marker (`OUT/__splinter__/shards/shard-NNNNN.json`, written last, see
`pipeline.engine.commit`) holds the shard's stats, `rows_in` among them; its modification time is when
the shard's rows became visible. The first marker is the job's first answer; the rate from the first to
the last marker, counting the rows of the shards committed after the first answer, is the job's
throughput once it is up (actors started, weights loaded, first batch done), which a whole-job rate mixes
with start-up. Shards that land together with the first one (one model batch can hold several small
shards) belong to the first answer, not to the steady state; a job whose shards all land together has
no steady-state figure (None): give it several model batches of input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Markers this close to the first one came out of the same model batch (a batch takes seconds on CPU).
SAME_BATCH_S = 0.5


@dataclass(frozen=True)
class Commits:
    shards: int
    rows: int  # source rows of all committed shards
    first: float | None  # wall clock (time.time()) of the first marker
    last: float | None
    # Rows committed after the first shard / time between the first and the last commit (None with
    # fewer than two shards).
    steady_rows_per_s: float | None


def read_commits(output: str | Path) -> Commits:
    markers = sorted((p.stat().st_mtime, int(json.loads(p.read_text("utf-8")).get("rows_in", 0)))
                     for p in (Path(output) / "__splinter__" / "shards").glob("*.json"))
    if not markers:
        return Commits(0, 0, None, None, None)
    first, last = markers[0][0], markers[-1][0]
    after_first = sum(rows for t, rows in markers if t > first + SAME_BATCH_S)
    steady = after_first / (last - first) if after_first else None
    return Commits(len(markers), sum(rows for _, rows in markers), first, last, steady)
