"""Optimizer and learning-rate schedule shared by fine-tuning and pretraining (the authors' recipe).

AdamW with linear warmup then linear decay to zero, as `run_mrqa.py` and `run_pretraining.py` use
(transformers' `get_linear_schedule_with_warmup` has the same shape). Weight decay skips biases and
LayerNorm weights, as BERT-family training code does; the few-shot recipe uses no decay at all.
"""

from __future__ import annotations

import torch
from torch import nn


def adamw(
    model: nn.Module, lr: float, weight_decay: float = 0.0, eps: float = 1e-8, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """torch's AdamW over the trainable parameters; with weight decay, biases and norms are exempt."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # 1-D tensors are biases and LayerNorm scales: decaying them toward zero only hurts.
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=eps, betas=betas)


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr x step/warmup for the first `warmup_steps`, then a straight line down to 0 at `total_steps`."""
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
