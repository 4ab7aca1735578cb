"""Exact span decoding: checked against brute force over every (window, start, end) triple."""

from __future__ import annotations

import math

import pytest
import torch

from splinter.decode import best_spans
from tests.numerics import assert_close


def brute_force(start, end, valid, question_index, num_questions, max_len):
    """Every valid span per question, sorted best first (ties: window, start, end ascending)."""
    cands: dict[int, list[tuple[float, int, int, int]]] = {q: [] for q in range(num_questions)}
    num_windows, seq_len = start.shape
    for w in range(num_windows):
        for s in range(seq_len):
            for e in range(s, min(s + max_len, seq_len)):
                if valid[w, s] and valid[w, e]:
                    score = float(start[w, s].float() + end[w, e].float())
                    cands[int(question_index[w])].append((score, w, s, e))
    return {q: sorted(c, key=lambda t: (-t[0], t[1], t[2], t[3])) for q, c in cands.items()}


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_with_many_windows_and_questions(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_windows = int(torch.randint(1, 8, (1,), generator=g))
    seq_len = int(torch.randint(1, 48, (1,), generator=g))
    max_len = int(torch.randint(1, 16, (1,), generator=g))
    num_questions = 4  # some questions get no window at all
    start = torch.randn(num_windows, seq_len, generator=g) * 3
    end = torch.randn(num_windows, seq_len, generator=g) * 3
    valid = torch.rand(num_windows, seq_len, generator=g) > 0.3
    # Unsorted question ids: windows of a question need not be adjacent.
    qidx = torch.randint(0, 3, (num_windows,), generator=g)
    spans = best_spans(start, end, valid, qidx, num_questions, max_len, n_best=7)
    expected = brute_force(start, end, valid, qidx, num_questions, max_len)
    for q in range(num_questions):
        cands = expected[q]
        if not cands:
            assert spans.window[q] == -1 and spans.start[q] == -1 and spans.end[q] == -1
            assert spans.score[q] == float("-inf") and spans.nbest_count[q] == 0
            assert (spans.nbest_window[q] == -1).all() and (spans.nbest_prob[q] == 0).all()
            continue
        best = cands[0]
        assert (int(spans.window[q]), int(spans.start[q]), int(spans.end[q])) == best[1:]
        assert float(spans.score[q]) == pytest.approx(best[0], rel=1e-6, abs=1e-5)
        k = min(7, len(cands))
        assert int(spans.nbest_count[q]) == k
        got = [
            (int(spans.nbest_window[q, i]), int(spans.nbest_start[q, i]), int(spans.nbest_end[q, i]))
            for i in range(k)
        ]
        assert got == [c[1:] for c in cands[:k]]
        scores = torch.tensor([c[0] for c in cands[:k]])
        assert_close(spans.nbest_score[q, :k], scores)
        assert_close(spans.nbest_prob[q, :k], torch.softmax(scores, 0), tol=1e-6)
        assert math.isclose(float(spans.nbest_prob[q].sum()), 1.0, abs_tol=1e-5)


def test_finds_what_top20_pairing_misses() -> None:
    # The best span pairs the 21st-best start with the 21st-best end; a top-20 x top-20 search
    # never looks at it and returns a worse span.
    seq_len = 64
    start = torch.full((1, seq_len), -100.0)
    end = torch.full((1, seq_len), -100.0)
    start[0, :20] = torch.linspace(5.0, 4.0, 20)  # strong starts with no usable end near them
    end[0, 40:60] = torch.linspace(5.0, 4.0, 20)  # strong ends far away from those starts
    start[0, 30], end[0, 31] = 3.0, 3.0  # the only good pair within max_answer_length
    valid = torch.ones(1, seq_len, dtype=torch.bool)
    spans = best_spans(start, end, valid, max_answer_length=5)
    assert (int(spans.start[0]), int(spans.end[0])) == (30, 31)
    assert float(spans.score[0]) == 6.0


def test_best_across_windows_and_span_rules() -> None:
    # Window 1 holds the better span; the end must not precede the start; spans respect the length cap.
    start = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    end = torch.tensor([[0.0, 9.0, 0.0, 0.0], [9.5, 0.0, 0.0, 1.5]])  # 9.5 sits before window 1's start
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    spans = best_spans(start, end, valid, torch.tensor([0, 0]), max_answer_length=2)
    assert (int(spans.window[0]), int(spans.start[0]), int(spans.end[0])) == (0, 1, 1)
    assert float(spans.score[0]) == 10.0
    # Invalid tokens are never chosen even with huge logits.
    valid2 = valid.clone()
    valid2[0, 1] = valid2[1, 0] = False
    spans = best_spans(start, end, valid2, torch.tensor([0, 0]), max_answer_length=4)
    assert (int(spans.window[0]), int(spans.start[0]), int(spans.end[0])) == (1, 2, 3)


def test_no_valid_span_and_empty_input() -> None:
    start = torch.randn(2, 5)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    spans = best_spans(start, start, valid, torch.tensor([0, 1]), n_best=3)
    assert spans.window.tolist() == [-1, -1] and spans.nbest_count.tolist() == [0, 0]
    empty = torch.zeros(0, 8)
    spans = best_spans(empty, empty, empty.bool(), torch.zeros(0, dtype=torch.long), 3, n_best=2)
    assert spans.window.tolist() == [-1, -1, -1] and spans.nbest_window.shape == (3, 2)
    # A batch of error rows only: no window and no token at all (the QA job's n-best path once divided by 0).
    none = torch.zeros(0, 0)
    spans = best_spans(none, none, none.bool(), torch.zeros(0, dtype=torch.long), 2, n_best=3)
    assert spans.window.tolist() == [-1, -1] and spans.nbest_count.tolist() == [0, 0]


def test_low_precision_logits_and_bad_arguments() -> None:
    g = torch.Generator().manual_seed(1)
    start, end = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    valid = torch.ones(3, 20, dtype=torch.bool)
    ref = best_spans(start.bfloat16().float(), end.bfloat16().float(), valid, max_answer_length=4)
    got = best_spans(start.bfloat16(), end.bfloat16(), valid, max_answer_length=4)
    assert (
        got.score.dtype == torch.float32
        and torch.equal(got.start, ref.start)
        and torch.equal(got.end, ref.end)
    )
    with pytest.raises(ValueError, match="must all be"):
        best_spans(start, end[:, :5], valid)
    with pytest.raises(ValueError, match="max_answer_length"):
        best_spans(start, end, valid, max_answer_length=0)
    with pytest.raises(ValueError, match="question_index values"):
        best_spans(start, end, valid, torch.tensor([0, 1, 5]), num_questions=2)


def test_unchecked_decode_without_host_syncs_gives_the_same_spans() -> None:
    """The model actor passes check=False and the host-known window count: nothing may change."""
    g = torch.Generator().manual_seed(7)
    start, end = torch.randn(9, 40, generator=g), torch.randn(9, 40, generator=g)
    valid = torch.rand(9, 40, generator=g) > 0.2
    qidx = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3])
    checked = best_spans(start, end, valid, qidx, 5, 10, n_best=4)
    fast = best_spans(start, end, valid, qidx, 5, 10, n_best=4, check=False, max_windows_per_question=3)
    for name in ("window", "start", "end", "score", "nbest_window", "nbest_start", "nbest_end", "nbest_score"):
        assert torch.equal(getattr(fast, name), getattr(checked, name)), name
    with pytest.raises(ValueError, match="question_index values"):
        best_spans(start, end, valid, qidx, 3, 10)  # the checked path still refuses a bad index
