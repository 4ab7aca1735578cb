"""Splinter's tokenizer: cased WordPiece with the `[QUESTION] .` question template.

A thin, fast layer over the `tokenizers` library that behaves like transformers 4.57's
`SplinterTokenizerFast` (same ids, token types, offsets and overflow windows) without importing
transformers. Two entry points:

* `SplinterTokenizer.__call__` — the familiar transformers call for the common arguments
  (pairs, truncation, stride, overflow, padding, offsets, tensors), returning a `BatchEncoding`.
* `SplinterTokenizer.encode_qa_windows` — the bulk-QA path: question/context pairs to padded numpy
  window arrays; each distinct text is tokenized once in one `encode_batch` and the windows are
  assembled with numpy index arithmetic (no per-token Python).

Template (what the Splinter checkpoints were fine-tuned with), with `padding_side="right"`::

    [CLS] question [QUESTION] . [SEP] context [SEP]     token types 0 ... 0 | 1 ... 1

With `padding_side="left"` (context first, as run_qa.py does for left padding)::

    [CLS] context [SEP] question [QUESTION] . [SEP]     types 0 .. 0 | 1 .. 1 | 0 0 | 1

(the `[QUESTION] .` suffix gets type 0 there: that is what transformers' fast tokenizer produces; its
slow tokenizer would say 1). `[QUESTION]` and `.` of the template are special tokens: sequence id
None, offsets (0, 0).
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

__all__ = ["BatchEncoding", "SplinterTokenizer"]

VOCAB_FILE = "vocab.txt"
QUESTION_TOKEN = "[QUESTION]"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"

# Splinter checkpoints have 512 position embeddings; longer inputs would crash the model, so this is
# the default limit (transformers' "no limit" value is 1e30 when a config does not say).
DEFAULT_MODEL_MAX_LENGTH = 512
# transformers saves "no limit" as ~1e30; above this a model_max_length means "unbounded" (its rule too).
UNBOUNDED_LENGTH = int(1e20)
# The special tokens a pair template adds: [CLS], [QUESTION], ".", [SEP], [SEP].
PAIR_SPECIAL_TOKENS = 5
SINGLE_SPECIAL_TOKENS = 2

_SPECIAL_NAMES = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
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

PairInput = tuple[str, str]


def _token_content(value: Any) -> str | None:
    """A special token as saved by transformers: a plain string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    raise ValueError(f"cannot read a special token from {value!r}")


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


