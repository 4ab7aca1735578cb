"""`splinter fewshot`: the paper's few-shot protocol, every (K, seed) run a Ray task, as one command.

For every K in `examples` and seed in `seeds`: sample K training questions with that seed (the sampling of
`pipeline.training.finetuning`), fine-tune the model (`splinter.train`, the same options as `splinter finetune`; the
training seed is the run's seed unless `train_seed` fixes one), answer DEV with this project's QA stages
(the `splinter extract` job, run inside the task without Ray Data) and score it with the SQuAD v1.1 metric.

Runs are Ray tasks: one GPU each when the cluster has GPUs (and `device` is not cpu), else `cpus_per_run`
CPU slots each, so Ray runs as many at once as the cluster holds. The driver reads the data and the model
once and ships them through the object store: workers never need the input paths.

OUTPUT (a run directory, pipeline.storage.rundir):
    __splinter__/job.json        the settings every run shares (a rerun with other settings is refused) and
                                 the grid; the lease; stats.json and _SUCCESS once every run has finished
    runs/k{K}-seed{S}/result.json  a finished run (written last, so it marks the run complete), beside its
                                 predictions.json, trainer_log.jsonl and training_args.json
    results.parquet              one row per finished run of the grid (K, seed, EM, F1, steps, seconds...)
A rerun skips finished runs (also when the grid grows), and redoes failed or interrupted ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.progress import LogProgress, NullProgress, Progress
from pipeline.settings import ConfigError, FewshotJob
from pipeline.storage.rundir import META, RunDir
from pipeline.training.finetuning import read_qa_dataset, sample_examples
from splinter.train import FinetuneConfig

log = logging.getLogger(__name__)

RESULTS = "results.parquet"
OURS = ("runs", RESULTS, "report.html")  # top-level names this job writes
# The model directory's files shipped to the workers (weights, config, tokenizer); nothing else is needed.
_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Seed of the fixed sample of DEV questions when eval_examples is set (not a run's seed: every run is
# scored on the same questions).
EVAL_SAMPLE_SEED = 0


def grid_settings(job: FewshotJob) -> dict[str, Any]:
    """What every run shares (not the grid itself): a rerun must match it to reuse finished runs."""
    training = job.training.to_dict()
    training.pop("seed")
    training.pop("device")  # where a run trains does not change what it should learn
    return {
        "model": _fingerprint_dir(job.model),
        "train": _fingerprint_file(job.train),
        "dev": _fingerprint_file(job.dev),
        "training": training,
        "train_seed": job.train_seed,
        "eval_examples": job.eval_examples,
        "max_answer_length": job.max_answer_length,
        "input_format": job.input_format,
        "dev_format": job.dev_format,
    }


def _fingerprint_file(path: str) -> dict[str, Any]:
    p = Path(path).resolve()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return {"path": str(p), "bytes": size}


def _fingerprint_dir(path: str) -> dict[str, Any]:
    p = Path(path).resolve()
    digest = hashlib.sha256((p / "config.json").read_bytes())
    weights = sorted(f.name for f in p.iterdir() if f.name in _MODEL_FILES and f.name != "config.json")
    return {"path": str(p), "config_sha256": digest.hexdigest()[:16],
            "weights_bytes": sum((p / w).stat().st_size for w in weights)}


def run_name(k: int, seed: int) -> str:
    return f"k{k}-seed{seed}"


# -------------------------------------------------------------------------------------------- the output
def fewshot_output(output: str) -> RunDir:
    return RunDir(output, "fewshot", owns=lambda name: name in OURS)


def _begin(rundir: RunDir, job: FewshotJob) -> None:
    """Continue the grid in OUTPUT (same settings; it may have grown), or start it; --overwrite replaces it."""
    settings = grid_settings(job)

    def describe(old: dict[str, Any]) -> str:
        before = old.get("settings") or {}
        return ", ".join(sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))) + " differ"

    rundir.begin(settings, overwrite=job.overwrite, continues=True, describe=describe,
                 extra={"examples": job.examples, "seeds": job.seeds})


def _finished(rundir: RunDir, k: int, seed: int) -> dict[str, Any] | None:
    return rundir.read_or_none(f"runs/{run_name(k, seed)}/result.json")


# ---------------------------------------------------------------------------------------------- the task
def _fewshot_run(
    name: str,
    model_files: dict[str, bytes],
    dev_rows: list[dict[str, str]],
    examples: list[Any],
    config: FinetuneConfig,
    max_answer_length: int,
    cpus: int,
    use_gpu: bool,
) -> dict[str, Any]:
    """One run, inside a Ray task: fine-tune, save, answer DEV with the extract job's stages; no scoring."""
    import torch

    from pipeline.corpus.extraction import ClusterView, extract_spec
    from pipeline.engine.runner import run_config
    from pipeline.settings import ExtractConfig
    from pipeline.training.finetuning import finetune_examples
    from splinter.checkpoint import save_pretrained

    if not use_gpu:
        torch.set_num_threads(cpus)
    progress = LogProgress(every_s=30.0)
    with tempfile.TemporaryDirectory(prefix=f"splinter-fewshot-{name}-") as tmp:
        base, tuned = Path(tmp, "base"), Path(tmp, "tuned")
        base.mkdir()
        for file_name, data in model_files.items():
            (base / file_name).write_bytes(data)
        t0 = time.perf_counter()
        result, tokenizer, origin = finetune_examples(
            str(base),
            examples,
            config,
            on_step=lambda r: progress.update(r["step"], info=f"loss {r['loss']:.4f}"),
            on_windows=lambda _w, steps: progress.start(f"fewshot {name}", steps, "steps"),
        )
        progress.close()
        save_pretrained(result.model, tuned, tokenizer=tokenizer, qass_state="trained")
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        dev_file = Path(tmp, "dev.jsonl")
        with dev_file.open("w", encoding="utf-8") as f:
            for row in dev_rows:
                f.write(json.dumps(row) + "\n")
        cfg = ExtractConfig(
            input=[str(dev_file)], output=str(Path(tmp, "answers")), model=str(tuned), local=True,
            max_length=config.max_length, stride=config.stride, max_query_length=config.max_query_length,
            max_answer_length=max_answer_length, device="cuda" if use_gpu else "cpu",
        )
        # This task's own share of the machine, not the cluster's: the plain loop runs right here.
        view = ClusterView(cpus=float(cpus), gpus=1.0 if use_gpu else 0.0, node_cpus=float(cpus))
        stats = run_config(cfg, lambda: extract_spec(cfg, view))
        import pyarrow.parquet as pq

        predictions: dict[str, str | None] = {}
        for shard in sorted(Path(tmp, "answers").glob("shard-*.parquet")):
            table = pq.read_table(shard, columns=["id", "answer"])
            predictions.update(zip(table["id"].to_pylist(), table["answer"].to_pylist(), strict=True))
    return {
        "predictions": predictions,
        "log": result.log,
        "steps": result.steps,
        "epochs": result.epochs,
        "windows": result.windows,
        "examples_used": result.examples,
        "final_loss": result.final_loss,
        "qass_head": origin,
        "device": result.device,
        "padding": result.padding,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(time.perf_counter() - t1, 3),
        "eval_rows": stats.get("rows_in", 0),
        "worker": f"{socket.gethostname()}:{os.getpid()}",  # which node and process ran it
    }


