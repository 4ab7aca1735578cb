"""SplinterTokenizer vs transformers 4.57's SplinterTokenizerFast (the oracle), on real SQuAD pairs.

One file on purpose (~650 lines): every section (the call API, overflow windows, `encode_qa_windows`,
save/load) compares against the same module-scoped transformers tokenizers and SQuAD sample, which take
seconds to build; sections are marked by the comment rules below.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from splinter.tokenizer import SplinterTokenizer
from splinter.windows import encode_qa_windows
from tests.conftest import DATA, ROOT

transformers = pytest.importorskip("transformers")

VOCAB = ROOT / "splinter" / "assets" / "vocab.txt"
CAT = "The cat sat on the windowsill, watching birds in the garden."
CAT_IDS = [101, 1109, 5855, 2068, 1113, 1103, 3751, 7956, 117, 2903, 4939, 1107, 1103, 4605, 119, 102]

# Hard cases: accents (cased: kept), CJK, emoji, control characters and odd whitespace, literal
# special tokens, a word over WordPiece's 100-char limit, and empty strings.
EDGE_TEXTS = [
    "Café naïve Ångström résumé Øresund Zürich",
    "北京大学 is in 北京. 東京タワー and 서울",
    "I ❤️ 🍕 and 👩‍👩‍👧 — “quotes” … ½",
    "tabs\tnew\nlines\r\nnbsp\u00a0zero\u200bwidth\u0007bell",
    "literal [QUESTION] and [CLS] [SEP] [MASK] [PAD] [UNK] tokens; lower [question] [cls]",
    "x" * 150 + " word " + "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "   leading and trailing spaces   ",
    "",
    "Ünïcödé ÀÉÎÕÜ ß ﬁ ligature Ⅻ ①",
]


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def squad() -> list[dict]:
    raw = json.loads((DATA / "squad_sample.json").read_text(encoding="utf-8"))
    rows = []
    for article in raw["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answer = qa["answers"][0]
                rows.append(
                    {
                        "question": qa["question"],
                        "context": para["context"],
                        "answer_start": answer["answer_start"],
                        "answer_text": answer["text"],
                    }
                )
    assert len(rows) >= 200
    return rows


@pytest.fixture(scope="module")
def questions(squad) -> list[str]:
    return [r["question"] for r in squad]


@pytest.fixture(scope="module")
def contexts(squad) -> list[str]:
    return [r["context"] for r in squad]


def make_hf(padding_side: str = "right", **kwargs):
    return transformers.SplinterTokenizerFast(
        vocab_file=str(VOCAB),
        do_lower_case=kwargs.pop("do_lower_case", False),
        model_max_length=512,
        padding_side=padding_side,
        **kwargs,
    )


@pytest.fixture(scope="module")
def hf_right():
    return make_hf("right")


@pytest.fixture(scope="module")
def hf_left():
    return make_hf("left")


@pytest.fixture(scope="module")
def ours() -> SplinterTokenizer:
    return SplinterTokenizer.from_vocab(VOCAB)


@pytest.fixture(scope="module")
def ours_left() -> SplinterTokenizer:
    return SplinterTokenizer.from_vocab(VOCAB, padding_side="left")


def as_lists(enc) -> dict:
    """BatchEncoding (ours or transformers') -> plain nested lists (both give offsets as tuples)."""
    return {key: value.tolist() if hasattr(value, "tolist") else value for key, value in enc.items()}


def assert_same(ours_enc, hf_enc, check_sequence_ids: bool = True) -> None:
    a, b = as_lists(ours_enc), as_lists(hf_enc)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert len(ours_enc.encodings) == len(hf_enc.encodings)
    if check_sequence_ids:
        for i in range(len(hf_enc.encodings)):
            assert ours_enc.sequence_ids(i) == hf_enc.sequence_ids(i)
            assert ours_enc.word_ids(i) == hf_enc.word_ids(i)
            assert ours_enc.tokens(i) == hf_enc.tokens(i)


# ---------------------------------------------------------------------- vocabulary


def test_bundled_vocab_known_ids(ours):
    lines = VOCAB.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 28996
    known = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[QUESTION]": 104, ".": 119}
    for token, idx in known.items():
        assert lines[idx] == token
        assert ours.convert_tokens_to_ids(token) == idx
    assert "[unused100]" not in lines and lines[105] == "[unused101]"
    assert ours.vocab_size == len(ours) == 28996
    assert (ours.pad_token_id, ours.unk_token_id, ours.cls_token_id) == (0, 100, 101)
    assert (ours.sep_token_id, ours.mask_token_id, ours.question_token_id) == (102, 103, 104)
    assert ours(CAT)["input_ids"] == CAT_IDS


def test_decoder_script_reproduces_bundled_vocab(tmp_path):
    if importlib.util.find_spec("blingfire") is None:
        pytest.skip("blingfire data package not installed")
    spec = importlib.util.spec_from_file_location(
        "decode_vocab", ROOT / "scripts" / "decode_blingfire_vocab.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check", "--out", str(VOCAB)]) == 0
    out = tmp_path / "vocab.txt"
    assert module.main(["--out", str(out)]) == 0
    assert out.read_bytes() == VOCAB.read_bytes()


