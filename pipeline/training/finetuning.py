"""`splinter finetune`: read QA training data, sample K questions, fine-tune, write a checkpoint directory.

Training data (read through `datasets`): SQuAD v1.1 JSON, Parquet or JSONL rows in the SQuAD / `datasets`
schema (`id`, `question`, `context`, `answers: {text: [...], answer_start: [...]}`), or a directory written by
`datasets.save_to_disk` (its "train" split, or its only one).

Sampling (`examples=K`, `sample_seed=S`): the rows are put in the order of
`numpy.random.default_rng(S).permutation(N)` and the first K *usable* ones are taken (a row that cannot be
trained on, e.g. an answer that is not at its answer_start, is skipped and counted, and the next one used).
The same (file, S) always gives the same sample, and the sample for a smaller K is a prefix of the sample for
a larger one, so K=16 questions are among K=128's.

Output directory: model.safetensors + config.json + tokenizer files (loadable by ours and by transformers),
`training_args.json` (every setting, the data, the sampled ids, the QASS head's origin; "status" is
"running" until the very end) and `trainer_log.jsonl` (one line per optimizer step, written as it happens),
also as TensorBoard event files under `tensorboard/`.

Resuming: every `checkpoint_every` steps, and when SIGTERM/SIGINT stops the run (`pipeline.signals`), the
training state goes to `checkpoint/` (written beside it, then renamed in: a kill never leaves half a
checkpoint). Rerunning the same command continues from there to the same final weights; other settings are
refused by name. A finished run deletes its checkpoint, and rerunning it prints its summary again.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import platform
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.progress import NullProgress, Progress
from pipeline.settings import ConfigError, FinetuneJob
from pipeline.signals import STOP, JobStopped, stop_at_safe_points
from pipeline.storage.rundir import RunDir
from pipeline.training.negatives import add_negatives
from pipeline.training.tensorboard_events import TENSORBOARD_DIR, EventLog
from splinter.mrqa import is_mrqa, load_mrqa
from splinter.qa_data import QAExample, build_training_windows
from splinter.train import (
    FinetuneConfig,
    FinetuneResult,
    TrainingStopped,
    TrainState,
    total_steps,
    train_on_windows,
)

log = logging.getLogger(__name__)

TRAIN_FORMATS = ("auto", "squad", "mrqa", "parquet", "jsonl", "disk")
TRAINING_ARGS = "training_args.json"
TRAINER_LOG = "trainer_log.jsonl"
CHECKPOINT_DIR = "checkpoint"  # the newest training state of an unfinished run
CHECKPOINT_FILE = "trainer_state.pt"
# The checkpoint being replaced, kept until its successor is in place; and those being written.
PREVIOUS_CHECKPOINT = ".checkpoint.previous"
CHECKPOINT_TMP_PREFIX = ".checkpoint.tmp-"
# Everything a fine-tuning run writes; --overwrite removes exactly these names and nothing else.
OUTPUT_FILES = (
    "model.safetensors",
    "config.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    TRAINER_LOG,
    TRAINING_ARGS,
    "report.html",
    CHECKPOINT_DIR,
    PREVIOUS_CHECKPOINT,
)
_REQUIRED_COLUMNS = ("question", "context", "answers")


# ------------------------------------------------------------------------------------------------ reading
def detect_format(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if any((p / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "disk"
        if any(p.glob("*.parquet")):
            return "parquet"
        if any(p.glob("*.jsonl")):
            return "jsonl"
        raise ConfigError(f"{path}: a directory without a saved dataset, Parquet or JSONL files")
    if p.suffix in (".parquet", ".pq"):
        return "parquet"
    with (gzip.open(p, "rb") if p.read_bytes()[:2] == b"\x1f\x8b" else p.open("rb")) as f:
        if is_mrqa(f.readline()):  # the authors' few-shot split files
            return "mrqa"
    if p.suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    with p.open("rb") as f:
        head = f.read(4096).lstrip()
    # SQuAD JSON is one object holding a "data" list; JSON Lines start a new object every line.
    if head.startswith(b"{") and b'"data"' in head and b'"paragraphs"' in head:
        return "squad"
    return "jsonl"


def read_qa_dataset(path: str, input_format: str = "auto", split: str = "train") -> Any:
    """A `datasets.Dataset` with at least question, context and answers columns (id added when absent).

    `split` picks the split of a `save_to_disk` DatasetDict (falling back to its only split).
    Raises ConfigError (one line naming the file) for a missing file, an unknown format or a wrong schema.
    """
    import datasets

    if not os.path.exists(path):
        raise ConfigError(f"training data not found: {path}")
    if input_format not in TRAIN_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(TRAIN_FORMATS)}, got {input_format!r}")
    fmt = detect_format(path) if input_format == "auto" else input_format
    try:
        if fmt in ("squad", "mrqa"):
            from splinter.squad import load_squad

            rows = load_mrqa(path) if fmt == "mrqa" else load_squad(path)
            columns = {
                "id": [r["id"] for r in rows],
                "question": [r["question"] for r in rows],
                "context": [r["context"] for r in rows],
                "answers": [{"text": r["answers"], "answer_start": r["answer_starts"]} for r in rows],
                # An article per row: --negatives pairs a question with paragraphs of other articles.
                "title": [r.get("title") or "" for r in rows],
            }
            if fmt == "mrqa":
                columns["gold_answers"] = [r["gold_answers"] for r in rows]
            ds = datasets.Dataset.from_dict(columns)
        elif fmt == "disk":
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split in ds:
                    ds = ds[split]
                elif len(ds) == 1:
                    ds = next(iter(ds.values()))
                else:
                    raise ConfigError(f"{path} holds splits {sorted(ds)} but no {split!r} split")
        else:
            files = sorted(str(p) for p in Path(path).glob(f"*.{fmt}")) if Path(path).is_dir() else [path]
            # A throwaway cache: the files are small next to what datasets' cache would keep forever.
            with tempfile.TemporaryDirectory(prefix="splinter-datasets-") as cache:
                ds = datasets.load_dataset(
                    "json" if fmt == "jsonl" else "parquet",
                    data_files=files,
                    split="train",
                    cache_dir=cache,
                    keep_in_memory=True,
                )
    except ConfigError:
        raise
    except Exception as exc:  # datasets/pyarrow/json errors of every kind: one line naming the file
        raise ConfigError(f"cannot read {path} as {fmt}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    missing = [c for c in _REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"{path} lacks column(s) {', '.join(missing)}; expected the SQuAD / datasets schema "
            "(id, question, context, answers: {text: [...], answer_start: [...]})"
        )
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [f"row-{i}" for i in range(len(ds))])
    return ds


# ----------------------------------------------------------------------------------------------- sampling
@dataclass
class Sample:
    """The usable examples picked from a dataset, and what was skipped on the way."""

    examples: list[QAExample]
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: list[tuple[str, str]] = field(default_factory=list)
    considered: int = 0  # rows looked at (usable + skipped)
    available: int = 0  # rows in the file


def sample_examples(dataset: Any, k: int | None, seed: int, tokenizer: Any, config: FinetuneConfig) -> Sample:
    """The first `k` usable rows in `default_rng(seed).permutation(len(dataset))` order (all rows if k is None).

    Usable means trainable with `config`'s windows (see `splinter.qa_data.build_training_windows`).
    """
    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n) if k is not None else np.arange(n)
    sample = Sample(examples=[], available=n)
    want = n if k is None else k
    chunk = max(256, 2 * want) if k is not None else 4096
    for lo in range(0, n, chunk):
        if len(sample.examples) >= want:
            break
        rows = dataset.select(order[lo : lo + chunk].tolist()).to_list()
        parsed = [QAExample.parse(r) for r in rows]
        candidates = [p for p in parsed if isinstance(p, QAExample)]
        windows = build_training_windows(tokenizer, candidates, config.max_length, config.stride, config.max_query_length)
        kept = {id(e) for e in windows.examples}
        reasons = dict(zip((id(e) for e in candidates), (None,) * len(candidates), strict=True))
        pending = iter(r for _, r in windows.skipped_ids)
        for example in candidates:
            if id(example) not in kept:
                reasons[id(example)] = next(pending)
        for row, item in zip(rows, parsed, strict=True):
            if len(sample.examples) >= want:
                break
            sample.considered += 1
            reason = item if isinstance(item, str) else reasons[id(item)]
            if reason:
                sample.skipped[reason] += 1
                sample.skipped_ids.append((str(row.get("id")), reason))
            else:
                sample.examples.append(item)
    return sample


# ------------------------------------------------------------------------------------------------ the job
# ------------------------------------------------------------------------------------ the output directory
def run_settings(job: FinetuneJob) -> dict[str, Any]:
    """The settings that decide what a run trains: a rerun continues a run only when they are the same."""
    return {
        "base_model": str(Path(job.model).resolve()),
        "train": str(Path(job.train).resolve()),
        "input_format": job.input_format,
        "examples_requested": job.examples,
        "sample_seed": job.sample_seed,
        "negatives": job.negatives,
        "training": job.training.to_dict(),
    }


def finetune_output(output: str) -> RunDir:
    """OUTPUT of a fine-tuning run: a checkpoint directory plus its records (pipeline.storage.rundir)."""
    def ours(name: str) -> bool:
        return name in OUTPUT_FILES or name == TENSORBOARD_DIR or name.startswith(CHECKPOINT_TMP_PREFIX)

    return RunDir(output, "finetune", owns=ours)


def prepare_output(output: str, action: str) -> tuple[Path, TrainState | None]:
    """OUTPUT for `action` ("new", or "resume" a run with the same settings: RunDir.begin decided);
    returns it and the state to resume from, if any.

    "resume" keeps the newest checkpoint and the trainer log up to its step (the steps after it are
    trained again); without a checkpoint the run starts over: our own earlier files go, nothing else.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{CHECKPOINT_TMP_PREFIX}*"):  # a checkpoint a kill cut short
        shutil.rmtree(stale, ignore_errors=True)
    state = load_checkpoint(out) if action == "resume" else None
    if state is not None:
        _truncate_trainer_log(out / TRAINER_LOG, state.step)
    elif action == "resume":
        for name in OUTPUT_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
    return out, state


