"""The pretraining step (splinter/pretrain.py) against transformers' SplinterForPreTraining on mined rows.

Loss and gradients of our step equal transformers' on real mined Wikipedia rows of both layouts (the
original layout with its position_ids), also when the batch is split into accumulation micro-batches
(each padded to its own width) and when it is split over two DDP workers with different question
counts. Then: the schedule, the optimizer state round trip, and the checkpoint loading in transformers.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from splinter.checkpoint import key_map, load_pretrained
from splinter.collate import collate_pretraining
from splinter.config import SplinterConfig
from splinter.model import SplinterForPreTraining
from splinter.pretrain import (
    PRESETS,
    PretrainHParams,
    PretrainStep,
    load_trainer_state,
    micro_batches,
    question_loss_sum,
    save_checkpoint,
)
from splinter.tokenizer import SplinterTokenizer
from tests.hf_oracle import load_hf_model, make_hf_model, save_hf_model
from tests.numerics import assert_close
from tests.pretrain_data import mined_rows

VOCAB = 28996  # the bundled cased vocabulary the rows are mined with


def _config() -> SplinterConfig:
    # No dropout: a training-mode forward is then deterministic and comparable.
    return SplinterConfig.tiny(
        vocab_size=VOCAB, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = make_hf_model("pretraining", _config(), seed=3)
    return save_hf_model(hf, tmp_path_factory.mktemp("pt"))


def _hf_grads(directory, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    hf = load_hf_model("pretraining", directory).train()
    loss = hf(**batch).loss
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in hf.named_parameters() if p.grad is not None}


def _assert_same_grads(ours: torch.nn.Module, theirs: dict[str, torch.Tensor]) -> None:
    mapping = key_map(ours.config, with_qass=True)
    compared = 0
    for name, param in ours.named_parameters():
        expected = torch.cat([theirs[k] for k in mapping[name]], dim=0)
        assert param.grad is not None, name
        assert_close(param.grad, expected, tol=1e-5)
        compared += 1
    assert compared == len(list(ours.parameters())) and compared > 20


@pytest.mark.parametrize("layout", ["collapsed", "original"])
def test_loss_and_gradients_equal_transformers(checkpoint, layout):
    rows = mined_rows(layout, count=6)
    batch = collate_pretraining(rows)
    assert ("position_ids" in batch) == (layout == "original")
    if layout == "original":
        # In-span [PAD]s are masked and skipped by the positions: the layout is really exercised.
        assert (batch["attention_mask"][:, 1:-1] == 0).any()
    hf_loss, hf_grads = _hf_grads(checkpoint, batch)

    # One micro-batch: the same loss and gradients.
    ours = load_pretrained(SplinterForPreTraining, checkpoint)
    step = PretrainStep(ours, PretrainHParams(batch_size=6))
    loss, sequences, questions, tokens = step.accumulate([batch])
    assert_close(torch.tensor(loss), torch.tensor(hf_loss), tol=1e-5)
    assert sequences == 6 and questions == int((batch["start_positions"] != 0).sum())
    assert tokens == int(batch["attention_mask"].sum())
    _assert_same_grads(ours, hf_grads)

    # Accumulation over unequal micro-batches, each padded to its own width: still the big batch's.
    ours = load_pretrained(SplinterForPreTraining, checkpoint)
    step = PretrainStep(ours, PretrainHParams(batch_size=6, grad_accum=3))
    parts = [collate_pretraining(rows[:1]), collate_pretraining(rows[1:4]), collate_pretraining(rows[4:])]
    if layout == "collapsed":  # original-layout rows all keep the full mined length
        assert parts[0]["input_ids"].shape[1] < batch["input_ids"].shape[1]
    loss, *_ = step.accumulate(parts)
    assert_close(torch.tensor(loss), torch.tensor(hf_loss), tol=1e-5)
    _assert_same_grads(ours, hf_grads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, directory: str, batches: list[dict], result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(load_pretrained(SplinterForPreTraining, directory))
        step = PretrainStep(model, PretrainHParams(batch_size=6, grad_accum=1))
        loss, *_ = step.accumulate([batches[rank]])
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save({"loss": loss, "grads": grads}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ddp_workers_with_unequal_questions_equal_one_big_batch(checkpoint, tmp_path):
    rows = mined_rows("collapsed", count=6)
    hf_loss, hf_grads = _hf_grads(checkpoint, collate_pretraining(rows))
    # One sequence on rank 0, five on rank 1: very different question counts per worker.
    batches = [collate_pretraining(rows[:1]), collate_pretraining(rows[1:])]
    mp.start_processes(
        _ddp_worker, args=(_free_port(), str(checkpoint), batches, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ours = load_pretrained(SplinterForPreTraining, checkpoint)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert_close(torch.tensor(result["loss"]), torch.tensor(hf_loss), tol=1e-5)
        for name, param in ours.named_parameters():
            param.grad = result["grads"][name]
        _assert_same_grads(ours, hf_grads)


def test_schedule_state_round_trip_and_checkpoint(checkpoint, tmp_path):
    rows = mined_rows("original", count=8, start=40)
    hp = PretrainHParams(batch_size=4, learning_rate=1e-3, warmup_steps=2, max_steps=6, grad_accum=2)
    batches = [collate_pretraining(rows[i : i + 2]) for i in range(0, 8, 2)]
    steps = list(micro_batches(batches, hp.grad_accum))
    assert [len(s) for s in steps] == [2, 2]
    torch.manual_seed(0)
    a = PretrainStep(load_pretrained(SplinterForPreTraining, checkpoint), hp)
    first = a(steps[0])
    assert first.lr == 0.0 and a.step == 1  # warmup starts at 0
    second = a(steps[1])
    assert second.lr == pytest.approx(5e-4) and second.loss > 0 and second.grad_norm > 0
    assert first.sequences == 4 and first.tokens > 0 and first.questions > 0
    tok = SplinterTokenizer.default()
    save_checkpoint(tmp_path / "ckpt", a, {"epoch": 0, "step_in_epoch": 2}, tokenizer=tok)

    # A fresh trainer restored from the checkpoint continues exactly like the original.
    b = PretrainStep(load_pretrained(SplinterForPreTraining, tmp_path / "ckpt"), hp)
    record = load_trainer_state(tmp_path / "ckpt", b)
    assert record["step"] == 2 and record["step_in_epoch"] == 2 and record["hparams"]["warmup_steps"] == 2
    for trainer in (a, b):
        trainer(steps[0])
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert_close(pa, pb, tol=1e-6)
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()

    # The checkpoint is an ordinary model directory: transformers loads it and agrees with ours.
    hf = load_hf_model("pretraining", tmp_path / "ckpt")
    ours = load_pretrained(SplinterForPreTraining, tmp_path / "ckpt")
    batch = collate_pretraining(rows[:3])
    with torch.no_grad():
        assert_close(ours(**batch).start_logits, hf(**batch).start_logits, tol=1e-5)
        assert_close(ours(**batch).loss, hf(**batch).loss, tol=1e-5)
    assert (tmp_path / "ckpt" / "vocab.txt").is_file()


def test_checks_and_presets():
    with pytest.raises(ValueError, match="multiple of 8"):
        PretrainHParams(batch_size=12, grad_accum=2).micro_batch(num_workers=4)
    assert PretrainHParams(batch_size=16, grad_accum=2).micro_batch(num_workers=2) == 4
    authors = PRESETS["authors"]
    assert (authors.batch_size, authors.learning_rate, authors.warmup_steps) == (256, 1e-4, 10_000)
    assert dataclasses.replace(authors, max_steps=5).max_steps == 5
    # No questions: the sum is 0 and its gradient is finite (transformers' mean would be NaN).
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=torch.long)
    total = question_loss_sum(logits, logits, labels, labels)
    total.backward()
    assert float(total.detach()) == 0.0 and torch.isfinite(logits.grad).all()
    # Ids outside the model's vocabulary are refused before any forward pass, naming what to do.
    model = SplinterForPreTraining(SplinterConfig.tiny())
    step = PretrainStep(model, PretrainHParams())
    with pytest.raises(ValueError, match="vocab_size"):
        step.check_batch(collate_pretraining(mined_rows("collapsed", count=2)))