def test_default_is_bundled_vocab(ours):
    default = SplinterTokenizer.default()
    assert default.get_vocab() == ours.get_vocab()
    assert not default.do_lower_case and default.padding_side == "right" and default.model_max_length == 512


def test_vocab_consistent_with_bert_cased(contexts):
    # Self-consistency: transformers' BERT tokenizer over the decoded vocab splits text the same way.
    bert = transformers.BertTokenizerFast(vocab_file=str(VOCAB), do_lower_case=False)
    ours = SplinterTokenizer.from_vocab(VOCAB)
    # (BERT has no [QUESTION] special token, so texts containing it literally are left out.)
    texts = sorted(set(contexts))[:30] + [t for t in EDGE_TEXTS if "[QUESTION]" not in t]
    assert [ours.tokenize(t) for t in texts] == [bert.tokenize(t) for t in texts]
    assert bert(CAT)["input_ids"] == CAT_IDS


# ---------------------------------------------------------------------- parity on SQuAD


@pytest.mark.parametrize("side", ["right", "left"])
def test_pairs_parity(side, ours, ours_left, hf_right, hf_left, questions, contexts):
    tok, hf = (ours, hf_right) if side == "right" else (ours_left, hf_left)
    first, second = (questions, contexts) if side == "right" else (contexts, questions)
    kw = dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_length=True)
    assert_same(tok(first, second, **kw), hf(first, second, **kw))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length,stride", [(384, 128), (64, 16)])
