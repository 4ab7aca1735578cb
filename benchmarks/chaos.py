"""Node-loss soak: jobs on a real two-node Ray cluster whose worker node is SIGKILLed at a random moment.

One `ray start --head` cluster (token auth, its own ports and temp dir: tests/cluster_fixture.py) stays up
for the whole soak; each round joins a fresh worker node (tests/node_cluster.py), runs the job against the
cluster, waits until a random number of shards is committed (plus a random fraction of a second or two;
seeded), kills every process of that node with SIGKILL, and classifies the round:

    identical           the job finished (exit 0) with output identical to an uninterrupted reference run
    resumed_identical   the job stopped in one `error:` line within its stall timeout (+ grace), and the
                        same command with --resume finished identical
    failed              anything else (a crash, several error lines, output that differs)
    hang                the job (or its --resume) did not end within the hard bound
A round whose worker node fails to join three times (an overloaded machine) is counted `not_run`.

`pretrain` (--jobs pretrain; slow) joins two worker nodes, kills the one holding the Ray Train workers after
a random checkpoint, and counts a round identical when the run reaches --max-steps with every step after the
last restart logged once (the weights of a restarted DDP run are not compared bit for bit).

    .venv/bin/python benchmarks/chaos.py --quick          # 2 rounds of extract and mine, ~3 min here
    .venv/bin/python benchmarks/chaos.py --rounds 10      # the README's figures
Prints a table and ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the cluster helpers the node-loss tests use

from cluster_fixture import VENV_BIN, LocalCluster, local_cluster  # noqa: E402
from node_cluster import worker_node  # noqa: E402

WIKI = ROOT / "data" / "wiki_sample.jsonl"
SQUAD = ROOT / "tests" / "data" / "squad_sample.json"
OUTCOMES = ("identical", "resumed_identical", "failed", "hang")


@dataclass
class Job:
    name: str
    args: Callable[[Path], list[str]]  # OUTPUT -> the splinter arguments (without --address)
    keys: tuple[str, ...]  # sort keys of its rows
    shards: int  # shards of the input, to pick the kill moment from


def _tiny_qa_model(path: Path) -> Path:
    """A random tiny Splinter QA checkpoint (as the tests' fixture builds it): fast to load and run."""
    import torch

    from splinter import SplinterConfig, SplinterForQuestionAnswering, SplinterTokenizer, save_pretrained

    tok = SplinterTokenizer.default()
    torch.manual_seed(0)
    config = SplinterConfig.tiny(vocab_size=tok.vocab_size, question_token_id=tok.question_token_id)
    save_pretrained(SplinterForQuestionAnswering(config), str(path), tokenizer=tok)
    return path


def _jobs(work: Path) -> dict[str, Job]:
    corpus = work / "docs.jsonl"
    with WIKI.open() as f:
        corpus.write_text("".join(next(f) for _ in range(400)))
    model = _tiny_qa_model(work / "tiny-qa")
    mine = ["--max-seq-length", "256", "--shard-rows", "20", "--shard-bytes", "16384", "-q"]
    extract = ["--model", str(model), "--shard-rows", "20", "--batch-size", "8", "--num-actors", "2", "-q"]
    return {
        "mine": Job("mine", lambda out: ["mine", str(corpus), str(out), *mine], ("doc_id", "seq_index"), 20),
        "extract": Job("extract", lambda out: ["extract", str(SQUAD), str(out), *extract], ("id",), 21),
    }


def _read(out: Path, keys: tuple[str, ...]) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("shard-*.parquet"))])
    return table.sort_by([(c, "ascending") for c in keys])


def _same(got: Path, want: Path, job: Job) -> bool:
    """Identical rows; model scores within float32 noise (the same batches on another process)."""
    try:
        a, b = _read(got, job.keys), _read(want, job.keys)
    except (OSError, ValueError, pa.ArrowInvalid):
        return False
    if a.num_rows != b.num_rows or a.schema != b.schema:
        return False
    for name in a.column_names:
        x, y = a[name], b[name]
        if pa.types.is_floating(x.type):
            if not np.allclose(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False),
                               rtol=1e-4, atol=1e-4, equal_nan=True):
                return False
        elif not x.equals(y):
            return False
    return True


