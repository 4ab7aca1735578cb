"""Counters that add up across batches, shards and workers."""

from __future__ import annotations

from typing import Any


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Numbers add, nested dicts merge recursively, anything else takes b's value."""
    out = dict(a)
    for key, value in b.items():
        mine = out.get(key)
        if isinstance(value, dict) and isinstance(mine, dict):
            out[key] = merge_stats(mine, value)
        elif isinstance(value, int | float) and isinstance(mine, int | float) and not isinstance(value, bool):
            out[key] = mine + value
        else:
            out[key] = value
    return out


def top_k(counter: dict[str, int], k: int) -> dict[str, int]:
    """The k largest counts, ties broken by key so the result is deterministic."""
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k])
