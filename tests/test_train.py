"""Fine-tuning library (`splinter.train`, `splinter.qa_data`): parity with transformers, labels, learning.

Models are tiny and windows short; real SQuAD v1.1 train questions (tests/data/squad_sample.json, 403
questions, some contexts longer than a window) are the data.
"""

from __future__ import annotations

import io
import itertools
import string

import numpy as np
import pytest
import torch

from splinter.checkpoint import load_pretrained, to_checkpoint_state_dict
from splinter.config import SplinterConfig
from splinter.decode import best_spans
from splinter.model import SplinterForQuestionAnswering
from splinter.qa_data import (
    QAExample,
    build_training_windows,
    collate_windows,
    length_grouped_batches,
    padding_waste,
)
from splinter.squad import evaluate, load_squad
from splinter.tokenizer import SplinterTokenizer
from splinter.train import (
    FinetuneConfig,
    TrainingStopped,
    TrainState,
    batch_schedule,
    finetune,
    total_steps,
    train_on_windows,
)
from splinter.windows import encode_qa_windows
from tests.conftest import DATA
from tests.numerics import assert_close

SQUAD_TRAIN = DATA / "squad_sample.json"


def squad_records(rows: list[dict] | None = None) -> list[dict]:
    """SQuAD sample rows in the `datasets` schema (answers: {text, answer_start})."""
    rows = rows if rows is not None else load_squad(SQUAD_TRAIN)
    return [
        {"id": r["id"], "question": r["question"], "context": r["context"],
         "answers": {"text": r["answers"], "answer_start": r["answer_starts"]}}
        for r in rows
    ]


@pytest.fixture(scope="module")
def tokenizer() -> SplinterTokenizer:
    return SplinterTokenizer.default()


@pytest.fixture
def one_thread():
    # Tiny models gain nothing from more threads, and on a shared 2-core machine two spinning threads per
    # process make them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(tokenizer: SplinterTokenizer, seed: int = 0, **overrides) -> SplinterForQuestionAnswering:
    torch.manual_seed(seed)
    config = SplinterConfig.tiny(vocab_size=tokenizer.vocab_size, question_token_id=tokenizer.question_token_id,
                                 **overrides)
    return SplinterForQuestionAnswering(config)


# ------------------------------------------------------------------------------------------------ parity
def test_training_steps_match_transformers_and_torch_adamw(tmp_path, tokenizer, one_thread):
    """Two optimizer steps of ours == transformers' SplinterForQuestionAnswering + torch.optim.AdamW +
    get_linear_schedule_with_warmup + clip_grad_norm_, from the same weights on the same batches.

    Dropout is off on both sides (p = 0 in the config; both models are in train mode), so the comparison
    is deterministic. Loss, gradients and the updates of every parameter must agree.
    """
    transformers = pytest.importorskip("transformers")
    from tests.hf_oracle import make_hf_model, save_hf_model

    config = SplinterConfig.tiny(vocab_size=tokenizer.vocab_size, question_token_id=tokenizer.question_token_id,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = make_hf_model("qa", config, seed=0)
    ours = load_pretrained(SplinterForQuestionAnswering, save_hf_model(hf, tmp_path / "hf"))
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    cfg = FinetuneConfig(max_steps=2, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, max_length=96,
                         stride=32, max_query_length=32, device="cpu")
    windows = build_training_windows(tokenizer, squad_records()[:8], cfg.max_length, cfg.stride, cfg.max_query_length)
    assert (~windows.has_answer).any() and windows.has_answer.any()  # [CLS]-labelled windows are in the batches

    result = train_on_windows(ours, windows, cfg)

    hf.train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=cfg.learning_rate, eps=1e-8, weight_decay=0.0)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, cfg.max_steps)
    hf_losses, hf_norms = [], []
    for index, _ in itertools.islice(batch_schedule(windows, cfg), cfg.max_steps):
        optimizer.zero_grad()
        loss = hf(**collate_windows(windows, index)).loss
        loss.backward()
        hf_norms.append(float(torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)))
        optimizer.step()
        schedule.step()
        hf_losses.append(loss.item())

    assert_close(torch.tensor([r["loss"] for r in result.log]), torch.tensor(hf_losses), tol=1e-5)
    assert_close(torch.tensor([r["grad_norm"] for r in result.log]), torch.tensor(hf_norms), tol=1e-5)
    assert min(hf_norms) > 1.0  # clipping really acted
    ours_grads = to_checkpoint_state_dict_grads(result.model)
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    after = to_checkpoint_state_dict(result.model)
    hf_after = hf.state_dict()
    assert set(after) == set(hf_after)
    for key in hf_grads:
        assert_close(ours_grads[key], hf_grads[key], tol=1e-5)
        update_ours, update_hf = after[key] - before[key], hf_after[key] - before[key]
        if _zero_by_symmetry(key):
            # Softmax ignores a constant shift of every score, so these gradients are exactly 0 in exact
            # arithmetic; both sides compute float noise there, which Adam's normalisation turns into
            # noise-sized updates of either sign (bounded by ~lr per step).
            assert update_ours.abs().max() <= 2 * cfg.max_steps * cfg.learning_rate
        else:
            assert (update_ours - update_hf).abs().max() <= 0.01 * cfg.learning_rate, key
    assert_close(after["splinter.encoder.layer.0.attention.self.query.weight"],
                 hf_after["splinter.encoder.layer.0.attention.self.query.weight"], tol=1e-6)


