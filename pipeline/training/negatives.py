"""Unanswerable training pairs without SQuAD 2.0: a question with a paragraph of another article.

SQuAD 2.0 training labels a window without the answer at [CLS]; pairing a SQuAD 1.1 question with a
paragraph from a different article is the standard way to make such pairs from answerable data (the other
paragraph almost never holds the answer). With `finetune --negatives R` every training question gets R
of them, so the model learns to put its [CLS] score above every span where there is nothing to find, and
`extract --null-margin` has a meaningful null score to compare against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from splinter.qa_data import QAExample

__all__ = ["add_negatives"]


def add_negatives(dataset: Any, examples: list[QAExample], per_question: int, seed: int) -> list[QAExample]:
    """`examples` followed by `per_question` unanswerable pairs per example, drawn with `seed` from the
    dataset's paragraphs of other articles (`title` column; without one, every distinct context counts as
    its own article). Each negative is a QAExample with answer_start -1: labelled [CLS] in every window."""
    if per_question <= 0 or not examples:
        return list(examples)
    contexts = dataset["context"]
    titles = dataset["title"] if "title" in dataset.column_names else [None] * len(contexts)
    pool: dict[str, str] = {}  # context -> its article
    for context, title in zip(contexts, titles, strict=True):
        if isinstance(context, str) and context.strip() and context not in pool:
            pool[context] = title if title else context
    paragraphs = list(pool)
    articles = np.array([pool[p] for p in paragraphs], dtype=object)
    rng = np.random.default_rng(seed)
    negatives: list[QAExample] = []
    for example in examples:
        own = pool.get(example.context, example.context)
        others = np.flatnonzero(articles != own)
        if others.size == 0:
            continue  # a one-article dataset has nothing to pair with
        picks = rng.choice(others, size=min(per_question, others.size), replace=False)
        for j, p in enumerate(picks.tolist()):
            negatives.append(QAExample(f"{example.id}#negative{j}", example.question, paragraphs[p], "", -1))
    return [*examples, *negatives]
