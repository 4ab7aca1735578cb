"""The authors' recurring-span cluster search, written plainly: the reference for tests and benchmarks.

Re-stated from oriram/splinter `pretraining/masking.py` (`get_candidate_span_clusters` with
`include_sub_clusters=True` and validation, then `get_span_clusters_by_length`) in our own words.
It extends every pair of equal tokens (i < j) while the tokens keep matching, so it is quadratic
in how often frequent tokens repeat. Never used by the pipeline itself.
"""

from __future__ import annotations

from pipeline.stages.span_search import STOPWORDS


def _valid_first_occurrence(tokens: list[str], start: int, length: int) -> bool:
    end = start + length
    if tokens[start].startswith("##"):
        return False
    if end < len(tokens) and tokens[end].startswith("##"):
        return False
    span = tokens[start:end]
    if any(not t.isalnum() and not t.startswith("##") for t in span):
        return False
    return any(t.lower() not in STOPWORDS for t in span)


def oracle_clusters(tokens: list[str], max_span_length: int) -> list[list[tuple[int, int]]]:
    """Clusters of inclusive (start, end) occurrences, pruned longest first, in the authors' order."""
    positions: dict[str, list[int]] = {}
    for i, token in enumerate(tokens):
        positions.setdefault(token, []).append(i)

    # Every equal pair records each common prefix length 1..min(match, max_span_length).
    pairs: list[tuple[int, int, int]] = []
    for indices in positions.values():
        for a, first in enumerate(indices):
            for second in indices[a + 1 :]:
                length = 1
                while True:
                    pairs.append((first, second, length))
                    if length == max_span_length:
                        break
                    if second + length >= len(tokens) or tokens[first + length] != tokens[second + length]:
                        break
                    length += 1

    # A cluster is keyed by the first span seen; later pairs join it (dict order = creation order).
    clusters: dict[tuple[int, int], list[tuple[int, int]]] = {}
    representative: dict[tuple[int, int], tuple[int, int]] = {}
    for first, second, length in pairs:
        a, b = (first, first + length - 1), (second, second + length - 1)
        if a in representative:
            if b not in representative:
                clusters[representative[a]].append(b)
                representative[b] = representative[a]
        else:
            clusters[a] = [a, b]
            representative[a] = representative[b] = a

    valid = [c for c in clusters.values() if _valid_first_occurrence(tokens, c[0][0], c[0][1] - c[0][0] + 1)]
    valid.sort(key=lambda c: c[0][1] - c[0][0], reverse=True)  # stable: ties keep creation order

    taken = [False] * len(tokens)
    pruned: list[list[tuple[int, int]]] = []
    for cluster in valid:
        survivors = [(s, e) for s, e in cluster if not any(taken[s : e + 1])]
        if len(survivors) >= 2:
            pruned.append(survivors)
            for s, e in survivors:
                for i in range(s, e + 1):
                    taken[i] = True
    return pruned
