"""Small real stages used to exercise the runner (importable by Ray workers)."""

from __future__ import annotations

import os

import numpy as np

from pipeline.engine.resources import Resources


class WordRows:
    """Documents -> one row per word (a row-count-changing stage); empty docs -> a skip row."""

    resources = Resources(num_cpus=1, batch_size=3)

    def __init__(self, fail_on: str | None = None, fail_flag: str | None = None) -> None:
        self.fail_on, self.fail_flag = fail_on, fail_flag

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        src, words, reasons, ids = [], [], [], []
        for i, (doc_id, text) in enumerate(zip(batch["doc_id"], batch["text"], strict=True)):
            if self.fail_on and text and self.fail_on in text and (
                    self.fail_flag is None or os.path.exists(self.fail_flag)):
                raise RuntimeError(f"injected failure on {doc_id}")
            toks = text.split() if isinstance(text, str) else []
            if not toks:
                src.append(i), words.append(""), reasons.append("empty"), ids.append(doc_id)
            for w in toks:
                src.append(i), words.append(w), reasons.append(""), ids.append(doc_id)
        return {"_source": np.asarray(src), "doc_id": np.asarray(ids, dtype=object),
                "word": np.asarray(words, dtype=object), "skip_reason": np.asarray(reasons, dtype=object)}


class Upper:
    """A 1:1 stage."""

    resources = Resources(num_cpus=1, batch_size=4, actors=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, "upper": np.asarray([w.upper() for w in batch["word"]], dtype=object)}


class SlowUpper:
    """A 1:1 actor stage that takes `seconds` per batch: a stand-in for a model."""

    resources = Resources(num_cpus=0.5, batch_size=1, actors=1)

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        time.sleep(self.seconds)
        return {**batch, "upper": np.asarray([str(w).upper() for w in batch["text"]], dtype=object)}


class StallWhile:
    """A 1:1 task stage that hangs while `flag` exists (at most `cap` seconds): a stand-in for a stage
    whose input was lost with a node and is never rebuilt."""

    resources = Resources(num_cpus=1, batch_size=4)

    def __init__(self, flag: str, cap: float = 60.0) -> None:
        self.flag, self.cap = flag, cap

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        deadline = time.monotonic() + self.cap
        while os.path.exists(self.flag) and time.monotonic() < deadline:
            time.sleep(0.1)
        return dict(batch)


class StampedSlices:
    """A 1:1 task stage that takes `seconds` per slice and notes when each slice was done (a stand-in for
    tokenizing in front of a model)."""

    resources = Resources(num_cpus=0.25, batch_size=4)

    def __init__(self, stamps: str, seconds: float = 0.3) -> None:
        self.stamps, self.seconds = stamps, seconds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        time.sleep(self.seconds)
        with open(os.path.join(self.stamps, "slices"), "a") as f:
            f.write(f"{time.time()}\n")
        # ~100 KB a row, as tokenized windows are big: Ray Data passes blocks on by size.
        pad = np.asarray(["x" * 100_000] * len(batch["text"]), dtype=object)
        return {**batch, "word": np.asarray([str(t) for t in batch["text"]], dtype=object), "pad": pad}


class StampedModel:
    """A 1:1 actor stage that notes when each of its calls began (a stand-in for a model)."""

    resources = Resources(num_cpus=0.5, batch_size=4, actors=1)

    def __init__(self, stamps: str) -> None:
        self.stamps = stamps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        with open(os.path.join(self.stamps, "calls"), "a") as f:
            f.write(f"{time.time()}\n")
        return {**batch, "upper": np.asarray([w.upper() for w in batch["word"]], dtype=object)}
