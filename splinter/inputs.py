"""Checks of a forward pass's inputs: one ValueError that says what to do, instead of an index error deep
in an embedding or a silently wrong answer.

Shapes are checked on the host for free; value ranges are reduced on the device into one small flag
vector read back with a single host sync. Batch pipelines check once per batch at their boundary and
switch these off in the hot loop (`SplinterModel.check_inputs`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from splinter.config import SplinterConfig

__all__ = ["validate_inputs"]


def _check_same_shape(
    name: str, tensor: Tensor | None, shape: torch.Size, allow_batch_one: bool = False
) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    ok = tensor.shape == shape or (allow_batch_one and tensor.shape == (1, shape[1]))
    if not ok:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but input_ids has shape {tuple(shape)}; "
            f"pass one {name} value per token (same [batch, seq_len] shape)"
        )


def validate_inputs(
    config: SplinterConfig,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
    question_positions: Tensor | None = None,
) -> None:
    """Raise ValueError (saying what to do) on malformed inputs.

    Shapes are checked on the host for free; all value-range checks are reduced on the device into one
    small flag vector and read back with a single host sync.
    """
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be 2-D [batch, seq_len], got shape {tuple(input_ids.shape)}; "
            "add a batch dimension with input_ids.unsqueeze(0)"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.dtype.is_complex:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    batch, seq_len = input_ids.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token")
    if position_ids is None and seq_len > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {seq_len} exceeds max_position_embeddings={config.max_position_embeddings}; "
            "truncate the input or split it into overlapping windows"
        )
    _check_same_shape("attention_mask", attention_mask, input_ids.shape)
    _check_same_shape("token_type_ids", token_type_ids, input_ids.shape)
    _check_same_shape("position_ids", position_ids, input_ids.shape, allow_batch_one=True)
    if question_positions is not None:
        if not isinstance(question_positions, Tensor) or question_positions.dim() != 2:
            raise ValueError(
                "question_positions must be a 2-D [batch, num_questions] tensor of token indices"
            )
        if question_positions.shape[0] != batch or question_positions.shape[1] == 0:
            raise ValueError(
                f"question_positions has shape {tuple(question_positions.shape)}; expected [{batch}, Q>=1] "
                "(one row per input row)"
            )
        if question_positions.dtype.is_floating_point or question_positions.dtype == torch.bool:
            raise ValueError("question_positions must hold integer token indices")

    # name, tensor, upper bound (exclusive), what to do
    ranged: list[tuple[str, Tensor, int, str]] = [
        (
            "input_ids",
            input_ids,
            config.vocab_size,
            f"token ids must be in [0, vocab_size={config.vocab_size})",
        ),
    ]
    if token_type_ids is not None:
        ranged.append(
            (
                "token_type_ids",
                token_type_ids,
                config.type_vocab_size,
                f"use values in [0, {config.type_vocab_size})",
            )
        )
    if position_ids is not None:
        ranged.append(
            (
                "position_ids",
                position_ids,
                config.max_position_embeddings,
                f"use values in [0, max_position_embeddings={config.max_position_embeddings})",
            )
        )
    if question_positions is not None:
        ranged.append(
            (
                "question_positions",
                question_positions,
                seq_len,
                f"indices must point into [0, seq_len={seq_len})",
            )
        )
    flags = []
    for _, tensor, upper, _ in ranged:
        low, high = torch.aminmax(tensor)
        flags.append((low < 0) | (high >= upper))
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        flags.append(((attention_mask != 0) & (attention_mask != 1)).any())
    bad = torch.stack(flags).tolist()  # the one host sync
    for (name, tensor, _, hint), is_bad in zip(ranged, bad, strict=False):
        if is_bad:
            raise ValueError(
                f"{name} out of range (min {int(tensor.min())}, max {int(tensor.max())}): {hint}"
            )
    if len(bad) > len(ranged) and bad[-1]:
        raise ValueError("attention_mask must contain only 0 and 1 (1 = real token, 0 = padding)")
