"""Tokenizer directories on disk: what transformers' Splinter/BERT tokenizers write, read back as plain data.

This module knows file names and formats only; `SplinterTokenizer` turns what it reads into a tokenizer
and hands it what to write, so the dependency runs one way (tokenizer -> files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"

SPECIAL_NAMES = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_vocab(path: str | os.PathLike[str]) -> dict[str, int]:
    """vocab.txt (one token per line, id = line number) -> {token: id}, as BERT tools read it."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        # Only the newline is stripped: tokens may legitimately contain other whitespace.
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index
    if not vocab:
        raise ValueError(f"vocabulary file {path} is empty")
    return vocab


def _token_content(value: Any) -> str | None:
    """A special token as saved by transformers: a plain string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    raise ValueError(f"cannot read a special token from {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or delete it to fall back") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return value


def read_tokenizer_dir(
    directory: str | os.PathLike[str],
) -> tuple[Tokenizer | dict[str, int], dict[str, Any]]:
    """(backend Tokenizer or vocabulary, SplinterTokenizer keyword arguments) of a tokenizer directory.

    tokenizer.json wins over vocab.txt. Settings come from special_tokens_map.json, then
    tokenizer_config.json (the config wins), then, for casing and accents the config does not give,
    the saved normaliser.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory; use from_vocab() for a vocab.txt file")
    config: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP_FILE, CONFIG_FILE):
        path = directory / name
        if path.is_file():
            config.update(_read_json(path))
    kwargs: dict[str, Any] = {}
    for name in SPECIAL_NAMES:
        value = _token_content(config.get(name))
        if value is not None:
            kwargs[name] = value
    question = _token_content(config.get("question_token"))
    if question is None:
        # transformers lists [QUESTION] under additional_special_tokens (and nowhere else).
        extra = [_token_content(t) for t in config.get("additional_special_tokens") or []]
        question = "[QUESTION]" if "[QUESTION]" in extra or not extra else extra[0]
    kwargs["question_token"] = question
    for name in ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "padding_side"):
        if name in config:
            kwargs[name] = config[name]
    if isinstance(config.get("model_max_length"), int | float):
        kwargs["model_max_length"] = int(config["model_max_length"])

    if (directory / TOKENIZER_FILE).is_file():
        try:
            backend = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as err:  # tokenizers raises a bare Exception for unreadable files
            raise ValueError(
                f"{directory / TOKENIZER_FILE} cannot be read ({err}); restore it, or delete it to use "
                f"{VOCAB_FILE}"
            ) from None
        state = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else {}
        for name, key in (
            ("do_lower_case", "lowercase"),
            ("strip_accents", "strip_accents"),
            ("tokenize_chinese_chars", "handle_chinese_chars"),
        ):
            if name not in kwargs and key in state:
                kwargs[name] = state[key]
        return backend, kwargs
    if (directory / VOCAB_FILE).is_file():
        return read_vocab(directory / VOCAB_FILE), kwargs
    raise ValueError(f"{directory} has neither {TOKENIZER_FILE} nor {VOCAB_FILE}")


def write_tokenizer_dir(
    directory: str | os.PathLike[str],
    backend: Tokenizer,
    config: dict[str, Any],
    appended: dict[str, int],
) -> tuple[str, ...]:
    """Write vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json (+ added_tokens.json).

    `backend` is saved without call-time truncation or padding; `appended` are special tokens outside
    the WordPiece vocabulary, which vocab.txt cannot hold (transformers' slow tokenizer reads them from
    added_tokens.json; the fast one and ours find them in tokenizer.json).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = backend.get_vocab(with_added_tokens=False)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("vocabulary ids are not contiguous; cannot write vocab.txt")
    vocab_path = directory / VOCAB_FILE
    vocab_path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    clean = Tokenizer.from_str(backend.to_str())
    clean.no_truncation()
    clean.no_padding()
    clean.save(str(directory / TOKENIZER_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special_map = {name: config[name] for name in SPECIAL_NAMES}
    (directory / SPECIAL_TOKENS_MAP_FILE).write_text(
        json.dumps(special_map, indent=2) + "\n", encoding="utf-8"
    )
    written = [str(directory / CONFIG_FILE), str(directory / SPECIAL_TOKENS_MAP_FILE), str(vocab_path)]
    if appended:
        path = directory / ADDED_TOKENS_FILE
        path.write_text(json.dumps(appended, indent=2) + "\n", encoding="utf-8")
        written.append(str(path))
    written.append(str(directory / TOKENIZER_FILE))
    return tuple(written)
