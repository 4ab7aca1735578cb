"""Checkpoints: transformers-format Splinter directories in and out, and BERT checkpoints in.

This file holds the ONE map between our short module names and transformers' key names (see the module
docstring of splinter/model.py for why). Each entry maps one of our tensors to one or more checkpoint
tensors; several are concatenated along dim 0 (query|key|value -> our fused `qkv`) and split again on save.
Every key on both sides must be consumed, so a renamed or missing tensor is an error, never a silent skip.

Canonical checkpoint keys used internally are transformers' SplinterForQuestionAnswering names:
`splinter.<encoder key>` and `splinter_qass.<head key>`.

Loading and saving are functions of this module rather than methods of the networks, so the dependency
runs one way: checkpoint -> model. `load_pretrained(SplinterForQuestionAnswering, path)` is the
counterpart of transformers' `SplinterForQuestionAnswering.from_pretrained(path)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from splinter.config import SplinterConfig
from splinter.model import init_weights, skipped_init

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_BIN_NAME = "pytorch_model.bin"
TORCH_BIN_INDEX_NAME = "pytorch_model.bin.index.json"
VOCAB_NAME = "vocab.txt"
QUESTION_TOKEN = "[QUESTION]"

# The QASS head's history, in model.safetensors' metadata (transformers ignores it, and a transformers
# save, e.g. after fine-tuning there, drops it): "untrained" from `from-bert`, "trained" from `finetune`.
QASS_STATE_KEY = "splinter_qass_head"
QASS_STATES = ("trained", "untrained")

ENCODER_PREFIX = "splinter."
QASS_PREFIX = "splinter_qass."
# transformers registers `position_ids` as a non-persistent buffer; old .bin files still carry it.
LEGACY_BUFFERS = ("embeddings.position_ids",)

# ours (relative to SplinterModel)  ->  checkpoint key(s) (relative to the `splinter.` prefix)
_EMBEDDING_MAP: dict[str, tuple[str, ...]] = {
    "wte.weight": ("embeddings.word_embeddings.weight",),
    "wpe.weight": ("embeddings.position_embeddings.weight",),
    "wtt.weight": ("embeddings.token_type_embeddings.weight",),
    "ln_emb.weight": ("embeddings.LayerNorm.weight",),
    "ln_emb.bias": ("embeddings.LayerNorm.bias",),
}
_LAYER_MAP: dict[str, tuple[str, ...]] = {
    "layers.{i}.qkv.{p}": (
        "encoder.layer.{i}.attention.self.query.{p}",
        "encoder.layer.{i}.attention.self.key.{p}",
        "encoder.layer.{i}.attention.self.value.{p}",
    ),
    "layers.{i}.attn_out.{p}": ("encoder.layer.{i}.attention.output.dense.{p}",),
    "layers.{i}.ln_attn.{p}": ("encoder.layer.{i}.attention.output.LayerNorm.{p}",),
    "layers.{i}.ff_in.{p}": ("encoder.layer.{i}.intermediate.dense.{p}",),
    "layers.{i}.ff_out.{p}": ("encoder.layer.{i}.output.dense.{p}",),
    "layers.{i}.ln_ff.{p}": ("encoder.layer.{i}.output.LayerNorm.{p}",),
}
# ours (relative to the QASS head `qass.`)  ->  checkpoint key (relative to `splinter_qass.`)
_QASS_MAP: dict[str, tuple[str, ...]] = {
    **{
        f"{ours}.{sub}.{p}": (f"{theirs}.{sub_theirs}.{p}",)
        for ours, theirs in (
            ("q_start", "query_start_transform"),
            ("q_end", "query_end_transform"),
            ("start", "start_transform"),
            ("end", "end_transform"),
        )
        for sub, sub_theirs in (("dense", "dense"), ("ln", "LayerNorm"))
        for p in ("weight", "bias")
    },
    "start_bilinear.weight": ("start_classifier.weight",),
    "end_bilinear.weight": ("end_classifier.weight",),
}


def key_map(config: SplinterConfig, with_qass: bool) -> dict[str, tuple[str, ...]]:
    """Full map for a model: our state_dict key -> canonical checkpoint key(s).

    With the head, our keys are those of SplinterFor* (`splinter.*`, `qass.*`); without it, those of a bare
    SplinterModel. Checkpoint keys are always canonical (`splinter.*`, `splinter_qass.*`).
    """
    ours_prefix = ENCODER_PREFIX if with_qass else ""
    out: dict[str, tuple[str, ...]] = {}
    for ours, theirs in _EMBEDDING_MAP.items():
        out[ours_prefix + ours] = tuple(ENCODER_PREFIX + t for t in theirs)
    for i in range(config.num_hidden_layers):
        for p in ("weight", "bias"):
            for ours, theirs in _LAYER_MAP.items():
                out[ours_prefix + ours.format(i=i, p=p)] = tuple(
                    ENCODER_PREFIX + t.format(i=i, p=p) for t in theirs
                )
    if with_qass:
        for ours, theirs in _QASS_MAP.items():
            out["qass." + ours] = tuple(QASS_PREFIX + t for t in theirs)
    return out


# ------------------------------------------------------------------------------------------ reading files
def read_state_dict(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a checkpoint directory on CPU, plus the file each key came from.

    Looks for model.safetensors, its sharded index, pytorch_model.bin (loaded with weights_only=True, so a
    pickle cannot run code), or its sharded index, in that order.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    load_one = read_weights_file

    for single, index in ((SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME), (TORCH_BIN_NAME, TORCH_BIN_INDEX_NAME)):
        if (directory / single).is_file():
            tensors = load_one(directory / single)
            return tensors, dict.fromkeys(tensors, single)
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{directory / index} has no 'weight_map' object")
            tensors, sources = {}, {}
            for shard in sorted(set(weight_map.values())):
                shard_tensors = load_one(directory / shard)
                for key, value in shard_tensors.items():
                    tensors[key] = value
                    sources[key] = shard
            for key, shard in weight_map.items():
                if key not in tensors:
                    raise ValueError(f"{index} lists {key!r} in {shard}, but that file does not contain it")
            return tensors, sources
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
        f"{TORCH_BIN_NAME} or {TORCH_BIN_INDEX_NAME}"
    )


def read_weights_file(path: str | Path, mmap: bool = False) -> dict[str, Tensor]:
    """The tensors of one weights file (.safetensors, or a torch .bin read with weights_only=True).

    A broken or hostile file is a ValueError of one line that names the file and says what to do; with
    `mmap`, a .bin file's tensors stay on disk (a cheap check that it is readable and holds only tensors).
    """
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing (listed in the shard index?)")
    if path.name.endswith(".safetensors"):
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({_first_line(err)}); it is truncated or "
                             "corrupt: download or save it again") from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and path.stat().st_size > 0)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running whatever code the file holds.
        raise ValueError(f"{path} is refused: it holds pickled objects other than tensors, and loading them could "
                         "run code; use a model.safetensors from a trusted source instead") from None
    except (RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({_first_line(err)}); it is truncated or "
                         "corrupt: download or save it again") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(loaded).__name__})")
    return loaded


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _canonical_splinter(tensors: dict[str, Tensor], sources: dict[str, str]) -> tuple[dict, dict]:
    """Splinter checkpoint keys -> canonical form (adds `splinter.` to a bare SplinterModel's keys)."""
    prefixed = any(k.startswith((ENCODER_PREFIX, QASS_PREFIX)) for k in tensors)
    out, src = {}, {}
    for key, value in tensors.items():
        name = key
        if not prefixed:
            name = ENCODER_PREFIX + key
        if name.removeprefix(ENCODER_PREFIX) in LEGACY_BUFFERS:
            continue
        out[name], src[name] = value, sources[key]
    return out, src


# ---------------------------------------------------------------------------------------- building models
M = TypeVar("M", bound=nn.Module)


def _build(
    cls: type[M],
    config: SplinterConfig,
    tensors: dict[str, Tensor],
    sources: dict[str, str],
    directory: Path,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    qass_expected: bool,
) -> M:
    """Create `cls(config)` without a random init and fill it from canonical checkpoint tensors."""
    with_qass = bool(getattr(cls, "has_qass", False))
    mapping = key_map(config, with_qass)
    with skipped_init(), torch.device(device or "cpu"):
        model = cls(config)  # every parameter is filled below (or initialised, a fresh QASS head)
    model.to(dtype=dtype or torch.get_default_dtype())
    params = model.state_dict()

    def where(key: str) -> str:
        return f"{directory / sources[key]}" if key in sources else str(directory)

    qass_keys = {k for k in mapping if k.startswith("qass.")}
    present_qass = [k for k in qass_keys if all(t in tensors for t in mapping[k])]
    fresh_qass = with_qass and not present_qass
    consumed: set[str] = set()
    with torch.no_grad():
        for ours, theirs in mapping.items():
            if fresh_qass and ours in qass_keys:
                continue
            missing = [t for t in theirs if t not in tensors]
            if missing:
                files = ", ".join(sorted(set(sources.values()))) or "its weight files"
                what = " has a partial QASS head: it" if ours in qass_keys else ""
                raise ValueError(
                    f"checkpoint {directory}{what} lacks {missing[0]!r} in {files} (needed for our {ours})"
                )
            parts = [tensors[t] for t in theirs]
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            target = params[ours]
            if value.shape != target.shape:
                expected = list(target.shape)
                if len(parts) > 1:
                    expected[0] //= len(parts)
                raise ValueError(
                    f"{theirs[0]!r} in {where(theirs[0])} has shape {list(parts[0].shape)}, but config.json "
                    f"implies {expected}; the config and weights do not belong together"
                )
            target.copy_(value)
            consumed.update(theirs)
    leftover = sorted(set(tensors) - consumed)
    if not with_qass:
        ignored = [k for k in leftover if k.startswith(QASS_PREFIX)]
        if ignored:
            logger.info("SplinterModel ignores the %d QASS head tensors of %s", len(ignored), directory)
        leftover = [k for k in leftover if not k.startswith(QASS_PREFIX)]
    if leftover:
        raise ValueError(
            f"unexpected tensor {leftover[0]!r} in {where(leftover[0])} ({len(leftover)} unexpected in all: "
            f"{leftover[:5]}); this is not a Splinter checkpoint with the architecture config.json describes"
        )
    if fresh_qass:
        init_weights(model.get_submodule("qass"), config.initializer_range)
        if qass_expected:
            logger.warning(
                "checkpoint %s has no QASS head weights (splinter_qass.*); the head is freshly initialised "
                "and must be fine-tuned before its span predictions mean anything",
                directory,
            )
    return model.eval()


def load_pretrained(
    cls: type[M],
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> M:
    """A `cls` (SplinterModel, SplinterForQuestionAnswering, SplinterForPreTraining) from a
    transformers-format Splinter checkpoint directory: config.json + weights.

    dtype None means torch's default (float32), as in transformers. The model comes back in eval mode.
    """
    directory = Path(directory)
    config = SplinterConfig.from_pretrained(directory)
    tensors, sources = read_state_dict(directory)
    tensors, sources = _canonical_splinter(tensors, sources)
    return _build(cls, config, tensors, sources, directory, dtype, device, qass_expected=True)


# ----------------------------------------------------------------------------------------------- writing
def to_checkpoint_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our state_dict in transformers' key names (fused qkv split back into query/key/value).

    A head model gives canonical `splinter.*`/`splinter_qass.*` keys; a bare SplinterModel gives bare keys,
    as transformers' SplinterModel.save_pretrained does.
    """
    config: SplinterConfig = model.config  # type: ignore[assignment]
    with_qass = bool(getattr(model, "has_qass", False))
    state = model.state_dict()
    mapping = key_map(config, with_qass)
    unmapped = sorted(set(state) - set(mapping))
    if unmapped:
        raise ValueError(f"internal error: model tensors without a checkpoint name: {unmapped}")
    out: dict[str, Tensor] = {}
    for ours, theirs in mapping.items():
        value = state[ours].detach()
        parts = value.chunk(len(theirs), dim=0) if len(theirs) > 1 else (value,)
        for name, part in zip(theirs, parts, strict=True):
            if not with_qass:
                name = name.removeprefix(ENCODER_PREFIX)
            # clone: safetensors refuses tensors that share storage (the qkv chunks do).
            out[name] = part.to("cpu").clone().contiguous()
    return out


def save_pretrained(
    model: nn.Module, directory: str | Path, tokenizer: Any = None, qass_state: str | None = None
) -> Path:
    """Write model.safetensors + config.json (+ tokenizer files) loadable by transformers and by us.

    `qass_state` ("trained" / "untrained") is recorded in the weights file's metadata for
    `qass_head_state`; None records nothing (a head of unknown history).
    """
    from safetensors.torch import save_file

    if qass_state not in (None, *QASS_STATES):
        raise ValueError(f"qass_state must be one of {QASS_STATES} or None, got {qass_state!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: SplinterConfig = model.config  # type: ignore[assignment]
    tensors = to_checkpoint_state_dict(model)
    # transformers refuses safetensors files whose metadata lacks format=pt.
    metadata = {"format": "pt"}
    if qass_state is not None and getattr(model, "has_qass", False):
        metadata[QASS_STATE_KEY] = qass_state
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata=metadata)
    dtype = next(iter(tensors.values())).dtype
    extra = {**config.extra, "torch_dtype": str(dtype).removeprefix("torch.")}
    saved = dataclasses.replace(config, architectures=[type(model).__name__], extra=extra)
    saved.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


# ------------------------------------------------------------------------------------- QASS head history
def qass_head_state(directory: str | Path) -> str:
    """Whether a checkpoint directory's QASS head was trained, from config.json and weight headers only.

    Returns "trained" or "untrained" as recorded by `save_pretrained(qass_state=...)`, "missing" when the
    weights hold no `splinter_qass.*` tensors (a tau/splinter-base-style or bare-encoder checkpoint: the
    head would be random), or "unknown" (a head of unrecorded history, e.g. a hub -qass checkpoint or one
    saved by transformers). Reads no tensor data: safetensors headers, index files, or a memory-mapped
    .bin's keys.
    """
    from safetensors import safe_open

    directory = Path(directory)
    SplinterConfig.from_pretrained(directory)  # a clear error when this is no Splinter checkpoint
    metadata: dict[str, str] = {}
    keys: list[str]
    if (directory / SAFETENSORS_NAME).is_file():
        with safe_open(str(directory / SAFETENSORS_NAME), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
    elif (directory / SAFETENSORS_INDEX_NAME).is_file() or (directory / TORCH_BIN_INDEX_NAME).is_file():
        index = directory / (
            SAFETENSORS_INDEX_NAME if (directory / SAFETENSORS_INDEX_NAME).is_file() else TORCH_BIN_INDEX_NAME
        )
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        keys = list(weight_map)
        shards = sorted(set(weight_map.values()))
        if shards and shards[0].endswith(".safetensors") and (directory / shards[0]).is_file():
            with safe_open(str(directory / shards[0]), framework="pt") as f:
                metadata = f.metadata() or {}
    elif (directory / TORCH_BIN_NAME).is_file():
        path = str(directory / TORCH_BIN_NAME)
        try:  # memory-mapped: only the keys are touched
            keys = list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except RuntimeError:  # a legacy (pre-zip) .bin cannot be mapped
            keys = list(torch.load(path, map_location="cpu", weights_only=True))
    else:
        read_state_dict(directory)  # raises the usual "no weights" error
        return "unknown"  # pragma: no cover - read_state_dict found nothing above, so it raised
    if not any(k.startswith(QASS_PREFIX) for k in keys):
        return "missing"
    state = metadata.get(QASS_STATE_KEY)
    return state if state in QASS_STATES else "unknown"


def untrained_qass_warning(directory: str | Path) -> str | None:
    """A one-line warning when a checkpoint's QASS head was never trained, else None."""
    state = qass_head_state(directory)
    if state == "untrained":
        return (
            f"the QASS head of {directory} is untrained (written by `splinter from-bert`): its answers are "
            "meaningless; fine-tune it first (`splinter finetune TRAIN OUT --model DIR`)"
        )
    if state == "missing":
        return (
            f"{directory} has no QASS head weights (splinter_qass.*), so the head is random: its answers are "
            "meaningless; use a -qass checkpoint or fine-tune it first (`splinter finetune TRAIN OUT --model DIR`)"
        )
    return None
