"""BERT-family checkpoints into Splinter: the encoder's weights, a fresh QASS head, `[QUESTION]` in the vocab.

This is how the paper's baselines start, and how a Splinter is made from any BERT here (MiniLM in the
tests). BERT's key names differ from Splinter's only by prefix (`bert.` or none) and, in TF-era files,
LayerNorm `gamma`/`beta`; pooler and task heads are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splinter.checkpoint import (
    ENCODER_PREFIX,
    LEGACY_BUFFERS,
    QUESTION_TOKEN,
    VOCAB_NAME,
    M,
    _build,
    read_state_dict,
    save_pretrained,
)
from splinter.config import CONFIG_NAME, SplinterConfig
from splinter.model import SplinterForQuestionAnswering
from splinter.tokenizer import SplinterTokenizer

logger = logging.getLogger(__name__)

__all__ = ["bert_config_to_splinter", "bert_to_splinter", "load_from_bert", "question_token_id_from_vocab"]


def _canonical_bert(tensors: dict[str, Tensor], sources: dict[str, str]) -> tuple[dict, dict]:
    """BERT-family keys (`bert.*` or bare) -> canonical Splinter encoder keys; heads and pooler dropped."""
    prefixed = any(k.startswith("bert.") for k in tensors)
    out, src, dropped = {}, {}, []
    for key, value in tensors.items():
        if prefixed and not key.startswith("bert."):
            dropped.append(key)  # task heads beside the encoder: cls.* (MLM/NSP), classifier.*, qa_outputs.*
            continue
        name = key.removeprefix("bert.") if prefixed else key
        if name.startswith(("pooler.", "cls.")) or name in LEGACY_BUFFERS:
            dropped.append(key)
            continue
        # TF-era BERT checkpoints name LayerNorm parameters gamma/beta.
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[ENCODER_PREFIX + name], src[ENCODER_PREFIX + name] = value, sources[key]
    if dropped:
        logger.info(
            "from_bert: dropped %d tensors not used by Splinter (pooler/heads): %s", len(dropped), dropped
        )
    return out, src


def question_token_id_from_vocab(directory: str | Path) -> int | None:
    """Line index of [QUESTION] in <directory>/vocab.txt, or None when there is no such token or file."""
    path = Path(directory) / VOCAB_NAME
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            if line.rstrip("\r\n") == QUESTION_TOKEN:
                return index
    return None


def bert_config_to_splinter(directory: str | Path) -> SplinterConfig:
    """A SplinterConfig from a BERT-family config.json (+ vocab.txt for the [QUESTION] id)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}; pass a BERT checkpoint directory")
    values: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if values.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"{path}: position_embedding_type {values['position_embedding_type']!r} is not supported; "
            "Splinter uses absolute position embeddings"
        )
    if values.get("embedding_size", values.get("hidden_size")) != values.get("hidden_size"):
        raise ValueError(
            f"{path}: embedding_size differs from hidden_size (ALBERT/ELECTRA-style); not supported"
        )
    if values.get("model_type", "bert") != "bert":
        logger.warning(
            "from_bert: model_type is %r, not 'bert'; loading it as BERT", values.get("model_type")
        )
    fields = {f.name for f in dataclasses.fields(SplinterConfig)} - {
        "extra",
        "architectures",
        "question_token_id",
    }
    known = {k: v for k, v in values.items() if k in fields}
    question_id = question_token_id_from_vocab(directory)
    if question_id is None:
        question_id = SplinterConfig.question_token_id
        if question_id >= known.get("vocab_size", SplinterConfig.vocab_size):
            raise ValueError(
                f"{directory / VOCAB_NAME} has no {QUESTION_TOKEN} token and the default question_token_id "
                f"{question_id} is outside this vocabulary; add {QUESTION_TOKEN} to vocab.txt"
            )
        logger.warning(
            "from_bert: %s has no %s token; question_token_id stays %d. Add %s to the vocabulary "
            "(Splinter's replaces [unused100]) or set config.question_token_id before fine-tuning",
            directory / VOCAB_NAME,
            QUESTION_TOKEN,
            question_id,
            QUESTION_TOKEN,
        )
    return SplinterConfig(**known, question_token_id=question_id)


def load_from_bert(
    cls: type[M],
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> M:
    """A `cls` started from any BERT-family checkpoint directory: the encoder's weights, a fresh QASS head."""
    directory = Path(directory)
    config = bert_config_to_splinter(directory)
    tensors, sources = read_state_dict(directory)
    tensors, sources = _canonical_bert(tensors, sources)
    return _build(cls, config, tensors, sources, directory, dtype, device, qass_expected=False)


def bert_to_splinter(bert_dir: str | Path, output: str | Path, do_lower_case: bool | None = None) -> Path:
    """`splinter from-bert`: write a Splinter QA checkpoint (fresh QASS head) started from a BERT directory.

    `[QUESTION]` takes BERT's unused vocabulary slot 104 (see `SplinterTokenizer.for_bert`); casing comes
    from the BERT directory's tokenizer_config.json unless given. Refuses to write into `bert_dir` itself.
    """
    bert_dir, output = Path(bert_dir), Path(output)
    if not (bert_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{bert_dir} has no {CONFIG_NAME}: is it a BERT checkpoint directory?")
    if output.exists() and output.resolve() == bert_dir.resolve():
        raise ValueError(f"the output {output} is the BERT checkpoint itself: name a new directory")
    tokenizer = SplinterTokenizer.for_bert(bert_dir, do_lower_case=do_lower_case)
    # The BERT vocab has no [QUESTION] yet: the warning load_from_bert would print is answered here.
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = load_from_bert(SplinterForQuestionAnswering, bert_dir)
    finally:
        logger.setLevel(level)
    model.config.question_token_id = tokenizer.question_token_id
    return save_pretrained(model, output, tokenizer=tokenizer, qass_state="untrained")