# ----------------------------------------------------------------------------------------------- the grid
def _read_model_files(model: str) -> dict[str, bytes]:
    p = Path(model)
    return {name: (p / name).read_bytes() for name in _MODEL_FILES if (p / name).is_file()}


def _dev_set(job: FewshotJob) -> tuple[list[dict[str, str]], dict[str, list[str]]]:
    """(rows the runs answer, gold answers by id) for DEV, or a fixed sample of it with eval_examples."""
    ds = read_qa_dataset(job.dev, job.dev_format, split="validation")
    if job.eval_examples is not None and job.eval_examples < len(ds):
        order = np.random.default_rng(EVAL_SAMPLE_SEED).permutation(len(ds))[: job.eval_examples]
        ds = ds.select(sorted(order.tolist()))
    rows, gold = [], {}
    for r in ds.to_list():
        qid = str(r["id"])
        rows.append({"id": qid, "question": r["question"], "context": r["context"]})
        answers = r["answers"]
        gold[qid] = list(answers["text"]) if isinstance(answers, dict) else [a["text"] for a in answers]
        if r.get("gold_answers"):  # MRQA: scored against `answers`, as the authors did
            gold[qid] = list(r["gold_answers"])
    if len(gold) != len(rows):
        raise ConfigError(f"{job.dev}: question ids repeat; every DEV question needs its own id")
    return rows, gold


_SPLIT_NAME = re.compile(r"-train-seed-(\d+)-num-examples-(\d+)\.jsonl(\.gz)?$")