def _committed(out: Path) -> int:
    return len(list(out.glob("shard-*.parquet")))


def _round(cluster: LocalCluster, job: Job, reference: Path, out: Path, rng: random.Random,
           stall_minutes: float, bound_s: float) -> tuple[str, str]:
    """One kill; -> (outcome, a note: when the node died and how the job ended)."""
    env = {**cluster.client_env(token=cluster.token, address=cluster.gcs_address), "RAY_AUTH_MODE": "token"}
    args = [*job.args(out), "--address", cluster.gcs_address, "--stall-timeout", str(stall_minutes)]
    after = rng.randint(1, max(1, job.shards // 2))  # committed shards before the kill
    extra = rng.uniform(0.0, 2.0)
    with worker_node(cluster) as node:
        proc = subprocess.Popen([str(VENV_BIN / "splinter"), *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + bound_s
        while _committed(out) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(extra)
        killed_late = proc.poll() is not None
        node.kill()
        note = f"kill after {after} shards + {extra:.1f}s" + (" (job had ended)" if killed_late else "")
        stderr = _wait(proc, deadline)
        if stderr is None:
            return "hang", note
    if proc.returncode == 0:
        return ("identical" if _same(out, reference, job) else "failed"), note
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if proc.returncode != 1 or len(errors) != 1 or "--resume" not in errors[0]:
        return "failed", f"{note}; exit {proc.returncode}: {(errors or stderr.splitlines() or [''])[-1][:120]}"
    note += f"; stopped: {errors[0][:90]}"
    try:
        resumed = subprocess.run([str(VENV_BIN / "splinter"), *args, "--resume"], env=env, capture_output=True,
                                 text=True, timeout=bound_s)
    except subprocess.TimeoutExpired:
        return "hang", note + "; --resume hung"
    if resumed.returncode == 0 and _same(out, reference, job):
        return "resumed_identical", note
    return "failed", f"{note}; --resume exit {resumed.returncode}"


def _wait(proc: subprocess.Popen, deadline: float) -> str | None:
    """The job's stderr once it ends, or None (killed) if it is still running at `deadline`: a hang."""
    try:
        return proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None


def _pretrain_round(cluster: LocalCluster, work: Path, out: Path, rng: random.Random,
                    bound_s: float) -> tuple[str, str]:
    """Two DDP workers of one CPU each on one of two 2-CPU worker nodes; that node dies after a random
    checkpoint; Ray Train must restart the group on the other node and reach --max-steps."""
    steps, every = 30, 5
    env = {**cluster.client_env(token=cluster.token, address=cluster.gcs_address), "RAY_AUTH_MODE": "token"}
    args = ["pretrain", str(work / "mined"), str(out), "--model-config", str(work / "tiny.json"),
            "--num-workers", "2", "--cpus-per-worker", "1", "--max-steps", str(steps), "--batch-size", "8",
            "--checkpoint-every", str(every), "--learning-rate", "3e-3", "--warmup-steps", "5", "--seed", "1",
            "--max-failures", "2", "--address", cluster.gcs_address, "-q"]  # fmt: skip
    at = every * rng.randint(1, steps // every - 2)
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"

    def registered() -> int:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            return int(latest.get("metrics", {}).get("step", 0))
        return 0

    with worker_node(cluster, num_cpus=2) as first, worker_node(cluster, num_cpus=2) as second:
        proc = subprocess.Popen([str(VENV_BIN / "splinter"), *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + bound_s
        while registered() < at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        holders = [n for n in (first, second) if n.runs("RayTrainWorker")]
        for node in holders[:1]:
            node.kill()
        note = f"kill after checkpoint {registered()}" + ("" if holders else " (no worker found)")
        stderr = _wait(proc, deadline)
        if stderr is None:
            return "hang", note
    if proc.returncode != 0:
        return "failed", f"{note}; exit {proc.returncode}: {stderr.strip().splitlines()[-1:]}"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    resumes = [i for i, r in enumerate(log) if r.get("event") == "resume"]
    start = log[resumes[-1]]["step"] if resumes else 0
    logged = [r["step"] for r in log[(resumes[-1] + 1 if resumes else 0):] if "loss" in r]
    ok = (out / "__splinter__" / "_SUCCESS").is_file() and logged == list(range(start + 1, steps + 1))
    return ("identical" if ok else "failed"), f"{note}; resumed at {start}"


def _prepare_pretrain(work: Path) -> None:
    from pipeline.corpus.mining import run_mine
    from pipeline.settings import MineConfig
    from splinter.config import SplinterConfig
    from tests.pretrain_data import write_mined_leads

    docs = write_mined_leads(work / "leads.jsonl", 500)
    run_mine(MineConfig(input=[str(docs)], output=str(work / "mined"), local=True, max_seq_length=128))
    (work / "tiny.json").write_text(SplinterConfig.tiny(vocab_size=28996, max_position_embeddings=128)
                                    .to_json_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="kills per job (default 10)")
    parser.add_argument("--jobs", default="extract,mine", help="comma-separated: extract, mine, pretrain")
    parser.add_argument("--quick", action="store_true", help="2 rounds per job")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--stall-timeout", type=float, default=1.0, help="the jobs' --stall-timeout, minutes")
    parser.add_argument("--bound", type=float, default=300.0, help="seconds a job (or its --resume) may take")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    names = [n.strip() for n in args.jobs.split(",") if n.strip()]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="splinter-chaos-"))
    counts: dict[str, dict[str, int]] = {}
    try:
        jobs = _jobs(work)
        if "pretrain" in names:
            _prepare_pretrain(work)
        with local_cluster(num_cpus=1) as cluster:
            for name in names:
                counts[name] = {"rounds": rounds, **dict.fromkeys(OUTCOMES, 0)}
                reference = work / f"{name}-reference"
                if name != "pretrain":
                    job = jobs[name]
                    done = subprocess.run([str(VENV_BIN / "splinter"), *job.args(reference), "--local"],
                                          capture_output=True, text=True, timeout=args.bound)
                    if done.returncode != 0:
                        raise SystemExit(f"the reference {name} run failed: {done.stderr[-2000:]}")
                for i in range(rounds):
                    out = work / f"{name}-{i}"
                    started = time.monotonic()
                    outcome = ""
                    for attempt in range(3):
                        shutil.rmtree(out, ignore_errors=True)
                        try:
                            if name == "pretrain":
                                outcome, note = _pretrain_round(cluster, work, out, rng, args.bound)
                            else:
                                outcome, note = _round(cluster, jobs[name], reference, out, rng,
                                                       args.stall_timeout, args.bound)
                            break
                        except (RuntimeError, TimeoutError) as exc:
                            # A worker node that never joined (an overloaded machine: "the current node
                            # timed out during startup") is the soak's own failure, not the job's: again.
                            note = f"worker node did not start ({attempt + 1}x): {str(exc).splitlines()[0][:80]}"
                    if not outcome:
                        counts[name]["not_run"] = counts[name].get("not_run", 0) + 1
                        print(f"{name:<9}{i + 1:>3}  {'not run':<18}{'':>7}  {note}", flush=True)
                        continue
                    counts[name][outcome] += 1
                    print(f"{name:<9}{i + 1:>3}  {outcome:<18}{time.monotonic() - started:>6.0f}s  {note}",
                          flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'job':<10}" + "".join(f"{o:>19}" for o in OUTCOMES))
    for name, c in counts.items():
        print(f"{name:<10}" + "".join(f"{c[o]:>19}" for o in OUTCOMES))
    summary: dict[str, Any] = {name: c for name, c in counts.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