def _truncate_trainer_log(path: Path, step: int) -> None:
    # The steps after the checkpoint are trained again and logged again: each step appears once.
    kept = []
    with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError):  # a line a kill cut short
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(out: Path, state: TrainState) -> None:
    """Write the training state to OUTPUT/checkpoint/, replacing the previous one only once it is whole."""
    tmp = Path(tempfile.mkdtemp(prefix=CHECKPOINT_TMP_PREFIX, dir=out))
    torch.save(state.to_dict(), tmp / CHECKPOINT_FILE)
    current, previous = out / CHECKPOINT_DIR, out / PREVIOUS_CHECKPOINT
    shutil.rmtree(previous, ignore_errors=True)
    if current.exists():
        os.replace(current, previous)  # directories cannot be renamed over one another
    os.replace(tmp, current)
    shutil.rmtree(previous, ignore_errors=True)


def load_checkpoint(out: Path) -> TrainState | None:
    """The newest training state in OUTPUT, or None (a kill between save_checkpoint's two renames leaves
    only the previous one)."""
    for name in (CHECKPOINT_DIR, PREVIOUS_CHECKPOINT):
        path = out / name / CHECKPOINT_FILE
        if path.is_file():
            return TrainState.from_dict(torch.load(path, map_location="cpu", weights_only=True))
    return None