def test_overflow_windows_parity(
    side, max_length, stride, ours, ours_left, hf_right, hf_left, questions, contexts
):
    tok, hf = (ours, hf_right) if side == "right" else (ours_left, hf_left)
    # run_qa.py: question first and truncate the context when padding right, the reverse when left.
    if side == "right":
        first, second, strategy = questions, contexts, "only_second"
    else:
        first, second, strategy = contexts, questions, "only_first"
    kw = dict(
        truncation=strategy,
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    got, want = tok(first, second, **kw), hf(first, second, **kw)
    assert_same(got, want)
    n_windows = len(got["input_ids"])
    assert n_windows > len(questions) and max(map(len, got["input_ids"])) == max_length
    if max_length == 384:  # padding to max_length over windows, as run_qa.py does (pad_to_max_length)
        kw["padding"] = "max_length"
        assert_same(tok(first, second, **kw), hf(first, second, **kw), check_sequence_ids=False)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("padding", [True, "longest", "max_length"])
def test_padding_parity(side, padding, ours, ours_left, hf_right, hf_left, questions, contexts):
    tok, hf = (ours, hf_right) if side == "right" else (ours_left, hf_left)
    q, c = questions[:17], contexts[:17]
    kw = dict(padding=padding, truncation="only_second", max_length=256, return_offsets_mapping=True)
    got = tok(q, c, **kw)
    assert_same(got, hf(q, c, **kw))
    pad_col = [row[0] if side == "left" else row[-1] for row in got["input_ids"]]
    assert 0 in pad_col  # some rows really were padded, on the requested side
    kw = dict(padding=True, pad_to_multiple_of=8)
    got = tok(q, c, **kw)
    assert len(got["input_ids"][0]) % 8 == 0
    assert_same(got, hf(q, c, **kw))


def test_truncation_strategies_parity(ours, hf_right, questions, contexts):
    q, c = questions[:20], contexts[:20]
    for kw in [
        dict(truncation=True, max_length=48),
        dict(truncation="longest_first", max_length=40),
        dict(truncation="only_first", max_length=200, swap=True),
        dict(max_length=30),  # max_length alone turns on longest_first
        dict(truncation=True),  # model_max_length
        dict(truncation="longest_first", max_length=40, stride=4, return_overflowing_tokens=True),
    ]:
        first, second = (c, q) if kw.pop("swap", False) else (q, c)
        assert_same(ours(first, second, **kw), hf_right(first, second, **kw))
        assert_same(ours(c, **kw), hf_right(c, **kw))
    # Asking to truncate a sequence that is too short to make room fails in both.
    with pytest.raises(ValueError, match="too short"):
        ours(q, c, truncation="only_first", max_length=200)
    with pytest.raises(Exception, match="too short"):
        hf_right(q, c, truncation="only_first", max_length=200)


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_edge_texts_parity(text, ours, ours_left, hf_right, hf_left):
    kw = dict(return_offsets_mapping=True, return_special_tokens_mask=True)
    assert_same(ours(text, **kw), hf_right(text, **kw))
    assert ours.tokenize(text) == hf_right.tokenize(text)
    for tok, hf in ((ours, hf_right), (ours_left, hf_left)):
        # As pairs in both orders, batched (a single pair with empty text_pair is a single text).
        batch = [("Where is it?", text), (text, "Where is it?"), (text, text)]
        assert_same(tok(batch, **kw), hf(batch, **kw))
        assert_same(tok("Where is it?", text, **kw), hf("Where is it?", text, **kw))
    ids = ours(text, "a question")["input_ids"]
    assert ours.decode(ids) == hf_right.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf_right.decode(ids, skip_special_tokens=True)


def test_cased_and_lowercase_variants(hf_right):
    text = "Café NAÏVE Zürich"
    # Cased: no lowercasing and no accent stripping (NAÏVE has no cased WordPiece split: [UNK]).
    assert (
        SplinterTokenizer.default().tokenize(text) == hf_right.tokenize(text) == ["Café", "[UNK]", "Zürich"]
    )
    lower = SplinterTokenizer.from_vocab(VOCAB, do_lower_case=True)
    hf_lower = make_hf(do_lower_case=True)  # transformers' default: lowercases and strips accents
    for t in EDGE_TEXTS + [text]:
        assert_same(
            lower(t, "Qué?", return_offsets_mapping=True), hf_lower(t, "Qué?", return_offsets_mapping=True)
        )
    assert lower.tokenize(text) == ["cafe", "naive", "zur", "##ich"]


def test_very_long_inputs(ours, hf_right, contexts):
    long_context = " ".join(contexts[:60])  # ~10k words
    kw = dict(truncation="only_second", max_length=384, stride=128, return_overflowing_tokens=True)
    got = ours("What is this?", long_context, return_offsets_mapping=True, **kw)
    assert_same(got, hf_right("What is this?", long_context, return_offsets_mapping=True, **kw))
    assert len(got["input_ids"]) > 20 and got["overflow_to_sample_mapping"] == [0] * len(got["input_ids"])
    # Untruncated it is simply long (no limit is imposed without truncation, as in transformers).
    assert len(ours(long_context)["input_ids"]) > 512


def test_single_unbatched_and_tensors(ours, hf_right, questions, contexts):
    assert_same(ours(questions[0], contexts[0]), hf_right(questions[0], contexts[0]))
    assert isinstance(ours(questions[0])["input_ids"][0], int)
    for kind in ("pt", "np"):
        kw = dict(padding=True, return_tensors=kind, return_offsets_mapping=True)
        got, want = ours(questions[:5], contexts[:5], **kw), hf_right(questions[:5], contexts[:5], **kw)
        assert set(got) == set(want)
        for key in got:
            assert type(got[key]) is type(want[key]) and got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
        single = ours(questions[0], contexts[0], return_tensors=kind)
        assert tuple(single["input_ids"].shape) == tuple(
            hf_right(questions[0], contexts[0], return_tensors=kind)["input_ids"].shape
        )
    with pytest.raises(ValueError, match="padding"):
        ours(questions[:5], contexts[:5], return_tensors="pt")
    enc = ours(questions[:2], contexts[:2], padding=True, return_tensors="pt").to("cpu")
    assert isinstance(enc.input_ids, torch.Tensor)


def test_flags_parity(ours, hf_right, questions, contexts):
    q, c = questions[:3], contexts[:3]
    for kw in [
        dict(return_token_type_ids=False),
        dict(return_attention_mask=False),
        dict(add_special_tokens=False),
        dict(
            add_special_tokens=False,
            truncation="only_second",
            max_length=50,
            stride=5,
            return_overflowing_tokens=True,
        ),
    ]:
        assert_same(ours(q, c, **kw), hf_right(q, c, **kw))
    assert ours.encode(q[0], c[0]) == hf_right.encode(q[0], c[0])


def test_char_to_token_matches_transformers(ours, hf_right, squad):
    rows = squad[:50]
    q, c = [r["question"] for r in rows], [r["context"] for r in rows]
    got, want = ours(q, c), hf_right(q, c)
    for i, r in enumerate(rows):
        start, end = r["answer_start"], r["answer_start"] + len(r["answer_text"]) - 1
        for ch in (start, end):
            assert got.char_to_token(i, ch, sequence_index=1) == want.char_to_token(i, ch, sequence_index=1)
        token = want.char_to_token(i, start, sequence_index=1)
        assert got.token_to_chars(i, token) == tuple(want.token_to_chars(i, token))
        assert got.token_to_chars(i, 0) is None and want.token_to_chars(i, 0) is None
    assert got.char_to_token(3) == want.char_to_token(3)


def test_vocab_helpers(ours, hf_right):
    tokens = ["[CLS]", "The", "##s", "no-such-token", "[QUESTION]"]
    assert ours.convert_tokens_to_ids(tokens) == hf_right.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("[QUESTION]") == 104
    assert ours.convert_ids_to_tokens([101, 104, 119, 1109]) == hf_right.convert_ids_to_tokens(
        [101, 104, 119, 1109]
    )
    assert ours.convert_ids_to_tokens(104) == "[QUESTION]"
    assert ours.get_vocab() == hf_right.get_vocab()


def test_question_token_appended_when_missing(tmp_path):
    lines = VOCAB.read_text(encoding="utf-8").split("\n")
    lines[104] = "[unused100]"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(lines), encoding="utf-8")
    tok = SplinterTokenizer.from_vocab(vocab)
    hf = transformers.SplinterTokenizerFast(vocab_file=str(vocab), do_lower_case=False)
    assert tok.question_token_id == hf.convert_tokens_to_ids("[QUESTION]") == 28996
    assert tok.vocab_size == 28996 and len(tok) == 28997 == len(hf)
    assert_same(tok("Who?", "Him."), hf("Who?", "Him."))
    # Saved and reloaded (by us, transformers fast and slow), [QUESTION] keeps id 28996.
    written = tok.save_pretrained(tmp_path / "saved")
    assert any(p.endswith("added_tokens.json") for p in written)
    reloaded = [
        SplinterTokenizer.from_pretrained(tmp_path / "saved"),
        transformers.SplinterTokenizerFast.from_pretrained(tmp_path / "saved"),
        transformers.SplinterTokenizer.from_pretrained(tmp_path / "saved"),
    ]
    (tmp_path / "saved" / "tokenizer.json").unlink()
    reloaded.append(SplinterTokenizer.from_pretrained(tmp_path / "saved"))
    for other in reloaded:
        assert other("Who?", "Him.")["input_ids"] == tok("Who?", "Him.")["input_ids"]
        assert other.convert_tokens_to_ids("[QUESTION]") == 28996


