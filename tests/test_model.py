"""Model math: parity with transformers' Splinter (fp32, eval, 1e-5 per unit of magnitude), shapes, masking, losses, input checks.

transformers adds a (B, S) attention mask to (B, Q, S) logits when question_positions are given, which
broadcasts the batch axis against Q (wrong values, or a shape error when Q is neither 1 nor B). We mask as
(B, 1, S) instead, so for explicit question positions WITH a mask the reference is transformers' own QASS
head applied to transformers' hidden states, masked correctly here (`_hf_masked_reference`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splinter.checkpoint import load_pretrained
from splinter.config import SplinterConfig
from splinter.model import (
    SplinterForPreTraining,
    SplinterForQuestionAnswering,
    SplinterModel,
    all_question_positions,
    first_question_positions,
)
from tests.hf_oracle import TINY_CONFIGS, build_and_save, make_inputs, tiny_config
from tests.numerics import assert_close

TOL = 1e-5  # per unit of magnitude: see tests/numerics.py
MASK_VARIANTS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per tiny config: (config, hf_qa, ours_qa, hf_pretraining, ours_pretraining), loaded via checkpoints."""
    out = {}
    for name, overrides in TINY_CONFIGS.items():
        config = tiny_config(**overrides)
        root = tmp_path_factory.mktemp(name)
        hf_qa, qa_dir = build_and_save(root / "qa", "qa", config, seed=1)
        hf_pt, pt_dir = build_and_save(root / "pt", "pretraining", config, seed=2)
        ours_qa = load_pretrained(SplinterForQuestionAnswering, qa_dir)
        ours_pt = load_pretrained(SplinterForPreTraining, pt_dir)
        out[name] = (config, hf_qa, ours_qa, hf_pt, ours_pt)
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert_close(actual, expected, tol=tol)


def _hf_masked_reference(hf_model, inputs, positions):
    """Correct masked (B, Q, S) logits from transformers' encoder + QASS head, mask broadcast as (B, 1, S)."""
    hidden = hf_model.splinter(**inputs).last_hidden_state
    start, end = hf_model.splinter_qass(hidden, positions)
    pad = (inputs["attention_mask"] == 0)[:, None, :]
    low = torch.finfo(start.dtype).min
    return start.masked_fill(pad, low), end.masked_fill(pad, low)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize(("with_mask", "with_types"), MASK_VARIANTS)
@torch.no_grad()
def test_hidden_states_and_default_question_logits_match(pairs, name, with_mask, with_types):
    config, hf_qa, ours_qa, _, _ = pairs[name]
    # Row 2 has no [QUESTION]: both must fall back to position 0.
    inputs = make_inputs(
        config, 3, 11, seed=3, with_mask=with_mask, with_types=with_types, questions_per_row=(1, 2, 0)
    )
    expected = hf_qa(**inputs)
    ours = ours_qa(**inputs)
    _close(ours_qa.splinter(**inputs).last_hidden_state, hf_qa.splinter(**inputs).last_hidden_state)
    assert ours.start_logits.shape == (3, 11)
    _close(ours.start_logits, expected.start_logits)
    _close(ours.end_logits, expected.end_logits)
    _close(ours.last_hidden_state, hf_qa.splinter(**inputs).last_hidden_state)
    if with_mask:
        pad = inputs["attention_mask"] == 0
        assert pad.any()
        assert (ours.start_logits[pad] <= torch.finfo(torch.float32).min / 2).all()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize(("with_mask", "with_types"), MASK_VARIANTS)
@pytest.mark.parametrize("num_questions", [1, 3])
@torch.no_grad()
def test_explicit_question_positions_match(pairs, name, with_mask, with_types, num_questions):
    config, hf_qa, ours_qa, _, _ = pairs[name]
    inputs = make_inputs(config, 4, 10, seed=4, with_mask=with_mask, with_types=with_types)
    positions = torch.tensor([[1, 5, 0], [2, 3, 6], [0, 0, 0], [6, 2, 1]])[:, :num_questions]
    ours = ours_qa(**inputs, question_positions=positions)
    assert ours.start_logits.shape == (4, num_questions, 10)
    if with_mask:
        start, end = _hf_masked_reference(hf_qa, inputs, positions)
    else:
        expected = hf_qa(**inputs, question_positions=positions)
        start, end = expected.start_logits, expected.end_logits
    _close(ours.start_logits, start)
    _close(ours.end_logits, end)


@torch.no_grad()
def test_single_row_masked_explicit_positions_match_transformers_directly(pairs):
    # With batch 1, transformers' (B, S) mask broadcasts correctly, so its own forward is the oracle.
    config, hf_qa, ours_qa, _, _ = pairs["tester"]
    inputs = make_inputs(config, 2, 9, seed=5)
    inputs = {k: v[1:] for k, v in inputs.items()}  # row 1 is padded by one token
    positions = torch.tensor([[1, 4, 2]])
    expected = hf_qa(**inputs, question_positions=positions)
    ours = ours_qa(**inputs, question_positions=positions)
    _close(ours.start_logits, expected.start_logits)
    _close(ours.end_logits, expected.end_logits)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize(("with_mask", "with_types"), MASK_VARIANTS)
