"""`splinter` command line: the application on top of the library. Thin typer wrappers only.

Every command is also a plain Python call (`pipeline.mine.run_mine`, `pipeline.extract.run_extract`,
`pipeline.pretrain.run_pretrain`, `pipeline.evaluate.evaluate_files`, `splinter.checkpoint.bert_to_splinter`,
`pipeline.submit.submit`),
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
FormatOpt = Annotated[str | None, typer.Option("--format", help="Input format: auto, parquet, jsonl, text, textblocks, wikiextractor, squad.")]
ShardRowsOpt = Annotated[int | None, typer.Option(help="Rows per shard (Parquet, SQuAD, text files); a shard is the unit of commit and resume.")]
ShardBytesOpt = Annotated[int | None, typer.Option(help="Bytes per shard for JSONL inputs.")]
# Booleans are tri-state (None = not given) so a config file's `resume: true` can be turned off with --no-resume.
ResumeOpt = Annotated[bool | None, typer.Option("--resume/--no-resume", help="Finish an interrupted run: keep committed shards, redo the rest.", show_default=False)]
OverwriteOpt = Annotated[bool | None, typer.Option("--overwrite/--no-overwrite", help="Replace an earlier output of this tool (a directory holding anything else is refused).", show_default=False)]
LocalOpt = Annotated[bool | None, typer.Option("--local/--no-local", help="Run the stages in a plain local loop, without Ray.", show_default=False)]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else an embedded local Ray).")]
CpusOpt = Annotated[int | None, typer.Option("--num-cpus", help="CPUs for the embedded local Ray (default: all).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, only the summary.")]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _progress(quiet: bool) -> Progress:
    return make_progress(quiet=quiet)


def _build(cls: type, config: Path | None, fields: dict[str, Any]) -> Any:
    from pipeline.config import ConfigError

    overrides = {k: v for k, v in fields.items() if v is not None}
    try:
        return cls.from_file(config, **overrides) if config else cls.from_dict(overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _run_job(fn: Any, cfg: Any, quiet: bool, formatter: Any) -> None:
    from pipeline.config import ConfigError
    from pipeline.runner import OutputExistsError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        stats = fn(cfg, progress=_progress(quiet))
    except (ConfigError, OutputExistsError) as exc:
        _fail(str(exc))
    typer.echo(formatter(stats))


@app.command()
def mine(
    input: Annotated[str, typer.Argument(help="File, directory, glob or URI (file://, s3://...) of the corpus.")],
    output: Annotated[str, typer.Argument(help="Output directory or URI for Parquet shards and stats.json.")],
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
    quiet: QuietOpt = False,
) -> None:
    """Generate recurring-span selection pretraining examples (Splinter's objective) as Parquet."""
    from pipeline.config import MineConfig
    from pipeline.mine import format_mining_summary, run_mine

    cfg = _build(MineConfig, config, dict(
        input=[input], output=output, tokenizer=tokenizer, seed=seed, max_seq_length=max_seq_length,
        max_span_length=max_span_length, max_questions=max_questions, layout=layout, dupe_factor=dupe_factor, num_workers=num_workers,
        text_column=text_column, id_column=id_column, input_format=input_format, shard_rows=shard_rows,
        shard_bytes=shard_bytes, resume=resume, overwrite=overwrite, local=local, ray_address=address,
        num_cpus=num_cpus))
    _run_job(run_mine, cfg, quiet, format_mining_summary)


@app.command()
def extract(
    input: Annotated[str, typer.Argument(help="Parquet/JSONL rows (id, context, question) or SQuAD JSON; file, dir, glob or URI.")],
    output: Annotated[str, typer.Argument(help="Output directory or URI for Parquet shards and stats.json.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Splinter checkpoint directory (config.json, weights, tokenizer files).")] = None,
    config: ConfigOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Questions per batch handed to a model actor (default 256).")] = None,
    num_actors: Annotated[int | None, typer.Option(help="Model actors (one per GPU on a GPU cluster; default 1).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per window (default 384).")] = None,
    stride: Annotated[int | None, typer.Option(help="Overlap between windows, in tokens (default 128).")] = None,
    max_answer_length: Annotated[int | None, typer.Option(help="Longest answer, in tokens (default 30).")] = None,
    max_context_chars: Annotated[int | None, typer.Option(help="Contexts longer than this get an error row (default 100000).")] = None,
    n_best: Annotated[int | None, typer.Option(help="Also write the n best spans per question (default 0: off).")] = None,
    id_column: Annotated[str | None, typer.Option(help="Id field (default 'id').")] = None,
    question_column: Annotated[str | None, typer.Option(help="Question field; a list gives one row per question (default 'question').")] = None,
    context_column: Annotated[str | None, typer.Option(help="Context field (default 'context').")] = None,
    device: Annotated[str | None, typer.Option(help="auto (GPU when present), cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")] = None,
    input_format: FormatOpt = None,
    shard_rows: ShardRowsOpt = None,
    shard_bytes: ShardBytesOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = None,
    local: LocalOpt = None,
    address: AddressOpt = None,
    num_cpus: CpusOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Answer every question over its context with a Splinter QA model; one output row per question."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import format_extract_summary, run_extract

    cfg = _build(ExtractConfig, config, dict(
        input=[input], output=output, model=model, batch_size=batch_size, num_actors=num_actors,
        max_length=max_length, stride=stride, max_answer_length=max_answer_length,
        max_context_chars=max_context_chars, n_best=n_best, id_column=id_column,
        question_column=question_column, context_column=context_column, device=device, dtype=dtype,
        input_format=input_format, shard_rows=shard_rows, shard_bytes=shard_bytes, resume=resume,
        overwrite=overwrite, local=local, ray_address=address, num_cpus=num_cpus))
    _run_job(run_extract, cfg, quiet, format_extract_summary)


@app.command()
def evaluate(
    predictions: Annotated[str, typer.Argument(help="Output directory (or Parquet file) of `splinter extract`.")],
    gold: Annotated[str, typer.Argument(help="SQuAD v1.1 JSON, or Parquet/JSONL with id and answers columns.")],
) -> None:
    """SQuAD v1.1 exact match and F1 (official normalisation) of predictions against gold answers."""
    from pipeline.evaluate import evaluate_files

    try:
        result = evaluate_files(predictions, gold)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result))


