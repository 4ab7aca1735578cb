"""Checkpoint I/O both ways with transformers: safetensors, sharded, .bin, legacy buffers, errors, round trips."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from splinter.checkpoint import (
    key_map,
    load_pretrained,
    read_state_dict,
    save_pretrained,
    to_checkpoint_state_dict,
)
from splinter.config import SplinterConfig
from splinter.model import SplinterForPreTraining, SplinterForQuestionAnswering, SplinterModel
from tests.hf_oracle import (
    build_and_save,
    load_hf_model,
    make_hf_model,
    make_inputs,
    save_hf_model,
    tiny_config,
)
from tests.numerics import assert_close

TOL = 1e-5  # per unit of magnitude: see tests/numerics.py


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert_close(a, b, tol=TOL)


@pytest.fixture(scope="module")
def hf_qa_dir(tmp_path_factory):
    return build_and_save(tmp_path_factory.mktemp("qa"), "qa", tiny_config(), seed=3)


def _qa_inputs(config: SplinterConfig) -> dict[str, torch.Tensor]:
    return make_inputs(config, 3, 10, seed=21, questions_per_row=(1, 2, 1))


@torch.no_grad()
def _assert_qa_equal(ours, hf, config) -> None:
    inputs = _qa_inputs(config)
    a, b = ours(**inputs), hf(**inputs)
    _close(a.start_logits, b.start_logits)
    _close(a.end_logits, b.end_logits)


def test_key_map_covers_every_checkpoint_key_and_parameter(hf_qa_dir):
    hf, _ = hf_qa_dir
    config = tiny_config()
    mapping = key_map(config, with_qass=True)
    theirs = {t for names in mapping.values() for t in names}
    assert theirs == set(hf.state_dict()) - {"splinter.embeddings.position_ids"}
    assert set(mapping) == set(SplinterForQuestionAnswering(config).state_dict())
    bare = key_map(config, with_qass=False)
    assert set(bare) == set(SplinterModel(config).state_dict())


def test_loads_safetensors_and_matches(hf_qa_dir):
    hf, path = hf_qa_dir
    assert (path / "model.safetensors").is_file()
    ours = load_pretrained(SplinterForQuestionAnswering, path)
    assert not ours.training
    _assert_qa_equal(ours, hf, ours.config)


def test_loads_pytorch_bin_with_legacy_position_ids(tmp_path):
    config = tiny_config()
    hf, path = build_and_save(tmp_path / "bin", "qa", config, seed=4, safe=False)
    assert (path / "pytorch_model.bin").is_file() and not (path / "model.safetensors").exists()
    # Old checkpoints carry the position_ids buffer; it must be ignored.
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["splinter.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    torch.save(state, path / "pytorch_model.bin")
    ours = load_pretrained(SplinterForQuestionAnswering, path)
    _assert_qa_equal(ours, hf, config)


def test_loads_sharded_safetensors(tmp_path):
    config = tiny_config()
    hf, path = build_and_save(tmp_path / "sharded", "qa", config, seed=5, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = load_pretrained(SplinterForQuestionAnswering, path)
    _assert_qa_equal(ours, hf, config)


def test_dtype_and_device_arguments(hf_qa_dir):
    _, path = hf_qa_dir
    ours = load_pretrained(SplinterForQuestionAnswering, path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    out = ours(**_qa_inputs(ours.config))
    assert out.start_logits.dtype == torch.bfloat16 and torch.isfinite(out.start_logits[:, 0]).all()


@torch.no_grad()
def test_pretraining_checkpoint_loads_into_both_heads(tmp_path):
    config = tiny_config()
    hf, path = build_and_save(tmp_path / "pt", "pretraining", config, seed=6)
    ours = load_pretrained(SplinterForPreTraining, path)
    inputs = make_inputs(config, 2, 9, seed=22, questions_per_row=(2, 1))
    _close(ours(**inputs).start_logits, hf(**inputs).start_logits)
    qa = load_pretrained(SplinterForQuestionAnswering, path)  # same state_dict layout
    assert torch.equal(qa.qass.start_bilinear.weight, ours.qass.start_bilinear.weight)


@torch.no_grad()
def test_encoder_only_loads_head_checkpoint_and_bare_checkpoint(tmp_path, hf_qa_dir, caplog):
    hf_qa, qa_path = hf_qa_dir
    config = tiny_config()
    inputs = make_inputs(config, 2, 9, seed=23)
    encoder = load_pretrained(SplinterModel, qa_path)  # QASS tensors are skipped
    _close(encoder(**inputs).last_hidden_state, hf_qa.splinter(**inputs).last_hidden_state)

    # transformers' SplinterModel saves bare keys ("embeddings.*"), without a head.
    hf_base, base_path = build_and_save(tmp_path / "base", "base", config, seed=7)
    assert "embeddings.word_embeddings.weight" in load_file(base_path / "model.safetensors")
    encoder = load_pretrained(SplinterModel, base_path)
    _close(encoder(**inputs).last_hidden_state, hf_base(**inputs).last_hidden_state)

    # Like tau/splinter-base: no QASS weights -> fresh head, warning.
    with caplog.at_level(logging.WARNING, logger="splinter.checkpoint"):
        qa = load_pretrained(SplinterForQuestionAnswering, base_path)
    assert any("no QASS head weights" in r.getMessage() for r in caplog.records)
    _close(qa.splinter(**inputs).last_hidden_state, hf_base(**inputs).last_hidden_state)
    head = qa.qass
    assert torch.equal(head.start.ln.weight, torch.ones_like(head.start.ln.weight))
    assert torch.count_nonzero(head.start.dense.bias) == 0
    std = head.start_bilinear.weight.std().item()
    assert 0.01 < std < 0.03  # N(0, initializer_range=0.02)


def test_errors_name_the_file_and_key(tmp_path, hf_qa_dir):
    _, path = hf_qa_dir
    config_text = (path / "config.json").read_text()
    tensors = load_file(path / "model.safetensors")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(SplinterForQuestionAnswering, empty)
    (empty / "config.json").write_text(config_text)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(SplinterForQuestionAnswering, empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(SplinterForQuestionAnswering, tmp_path / "nowhere")

    def write(name: str, state: dict) -> object:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config_text)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    bad_shape = dict(tensors)
    bad_shape["splinter.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(5, 32)
    with pytest.raises(
        ValueError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight.*model\.safetensors.*\[5, 32\]"
    ):
        load_pretrained(SplinterForQuestionAnswering, write("shape", bad_shape))

    unexpected = dict(tensors)
    unexpected["splinter.encoder.layer.9.output.dense.weight"] = torch.zeros(32, 37)
    with pytest.raises(
        ValueError, match=r"unexpected tensor 'splinter\.encoder\.layer\.9.*model\.safetensors"
    ):
        load_pretrained(SplinterForQuestionAnswering, write("unexpected", unexpected))

    missing = {k: v for k, v in tensors.items() if "layer.0.attention.self.key.bias" not in k}
    with pytest.raises(ValueError, match=r"lacks .splinter\.encoder\.layer\.0\.attention\.self\.key\.bias'"):
        load_pretrained(SplinterForQuestionAnswering, write("missing", missing))

    partial_head = {k: v for k, v in tensors.items() if k != "splinter_qass.end_classifier.weight"}
    with pytest.raises(ValueError, match=r"partial QASS head.*end_classifier.*model\.safetensors"):
        load_pretrained(SplinterForQuestionAnswering, write("partial", partial_head))


def test_read_state_dict_checks_shard_index(tmp_path):
    config = tiny_config()
    _, path = build_and_save(tmp_path / "sharded", "qa", config, seed=8, max_shard_size="20KB")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["splinter.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="ghost"):
        read_state_dict(path)


@pytest.mark.parametrize("kind", ["qa", "pretraining", "base"])
@torch.no_grad()
def test_ours_saved_loads_in_transformers_with_identical_outputs(tmp_path, kind):
    cls = {"qa": SplinterForQuestionAnswering, "pretraining": SplinterForPreTraining, "base": SplinterModel}[
        kind
    ]
    config = tiny_config(num_hidden_layers=3)
    torch.manual_seed(11)
    ours = cls(config).eval()
    with torch.no_grad():  # move LayerNorms away from (1, 0) so a swapped tensor shows
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_pretrained(ours, tmp_path / kind)
    saved = json.loads((path / "config.json").read_text())
    assert saved["model_type"] == "splinter" and saved["architectures"] == [cls.__name__]
    keys = set(load_file(path / "model.safetensors"))
    if kind == "base":
        assert "embeddings.word_embeddings.weight" in keys
    else:
        assert {"splinter.embeddings.word_embeddings.weight", "splinter_qass.start_classifier.weight"} <= keys

    hf = load_hf_model(kind, path)
    inputs = make_inputs(config, 3, 10, seed=24, questions_per_row=(1, 2, 1))
    if kind == "base":
        _close(ours(**inputs).last_hidden_state, hf(**inputs).last_hidden_state)
    else:
        a, b = ours(**inputs), hf(**inputs)
        _close(a.start_logits, b.start_logits)
        _close(a.end_logits, b.end_logits)
    # ...and back into ours, bit for bit.
    again = load_pretrained(cls, path)
    for (name, p), q in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_hf_state_dict_round_trips_through_our_names(hf_qa_dir):
    hf, path = hf_qa_dir
    ours = load_pretrained(SplinterForQuestionAnswering, path)
    back = to_checkpoint_state_dict(ours)
    expected = {k: v for k, v in hf.state_dict().items() if k != "splinter.embeddings.position_ids"}
    assert set(back) == set(expected)
    for key, value in expected.items():
        assert torch.equal(back[key], value), key


def test_save_pretrained_writes_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[QUESTION]", "the", "cat"]) + "\n"
    )
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    model = SplinterForQuestionAnswering(tiny_config())
    out = save_pretrained(model, tmp_path / "with_tok", tokenizer=tokenizer)
    assert (out / "tokenizer_config.json").is_file() and (out / "vocab.txt").is_file()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_config_extras_survive_checkpoint_round_trip(tmp_path):
    hf = make_hf_model("qa", tiny_config(), seed=9)
    path = save_hf_model(hf, tmp_path / "extras")
    ours = load_pretrained(SplinterForQuestionAnswering, path)
    assert "transformers_version" in ours.config.extra
    out = save_pretrained(ours, tmp_path / "again")
    saved = json.loads((out / "config.json").read_text())
    assert saved["transformers_version"] == ours.config.extra["transformers_version"]
    assert saved["question_token_id"] == 104 and saved["torch_dtype"] == "float32"
