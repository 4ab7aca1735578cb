"""Recurring-span selection (Ram et al. 2021, §2 of the authors' pretraining data generator).

The authors' `create_pretraining_data.py` + `masking.py`, re-derived and made fast:

1. `pack_segments` packs a document's tokenized lines into chunks of at most `max_seq_length - 2`
   tokens exactly as the authors do, including their quirk on a break (the fitting prefix of the
   line closes the chunk and the whole line starts the next one, so lines overlap).
2. `find_span_clusters` finds, for a whole batch of sequences at once, the same clusters as the
   authors' all-pairs scan (`tests/mining_oracle.py` keeps that scan for tests): every n-gram of
   length 1..max_span_length occurring at least twice in a sequence, whose first occurrence passes
   the validity filters, in the authors' order; then longest-first pruning of overlapping
   occurrences. Instead of extending every equal-token pair (quadratic in the count of frequent
   tokens), it groups n-grams level by level: the l-grams are keyed by (group of their
   (l-1)-gram prefix, next token) and only prefixes that repeat are extended. Each level is one
   numpy sort over the whole batch.
3. `mask_clusters` is the authors' masking loop (budget, random cluster order, one visible
   occurrence per cluster, the others replaced by [QUESTION]) on Python-int bitmasks.

All randomness comes from a caller-supplied `numpy.random.Generator`, so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "STOPWORDS",
    "ClusterBatch",
    "VocabTables",
    "find_span_clusters",
    "mask_clusters",
    "pack_segments",
    "question_budget",
    "split_long_segment",
]

# The authors' stopword list (masking.py), verbatim in content: an n-gram made only of these
# (compared lowercased) is never a recurring span ("in the", "of", ...).
_STOPWORD_TEXT = """
    ourselves hers between yourself but again there about once during out very having with they own
    an be some for do its yours such into of most itself other off is s am or who as from him each
    the themselves until below are we these your his through don nor me were her more himself this
    down should our their while above both up to ours had she all no when at any before them same
    and been have in will on does yourselves then that because what over why so can did not now
    under he you herself has just where too only myself which those i after few whom t being if
    theirs my against a by doing it how further was here than also could would
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())


_WORD, _OK, _PIECE, _CONTENT = 1, 2, 4, 8


@dataclass(frozen=True)
class VocabTables:
    """Per-token-id facts the validity filters need, so the filters are array lookups.

    `word`: `token.isalnum()` (may start a span; "##" pieces are never alnum), `piece`: a "##"
    continuation, `ok`: may appear inside a span (alnum or "##"), `content`: not a stopword.
    Special tokens ([CLS], [SEP], [UNK], ...) and punctuation are neither word nor ok.
    """

    tokens: tuple[str, ...]
    word: np.ndarray
    piece: np.ndarray
    ok: np.ndarray
    content: np.ndarray
    flags: np.ndarray  # uint8 bit set of the above per id (WORD|OK|PIECE|CONTENT), plus 0 at index len

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int]) -> VocabTables:
        size = max(vocab.values()) + 1
        tokens = [""] * size
        for token, index in vocab.items():
            tokens[index] = token
        word = np.fromiter((t.isalnum() for t in tokens), dtype=bool, count=size)
        piece = np.fromiter((t.startswith("##") for t in tokens), dtype=bool, count=size)
        content = np.fromiter((t.lower() not in STOPWORDS for t in tokens), dtype=bool, count=size)
        ok = word | piece
        flags = np.zeros(size + 1, dtype=np.uint8)  # the extra last entry stands for out-of-vocab ids
        flags[:size] = word * _WORD | ok * _OK | piece * _PIECE | content * _CONTENT
        return cls(tuple(tokens), word, piece, ok, content, flags)

    def detokenize(self, ids: Sequence[int]) -> str:
        """WordPiece ids back to text: pieces glue onto the previous token, words are space-separated."""
        return " ".join(self.tokens[i] for i in ids).replace(" ##", "")


def question_budget(num_tokens: int, max_questions: int, mask_prob: float = 0.15) -> int:
    """The authors' budget: min(max_questions, max(1, round(mask_prob * len))) (Python's round)."""
    return min(max_questions, max(1, int(round(num_tokens * mask_prob))))


