"""SQuAD v1.1: loading the official JSON and the official exact-match / F1 metric.

The normalisation follows the official v1.1 evaluation script exactly (lowercase, drop ASCII
punctuation, drop the articles a/an/the as whole words, collapse whitespace) so our numbers are
comparable with published ones.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["normalize_answer", "exact_match", "f1_score", "evaluate", "load_squad"]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Official v1.1 normalisation. Order matters: punctuation goes before articles, so "the," loses both."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-bag F1 between normalised answers (0.0 when they share no token)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _max_over_golds(metric: Any, prediction: str, golds: Iterable[str]) -> float:
    return max((metric(prediction, gold) for gold in golds), default=0.0)


def evaluate(
    predictions: Mapping[str, str | None], gold: Mapping[str, Iterable[str]]
) -> dict[str, float | int]:
    """EM and F1 (both x100) over the gold questions.

    A question with no prediction (absent or None) scores 0 and is counted in `missing`, as the
    official script does; predictions for ids not in `gold` are ignored.
    """
    em_total = f1_total = 0.0
    missing = 0
    for qid, answers in gold.items():
        answers = list(answers)
        prediction = predictions.get(qid)
        if prediction is None:
            missing += 1
            continue
        em_total += _max_over_golds(exact_match, prediction, answers)
        f1_total += _max_over_golds(f1_score, prediction, answers)
    count = len(gold)
    scale = 100.0 / count if count else 0.0
    return {"exact_match": em_total * scale, "f1": f1_total * scale, "count": count, "missing": missing}


def load_squad(path: str | Path) -> list[dict[str, Any]]:
    """Flatten a SQuAD JSON file into rows `{id, question, context, answers, answer_starts, title}`.

    `answers` is the list of gold answer texts (duplicates kept, as in the file); `answer_starts`
    their character offsets into `context`.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"SQuAD file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); expected the official SQuAD format") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path} has no top-level 'data' list; expected the official SQuAD format")
    rows: list[dict[str, Any]] = []
    for article in data["data"]:
        title = article.get("title", "")
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                answers = qa.get("answers", [])
                rows.append(
                    {
                        "id": qa["id"],
                        "question": qa["question"],
                        "context": context,
                        "answers": [a["text"] for a in answers],
                        "answer_starts": [int(a["answer_start"]) for a in answers],
                        "title": title,
                    }
                )
    return rows
