"""transformers as a test oracle: random tiny Splinter models, saved the way the hub saves them.

Other test files reuse these helpers, e.g.

    from tests.hf_oracle import make_hf_model, save_hf_model
    hf = make_hf_model("qa", seed=0)                 # eval-mode transformers SplinterForQuestionAnswering
    path = save_hf_model(hf, tmp_path / "ckpt")      # model.safetensors + config.json
    ours = load_pretrained(SplinterForQuestionAnswering, path)  # splinter.checkpoint

Only tests and benchmarks import transformers; `splinter/` never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from splinter.config import SplinterConfig

KINDS = ("qa", "pretraining", "base")

# Several tiny shapes: the transformers tester's sizes, an odd head split, a deeper/narrower one with a
# tanh-GELU, and a single-layer one with 3 token types and its own [QUESTION] id.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tester": {},
    "wide_heads": {"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 64},
    "deep_tanh": {"num_hidden_layers": 3, "num_attention_heads": 2, "hidden_act": "gelu_new"},
    "one_layer": {"num_hidden_layers": 1, "type_vocab_size": 3, "question_token_id": 7, "vocab_size": 50},
}


def tiny_config(**overrides: Any) -> SplinterConfig:
    """Our tiny config (dropout kept as in transformers' tester; tests run in eval mode)."""
    return SplinterConfig.tiny(**overrides)


def hf_config(config: SplinterConfig) -> Any:
    """The transformers SplinterConfig with the same fields as ours."""
    from transformers import SplinterConfig as HFSplinterConfig

    values = config.to_dict()
    values.pop("model_type", None)
    values.pop("architectures", None)
    return HFSplinterConfig(**values)


def _hf_class(kind: str) -> Any:
    import transformers

    classes = {
        "qa": transformers.SplinterForQuestionAnswering,
        "pretraining": transformers.SplinterForPreTraining,
        "base": transformers.SplinterModel,
    }
    if kind not in classes:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return classes[kind]


def make_hf_model(
    kind: str = "qa", config: SplinterConfig | None = None, seed: int = 0, perturb: float = 0.1
) -> Any:
    """A random transformers Splinter model in eval mode, reproducible from `seed`.

    After transformers' own init, every parameter gets N(0, perturb) noise so that LayerNorm weights and
    biases are not all 1/0: a swapped or dropped LayerNorm tensor then changes the outputs.
    """
    config = config or tiny_config()
    torch.manual_seed(seed)
    model = _hf_class(kind)(hf_config(config))
    if perturb:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * perturb)
    return model.eval()


def save_hf_model(model: Any, directory: str | Path, safe: bool = True, **kwargs: Any) -> Path:
    """transformers' save_pretrained: model.safetensors (safe) or pytorch_model.bin (safe=False)."""
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=safe, **kwargs)
    return directory


def build_and_save(
    directory: str | Path,
    kind: str = "qa",
    config: SplinterConfig | None = None,
    seed: int = 0,
    safe: bool = True,
    **save_kwargs: Any,
) -> tuple[Any, Path]:
    """make_hf_model + save_hf_model in one call; returns (transformers model, directory)."""
    model = make_hf_model(kind, config, seed)
    return model, save_hf_model(model, directory, safe=safe, **save_kwargs)


def load_hf_model(kind: str, directory: str | Path) -> Any:
    """transformers' from_pretrained of a directory (for ours-saved -> transformers-loaded checks)."""
    return _hf_class(kind).from_pretrained(str(directory)).eval()


def make_inputs(
    config: SplinterConfig,
    batch: int = 3,
    seq_len: int = 11,
    seed: int = 0,
    with_mask: bool = True,
    with_types: bool = True,
    questions_per_row: tuple[int, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Random ids ([CLS]-like id at 0, no stray [QUESTION]s), optional right padding and token types.

    `questions_per_row[b]` [QUESTION] tokens are placed in row b (at distinct positions after 0, inside
    the unpadded part); with_mask pads row b by b tokens (row 0 is never padded).
    """
    g = torch.Generator().manual_seed(seed)
    q_id, pad = config.question_token_id, config.pad_token_id
    ids = torch.randint(1, config.vocab_size, (batch, seq_len), generator=g)
    ids[ids == q_id] = (q_id + 1) % config.vocab_size or 1
    ids[ids == pad] = 1
    lengths = [max(4, seq_len - b) if with_mask else seq_len for b in range(batch)]
    if questions_per_row is not None:
        for b, n in enumerate(questions_per_row):
            spots = torch.randperm(lengths[b] - 1, generator=g)[:n] + 1
            ids[b, spots] = q_id
    out: dict[str, torch.Tensor] = {"input_ids": ids}
    if with_mask:
        mask = torch.zeros(batch, seq_len, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, :n] = 1
        ids.masked_fill_(mask == 0, pad)
        out["attention_mask"] = mask
    if with_types:
        types = torch.zeros(batch, seq_len, dtype=torch.long)
        for b in range(batch):
            cut = int(torch.randint(1, seq_len, (1,), generator=g))
            types[b, cut:] = torch.randint(0, config.type_vocab_size, (1,), generator=g)
        out["token_type_ids"] = types
    return out
