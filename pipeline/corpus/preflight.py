"""Checks on the driver before Ray starts: what would otherwise fail inside every worker, later and noisily.

A model directory's config.json, its tokenizer files and the headers of its weights are read here, so a
truncated `model.safetensors`, a corrupt `tokenizer.json` or a `pytorch_model.bin` holding code is one
line naming the file (a `ConfigError`: exit code 2), not a page of actor tracebacks 20 s later. Weights
are not loaded: a safetensors header says which bytes the tensors need, and a `.bin` is memory-mapped.
Remote directories (URIs) get the same checks over their storage client.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.paths import is_uri
from pipeline.settings import ConfigError, ExtractConfig, MineConfig
from pipeline.storage.filesystems import filesystem

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt", "added_tokens.json", SAFETENSORS_INDEX, TORCH_BIN_INDEX)


def preflight(cfg: Any) -> None:
    """Everything about a job's model or tokenizer that can be checked without running it."""
    if isinstance(cfg, ExtractConfig):
        check_model_dir(cfg.model)
    elif isinstance(cfg, MineConfig) and cfg.tokenizer:
        _check_tokenizer(cfg.tokenizer, "--tokenizer")


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _check_tokenizer(path: str, flag: str) -> None:
    from pipeline.stages.recurring_spans import load_mining_tokenizer

    try:
        load_mining_tokenizer(path)
    except Exception as err:  # tokenizers raises bare Exceptions; any failure here is the user's file
        raise ConfigError(f"{flag} {path}: {_one_line(err)}") from None


def check_model_dir(model: str) -> None:
    """config.json, tokenizer and weights of a Splinter checkpoint directory (local path or URI)."""
    if is_uri(model) and not model.startswith("file://"):
        _check_remote(model)
        return
    directory = Path(filesystem(model)[1])
    _check_local(directory, str(directory))


def _check_local(directory: Path, shown: str) -> None:
    _check_config_and_tokenizer(directory, shown)
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    _check_weights(files, lambda name, start, n: _read_local(directory / name, start, n), shown,
                   lambda name: _check_bin(directory / name, shown))


def _read_local(path: Path, start: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(start)
        return f.read(n)


def _check_bin(path: Path, shown: str) -> None:
    from splinter.checkpoint import read_weights_file

    try:
        read_weights_file(path, mmap=True)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--model: {_one_line(err).replace(str(path.parent), shown)}") from None


def _check_weights(files: dict[str, int], read: Any, shown: str, check_bin: Any) -> None:
    """The weights files a loader would pick (same order as splinter.checkpoint.read_state_dict)."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        names: list[str] = []
        if single in files:
            names = [single]
        elif index in files:
            try:
                weight_map = json.loads(read(index, 0, files[index])).get("weight_map")
            except (ValueError, AttributeError) as err:
                raise ConfigError(f"--model: {shown}/{index} is not valid JSON ({_one_line(err)}): restore it "
                                  "from the original checkpoint") from None
            if not isinstance(weight_map, dict):
                raise ConfigError(f"--model: {shown}/{index} has no 'weight_map' object: restore it")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if n not in files]
            if missing:
                raise ConfigError(f"--model: {shown}/{missing[0]} is listed in {index} but missing: copy it "
                                  "from the original checkpoint")
        else:
            continue
        for name in names:
            if name.endswith(".safetensors"):
                _check_safetensors_header(name, files[name], lambda s, n, name=name: read(name, s, n), shown)
            else:
                check_bin(name)
        return
    raise ConfigError(f"--model: no weights in {shown}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                      f"{TORCH_BIN} or {TORCH_BIN_INDEX}")


def _check_safetensors_header(name: str, size: int, read: Any, shown: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes."""
    where = f"{shown}/{name}"
    again = "download or save it again"
    if size < 8:
        raise ConfigError(f"--model: {where} is {'empty' if size == 0 else 'truncated'} ({size} bytes): {again}")
    n = int.from_bytes(read(0, 8), "little")
    if 8 + n > size:
        raise ConfigError(f"--model: {where} is truncated or not a safetensors file (its header needs {n} "
                          f"bytes, the file has {size}): {again}")
    try:
        header = json.loads(read(8, n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ConfigError(f"--model: {where} has a corrupt header: {again}") from None
    if 8 + n + end > size:
        raise ConfigError(f"--model: {where} is truncated (its tensors need {8 + n + end} bytes, the file has "
                          f"{size}): {again}")


def _check_remote(model: str) -> None:
    """The same checks through the storage client: small files are fetched, weights' headers read by range."""
    fs, inner = filesystem(model)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except OSError as err:
        raise ConfigError(f"--model {model}: cannot list it ({_one_line(err)})") from None
    files = {i.base_name: int(i.size or 0) for i in infos if i.type == pafs.FileType.File}
    if not files:
        raise ConfigError(f"--model {model}: no such directory, or it is empty")
    shown = model.split("?", 1)[0].rstrip("/")

    def read(name: str, start: int, n: int) -> bytes:
        with fs.open_input_file(f"{inner}/{name}") as f:
            return f.read_at(n, start)

    local = Path(tempfile.mkdtemp(prefix="splinter-preflight-"))
    try:
        for name in _SMALL_FILES:
            if name in files:
                (local / name).write_bytes(read(name, 0, files[name]))
        _check_config_and_tokenizer(local, shown)
    finally:
        shutil.rmtree(local, ignore_errors=True)

    def check_bin(name: str) -> None:
        if files[name] == 0:
            raise ConfigError(f"--model: {shown}/{name} is empty: download or save it again")

    _check_weights(files, read, shown, check_bin)


def _check_config_and_tokenizer(directory: Path, shown: str) -> None:
    from splinter.config import SplinterConfig
    from splinter.tokenizer import SplinterTokenizer

    try:
        SplinterConfig.from_pretrained(directory)
    except (ValueError, OSError, TypeError) as err:
        raise ConfigError(f"--model: {_one_line(err).replace(str(directory), shown)} (restore it from the original "
                          "checkpoint, or pass a Splinter checkpoint directory)") from None
    try:
        SplinterTokenizer.from_pretrained(directory)
    except Exception as err:  # tokenizers raises bare Exceptions; their messages say what to do
        raise ConfigError(f"--model: {_one_line(err).replace(str(directory), shown)}") from None
