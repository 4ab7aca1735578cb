"""Recurring-span mining stage: documents -> Splinter pretraining sequences.

Faithful to the authors' `create_pretraining_data.py` + `masking.py` (see `pipeline.stages.span_search`), with
these documented differences:

* Randomness is per document, from `(seed, dupe_index, doc_id)` through blake2b, so output does
  not depend on batch boundaries, worker count or document order (the authors used one global
  unseeded numpy RNG).
* `dupe_factor` N mines every document N times (the authors' duplication passes: their own
  chunk boundaries for documents of >= 10 lines, their own masking always). A document's rows are
  emitted together, pass by pass, so they sit next to each other in the output: a trainer must
  shuffle them.
* A line longer than `max_seq_length - 2` tokens is split at word starts into several lines
  instead of being truncated (the authors dropped the rest of it).
* Sequences that end up with no question are dropped: they carry no pretraining signal, and a
  batch of them makes the loss NaN. A document left with none gets `skip_reason`
  "no_recurring_spans".
* `layout="collapsed"` (default) deletes the inner tokens of each masked occurrence, so every
  masked span is one `[QUESTION]` token and positions are plain 0..n-1 (what HF's
  SplinterForPreTraining expects without `position_ids`). `layout="original"` is the authors'
  layout: inner tokens become [PAD] with attention 0, plus `position_ids` = exclusive cumsum of
  the attention mask.
* An occurrence overlapping its cluster's visible occurrence is never masked (see
  `pipeline.stages.span_search.mask_clusters`).
* A document longer than `max_doc_chars` characters is mined in consecutive pieces of at most that
  many characters (cut at a line break, else at a space), each packed on its own: nothing is cut
  away, and no single tokenizer call or packing loop sees more than one piece. Piece 0 uses the
  document's random stream; later pieces get their own, derived from the piece number. `stream`
  yields such a document's rows piece by piece, so a job can write them as they come.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pipeline.engine.batch import concat_batches
from pipeline.engine.resources import Resources
from pipeline.stages.span_search import (
    ClusterBatch,
    VocabTables,
    find_span_clusters,
    mask_clusters,
    pack_segments,
    question_budget,
    split_long_segment,
)

__all__ = ["LAYOUTS", "SKIP_REASONS", "RecurringSpanMiner", "load_mining_tokenizer"]

LAYOUTS = ("collapsed", "original")
SKIP_REASONS = ("empty", "not_text", "too_short", "no_recurring_spans")

# Characters that do not occur in real text: C0/C1 controls (tab, newlines, vertical tab and form
# feed excepted), DEL, and U+FFFD (what a decoder leaves for invalid UTF-8).
_JUNK = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
_JUNK_FRACTION = 0.05
_SURROGATE = re.compile("[\ud800-\udfff]")
# Characters of lines per tokenizer call: its Encodings take ~100 bytes a token (~25 bytes a character)
# until their ids are taken, so calls stay small; a usual batch of documents is a few calls.
_ENCODE_CHARS = 1 << 18
# Characters of documents mined together (tokenized together, one cluster search, one output batch): a
# usual batch of documents is one group; a group's memory, not the batch's, is what mining holds.
_GROUP_CHARS = 1 << 20
_INT32 = np.int32


def load_mining_tokenizer(tokenizer: str | os.PathLike[str] | None) -> Any:
    """A `SplinterTokenizer`: None = bundled vocab, a directory = from_pretrained, a file = vocab.txt."""
    from splinter.tokenizer import SplinterTokenizer

    if tokenizer is None:
        return SplinterTokenizer.default()
    if os.path.isdir(tokenizer):
        return SplinterTokenizer.from_pretrained(tokenizer)
    if os.path.isfile(tokenizer):
        return SplinterTokenizer.from_vocab(tokenizer)
    raise ValueError(f"tokenizer {tokenizer!r} is neither a tokenizer directory nor a vocab.txt file")


def _plain_backend(backend: Tokenizer) -> Tokenizer:
    """A private copy of the backend that tokenizes document text only.

    Drops added tokens so literal "[CLS]"/"[QUESTION]" in a document is split like any other
    bracketed word (as the authors' BasicTokenizer did) and can never fake a special token; drops
    truncation, padding and the question template, which mining does itself.
    """
    state = json.loads(backend.to_str())
    state["added_tokens"] = []
    state["truncation"] = None
    state["padding"] = None
    state["post_processor"] = None
    return Tokenizer.from_str(json.dumps(state))


def _object_array(items: list[Any]) -> np.ndarray:
    # Element-wise: numpy would otherwise broadcast equal-length arrays into a 2-D array.
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return first + np.arange(total)


class RecurringSpanMiner:
    """Stage: `doc_id`, `text` -> one row per pretraining sequence (or one skip row per document).

    Output columns (all object arrays hold 1-D numpy arrays, int32 unless noted):
    `_source` int64 (input row), `skip_reason` str ("" for sequences), `doc_id` str, `seq_index`
    int32 (0, 1, ... over all the document's emitted rows, across passes; -1 on skip rows),
    `dupe_index` int32 (the duplication pass, 0..dupe_factor-1; -1 on skip rows), `input_ids`, `attention_mask`,
    `token_type_ids` (zeros), `question_positions`, `start_positions`, `end_positions`,
    `masked_spans` (object array of Python lists of str, one per question: Arrow list<string>),
    `position_ids` (layout "original" only), `num_tokens` int32, `num_questions` int32.
    """

    resources = Resources(num_cpus=1, batch_size=256)

    def __init__(
        self,
        tokenizer: str | None = None,
        seed: int = 12345,
        max_seq_length: int = 512,
        max_span_length: int = 10,
        max_questions: int = 30,
        layout: str = "collapsed",
        mask_prob: float = 0.15,
        dupe_factor: int = 1,
        min_doc_tokens: int = 8,
        max_doc_chars: int = 1_000_000,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if max_seq_length < 8:
            raise ValueError(f"max_seq_length must be >= 8, got {max_seq_length}")
        if max_span_length < 1 or max_questions < 1:
            raise ValueError("max_span_length and max_questions must be >= 1")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        if dupe_factor < 1 or min_doc_tokens < 0 or max_doc_chars < 1:
            raise ValueError("dupe_factor must be >= 1, min_doc_tokens >= 0, max_doc_chars >= 1")
        self.seed = int(seed)
        self.max_seq_length = int(max_seq_length)
        self.max_span_length = int(max_span_length)
        self.max_questions = int(max_questions)
        self.layout = layout
        self.mask_prob = float(mask_prob)
        self.dupe_factor = int(dupe_factor)
        self.min_doc_tokens = int(min_doc_tokens)
        self.max_doc_chars = int(max_doc_chars)

        tok = load_mining_tokenizer(tokenizer)
        self.backend = _plain_backend(tok.backend)
        self.cls_id = int(tok.cls_token_id)
        self.sep_id = int(tok.sep_token_id)
        self.pad_id = int(tok.pad_token_id)
        self.question_id = int(tok.question_token_id)
        self.tables = VocabTables.from_vocab(tok.get_vocab())
        # One int object per token id (ids beyond the vocabulary cannot come out of the backend).
        self._ints = list(range(max(self.backend.get_vocab_size(), max(tok.get_vocab().values(), default=0) + 1)))
        # encode_batch_fast skips offset bookkeeping we do not need (tokenizers >= 0.21).
        self._encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)

    # ------------------------------------------------------------------ steps

    def check_text(self, text: Any) -> tuple[str, str]:
        """(usable text, "") or ("", skip reason). Never raises."""
        if isinstance(text, bytes | bytearray | memoryview):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                return "", "not_text"
        if not isinstance(text, str):
            return "", "not_text"  # None, NaN from a pandas round trip, numbers...
        if not text or text.isspace():
            return "", "empty"
        if _SURROGATE.search(text):  # what UTF-8 cannot encode (found without a copy of a huge text)
            # Lone surrogates (a bad decode upstream): the tokenizer cannot take them; make them
            # U+FFFD so the junk test below judges them like any invalid UTF-8.
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        junk = len(_JUNK.findall(text))
        if junk > _JUNK_FRACTION * len(text):
            return "", "not_text"
        return text, ""

    def tokenize_lines(self, texts: list[str]) -> list[list[list[int]]]:
        """Each text -> its non-empty lines' WordPiece ids (one `encode_batch` for the whole batch)."""
        lines: list[str] = []
        bounds = [0]
        for text in texts:
            lines.extend(line for line in (raw.strip() for raw in text.splitlines()) if line)
            bounds.append(len(lines))
        # A tokenizers Encoding keeps ~100 bytes per token (ids, tokens, offsets, masks): a batch's
        # Encodings all at once cost ~30x its text (a 50 MB document: GBs). Lines are encoded a bounded
        # slice at a time and only their ids are kept, as the shared int objects of `self._ints`
        # (8 bytes per token instead of a fresh 28-byte int each). Each line is encoded on its own
        # either way, so the ids are the same.
        ids: list[list[int]] = []
        ints = self._ints.__getitem__
        start = 0
        while start < len(lines):
            stop, chars = start, 0
            while stop < len(lines) and (stop == start or chars < _ENCODE_CHARS):
                chars += len(lines[stop])
                stop += 1
            for e in self._encode(lines[start:stop], add_special_tokens=False):
                ids.append(list(map(ints, e.ids)))
            start = stop
        del lines
        return [[seg for seg in ids[bounds[i] : bounds[i + 1]] if seg] for i in range(len(texts))]

    def _tokenize_guarded(self, texts: list[str]) -> list[list[list[int]] | None]:
        """`tokenize_lines`, but a text the tokenizer rejects yields None instead of failing the batch."""
        try:
            return list(self.tokenize_lines(texts))
        except Exception:  # noqa: BLE001 - isolate the offending document, keep the others
            out: list[list[list[int]] | None] = []
            for text in texts:
                try:
                    out.append(self.tokenize_lines([text])[0])
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out

    def split_text(self, text: str) -> list[str]:
        """A document as pieces of at most max_doc_chars characters, cut at a line break (else a space).

        The pieces concatenate back to the text, so nothing is lost; every piece is mined.
        """
        return [text[start:stop] for start, stop in self.piece_bounds(text)]

    def piece_bounds(self, text: str) -> list[tuple[int, int]]:
        """(start, stop) of each piece of `split_text`, without copying the text."""
        cap = self.max_doc_chars
        bounds: list[tuple[int, int]] = []
        start = 0
        while len(text) - start > cap:
            end = start + cap
            cut = text.rfind("\n", start + cap // 2, end)
            if cut < 0:
                cut = text.rfind(" ", start + cap // 2, end)
            cut = end if cut < 0 else cut + 1
            bounds.append((start, cut))
            start = cut
        bounds.append((start, len(text)))
        return bounds

    def chunk(self, segments: list[list[int]], dupe_index: int = 0) -> list[list[int]]:
        """A document's lines -> `[CLS] ... [SEP]` sequences of at most max_seq_length tokens.

        `dupe_index` is the duplication pass: documents of >= 10 lines break before that line too.
        """
        budget = self.max_seq_length - 2
        pieces: list[list[int]] = []
        for segment in segments:
            if len(segment) > budget:
                pieces.extend(split_long_segment(segment, budget, self.tables.piece))
            else:
                pieces.append(segment)
        return [
            [self.cls_id, *chunk, self.sep_id] for chunk in pack_segments(pieces, budget, dupe_index)
        ]

    def doc_rng(self, doc_id: str, dupe_index: int = 0, piece: int = 0) -> np.random.Generator:
        """The random stream of one pass over one document piece: a stable hash, never Python's salted hash()."""
        material = f"{self.seed}\x1f{dupe_index}\x1f{doc_id}"
        if piece:
            material += f"\x1f{piece}"
        material = material.encode("utf-8", "surrogatepass")
        return np.random.default_rng(
            int.from_bytes(hashlib.blake2b(material, digest_size=16).digest(), "little")
        )

    def find_clusters(self, sequences: list[list[int]]) -> ClusterBatch:
        """Pruned recurring-span clusters of each sequence (the fast search; tests compare it)."""
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sequences], out=offsets[1:])
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(offsets[-1]))
        return find_span_clusters(flat, offsets, self.tables, self.max_span_length)

    # ------------------------------------------------------------------ stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All rows of the batch at once: `stream`'s batches, concatenated."""
        parts = list(self.stream(batch))
        return parts[0] if len(parts) == 1 else concat_batches(parts)

    def stream(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The rows of `__call__`, in the same order, as consecutive batches of bounded size.

        Documents are mined in groups of about `_GROUP_CHARS` characters (a usual batch is one group),
        and a document longer than `max_doc_chars` on its own, one piece of one pass at a time: its rows
        come out over several batches, adjacent and in order, so memory follows a piece, not the
        document. Each batch holds whole documents' rows except for such a document's.
        """
        missing = [name for name in ("doc_id", "text") if name not in batch]
        if missing:
            raise ValueError(f"the mining stage needs columns 'doc_id' and 'text'; missing {missing}")
        texts = batch["text"]
        doc_ids = ["" if d is None else str(d) for d in batch["doc_id"]]
        group: list[tuple[int, str]] = []  # (input row, usable text or "")
        reasons: dict[int, str] = {}
        chars = 0
        for i in range(len(texts)):
            text, reason = self.check_text(texts[i])
            if not reason and len(text) > self.max_doc_chars:
                if group:
                    yield self._mine_group(group, doc_ids, reasons)
                    group, chars = [], 0
                yield from self._mine_long(i, doc_ids[i], text)
                continue
            if reason:
                reasons[i] = reason
            group.append((i, text))
            chars += len(text)
            if chars >= _GROUP_CHARS:
                yield self._mine_group(group, doc_ids, reasons)
                group, chars = [], 0
        if group or not len(texts):
            yield self._mine_group(group, doc_ids, reasons)

    def _mine_group(self, group: list[tuple[int, str]], doc_ids: list[str],
                    reasons: dict[int, str]) -> dict[str, np.ndarray]:
        """Rows of documents of at most max_doc_chars characters (one piece each), in input order: one
        tokenizer pass and one cluster search for all of them. `reasons` holds the skipped ones."""
        skip = {i: reasons[i] for i, _ in group if i in reasons}
        usable = [(i, text) for i, text in group if i not in skip]
        # Sequences of all usable documents, back to back: per document, pass by pass. A pass whose
        # chunks equal pass 0's (every document under 10 lines) reuses pass 0's cluster search: only
        # the masking differs.
        unique: list[list[int]] = []  # sequences the cluster search sees
        seq_doc: list[int] = []  # per emitted sequence: its document,
        seq_dupe: list[int] = []  # its pass,
        seq_uniq: list[int] = []  # and its entry in `unique`
        tokenized = self._tokenize_guarded([text for _, text in usable])
        for (i, _), segments in zip(usable, tokenized, strict=True):
            if segments is None:
                skip[i] = "not_text"
                continue
            if sum(len(seg) for seg in segments) < max(self.min_doc_tokens, 1):
                skip[i] = "too_short"
                continue
            first_chunks: list[list[int]] = []
            first_ref = 0
            for d in range(self.dupe_factor):
                chunks = self.chunk(segments, d)
                if d and chunks == first_chunks:
                    refs = range(first_ref, first_ref + len(chunks))
                else:
                    refs = range(len(unique), len(unique) + len(chunks))
                    unique.extend(chunks)
                if d == 0:
                    first_chunks, first_ref = chunks, refs.start
                for u in refs:
                    seq_doc.append(i)
                    seq_dupe.append(d)
                    seq_uniq.append(u)
        del tokenized  # the token lists live on in `unique`
        return self._mask_and_emit(
            docs=[i for i, _ in group],
            doc_ids=doc_ids,
            reasons=skip,
            unique=unique,
            seqs=(seq_doc, seq_dupe, [0] * len(seq_doc), seq_uniq),
        )

    def _mine_long(self, i: int, doc_id: str, text: str) -> Iterator[dict[str, np.ndarray]]:
        """Rows of one document longer than max_doc_chars (input row `i`), in `__call__`'s order: pass by
        pass, piece by piece, each piece tokenized when its turn comes (again in every pass, so only
        one piece's tokens are ever held).

        Its tests need the whole document: rows wait while the document has shown fewer than
        min_doc_tokens tokens (too_short would drop them), and a piece the tokenizer rejects after
        rows have gone out (not_text would) stops the stage with an error: `check_text` leaves no
        known text the tokenizer rejects.
        """
        need = max(self.min_doc_tokens, 1)
        tokens = 0  # seen in pass 0
        sent = 0  # rows yielded
        held: list[dict[str, np.ndarray]] = []
        bounds = self.piece_bounds(text)
        for d in range(self.dupe_factor):
            for k, (start, stop) in enumerate(bounds):
                segments = self._tokenize_guarded([text[start:stop]])[0]
                if segments is None:
                    if sent:
                        raise RuntimeError(f"document {doc_id!r}: the tokenizer rejected piece {k} of "
                                           f"{len(bounds)} after rows of earlier pieces were emitted")
                    yield self._skip_row(i, doc_id, "not_text")
                    return
                if d == 0:
                    tokens += sum(len(seg) for seg in segments)
                chunks = self.chunk(segments, d)
                del segments
                n = len(chunks)
                out = self._mask_and_emit(
                    docs=[i],
                    doc_ids={i: doc_id},
                    reasons={},
                    unique=chunks,
                    seqs=([i] * n, [d] * n, [k] * n, list(range(n))),
                    first_seq_index=sent + sum(len(h["_source"]) for h in held),
                    skip_rows=False,
                )
                if len(out["_source"]):
                    held.append(out)
                if tokens >= need:
                    for part in held:
                        sent += len(part["_source"])
                        yield part
                    held = []
            if tokens < need:  # known at the end of pass 0
                yield self._skip_row(i, doc_id, "too_short")
                return
        if not sent:
            yield self._skip_row(i, doc_id, "no_recurring_spans")

    def _skip_row(self, i: int, doc_id: str, reason: str) -> dict[str, np.ndarray]:
        return self._mask_and_emit(docs=[i], doc_ids={i: doc_id}, reasons={i: reason}, unique=[],
                                   seqs=([], [], [], []))

    def _mask_and_emit(
        self,
        *,
        docs: list[int],
        doc_ids: list[str] | dict[int, str],
        reasons: dict[int, str],
        unique: list[list[int]],
        seqs: tuple[list[int], list[int], list[int], list[int]],
        first_seq_index: int = 0,
        skip_rows: bool = True,
    ) -> dict[str, np.ndarray]:
        """Cluster search over `unique`, masking, rows. `seqs` = per emitted sequence: its document, pass,
        piece and entry in `unique`."""
        seq_doc, seq_dupe, seq_piece, seq_uniq = seqs
        uniq_offsets = np.zeros(len(unique) + 1, dtype=np.int64)
        np.cumsum([len(u) for u in unique], out=uniq_offsets[1:])
        clusters = find_span_clusters(
            np.fromiter((t for u in unique for t in u), dtype=np.int64, count=int(uniq_offsets[-1])),
            uniq_offsets,
            self.tables,
            self.max_span_length,
        )
        sequences = [unique[u] for u in seq_uniq]
        seq_len = [len(seq) for seq in sequences]
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(seq_len, out=offsets[1:])
        flat = np.fromiter((t for seq in sequences for t in seq), dtype=np.int64, count=int(offsets[-1]))
        del sequences

        # Masking, sequentially per (document, pass, piece) with its own generator.
        q_seq: list[int] = []
        q_pos: list[int] = []
        q_len: list[int] = []
        q_start: list[int] = []
        q_end: list[int] = []
        rng: np.random.Generator | None = None
        key: tuple[int, int, int] | None = None
        for s, u in enumerate(seq_uniq):
            if (seq_doc[s], seq_dupe[s], seq_piece[s]) != key:
                key = (seq_doc[s], seq_dupe[s], seq_piece[s])
                rng = self.doc_rng(doc_ids[key[0]], key[1], key[2])
            assert rng is not None
            count = clusters.count(u)
            order = rng.permutation(count)
            choice = rng.random(count)
            budget = question_budget(seq_len[s], self.max_questions, self.mask_prob)
            for pos, span_len, start, end in mask_clusters(clusters, u, budget, order, choice):
                q_seq.append(s)
                q_pos.append(pos)
                q_len.append(span_len)
                q_start.append(start)
                q_end.append(end)
        return self._emit(
            docs=docs,
            doc_ids=doc_ids,
            reasons=reasons,
            seq_doc=seq_doc,
            seq_dupe=seq_dupe,
            flat=flat,
            offsets=offsets,
            questions=(q_seq, q_pos, q_len, q_start, q_end),
            first_seq_index=first_seq_index,
            skip_rows=skip_rows,
        )

    def _emit(
        self,
        *,
        docs: list[int],
        doc_ids: list[str] | dict[int, str],
        reasons: dict[int, str],
        seq_doc: list[int],
        seq_dupe: list[int],
        flat: np.ndarray,
        offsets: np.ndarray,
        questions: tuple[list[int], ...],
        first_seq_index: int = 0,
        skip_rows: bool = True,
    ) -> dict[str, np.ndarray]:
        """Apply the layout to all sequences at once, then cut rows: per document of `docs` (input rows, in
        order) its sequences that got questions, numbered from `first_seq_index`, or one skip row (none
        with `skip_rows=False`: a long document's piece, whose skip row comes at the document's end)."""
        q_seq, q_pos, q_len, q_start, q_end = (np.asarray(q, dtype=np.int64) for q in questions)
        num_seqs = len(seq_doc)
        seq_start = offsets[:-1]
        q_global = seq_start[q_seq] + q_pos
        # Inner tokens of each masked occurrence (everything after its [QUESTION]).
        inner = _ragged_arange(q_global + 1, q_len - 1)
        keep = np.ones(len(flat), dtype=bool)
        keep[inner] = False
        new_index = np.cumsum(keep) - 1  # position after deleting the inner tokens
        if self.layout == "collapsed":
            # Every [QUESTION] position is kept, so it is set after the cut: no full-size int64 copy.
            out_ids = flat[keep].astype(_INT32)
            out_ids[new_index[q_global]] = self.question_id
            out_start = new_index[seq_start]
            out_offsets = np.append(out_start, len(out_ids))
            local = new_index - np.repeat(out_start, np.diff(offsets))
            attention = np.ones(len(out_ids), dtype=_INT32)
            position_ids = None
        else:
            ids = flat.copy()
            ids[q_global] = self.question_id
            ids[inner] = self.pad_id
            out_ids = ids.astype(_INT32)
            out_offsets = offsets
            local = np.arange(len(flat)) - np.repeat(seq_start, np.diff(offsets))
            attention = keep.astype(_INT32)
            # Exclusive cumsum of the mask within each sequence: PADs do not advance positions.
            seen = np.cumsum(attention) - attention
            position_ids = (seen - np.repeat(seen[seq_start], np.diff(offsets))).astype(_INT32)
        q_out = local[q_global].astype(_INT32)
        start_out = local[seq_start[q_seq] + q_start].astype(_INT32)
        end_out = local[seq_start[q_seq] + q_end].astype(_INT32)
        types = np.zeros(len(out_ids), dtype=_INT32)
        q_bounds = np.searchsorted(q_seq, np.arange(num_seqs + 1)).tolist()
        spans = [
            self.tables.detokenize(flat[p : p + n].tolist())
            for p, n in zip(q_global.tolist(), q_len.tolist(), strict=True)
        ]

        # Rows: each document's sequences that got questions, or one skip row.
        by_doc: dict[int, list[int]] = {}
        for s in range(num_seqs):
            if q_bounds[s + 1] > q_bounds[s]:
                by_doc.setdefault(seq_doc[s], []).append(s)
        empty = np.zeros(0, dtype=_INT32)
        cols: dict[str, list[Any]] = {
            name: []
            for name in (
                "_source",
                "skip_reason",
                "doc_id",
                "seq_index",
                "dupe_index",
                "input_ids",
                "attention_mask",
                "token_type_ids",
                "question_positions",
                "start_positions",
                "end_positions",
                "masked_spans",
                "num_tokens",
                "num_questions",
            )
        }
        if position_ids is not None:
            cols["position_ids"] = []
        bounds = out_offsets.tolist()
        for i in docs:
            rows = by_doc.get(i)
            if not rows:
                if not skip_rows:
                    continue
                reason = reasons.get(i) or "no_recurring_spans"
                values: dict[str, Any] = {"_source": i, "skip_reason": reason, "doc_id": doc_ids[i]}
                values.update(seq_index=-1, dupe_index=-1, num_tokens=0, num_questions=0, masked_spans=[])
                for name in cols:
                    if name not in values:
                        values[name] = empty
                for name, value in values.items():
                    cols[name].append(value)
                continue
            for k, s in enumerate(rows):
                a, b = bounds[s], bounds[s + 1]
                qa, qb = q_bounds[s], q_bounds[s + 1]
                cols["_source"].append(i)
                cols["skip_reason"].append("")
                cols["doc_id"].append(doc_ids[i])
                cols["seq_index"].append(first_seq_index + k)  # dense over all passes, so seq_index == 0 counts used documents
                cols["dupe_index"].append(seq_dupe[s])
                cols["input_ids"].append(out_ids[a:b])
                cols["attention_mask"].append(attention[a:b])
                cols["token_type_ids"].append(types[a:b])
                cols["question_positions"].append(q_out[qa:qb])
                cols["start_positions"].append(start_out[qa:qb])
                cols["end_positions"].append(end_out[qa:qb])
                cols["masked_spans"].append(spans[qa:qb])
                cols["num_tokens"].append(b - a)
                cols["num_questions"].append(qb - qa)
                if position_ids is not None:
                    cols["position_ids"].append(position_ids[a:b])
        out: dict[str, np.ndarray] = {
            "_source": np.asarray(cols.pop("_source"), dtype=np.int64),
            "seq_index": np.asarray(cols.pop("seq_index"), dtype=_INT32),
            "dupe_index": np.asarray(cols.pop("dupe_index"), dtype=_INT32),
            "num_tokens": np.asarray(cols.pop("num_tokens"), dtype=_INT32),
            "num_questions": np.asarray(cols.pop("num_questions"), dtype=_INT32),
        }
        for name, values in cols.items():
            out[name] = _object_array(values)
        return out
