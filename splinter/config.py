"""SplinterConfig: one flat dataclass whose fields are named exactly as in transformers' config.json.

Field names and defaults match transformers' `SplinterConfig`, so a hub `config.json` loads as-is and ours
loads in transformers. Keys we do not model (`transformers_version`, `torch_dtype`, ...) are kept in
`extra` and written back unchanged, so a load/save round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_TYPE = "splinter"

# Activations the encoder's feed-forward supports (names as in transformers' ACT2FN).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")

# Generic keys every transformers config.json carries; keeping them in `extra` is expected, not news.
_GENERIC_HF_KEYS = frozenset(
    {
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "bos_token_id",
        "eos_token_id",
        "gradient_checkpointing",
        "position_embedding_type",
        "classifier_dropout",
        "is_decoder",
        "add_cross_attention",
        "chunk_size_feed_forward",
        "tie_word_embeddings",
    }
)

MODEL_SIZES = {  # BERT-base and BERT-large shapes, as Splinter-base/-large use
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}


@dataclass
class SplinterConfig:
    """Hyper-parameters of a Splinter encoder and its QASS head (transformers' names and defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    use_cache: bool = True
    pad_token_id: int = 0
    question_token_id: int = 104
    # The model class a checkpoint was saved from, e.g. ["SplinterForQuestionAnswering"].
    architectures: list[str] | None = None
    # Keys of config.json that no field models; written back verbatim by `to_dict`.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SplinterConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick a head count that divides it"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"SplinterConfig.{name} must be in [0, 1), got {value!r}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("layer_norm_eps and initializer_range must be positive")
        for name in ("pad_token_id", "question_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"SplinterConfig.{name}={value!r} must be a token id in [0, vocab_size={self.vocab_size})"
                )
        if self.question_token_id == self.pad_token_id:
            raise ValueError(
                "question_token_id must differ from pad_token_id (padded questions use the pad id)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ----------------------------------------------------------------------------------------- constructors
    @classmethod
    def tiny(cls, **overrides: Any) -> SplinterConfig:
        """The transformers tester's tiny sizes (vocab grown to hold [QUESTION]=104), for fast tests."""
        values: dict[str, Any] = {
            "vocab_size": 112,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SplinterConfig:
        """Build from a config.json mapping; unknown keys go to `extra` (and are written back)."""
        values = dict(values)
        model_type = values.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            hint = (
                " (use `from_bert` to start Splinter from a BERT checkpoint)" if model_type == "bert" else ""
            )
            raise ValueError(f"config has model_type {model_type!r}, expected {MODEL_TYPE!r}{hint}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = dict(values.pop("extra", None) or {})
        extra.update({k: v for k, v in values.items() if k not in names})
        unusual = sorted(set(extra) - _GENERIC_HF_KEYS)
        if unusual:
            logger.warning("config keys not used by Splinter (kept for round-trip): %s", ", ".join(unusual))
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> SplinterConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(values)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SplinterConfig:
        """Read `<directory>/config.json`."""
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}; pass a checkpoint directory")
        return cls.from_json_file(path)

    # ------------------------------------------------------------------------------------------ serialising
    def to_dict(self) -> dict[str, Any]:
        """config.json mapping: extra keys first, then our fields (ours win), plus `model_type`."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "architectures" and value is None:
                continue
            out[f.name] = list(value) if isinstance(value, list) else value
        out["model_type"] = MODEL_TYPE
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `<directory>/config.json` (creating the directory); returns the file path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path