# ---------------------------------------------------------------------- encode_qa_windows


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length,stride", [(384, 128), (64, 16)])
def test_encode_qa_windows_equals_call(
    side, max_length, stride, ours, ours_left, hf_right, hf_left, questions, contexts
):
    # The oracle is transformers itself (our __call__ equals it: test_overflow_windows_parity).
    tok, hf = (ours, hf_right) if side == "right" else (ours_left, hf_left)
    out = encode_qa_windows(
        tok, questions, contexts, max_length=max_length, stride=stride, max_query_length=None
    )
    first, second, strategy = (
        (questions, contexts, "only_second") if side == "right" else (contexts, questions, "only_first")
    )
    ref = hf(
        first,
        second,
        truncation=strategy,
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    w = len(ref["input_ids"])
    lengths = np.array([len(ids) for ids in ref["input_ids"]])
    assert out["input_ids"].shape == (w, lengths.max())
    assert out["sample_index"].tolist() == ref["overflow_to_sample_mapping"]
    assert out["lengths"].tolist() == lengths.tolist()
    real = out["attention_mask"].astype(bool)
    assert real.sum(axis=1).tolist() == lengths.tolist() and real[:, 0].all()
    # Real tokens, row-major, equal transformers' windows concatenated; padding is [PAD]/0/-1.
    assert out["input_ids"][real].tolist() == [i for ids in ref["input_ids"] for i in ids]
    assert out["token_type_ids"][real].tolist() == [t for ts in ref["token_type_ids"] for t in ts]
    assert not out["input_ids"][~real].any() and not out["token_type_ids"][~real].any()
    assert (out["offsets"][~real] == -1).all()
    context_seq = 1 if side == "right" else 0
    seq = np.array([s if s is not None else -1 for i in range(w) for s in ref.sequence_ids(i)])
    want = np.array([o for offs in ref["offset_mapping"] for o in offs]).reshape(-1, 2)
    want[seq != context_seq] = -1
    np.testing.assert_array_equal(out["offsets"][real], want)
    # context_start/end bracket exactly the context tokens; question_position is [QUESTION].
    pos = np.broadcast_to(np.arange(real.shape[1]), real.shape)
    in_ctx = (pos >= out["context_start"][:, None]) & (pos < out["context_end"][:, None])
    assert in_ctx[real].tolist() == (seq == context_seq).tolist() and not in_ctx[~real].any()
    assert (out["input_ids"][np.arange(w), out["question_position"]] == 104).all()
    for key in ("input_ids", "token_type_ids", "attention_mask", "offsets", "lengths", "sample_index"):
        assert out[key].dtype == np.int32, key
    assert not out["question_truncated"].any()


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_qa_windows_window_rule_edges(side, ours, ours_left, hf_right, hf_left):
    # Windows are assembled in numpy, not by the backend: check the overflow rule on every
    # boundary (context exactly filling a window, one token over, stride 0, stride = room - 1, ...).
    tok, hf = (ours, hf_right) if side == "right" else (ours_left, hf_left)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "cat", "Zürich", "北", "running"]
    qs, cs, settings = [], [], []
    for q_words in (0, 1, 3):
        for c_words in (0, 1, 2, 5, 6, 7, 11, 12, 13, 30):
            qs.append(" ".join(rng.choice(words, q_words)))
            cs.append(" ".join(rng.choice(words, c_words)))
    for max_length, stride in [(12, 0), (12, 2), (13, 3), (14, 4), (20, 0), (20, 7), (40, 10), (64, 16)]:
        out = encode_qa_windows(tok, qs, cs, max_length=max_length, stride=stride, max_query_length=None)
        first, second, strategy = (qs, cs, "only_second") if side == "right" else (cs, qs, "only_first")
        ref = hf(
            first,
            second,
            truncation=strategy,
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
        )
        assert out["sample_index"].tolist() == ref["overflow_to_sample_mapping"], (max_length, stride)
        got = [row[:n].tolist() for row, n in zip(out["input_ids"], out["lengths"], strict=True)]
        assert got == ref["input_ids"], (max_length, stride)
        types = [row[:n].tolist() for row, n in zip(out["token_type_ids"], out["lengths"], strict=True)]
        assert types == ref["token_type_ids"], (max_length, stride)
        settings.append(len(got))
    assert max(settings) > 2 * len(qs)  # many windows per pair in the tight settings


