"""The transformers-style call interface of `SplinterTokenizer`: argument resolution and `BatchEncoding`.

Kept apart from the tokenizer itself so the familiar call (padding/truncation/overflow/tensors, as in
transformers' fast tokenizers) does not crowd the template and vocabulary logic; code written against
transformers ports by changing an import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

__all__ = ["BatchEncoding"]

PairInput = tuple[str, str]

# transformers saves "no limit" as ~1e30; above this a model_max_length means "unbounded" (its rule too).
UNBOUNDED_LENGTH = int(1e20)

_TRUNCATION = {
    True: "longest_first",
    "longest_first": "longest_first",
    "only_first": "only_first",
    "only_second": "only_second",
    False: None,
    "do_not_truncate": None,
}
_PADDING = {
    True: "longest",
    "longest": "longest",
    "max_length": "max_length",
    False: None,
    "do_not_pad": None,
}


class BatchEncoding(dict):
    """What `SplinterTokenizer.__call__` returns: a dict of model inputs plus the backend encodings.

    Mirrors the parts of transformers' `BatchEncoding` that QA code uses: key access (also as
    attributes), `encodings`, `tokens`, `sequence_ids`, `word_ids`, `char_to_token`, `token_to_chars`
    and `to(device)` for torch tensors.
    """

    def __init__(self, data: Mapping[str, Any] | None = None, encodings: list[Encoding] | None = None):
        super().__init__(data or {})
        self._encodings = encodings

    @property
    def encodings(self) -> list[Encoding] | None:
        """One `tokenizers.Encoding` per row (overflow windows flattened, like transformers)."""
        return self._encodings

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _encoding(self, batch_index: int) -> Encoding:
        if not self._encodings:
            raise ValueError("this BatchEncoding carries no backend encodings")
        return self._encodings[batch_index]

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self._encoding(batch_index).tokens

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """Per token: 0 (first text), 1 (second text) or None (special tokens incl. `[QUESTION] .`)."""
        return self._encoding(batch_index).sequence_ids

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        return self._encoding(batch_index).word_ids

    def char_to_token(
        self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0
    ) -> int | None:
        if char_index is None:
            batch_index, char_index = 0, batch_or_char_index
        else:
            batch_index = batch_or_char_index
        return self._encoding(batch_index).char_to_token(char_index, sequence_index)

    def token_to_chars(
        self, batch_or_token_index: int, token_index: int | None = None
    ) -> tuple[int, int] | None:
        if token_index is None:
            batch_index, token_index = 0, batch_or_token_index
        else:
            batch_index = batch_or_token_index
        return self._encoding(batch_index).token_to_chars(token_index)

    def to(self, device: Any) -> BatchEncoding:
        """Move torch tensors to `device` (in place, returns self)."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


def resolve_strategies(
    padding: bool | str,
    truncation: bool | str | None,
    max_length: int | None,
    pad_to_multiple_of: int | None,
    model_max_length: int,
) -> tuple[str | None, str | None, int | None]:
    """(padding kind, truncation kind, max_length) from transformers-style arguments, as it resolves them."""
    if padding not in _PADDING:
        raise ValueError(f"padding must be one of {sorted(map(str, _PADDING))}, got {padding!r}")
    padding_kind = _PADDING[padding]
    if truncation is None:
        # transformers: a max_length alone (no padding) means "truncate to it".
        truncation = max_length is not None and padding_kind is None
    if truncation not in _TRUNCATION:
        raise ValueError(f"truncation must be one of {sorted(map(str, _TRUNCATION))}, got {truncation!r}")
    truncation_kind = _TRUNCATION[truncation]
    if max_length is None and (truncation_kind is not None or padding_kind == "max_length"):
        if model_max_length > UNBOUNDED_LENGTH:
            # No real limit known (as transformers does): nothing to truncate or pad to.
            truncation_kind = None
            padding_kind = None if padding_kind == "max_length" else padding_kind
        else:
            max_length = model_max_length
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if (
        truncation_kind is not None
        and padding_kind is not None
        and pad_to_multiple_of is not None
        and max_length is not None
        and max_length % pad_to_multiple_of != 0
    ):
        raise ValueError(
            f"truncation and padding are both on: max_length ({max_length}) must be a multiple of "
            f"pad_to_multiple_of ({pad_to_multiple_of})"
        )
    return padding_kind, truncation_kind, max_length