class SplinterTokenizer:
    """Fast Splinter tokenizer (cased WordPiece + `[QUESTION]` template) over `tokenizers.Tokenizer`.

    Build it with `from_vocab`, `from_pretrained` or `default()` (the bundled cased vocabulary).
    The constructor takes a vocabulary mapping or a ready backend `Tokenizer` whose model is WordPiece.

    Like transformers' fast tokenizers, each call sets the backend's truncation/padding state, so one
    instance must not be shared by concurrent threads (one per Ray actor or process is the intent).
    Instances pickle (the backend does), so they can also be shipped to workers.
    `encode_batch` parallelism follows the `tokenizers` convention (TOKENIZERS_PARALLELISM).
    """

    model_input_names = ("input_ids", "token_type_ids", "attention_mask")

    def __init__(
        self,
        vocab: Mapping[str, int] | Tokenizer,
        *,
        do_lower_case: bool = False,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        unk_token: str = "[UNK]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
        cls_token: str = "[CLS]",
        mask_token: str = "[MASK]",
        question_token: str = "[QUESTION]",
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        padding_side: str = "right",
        max_input_chars_per_word: int = 100,
    ) -> None:
        if isinstance(vocab, Tokenizer):
            backend = vocab
            if not isinstance(backend.model, WordPiece):
                raise ValueError(f"expected a WordPiece tokenizer, got {type(backend.model).__name__}")
        else:
            if unk_token not in vocab:
                raise ValueError(f"the vocabulary has no unknown token {unk_token!r}")
            backend = Tokenizer(
                WordPiece(dict(vocab), unk_token=unk_token, max_input_chars_per_word=max_input_chars_per_word)
            )
            backend.decoder = decoders.WordPiece(prefix="##")
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=tokenize_chinese_chars,
            strip_accents=strip_accents,
            lowercase=do_lower_case,
        )
        self._backend = backend
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.unk_token, self.sep_token, self.pad_token = unk_token, sep_token, pad_token
        self.cls_token, self.mask_token, self.question_token = cls_token, mask_token, question_token
        self.model_max_length = int(model_max_length)

        # Special tokens are matched in raw text before normalisation (so "[CLS]" in a document is one
        # token even when lowercasing), as transformers registers them. A vocabulary without
        # [QUESTION] gets it appended here, at id len(vocab).
        backend.add_special_tokens(
            [
                AddedToken(tok, special=True, normalized=False)
                for tok in (pad_token, unk_token, cls_token, sep_token, mask_token, question_token)
            ]
        )
        for name in ("unk", "sep", "pad", "cls", "mask", "question"):
            if getattr(self, f"{name}_token_id") is None:
                raise ValueError(f"special token {getattr(self, f'{name}_token')!r} has no id")
        self._dot_token_id = backend.token_to_id(".")
        if self._dot_token_id is None:
            raise ValueError("the vocabulary has no '.' token, which the Splinter question template needs")
        self.padding_side = padding_side  # builds the post-processor

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_vocab(
        cls, path: str | os.PathLike[str], do_lower_case: bool = False, **kwargs: Any
    ) -> SplinterTokenizer:
        """From a BERT-style vocab.txt (cased by default, unlike transformers' Splinter default)."""
        return cls(read_vocab(path), do_lower_case=do_lower_case, **kwargs)

    @classmethod
    def default(cls, **kwargs: Any) -> SplinterTokenizer:
        """The bundled Splinter vocabulary (bert-base-cased with `[QUESTION]` at id 104)."""
        resource = importlib.resources.files("splinter").joinpath("assets", VOCAB_FILE)
        with importlib.resources.as_file(resource) as path:
            return cls.from_vocab(path, **kwargs)

    @classmethod
    def for_bert(
        cls, directory: str | os.PathLike[str], question_token_id: int = 104, do_lower_case: bool | None = None
    ) -> SplinterTokenizer:
        """The tokenizer for a Splinter model initialised from a BERT checkpoint (`from_bert`).

        BERT vocabularies have no `[QUESTION]`. Splinter's published vocabulary puts it in the unused
        slot at id 104, so the same is done here (the embedding matrix keeps its size). Casing comes
        from the checkpoint's tokenizer_config.json unless given.
        """
        directory = Path(directory)
        vocab = read_vocab(directory / VOCAB_FILE)
        if QUESTION_TOKEN not in vocab:
            by_id = {i: t for t, i in vocab.items()}
            slot = by_id.get(question_token_id, "")
            if not (slot.startswith("[unused") and slot.endswith("]")):
                raise ValueError(
                    f"{directory / VOCAB_FILE}: id {question_token_id} is {slot!r}, not an unused slot; "
                    f"add {QUESTION_TOKEN} to the vocabulary yourself"
                )
            del vocab[slot]
            vocab[QUESTION_TOKEN] = question_token_id
        if do_lower_case is None:
            config_path = directory / "tokenizer_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            do_lower_case = bool(config.get("do_lower_case", False))
        return cls(vocab, do_lower_case=do_lower_case)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **overrides: Any) -> SplinterTokenizer:
        """Load a tokenizer directory written by us or by transformers' Splinter tokenizers.

        Uses tokenizer.json when present (its WordPiece model and added tokens), else vocab.txt.
        Settings come from tokenizer_config.json and special_tokens_map.json, then `overrides`.
        The question template is always rebuilt from `padding_side`, so it cannot disagree with it.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a directory; use from_vocab() for a vocab.txt file")
        config: dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_MAP_FILE, CONFIG_FILE):  # the config wins over the map
            path = directory / name
            if path.is_file():
                config.update(json.loads(path.read_text(encoding="utf-8")))
        kwargs: dict[str, Any] = {}
        for name in _SPECIAL_NAMES:
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
        kwargs.update(overrides)

        if (directory / TOKENIZER_FILE).is_file():
            backend = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
            # Settings the config does not give come from the saved normaliser.
            state = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else {}
            for name, key in (
                ("do_lower_case", "lowercase"),
                ("strip_accents", "strip_accents"),
                ("tokenize_chinese_chars", "handle_chinese_chars"),
            ):
                if name not in kwargs and key in state:
                    kwargs[name] = state[key]
            return cls(backend, **kwargs)
        if (directory / VOCAB_FILE).is_file():
            return cls.from_vocab(directory / VOCAB_FILE, **kwargs)
        raise ValueError(f"{directory} has neither {TOKENIZER_FILE} nor {VOCAB_FILE}")

    # ------------------------------------------------------------------ saving

    def _config(self) -> dict[str, Any]:
        # Deliberately no "additional_special_tokens": transformers' SplinterTokenizerFast passes its
        # own (question_token,) and crashes ("multiple values for keyword argument") when the saved
        # config lists it too. "question_token" carries it instead, which both transformers classes
        # and we read.
        return {
            "tokenizer_class": "SplinterTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": False,
            **{name: getattr(self, name) for name in _SPECIAL_NAMES},
            "question_token": self.question_token,
        }

    def save_vocabulary(self, directory: str | os.PathLike[str]) -> tuple[str]:
        """Write vocab.txt (the WordPiece model's tokens in id order); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = self._backend.get_vocab(with_added_tokens=False)
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("vocabulary ids are not contiguous; cannot write vocab.txt")
        path = directory / VOCAB_FILE
        path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        return (str(path),)

    def _appended_tokens(self) -> dict[str, int]:
        """Special tokens that live outside the WordPiece vocabulary (e.g. an appended [QUESTION])."""
        base = self.vocab_size
        return {tok: idx for tok, idx in self.get_vocab().items() if idx >= base}

    def save_pretrained(self, directory: str | os.PathLike[str]) -> tuple[str, ...]:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        Loadable by `SplinterTokenizer.from_pretrained`, transformers' `SplinterTokenizerFast`,
        `SplinterTokenizer` (slow) and `AutoTokenizer`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (vocab_path,) = self.save_vocabulary(directory)
        backend = Tokenizer.from_str(self._backend.to_str())  # a copy without call-time truncation/padding
        backend.no_truncation()
        backend.no_padding()
        backend.save(str(directory / TOKENIZER_FILE))
        config = self._config()
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        special_map = {name: config[name] for name in _SPECIAL_NAMES}
        (directory / SPECIAL_TOKENS_MAP_FILE).write_text(
            json.dumps(special_map, indent=2) + "\n", encoding="utf-8"
        )
        written = [str(directory / CONFIG_FILE), str(directory / SPECIAL_TOKENS_MAP_FILE), vocab_path]
        appended = self._appended_tokens()
        if appended:
            # vocab.txt cannot hold them; transformers' slow tokenizer reads them from here (the fast
            # one and ours find them in tokenizer.json, or re-append [QUESTION] at the same id).
            path = directory / ADDED_TOKENS_FILE
            path.write_text(json.dumps(appended, indent=2) + "\n", encoding="utf-8")
            written.append(str(path))
        written.append(str(directory / TOKENIZER_FILE))
        return tuple(written)

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (its truncation/padding state is set per call)."""
        return self._backend

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
        self._padding_side = side
        cls, sep, q = self.cls_token, self.sep_token, self.question_token
        # The pair template depends on the side: run_qa.py puts the question first when padding right
        # and the context first when padding left; [QUESTION] . always follows the question.
        if side == "right":
            pair = f"{cls}:0 $A:0 {q}:0 .:0 {sep}:0 $B:1 {sep}:1"
        else:
            pair = f"{cls}:0 $A:0 {sep}:0 $B:1 {q}:0 .:0 {sep}:1"
        self._backend.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0",
            pair=pair,
            special_tokens=[
                (cls, self.cls_token_id),
                (sep, self.sep_token_id),
                (q, self.question_token_id),
                (".", self._dot_token_id),
            ],
        )

    @property
    def vocab_size(self) -> int:
        """Size of the WordPiece vocabulary without appended tokens (like transformers); see `len()`."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """All ids, including a `[QUESTION]` appended to a vocabulary that lacked it."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def unk_token_id(self) -> int:
        return self._backend.token_to_id(self.unk_token)

    @property
    def sep_token_id(self) -> int:
        return self._backend.token_to_id(self.sep_token)

    @property
    def pad_token_id(self) -> int:
        return self._backend.token_to_id(self.pad_token)

    @property
    def cls_token_id(self) -> int:
        return self._backend.token_to_id(self.cls_token)

    @property
    def mask_token_id(self) -> int:
        return self._backend.token_to_id(self.mask_token)

    @property
    def question_token_id(self) -> int:
        return self._backend.token_to_id(self.question_token)

    @property
    def all_special_tokens(self) -> list[str]:
        return [
            self.unk_token,
            self.sep_token,
            self.pad_token,
            self.cls_token,
            self.mask_token,
            self.question_token,
        ]

    @property
    def all_special_ids(self) -> list[int]:
        return [self._backend.token_to_id(t) for t in self.all_special_tokens]

    def __repr__(self) -> str:
        return (
            f"SplinterTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
            f"padding_side={self.padding_side!r}, model_max_length={self.model_max_length})"
        )

    # ------------------------------------------------------------------ vocabulary helpers

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Unknown tokens map to the `[UNK]` id."""
        unk = self.unk_token_id
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return unk if found is None else found
        out = []
        for token in tokens:
            found = self._backend.token_to_id(token)
            out.append(unk if found is None else found)
        return out

    def convert_ids_to_tokens(
        self, ids: int | Iterable[int], skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        if isinstance(ids, int | np.integer):
            return self._backend.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in special]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        _check_text(text, "text")
        if pair is not None:
            _check_text(pair, "pair")
        self._reset_backend()
        return self._backend.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        return self(text, text_pair, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int | np.integer):
            ids = [int(ids)]
        elif hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ------------------------------------------------------------------ template helpers

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        cls, sep = [self.cls_token_id], [self.sep_token_id]
        if token_ids_1 is None:
            return cls + list(token_ids_0) + sep
        suffix = [self.question_token_id, self._dot_token_id]
        if self.padding_side == "right":
            return cls + list(token_ids_0) + suffix + sep + list(token_ids_1) + sep
        return cls + list(token_ids_0) + sep + list(token_ids_1) + suffix + sep

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 for template tokens (including `[QUESTION]` and `.`), 0 for text tokens.

        Matches the real template's length (transformers' slow tokenizer is 2 short for pairs).
        With `already_has_special_tokens`, marks ids that are special tokens (`.` is not one).
        """
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError(
                    "already_has_special_tokens=True takes one sequence of ids (with special tokens)"
                )
            special = set(self.all_special_ids)
            return [1 if int(i) in special else 0 for i in token_ids_0]
        a, b = [0] * len(token_ids_0), None if token_ids_1 is None else [0] * len(token_ids_1)
        if b is None:
            return [1] + a + [1]
        if self.padding_side == "right":
            return [1] + a + [1, 1, 1] + b + [1]
        return [1] + a + [1] + b + [1, 1, 1]

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Token types as the template assigns them (and transformers' fast tokenizer returns)."""
        n0 = len(token_ids_0)
        if token_ids_1 is None:
            return [0] * (n0 + 2)
        n1 = len(token_ids_1)
        if self.padding_side == "right":
            return [0] * (n0 + 4) + [1] * (n1 + 1)
        return [0] * (n0 + 2) + [1] * n1 + [0, 0, 1]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return PAIR_SPECIAL_TOKENS if pair else SINGLE_SPECIAL_TOKENS

    # ------------------------------------------------------------------ encoding

    def _reset_backend(self) -> None:
        self._backend.no_truncation()
        self._backend.no_padding()

    def __call__(
        self,
        text: str | Sequence[str] | Sequence[PairInput],
        text_pair: str | Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
    ) -> BatchEncoding:
        """Tokenize one text, one pair, or a batch, like transformers' fast tokenizers.

        Follows transformers' conventions: `truncation=True` means "longest_first"; `max_length`
        without `truncation` (and without padding) turns on "longest_first"; a missing `max_length`
        means `model_max_length`; a single (non-list) input returns unbatched lists unless
        overflow or tensors are requested; for a single pair, an empty `text_pair` is treated as
        no pair (transformers does the same).
        """
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        batched, inputs = _collect_inputs(text, text_pair)
        padding_kind, truncation_kind, max_length = self._resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of
        )
        if stride < 0:
            raise ValueError(f"stride must be >= 0, got {stride}")
        if truncation_kind is not None and stride > 0 and add_special_tokens:
            self._check_stride(inputs, truncation_kind, max_length, stride)

        backend = self._backend
        if truncation_kind is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(max_length, stride=stride, strategy=truncation_kind, direction="right")
        if padding_kind is None:
            backend.no_padding()
        else:
            backend.enable_padding(
                direction=self.padding_side,
                pad_id=self.pad_token_id,
                pad_type_id=0,
                pad_token=self.pad_token,
                length=max_length if padding_kind == "max_length" else None,
                pad_to_multiple_of=pad_to_multiple_of,
            )
        encodings = _run_backend(backend, inputs, add_special_tokens)

        rows: list[Encoding] = []
        sample: list[int] = []
        for i, enc in enumerate(encodings):
            group = [enc, *enc.overflowing] if return_overflowing_tokens else [enc]
            rows.extend(group)
            sample.extend([i] * len(group))

        data: dict[str, Any] = {"input_ids": [e.ids for e in rows]}
        if return_token_type_ids is None or return_token_type_ids:
            data["token_type_ids"] = [e.type_ids for e in rows]
        if return_attention_mask is None or return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in rows]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [e.offsets for e in rows]
        if return_length:
            data["length"] = [len(e.ids) for e in rows]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = sample

        if not batched and return_tensors is None and not return_overflowing_tokens:
            data = {k: v[0] for k, v in data.items()}
        elif return_tensors is not None:
            data = {k: _to_tensor(k, v, return_tensors) for k, v in data.items()}
        return BatchEncoding(data, rows)

    def _resolve_strategies(
        self,
        padding: bool | str,
        truncation: bool | str | None,
        max_length: int | None,
        pad_to_multiple_of: int | None,
    ) -> tuple[str | None, str | None, int | None]:
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
            if self.model_max_length > UNBOUNDED_LENGTH:
                # No real limit known (as transformers does): nothing to truncate or pad to.
                truncation_kind = None
                padding_kind = None if padding_kind == "max_length" else padding_kind
            else:
                max_length = self.model_max_length
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

    def _check_stride(
        self, inputs: list[str | PairInput], truncation: str, max_length: int, stride: int
    ) -> None:
        """Refuse a stride the backend cannot honour (it would panic) with a clear ValueError."""
        singles = [x for x in inputs if isinstance(x, str)]
        pairs = [x for x in inputs if not isinstance(x, str)]
        if (
            singles
            and truncation in ("longest_first", "only_first")
            and stride >= max_length - SINGLE_SPECIAL_TOKENS
        ):
            raise ValueError(
                f"stride ({stride}) must be smaller than max_length ({max_length}) minus "
                f"{SINGLE_SPECIAL_TOKENS} special tokens"
            )
        if not pairs or truncation == "longest_first":
            return  # longest_first budgets are data-dependent; the backend's own error is mapped instead
        kept = [p[0] if truncation == "only_second" else p[1] for p in pairs]
        self._reset_backend()
        longest = max(len(e) for e in self._backend.encode_batch(kept, add_special_tokens=False))
        room = max_length - longest - PAIR_SPECIAL_TOKENS
        if stride >= room:
            which = (
                "question" if (truncation == "only_second") == (self.padding_side == "right") else "kept text"
            )
            raise ValueError(
                f"stride ({stride}) must be smaller than max_length ({max_length}) minus the longest {which} "
                f"({longest} tokens) minus {PAIR_SPECIAL_TOKENS} special tokens (= {room}); "
                "lower the stride, raise max_length, or shorten the kept sequence"
            )

    # ------------------------------------------------------------------ bulk QA windows

    def encode_qa_windows(
        self,
        questions: Sequence[str],
        contexts: Sequence[str],
        max_length: int = 384,
        stride: int = 128,
        max_query_length: int | None = 64,
        pad_to_max_length: bool = False,
    ) -> dict[str, np.ndarray]:
        """Question/context pairs -> overlapping windows as numpy arrays (run_qa.py style).

        Each pair gets the Splinter template and its context is split into windows of at most
        `max_length` tokens overlapping by `stride` context tokens: the same windows, in the same
        order, as `__call__(questions, contexts, truncation="only_second", max_length=...,
        stride=..., return_overflowing_tokens=True)` (and transformers), or, with
        padding_side="left", as `__call__(contexts, questions, truncation="only_first", ...)`.
        Questions longer than `max_query_length` tokens keep only their first `max_query_length`
        tokens, as the original Splinter fine-tuning code did (identical to cutting the question text
        after that token); None keeps them whole.

        How: every distinct question and context is tokenized once, without the template, in one
        `encode_batch`; the windows are then assembled with numpy index arithmetic. That skips the
        backend's per-window `Encoding` copies and re-tokenizing repeated contexts.

        Returns, with W windows over N pairs and L = longest window (or `max_length`):
          input_ids, token_type_ids, attention_mask: int32 [W, L], right-padded with [PAD] / 0 / 0;
          offsets: int32 [W, L, 2] character (start, end) in the context, -1 for every non-context
            token (question, template tokens, padding);
          lengths: int32 [W] real tokens per window;
          sample_index: int32 [W] index of the source pair (windows of a pair are consecutive);
          question_position: int32 [W] index of the [QUESTION] token;
          context_start, context_end: int32 [W] token range [start, end) of the context in the window;
          question_truncated: bool [N] whether the question was cut to max_query_length.
        """
        questions = _check_text_list(questions, "questions")
        contexts = _check_text_list(contexts, "contexts")
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        if max_length <= PAIR_SPECIAL_TOKENS:
            raise ValueError(f"max_length must exceed {PAIR_SPECIAL_TOKENS}, got {max_length}")
        if stride < 0:
            raise ValueError(f"stride must be >= 0, got {stride}")
        if max_query_length is not None and max_query_length < 1:
            raise ValueError(f"max_query_length must be >= 1 or None, got {max_query_length}")
        n = len(questions)
        if n == 0:
            return _empty_windows(max_length if pad_to_max_length else 0)

        # Tokenize each distinct text once (QA batches repeat contexts, and often questions).
        uq, q_of = _unique(questions)
        uc, c_of = _unique(contexts)
        self._reset_backend()
        encodings = _run_backend(self._backend, uq + uc, False)
        q_ids, q_base, q_len = _flatten_ids(encodings[: len(uq)])
        c_ids, c_base, c_len = _flatten_ids(encodings[len(uq) :])
        c_offsets = np.fromiter(
            itertools.chain.from_iterable(
                itertools.chain.from_iterable(e.offsets for e in encodings[len(uq) :])
            ),
            dtype=np.int32,
            count=2 * len(c_ids),
        ).reshape(-1, 2)

        nq = q_len[q_of]  # (N,)
        truncated = np.zeros(n, dtype=bool)
        if max_query_length is not None:
            truncated = nq > max_query_length
            nq = np.minimum(nq, max_query_length)
        nc = c_len[c_of]
        room = max_length - nq - PAIR_SPECIAL_TOKENS  # context tokens per window, per pair
        worst = int(np.argmin(room))
        if stride >= room[worst]:
            raise ValueError(
                f"stride ({stride}) must be smaller than max_length ({max_length}) minus the question "
                f"({int(nq[worst])} tokens for pair {worst}) minus {PAIR_SPECIAL_TOKENS} special tokens "
                f"(= {int(room[worst])}); lower the stride, raise max_length, or set max_query_length"
            )

        # The backend's overflow rule: windows start at 0, step, 2*step, ... (step = room - stride)
        # and stop at the first one that reaches the end of the context.
        step = room - stride
        n_windows = 1 + (np.maximum(nc - room, 0) + step - 1) // step  # (N,)
        sample_index = np.repeat(np.arange(n, dtype=np.int32), n_windows)  # (W,)
        first_window = np.cumsum(n_windows) - n_windows
        k = np.arange(len(sample_index)) - first_window[sample_index]  # window number within its pair
        c_start = k * step[sample_index]  # (W,) first context token of the window
        c_count = np.minimum(c_start + room[sample_index], nc[sample_index]) - c_start
        wq = nq[sample_index]
        lengths = (wq + c_count + PAIR_SPECIAL_TOKENS).astype(np.int32)
        w = len(lengths)

        width = max_length if pad_to_max_length else int(lengths.max())
        pos = np.arange(width, dtype=np.int64)[None, :]  # (1, L)
        if self.padding_side == "right":
            # [CLS] q(nq) [QUESTION] . [SEP] context [SEP]
            question_start = np.ones(w, dtype=np.int64)
            question_position = wq + 1
            context_start = wq + 4
        else:
            # [CLS] context [SEP] q(nq) [QUESTION] . [SEP]
            context_start = np.ones(w, dtype=np.int64)
            question_start = c_count + 2
            question_position = lengths - 3
        context_end = context_start + c_count

        input_ids = np.full((w, width), self.pad_token_id, dtype=np.int32)
        rows = np.arange(w)
        input_ids[:, 0] = self.cls_token_id
        input_ids[rows, question_position] = self.question_token_id
        input_ids[rows, question_position + 1] = self._dot_token_id
        input_ids[rows, question_position + 2] = self.sep_token_id
        input_ids[rows, lengths - 1] = self.sep_token_id
        if self.padding_side == "left":
            input_ids[rows, context_end] = self.sep_token_id

        in_question = (pos >= question_start[:, None]) & (pos < (question_start + wq)[:, None])  # (W, L)
        r, col = np.nonzero(in_question)
        input_ids[r, col] = q_ids[q_base[q_of[sample_index[r]]] + col - question_start[r]]

        in_context = (pos >= context_start[:, None]) & (pos < context_end[:, None])  # (W, L)
        r, col = np.nonzero(in_context)
        src = c_base[c_of[sample_index[r]]] + c_start[r] + col - context_start[r]
        input_ids[r, col] = c_ids[src]
        offsets = np.full((w, width, 2), -1, dtype=np.int32)
        offsets[r, col] = c_offsets[src]

        real = pos < lengths[:, None]
        if self.padding_side == "right":
            type_ids = (pos >= context_start[:, None]) & real
        else:  # transformers' fast template: question 1, "[QUESTION] ." 0, final [SEP] 1
            type_ids = in_question | (pos == (lengths - 1)[:, None])
        return {
            "input_ids": input_ids,
            "token_type_ids": type_ids.astype(np.int32),
            "attention_mask": real.astype(np.int32),
            "offsets": offsets,
            "lengths": lengths,
            "sample_index": sample_index,
            "question_position": question_position.astype(np.int32),
            "context_start": context_start.astype(np.int32),
            "context_end": context_end.astype(np.int32),
            "question_truncated": truncated,
        }


