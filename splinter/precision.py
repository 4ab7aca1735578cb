"""Inference precision for the QA model: bf16 mixed precision (GPUs) and dynamic int8 (CPUs).

Both touch only the encoder's Linear layers, where nearly all of the FLOPs are. Embeddings, LayerNorms,
the QASS head and the logits stay fp32: the exact span search compares sums of start and end logits,
and at bf16's resolution (a step of ~0.06 at magnitude ~10) those sums tie.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["to_mixed_precision", "quantize_int8", "encoder_linears"]


def encoder_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of the encoder (`model.splinter.layers`), not those of the QASS head."""
    return [m for m in model.splinter.layers.modules() if isinstance(m, nn.Linear)]


def to_mixed_precision(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store the encoder's Linear weights in `dtype` and run the encoder under autocast in it.

    The weights are cast once (half the memory traffic of fp32 at every forward, no per-call casts),
    LayerNorm parameters and the residual stream stay fp32 (autocast feeds LayerNorm fp32 inputs), and
    `_WithQASS._span_logits` runs the QASS head in fp32 outside autocast. Works in place; returns `model`.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"mixed precision dtype must be bfloat16 or float16, got {dtype}")
    if not hasattr(model, "autocast_dtype"):
        raise ValueError(f"{type(model).__name__} has no QASS head: mixed precision is for the QA models")
    for linear in encoder_linears(model):
        linear.to(dtype)
    model.autocast_dtype = dtype
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the encoder's Linear layers, for CPU inference. Works in place.

    Weights become int8 per output channel; activations are quantized per call from their observed
    range, so no calibration data is needed. We use torch's own `torch.ao.quantization.quantize_dynamic`
    (fbgemm/x86 kernels) although torch now points to torchao for it: measured here on an AVX2 CPU with
    torch 2.13 and torchao 0.18, torchao's `Int8DynamicActivationInt8WeightConfig` ran a MiniLM forward
    14x SLOWER than fp32 in eager mode (it has no fast eager CPU kernel), while quantize_dynamic ran it
    ~2x faster; and torchao would be a new dependency of this torch-only library.
    """
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm", "qnnpack") if e in engines), None)
    if engine is None:
        raise RuntimeError(f"this torch build has no int8 CPU kernels (quantized engines: {engines})")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantization runs on CPU only: quantize before any .to(device)")
    torch.backends.quantized.engine = engine
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        # The deprecation notices point to torchao; see the docstring for why we stay.
        warnings.filterwarnings("ignore", message=".*quantiz.*")
        warnings.filterwarnings("ignore", message=".*torchao.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.ao.quantization.quantize_dynamic(model.splinter.layers, {nn.Linear: qconfig}, inplace=True)
    return model