@app.command("from-bert")
def from_bert(
    bert_dir: Annotated[Path, typer.Argument(help="A BERT-family checkpoint directory (config.json, weights, vocab.txt).")],
    output: Annotated[Path, typer.Argument(help="Where to write the Splinter checkpoint.")],
    lowercase: Annotated[bool | None, typer.Option("--lowercase/--cased", help="Tokenizer casing (default: from the checkpoint's tokenizer_config.json, else cased).", show_default=False)] = None,
) -> None:
    """Initialise a Splinter QA model (fresh QASS head) from BERT weights, as the paper's baselines do."""
    from splinter.checkpoint import bert_to_splinter

    try:
        written = bert_to_splinter(bert_dir, output, do_lower_case=lowercase)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {written} (the QASS head is untrained: fine-tune it before extracting answers)")


@app.command()
def pretrain(
    mined: Annotated[str, typer.Argument(help="Output directory of `splinter mine` (complete: it has _SUCCESS).")],
    output: Annotated[str, typer.Argument(help="Run directory: checkpoints, trainer_log.jsonl, final/. Rerun to resume.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Start from a Splinter checkpoint directory.")] = None,
    from_bert: Annotated[str | None, typer.Option("--from-bert", help="Start from a BERT-family checkpoint directory (fresh QASS head).")] = None,
    config: Annotated[str | None, typer.Option("--config", help="Start from scratch: base, large, or a Splinter config.json.")] = None,
    preset: Annotated[str, typer.Option(help="Defaults for the settings below: laptop (small), or authors (batch 256, lr 1e-4, 10k warmup, 2.4M steps).")] = "laptop",
    num_workers: Annotated[int, typer.Option(help="Ray Train workers (DDP processes; one GPU each with --use-gpu).")] = 1,
    use_gpu: Annotated[bool, typer.Option("--use-gpu/--no-use-gpu", help="One GPU per worker: nccl, bf16 autocast.")] = False,
    cpus_per_worker: Annotated[float | None, typer.Option(help="CPUs per worker (default: the cluster's CPUs less one for data, shared out).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps in all (laptop 1000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per optimizer step over all workers (laptop 32).")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate (1e-4).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps, then linear decay to 0 (laptop 100).")] = None,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step on each worker (effective batch > memory).")] = 1,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (0.01; biases and norms exempt).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Gradient clipping norm (1.0; 0: none).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 200,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept (the newest).")] = 2,
    seed: Annotated[int, typer.Option(help="Seed for the shuffle, a fresh model or head, and dropout.")] = 0,
    shuffle: Annotated[str, typer.Option(help="global: a seeded full shuffle every epoch; local: a per-worker buffer.")] = "global",
    shuffle_buffer: Annotated[int, typer.Option(help="Rows in each worker's buffer with --shuffle local.")] = 10_000,
    max_failures: Annotated[int, typer.Option(help="Restarts of failed workers from the last checkpoint.")] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in OUTPUT (only the files it wrote).")] = False,
    address: AddressOpt = None,
    num_cpus: CpusOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain Splinter by recurring span selection on mined data, with Ray Train (DDP over workers)."""
    from pipeline.config import ConfigError
    from pipeline.pretrain import PretrainConfig, PretrainError, format_pretrain_summary, run_pretrain

    cfg = PretrainConfig(
        mined=mined, output=output, model=model, from_bert=from_bert, config=config, preset=preset,
        num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_steps=max_steps,
        batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps, grad_accum=grad_accum,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
        max_failures=max_failures, overwrite=overwrite, ray_address=address, num_cpus=num_cpus)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        stats = run_pretrain(cfg, progress=_progress(quiet))
    except ConfigError as exc:
        _fail(str(exc))
    except PretrainError as exc:
        _fail(str(exc), code=1)
    typer.echo(format_pretrain_summary(stats))


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
    app(prog_name="splinter")


if __name__ == "__main__":  # `python -m pipeline.cli ...`, as Ray job entrypoints use
    sys.exit(app(prog_name="splinter"))