# ---------------------------------------------------------------------- helpers


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")


def _check_text_list(values: Any, what: str) -> list[str]:
    if values is None or isinstance(values, str):
        raise TypeError(f"{what} must be a list of str, got {type(values).__name__}")
    out = list(values)
    for i, value in enumerate(out):
        if not isinstance(value, str):
            raise TypeError(
                f"{what}[{i}] must be a str, got {type(value).__name__} (drop or fill missing rows first)"
            )
    return out


def _collect_inputs(text: Any, text_pair: Any) -> tuple[bool, list[str | PairInput]]:
    """Normalise __call__'s inputs to (batched?, [str | (str, str)])."""
    if text is None:
        raise TypeError("text must be a str, a list of str, or a list of (str, str) pairs; got None")
    if isinstance(text, str):
        if text_pair is None or text_pair == "":
            # transformers drops an empty single text_pair (it tests truthiness); do the same.
            return False, [text]
        _check_text(text_pair, "text_pair")
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
        _check_text(a, f"text[{i}]")
        _check_text(b, f"text_pair[{i}]")
    return True, list(zip(texts, pairs_list, strict=True))


def _unique(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts in first-seen order and, per input, the index of its distinct text."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
    return list(index), inverse


def _flatten_ids(encodings: list[Encoding]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of many encodings back to back, with each one's start and length."""
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    base = np.cumsum(lengths) - lengths
    ids = np.fromiter(
        itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum())
    )
    return ids, base, lengths


def _run_backend(backend: Tokenizer, inputs: list[Any], add_special_tokens: bool) -> list[Encoding]:
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


def _to_tensor(key: str, value: list[Any], kind: str) -> Any:
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


def _empty_windows(width: int) -> dict[str, np.ndarray]:
    i32 = np.int32
    return {
        "input_ids": np.zeros((0, width), dtype=i32),
        "token_type_ids": np.zeros((0, width), dtype=i32),
        "attention_mask": np.zeros((0, width), dtype=i32),
        "offsets": np.zeros((0, width, 2), dtype=i32),
        "lengths": np.zeros(0, dtype=i32),
        "sample_index": np.zeros(0, dtype=i32),
        "question_position": np.zeros(0, dtype=i32),
        "context_start": np.zeros(0, dtype=i32),
        "context_end": np.zeros(0, dtype=i32),
        "question_truncated": np.zeros(0, dtype=bool),
    }