def test_encode_qa_windows_max_query_length(ours, hf_right, questions, contexts):
    long_q = "Which " + " ".join(f"unusually{i} lengthy" for i in range(60)) + " question is this?"
    qs, cs = [long_q, questions[0], "", "Short?"], [contexts[0], contexts[1], contexts[2], ""]
    out = encode_qa_windows(ours, qs, cs, max_length=384, stride=128, max_query_length=64)
    assert out["question_truncated"].tolist() == [True, False, False, False]
    full = ours.tokenize(long_q)
    assert len(full) > 64
    first = out["input_ids"][0]
    assert first[1:65].tolist() == ours.convert_tokens_to_ids(full[:64])
    assert first[65] == 104 and out["question_position"][0] == 65
    # Same windows as transformers on the question cut to its first 64 tokens.
    cut = hf_right.decode(ours.convert_tokens_to_ids(full[:64]))
    assert hf_right(cut, contexts[0])["input_ids"][:66] == first[:66].tolist()[:66]
    ref = hf_right(
        [cut],
        [contexts[0]],
        truncation="only_second",
        max_length=384,
        stride=128,
        return_overflowing_tokens=True,
    )
    rows = np.flatnonzero(out["sample_index"] == 0)
    assert [out["input_ids"][r, : out["lengths"][r]].tolist() for r in rows] == ref["input_ids"]
    # Empty question and empty context are fine: the template alone.
    empty_ctx = np.flatnonzero(out["sample_index"] == 3)
    assert len(empty_ctx) == 1 and out["context_start"][empty_ctx[0]] == out["context_end"][empty_ctx[0]]


