"""Inference precision on CPU: bf16 encoder with fp32 LayerNorms and QASS head, dynamic int8, input checks.

bf16 autocast runs on CPU as well, so the mixed-precision rules (which parameters stay fp32, which dtype
the logits have) are checked here; tests/test_gpu.py measures bf16 answers against fp32 on a GPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import splinter.model as model_module
from splinter.config import SplinterConfig
from splinter.model import SplinterForQuestionAnswering
from splinter.precision import encoder_linears, quantize_int8, to_mixed_precision
from tests.numerics import assert_close


@pytest.fixture(scope="module")
def model() -> SplinterForQuestionAnswering:
    torch.manual_seed(0)
    return SplinterForQuestionAnswering(SplinterConfig.tiny(hidden_size=64, num_attention_heads=4)).eval()


def _inputs(config: SplinterConfig, batch: int = 3, seq: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config.vocab_size, (batch, seq), generator=g)
    ids[:, 4] = config.question_token_id
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 15:] = 0
    types = torch.zeros(batch, seq, dtype=torch.long)
    types[:, 6:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def test_bf16_encoder_keeps_layernorms_head_and_logits_fp32(model) -> None:
    inputs = _inputs(model.config)
    mixed = to_mixed_precision(copy.deepcopy(model), torch.bfloat16)
    assert all(linear.weight.dtype == torch.bfloat16 for linear in encoder_linears(mixed))
    fp32_names = [n for n, p in mixed.named_parameters() if p.dtype == torch.float32]
    assert all(n.startswith("qass.") or ".ln" in n or ".wte" in n or ".wpe" in n or ".wtt" in n for n in fp32_names)
    assert any(n.startswith("qass.") for n in fp32_names) and any("ln_attn" in n for n in fp32_names)
    with torch.inference_mode():
        ref = model(**inputs)
        out = mixed(**inputs)
    real = inputs["attention_mask"].bool()
    assert out.start_logits.dtype == torch.float32 and out.last_hidden_state.dtype == torch.float32
    # A bf16 head would leave every logit on bf16's grid (steps of ~0.06 at magnitude 10): ties.
    on_grid = out.start_logits[real] == out.start_logits[real].bfloat16().float()
    assert on_grid.float().mean() < 0.5
    # Close to fp32: bf16 keeps ~3 significant digits through a 2-layer encoder.
    scale = ref.start_logits[real].abs().max()
    assert (out.start_logits - ref.start_logits)[real].abs().max() < 0.05 * scale
    assert torch.all(out.start_logits[~real] == torch.finfo(torch.float32).min)


def test_head_stays_fp32_inside_a_callers_autocast(model) -> None:
    inputs = _inputs(model.config)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert out.start_logits.dtype == torch.float32 and out.end_logits.dtype == torch.float32


def test_int8_quantizes_only_the_encoder_linears(model) -> None:
    inputs = _inputs(model.config)
    quantized = quantize_int8(copy.deepcopy(model))
    assert not [m for m in quantized.splinter.layers.modules() if type(m) is nn.Linear]  # all replaced
    assert type(quantized.qass.start_bilinear) is nn.Linear  # the head stays fp32
    with torch.inference_mode():
        ref = model(**inputs)
        out = quantized(**inputs)
    real = inputs["attention_mask"].bool()
    scale = ref.start_logits[real].abs().max()
    assert (out.start_logits - ref.start_logits)[real].abs().max() < 0.1 * scale
    assert not torch.equal(out.start_logits, ref.start_logits)  # it really runs int8 kernels


def test_mixed_precision_and_int8_refuse_what_they_cannot_do(model) -> None:
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        to_mixed_precision(copy.deepcopy(model), torch.float64)
    with pytest.raises(ValueError, match="no QASS head"):
        to_mixed_precision(model.splinter, torch.bfloat16)
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(meta)


def test_input_checks_run_at_the_boundary_and_never_under_compile(model, monkeypatch) -> None:
    calls = []
    real_check = model_module.validate_inputs
    monkeypatch.setattr(model_module, "validate_inputs", lambda *a, **k: calls.append(1) or real_check(*a, **k))
    inputs = _inputs(model.config)
    with torch.inference_mode():
        model(**inputs)
        assert calls == [1]
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        model(**inputs)
        model.splinter(**inputs)
        assert calls == [1]  # no host sync inside a compiled graph
        monkeypatch.undo()
    with pytest.raises(ValueError, match="token ids must be in"):
        bad = dict(inputs, input_ids=inputs["input_ids"] + model.config.vocab_size)
        model(**bad)


def test_int32_ids_and_bool_mask_give_the_same_logits(model) -> None:
    """QAModel sends int32 ids, int8-widened types and a bool mask: the model must not care."""
    inputs = _inputs(model.config)
    narrow = {
        "input_ids": inputs["input_ids"].int(),
        "attention_mask": inputs["attention_mask"].bool(),
        "token_type_ids": inputs["token_type_ids"].int(),
    }
    with torch.inference_mode():
        a, b = model(**inputs), model(**narrow)
    real = inputs["attention_mask"].bool()
    assert_close(b.start_logits[real], a.start_logits[real])
    np.testing.assert_array_equal(b.end_logits.numpy(), a.end_logits.numpy())
