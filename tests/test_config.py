"""SplinterConfig: transformers' names and defaults, config.json round trips, invariants."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from splinter.config import SplinterConfig
from tests.hf_oracle import hf_config

FIELDS = [f.name for f in dataclasses.fields(SplinterConfig) if f.name not in ("extra", "architectures")]


def test_defaults_match_transformers():
    from transformers import SplinterConfig as HFSplinterConfig

    ours, theirs = SplinterConfig(), HFSplinterConfig()
    for name in FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.head_dim == 64


def test_transformers_config_json_loads_and_ours_loads_in_transformers(tmp_path):
    from transformers import SplinterConfig as HFSplinterConfig

    tiny = SplinterConfig.tiny(hidden_act="gelu_new", question_token_id=7)
    hf_config(tiny).save_pretrained(str(tmp_path / "hf"))
    ours = SplinterConfig.from_pretrained(tmp_path / "hf")
    for name in FIELDS:
        assert getattr(ours, name) == getattr(tiny, name), name
    assert "transformers_version" in ours.extra

    ours.save_pretrained(tmp_path / "ours")
    theirs = HFSplinterConfig.from_pretrained(str(tmp_path / "ours"))
    for name in FIELDS:
        assert getattr(theirs, name) == getattr(tiny, name), name
    assert theirs.model_type == "splinter"


def test_unknown_keys_round_trip_and_warn(tmp_path, caplog):
    values = SplinterConfig.tiny().to_dict() | {"my_custom_flag": [1, 2], "torch_dtype": "float32"}
    values["architectures"] = ["SplinterForQuestionAnswering"]
    with caplog.at_level(logging.WARNING, logger="splinter.config"):
        config = SplinterConfig.from_dict(values)
    assert config.extra == {"my_custom_flag": [1, 2], "torch_dtype": "float32"}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "my_custom_flag" in warned and "torch_dtype" not in warned  # generic HF keys are expected
    path = config.save_pretrained(tmp_path / "c")
    saved = json.loads(path.read_text())
    assert saved["my_custom_flag"] == [1, 2]
    assert saved["model_type"] == "splinter"
    assert saved["architectures"] == ["SplinterForQuestionAnswering"]
    again = SplinterConfig.from_pretrained(tmp_path / "c")
    assert again == config


def test_tiny_has_question_token_and_accepts_overrides():
    tiny = SplinterConfig.tiny()
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads, tiny.intermediate_size) == (
        32,
        2,
        4,
        37,
    )
    assert tiny.question_token_id < tiny.vocab_size <= 128
    assert SplinterConfig.tiny(num_hidden_layers=5).num_hidden_layers == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "divisible by num_attention_heads"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
        ({"question_token_id": 200}, r"question_token_id=200 must be a token id in \[0, vocab_size=112\)"),
        ({"question_token_id": 0}, "must differ from pad_token_id"),
        ({"hidden_act": "tanhshrink"}, "hidden_act 'tanhshrink' is not supported"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob must be in"),
        ({"layer_norm_eps": 0.0}, "must be positive"),
    ],
)
def test_invariants_raise_clear_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        SplinterConfig.tiny(**overrides)


def test_wrong_model_type_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="from_bert"):
        SplinterConfig.from_dict({"model_type": "bert"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SplinterConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SplinterConfig.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SplinterConfig.from_pretrained(tmp_path / "empty")
