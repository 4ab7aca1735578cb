"""Splinter's tokenizer: cased WordPiece with the `[QUESTION] .` question template.

A thin, fast layer over the `tokenizers` library that behaves like transformers 4.57's
`SplinterTokenizerFast` (same ids, token types, offsets and overflow windows) without importing
transformers. This module builds the backend and the template; `splinter.encoding` holds the
transformers-style call arguments and `BatchEncoding`, `splinter.tokenizer_files` the files on disk,
and `splinter.windows` the bulk QA window builder.

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
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from splinter.encoding import (
    BatchEncoding,
    PairInput,
    check_text,
    collect_inputs,
    resolve_strategies,
    run_backend,
    to_tensor,
)
from splinter.tokenizer_files import (
    CONFIG_FILE,
    SPECIAL_NAMES,
    VOCAB_FILE,
    read_tokenizer_dir,
    read_vocab,
    write_tokenizer_dir,
)

__all__ = ["BatchEncoding", "SplinterTokenizer"]

QUESTION_TOKEN = "[QUESTION]"
# Splinter checkpoints have 512 position embeddings; longer inputs would crash the model, so this is
# the default limit (transformers' "no limit" value is 1e30 when a config does not say).
DEFAULT_MODEL_MAX_LENGTH = 512
# The special tokens a pair template adds: [CLS], [QUESTION], ".", [SEP], [SEP].
PAIR_SPECIAL_TOKENS = 5
SINGLE_SPECIAL_TOKENS = 2


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
        self.dot_token_id: int = backend.token_to_id(".")
        if self.dot_token_id is None:
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
        cls,
        directory: str | os.PathLike[str],
        question_token_id: int = 104,
        do_lower_case: bool | None = None,
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
            config_path = directory / CONFIG_FILE
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            do_lower_case = bool(config.get("do_lower_case", False))
        return cls(vocab, do_lower_case=do_lower_case)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **overrides: Any) -> SplinterTokenizer:
        """Load a tokenizer directory written by us or by transformers' Splinter tokenizers.

        Uses tokenizer.json when present (its WordPiece model and added tokens), else vocab.txt;
        settings from tokenizer_config.json and special_tokens_map.json, then `overrides`.
        The question template is always rebuilt from `padding_side`, so it cannot disagree with it.
        """
        vocab, kwargs = read_tokenizer_dir(directory)
        kwargs.update(overrides)
        return cls(vocab, **kwargs)

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
            **{name: getattr(self, name) for name in SPECIAL_NAMES},
            "question_token": self.question_token,
        }

    def save_pretrained(self, directory: str | os.PathLike[str]) -> tuple[str, ...]:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        Loadable by `SplinterTokenizer.from_pretrained`, transformers' `SplinterTokenizerFast`,
        `SplinterTokenizer` (slow) and `AutoTokenizer`.
        """
        base = self.vocab_size
        appended = {tok: idx for tok, idx in self.get_vocab().items() if idx >= base}
        return write_tokenizer_dir(directory, self._backend, self._config(), appended)

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
                (".", self.dot_token_id),
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
        check_text(text, "text")
        if pair is not None:
            check_text(pair, "pair")
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

    # ------------------------------------------------------------------ encoding

    def _reset_backend(self) -> None:
        self._backend.no_truncation()
        self._backend.no_padding()

    def backend_for_call(self) -> Tokenizer:
        """The backend with no truncation or padding set (each call sets its own): for bulk callers."""
        self._reset_backend()
        return self._backend

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
        batched, inputs = collect_inputs(text, text_pair)
        padding_kind, truncation_kind, max_length = resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of, self.model_max_length
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
        encodings = run_backend(backend, inputs, add_special_tokens)

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
            data = {k: to_tensor(k, v, return_tensors) for k, v in data.items()}
        return BatchEncoding(data, rows)

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