def test_encode_qa_windows_answers_recoverable(ours, squad):
    # The offsets map every gold answer back to its text in the window containing it.
    rows = squad[:80]
    out = encode_qa_windows(ours, [r["question"] for r in rows], [r["context"] for r in rows], 128, 32)
    found = 0
    for w in range(len(out["lengths"])):
        r = rows[out["sample_index"][w]]
        start, end = r["answer_start"], r["answer_start"] + len(r["answer_text"])
        offs = out["offsets"][w]
        s = np.flatnonzero((offs[:, 0] <= start) & (offs[:, 1] > start))
        e = np.flatnonzero((offs[:, 0] < end) & (offs[:, 1] >= end))
        if len(s) and len(e):
            assert r["context"][offs[s[0], 0] : offs[e[0], 1]].find(r["answer_text"]) >= 0
            found += 1
    assert found >= len(rows)


def test_encode_qa_windows_padding_and_empty(ours):
    out = encode_qa_windows(ours, ["Who?"], ["Me."], max_length=64, stride=16, pad_to_max_length=True)
    assert out["input_ids"].shape == (1, 64) and out["offsets"].shape == (1, 64, 2)
    empty = encode_qa_windows(ours, [], [])
    assert empty["input_ids"].shape == (0, 0) and empty["sample_index"].shape == (0,)
    obj = np.array(["Who?", "What?"], dtype=object)
    out = encode_qa_windows(ours, obj, np.array(["Me.", "That."], dtype=object))
    assert out["sample_index"].tolist() == [0, 1]