def split_files(path: str) -> dict[tuple[int, int], Path] | None:
    """(K, seed) -> file for a directory of the authors' few-shot splits (`squad-train-seed-42-num-examples-16.jsonl`,
    MRQA format), or None when `path` is not such a directory."""
    p = Path(path)
    if not p.is_dir():
        return None
    found = {}
    for f in sorted(p.iterdir()):
        if m := _SPLIT_NAME.search(f.name):
            found[int(m.group(2)), int(m.group(1))] = f
    return found or None


def _split_file(splits: dict[tuple[int, int], Path], train: str, k: int, seed: int) -> str:
    if (k, seed) not in splits:
        have = ", ".join(f"K={k_} seed={s_}" for k_, s_ in sorted(splits))
        raise ConfigError(f"{train} has no split file for K={k} seed={seed} (it has {have}); pass --examples and "
                          "--seeds that the directory holds")
    return str(splits[k, seed])


def run_fewshot(job: FewshotJob, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or finish) the grid; return {"runs": [...], "failed": {...}, "table": [...], ...}."""
    progress = progress or NullProgress()
    job.validate()
    rundir = fewshot_output(job.output)
    rundir.check()  # a refused OUTPUT fails before anything is read
    with rundir.held():
        return _run_grid(job, rundir, progress)


def _run_grid(job: FewshotJob, rundir: RunDir, progress: Progress) -> dict[str, Any]:
    import ray

    from pipeline.engine.runner import init_ray
    from splinter.squad import evaluate
    from splinter.tokenizer import SplinterTokenizer

    t0 = time.perf_counter()
    _begin(rundir, job)
    grid = [(k, s) for k in job.examples for s in job.seeds]
    todo = [(k, s) for k, s in grid if _finished(rundir, k, s) is None]
    if len(todo) < len(grid):
        progress.log(f"[fewshot] {len(grid) - len(todo)} of {len(grid)} runs already finished: skipped")
    failed: dict[str, str] = {}
    if todo:
        dev_rows, gold = _dev_set(job)
        tokenizer = SplinterTokenizer.from_pretrained(job.model)
        splits = split_files(job.train)
        if splits is None:
            train = read_qa_dataset(job.train, job.input_format)
            samples = {(k, s): sample_examples(train, k, s, tokenizer, job.training) for k, s in todo}
        else:  # the authors' own samples: run (K, seed) trains on all of its split file
            samples = {(k, s): sample_examples(read_qa_dataset(_split_file(splits, job.train, k, s), "mrqa"), None,
                                               s, tokenizer, job.training) for k, s in todo}
        init_ray(job.address, job.num_cpus)
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = job.training.device != "cpu" and gpus >= 1
        if job.training.device.startswith("cuda") and not use_gpu:
            raise ConfigError("--device cuda asked for, but the Ray cluster has no GPUs; use --device auto or cpu")
        options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": job.cpus_per_run}
        task = ray.remote(max_retries=1)(_fewshot_run).options(**options)
        model_ref = ray.put(_read_model_files(job.model))
        dev_ref = ray.put(dev_rows)
        refs = {}
        for k, s in todo:
            cfg = FinetuneConfig(**{
                **job.training.to_dict(),
                "seed": s if job.train_seed is None else job.train_seed,
                "device": "cuda" if use_gpu else "cpu",
            })
            name = run_name(k, s)
            refs[task.remote(name, model_ref, dev_ref, samples[k, s].examples, cfg, job.max_answer_length,
                             1 if use_gpu else job.cpus_per_run, use_gpu)] = (k, s)
        progress.start("fewshot", len(grid), "runs")
        done = len(grid) - len(todo)
        progress.update(done)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            k, s = refs[ready[0]]
            name = run_name(k, s)
            try:
                run = ray.get(ready[0])
            except Exception as exc:  # a run's failure is recorded, the others go on
                failed[name] = _one_line(exc)
                progress.log(f"[fewshot] {name} failed: {failed[name]}")
                continue
            metrics = evaluate(run["predictions"], gold)
            _save_run(rundir, name, k, s, job, samples[k, s], run, metrics)
            done += 1
            progress.update(done, info=f"{name}: F1 {metrics['f1']:.1f}")
        progress.close()
    rows = [r for k, s in grid if (r := _finished(rundir, k, s)) is not None]
    _write_results(rundir, rows)
    stats = {
        "runs": rows,
        "failed": failed,
        "table": summary_table(rows),
        "skipped_runs": len(grid) - len(todo),
        "seconds": round(time.perf_counter() - t0, 3),
        "output": job.output,
        "complete": not failed and len(rows) == len(grid),
    }
    if stats["complete"]:
        rundir.complete({k: v for k, v in stats.items() if k != "runs"})
    return stats


def _one_line(exc: BaseException) -> str:
    # A RayTaskError's text carries the remote traceback; its last line names the real error.
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _save_run(rundir: RunDir, name: str, k: int, seed: int, job: FewshotJob, sample: Any, run: dict[str, Any],
              metrics: dict) -> None:
    base = f"runs/{name}"
    rundir.write(f"{base}/predictions.json", run["predictions"])
    with rundir.fs.open_output_stream(rundir.path(f"{base}/trainer_log.jsonl"), compression=None) as f:
        f.write("".join(json.dumps(r) + "\n" for r in run["log"]).encode())
    rundir.write(f"{base}/training_args.json", {
        "examples_requested": k, "sample_seed": seed,
        "train_seed": seed if job.train_seed is None else job.train_seed,
        "example_ids": [e.id for e in sample.examples], "skipped": dict(sample.skipped),
        "rows_considered": sample.considered, "qass_head": run["qass_head"], "device": run["device"],
        "padding": run["padding"], "training": job.training.to_dict(),
    })
    result = {
        "examples": k,
        "seed": seed,
        "exact_match": round(float(metrics["exact_match"]), 4),
        "f1": round(float(metrics["f1"]), 4),
        "eval_questions": int(metrics["count"]),
        "unanswered": int(metrics["missing"]),
        "examples_used": run["examples_used"],
        "skipped_examples": int(sum(sample.skipped.values())),
        "windows": run["windows"],
        "steps": run["steps"],
        "epochs": run["epochs"],
        "final_loss": run["final_loss"],
        "train_seconds": run["train_seconds"],
        "eval_seconds": run["eval_seconds"],
        "seconds": round(run["train_seconds"] + run["eval_seconds"], 3),
        "device": run["device"],
        "worker": run["worker"],
    }
    rundir.write(f"{base}/result.json", result)  # last: marks the run finished


def _write_results(rundir: RunDir, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({"examples": pa.array([], pa.int64())})
    tmp = rundir.path(f"{META}/{RESULTS}.tmp")
    pq.write_table(table, tmp, filesystem=rundir.fs)
    rundir.fs.move(tmp, rundir.path(RESULTS))


def summary_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per K: runs, mean and sample standard deviation (ddof=1; 0 for one run) of EM and F1."""
    table = []
    for k in sorted({r["examples"] for r in rows}):
        em = np.array([r["exact_match"] for r in rows if r["examples"] == k])
        f1 = np.array([r["f1"] for r in rows if r["examples"] == k])

        def std(x: np.ndarray) -> float:
            return float(x.std(ddof=1)) if x.size > 1 else 0.0

        table.append({"examples": k, "runs": int(em.size), "em_mean": float(em.mean()), "em_std": std(em),
                      "f1_mean": float(f1.mean()), "f1_std": std(f1)})
    return table


def format_fewshot_summary(stats: dict[str, Any]) -> str:
    questions = stats["runs"][0]["eval_questions"] if stats["runs"] else 0
    lines = [f"SQuAD v1.1 metric on {questions:,} DEV questions, mean ± std over seeds:", "",
             f"{'examples':>8}  {'runs':>4}  {'EM':>15}  {'F1':>15}"]
    for t in stats["table"]:
        lines.append(f"{t['examples']:>8}  {t['runs']:>4}  {t['em_mean']:>7.1f} ± {t['em_std']:<5.1f}  "
                     f"{t['f1_mean']:>7.1f} ± {t['f1_std']:<5.1f}")
    lines.append("")
    if stats["skipped_runs"]:
        lines.append(f"runs reused from an earlier invocation: {stats['skipped_runs']}")
    for name, error in sorted(stats["failed"].items()):
        lines.append(f"FAILED {name}: {error}")
    total = stats["seconds"]
    lines.append(f"seconds: {total:.1f}; results: {Path(stats['output']) / RESULTS}"
                 + ("" if stats["complete"] else " (incomplete: rerun the same command to finish)"))
    return "\n".join(lines)


__all__ = ["FewshotJob", "format_fewshot_summary", "run_fewshot", "run_name", "summary_table"]