def split_long_segment(segment: list[int], budget: int, piece: np.ndarray) -> list[list[int]]:
    """Cut a line longer than `budget` tokens into consecutive pieces of at most `budget` tokens.

    The authors keep only the first `budget` tokens of such a line and drop the rest; at corpus
    scale that silently loses text (one-paragraph web pages, 10 MB single lines), so we keep it all.
    Cuts fall before a word start (never before a "##" piece) when the line allows it, so spans
    and their validity checks see whole words.
    """
    parts: list[list[int]] = []
    start, n = 0, len(segment)
    while n - start > budget:
        cut = start + budget
        while cut > start and piece[segment[cut]]:
            cut -= 1
        if cut == start:  # a single "word" longer than the budget: cut it anyway
            cut = start + budget
        parts.append(segment[start:cut])
        start = cut
    parts.append(segment[start:])
    return parts


def pack_segments(segments: list[list[int]], budget: int, dupe_index: int = 0) -> list[list[int]]:
    """Pack a document's lines (token-id lists, each at most `budget` long) into chunks.

    Faithful to `create_instances_from_document`: lines are appended while they fit; a line that
    does not fit contributes its fitting prefix to close the current chunk and then starts the next
    chunk whole. Documents with >= 10 lines also break before line `dupe_index` (the authors vary it
    per duplication pass so the chunk boundaries differ; 0 means no extra break).
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    forced_break = dupe_index if len(segments) >= 10 else -1
    for i, segment in enumerate(segments):
        if len(current) + len(segment) > budget or i == forced_break:
            if current:
                current.extend(segment[: budget - len(current)])
                chunks.append(current)
            current = []
        current.extend(segment)
    if current:
        chunks.append(current)
    return chunks


@dataclass
class ClusterBatch:
    """Pruned span clusters of a batch of sequences, flat (Python lists: the masking loop's diet).

    Sequence s owns clusters `first[s]:first[s + 1]`, in the authors' order (the order a random
    permutation then indexes). Cluster c is an n-gram of `lengths[c]` tokens whose surviving
    occurrences (at least 2) start at `starts[bounds[c]:bounds[c + 1]]`, sequence-local, ascending.
    """

    first: list[int]
    lengths: list[int]
    bounds: list[int]
    starts: list[int]

    def count(self, s: int) -> int:
        return self.first[s + 1] - self.first[s]

    def as_spans(self, s: int) -> list[list[tuple[int, int]]]:
        """Sequence s's clusters as inclusive (start, end) pairs, the oracle's format."""
        return [
            [(p, p + self.lengths[c] - 1) for p in self.starts[self.bounds[c] : self.bounds[c + 1]]]
            for c in range(self.first[s], self.first[s + 1])
        ]


def find_span_clusters(
    ids: np.ndarray, offsets: np.ndarray, tables: VocabTables, max_span_length: int
) -> ClusterBatch:
    """Recurring-span clusters for every sequence of a batch, equal to the authors' all-pairs scan.

    `ids` holds all sequences back to back (each with its [CLS]/[SEP]); sequence s is
    `ids[offsets[s]:offsets[s+1]]`. The authors' clusters are exactly: for each n-gram (n <=
    max_span_length) that occurs at least twice in the sequence, all its occurrences; kept if the
    first occurrence is valid; ordered longest first, then by where the n-gram's first token first
    appears in the sequence (their dict of token -> positions), then by first occurrence; then
    pruned longest first.
    """
    ids = np.asarray(ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    num_seqs = len(offsets) - 1
    parts: list[tuple[np.ndarray, ...]] = []
    # Keys and positions are packed into one int64 (see _levels): (group < n) * vocab, then n
    # positions. Cap the tokens per pass so 2 * log2(n) + log2(vocab) stays below 62 bits.
    pass_tokens = min(_MAX_PASS_TOKENS, 1 << ((61 - (len(tables.word) + 1).bit_length()) // 2))
    first = 0
    while first < num_seqs:
        last = int(np.searchsorted(offsets, offsets[first] + pass_tokens, side="right")) - 1
        last = min(max(last, first + 1), num_seqs)
        base = int(offsets[first])
        part_offsets = offsets[first : last + 1] - base
        found = _levels(ids[base : offsets[last]], part_offsets, tables, max_span_length)
        if found:
            seq, lengths, counts, starts = _prune(found, int(part_offsets[-1]), part_offsets)
            parts.append((seq + first, lengths, counts, starts))
        first = last
    if not parts:
        return ClusterBatch([0] * (num_seqs + 1), [], [0], [])
    seq, lengths, counts, starts = (np.concatenate(col) for col in zip(*parts, strict=True))
    per_seq = np.bincount(seq, minlength=num_seqs)
    return ClusterBatch(
        np.concatenate(([0], np.cumsum(per_seq))).tolist(),
        lengths.tolist(),
        np.concatenate(([0], np.cumsum(counts))).tolist(),
        starts.tolist(),
    )


# Sequences of one pass hold at most this many tokens in total (fewer for a vocabulary above
# 2^15 ids; a longer single sequence still runs alone). Also bounds a pass's memory: a pass holds
# ~60 bytes per token in its sorts and levels, so one huge document costs ~60 MB here, not 60x its
# tokens. A usual batch (256 documents, at most 512 tokens each) is one pass either way.
_MAX_PASS_TOKENS = 1 << 20


def _levels(
    ids: np.ndarray, offsets: np.ndarray, tables: VocabTables, max_span_length: int
) -> list[tuple[np.ndarray, ...]]:
    """All valid recurring n-gram clusters before pruning, one entry per length that has any.

    Each entry is `(seq, length, token_first, p1, counts, members)` over that length's clusters:
    sequence, n-gram length, first position of the n-gram's first token, first occurrence,
    occurrence count, and all occurrences (global positions, grouped by cluster, ascending).
    """
    n = len(ids)
    num_seqs = len(offsets) - 1
    vocab = len(tables.word)
    if n == 0:
        return []
    if ids.min() < 0 or ids.max() >= vocab:
        ids = np.where((ids >= 0) & (ids < vocab), ids, vocab)  # unknown ids: no flags, never repeat
    # Per position: the id's flags, and a 0 sentinel at n. A token at a sequence start never
    # continues an n-gram nor counts as the piece after one, so no per-level bounds checks.
    flags = np.empty(n + 1, dtype=np.uint8)
    flags[:n] = tables.flags[ids]
    flags[n] = 0
    flags[offsets[1:-1]] &= np.uint8(~(_OK | _PIECE) & 0xFF)
    seq_of = np.repeat(np.arange(num_seqs, dtype=np.int64), np.diff(offsets))
    pos_bits = max(1, n.bit_length())
    pos_mask = (1 << pos_bits) - 1
    if (max(n, num_seqs) * (vocab + 1)).bit_length() + pos_bits > 62:
        raise ValueError(f"too many tokens ({n}) in one cluster-search pass")

    # Level by level: `cand` are start positions whose l-gram may still repeat and `key` names the
    # l-gram within its sequence: (sequence, token) at l = 1, then (group of the (l-1)-gram,
    # next token). An n-gram with punctuation or special tokens, or starting with "##", fails
    # validity at every occurrence alike, so such positions never become candidates.
    cand = (flags[:n] & _WORD).nonzero()[0]
    key = seq_of[cand] * (vocab + 1) + ids[cand]
    first_of_token = np.zeros(n, dtype=np.int64)
    found: list[tuple[Any, ...]] = []
    for length in range(1, max_span_length + 1):
        if len(cand) < 2:
            break
        # One sort of (key, position) packed in an int64: groups come out contiguous with their
        # members in ascending position (several times faster than a stable argsort).
        packed = np.sort((key << pos_bits) | cand)
        pos = packed & pos_mask
        key = packed >> pos_bits
        fresh = np.empty(len(key), dtype=bool)  # first element of its group
        fresh[0] = True
        np.not_equal(key[1:], key[:-1], out=fresh[1:])
        # An element is in a repeated group iff it equals a neighbour.
        same_as_next = ~fresh[1:]
        in_repeated = np.zeros(len(key), dtype=bool)
        in_repeated[1:] = same_as_next
        in_repeated[:-1] |= same_as_next
        if not in_repeated.any():
            break
        pos = pos[in_repeated]
        fresh = fresh[in_repeated]
        group_start = fresh.nonzero()[0]
        group_count = np.diff(group_start, append=len(pos))
        group_of = np.cumsum(fresh) - 1
        p1 = pos[group_start]
        if length == 1:
            first_of_token[pos] = p1[group_of]
        valid = (flags[p1 + length] & _PIECE) == 0
        has_content = flags[p1] & _CONTENT
        for j in range(1, length):
            has_content |= flags[p1 + j]
        valid &= (has_content & _CONTENT) != 0
        if valid.any():
            found.append((length, p1[valid], group_count[valid], pos[valid[group_of]]))
        # Extend the repeated l-grams whose next token exists in the sequence and may be in a span.
        nxt = pos + length
        grow = (flags[nxt] & _OK) != 0
        cand = pos[grow]
        key = group_of[grow] * (vocab + 1) + ids[nxt[grow]]
    # Sequence and token_first are filled in here, in one gather each rather than per level.
    return [
        (seq_of[p1], np.full(len(p1), length, dtype=np.int64), first_of_token[p1], p1, counts, members)
        for length, p1, counts, members in found
    ]


def _prune(
    found: list[tuple[np.ndarray, ...]], n: int, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The authors' longest-first pruning, vectorized over the batch one length at a time.

    Sequentially, a cluster keeps the occurrences that touch no token taken by an earlier cluster
    and is accepted (taking their tokens) if at least two remain. Longer lengths are resolved before
    a level starts, so their effect is a lookup of the taken tokens. Within a level, a cluster whose
    surviving occurrences overlap no other occurrence cannot influence or be influenced by its
    peers: those are decided in one step. Only the few clusters with an overlap ("New York" and
    "York City", or "a a" in "a a a") are replayed in the authors' order in Python.
    Returns the accepted clusters' (seq, length, count, local starts) in the authors' order.
    """
    pos_bits = max(1, n.bit_length())
    taken = np.zeros(n, dtype=bool)
    accepted: list[tuple[np.ndarray, ...]] = []
    for level in range(len(found) - 1, -1, -1):  # longest first
        f_seq, f_len, f_first, f_p1, counts, members = found[level]
        span_len = int(f_len[0])
        num = len(f_seq)
        owner = np.repeat(np.arange(num, dtype=np.int64), counts)
        alive = ~taken[members]
        for j in range(1, span_len):
            alive &= ~taken[members + j]
        accept = np.bincount(owner[alive], minlength=num) >= 2
        contested = None
        if span_len > 1:  # single tokens never overlap
            # Equal-length occurrences overlap iff their starts are closer than the length, so
            # only neighbours in start order need checking (starts are unique within a level).
            live = alive.nonzero()[0]
            by_start = np.sort((members[live] << pos_bits) | live)
            live = by_start & ((1 << pos_bits) - 1)
            close = np.diff(by_start >> pos_bits) < span_len
            crowded = np.zeros(len(members), dtype=bool)
            crowded[live[:-1][close]] = True
            crowded[live[1:][close]] = True
            contested = np.bincount(owner[crowded], minlength=num) > 0
            accept &= ~contested
        keep = alive & accept[owner]
        if contested is not None and contested.any():
            # Within one sequence, the authors' order at a fixed length is (token_first, p1).
            rank = (f_first << pos_bits) | f_p1
            replay = np.flatnonzero(contested)
            replay = replay[np.argsort(rank[replay])]
            _replay(replay.tolist(), alive, members, counts, f_seq, span_len, offsets, accept, keep)
        kept = members[keep]
        if level > 0:  # the shortest level is last: nothing reads `taken` after it
            for j in range(span_len):
                taken[kept + j] = True
        picked = np.flatnonzero(accept)
        accepted.append(
            (
                f_seq[picked],
                f_len[picked],
                f_first[picked],
                f_p1[picked],
                np.bincount(owner[keep], minlength=num)[picked],
                kept,
            )
        )

    seq, lengths, token_first, p1, counts, members = (
        np.concatenate(col) for col in zip(*accepted, strict=True)
    )
    # The authors' order: sequence, longest first, first appearance of the first token, first
    # occurrence. One packed-key argsort (np.lexsort is ~20x slower at these sizes).
    base = offsets[seq]
    local_bits = max(1, int(np.diff(offsets).max()).bit_length())
    len_bits = max(1, int(lengths.max()).bit_length())
    if max(1, len(offsets).bit_length()) + len_bits + 2 * local_bits <= 62:
        order = np.argsort(
            (
                ((seq << len_bits | (lengths.max() - lengths)) << local_bits | (token_first - base))
                << local_bits
            )
            | (p1 - base)
        )
    else:
        order = np.lexsort((p1, token_first, -lengths, seq))
    # Members are grouped by cluster in `accepted` order; regroup them in the authors' order.
    member_start = np.concatenate(([0], np.cumsum(counts)))
    counts = counts[order]
    gather = np.repeat(member_start[order] - np.concatenate(([0], np.cumsum(counts[:-1]))), counts)
    gather += np.arange(len(gather))
    seq = seq[order]
    return seq, lengths[order], counts, members[gather] - offsets[np.repeat(seq, counts)]