# ---------------------------------------------------------------------- errors


def test_bad_input(ours, questions, contexts):
    with pytest.raises(TypeError):
        ours(None)
    with pytest.raises(TypeError, match=r"text_pair\[1\]"):
        ours(["a", "b"], ["c", None])
    with pytest.raises(TypeError, match=r"text\[1\]"):
        ours(["a", None])
    with pytest.raises(TypeError):
        ours("a", 3)
    with pytest.raises(ValueError):
        ours(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"contexts\[0\]"):
        encode_qa_windows(ours, ["q"], [None])
    with pytest.raises(TypeError):
        encode_qa_windows(ours, None, None)
    with pytest.raises(ValueError):
        encode_qa_windows(ours, ["q"], ["a", "b"])
    with pytest.raises(ValueError, match="padding"):
        ours("a", padding="sideways")
    with pytest.raises(ValueError, match="return_tensors"):
        ours("a", return_tensors="tf")
    with pytest.raises(ValueError, match="truncation"):
        ours("a", truncation="only_middle")
    assert ours("", "")["input_ids"] == [101, 102]  # transformers drops an empty single text_pair too
    assert ours([""], [""])["input_ids"] == [[101, 104, 119, 102, 102]]


def test_stride_too_large(ours, hf_right, questions, contexts):
    q = "a b c d e f g h i j"  # 10 tokens: room for the context is 20 - 10 - 5 = 5
    with pytest.raises(ValueError, match="stride"):
        ours(q, "x " * 50, truncation="only_second", max_length=20, stride=5, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="stride"):
        encode_qa_windows(ours, [q], ["x " * 50], max_length=20, stride=5)
    with pytest.raises(ValueError, match="stride"):
        encode_qa_windows(ours, ["word " * 300], ["x"], max_length=384, stride=128, max_query_length=None)
    # transformers refuses too (its backend panics).
    with pytest.raises(BaseException):  # noqa: B017 - pyo3's PanicException derives from BaseException
        hf_right(
            q, "x " * 50, truncation="only_second", max_length=20, stride=5, return_overflowing_tokens=True
        )
    # One less is fine and matches.
    kw = dict(truncation="only_second", max_length=20, stride=4, return_overflowing_tokens=True)
    assert_same(ours(q, "x " * 50, **kw), hf_right(q, "x " * 50, **kw))


# ---------------------------------------------------------------------- save / load


