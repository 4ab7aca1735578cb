"""Forward-pass speed: our SplinterForQuestionAnswering vs transformers' (the named peer), same weights.

CPU fp32, batch 16 x 384 (run_qa.py's window), padded rows with an attention mask, both models in one
process with the same torch thread count, warm-up first, then interleaved repeats (the order flips every
round so drift on a shared machine hits both alike). Prints the speed ratio (transformers time / ours;
> 1 means ours is faster) and ends with ONE JSON line. With a CUDA device it also measures bf16 tokens/s
(ours in its production precision: bf16 encoder weights under autocast, fp32 LayerNorms and QASS head;
transformers' model cast to bf16) and MFU against the device's own peak: its datasheet dense bf16 figure
when the device is in the table below, and always the bf16 matmul rate measured on it in the same run.

    .venv/bin/python benchmarks/model_forward.py --quick     # < 3 min on 2 cores
    .venv/bin/python benchmarks/model_forward.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splinter.checkpoint import to_checkpoint_state_dict  # noqa: E402
from splinter.config import SplinterConfig  # noqa: E402
from splinter.model import SplinterForQuestionAnswering, model_flops_per_token  # noqa: E402

# Datasheet dense bf16 tensor-core peaks (FLOP/s, no sparsity), matched against the device name; the
# first matching entry wins, so the more specific names come first.
BF16_DENSE_PEAKS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
)


def datasheet_bf16_peak(device_name: str) -> float | None:
    """The device's datasheet dense bf16 peak, or None when it is not in BF16_DENSE_PEAKS."""
    return next((peak for key, peak in BF16_DENSE_PEAKS if key in device_name), None)


def measured_bf16_matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of a large bf16 matmul on the current CUDA device: what this very device reaches."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def cuda_bf16_forward(config: SplinterConfig, batch: int, seq_len: int, seed: int, repeats: int = 10,
                      hf: torch.nn.Module | None = None, ours: torch.nn.Module | None = None) -> dict[str, Any]:
    """bf16 tokens/s of our model (production precision) and MFU vs the device's peaks; with `hf`, also
    transformers' model in bf16 for the ratio."""
    from splinter.precision import to_mixed_precision

    device = torch.device("cuda")
    if ours is None:
        torch.manual_seed(seed)
        ours = SplinterForQuestionAnswering(config).eval()
    ours_gpu = to_mixed_precision(ours, torch.bfloat16).to(device)
    ours_gpu.splinter.check_inputs = False  # as QAModel runs it: inputs checked once on the host
    inputs = {k: v.to(device) for k, v in make_batch(config, batch, seq_len, seed).items()}
    tokens = batch * seq_len
    name = torch.cuda.get_device_name()
    if hf is not None:
        timing = compare(ours_gpu, hf.to(device=device, dtype=torch.bfloat16), inputs, inputs, warmup=3,
                         repeats=repeats, sync=True)
    else:
        for _ in range(3):
            timed_forward(ours_gpu, inputs, sync=True)
        times = [timed_forward(ours_gpu, inputs, sync=True)[0] for _ in range(repeats)]
        timing = {"ours_s": statistics.median(times)}
    achieved = model_flops_per_token(config, seq_len) * tokens / timing["ours_s"]
    sheet = datasheet_bf16_peak(name)
    matmul = measured_bf16_matmul_peak()
    out: dict[str, Any] = {
        "cuda_device": name,
        "cuda_bf16_batch": f"{batch}x{seq_len}",
        "cuda_bf16_ours_tokens_per_s": round(tokens / timing["ours_s"], 1),
        "cuda_bf16_achieved_tflops": round(achieved / 1e12, 1),
        "cuda_bf16_matmul_peak_tflops": round(matmul / 1e12, 1),
        "cuda_bf16_mfu_vs_matmul_peak": round(achieved / matmul, 4),
        "cuda_bf16_datasheet_peak_tflops": round(sheet / 1e12, 1) if sheet else None,
        "cuda_bf16_mfu_vs_datasheet": round(achieved / sheet, 4) if sheet else None,
    }
    if hf is not None:
        out["cuda_bf16_transformers_tokens_per_s"] = round(tokens / timing["transformers_s"], 1)
        out["cuda_bf16_ratio_vs_transformers"] = round(timing["ratio"], 3)
    return out