def _replay(
    replay: list[int],
    alive: np.ndarray,
    members: np.ndarray,
    counts: np.ndarray,
    f_seq: np.ndarray,
    span_len: int,
    offsets: np.ndarray,
    accept: np.ndarray,
    keep: np.ndarray,
) -> None:
    """Sequential pruning of one level's contested clusters (given in the authors' order).

    Only peers at this level matter: longer levels are already excluded through `alive`, and an
    uncontested cluster overlaps no live occurrence. Updates `accept` and `keep` in place.
    """
    member_start = np.concatenate(([0], np.cumsum(counts)))
    lo = member_start[replay].tolist()
    hi = member_start[np.asarray(replay) + 1].tolist()
    base = offsets[f_seq[replay]].tolist()
    seqs = f_seq[replay].tolist()
    live = alive.tolist()
    starts = members.tolist()
    span = (1 << span_len) - 1
    taken: dict[int, int] = {}  # per sequence: bitmask of tokens (relative to its start) taken here
    won: list[int] = []
    kept: list[int] = []
    for c, s, b, first, last in zip(replay, seqs, base, lo, hi, strict=True):
        mask = taken.get(s, 0)
        idx = [i for i in range(first, last) if live[i] and not (mask >> (starts[i] - b)) & span]
        if len(idx) >= 2:
            won.append(c)
            kept.extend(idx)
            for i in idx:
                mask |= span << (starts[i] - b)
            taken[s] = mask
    accept[won] = True
    keep[kept] = True