def _zero_by_symmetry(key: str) -> bool:
    return key.endswith("attention.self.key.bias") or key in (
        "splinter_qass.start_transform.LayerNorm.bias", "splinter_qass.end_transform.LayerNorm.bias")


def to_checkpoint_state_dict_grads(model: SplinterForQuestionAnswering) -> dict[str, torch.Tensor]:
    """Our gradients under transformers' names (the fused qkv split back), via the checkpoint key map."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
        grads = to_checkpoint_state_dict(model)
        for name, p in model.named_parameters():
            p.copy_(saved[name])
    return grads


def test_gradient_accumulation_equals_the_bigger_batch(tokenizer, one_thread):
    records = squad_records()[:12]
    common = dict(max_steps=2, learning_rate=1e-3, warmup_ratio=0.0, max_length=96, stride=32, max_query_length=32, device="cpu",
                  length_grouping=False)
    windows = build_training_windows(tokenizer, records, 96, 32, 64)
    big = train_on_windows(tiny_model(tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                           windows, FinetuneConfig(batch_size=4, **common))
    accum = train_on_windows(tiny_model(tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                             windows, FinetuneConfig(batch_size=2, grad_accum=2, **common))
    assert_close(torch.tensor([r["loss"] for r in accum.log]), torch.tensor([r["loss"] for r in big.log]), tol=1e-5)
    for (name, a), (_, b) in zip(accum.model.named_parameters(), big.model.named_parameters(), strict=True):
        if "key.bias" not in name and not name.startswith(("qass.start.ln.bias", "qass.end.ln.bias")):
            assert (a - b).abs().max() <= 1e-5, name


# ------------------------------------------------------------------------------------------------ labels
def test_span_labels_cover_the_gold_answer_on_real_squad(tokenizer):
    """>= 200 real SQuAD train questions in 128-token windows (stride 32): every window that contains the
    answer is labelled, the labelled tokens' characters cover exactly the gold answer (up to whitespace or
    punctuation at the token edges, or the rest of a word the answer starts or ends inside), and every other
    window points at [CLS]."""
    records = squad_records()
    windows = build_training_windows(tokenizer, records, max_length=128, stride=32, max_query_length=64)
    assert not windows.skipped and len(windows.examples) == len(records) >= 200
    # The very windows the QA job builds (same function, same order): same tokens, and their offsets.
    enc = encode_qa_windows(tokenizer, [e.question for e in windows.examples],
                            [e.context for e in windows.examples], max_length=128, stride=32, max_query_length=64)
    assert np.array_equal(enc["lengths"], windows.lengths)
    real = np.arange(enc["input_ids"].shape[1])[None, :] < enc["lengths"][:, None]
    assert np.array_equal(enc["input_ids"][real], windows.input_ids)

    later_windows = mid_word = 0
    edge = set(string.whitespace) | set(string.punctuation)
    for w in range(len(windows)):
        example = windows.examples[windows.example_index[w]]
        a, b = example.answer_start, example.answer_end
        cs, ce = enc["context_start"][w], enc["context_end"][w]
        offsets = enc["offsets"][w]
        contains = offsets[cs, 0] <= a and offsets[ce - 1, 1] >= b
        s, e = windows.start_positions[w], windows.end_positions[w]
        assert windows.has_answer[w] == contains
        if not contains:
            assert s == e == 0  # [CLS]
            continue
        later_windows += int(w > 0 and windows.example_index[w - 1] == windows.example_index[w])
        assert cs <= s <= e < ce
        s0, e1 = int(offsets[s, 0]), int(offsets[e, 1])
        context = example.context
        for lo, hi, inside in ((min(s0, a), max(s0, a), a), (min(b, e1), max(b, e1), b - 1)):
            extra = context[lo:hi]
            if all(ch in edge for ch in extra):
                continue
            # Only a word piece the answer starts or ends inside may add letters: they belong to its word.
            assert extra.isalnum() and context[inside].isalnum(), (example.id, context[s0:e1], example.answer_text)
            mid_word += 1
        assert context[max(s0, a):min(e1, b)].strip() == context[max(s0, a):min(e1, b)] != ""
    assert later_windows >= 20  # answers in second and later windows are labelled too
    assert mid_word <= 0.05 * windows.has_answer.sum()


def test_bad_examples_are_skipped_with_a_reason(tokenizer):
    good = squad_records()[0]
    context = good["context"]
    long_answer = " ".join(["word"] * 200)
    records = [
        good,
        {**good, "id": "mismatch", "answers": {"text": ["not there"], "answer_start": [3]}},
        {**good, "id": "empty-context", "context": "   "},
        {**good, "id": "no-answer", "answers": {"text": [], "answer_start": []}},
        {**good, "id": "no-question", "question": None},
        {"id": "too-long", "question": "What?", "context": long_answer,
         "answers": {"text": [long_answer], "answer_start": [0]}},
        {**good, "id": "squad-list", "answers": [{"text": good["answers"]["text"][0],
                                                  "answer_start": good["answers"]["answer_start"][0]}]},
        {**good, "id": "padded", "answers": {"text": [" " + good["answers"]["text"][0] + " "],
                                             "answer_start": [good["answers"]["answer_start"][0] - 1]}},
    ]
    assert context[good["answers"]["answer_start"][0] - 1] == " "
    windows = build_training_windows(tokenizer, records, max_length=64, stride=16)
    assert dict(windows.skipped) == {"answer_mismatch": 1, "empty_context": 1, "no_answer": 1,
                                     "missing_question": 1, "answer_not_in_any_window": 1}
    assert [e.id for e in windows.examples] == [good["id"], "squad-list", "padded"]
    assert windows.examples[2].answer_text == good["answers"]["text"][0]  # whitespace trimmed, offset moved
    assert ("too-long", "answer_not_in_any_window") in windows.skipped_ids
    assert set(windows.example_index.tolist()) == {0, 1, 2}
    assert isinstance(QAExample.parse({"question": "q", "context": "c"}), str)


# ---------------------------------------------------------------------------------------------- batching
def test_length_grouped_batches_cover_each_window_once_and_cut_padding(tokenizer):
    windows = build_training_windows(tokenizer, squad_records(), max_length=384, stride=128)
    rng = np.random.default_rng(0)
    batches = length_grouped_batches(windows.lengths, 12, rng, group_size=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(windows)))
    waste = padding_waste(windows.lengths, 12, 384)
    assert waste["grouped"] < 0.5 * waste["random"] < waste["fixed"]
    batch = collate_windows(windows, batches[0])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert int(batch["attention_mask"].sum()) == int(windows.lengths[batches[0]].sum())


def test_step_count_follows_the_authors_rule():
    cfg = FinetuneConfig()
    assert total_steps(20, cfg) == 200  # 16 questions: 10 epochs are 20 steps, so the 200-step minimum rules
    assert total_steps(1100, cfg) == 920  # ~1024 questions: 10 epochs of 92 batches
    assert total_steps(1100, FinetuneConfig(grad_accum=2)) == 460
    assert total_steps(1100, FinetuneConfig(max_steps=7)) == 7
    with pytest.raises(ValueError, match="learning_rate"):
        FinetuneConfig(learning_rate=0).validate()


# ------------------------------------------------------------------------------------------------ learning
def test_tiny_model_overfits_16_real_squad_questions(one_thread):
    """A loop that cannot memorise 16 questions is broken: F1 on them must reach >= 90."""
    records = squad_records(load_squad(SQUAD_TRAIN)[::25][:16])
    full = SplinterTokenizer.default()
    # Only the word pieces these questions use (same segmentation, since WordPiece takes the longest piece
    # in the vocabulary and every piece it took is kept): a 1.2k-row embedding trains far faster than 29k.
    used = sorted({t for r in records for text in (r["question"], r["context"]) for t in full.tokenize(text)} - {"."})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[QUESTION]", ".", *used]
    tokenizer = SplinterTokenizer({t: i for i, t in enumerate(vocab)})
    assert all(tokenizer.tokenize(r["context"]) == full.tokenize(r["context"]) for r in records)
    torch.manual_seed(0)
    model = SplinterForQuestionAnswering(SplinterConfig.tiny(
        vocab_size=len(vocab), question_token_id=5, max_position_embeddings=192))
    cfg = FinetuneConfig(max_steps=80, learning_rate=3e-3, max_length=192, stride=32, device="cpu")
    model = finetune(model, tokenizer, records, cfg)
    assert not model.training
    predictions = predict(model, tokenizer, records, cfg)
    metrics = evaluate(predictions, {r["id"]: r["answers"]["text"] for r in records})
    assert metrics["f1"] >= 90, metrics


def predict(model, tokenizer, records, cfg) -> dict[str, str]:
    enc = encode_qa_windows(tokenizer, [r["question"] for r in records], [r["context"] for r in records],
                            max_length=cfg.max_length, stride=cfg.stride)
    with torch.no_grad():
        out = model(*(torch.from_numpy(enc[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")))
    spans = best_spans(out.start_logits, out.end_logits, torch.from_numpy(enc["offsets"][..., 0] >= 0),
                       torch.from_numpy(enc["sample_index"]).long(), len(records))
    offsets = enc["offsets"]
    return {r["id"]: r["context"][offsets[w, s, 0]:offsets[w, e, 1]]
            for r, w, s, e in zip(records, spans.window.tolist(), spans.start.tolist(), spans.end.tolist(), strict=True)}


def test_same_seed_same_weights_other_seed_other_weights(tokenizer, one_thread):
    records = squad_records()[:6]

    def run(seed: int) -> dict[str, torch.Tensor]:
        cfg = FinetuneConfig(max_steps=3, learning_rate=1e-3, max_length=96, stride=32, max_query_length=32, seed=seed, device="cpu",
                             reinit_qass=True, batch_size=4)
        return finetune(tiny_model(tokenizer), tokenizer, records, cfg).state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_refuses_a_tokenizer_that_does_not_fit_the_model(tokenizer):
    model = tiny_model(tokenizer)
    model.config.question_token_id = 7
    with pytest.raises(ValueError, match="question_token_id"):
        finetune(model, tokenizer, squad_records()[:2], FinetuneConfig(max_steps=1, max_length=96, stride=32, max_query_length=32))
    with pytest.raises(ValueError, match="no usable training examples"):
        finetune(tiny_model(tokenizer), tokenizer, [{"question": "q", "context": ""}], FinetuneConfig(max_steps=1))


# ------------------------------------------------------------------------------------------------ resume
def _saved(state: TrainState) -> TrainState:
    """The state as a job keeps it: through torch.save and a weights-only load."""
    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    buffer.seek(0)
    return TrainState.from_dict(torch.load(buffer, weights_only=True))


def test_stopped_and_resumed_run_ends_with_the_uninterrupted_weights(tokenizer, one_thread):
    """Dropout on, grad_accum 2, QASS re-initialised, a stop mid-epoch: the resumed run replays the batch
    order and the RNG, and ends bit for bit where the uninterrupted run ends."""
    cfg = FinetuneConfig(max_steps=7, batch_size=3, grad_accum=2, learning_rate=1e-3, max_length=96, stride=32,
                         max_query_length=32, seed=3, device="cpu", reinit_qass=True)
    windows = build_training_windows(tokenizer, squad_records()[:4], cfg.max_length, cfg.stride, cfg.max_query_length)
    whole = train_on_windows(tiny_model(tokenizer), windows, cfg)
    assert whole.log[4]["epoch"] > 2  # the stop after step 5 falls in a reshuffled epoch

    saved: list[TrainState] = []
    asks = iter([False] * 5 + [True])  # before step 1, then after steps 1..5: stop after step 5
    with pytest.raises(TrainingStopped) as stopped:
        train_on_windows(tiny_model(tokenizer), windows, cfg, checkpoint_every=2,
                         on_checkpoint=lambda s: saved.append(_saved(s)), should_stop=lambda: next(asks))
    assert (stopped.value.step, stopped.value.total, stopped.value.checkpointed) == (5, 7, True)
    assert [s.step for s in saved] == [2, 4, 5]
    assert [r["step"] for r in saved[-1].log] == [1, 2, 3, 4, 5]

    # A fresh model of another seed: every weight, the re-initialised head included, comes from the state.
    resumed = train_on_windows(tiny_model(tokenizer, seed=9), windows, cfg, resume=saved[-1])
    ours, theirs = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in whole.log]
    assert [r["step"] for r in resumed.log] == list(range(1, 8)) and resumed.final_loss == whole.final_loss
    assert resumed.epochs == whole.epochs

    again = train_on_windows(tiny_model(tokenizer, seed=9), windows, cfg, resume=saved[0])  # from step 2
    assert all(torch.equal(again.model.state_dict()[k], theirs[k]) for k in theirs)


def test_should_stop_is_asked_between_steps_never_after_the_last(tokenizer, one_thread):
    cfg = FinetuneConfig(max_steps=3, batch_size=4, max_length=96, stride=32, max_query_length=32, device="cpu")
    windows = build_training_windows(tokenizer, squad_records()[:4], cfg.max_length, cfg.stride, cfg.max_query_length)
    with pytest.raises(TrainingStopped) as before:
        train_on_windows(tiny_model(tokenizer), windows, cfg, should_stop=lambda: True,
                         on_checkpoint=lambda s: pytest.fail("no step ran: nothing to checkpoint"))
    assert (before.value.step, before.value.checkpointed) == (0, False)

    asked = []
    result = train_on_windows(tiny_model(tokenizer), windows, cfg, should_stop=lambda: asked.append(1) or False)
    assert len(asked) == 3 and result.steps == 3  # before step 1, after steps 1 and 2

    states = []
    asks = iter([False, True])  # before step 1, after step 1
    with pytest.raises(TrainingStopped) as after_one:
        train_on_windows(tiny_model(tokenizer), windows, cfg, should_stop=lambda: next(asks), on_checkpoint=states.append)
    assert (after_one.value.step, after_one.value.checkpointed) == (1, True) and [s.step for s in states] == [1]
    with pytest.raises(ValueError, match="at step 9, but this run has 3 steps"):
        train_on_windows(tiny_model(tokenizer), windows, cfg, resume=TrainState(step=9, model={}, optimizer={}, scheduler={}, rng=torch.get_rng_state()))
