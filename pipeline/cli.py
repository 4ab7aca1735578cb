"""`splinter` command line: the application on top of the library. Thin typer wrappers only.

Every command is also a plain Python call (`pipeline.corpus.mining.run_mine`, `pipeline.corpus.extraction.run_extract`,
`pipeline.training.pretraining.run_pretrain`, `pipeline.training.finetuning.run_finetune`, `pipeline.training.fewshot_grid.run_fewshot`,
`pipeline.corpus.evaluation.evaluate_files`, `splinter.bert.bert_to_splinter`, `pipeline.submit.submit`),
so nothing here holds logic of its own. The console script `splinter` and the cluster entrypoint
`python -m pipeline.cli` both land here.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.console import filter_stderr
from pipeline.progress import Progress, make_progress

app = typer.Typer(
    name="splinter",
    help="Splinter at corpus scale: mine recurring-span pretraining data, extract answers in bulk, "
    "evaluate, and submit either job to a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options shared by both jobs. Defaults are None so a config file's values survive unless a flag is given.
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML/TOML/JSON file with any job field; flags override it.")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="Input format: auto (by name and content), parquet, jsonl, json (an array of records), text, textblocks, wikiextractor, squad; any may be .gz/.bz2/.zst.")]
ShardRowsOpt = Annotated[int | None, typer.Option(help="Most rows per shard (Parquet, SQuAD, JSON arrays; files for plain text); a shard is the unit of commit and resume.")]
ShardBytesOpt = Annotated[int | None, typer.Option(help="Most bytes per shard for JSON Lines inputs.")]
# Booleans are tri-state (None = not given) so a config file's `resume: true` can be turned off with --no-resume.
ResumeOpt = Annotated[bool | None, typer.Option("--resume/--no-resume", help="Finish an interrupted run: keep committed shards, redo the rest.", show_default=False)]
OverwriteOpt = Annotated[bool | None, typer.Option("--overwrite/--no-overwrite", help="Replace an earlier output of this tool (a directory holding anything else is refused).", show_default=False)]
LocalOpt = Annotated[bool | None, typer.Option("--local/--no-local", help="Run the stages in a plain local loop, without Ray.", show_default=False)]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else an embedded local Ray).")]
CpusOpt = Annotated[int | None, typer.Option("--num-cpus", help="CPUs for the embedded local Ray (default: all).")]
StallOpt = Annotated[float | None, typer.Option("--stall-timeout", help="Minutes without any row or shard progressing before a Ray job is stopped in one line (exit 1; --resume finishes it). Default 30.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, only the summary.")]
ReportOpt = Annotated[bool, typer.Option("--report/--no-report", help="Also write the run's report page (`splinter report`) when the job ends.")]


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr and an exit code: 2 for what the user can fix (flags, files, config), 1 for a
    crash. Never a traceback (SPLINTER_TRACEBACK=1 re-raises for a bug report)."""
    message = " ".join(str(message).split())  # one line, whatever the exception text held
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _stopped(exc: Any) -> None:
    """A signal stopped the job (pipeline.signals): its one line, exit 128 + signum, no Ray left behind."""
    _shutdown_ray()
    typer.secho(" ".join(str(exc).split()), fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(exc.exit_code)


def _shutdown_ray() -> None:
    # An embedded Ray's raylet and workers go with it; a cluster sees its driver leave and reclaims the
    # job's actors and tasks. Only if this process started Ray at all (importing ray costs seconds).
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@app.callback()
def _main() -> None:
    # SIGTERM (Kubernetes, Slurm, `ray job stop`) stops a job as Ctrl-C does: one line, resumable output.
    from pipeline.signals import install

    install()


def _root_cause(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError, UserCodeException...)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _describe(exc: BaseException) -> str:
    """`Type: message` of what really failed; Ray keeps a worker's exception only as traceback text."""
    import re

    cause = _root_cause(exc)
    if not type(cause).__module__.startswith("ray"):
        lines = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {lines[0] if lines else ''}"
    for text in (str(exc), str(cause)):
        hits = [line.strip() for line in text.splitlines()
                if re.match(r"\s*[A-Za-z_][\w.]*(Error|Exception|Interrupt): ", line)
                and not line.strip().startswith("ray.")]
        if hits:
            return hits[-1]
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


def _crash(exc: BaseException) -> None:
    import os

    if os.environ.get("SPLINTER_TRACEBACK"):
        raise exc
    _fail(f"the job failed: {_describe(exc)[:300]} (committed shards are kept: fix the cause and rerun with "
          "--resume; SPLINTER_TRACEBACK=1 shows the traceback)", code=1)


def _progress(quiet: bool) -> Progress:
    return make_progress(quiet=quiet)


def _build(cls: type, config: Path | None, fields: dict[str, Any]) -> Any:
    from pipeline.settings import ConfigError

    overrides = {k: v for k, v in fields.items() if v is not None}
    try:
        return cls.from_file(config, **overrides) if config else cls.from_dict(overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _build_settings(cls: type, config: Path | None, flags: dict[str, Any], nested: dict[str, type] | None = None) -> Any:
    """The training jobs' settings: the config file, then the flags given (pipeline.settings.build_settings)."""
    from pipeline.settings import ConfigError, build_settings

    try:
        return build_settings(cls, config, flags, nested)
    except ConfigError as exc:
        _fail(str(exc))


def _run_job(fn: Any, cfg: Any, quiet: bool, formatter: Any) -> None:
    from pipeline.engine.watchdog import StallError
    from pipeline.settings import ConfigError
    from pipeline.signals import JobStopped, job_running
    from pipeline.storage.rundir import OutputExistsError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with job_running():
            stats = fn(cfg, progress=_progress(quiet))
    except (ConfigError, OutputExistsError) as exc:
        _fail(str(exc))
    except StallError as exc:  # the watchdog's own line already says what happened and what to do
        _shutdown_ray()
        _fail(f"the job {exc}", code=1)
    except JobStopped as exc:
        _stopped(exc)
    except KeyboardInterrupt:  # a signal before our handlers were in place
        _stopped(JobStopped(2, "committed shards are kept"))
    except Exception as exc:  # a crash: still one line, never a page of Ray tracebacks
        # A user error found inside a Ray worker (a truncated input file) reaches here wrapped by Ray.
        said = _describe(exc)
        for name in ("ConfigError: ", "pipeline.settings.ConfigError: "):
            if said.startswith(name):
                _fail(said[len(name):])
        _crash(exc)
    typer.echo(formatter(stats))


def _maybe_report(enabled: bool, output: str) -> None:
    if enabled:
        report(output)


@app.command()
def mine(
    input: Annotated[str, typer.Argument(help="File, directory, glob or URI (file://, s3://...) of the corpus.")],
    output: Annotated[str, typer.Argument(help="Output directory or URI: Parquet shards, bookkeeping under __splinter__/.")],
    config: ConfigOpt = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer dir or vocab.txt (default: bundled bert-base-cased + [QUESTION]).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed; output is identical for the same seed and input.")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="Tokens per sequence including [CLS]/[SEP] (default 512).")] = None,
    max_span_length: Annotated[int | None, typer.Option(help="Longest recurring n-gram, in word pieces (default 10).")] = None,
    max_questions: Annotated[int | None, typer.Option(help="Most [QUESTION] tokens per sequence (default 30).")] = None,
    layout: Annotated[str | None, typer.Option(help="collapsed: one [QUESTION] per masked span; original: the authors' [QUESTION]+[PAD]s with position_ids.")] = None,
    dupe_factor: Annotated[int | None, typer.Option(help="Independent passes per document, each with its own masking and chunk boundaries (default 1; the authors used 5).")] = None,
    num_workers: Annotated[int | None, typer.Option(help="Concurrent mining tasks (default: one per CPU).")] = None,
    text_column: Annotated[str | None, typer.Option(help="Text field of Parquet/JSONL records (default 'text').")] = None,
    id_column: Annotated[str | None, typer.Option(help="Document id field (default 'id'; a content hash when absent).")] = None,
    input_format: FormatOpt = None,
    shard_rows: ShardRowsOpt = None,
    shard_bytes: ShardBytesOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = None,
    local: LocalOpt = None,
    address: AddressOpt = None,
    num_cpus: CpusOpt = None,
    stall_timeout: StallOpt = None,
    quiet: QuietOpt = False,
    report: ReportOpt = False,
) -> None:
    """Generate recurring-span selection pretraining examples (Splinter's objective) as Parquet."""
    from pipeline.corpus.mining import format_mining_summary, run_mine
    from pipeline.settings import MineConfig

    cfg = _build(MineConfig, config, dict(
        input=[input], output=output, tokenizer=tokenizer, seed=seed, max_seq_length=max_seq_length,
        max_span_length=max_span_length, max_questions=max_questions, layout=layout, dupe_factor=dupe_factor, num_workers=num_workers,
        text_column=text_column, id_column=id_column, input_format=input_format, shard_rows=shard_rows,
        shard_bytes=shard_bytes, resume=resume, overwrite=overwrite, local=local, ray_address=address,
        num_cpus=num_cpus, stall_timeout=stall_timeout))
    _run_job(run_mine, cfg, quiet, format_mining_summary)
    _maybe_report(report, cfg.output)


@app.command()
def extract(
    input: Annotated[str, typer.Argument(help="Parquet/JSONL rows (id, context, question) or SQuAD JSON; with --questions, a corpus in any format `mine` reads. File, dir, glob or URI.")],
    output: Annotated[str, typer.Argument(help="Output directory or URI: Parquet shards, bookkeeping under __splinter__/.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Splinter checkpoint directory (config.json, weights, tokenizer files).")] = None,
    questions: Annotated[str | None, typer.Option("--questions", "-q", help="Ask these questions of every document of INPUT: a text file (one per line) or JSONL/CSV/Parquet with question_id, question; {field} slots are filled from each document.")] = None,
    text_column: Annotated[str | None, typer.Option(help="With --questions: the documents' text field (default 'text').")] = None,
    min_score: Annotated[float | None, typer.Option(help="Abstain (answer null, has_answer false) when the span's score is below this.")] = None,
    null_margin: Annotated[float | None, typer.Option(help="Answer only when score - null_score exceeds this (e.g. 0: the span beats [CLS]).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep the N best distinct spans per question across windows in the nbest_* columns.")] = None,
    config: ConfigOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Questions per batch handed to a model actor (default 256 on GPUs, 64 on CPUs).")] = None,
    num_actors: Annotated[str | None, typer.Option(help="Model actors: N, or MIN,MAX to grow while work is queued (default: one per GPU when on GPUs, else 1).")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per model actor, fractional allowed; implies GPUs even if none are up yet (autoscaling).")] = None,
    cpus_per_actor: Annotated[float | None, typer.Option(help="CPUs reserved per model actor = its torch threads, rounded up (default: 1 on GPU, else a fair share of a node).")] = None,
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic int8 encoder on CPU actors (faster, answers differ slightly from fp32).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per window (default 384).")] = None,
    stride: Annotated[int | None, typer.Option(help="Overlap between windows, in tokens (default 128).")] = None,
    max_answer_length: Annotated[int | None, typer.Option(help="Longest answer, in tokens (default 30).")] = None,
    max_context_chars: Annotated[int | None, typer.Option(help="Contexts longer than this get an error row (default 100000; with --questions: no limit).")] = None,
    n_best: Annotated[int | None, typer.Option(help="Also write the n best spans per question (default 0: off).")] = None,
    id_column: Annotated[str | None, typer.Option(help="Id field (default 'id').")] = None,
    question_column: Annotated[str | None, typer.Option(help="Question field; a list gives one row per question (default 'question').")] = None,
    context_column: Annotated[str | None, typer.Option(help="Context field (default 'context').")] = None,
    device: Annotated[str | None, typer.Option(help="auto (GPU when the cluster has or can add GPUs), cpu or cuda (wait for GPU workers).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")] = None,
    input_format: FormatOpt = None,
    shard_rows: ShardRowsOpt = None,
    shard_bytes: ShardBytesOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = None,
    local: LocalOpt = None,
    address: AddressOpt = None,
    num_cpus: CpusOpt = None,
    stall_timeout: StallOpt = None,
    quiet: QuietOpt = False,
    report: ReportOpt = False,
) -> None:
    """Answer every question over its context with a Splinter QA model; one output row per question."""
    from pipeline.corpus.extraction import format_extract_summary, run_extract
    from pipeline.settings import ExtractConfig

    cfg = _build(ExtractConfig, config, dict(
        input=[input], output=output, model=model, batch_size=batch_size, num_actors=num_actors,
        gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, quantize=quantize,
        max_length=max_length, stride=stride, max_answer_length=max_answer_length,
        max_context_chars=max_context_chars, n_best=n_best, id_column=id_column,
        question_column=question_column, context_column=context_column, device=device, dtype=dtype,
        questions=questions, text_column=text_column, min_score=min_score, null_margin=null_margin, top_k=top_k,
        input_format=input_format, shard_rows=shard_rows, shard_bytes=shard_bytes, resume=resume,
        overwrite=overwrite, local=local, ray_address=address, num_cpus=num_cpus,
        stall_timeout=stall_timeout))
    _run_job(run_extract, cfg, quiet, format_extract_summary)
    _maybe_report(report, cfg.output)


@app.command()
def evaluate(
    predictions: Annotated[str, typer.Argument(help="Output directory (or Parquet file) of `splinter extract`.")],
    gold: Annotated[str, typer.Argument(help="SQuAD v1.1 JSON, or Parquet/JSONL with id and answers columns.")],
    only_predicted: Annotated[bool, typer.Option("--only-predicted", help="Score only the gold questions that have an answer (default: all; unanswered ones score 0).")] = False,
) -> None:
    """SQuAD v1.1 exact match and F1 (official normalisation) of predictions against gold answers, with coverage."""
    from pipeline.corpus.evaluation import evaluate_files

    try:
        result = evaluate_files(predictions, gold, only_predicted=only_predicted)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if "warning" in result:
        typer.secho(f"warning: {result['warning']}", fg=typer.colors.YELLOW, err=True)
    typer.echo(json.dumps(result))


@app.command("from-bert")
def from_bert(
    bert_dir: Annotated[Path, typer.Argument(help="A BERT-family checkpoint directory (config.json, weights, vocab.txt).")],
    output: Annotated[Path, typer.Argument(help="Where to write the Splinter checkpoint.")],
    lowercase: Annotated[bool | None, typer.Option("--lowercase/--cased", help="Tokenizer casing (default: from the checkpoint's tokenizer_config.json, else cased).", show_default=False)] = None,
) -> None:
    """Initialise a Splinter QA model (fresh QASS head) from BERT weights, as the paper's baselines do."""
    from splinter.bert import bert_to_splinter

    try:
        written = bert_to_splinter(bert_dir, output, do_lower_case=lowercase)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {written} (the QASS head is untrained: `splinter finetune` it before extracting answers)")


# Training options shared by `finetune` and `fewshot`; None keeps the authors' default (FinetuneConfig).
ExamplesOpt = Annotated[int | None, typer.Option("--examples", help="Train on K sampled questions (default: all usable rows).")]
SampleSeedOpt = Annotated[int | None, typer.Option("--sample-seed", help="Seed of the sample: the first K usable rows of numpy default_rng(S).permutation (default 42).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Training seed: dropout, batch order, QASS re-init (default 42).")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Exactly N optimizer steps (overrides --epochs/--min-steps).")]
EpochsOpt = Annotated[float | None, typer.Option("--epochs", help="Passes over the training windows (default 10).")]
MinStepsOpt = Annotated[int | None, typer.Option("--min-steps", help="At least N optimizer steps (default 200).")]
LrOpt = Annotated[float | None, typer.Option("--learning-rate", "--lr", help="Peak AdamW learning rate (default 3e-5).")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Windows per forward pass (default 12).")]
AccumOpt = Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimizer step (default 1).")]
WarmupOpt = Annotated[float | None, typer.Option("--warmup-ratio", help="Share of steps with linear warmup (default 0.1).")]
MaxLenOpt = Annotated[int | None, typer.Option("--max-length", help="Tokens per window (default 384).")]
StrideOpt = Annotated[int | None, typer.Option("--stride", help="Overlap between windows, in tokens (default 128).")]
QueryLenOpt = Annotated[int | None, typer.Option("--max-query-length", help="Question tokens kept (default 64).")]
ReinitOpt = Annotated[bool | None, typer.Option("--reinit-qass/--no-reinit-qass", help="Re-initialise the QASS head (the authors' default) instead of keeping the checkpoint's.", show_default=False)]
GroupOpt = Annotated[bool | None, typer.Option("--length-grouping/--no-length-grouping", help="Length-grouped batches (default) or plain shuffled ones.", show_default=False)]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto (default: CUDA with bf16 autocast when present), cpu or cuda.")]
TrainFormatOpt = Annotated[str | None, typer.Option("--format", help="Training data format: auto (default), squad, parquet, jsonl, disk (save_to_disk).")]


def _training_settings(cls: type, config: Path | None, flags: dict[str, Any]) -> Any:
    """A finetune/fewshot job: its own fields and the library's FinetuneConfig, flat in file and flags."""
    from splinter.train import FinetuneConfig

    return _build_settings(cls, config, flags, nested={"training": FinetuneConfig})


@app.command()
def finetune(
    train: Annotated[str, typer.Argument(help="Training data: SQuAD JSON, Parquet/JSONL in the SQuAD/datasets schema, or a save_to_disk directory.")],
    output: Annotated[str, typer.Argument(help="Directory for the fine-tuned checkpoint (+ training_args.json, trainer_log.jsonl).")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Splinter checkpoint directory to start from (e.g. from `splinter from-bert`).")] = None,
    config: ConfigOpt = None,
    examples: ExamplesOpt = None,
    sample_seed: SampleSeedOpt = None,
    seed: SeedOpt = None,
    max_steps: MaxStepsOpt = None,
    epochs: EpochsOpt = None,
    min_steps: MinStepsOpt = None,
    learning_rate: LrOpt = None,
    batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None,
    warmup_ratio: WarmupOpt = None,
    max_length: MaxLenOpt = None,
    stride: StrideOpt = None,
    max_query_length: QueryLenOpt = None,
    reinit_qass: ReinitOpt = None,
    length_grouping: GroupOpt = None,
    device: DeviceOpt = None,
    input_format: TrainFormatOpt = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")] = None,
    negatives: Annotated[int | None, typer.Option("--negatives", help="Per training question, R unanswerable pairs (the question with a paragraph of another article, labelled [CLS]): teaches abstention.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", help="Save the training state to OUTPUT/checkpoint/ every N steps (default 50; 0: only when stopped by SIGTERM/Ctrl-C). Rerunning the same command continues from it.")] = None,
    overwrite: OverwriteOpt = None,
    quiet: QuietOpt = False,
    report: ReportOpt = False,
) -> None:
    """Fine-tune a Splinter QA model (the paper's few-shot recipe by default) and write a checkpoint.

    A run stopped (SIGTERM, Ctrl-C) or killed continues from its last checkpoint when the same command is
    run again; rerunning a finished run prints its summary. --overwrite starts over."""
    from pipeline.settings import ConfigError, FinetuneJob
    from pipeline.signals import JobStopped, job_running
    from pipeline.training.finetuning import format_finetune_summary, run_finetune

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = _training_settings(FinetuneJob, config, dict(
        train=train, output=output, model=model, examples=examples, sample_seed=sample_seed,
        input_format=input_format, overwrite=overwrite, num_threads=threads,
        seed=seed, max_steps=max_steps, epochs=epochs, min_steps=min_steps, learning_rate=learning_rate,
        batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=warmup_ratio, max_length=max_length,
        stride=stride, max_query_length=max_query_length, reinit_qass=reinit_qass, device=device,
        length_grouping=length_grouping, negatives=negatives, checkpoint_every=checkpoint_every))
    try:
        with job_running():
            stats = run_finetune(job, progress=_progress(quiet))
    except ConfigError as exc:
        _fail(str(exc))
    except JobStopped as exc:
        _stopped(exc)
    typer.echo(format_finetune_summary(stats))
    _maybe_report(report, output)


def _int_list(value: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        _fail(f"{flag} takes comma-separated integers, e.g. 16,128,1024; got {value!r}")
        raise  # unreachable: _fail exits


@app.command()
def fewshot(
    train: Annotated[str, typer.Argument(help="Training data to sample from (formats as for `finetune`).")],
    dev: Annotated[str, typer.Argument(help="Evaluation data with gold answers (SQuAD JSON, Parquet/JSONL, save_to_disk).")],
    output: Annotated[str, typer.Argument(help="Directory for results.parquet and one folder per run.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Splinter checkpoint directory every run starts from.")] = None,
    config: ConfigOpt = None,
    examples: Annotated[str | None, typer.Option("--examples", help="Training set sizes K, comma-separated (default 16,128,1024).")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Sampling seeds, comma-separated (default 42,...,46; each also seeds its run's training unless --seed is given).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="One training seed for every run (default: the run's sampling seed).")] = None,
    max_steps: MaxStepsOpt = None,
    epochs: EpochsOpt = None,
    min_steps: MinStepsOpt = None,
    learning_rate: LrOpt = None,
    batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None,
    warmup_ratio: WarmupOpt = None,
    max_length: MaxLenOpt = None,
    stride: StrideOpt = None,
    max_query_length: QueryLenOpt = None,
    reinit_qass: ReinitOpt = None,
    length_grouping: GroupOpt = None,
    device: DeviceOpt = None,
    eval_examples: Annotated[int | None, typer.Option("--eval-examples", help="Score on a fixed sample of N DEV questions (default: all).")] = None,
    max_answer_length: Annotated[int | None, typer.Option("--max-answer-length", help="Longest answer, in tokens (default 30; the authors used 10).")] = None,
    cpus_per_run: Annotated[int | None, typer.Option("--cpus-per-run", help="CPU slots (and torch threads) per run when there is no GPU (default 1).")] = None,
    input_format: TrainFormatOpt = None,
    overwrite: OverwriteOpt = None,
    address: AddressOpt = None,
    num_cpus: CpusOpt = None,
    quiet: QuietOpt = False,
    report: ReportOpt = False,
) -> None:
    """The paper's few-shot grid: for every (K, seed) sample, fine-tune, answer DEV, score; runs are Ray tasks."""
    from pipeline.settings import ConfigError, FewshotJob
    from pipeline.signals import JobStopped, job_running
    from pipeline.training.fewshot_grid import format_fewshot_summary, run_fewshot

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = _training_settings(FewshotJob, config, dict(
        train=train, dev=dev, output=output, model=model,
        examples=_int_list(examples, "--examples") if examples else None,
        seeds=_int_list(seeds, "--seeds") if seeds else None, train_seed=seed,
        eval_examples=eval_examples, max_answer_length=max_answer_length, input_format=input_format,
        cpus_per_run=cpus_per_run, overwrite=overwrite, address=address, num_cpus=num_cpus,
        max_steps=max_steps, epochs=epochs, min_steps=min_steps, learning_rate=learning_rate,
        batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=warmup_ratio, max_length=max_length,
        stride=stride, max_query_length=max_query_length, reinit_qass=reinit_qass, device=device,
        length_grouping=length_grouping))
    try:
        with job_running():
            stats = run_fewshot(job, progress=_progress(quiet))
    except ConfigError as exc:
        _fail(str(exc))
    except JobStopped as exc:
        _stopped(exc)
    typer.echo(format_fewshot_summary(stats))
    _maybe_report(report, output)
    if stats["failed"]:
        raise typer.Exit(1)


@app.command()
def pretrain(
    mined: Annotated[str, typer.Argument(help="Output directory of `splinter mine` (complete: it has _SUCCESS).")],
    output: Annotated[str, typer.Argument(help="Run directory: checkpoints, trainer_log.jsonl, final/. Rerun to resume.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Start from a Splinter checkpoint directory.")] = None,
    from_bert: Annotated[str | None, typer.Option("--from-bert", help="Start from a BERT-family checkpoint directory (fresh QASS head).")] = None,
    model_config: Annotated[str | None, typer.Option("--model-config", help="Start from scratch: base, large, or a Splinter config.json.")] = None,
    config: ConfigOpt = None,
    preset: Annotated[str | None, typer.Option(help="Defaults for the settings below: laptop (small, the default), or authors (batch 256, lr 1e-4, 10k warmup, 2.4M steps).")] = None,
    num_workers: Annotated[int | None, typer.Option(help="Ray Train workers (DDP processes; one GPU each with --use-gpu; default 1).")] = None,
    use_gpu: Annotated[bool | None, typer.Option("--use-gpu/--no-use-gpu", help="One GPU per worker: nccl, bf16 autocast.", show_default=False)] = None,
    cpus_per_worker: Annotated[float | None, typer.Option(help="CPUs per worker (default: the cluster's CPUs less one for data, shared out).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps in all (laptop 1000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per optimizer step over all workers (laptop 32).")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate (1e-4).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps, then linear decay to 0 (laptop 100).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step on each worker (effective batch > memory; default 1).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (0.01; biases and norms exempt).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Gradient clipping norm (1.0; 0: none).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints (default 200).")] = None,
    keep_checkpoints: Annotated[int | None, typer.Option(help="Checkpoints kept, the newest (default 2).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the shuffle, a fresh model or head, and dropout (default 0).")] = None,
    shuffle: Annotated[str | None, typer.Option(help="global (default): a seeded full shuffle every epoch; local: a per-worker buffer.")] = None,
    shuffle_buffer: Annotated[int | None, typer.Option(help="Rows in each worker's buffer with --shuffle local (default 10000).")] = None,
    max_failures: Annotated[int | None, typer.Option(help="Restarts of failed workers from the last checkpoint (default 2).")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite/--no-overwrite", help="Replace an earlier run in OUTPUT (only the files it wrote).", show_default=False)] = None,
    address: AddressOpt = None,
    num_cpus: CpusOpt = None,
    quiet: QuietOpt = False,
    report: ReportOpt = False,
) -> None:
    """Pretrain Splinter by recurring span selection on mined data, with Ray Train (DDP over workers)."""
    from pipeline.settings import ConfigError, PretrainConfig
    from pipeline.signals import JobStopped, job_running
    from pipeline.training.pretraining import PretrainError, format_pretrain_summary, run_pretrain

    cfg = _build_settings(PretrainConfig, config, dict(
        mined=mined, output=output, model=model, from_bert=from_bert, model_config=model_config, preset=preset,
        num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_steps=max_steps,
        batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps, grad_accum=grad_accum,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
        max_failures=max_failures, overwrite=overwrite, ray_address=address, num_cpus=num_cpus))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with job_running():
            stats = run_pretrain(cfg, progress=_progress(quiet))
    except ConfigError as exc:
        _fail(str(exc))
    except JobStopped as exc:
        _stopped(exc)
    except PretrainError as exc:
        _fail(str(exc), code=1)
    typer.echo(format_pretrain_summary(stats))
    _maybe_report(report, output)


@app.command()
def report(
    output: Annotated[str, typer.Argument(help="OUTPUT of any splinter job (mine, extract, pretrain, finetune, fewshot), finished or not.")],
) -> None:
    """Write OUTPUT's report: one self-contained HTML page of charts and key numbers read from the run's own
    records (nothing recomputed), marked partial for an unfinished run; prints its path."""
    from pipeline.report.page import write_report
    from pipeline.report.readers import ReportError

    try:
        typer.echo(f"report: {write_report(output)}")
    except ReportError as exc:
        _fail(str(exc))
    except Exception as exc:  # unreadable records: one line, never a traceback
        _fail(f"cannot write the report of {output}: {_describe(exc)[:300]}", code=1)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    options_metavar="[OPTIONS] -- COMMAND ARGS...",
)
def submit(
    ctx: typer.Context,
    address: Annotated[str | None, typer.Option(help="Ray dashboard address (default: RAY_ADDRESS).")] = None,
    working_dir: Annotated[str | None, typer.Option(help="Directory shipped to the cluster as the job's working dir.")] = None,
    runtime_env: Annotated[str | None, typer.Option(help="YAML/JSON runtime env file for the job.")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return right after submission.")] = False,
    submission_id: Annotated[str | None, typer.Option(help="Job id to use (default: generated).")] = None,
    entrypoint_num_gpus: Annotated[float, typer.Option(help="GPUs reserved for the driver (default 0: leave them to actors).")] = 0.0,
) -> None:
    """Submit `splinter COMMAND ARGS...` to a Ray cluster (Jobs API), stream logs, exit with its status.

    Example: splinter submit --address http://head:8265 -- extract s3://bucket/q.parquet s3://bucket/out --model /models/qa
    """
    from pipeline.submit import submit as submit_job

    code = submit_job(
        _cluster_command(list(ctx.args)),
        address=address,
        working_dir=working_dir,
        runtime_env=runtime_env,
        wait=not no_wait,
        submission_id=submission_id,
        entrypoint_num_gpus=entrypoint_num_gpus,
        log=typer.echo,
    )
    raise typer.Exit(code)


def _cluster_command(args: list[str]) -> list[str]:
    """`python -m pipeline.cli ARGS` after checking that ARGS start with one of our commands."""
    import difflib

    known = sorted(set(typer.main.get_command(app).commands) - {"submit"})  # type: ignore[attr-defined]
    if not args or args[0] not in known:
        near = difflib.get_close_matches(args[0], known, n=1) if args else []
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        given = f"unknown command {args[0]!r}{hint}; " if args else ""
        _fail(f"{given}give the command to run after `--`: splinter submit [OPTIONS] -- {'|'.join(known)} ARGS...")
    return ["python", "-m", "pipeline.cli", *args]


def main() -> None:  # pragma: no cover - console entry
    filter_stderr()
    app(prog_name="splinter")


if __name__ == "__main__":  # `python -m pipeline.cli ...`, as Ray job entrypoints use
    filter_stderr()
    sys.exit(app(prog_name="splinter"))