def build_models(config: SplinterConfig, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours with a random init, and transformers' loaded from ours' checkpoint-named state dict."""
    import transformers

    torch.manual_seed(seed)
    ours = SplinterForQuestionAnswering(config).eval()
    values = config.to_dict()
    values.pop("model_type", None)
    values.pop("architectures", None)
    hf = transformers.SplinterForQuestionAnswering(transformers.SplinterConfig(**values)).eval()
    result = hf.load_state_dict(to_checkpoint_state_dict(ours), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if not k.endswith("position_ids")]:
        raise RuntimeError(f"weights did not transfer: {result}")
    return ours, hf


def make_batch(config: SplinterConfig, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """QA-shaped inputs: [CLS] question [QUESTION] . [SEP] context [SEP], rows padded to seq_len."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, config.vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    types = torch.zeros(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g))
        ids[b, 0], ids[b, 12], ids[b, 13], ids[b, 14], ids[b, length - 1] = (
            101,
            config.question_token_id,
            119,
            102,
            102,
        )
        ids[b, length:] = config.pad_token_id
        mask[b, length:] = 0
        types[b, 15:length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def timed_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], sync: bool) -> tuple[float, Any]:
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(**inputs)
        if sync:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out


def compare(
    ours: torch.nn.Module,
    hf: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    warmup_inputs: dict[str, torch.Tensor],
    warmup: int,
    repeats: int,
    sync: bool = False,
) -> dict[str, Any]:
    """Median seconds per forward for both, interleaved; plus the max logit difference (sanity)."""
    for _ in range(warmup):
        timed_forward(ours, warmup_inputs, sync)
        timed_forward(hf, warmup_inputs, sync)
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    last: dict[str, Any] = {}
    for r in range(repeats):
        order = [("ours", ours), ("transformers", hf)]
        for name, model in order if r % 2 == 0 else order[::-1]:
            seconds, last[name] = timed_forward(model, inputs, sync)
            times[name].append(seconds)
            print(f"  round {r}: {name:<12} {seconds:.3f} s", flush=True)
    real = inputs["attention_mask"].bool()
    a, b = last["ours"].start_logits.float(), last["transformers"].start_logits.float()
    diff = (a - b).abs()[real].max().item()
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
    return {"ours_s": ours_s, "transformers_s": hf_s, "ratio": hf_s / ours_s, "max_abs_logit_diff": diff}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small warm-up batch, 2 rounds (< 3 min on 2 cores)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 4, --quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cuda", action="store_true", help="skip the bf16 GPU measurement")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    repeats = args.repeats or (2 if args.quick else 4)
    config = SplinterConfig(vocab_size=28996)  # the hub checkpoints' size (cased vocab)
    ours, hf = build_models(config, args.seed)
    inputs = make_batch(config, args.batch, args.seq_len, args.seed)
    # --quick warms kernels up on a small batch: a full-size warm-up forward costs ~25 s per model here.
    warmup_inputs = make_batch(config, 2, args.seq_len, args.seed + 1) if args.quick else inputs

    print(f"CPU fp32, batch {args.batch} x {args.seq_len}, {threads} threads, {repeats} interleaved rounds")
    cpu = compare(ours, hf, inputs, warmup_inputs, warmup=1, repeats=repeats)
    tokens = args.batch * args.seq_len
    print(
        f"ours {cpu['ours_s']:.3f} s ({tokens / cpu['ours_s']:.0f} tok/s), transformers {cpu['transformers_s']:.3f} s "
        f"({tokens / cpu['transformers_s']:.0f} tok/s): ours is {cpu['ratio']:.2f}x transformers' speed "
        f"(max |logit diff| {cpu['max_abs_logit_diff']:.1e})"
    )
    result: dict[str, Any] = {
        "benchmark": "model_forward",
        "peer": "transformers.SplinterForQuestionAnswering",
        "quick": args.quick,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": threads,
        "repeats": repeats,
        "cpu_fp32_ours_s": round(cpu["ours_s"], 4),
        "cpu_fp32_transformers_s": round(cpu["transformers_s"], 4),
        "cpu_fp32_ours_tokens_per_s": round(tokens / cpu["ours_s"], 1),
        "cpu_fp32_transformers_tokens_per_s": round(tokens / cpu["transformers_s"], 1),
        "cpu_fp32_ratio_vs_transformers": round(cpu["ratio"], 3),
        "max_abs_logit_diff": cpu["max_abs_logit_diff"],
    }

    if torch.cuda.is_available() and not args.no_cuda:
        gpu = cuda_bf16_forward(config, args.batch, args.seq_len, args.seed, repeats=max(repeats, 10), hf=hf,
                                ours=ours)
        sheet = gpu["cuda_bf16_mfu_vs_datasheet"]
        print(
            f"{gpu['cuda_device']} bf16: ours {gpu['cuda_bf16_ours_tokens_per_s']:.0f} tok/s, MFU "
            f"{gpu['cuda_bf16_mfu_vs_matmul_peak']:.1%} of its measured bf16 matmul peak"
            + (f", {sheet:.1%} of its datasheet peak" if sheet else "")
            + f"; transformers {gpu['cuda_bf16_transformers_tokens_per_s']:.0f} tok/s, "
            f"ratio {gpu['cuda_bf16_ratio_vs_transformers']:.2f}x"
        )
        result.update(gpu)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