def drop_checkpoint(out: Path) -> None:
    """A finished run's checkpoint: the final model is in OUTPUT itself."""
    for name in (CHECKPOINT_DIR, PREVIOUS_CHECKPOINT):
        shutil.rmtree(out / name, ignore_errors=True)


@contextmanager
def _quiet_checkpoint_log() -> Iterator[None]:
    # Loading a head-less checkpoint warns that the head "must be fine-tuned": that is what we are doing.
    logger = logging.getLogger("splinter.checkpoint")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_for_finetuning(model_dir: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, origin of its QASS head) from a checkpoint directory."""
    from splinter.checkpoint import load_pretrained, qass_head_state
    from splinter.model import SplinterForQuestionAnswering
    from splinter.tokenizer import SplinterTokenizer

    state = qass_head_state(model_dir)
    with _quiet_checkpoint_log():
        model = load_pretrained(SplinterForQuestionAnswering, model_dir)
    tokenizer = SplinterTokenizer.from_pretrained(model_dir)
    origin = {
        "missing": "fresh (the checkpoint has none)",
        "untrained": "fresh (from-bert, untrained)",
        "trained": "checkpoint (fine-tuned)",
    }.get(state, "checkpoint")
    return model, tokenizer, origin


def finetune_examples(
    model_dir: str,
    examples: list[QAExample],
    config: FinetuneConfig,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_windows: Callable[[int, int], None] | None = None,
    **resumable: Any,
) -> tuple[FinetuneResult, Any, str]:
    """Load, build windows, train: (result, tokenizer, QASS head origin). Shared by finetune and fewshot.

    `resumable` goes to `train_on_windows`: checkpoint_every, on_checkpoint, resume, should_stop."""
    model, tokenizer, origin = load_for_finetuning(model_dir)
    windows = build_training_windows(tokenizer, examples, config.max_length, config.stride, config.max_query_length)
    if on_windows is not None:
        on_windows(len(windows), total_steps(len(windows), config) if len(windows) else 0)
    result = train_on_windows(model, windows, config, tokenizer.question_token_id, on_step, **resumable)
    if config.reinit_qass:
        origin = "reinitialized"
    return result, tokenizer, origin


def run_finetune(job: FinetuneJob, progress: Progress | None = None) -> dict[str, Any]:
    """Validate, read, sample, fine-tune and write OUTPUT; return the summary stats.

    An unfinished run in OUTPUT with the same settings is continued from its checkpoint; a finished one
    is not trained again: its recorded summary is returned. A signal (pipeline.signals) stops training
    after the current step with a checkpoint and raises JobStopped.
    """
    progress = progress or NullProgress()
    job.validate()
    rundir = finetune_output(job.output)
    rundir.check()  # before reading anything: a refused output fails fast
    with rundir.held():
        return _finetune(job, rundir, progress)


def _finetune(job: FinetuneJob, rundir: RunDir, progress: Progress) -> dict[str, Any]:
    from splinter.checkpoint import save_pretrained
    from splinter.tokenizer import SplinterTokenizer

    # Compared as JSON holds them: what the earlier run recorded, against this run's values written the same way.
    settings = json.loads(json.dumps(run_settings(job), default=str))
    finished = None if job.overwrite else rundir.finished(settings)
    if finished is not None:
        progress.log(f"[finetune] {job.output} already holds this run, complete; --overwrite trains it again")
        drop_checkpoint(Path(job.output))  # in case a kill came between the end and the clean-up
        return {**finished, "output": str(Path(job.output))}
    previous = rundir.begin(settings, overwrite=job.overwrite, continues=True)
    action = "resume" if previous is not None else "new"
    t0 = time.perf_counter()
    cfg = job.training
    dataset = read_qa_dataset(job.train, job.input_format)
    tokenizer = SplinterTokenizer.from_pretrained(job.model)
    sample = sample_examples(dataset, job.examples, job.sample_seed, tokenizer, cfg)
    if not sample.examples:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(sample.skipped.items())) or "the file is empty"
        raise ConfigError(f"{job.train}: no usable training examples ({reasons})")
    if job.examples is not None and len(sample.examples) < job.examples:
        progress.log(f"[finetune] only {len(sample.examples)} usable examples in {job.train} (asked for {job.examples})")
    training_examples = add_negatives(dataset, sample.examples, job.negatives, job.sample_seed)
    out, resume = prepare_output(job.output, action)
    if job.num_threads:
        torch.set_num_threads(job.num_threads)
    args: dict[str, Any] = {
        "status": "running",
        **run_settings(job),
        "sampling": "first usable rows of numpy.random.default_rng(sample_seed).permutation(rows)"
        if job.examples is not None
        else "all usable rows, in file order",
        "examples_used": len(sample.examples),
        "negative_pairs": len(training_examples) - len(sample.examples),
        "negatives_rule": "per question: paragraphs of other articles drawn with numpy default_rng(sample_seed), "
        "labelled [CLS]" if job.negatives else None,
        "rows_considered": sample.considered,
        "rows_available": sample.available,
        "skipped": dict(sample.skipped),
        "skipped_ids": sample.skipped_ids[:1000],
        "example_ids": [e.id for e in sample.examples] if job.examples is not None else None,
        "checkpoint_every": job.checkpoint_every,
        "resumed_from_step": resume.step if resume is not None else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    rundir.write(TRAINING_ARGS, args)
    if resume is not None:
        progress.log(f"[finetune] continuing {out} from its checkpoint at step {resume.step}")

    # The step records again, as TensorBoard event files; a resumed run drops the earlier steps after its
    # checkpoint, which it trains again.
    events = EventLog(str(out), purge_step=resume.step + 1 if resume is not None else None)
    checkpoint_step = resume.step if resume is not None else None
    with (out / TRAINER_LOG).open("a", encoding="utf-8") as log_file:

        def on_windows(windows: int, steps: int) -> None:
            progress.start("finetune", steps, "steps")
            if resume is not None:
                progress.update(resume.step)

        def on_step(record: dict[str, Any]) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()  # a live run can be followed with `tail -f`
            events.write(record)
            progress.update(record["step"], info=f"loss {record['loss']:.4f}, lr {record['lr']:.2e}")

        def on_checkpoint(state: TrainState) -> None:
            nonlocal checkpoint_step
            events.flush()
            save_checkpoint(out, state)
            checkpoint_step = state.step

        try:
            # A signal now only asks the loop to stop after its step: the checkpoint then holds that step.
            with stop_at_safe_points():
                result, tokenizer, origin = finetune_examples(
                    job.model, training_examples, cfg, on_step, on_windows,
                    checkpoint_every=job.checkpoint_every, on_checkpoint=on_checkpoint, resume=resume,
                    should_stop=STOP.requested,
                )
        except TrainingStopped as stop:
            saved = f"checkpoint at step {checkpoint_step}" if checkpoint_step is not None else "no checkpoint yet"
            raise JobStopped(
                STOP.signum or signal.SIGTERM,
                progress=f"{stop.step} of {stop.total} steps done, {saved}",
                advice="rerun the same command to continue",
            ) from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        finally:
            progress.close()
            events.close()
    save_pretrained(result.model, out, tokenizer=tokenizer, qass_state="trained")
    stats = {
        "examples_used": result.examples,
        "skipped": dict(sample.skipped),
        "windows": result.windows,
        "windows_without_answer": result.windows - result.windows_with_answer,
        "steps": result.steps,
        "epochs": result.epochs,
        "final_loss": result.final_loss,
        "padding": result.padding,
        "qass_head": origin,
        "device": result.device,
        "train_seconds": result.seconds,
        "seconds": round(time.perf_counter() - t0, 3),
        "output": str(out),
    }
    args.update(status="complete", qass_head=origin, result={k: v for k, v in stats.items() if k != "output"})
    rundir.write(TRAINING_ARGS, args)
    drop_checkpoint(out)
    rundir.complete(stats)  # last: the directory is finished
    return stats


def format_finetune_summary(stats: dict[str, Any]) -> str:
    pad = stats.get("padding", {})
    lines = [f"{'examples used':<28}{stats['examples_used']:>12,}"]
    for reason, n in sorted(stats.get("skipped", {}).items()):
        lines.append(f"{'  skipped: ' + reason:<28}{n:>12,}")
    lines += [
        f"{'training windows':<28}{stats['windows']:>12,}   ({stats['windows_without_answer']:,} without the "
        "answer: labelled [CLS])",
        f"{'padding waste':<28}{pad.get('grouped', 0):>12.1%}   (random batches {pad.get('random', 0):.1%}, "
        f"padded to max length {pad.get('fixed', 0):.1%})",
        f"{'steps':<28}{stats['steps']:>12,}   ({stats['epochs']:.2f} epochs)",
        f"{'final loss':<28}{stats['final_loss']:>12.4f}   (mean of the last 10 steps)",
        f"{'QASS head':<28}{stats['qass_head']:>12}",
        f"{'device':<28}{stats['device']:>12}",
        f"{'seconds':<28}{stats['seconds']:>12.1f}",
        f"{'output':<28}{stats['output']}",
    ]
    return "\n".join(lines)
