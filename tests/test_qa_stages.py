"""QA stages chained in a plain loop on real SQuAD rows (with bad rows mixed in).

The reference is deliberately naive: each window is tokenized with the transformers-style
`__call__`, run through the model ALONE (no padding, no sorting), and every (start, end) pair is
scored by brute force. The stages batch, sort, pad, decode on-device and map offsets; they must
give the same spans and scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.stages.qa import QAPostprocess, QATokenize
from pipeline.stages.qa_model import QAModel
from splinter.checkpoint import load_pretrained, save_pretrained
from splinter.config import SplinterConfig
from splinter.model import SplinterForQuestionAnswering
from splinter.squad import load_squad
from splinter.tokenizer import SplinterTokenizer
from tests.conftest import DATA

# Small windows so that many questions span several windows (the interesting case) and tests stay fast.
MAX_LENGTH, STRIDE, MAX_QUERY, MAX_ANSWER = 96, 32, 40, 12


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """QAModel sets torch's (process-wide) thread count, as an actor should; undo it for later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Splinter over the real cased vocabulary, saved in transformers' format."""
    tokenizer = SplinterTokenizer.default()
    torch.manual_seed(0)
    config = SplinterConfig.tiny(vocab_size=tokenizer.vocab_size, hidden_size=48, num_attention_heads=4)
    model = SplinterForQuestionAnswering(config).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("qa_ckpt"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    squad = load_squad(DATA / "squad_sample.json")
    # Short and long paragraphs alike: the sample ends with the five longest training paragraphs.
    picked = squad[:24] + squad[-6:]
    bad = [
        {"id": "bad-ctx-none", "question": "Who?", "context": None},
        {"id": "bad-q-int", "question": 5, "context": "Some text."},
        {"id": "bad-ctx-empty", "question": "Who?", "context": "   "},
        {"id": "bad-q-none", "question": None, "context": "Some text."},
        {"id": "bad-q-empty", "question": "", "context": "Some text."},
        {"id": "bad-ctx-long", "question": "Who?", "context": "word " * 30_000},
        {"id": "bad-ctx-bytes", "question": "Who?", "context": b"bytes"},
        {"id": "ctx-unk-only", "question": "What?", "context": "\u0001\u0002"},  # tokenizes to nothing
    ]
    out = []
    for i, row in enumerate(picked):  # interleave so bad rows sit between good ones
        out.append(row)
        if i % 5 == 2 and bad:
            out.append(bad.pop(0))
    return out + bad


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: _objects([r[k] for r in rows]) for k in ("id", "question", "context")}


def _chain(
    checkpoint: Path, batch: dict[str, np.ndarray], n_best: int = 0, **model_kwargs
) -> dict[str, np.ndarray]:
    tokenize = QATokenize(str(checkpoint), max_length=MAX_LENGTH, stride=STRIDE, max_query_length=MAX_QUERY)
    model = QAModel(
        str(checkpoint),
        max_answer_length=MAX_ANSWER,
        n_best=n_best,
        num_threads=1,
        **model_kwargs,
    )
    return QAPostprocess(n_best=n_best)(model(tokenize(batch)))


def _naive_answer(model, tokenizer, question: str, context: str) -> tuple[float, int, int, float] | None:
    """Best (score, start_char, end_char) by running each window alone and trying every pair."""
    enc = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=MAX_LENGTH,
        stride=STRIDE,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    best = None
    null = float("inf")  # run_qa's null score: [CLS] start + end, the lowest over the windows
    for w in range(len(enc["input_ids"])):
        ids = torch.tensor([enc["input_ids"][w]])
        types = torch.tensor([enc["token_type_ids"][w]])
        with torch.inference_mode():
            out = model(ids, token_type_ids=types)  # threads: 1, set by QAModel and restored after
        null = min(null, float(out.start_logits[0, 0] + out.end_logits[0, 0]))
        ctx = np.array([s == 1 for s in enc.sequence_ids(w)])
        pairs = out.start_logits[0].numpy()[:, None] + out.end_logits[0].numpy()[None, :]  # (S, S) all pairs
        s_idx, e_idx = np.indices(pairs.shape)
        allowed = ctx[:, None] & ctx[None, :] & (s_idx <= e_idx) & (e_idx < s_idx + MAX_ANSWER)
        if not allowed.any():
            continue
        s, e = np.unravel_index(np.argmax(np.where(allowed, pairs, -np.inf)), pairs.shape)
        if best is None or pairs[s, e] > best[0]:
            best = (float(pairs[s, e]), enc["offset_mapping"][w][s][0], enc["offset_mapping"][w][e][1])
    return (*best, null) if best else None


def test_chain_keeps_rows_and_matches_naive_reference(checkpoint: Path, rows: list[dict]) -> None:
    out = _chain(checkpoint, _batch(rows))
    assert set(out) == {"id", "question", "answer", "start_char", "end_char", "score", "null_score", "has_answer",
                        "error"}
    assert [str(i) for i in out["id"]] == [str(r["id"]) for r in rows]  # rows out = rows in, same order
    assert out["start_char"].dtype == np.int32 and out["score"].dtype == np.float32
    errors = dict(zip(out["id"], out["error"], strict=True))
    assert errors["bad-ctx-none"] == "missing_context"
    assert errors["bad-q-int"] == "question_not_string"
    assert errors["bad-ctx-empty"] == "empty_context"
    assert errors["bad-q-none"] == "missing_question"
    assert errors["bad-q-empty"] == "empty_question"
    assert errors["bad-ctx-long"] == "context_too_long"
    assert errors["bad-ctx-bytes"] == "context_not_string"
    assert errors["ctx-unk-only"] == "no_valid_span"
    # Non-string inputs come out as None, so the column stays an Arrow string column.
    assert out["question"][[r["id"] for r in rows].index("bad-q-int")] is None

    model = load_pretrained(SplinterForQuestionAnswering, checkpoint).eval()
    tokenizer = SplinterTokenizer.from_pretrained(checkpoint)
    checked = 0
    for i, row in enumerate(rows):
        if out["error"][i] is not None:
            assert out["answer"][i] is None and out["start_char"][i] == -1 and np.isnan(out["score"][i])
            continue
        assert out["answer"][i] == row["context"][out["start_char"][i] : out["end_char"][i]]
        assert out["answer"][i].strip()
        score, start_char, end_char, null = _naive_answer(model, tokenizer, row["question"], row["context"])
        assert (int(out["start_char"][i]), int(out["end_char"][i])) == (start_char, end_char), row["id"]
        assert float(out["score"][i]) == pytest.approx(score, rel=1e-5, abs=1e-4)
        assert float(out["null_score"][i]) == pytest.approx(null, rel=1e-5, abs=1e-4)
        assert out["has_answer"][i]
        checked += 1
    assert checked == 30


def test_micro_batching_and_batch_splits_do_not_change_answers(checkpoint: Path, rows: list[dict]) -> None:
    whole = _chain(checkpoint, _batch(rows), micro_batch_tokens=4096)
    one_by_one = _chain(checkpoint, _batch(rows), micro_batch_size=1)
    halves = [_chain(checkpoint, _batch(part)) for part in (rows[:17], rows[17:])]
    for other in (one_by_one, {k: np.concatenate([h[k] for h in halves]) for k in whole}):
        for name in ("id", "answer", "start_char", "end_char", "error"):
            assert list(other[name]) == list(whole[name]), name
        np.testing.assert_allclose(other["score"], whole["score"], rtol=1e-5, atol=1e-4, equal_nan=True)


def test_model_stage_columns_and_nbest(checkpoint: Path, rows: list[dict]) -> None:
    tokenize = QATokenize(str(checkpoint), max_length=MAX_LENGTH, stride=STRIDE, max_query_length=MAX_QUERY)
    tokens = tokenize(_batch(rows))
    assert tokens["num_windows"].dtype == np.int32 and max(tokens["num_windows"]) > 3
    for i in range(len(rows)):
        n_tok = int(tokens["window_lengths"][i].sum())
        assert tokens["input_ids"][i].dtype == np.int32 and tokens["input_ids"][i].shape == (n_tok,)
        assert tokens["token_type_ids"][i].shape == (n_tok,) and tokens["offsets"][i].shape == (2 * n_tok,)
        assert (tokens["num_windows"][i] == 0) == bool(tokens["error"][i])
        assert all(length <= MAX_LENGTH for length in tokens["window_lengths"][i])

    k = 5
    scored = QAModel(str(checkpoint), max_answer_length=MAX_ANSWER, n_best=k, num_threads=1)(tokens)
    # The heavy per-token columns stop at the model stage.
    assert not {"input_ids", "token_type_ids", "offsets", "window_lengths"} & set(scored)
    for name in ("best_window", "start_token", "end_token", "start_char", "end_char"):
        assert scored[name].dtype == np.int32
    out = QAPostprocess(n_best=k)(scored)
    plain = _chain(checkpoint, _batch(rows))
    for i, row in enumerate(rows):
        assert out["answer"][i] == plain["answer"][i]
        if out["error"][i] is not None:
            assert len(out["nbest_answers"][i]) == 0
            continue
        assert 0 <= scored["best_window"][i] < tokens["num_windows"][i]
        answers, scores, probs = (
            out["nbest_answers"][i],
            out["nbest_scores"][i],
            out["nbest_probabilities"][i],
        )
        assert isinstance(answers, list) and len(answers) == k
        assert answers[0] == out["answer"][i] and scores[0] == out["score"][i]
        assert np.all(np.diff(scores) <= 0) and probs.sum() == pytest.approx(1.0, abs=1e-5)
        for text, s, e in zip(answers, out["nbest_start_char"][i], out["nbest_end_char"][i], strict=True):
            assert text == row["context"][s:e]


def test_columns_survive_ray_arrow_conversion(checkpoint: Path, rows: list[dict]) -> None:
    """Each stage's output converts to Arrow the way Ray Data does it, with no pickled columns."""
    from ray.data.block import BlockAccessor

    def through_arrow(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = BlockAccessor.batch_to_block(batch)
        pickled = [f.name for f in table.schema if "pickled" in str(f.type)]
        assert not pickled, f"columns Ray would pickle: {pickled}"
        return BlockAccessor.for_block(table).to_batch_format("numpy")

    n_best = 3
    tokenize = QATokenize(str(checkpoint), max_length=MAX_LENGTH, stride=STRIDE, max_query_length=MAX_QUERY)
    model = QAModel(str(checkpoint), max_answer_length=MAX_ANSWER, n_best=n_best, num_threads=1)
    post = QAPostprocess(n_best=n_best)
    batch = _batch(
        [r for r in rows if not isinstance(r["question"], int) and not isinstance(r["context"], bytes)]
    )
    via_arrow = through_arrow(post(through_arrow(model(through_arrow(tokenize(batch))))))
    direct = post(model(tokenize(batch)))
    for name in direct:
        got, want = list(via_arrow[name]), list(direct[name])
        if name.startswith("nbest_"):
            assert [list(g) for g in got] == [list(w) for w in want], name
        elif name in ("score", "null_score"):  # NaN where there is no span: compared as arrays
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        else:
            assert got == want, name


def test_empty_batch_and_bad_arguments(checkpoint: Path) -> None:
    out = _chain(checkpoint, _batch([]))
    assert all(len(v) == 0 for v in out.values()) and "answer" in out
    with pytest.raises(ValueError, match="stride"):
        QATokenize(str(checkpoint), max_length=64, stride=32, max_query_length=40)
    with pytest.raises(ValueError, match="'context' column"):
        QATokenize(str(checkpoint))({"id": _objects(["a"]), "question": _objects(["q"])})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            QAModel(str(checkpoint), device="cuda")
    with pytest.raises(ValueError, match="dtype"):
        QAModel(str(checkpoint), dtype="int8")
    with pytest.raises(ValueError, match="n_best"):
        QAPostprocess(n_best=-1)


def test_tokenizer_that_does_not_fit_the_model_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    small = save_pretrained(SplinterForQuestionAnswering(SplinterConfig.tiny()), tmp_path / "small")  # vocab 112
    tokens = QATokenize(str(checkpoint))(
        _batch([{"id": "a", "question": "Who?", "context": "Zebras run fast."}])
    )
    with pytest.raises(ValueError, match="vocabulary"):
        QAModel(str(small), num_threads=1)(tokens)
