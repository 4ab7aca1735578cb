"""QAModel: the model stage between QATokenize and QAPostprocess (column layout: pipeline.stages.qa).

It lives apart from the text stages because it alone needs torch: the tokenizing and writing workers
unpickle their stage's module and would otherwise import torch for nothing (~1 CPU-second each, at a
job's start, on the cores the model actor needs to start).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.engine.resources import Resources
from pipeline.stages.qa import _INPUT_COLUMNS, _column, _flat, _object_array
from pipeline.storage.model_files import ShippedModel
from splinter.decode import NO_VALID_SPAN, best_spans
from splinter.precision import quantize_int8, to_mixed_precision

__all__ = ["QAModel"]

_PAD_MULTIPLE = 8  # tensor cores and oneDNN kernels like sequence lengths that are multiples of 8


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested but CUDA is not available here (no GPU given to this process, "
            "or a CPU build of torch); use device='auto' or 'cpu'"
        )
    return resolved


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 keeps fp32's range (no overflow in attention) at half the memory traffic; CPUs without
        # native bf16 matmuls are slower in it, so CPU stays fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


class QAModel:
    """Actor stage: run Splinter over every window of the batch and decode each question's exact best span.

    Windows from all questions of the batch are sorted by length and cut into micro-batches padded only
    to their own longest window (rounded up to a multiple of 8), so short questions never pay for long
    ones; logits are put back in window order and decoded on the model's device in one pass.

    Precision: fp32 on CPU, or `quantize="int8"` (dynamic int8 encoder Linears, CPU only); on a GPU the
    encoder runs in bf16 (weights bf16, autocast) with LayerNorms, the QASS head and the logits in fp32.
    """

    resources = Resources(num_cpus=1, num_gpus=0, batch_size=256, actors=1)

    def __init__(
        self,
        model: str | ShippedModel,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str | None = None,
        micro_batch_tokens: int | None = None,
        micro_batch_size: int | None = None,
        max_answer_length: int = 30,
        n_best: int = 0,
        num_threads: int | None = None,
    ) -> None:
        from splinter.checkpoint import load_pretrained
        from splinter.model import SplinterForQuestionAnswering

        if max_answer_length < 1:
            raise ValueError(f"max_answer_length must be >= 1, got {max_answer_length}")
        if n_best < 0:
            raise ValueError(f"n_best must be >= 0, got {n_best}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        if quantize not in (None, "none", "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.quantize = quantize if quantize != "none" else None
        if self.quantize and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError("quantize='int8' is for CPU fp32 inference: use device='cpu' (GPUs run bf16)")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        # An actor owns the CPUs Ray reserved for it (the job passes their count); without a count, torch
        # would spread over every core of the node and oversubscribe it with the other actors and tasks.
        torch.set_num_threads(num_threads or max(1, math.ceil(type(self).resources.num_cpus)))
        if isinstance(model, ShippedModel):
            net = model.build()
        else:
            net = load_pretrained(SplinterForQuestionAnswering, model)
        if self.quantize == "int8":
            net = quantize_int8(net)
        elif self.dtype != torch.float32:
            net = to_mixed_precision(net, self.dtype)
        self.model = net.to(self.device).eval()
        # Inputs are checked once per batch on the host, from numpy (see __call__), instead of once per
        # micro-batch on the device, which would cost a device->host sync each time.
        self.model.splinter.check_inputs = False
        self.config = self.model.config
        if micro_batch_tokens is None and micro_batch_size is None:
            # GPUs want big batches; on CPU, measured on MiniLM: ~2k-token micro-batches run ~30% faster than
            # 8k ones (activations stay in cache), and 1-window batches lose the GEMM efficiency.
            micro_batch_tokens = 32768 if self.device.type == "cuda" else 2048
        self.micro_batch_tokens = micro_batch_tokens
        self.micro_batch_size = micro_batch_size
        self.max_answer_length = max_answer_length
        self.n_best = n_best

    def describe(self) -> str:
        """Where and how this actor runs the model, e.g. "cuda:0 bfloat16" or "cpu int8, 2 threads"."""
        precision = "int8" if self.quantize else str(self.dtype).removeprefix("torch.")
        if self.device.type == "cpu":
            return f"cpu {precision}, {torch.get_num_threads()} threads"
        return f"{self.device} {precision}"

    def _micro_batches(self, lengths: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """(window indices, padded length) per micro-batch, longest windows first."""
        order = np.argsort(-lengths, kind="stable")
        batches = []
        i = 0
        while i < order.size:
            pad_len = int(-(-lengths[order[i]] // _PAD_MULTIPLE) * _PAD_MULTIPLE)  # longest in this batch
            if self.micro_batch_size is not None:
                count = self.micro_batch_size
            else:
                count = max(1, self.micro_batch_tokens // pad_len)
            batches.append((order[i : i + count], pad_len))
            i += count
        return batches

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the model's device. On CUDA it goes through pinned memory so the copy is truly
        asynchronous (`non_blocking` from pageable memory is a blocking copy); on CPU it is a view."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def _logits(
        self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, seq_len) fp32 start and end logits on the device, in window order.

        The whole batch goes to the device once, as int32 ids and int8 types (a quarter and an eighth of
        int64), before the first forward; micro-batches are then cut on the device and no step of the
        loop waits for the host, so on a GPU the host runs ahead queueing the next micro-batch while the
        current one computes.
        """
        num_windows = lengths.size
        batches = self._micro_batches(lengths)
        order = np.concatenate([w for w, _ in batches]) if batches else np.zeros(0, dtype=np.int64)
        ids_dev = self._to_device(ids)  # (W, seq_len) int32
        types_dev = self._to_device(types)  # (W, seq_len) int8
        lengths_dev = self._to_device(lengths.astype(np.int32))  # (W,)
        order_dev = self._to_device(order.astype(np.int64))  # (W,) windows, micro-batch after micro-batch
        positions = torch.arange(seq_len, device=self.device)
        start = torch.zeros((num_windows, seq_len), dtype=torch.float32, device=self.device)
        end = torch.zeros((num_windows, seq_len), dtype=torch.float32, device=self.device)
        lo = 0
        for windows, pad_len in batches:
            rows = order_dev[lo : lo + windows.size]
            lo += windows.size
            batch_ids = ids_dev[rows, :pad_len]  # (m, pad_len) int32: embeddings take int32 indices
            batch_types = types_dev[rows, :pad_len].int()  # widened on the device
            batch_mask = positions[None, :pad_len] < lengths_dev[rows, None]  # (m, pad_len) bool
            out = self.model(batch_ids, attention_mask=batch_mask, token_type_ids=batch_types)
            start[rows, :pad_len] = out.start_logits
            end[rows, :pad_len] = out.end_logits
        return start, end

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in ("error", "window_lengths", "input_ids", "token_type_ids", "offsets"):
            _column(batch, name, "QAModel")
        errors = [str(e) if e is not None else "" for e in batch["error"]]
        n = len(errors)
        lengths, windows_per_row = _flat(batch["window_lengths"], np.int64)
        flat_ids, _ = _flat(batch["input_ids"], np.int32)
        flat_types, _ = _flat(batch["token_type_ids"], np.int8)
        flat_offsets, _ = _flat(batch["offsets"], np.int32)
        num_windows, total = lengths.size, int(lengths.sum())
        if flat_ids.size != total or flat_types.size != total or flat_offsets.size != 2 * total:
            raise ValueError(
                "QAModel: input_ids / token_type_ids / offsets do not match window_lengths; "
                "feed it QATokenize's output unchanged"
            )
        seq_len = int(lengths.max()) if num_windows else 0
        seq_len = -(-seq_len // _PAD_MULTIPLE) * _PAD_MULTIPLE
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"windows of {int(lengths.max())} tokens exceed the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}; lower QATokenize's max_length"
            )
        # The model's own input checks are off (they would sync host and device per micro-batch): the
        # same checks happen here, once per batch, on the host.
        if total and (flat_ids.min() < 0 or flat_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"token ids outside the model's vocabulary (vocab_size={self.config.vocab_size}): "
                "the tokenizer does not belong to this model; pass the model's own tokenizer directory"
            )
        if total and (flat_types.min() < 0 or flat_types.max() >= self.config.type_vocab_size):
            raise ValueError(
                f"token type ids outside [0, {self.config.type_vocab_size}): feed QATokenize's output unchanged"
            )

        # Window w of the batch belongs to row question_index[w]; its token t is flat token tok0[w] + t.
        question_index = np.repeat(np.arange(n), windows_per_row)
        tok0 = np.concatenate([[0], np.cumsum(lengths)])[:-1].astype(np.int64)
        # Scatter the flat tokens into (W, seq_len) padded arrays in one vectorised step.
        win_of_tok = np.repeat(np.arange(num_windows), lengths)
        col_of_tok = np.arange(total) - np.repeat(tok0, lengths)
        ids = np.zeros((num_windows, seq_len), dtype=np.int32)
        ids[win_of_tok, col_of_tok] = flat_ids
        types = np.zeros((num_windows, seq_len), dtype=np.int8)
        types[win_of_tok, col_of_tok] = flat_types
        offsets = flat_offsets.reshape(total, 2)
        valid = np.zeros((num_windows, seq_len), dtype=bool)
        valid[win_of_tok, col_of_tok] = offsets[:, 0] >= 0

        start_logits, end_logits = self._logits(ids, types, lengths, seq_len)
        spans = best_spans(
            start_logits,
            end_logits,
            self._to_device(valid),
            self._to_device(question_index),
            num_questions=n,
            max_answer_length=self.max_answer_length,
            n_best=self.n_best,
            check=False,  # question_index is built right here, in range by construction
            max_windows_per_question=int(windows_per_row.max()) if n else 0,
        )
        null_score = self._null_scores(start_logits, end_logits, question_index, n)
        window = spans.window.cpu().numpy()
        found = window >= 0
        safe_window = np.where(found, window, 0)
        start_tok = spans.start.cpu().numpy()
        end_tok = spans.end.cpu().numpy()
        score = spans.score.cpu().numpy().astype(np.float32)
        # Positions within the window are reported relative to the row's own windows.
        row_first_window = np.concatenate([[0], np.cumsum(windows_per_row)])[:-1]
        out: dict[str, np.ndarray] = {k: batch[k] for k in _INPUT_COLUMNS if k in batch}
        for i in range(n):
            if not found[i] and not errors[i]:
                errors[i] = NO_VALID_SPAN
        out["error"] = _object_array(errors)
        out["best_window"] = np.where(found, window - row_first_window, -1).astype(np.int32)
        out["start_token"] = np.where(found, start_tok, -1).astype(np.int32)
        out["end_token"] = np.where(found, end_tok, -1).astype(np.int32)
        if num_windows:
            g_start = tok0[safe_window] + np.maximum(start_tok, 0)
            g_end = tok0[safe_window] + np.maximum(end_tok, 0)
            out["start_char"] = np.where(found, offsets[g_start, 0], -1).astype(np.int32)
            out["end_char"] = np.where(found, offsets[g_end, 1], -1).astype(np.int32)
        else:
            out["start_char"] = np.full(n, -1, dtype=np.int32)
            out["end_char"] = np.full(n, -1, dtype=np.int32)
        out["score"] = np.where(found, score, np.nan).astype(np.float32)
        out["null_score"] = null_score
        if self.n_best:
            out.update(self._nbest_columns(spans, tok0, offsets))
        return out

    def _null_scores(self, start: torch.Tensor, end: torch.Tensor, question_index: np.ndarray, n: int) -> np.ndarray:
        """Each question's no-answer score: the [CLS] start + end logits, the lowest over its windows
        (run_qa's SQuAD 2.0 rule: the window most sure that it holds an answer speaks for the question).
        NaN for a question without windows."""
        if start.shape[0] == 0:
            return np.full(n, np.nan, dtype=np.float32)
        per_window = start[:, 0] + end[:, 0]  # (W,) the [CLS] position is 0 in both paddings
        null = torch.full((n,), float("inf"), device=per_window.device)
        null.scatter_reduce_(0, self._to_device(question_index.astype(np.int64)), per_window, reduce="amin")
        out = null.cpu().numpy().astype(np.float32)
        return np.where(np.isfinite(out), out, np.nan).astype(np.float32)

    def _nbest_columns(self, spans: Any, tok0: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
        count = spans.nbest_count.cpu().numpy()
        window = spans.nbest_window.cpu().numpy()
        start = spans.nbest_start.cpu().numpy()
        end = spans.nbest_end.cpu().numpy()
        scores = spans.nbest_score.cpu().numpy().astype(np.float32)
        probs = spans.nbest_prob.cpu().numpy().astype(np.float32)
        ok = window >= 0
        if offsets.size:
            g_start = tok0[np.where(ok, window, 0)] + np.maximum(start, 0)
            g_end = tok0[np.where(ok, window, 0)] + np.maximum(end, 0)
            start_char = np.where(ok, offsets[g_start, 0], -1).astype(np.int32)
            end_char = np.where(ok, offsets[g_end, 1], -1).astype(np.int32)
        else:
            start_char = end_char = np.full(window.shape, -1, dtype=np.int32)
        rows = range(len(count))
        return {
            "nbest_start_char": _object_array([start_char[i, : count[i]] for i in rows]),
            "nbest_end_char": _object_array([end_char[i, : count[i]] for i in rows]),
            "nbest_scores": _object_array([scores[i, : count[i]] for i in rows]),
            "nbest_probabilities": _object_array([probs[i, : count[i]] for i in rows]),
        }