def check_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")


def check_text_list(values: Any, what: str) -> list[str]:
    if values is None or isinstance(values, str):
        raise TypeError(f"{what} must be a list of str, got {type(values).__name__}")
    out = list(values)
    for i, value in enumerate(out):
        if not isinstance(value, str):
            raise TypeError(
                f"{what}[{i}] must be a str, got {type(value).__name__} (drop or fill missing rows first)"
            )
    return out


def collect_inputs(text: Any, text_pair: Any) -> tuple[bool, list[str | PairInput]]:
    """Normalise __call__'s inputs to (batched?, [str | (str, str)])."""
    if text is None:
        raise TypeError("text must be a str, a list of str, or a list of (str, str) pairs; got None")
    if isinstance(text, str):
        if text_pair is None or text_pair == "":
            # transformers drops an empty single text_pair (it tests truthiness); do the same.
            return False, [text]
        check_text(text_pair, "text_pair")
        return False, [(text, text_pair)]
    if not isinstance(text, Sequence | np.ndarray):
        raise TypeError(f"text must be a str or a list, got {type(text).__name__}")
    texts = list(text)
    if text_pair is None:
        inputs: list[str | PairInput] = []
        for i, item in enumerate(texts):
            if isinstance(item, str):
                inputs.append(item)
            elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(s, str) for s in item):
                inputs.append((item[0], item[1]))
            else:
                raise TypeError(f"text[{i}] must be a str or a (str, str) pair, got {type(item).__name__}")
        return True, inputs
    if isinstance(text_pair, str) or not isinstance(text_pair, Sequence | np.ndarray):
        raise TypeError("when text is a list, text_pair must be a list of the same length")
    pairs_list = list(text_pair)
    if len(pairs_list) != len(texts):
        raise ValueError(f"text has {len(texts)} items but text_pair has {len(pairs_list)}")
    for i, (a, b) in enumerate(zip(texts, pairs_list, strict=True)):
        check_text(a, f"text[{i}]")
        check_text(b, f"text_pair[{i}]")
    return True, list(zip(texts, pairs_list, strict=True))


def run_backend(backend: Tokenizer, inputs: list[Any], add_special_tokens: bool) -> list[Encoding]:
    try:
        return backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
    except Exception as exc:  # tokenizers reports truncation problems as bare Exceptions
        raise ValueError(f"tokenization failed: {exc}") from exc
    except BaseException as exc:
        # A Rust panic (e.g. stride too large for a longest_first budget) surfaces as PanicException,
        # a BaseException; turn it into the ValueError callers expect.
        if type(exc).__name__ == "PanicException":
            raise ValueError(f"tokenization failed: {exc}") from None
        raise


def to_tensor(key: str, value: list[Any], kind: str) -> Any:
    lengths = {len(v) for v in value} if value and isinstance(value[0], list) else set()
    if len(lengths) > 1:
        raise ValueError(
            f"cannot make a tensor of {key!r}: rows have different lengths {sorted(lengths)[:5]}; "
            "pass padding=True (or 'max_length')"
        )
    array = np.asarray(value, dtype=np.int64)
    if key == "offset_mapping" and array.ndim == 2 and array.shape[1] == 0:
        array = array.reshape(array.shape[0], 0, 2)
    if kind == "np":
        return array
    if kind == "pt":
        import torch  # only when asked for: the tokenizer itself never needs torch

        return torch.from_numpy(array)
    raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {kind!r}")
