"""Exact answer-span decoding: start/end logits over windows -> the best (window, start, end).

SQuAD-style post-processing (run_qa's `postprocess_qa_predictions`) keeps only the top-20 start
and top-20 end tokens of each window and pairs them, which can miss the true best span when a
strong start is paired with a weak end. Here the search is exact: for every valid start `s` we
score every end `e` in `[s, s + L)` at once as a banded `(W, S, L)` tensor, so the maximum of
`start[s] + end[e]` over all windows of a question is found with a few vectorised reductions,
on whatever device the logits live on (the GPU inside the model actor).

Windows of many questions are decoded together: `question_index[w]` says which question window
`w` belongs to, and the best span of a question is the best over its windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Spans", "best_spans", "NO_VALID_SPAN"]

NO_VALID_SPAN = "no_valid_span"

# Windows decoded per chunk: bounds the (chunk, S, L) band to ~50 MB at S=384, L=30, fp32.
_WINDOW_CHUNK = 1024


@dataclass
class Spans:
    """Decoded spans for `Q` questions (all tensors on the logits' device).

    `window[q] == -1` means question `q` has no valid span (then start/end are -1, score -inf).
    `window` indexes the `W` input windows (not a window number within the question).
    The n-best fields are `(Q, k)`, best first, padded with -1 / -inf / 0.0 past `nbest_count[q]`.
    """

    window: torch.Tensor  # (Q,) int64
    start: torch.Tensor  # (Q,) int64, token index within the window
    end: torch.Tensor  # (Q,) int64, inclusive
    score: torch.Tensor  # (Q,) float32, start_logit + end_logit
    nbest_window: torch.Tensor | None = None  # (Q, k) int64
    nbest_start: torch.Tensor | None = None  # (Q, k) int64
    nbest_end: torch.Tensor | None = None  # (Q, k) int64
    nbest_score: torch.Tensor | None = None  # (Q, k) float32
    nbest_prob: torch.Tensor | None = None  # (Q, k) float32, softmax over the question's n-best
    nbest_count: torch.Tensor | None = None  # (Q,) int64


def _band(start: torch.Tensor, end: torch.Tensor, valid: torch.Tensor, max_len: int) -> torch.Tensor:
    """Scores of every span of length 1..max_len: `band[w, s, l] = start[w, s] + end[w, s + l]`.

    Invalid starts, invalid ends and ends past the window are -inf. # (W, S, L)
    """
    neg_inf = torch.tensor(float("-inf"), device=start.device, dtype=torch.float32)
    start = torch.where(valid, start.float(), neg_inf)  # (W, S)
    end = torch.where(valid, end.float(), neg_inf)  # (W, S)
    # Pad the end logits on the right so that every start sees a full band of L candidate ends.
    pad = neg_inf.expand(end.shape[0], max_len - 1)
    end_padded = torch.cat([end, pad], dim=1)  # (W, S + L - 1)
    end_band = end_padded.unfold(1, max_len, 1)  # (W, S, L): end_band[w, s, l] = end[w, s + l]
    return start.unsqueeze(-1) + end_band  # (W, S, L)


def best_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    valid: torch.Tensor,
    question_index: torch.Tensor | None = None,
    num_questions: int | None = None,
    max_answer_length: int = 30,
    n_best: int = 0,
    check: bool = True,
    max_windows_per_question: int | None = None,
) -> Spans:
    """The exact best span per question, and optionally its exact n-best list.

    Args:
        start_logits, end_logits: `(W, S)` logits of W windows (any float dtype; scored in fp32).
        valid: `(W, S)` bool, True where a token may start or end an answer (context tokens).
        question_index: `(W,)` int, the question each window belongs to (0..Q-1). Defaults to
            one question per window.
        num_questions: Q. Defaults to `question_index.max() + 1` (questions with no windows get
            no answer).
        max_answer_length: the longest span in tokens (`e - s + 1 <= max_answer_length`).
        n_best: if > 0, also return the top `n_best` distinct (window, start, end) spans per
            question by score, best first, with softmax probabilities over that list (run_qa's
            n-best semantics, but exact).
        check: validate `question_index` against `num_questions` (two device->host syncs). Callers
            that build the index themselves pass False, keeping the whole decode free of host syncs
            once `num_questions` and `max_windows_per_question` are given too.
        max_windows_per_question: the most windows any question has (known on the host to callers
            that built the windows); computed on the device (one sync) when None and n_best > 0.

    Ties are broken towards the lowest window index, then the lowest start, then the shortest span.
    """
    if start_logits.shape != end_logits.shape or start_logits.shape != valid.shape or start_logits.dim() != 2:
        raise ValueError(
            f"start_logits, end_logits and valid must all be (W, S); got {tuple(start_logits.shape)}, "
            f"{tuple(end_logits.shape)}, {tuple(valid.shape)}"
        )
    if max_answer_length < 1:
        raise ValueError(f"max_answer_length must be >= 1, got {max_answer_length}")
    if n_best < 0:
        raise ValueError(f"n_best must be >= 0, got {n_best}")
    device = start_logits.device
    num_windows, seq_len = start_logits.shape
    if question_index is None:
        question_index = torch.arange(num_windows, device=device)
    question_index = question_index.to(device=device, dtype=torch.long)
    if question_index.shape != (num_windows,):
        raise ValueError(f"question_index must be (W,) = ({num_windows},), got {tuple(question_index.shape)}")
    if num_questions is None:
        num_questions = int(question_index.max().item()) + 1 if num_windows else 0
    if check and num_windows and (int(question_index.min()) < 0 or int(question_index.max()) >= num_questions):
        raise ValueError(f"question_index values must lie in [0, {num_questions})")
    valid = valid.to(device=device, dtype=torch.bool)
    max_len = min(max_answer_length, max(seq_len, 1))

    # Best span of each window, in chunks so the (W, S, L) band stays small.
    win_score = torch.full((num_windows,), float("-inf"), device=device)
    win_flat = torch.zeros(num_windows, dtype=torch.long, device=device)
    k_win = min(n_best, seq_len * max_len)
    if n_best:
        cand_score = torch.full((num_windows, k_win), float("-inf"), device=device)
        cand_flat = torch.zeros((num_windows, k_win), dtype=torch.long, device=device)
    for lo in range(0, num_windows, _WINDOW_CHUNK):
        hi = min(lo + _WINDOW_CHUNK, num_windows)
        band = _band(start_logits[lo:hi], end_logits[lo:hi], valid[lo:hi], max_len)
        flat = band.reshape(hi - lo, seq_len * max_len)  # (w, S*L), index = s * L + l
        # torch.max returns the first maximal index: lowest start, then shortest span.
        win_score[lo:hi], win_flat[lo:hi] = flat.max(dim=1)
        if n_best:
            # The global n-best of a question lies within the union of its windows' n-bests.
            # sorted topk is not guaranteed stable on ties; order ties by index explicitly below.
            cand_score[lo:hi], cand_flat[lo:hi] = flat.topk(k_win, dim=1)

    # Reduce windows -> questions: the max score, then the lowest window reaching it.
    q_score = torch.full((num_questions,), float("-inf"), device=device)
    q_score.scatter_reduce_(0, question_index, win_score, reduce="amax", include_self=True)
    win_ids = torch.arange(num_windows, device=device)
    is_best = (win_score == q_score[question_index]) & torch.isfinite(win_score)
    sentinel = torch.full((num_windows,), num_windows, dtype=torch.long, device=device)
    q_window = torch.full((num_questions,), num_windows, dtype=torch.long, device=device)
    q_window.scatter_reduce_(0, question_index, torch.where(is_best, win_ids, sentinel), reduce="amin")
    found = q_window < num_windows
    safe_window = torch.where(found, q_window, torch.zeros_like(q_window))
    flat_idx = win_flat[safe_window] if num_windows else torch.zeros_like(q_window)
    minus_one = torch.full_like(q_window, -1)
    q_start = torch.where(found, flat_idx // max_len, minus_one)
    q_end = torch.where(found, flat_idx // max_len + flat_idx % max_len, minus_one)
    spans = Spans(
        window=torch.where(found, q_window, minus_one),
        start=q_start,
        end=q_end,
        score=torch.where(found, q_score, torch.full_like(q_score, float("-inf"))),
    )
    if n_best:
        _fill_nbest(
            spans, cand_score, cand_flat, question_index, num_questions, seq_len * max_len, max_len, n_best,
            max_windows_per_question,
        )
    return spans


def _fill_nbest(
    spans: Spans,
    cand_score: torch.Tensor,
    cand_flat: torch.Tensor,
    question_index: torch.Tensor,
    num_questions: int,
    stride: int,
    max_len: int,
    n_best: int,
    max_windows: int | None = None,
) -> None:
    """Merge each question's per-window candidates into its global n-best list."""
    device = cand_score.device
    num_windows, k_win = cand_score.shape
    stride = max(stride, 1)  # windows of no tokens (a batch of error rows) have no candidates to encode
    # Rank of each window within its question, to lay candidates out as (Q, max_windows * k_win).
    order = torch.sort(question_index, stable=True).indices
    sorted_q = question_index[order]
    counts = torch.bincount(question_index, minlength=num_questions)
    first = torch.cumsum(counts, 0) - counts  # index of each question's first window in `order`
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_windows, device=device) - first[sorted_q]
    if max_windows is None:
        max_windows = int(counts.max().item()) if num_windows else 0
    width = max(max_windows * k_win, 1)
    grid_score = torch.full((num_questions, width), float("-inf"), device=device)
    # Candidate identity as one integer (window, s*L + l): sorting by it breaks score ties
    # towards the lowest window, start and length, matching the 1-best.
    grid_key = torch.full((num_questions, width), -1, dtype=torch.long, device=device)
    if num_windows:
        col = rank.unsqueeze(1) * k_win + torch.arange(k_win, device=device)  # (W, k_win)
        row = question_index.unsqueeze(1).expand(-1, k_win)  # (W, k_win)
        win_ids = torch.arange(num_windows, device=device).unsqueeze(1)
        grid_score[row, col] = cand_score
        grid_key[row, col] = win_ids * stride + cand_flat  # stride = S * L > any flat index
    # Sort by key first, then stably by score descending: equal scores keep key order.
    key_order = torch.sort(grid_key, dim=1, stable=True).indices
    grid_score = grid_score.gather(1, key_order)
    grid_key = grid_key.gather(1, key_order)
    score_order = torch.sort(grid_score, dim=1, descending=True, stable=True).indices[:, :n_best]
    top_score = grid_score.gather(1, score_order)  # (Q, k)
    top_key = grid_key.gather(1, score_order)  # (Q, k)
    if top_score.shape[1] < n_best:  # fewer candidates than asked: pad to a fixed width
        extra = n_best - top_score.shape[1]
        top_score = torch.cat(
            [top_score, torch.full((num_questions, extra), float("-inf"), device=device)], 1
        )
        top_key = torch.cat(
            [top_key, torch.full((num_questions, extra), -1, dtype=torch.long, device=device)], 1
        )
    ok = torch.isfinite(top_score)
    window = torch.where(ok, top_key // stride, -1)
    flat = top_key % stride
    start = torch.where(ok, flat // max_len, -1)
    end = torch.where(ok, flat // max_len + flat % max_len, -1)
    # Softmax over the valid entries only, as run_qa does over its kept predictions.
    prob = torch.softmax(top_score, dim=1)
    prob = torch.where(ok, prob, torch.zeros_like(prob)).nan_to_num(0.0)
    spans.nbest_window, spans.nbest_start, spans.nbest_end = window, start, end
    spans.nbest_score, spans.nbest_prob = top_score, prob
    spans.nbest_count = ok.sum(dim=1)
