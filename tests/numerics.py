"""Float comparisons that allow for magnitude.

Two float32 computations of the same math (ours vs transformers, padded vs unpadded, one kernel vs
another) agree only up to rounding, and rounding scales with the values: one float32 ulp at ~8 is
9.5e-7, so a plain `atol=1e-6` passes or fails by which SIMD path the CPU takes. Every tolerance
here is therefore relative to the size of the values compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 1.19e-7
# Masked logits sit at finfo.min; they must not set the scale of the comparison.
_HUGE = 1e30


def _scale(expected: torch.Tensor) -> float:
    """max |value| over the finite, unmasked entries (at least 1, so tiny values get an absolute floor)."""
    values = expected.detach().double().abs()
    values = values[torch.isfinite(values) & (values < _HUGE)]
    return max(1.0, float(values.max())) if values.numel() else 1.0


def assert_close(actual: Any, expected: Any, tol: float = 1e-5) -> None:
    """|actual - expected| <= tol * scale + 4 eps * |expected|, with scale = max(1, max |expected|).

    `tol` is the allowed error per unit of magnitude: 1e-5 (~84 float32 ulps) suits two different
    float32 implementations of a few transformer layers; 1e-6 suits the same kernels on reordered input.
    """
    actual = torch.as_tensor(np.asarray(actual)) if not isinstance(actual, torch.Tensor) else actual
    expected = torch.as_tensor(np.asarray(expected)) if not isinstance(expected, torch.Tensor) else expected
    torch.testing.assert_close(
        actual, expected.to(actual.dtype), atol=tol * _scale(expected), rtol=4 * EPS32, equal_nan=True
    )