def _encode_sample(tok, questions, contexts):
    right = tok.padding_side == "right"
    return tok(
        questions[:24] if right else contexts[:24],
        contexts[:24] if right else questions[:24],
        truncation="only_second" if right else "only_first",
        max_length=128,
        stride=32,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


@pytest.mark.parametrize("side", ["right", "left"])
def test_save_load_roundtrip_ours_and_transformers(side, tmp_path, questions, contexts):
    tok = SplinterTokenizer.from_vocab(VOCAB, padding_side=side, model_max_length=384)
    written = tok.save_pretrained(tmp_path / "tok")
    names = {Path(p).name for p in written}
    assert names == {"vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert (tmp_path / "tok" / "vocab.txt").read_bytes() == VOCAB.read_bytes()
    ref = _encode_sample(tok, questions, contexts)

    back = SplinterTokenizer.from_pretrained(tmp_path / "tok")
    assert (back.padding_side, back.model_max_length, back.do_lower_case) == (side, 384, False)
    assert_same(_encode_sample(back, questions, contexts), ref)

    hf_fast = transformers.SplinterTokenizerFast.from_pretrained(tmp_path / "tok")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert type(auto).__name__ == "SplinterTokenizerFast"
    for hf in (hf_fast, auto):
        assert (hf.padding_side, hf.model_max_length) == (side, 384)
        assert hf.convert_tokens_to_ids("[QUESTION]") == 104 and "[QUESTION]" in hf.all_special_tokens
        assert_same(ref, _encode_sample(hf, questions, contexts))
    slow = transformers.SplinterTokenizer.from_pretrained(tmp_path / "tok")
    assert not slow.do_lower_case and slow.question_token_id == 104
    if side == "right":  # slow and fast agree on the right-padding template
        assert (
            slow(questions[:10], contexts[:10])["input_ids"]
            == tok(questions[:10], contexts[:10])["input_ids"]
        )

    # vocab.txt + configs only (no tokenizer.json) loads the same.
    (tmp_path / "tok" / "tokenizer.json").unlink()
    assert_same(_encode_sample(SplinterTokenizer.from_pretrained(tmp_path / "tok"), questions, contexts), ref)


@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_load_dir_saved_by_transformers(lower, side, tmp_path, questions, contexts):
    hf = make_hf(side, do_lower_case=lower)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["additional_special_tokens"] == ["[QUESTION]"]  # what trips transformers' own reload
    with pytest.raises(TypeError, match="multiple values"):
        transformers.SplinterTokenizerFast.from_pretrained(tmp_path / "hf")

    tok = SplinterTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.do_lower_case, tok.padding_side, tok.question_token_id) == (lower, side, 104)
    want = _encode_sample(hf, questions, contexts)
    assert_same(_encode_sample(tok, questions, contexts), want)
    accents = "Café NAÏVE Zürich"
    assert tok.tokenize(accents) == hf.tokenize(accents)

    # The transformers layout without tokenizer.json (vocab.txt + tokenizer_config + special_tokens_map).
    only_vocab = tmp_path / "vocab_only"
    shutil.copytree(tmp_path / "hf", only_vocab)
    for name in ("tokenizer.json", "added_tokens.json"):
        (only_vocab / name).unlink(missing_ok=True)
    tok = SplinterTokenizer.from_pretrained(only_vocab)
    assert_same(_encode_sample(tok, questions, contexts), want)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        SplinterTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        SplinterTokenizer.from_pretrained(tmp_path / "missing")


def test_padding_side_setter_rebuilds_template(questions, contexts):
    tok = SplinterTokenizer.from_vocab(VOCAB)
    tok.padding_side = "left"
    assert_same(
        tok(contexts[:5], questions[:5], padding=True),
        make_hf("left")(contexts[:5], questions[:5], padding=True),
    )
    with pytest.raises(ValueError):
        tok.padding_side = "middle"


def test_unbounded_model_max_length_from_transformers(tmp_path, contexts):
    # A tokenizer saved without a model_max_length says ~1e30: "no limit", so truncation=True is a no-op.
    hf = transformers.SplinterTokenizerFast(vocab_file=str(VOCAB), do_lower_case=False)
    hf.save_pretrained(tmp_path)
    tok = SplinterTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length > 10**20
    long_text = " ".join(contexts[:10])
    for kw in (dict(truncation=True), dict(padding="max_length"), dict(truncation=True, padding=True)):
        assert_same(tok([long_text, "short"], **kw), hf([long_text, "short"], **kw))
    assert len(tok(long_text, truncation=True)["input_ids"]) > 512


def test_pickle_roundtrip(ours_left, questions, contexts):
    import pickle

    copy = pickle.loads(pickle.dumps(ours_left))
    assert copy.padding_side == "left"
    a = encode_qa_windows(copy, questions[:20], contexts[:20], 64, 16)
    b = encode_qa_windows(ours_left, questions[:20], contexts[:20], 64, 16)
    assert all(np.array_equal(a[k], b[k]) for k in a)