@torch.no_grad()
def test_pretraining_logits_and_losses_match(pairs, name, with_mask, with_types):
    config, _, _, hf_pt, ours_pt = pairs[name]
    inputs = make_inputs(
        config, 3, 12, seed=6, with_mask=with_mask, with_types=with_types, questions_per_row=(2, 3, 1)
    )
    expected = hf_pt(**inputs)
    ours = ours_pt(**inputs)
    assert ours.start_logits.shape == (3, 3, 12)
    _close(ours.start_logits, expected.start_logits)
    _close(ours.end_logits, expected.end_logits)

    positions = all_question_positions(inputs["input_ids"], config.question_token_id)
    starts = torch.tensor([[3, 5, 0], [1, 2, 40], [4, 0, 0]])  # 40 is clamped to S-1; 0 = padded question
    ends = torch.tensor([[4, 6, 0], [1, 3, 40], [7, 0, 0]])
    expected = hf_pt(
        **inputs, question_positions=positions, start_positions=starts.clone(), end_positions=ends.clone()
    )
    ours = ours_pt(**inputs, question_positions=positions, start_positions=starts, end_positions=ends)
    _close(ours.loss, expected.loss)
    assert starts[1, 2] == 40, "labels must not be clamped in place"


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize(("with_mask", "with_types"), MASK_VARIANTS)
@torch.no_grad()
def test_question_answering_loss_matches(pairs, name, with_mask, with_types):
    config, hf_qa, ours_qa, _, _ = pairs[name]
    inputs = make_inputs(
        config, 3, 10, seed=7, with_mask=with_mask, with_types=with_types, questions_per_row=(1, 1, 1)
    )
    starts = torch.tensor([2, 50, -3])  # 50 -> S (ignored); -3 -> 0
    ends = torch.tensor([[4], [60], [1]])  # (B, 1) labels are squeezed like transformers does
    expected = hf_qa(**inputs, start_positions=starts.clone(), end_positions=ends.clone())
    ours = ours_qa(**inputs, start_positions=starts, end_positions=ends)
    _close(ours.loss, expected.loss)


def test_prepare_question_positions_matches_transformers_and_known_example(pairs):
    config, _, _, hf_pt, _ = pairs["tester"]
    q = config.question_token_id
    ids = torch.full((4, 8), 5)
    for row, cols in enumerate([[1, 4], [2, 4, 6], [3, 4], [6]]):
        ids[row, cols] = q
    expected = torch.tensor([[1, 4, 0], [2, 4, 6], [3, 4, 0], [6, 0, 0]])
    assert torch.equal(all_question_positions(ids, q), expected)
    assert torch.equal(hf_pt._prepare_question_positions(ids), expected)
    assert torch.equal(first_question_positions(ids, q), expected[:, :1])
    no_questions = torch.full((2, 5), 5)
    assert torch.equal(all_question_positions(no_questions, q), torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(first_question_positions(no_questions, q), torch.zeros(2, 1, dtype=torch.long))


@torch.no_grad()
def test_pretraining_loss_invariant_to_appended_padded_question(pairs):
    config, _, _, _, ours_pt = pairs["tester"]
    inputs = make_inputs(config, 3, 12, seed=8, questions_per_row=(2, 2, 1))
    positions = all_question_positions(inputs["input_ids"], config.question_token_id)
    starts, ends = torch.tensor([[3, 5], [1, 2], [4, 0]]), torch.tensor([[4, 6], [1, 3], [7, 0]])
    base = ours_pt(**inputs, question_positions=positions, start_positions=starts, end_positions=ends)
    pad_col = torch.zeros(3, 1, dtype=torch.long)
    more = ours_pt(
        **inputs,
        question_positions=torch.cat([positions, pad_col], 1),
        start_positions=torch.cat([starts, pad_col], 1),
        end_positions=torch.cat([ends, pad_col], 1),
    )
    _close(more.loss, base.loss, tol=1e-6)
    _close(more.start_logits[:, :2], base.start_logits, tol=1e-6)


def test_pretraining_type_errors_like_transformers(pairs):
    config, _, _, _, ours_pt = pairs["tester"]
    inputs = make_inputs(config, 2, 8, seed=9, questions_per_row=(1, 1))
    labels = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(TypeError, match="question_positions must be specified"):
        ours_pt(**inputs, start_positions=labels, end_positions=labels)


def test_parameter_count_full_size_on_meta():
    # 111,267,840 is the hub checkpoints' count (cased vocab 28996); the config default vocab 30522 adds
    # 1526 rows x 768. transformers' own model (also on meta) is the oracle for both.
    from transformers import SplinterForQuestionAnswering as HFQA

    from tests.hf_oracle import hf_config

    for vocab, expected in ((28996, 111_267_840), (30522, 112_439_808)):
        config = SplinterConfig(vocab_size=vocab)
        with torch.device("meta"):
            ours = SplinterForQuestionAnswering(config)
            hf = HFQA(hf_config(config))
        count = sum(p.numel() for p in ours.parameters())
        assert count == expected == sum(p.numel() for p in hf.parameters())
        qass = sum(p.numel() for p in ours.qass.parameters())
        assert qass == 3_548_160
        assert all(p.device.type == "meta" for p in ours.parameters())


# ----------------------------------------------------------------------------------------- modes and masks
def test_train_mode_uses_dropout_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = SplinterForQuestionAnswering(tiny_config())
    inputs = make_inputs(model.config, 2, 9, seed=10, questions_per_row=(1, 1))
    model.train()
    a, b = model(**inputs).start_logits, model(**inputs).start_logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).start_logits, model(**inputs).start_logits)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = SplinterForQuestionAnswering(tiny_config()).train()
    inputs = make_inputs(model.config, 2, 9, seed=11, questions_per_row=(1, 1))
    out = model(**inputs, start_positions=torch.tensor([2, 3]), end_positions=torch.tensor([4, 3]))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert torch.count_nonzero(model.splinter.wte.weight.grad[model.config.pad_token_id]) == 0


