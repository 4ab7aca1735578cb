"""Shared fixtures. One embedded Ray instance serves every test that needs Ray."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

# Keep tests quiet and deterministic; progress bars garble pytest output.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed (never imported) package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {package!r} is not installed; run `bash scripts/setup.sh --no-demo`")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray shared by the whole session (starting one costs ~4 s)."""
    import ray

    if not ray.is_initialized():
        # Workers must import test-only stage classes (pickled by reference) from tests/.
        paths = [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        # address="local" never attaches to a `ray start` cluster a cluster test may have left up.
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            object_store_memory=1 << 30,
            include_dashboard=False,
            log_to_driver=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_qa_model(tmp_path_factory) -> Path:
    """A random tiny Splinter QA checkpoint over the bundled cased vocab (fast to load and run)."""
    import torch

    from splinter import SplinterConfig, SplinterForQuestionAnswering, SplinterTokenizer, save_pretrained

    tok = SplinterTokenizer.default()
    torch.manual_seed(0)
    config = SplinterConfig.tiny(vocab_size=tok.vocab_size, question_token_id=tok.question_token_id)
    model = SplinterForQuestionAnswering(config)
    out = tmp_path_factory.mktemp("tiny-qa")
    save_pretrained(model, str(out), tokenizer=tok)
    return out
