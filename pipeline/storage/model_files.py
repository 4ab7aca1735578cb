"""A QA checkpoint read once, on the driver, and shipped to the workers with the job.

Workers never open the model path: on a cluster it may exist only where the driver runs, or be a URI
(s3://, gs://) that every worker would otherwise download on its own. The driver reads the directory
(any filesystem pyarrow knows, through `pipeline.storage.sources.filesystem`), loads the weights in fp32, and
packs them as numpy arrays plus the tokenizer; the runner puts that once into Ray's object store, where
actors on a node map the same memory instead of each reading and parsing files.

No ray here: stages build models from a `ShippedModel` whether or not Ray carried it.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.paths import is_uri
from splinter.config import SplinterConfig
from splinter.model import SplinterForQuestionAnswering, skipped_init
from splinter.tokenizer import SplinterTokenizer

__all__ = ["ShippedModel", "read_checkpoint"]

# What a checkpoint directory may hold that we need; anything else there (optimizer states, logs) stays.
_WANTED_SUFFIXES = (".json", ".safetensors", ".bin", ".txt")


@dataclass
class ShippedModel:
    """A QA checkpoint in memory: config, our fp32 state dict as numpy arrays, and its tokenizer."""

    source: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: SplinterTokenizer

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def build(self) -> SplinterForQuestionAnswering:
        """The model, its parameters viewing the shipped arrays (no copy) until a dtype or device change.

        Arrays that come out of Ray's object store are read-only views of shared memory; the model is
        only ever read (eval, inference mode), which is why viewing them is safe.
        """
        config = SplinterConfig.from_dict(self.config)
        with skipped_init():
            model = SplinterForQuestionAnswering(config)  # its parameters are the shipped arrays below
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # read-only shared memory
            state = {k: torch.from_numpy(v) for k, v in self.tensors.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


def _local_copy(location: str, into: Path) -> Path:
    """Copy the checkpoint files of a directory URI into `into` (once, on the driver)."""
    import pyarrow.fs as pafs

    from pipeline.settings import ConfigError
    from pipeline.storage.filesystems import filesystem

    fs, root = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), allow_not_found=True))
    except OSError as exc:
        raise ConfigError(f"--model {location}: cannot list it ({exc}); check the URI and credentials") from None
    names = {i.base_name: i.path for i in infos if i.type == pafs.FileType.File}
    if "config.json" not in names:
        raise ConfigError(f"--model {location}: no config.json there; pass a Splinter checkpoint directory")
    for name, path in names.items():
        if name.endswith(_WANTED_SUFFIXES):
            with fs.open_input_stream(path) as src, open(into / name, "wb") as dst:
                while chunk := src.read(16 << 20):
                    dst.write(chunk)
    return into


def read_checkpoint(location: str) -> ShippedModel:
    """Read a Splinter QA checkpoint (local directory or URI) and its tokenizer into memory."""
    from pipeline.settings import ConfigError
    from splinter.checkpoint import load_pretrained

    def load(directory: Path) -> ShippedModel:
        try:
            model = load_pretrained(SplinterForQuestionAnswering, directory)
            tokenizer = SplinterTokenizer.from_pretrained(directory)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"--model {location}: {exc}") from None
        tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        return ShippedModel(location, model.config.to_dict(), tensors, tokenizer)

    if not is_uri(location):
        if not Path(location).is_dir():
            raise ConfigError(f"--model {location}: directory not found")
        return load(Path(location))
    with tempfile.TemporaryDirectory(prefix="splinter-model-") as tmp:
        return load(_local_copy(location, Path(tmp)))
