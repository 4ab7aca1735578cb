"""`finetune --negatives R`: unanswerable pairs from other articles' paragraphs, labelled [CLS] everywhere."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.training.finetuning import read_qa_dataset, sample_examples
from pipeline.training.negatives import add_negatives
from splinter.qa_data import build_training_windows
from splinter.tokenizer import SplinterTokenizer
from splinter.train import FinetuneConfig
from tests.conftest import DATA

SQUAD_TRAIN = DATA / "squad_sample.json"


def test_negatives_come_from_other_articles_and_are_labelled_cls(tiny_qa_model):
    ds = read_qa_dataset(str(SQUAD_TRAIN))
    tok = SplinterTokenizer.from_pretrained(str(tiny_qa_model))
    cfg = FinetuneConfig(max_length=128, stride=32)
    sample = sample_examples(ds, 6, 3, tok, cfg)
    title_of = dict(zip(ds["context"], ds["title"], strict=True))
    assert len(set(ds["title"])) > 1
    examples = add_negatives(ds, sample.examples, 2, seed=3)
    assert examples[:6] == sample.examples and len(examples) == 6 + 12
    assert add_negatives(ds, sample.examples, 2, seed=3) == examples  # seeded
    for k, neg in enumerate(examples[6:]):
        own = sample.examples[k // 2]
        assert neg.question == own.question and neg.answer_start == -1 and neg.answer_text == ""
        assert title_of[neg.context] != title_of[own.context]
    windows = build_training_windows(tok, examples, 128, 32, 64)
    assert len(windows.examples) == 18 and not windows.skipped
    negative = windows.example_index >= 6
    assert negative.any() and not windows.has_answer[negative].any()
    assert (windows.start_positions[negative] == 0).all() and (windows.end_positions[negative] == 0).all()
    assert windows.has_answer[~negative].sum() >= 6  # every real question keeps its answer window
    assert np.unique(windows.example_index).size == 18


def test_finetune_negatives_are_trained_on_and_recorded(tmp_path, tiny_qa_model):
    out = tmp_path / "tuned"
    args = ["finetune", str(SQUAD_TRAIN), str(out), "--model", str(tiny_qa_model), "--examples", "4",
            "--negatives", "3", "--max-steps", "2", "--max-length", "128", "--stride", "32", "--threads", "1", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    training_args = json.loads((out / "training_args.json").read_text())
    assert training_args["negatives"] == 3 and training_args["negative_pairs"] == 12
    assert training_args["result"]["examples_used"] == 16
    plain = tmp_path / "plain"
    result = CliRunner().invoke(app, [args[0], args[1], str(plain), *args[3:7], *args[9:]])
    assert result.exit_code == 0, result.output
    plain_args = json.loads((plain / "training_args.json").read_text())
    assert plain_args["negatives"] == 0 and plain_args["result"]["examples_used"] == 4
    assert training_args["result"]["windows"] > plain_args["result"]["windows"]
