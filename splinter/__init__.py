"""Splinter in plain PyTorch: config, tokenizer, encoder, QASS heads, checkpoints.

Public names are resolved lazily so that `import splinter` stays cheap (the CLI and
Ray workers import it often) and so that only `torch` is needed to use the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SplinterConfig": "splinter.config",
    "SplinterTokenizer": "splinter.tokenizer",
    "SplinterModel": "splinter.model",
    "SplinterForQuestionAnswering": "splinter.model",
    "SplinterForPreTraining": "splinter.model",
    "SplinterOutput": "splinter.model",
    "load_pretrained": "splinter.checkpoint",
    "load_from_bert": "splinter.bert",
    "save_pretrained": "splinter.checkpoint",
}

__all__ = [
    "SplinterConfig",
    "SplinterForPreTraining",
    "SplinterForQuestionAnswering",
    "SplinterModel",
    "SplinterOutput",
    "SplinterTokenizer",
    "load_from_bert",
    "load_pretrained",
    "save_pretrained",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splinter' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from splinter.bert import load_from_bert
    from splinter.checkpoint import load_pretrained, save_pretrained
    from splinter.config import SplinterConfig
    from splinter.model import (
        SplinterForPreTraining,
        SplinterForQuestionAnswering,
        SplinterModel,
        SplinterOutput,
    )
    from splinter.tokenizer import SplinterTokenizer