def test_sdpa_gets_no_mask_without_attention_mask_and_a_broadcast_one_with(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = SplinterModel(tiny_config()).eval()
    inputs = make_inputs(model.config, 3, 7, seed=12, with_types=False)
    with torch.no_grad():
        model(inputs["input_ids"])
        assert seen and all(m is None for m in seen)
        seen.clear()
        model(**inputs)
    assert seen and all(m is not None and m.shape == (3, 1, 1, 7) for m in seen)


@torch.no_grad()
def test_padding_does_not_change_real_token_outputs():
    torch.manual_seed(0)
    model = SplinterForQuestionAnswering(tiny_config()).eval()
    short = make_inputs(
        model.config, 1, 8, seed=13, with_mask=False, with_types=False, questions_per_row=(1,)
    )
    padded_ids = torch.cat([short["input_ids"], torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    a = model(**short)
    b = model(padded_ids, attention_mask=mask)
    _close(b.start_logits[:, :8], a.start_logits)
    _close(b.last_hidden_state[:, :8], a.last_hidden_state)
    # A boolean mask means the same as a 0/1 integer mask.
    c = model(padded_ids, attention_mask=mask.bool())
    assert torch.equal(c.start_logits, b.start_logits)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return SplinterForQuestionAnswering(tiny_config(max_position_embeddings=16)).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_ids": torch.tensor([[1, 2, 112]])}, r"input_ids out of range .*vocab_size=112"),
        ({"input_ids": torch.tensor([[1, -1, 3]])}, r"input_ids out of range"),
        ({"input_ids": torch.ones(1, 17, dtype=torch.long)}, r"exceeds max_position_embeddings=16"),
        ({"input_ids": torch.tensor([1, 2, 3])}, r"2-D \[batch, seq_len\]"),
        ({"input_ids": torch.ones(1, 3)}, r"integer token ids"),
        ({"input_ids": torch.ones(1, 0, dtype=torch.long)}, r"empty"),
        (
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)},
            r"attention_mask has shape",
        ),
        (
            {
                "input_ids": torch.ones(2, 3, dtype=torch.long),
                "token_type_ids": torch.ones(2, 4, dtype=torch.long),
            },
            r"token_type_ids has shape",
        ),
        (
            {
                "input_ids": torch.ones(2, 3, dtype=torch.long),
                "position_ids": torch.ones(3, 3, dtype=torch.long),
            },
            r"position_ids has shape",
        ),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "token_type_ids": torch.full((1, 3), 2)},
            r"token_type_ids out of range",
        ),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 16]])},
            r"position_ids out of range",
        ),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 2, 0]])},
            r"only 0 and 1",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "question_positions": torch.tensor([[1], [5]])},
            r"question_positions out of range .*seq_len=5",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "question_positions": torch.tensor([[1, 2]])},
            r"question_positions has shape",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "question_positions": torch.tensor([1, 2])},
            r"2-D \[batch, num_questions\]",
        ),
        (
            {"input_ids": torch.ones(1, 5, dtype=torch.long), "start_positions": torch.tensor([1])},
            r"pass both",
        ),
    ],
)
def test_bad_input_raises_value_error_saying_what_to_do(small_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_model(**kwargs)


def test_bad_input_on_encoder_and_pretraining_model_too(small_model):
    encoder = small_model.splinter
    with pytest.raises(ValueError, match="input_ids out of range"):
        encoder(torch.tensor([[0, 500]]))
    pretraining = SplinterForPreTraining(small_model.config)
    with pytest.raises(ValueError, match="question_positions out of range"):
        pretraining(torch.ones(1, 4, dtype=torch.long), question_positions=torch.tensor([[-1]]))


def test_explicit_position_ids_allow_batch_broadcast(small_model):
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    with torch.no_grad():
        a = small_model.splinter(ids).last_hidden_state
        b = small_model.splinter(ids, position_ids=torch.arange(3)[None]).last_hidden_state
    _close(a, b, tol=1e-6)