def mask_clusters(
    clusters: ClusterBatch,
    s: int,
    budget: int,
    order: np.ndarray,
    choice: np.ndarray,
) -> list[tuple[int, int, int, int]]:
    """The authors' recurring-span masking over sequence s's pruned clusters.

    Clusters are visited in `order` (a permutation of range(clusters.count(s))); at the i-th visit,
    occurrence `floor(choice[i] * count)` (choice uniform in [0, 1)) stays visible, and the cluster
    is skipped entirely if that occurrence touches a masked token. Every other occurrence that
    touches no masked or label token is masked, until `budget` questions exist. Returns
    `(question_pos, span_length, label_start, label_end)` sorted by position (inclusive labels,
    positions before any layout change).

    One deliberate difference: an occurrence overlapping the visible one ("a a a" has overlapping
    "a a"s) is not masked. The authors' check misses that case and would mask part of the label.
    """
    masked = 0  # bit i: token i was replaced by a question
    labels = 0  # bit i: token i is part of some question's answer
    questions: list[tuple[int, int, int, int]] = []
    if budget <= 0:
        return questions
    base = clusters.first[s]
    lengths, bounds, all_starts = clusters.lengths, clusters.bounds, clusters.starts
    for visit, c in enumerate(order.tolist()):
        c += base
        span_len = lengths[c]
        starts = all_starts[bounds[c] : bounds[c + 1]]
        k = min(int(choice[visit] * len(starts)), len(starts) - 1)
        span = (1 << span_len) - 1
        visible = starts[k]
        visible_bits = span << visible
        if masked & visible_bits:
            continue
        blocked = masked | labels | visible_bits
        for i, p in enumerate(starts):
            if i == k:
                continue
            bits = span << p
            if blocked & bits:
                continue
            masked |= bits
            labels |= visible_bits
            blocked |= bits
            questions.append((p, span_len, visible, visible + span_len - 1))
            if len(questions) >= budget:
                break
        if len(questions) >= budget:
            break
    questions.sort()
    return questions
